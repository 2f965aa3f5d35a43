"""The embedded LocalCluster's worker processes: environment and memory reuse."""

from __future__ import annotations

import os
import platform
import resource

from cnndiff_xr.extraction.cluster import MALLOC_ENV, WORKER_ENV, get_client


def _worker_state() -> dict:
    """Environment seen by the worker, and page faults taken by a second 64 MiB buffer after a first was freed."""
    size = 64 * 2**20
    first = bytearray(size)
    first[::4096] = b"\1" * len(range(0, size, 4096))  # touch every page
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = bytearray(size)
    second[::4096] = b"\1" * len(range(0, size, 4096))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    env = {k: os.environ.get(k) for k in {**MALLOC_ENV, **WORKER_ENV}}
    return {"env": env, "faults": faults, "pages": size // 4096}


_STATE_SCRIPT = """
import json
from test_cluster import _worker_state
from cnndiff_xr.extraction.cluster import get_client

if __name__ == "__main__":
    with get_client(None, n_workers=1) as client:
        (state,) = client.run(_worker_state).values()
    print("STATE", json.dumps(state))
"""


def test_embedded_workers_get_their_environment_and_reuse_freed_buffers(tmp_path):
    # In a fresh interpreter, as a user's script starts the cluster. In the full test session this failed once
    # (MALLOC_TRIM_THRESHOLD_ was distributed's default, 65536) while passing alone: distributed's nannies write
    # their pre-spawn environment into their parent's os.environ before spawning, and the test process runs other
    # clusters (session fixtures) whose nannies may do so at the same moment; not found for certain.
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "state.py"
    script.write_text(_STATE_SCRIPT)
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}  # as a fresh shell has it
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.split("STATE ", 1)[1])
    assert state["env"] == {**MALLOC_ENV, **WORKER_ENV}
    if platform.libc_ver()[0] == "glibc":  # the MALLOC_* variables are glibc's
        # served from the heap freed by the first buffer: not one fresh page per 4 KiB (16384 here)
        assert state["faults"] < state["pages"] // 10, state


def test_a_users_client_is_left_as_it_is():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        with get_client(client) as same:
            assert same is client
        assert client.status == "running"  # not closed by get_client


def test_pre_spawn_setting_is_restored_after_start():
    import dask

    before = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    with get_client(None, n_workers=1):
        pass
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == before  # the config is restored afterwards
