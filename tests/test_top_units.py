"""unit_type="top": the units with the highest mean over ALL images analysed in a call, shared by every set.

Each test recomputes the choice with plain numpy (float64 means over the rows of every chosen set, a stable argsort,
ties to the lower flat index) and the seed's measure on those units with ``pdist`` and ``np.median``.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import SETS, make_tree, raise_if_dask_computes
from scipy import stats
from scipy.spatial.distance import pdist

import cnndiff_xr as cx
from cnndiff_xr.analysis.gram import DISTANCE_RTOL

RTOL = 1e-5


@pytest.fixture(scope="module")
def tree() -> xr.DataTree:
    return make_tree()[0]


def _values(obj: xr.DataTree | xr.DataArray, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images x units float64, set labels) of a layer, with plain numpy."""
    act = obj[layer]["activation"] if layer is not None else obj
    return np.asarray(act.values, dtype=np.float64).reshape(act.shape[0], -1), np.asarray(act["set"].values).astype(str)


def top_reference(values: np.ndarray, labels: np.ndarray, sets: list[str], n: int) -> np.ndarray:
    """The n units with the highest mean over all images of ``sets`` together, ties to the lower flat index."""
    means = values[np.isin(labels, sets)].mean(axis=0)
    return np.sort(np.argsort(-means, kind="stable")[:n])


def median_reference(x: np.ndarray) -> float:
    """The seed's measure: z-score over the set's images x units, Euclidean / sqrt(m), median of pdist."""
    z = (x - x.mean()) / x.std()
    return float(np.median(pdist(z) / np.sqrt(x.shape[1])))


def _set_names(sets: list[str] | None) -> list[str]:
    return list(SETS) if sets is None else sets


# --------------------------------------------------------------------------- against numpy
@pytest.mark.parametrize("sets", [None, ["cats", "random"]], ids=["all-sets", "two-sets"])
@pytest.mark.parametrize("block_size", [None, 4], ids=["one-block", "row-blocks"])
def test_top_differentiation_matches_numpy_on_the_units_of_all_analysed_images(tree, sets, block_size):
    d = cx.differentiation(tree, n_units=[12, 40], unit_type="top", resamples=2, sets=sets,
                           block_size=block_size).compute()
    names = _set_names(sets)
    assert sorted(d.set.values) == sorted(names)
    per_set_differs = 0
    for layer in d.layer.values:
        values, labels = _values(tree, str(layer))
        for n in (12, 40):
            units = top_reference(values, labels, names, n)
            # select_units over the same sets shows exactly these units
            shown = cx.select_units(tree, str(layer), n_units=n, unit_type="top", sets=sets)
            np.testing.assert_array_equal(shown["flat_index"].values, units)
            for s in names:
                x = values[labels == s]
                expected = median_reference(x[:, units])
                for r in (0, 1):  # the same units for every resample
                    got = float(d.sel(set=s, layer=layer, n_units=n, resample=r))
                    assert got == pytest.approx(expected, rel=RTOL), (str(layer), s, n, r)
                own = top_reference(values, labels, [s], n)  # what "top" per set used to pick
                if not np.array_equal(own, units):
                    per_set_differs += 1
                    assert abs(float(d.sel(set=s, layer=layer, n_units=n, resample=0)) - median_reference(x[:, own])) \
                        > 10 * RTOL * expected
    assert per_set_differs  # the synthetic sets rank units differently: the test tells the two rules apart


def _two_set_layer() -> xr.DataArray:
    """Set "a" (12 images) is high on units 0..9, set "b" (6 images) on units 20..29: over all 18 images units 0..9
    have the highest means (about 6.7 against 3.3), so "top" 10 is units 0..9 for both sets, not b's own 20..29."""
    rng = np.random.default_rng(7)
    labels = np.array(["a"] * 12 + ["b"] * 6)[rng.permutation(18)]
    x = rng.normal(size=(18, 40))
    x[labels == "a", 0:10] += 10.0
    x[labels == "b", 20:30] += 10.0
    return xr.DataArray(x.astype(np.float32).reshape(18, 8, 5), dims=("image", "y", "filter"),
                        coords={"set": ("image", labels)}, name="layer").chunk({"image": 5})


