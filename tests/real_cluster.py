"""A real Dask cluster of separate OS processes for fault tests (importable as ``real_cluster``).

``dask scheduler`` and ``dask worker`` are started from the venv's own ``dask`` executable on 127.0.0.1, on ports the
OS picks (``--port 0``; the address comes back through a scheduler file), each in its own process group so that a test
can SIGKILL one worker (nanny and worker process together) and the teardown can kill everything. Every child also gets
``PR_SET_PDEATHSIG``: if pytest itself dies, the kernel kills them, so no process outlives the tests.

The workers run as root *without* ``CAP_DAC_OVERRIDE``/``CAP_DAC_READ_SEARCH`` (dropped from the capability bounding
set before exec), so file permission bits apply to them as to any unprivileged user: a ``chmod 000`` file is really
unreadable there even though the tests run as root. (Run as non-root, nothing needs dropping.)

Two test modules share one cluster through :func:`acquire` / :func:`release` (a reference count), so that it starts once
per session.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cnndiff_xr.extraction.cluster import WORKER_ENV

DASK = Path(sys.executable).with_name("dask")
TESTS_DIR = Path(__file__).resolve().parent

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def child_setup(drop_file_capabilities: bool = False):
    """A ``preexec_fn``: die with the parent; optionally obey file permissions even as root."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if drop_file_capabilities and os.geteuid() == 0:
            for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
                if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: no CAP_SETPCAP?")

    return setup


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours, one TF thread, and the tests folder importable (workers unpickle
    test helpers such as ``faults.slow_preprocess`` by reference)."""
    env = {**os.environ, **WORKER_ENV, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child started with ``start_new_session=True`` and everything in its process group; reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class ProcessCluster:
    """``dask scheduler`` + ``n_workers`` ``dask worker`` processes (one thread each) on 127.0.0.1."""

    def __init__(self, workdir: Path, n_workers: int = 2, memory_limit: str = "2GiB"):
        self.workdir = Path(workdir)
        self.n_workers = n_workers
        self.memory_limit = memory_limit
        self.scheduler_file = self.workdir / "scheduler.json"
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.address = ""
        self._count = 0

    def _spawn(self, args: list[str], log: str, drop: bool) -> subprocess.Popen:
        with open(self.workdir / log, "wb") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen([str(DASK), *args], stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                    cwd=self.workdir, start_new_session=True, preexec_fn=child_setup(drop))

    def start(self) -> ProcessCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scheduler = self._spawn(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(self.scheduler_file)], "scheduler.log", False)
        deadline = time.monotonic() + 60
        while not self.address:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited: {(self.workdir / 'scheduler.log').read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("dask scheduler did not write its scheduler file in 60 s")
            try:
                self.address = json.loads(self.scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        for _ in range(self.n_workers):
            self.add_worker(wait=False)
        self.wait_for_workers(self.n_workers)
        return self

    def add_worker(self, wait: bool = True) -> str:
        name = f"w{self._count}"
        self._count += 1
        self.workers[name] = self._spawn(
            ["worker", self.address, "--name", name, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
             "--no-dashboard", "--memory-limit", self.memory_limit, "--death-timeout", "60",
             "--local-directory", str(self.workdir / name)], f"{name}.log", True)
        if wait:
            self.wait_for_workers(len(self.workers))
        return name

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=timeout)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and its nanny (one process group): the worker is gone for good."""
        kill_group(self.workers.pop(name))

    def stop(self) -> None:
        for name in list(self.workers):
            self.kill_worker(name)
        if self.scheduler is not None:
            kill_group(self.scheduler)
            self.scheduler = None


_SHARED: ProcessCluster | None = None
_USERS = 0


def acquire(tmp_path_factory) -> ProcessCluster:
    """The session's shared cluster, started on first use."""
    global _SHARED, _USERS
    if _SHARED is None:
        cluster = ProcessCluster(tmp_path_factory.mktemp("real-cluster"))
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        _SHARED = cluster
        atexit.register(cluster.stop)  # belt and braces: stop() is idempotent
    _USERS += 1
    return _SHARED


def release() -> None:
    global _SHARED, _USERS
    _USERS -= 1
    if _USERS <= 0 and _SHARED is not None:
        _SHARED.stop()
        _SHARED = None
