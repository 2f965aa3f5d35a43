"""Pairwise distances and RDMs from Gram matrices, on dask.

Every distance is computed from a Gram block ``G = X_a @ X_b.T`` (float64, of vectors
shifted by their mean so that nothing cancels; see :func:`shift_rows`) and per-row
statistics (sum, centred sum of squares, sum of squares, min, max), never from per-pair
difference vectors. Normalisations (DESIGN.md section 2):

* ``norm="layer"`` (default, the seed's): one mean and one SD (ddof=0, as ``np.std``)
  over the whole (images x sampled units) matrix of the analysed images, so
  ``D_ij = ||x_i - x_j|| / (sd * sqrt(m))``;
* ``norm="image"``: z-score each image's vector, so ``D_ij = sqrt(2 (1 - r_ij))``;
* ``norm="none"``: ``D_ij = ||x_i - x_j|| / sqrt(m)``.

Metrics: ``"euclidean"`` (divided by ``sqrt(m)``: the seed's "mean distance per
dimension"), ``"correlation"`` (``1 - r``, scipy's definition; unchanged by any of the
norms) and ``"cosine"`` (of the normalised vectors; equals correlation under "image").

Degenerate vectors. Where a normalised vector is undefined or zero -- a constant image
vector under ``norm="image"`` or ``metric="correlation"``, an all-zero vector under
cosine/"none", a vector equal to the layer mean under cosine/"layer" -- the default
``constant="raise"`` raises a ``ValueError`` naming the layer, set and images when the
statistics are computed. ``constant="zero"`` instead takes the normalised vector to be
zero (scikit-learn's convention for cosine): its similarity to every other image is 0,
so correlation/cosine distance 1, and euclidean/"image" distance 1 to a non-constant
image and 0 to another constant one. Under euclidean/"layer", a layer whose sampled
values are all equal (sd = 0) has every distance 0 (the vectors are identical); that is
exact, so it never raises. Non-finite activations always raise. Distances are never NaN.

Chunking. The units of every draw of a layer are gathered from each image chunk in one
task (one read of the chunk for all resamples and ``n_units`` values), then images are
regrouped into row blocks of at most ``block_size`` images; a task per pair of row
blocks computes the Gram blocks of all draws, so memory per task stays bounded whatever
the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import xarray as xr
from dask.base import tokenize

from .sampling import (
    UNIT_TYPES,
    Collection,
    DrawTable,
    GraphBuilder,
    LayerData,
    UnitPlan,
    UnitType,
    as_collection,
    block_keys,
    check_choice,
    check_completed,
    check_count,
    check_n_units,
    draw_table,
    plan_for,
)

__all__ = ["NORMS", "METRICS", "CONSTANT_POLICIES", "pairwise_distances", "rdm"]

NORMS = ("layer", "image", "none")
METRICS = ("euclidean", "correlation", "cosine")
CONSTANT_POLICIES = ("raise", "zero")
Norm = Literal["layer", "image", "none"]
Metric = Literal["euclidean", "correlation", "cosine"]
ConstantPolicy = Literal["raise", "zero"]

#: target size of one gathered row block (images x union of sampled units)
ROW_BLOCK_BYTES = 64 * 2**20
MIN_BLOCK, MAX_BLOCK = 32, 2048
# rows of the per-row statistics array
_S, _CSS, _Q, _MIN, _MAX = range(5)


def check_options(norm: str, metric: str, constant: str) -> None:
    check_choice("norm", norm, NORMS)
    check_choice("metric", metric, METRICS)
    check_choice("constant", constant, CONSTANT_POLICIES)


# --------------------------------------------------------------------------- numpy kernels
def row_stats(x: np.ndarray) -> np.ndarray:
    """Per-row sum, centred sum of squares, sum of squares, min and max: ``(5, n)`` float64.

    The centred sum of squares is ``q - s^2/m`` (single pass), recomputed two-pass for the
    rows where that would cancel (mean far above the spread), and exactly 0 for constant
    rows.
    """
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[1]
    s = x.sum(axis=1)
    q = np.einsum("ij,ij->i", x, x)
    low, high = x.min(axis=1), x.max(axis=1)
    css = np.maximum(q - s * s / m, 0.0)
    unsure = css <= 1e-6 * q
    for i in np.flatnonzero(unsure):
        centred = x[i] - s[i] / m
        css[i] = centred @ centred
    css[low == high] = 0.0
    return np.stack([s, css, q, low, high])


def pooled_scale(stats: np.ndarray, m: int) -> tuple[float, float]:
    """Mean and SD (ddof=0) of all values of the rows described by ``stats``.

    Pooled from within-row centred sums of squares plus the spread of row means, which
    avoids the cancellation of ``E[x^2] - E[x]^2``.
    """
    n = stats.shape[1]
    row_means = stats[_S] / m
    mean = float(row_means.mean())
    var = (stats[_CSS].sum() + m * np.sum((row_means - mean) ** 2)) / (n * m)
    return mean, float(np.sqrt(max(var, 0.0)))


def degenerate_rows(stats: np.ndarray, m: int, norm: str, metric: str, mean: float, sd: float) -> np.ndarray:
    """Rows whose normalised vector is undefined or zero under ``(norm, metric)``."""
    constant = stats[_MIN] == stats[_MAX]
    if metric == "euclidean" and norm != "image":
        return np.zeros_like(constant)
    if metric == "correlation" or norm == "image":
        return constant
    if norm == "none":  # cosine of raw vectors: all-zero vectors
        return constant & (stats[_MAX] == 0)
    if sd == 0:  # cosine after layer z-scoring: every vector is zero
        return np.ones_like(constant)
    return constant & (stats[_S] / m == mean)


def shift_rows(x: np.ndarray, stats: np.ndarray, m: int, norm: str, metric: str, mean: float) -> None:
    """Shift a float64 block in place so its Gram matrix has no cancellation.

    Metrics of row-centred vectors (correlation, ``norm="image"``) subtract each row's
    mean; Euclidean and cosine under ``"layer"`` subtract the set's mean (a common scalar
    shift leaves them unchanged); raw cosine has nothing to cancel. Without the shift,
    ``q_i + q_j - 2 G_ij`` loses about ``log10((mean / spread)^2)`` digits.
    """
    if metric == "correlation" or norm == "image":
        x -= (stats[_S] / m)[:, None]
    elif not (metric == "cosine" and norm == "none"):
        x -= mean


def distance_block(
    gram: np.ndarray,
    stats_a: np.ndarray,
    stats_b: np.ndarray,
    m: int,
    norm: str,
    metric: str,
    mean: float = 0.0,
    sd: float = 1.0,
    degenerate_a: np.ndarray | None = None,
    degenerate_b: np.ndarray | None = None,
) -> np.ndarray:
    """Distances between two row blocks from the Gram block of their shifted vectors.

    ``gram`` is ``X_a @ X_b.T`` after :func:`shift_rows`; ``stats_*`` are the
    :func:`row_stats` of the unshifted rows. ``degenerate_*`` rows follow the
    ``constant="zero"`` rule (see the module doc).
    """
    if metric == "euclidean" and norm != "image":
        # squared norms of the mean-shifted rows: css + m (row mean - mean)^2
        dev_a, dev_b = stats_a[_S] / m - mean, stats_b[_S] / m - mean
        norm_a, norm_b = stats_a[_CSS] + m * dev_a**2, stats_b[_CSS] + m * dev_b**2
        d2 = norm_a[:, None] + norm_b[None, :] - 2.0 * gram
        np.maximum(d2, 0.0, out=d2)
        scale = m * (sd * sd if norm == "layer" else 1.0)
        if scale == 0:  # all sampled values equal: identical vectors
            return np.zeros_like(d2)
        out = np.sqrt(d2 / scale)
    else:
        if metric == "cosine" and norm == "none":
            den_a, den_b = stats_a[_Q], stats_b[_Q]
        elif metric == "cosine" and norm == "layer":
            dev_a, dev_b = stats_a[_S] / m - mean, stats_b[_S] / m - mean
            den_a, den_b = stats_a[_CSS] + m * dev_a**2, stats_b[_CSS] + m * dev_b**2
        else:  # correlation, or any metric on image-z-scored vectors: rows were centred
            den_a, den_b = stats_a[_CSS], stats_b[_CSS]
        den = np.sqrt(np.outer(den_a, den_b))
        sim = np.divide(gram, den, out=np.zeros_like(gram), where=den > 0)
        np.clip(sim, -1.0, 1.0, out=sim)
        if degenerate_a is None:
            degenerate_a = np.zeros(sim.shape[0], bool)
        if degenerate_b is None:
            degenerate_b = np.zeros(sim.shape[1], bool)
        sim[degenerate_a[:, None] | degenerate_b[None, :]] = 0.0
        if metric == "euclidean":  # image norm: ||z_i - z_j||^2 / m, z = 0 for degenerate rows
            self_a = (~degenerate_a).astype(np.float64)
            self_b = (~degenerate_b).astype(np.float64)
            d2 = self_a[:, None] + self_b[None, :] - 2.0 * sim
            out = np.sqrt(np.maximum(d2, 0.0))
        else:
            out = 1.0 - sim
    out += 0.0  # turn -0.0 into +0.0 (the radix select relies on the sign bit)
    return out


def _check_group(
    stats: np.ndarray,
    m: int,
    norm: str,
    metric: str,
    constant: str,
    *,
    layer: str,
    group: str,
    names: np.ndarray,
) -> tuple[float, float, np.ndarray]:
    bad = ~np.all(np.isfinite(stats), axis=0)
    if bad.any():
        raise ValueError(
            f"layer {layer!r}, set {group!r}: non-finite activations in {int(bad.sum())} image(s) "
            f"(e.g. {list(names[bad][:3])})"
        )
    mean, sd = pooled_scale(stats, m)
    degenerate = degenerate_rows(stats, m, norm, metric, mean, sd)
    if constant == "raise" and degenerate.any():
        what = "all-zero" if (metric == "cosine" and norm == "none") else "constant"
        raise ValueError(
            f"layer {layer!r}, set {group!r}: {int(degenerate.sum())} of {degenerate.size} image(s) have {what} "
            f"activations over the {m} sampled units (e.g. {list(names[degenerate][:3])}), so "
            f"norm={norm!r}, metric={metric!r} is undefined for them. Sample more units, use "
            f"metric='euclidean' with norm='layer' or 'none', or pass constant='zero'."
        )
    return mean, sd, degenerate


def pairwise_distances(
    x: np.ndarray,
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    constant: ConstantPolicy = "raise",
) -> np.ndarray:
    """All pairwise distances of the rows of an in-memory ``(n, m)`` matrix (Gram-based).

    The same kernel the lazy functions run per block; see the module doc for the norms,
    metrics and degenerate rows. Returns a symmetric ``(n, n)`` float64 array with a zero
    diagonal.
    """
    check_options(norm, metric, constant)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"expected an (n, m) matrix with m >= 1, got shape {x.shape}")
    x64 = np.array(x, dtype=np.float64)  # a copy: shifted in place below
    m = x.shape[1]
    stats = row_stats(x64)
    mean, sd, degenerate = _check_group(
        stats, m, norm, metric, constant, layer="<array>", group="<array>", names=np.arange(x.shape[0])
    )
    shift_rows(x64, stats, m, norm, metric, mean)
    d = distance_block(x64 @ x64.T, stats, stats, m, norm, metric, mean, sd, degenerate, degenerate)
    return _symmetrise(d)


def _symmetrise(d: np.ndarray) -> np.ndarray:
    upper = np.triu(d, 1)
    return upper + upper.T


# --------------------------------------------------------------------------- graph pieces
@dataclass(frozen=True)
class GroupStats:
    """Per distinct draw: unit count, layer mean/SD over the group, row stats, degenerate rows."""

    m: np.ndarray  # (draws,)
    stats: np.ndarray  # (draws, 5, n)
    mean: np.ndarray  # (draws,)
    sd: np.ndarray  # (draws,)
    degenerate: np.ndarray  # (draws, n) bool


@dataclass(frozen=True)
class GroupBlocks:
    """One group (set) of one layer: graph keys of its gathered row blocks and statistics."""

    name: str
    index: int  # position of the group in the plan (groups differ only for "top")
    rows: np.ndarray  # global sample rows, in sample order
    bounds: tuple[tuple[int, int], ...]  # row-block ranges within the group
    blocks: tuple[Any, ...]  # keys -> gathered (rows, union of units) arrays
    stats: Any  # key -> GroupStats

    @property
    def n(self) -> int:
        return int(self.rows.size)

    def pairs(self) -> Iterator[tuple[int, int]]:
        for a in range(len(self.blocks)):
            for b in range(a, len(self.blocks)):
                yield a, b


def _gather(block: np.ndarray, local_rows: np.ndarray, plan: UnitPlan, _check: Any = None) -> np.ndarray:
    """Read one image chunk once: the union of every draw's units for the selected images."""
    flat = np.asarray(block).reshape(block.shape[0], -1)
    if plan.union.size == flat.shape[1]:
        return flat[local_rows]
    return flat[np.ix_(local_rows, plan.union)]


