"""Analysis of reduced stores (issue 14): a store that keeps, per layer, only the units of its registered draws gives
the same numbers, bit for bit, as the full store for every registered draw, and refuses every other draw.

The reduced trees are made from full ones by ``analysis_fixtures.reduce_tree`` exactly per the layout of
``cnndiff_xr/schema.py``; the tests compare with the full tree (not with a reimplementation).
"""

from __future__ import annotations

import dataclasses

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import arrays_in_graph, make_tree, raise_if_dask_computes, reduce_tree, synchronous

import cnndiff_xr as cx
from cnndiff_xr import schema
from cnndiff_xr.analysis.collection import as_collection
from cnndiff_xr.analysis.draws import RegisteredUnits, stored_units_of
from cnndiff_xr.sampling import UnitDraws
from cnndiff_xr.validation import ParameterValueError

# sizes 108, 512, 128 (reduced: larger than the biggest n_units) and 30 (kept whole; 40 >= 30 is "all units")
LAYERS = {"input_layer": (6, 6, 3), "block1_conv1": (8, 8, 8), "block1_pool": (4, 4, 8), "predictions": (30,)}
REDUCED = ["input_layer", "block1_conv1", "block1_pool"]
N_UNITS = (12, 40)
RESAMPLES = 3


def _draws(unit_type: str = "random") -> UnitDraws:
    return UnitDraws(n_units=N_UNITS, resamples=RESAMPLES, seed=0, unit_type=unit_type)


_TREES: dict[tuple, tuple[xr.DataTree, xr.DataTree]] = {}


def trees(unit_type: str = "random", dtype: str = "float32", filter_means: bool = True
          ) -> tuple[xr.DataTree, xr.DataTree]:
    """(full tree, reduced tree made from it), cached per module."""
    key = (unit_type, dtype, filter_means)
    if key not in _TREES:
        full = make_tree(layers=LAYERS, dtype=dtype, seed=3)[0]
        _TREES[key] = full, reduce_tree(full, _draws(unit_type), filter_means=filter_means)
    return _TREES[key]


def assert_same(reduced: xr.DataArray | xr.Dataset, full: xr.DataArray | xr.Dataset) -> None:
    """Bit for bit the same values, coordinates and attributes."""
    xr.testing.assert_identical(reduced, full)
    if isinstance(full, xr.DataArray):
        assert np.array_equal(reduced.values, full.values, equal_nan=True)
    else:
        for name in full.data_vars:
            assert np.array_equal(reduced[name].values, full[name].values, equal_nan=True), name


# --------------------------------------------------------------------------- the layout is recognised
def test_reduced_layers_are_described_by_their_logical_shape():
    full, reduced = trees()
    coll, full_coll = as_collection(reduced), as_collection(full)
    for name in LAYERS:
        layer, whole = coll.layer(name), full_coll.layer(name)
        assert layer.feature_shape == whole.feature_shape and layer.feature_dims == whole.feature_dims
        assert layer.size == whole.size and layer.filter_axis("filter") == whole.filter_axis("filter")
        assert layer.draws == _draws() and whole.draws is None
        assert layer.means is not None and whole.means is None
        if name in REDUCED:
            kept = _draws().kept_units(name, LAYERS[name])
            assert np.array_equal(layer.flat_index, kept) and layer.data.shape == (28, kept.size) < (28, layer.size)
        else:
            assert layer.flat_index is None and layer.data.shape == whole.data.shape


# --------------------------------------------------------------------------- bit for bit
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("unit_type", ["random", "per_filter"])
@pytest.mark.parametrize(("norm", "metric"), [("layer", "euclidean"), ("image", "correlation"), ("none", "cosine")])
def test_differentiation_is_that_of_the_full_store(dtype, unit_type, norm, metric):
    full, reduced = trees(unit_type, dtype)
    # ReLU layers have images with all-zero units at 12 units: constant="zero" defines their distances
    kwargs = dict(unit_type=unit_type, norm=norm, metric=metric, resamples=RESAMPLES, constant="zero")
    assert_same(cx.differentiation(reduced, N_UNITS, **kwargs).compute(),
                cx.differentiation(full, N_UNITS, **kwargs).compute())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_units=[40], resamples=2),  # some n_units values, the first k resamples
        dict(n_units=[12], resamples=1, reduction="mean"),
        dict(n_units=[40, 12], resamples=3, block_size=4, norm="layer", metric="cosine"),  # several row blocks
        dict(n_units=[12, 40], resamples=2, layers=["block1_conv1"], sets=["cats", "random"], block_size=5,
             reduction="mean"),
    ],
)
def test_registered_subsets_and_paths_are_those_of_the_full_store(kwargs):
    full, reduced = trees()
    assert_same(cx.differentiation(reduced, **kwargs).compute(), cx.differentiation(full, **kwargs).compute())


