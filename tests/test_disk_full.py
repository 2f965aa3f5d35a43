"""A full disk during extraction (issue 17 point 3): on a real size-limited tmpfs, mounted by the test as root.

The run stops with DiskFullError naming the store, the free space and the bytes still needed; the lock is released;
every batch recorded complete is whole; after the tmpfs grows, the rerun equals a clean run. Before starting, a disk
clearly too small is refused (NotEnoughSpaceError) and ``force=True`` goes on. Skipped, with the reason, where
mounting is not permitted (not root, or no CAP_SYS_ADMIN in a container); CI runs them as root.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from faults import BATCH_SIZE, N_PER_SET, assert_same_store, fault_sets
from tiny import TINY_LAYERS, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr import cli
from cnndiff_xr.extraction import lock, store
from cnndiff_xr.extraction.diskspace import PREFLIGHT_RATIO, disk_full_cause
from cnndiff_xr.extraction.run import DiskFullError, NotEnoughSpaceError

#: The tiny model's store of the 48 fault images takes ~2.25 MB on a tmpfs (4 kB pages: ~0.3 MB of layout, ~75 kB
#: per batch of 2 white-noise images, which hardly compress): 1200 kB fills up about half way through the batches.
HALF_FULL = "1200k"
ROOMY = "16m"


def _not_permitted(stderr: str) -> bool:
    words = ("permission denied", "not permitted", "must be superuser", "only root")
    return any(w in stderr.lower() for w in words)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size) -> folder``: a tmpfs of that size mounted on a new folder; unmounted when the test ends."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "disk") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: the full-disk tests mount a tmpfs")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            if os.geteuid() != 0 or _not_permitted(result.stderr):
                pytest.skip(f"mounting a tmpfs is not permitted here (the full-disk tests need root with "
                            f"CAP_SYS_ADMIN; CI runs them): {result.stderr.strip()}")
            pytest.fail(f"mount -t tmpfs failed: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        # workers may still hold a file open for a moment after a failed batch: lazy unmount then
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def _remount(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def _extract(path, client, model, **kwargs):
    return cx.extract(fault_sets(), store=str(path), model=model, preprocess=tiny_preprocess(), client=client,
                      batch_size=BATCH_SIZE, progress=False, **kwargs)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, local_client, tiny_model):
    """The same extraction on the normal disk: what every run must end up equal to."""
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    _extract(path, local_client, tiny_model)
    return str(path)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files a failed write could leave: Zarr's ``*.partial`` and the lock's ``*.tmp``."""
    return [str(p) for p in folder.rglob("*") if p.suffix in (".partial", ".tmp")]


def test_full_disk_stops_with_what_is_needed_and_the_rerun_equals_a_clean_run(tmpfs, local_client, tiny_model,
                                                                            clean_store):
    disk = tmpfs(HALF_FULL)
    path = str(disk / "store.zarr")
    with pytest.raises(DiskFullError) as info:
        _extract(path, local_client, tiny_model, force=True)
    err = info.value
    assert type(err) is DiskFullError and "No space left on device" in err.detail, err.detail
    message = str(err)
    assert repr(path) in message and "is full" in message and "rerun the same extraction" in message, message
    done = store.completed(path)
    n_done = int(done.sum())
    assert 0 < n_done < 2 * N_PER_SET, f"the disk should fill mid-run: {n_done} images complete"
    assert err.remaining == 2 * N_PER_SET - n_done
    assert err.free is not None and 0 <= err.free < 1_200_000
    assert f"Free space now: {store.format_bytes(err.free)}" in message, message
    # the estimate is the measured average of the complete images: white noise hardly compresses, so near the
    # uncompressed 35.8 kB per image (4 x 8945 values) and not below half of it
    assert err.needed is not None and 0.5 * 35_780 * err.remaining <= err.needed <= 3 * 35_780 * err.remaining
    assert f"still needed: about {store.format_bytes(err.needed)} for the {err.remaining} images" in message
    assert lock.read_lock(path) is None
    assert _leftovers(disk) == []
    # every batch recorded complete holds the whole data of a clean run
    got, ref = cx.open_activations(path), cx.open_activations(clean_store)
    for start in range(0, 2 * N_PER_SET, BATCH_SIZE):
        if done[start:start + BATCH_SIZE].all():
            for name in TINY_LAYERS:
                np.testing.assert_array_equal(got[name]["activation"][start:start + BATCH_SIZE].values,
                                              ref[name]["activation"][start:start + BATCH_SIZE].values,
                                              err_msg=f"{name}, images {start}..")
    # space freed: the same extraction resumes and ends equal to the clean run
    _remount(disk, ROOMY)
    _extract(path, local_client, tiny_model)
    assert_same_store(path, clean_store)
    assert lock.read_lock(path) is None and _leftovers(disk) == []


