"""Inference over images: a bootstrap of the image sets, and a permutation test between two sets.

The seed's uncertainty is over unit redraws (``resample``) only. These two functions add the uncertainty over the
*images* (see ``docs/architecture.md``, "Inference over images"):

* :func:`bootstrap_differentiation` resamples each set's images with replacement. Per set, layer and unit draw it
  computes ONE representational dissimilarity matrix (the distances :func:`cnndiff_xr.rdm` gives for that set and
  draw; with ``norm="layer"`` scaled by the set's SD) and then, with no further Gram product, the differentiation of
  every resample: a resample with ``c_i`` copies of original image ``i`` has the pairs ``i < j`` of the original set
  with weight ``c_i * c_j`` (the copies of one image paired with each other are excluded), so its median is a
  weighted median over the sorted upper triangle (:func:`weighted_median`, numpy's convention) and its mean a
  weighted mean. The distances keep the original set's normalisation: the bootstrap varies the images, not the
  scale.
* :func:`compare_sets` tests whether two sets differ in differentiation: per layer and ``n_units``, the difference of
  the two sets' differentiations (mean over unit redraws) against the differences of ``n_permutations`` random
  relabellings of the union's images into groups of the same sizes (two-sided, ``p = (1 + #{|null| >= |obs|}) /
  (1 + n_permutations)``), with a Holm correction over the layers. Every group, permuted or not, is normalised as
  :func:`cnndiff_xr.differentiation` normalises a set (its own mean and SD under ``norm="layer"``), so the null
  distribution is that of the statistic actually reported. Per draw, the union's float64 Gram matrix of shifted
  vectors is formed once; each group's distances follow from it, its row sums and the group's scalar shift and SD
  (:class:`_UnionGram`), through the group's :class:`~cnndiff_xr.analysis.metrics.DistanceSpec`.

Seeds. Unit draws are those of :func:`cnndiff_xr.differentiation` with the same ``seed`` (every set, every
permutation and every bootstrap sample sees the same units). Image resamples of a set use
``SeedSequence([seed, blake2b_8(set), BOOTSTRAP_TAG])`` (:func:`bootstrap_seed`), the permutations of a comparison
``SeedSequence([seed, blake2b_8(a), blake2b_8(b), PERMUTATION_TAG])`` (:func:`permutation_seed`): the same in every
process and Python version, and the same for every layer and draw (so both are *paired* across layers and unit
draws). Both are generated inside the tasks from these few numbers, never shipped as arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.graph_manipulation import clone

from ..options import CONSTANT_POLICIES, REDUCTIONS, UNIT_TYPES, ConstantPolicy, Metric, Norm, Reduction, UnitType
from ..schema import FILTER_DIM, IMAGE_DIM, SET_COORD
from ..validation import (
    ParameterTypeError,
    ParameterValueError,
    check_choice,
    check_count,
    check_n_units,
)
from .blocks import (
    BlockPair,
    GroupBlocks,
    GroupStats,
    OneBlock,
    RowBlock,
    build_groups,
    check_rows,
    iter_distance_blocks,
    one_block_distances,
)
from .collection import Collection, as_collection
from .differentiation import analysis_memory, draw_groups, settings_attrs
from .draws import DrawTable, UnitPlan, draw_table
from .gram import GRAM_BLOCK_COLUMNS, ROW_CSS, ROW_MAX, ROW_MIN, ROW_SQUARES, ROW_SUM, Shift, upper_triangle
from .graph import GraphBuilder, Key
from .median import partition_median
from .metrics import DistanceSpec, distance_spec

__all__ = [
    "BOOTSTRAP_TAG",
    "PERMUTATION_TAG",
    "bootstrap_differentiation",
    "bootstrap_seed",
    "compare_sets",
    "holm",
    "image_resamples",
    "permutation_seed",
    "resample_counts",
    "set_permutations",
    "weighted_median",
]

#: the last word of a set's bootstrap seed sequence ("boot"): keeps its stream apart from the unit draws'
BOOTSTRAP_TAG = 0x626F6F74
#: the last word of a comparison's permutation seed sequence ("perm")
PERMUTATION_TAG = 0x7065726D
#: elements of the ``(bootstraps, pairs)`` int64 weight matrix handled at a time (32 MiB)
_WEIGHT_ELEMENTS = 2**22
#: relative tolerance of the permutation p-value's comparison ``|null| >= |obs|`` (as scipy.stats.permutation_test:
#: a relabelling that reproduces the observed groups must count, whatever the rounding of its sums)
P_VALUE_RTOL = 100 * float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- seeds, resamples and permutations
def _digest(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(str(name).encode("utf-8"), digest_size=8).digest(), "little")


def bootstrap_seed(seed: int, set_name: str) -> np.random.SeedSequence:
    """The seed sequence of a set's image resamples: ``SeedSequence([seed, blake2b_8(set_name), BOOTSTRAP_TAG])``,
    the same in every process and Python version (as :func:`cnndiff_xr.sampling.unit_seed`)."""
    return np.random.SeedSequence([int(seed), _digest(set_name), BOOTSTRAP_TAG])


def permutation_seed(seed: int, a: str, b: str) -> np.random.SeedSequence:
    """The seed sequence of the permutations comparing set ``a`` with set ``b`` (in that order):
    ``SeedSequence([seed, blake2b_8(a), blake2b_8(b), PERMUTATION_TAG])``."""
    return np.random.SeedSequence([int(seed), _digest(a), _digest(b), PERMUTATION_TAG])


def image_resamples(n_images: int, n_boot: int, *, seed: int, set_name: str) -> np.ndarray:
    """The bootstrap resamples of a set of ``n_images`` images: ``(n_boot, n_images)`` int64 positions within the set
    (in sample order), drawn uniformly with replacement from :func:`bootstrap_seed`.

    Row ``b`` is the same whatever ``n_boot`` (the rows are drawn one after the other from one generator), so a
    larger ``n_boot`` extends a smaller one."""
    rng = np.random.default_rng(bootstrap_seed(seed, set_name))
    return rng.integers(0, n_images, size=(n_boot, n_images), dtype=np.int64)


def resample_counts(resamples: np.ndarray, n_images: int) -> np.ndarray:
    """Copies of each original image in each resample: ``(n_boot, n_images)`` int64 from
    :func:`image_resamples`' positions."""
    n_boot = resamples.shape[0]
    flat = (resamples + np.arange(n_boot, dtype=np.int64)[:, None] * n_images).ravel()
    return np.bincount(flat, minlength=n_boot * n_images).reshape(n_boot, n_images)