def test_stimulus_regression_is_that_of_the_full_store():
    full, reduced = trees()
    fits = [cx.stimulus_regression(cx.differentiation(t, N_UNITS, resamples=2)).compute() for t in (reduced, full)]
    assert_same(*fits)


@pytest.mark.parametrize("unit_type", ["random", "per_filter"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layer="block1_conv1", n_units=40, resample=2),
        dict(layer="input_layer", n_units=12, resample=0, norm="image", metric="correlation", sets=["cats"],
             constant="zero"),
        dict(layer="block1_pool", n_units=40, resample=1, block_size=6, metric="cosine"),  # several row blocks
        dict(layer="predictions", n_units=17, resample=5),  # a whole layer takes any draw
    ],
)
def test_rdm_is_that_of_the_full_store(unit_type, kwargs):
    full, reduced = trees(unit_type)
    assert_same(cx.rdm(reduced, unit_type=unit_type, **kwargs).compute(),
                cx.rdm(full, unit_type=unit_type, **kwargs).compute())


@pytest.mark.parametrize("kwargs", [dict(n_units=40, resample=1), dict(n_units=12, resample=2, block_size=4,
                                                                         norm="image", metric="correlation",
                                                                         constant="zero")])
def test_rdm_regression_is_that_of_the_full_store(kwargs):
    full, reduced = trees()
    assert_same(cx.rdm_regression(reduced, **kwargs).compute(), cx.rdm_regression(full, **kwargs).compute())


@pytest.mark.parametrize("unit_type", ["random", "per_filter"])
def test_select_units_is_that_of_the_full_store(unit_type):
    full, reduced = trees(unit_type)
    for layer in LAYERS:
        for n in N_UNITS:
            for resample in range(RESAMPLES):
                kwargs = dict(n_units=n, unit_type=unit_type, resample=resample)
                units = cx.select_units(reduced, layer, **kwargs)
                assert_same(units, cx.select_units(full, layer, **kwargs))
                if layer in REDUCED:  # the docstring's recipe picks the draw's columns of the reduced activation
                    act = reduced[layer]["activation"]
                    columns = np.searchsorted(act["flat_index"].values, units["flat_index"].values)
                    picked = act.isel(unit=columns)
                    assert np.array_equal(picked["flat_index"].values, units["flat_index"].values)
                    assert np.array_equal(picked.values, full[layer]["activation"].sel(
                        {d: units[d] for d in ("y", "x", "filter")}).values)


def test_computed_together_with_the_full_store_each_keeps_its_numbers():
    full, reduced = trees()
    d_red, d_full = cx.differentiation(reduced, N_UNITS, resamples=2), cx.differentiation(full, N_UNITS, resamples=2)
    assert d_red.data.name != d_full.data.name
    both = dask.compute(d_red, d_full, cx.rdm(reduced, "block1_conv1", n_units=12))
    assert_same(both[0], both[1])
    assert_same(both[2], cx.rdm(full, "block1_conv1", n_units=12).compute())


def test_building_computes_nothing():
    _, reduced = trees()
    with raise_if_dask_computes():
        cx.differentiation(reduced, N_UNITS, resamples=RESAMPLES)
        cx.rdm(reduced, "block1_conv1", n_units=40, resample=2)
        cx.rdm_regression(reduced, n_units=12)
        cx.select_units(reduced, "block1_pool", n_units=12)
        cx.filter_means(reduced, zscore=True)
        cx.layer_means(reduced)


