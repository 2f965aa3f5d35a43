"""Differentiation: the median (or mean) pairwise distance per layer and image set.

The seed's measure (DESIGN.md section 2): per layer and per image set, the median of
the upper-triangle (i < j) distances between the images' vectors of ``n_units`` sampled
units, z-scored over the layer (``norm="layer"``) with Euclidean distance divided by
``sqrt(n_units)``. Several ``n_units`` values and ``resamples`` independent draws come
back as one lazy array; all of them are served by one read of each image chunk.

Median convention: for an even number of pairs the median is the mean of the two middle
values, as :func:`numpy.median`. Sets that fit in one row block (``block_size``) take
the exact median of their pairs in one task; sets whose pair distances fit in
``MEDIAN_IN_MEMORY_BYTES`` (64 MiB, all draws; about 2,900 images for one draw) collect
them and take :func:`numpy.median`. Larger sets use an exact two-pass radix
select over float32 bit patterns (non-negative floats order like their bit patterns):
pass 1 histograms the high 16 bits of every distance, pass 2 the low 16 bits of those
in the bins holding the middle ranks, recomputing the distance blocks instead of
keeping them; only a bounded block of the RDM exists at any time. The result is the
float32-rounded middle value(s), within 6e-8 relative of :func:`numpy.median` over the
float64 distances.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from .blocks import (
    ConstantPolicy,
    GroupBlocks,
    GroupStats,
    Metric,
    Norm,
    auto_block_size,
    build_groups,
    check_options,
    iter_distance_blocks,
    one_block_distances,
    rdm,
)
from .draws import (
    UNIT_TYPES,
    GraphBuilder,
    UnitType,
    UnknownLabelError,
    as_collection,
    check_choice,
    check_count,
    check_n_units,
    draw_table,
    sum_parts,
)

__all__ = [
    "REDUCTIONS",
    "differentiation",
    "rdm",
    "resample_summary",
    "normalise_by_reference",
    "stimulus_regression",
    "rdm_regression",
]

REDUCTIONS = ("median", "mean")
Reduction = Literal["median", "mean"]
_BINS = 1 << 16
#: a set whose pair distances (all draws, float64) fit in this many bytes takes the exact
#: median of the collected values; larger sets use the two-pass radix select
MEDIAN_IN_MEMORY_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- pair tasks
def _upper(values: np.ndarray, same: bool) -> np.ndarray:
    return values[np.triu_indices(values.shape[0], 1)] if same else values.ravel()


def _pair_values(block_a, block_b, stats, rows_a, rows_b, norm, metric):
    same = rows_a == rows_b
    for d, values in iter_distance_blocks(block_a, block_b, stats, rows_a, rows_b, norm, metric):
        yield d, _upper(values, same)


def _pair_upper_values(*args: Any) -> list[np.ndarray]:
    return [values for _, values in _pair_values(*args)]


def _median_of_parts(parts: list[list[np.ndarray]]) -> np.ndarray:
    return np.array([np.median(np.concatenate([p[d] for p in parts])) for d in range(len(parts[0]))])


def _pair_sum(block_a, block_b, stats: GroupStats, *rest: Any) -> np.ndarray:
    out = np.zeros(len(stats.m))
    for d, values in _pair_values(block_a, block_b, stats, *rest):
        out[d] = values.sum()
    return out


def _bits(values: np.ndarray) -> np.ndarray:
    # float64 -> float32 rounding is monotone, so ranks survive; +0.0 only (see distance_block)
    return values.astype(np.float32).view(np.uint32)


def _pair_hist_high(block_a, block_b, stats: GroupStats, *rest: Any) -> np.ndarray:
    out = np.zeros((len(stats.m), _BINS), dtype=np.int64)
    for d, values in _pair_values(block_a, block_b, stats, *rest):
        out[d] = np.bincount(_bits(values) >> 16, minlength=_BINS)
    return out


def _pair_hist_low(targets: np.ndarray, block_a, block_b, stats: GroupStats, *rest: Any) -> np.ndarray:
    """Per draw and middle rank: low-16-bit histogram within the target high bin, plus the
    count below that bin (counted here, so each pass is self-consistent)."""
    out = np.zeros((len(stats.m), 2, _BINS + 1), dtype=np.int64)
    for d, values in _pair_values(block_a, block_b, stats, *rest):
        bits = _bits(values)
        high = bits >> 16
        for t in range(2):
            if t == 1 and targets[d, 1] == targets[d, 0]:
                out[d, 1] = out[d, 0]
                continue
            inside = high == targets[d, t]
            out[d, t, :_BINS] = np.bincount(bits[inside] & 0xFFFF, minlength=_BINS)
            out[d, t, _BINS] = np.count_nonzero(high < targets[d, t])
    return out


def _middle_ranks(n_pairs: int) -> tuple[int, int]:
    return (n_pairs - 1) // 2, n_pairs // 2


def _median_targets(hist: np.ndarray, n_pairs: int) -> np.ndarray:
    ranks = np.array(_middle_ranks(n_pairs))
    return np.stack([np.searchsorted(np.cumsum(h), ranks + 1) for h in hist]).astype(np.uint32)


def _median_from_hist(hist: np.ndarray, targets: np.ndarray, n_pairs: int) -> np.ndarray:
    ranks = _middle_ranks(n_pairs)
    out = np.empty(hist.shape[0])
    for d in range(hist.shape[0]):
        middle = []
        for t in range(2):
            counts, below = hist[d, t, :_BINS], hist[d, t, _BINS]
            total = counts.sum()
            if total == 0:  # only if a value moved bins between the passes (non-deterministic BLAS)
                low = 0
            else:
                rank = int(np.clip(ranks[t] - below, 0, total - 1))
                low = int(np.searchsorted(np.cumsum(counts), rank + 1))
            bits = np.array([(int(targets[d, t]) << 16) | low], dtype=np.uint32)
            middle.append(float(bits.view(np.float32)[0]))
        out[d] = 0.5 * (middle[0] + middle[1])
    return out


def _one_task_output(index: np.ndarray, reduction: str, n_pairs: int, parts, positions, plan, group, n_draws: int,
                     *rest: Any) -> np.ndarray:
    """Median or mean of every draw of a group that fits one row block, straight into its
    output chunk: the whole group is one task."""
    out = np.empty(n_draws)
    upper = np.triu_indices(sum(rows.size for rows in positions), 1)  # the same pairs for every draw
    for d, values in one_block_distances(parts, positions, plan, group, n_draws, *rest):
        out[d] = _median(values[upper]) if reduction == "median" else values[upper].sum() / n_pairs
    return _expand(out, index)


def _median(values: np.ndarray) -> float:
    """``np.median`` of finite values, bit for bit, without its checks and copies (per draw of many small sets)."""
    k = values.size // 2
    if values.size % 2:
        return float(np.partition(values, k)[k])
    low, high = np.partition(values, (k - 1, k))[k - 1 : k + 1]
    return float(0.5 * (low + high))


def _mean(total: np.ndarray, n_pairs: int) -> np.ndarray:
    return total / n_pairs


def _expand(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Distinct-draw values -> one ``(1, 1, n_units, resample)`` output chunk."""
    return values[index][None, None]


