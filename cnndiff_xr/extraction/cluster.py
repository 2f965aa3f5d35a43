"""Dask clusters: the embedded LocalCluster default, connecting to a scheduler, and the per-worker model cache.

The model is built once per worker by :class:`ModelPlugin` (registered with ``client.register_plugin``), when the
plugin is set up; a model that cannot be built fails the first task that needs it with a clear message instead of
blocking registration. Framework models never travel through Dask's serializer: only the small
:class:`~cnndiff_xr.extraction.backends.ModelSpec` does. Nothing here knows which framework that is.

The embedded cluster's worker processes are started without re-running the user's main script, so that a script
without an ``if __name__ == "__main__":`` guard works (:func:`get_client` says how); they ignore Ctrl-C, which the
process that started them handles by closing the cluster; and they log quietly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import dask
import numpy as np
from distributed import Client, LocalCluster, WorkerPlugin, get_worker
from distributed.utils import silence_logging_cmgr

from ..options import Dtype
from ..validation import ParameterTypeError, ParameterValueError, check_bool, check_optional_int, is_int
from .backends import ModelBackend, ModelSpec, quiet_framework_imports, verbose, worker_env
from .reduction import Reduction


def worker_environment() -> dict[str, str]:
    """The environment of the worker processes the embedded cluster starts, set before any framework starts: what
    each model backend asks for (one framework thread per Dask worker thread, so that two workers on two cores do not
    each start a pool as wide as the machine and thrash; quiet framework logging unless
    :func:`~cnndiff_xr.extraction.backends.verbose`), one OpenMP thread, and no profiler (below). Read when a cluster
    starts."""
    return {
        **worker_env(),
        "OMP_NUM_THREADS": "1",
        # distributed's statistical profiler samples every worker thread's Python stack every 10 ms; on this workload
        # it cost ~10 % of extraction throughput (benchmarks/RESULTS.md), and a one-task-at-a-time worker gains
        # nothing
        "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    }


#: :func:`worker_environment` as this module was imported (quiet logging unless verbose then), for clusters started
#: by hand with the same settings.
WORKER_ENV = worker_environment()

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


def starting_from_main_script() -> bool:
    """Whether this process is a child started by :mod:`multiprocessing` ("spawn" or "forkserver") that is still
    re-running its parent's main script, which such a child does before it runs what it was started for.

    Read from the flag that :mod:`multiprocessing.spawn` sets on the current process for exactly that phase (its own
    ``_check_not_importing_main`` reads it to refuse starting processes then; ``multiprocessing.parent_process()``
    is still None at that point).
    """
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def refuse_in_starting_child(what: str) -> None:
    """Raise when :func:`starting_from_main_script`: ``what`` (say ``"extract()"``) was reached from a script's top
    level while a child process re-ran that script, and would run again there (a second extraction of the same
    store, a cluster started inside a worker) instead of in the script's own process only."""
    if not starting_from_main_script():
        return
    script = getattr(sys.modules.get("__mp_main__"), "__file__", None) or "the main script"
    raise RuntimeError(
        f"{what} was called while a new process re-ran {script} before starting (Python's 'spawn' start method "
        f"imports the main script in every process it starts). Put the script's code under "
        f"'if __name__ == \"__main__\":' so that it runs only when the script is run (see the README's "
        f"'Python in ten lines')."
    )