# --------------------------------------------------------------------------- refusals
def _refused(match: str, func, *args, registered: str = "random", **kwargs) -> str:
    """The refusal's message: it names the layer and what the store holds."""
    with pytest.raises(ParameterValueError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "block1_conv1" in message and _draws(registered).describe() in message, message
    return message


@pytest.mark.parametrize(
    ("kwargs", "asked"),
    [
        (dict(n_units=[12, 20]), r"n_units \[20\]"),
        (dict(n_units=[12], resamples=4), r"resamples \[3\]"),
        (dict(n_units=[40], seed=1), "seed 1"),
        (dict(n_units=[40], unit_type="per_filter"), "unit_type 'per_filter'"),
    ],
)
def test_unregistered_draws_are_refused_naming_what_the_store_holds(kwargs, asked):
    _, reduced = trees()
    _refused(f"does not hold draws with {asked}", cx.differentiation, reduced, layers="block1_conv1", **kwargs)


def test_single_draw_analyses_refuse_unregistered_draws():
    _, reduced = trees()
    _refused(r"resamples \[3\]", cx.rdm, reduced, "block1_conv1", n_units=12, resample=3)
    _refused(r"n_units \[13\]", cx.select_units, reduced, "block1_conv1", n_units=13)
    _refused("seed 2", cx.rdm_regression, reduced, n_units=12, seed=2, layers=["block1_conv1"],
             input_layer="block1_conv1")
    per_filter = trees("per_filter")[1]  # registered along the last dimension, "filter"
    _refused("filter_dim='x'.*registered along its last dimension 'filter'", cx.select_units, per_filter,
             "block1_conv1", n_units=12, unit_type="per_filter", filter_dim="x", registered="per_filter")


def test_top_is_refused_with_the_reason():
    _, reduced = trees()
    message = _refused("unit_type='top'", cx.differentiation, reduced, [12], unit_type="top", layers="block1_conv1")
    assert "needs every unit" in message and "units='all'" in message
    _refused("unit_type='top'", cx.select_units, reduced, "block1_conv1", n_units=12, unit_type="top")
    _refused("unit_type='top'", cx.rdm, reduced, "block1_conv1", n_units=12, unit_type="top")


def test_all_units_are_refused_on_a_reduced_layer():
    _, reduced = trees()
    _refused("unit_type='all' needs every unit", cx.differentiation, reduced, [12], unit_type="all",
             layers="block1_conv1")
    _refused(r"n_units \[512\] \(at least the layer's 512 units\)", cx.differentiation, reduced, [40, 512],
             layers="block1_conv1")
    _refused("needs every unit", cx.select_units, reduced, "block1_conv1", n_units=600)


def test_whole_layers_of_a_reduced_store_take_every_draw():
    full, reduced = trees()
    for kwargs in [dict(n_units=[7, 100], resamples=5, seed=4), dict(n_units=[10], unit_type="top"),
                   dict(n_units=[5], unit_type="all")]:
        assert_same(cx.differentiation(reduced, layers="predictions", **kwargs).compute(),
                    cx.differentiation(full, layers="predictions", **kwargs).compute())


def test_a_wrong_registration_is_caught_by_the_unit_check():
    # a store whose recorded registration does not match its units (damaged attributes): the registered-draw check
    # passes, the check that every drawn unit is stored refuses when the plan is made
    _, reduced = trees()
    tampered = reduced.copy()
    tampered.attrs[schema.UNIT_DRAWS_ATTR] = UnitDraws(n_units=N_UNITS, resamples=RESAMPLES, seed=5).to_attrs()
    lazy = cx.differentiation(tampered, [12], resamples=1, seed=5, layers="block1_conv1")
    with pytest.raises(ValueError, match="layer 'block1_conv1': .* drawn unit.* not among the .* units the store"):
        lazy.compute()
    with pytest.raises(ValueError, match="not among"):
        cx.select_units(tampered, "block1_conv1", n_units=12, seed=5)


def test_the_graph_carries_the_stored_units_by_their_recipe_not_their_list():
    # VGG16's stored indices at 10 x 10,000 units made a 13 MiB graph, which distributed warned about on every call
    full = make_tree(sets={"a": 5, "b": 4}, layers={"block1_conv1": (32, 32, 16)}, seed=1)[0]
    draws = UnitDraws(n_units=(500, 1000), resamples=4, seed=0)
    reduced = reduce_tree(full, draws)
    flat = reduced["block1_conv1"]["activation"]["flat_index"].values
    assert flat.size > 5000  # eight draws of 500 or 1,000 of 16,384 units
    lazy = cx.differentiation(reduced, [1000], resamples=2)  # a registered subset: its columns are looked up
    indices = [a.size for a in arrays_in_graph(lazy) if a.dtype.kind in "iu"]
    assert max(indices) < 100, indices  # the images' rows travel, no list of units
    assert_same(lazy.compute(), cx.differentiation(full, [1000], resamples=2).compute())


def test_a_process_that_draws_other_units_fails_instead_of_gathering_other_columns():
    _, reduced = trees()
    recipe = stored_units_of(as_collection(reduced).layer("block1_conv1"))
    assert isinstance(recipe, RegisteredUnits)
    assert np.array_equal(recipe.flat_index(), reduced["block1_conv1"]["activation"]["flat_index"].values)
    with pytest.raises(ValueError, match="'block1_conv1': the store's registered draws .* draws units differently"):
        dataclasses.replace(recipe, sha256="0" * 64).flat_index()  # as a redraw with another result would


def test_a_reduced_array_without_registration_checks_its_units():
    full, reduced = trees()
    array = reduced["block1_conv1"]["activation"].copy()
    array.name = "block1_conv1"
    assert schema.UNIT_DRAWS_ATTR not in array.attrs
    assert_same(cx.differentiation(array, N_UNITS, resamples=RESAMPLES).compute(),
                cx.differentiation(full["block1_conv1"]["activation"].rename("block1_conv1"), N_UNITS,
                                   resamples=RESAMPLES).compute())
    with pytest.raises(ValueError, match="not among"):
        cx.differentiation(array, [12], resamples=4)  # checked when the draws are listed, before any graph
    with pytest.raises(ParameterValueError, match="no registration recorded.*needs every unit"):
        cx.differentiation(array, [12], unit_type="top")


# --------------------------------------------------------------------------- filter means
def _compare_means(got: xr.DataTree, want: xr.DataTree, zscore: bool) -> None:
    assert list(got.children) == list(want.children)
    for layer in want.children:
        for name in ("filter_mean", "layer_mean"):
            a, b = got[layer][name], want[layer][name]
            assert a.dims == b.dims and a.attrs == b.attrs
            # float32 storage of the filter means: rel 1e-6 of each value; a z-score near 0 is within 1e-6 of the
            # layer's SD units, the error of the float32 mean before centring
            np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-6 if zscore else 0)
        for coord in want[layer].coords:
            np.testing.assert_array_equal(got[layer][coord].values, want[layer][coord].values)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("zscore", [False, True])
