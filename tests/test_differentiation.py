"""Differentiation against a plain numpy/scipy reference, exact medians, reads, laziness."""

from __future__ import annotations

import dataclasses

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import (
    SETS,
    any_tree,
    graph_dependents,
    layer_matrix,
    make_recording,
    make_tree,
    raise_if_dask_computes,
    reference_distances,
    reference_reduce,
    synchronous,
    tree,
    tree_or_store,
    unit_indices,
)
from scipy import stats
from scipy.spatial.distance import pdist, squareform

import cnndiff_xr as cx
from cnndiff_xr.analysis import median, metrics
from cnndiff_xr.analysis.draws import draw_units
from cnndiff_xr.analysis.gram import DISTANCE_RTOL
from cnndiff_xr.options import METRICS, NORMS

COMBOS = [(norm, metric) for norm in NORMS for metric in METRICS]
RTOL = 1e-5


def _layers(t: xr.DataTree) -> list[str]:
    return [str(n) for n in t.attrs["layers"]]


def check_against_reference(t, result, norm, metric, reduction, unit_type="random", seed=0):
    """Every (set, layer, n_units, resample) value against numpy/scipy on the same units."""
    checked = 0
    for layer in result["layer"].values:
        for n in result["n_units"].values:
            for r in result["resample"].values:
                for s in result["set"].values:
                    # "top": the units of all analysed images, the sets of the call together
                    units = unit_indices(t, str(layer), int(n), unit_type, seed, int(r),
                                         sets=[str(v) for v in result["set"].values] if unit_type == "top" else None)
                    x = layer_matrix(t, str(layer), str(s), units)
                    expected = reference_reduce(reference_distances(x, norm, metric), reduction)
                    got = float(result.sel(set=s, layer=layer, n_units=n, resample=r))
                    assert abs(got - expected) <= RTOL * abs(expected), (layer, s, int(n), int(r), got, expected)
                    checked += 1
    return checked


@pytest.mark.parametrize("norm, metric", COMBOS)
def test_matches_numpy_scipy_reference(any_tree, norm, metric):
    for reduction in ("median", "mean"):
        d = cx.differentiation(any_tree, n_units=[30, 10**6], norm=norm, metric=metric, reduction=reduction,
                               resamples=2, seed=1).compute()
        assert d.dims == ("set", "layer", "n_units", "resample")
        assert check_against_reference(any_tree, d, norm, metric, reduction, seed=1) == d.size


