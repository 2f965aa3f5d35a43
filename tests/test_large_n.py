"""Large sets (issue 15): the exact one-pass median (its window and its fallback) against numpy, and the draws of a
layer in groups that fit a memory budget, with the same numbers as all draws at once."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import CountingArray, raise_if_dask_computes, reference_distances, synchronous
from dask.base import tokenize
from scipy.spatial.distance import pdist, squareform

import cnndiff_xr as cx
from cnndiff_xr.analysis import blocks, gram, median
from cnndiff_xr.analysis import differentiation as diff
from cnndiff_xr.analysis.collection import as_collection
from cnndiff_xr.analysis.draws import draw_table, make_plan
from cnndiff_xr.analysis.metrics import DISTANCES
from cnndiff_xr.validation import ParameterValueError


def _array(x: np.ndarray, chunk: int, sets: np.ndarray | None = None, name: str = "big") -> xr.DataArray:
    coords = {} if sets is None else {"set": ("image", sets)}
    return xr.DataArray(da.from_array(x, chunks=(chunk, x.shape[1])), dims=("image", "unit"), coords=coords,
                        name=name)


def _stages(d: xr.DataArray) -> set[str]:
    return {str(k[0] if isinstance(k, tuple) else k).split("-differentiation-")[0]
            for k in dict(d.data.__dask_graph__())}


@pytest.fixture
def window_path(monkeypatch):
    """Every set that spans several row blocks takes the one-pass window (none is collected)."""
    monkeypatch.setattr(median, "MEDIAN_IN_MEMORY_BYTES", 0)


# --------------------------------------------------------------------------- exact median at >= 6,000 images
@pytest.mark.parametrize("n", [6000, 6002])  # 17,997,000 pairs (even) and 18,009,001 (odd)
def test_exact_median_of_6000_images_against_numpy(n, monkeypatch):
    """The default path of a 6,000-image set (3 row blocks, 18 million pairs: too many to collect) against numpy's
    median of scipy's pdist; and bit for bit np.median of the same float64 distances collected."""
    rng = np.random.default_rng(n)
    x = np.maximum(rng.normal(size=(n, 12)), 0).astype(np.float32)
    x[:, :6] = np.round(x[:, :6] * 2) / 2  # quantised units: many tied distances
    arr = _array(x, 1000)
    d = cx.differentiation(arr, n_units=12, resamples=1)
    assert "median-window" in _stages(d)
    got = float(d.squeeze())
    expected = float(np.median(reference_distances(x, "layer", "euclidean")))
    assert abs(got - expected) <= 1e-7 * expected, (got, expected)
    monkeypatch.setattr(median, "MEDIAN_IN_MEMORY_BYTES", 2**40)  # the same distances, all collected
    collected = cx.differentiation(arr, n_units=12, resamples=1)
    assert "median-window" not in _stages(collected)
    assert float(collected.squeeze()) == got


# --------------------------------------------------------------------------- the window and its fallback
def _medium(seed: int = 1, n: int = 701, m: int = 60) -> xr.DataArray:
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=(n, m)), 0).astype(np.float32)
    x[:, :20] = np.round(x[:, :20])
    x[3] = x[4]  # a duplicate image: distance 0, redone in float64
    return _array(x, 100)


OPTIONS = dict(n_units=[30, 60], resamples=3, block_size=120)


class Calls:
    """Counts the fallback's pair tasks that compute something."""

    def __init__(self, monkeypatch):
        self.worked = 0
        original = median._pair_fallback_hist

        def counting(block_a, *args):
            self.worked += block_a is not None
            return original(block_a, *args)

        monkeypatch.setattr(median, "_pair_fallback_hist", counting)


def test_window_path_equals_collected_bit_for_bit(monkeypatch):
    arr = _medium()
    collected = cx.differentiation(arr, **OPTIONS)
    assert "median-window" not in _stages(collected)
    monkeypatch.setattr(median, "MEDIAN_IN_MEMORY_BYTES", 0)
    calls = Calls(monkeypatch)
    windowed = cx.differentiation(arr, **OPTIONS)
    assert "median-window" in _stages(windowed)
    np.testing.assert_array_equal(windowed.values, collected.values)
    assert calls.worked == 0  # the window held every middle rank: the fallback computed nothing