def reduce_group(
    graph: GraphBuilder,
    group: GroupBlocks,
    n_draws: int,
    norm: str,
    metric: str,
    reduction: str,
    index: tuple,
) -> Any:
    """Add the reduction of one set of one layer that spans several row blocks; returns the key of its
    per-draw values (a set in one row block is a single task: :func:`_one_task_output`)."""
    n_pairs = group.n_pairs

    def pair_tasks(stage, func, *extra):
        return [
            graph.add(stage, (*index, a, b), func, *extra, group.blocks[a], group.blocks[b], group.stats,
                      group.bounds[a], group.bounds[b], norm, metric)
            for a, b in group.pairs()
        ]

    if reduction == "mean":
        total = graph.reduce("pair-sum-total", index, pair_tasks("pair-sum", _pair_sum), sum_parts)
        return graph.add("mean", index, _mean, total, n_pairs)
    if n_pairs * n_draws * 8 <= MEDIAN_IN_MEMORY_BYTES:
        return graph.add("median", index, _median_of_parts, pair_tasks("pair-values", _pair_upper_values))
    high = graph.reduce("hist-high-total", index, pair_tasks("hist-high", _pair_hist_high), sum_parts)
    targets = graph.add("median-targets", index, _median_targets, high, n_pairs)
    low = graph.reduce("hist-low-total", index, pair_tasks("hist-low", _pair_hist_low, targets), sum_parts)
    return graph.add("median", index, _median_from_hist, low, targets, n_pairs)


