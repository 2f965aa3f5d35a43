"""Row blocks of gathered units, their statistics, and the distances of pairs of row blocks, on dask.

Chunking. The units of every draw of a layer's draw table are gathered from each image chunk in one task (one read
of the chunk for all its resamples and ``n_units`` values; differentiation splits a table that would not fit its
memory budget into several, each read separately), then each group's (set's) images are regrouped into row blocks of
at most ``block_size`` images (:func:`build_groups`); a task per pair of row blocks computes the Gram blocks of all
draws (:func:`iter_distance_blocks`, or strip by strip :func:`iter_upper_strips`), so memory per task stays bounded
whatever the number of images. A group that fits one row block is one task from the gathered chunks to its result
(:func:`one_block_distances`).

Graph tasks get the keys they read as arguments and their static data as a small frozen dataclass:
:class:`GroupTask` (a group of a layer), :class:`BlockPair` (a pair of its row blocks), :class:`OneBlock` (a group
in one row block). Which distance, and so which shift and conversion, is the group's
:class:`~cnndiff_xr.analysis.metrics.DistanceSpec`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..options import CONSTANT_POLICIES, ConstantPolicy, Metric, Norm
from ..validation import check_choice
from .collection import Collection, LayerData, completed_check
from .draws import DrawTable, UnitPlan, make_plan, plan_for
from .float16 import half_to_float
from .gram import (
    ROW_SQUARES,
    ROW_SUM,
    Shift,
    accurate_gram,
    euclidean_median,
    one_pass,
    one_pass_gram,
    partition_median,
    pooled_scale,
    row_stats,
    strip_rows,
    symmetrise,
    upper_triangle,
)
from .graph import GraphBuilder, Key, block_keys, sum_parts
from .metrics import DistanceSpec, distance_spec, never_degenerate

__all__ = [
    "BlockPair",
    "GroupBlocks",
    "GroupStats",
    "GroupTask",
    "OneBlock",
    "auto_block_size",
    "build_groups",
    "iter_distance_blocks",
    "iter_pair_values",
    "iter_upper_strips",
    "one_block_distances",
    "one_block_medians",
    "pairwise_distances",
]

#: target size of one gathered row block (images x union of sampled units). A set in one block is one task with no
#: row-statistics pass and no re-shifted block pairs (``one_block_distances``); 128 MiB (from 64) keeps sets of up to
#: ~330 images of 10 draws of 10,000 units in one block: the differentiation of a 192-image reduced VGG16 store ~20 %
#: faster (benchmarks/RESULTS.md), at ~0.25 GB of working memory per running task
ROW_BLOCK_BYTES = 128 * 2**20
MIN_BLOCK, MAX_BLOCK = 32, 2048

#: a row block: one C-contiguous ``(rows, m)`` array per draw
RowBlock = list[np.ndarray]


# --------------------------------------------------------------------------- task payloads
@dataclass(frozen=True, eq=False)
class GroupTask:
    """Static data of one group (set) of one layer, for its graph tasks."""

    spec: DistanceSpec
    constant: ConstantPolicy
    layer: str
    name: str  # the group's (set's) name
    samples: np.ndarray  # labels of the group's rows, for messages
    plan_group: int  # the group's draws in the plan: always 0, every set of a call uses the same units
    n_draws: int


@dataclass(frozen=True)
class BlockPair:
    """Static data of a task on a pair of row blocks of one group: their row ranges within the group."""

    rows_a: tuple[int, int]
    rows_b: tuple[int, int]

    @property
    def same(self) -> bool:
        """A diagonal pair: a block with itself."""
        return self.rows_a == self.rows_b


@dataclass(frozen=True, eq=False)
class OneBlock:
    """Static data of a group that fits one row block, computed in one task from its gathered chunks."""

    group: GroupTask
    positions: tuple[np.ndarray, ...]  # the group's rows in each gathered chunk


@dataclass(frozen=True)
class RowStats:
    """Row statistics (:func:`~cnndiff_xr.analysis.gram.row_stats`, ``(draws, 5, rows)``) and column sums (one
    ``(m,)`` per draw) of a row block."""

    stats: np.ndarray
    column_sums: list[np.ndarray]


@dataclass(frozen=True)
class GroupStats:
    """Per distinct draw of a group under a distance: unit count, layer mean/SD over the group, row stats,
    degenerate rows, and the group's centroid (mean vector, the Euclidean :class:`~cnndiff_xr.analysis.gram.Shift`).
    """

    spec: DistanceSpec
    m: np.ndarray  # (draws,)
    stats: np.ndarray  # (draws, 5, n)
    mean: np.ndarray  # (draws,)
    sd: np.ndarray  # (draws,)
    degenerate: np.ndarray  # (draws, n) bool
    centroid: tuple[np.ndarray, ...]  # (m_d,) per draw

    def shift(self, d: int, rows: slice | np.ndarray) -> Shift:
        """The shift of draw ``d``'s rows ``rows`` (a range, or the positions of some rows)."""
        return self.spec.row_shift(self.stats[d][:, rows], int(self.m[d]), float(self.mean[d]), self.centroid[d])