def test_every_set_uses_the_same_units():
    layer = _two_set_layer()
    values, labels = _values(layer)
    units = top_reference(values, labels, ["a", "b"], 10)
    np.testing.assert_array_equal(units, np.arange(10))
    assert not np.array_equal(top_reference(values, labels, ["b"], 10), units)  # b alone would pick 20..29
    np.testing.assert_array_equal(cx.select_units(layer, n_units=10, unit_type="top")["flat_index"].values, units)
    d = cx.differentiation(layer, n_units=10, unit_type="top", resamples=1).compute()
    for s in ("a", "b"):
        assert float(d.sel(set=s).squeeze()) == pytest.approx(median_reference(values[labels == s][:, units]),
                                                              rel=RTOL)
    # a set analysed alone ranks its own images: "top" depends on which images the call analyses
    alone = cx.differentiation(layer, n_units=10, unit_type="top", resamples=1, sets="b").compute()
    own = top_reference(values, labels, ["b"], 10)
    assert float(alone.squeeze()) == pytest.approx(median_reference(values[labels == "b"][:, own]), rel=RTOL)


def test_reference_normalisation_divides_numbers_of_the_same_units():
    layer = _two_set_layer()
    values, labels = _values(layer)
    units = np.arange(10)  # the top units of all 18 images (checked above)
    d = cx.differentiation(layer, n_units=[10], unit_type="top", resamples=2)
    ratio = cx.normalise_by_reference(d, reference="a").compute()
    expected = median_reference(values[labels == "b"][:, units]) / median_reference(values[labels == "a"][:, units])
    np.testing.assert_allclose(ratio.sel(set="b").values, expected, rtol=2 * RTOL)
    np.testing.assert_array_equal(ratio.sel(set="a").values, 1.0)


def test_ties_go_to_the_lower_flat_index_over_all_sets():
    # units 1, 2 and 3 tie at mean 2 over all four images (exact in float32), though each set alone ranks them
    # differently (a: unit 1, b: unit 2); unit 5 has mean 1.5; the others are small noise around 0
    rng = np.random.default_rng(2)
    x = rng.normal(scale=0.01, size=(4, 8))
    x[:, 1] = [3, 5, 0, 0]
    x[:, 2] = [0, 0, 5, 3]
    x[:, 3] = [2, 2, 1, 3]
    x[:, 5] = [1, 2, 2, 1]
    layer = xr.DataArray(x.astype(np.float32), dims=("image", "filter"),
                         coords={"set": ("image", ["a", "a", "b", "b"])}, name="layer").chunk({"image": 3})
    values, labels = _values(layer)
    for n, expected in [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 3, 5])]:
        np.testing.assert_array_equal(top_reference(values, labels, ["a", "b"], n), expected)
        np.testing.assert_array_equal(cx.select_units(layer, n_units=n, unit_type="top")["flat_index"].values,
                                      expected)
    d = cx.differentiation(layer, n_units=2, unit_type="top", resamples=1).compute()
    for s in ("a", "b"):
        assert float(d.sel(set=s).squeeze()) == pytest.approx(median_reference(values[labels == s][:, [1, 2]]),
                                                              rel=RTOL)


def test_top_does_not_depend_on_seed_or_resample(tree):
    kwargs = dict(n_units=[12, 40], unit_type="top", resamples=3, sets=["white_noise", "cats"],
                  layers=["block1_conv1", "block1_pool"])
    a = cx.differentiation(tree, seed=0, **kwargs).compute()
    b = cx.differentiation(tree, seed=5, **kwargs).compute()
    np.testing.assert_array_equal(a.values, b.values)
    for r in (1, 2):
        np.testing.assert_array_equal(a.isel(resample=r).values, a.isel(resample=0).values)
    for seed, resample in [(0, 0), (9, 4)]:
        units = cx.select_units(tree, "block1_conv1", n_units=12, unit_type="top", seed=seed, resample=resample,
                                sets=["white_noise", "cats"])
        values, labels = _values(tree, "block1_conv1")
        np.testing.assert_array_equal(units["flat_index"].values,
                                      top_reference(values, labels, ["white_noise", "cats"], 12))