# --------------------------------------------------------------------------- public
def differentiation(
    tree: Any,
    n_units: int | Sequence[int] = (200, 10000),
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    reduction: Reduction = "median",
    resamples: int = 10,
    seed: int = 0,
    layers: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    *,
    sample_dim: str = "image",
    set_coord: str = "set",
    filter_dim: str = "filter",
    constant: ConstantPolicy = "raise",
    block_size: int | None = None,
) -> xr.DataArray:
    """Differentiation per set, layer, ``n_units`` and resample, as one lazy DataArray.

    Parameters
    ----------
    tree
        A store tree (``cx.open_activations(path)``), or any DataArray (or Dataset of
        them) with a sample dimension and feature dimensions, e.g. a neural recording's
        ``(state, unit, frequency)`` with ``sample_dim="state"``.
    n_units
        Units per draw (one or several values); all units of a layer when ``n_units`` is
        at least its size (the seed's rule). The seed used 200 and 10,000.
    unit_type
        ``"random"`` (the seed's), ``"top"`` (the units with the highest mean over the
        set's own images; the same for every resample), ``"per_filter"``, ``"all"``.
        See :func:`cnndiff_xr.sampling.draw_units`.
    norm, metric
        See :mod:`cnndiff_xr.distance`; the defaults are the seed's (one mean and SD over
        each set's images x sampled units, Euclidean / sqrt(m)).
    reduction
        ``"median"`` (the seed's) or ``"mean"`` of the i < j distances.
    resamples
        Independent unit draws per ``n_units`` value. Random draws do not depend on the
        set, so every set of a resample sees the same units.
    seed
        Base seed; draw ``(layer, n_units, r)`` uses
        :func:`cnndiff_xr.sampling.unit_seed`.
    layers, sets
        Subsets (default all, in network / sample order). Every analysed set needs at
        least 2 images.
    sample_dim, set_coord, filter_dim
        Names of the sample dimension, the set coordinate along it (without it all samples
        are one set, ``"all"``), and the filter dimension (for ``"per_filter"``).
    constant
        ``"raise"`` or ``"zero"``: what to do with constant vectors where ``norm``/``metric``
        leave them undefined (see :mod:`cnndiff_xr.distance`).
    block_size
        Images per distance block (default: sized so a gathered block is ~64 MB). Sets
        larger than one block use the exact two-pass radix-select median.

    Returns
    -------
    xarray.DataArray
        ``differentiation`` with dims ``(set, layer, n_units, resample)``; coordinates
        ``n_units_used`` (layer, n_units), ``layer_size``, ``layer_index`` and ``n_images``.
        Dask-backed: building it computes nothing.

    Notes
    -----
    Each image chunk of a layer is read by one task that gathers the units of every
    draw; row blocks of the gathered units then feed per-block-pair Gram tasks. Peak
    memory per layer is about ``n_images x (union of sampled units) x itemsize`` for the
    gathered matrix plus one Gram block per task. ``"top"`` reads each chunk twice: once
    for the unit means, once to gather.
    """
    check_options(norm, metric, constant)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    n_list = check_n_units(n_units)
    resamples = check_count("resamples", resamples, 1)
    seed = check_count("seed", seed, 0)
    if block_size is not None:
        block_size = check_count("block_size", block_size, 2)
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    layer_names = coll.layer_names(layers)
    groups = coll.rows(sets, min_size=2)

    token = tokenize(
        [coll.layer(name).data.name for name in layer_names], groups, n_list, unit_type, norm, metric, reduction,
        resamples, seed, filter_dim, constant, block_size,
    )
    graph = GraphBuilder(f"differentiation-{token}")
    n_used, sizes = [], []
    for li, name in enumerate(layer_names):
        layer = coll.layer(name)
        table = draw_table(layer, n_list, resamples, unit_type, seed, filter_dim)
        blocks = build_groups(graph, coll, layer, groups, table, norm=norm, metric=metric, constant=constant,
                                    block_size=block_size, index=(li,))
        for g, group in enumerate(blocks):
            if group.one_task:  # a single task from the gathered chunks to the output chunk
                graph.output((g, li, 0, 0), _one_task_output, table.index, reduction, group.n_pairs, *group.one_task)
            else:
                values = reduce_group(graph, group, len(table.keys), norm, metric, reduction, (li, g))
                graph.output((g, li, 0, 0), _expand, values, table.index)
        n_used.append(table.n_used)
        sizes.append(layer.size)
    data = graph.array(((1,) * len(groups), (1,) * len(layer_names), (len(n_list),), (resamples,)), np.float64)
    all_names = list(coll.layers)
    return xr.DataArray(
        data,
        dims=("set", "layer", "n_units", "resample"),
        coords={
            "set": list(groups),
            "layer": layer_names,
            "n_units": list(n_list),
            "resample": np.arange(resamples),
            "n_units_used": (("layer", "n_units"), np.array(n_used, dtype=np.int64)),
            "layer_size": ("layer", np.array(sizes, dtype=np.int64)),
            "layer_index": ("layer", np.array([all_names.index(n) for n in layer_names])),
            "n_images": ("set", np.array([rows.size for rows in groups.values()])),
        },
        name="differentiation",
        attrs={
            "unit_type": unit_type,
            "norm": norm,
            "metric": metric,
            "reduction": reduction,
            "seed": seed,
            "constant": constant,
            "median_convention": "mean of the two middle values for an even number of pairs (numpy.median)",
        },
    )