@dataclass(frozen=True, eq=False)
class RowLayout:
    """Where the rows of a call's groups lie in a layer's image chunks: the rows read, each chunk's, and each row
    block's positions in its chunks. Made once per call for every layer chunked alike (:func:`row_layout`): the tasks
    of all layers then hold the same arrays, which the graph pickles once, instead of a copy per layer that grew with
    images x layers. Every array is read-only, since every layer's tasks share it."""

    groups: tuple[np.ndarray, ...]  # each group's rows, in the call's order of groups
    selected: np.ndarray  # every group's rows together, sorted
    block_of: np.ndarray  # the chunk of each selected row
    local_rows: dict[int, np.ndarray]  # chunk read -> the selected rows within it (chunks without any left out)
    position: np.ndarray  # global row -> its position among its chunk's rows read (-1: not read)
    _sources: dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[np.ndarray, ...]]] = field(
        default_factory=dict, init=False, repr=False)

    @classmethod
    def of(cls, bounds: np.ndarray, groups: Sequence[np.ndarray]) -> RowLayout:
        selected = np.unique(np.concatenate(list(groups)))
        block_of = np.searchsorted(bounds, selected, side="right") - 1
        chunk_rows = {int(k): selected[block_of == k] for k in np.unique(block_of)}
        position = np.full(bounds[-1], -1, dtype=np.int64)
        for rows in chunk_rows.values():
            position[rows] = np.arange(rows.size)
        local_rows = {k: rows - bounds[k] for k, rows in chunk_rows.items()}
        _read_only(selected, block_of, position, *local_rows.values())
        return cls(tuple(groups), selected, block_of, local_rows, position)

    def source(self, g: int, lo: int, hi: int) -> tuple[tuple[int, ...], tuple[np.ndarray, ...]]:
        """The chunks holding rows ``lo:hi`` of group ``g`` and those rows' positions in each (cached)."""
        key = (g, lo, hi)
        if key not in self._sources:
            part_rows = self.groups[g][lo:hi]
            ks = self.block_of[np.searchsorted(self.selected, part_rows)]
            order = np.unique(ks)
            positions = tuple(self.position[part_rows[ks == k]] for k in order)
            _read_only(*positions)
            self._sources[key] = (tuple(int(k) for k in order), positions)
        return self._sources[key]