@pytest.mark.parametrize("bad", [(0.0, 0.0), (1e9, 2e9), (-np.inf, 1e-9), (np.inf, np.inf), (0.5, 0.5),
                                 (1.0, 1.0001)])
def test_fallback_after_a_window_that_misses_agrees_exactly(bad, window_path, monkeypatch):
    arr = _medium()
    good = cx.differentiation(arr, **OPTIONS).values
    calls = Calls(monkeypatch)
    monkeypatch.setattr(median, "estimate_window", lambda *args: bad)
    forced = cx.differentiation(arr, **OPTIONS).values
    np.testing.assert_array_equal(forced, good)
    assert calls.worked > 0


def test_some_draws_missed_others_held(window_path, monkeypatch):
    """A window that misses for every other draw: the fallback computes those, the others keep the window's."""
    arr = _medium(seed=2, n=650)
    good = cx.differentiation(arr, **OPTIONS).values
    original, count = median.estimate_window, iter(range(10**6))

    def alternate(*args):
        return original(*args) if next(count) % 2 else (0.0, 0.0)

    monkeypatch.setattr(median, "estimate_window", alternate)
    np.testing.assert_array_equal(cx.differentiation(arr, **OPTIONS).values, good)


@pytest.mark.parametrize("norm, metric", [("image", "correlation"), ("layer", "cosine"), ("none", "cosine")])
def test_window_and_fallback_for_other_distances(norm, metric, monkeypatch):
    arr = _medium(seed=3, n=500)
    options = dict(OPTIONS, norm=norm, metric=metric, constant="zero")
    collected = cx.differentiation(arr, **options).values
    monkeypatch.setattr(median, "MEDIAN_IN_MEMORY_BYTES", 0)
    np.testing.assert_array_equal(cx.differentiation(arr, **options).values, collected)
    monkeypatch.setattr(median, "estimate_window", lambda *args: (0.3, 0.3))
    np.testing.assert_array_equal(cx.differentiation(arr, **options).values, collected)


def test_massive_ties_are_counted_not_kept(monkeypatch):
    """Binary vectors under norm="none": every distance is one of 13 values, most pairs tie with the median. The
    window's ends then sit on tied values, counted instead of kept; the result is np.median's."""
    rng = np.random.default_rng(4)
    x = (rng.random((900, 12)) < 0.5).astype(np.float32)
    arr = _array(x, 150)
    collected = cx.differentiation(arr, n_units=12, norm="none", resamples=1, block_size=200)
    expected = np.median(reference_distances(x, "none", "euclidean"))
    assert float(collected.squeeze()) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(median, "MEDIAN_IN_MEMORY_BYTES", 0)
    kept = []
    original = median._pair_window

    def recording(*args):
        part = original(*args)
        kept.append(sum(v.size for v in part.inside))
        return part

    monkeypatch.setattr(median, "_pair_window", recording)
    windowed = cx.differentiation(arr, n_units=12, norm="none", resamples=1, block_size=200)
    assert float(windowed.squeeze()) == float(collected.squeeze())
    assert sum(kept) < 0.01 * 900 * 899 / 2