def resample_summary(
    d: xr.DataArray, interval: float = 0.95, dim: str = "resample", ddof: int = 1
) -> xr.Dataset:
    """Mean, SD and central percentile interval over resamples (lazy if ``d`` is).

    Parameters
    ----------
    d
        Output of :func:`differentiation` (or anything with ``dim``).
    interval
        Width of the central interval, e.g. 0.95 for the 2.5th-97.5th percentiles
        (linear interpolation, as :func:`numpy.percentile`).
    ddof
        Delta degrees of freedom of the SD (1: sample SD; NaN with a single resample).

    Returns
    -------
    xarray.Dataset
        ``mean``, ``sd``, ``lower``, ``upper`` without ``dim``.
    """
    if isinstance(interval, bool) or not isinstance(interval, (int, float, np.floating)) or not 0 < interval < 1:
        raise ValueError(f"interval must be a number in (0, 1), e.g. 0.95, got interval={interval!r}")
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative int, got ddof={ddof!r}")
    if dim not in d.dims:
        raise UnknownLabelError(f"unknown dimension {dim!r}; d has dims {d.dims}")
    d = _one_chunk(d)
    q = [(1 - interval) / 2, (1 + interval) / 2]
    bounds = d.quantile(q, dim=dim)
    return xr.Dataset(
        {
            "mean": d.mean(dim),
            "sd": d.std(dim, ddof=ddof),
            "lower": bounds.isel(quantile=0, drop=True),
            "upper": bounds.isel(quantile=1, drop=True),
        },
        attrs={"interval": interval, "ddof": ddof, **d.attrs},
    )


def normalise_by_reference(
    d: xr.DataArray, reference: str = "white_noise", dim: str = "set", drop: bool = False
) -> xr.DataArray:
    """Divide every set's differentiation by a reference set's, per layer and draw.

    The seed divided by white noise ("normalising by spontaneous activity"). With
    ``unit_type="random"`` a resample uses the same units in every set, so the ratio is
    taken per draw; summarise afterwards with :func:`resample_summary`.
    """
    if dim not in d.dims:
        raise UnknownLabelError(f"unknown dimension {dim!r}; d has dims {d.dims}")
    known = [str(v) for v in d[dim].values]
    if reference not in known:
        raise UnknownLabelError(f"unknown reference {dim} {reference!r}; d has {dim}s {known}")
    out = d / d.sel({dim: reference}, drop=True)
    if drop:
        out = out.drop_sel({dim: reference})
    out.name = f"{d.name or 'differentiation'}_by_{reference}"
    out.attrs = {**d.attrs, "reference": reference}
    return out


