"""Dask clusters: the embedded LocalCluster default, connecting to a scheduler, and the per-worker model cache.

The model is built once per worker by :class:`ModelPlugin` (registered with ``client.register_plugin``), when the
plugin is set up; a model that cannot be built fails the first task that needs it with a clear message instead of
blocking registration. Framework models never travel through Dask's serializer: only the small
:class:`~cnndiff_xr.extraction.backends.ModelSpec` does. Nothing here knows which framework that is.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import dask
import numpy as np
from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from ..options import Dtype
from ..validation import ParameterTypeError, ParameterValueError, check_bool, check_optional_int, is_int
from .backends import ModelBackend, ModelSpec, worker_env

# Set in every worker's environment before any framework starts: what each model backend asks for (one framework
# thread per Dask worker thread, so that two workers on two cores do not each start a pool as wide as the machine and
# thrash), one OpenMP thread, and:
WORKER_ENV = {
    **worker_env(),
    "OMP_NUM_THREADS": "1",
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


def check_address(address: Any, name: str = "client") -> str:
    """A scheduler address: ``[scheme://]host[:port]``, no spaces; the message names ``name``."""
    message = (f"{name}={address!r} is not a Dask scheduler address; give [scheme://]host:port, e.g. "
               f"'tcp://10.0.0.5:8786' (schemes: {', '.join(ADDRESS_SCHEMES)})")
    if not isinstance(address, str):
        raise ParameterTypeError(message)
    if not _ADDRESS.fullmatch(address.strip()):
        raise ParameterValueError(message)
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
        raise ParameterTypeError(f"client must be None, a scheduler address or a distributed.Client, got "
                                 f"{type(client).__name__}: {client!r}")
    n_workers = check_optional_int("n_workers", n_workers, 1, what="a positive int or None (one per core)")
    check_bool("processes", processes,
               message=f"processes must be True (worker processes) or False (threads), got {processes!r}")
    _check_memory_limit(memory_limit)
    workers = n_workers or default_n_workers()
    kwargs = {"env": WORKER_ENV} if processes else {}
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **MALLOC_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, memory_limit=memory_limit,
                               dashboard_address=":0", silence_logs=logging.ERROR, **kwargs)
    with cluster, Client(cluster) as local_client:
        yield local_client


def _check_memory_limit(memory_limit: Any) -> None:
    message = (f"memory_limit must be 'auto', a size such as '4GiB', or a number of bytes >= 0 (0: no limit), got "
               f"{memory_limit!r}")
    if isinstance(memory_limit, str):
        return
    if not is_int(memory_limit):
        raise ParameterTypeError(message)
    if memory_limit < 0:
        raise ParameterValueError(message)


class ModelPlugin(WorkerPlugin):
    """Holds one :class:`~cnndiff_xr.extraction.backends.ModelBackend` per worker, built from a
    :class:`~cnndiff_xr.extraction.backends.ModelSpec` when the plugin is set up.

    Building in ``setup`` (which ``client.register_plugin`` waits for) keeps the model load out of the batches'
    timing and builds on every worker at once; a failure is kept and raised by the first task that needs the model,
    so it reaches the client with its message instead of only a worker log line.
    """

    def __init__(self, spec: ModelSpec, layers: Sequence[str], dtype: Dtype = "float32") -> None:
        self.spec = spec
        self.layers = list(layers)
        self.dtype: Dtype = dtype
        self.name = plugin_name(spec, layers, dtype)
        self._model: ModelBackend | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # the built model and the lock stay in the worker
        return {"spec": self.spec, "layers": self.layers, "dtype": self.dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], state["layers"], state["dtype"])  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        self.spec.prepare_process()  # before the framework runs anything in this process (thread pools)
        try:
            model = self.model()
            # one tiny batch now: the first call of a model pays for kernel selection and allocator warm-up
            model.run(np.zeros((1, *model.input_size, 3), dtype=np.uint8))
        except Exception as err:
            self._error = err

    def model(self) -> ModelBackend:
        """The model built on this worker (built now if ``setup`` has not run); raises what building it raised."""
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._model is None:
                self._model = self.spec.backend(self.layers, self.dtype)
            return self._model


def plugin_name(spec: ModelSpec, layers: Sequence[str], dtype: Dtype = "float32") -> str:
    """The name of the model plugin for ``spec``, ``layers`` and ``dtype`` (deterministic, the same in every
    process): two runs of one model share the workers' copy, two models on one cluster do not collide."""
    return f"cnndiff-model-{spec.key}-{hashlib.sha256(repr((list(layers), dtype)).encode()).hexdigest()[:8]}"


def worker_model(name: str) -> ModelBackend:
    """The model cached on the current worker by the plugin registered under ``name``."""
    worker = get_worker()
    try:
        plugin = worker.plugins[name]
    except KeyError as err:
        raise RuntimeError(f"worker {worker.address} has no model plugin {name!r}; was it registered?") from err
    if not isinstance(plugin, ModelPlugin):
        raise RuntimeError(f"worker plugin {name!r} is a {type(plugin).__name__}, not a cnndiff model plugin")
    return plugin.model()
