"""Dask clusters: the embedded LocalCluster default, connecting to a scheduler, and the per-worker model cache.

The model is built once per worker by :class:`ModelPlugin` (registered with ``client.register_plugin``), lazily on
the first task that needs it, so a model that cannot be built fails that task with a clear message instead of
blocking registration. Keras models never travel through Dask's serializer: only the small :class:`ModelSpec` does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence

import dask
import numpy as np
from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from .backends.keras import LayerExtractor, ModelSpec, set_tf_threads

# Set in every worker's environment before TensorFlow starts: one TF thread per Dask worker thread, so that two
# workers on two cores do not each start a pool as wide as the machine and thrash.
WORKER_ENV = {
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # distributed's statistical profiler samples every worker thread's Python stack every 10 ms; on this workload
    # it cost ~10 % of extraction throughput (benchmarks/RESULTS.md), and a one-task-at-a-time worker gains nothing
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
}

# glibc malloc settings for the worker processes this package starts. Without them, every buffer over 32 MiB (a
# decompressed or encoded chunk, a layer's output: tens of MB each) is a fresh mmap, paid for by a page fault on each
# of its 4 KiB pages and unmapped when freed; on the development VM those faults cost 0.4-2 ns per byte, about as much
# as decompressing it (benchmarks/RESULTS.md). Served from the heap instead, the same memory is reused from one chunk
# to the next. Two arenas (not 8 per core) keep the threads that decode and write chunks from each holding their own
# retained heap: peak worker RSS in benchmarks/bench_out_of_core.py was 410 MiB without these settings, ~690 MiB
# with the first two alone, 453 MiB with all three, at the same speed. glibc reads these when the process starts, so
# they go through distributed's pre-spawn environment (its own default there, MALLOC_TRIM_THRESHOLD_=65536, trims
# after every free); other C libraries ignore them.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20),
    "MALLOC_ARENA_MAX": "2",
}

#: Schemes of Dask scheduler addresses ("tcp://10.0.0.5:8786"); an address without a scheme means tcp.
ADDRESS_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")
_ADDRESS = re.compile(rf"(?:(?:{'|'.join(ADDRESS_SCHEMES)})://)?[^\s/]+")


def check_address(address: str, name: str = "client") -> str:
    """A scheduler address: ``[scheme://]host[:port]``, no spaces; the message names ``name``."""
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address.strip()):
        raise ValueError(f"{name}={address!r} is not a Dask scheduler address; give [scheme://]host:port, e.g. "
                         f"'tcp://10.0.0.5:8786' (schemes: {', '.join(ADDRESS_SCHEMES)})")
    return address.strip()


def default_n_workers() -> int:
    """One single-threaded worker process per core."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@contextlib.contextmanager
def get_client(
    client: Client | str | None = None,
    *,
    n_workers: int | None = None,
    processes: bool = True,
    memory_limit: str | int = "auto",
) -> Iterator[Client]:
    """Yield a Client: the one given, one connected to a scheduler address, or an embedded LocalCluster.

    Only what this function starts is closed on exit; a Client passed in is left running.
    """
    if isinstance(client, Client):
        yield client
        return
    if isinstance(client, str):
        client = check_address(client)
        try:
            connected = Client(client, timeout="30s")
        except OSError as err:
            raise ConnectionError(f"client={client!r}: could not connect to a Dask scheduler there ({err})") from err
        with connected:
            yield connected
        return
    if client is not None:
        raise TypeError(f"client must be None, a scheduler address or a distributed.Client, got "
                        f"{type(client).__name__}: {client!r}")
    if n_workers is not None and (not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1):
        raise ValueError(f"n_workers must be a positive int or None (one per core), got {n_workers!r}")
    if not isinstance(processes, bool):
        raise TypeError(f"processes must be True (worker processes) or False (threads), got {processes!r}")
    if not (memory_limit == "auto" or isinstance(memory_limit, str)
            or (isinstance(memory_limit, int) and not isinstance(memory_limit, bool) and memory_limit >= 0)):
        raise ValueError(f"memory_limit must be 'auto', a size such as '4GiB', or a number of bytes >= 0 "
                         f"(0: no limit), got {memory_limit!r}")
    workers = n_workers or default_n_workers()
    kwargs = {"env": WORKER_ENV} if processes else {}
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **MALLOC_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, memory_limit=memory_limit,
                               dashboard_address=":0", silence_logs=logging.ERROR, **kwargs)
    with cluster, Client(cluster) as local_client:
        yield local_client


class ModelPlugin(WorkerPlugin):
    """Holds one :class:`LayerExtractor` per worker, built from a :class:`ModelSpec` when the plugin is set up.

    Building in ``setup`` (which ``client.register_plugin`` waits for) keeps the model load out of the batches'
    timing and builds on every worker at once; a failure is kept and raised by the first task that needs the model,
    so it reaches the client with its message instead of only a worker log line.
    """

    def __init__(self, spec: ModelSpec, layers: Sequence[str], dtype: str = "float32"):
        self.spec = spec
        self.layers = list(layers)
        self.dtype = dtype
        self.name = plugin_name(spec, layers, dtype)
        self._extractor: LayerExtractor | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __getstate__(self):  # the built model and the lock stay in the worker
        return {"spec": self.spec, "layers": self.layers, "dtype": self.dtype}

    def __setstate__(self, state):
        self.__init__(state["spec"], state["layers"], state["dtype"])

    def setup(self, worker) -> None:
        # Workers this package starts get one TF thread each (WORKER_ENV); a user's own workers keep their settings
        if "TF_NUM_INTRAOP_THREADS" in os.environ:
            set_tf_threads(int(os.environ["TF_NUM_INTRAOP_THREADS"]), int(os.environ.get("TF_NUM_INTEROP_THREADS", 1)))
        try:
            extractor = self.extractor()
            # one tiny batch now: the first call of a Keras model pays for kernel selection and allocator warm-up
            extractor.run(np.zeros((1, *extractor.input_size, 3), dtype=np.uint8))
        except Exception as err:
            self._error = err

    def extractor(self) -> LayerExtractor:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._extractor is None:
                self._extractor = LayerExtractor(self.spec, self.layers, self.dtype)
            return self._extractor


def plugin_name(spec: ModelSpec, layers: Sequence[str], dtype: str = "float32") -> str:
    import hashlib

    return f"cnndiff-model-{spec.key}-{hashlib.sha256(repr((list(layers), dtype)).encode()).hexdigest()[:8]}"


def worker_extractor(name: str) -> LayerExtractor:
    """The extractor cached on the current worker by the plugin registered under ``name``."""
    worker = get_worker()
    try:
        plugin = worker.plugins[name]
    except KeyError as err:
        raise RuntimeError(f"worker {worker.address} has no model plugin {name!r}; was it registered?") from err
    return plugin.extractor()