class _MainScriptHidden:
    """While any embedded cluster runs, the main module is announced to :mod:`multiprocessing` as a ``__main__``
    module, so that the worker processes it spawns do not re-run the user's script.

    A "spawn" (or "forkserver") child first re-runs the parent's main module as ``__mp_main__``: by path when the
    main module's ``__spec__`` is None (``python script.py``), by name otherwise, but not when that name is
    ``__main__`` or ends in ``.__main__`` (``multiprocessing.spawn.get_preparation_data`` and
    ``_fixup_main_from_name``). A script that calls :func:`~cnndiff_xr.extraction.run.extract` at its top level
    without an ``if __name__ == "__main__":`` guard would otherwise extract again in every worker (seen as
    "Nanny failed to start" and the script's own lock refusing itself). The workers need nothing from the main
    module: tasks and plugins reach them through Dask's serialisation, which pickles what the main module defines by
    value (``distributed.protocol.pickle``). The spec is put back when the last cluster closes; a restarted worker
    is spawned while it is still set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._main: Any = None
        self._saved: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._main = sys.modules.get("__main__")
                if self._main is not None:
                    self._saved = self._main.__dict__.get("__spec__")
                    self._main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._main is not None:
                    self._main.__spec__ = self._saved
                    self._main = self._saved = None


_main_script_hidden = _MainScriptHidden()

#: The module that distributed runs in every worker process of the embedded cluster as it starts (its ``preload``):
#: :func:`dask_setup` below.
WORKER_PRELOAD = __name__


def dask_setup(worker: Any) -> None:
    """distributed's preload hook, run in each worker process of the embedded cluster as it starts: ignore SIGINT,
    and import the model frameworks quietly (:func:`~cnndiff_xr.extraction.backends.quiet_framework_imports`).

    Ctrl-C in a terminal reaches every process of the foreground group, workers included; the process that started
    the cluster handles it (closing the cluster ends the workers), and a worker interrupted in the middle of a task
    would only add its own traceback.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_framework_imports()


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

    Only what this function starts is closed on exit; a Client passed in is left running. The embedded cluster's
    worker processes do not re-run the main script (see :class:`_MainScriptHidden`) and ignore Ctrl-C (the caller's
    process closes them). distributed logs nothing short of critical there, not even a failed task's traceback (the
    task's exception reaches the caller, which says it once), unless :func:`~cnndiff_xr.extraction.backends.verbose`
    (then warnings and errors too).

    Raises
    ------
    RuntimeError
        Called while a child process re-runs its parent's main script (:func:`refuse_in_starting_child`).
    """
    refuse_in_starting_child("get_client()")
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
    kwargs: dict[str, Any] = {}
    if processes:
        kwargs = {"env": worker_environment(),
                  "preload": [*(dask.config.get("distributed.worker.preload", None) or []), WORKER_PRELOAD]}
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **MALLOC_ENV}
    with contextlib.ExitStack() as running:
        if processes:
            running.enter_context(_main_script_hidden())
        with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                                   memory_limit=memory_limit, dashboard_address=":0",
                                   silence_logs=logging.WARNING if verbose() else logging.CRITICAL, **kwargs)
        with cluster, Client(cluster) as local_client:
            try:
                yield local_client
            finally:
                if not verbose():
                    # Closing logs at CRITICAL, with a traceback, what the scheduler could not tell a client already
                    # gone (seen after Ctrl-C: "Closed comm ... while trying to write lost-data"): noise for a
                    # cluster that is ending anyway. Entered on `running`, so it lasts until the cluster is closed.
                    running.enter_context(silence_logging_cmgr(logging.CRITICAL + 1))


def _check_memory_limit(memory_limit: Any) -> None:
    message = (f"memory_limit must be 'auto', a size such as '4GiB', or a number of bytes >= 0 (0: no limit), got "
               f"{memory_limit!r}")
    if isinstance(memory_limit, str):
        return
    if not is_int(memory_limit):
        raise ParameterTypeError(message)
    if memory_limit < 0:
        raise ParameterValueError(message)


class WeightsMismatchError(RuntimeError):
    """A worker built the model with other weights than those the store records (``weights_sha256``, the digest of
    the weights the client built for the run): its activations would not be the store's model's, so it computes no
    batch.

    Attributes
    ----------
    worker
        The worker's address.
    expected
        The digest the store records (the client's build).
    built
        The digest of the weights the worker built.
    """

    def __init__(self, worker: str, expected: str, built: str) -> None:
        self.worker, self.expected, self.built = worker, expected, built
        super().__init__(
            f"worker {worker} built the model with weights sha256 {built}, but the store records weights_sha256 "
            f"{expected} (the weights the client built for this run): that worker would write another model's "
            f"activations, so it computed nothing. Give it the same model files as the client (the ImageNet weights in "
            f"its Keras cache, the weights file at the same path) and the same framework versions, then rerun the "
            f"same extraction: it computes only the batches not yet written.")

    def __reduce__(self) -> tuple[Any, ...]:  # travels from a worker to the client by pickle: keep the fields
        return type(self), (self.worker, self.expected, self.built)


class ModelPlugin(WorkerPlugin):
    """Holds one :class:`~cnndiff_xr.extraction.backends.ModelBackend` per worker, built from a
    :class:`~cnndiff_xr.extraction.backends.ModelSpec` when the plugin is set up.

    Building in ``setup`` (which ``client.register_plugin`` waits for) keeps the model load out of the batches'
    timing and builds on every worker at once; a failure is kept and raised by the first task that needs the model,
    so it reaches the client with its message instead of only a worker log line.

    ``weights_sha256`` is the digest of the weights the client built (the store's ``weights_sha256``): each worker
    compares the digest of the model it built with it and, when they differ, refuses every batch with a
    :class:`WeightsMismatchError` naming both digests and the worker. A worker can build other weights than the
    client from the same spec: another file at the same path or in its Keras cache, another framework version, a
    model whose build is not deterministic. Without the check such a worker would write activations of another
    model into the store, indistinguishable from the rest.
    """

    def __init__(self, spec: ModelSpec, layers: Sequence[str], dtype: Dtype = "float32",
                 reduction: Reduction | None = None, weights_sha256: str | None = None) -> None:
        self.spec = spec
        self.layers = list(layers)
        self.dtype: Dtype = dtype
        self.reduction = reduction if reduction is not None else Reduction()
        self.weights_sha256 = weights_sha256
        self.name = plugin_name(spec, layers, dtype, self.reduction)
        self._model: ModelBackend | None = None
        self._error: BaseException | None = None
        self._address: str | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # the built model and the lock stay in the worker
        return {"spec": self.spec, "layers": self.layers, "dtype": self.dtype, "reduction": self.reduction,
                "weights_sha256": self.weights_sha256}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], state["layers"], state["dtype"], state["reduction"],  # type: ignore[misc]
                      state.get("weights_sha256"))

    def setup(self, worker: Any) -> None:
        self._address = getattr(worker, "address", None)
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
                model = self.spec.backend(self.layers, self.dtype, self.reduction)
                self._check_weights(model)
                self._model = model
            return self._model

    def _check_weights(self, model: ModelBackend) -> None:
        """Raise (and keep for every later task) a :class:`WeightsMismatchError` when ``model``'s weights are not
        those the client recorded."""
        if self.weights_sha256 is None:
            return
        built = model.weights_digest()
        if built != self.weights_sha256:
            address = self._address
            if address is None:  # built outside setup: the task's worker
                try:
                    address = get_worker().address
                except ValueError:
                    address = "(not a Dask worker)"
            self._error = WeightsMismatchError(str(address), self.weights_sha256, built)
            raise self._error


def plugin_name(spec: ModelSpec, layers: Sequence[str], dtype: Dtype = "float32",
                reduction: Reduction | None = None) -> str:
    """The name of the model plugin for ``spec``, ``layers``, ``dtype`` and ``reduction`` (deterministic, the same in
    every process): two runs of one model share the workers' copy, two models (or two reductions) on one cluster do
    not collide."""
    what = repr((list(layers), dtype, (reduction or Reduction()).key))
    return f"cnndiff-model-{spec.key}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


def worker_model(name: str, dtype: Dtype | None = None, layers: Sequence[str] | None = None) -> ModelBackend:
    """The model cached on the current worker by the plugin registered under ``name``; with ``dtype`` or ``layers``
    other than the plugin's, a fresh copy of the same model (same spec and reduction) giving those ``layers`` (default:
    the plugin's) in ``dtype`` (default: the plugin's), built now and not cached: the float16 overflow check needs the
    float32 values of the one batch that overflowed, and keeping a second model on every worker for that rare case
    would double the weights in memory."""
    worker = get_worker()
    try:
        plugin = worker.plugins[name]
    except KeyError as err:
        raise RuntimeError(f"worker {worker.address} has no model plugin {name!r}; was it registered?") from err
    if not isinstance(plugin, ModelPlugin):
        raise RuntimeError(f"worker plugin {name!r} is a {type(plugin).__name__}, not a cnndiff model plugin")
    if (dtype is not None and dtype != plugin.dtype) or (layers is not None and list(layers) != plugin.layers):
        return plugin.spec.backend(plugin.layers if layers is None else list(layers),
                                   plugin.dtype if dtype is None else dtype, plugin.reduction)
    return plugin.model()
