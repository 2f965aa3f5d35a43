"""Faults on a real multi-process Dask cluster, and store safety.

The cluster is real: a ``dask scheduler`` and two ``dask worker`` processes started from the venv on 127.0.0.1 (see
``real_cluster.py``). Extraction jobs are made long enough to be interrupted by a preprocessing step that sleeps
``faults.SLOW_SECONDS`` per batch; every test asserts that its kill really landed mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import faults
import numpy as np
import pytest
import real_cluster
import xarray as xr
import zarr
from tiny import TINY_LAYERS, TINY_SIZE

import cnndiff_xr as cx
from cnndiff_xr.extraction import images, lock, store
from cnndiff_xr.extraction.run import ExtractionError

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def process_cluster(tmp_path_factory):
    cluster = real_cluster.acquire(tmp_path_factory)
    yield cluster
    real_cluster.release()


@pytest.fixture(scope="module")
def rc_client(process_cluster):
    from distributed import Client

    with Client(process_cluster.address, set_as_default=False, timeout="30s") as client:
        yield client


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, process_cluster, tiny_model):
    """A clean, uninterrupted run of the fault job, against the cluster's address (as ``--scheduler`` would)."""
    path = str(tmp_path_factory.mktemp("reference") / "clean.zarr")
    faults.run_extraction(path, process_cluster.address, model=tiny_model)
    return path


assert_same_store = faults.assert_same_store
_load = faults.load_layer


def _chunk_files(path, batch):
    """The chunk files (every layer, and the completion record) of one batch."""
    files = [os.path.join(path, "completed", "c", str(batch))]
    for name in TINY_LAYERS:
        chunk = os.path.join(path, name, "activation", "c", str(batch))  # c/<batch>/0/0/0 or, dense, c/<batch>/0
        files += sorted(os.path.join(d, f) for d, _, fs in os.walk(chunk) for f in fs)
    return files


_done_batches = faults.done_batches