def _take_rows(parts: list[np.ndarray], positions: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([p[i] for p, i in zip(parts, positions)], axis=0)


def draw_columns(block: np.ndarray, plan: UnitPlan, group: int, d: int) -> np.ndarray:
    """A new float64 ``(rows, m)`` array of draw ``d``'s units from a gathered row block."""
    positions = plan.positions(group, d)
    if positions.size == block.shape[1]:
        return np.array(block, dtype=np.float64)
    return np.take(block, positions, axis=1).astype(np.float64, copy=False)  # take made a new array


def _row_stats_task(block: np.ndarray, plan: UnitPlan, group: int, n_draws: int) -> np.ndarray:
    return np.stack([row_stats(draw_columns(block, plan, group, d)) for d in range(n_draws)])


def _group_stats(
    parts: list[np.ndarray],
    plan: UnitPlan,
    group: int,
    norm: str,
    metric: str,
    constant: str,
    layer: str,
    group_name: str,
    names: np.ndarray,
) -> GroupStats:
    stats = np.concatenate(parts, axis=2)
    n_draws = stats.shape[0]
    m = np.array([plan.draw(group, d).size for d in range(n_draws)])
    out = [
        _check_group(stats[d], int(m[d]), norm, metric, constant, layer=layer, group=group_name, names=names)
        for d in range(n_draws)
    ]
    return GroupStats(
        m=m,
        stats=stats,
        mean=np.array([o[0] for o in out]),
        sd=np.array([o[1] for o in out]),
        degenerate=np.stack([o[2] for o in out]),
    )


def iter_distance_blocks(
    block_a: np.ndarray,
    block_b: np.ndarray,
    plan: UnitPlan,
    group: int,
    stats: GroupStats,
    rows_a: tuple[int, int],
    rows_b: tuple[int, int],
    norm: str,
    metric: str,
    draws: Sequence[int] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(draw, distances)`` for a pair of row blocks (``rows_a == rows_b``: diagonal)."""
    same = rows_a == rows_b
    sa, sb = slice(*rows_a), slice(*rows_b)
    for d in range(len(stats.m)) if draws is None else draws:
        m, mean = int(stats.m[d]), float(stats.mean[d])
        stats_a, stats_b = stats.stats[d][:, sa], stats.stats[d][:, sb]
        xa = draw_columns(block_a, plan, group, d)
        shift_rows(xa, stats_a, m, norm, metric, mean)
        if same:
            xb = xa
        else:
            xb = draw_columns(block_b, plan, group, d)
            shift_rows(xb, stats_b, m, norm, metric, mean)
        gram = xa @ xb.T  # xa @ xa.T runs as a symmetric rank-k update
        out = distance_block(gram, stats_a, stats_b, m, norm, metric, mean, float(stats.sd[d]),
                             stats.degenerate[d][sa], stats.degenerate[d][sb])  # fmt: skip
        yield d, (_symmetrise(out) if same else out)


def auto_block_size(width: int, itemsize: int) -> int:
    """Images per row block so one gathered block is about ``ROW_BLOCK_BYTES``."""
    return int(np.clip(ROW_BLOCK_BYTES // max(1, width * itemsize), MIN_BLOCK, MAX_BLOCK))


def build_groups(
    graph: GraphBuilder,
    coll: Collection,
    layer: LayerData,
    groups: dict[str, np.ndarray],
    table: DrawTable,
    *,
    norm: str,
    metric: str,
    constant: str,
    block_size: int | None,
    index: tuple = (),
) -> tuple[Any, list[GroupBlocks]]:
    """Add a layer's gathered row blocks and group statistics to ``graph``.

    Each image chunk of the layer is read by exactly one task, which gathers the union of
    the units of all draws (all ``n_units`` values and resamples) for all groups. Returns
    the key of the :class:`UnitPlan` and one :class:`GroupBlocks` per group.
    """
    plan = plan_for(graph, table, layer, list(groups.values()), index)
    selected = np.unique(np.concatenate(list(groups.values())))
    check = check_completed(graph, coll, selected, index)
    graph.depend(layer.data)
    chunk_keys = block_keys(layer.data)
    bounds = layer.block_bounds()
    block_of = np.searchsorted(bounds, selected, side="right") - 1
    gathered: dict[int, Any] = {}
    position = np.full(bounds[-1], -1, dtype=np.int64)
    for k in np.unique(block_of):
        rows = selected[block_of == k]
        position[rows] = np.arange(rows.size)
        gathered[int(k)] = graph.add("gather", (*index, int(k)), _gather, chunk_keys[k], rows - bounds[k], plan, check)

    n_draws = len(table.keys)
    per_group = len(groups) if table.unit_type == "top" else 1
    width = min(layer.size, per_group * sum(min(n, layer.size) for n, _ in table.keys))
    size = block_size or auto_block_size(width, layer.data.dtype.itemsize)
    out = []
    for g, (name, rows) in enumerate(groups.items()):
        plan_group = g if table.unit_type == "top" else 0
        row_ranges = tuple((lo, min(lo + size, rows.size)) for lo in range(0, rows.size, size))
        blocks, parts = [], []
        for b, (lo, hi) in enumerate(row_ranges):
            part_rows = rows[lo:hi]
            ks = block_of[np.searchsorted(selected, part_rows)]
            order = np.unique(ks)
            blocks.append(graph.add("row-block", (*index, g, b), _take_rows, [gathered[int(k)] for k in order],
                                    [position[part_rows[ks == k]] for k in order]))  # fmt: skip
            parts.append(graph.add("row-stats", (*index, g, b), _row_stats_task, blocks[-1], plan, plan_group, n_draws))
        stats = graph.add("group-stats", (*index, g), _group_stats, parts, plan, plan_group, norm, metric, constant,
                          layer.name, name, coll.samples[rows])  # fmt: skip
        out.append(GroupBlocks(name, plan_group, rows, row_ranges, tuple(blocks), stats))
    return plan, out


# --------------------------------------------------------------------------- RDM
def _rdm_block(
    block_a: np.ndarray,
    block_b: np.ndarray,
    plan: UnitPlan,
    group: int,
    stats: GroupStats,
    rows_a: tuple[int, int],
    rows_b: tuple[int, int],
    norm: str,
    metric: str,
) -> np.ndarray:
    ((_, out),) = iter_distance_blocks(block_a, block_b, plan, group, stats, rows_a, rows_b, norm, metric, [0])
    return out


def rdm(
    tree: Any,
    layer: str | None = None,
    n_units: int = 10000,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    seed: int = 0,
    resample: int = 0,
    *,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = "image",
    set_coord: str = "set",
    filter_dim: str = "filter",
    constant: ConstantPolicy = "raise",
    block_size: int | None = None,
) -> xr.DataArray:
    """Lazy representational dissimilarity matrix of one layer.

    Parameters
    ----------
    tree
        A store tree (``cx.open_activations``), or any DataArray/Dataset with a sample
        dimension (e.g. ``(state, unit, frequency)``; see ``sample_dim``).
    layer
        Layer name (may be omitted when the data have a single layer).
    n_units, unit_type, seed, resample
        The unit draw, as :func:`cnndiff_xr.select_units` (same units as
        :func:`cnndiff_xr.differentiation` uses for that draw).
    norm, metric, constant
        See :mod:`cnndiff_xr.distance`. ``norm="layer"`` scales by the SD over all images
        of the RDM (``sets``), so an RDM of one set matches that set's differentiation.
    sets
        Images of these sets (all images when ``None``), in sample order.
    sample_dim, set_coord, filter_dim
        Names of the sample dimension, the set coordinate along it, and the filter
        dimension (for ``unit_type="per_filter"``).
    block_size
        Images per row block (chunk size of the result); default sized from memory.

    Returns
    -------
    xarray.DataArray
        ``(image, image_other)`` float64, symmetric, zero diagonal, dask-backed; nothing is
        computed until ``.compute()``.
    """
    check_options(norm, metric, constant)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    (n,) = check_n_units(n_units)
    seed = check_count("seed", seed, 0)
    resample = check_count("resample", resample, 0)
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    if layer is None:
        if len(coll.layers) != 1:
            raise ValueError(f"pass layer=; the data have layers {list(coll.layers)}")
        layer = next(iter(coll.layers))
    data = coll.layer(layer)
    rows = np.sort(np.concatenate(list(coll.rows(sets).values())))
    if rows.size < 2:
        raise ValueError(f"an RDM needs at least 2 images; sets={sets!r} select {rows.size}")
    if block_size is not None:
        block_size = check_count("block_size", block_size, 1)
    table = draw_table(data, (n,), [resample], unit_type, seed, filter_dim)
    label = "+".join(coll.rows(sets)) if sets is not None else "all images"
    graph = GraphBuilder(f"rdm-{tokenize(data.data.name, rows, table, norm, metric, constant, block_size)}")
    plan, (group,) = build_groups(
        graph, coll, data, {label: rows}, table, norm=norm, metric=metric, constant=constant, block_size=block_size
    )
    nb = len(group.blocks)
    for a in range(nb):
        for b in range(nb):
            if a <= b:
                graph.output((a, b), _rdm_block, group.blocks[a], group.blocks[b], plan, group.index, group.stats,
                             group.bounds[a], group.bounds[b], norm, metric)  # fmt: skip
            else:
                graph.output((a, b), np.transpose, (graph.name, b, a))
    sizes = tuple(hi - lo for lo, hi in group.bounds)
    data_ = graph.array((sizes, sizes), np.float64)
    other = f"{sample_dim}_other"
    labels, set_labels = coll.samples[rows], coll.set_labels[rows]
    return xr.DataArray(
        data_,
        dims=(sample_dim, other),
        coords={
            sample_dim: labels,
            other: labels,
            set_coord: (sample_dim, set_labels),
            f"{set_coord}_other": (other, set_labels),
        },
        name="distance",
        attrs={
            "layer": layer,
            "n_units": n,
            "n_units_used": table.n_used[0],
            "unit_type": unit_type,
            "norm": norm,
            "metric": metric,
            "seed": seed,
            "resample": resample,
        },
    )