def _one_chunk(d: xr.DataArray) -> xr.DataArray:
    # results are small; one chunk keeps the xarray arithmetic below to a handful of tasks
    # (rechunk the data only: .chunk() would also turn the small coordinates into dask arrays)
    return d.copy(data=d.data.rechunk(-1)) if isinstance(d.data, da.Array) else d


def _p_value(r: np.ndarray, n: int) -> np.ndarray:
    from scipy import stats

    df = n - 2
    if df < 1:
        return np.full(np.shape(r), np.nan)
    r = np.clip(np.asarray(r, dtype=np.float64), -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / ((1.0 - r) * (1.0 + r)))
    return 2 * stats.t.sf(np.abs(t), df)


def _regression(sx: Any, sy: Any, sxx: Any, syy: Any, sxy: Any, n: Any) -> dict[str, Any]:
    """Least squares from sums (``sx``, ``sy``) and centred sums of products; slope, intercept, r, r2."""
    slope = sxy / sxx
    r = sxy / np.sqrt(sxx * syy)
    return {"slope": slope, "intercept": sy / n - slope * sx / n, "r": r, "r2": r * r}


def _input_layer(layers: Sequence[str], input_layer: str | None) -> str:
    if input_layer is None:
        return "input_layer" if "input_layer" in layers else layers[0]
    if input_layer not in layers:
        raise UnknownLabelError(f"unknown input layer {input_layer!r}; have layers {list(layers)}")
    return input_layer


def stimulus_regression(d: xr.DataArray, input_layer: str | None = None, dim: str = "set") -> xr.Dataset:
    """Across stimulus sets, regress each layer's differentiation on the input layer's.

    Parameters
    ----------
    d
        :func:`differentiation` output (optionally averaged over ``resample`` first).
    input_layer
        The regressor layer: the model input, ``"input_layer"`` (default when present,
        else the first layer). The seed regressed on block1_conv1 by mistake.
    dim
        The dimension the regression runs along.

    Returns
    -------
    xarray.Dataset
        ``slope``, ``intercept``, ``r``, ``r2``, ``p`` (two-sided, t with n - 2 df, as
        :func:`scipy.stats.linregress`; NaN with fewer than 3 sets) for every remaining
        coordinate (layer, n_units, resample). A constant regressor gives NaN.
    """
    if dim not in d.dims:
        raise UnknownLabelError(f"unknown dimension {dim!r}; d has dims {d.dims}")
    n = d.sizes[dim]
    if n < 2:
        raise ValueError(f"stimulus_regression needs at least 2 {dim}s, got {n}")
    source = _input_layer([str(v) for v in d["layer"].values], input_layer)
    d = _one_chunk(d)
    x = d.sel(layer=source, drop=True)
    xc, yc = x - x.mean(dim), d - d.mean(dim)
    fit = _regression(x.sum(dim), d.sum(dim), (xc * xc).sum(dim), (yc * yc).sum(dim), (xc * yc).sum(dim), n)
    fit["p"] = xr.apply_ufunc(_p_value, fit["r"], kwargs={"n": n}, dask="parallelized", output_dtypes=[float])
    return xr.Dataset(fit, attrs={"input_layer": source, "n": n, "dim": dim})


def _pair_regression_sums(x_a, x_b, x_stats, y_a, y_b, y_stats, rows_a, rows_b, norm, metric) -> np.ndarray:
    """Sums of x, y, x^2, y^2, xy over the i < j pairs of a block pair (x: input layer)."""
    same = rows_a == rows_b
    ((_, dx),) = iter_distance_blocks(x_a, x_b, x_stats, rows_a, rows_b, norm, metric, [0])
    ((_, dy),) = iter_distance_blocks(y_a, y_b, y_stats, rows_a, rows_b, norm, metric, [0])
    x, y = _upper(dx, same), _upper(dy, same)
    return np.array([x.sum(), y.sum(), x @ x, y @ y, x @ y])