def _read_only(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


def row_layout(coll: Collection, bounds: np.ndarray, groups: Mapping[str, np.ndarray]) -> RowLayout:
    """The :class:`RowLayout` of ``groups`` (set name -> rows) in chunks starting at ``bounds``, one per call: made
    once by the collection (:meth:`~cnndiff_xr.analysis.collection.Collection.shared`) for every layer chunked alike.
    """
    key = ("row-layout", np.asarray(bounds, np.int64).tobytes(),
           tuple((name, np.asarray(rows, np.int64).tobytes()) for name, rows in groups.items()))
    return coll.shared(key, lambda: RowLayout.of(bounds, list(groups.values())))


@dataclass(frozen=True)
class RowBlockSource:
    """Where a row block's rows come from: the keys of the gathered chunks and the rows in each."""

    chunks: tuple[Key, ...]
    positions: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class GroupBlocks:
    """One group (set) of one layer in a graph under construction: the keys of its row blocks, statistics and
    plan, and the static data of its tasks."""

    task: GroupTask
    rows: np.ndarray  # global sample rows, in sample order
    bounds: tuple[tuple[int, int], ...]  # row-block ranges within the group
    sources: tuple[RowBlockSource, ...]  # per row block
    blocks: tuple[Key, ...]  # keys -> RowBlock
    stats: Key  # key -> GroupStats
    plan: Key  # key -> UnitPlan

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def n(self) -> int:
        return int(self.rows.size)

    @property
    def n_pairs(self) -> int:
        return self.n * (self.n - 1) // 2

    @property
    def in_one_block(self) -> bool:
        """Whether the group fits one row block: then :meth:`one_block` is its whole computation, one task."""
        return len(self.bounds) == 1

    def one_block(self) -> tuple[list[Key], OneBlock]:
        """The gathered chunks' keys and the static data of :func:`one_block_distances`."""
        source = self.sources[0]
        return list(source.chunks), OneBlock(self.task, source.positions)

    def pairs(self) -> Iterator[tuple[int, int]]:
        """Pairs ``a <= b`` of row blocks."""
        for a in range(len(self.blocks)):
            for b in range(a, len(self.blocks)):
                yield a, b

    def pair(self, a: int, b: int) -> BlockPair:
        return BlockPair(self.bounds[a], self.bounds[b])

    def add_pair_tasks(self, graph: GraphBuilder, stage: str, index: tuple[int, ...], func: Callable[..., object],
                       extra: Sequence[Key] = ()) -> list[Key]:
        """A task ``func(block_a, block_b, stats, pair, *extra)`` per pair of row blocks, keyed
        ``(stage, *index, a, b)``."""
        return [
            graph.add(stage, (*index, a, b), func, self.blocks[a], self.blocks[b], self.stats, self.pair(a, b),
                      *extra)
            for a, b in self.pairs()
        ]


# --------------------------------------------------------------------------- gathering and row blocks
def _gather(block: np.ndarray, local_rows: np.ndarray, plan: UnitPlan, _check: None = None) -> np.ndarray:
    """Read one image chunk once: the union of every draw's units for the selected images.

    The chunk's columns ``plan.read`` hold the union: the union itself for a whole layer, its positions among the
    stored units for a reduced layer, so both give the same gathered matrix."""
    flat = np.asarray(block).reshape(block.shape[0], -1)
    if local_rows.size != flat.shape[0] or np.any(local_rows != np.arange(flat.shape[0])):
        flat = flat[local_rows]
    if plan.read.size == flat.shape[1]:
        return flat
    # np.take keeps rows C-ordered; flat[:, union] comes out column-major, and every later
    # row-wise pass over it (concatenating, taking each draw) would stride through memory
    return np.take(flat, plan.read, axis=1, mode="clip")


def _gather_in_read(block: np.ndarray, plan: UnitPlan, _check: None, selected: np.ndarray,
                    block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """:func:`_gather` of the ``selected`` rows that fall in this block (``map_blocks``)."""
    assert block_info is not None  # map_blocks passes it
    lo, hi = block_info[0]["array-location"][0]
    rows = selected[(selected >= lo) & (selected < hi)] - lo
    return _gather(block, rows, plan)


def _row_block(parts: list[np.ndarray], positions: Sequence[np.ndarray], plan: UnitPlan, group: int,
               *, keep_float16: bool = False) -> RowBlock:
    """A row block from gathered chunks: one C-contiguous ``(rows, m)`` array per draw of
    the group, float32 (float64 and integer data: float64), converted once here rather than
    in every statistic and product over it. ``keep_float16``: float16 data stay float16, for a consumer whose
    only pass over the block is a Gram product (:func:`~cnndiff_xr.analysis.gram.one_pass`), which converts each
    column block in cache: a whole float32 copy per draw is written to memory and read back for nothing.

    Each draw is taken from every chunk's gathered union straight into its rows of the
    block, in the stored dtype (float16: half the bytes to move), and converted after: the
    chunks' unions are never concatenated into a copy first."""
    n_draws = plan.n_draws(group)
    sources = [p[_as_slice(i)] for p, i in zip(parts, positions, strict=True)]  # views where the rows are a range
    n = sum(src.shape[0] for src in sources)
    dtype = parts[0].dtype
    # taken arrays are the result; others are converted from a buffer
    kept = dtype in (np.float32, np.float64) or (keep_float16 and dtype == np.float16)
    taken: np.ndarray | None = None
    out = []
    for d in range(n_draws):
        cols = plan.positions(group, d)
        width = sources[0][:0, cols].shape[1]
        if kept or taken is None or taken.shape[1] != width:
            taken = np.empty((n, width), dtype)
        lo = 0
        for src in sources:
            hi = lo + src.shape[0]
            if isinstance(cols, slice):
                taken[lo:hi] = src[:, cols]
            else:
                np.take(src, cols, axis=1, mode="clip", out=taken[lo:hi])
            lo = hi
        if kept:
            out.append(taken)
        elif dtype == np.float16:
            out.append(half_to_float(taken))
        else:  # integers: exact in float64
            out.append(taken.astype(np.float64))
    return out


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """``index`` as a slice when it is a run of consecutive integers (a view, not a copy)."""
    if index.size and index[-1] - index[0] == index.size - 1 and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def auto_block_size(width: int, itemsize: int) -> int:
    """Images per row block so one gathered block is about ``ROW_BLOCK_BYTES`` (row blocks
    hold float32 or float64, whatever the stored dtype)."""
    return int(np.clip(ROW_BLOCK_BYTES // max(1, width * max(4, itemsize)), MIN_BLOCK, MAX_BLOCK))


# --------------------------------------------------------------------------- statistics
def _row_stats_task(block: RowBlock, n_draws: int) -> RowStats:
    """Row statistics and column sums (for the centroid) of every draw of a row block."""
    stats, column_sums = [], []
    for d in range(n_draws):
        x = block[d]
        stats.append(row_stats(x))
        column_sums.append(x.sum(axis=0).astype(np.float64))  # any common shift is exact: no need for more
    return RowStats(np.stack(stats), column_sums)


def _group_stats(parts: list[RowStats], plan: UnitPlan, task: GroupTask) -> GroupStats:
    """A group's :class:`GroupStats` from the :class:`RowStats` of its row blocks (checked: see
    :func:`check_rows`)."""
    stats = np.concatenate([p.stats for p in parts], axis=2)
    n_draws, n = stats.shape[0], stats.shape[2]
    m = np.array([plan.draw(task.plan_group, d).size for d in range(n_draws)])
    out = [
        check_rows(stats[d], int(m[d]), task.spec, task.constant, layer=task.layer, group=task.name,
                   names=task.samples)
        for d in range(n_draws)
    ]
    centroid = tuple(sum_parts([p.column_sums[d] for p in parts]) / n for d in range(n_draws))
    return GroupStats(
        spec=task.spec,
        m=m,
        stats=stats,
        mean=np.array([o[0] for o in out]),
        sd=np.array([o[1] for o in out]),
        degenerate=np.stack([o[2] for o in out]),
        centroid=centroid,
    )


def _non_finite(bad: np.ndarray, layer: str, group: str, names: np.ndarray) -> ValueError:
    return ValueError(f"layer {layer!r}, set {group!r}: non-finite activations in {int(bad.sum())} image(s) "
                      f"(e.g. {[str(n) for n in names[bad][:3]]})")


def check_rows(stats: np.ndarray, m: int, spec: DistanceSpec, constant: ConstantPolicy, *, layer: str, group: str,
               names: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Layer mean and SD of a group's rows and its degenerate rows under ``spec``; raises for non-finite values,
    and for degenerate rows unless ``constant="zero"``."""
    bad = ~(np.isfinite(stats[ROW_SUM]) & np.isfinite(stats[ROW_SQUARES]))  # a sum meets any inf or nan
    if bad.any():
        raise _non_finite(bad, layer, group, names)
    mean, sd = pooled_scale(stats, m)
    degenerate = spec.degenerate_rows(stats, m, mean, sd)
    if constant == "raise" and degenerate.any():
        examples = [str(n) for n in names[degenerate][:3]]  # ids as text, not numpy strings' reprs
        raise ValueError(
            f"layer {layer!r}, set {group!r}: {int(degenerate.sum())} of {degenerate.size} image(s) have "
            f"{spec.degenerate_word} activations over the {m} sampled units (e.g. {examples}), "
            f"so norm={spec.norm!r}, metric={spec.metric!r} is undefined for them. Sample more units, use "
            f"{never_degenerate()}, or pass constant='zero'."
        )
    return mean, sd, degenerate


# --------------------------------------------------------------------------- distances of row blocks
def iter_distance_blocks(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair,
                         draws: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(draw, distances)`` for a pair of row blocks (a diagonal pair: the symmetric block)."""
    spec = stats.spec
    sa, sb = slice(*pair.rows_a), slice(*pair.rows_b)
    for d in range(len(stats.m)) if draws is None else draws:
        xa, shift_a = block_a[d], stats.shift(d, sa)
        xb: np.ndarray | None
        if pair.same:
            xb, shift_b = None, None
        else:
            xb, shift_b = block_b[d], stats.shift(d, sb)
        g, norms_a, norms_b = accurate_gram(xa, xb, shift_a, shift_b, spec.error_bound)
        out = spec.distances(g, norms_a, norms_b, int(stats.m[d]), sd=float(stats.sd[d]),
                             degenerate_a=stats.degenerate[d][sa], degenerate_b=stats.degenerate[d][sb])
        yield d, (symmetrise(out) if pair.same else out)


def upper_values(values: np.ndarray, same: bool) -> np.ndarray:
    """The pairs ``i < j`` of a distance block: its strict upper triangle if diagonal, else all of it."""
    return values[np.triu_indices(values.shape[0], 1)] if same else values.ravel()


def iter_pair_values(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair
                     ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(draw, distances of the pairs i < j)`` for a pair of row blocks."""
    for d, values in iter_distance_blocks(block_a, block_b, stats, pair):
        yield d, upper_values(values, pair.same)


def iter_upper_strips(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair,
                      draws: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(draw, distances)`` for a pair of row blocks, strip by strip: every pair ``i < j`` exactly once, in
    pieces of about :data:`~cnndiff_xr.analysis.gram.STRIP_BYTES`, each piece either a rectangle of the block or
    the upper triangle (flattened) of a diagonal block's square on the diagonal.

    The same numbers as :func:`iter_pair_values`, bit for bit (the same Gram block and float64 redo, and every
    conversion to distances is elementwise), without ever holding a whole block of distances or its temporaries:
    a consumer that only counts or keeps a few of the values (the median's window) runs on strips in cache.
    """
    spec = stats.spec
    sa, sb = slice(*pair.rows_a), slice(*pair.rows_b)
    for d in range(len(stats.m)) if draws is None else draws:
        xa, shift_a = block_a[d], stats.shift(d, sa)
        xb: np.ndarray | None
        if pair.same:
            xb, shift_b = None, None
        else:
            xb, shift_b = block_b[d], stats.shift(d, sb)
        g, norms_a, norms_b = accurate_gram(xa, xb, shift_a, shift_b, spec.error_bound)
        m, sd = int(stats.m[d]), float(stats.sd[d])
        degenerate_a, degenerate_b = stats.degenerate[d][sa], stats.degenerate[d][sb]
        n_a, n_b = g.shape
        step = strip_rows(n_b)
        for lo in range(0, n_a, step):
            hi = min(lo + step, n_a)
            if pair.same:
                square = spec.distances(g[lo:hi, lo:hi], norms_a[lo:hi], norms_a[lo:hi], m, sd=sd,
                                        degenerate_a=degenerate_a[lo:hi], degenerate_b=degenerate_a[lo:hi])
                yield d, square[upper_triangle(hi - lo)]
                if hi < n_b:
                    yield d, spec.distances(g[lo:hi, hi:], norms_a[lo:hi], norms_a[hi:], m, sd=sd,
                                            degenerate_a=degenerate_a[lo:hi], degenerate_b=degenerate_a[hi:])
            else:
                yield d, spec.distances(g[lo:hi], norms_a[lo:hi], norms_b, m, sd=sd,
                                        degenerate_a=degenerate_a[lo:hi], degenerate_b=degenerate_b)


def one_pass_distances(x: np.ndarray, spec: DistanceSpec) -> np.ndarray | None:
    """All distances of the rows of ``x`` under a :attr:`~cnndiff_xr.analysis.metrics.DistanceSpec.one_pass`
    ``spec`` from one Gram pass (:func:`~cnndiff_xr.analysis.gram.one_pass_gram`); ``None`` when some value is not
    finite."""
    result = one_pass_gram(x)
    if result is None:
        return None
    g, norms, sd = result
    return symmetrise(spec.distances(g, norms, norms, x.shape[1], sd=sd))


def one_block_distances(parts: list[np.ndarray], plan: UnitPlan, block: OneBlock
                        ) -> Iterator[tuple[int, np.ndarray]]:
    """Row block, statistics and distances of a group that fits one row block, in one task:
    the graph's row-block, row-stats, group-stats and pair steps without moving the block
    between tasks. Yields ``(draw, distances)``."""
    task = block.group
    rows = _row_block(parts, block.positions, plan, task.plan_group)
    if task.spec.one_pass:
        # the whole group is here: no row statistics needed (the SD comes out of the Gram pass)
        for d in range(task.n_draws):
            out = one_pass_distances(rows[d], task.spec)
            if out is None:
                raise _non_finite(~np.all(np.isfinite(rows[d]), axis=1), task.layer, task.name, task.samples)
            yield d, out
        return
    stats = _group_stats([_row_stats_task(rows, task.n_draws)], plan, task)
    whole = (0, rows[0].shape[0])
    yield from iter_distance_blocks(rows, rows, stats, BlockPair(whole, whole))


def one_block_medians(parts: list[np.ndarray], plan: UnitPlan, block: OneBlock) -> Iterator[tuple[int, float]]:
    """The median of the pair distances of every draw of a group that fits one row block: ``(draw, median)``, as
    :func:`~cnndiff_xr.analysis.gram.partition_median` of :func:`one_block_distances`' upper triangle. Euclidean
    distances from squared norms (the default, :attr:`~cnndiff_xr.analysis.metrics.DistanceSpec.one_pass`) find it
    among the squared distances and redo in float64 only the pairs of nearly identical rows that can decide it
    (:func:`~cnndiff_xr.analysis.gram.euclidean_median`): sets of near-duplicate images (crops of one photograph,
    consecutive movie frames) otherwise spend much of their time redoing pairs far below it. Their float16 rows go
    to the Gram product unconverted (converted there, column block by column block)."""
    task = block.group
    spec = task.spec
    if spec.squared_scale is None:
        upper = upper_triangle(sum(rows.size for rows in block.positions))
        for d, values in one_block_distances(parts, plan, block):
            yield d, partition_median(values[upper])
        return
    rows = _row_block(parts, block.positions, plan, task.plan_group, keep_float16=True)
    for d in range(task.n_draws):
        x = rows[d]
        result = one_pass(x, redo=False)
        if result is None:
            raise _non_finite(~np.all(np.isfinite(x), axis=1), task.layer, task.name, task.samples)
        g, norms, sd, shift = result
        yield d, euclidean_median(x, shift, g, norms, spec.squared_scale(x.shape[1], sd))


# --------------------------------------------------------------------------- graph
def build_groups(
    graph: GraphBuilder,
    coll: Collection,
    layer: LayerData,
    groups: Mapping[str, np.ndarray],
    table: DrawTable,
    *,
    spec: DistanceSpec,
    constant: ConstantPolicy,
    block_size: int | None,
    index: tuple[int, ...] = (),
) -> list[GroupBlocks]:
    """Add a layer's gathered row blocks and group statistics to ``graph``.

    Each image chunk of the layer is read by exactly one task, which gathers the union of
    the units of all draws (all ``n_units`` values and resamples) for all groups. Returns
    one :class:`GroupBlocks` per group.
    """
    layout = row_layout(coll, layer.block_bounds(), groups)
    selected = layout.selected
    check = completed_check(coll, selected)
    plan: Key
    if table.needs_unit_means():
        plan = plan_for(graph, table, layer, list(groups.values()), index)
        if check is not None:
            graph.depend(check)
        graph.depend(layer.data)
        chunk_keys = block_keys(layer.data)
        gathered = {
            k: graph.add("gather", (*index, k), _gather, chunk_keys[k], local, plan,
                         None if check is None else check.key)
            for k, local in layout.local_rows.items()
        }
    else:
        # The plan needs no data: gather as an array operation on the layer, which dask fuses with
        # the chunk reads (one task per chunk that decompresses, gathers and drops the chunk, as a
        # plain read does; a separate gather task kept each whole chunk in memory until it ran)
        plan_delayed = dask.delayed(make_plan, pure=True)(table)
        gathered_array = da.map_blocks(
            _gather_in_read, layer.data, plan_delayed, check, selected,
            dtype=layer.data.dtype, meta=np.empty((0,) * layer.data.ndim, layer.data.dtype),
        )
        graph.depend(gathered_array)
        graph.depend(plan_delayed)
        plan = plan_delayed.key
        keys = block_keys(gathered_array)
        gathered = {k: keys[k] for k in layout.local_rows}

    size = block_size or auto_block_size(table.width, layer.data.dtype.itemsize)  # a row block: one group's draws
    out = []
    for g, (name, rows) in enumerate(groups.items()):
        task = GroupTask(spec=spec, constant=constant, layer=layer.name, name=name, samples=coll.labels(rows),
                         plan_group=0, n_draws=table.n_draws)
        row_ranges = tuple((lo, min(lo + size, rows.size)) for lo in range(0, rows.size, size))
        sources, blocks, parts = [], [], []
        for b, (lo, hi) in enumerate(row_ranges):
            chunks, positions = layout.source(g, lo, hi)
            source = RowBlockSource(tuple(gathered[k] for k in chunks), positions)
            sources.append(source)
            blocks.append(graph.add("row-block", (*index, g, b), _row_block, list(source.chunks),
                                    list(source.positions), plan, task.plan_group))
            parts.append(graph.add("row-stats", (*index, g, b), _row_stats_task, blocks[-1], task.n_draws))
        stats = graph.add("group-stats", (*index, g), _group_stats, parts, plan, task)
        out.append(GroupBlocks(task, rows, row_ranges, tuple(sources), tuple(blocks), stats, plan))
    return out


# --------------------------------------------------------------------------- in memory
def pairwise_distances(x: np.ndarray, *, norm: Norm = "layer", metric: Metric = "euclidean",
                       constant: ConstantPolicy = "raise") -> np.ndarray:
    """All pairwise distances of the rows of an in-memory ``(n, m)`` matrix (Gram-based).

    The same Gram products the lazy functions run per block; for distances from squared norms (Euclidean under
    "layer"/"none") the layer SD comes from the same single pass (shifted norms and column sums) instead of row
    statistics. See :mod:`cnndiff_xr.analysis.metrics` for the norms, metrics and degenerate rows. Returns a
    symmetric ``(n, n)`` float64 array with a zero diagonal.
    """
    spec = distance_spec(norm, metric)
    check_choice("constant", constant, CONSTANT_POLICIES)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"expected an (n, m) matrix with m >= 1, got shape {x.shape}")
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float64)
    n, m = x.shape
    if spec.one_pass:
        d = one_pass_distances(x, spec)
        if d is None:
            bad = ~np.all(np.isfinite(x), axis=1)
            raise ValueError(
                f"non-finite values in {int(bad.sum())} row(s) (e.g. rows {list(np.flatnonzero(bad)[:3])})"
            )
        return d
    stats = row_stats(x)
    mean, sd, degenerate = check_rows(stats, m, spec, constant, layer="<array>", group="<array>", names=np.arange(n))
    shift = spec.row_shift(stats, m, mean, np.zeros(m))
    g, norms, _ = accurate_gram(x, None, shift, None, spec.error_bound)
    d = spec.distances(g, norms, norms, m, sd=sd, degenerate_a=degenerate, degenerate_b=degenerate)
    return symmetrise(d)
