"""Readers during writes: analysing a store while another process appends a set to it.

A real second process (its own embedded LocalCluster, slow preprocessing) appends set ``b`` to a local store holding
set ``a``, while this process opens the store again and again and computes set ``a``'s differentiation and reads its
activations. Every read must equal the values from before the append; set ``b`` is either refused as not completed
(naming the missing images) or, once its completion is recorded, gives the values of the finished store -- never a
half-written chunk or a wrong number.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from faults import BATCH_SIZE, fault_sets, slow_preprocess
from real_cluster import TESTS_DIR, child_env, kill_group

import cnndiff_xr as cx
from cnndiff_xr.extraction import store

pytestmark = pytest.mark.timeout(400)

# The writer: the same extraction with set b after a, on its own one-worker embedded cluster
_WRITER = """
import sys
from faults import BATCH_SIZE, fault_sets, slow_preprocess
from tiny import build_tiny_model
import cnndiff_xr as cx
cx.extract(fault_sets(), store=sys.argv[1], model=build_tiny_model(), preprocess=slow_preprocess, n_workers=1,
           batch_size=BATCH_SIZE, progress=False)
"""


def _diff(tree, sets):
    return cx.differentiation(tree, n_units=(20, 300), resamples=2, seed=3, sets=sets).compute(scheduler="synchronous")


def test_readers_see_only_completed_images_while_another_process_appends(tmp_path, tiny_model, local_client):
    path = str(tmp_path / "acts.zarr")
    cx.extract({"a": fault_sets()["a"]}, store=path, model=tiny_model, preprocess=slow_preprocess,
               client=local_client, batch_size=BATCH_SIZE, progress=False)
    ref_tree = cx.open_activations(path)
    ref_a = _diff(ref_tree, "a")
    ref_conv2 = ref_tree["conv2"]["activation"].compute(scheduler="synchronous")

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, path], cwd=TESTS_DIR, env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen: dict[str, int] = {"reads": 0, "b_refused": 0, "b_partly_done": 0, "b_done": 0}
    b_values = []
    try:
        deadline = time.monotonic() + 300
        while writer.poll() is None:
            assert time.monotonic() < deadline, "the writer did not finish"
            tree = cx.open_activations(path)
            done = np.asarray(tree["completed"].values)
            n = done.size
            # the completion record and every array agree on the image count the reader opened
            assert tree["conv2"]["activation"].shape[0] == n and n in (24, 48)
            xr.testing.assert_identical(_diff(tree, "a"), ref_a)
            xr.testing.assert_identical(
                tree["conv2"]["activation"].isel(image=slice(0, 24)).compute(scheduler="synchronous"), ref_conv2)
            seen["reads"] += 1
            if n == 48:
                b_done = done[24:]
                try:
                    b_values.append(_diff(tree, "b"))
                    seen["b_done"] += 1
                    assert b_done.all()
                except ValueError as err:  # refused: some of b's images are not completed
                    assert not b_done.all()
                    assert "not completed" in str(err), err
                    seen["b_refused"] += 1
                    if b_done.any():
                        seen["b_partly_done"] += 1
                        # the completed images of b read whole, as the finished store will have them
                        part = tree["conv2"]["activation"].isel(image=np.flatnonzero(done))
                        b_values.append(part.compute(scheduler="synchronous"))
    finally:
        if writer.poll() is None:
            kill_group(writer)
    _, err = writer.communicate()
    assert writer.returncode == 0, err.decode()[-3000:]
    final = cx.open_activations(path)
    assert bool(final["completed"].values.all()) and final["completed"].size == 48
    xr.testing.assert_identical(_diff(final, "a"), ref_a)
    full_b = _diff(final, "b")
    final_conv2 = final["conv2"]["activation"].compute(scheduler="synchronous")
    for value in b_values:  # whatever a reader got of set b is what the finished store holds
        if "set" in value.dims:
            xr.testing.assert_identical(value, full_b)
        else:
            xr.testing.assert_identical(value, final_conv2.sel(image=value["image"].values))
    # the reader saw the store while set b was being added (the writer's 12 slow batches leave time for that)
    assert seen["reads"] > 0 and seen["b_refused"] + seen["b_done"] > 0, seen
    assert store.completed(path).all()


def _root_is_consolidated(path: str) -> bool:
    return json.loads((Path(path) / "zarr.json").read_text()).get("consolidated_metadata") is not None


def test_an_append_never_leaves_the_store_without_what_readers_open_it_with(tmp_path, tiny_model, local_client,
                                                                           monkeypatch):
    """The test above found, by timing, a moment of an append when a reader's open failed ("Consolidated metadata
    requested ... but not found"): the root's attributes were written without the consolidated metadata, which the
    next consolidation put back. Here every moment between the append's writes is visited: just before each
    consolidation the root still carries consolidated metadata, and a reader opens the store and sees set a whole."""
    path = str(tmp_path / "acts.zarr")
    sets = fault_sets()
    kwargs = dict(store=path, model=tiny_model, preprocess=slow_preprocess, client=local_client,
                  batch_size=BATCH_SIZE, progress=False)
    cx.extract({"a": sets["a"]}, **kwargs)
    n_a = cx.open_activations(path).sizes["image"]
    moments: list[tuple[bool, int]] = []
    consolidate = store._consolidate

    def reader_looks_first(group):
        tree = cx.open_activations(path)  # raised here before the fix
        moments.append((_root_is_consolidated(path), int(tree["completed"].values.sum())))
        consolidate(group)

    monkeypatch.setattr(store, "_consolidate", reader_looks_first)
    cx.extract(sets, **kwargs)
    monkeypatch.undo()
    assert moments == [(True, n_a), (True, n_a)], moments  # both consolidations, each after a whole set a
    assert cx.open_activations(path)["completed"].values.all()