def set_permutations(n_a: int, n_b: int, n_permutations: int, *, seed: int, a: str, b: str) -> np.ndarray:
    """The relabellings of a comparison: ``(n_permutations, n_a + n_b)`` int64, each row a permutation of the union's
    positions (set ``a``'s images first, then ``b``'s, each in sample order); the first ``n_a`` entries of a row form
    the permuted group ``a``, the rest the permuted ``b``. Drawn one row after the other from
    :func:`permutation_seed`, so a larger ``n_permutations`` extends a smaller one."""
    rng = np.random.default_rng(permutation_seed(seed, a, b))
    return np.stack([rng.permutation(n_a + n_b) for _ in range(n_permutations)]) if n_permutations else \
        np.empty((0, n_a + n_b), np.int64)


# --------------------------------------------------------------------------- weighted reductions
def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The median of ``values`` repeated ``weights`` times, numpy's convention (the mean of the two middle values
    when the total weight is even): ``np.median(np.repeat(values, w))`` bit for bit, without the repeat.

    Parameters
    ----------
    values
        ``(n,)`` finite values, in any order.
    weights
        ``(n,)`` or ``(k, n)`` non-negative integer weights (one row per weighting).

    Returns
    -------
    numpy.ndarray
        ``()`` or ``(k,)`` float64; NaN for a zero total weight (as ``np.median`` of nothing, without its warning).
    """
    values = np.asarray(values, np.float64)
    w = np.asarray(weights)
    order = np.argsort(values, kind="stable")
    out = _sorted_weighted(values[order], np.atleast_2d(w)[:, order], "median")
    return out if w.ndim == 2 else out[0]


def _sorted_weighted(sorted_values: np.ndarray, w: np.ndarray, reduction: Reduction) -> np.ndarray:
    """Weighted median (or mean) of ascending ``sorted_values`` for each row of integer weights ``w``."""
    out = np.full(w.shape[0], np.nan)
    if reduction == "mean":
        total = w.sum(axis=1)
        has = total > 0
        out[has] = (w[has].astype(np.float64) @ sorted_values) / total[has]
        return out
    # int32 halves the memory traffic of the weights (the cost of a bootstrap) where no sum can overflow it
    cum = np.cumsum(w, axis=1, dtype=w.dtype if w.dtype == np.int32 else np.int64)
    for k in range(w.shape[0]):
        total = int(cum[k, -1]) if cum.shape[1] else 0
        if total == 0:
            continue
        # the value of rank r (0-based) of the expanded list is the first whose cumulative weight exceeds r
        lo, hi = np.searchsorted(cum[k], [(total - 1) // 2, total // 2], side="right")
        out[k] = 0.5 * (sorted_values[lo] + sorted_values[hi])  # exact for lo == hi: 0.5 * (2 v) = v
    return out


def _bootstrap_pairs(values: np.ndarray, i: np.ndarray, j: np.ndarray, counts: np.ndarray,
                     reduction: Reduction) -> np.ndarray:
    """Median (or mean) of the pairs ``(i, j)`` with distances ``values`` under every resample's weights
    ``counts[b, i] * counts[b, j]``; ``(n_boot,)``."""
    order = np.argsort(values, kind="stable")
    v, ii, jj = values[order], i[order], j[order]
    n_boot, n_images = counts.shape
    # every resample's total weight is sum_{i<j} c_i c_j <= n_images^2 / 2: int32 holds every partial sum below
    small = n_images * n_images // 2 < np.iinfo(np.int32).max
    counts = counts.astype(np.int32) if small else counts
    out = np.empty(n_boot)
    step = max(1, _WEIGHT_ELEMENTS // max(1, v.size))
    for lo in range(0, n_boot, step):
        c = counts[lo : lo + step]
        out[lo : lo + step] = _sorted_weighted(v, c[:, ii] * c[:, jj], reduction)
    return out


def holm(p: np.ndarray, axis: int = 0) -> np.ndarray:
    """Holm's step-down adjusted p-values along ``axis`` (each family is a slice along it):
    ``p_(k) -> max_{j <= k} min(1, (L - j + 1) p_(j))`` for the ascending ``p_(1..L)``, mapped back."""
    p = np.moveaxis(np.asarray(p, np.float64), axis, -1)
    n = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1) * (n - np.arange(n))
    adjusted = np.minimum(np.maximum.accumulate(ranked, axis=-1), 1.0)
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, axis=-1)
    return np.moveaxis(out, -1, axis)


# --------------------------------------------------------------------------- shared graph pieces
def _draw_ranges(coll: Collection, layer_names: Sequence[str], tables: Sequence[DrawTable], n_rows: int
                 ) -> list[list[tuple[int, int]]]:
    """Per layer, the ranges of distinct draws whose gathered data fit the memory budget (as differentiation)."""
    budget = analysis_memory()
    return [draw_groups(table, n_rows, coll.layer(name).data.dtype, budget)
            for name, table in zip(layer_names, tables, strict=True)]


def _layer_groups(graph: GraphBuilder, coll: Collection, name: str, li: int, groups: Mapping[str, np.ndarray],
                  table: DrawTable, ranges: Sequence[tuple[int, int]], *, spec: DistanceSpec,
                  constant: ConstantPolicy, block_size: int | None
                  ) -> Iterator[tuple[int, int, DrawTable, list[GroupBlocks]]]:
    """Per draw range of a layer: ``(j, first draw, its table, the groups' row blocks)``, each later range reading
    the layer again through a clone of its reads (as :func:`cnndiff_xr.differentiation`)."""
    layer = coll.layer(name)
    for j, (lo, hi) in enumerate(ranges):
        sub = table if (lo, hi) == (0, table.n_draws) else dataclasses.replace(
            table, keys=table.keys[lo:hi], index=np.arange(hi - lo)[None, :])
        source = layer if j == 0 else dataclasses.replace(
            layer, array=layer.array.copy(data=clone(layer.data, seed=(graph.name, li, j))))
        yield j, lo, sub, build_groups(graph, coll, source, groups, sub, spec=spec, constant=constant,
                                       block_size=block_size, index=(li, j))


def _common_coords(coll: Collection, layer_names: Sequence[str], tables: Sequence[DrawTable],
                   n_list: Sequence[int], resamples: int) -> dict[str, object]:
    all_names = list(coll.layers)
    return {
        "layer": list(layer_names),
        "n_units": list(n_list),
        "resample": np.arange(resamples),
        "n_units_used": (("layer", "n_units"), np.array([t.n_used for t in tables], dtype=np.int64)),
        "layer_size": ("layer", np.array([coll.layer(n).size for n in layer_names], dtype=np.int64)),
        "layer_index": ("layer", np.array([all_names.index(n) for n in layer_names])),
    }


def _check_options(*, norm: str, metric: str, constant: str, unit_type: str, reduction: str, n_units: object,
                   resamples: object, seed: object, block_size: object
                   ) -> tuple[DistanceSpec, tuple[int, ...], int, int, int | None]:
    """The options shared with :func:`cnndiff_xr.differentiation`, checked as it checks them."""
    spec = distance_spec(norm, metric)
    check_choice("constant", constant, CONSTANT_POLICIES)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    n_list = check_n_units(n_units)  # type: ignore[arg-type]  # checked there
    resamples = check_count("resamples", resamples, 1)
    seed = check_count("seed", seed, 0)
    size = None if block_size is None else check_count("block_size", block_size, 2)
    return spec, n_list, resamples, seed, size


# --------------------------------------------------------------------------- bootstrap tasks
@dataclass(frozen=True)
class ImageResampling:
    """Static data of a set's bootstrap: enough to regenerate its resamples in any process."""

    seed: int
    set_name: str
    n_images: int
    n_boot: int
    reduction: Reduction

    def counts(self) -> np.ndarray:
        return resample_counts(image_resamples(self.n_images, self.n_boot, seed=self.seed, set_name=self.set_name),
                               self.n_images)


@dataclass(frozen=True, eq=False)
class OneBlockBootstrap:
    """Static data of the single bootstrap task of a set in one row block."""

    block: OneBlock
    resampling: ImageResampling


def _one_block_bootstrap(parts: list[np.ndarray], plan: UnitPlan, task: OneBlockBootstrap) -> np.ndarray:
    """Every draw's RDM of a set in one row block (the task :func:`cnndiff_xr.rdm` runs) and its bootstrap:
    ``(draws, n_boot)``."""
    counts = task.resampling.counts()
    n = task.resampling.n_images
    i, j = np.triu_indices(n, 1)
    out = np.empty((task.block.group.n_draws, task.resampling.n_boot))
    for d, values in one_block_distances(parts, plan, task.block):
        out[d] = _bootstrap_pairs(values[i, j], i, j, counts, task.resampling.reduction)
    return out


def _pair_distances(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair, d: int
                    ) -> np.ndarray:
    ((_, out),) = iter_distance_blocks(block_a, block_b, stats, pair, [d])
    return out


@dataclass(frozen=True)
class BlockBootstrap:
    """Static data of the bootstrap of one draw of a set spread over several row blocks: the block pairs (in the
    order of the task's arguments) and the resampling."""

    pairs: tuple[BlockPair, ...]
    resampling: ImageResampling


def _blocks_bootstrap(blocks: list[np.ndarray], task: BlockBootstrap) -> np.ndarray:
    """The bootstrap of one draw from its distance blocks: ``(1, n_boot)``."""
    values, rows, cols = [], [], []
    for out, pair in zip(blocks, task.pairs, strict=True):
        (lo_a, hi_a), (lo_b, hi_b) = pair.rows_a, pair.rows_b
        if pair.same:
            i, j = np.triu_indices(hi_a - lo_a, 1)
            values.append(out[i, j])
        else:
            i, j = (g.ravel() for g in np.meshgrid(np.arange(hi_a - lo_a), np.arange(hi_b - lo_b), indexing="ij"))
            values.append(out.ravel())
        rows.append(i + lo_a)
        cols.append(j + lo_b)
    return _bootstrap_pairs(np.concatenate(values), np.concatenate(rows), np.concatenate(cols),
                            task.resampling.counts(), task.resampling.reduction)[None]


def _draw_values(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Every set's values of one draw range (a task that needs them all: dask then finishes a range first)."""
    return parts


def _bootstrap_chunk(parts: list[np.ndarray], index: np.ndarray) -> np.ndarray:
    """Distinct draws' ``(draws, n_boot)`` values -> one ``(1, 1, n_units, resample, n_boot)`` output chunk."""
    return np.concatenate(parts)[index][None, None]


def _set_of_range(values: list[np.ndarray], g: int) -> np.ndarray:
    return values[g]


def bootstrap_differentiation(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    n_units: int | Sequence[int] = (200, 10000),
    *,
    n_boot: int = 1000,
    seed: int = 0,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    reduction: Reduction = "median",
    resamples: int = 10,
    layers: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
    constant: ConstantPolicy = "raise",
    block_size: int | None = None,
) -> xr.DataArray:
    """Differentiation of image sets resampled with replacement: a ``bootstrap`` dimension over images.

    Per set, layer and unit draw, one RDM (the distances of :func:`cnndiff_xr.rdm` of that set and draw; under
    ``norm="layer"`` scaled by the set's SD, so the median of its upper triangle is the
    :func:`cnndiff_xr.differentiation` value) and then ``n_boot`` resamples of the set's images with replacement,
    each the weighted median (or mean) of the original pairs ``i < j`` with weight ``c_i * c_j``, ``c_i`` the copies
    of image ``i`` in the resample: the pairs of two copies of one image are excluded (their distance is 0 by
    construction, not a property of the images). No Gram product per bootstrap sample. The distances keep the
    original set's normalisation (its SD), so only the images vary.

    Parameters
    ----------
    tree, n_units, unit_type, norm, metric, reduction, resamples, layers, sets, sample_dim, set_coord, filter_dim,
    constant, block_size
        As :func:`cnndiff_xr.differentiation`.
    n_boot
        Image resamples per set.
    seed
        The unit draws' seed (as :func:`cnndiff_xr.differentiation`) and the image resamples' seed: a set's
        resamples come from :func:`bootstrap_seed` ``(seed, set name)``, the same for every layer and unit draw of
        the set, so the bootstrap is **paired across layers and draws** (sample ``b`` of a set is the same images
        everywhere: differences between layers can be bootstrapped sample by sample). Different sets get
        independent resamples.

    Returns
    -------
    xarray.DataArray
        ``bootstrap_differentiation`` with dims ``(set, layer, n_units, resample, bootstrap)`` and the coordinates of
        :func:`cnndiff_xr.differentiation`; attributes add ``n_boot`` and the seed rule. Lazy (dask). A resample
        with a single distinct image has no pair: NaN (a set of 2 images gets one in two resamples). Summarise with
        ``cx.resample_summary(b, dim="bootstrap")`` (percentile intervals over images), after averaging over
        ``resample`` if the interval should be over images alone.

    Notes
    -----
    Cost: the RDMs of one differentiation, plus per draw a sort of the set's ``n (n - 1) / 2`` distances and
    ``n_boot`` weighted passes over them (``O(n_boot n^2)``). A set spread over several row blocks gathers each
    draw's whole RDM in one task (``n^2 / 2`` float64 and its pair indices).
    """
    spec, n_list, resamples, seed, block_size = _check_options(
        norm=norm, metric=metric, constant=constant, unit_type=unit_type, reduction=reduction, n_units=n_units,
        resamples=resamples, seed=seed, block_size=block_size)
    n_boot = check_count("n_boot", n_boot, 1)
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    layer_names = coll.layer_names(layers)
    groups = coll.rows(sets, min_size=2)
    tables = [draw_table(coll.layer(name), n_list, resamples, unit_type=unit_type, seed=seed, filter_dim=filter_dim)
              for name in layer_names]
    n_rows = int(np.unique(np.concatenate(list(groups.values()))).size)
    ranges = _draw_ranges(coll, layer_names, tables, n_rows)
    token = tokenize(
        [coll.layer(name).data.name for name in layer_names], tables, list(groups), list(groups.values()), spec,
        reduction, constant, block_size, coll.completed_token(), ranges, n_boot, seed, "bootstrap-v1",
    )
    graph = GraphBuilder(f"bootstrap-differentiation-{token}")
    resampling = [ImageResampling(seed, name, int(rows.size), n_boot, reduction) for name, rows in groups.items()]
    for li, (name, table) in enumerate(zip(layer_names, tables, strict=True)):
        per_range: list[Key] = []  # per draw range: every set's values
        per_set: list[list[Key]] = [[] for _ in groups]  # with a single range: per set, its values' keys
        for j, _, sub, blocks in _layer_groups(graph, coll, name, li, groups, table, ranges[li], spec=spec,
                                               constant=constant, block_size=block_size):
            values: list[Key] = []
            for g, group in enumerate(blocks):
                if group.in_one_block:
                    chunks, block = group.one_block()
                    keys = [graph.add("boot-one", (li, j, g), _one_block_bootstrap, chunks, group.plan,
                                      OneBlockBootstrap(block, resampling[g]))]
                else:
                    pairs = list(group.pairs())
                    keys = []
                    for d in range(sub.n_draws):
                        distance_keys = [graph.add("boot-pair", (li, j, g, d, a, b), _pair_distances,
                                                   group.blocks[a], group.blocks[b], group.stats, group.pair(a, b), d)
                                         for a, b in pairs]
                        task = BlockBootstrap(tuple(group.pair(a, b) for a, b in pairs), resampling[g])
                        keys.append(graph.add("boot-draw", (li, j, g, d), _blocks_bootstrap, distance_keys, task))
                if len(ranges[li]) == 1:
                    per_set[g] = keys
                else:
                    values.append(graph.add("boot-set", (li, j, g), np.concatenate, keys))
            if len(ranges[li]) > 1:
                per_range.append(graph.add("draw-group", (li, j), _draw_values, values))
        for g in range(len(groups)):
            parts: list[Key] = per_set[g] if len(ranges[li]) == 1 else [
                graph.add("boot-range", (li, j, g), _set_of_range, key, g) for j, key in enumerate(per_range)]
            graph.output((g, li, 0, 0, 0), _bootstrap_chunk, parts, table.index)
    data = graph.array(((1,) * len(groups), (1,) * len(layer_names), (len(n_list),), (resamples,), (n_boot,)),
                       np.float64)
    return xr.DataArray(
        data,
        dims=("set", "layer", "n_units", "resample", "bootstrap"),
        coords={
            "set": list(groups),
            **_common_coords(coll, layer_names, tables, n_list, resamples),
            "bootstrap": np.arange(n_boot),
            "n_images": ("set", np.array([rows.size for rows in groups.values()])),
        },
        name="bootstrap_differentiation",
        attrs={
            **settings_attrs(unit_type=unit_type, norm=norm, metric=metric, reduction=reduction, seed=seed,
                             constant=constant),
            "n_boot": n_boot,
            "bootstrap": "images of each set resampled with replacement; pairs of copies of one image excluded; "
                         "distances of the original set (its normalisation); weighted median over its RDM",
            "bootstrap_seed": "SeedSequence([seed, blake2b_8(set), 0x626F6F74]): the same resamples for every "
                              "layer and unit draw of a set",
        },
    )


# --------------------------------------------------------------------------- the union's Gram (compare_sets)
class _UnionGram:
    """One draw of the union of two sets: float64 row statistics (``row_stats``' layout), the centroid, and the Gram
    matrix ``B`` of the rows shifted by the union's own :class:`~cnndiff_xr.analysis.gram.Shift` under ``spec``,
    with the shifted rows' sums.

    Any group of the union is then one Gram away from ``B`` without touching the data again: a group's shift
    differs from the union's by a scalar per row (``e_i``: a different layer mean, cosine under ``"layer"``; row
    means are per row, hence the same), or by a common vector under the Euclidean specs, whose distances do not
    depend on it (the centroid is passed for every group), so
    ``(y_i + e_i)(y_j + e_j) = B_ij + e_j t_i + e_i t_j + m e_i e_j`` with ``t`` the shifted row sums.
    """

    def __init__(self, x: np.ndarray, spec: DistanceSpec):
        n, m = x.shape
        self.spec, self.m = spec, m
        width = min(m, GRAM_BLOCK_COLUMNS)
        s, low, high = np.zeros(n), np.full(n, np.inf), np.full(n, -np.inf)
        column_sums = np.zeros(m)
        with np.errstate(invalid="ignore", over="ignore"):
            for lo in range(0, m, width):
                block = x[:, lo : lo + width].astype(np.float64)
                s += block.sum(axis=1)
                np.minimum(low, block.min(axis=1), out=low)
                np.maximum(high, block.max(axis=1), out=high)
                column_sums[lo : lo + width] = block.sum(axis=0)
            self.centroid = column_sums / n
            stats = np.zeros((5, n))
            stats[ROW_SUM], stats[ROW_MIN], stats[ROW_MAX] = s, low, high
            row_means = s / m
            self.shift = spec.row_shift(stats, m, float(row_means.mean()), self.centroid)
            css, gram, sums = np.zeros(n), np.zeros((n, n)), np.zeros(n)
            buf = np.empty((n, width))
            for lo in range(0, m, width):
                cols = slice(lo, min(lo + width, m))
                block = x[:, cols].astype(np.float64)
                centred = block - row_means[:, None]
                css += np.einsum("ij,ij->i", centred, centred)
                y = self.shift.apply(x, cols, buf[:, : cols.stop - lo])
                gram += y @ y.T
                sums += y.sum(axis=1)
        css[low == high] = 0.0
        stats[ROW_CSS], stats[ROW_SQUARES] = css, css + s * s / m
        self.stats, self.gram, self.sums = stats, gram, sums

    def _offsets(self, rows: np.ndarray, shift: Shift) -> np.ndarray | None:
        """``e``: what the group's shift subtracts less than the union's, per row; None when nothing."""
        base = self.shift
        if np.ndim(shift.common) or np.ndim(base.common):  # a common vector: the Euclidean centroid rule
            if not (np.ndim(shift.common) and np.ndim(base.common) and shift.common is base.common):
                raise NotImplementedError(
                    f"{self.spec.key}: a group's common shift vector must be the union's (distances from squared "
                    "norms do not depend on it); a new distance spec with another vector shift needs its own rule here")
            e = np.zeros(rows.size)
        else:
            e = np.full(rows.size, float(base.common) - float(shift.common))
        if (base.rows is None) != (shift.rows is None):
            raise NotImplementedError(f"{self.spec.key}: a group shifted by row offsets the union's shift lacks")
        if base.rows is not None and shift.rows is not None:
            e += base.rows[rows] - shift.rows
        return e if np.any(e) else None

    def group_value(self, rows: np.ndarray, reduction: Reduction, constant: ConstantPolicy, *, layer: str,
                    group: str, names: np.ndarray) -> float:
        """The differentiation of the union's ``rows`` as a set of its own (its own mean, SD and degenerate rows)."""
        stats = self.stats[:, rows]
        mean, sd, degenerate = check_rows(stats, self.m, self.spec, constant, layer=layer, group=group,
                                          names=names[rows])
        shift = self.spec.row_shift(stats, self.m, mean, self.centroid)
        gram = self.gram[rows[:, None], rows]  # np.ix_'s selection, without its per-call checks
        e = self._offsets(rows, shift)
        if e is not None:
            t = self.sums[rows]
            gram = gram + np.multiply.outer(t, e) + np.multiply.outer(e, t) + self.m * np.multiply.outer(e, e)
        norms = np.diagonal(gram).copy()
        distances = self.spec.distances(gram, norms, norms, self.m, sd=sd, degenerate_a=degenerate,
                                        degenerate_b=degenerate)
        values = distances[upper_triangle(rows.size)]  # one cached index per group size: every relabelling reuses it
        return partition_median(values) if reduction == "median" else float(values.sum() / values.size)


@dataclass(frozen=True, eq=False)
class CompareTask:
    """Static data of the comparison of one draw: the sets, the permutations' seed and the reduction."""

    spec: DistanceSpec
    constant: ConstantPolicy
    reduction: Reduction
    layer: str
    a: str
    b: str
    n_a: int
    n_b: int
    names: np.ndarray  # the union's sample labels (a's then b's), for messages
    seed: int
    n_permutations: int
    draw: int


def _compare_draw(blocks_a: list[RowBlock], blocks_b: list[RowBlock], task: CompareTask) -> np.ndarray:
    """``(1 + n_permutations, 2)``: the two sets' differentiations (row 0) and those of every relabelling."""
    d = task.draw
    x = np.concatenate([block[d] for block in blocks_a] + [block[d] for block in blocks_b])
    union = _UnionGram(x, task.spec)  # non-finite values are refused by the groups' check_rows, naming the set
    out = np.empty((1 + task.n_permutations, 2))

    def value(rows: np.ndarray, group: str) -> float:
        return union.group_value(rows, task.reduction, task.constant, layer=task.layer, group=group,
                                 names=task.names)

    out[0] = value(np.arange(task.n_a), task.a), value(np.arange(task.n_a, x.shape[0]), task.b)
    label = f"{task.a}+{task.b} relabelled"
    perms = set_permutations(task.n_a, task.n_b, task.n_permutations, seed=task.seed, a=task.a, b=task.b)
    for k, perm in enumerate(perms, start=1):
        out[k] = (value(np.sort(perm[: task.n_a]), f"{label} ({task.a}'s size)"),
                  value(np.sort(perm[task.n_a :]), f"{label} ({task.b}'s size)"))
    return out


def _compare_chunk(values: list[np.ndarray], index: np.ndarray) -> np.ndarray:
    """A layer's distinct draws' ``(1 + n_permutations, 2)`` values -> its ``(1, n_units, resample, ...)`` chunk."""
    return np.stack(values)[index][None]


def _p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Two-sided permutation p: ``(1 + #{|null| >= |obs| (1 - P_VALUE_RTOL)}) / (1 + n_permutations)``."""
    hits = (np.abs(null) >= (np.abs(observed) * (1.0 - P_VALUE_RTOL))[..., None]).sum(axis=-1)
    out: np.ndarray = (1.0 + hits) / (1.0 + null.shape[-1])
    return out


def _holm_p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Holm's adjustment over the layers (axis 0) of :func:`_p_values`, all layers in one chunk."""
    return holm(_p_values(observed, null), axis=0)


def _check_set_name(parameter: str, value: object) -> str:
    if not isinstance(value, str):
        raise ParameterTypeError(f"{parameter} must be a set name (str), got {parameter}={value!r}")
    return value


def compare_sets(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    a: str,
    b: str,
    n_units: int | Sequence[int] = (200, 10000),
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    reduction: Reduction = "median",
    resamples: int = 10,
    layers: str | Sequence[str] | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
    constant: ConstantPolicy = "raise",
    block_size: int | None = None,
) -> xr.Dataset:
    """Does set ``a`` differ from set ``b`` in differentiation? A two-sided permutation test per layer.

    The statistic, per layer and ``n_units``: the mean over the unit redraws of ``d_a - d_b``, the two sets'
    :func:`cnndiff_xr.differentiation` values of each draw. Its null distribution: the same statistic for
    ``n_permutations`` relabellings of the union's images into two groups of the sizes of ``a`` and ``b``, each group
    normalised as differentiation normalises a set (its own mean and SD under ``norm="layer"``), with the same unit
    draws for both sets and every relabelling (the draws of a differentiation of both sets: ``"top"`` ranks the
    units over the union's images). Every relabelling is used for every layer, ``n_units`` and draw (paired).

    Parameters
    ----------
    tree
        As :func:`cnndiff_xr.differentiation`.
    a, b
        The two sets (distinct, each of at least 2 images).
    n_units, unit_type, norm, metric, reduction, resamples, layers, sample_dim, set_coord, filter_dim, constant,
    block_size
        As :func:`cnndiff_xr.differentiation`.
    n_permutations
        Relabellings. The smallest possible p is ``1 / (1 + n_permutations)``.
    seed
        The unit draws' seed and the relabellings': :func:`set_permutations` from
        ``SeedSequence([seed, blake2b_8(a), blake2b_8(b), PERMUTATION_TAG])`` (:func:`permutation_seed`; swapping
        ``a`` and ``b`` gives other relabellings).

    Returns
    -------
    xarray.Dataset
        Lazy (dask), with

        * ``difference`` (layer, n_units): the observed statistic;
        * ``difference_per_resample`` (layer, n_units, resample): ``d_a - d_b`` per unit draw;
        * ``differentiation`` (set, layer, n_units, resample): ``d_a`` and ``d_b`` themselves;
        * ``null`` (layer, n_units, permutation): the statistic of every relabelling;
        * ``p_value`` (layer, n_units): ``(1 + #{|null| >= |difference|}) / (1 + n_permutations)`` (``>=`` up to
          a relative ``P_VALUE_RTOL`` of the observed value, as :func:`scipy.stats.permutation_test`, so that a
          relabelling reproducing the observed groups counts);
        * ``p_holm`` (layer, n_units): Holm's adjustment of ``p_value`` over the layers of the call, per
          ``n_units`` (:func:`holm`).

    Notes
    -----
    Per draw, one task holds the union's gathered ``(images, units)`` matrix and its float64 Gram matrix
    (``(n_a + n_b)^2`` float64), formed once; every group's distances then follow from it (:class:`_UnionGram`)
    at ``O(n^2)`` per relabelling, so the permutations cost ``n_permutations`` passes over the union's pairs, not
    Gram products.
    """
    a = _check_set_name("a", a)
    b = _check_set_name("b", b)
    spec, n_list, resamples, seed, block_size = _check_options(
        norm=norm, metric=metric, constant=constant, unit_type=unit_type, reduction=reduction, n_units=n_units,
        resamples=resamples, seed=seed, block_size=block_size)
    n_permutations = check_count("n_permutations", n_permutations, 1)
    if a == b:
        raise ParameterValueError(f"a and b must be two different sets, got a={a!r} and b={b!r}")
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    layer_names = coll.layer_names(layers)
    groups = coll.rows([a, b], min_size=2)
    tables = [draw_table(coll.layer(name), n_list, resamples, unit_type=unit_type, seed=seed, filter_dim=filter_dim)
              for name in layer_names]
    n_a, n_b = int(groups[a].size), int(groups[b].size)
    ranges = _draw_ranges(coll, layer_names, tables, n_a + n_b)
    token = tokenize(
        [coll.layer(name).data.name for name in layer_names], tables, [a, b], list(groups.values()), spec,
        reduction, constant, block_size, coll.completed_token(), ranges, n_permutations, seed, "compare-v1",
    )
    graph = GraphBuilder(f"compare-sets-{token}")
    names = np.concatenate([coll.samples[groups[a]], coll.samples[groups[b]]])
    for li, (name, table) in enumerate(zip(layer_names, tables, strict=True)):
        draw_keys: dict[int, Key] = {}
        for _, first, sub, (group_a, group_b) in _layer_groups(graph, coll, name, li, groups, table, ranges[li],
                                                               spec=spec, constant=constant, block_size=block_size):
            for d in range(sub.n_draws):
                task = CompareTask(spec, constant, reduction, name, a, b, n_a, n_b, names, seed, n_permutations, d)
                draw_keys[first + d] = graph.add("compare-draw", (li, first + d), _compare_draw,
                                                 list(group_a.blocks), list(group_b.blocks), task)
        # one chunk per layer: the distinct draws' values, in (n_units, resample) order
        distinct = sorted(draw_keys)
        graph.output((li, 0, 0, 0, 0), _compare_chunk, [draw_keys[k] for k in distinct],
                     np.searchsorted(distinct, table.index))
    values = graph.array(((1,) * len(layer_names), (len(n_list),), (resamples,), (1 + n_permutations,), (2,)),
                         np.float64)  # (layer, n_units, resample, 1 + permutation, set)
    per_resample = values[..., 0] - values[..., 1]  # (layer, n_units, resample, 1 + permutation)
    statistic = per_resample.mean(axis=2)
    observed, null = statistic[..., 0], statistic[..., 1:]
    # p and its Holm adjustment each from (observed, null), not one from the other: dask 2026.8's blockwise fusion
    # dropped p's chunk when p and map_blocks(holm, p) were computed together ("Missing dependency ('truediv-...')")
    p = da.blockwise(_p_values, "ij", observed, "ij", null, "ijk", concatenate=True, dtype=np.float64)
    p_holm = da.blockwise(_holm_p_values, "ij", observed.rechunk({0: -1}), "ij", null.rechunk({0: -1}), "ijk",
                          concatenate=True, dtype=np.float64)
    coords = _common_coords(coll, layer_names, tables, n_list, resamples)
    return xr.Dataset(
        {
            "difference": (("layer", "n_units"), observed),
            "difference_per_resample": (("layer", "n_units", "resample"), per_resample[..., 0]),
            "differentiation": (("set", "layer", "n_units", "resample"),
                                da.moveaxis(values[..., 0, :], -1, 0)),
            "null": (("layer", "n_units", "permutation"), null),
            "p_value": (("layer", "n_units"), p),
            "p_holm": (("layer", "n_units"), p_holm),
        },
        coords={
            "set": [a, b],
            **coords,
            "permutation": np.arange(n_permutations),
            "n_images": ("set", np.array([n_a, n_b])),
        },
        attrs={
            "a": a,
            "b": b,
            **settings_attrs(unit_type=unit_type, norm=norm, metric=metric, reduction=reduction, seed=seed,
                             constant=constant),
            "n_permutations": n_permutations,
            "statistic": "mean over unit redraws of differentiation(a) - differentiation(b)",
            "p_value": "two-sided: (1 + #{|null| >= |difference|}) / (1 + n_permutations); set labels permuted "
                       "over the union, group sizes kept, each group normalised on its own",
            "p_holm": "Holm's step-down adjustment over the layers, per n_units",
            "permutation_seed": "SeedSequence([seed, blake2b_8(a), blake2b_8(b), 0x7065726D])",
        },
    )