def _wait_until_partly_done(path, low, high, timeout=180, alive=lambda: True):
    """Poll the completion record until low <= complete batches <= high; fail if the run got past ``high``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _done_batches(path)
        if low <= done <= high:
            return done
        assert done < high, f"the run finished {done} batches before it could be interrupted; make it slower"
        assert alive(), "the extraction ended before it could be interrupted"
        time.sleep(0.02)
    raise TimeoutError(f"{path}: no progress to {low} complete batches in {timeout} s")


# ------------------------------------------------------------------------------------------------ real cluster
def test_extraction_and_differentiation_on_real_cluster(reference_store, tiny_model, rc_client):
    import keras
    from keras.applications.mobilenet_v2 import preprocess_input

    tree = cx.open_activations(reference_store)
    table = images.image_table(faults.fault_sets())
    assert list(tree["image"].values) == table.ids
    x = preprocess_input(images.load_batch(table.refs, (TINY_SIZE, TINY_SIZE)).astype("float32"))
    conv2 = keras.Model(tiny_model.input, tiny_model.get_layer("conv2").output)(x, training=False)
    np.testing.assert_allclose(_load(tree, "conv2").values, np.asarray(conv2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_load(tree, "input_layer").values, x, rtol=1e-6)

    d = cx.differentiation(tree, n_units=(10, 100), resamples=2, seed=3)
    on_cluster = d.compute(scheduler=rc_client)  # the graph runs on the scheduler's worker processes
    local = d.compute(scheduler="synchronous")
    xr.testing.assert_allclose(on_cluster, local)
    assert on_cluster.sizes == {"set": 2, "layer": len(TINY_LAYERS), "n_units": 2, "resample": 2}
    assert np.isfinite(on_cluster.values).all()


def test_client_sigkill_then_rerun_finishes_only_missing(tmp_path, process_cluster, reference_store):
    """SIGKILL the client process mid-extraction; the same command again finishes only the missing batches."""
    path = str(tmp_path / "client-killed.zarr")
    n = faults.n_batches()
    command = [sys.executable, "-m", "faults", process_cluster.address, path]

    def launch(log):
        with open(tmp_path / f"{log}.out", "wb") as out, open(tmp_path / f"{log}.err", "wb") as err:
            return subprocess.Popen(command, cwd=real_cluster.TESTS_DIR, env=real_cluster.child_env(), stdout=out,
                                    stderr=err, start_new_session=True, preexec_fn=real_cluster.child_setup())

    first = launch("first")
    try:
        _wait_until_partly_done(path, 3, n - 8, alive=lambda: first.poll() is None)
    finally:
        real_cluster.kill_group(first)
    assert first.returncode == -signal.SIGKILL
    held = lock.read_lock(path)
    assert held is not None and held["pid"] == first.pid  # the dead client's lock is left behind
    done_at_kill = store.completed(path)
    complete = [b for b in range(n) if done_at_kill[b * 2:(b + 1) * 2].all()]
    assert 3 <= len(complete) < n - 4
    mtimes = {f: os.stat(f).st_mtime_ns for b in complete for f in _chunk_files(path, b)}

    second = launch("second")
    second.wait(timeout=240)
    err = (tmp_path / "second.err").read_text()
    assert second.returncode == 0, err
    report = json.loads((tmp_path / "second.out").read_text().split("REPORT ", 1)[1])
    # the stale lock of the dead client (same host, process gone) was removed, with a warning saying so
    assert "no longer running" in err and lock.read_lock(path) is None
    # only the missing batches ran: at least those complete at the kill were skipped (orphaned tasks that were
    # executing when the client died may have completed a few more) and their chunks were not rewritten
    assert report["batches_already_complete"] >= len(complete)
    assert report["batches_computed"] == n - report["batches_already_complete"] > 0
    assert report["images_computed"] == 2 * report["batches_computed"]
    assert {f: os.stat(f).st_mtime_ns for f in mtimes} == mtimes
    assert_same_store(path, reference_store)


# ------------------------------------------------------------------------------------------------ store safety
SMALL = {"s": images.white_noise(8, seed=5, size=(TINY_SIZE, TINY_SIZE))}  # 4 batches of 2


def test_two_runs_on_one_store_one_is_refused(tmp_path, rc_client, tiny_model):
    path = str(tmp_path / "shared.zarr")
    outcome = {}

    def first():
        try:
            outcome["report"] = faults.run_extraction(path, rc_client, model=tiny_model, sets=SMALL)[1]
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=first)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while lock.read_lock(path) is None and thread.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(lock.StoreLockedError) as refused:
            faults.run_extraction(path, rc_client, model=tiny_model, sets=SMALL)
        assert thread.is_alive()  # refused while the first run was still going
    finally:
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    message = str(refused.value)
    assert repr(path) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "break_lock" in message
    assert outcome["report"].batches_computed == 4 and bool(store.completed(path).all())
    assert lock.read_lock(path) is None  # released
    _, again = faults.run_extraction(path, rc_client, model=tiny_model, sets=SMALL)
    assert (again.batches_computed, again.batches_already_complete) == (0, 4)


def _foreign_lock(path, **fields):
    record = {"token": "t", "pid": 12345, "host": "other-host.example", "started": "2026-01-01T00:00:00+00:00",
              "heartbeat": time.time(), "command": "cnndiff extract ..."}
    record.update(fields)
    with open(lock.lock_url(path), "w") as fh:
        json.dump(record, fh)


def test_lock_rules_stale_and_break(tmp_path, tiny_model):
    path = str(tmp_path / "locked.zarr")
    # a live holder on another host: refused before anything is done, naming the store and the holder
    _foreign_lock(path)
    with pytest.raises(lock.StoreLockedError, match="pid 12345 on host 'other-host.example'") as refused:
        cx.extract(SMALL, store=path, model=tiny_model, preprocess=faults.slow_preprocess, progress=False)
    assert repr(path) in str(refused.value) and not os.path.exists(path)
    # the same holder silent for longer than LOCK_STALE_S: stale, removed with a warning
    _foreign_lock(path, heartbeat=time.time() - lock.LOCK_STALE_S - 5)
    with pytest.warns(UserWarning, match="last heartbeat was"):
        with lock.StoreLock(path) as held:
            assert lock.read_lock(path)["token"] == held.token
    assert lock.read_lock(path) is None
    # a holder on this host whose process is gone: stale at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lock(path, host=socket.gethostname(), pid=dead.pid)
    with pytest.warns(UserWarning, match=f"process {dead.pid} on this host"):
        lock.StoreLock(path).acquire().release()
    # break_lock removes a live holder's lock; an unreadable lock object is held by an unknown holder
    _foreign_lock(path)
    with pytest.warns(UserWarning, match="break_lock=True"):
        lock.StoreLock(path, break_lock=True).acquire().release()
    with open(lock.lock_url(path), "w") as fh:
        fh.write("garbage")
    with pytest.raises(lock.StoreLockedError, match="unknown holder"):
        lock.StoreLock(path).acquire()
    assert lock.break_lock(path) == {"token": None, "unreadable": "garbage"}
    assert lock.break_lock(path) is None


def test_lock_heartbeat_and_exclusive_creation(tmp_path):
    path = str(tmp_path / "beating.zarr")
    with lock.StoreLock(path, heartbeat=0.05, stale_after=5) as held:
        first = lock.read_lock(path)["heartbeat"]
        time.sleep(0.3)
        assert lock.read_lock(path)["heartbeat"] > first
        with pytest.raises(lock.StoreLockedError):  # the same process, a second writer: refused too
            lock.StoreLock(path).acquire()
        assert lock.read_lock(path)["token"] == held.token
    assert not os.path.exists(lock.lock_url(path))
    # many threads race to create one lock: exactly one wins
    winners, barrier = [], threading.Barrier(8)

    def contend():
        barrier.wait()
        try:
            winners.append(lock.StoreLock(path).acquire())
        except lock.StoreLockedError:
            pass

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    winners[0].release()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary files left behind


def _copy_store(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, rc_client, tiny_model):
    path = str(tmp_path_factory.mktemp("small") / "small.zarr")
    faults.run_extraction(path, rc_client, model=tiny_model, sets=SMALL)
    return path


def test_torn_chunk_of_an_incomplete_batch_is_rewritten(tmp_path, small_store, rc_client, tiny_model):
    """A crash mid-write (simulated: batch 1's chunks torn in every layer, its completion never written): the data is
    not marked complete, reading it fails, and the rerun rewrites exactly that batch."""
    path = _copy_store(small_store, tmp_path / "torn.zarr")
    group = zarr.open_group(path, mode="r+")
    group["completed"][2:4] = False
    for f in _chunk_files(path, 1)[1:]:
        data = open(f, "rb").read()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])  # a torn write: the first half of the chunk
    # the torn chunk really is unreadable: its crc32c no longer matches (ValueError; a store without checksums: blosc
    # refuses to decompress it, RuntimeError)
    with pytest.raises((RuntimeError, ValueError)):
        zarr.open_group(path, mode="r")["conv1/activation"][2:4]
    others = {f: os.stat(f).st_mtime_ns for b in (0, 2, 3) for f in _chunk_files(path, b)}
    _, report = faults.run_extraction(path, rc_client, model=tiny_model, sets=SMALL)
    assert (report.batches_computed, report.batches_already_complete) == (1, 3)
    assert {f: os.stat(f).st_mtime_ns for f in others} == others
    assert_same_store(path, small_store)


def test_crash_between_layer_writes_never_marks_the_batch_complete(tmp_path, rc_client, tiny_model, small_store):
    """A task whose batch cannot be written whole (its conv2 chunk cannot be written) leaves the batch incomplete,
    though its other layers' chunks are on disk (a batch's chunks are written together, and every write ends before
    the task fails); the rerun completes it."""
    path = _copy_store(small_store, tmp_path / "crashed.zarr")
    zarr.open_group(path, mode="r+")["completed"][4:6] = False  # batch 2 is to be (re)computed
    for f in _chunk_files(path, 2)[1:]:
        os.remove(f)
    blocker = os.path.join(path, "conv2", "activation", "c", "2", "0", "0", "0")
    os.makedirs(blocker)  # a directory where batch 2's conv2 chunk file must go: that write fails
    with pytest.raises(ExtractionError, match="1 of 1 batches failed .*IsADirectoryError"):
        faults.run_extraction(path, rc_client, model=tiny_model, sets=SMALL)
    assert list(store.completed(path)) == [True] * 4 + [False] * 2 + [True] * 2
    written = {os.path.relpath(f, path).split(os.sep)[0] for f in _chunk_files(path, 2)[1:]}
    assert written == set(TINY_LAYERS) - {"conv2"}  # every other chunk is written, yet batch 2 is not complete
    os.rmdir(blocker)
    _, report = faults.run_extraction(path, rc_client, model=tiny_model, sets=SMALL)
    assert (report.batches_computed, report.batches_already_complete) == (1, 3)
    assert_same_store(path, small_store)


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "file", "other-files", "zarr-array", "foreign-group"])
def test_not_a_store_gives_a_clear_error(tmp_path, kind, tiny_model):
    path = tmp_path / "thing.zarr"
    if kind == "empty-dir":
        path.mkdir()
    elif kind == "file":
        path.write_text("hello")
    elif kind == "other-files":
        path.mkdir()
        (path / "notes.txt").write_text("x")
    elif kind == "zarr-array":
        zarr.create_array(str(path), shape=(3,), dtype="i4")
    elif kind == "foreign-group":
        zarr.open_group(str(path), mode="w").attrs["format"] = "something-else"
    for call in (cx.open_activations, store.info):
        with pytest.raises(store.StoreError, match="not a cnndiff_xr store") as err:
            call(str(path))
        assert repr(str(path)) in str(err.value)
    if kind in ("file", "other-files", "foreign-group"):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(store.StoreError, match="not a cnndiff_xr store"):  # refused before any work
            cx.extract(SMALL, store=str(path), model=tiny_model, preprocess=faults.slow_preprocess, progress=False)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, lock released


def _zarr_arrays_in_graph(array):
    """The zarr arrays a dask-backed DataArray reads from (found by walking its graph's task arguments; a store's
    reader, ``CheckedChunks``, opens its array in the process that reads: the one it would read from here)."""
    from cnndiff_xr.extraction.checksums import CheckedChunks, _open_array

    found = []

    def visit(obj, depth=0):
        if depth > 8:
            return
        if isinstance(obj, CheckedChunks):
            found.append(_open_array(obj.url, obj.storage_options, obj.store_id, obj.path, obj.shape)[1])
        elif isinstance(obj, zarr.Array):
            found.append(obj)
        elif hasattr(obj, "_array") and not isinstance(obj, np.ndarray):
            visit(obj._array, depth + 1)
        elif hasattr(obj, "array") and not isinstance(obj, (np.ndarray, xr.DataArray)):
            visit(obj.array, depth + 1)
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                visit(item, depth + 1)

    for task in dict(array.data.__dask_graph__()).values():
        visit(getattr(task, "args", task))
        for value in getattr(task, "dependencies", ()) or ():
            visit(value)
        visit(getattr(task, "value", None))
    return found


def test_analysis_opens_stores_read_only(small_store):
    tree = cx.open_activations(small_store)
    act = tree["conv1"]["activation"]
    arrays = _zarr_arrays_in_graph(act)
    assert arrays, "no zarr array found behind the activation"
    for arr in arrays:
        assert arr.read_only
        with pytest.raises(Exception, match="(?i)read.only"):
            arr[0:2] = 0
    before = {f: os.stat(f).st_mtime_ns for f in _chunk_files(small_store, 0)}
    cx.differentiation(tree, n_units=20, resamples=1).compute(scheduler="synchronous")
    assert {f: os.stat(f).st_mtime_ns for f in before} == before


def test_store_holds_no_pickled_objects(small_store, tmp_path):
    metadata = []
    for d, _, fs in os.walk(small_store):
        metadata += [json.load(open(os.path.join(d, f))) for f in fs if f in ("zarr.json", ".zarray", ".zattrs")]
    assert len(metadata) > len(TINY_LAYERS)

    def walk(obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                yield key, value
                yield from walk(value)
        elif isinstance(obj, list):
            for value in obj:
                yield from walk(value)

    pairs = [pair for meta in metadata for pair in walk(meta)]
    codec_names = {v for k, v in pairs if k in ("name", "id") and isinstance(v, str)}
    assert not {n for n in codec_names if "pickle" in n.lower()}, codec_names
    assert "object" not in {v for k, v in pairs if k in ("data_type", "dtype")}
    assert {"blosc", "vlen-utf8", "bytes"} <= codec_names  # sanity: we did look at the codecs
    # A store whose metadata names a pickle codec is refused before anything is decoded, even where that codec is
    # installed (zarr 3.1 alone does not know "numcodecs.pickle"; here a stand-in is registered under that name, so
    # that zarr itself would happily open the store and only cnndiff's check stands in the way).
    _register_fake_pickle_codec()
    bad = _copy_store(small_store, tmp_path / "pickled.zarr")
    for doc in (os.path.join(bad, "zarr.json"), os.path.join(bad, "conv1", "activation", "zarr.json")):
        meta = json.load(open(doc))
        node = meta["consolidated_metadata"]["metadata"]["conv1/activation"] if "consolidated_metadata" in meta \
            else meta
        node["codecs"].append({"name": "numcodecs.pickle"})
        json.dump(meta, open(doc, "w"))
    assert "FakePickle" in repr(zarr.open_group(bad, mode="r")["conv1/activation"].metadata.codecs)
    for call in (cx.open_activations, store.info, store.read_attrs):
        with pytest.raises(store.StoreError, match="holds arrays stored with pickled objects .conv1/activation: "
                                                   "numcodecs.pickle"):
            call(bad)


def _register_fake_pickle_codec():
    from dataclasses import dataclass

    from zarr.abc.codec import BytesBytesCodec
    from zarr.registry import register_codec

    @dataclass(frozen=True)
    class FakePickle(BytesBytesCodec):
        is_fixed_size = True

        @classmethod
        def from_dict(cls, data):
            return cls()

        def to_dict(self):
            return {"name": "numcodecs.pickle"}

        async def _decode_single(self, chunk, spec):
            raise AssertionError("a pickle codec was run on data read from a store")

        async def _encode_single(self, chunk, spec):
            return chunk

        def compute_encoded_size(self, n, spec):
            return n

    register_codec("numcodecs.pickle", FakePickle)


# ------------------------------------------------ last: it leaves the cluster with a fresh worker still starting
def test_worker_sigkill_mid_extraction(tmp_path, process_cluster, reference_store, tiny_model):
    """SIGKILL one worker (nanny and worker process) while batches are being written: the run completes on the other
    worker and the store equals the clean run."""
    path = str(tmp_path / "worker-killed.zarr")
    n = faults.n_batches()
    victim = next(iter(process_cluster.workers))
    seen = {}

    def killer():
        try:
            seen["before"] = _wait_until_partly_done(path, 3, n - 8)
            process_cluster.kill_worker(victim)
            seen["after"] = _done_batches(path)
        except BaseException as err:  # reported by the main thread
            seen["error"] = err

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        _, report = faults.run_extraction(path, process_cluster.address, model=tiny_model)
    finally:
        thread.join()
        process_cluster.add_worker(wait=False)  # back to two workers for later tests (it joins in the background)
    assert "error" not in seen, seen.get("error")
    assert victim not in process_cluster.workers
    # the kill landed mid-run: some batches were complete, and many were not yet, when the worker died
    assert 3 <= seen["before"] <= seen["after"] < n - 4, seen
    assert (report.batches_computed, report.batches_already_complete) == (n, 0)
    assert_same_store(path, reference_store)
