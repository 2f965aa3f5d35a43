"""Gram-based distances and RDMs against scipy, invariants, degenerate vectors, laziness."""

from __future__ import annotations

import itertools
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import (
    LAYERS,
    any_tree,
    layer_matrix,
    make_recording,
    make_tree,
    raise_if_dask_computes,
    reference_distances,
    synchronous,
    tree,
    tree_or_store,
    unit_indices,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import pdist, squareform

from cnndiff_xr.analysis import blocks, float16, gram
from cnndiff_xr.analysis.blocks import pairwise_distances
from cnndiff_xr.analysis.gram import DISTANCE_RTOL
from cnndiff_xr.analysis.metrics import DISTANCES, distance_spec
from cnndiff_xr.analysis.rdm import rdm
from cnndiff_xr.options import METRICS, NORMS
from cnndiff_xr.validation import ChoiceError

COMBOS = [(norm, metric) for norm in NORMS for metric in METRICS]
settings.register_profile("analysis", max_examples=30, deadline=None)
settings.load_profile("analysis")


@pytest.mark.parametrize("norm, metric", COMBOS)
def test_pairwise_matches_scipy(norm, metric):
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(1.0, 1.0, size=(25, 300)), 0).astype(np.float32)
    got = squareform(pairwise_distances(x, norm=norm, metric=metric), checks=False)
    np.testing.assert_allclose(got, reference_distances(x, norm, metric), rtol=DISTANCE_RTOL, atol=1e-12)


@pytest.mark.parametrize("norm, metric", COMBOS)
def test_rdm_matches_scipy_on_every_layer(any_tree, norm, metric):
    layers = [str(n) for n in any_tree.attrs.get("layers", LAYERS)]
    for layer in layers:
        result = rdm(any_tree, layer, n_units=40, norm=norm, metric=metric, seed=2, block_size=5)
        assert result.dims == ("image", "image_other")
        got = result.values
        x = layer_matrix(any_tree, layer, None, unit_indices(any_tree, layer, 40, seed=2))
        expected = squareform(reference_distances(x, norm, metric))
        rel = np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)
        assert rel.max() <= 1e-5, (layer, norm, metric, rel.max())


def test_rdm_labels_and_blocks(tree):
    result = rdm(tree, "block1_pool", n_units=16, sets=["cats", "random"], block_size=4)
    n = 7 + 12
    assert result.shape == (n, n)
    assert result.chunks == ((4, 4, 4, 4, 3), (4, 4, 4, 4, 3))
    assert set(result["set"].values) == {"cats", "random"}
    np.testing.assert_array_equal(result["image"].values, result["image_other"].values)
    assert result.attrs["layer"] == "block1_pool" and result.attrs["n_units_used"] == 16
    values = result.values
    np.testing.assert_array_equal(values, values.T)
    assert np.all(np.diag(values) == 0)


def test_rdm_is_lazy(tree):
    with raise_if_dask_computes():
        r = rdm(tree, "block1_conv1", n_units=30, norm="image", metric="correlation")
        r2 = rdm(tree, "block1_conv1", n_units=30, unit_type="top")
    assert r.chunks and r2.chunks


def test_rdm_same_seed_same_numbers(tree):
    a = rdm(tree, "block1_conv1", n_units=30, seed=7).values
    b = rdm(tree, "block1_conv1", n_units=30, seed=7).values
    c = rdm(tree, "block1_conv1", n_units=30, seed=8).values
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rdm_of_a_recording():
    rec = make_recording()
    r = rdm(rec, n_units=20, sample_dim="state", set_coord="condition", sets=["movie"])
    assert r.dims == ("state", "state_other") and r.shape == (10, 10)
    x = rec.values.reshape(30, -1)[rec["condition"].values == "movie"]
    from cnndiff_xr.analysis.draws import draw_units

    units = draw_units((12, 5), 20, seed=0, layer="lfp_power")
    expected = squareform(reference_distances(x[:, units], "layer", "euclidean"))
    np.testing.assert_allclose(r.values, expected, rtol=DISTANCE_RTOL)


# --------------------------------------------------------------------------- the registry
def test_the_registry_holds_one_spec_per_norm_and_metric():
    assert set(DISTANCES) == set(itertools.product(NORMS, METRICS))
    for (norm, metric), spec in DISTANCES.items():
        assert spec.key == (norm, metric) and distance_spec(norm, metric) is spec
        assert spec.non_negative  # the radix-select median relies on it
        assert pickle.loads(pickle.dumps(spec)) is spec  # a task argument travels as its key
    with pytest.raises(ChoiceError, match="metric='manhattan'"):
        distance_spec("layer", "manhattan")