def test_window_holds_the_median_of_clustered_sets():
    """Sets of two or three clusters of images: rows differ a lot in their share of small distances, and the
    window widens with that spread (the U-statistic's variance) so that it still holds the middle ranks."""
    rng = np.random.default_rng(5)
    for trial in range(12):
        k = 2 + trial % 2
        n = 1500
        centres = rng.normal(scale=3.0, size=(k, 20))
        labels = rng.choice(k, n, p=rng.dirichlet(np.ones(k)))
        x = centres[labels] + rng.normal(size=(n, 20))
        full = reference_distances(x, "none", "euclidean")
        middle = np.sort(full)[[(full.size - 1) // 2, full.size // 2]]
        rows = median.window_sample_rows(n)
        sample = squareform(pdist(x[rows])) / np.sqrt(20)
        lo, hi = median.estimate_window(sample, full.size, capacity=full.size)
        assert lo <= middle[0] and middle[1] <= hi, (trial, lo, middle, hi)
        assert np.mean((full >= lo) & (full <= hi)) < 0.5


def test_window_is_narrowed_to_its_capacity():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(600, 10))
    sample = squareform(pdist(x))
    n_pairs = 10**8
    lo, hi = median.estimate_window(sample, n_pairs, capacity=n_pairs)
    lo_capped, hi_capped = median.estimate_window(sample, n_pairs, capacity=n_pairs // 1000)
    assert lo < lo_capped <= hi_capped < hi
    upper = sample[np.triu_indices(600, 1)]
    assert np.mean((upper >= lo_capped) & (upper <= hi_capped)) < 0.003


@pytest.mark.parametrize("same", [True, False])
def test_unsure_pairs_are_the_bounds_mask(same, monkeypatch):
    """unsure_pairs skips the strips without nearly parallel vectors: its mask must still be exactly the bound's,
    on vectors whose cosines cover [-1, 1] (around both bounds' thresholds) and near-duplicates."""
    monkeypatch.setattr(gram, "STRIP_BYTES", 2**11)
    rng = np.random.default_rng(10)
    n, m = 400, 300
    base = rng.normal(size=m)
    mix = np.concatenate([rng.uniform(-1, 1, n - 40), 1 - rng.uniform(0, 1e-3, 40)])
    x = mix[:, None] * base + np.sqrt(1 - mix**2)[:, None] * rng.normal(size=(n, m))
    x[7] = x[8] * 3.0
    x[9] = 0.0
    x = x.astype(np.float32)
    half = n // 2
    xa, xb = (x, None) if same else (x[:half], x[half:])
    g, norms_a, norms_b = gram.gram(xa, xb, gram.Shift(), gram.Shift())
    for bound in (gram.euclidean_error_bound, gram.similarity_error_bound):
        expected = bound(g, norms_a, norms_b) > gram.DISTANCE_RTOL
        if same:
            np.fill_diagonal(expected, False)
        assert expected.any() and not expected.all()
        np.testing.assert_array_equal(gram.unsure_pairs(g, norms_a, norms_b, bound, same=same), expected)


def test_strips_give_the_pair_values_bit_for_bit(monkeypatch):
    """iter_upper_strips (the median's kernel) and iter_pair_values (the mean's and the RDM's) give the same
    numbers, near-duplicate rows (their float64 redo) and degenerate rows included, for every distance."""
    monkeypatch.setattr(gram, "STRIP_BYTES", 2**12)  # many strips, ragged last ones
    rng = np.random.default_rng(0)
    n, m = 300, 700
    x = np.maximum(rng.normal(0.3, 1, (n, m)), 0).astype(np.float32)
    x[5] = x[6]
    x[7] = x[6] + 1e-6
    x[100] = x[250] * (1 + 1e-7)
    x[20] = 0.0
    stats_row = blocks._row_stats_task([x], 1)
    bounds = [(0, 120), (120, 300)]
    for key, spec in DISTANCES.items():
        mean, sd, degenerate = blocks.check_rows(stats_row.stats[0], m, spec, "zero", layer="l", group="g",
                                                 names=np.arange(n))
        stats = blocks.GroupStats(spec, np.array([m]), stats_row.stats, np.array([mean]), np.array([sd]),
                                  degenerate[None], (stats_row.column_sums[0] / n,))
        for a, b in [(0, 0), (0, 1), (1, 1)]:
            pair = blocks.BlockPair(bounds[a], bounds[b])
            block_a, block_b = [x[slice(*bounds[a])]], [x[slice(*bounds[b])]]
            reference = np.concatenate([v for _, v in blocks.iter_pair_values(block_a, block_b, stats, pair)])
            strips = np.concatenate([v.ravel() for _, v in blocks.iter_upper_strips(block_a, block_b, stats, pair)])
            np.testing.assert_array_equal(np.sort(strips), np.sort(reference), err_msg=str((key, a, b)))


# --------------------------------------------------------------------------- draws in groups under a budget
def _layer(seed: int = 7, n: int = 330, units: int = 2000, counting: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.random((n, units), dtype=np.float32)
    x[:40] += rng.random((40, 1), dtype=np.float32)  # some images brighter than others
    sets = np.repeat(["small", "large", "medium"], [30, 220, 80])
    raw = CountingArray(x) if counting else x
    data = da.from_array(raw, chunks=(50, units))
    arr = xr.DataArray(data, dims=("image", "unit"), coords={"set": ("image", sets)}, name="layer")
    return arr, raw


GROUPED = dict(n_units=[60, 500], resamples=4, block_size=64)


def _budget(arr: xr.DataArray, units: int) -> int:
    """A budget that fits ``units`` gathered units of every analysed image (float32: chunk and row block)."""
    return arr.shape[0] * 8 * units


def test_grouped_draws_equal_ungrouped_and_read_once_per_group(window_path):
    arr, raw = _layer(counting=True)
    whole = cx.differentiation(arr, **GROUPED)
    with dask.config.set({diff.MEMORY_CONFIG: _budget(arr, 1000)}):
        grouped = cx.differentiation(arr, **GROUPED)
    table = draw_table(as_collection(arr).layer("layer"), [60, 500], 4, unit_type="random", seed=0,
                       filter_dim="filter")
    ranges = diff.draw_groups(table, 330, np.dtype(np.float32), _budget(arr, 1000))
    assert len(ranges) >= 3 and ranges[0][0] == 0 and ranges[-1][1] == table.n_draws
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    plan = make_plan(table)
    for lo, hi in ranges:  # each group's union fits, unless it is a single draw
        union = np.unique(np.concatenate([plan.draw(0, d) for d in range(lo, hi)]))
        assert union.size <= 1000 or hi - lo == 1
    raw.reads = 0
    whole_values = whole.values
    assert raw.reads == 7  # one read of each chunk
    raw.reads = 0
    grouped_values = grouped.values
    assert raw.reads == 7 * len(ranges)
    np.testing.assert_array_equal(grouped_values, whole_values)  # bit for bit
    xr.testing.assert_identical(grouped.compute(), whole.compute())


@pytest.mark.parametrize("kwargs", [dict(reduction="mean"), dict(unit_type="per_filter"), dict(block_size=None),
                                    dict(unit_type="top")])
def test_grouping_gives_identical_numbers(kwargs):
    arr, _ = _layer(seed=8)
    if kwargs.get("unit_type") == "per_filter":
        arr = arr.rename(unit="filter")
    options = dict(GROUPED, **kwargs)
    whole = cx.differentiation(arr, **options).values
    with dask.config.set({diff.MEMORY_CONFIG: _budget(arr, 700)}):
        grouped = cx.differentiation(arr, **options)
    np.testing.assert_array_equal(grouped.values, whole)


def test_top_draws_and_single_draws_are_one_group():
    arr, _ = _layer()
    layer = as_collection(arr).layer("layer")
    for unit_type, n_units, resamples in [("top", [60, 500], 4), ("random", [1500], 1), ("all", [60], 3)]:
        table = draw_table(layer, n_units, resamples, unit_type=unit_type, seed=0, filter_dim="filter")
        assert diff.draw_groups(table, 330, np.dtype(np.float32), 1) == [(0, table.n_draws)]


def test_grouped_graph_keys_are_deterministic_and_distinct():
    arr, _ = _layer()
    small = {diff.MEMORY_CONFIG: _budget(arr, 1000)}
    with dask.config.set(small):
        a = cx.differentiation(arr, **GROUPED)
        b = cx.differentiation(arr, **GROUPED)
    whole = cx.differentiation(arr, **GROUPED)
    assert dict(a.data.__dask_graph__()).keys() == dict(b.data.__dask_graph__()).keys()
    assert a.data.name == b.data.name != whole.data.name
    ga, gw = dict(a.data.__dask_graph__()), dict(whole.data.__dask_graph__())
    assert not [k for k in ga.keys() & gw.keys() if tokenize(ga[k]) != tokenize(gw[k])]
    together = dask.compute(a, whole)
    np.testing.assert_array_equal(together[0].values, together[1].values)


def test_draw_groups_run_one_after_another():
    """dask's ordering gives each draw group's tasks a run of consecutive priorities (the schedulers run ready tasks
    in that order), so one group's row blocks are released before the next group's are gathered: what keeps the
    memory to about one group's. A dask release that interleaved them would fail here."""
    arr, _ = _layer()
    with dask.config.set({diff.MEMORY_CONFIG: _budget(arr, 1000)}):
        d = cx.differentiation(arr, **GROUPED)
    (optimized,) = dask.optimize(d.data)
    priorities: dict[int, list[int]] = {}
    for key, p in dask.order.order(dict(optimized.__dask_graph__())).items():
        if isinstance(key, tuple) and "-differentiation-" in str(key[0]) and len(key) >= 4:
            priorities.setdefault(key[2], []).append(getattr(p, "priority", p))
    spans = sorted((min(v), max(v)) for v in priorities.values())
    assert len(spans) >= 3
    assert all(a[1] < b[0] for a, b in zip(spans[:-1], spans[1:], strict=True)), spans


def test_building_grouped_graphs_computes_nothing():
    arr, _ = _layer()
    with raise_if_dask_computes(), dask.config.set({diff.MEMORY_CONFIG: _budget(arr, 600)}):
        d = cx.differentiation(arr, **GROUPED)
        cx.differentiation(arr, n_units=[60, 500], resamples=4, unit_type="top")
    assert isinstance(d.data, da.Array)


def test_analysis_memory_setting():
    with dask.config.set({diff.MEMORY_CONFIG: None}):
        assert diff.analysis_memory() == diff.DEFAULT_ANALYSIS_MEMORY == 3 * 2**30
    with dask.config.set({diff.MEMORY_CONFIG: "auto"}):
        assert diff.analysis_memory() == diff.DEFAULT_ANALYSIS_MEMORY
    with dask.config.set({diff.MEMORY_CONFIG: "1.5GiB"}):
        assert diff.analysis_memory() == 3 * 2**29
    with dask.config.set({diff.MEMORY_CONFIG: 10**9}):
        assert diff.analysis_memory() == 10**9
    for bad in ("lots", 0, -5, [1]):
        with dask.config.set({diff.MEMORY_CONFIG: bad}), pytest.raises(ParameterValueError,
                                                                        match="cnndiff_xr.analysis-memory"):
            cx.differentiation(_layer()[0], n_units=10, resamples=1)


def test_budget_follows_the_worker_memory_limit_on_a_cluster(local_client):
    """With a distributed Client, a share of the smallest worker memory limit; the grouped graph computed on the
    cluster gives the numbers of the threaded scheduler."""
    limits = [w["memory_limit"] for w in local_client.scheduler_info(n_workers=-1)["workers"].values()]
    with dask.config.set(scheduler=local_client):
        assert diff.analysis_memory() == int(min(limits) * diff.WORKER_MEMORY_SHARE)
    with dask.config.set(scheduler="sync"):
        assert diff.analysis_memory() == diff.DEFAULT_ANALYSIS_MEMORY
    # in a task on a worker: that worker's own limit
    assert local_client.submit(diff.analysis_memory, pure=False).result() == int(limits[0] * diff.WORKER_MEMORY_SHARE)
    arr, _ = _layer(seed=9)
    with dask.config.set({diff.MEMORY_CONFIG: _budget(arr, 1000)}):
        grouped = cx.differentiation(arr, **GROUPED)
    on_cluster = local_client.compute(grouped, sync=True)
    # the workers run one BLAS thread (WORKER_ENV), this process several: float32 products tile differently, and
    # distances differ in the last bits (each within DISTANCE_RTOL of float64)
    np.testing.assert_allclose(on_cluster.values, grouped.values, rtol=1e-8)
