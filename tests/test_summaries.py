"""Filter means and layer means against numpy, laziness and one read per chunk."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import (
    SETS,
    any_tree,
    make_recording,
    make_tree,
    raise_if_dask_computes,
    synchronous,
    tree,
    tree_or_store,
)

import cnndiff_xr as cx


def _numpy_layer(t, layer):
    act = t[layer]["activation"]
    values = np.asarray(act.values, dtype=np.float64)
    return values.reshape(values.shape[0], -1, values.shape[-1]), np.asarray(act["set"].values).astype(str)


def _seed_zscore(values, labels):
    """The seed's heatmap normalisation: z-score each set's activations over images x units."""
    out = np.empty_like(values)
    for s in np.unique(labels):
        block = values[labels == s]
        out[labels == s] = (block - block.mean()) / block.std()
    return out


@pytest.mark.parametrize("zscore", [False, True])
def test_filter_and_layer_means_match_numpy(any_tree, zscore):
    fm = cx.filter_means(any_tree, zscore=zscore).compute()
    layers = [str(n) for n in any_tree.attrs["layers"]]
    assert list(fm.children) == layers
    for layer in layers:
        values, labels = _numpy_layer(any_tree, layer)
        if zscore:
            values = _seed_zscore(values, labels)
        node = fm[layer]
        assert node["filter_mean"].dims == ("image", "filter")
        np.testing.assert_allclose(node["filter_mean"].values, values.mean(axis=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(node["layer_mean"].values, values.mean(axis=(1, 2)), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(node["set"].values, labels)
    means = cx.layer_means(any_tree, zscore=zscore).compute()
    assert means.dims == ("layer", "image")
    for layer in layers:
        np.testing.assert_allclose(means.sel(layer=layer).values, fm[layer]["layer_mean"].values, rtol=1e-12)


def test_building_computes_nothing(any_tree):
    with raise_if_dask_computes():
        fm = cx.filter_means(any_tree, zscore=True)
        lm = cx.layer_means(any_tree)
    assert all(isinstance(fm[n]["filter_mean"].data, da.Array) for n in fm.children)
    assert isinstance(lm.data, da.Array)


def test_each_chunk_is_read_once():
    t, raw = make_tree(counting=True, chunk=4)
    n_chunks = -(-sum(SETS.values()) // 4)
    fm = cx.filter_means(t, zscore=True)
    lm = cx.layer_means(t, zscore=True)
    for a in raw.values():
        a.reads = 0
    dask.compute(*(fm[n]["filter_mean"] for n in fm.children), lm)  # both summaries: shared chunk tasks
    assert {a.reads for a in raw.values()} == {n_chunks}


def test_sets_subset_and_labels(tree):
    fm = cx.filter_means(tree, sets=["cats"], layers=["block1_pool", "predictions"])
    assert list(fm.children) == ["block1_pool", "predictions"]
    assert set(fm["block1_pool"]["set"].values) == {"cats"}
    assert fm["block1_pool"].sizes["image"] == SETS["cats"]
    assert fm["predictions"]["filter_mean"].shape == (SETS["cats"], 10)
    values, labels = _numpy_layer(tree, "predictions")
    np.testing.assert_allclose(fm["predictions"]["filter_mean"].values, values[labels == "cats"][:, 0, :])


def test_constant_set_zscores_to_zero():
    t, _ = make_tree(sets={"a": 4, "b": 5}, shuffle=False)
    act = t["block1_pool"]["activation"]
    values = act.values.copy()
    values[:4] = 2.0  # set "a" is constant
    layer = act.copy(data=values).chunk({"image": 3}).rename("block1_pool")
    fm = cx.filter_means(layer, zscore=True)["block1_pool"].compute()
    np.testing.assert_array_equal(fm["filter_mean"].values[:4], 0.0)
    assert np.all(np.isfinite(fm["filter_mean"].values))


def test_recording_means_over_units_per_frequency():
    rec = make_recording()
    fm = cx.filter_means(rec, sample_dim="state", set_coord="condition", filter_dim="frequency")
    node = fm["lfp_power"]
    assert node["filter_mean"].dims == ("state", "frequency")
    np.testing.assert_allclose(node["filter_mean"].values, rec.mean("unit").values)
    with pytest.raises(ValueError, match="filter_dim"):
        cx.filter_means(rec, sample_dim="state")


def test_incomplete_images_raise_at_compute(tree):
    flags = np.ones(tree.sizes["image"], bool)
    flags[5] = False
    t = tree.copy()
    t["completed"] = xr.DataArray(da.from_array(flags, chunks=4), dims="image")
    fm = cx.filter_means(t)
    with pytest.raises(ValueError, match="not completed"):
        fm["input_layer"]["filter_mean"].compute()


def test_unknown_names(tree):
    with pytest.raises(KeyError, match="nope.*input_layer"):
        cx.filter_means(tree, layers=["nope"])
    with pytest.raises(ValueError, match="dogs.*cats"):
        cx.layer_means(tree, sets=["dogs"])