def test_filter_means_of_a_reduced_store_equal_the_full_stores(dtype, zscore):
    full, reduced = trees(dtype=dtype)
    _compare_means(cx.filter_means(reduced, zscore=zscore).compute(), cx.filter_means(full, zscore=zscore).compute(),
                   zscore)
    sets = ["cats", "white_noise"]
    _compare_means(cx.filter_means(reduced, zscore=zscore, sets=sets, layers=REDUCED).compute(),
                   cx.filter_means(full, zscore=zscore, sets=sets, layers=REDUCED).compute(), zscore)
    means = cx.layer_means(reduced, zscore=zscore).compute()
    np.testing.assert_allclose(means.values, cx.layer_means(full, zscore=zscore).values, rtol=1e-6,
                               atol=1e-6 if zscore else 0)


def test_stored_means_read_no_activation():
    _, reduced = trees()
    graph = dict(cx.filter_means(reduced, zscore=True)["block1_conv1"]["filter_mean"].data.__dask_graph__())
    assert not any(str(k[0] if isinstance(k, tuple) else k).startswith("reduced-") for k in graph)


def test_a_full_store_with_stored_means_uses_them():
    full = trees()[0]
    with_means = reduce_tree(full, None)  # every layer whole, plus the means subgroup
    coll = as_collection(with_means)
    assert all(coll.layer(n).means is not None and not coll.layer(n).reduced for n in LAYERS)
    for zscore in (False, True):
        _compare_means(cx.filter_means(with_means, zscore=zscore).compute(),
                       cx.filter_means(full, zscore=zscore).compute(), zscore)


def test_a_reduced_layer_without_means_is_refused_for_filter_means():
    _, reduced = trees(filter_means=False)
    with pytest.raises(ParameterValueError, match="layer 'input_layer' is reduced.*filter_means=True.*--filter-means"):
        cx.filter_means(reduced)
    with pytest.raises(ParameterValueError, match="layer 'block1_pool' is reduced"):
        cx.layer_means(reduced, layers=["predictions", "block1_pool"])
    cx.filter_means(reduced, layers="predictions").compute()  # a whole layer reads its activations


def test_stored_means_check_the_completion_record():
    _, reduced = trees()
    unfinished = reduced.copy()
    flags = np.ones(28, bool)
    flags[5] = False
    # a lazy record, as in a store being written: checked by the tasks that read the means
    unfinished["completed"] = xr.DataArray(da.from_array(flags, chunks=7), dims="image")
    lazy = cx.filter_means(unfinished, layers="block1_conv1")
    with pytest.raises(ValueError, match="not completed"):
        lazy.compute()
    finished = [s for s in dict.fromkeys(reduced["set"].values.tolist()) if s != reduced["set"].values[5]]
    assert cx.filter_means(unfinished, layers="block1_conv1", sets=finished).compute()["block1_conv1"].sizes[
        "image"] == int((reduced["set"].values != reduced["set"].values[5]).sum())


# --------------------------------------------------------------------------- through Zarr
def test_the_layout_survives_a_zarr_round_trip(tmp_path):
    full, reduced = trees("per_filter")
    path = str(tmp_path / "reduced.zarr")
    reduced.to_zarr(path)
    opened = xr.open_datatree(path, engine="zarr", chunks={})  # the flat indices stay lazy here: read when adapted
    assert isinstance(opened["block1_conv1"]["flat_index"].data, da.Array)
    lazy = cx.differentiation(opened, N_UNITS, unit_type="per_filter", resamples=RESAMPLES)
    assert np.array_equal(lazy.values, cx.differentiation(full, N_UNITS, unit_type="per_filter",
                                                          resamples=RESAMPLES).values)
    _compare_means(cx.filter_means(opened, layers=REDUCED).compute(),
                   cx.filter_means(full, layers=REDUCED).compute(), False)
