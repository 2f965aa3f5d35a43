"""Exact medians of a set's pairwise distances, however many pairs it has.

Median convention: for an even number of pairs the median is the mean of the two middle values, as
:func:`numpy.median`. Every path gives the exact middle value(s) of the float64 distances of the blocked Gram
computation (:func:`~cnndiff_xr.analysis.blocks.iter_upper_strips`): **bit for bit** ``np.median`` of all of them.
Three paths, by the size of the set:

* a set in one row block: its distances are in one task, whose median is :func:`partition_median` (``np.median``
  bit for bit, without its overhead); Euclidean sets redo in float64 only the near-duplicate pairs that can decide
  it (:func:`~cnndiff_xr.analysis.blocks.one_block_medians`), the other paths every unsure pair, so their
  medians agree to the distances' tolerance, not bit for bit;
* a set whose pair distances fit in :data:`MEDIAN_IN_MEMORY_BYTES` (64 MiB, all draws; about 4,096 images for one
  draw): every pair task hands over its values, and one task takes :func:`numpy.median` of them ("collected");
* larger sets: **one pass with a window** (:func:`add_median`). A seeded sample of the set's rows (at most
  :data:`WINDOW_SAMPLE_ROWS`) gives the distances of the sampled pairs, and from them a window ``[lo, hi]`` of values
  around the sampled median, :data:`WINDOW_Z` standard errors wide in rank (the error of a rank estimated from pairs
  of sampled rows: the spread of the rows' shares of distances below the sampled median, a U-statistic's
  first-order variance) plus :data:`WINDOW_MARGIN`. Every Gram block is then computed **once**: each block-pair task
  returns only its counts below ``lo``, at ``lo``, at ``hi`` and above ``hi`` and the values strictly inside (so the
  window costs memory in proportion to its share of the pairs, at most :data:`MEDIAN_WINDOW_BYTES` per set; ties at
  the window's ends are counted, not kept), and one task checks that the middle ranks fall inside and selects them
  with :func:`numpy.partition`.

  When the window misses the middle ranks (a sample that misleads by more than :data:`WINDOW_Z` standard errors, or
  a window narrowed to its memory cap), a fallback of two more passes over the same blocks finds them as exactly:
  a histogram of the distances' float32 bit patterns' high 20 bits (non-negative floats order like their bits),
  then the float64 values of the bins holding the middle ranks, collected (duplicates counted once). It is built
  into every graph, and its tasks do nothing when the window held the middle ranks: they depend on the row blocks
  only through a "gate" task per block that hands the block on only after a miss, so no block travels between
  workers for nothing. The fallback needs non-negative distances with no ``-0.0``, which every distance spec
  promises (:attr:`~cnndiff_xr.analysis.metrics.DistanceSpec.non_negative`), or the graph is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .blocks import BlockPair, GroupBlocks, GroupStats, RowBlock, iter_upper_strips
from .gram import accurate_gram, partition_median
from .graph import GraphBuilder, Key

__all__ = [
    "MEDIAN_IN_MEMORY_BYTES",
    "MEDIAN_WINDOW_BYTES",
    "WINDOW_MARGIN",
    "WINDOW_SAMPLE_ROWS",
    "WINDOW_Z",
    "add_median",
    "estimate_window",
    "partition_median",
    "window_sample_rows",
]

#: a set whose pair distances (all draws, float64) fit in this many bytes takes the exact
#: median of the collected values; larger sets use the one-pass window
MEDIAN_IN_MEMORY_BYTES = 64 * 2**20
#: most rows of a set whose pairs estimate the window (a tenth of the set, at least 512 rows or all of them)
WINDOW_SAMPLE_ROWS = 2048
#: the window's half-width in standard errors of the sampled rank
WINDOW_Z = 6.0
#: added to the window's half-width, as a share of the pairs
WINDOW_MARGIN = 0.002
#: most bytes of float64 values a set's window may keep (all draws together); a wider window is narrowed to it
MEDIAN_WINDOW_BYTES = 256 * 2**20

#: the fallback's histogram bins: the high 20 bits of a float32 pattern (sign, exponent and 11 mantissa bits)
_KEY_SHIFT = 12
_KEY_BINS = 1 << (32 - _KEY_SHIFT)


def _middle_ranks(n_pairs: int) -> tuple[int, int]:
    return (n_pairs - 1) // 2, n_pairs // 2


def _middle(low: float, high: float, n_pairs: int) -> float:
    """The median from the middle values, as :func:`partition_median` (and ``np.median``) computes it."""
    return float(low) if n_pairs % 2 else float(0.5 * (np.float64(low) + np.float64(high)))


# --------------------------------------------------------------------------- collected
def _pair_upper_values(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair
                       ) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(len(stats.m))]
    for d, values in iter_upper_strips(block_a, block_b, stats, pair):
        parts[d].append(values.ravel())
    return [np.concatenate(p) for p in parts]


def _median_of_parts(parts: list[list[np.ndarray]]) -> np.ndarray:
    return np.array([np.median(np.concatenate([p[d] for p in parts])) for d in range(len(parts[0]))])


# --------------------------------------------------------------------------- the window
@dataclass(frozen=True, eq=False)
class WindowSample:
    """Static data of a set's window estimate: the sampled rows, as positions within each row block and within the
    set, the set's pair count, and how many values per draw the window may keep."""

    local: tuple[np.ndarray, ...]
    rows: np.ndarray
    n_pairs: int
    capacity: int