def test_one_task_median_is_numpy_median_bit_for_bit():
    rng = np.random.default_rng(3)
    for size in (1, 2, 3, 276, 277, 4950):
        values = rng.random(size) * rng.integers(1, 10**6)
        values[: size // 3] = values[-1]  # ties
        assert median.partition_median(values) == np.median(values), size


@pytest.fixture
def window(monkeypatch):
    """Force the one-pass window median (none collected) for every set that spans several row blocks."""
    monkeypatch.setattr(median, "MEDIAN_IN_MEMORY_BYTES", 0)


@pytest.mark.parametrize("norm, metric", COMBOS)
def test_window_median_path_matches_reference(tree, norm, metric, window):
    # block_size=4: every set spans several row blocks, so the median takes the one-pass window
    for reduction in ("median", "mean"):
        d = cx.differentiation(tree, n_units=25, norm=norm, metric=metric, reduction=reduction, resamples=1,
                               block_size=4).compute()
        check_against_reference(tree, d, norm, metric, reduction)


@pytest.mark.parametrize("unit_type", ["top", "per_filter", "all"])
def test_other_unit_types_match_reference(tree, unit_type):
    d = cx.differentiation(tree, n_units=[12, 40], unit_type=unit_type, resamples=2, block_size=5).compute()
    check_against_reference(tree, d, "layer", "euclidean", "median", unit_type=unit_type)
    if unit_type in ("top", "all"):  # deterministic choices: every resample is the same draw
        np.testing.assert_array_equal(d.isel(resample=0).values, d.isel(resample=1).values)


def test_float16_store_is_accumulated_in_float64():
    t, _ = make_tree(dtype="float16", seed=3)
    d = cx.differentiation(t, n_units=[20], resamples=1, block_size=4).compute()
    check_against_reference(t, d, "layer", "euclidean", "median")


@pytest.mark.parametrize("n", [3000, 2999])
def test_exact_median_of_thousands_of_images(n, window):
    """Even (n=3000: 4,498,500 pairs) and odd (n=2999) pair counts, with many tied values."""
    rng = np.random.default_rng(n)
    x = np.maximum(rng.normal(size=(n, 24)), 0).astype(np.float32)
    x[:, :12] = np.round(x[:, :12] * 2) / 2  # quantised units: many exactly equal distances
    arr = xr.DataArray(da.from_array(x, chunks=(250, 24)), dims=("image", "unit"), name="big")
    for norm in ["layer" if n % 2 == 0 else "none"]:
        got = float(cx.differentiation(arr, n_units=24, norm=norm, resamples=1, block_size=700).squeeze())
        expected = float(np.median(reference_distances(x, norm, "euclidean")))
        assert abs(got - expected) <= 1e-7 * expected, (norm, got, expected)


def test_window_median_refuses_a_distance_that_may_be_negative(tree, window, monkeypatch):
    """The window median's fallback orders distances by their float32 bits: a spec that does not promise
    non-negative values is refused when the graph is built (one whose sets fit one block or are collected is not)."""
    signed = dataclasses.replace(metrics.DISTANCES[("layer", "euclidean")], non_negative=False)
    monkeypatch.setattr(metrics, "DISTANCES", {**metrics.DISTANCES, ("layer", "euclidean"): signed})
    with pytest.raises(ValueError, match="non-negative"):
        cx.differentiation(tree, n_units=10, resamples=1, block_size=4)
    cx.differentiation(tree, n_units=10, resamples=1)  # one block per set: no window
    cx.differentiation(tree, n_units=10, resamples=1, block_size=4, reduction="mean")


def test_single_block_collected_and_window_paths_agree(tree, monkeypatch):
    one = cx.differentiation(tree, n_units=[15, 50], resamples=3).compute()
    collected = cx.differentiation(tree, n_units=[15, 50], resamples=3, block_size=4).compute()
    # other row blocks -> other float32 product shapes: each within DISTANCE_RTOL of float64
    np.testing.assert_allclose(one.values, collected.values, rtol=2 * DISTANCE_RTOL)
    monkeypatch.setattr(median, "MEDIAN_IN_MEMORY_BYTES", 0)
    windowed = cx.differentiation(tree, n_units=[15, 50], resamples=3, block_size=4).compute()
    np.testing.assert_array_equal(collected.values, windowed.values)  # the same distances: the same median


def test_median_of_rdm_equals_differentiation(tree):
    r = cx.rdm(tree, "block1_conv1", n_units=40, seed=4, resample=1, sets=["cats"]).values
    d = cx.differentiation(tree, n_units=40, seed=4, resamples=2, sets=["cats"], layers=["block1_conv1"])
    upper = r[np.triu_indices(r.shape[0], 1)]
    assert float(d.sel(resample=1).squeeze()) == pytest.approx(np.median(upper), rel=1e-12)


# --------------------------------------------------------------------------- reads, laziness, clusters
def _reads(raw):
    return {name: a.reads for name, a in raw.items()}


def test_each_chunk_is_read_once_whatever_the_number_of_draws():
    t, raw = make_tree(counting=True, chunk=4)
    n_chunks = -(-sum(SETS.values()) // 4)
    for kwargs in ({"n_units": [5], "resamples": 1}, {"n_units": [5, 30, 10**6], "resamples": 4}):
        d = cx.differentiation(t, **kwargs)
        for a in raw.values():
            a.reads = 0
        d.compute(scheduler="sync")
        assert set(_reads(raw).values()) == {n_chunks}, (kwargs, _reads(raw))
    # "top" reads each chunk twice (means, then units), still independent of the draws
    for resamples in (1, 3):
        d = cx.differentiation(t, n_units=[5, 30], unit_type="top", resamples=resamples)
        for a in raw.values():
            a.reads = 0
        d.compute(scheduler="sync")
        assert set(_reads(raw).values()) == {2 * n_chunks}


def test_chunk_reading_tasks_do_not_grow_with_draws(tree):
    prefix = "activation-block1_conv1"
    small = cx.differentiation(tree, n_units=[5], resamples=1, layers=["block1_conv1"])
    large = cx.differentiation(tree, n_units=[5, 50, 100], resamples=10, layers=["block1_conv1"])
    readers_small = graph_dependents(small.data, prefix)
    readers_large = graph_dependents(large.data, prefix)
    n_chunks = len(tree["block1_conv1"]["activation"].data.chunks[0])
    assert len(readers_small) == len(readers_large) == n_chunks


def test_building_computes_nothing(any_tree):
    with raise_if_dask_computes():
        for unit_type in ("random", "top", "per_filter", "all"):
            d = cx.differentiation(any_tree, n_units=[10, 50], unit_type=unit_type, resamples=3)
        d2 = cx.differentiation(any_tree, n_units=10, norm="image", metric="cosine", reduction="mean",
                                block_size=3, resamples=2)
        summary = cx.resample_summary(d2)
        ratio = cx.normalise_by_reference(d, reference=str(d.set.values[0]))
        fit = cx.stimulus_regression(d)
        rfit = cx.rdm_regression(any_tree, n_units=20)
    for obj in (d, d2, ratio, fit.r, fit.p, summary.upper, rfit.r2, rfit.p):
        assert isinstance(obj.data, da.Array)


def test_same_seed_same_numbers(tree):
    a = cx.differentiation(tree, n_units=[10, 40], resamples=2, seed=11).compute()
    b = cx.differentiation(tree, n_units=[10, 40], resamples=2, seed=11).compute()
    c = cx.differentiation(tree, n_units=[10, 40], resamples=2, seed=12).compute()
    xr.testing.assert_identical(a, b)
    assert not np.array_equal(a.values, c.values)
    # a draw does not depend on what else is computed alongside it
    alone = cx.differentiation(tree, n_units=40, resamples=2, seed=11, layers=["block1_pool"], sets=["cats"])
    np.testing.assert_array_equal(
        alone.sel(set="cats", layer="block1_pool", n_units=40).values,
        a.sel(set="cats", layer="block1_pool", n_units=40).values,
    )


def test_local_cluster_equals_synchronous(tree, local_client):
    d = cx.differentiation(tree, n_units=[10, 40], unit_type="top", resamples=2, block_size=4)
    r = cx.rdm(tree, "block1_conv1", n_units=30, block_size=5)
    d_sync, r_sync = dask.compute(d, r, scheduler="sync")
    d_dist, r_dist = local_client.compute([d, r], sync=True)
    xr.testing.assert_allclose(d_sync, d_dist, rtol=1e-12)
    xr.testing.assert_allclose(r_sync, r_dist, rtol=1e-12)


# --------------------------------------------------------------------------- generic arrays
def test_neural_recording_differentiation():
    rec = make_recording()
    d = cx.differentiation(rec, n_units=[10, 60], resamples=2, sample_dim="state", set_coord="condition").compute()
    assert d.dims == ("set", "layer", "n_units", "resample")
    assert list(d.layer.values) == ["lfp_power"]
    assert list(d.set.values) == ["gratings", "movie", "spontaneous"]
    assert d.n_units_used.sel(layer="lfp_power").values.tolist() == [10, 60]
    values = rec.values.reshape(30, -1)
    for s in d.set.values:
        for n in (10, 60):
            for r in (0, 1):
                units = draw_units((12, 5), n, seed=0, layer="lfp_power", resample=r)
                x = values[rec["condition"].values == s][:, units]
                expected = np.median(reference_distances(x, "layer", "euclidean"))
                assert float(d.sel(set=s, n_units=n, resample=r).squeeze()) == pytest.approx(expected, rel=RTOL)


def test_array_without_sets_is_one_set():
    x = xr.DataArray(np.random.default_rng(0).random((8, 20)), dims=("trial", "neuron"))
    d = cx.differentiation(x, n_units=20, resamples=1, sample_dim="trial")
    assert d.set.values.tolist() == ["all"] and d.layer.values.tolist() == ["data"]
    assert float(d.squeeze()) == pytest.approx(np.median(reference_distances(x.values, "layer", "euclidean")))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"n_units": 0}, ValueError, "n_units"),
        ({"n_units": [200, -1]}, ValueError, "n_units"),
        ({"norm": "zscore"}, ValueError, "norm=.*'layer'"),
        ({"metric": "l1"}, ValueError, "metric=.*'euclidean'"),
        ({"reduction": "max"}, ValueError, "reduction=.*'median'"),
        ({"unit_type": "best"}, ValueError, "unit_type=.*'per_filter'"),
        ({"resamples": 0}, ValueError, "resamples"),
        ({"layers": ["block7_conv9"]}, KeyError, "block7_conv9.*input_layer"),
        ({"layers": ["block7_conv9"]}, ValueError, "block7_conv9"),
        ({"sets": ["dogs"]}, KeyError, "dogs.*cats"),
        ({"sets": ["dogs"]}, ValueError, "dogs"),
    ],
)
def test_bad_arguments_are_named(tree, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        cx.differentiation(tree, **({"n_units": 10} | kwargs))


def test_set_with_one_image_is_refused():
    t, _ = make_tree(sets={"a": 5, "single": 1, "b": 4})
    with pytest.raises(ValueError, match="'single' has 1 image"):
        cx.differentiation(t, n_units=10)
    d = cx.differentiation(t, n_units=10, sets=["a", "b"], resamples=1)  # leaving it out works
    assert d.sizes["set"] == 2


def test_incomplete_images_are_refused():
    t, _ = make_tree()
    flags = np.ones(t.sizes["image"], bool)
    flags[3] = False
    t_numpy = t.copy()
    t_numpy["completed"] = xr.DataArray(flags, dims="image")
    with pytest.raises(ValueError, match="not completed"):
        cx.differentiation(t_numpy, n_units=10)
    t_lazy = t.copy()
    t_lazy["completed"] = xr.DataArray(da.from_array(flags, chunks=4), dims="image")
    for unit_type in ("random", "top"):  # the gather fused with the reads, and the separate one after unit means
        d = cx.differentiation(t_lazy, n_units=10, unit_type=unit_type)  # the check is in the graph
        with pytest.raises(ValueError, match="not completed"):
            d.compute()


def test_constant_vectors_raise_or_follow_the_zero_rule():
    t, raw = make_tree(seed=9)
    act = t["block1_pool"]["activation"]
    values = act.values.copy()
    values[:, :] = np.where(np.arange(values.shape[0])[:, None, None, None] % 5 == 0, 0.0, values)
    layer = act.copy(data=values).chunk({"image": 4}).rename("block1_pool")
    with pytest.raises(ValueError, match="'block1_pool'.*constant"):
        cx.differentiation(layer, n_units=32, norm="image", resamples=1).compute()
    d = cx.differentiation(layer, n_units=32, norm="image", resamples=1, constant="zero").compute()
    assert np.all(np.isfinite(d.values))
    # the default seed measure is defined for constant vectors
    assert np.all(np.isfinite(cx.differentiation(layer, n_units=32, resamples=1).values))


# --------------------------------------------------------------------------- summaries of results
def test_resample_summary_and_reference_normalisation(tree):
    d = cx.differentiation(tree, n_units=[10, 40], resamples=5)
    summary = cx.resample_summary(d, interval=0.9).compute()
    values = d.values
    np.testing.assert_allclose(summary["mean"].values, values.mean(-1))
    np.testing.assert_allclose(summary["sd"].values, values.std(-1, ddof=1))
    np.testing.assert_allclose(summary["lower"].values, np.percentile(values, 5, axis=-1))
    np.testing.assert_allclose(summary["upper"].values, np.percentile(values, 95, axis=-1))
    ratio = cx.normalise_by_reference(d, "white_noise").compute()
    np.testing.assert_allclose(ratio.sel(set="white_noise").values, 1.0)
    np.testing.assert_allclose(ratio.sel(set="cats").values, (d.sel(set="cats") / d.sel(set="white_noise")).values)
    assert "white_noise" not in cx.normalise_by_reference(d, "white_noise", drop=True).set.values
    with pytest.raises(KeyError, match="lions.*white_noise"):
        cx.normalise_by_reference(d, "lions")


def test_stimulus_regression_matches_linregress():
    t, _ = make_tree(sets={"a": 6, "b": 8, "c": 5, "d": 7}, seed=2)
    d = cx.differentiation(t, n_units=[20], resamples=2).compute()
    fit = cx.stimulus_regression(d).compute()
    assert fit.attrs["input_layer"] == "input_layer"
    for layer in d.layer.values:
        for r in range(2):
            x = d.sel(layer="input_layer", n_units=20, resample=r).values
            y = d.sel(layer=layer, n_units=20, resample=r).values
            ref = stats.linregress(x, y)
            got = fit.sel(layer=layer, n_units=20, resample=r)
            for name, value in [("slope", ref.slope), ("intercept", ref.intercept), ("r", ref.rvalue),
                                ("p", ref.pvalue)]:
                assert float(got[name]) == pytest.approx(value, rel=1e-6, abs=1e-9), (layer, name)
            assert float(got["r2"]) == pytest.approx(ref.rvalue**2, rel=1e-6)


def test_rdm_regression_matches_linregress_on_the_input_rdm(any_tree):
    fit = cx.rdm_regression(any_tree, n_units=30, block_size=4).compute()
    assert fit.r2.dims == ("set", "layer")
    layers = _layers(any_tree)
    for s in fit.set.values:
        x = squareform(cx.rdm(any_tree, "input_layer", n_units=30, sets=[str(s)]).values, checks=False)
        for layer in layers:
            y = squareform(cx.rdm(any_tree, layer, n_units=30, sets=[str(s)]).values, checks=False)
            ref = stats.linregress(x, y)
            got = fit.sel(set=s, layer=layer)
            # both RDMs hold distances within DISTANCE_RTOL (other row blocks, other float32
            # rounding); a weak fit's slope and r are differences of such values: absolute slack
            slack = 10 * DISTANCE_RTOL
            assert float(got.slope) == pytest.approx(ref.slope, rel=1e-6, abs=slack * y.std() / x.std())
            assert float(got.r) == pytest.approx(ref.rvalue, rel=1e-6, abs=slack)
            assert float(got.p) == pytest.approx(ref.pvalue, rel=1e-4, abs=1e-12)
            assert int(got.n_pairs) == x.size
    np.testing.assert_allclose(fit.r2.sel(layer="input_layer").values, 1.0)


def test_reference_distances_use_pdist_conventions():
    # guards the reference itself: euclidean / sqrt(m) on layer-z-scored data
    x = np.random.default_rng(0).random((5, 9))
    z = (x - x.mean()) / x.std()
    np.testing.assert_allclose(reference_distances(x, "layer", "euclidean"), pdist(z) / 3.0)


def test_offset_data_through_the_lazy_blocks():
    rng = np.random.default_rng(4)
    x = 1e4 + 1e-3 * rng.normal(size=(14, 60))
    arr = xr.DataArray(da.from_array(x, chunks=(5, 60)), dims=("trial", "unit"), name="offset")
    for norm, metric in [c for c in COMBOS if c != ("none", "cosine")]:
        got = float(cx.differentiation(arr, n_units=60, norm=norm, metric=metric, resamples=1, block_size=4,
                                       sample_dim="trial").squeeze())
        expected = float(np.median(reference_distances(x, norm, metric)))
        assert got == pytest.approx(expected, rel=RTOL), (norm, metric)


def test_dataset_of_arrays_is_a_set_of_layers():
    rec = make_recording()
    ds = xr.Dataset({"power": rec, "log_power": np.log(rec)})
    d = cx.differentiation(ds, n_units=[10], resamples=1, sample_dim="state", set_coord="condition").compute()
    assert d["layer"].values.tolist() == ["power", "log_power"]
    units = draw_units((12, 5), 10, seed=0, layer="log_power")
    x = np.log(rec.values).reshape(30, -1)[rec["condition"].values == "movie"][:, units]
    expected = np.median(reference_distances(x, "layer", "euclidean"))
    assert float(d.sel(set="movie", layer="log_power").squeeze()) == pytest.approx(expected, rel=RTOL)