# --------------------------------------------------------------------------- invariants
matrices = st.integers(2, 9).flatmap(
    lambda n: st.integers(1, 12).flatmap(
        lambda m: arrays(np.float64, (n, m), elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False))
    )
)


@given(x=matrices, norm=st.sampled_from(NORMS), metric=st.sampled_from(METRICS))
def test_distance_invariants(x, norm, metric):
    d = pairwise_distances(x, norm=norm, metric=metric, constant="zero")
    assert np.all(np.isfinite(d))
    assert np.all(np.diag(d) == 0)
    np.testing.assert_array_equal(d, d.T)
    assert np.all(d >= 0)
    if metric != "euclidean":
        assert np.all(d <= 2 + 1e-12)


@given(x=matrices)
def test_image_norm_is_a_function_of_correlation(x):
    spread = x.max(axis=1) - x.min(axis=1)
    x = x[spread > 1e-6 * np.maximum(np.abs(x).max(axis=1), 1)]
    if x.shape[0] < 2:
        return
    euclid = pairwise_distances(x, norm="image", metric="euclidean")
    corr = pairwise_distances(x, norm="image", metric="correlation")
    np.testing.assert_allclose(euclid, np.sqrt(2 * corr), atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 15), m=st.integers(800, 2000))
@settings(max_examples=15, deadline=None)
def test_uncorrelated_zscored_vectors_are_sqrt2_apart(seed, n, m):
    x = np.random.default_rng(seed).normal(size=(n, m))
    d = squareform(pairwise_distances(x, norm="layer", metric="euclidean"))
    assert abs(np.median(d) - np.sqrt(2)) < 0.1
    assert np.all(np.abs(d - np.sqrt(2)) < 0.25)