@dataclass(frozen=True)
class Window:
    """Per draw, the values ``lo <= hi`` that bound a set's middle ranks (``-inf``/``inf``: an open end)."""

    lo: np.ndarray
    hi: np.ndarray


@dataclass(frozen=True)
class WindowPart:
    """What a block pair hands over: per draw, the counts of its distances below ``lo``, equal to ``lo``, equal to
    ``hi`` (0 when ``lo == hi``) and above ``hi``, and its distances strictly between them."""

    counts: np.ndarray  # (draws, 4) int64
    inside: tuple[np.ndarray, ...]


def window_sample_rows(n: int) -> np.ndarray:
    """The rows of a set of ``n`` whose pairs estimate its window: a tenth of the set, at least 512 (or all) and at
    most :data:`WINDOW_SAMPLE_ROWS`, uniform without replacement from a fixed seed (the same for every call). The
    sample costs ``s^2 / n^2`` of the set's Gram products: 1 % from 5,120 to 20,480 images, less above."""
    s = min(n, max(512, min(n // 10, WINDOW_SAMPLE_ROWS)))
    return np.sort(np.random.default_rng(n).choice(n, s, replace=False))


def estimate_window(distances: np.ndarray, n_pairs: int, capacity: int) -> tuple[float, float]:
    """``(lo, hi)`` bounding the middle ranks of a set of ``n_pairs`` pairs, from the square matrix of distances of
    a sample of its rows (zero diagonal).

    The sampled median's rank among all pairs errs by a standard error of about ``sqrt(4 var(p) / s + 1 / pairs)``
    as a share of the pairs, where ``p`` is each sampled row's share of distances below the sampled median (the
    first-order variance of a U-statistic; ``var(p)`` is large when rows differ, e.g. clusters of images). The
    window spans the sampled quantiles :data:`WINDOW_Z` such errors plus :data:`WINDOW_MARGIN` either side of the
    median, narrowed so that it holds about ``capacity`` values of the ``n_pairs``.
    """
    s = distances.shape[0]
    upper = distances[np.triu_indices(s, 1)]
    n_sampled = upper.size
    middle = float(np.partition(upper, n_sampled // 2)[n_sampled // 2])
    share = (np.count_nonzero(distances < middle, axis=1) - (0.0 < middle)) / (s - 1)  # the diagonal's zero
    error = np.sqrt(4.0 * float(share.var()) / s + 1.0 / n_sampled)
    half = min(WINDOW_Z * error + WINDOW_MARGIN, capacity / (2.0 * n_pairs))
    k_lo = int(np.floor((0.5 - half) * (n_sampled - 1)))
    k_hi = int(np.ceil((0.5 + half) * (n_sampled - 1)))
    kth = [k for k in (k_lo, k_hi) if 0 <= k < n_sampled]
    ordered = np.partition(upper, kth) if kth else upper
    lo = float(ordered[k_lo]) if k_lo >= 0 else -np.inf
    hi = float(ordered[k_hi]) if k_hi < n_sampled else np.inf
    return lo, hi


def _window(blocks: list[RowBlock], stats: GroupStats, sample: WindowSample) -> Window:
    """The window of every draw, from the distances of the sampled rows (one Gram product of ``s`` rows)."""
    spec = stats.spec
    lo, hi = np.empty(len(stats.m)), np.empty(len(stats.m))
    for d in range(len(stats.m)):
        x = np.concatenate([block[d][local] for block, local in zip(blocks, sample.local, strict=True)])
        g, norms, _ = accurate_gram(x, None, stats.shift(d, sample.rows), None, spec.error_bound)
        degenerate = stats.degenerate[d][sample.rows]
        distances = spec.distances(g, norms, norms, int(stats.m[d]), sd=float(stats.sd[d]),
                                   degenerate_a=degenerate, degenerate_b=degenerate)
        # estimate_window is looked up when the task runs, so that a test can force a window that misses
        lo[d], hi[d] = estimate_window(distances, sample.n_pairs, sample.capacity)
    return Window(lo, hi)


def _pair_window(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair, window: Window
                 ) -> WindowPart:
    """A block pair's distances against the window, strip by strip: counts, and the few values inside."""
    counts = np.zeros((len(stats.m), 4), dtype=np.int64)
    inside: list[list[np.ndarray]] = [[] for _ in range(len(stats.m))]
    for d, values in iter_upper_strips(block_a, block_b, stats, pair):
        lo, hi = window.lo[d], window.hi[d]
        below, above = np.count_nonzero(values < lo), np.count_nonzero(values > hi)
        counts[d, 0] += below
        counts[d, 3] += above
        if below + above == values.size:
            continue
        kept = values[(values >= lo) & (values <= hi)]
        at_lo = np.count_nonzero(kept == lo)
        counts[d, 1] += at_lo
        if lo == hi:
            continue
        at_hi = np.count_nonzero(kept == hi)
        counts[d, 2] += at_hi
        if at_lo + at_hi < kept.size:
            inside[d].append(kept[(kept > lo) & (kept < hi)])
    return WindowPart(counts, tuple(np.concatenate(v) if v else np.empty(0) for v in inside))


def _select_in_window(parts: list[WindowPart], window: Window, n_pairs: int) -> np.ndarray:
    """Per draw: the median, when the middle ranks fall in the window; NaN where they do not (the fallback's)."""
    out = np.full(window.lo.size, np.nan)
    for d in range(window.lo.size):
        below, at_lo, at_hi, above = (int(c) for c in np.sum([p.counts[d] for p in parts], axis=0))
        inside = np.concatenate([p.inside[d] for p in parts])
        if below + at_lo + inside.size + at_hi + above != n_pairs:
            raise RuntimeError(f"the window's counts add up to {below + at_lo + inside.size + at_hi + above} of "
                               f"{n_pairs} pairs")
        ranks = [k - below for k in _middle_ranks(n_pairs)]
        if ranks[0] < 0 or ranks[1] >= at_lo + inside.size + at_hi:
            continue  # missed
        kth = sorted({k - at_lo for k in ranks if 0 <= k - at_lo < inside.size})
        ordered = np.partition(inside, kth) if kth else inside
        low, high = (_in_window(k, window.lo[d], at_lo, ordered, window.hi[d]) for k in ranks)
        out[d] = _middle(low, high, n_pairs)
    return out


def _in_window(k: int, lo: float, at_lo: int, ordered: np.ndarray, hi: float) -> float:
    """The value of rank ``k`` among a window's values: ``at_lo`` times ``lo``, then ``ordered`` (partitioned at
    ``k - at_lo``), then ``hi``."""
    if k < at_lo:
        return float(lo)
    if k - at_lo < ordered.size:
        return float(ordered[k - at_lo])
    return float(hi)


# --------------------------------------------------------------------------- the fallback
def _key(values: np.ndarray) -> np.ndarray:
    # float64 -> float32 rounding is monotone and non-negative floats order like their bits (+0.0 only, see
    # DistanceSpec.distances): a key never decreases with the value
    key: np.ndarray = values.astype(np.float32).view(np.uint32) >> _KEY_SHIFT
    return key


def _gate(block: RowBlock, first: np.ndarray) -> RowBlock | None:
    """The row block after a miss, else nothing (the fallback's tasks then fetch and compute nothing)."""
    return block if np.isnan(first).any() else None


def _missed(first: np.ndarray) -> list[int]:
    return [int(d) for d in np.flatnonzero(np.isnan(first))]


def _pair_fallback_hist(block_a: RowBlock | None, block_b: RowBlock | None, stats: GroupStats, pair: BlockPair,
                        first: np.ndarray) -> np.ndarray | None:
    """Per missed draw: the histogram of the pair's distances' keys."""
    if block_a is None or block_b is None:
        return None
    missed = _missed(first)
    out = np.zeros((len(missed), _KEY_BINS), dtype=np.int64)
    for i, d in enumerate(missed):
        keys = [_key(values).ravel() for _, values in iter_upper_strips(block_a, block_b, stats, pair, draws=[d])]
        out[i] = np.bincount(np.concatenate(keys), minlength=_KEY_BINS)
    return out


def _sum_hists(parts: Sequence[np.ndarray | None]) -> np.ndarray | None:
    held = [p for p in parts if p is not None]
    if not held:
        return None
    out = held[0]
    for p in held[1:]:
        out = out + p
    return out


def _fallback_targets(hist: np.ndarray | None, n_pairs: int) -> np.ndarray | None:
    """Per missed draw: the keys of the two middle ranks."""
    if hist is None:
        return None
    ranks = np.array(_middle_ranks(n_pairs))
    return np.stack([np.searchsorted(np.cumsum(h), ranks + 1) for h in hist])


def _pair_fallback_values(block_a: RowBlock | None, block_b: RowBlock | None, stats: GroupStats, pair: BlockPair,
                          first: np.ndarray, targets: np.ndarray | None
                          ) -> list[tuple[int, np.ndarray, np.ndarray]] | None:
    """Per missed draw: the count of the pair's distances below the target keys, and the distinct values (with
    their counts) of those in them."""
    if block_a is None or block_b is None or targets is None:
        return None
    out = []
    for (t_lo, t_hi), d in zip(targets, _missed(first), strict=True):
        below, kept = 0, []
        for _, values in iter_upper_strips(block_a, block_b, stats, pair, draws=[d]):
            keys = _key(values)
            below += int(np.count_nonzero(keys < t_lo))
            chosen = (keys >= t_lo) & (keys <= t_hi)
            if chosen.any():
                kept.append(values[chosen])
        distinct, counts = np.unique(np.concatenate(kept) if kept else np.empty(0), return_counts=True)
        out.append((below, distinct, counts))
    return out


def _median(first: np.ndarray, parts: list[list[tuple[int, np.ndarray, np.ndarray]] | None], n_pairs: int
            ) -> np.ndarray:
    """The window's medians, with those it missed taken from the fallback's values."""
    missed = _missed(first)
    if not missed:
        return first
    out = first.copy()
    for i, d in enumerate(missed):
        held = [p[i] for p in parts if p is not None]
        below = sum(b for b, _, _ in held)
        values = np.concatenate([v for _, v, _ in held])
        order = np.argsort(values, kind="stable")
        values, cumulative = values[order], np.cumsum(np.concatenate([c for _, _, c in held])[order])
        middle = []
        for k in _middle_ranks(n_pairs):
            if not 0 <= k - below < (cumulative[-1] if cumulative.size else 0):
                raise RuntimeError(f"the fallback's bins do not hold rank {k} of {n_pairs} (distances changed "
                                   "between passes: a non-deterministic BLAS?)")
            middle.append(float(values[np.searchsorted(cumulative, k - below + 1)]))
        out[d] = _middle(middle[0], middle[1], n_pairs)
    return out


# --------------------------------------------------------------------------- graph
def _window_sample(group: GroupBlocks) -> WindowSample:
    rows = window_sample_rows(group.n)
    local = tuple(rows[(rows >= lo) & (rows < hi)] - lo for lo, hi in group.bounds)
    capacity = max(1, MEDIAN_WINDOW_BYTES // (8 * group.task.n_draws))
    return WindowSample(local, rows, group.n_pairs, capacity)


def add_median(graph: GraphBuilder, group: GroupBlocks, index: tuple[int, ...]) -> Key:
    """Add the median of every draw of a set that spans several row blocks; returns the key of the per-draw values.

    Collected when the pairs' distances fit in :data:`MEDIAN_IN_MEMORY_BYTES`, else one pass with a window (and its
    fallback, which computes nothing when the window holds the middle ranks).
    """
    n_pairs, n_draws = group.n_pairs, group.task.n_draws
    if n_pairs * n_draws * 8 <= MEDIAN_IN_MEMORY_BYTES:
        return graph.add("median", index, _median_of_parts, group.add_pair_tasks(graph, "pair-values", index,
                                                                                 _pair_upper_values))
    spec = group.task.spec
    if not spec.non_negative:
        raise ValueError(
            f"set {group.name!r} has {n_pairs} pairs, too many to collect: its median's fallback orders distances "
            f"by their bits, which needs non-negative distances, and norm={spec.norm!r}, metric={spec.metric!r} "
            "can be negative; use reduction='mean'"
        )
    window = graph.add("median-window", index, _window, list(group.blocks), group.stats, _window_sample(group))
    parts = group.add_pair_tasks(graph, "median-pair", index, _pair_window, extra=[window])
    first = graph.add("median-window-select", index, _select_in_window, parts, window, n_pairs)
    gated = [graph.add("median-gate", (*index, b), _gate, block, first) for b, block in enumerate(group.blocks)]
    hists = [graph.add("median-fallback-hist", (*index, a, b), _pair_fallback_hist, gated[a], gated[b], group.stats,
                       group.pair(a, b), first) for a, b in group.pairs()]
    hist = graph.reduce("median-fallback-hist-total", index, hists, _sum_hists)
    targets = graph.add("median-fallback-targets", index, _fallback_targets, hist, n_pairs)
    values = [graph.add("median-fallback-values", (*index, a, b), _pair_fallback_values, gated[a], gated[b],
                        group.stats, group.pair(a, b), first, targets) for a, b in group.pairs()]
    return graph.add("median", index, _median, first, values, n_pairs)