def _fit_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    """``(1, 1, 6)``: slope, intercept, r, r2, p, n from sums over n pairs."""
    sx, sy, sxx, syy, sxy = sums
    cxx, cyy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = cxy / cxx
        r = np.clip(cxy / np.sqrt(cxx * cyy), -1.0, 1.0)
    return np.array([slope, (sy - slope * sx) / n, r, r * r, float(_p_value(r, n)), n])[None, None]


def rdm_regression(
    tree: Any,
    n_units: int = 10000,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    seed: int = 0,
    resample: int = 0,
    layers: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    *,
    input_layer: str | None = None,
    sample_dim: str = "image",
    set_coord: str = "set",
    filter_dim: str = "filter",
    constant: ConstantPolicy = "raise",
    block_size: int | None = None,
) -> xr.Dataset:
    """Per set and layer, regress the layer's RDM upper triangle on the input layer's.

    The RDMs are those of :func:`cnndiff_xr.rdm` for each set (same draws and
    normalisation). Sums over the i < j pairs are accumulated block pair by block pair,
    so the RDMs are never held whole; each layer's chunks are read once for all sets.
    ``p`` (two-sided, as :func:`scipy.stats.linregress`) treats the pairs as independent,
    which they are not: a nominal value.

    Returns
    -------
    xarray.Dataset
        ``slope``, ``intercept``, ``r``, ``r2``, ``p``, ``n_pairs`` with dims (set, layer),
        lazy.
    """
    check_options(norm, metric, constant)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    (n,) = check_n_units(n_units)
    seed = check_count("seed", seed, 0)
    resample = check_count("resample", resample, 0)
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    layer_names = coll.layer_names(layers)
    source = _input_layer(list(coll.layers), input_layer)
    groups = coll.rows(sets, min_size=3)
    tables = {
        name: draw_table(coll.layer(name), (n,), [resample], unit_type, seed, filter_dim)
        for name in dict.fromkeys([source, *layer_names])
    }
    if block_size is None:  # one row partition for every layer, so blocks pair up
        block_size = min(auto_block_size(t.n_used[0], coll.layer(k).data.dtype.itemsize) for k, t in tables.items())
    else:
        block_size = check_count("block_size", block_size, 2)
    token = tokenize([coll.layer(k).data.name for k in tables], groups, tables, norm, metric, constant, block_size)
    graph = GraphBuilder(f"rdm-regression-{token}")
    built = {}
    for li, (name, table) in enumerate(tables.items()):
        built[name] = build_groups(graph, coll, coll.layer(name), groups, table, norm=norm, metric=metric,
                                   constant=constant, block_size=block_size, index=(li,))
    x_groups = built[source]
    for li, name in enumerate(layer_names):
        y_groups = built[name]
        for g, (xg, yg) in enumerate(zip(x_groups, y_groups)):
            parts = [
                graph.add("pair-regression", (li, g, a, b), _pair_regression_sums,
                          xg.blocks[a], xg.blocks[b], xg.stats, yg.blocks[a], yg.blocks[b], yg.stats,
                          xg.bounds[a], xg.bounds[b], norm, metric)
                for a, b in xg.pairs()
            ]
            total = graph.reduce("regression-sums", (li, g), parts, sum_parts)
            graph.output((g, li, 0), _fit_from_sums, total, xg.n * (xg.n - 1) // 2)
    fits = graph.array(((1,) * len(groups), (1,) * len(layer_names), (6,)), np.float64)
    fits = fits.rechunk((len(groups), len(layer_names), 6))
    coords = {"set": list(groups), "layer": layer_names}
    names = ("slope", "intercept", "r", "r2", "p", "n_pairs")
    variables = {k: (("set", "layer"), fits[..., i]) for i, k in enumerate(names)}
    variables["n_pairs"] = (("set", "layer"), fits[..., 5].astype(np.int64))
    attrs = {"input_layer": source, "n_units": n, "unit_type": unit_type, "norm": norm, "metric": metric,
             "seed": seed, "resample": resample}
    return xr.Dataset(variables, coords=coords, attrs=attrs)