def test_preflight_refuses_a_disk_clearly_too_small_before_writing_and_force_goes_on(tmpfs, local_client,
                                                                                   tiny_model):
    disk = tmpfs("64k")
    path = disk / "store.zarr"
    uncompressed = 2 * N_PER_SET * 4 * 8945  # float32, every unit of the tiny model's layers
    with pytest.raises(NotEnoughSpaceError) as info:
        _extract(path, local_client, tiny_model)
    err = info.value
    assert err.uncompressed == uncompressed and err.needed == int(uncompressed / PREFLIGHT_RATIO)
    assert err.free <= 64 * 1024  # measured while the lock held a page of it
    message = str(err)
    for part in (repr(str(path)), store.format_bytes(err.free), store.format_bytes(uncompressed),
                 store.format_bytes(err.needed), "force=True", "--force", "Nothing was written"):
        assert part in message, (part, message)
    assert not path.exists() and lock.read_lock(str(path)) is None and list(disk.iterdir()) == []
    assert pickle.loads(pickle.dumps(err)).args == err.args
    # force=True goes on, past the preflight, until the disk is full (here while writing the layout)
    with pytest.raises(DiskFullError) as info:
        _extract(path, local_client, tiny_model, force=True)
    assert type(info.value) is DiskFullError and repr(str(path)) in str(info.value)
    assert lock.read_lock(str(path)) is None and _leftovers(disk) == []
    assert not path.exists()  # the layout it began was removed: it would pass for a store and fail every batch
    # and with room, the rerun finishes what the layout's failure left
    _remount(disk, ROOMY)
    _extract(path, local_client, tiny_model)
    assert bool(store.completed(str(path)).all())


def test_lock_heartbeat_on_a_full_disk_warns_keeps_the_lock_and_leaves_no_temporary_file(tmpfs):
    disk = tmpfs("64k")
    path = str(disk / "store.zarr")
    held = lock.StoreLock(path, heartbeat=0.05, stale_after=30).acquire()
    try:
        # fill the disk to the last page (unbuffered: nothing left to fail again at close)
        with open(disk / "filler", "wb", buffering=0) as fh, pytest.raises(OSError) as full:
            while True:
                fh.write(b"\0" * 4096)
        assert disk_full_cause(full.value) is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            time.sleep(0.5)  # several heartbeats, each failing to write
        assert any("could not refresh the lock" in str(w.message) for w in caught), [str(w.message) for w in caught]
        record = lock.read_lock(path)
        assert record is not None and record["token"] == held.token  # the old record, whole
        assert _leftovers(disk) == []
    finally:
        held.release()
    assert lock.read_lock(path) is None


def test_cli_refuses_with_the_sizes_and_force(tmpfs, local_client, capsys):
    disk = tmpfs("64k")
    path = disk / "cli.zarr"
    code = cli.main(["extract", str(path), "--set", "a=noise:2", "--model", "mobilenet_v2", "--weights", "random",
                     "--layers", "input_layer,Conv1", "--quiet", "--scheduler", local_client.scheduler.address])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("cnndiff extract: error: NotEnoughSpaceError: not enough free space for store "), last
    assert "--force" in last and "uncompressed" in last and str(path) in last
    assert not path.exists() and lock.read_lock(str(path)) is None