def test_rdm_ranks_its_own_images(tree):
    r = cx.rdm(tree, "block1_conv1", n_units=20, unit_type="top", sets=["cats", "random"]).values
    values, labels = _values(tree, "block1_conv1")
    units = top_reference(values, labels, ["cats", "random"], 20)
    x = values[np.isin(labels, ["cats", "random"])][:, units]
    z = (x - x.mean()) / x.std()
    np.testing.assert_allclose(r[np.triu_indices(x.shape[0], 1)], pdist(z) / np.sqrt(20), rtol=RTOL)


def test_rdm_regression_uses_the_units_of_all_analysed_sets(tree):
    sets = ["white_noise", "random"]
    fit = cx.rdm_regression(tree, n_units=20, unit_type="top", sets=sets, layers=["block1_conv1"]).compute()
    inputs, labels = _values(tree, "input_layer")
    values, _ = _values(tree, "block1_conv1")
    in_units = top_reference(inputs, labels, sets, 20)
    units = top_reference(values, labels, sets, 20)
    for s in sets:
        rows = labels == s
        xs, ys = inputs[rows][:, in_units], values[rows][:, units]
        dx = pdist((xs - xs.mean()) / xs.std()) / np.sqrt(20)
        dy = pdist((ys - ys.mean()) / ys.std()) / np.sqrt(20)
        ref = stats.linregress(dx, dy)
        got = fit.sel(set=s, layer="block1_conv1")
        slack = 10 * DISTANCE_RTOL
        assert float(got.slope) == pytest.approx(ref.slope, rel=1e-6, abs=slack * dy.std() / dx.std())
        assert float(got.r) == pytest.approx(ref.rvalue, rel=1e-6, abs=slack)


def test_the_plan_serves_every_set_from_one_group_of_units(tree):
    from cnndiff_xr.analysis.collection import as_collection
    from cnndiff_xr.analysis.draws import draw_table, make_plan

    table = draw_table(as_collection(tree).layer("block1_conv1"), (5, 40), 3, unit_type="top", seed=0,
                       filter_dim="filter")
    assert table.n_draws == 2  # one draw per n_units: resamples share it
    means = np.random.default_rng(0).random(table.size)
    plan = make_plan(table, means)
    assert len(plan.units) == 1
    for d, n in enumerate((5, 40)):
        expected = np.sort(np.argsort(-means, kind="stable")[:n])
        for group in range(3):  # whatever set asks, the same units at the same columns
            np.testing.assert_array_equal(plan.draw(group, d), expected)
            np.testing.assert_array_equal(plan.union[plan.positions(group, d)], expected)


# --------------------------------------------------------------------------- laziness and reads
def test_building_top_computes_nothing(tree):
    with raise_if_dask_computes():
        d = cx.differentiation(tree, n_units=[12, 40], unit_type="top", resamples=2, sets=["cats", "random"])
        ratio = cx.normalise_by_reference(d, reference="cats")
        units = cx.select_units(tree, "block1_conv1", n_units=12, unit_type="top", sets=["cats", "random"])
        r = cx.rdm(tree, "block1_conv1", n_units=12, unit_type="top")
        fit = cx.rdm_regression(tree, n_units=12, unit_type="top")
    for obj in (d, ratio, units["flat_index"], r, fit.slope):
        assert isinstance(obj.data, da.Array)


@pytest.mark.parametrize("sets", [None, ["cats", "random"]], ids=["all-sets", "two-sets"])
def test_each_chunk_is_read_twice_at_most_whatever_the_sets(sets):
    t, raw = make_tree(counting=True, chunk=4)
    labels = np.asarray(t["block1_conv1"]["activation"]["set"].values).astype(str)
    selected = np.isin(labels, _set_names(sets))
    chunks_with_rows = len(np.unique(np.flatnonzero(selected) // 4))
    d = cx.differentiation(t, n_units=[5, 30], unit_type="top", resamples=3, sets=sets)
    for a in raw.values():
        a.reads = 0
    d.compute(scheduler="sync")
    # once for the means over all analysed images, once to gather: the same for every layer and draw
    assert {a.reads for a in raw.values()} == {2 * chunks_with_rows}
