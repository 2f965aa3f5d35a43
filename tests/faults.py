"""Helpers for the fault tests, importable on Dask workers (the real cluster puts tests/ on PYTHONPATH).

Run as a script (``python -m faults ADDRESS STORE``) it is the "client process" of the client-kill test: it runs the
same extraction as :func:`run_extraction` against a scheduler address and prints the report as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

#: Seconds one batch sleeps in preprocessing: long enough that a kill lands mid-run, whatever the machine's speed.
SLOW_SECONDS = 0.15
N_PER_SET = 24
BATCH_SIZE = 2


def slow_preprocess(batch):
    """The tiny model's preprocessing, made slow: a run of 24 batches takes several seconds on two workers."""
    from keras.applications.mobilenet_v2 import preprocess_input

    time.sleep(SLOW_SECONDS)
    return preprocess_input(batch)


def fault_sets():
    """48 white-noise images in two sets (generated in the workers: nothing to read, identical in every process)."""
    from tiny import TINY_SIZE

    import cnndiff_xr as cx

    size = (TINY_SIZE, TINY_SIZE)
    return {"a": cx.images.white_noise(N_PER_SET, seed=1, size=size),
            "b": cx.images.white_noise(N_PER_SET, seed=2, size=size)}


def n_batches() -> int:
    return -(-2 * N_PER_SET // BATCH_SIZE)


def run_extraction(store: str, client, model=None, sets=None, **kwargs):
    """The tiny model, slow preprocessing, batches of 2, on ``client``; returns (tree, report)."""
    from tiny import build_tiny_model

    import cnndiff_xr as cx

    model = build_tiny_model() if model is None else model
    return cx.extract(fault_sets() if sets is None else sets, store=store, model=model, preprocess=slow_preprocess,
                      client=client, batch_size=BATCH_SIZE, progress=False, return_report=True, **kwargs)


def load_layer(tree, name):
    return tree[name]["activation"].compute(scheduler="synchronous")


def assert_same_store(path, reference):
    """Every layer's activations and image coordinates are identical; completion all True; ids unique."""
    import xarray as xr
    from tiny import TINY_LAYERS

    import cnndiff_xr as cx
    from cnndiff_xr.extraction import store

    got, ref = cx.open_activations(path), cx.open_activations(reference)
    assert got.attrs["layers"] == ref.attrs["layers"] == TINY_LAYERS
    for name in TINY_LAYERS:
        xr.testing.assert_identical(load_layer(got, name), load_layer(ref, name))
    ids = list(got["image"].values)
    assert ids == list(ref["image"].values) and len(set(ids)) == len(ids)
    assert bool(store.completed(path).all())


def done_batches(path) -> int:
    """Complete batches now (0 while the store does not exist yet)."""
    from cnndiff_xr.extraction import store

    try:
        return int(store.completed(path).sum()) // BATCH_SIZE
    except Exception:  # not created yet
        return 0


if __name__ == "__main__":
    address, store = sys.argv[1], sys.argv[2]
    _, report = run_extraction(store, address)
    print("REPORT " + json.dumps(dataclasses.asdict(report)), flush=True)
