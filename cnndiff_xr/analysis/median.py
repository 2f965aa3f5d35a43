"""Exact medians of a set's pairwise distances, however many pairs it has.

Median convention: for an even number of pairs the median is the mean of the two middle values, as
:func:`numpy.median`. Three paths, by the size of the set:

* a set in one row block: its distances are in one task, whose median is :func:`partition_median` (``np.median``
  bit for bit, without its overhead);
* a set whose pair distances fit in :data:`MEDIAN_IN_MEMORY_BYTES` (64 MiB, all draws; about 4,096 images for one
  draw): every pair task hands over its values, and one task takes :func:`numpy.median` of them
  (:func:`add_median`, "collected");
* larger sets: an exact two-pass radix select over float32 bit patterns (non-negative floats order like their bit
  patterns): pass 1 histograms the high 16 bits of every distance, pass 2 the low 16 bits of those in the bins
  holding the middle ranks, recomputing the distance blocks instead of keeping them; only a bounded block of the RDM
  exists at any time. The result is the float32-rounded middle value(s), within 6e-8 relative of
  :func:`numpy.median` over the float64 distances. It needs distances that are never negative nor ``-0.0``, which
  the distance's spec promises (:attr:`~cnndiff_xr.analysis.metrics.DistanceSpec.non_negative`) or the graph is
  refused.
"""

from __future__ import annotations

import numpy as np

from .blocks import BlockPair, GroupBlocks, GroupStats, RowBlock, iter_pair_values
from .graph import GraphBuilder, Key, sum_parts

__all__ = ["MEDIAN_IN_MEMORY_BYTES", "add_median", "partition_median"]

_BINS = 1 << 16
#: a set whose pair distances (all draws, float64) fit in this many bytes takes the exact
#: median of the collected values; larger sets use the two-pass radix select
MEDIAN_IN_MEMORY_BYTES = 64 * 2**20


def partition_median(values: np.ndarray) -> float:
    """``np.median`` of finite values, bit for bit, without its checks and copies (per draw of many small sets)."""
    k = values.size // 2
    if values.size % 2:
        return float(np.partition(values, k)[k])
    low, high = np.partition(values, (k - 1, k))[k - 1 : k + 1]
    return float(0.5 * (low + high))


# --------------------------------------------------------------------------- collected
def _pair_upper_values(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair
                       ) -> list[np.ndarray]:
    return [values for _, values in iter_pair_values(block_a, block_b, stats, pair)]


def _median_of_parts(parts: list[list[np.ndarray]]) -> np.ndarray:
    return np.array([np.median(np.concatenate([p[d] for p in parts])) for d in range(len(parts[0]))])


# --------------------------------------------------------------------------- radix select
def _bits(values: np.ndarray) -> np.ndarray:
    # float64 -> float32 rounding is monotone, so ranks survive; +0.0 only (see DistanceSpec.distances)
    return values.astype(np.float32).view(np.uint32)


def _pair_hist_high(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair) -> np.ndarray:
    """Per draw: histogram of the high 16 bits of the pairs' distances."""
    out = np.zeros((len(stats.m), _BINS), dtype=np.int64)
    for d, values in iter_pair_values(block_a, block_b, stats, pair):
        out[d] = np.bincount(_bits(values) >> 16, minlength=_BINS)
    return out


def _pair_hist_low(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair, targets: np.ndarray
                   ) -> np.ndarray:
    """Per draw and middle rank: low-16-bit histogram within the target high bin, plus the
    count below that bin (counted here, so each pass is self-consistent)."""
    out = np.zeros((len(stats.m), 2, _BINS + 1), dtype=np.int64)
    for d, values in iter_pair_values(block_a, block_b, stats, pair):
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
    """Per draw: the high-16-bit bins holding the two middle ranks."""
    ranks = np.array(_middle_ranks(n_pairs))
    return np.stack([np.searchsorted(np.cumsum(h), ranks + 1) for h in hist]).astype(np.uint32)


def _median_from_hist(hist: np.ndarray, targets: np.ndarray, n_pairs: int) -> np.ndarray:
    """Per draw: the median from the low-16-bit histograms of the target bins."""
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


# --------------------------------------------------------------------------- graph
def add_median(graph: GraphBuilder, group: GroupBlocks, index: tuple[int, ...]) -> Key:
    """Add the median of every draw of a set that spans several row blocks; returns the key of the per-draw values.

    Collected when the pairs' distances fit in :data:`MEDIAN_IN_MEMORY_BYTES`, else the two-pass radix select.
    """
    n_pairs, n_draws = group.n_pairs, group.task.n_draws
    if n_pairs * n_draws * 8 <= MEDIAN_IN_MEMORY_BYTES:
        return graph.add("median", index, _median_of_parts, group.add_pair_tasks(graph, "pair-values", index,
                                                                                 _pair_upper_values))
    spec = group.task.spec
    if not spec.non_negative:
        raise ValueError(
            f"set {group.name!r} has {n_pairs} pairs, too many to collect: its median is a radix select over the "
            f"distances' bits, which needs non-negative distances, and norm={spec.norm!r}, metric={spec.metric!r} "
            "can be negative; use reduction='mean'"
        )
    high = graph.reduce("hist-high-total", index, group.add_pair_tasks(graph, "hist-high", index, _pair_hist_high),
                        sum_parts)
    targets = graph.add("median-targets", index, _median_targets, high, n_pairs)
    low = graph.reduce("hist-low-total", index,
                       group.add_pair_tasks(graph, "hist-low", index, _pair_hist_low, extra=[targets]), sum_parts)
    return graph.add("median", index, _median_from_hist, low, targets, n_pairs)