@given(x=matrices, shift=st.floats(-50, 50), scale=st.floats(0.1, 10))
def test_layer_norm_ignores_affine_rescaling(x, shift, scale):
    if x.std() < 1e-3:
        return
    a = pairwise_distances(x, norm="layer", metric="euclidean")
    b = pairwise_distances(x * scale + shift, norm="layer", metric="euclidean")
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@given(data=st.data())
@settings(max_examples=8, deadline=None)
def test_lazy_rdm_invariants(data):
    n = data.draw(st.integers(2, 12))
    block = data.draw(st.integers(1, 5))
    x = data.draw(arrays(np.float32, (n, 6), elements=st.floats(0, 5, width=32)))
    arr = xr.DataArray(x, dims=("image", "unit"))
    d = rdm(arr, n_units=6, metric="euclidean", norm="none", block_size=block).values
    assert np.all(np.diag(d) == 0) and np.all(d >= 0)
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_allclose(d, squareform(pdist(x.astype(np.float64))) / np.sqrt(6), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- degenerate vectors
def _with_constant_rows():
    x = np.random.default_rng(3).random((6, 5))
    x[1] = 0.0  # all zero
    x[4] = 2.5  # constant, non-zero
    return x


@pytest.mark.parametrize("norm, metric", [("image", "euclidean"), ("layer", "correlation"), ("none", "cosine")])
def test_constant_vectors_raise_by_default(norm, metric):
    with pytest.raises(ValueError, match="constant|all-zero"):
        pairwise_distances(_with_constant_rows(), norm=norm, metric=metric)


def test_constant_vector_error_names_layer_set_and_image(tree):
    act = tree["predictions"]["activation"]
    cats = np.flatnonzero(act["set"].values == "cats")
    values = act.values.copy()
    values[cats[2]] = 0.1
    layer = act.copy(data=values).chunk({"image": 4}).rename("predictions")
    r = rdm(layer, n_units=10, norm="image", sets=["cats"])  # lazy: raises on compute
    with pytest.raises(ValueError) as err:
        r.compute()
    message = str(err.value)
    assert "'predictions'" in message and "'cats'" in message and "constant" in message
    assert str(act["image"].values[cats[2]]) in message


def test_constant_zero_policy_values():
    x = _with_constant_rows()
    d = pairwise_distances(x, norm="image", metric="euclidean", constant="zero")
    assert d[1, 4] == 0  # two constant vectors: both z-score to zero
    np.testing.assert_allclose(d[1, [0, 2, 3, 5]], 1.0)  # zero vs a unit-variance pattern
    c = pairwise_distances(x, norm="none", metric="correlation", constant="zero")
    np.testing.assert_allclose(c[1, [0, 2, 3, 4, 5]], 1.0)
    cos = pairwise_distances(x, norm="none", metric="cosine", constant="zero")
    np.testing.assert_allclose(cos[1, [0, 2, 3, 4, 5]], 1.0)
    assert 0 <= cos[4, 0] < 1  # constant but non-zero is fine for raw cosine


def test_identical_vectors_under_layer_norm_are_zero_apart():
    x = np.full((4, 7), 3.0)
    np.testing.assert_array_equal(pairwise_distances(x, norm="layer", metric="euclidean"), 0.0)
    with pytest.raises(ValueError, match="constant"):
        pairwise_distances(x, norm="layer", metric="cosine")


def test_non_finite_activations_raise():
    x = np.random.default_rng(0).random((4, 6))
    x[2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        pairwise_distances(x)


@pytest.mark.parametrize(
    "kwargs, words",
    [({"norm": "zscore"}, "norm"), ({"metric": "manhattan"}, "metric"), ({"constant": "nan"}, "constant"),
     ({"n_units": 0}, "n_units"), ({"unit_type": "max"}, "unit_type"), ({"sets": ["dogs"]}, "cats")],
)
def test_rdm_bad_arguments_are_named(tree, kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        rdm(tree, "block1_conv1", **({"n_units": 10} | kwargs))


def test_rdm_needs_two_images():
    arr = xr.DataArray(np.ones((1, 3)), dims=("image", "unit"))
    with pytest.raises(ValueError, match="at least 2"):
        rdm(arr, n_units=3)


def test_synchronous_and_threaded_schedulers_agree(tree):
    r = rdm(tree, "block1_conv1", n_units=50, block_size=6)
    a = r.compute(scheduler="sync").values
    with dask.config.set(scheduler="threads", num_workers=2):
        b = r.compute().values
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("norm, metric", [c for c in COMBOS if c != ("none", "cosine")])
def test_rows_far_from_zero_keep_their_precision(norm, metric):
    # mean/spread ~ 1e7: raw Gram identities would lose every digit; shifted blocks keep them
    # (raw cosine of such vectors is ill-conditioned by definition, in scipy too)
    x = 1e4 + 1e-3 * np.random.default_rng(2).normal(size=(12, 200))
    x[:, :50] += 5e-3 * np.arange(12)[:, None]  # rows with slightly different offsets
    got = squareform(pairwise_distances(x, norm=norm, metric=metric), checks=False)
    np.testing.assert_allclose(got, reference_distances(x, norm, metric), rtol=1e-5)


# --------------------------------------------------------------------------- float32 Gram products
def _correlated_rows(n: int, m: int, r: float, seed: int = 0) -> np.ndarray:
    """ReLU-like rows sharing a common pattern (correlation ~r), plus an exact duplicate and
    a near-duplicate: the cases where float32 products cancel."""
    rng = np.random.default_rng(seed)
    common = np.maximum(rng.normal(0.2, 1.0, size=(1, m)), 0)
    own = np.maximum(rng.normal(0.2, 1.0, size=(n, m)), 0)
    x = (np.sqrt(r) * common + np.sqrt(1 - r) * own).astype(np.float32)
    x[1] = x[0]
    x[2] = x[0] + np.float32(1e-4) * own[3].astype(np.float32)
    return x


@pytest.mark.parametrize("norm, metric", COMBOS)
@pytest.mark.parametrize("r", [0.0, 0.999])
def test_float32_products_stay_within_the_documented_tolerance(monkeypatch, norm, metric, r):
    # small column blocks: many float32 partial products summed in float64, as at 100k units
    monkeypatch.setattr(gram, "GRAM_BLOCK_COLUMNS", 256)
    x = _correlated_rows(40, 3000, r)
    got = squareform(pairwise_distances(x, norm=norm, metric=metric), checks=False)
    expected = reference_distances(x, norm, metric)
    # relative everywhere, except the exact duplicate (distance 0): a Gram-based distance of
    # identical vectors is sqrt(float64 rounding), ~1e-7..1e-5 of a typical distance
    atol = 1e-5 * np.median(expected)
    np.testing.assert_allclose(got, expected, rtol=DISTANCE_RTOL, atol=atol)
    assert np.sum(np.abs(got - expected) > DISTANCE_RTOL * expected) <= 1  # only that pair needs atol


def test_error_bound_covers_the_measured_float32_error():
    x = _correlated_rows(30, 5000, 0.9, seed=3)
    shift = gram.Shift(common=x.mean(axis=0, dtype=np.float64)).for_dtype(x.dtype)
    g32, n32, _ = gram.gram(x, None, shift)
    g64, n64, _ = gram.exact_gram(x, None, shift)
    d32 = np.sqrt(np.maximum(n32[:, None] + n32[None, :] - 2 * g32, 0))
    d64 = np.sqrt(np.maximum(n64[:, None] + n64[None, :] - 2 * g64, 0))
    off = ~np.eye(30, dtype=bool) & (d64 > 0)
    measured = np.abs(d32 - d64)[off] / d64[off]
    bound = distance_spec("layer", "euclidean").error_bound(g32, n32, n32)[off]
    assert np.all(measured <= bound)
    assert np.median(bound) < DISTANCE_RTOL  # typical pairs need no float64 pass
    assert measured.max() > 0  # float32 products really ran


def _count_float64_redos(monkeypatch) -> list[int]:
    """The number of rows of every float64 Gram product (``gram.exact_gram``) from now on, in call order."""
    calls: list[int] = []
    original = gram.exact_gram

    def spy(xa, xb, *args):
        calls.append(xa.shape[0])
        return original(xa, xb, *args)

    monkeypatch.setattr(gram, "exact_gram", spy)
    return calls


def test_only_ill_conditioned_pairs_are_recomputed_in_float64(monkeypatch):
    calls = _count_float64_redos(monkeypatch)
    x = _correlated_rows(50, 2000, 0.0)
    pairwise_distances(x)
    assert calls and calls[0] < 10  # the duplicate and near-duplicate rows, not all 50
    calls.clear()
    pairwise_distances(x[3:])  # no near-duplicates left: float32 only
    assert calls == []


def _median_inputs(x: np.ndarray):
    """The float32 Gram block of ``x`` (Euclidean, centroid shift, as a one-block set), its distance function and the
    scale of the layer-z-scored distances (the reference's)."""
    shift = gram.Shift(common=x.mean(axis=0, dtype=np.float64)).for_dtype(x.dtype)
    g, norms, _ = gram.gram(x, None, shift)
    spec = distance_spec("layer", "euclidean")
    sd = float(np.std(x, dtype=np.float64))

    def distances(g_, na, nb):
        return spec.distances(g_, na, nb, x.shape[1], sd=sd)

    return shift, g, norms, spec, distances, spec.squared_scale(x.shape[1], sd)


@pytest.mark.parametrize("near_share", [0.02, 0.7])
def test_euclidean_median_redoes_only_the_pairs_that_decide_it(monkeypatch, near_share):
    """Near-duplicates far below the median (a few crops of one photo in a set) are not redone; a set made mostly of
    near-duplicates (a still movie) redoes the ones around the median. Either way the median is that of every pair
    at its float32 distance, the unsure ones (bound > DISTANCE_RTOL) at their float64 distance."""
    rng = np.random.default_rng(7)
    n, m = 60, 3000
    x = np.maximum(rng.normal(0.2, 1.0, size=(n, m)), 0).astype(np.float32)
    copies = rng.random(n) < near_share  # rows that are row 0 plus a small perturbation
    copies[0] = False
    x[copies] = x[0] + np.float32(3e-3) * np.abs(rng.normal(size=(int(copies.sum()), m))).astype(np.float32)
    shift, g, norms, spec, distances, scale = _median_inputs(x)
    upper = np.triu_indices(n, 1)
    d32 = distances(g, norms, norms)[upper]
    g64, n64, _ = gram.exact_gram(x, None, shift)
    d64 = distances(g64, n64, n64)[upper]
    unsure = gram.unsure_pairs(g, norms, norms, spec.error_bound, same=True)[upper]
    expected = np.median(np.where(unsure, d64, d32))  # every unsure pair redone: accurate_gram's values
    redone = _count_float64_redos(monkeypatch)
    got = gram.euclidean_median(x, shift, g, norms, scale)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(np.median(reference_distances(x, "layer", "euclidean")), rel=DISTANCE_RTOL)
    if near_share < 0.1:
        assert unsure.sum() >= 1 and redone == []  # the near-duplicates are far below the median: not redone
    else:
        assert unsure.mean() > 0.5  # the median is among the unsure pairs: some are redone, not all rows
        assert redone and redone[0] < n


def test_euclidean_median_redoes_duplicates_below_float32_resolution(monkeypatch):
    """A pair at distance 0 in float32 (an exact duplicate) has no finite bound, so no side: it is redone."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(0.2, 1.0, size=(30, 2000)), 0).astype(np.float32)
    x[7] = x[3]
    shift, g, norms, spec, distances, scale = _median_inputs(x)
    redone = _count_float64_redos(monkeypatch)
    got = gram.euclidean_median(x, shift, g, norms, scale)
    assert redone == [2]  # rows 3 and 7 only
    assert got == pytest.approx(np.median(reference_distances(x, "layer", "euclidean")), rel=DISTANCE_RTOL)


@pytest.mark.parametrize("n", [40, 41, 2])  # even and odd numbers of pairs, one pair
def test_euclidean_median_of_a_block_without_unsure_pairs_is_partition_median_bit_for_bit(n):
    x = np.maximum(np.random.default_rng(n).normal(size=(n, 2000)), 0).astype(np.float32)
    shift, g, norms, spec, distances, scale = _median_inputs(x)
    assert not gram.unsure_pairs(g, norms, norms, spec.error_bound, same=True).any()
    expected = gram.partition_median(distances(g, norms, norms)[np.triu_indices(n, 1)])
    assert gram.euclidean_median(x, shift, g, norms, scale) == expected
    assert gram.euclidean_median(x, shift, g, norms, 0.0) == 0.0  # every sampled value equal: all distances 0


def test_float16_rows_kept_until_the_gram_product_give_the_float32_numbers():
    """A float16 set in one row block goes to the Gram product as float16 and is converted one column block at a time
    (``_row_block(keep_float16=True)``, ``Shift.apply``): bit for bit what its float32 conversion gives."""
    import cnndiff_xr as cx

    rng = np.random.default_rng(9)
    x = np.maximum(rng.normal(size=(40, 9000)), 0).astype(np.float16)
    x[5] = x[4]  # an unsure pair
    half = xr.DataArray(da.from_array(x, chunks=(15, -1)), dims=("image", "unit"), name="relu")
    single = half.astype(np.float32)
    for kwargs in (dict(n_units=[300, 5000], resamples=2), dict(n_units=[8000], resamples=1)):
        a = cx.differentiation(half, **kwargs).values
        b = cx.differentiation(single, **kwargs).values
        assert a.tobytes() == b.tobytes(), kwargs


@pytest.mark.parametrize("norm, metric", [c for c in COMBOS if c != ("none", "cosine")])
def test_lazy_float32_rows_far_from_zero_stay_within_tolerance(norm, metric):
    # float32 activations whose mean is 300x their spread: the lazy path's row statistics
    # (layer SD, row means) must not lose (mean/spread)^2 of their precision
    rng = np.random.default_rng(5)
    x = (300.0 + rng.normal(size=(8, 8192))).astype(np.float32)
    arr = xr.DataArray(da.from_array(x, chunks=(3, 8192)), dims=("image", "unit"), name="offset")
    got = rdm(arr, n_units=8192, norm=norm, metric=metric, block_size=5).values
    expected = squareform(reference_distances(x, norm, metric))
    off = ~np.eye(8, dtype=bool)
    np.testing.assert_allclose(got[off], expected[off], rtol=DISTANCE_RTOL)


def test_lazy_constant_layer_has_zero_distances():
    x = np.full((6, 5000), 0.1, dtype=np.float32)
    arr = xr.DataArray(da.from_array(x, chunks=(2, 5000)), dims=("image", "unit"), name="flat")
    np.testing.assert_array_equal(rdm(arr, n_units=5000, block_size=4).values, 0.0)


def half_to_float_shape_kept(shape):
    got = float16.half_to_float(np.zeros(shape, np.float16))
    return got.shape == shape and got.dtype == np.float32


def test_half_to_float_is_bit_identical_to_numpy_cast():
    # every float16 bit pattern: zeros of both signs, subnormals, normals, infinities, NaN payloads
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    got = float16.half_to_float(every)
    assert got.dtype == np.float32 and got.shape == every.shape
    assert np.array_equal(got.view(np.uint32), every.astype(np.float32).view(np.uint32))
    assert half_to_float_shape_kept((0, 3)) and half_to_float_shape_kept((2, 0))
    strided = every[::3, 1::2]  # not contiguous
    assert np.array_equal(float16.half_to_float(strided).view(np.uint32),
                          strided.astype(np.float32).view(np.uint32))
    out = np.full((every.shape[0], 100), np.nan, np.float32)
    assert float16.half_to_float(every[:, 50:150], out) is out  # a column slice, into a given array
    assert np.array_equal(out.view(np.uint32), every[:, 50:150].astype(np.float32).view(np.uint32))
    with pytest.raises(ValueError, match="C-contiguous"):
        float16.half_to_float(every[:, :10], np.empty((256, 20), np.float32)[:, ::2])


def test_half_to_float_shifts_finite_non_negative_values_without_the_table(monkeypatch):
    # every finite non-negative float16 (zero, subnormals, normals up to 65504), in rows and flat
    finite = np.arange(0x7C00, dtype=np.uint16).view(np.float16)
    monkeypatch.setattr(float16, "_HALF_TO_FLOAT", np.zeros(2**16, np.float32))  # a lookup would give 0
    for piece in (float16._SHIFT_PIECE, 1000):  # in one piece, and in many (a few rows at a time for the 2-d ones)
        monkeypatch.setattr(float16, "_SHIFT_PIECE", piece)
        for x in (finite, finite.reshape(31, 1024), finite.reshape(31, 1024)[::2, 3::5]):
            got = float16.half_to_float(x)
            assert np.array_equal(got.view(np.uint32), x.astype(np.float32).view(np.uint32))
    # one negative value or one inf sends the whole array to the table (here all zeros)
    for bad in (np.float16(-1), np.float16(np.inf)):
        assert not float16.half_to_float(np.array([1, bad, 2], np.float16)).any()


def test_float16_rows_converted_by_half_to_float_give_the_same_distances(monkeypatch):
    rng = np.random.default_rng(5)
    x = np.maximum(rng.normal(size=(30, 2000)), 0).astype(np.float16)  # ReLU-like: about half zeros
    arr = xr.DataArray(da.from_array(x, chunks=(7, -1)), dims=("image", "unit"), name="relu")
    from cnndiff_xr.analysis.draws import draw_units

    units = draw_units((2000,), 500, seed=0, layer="relu")
    cases = [("layer", "euclidean"), ("image", "correlation"), ("none", "cosine")]
    by_ours = [rdm(arr, n_units=500, norm=norm, metric=metric).values for norm, metric in cases]

    def numpy_cast(a, out=None):
        if out is None:
            return a.astype(np.float32)
        out[...] = a
        return out

    monkeypatch.setattr(blocks, "half_to_float", numpy_cast)  # what the row blocks convert with
    by_cast = [rdm(arr, n_units=500, norm=norm, metric=metric).values for norm, metric in cases]
    for (norm, metric), a, b in zip(cases, by_ours, by_cast, strict=True):
        assert np.array_equal(a, b), (norm, metric)
        reference = squareform(reference_distances(x.astype(np.float64)[:, units], norm, metric))
        np.testing.assert_allclose(a, reference, rtol=DISTANCE_RTOL, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_row_block_takes_every_draw_from_the_gathered_chunks(dtype):
    """A row block assembled from several gathered chunks (rows a range of one chunk, scattered rows of another,
    all rows of a third) equals plain numpy indexing of the stacked rows, for every draw; float16 comes out as
    float32 bit for bit, float64 and integers as float64."""
    from cnndiff_xr.analysis.draws import DrawTable, make_plan

    rng = np.random.default_rng(3)
    size = 300
    table = DrawTable("layer", (size,), "random", 0, None, ((40, 0), (40, 1), (size, 0)), np.zeros((1, 3)), (40,))
    plan = make_plan(table)
    for d, u in enumerate(plan.units[0]):  # the plan's positions locate each draw in the union
        assert np.array_equal(plan.union[plan.positions(0, d)], u)
    assert isinstance(plan.positions(0, 2), slice)  # every unit: the whole union, no take
    chunks = [(rng.normal(size=(8, size)) * 50).astype(dtype) for _ in range(3)]
    parts = [c[:, plan.union] for c in chunks]  # what the gather hands over: each chunk's union columns
    positions = [np.arange(3, 8), np.array([0, 2, 5]), np.arange(8)]
    block = blocks._row_block(parts, positions, plan, 0)
    stacked = np.concatenate([c[p] for c, p in zip(chunks, positions, strict=True)])
    expected_dtype = np.float32 if dtype in (np.float16, np.float32) else np.float64
    assert len(block) == 3
    for d, u in enumerate(plan.units[0]):
        assert block[d].dtype == expected_dtype and block[d].flags.c_contiguous
        np.testing.assert_array_equal(block[d], stacked[:, u].astype(expected_dtype))
