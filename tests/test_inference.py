"""Inference over images: the image bootstrap and the set comparison, against plain numpy/scipy loops."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import (
    layer_matrix,
    make_tree,
    raise_if_dask_computes,
    reduce_tree,
    reference_distances,
    synchronous,
    tree,
    unit_indices,
)
from dask.core import flatten
from scipy import stats
from scipy.spatial.distance import pdist

import cnndiff_xr as cx
from cnndiff_xr.analysis.inference import (
    bootstrap_differentiation,
    compare_sets,
    holm,
    image_resamples,
    resample_counts,
    set_permutations,
    weighted_median,
)
from cnndiff_xr.analysis.median import partition_median
from cnndiff_xr.sampling import UnitDraws
from cnndiff_xr.validation import ParameterError, ParameterTypeError, ParameterValueError, UnknownLabelError

RTOL = 1e-5  # distances from Gram blocks are within 1e-5 of float64 ones (docs/architecture.md)
__all__ = ["synchronous", "tree"]  # fixtures, used by pytest


def _reduce(values: np.ndarray, reduction: str) -> float:
    return float(np.median(values) if reduction == "median" else np.mean(values))


# --------------------------------------------------------------------------- weighted median
def test_weighted_median_is_the_median_of_the_repeated_values():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 20):
        values = rng.integers(0, 4, n).astype(float) * 0.25  # many ties
        for _ in range(30):
            w = rng.integers(0, 4, n)
            if w.sum() == 0:
                w[0] = 1
            expected = np.median(np.repeat(values, w))
            assert weighted_median(values, w) == expected, (values, w)  # bit for bit
    # even and odd totals of the same values, the two middle values differing
    v = np.array([3.0, 1.0, 2.0, 10.0])
    assert weighted_median(v, np.array([1, 1, 1, 1])) == 2.5  # even: mean of 2 and 3
    assert weighted_median(v, np.array([1, 2, 1, 1])) == 2.0  # odd total 5: 1, 1, 2, 3, 10
    assert weighted_median(v, np.array([0, 3, 0, 3])) == 5.5  # even, the middle straddles a gap
    assert weighted_median(v, np.array([0, 1, 0, 0])) == 1.0  # one value
    # rows of weights at once, a zero total giving NaN
    rows = np.array([[1, 1, 1, 1], [1, 2, 1, 1], [0, 0, 0, 0]])
    out = weighted_median(v, rows)
    np.testing.assert_array_equal(out[:2], [2.5, 2.0])
    assert np.isnan(out[2])


def test_all_ones_bootstrap_is_the_plain_median_bit_for_bit():
    from cnndiff_xr.analysis.inference import _bootstrap_pairs

    rng = np.random.default_rng(1)
    n = 9
    i, j = np.triu_indices(n, 1)
    values = rng.random(i.size)
    for reduction in ("median", "mean"):
        out = _bootstrap_pairs(values, i, j, np.ones((2, n), np.int64), reduction)
        expected = partition_median(values) if reduction == "median" else values.mean()
        assert out[0] == pytest.approx(expected, rel=1e-15, abs=0)
    assert _bootstrap_pairs(values, i, j, np.ones((1, n), np.int64), "median")[0] == partition_median(values)


def test_image_resamples_are_seeded_by_set_and_extend():
    a = image_resamples(7, 5, seed=0, set_name="cats")
    np.testing.assert_array_equal(a, image_resamples(7, 5, seed=0, set_name="cats"))
    np.testing.assert_array_equal(a, image_resamples(7, 9, seed=0, set_name="cats")[:5])
    assert not np.array_equal(a, image_resamples(7, 5, seed=1, set_name="cats"))
    assert not np.array_equal(a, image_resamples(7, 5, seed=0, set_name="dogs"))
    counts = resample_counts(a, 7)
    assert counts.shape == (5, 7) and (counts.sum(axis=1) == 7).all()
    np.testing.assert_array_equal(counts[2], np.bincount(a[2], minlength=7))
    p = set_permutations(3, 4, 6, seed=0, a="x", b="y")
    assert p.shape == (6, 7) and all(sorted(row) == list(range(7)) for row in p)
    np.testing.assert_array_equal(p, set_permutations(3, 4, 8, seed=0, a="x", b="y")[:6])


# --------------------------------------------------------------------------- bootstrap
@pytest.mark.parametrize(("norm", "metric", "reduction", "layer"), [
    ("layer", "euclidean", "median", "block1_conv1"),
    ("image", "correlation", "mean", "input_layer"),  # layers without constant images over few units
    ("none", "cosine", "median", "predictions"),
])
def test_bootstrap_matches_explicit_resamples(tree, norm, metric, reduction, layer):
    n_boot, seed = 12, 3
    b = bootstrap_differentiation(tree, [15, 40], n_boot=n_boot, seed=seed, norm=norm, metric=metric,
                                  reduction=reduction, resamples=2, layers=[layer]).compute()
    assert b.dims == ("set", "layer", "n_units", "resample", "bootstrap")
    for s in b["set"].values:
        n = int(b.n_images.sel(set=s))
        resamples = image_resamples(n, n_boot, seed=seed, set_name=str(s))
        counts = resample_counts(resamples, n)
        for n_units in (15, 40):
            for r in (0, 1):
                x = layer_matrix(tree, layer, str(s), unit_indices(tree, layer, n_units, seed=seed, resample=r))
                scale = x.std() if norm == "layer" else 1.0  # the ORIGINAL set's SD: one RDM per set and draw
                for k in range(n_boot):
                    origin = np.repeat(np.arange(n), counts[k])  # the resample: original image of each copy
                    d = reference_distances(x[origin] / scale, "none" if norm == "layer" else norm, metric)
                    i, j = np.triu_indices(origin.size, 1)
                    expected = _reduce(d[origin[i] != origin[j]], reduction)  # copies of one image excluded
                    got = float(b.sel(set=s, layer=layer, n_units=n_units, resample=r, bootstrap=k))
                    assert got == pytest.approx(expected, rel=RTOL), (s, n_units, r, k)


def test_bootstrap_rdm_is_cx_rdm_and_block_paths_agree(tree):
    # the one RDM per set and draw: its weighted median at all-ones weights is the differentiation value
    b = bootstrap_differentiation(tree, 30, n_boot=20, resamples=2, layers=["block1_conv1"])
    small = bootstrap_differentiation(tree, 30, n_boot=20, resamples=2, layers=["block1_conv1"], block_size=4)
    b, small = dask.compute(b, small)
    np.testing.assert_allclose(b.values, small.values, rtol=1e-6)  # several row blocks: other float32 sums
    d = cx.rdm(tree, "block1_conv1", n_units=30, resample=1, sets="cats").values
    n = d.shape[0]
    counts = resample_counts(image_resamples(n, 20, seed=0, set_name="cats"), n)
    i, j = np.triu_indices(n, 1)
    expected = weighted_median(d[i, j], counts[:, i] * counts[:, j])
    np.testing.assert_array_equal(b.sel(set="cats", resample=1).squeeze().values, expected)


def test_bootstrap_summary_and_laziness(tree):
    with raise_if_dask_computes():
        b = bootstrap_differentiation(tree, [20, 50], n_boot=40, resamples=3)
        summary = cx.resample_summary(b, dim="bootstrap", interval=0.9)
    values = b.values
    computed = summary.compute()
    np.testing.assert_allclose(computed["lower"].values, np.percentile(values, 5, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(computed["upper"].values, np.percentile(values, 95, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(computed["mean"].values, values.mean(axis=-1), rtol=1e-12)
    assert computed["mean"].dims == ("set", "layer", "n_units", "resample")
    # paired: the same image resamples in every layer and draw of a set (a set's sample b differs between sets)
    assert b.attrs["n_boot"] == 40 and "the same resamples for every layer" in b.attrs["bootstrap_seed"]


def test_bootstrap_on_a_reduced_store_is_the_full_stores():
    full = make_tree(sets={"cats": 6, "dogs": 8})[0]
    reduced = reduce_tree(full, UnitDraws(n_units=[20], resamples=2, seed=0))
    kwargs = {"n_boot": 15, "resamples": 2, "layers": ["block1_conv1", "block1_pool"]}
    a = bootstrap_differentiation(full, 20, **kwargs).compute()
    r = bootstrap_differentiation(reduced, 20, **kwargs).compute()
    np.testing.assert_array_equal(a.values, r.values)
    c_full = compare_sets(full, "cats", "dogs", 20, n_permutations=20, resamples=2, layers="block1_conv1")
    c_red = compare_sets(reduced, "cats", "dogs", 20, n_permutations=20, resamples=2, layers="block1_conv1")
    np.testing.assert_array_equal(c_full.null.values, c_red.null.values)


# --------------------------------------------------------------------------- compare_sets
def test_compare_sets_difference_is_differentiation(tree):
    c = compare_sets(tree, "cats", "random", [10, 60], n_permutations=9, resamples=3, unit_type="top").compute()
    d = cx.differentiation(tree, [10, 60], resamples=3, unit_type="top", sets=["cats", "random"]).compute()
    np.testing.assert_allclose(c.differentiation.values, d.values, rtol=1e-6)
    expected = d.sel(set="cats") - d.sel(set="random")
    np.testing.assert_allclose(c.difference_per_resample.values, expected.values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(c.difference.values, expected.mean("resample").values, rtol=1e-6, atol=1e-9)
    assert c.p_value.dims == ("layer", "n_units") and c.null.dims == ("layer", "n_units", "permutation")
    # sets over several row blocks: the same union matrix, the same numbers
    blocked = compare_sets(tree, "cats", "random", [10, 60], n_permutations=9, resamples=3, unit_type="top",
                           block_size=3).compute()
    xr.testing.assert_identical(blocked, c)


@pytest.mark.parametrize(("norm", "metric", "reduction"), [
    ("layer", "euclidean", "median"),
    ("layer", "cosine", "mean"),  # each group shifted by its own layer mean
    ("image", "correlation", "median"),
])
def test_permutation_null_and_p_match_a_plain_loop(tree, norm, metric, reduction):
    a, b, n_perm, layer, seed = "cats", "white_noise", 30, "input_layer", 2
    c = compare_sets(tree, a, b, [12, 32], n_permutations=n_perm, seed=seed, norm=norm, metric=metric,
                     reduction=reduction, resamples=2, layers=[layer]).compute()
    n_a, n_b = int(c.n_images.sel(set=a)), int(c.n_images.sel(set=b))
    perms = set_permutations(n_a, n_b, n_perm, seed=seed, a=a, b=b)
    for n_units in (12, 32):
        per_draw = []
        for r in (0, 1):
            units = unit_indices(tree, layer, n_units, seed=seed, resample=r)
            x = np.concatenate([layer_matrix(tree, layer, a, units), layer_matrix(tree, layer, b, units)])
            rows = [(np.arange(n_a), np.arange(n_a, n_a + n_b))] + [(p[:n_a], p[n_a:]) for p in perms]
            # scipy's pdist of each (permuted) group, normalised on its own (its mean and SD under "layer")
            per_draw.append([_reduce(pdist_group(x[ga], norm, metric), reduction)
                             - _reduce(pdist_group(x[gb], norm, metric), reduction) for ga, gb in rows])
        statistic = np.mean(per_draw, axis=0)
        got = c.sel(layer=layer, n_units=n_units)
        assert float(got.difference) == pytest.approx(statistic[0], rel=RTOL)
        np.testing.assert_allclose(got.null.values, statistic[1:], rtol=RTOL, atol=1e-9)
        obs = abs(got.difference.values)
        expected_p = (1 + np.sum(np.abs(got.null.values) >= obs * (1 - 100 * np.finfo(float).eps))) / (1 + n_perm)
        assert float(got.p_value) == expected_p
        # and against the plain loop's own null, away from ties
        assert float(got.p_value) == (1 + np.sum(np.abs(statistic[1:]) >= abs(statistic[0]) * (1 - 1e-9))) / (
            1 + n_perm)


def pdist_group(x: np.ndarray, norm: str, metric: str) -> np.ndarray:
    return reference_distances(x, norm, metric)


def test_holm_by_hand_and_in_the_result(tree):
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm(np.array([0.5, 0.6])), [1.0, 1.0])
    np.testing.assert_allclose(holm(np.stack([p, p[::-1]], axis=1), axis=0),
                               np.stack([holm(p), holm(p[::-1])], axis=1))
    c = compare_sets(tree, "random", "cats", [20, 50], n_permutations=19, resamples=1).compute()
    for n_units in (20, 50):
        raw = c.p_value.sel(n_units=n_units).values
        order = np.argsort(raw)
        by_hand, running = np.empty_like(raw), 0.0
        for rank, k in enumerate(order):
            running = max(running, min(1.0, (raw.size - rank) * raw[k]))
            by_hand[k] = running
        np.testing.assert_allclose(c.p_holm.sel(n_units=n_units).values, by_hand, rtol=1e-15)


@pytest.mark.parametrize("layers", ["block1_conv1", None])
def test_compare_sets_dataset_computes_in_one_dask_compute(tree, layers):
    # dask.compute(dataset) optimises all variables' graphs together; with p_holm computed from p, blockwise fusion
    # dropped p's chunk ("Missing dependency ('truediv-...')") when the call had one layer
    c = compare_sets(tree, "random", "cats", [20, 50], n_permutations=9, resamples=2, layers=layers)
    (together,) = dask.compute(c, scheduler="threads")
    alone = {name: c[name].compute(scheduler="sync") for name in c.data_vars}
    for name, value in alone.items():
        np.testing.assert_array_equal(together[name].values, value.values)
    np.testing.assert_array_equal(together.p_holm.values, holm(together.p_value.values, axis=0))


def _two_sets(rng: np.random.Generator, n_a: int, n_b: int, noise_b: float, units: int = 24) -> xr.DataArray:
    """Images of a common pattern plus noise; set ``b``'s noise scaled by ``noise_b`` (1: one distribution). Each
    group is normalised by its own SD, so only the share of noise in it can tell the sets apart."""
    x = rng.normal(size=units) + rng.normal(size=(n_a + n_b, units))
    x[n_a:] = x[n_a:] + (noise_b - 1.0) * (x[n_a:] - x[n_a:].mean(axis=0))
    return xr.DataArray(x, dims=("trial", "neuron"), name="rec",
                        coords={"condition": ("trial", ["a"] * n_a + ["b"] * n_b)})


def test_p_values_are_uniform_under_the_null_and_small_for_a_difference():
    rng = np.random.default_rng(7)
    kwargs = {"n_permutations": 49, "resamples": 1, "sample_dim": "trial", "set_coord": "condition"}
    null = [compare_sets(_two_sets(rng, 6, 7, 1.0), "a", "b", 24, seed=k, **kwargs) for k in range(60)]
    p = np.array([float(v) for v in dask.compute(*[c.p_value.squeeze() for c in null])])
    assert stats.kstest(p, "uniform").pvalue > 0.01, np.sort(p)
    assert 0.02 < np.mean(p <= 0.1) < 0.22
    real = compare_sets(_two_sets(rng, 10, 10, 0.3), "a", "b", 24, **kwargs).compute()
    assert float(real.p_value.squeeze()) == 1 / 50 and float(real.difference.squeeze()) > 0


def test_compare_sets_is_lazy_and_the_cluster_agrees(tree, local_client):
    with raise_if_dask_computes():
        c = compare_sets(tree, "cats", "random", [10, 40], n_permutations=15, resamples=2, unit_type="top")
        b = bootstrap_differentiation(tree, [10, 40], n_boot=10, resamples=2, block_size=5, layers="block1_conv1")
    c_sync, b_sync = dask.compute(c, b, scheduler="sync")
    c_dist, b_dist = local_client.compute([c, b], sync=True)
    xr.testing.assert_allclose(c_sync, c_dist, rtol=1e-12)
    xr.testing.assert_allclose(b_sync, b_dist, rtol=1e-12)


# --------------------------------------------------------------------------- graph keys and errors
def _keys(obj: xr.DataArray | xr.Dataset) -> set:
    arrays = [obj] if isinstance(obj, xr.DataArray) else [obj[k] for k in sorted(obj.data_vars)]
    return {k for a in arrays for k in flatten(a.data.__dask_keys__())}


def test_graph_keys(tree):
    def boot(**kw):
        return bootstrap_differentiation(tree, [10, 30], **{"n_boot": 8, "resamples": 2, **kw})

    def comp(**kw):
        return compare_sets(tree, "cats", "random", [10, 30], **{"n_permutations": 8, "resamples": 2, **kw})

    assert _keys(boot()) == _keys(boot()) and _keys(comp()) == _keys(comp())
    assert _keys(bootstrap_differentiation(make_tree()[0], [10, 30], n_boot=8, resamples=2)) == _keys(boot())
    for changed in ({"n_boot": 9}, {"seed": 1}, {"norm": "image"}, {"reduction": "mean"}, {"sets": ["cats"]}):
        assert not _keys(boot(**changed)) & _keys(boot()), changed
    for changed in ({"n_permutations": 9}, {"seed": 1}, {"metric": "cosine"}, {"layers": ["block1_pool"]}):
        assert not _keys(comp(**changed)) & _keys(comp()), changed
    swapped = compare_sets(tree, "random", "cats", [10, 30], n_permutations=8, resamples=2)
    assert not _keys(swapped) & _keys(comp())
    # computed together, each keeps its numbers
    one, two = dask.compute(boot(), boot(seed=1))
    np.testing.assert_array_equal(one.values, boot().values)
    assert not np.array_equal(one.values, two.values)


def test_clear_errors(tree):
    with pytest.raises(UnknownLabelError, match="unknown set 'dogs'"):
        compare_sets(tree, "cats", "dogs")
    with pytest.raises(ParameterValueError, match="two different sets.*'cats'"):
        compare_sets(tree, "cats", "cats")
    with pytest.raises(ParameterTypeError, match="b must be a set name"):
        compare_sets(tree, "cats", ["random"])  # type: ignore[arg-type]
    with pytest.raises(ParameterValueError, match="n_permutations must be an integer >= 1"):
        compare_sets(tree, "cats", "random", n_permutations=0)
    with pytest.raises(ParameterValueError, match="n_boot must be an integer >= 1"):
        bootstrap_differentiation(tree, n_boot=0)
    with pytest.raises(ParameterError, match="norm='weird'"):
        bootstrap_differentiation(tree, norm="weird")  # type: ignore[arg-type]
    lonely = make_tree(sets={"one": 1, "many": 5})[0]
    with pytest.raises(ParameterValueError, match="set 'one' has 1 image"):
        compare_sets(lonely, "many", "one")
    with pytest.raises(ParameterValueError, match="set 'one' has 1 image"):
        bootstrap_differentiation(lonely, sets=["one"])


def test_figures(tree):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from cnndiff_xr import plot

    d = cx.differentiation(tree, [20, 60], resamples=3)
    b = bootstrap_differentiation(tree, [20, 60], resamples=3, n_boot=30)
    c = compare_sets(tree, "cats", "random", [20, 60], resamples=3, n_permutations=39)
    fig, ax = plot.differentiation_by_layer(d, bootstrap=b)
    assert isinstance(fig, Figure) and "image bootstraps" in " ".join(t.get_text() for t in ax.get_legend().texts)
    fig, ax = plot.set_comparison(c, bootstrap=b)
    stars = [t for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == int((c.p_holm.values < 0.05).sum())
    plot.set_comparison(c)  # without a bootstrap
    matplotlib.pyplot.close("all")
