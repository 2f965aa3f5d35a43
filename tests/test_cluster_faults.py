"""A worker killed while the model is set up, and the scheduler killed mid-run (issue 17, points 1 and 2).

Both on a real cluster of OS processes of their own (``real_cluster.ProcessCluster``: a ``dask scheduler`` and two
``dask worker`` processes), not the session's shared one: the first test needs workers that have never built a model
(their model setup, which imports TensorFlow, is the window the kill must land in), the second kills the scheduler.

* Model setup: the kill is timed by the victim's process group mapping TensorFlow's library (the plugin's setup has
  begun importing it) while no chunk of the store exists yet. The scheduler's broadcast of the plugin then fails
  ("Stream is closed"); the run registers it again and completes on the other worker, equal to a clean run.
* Scheduler: killed once a few batches are complete. The client stops with one :class:`SchedulerLostError` naming the
  store, what is saved and that a rerun resumes; the lock is released; a rerun against a new scheduler and new workers
  computes only the missing batches, and the store equals a clean run's.
"""

from __future__ import annotations

import glob
import os
import threading
import time

import faults
import pytest
import real_cluster

from cnndiff_xr.extraction import lock
from cnndiff_xr.extraction.run import SchedulerLostError

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    cluster = real_cluster.ProcessCluster(tmp_path_factory.mktemp("own-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _group_maps(pgid: int, library: str) -> bool:
    """Whether any process of process group ``pgid`` (a ``dask worker``: its nanny and worker) has mapped a file whose
    path contains ``library``."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                with open(stat[:-4] + "maps") as f:
                    if library in f.read():
                        return True
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return False


def _activation_chunks(path: str) -> list[str]:
    """The data chunks of the store's layers (not its coordinates, written with the layout)."""
    marker = f"{os.sep}activation{os.sep}c{os.sep}"
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files if marker in os.path.join(d, f)]


def test_worker_killed_during_model_setup(tmp_path, own_cluster, tiny_model):
    path = str(tmp_path / "setup-kill.zarr")
    victim = next(iter(own_cluster.workers))
    group = own_cluster.workers[victim].pid
    seen: dict = {}

    def killer():
        try:
            deadline = time.monotonic() + 300
            while not _group_maps(group, "tensorflow"):
                assert time.monotonic() < deadline, "the worker never began to set up the model"
                time.sleep(0.01)
            seen["chunks"] = _activation_chunks(path)
            seen["done"] = faults.done_batches(path)
            own_cluster.kill_worker(victim)
        except BaseException as err:  # reported by the main thread
            seen["error"] = err

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        _, report = faults.run_extraction(path, own_cluster.address, model=tiny_model)
    finally:
        thread.join()
        own_cluster.add_worker(wait=False)  # two workers again for the clean run and the next test
    assert "error" not in seen, seen.get("error")
    assert seen["done"] == 0 and seen["chunks"] == [], seen  # killed during setup: no data chunk existed
    assert (report.batches_computed, report.batches_already_complete) == (faults.n_batches(), 0)
    reference = str(tmp_path / "clean.zarr")
    faults.run_extraction(reference, own_cluster.address, model=tiny_model)
    faults.assert_same_store(path, reference)


def test_scheduler_killed_mid_run_then_rerun_on_a_new_scheduler(tmp_path, own_cluster, tiny_model):
    path = str(tmp_path / "scheduler-kill.zarr")
    n = faults.n_batches()
    seen: dict = {}

    def killer():
        try:
            deadline = time.monotonic() + 300
            while (done := faults.done_batches(path)) < 3:
                assert time.monotonic() < deadline, "no progress to 3 complete batches"
                time.sleep(0.02)
            assert done < n - 4, f"the run finished {done} batches before it could be interrupted; make it slower"
            real_cluster.kill_group(own_cluster.scheduler)
            own_cluster.scheduler = None
            seen["done"] = done
        except BaseException as err:
            seen["error"] = err

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        with pytest.raises(SchedulerLostError) as info:
            faults.run_extraction(path, own_cluster.address, model=tiny_model)
    finally:
        thread.join()
    assert "error" not in seen, seen.get("error")
    message = str(info.value)
    assert path in message and "images are saved" in message and "rerun the same extraction" in message, message
    saved = faults.done_batches(path)
    assert seen["done"] <= saved < n
    assert lock.read_lock(path) is None  # the writer lock is released

    fresh = real_cluster.ProcessCluster(tmp_path / "new-cluster")
    try:
        fresh.start()
        _, report = faults.run_extraction(path, fresh.address, model=tiny_model)
        reference = str(tmp_path / "clean.zarr")
        faults.run_extraction(reference, fresh.address, model=tiny_model)
    finally:
        fresh.stop()
    # the orphaned workers of the dead scheduler may finish a batch or two after the error: never more than missing
    assert report.batches_already_complete >= saved and report.batches_computed == n - report.batches_already_complete
    faults.assert_same_store(path, reference)
