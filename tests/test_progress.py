"""progress.compute: what the CLI's analysis commands compute, with or without a bar."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from cnndiff_xr.progress import compute


def _one_on_a_worker(block: np.ndarray) -> np.ndarray:
    """1 where the block was computed on a distributed worker, else 0."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return np.zeros_like(block)
    return np.ones_like(block)


def _tree() -> xr.DataTree:
    flag = da.zeros(6, chunks=2).map_blocks(_one_on_a_worker, dtype=float)
    return xr.DataTree.from_dict({
        "/": xr.Dataset(attrs={"zscore": 0}),
        "/block1": xr.Dataset({"v": ("x", flag)}, attrs={"layer": "block1"}),
        "/block1/filter_means": xr.Dataset({"w": ("y", da.arange(3, chunks=1))}),
    }, name="fm")


def test_a_datatree_is_computed_on_the_cluster(local_client):
    """A DataTree is not a dask collection: client.compute hands it back lazy, and it was computed later on the
    local threads (after the cluster closed). compute() computes its nodes on the cluster and rebuilds it."""
    tree, other = _tree(), da.arange(4, chunks=2).map_blocks(_one_on_a_worker, dtype=float)
    result, computed = compute(tree, other, client=local_client)
    assert isinstance(result, xr.DataTree) and result.name == "fm"
    v = result["block1/v"].variable._data
    assert isinstance(v, np.ndarray) and np.array_equal(v, np.ones(6))  # every block ran on a worker
    np.testing.assert_array_equal(result["block1/filter_means/w"].values, np.arange(3))
    assert result.attrs == {"zscore": 0} and result["block1"].attrs == {"layer": "block1"}
    np.testing.assert_array_equal(computed, np.ones(4))


def test_a_datatree_without_a_client():
    import dask

    with dask.config.set(scheduler="synchronous"):  # not a session's default Client
        (result,) = compute(_tree())
    assert isinstance(result["block1/v"].variable._data, np.ndarray)
    np.testing.assert_array_equal(result["block1/v"].values, np.zeros(6))  # in this process
    np.testing.assert_array_equal(result["block1/filter_means/w"].values, np.arange(3))


def test_a_datatree_inside_a_dict_is_computed_on_the_cluster(local_client):
    """``cnndiff plot``'s figure inputs are a dict holding a DataTree (the filter means), arrays and plain objects:
    the tree inside was handed back lazy and every heatmap then recomputed its layer on the local threads."""
    other = da.arange(4, chunks=2).map_blocks(_one_on_a_worker, dtype=float)
    inputs = {"filter_means": _tree(), "rdms": {"a": other}, "pair": (other, "label"), "sample": "kept as it is"}
    (result,) = compute(inputs, client=local_client)
    assert set(result) == set(inputs) and result["sample"] == "kept as it is"
    fm = result["filter_means"]
    assert isinstance(fm, xr.DataTree) and fm.name == "fm"
    v = fm["block1/v"].variable._data
    assert isinstance(v, np.ndarray) and np.array_equal(v, np.ones(6))  # computed, on a worker
    np.testing.assert_array_equal(result["rdms"]["a"], np.ones(4))
    assert isinstance(result["pair"], tuple) and result["pair"][1] == "label"
    np.testing.assert_array_equal(result["pair"][0], np.ones(4))
