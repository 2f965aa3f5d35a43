"""Differentiation: the median (or mean) pairwise distance per layer and image set.

The seed's measure (see ``docs/architecture.md``, "Method"): per layer and per image set, the median of
the upper-triangle (i < j) distances between the images' vectors of ``n_units`` sampled
units, z-scored over the layer (``norm="layer"``) with Euclidean distance divided by
``sqrt(n_units)``. Several ``n_units`` values and ``resamples`` independent draws come
back as one lazy array; all of them are served by one read of each image chunk.

A set that fits one row block (``block_size``) is one task from the gathered chunks to its output chunk; larger
sets are reduced over their pairs of row blocks (the median: :mod:`cnndiff_xr.analysis.median`, one pass over the
Gram blocks with a window around a sampled median).

Memory. The draws of a layer are processed in groups whose gathered row blocks fit a budget (:func:`analysis_memory`,
the dask config setting ``"cnndiff_xr.analysis-memory"``; :func:`draw_groups`): one group, hence one read of each
chunk, whenever everything fits; otherwise each group reads the layer again, and the graph makes dask finish one
group before the next starts. The numbers do not depend on the grouping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import numpy as np
import xarray as xr
from dask.base import get_scheduler, tokenize
from dask.graph_manipulation import clone
from dask.utils import parse_bytes

from ..options import CONSTANT_POLICIES, REDUCTIONS, UNIT_TYPES, ConstantPolicy, Metric, Norm, Reduction, UnitType
from ..schema import FILTER_DIM, IMAGE_DIM, SET_COORD
from ..validation import ParameterValueError, check_choice, check_count, check_n_units
from .blocks import (
    BlockPair,
    GroupBlocks,
    GroupStats,
    OneBlock,
    RowBlock,
    build_groups,
    iter_pair_values,
    one_block_distances,
    one_block_medians,
)
from .collection import as_collection
from .draws import DrawTable, UnitPlan, draw_table, make_plan
from .gram import upper_triangle
from .graph import GraphBuilder, Key, sum_parts
from .median import add_median
from .metrics import distance_spec

__all__ = ["DEFAULT_ANALYSIS_MEMORY", "MEMORY_CONFIG", "analysis_memory", "differentiation", "draw_groups"]


@dataclass(frozen=True, eq=False)
class OneBlockReduction:
    """Static data of the single task of a set in one row block: the block, the reduction, and where each
    ``(n_units, resample)`` finds its distinct draw."""

    block: OneBlock
    reduction: Reduction
    n_pairs: int
    draw_index: np.ndarray  # DrawTable.index


def _one_task_values(parts: list[np.ndarray], plan: UnitPlan, task: OneBlockReduction) -> np.ndarray:
    """Median or mean of every draw of a group that fits one row block: the whole group is one task."""
    out = np.empty(task.block.group.n_draws)
    if task.reduction == "median":
        for d, value in one_block_medians(parts, plan, task.block):
            out[d] = value
        return out
    upper = upper_triangle(sum(rows.size for rows in task.block.positions))  # the same pairs for every draw
    for d, values in one_block_distances(parts, plan, task.block):
        out[d] = values[upper].sum() / task.n_pairs
    return out


def _one_task_output(parts: list[np.ndarray], plan: UnitPlan, task: OneBlockReduction) -> np.ndarray:
    """:func:`_one_task_values` straight into the set's output chunk (a layer in one draw group)."""
    return _expand(_one_task_values(parts, plan, task), task.draw_index)


def _pair_sum(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair) -> np.ndarray:
    out = np.zeros(len(stats.m))
    for d, values in iter_pair_values(block_a, block_b, stats, pair):
        out[d] = values.sum()
    return out


def _mean(total: np.ndarray, n_pairs: int) -> np.ndarray:
    return total / n_pairs


def _expand(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Distinct-draw values -> one ``(1, 1, n_units, resample)`` output chunk."""
    return values[index][None, None]


def _group_values(values: list[np.ndarray]) -> list[np.ndarray]:
    """Every set's values of one draw group."""
    return values


def _expand_set(groups: list[list[np.ndarray]], g: int, index: np.ndarray) -> np.ndarray:
    """:func:`_expand` of set ``g``'s values from every draw group of a layer, in draw order."""
    return _expand(np.concatenate([values[g] for values in groups]), index)


# --------------------------------------------------------------------------- memory budget
#: dask config key of the memory budget for one layer's gathered row blocks (see :func:`analysis_memory`)
MEMORY_CONFIG = "cnndiff_xr.analysis-memory"
#: the budget without a setting and without a distributed worker memory limit
DEFAULT_ANALYSIS_MEMORY = 3 * 2**30
#: share of the smallest worker memory limit taken as the budget on a distributed cluster: the row blocks of a draw
#: group may all end up on one worker (a pair task fetches both of its blocks), next to the pair tasks' working
#: memory, and distributed starts spilling at 60 % of the limit
WORKER_MEMORY_SHARE = 0.4


def _worker_memory_limit() -> int | None:
    """The memory limit of the distributed worker this runs on, else the smallest of the workers of the
    distributed Client that dask would compute with now; None without one (or without limits)."""
    try:
        from distributed import Client, get_worker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        limit = get_worker().memory_manager.memory_limit
        return int(limit) if limit else None
    except ValueError:  # not on a worker
        pass
    scheduler = get_scheduler()  # a Client's bound get, or the Client itself (dask.config.set(scheduler=client))
    client = scheduler if isinstance(scheduler, Client) else getattr(scheduler, "__self__", None)
    if not isinstance(client, Client):
        return None
    limits = [int(w.get("memory_limit") or 0) for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    return min((limit for limit in limits if limit > 0), default=None)


def analysis_memory() -> int:
    """Bytes of gathered data (:func:`gathered_bytes` per value) one layer of a differentiation may hold at a time,
    read when the graph is built: the dask config setting ``"cnndiff_xr.analysis-memory"`` (bytes, or a size such
    as ``"4GiB"``) when set; else, with a distributed Client (or on a worker) whose workers have memory limits,
    :data:`WORKER_MEMORY_SHARE` of the smallest limit; else :data:`DEFAULT_ANALYSIS_MEMORY` (3 GiB)."""
    value = dask.config.get(MEMORY_CONFIG, None)
    if value is None or value == "auto":
        limit = _worker_memory_limit()
        return DEFAULT_ANALYSIS_MEMORY if limit is None else int(limit * WORKER_MEMORY_SHARE)
    try:
        budget = -1 if isinstance(value, bool) else parse_bytes(value)
    except (TypeError, ValueError, AttributeError):
        budget = -1
    if budget <= 0:
        raise ParameterValueError(
            f"dask config {MEMORY_CONFIG!r} must be a positive number of bytes or a size such as '4GiB' (or 'auto'), "
            f"got {value!r}; set it with dask.config.set({{{MEMORY_CONFIG!r}: '4GiB'}})"
        )
    return int(budget)


def gathered_bytes(dtype: np.dtype) -> int:
    """Bytes held per gathered value: the gathered chunk in the stored dtype, and the row block made from it
    (float32 for float16/float32 data, float64 otherwise), counted together since a chunk is released only once
    every set's row blocks have taken their rows from it."""
    return int(dtype.itemsize) + (4 if dtype in (np.float16, np.float32) else 8)


def draw_groups(table: DrawTable, n_rows: int, dtype: np.dtype, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges of a layer's distinct draws whose gathered data (``n_rows`` images x the union of the
    range's units x :func:`gathered_bytes`) fit ``budget`` bytes; a draw larger than the budget is a range alone.

    Each range reads the layer again (one read of each chunk gathers the union of its draws), so a single range --
    one read -- whenever everything fits. ``"top"`` draws (nested: the union is the largest) and a single draw are
    one range."""
    n = table.n_draws
    if n == 1 or table.unit_type == "top":
        return [(0, n)]
    units = n_rows * gathered_bytes(np.dtype(dtype))
    if table.width * units <= budget:  # the sum of the draws' sizes bounds their union
        return [(0, n)]
    plan = make_plan(table)
    ranges, start = [], 0
    chosen = np.zeros(table.size, dtype=bool)
    for d in range(n):
        draw = plan.draw(0, d)
        if d > start and (int(chosen.sum()) + int(np.count_nonzero(~chosen[draw]))) * units > budget:
            ranges.append((start, d))
            start = d
            chosen[:] = False
        chosen[draw] = True
    ranges.append((start, n))
    return ranges


def _subtable(table: DrawTable, lo: int, hi: int) -> DrawTable:
    """The draws ``lo:hi`` of ``table`` as a table of their own (their units, their union)."""
    if (lo, hi) == (0, table.n_draws):
        return table
    return dataclasses.replace(table, keys=table.keys[lo:hi], index=np.arange(hi - lo)[None, :])


def reduce_group(graph: GraphBuilder, group: GroupBlocks, reduction: Reduction, index: tuple[int, ...]) -> Key:
    """Add the reduction of one set of one layer that spans several row blocks; returns the key of its
    per-draw values (a set in one row block is a single task: :func:`_one_task_output`)."""
    if reduction == "mean":
        total = graph.reduce("pair-sum-total", index, group.add_pair_tasks(graph, "pair-sum", index, _pair_sum),
                             sum_parts)
        return graph.add("mean", index, _mean, total, group.n_pairs)
    return add_median(graph, group, index)


#: the ``median_convention`` attribute of every result that takes medians of pairwise distances
MEDIAN_CONVENTION = "mean of the two middle values for an even number of pairs (numpy.median)"


def settings_attrs(*, unit_type: str, norm: str, metric: str, reduction: str, seed: int, constant: str
                   ) -> dict[str, object]:
    """The attributes that record a differentiation's settings, shared by the analyses built on it (bootstrap,
    set comparison), so that every result names them alike."""
    return {"unit_type": unit_type, "norm": norm, "metric": metric, "reduction": reduction, "seed": seed,
            "constant": constant, "median_convention": MEDIAN_CONVENTION}


def differentiation(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    n_units: int | Sequence[int] = (200, 10000),
    *,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    reduction: Reduction = "median",
    resamples: int = 10,
    seed: int = 0,
    layers: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
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
        ``"random"`` (the seed's), ``"top"`` (the units with the highest mean over all analysed
        images, i.e. over the images of every set of the call together, ties to the lower flat index:
        every set uses the same units, so ratios between sets compare the same units; the same for every
        resample and seed), ``"per_filter"``, ``"all"``. See :func:`cnndiff_xr.analysis.draws.draw_units`;
        :func:`cnndiff_xr.select_units` with the same ``sets`` shows the ``"top"`` units.
    norm, metric
        See :mod:`cnndiff_xr.analysis.metrics`; the defaults are the seed's (one mean and SD over
        each set's images x sampled units, Euclidean / sqrt(m)).
    reduction
        ``"median"`` (the seed's) or ``"mean"`` of the i < j distances.
    resamples
        Independent unit draws per ``n_units`` value. No draw depends on the set (``"top"``
        ranks all analysed images together), so every set of a resample sees the same units.
    seed
        Base seed; draw ``(layer, n_units, r)`` uses
        :func:`cnndiff_xr.analysis.draws.unit_seed`.
    layers, sets
        Subsets (default all, in network / sample order). Every analysed set needs at
        least 2 images.
    sample_dim, set_coord, filter_dim
        Names of the sample dimension, the set coordinate along it (without it all samples
        are one set, ``"all"``), and the filter dimension (for ``"per_filter"``).
    constant
        ``"raise"`` or ``"zero"``: what to do with constant vectors where ``norm``/``metric``
        leave them undefined (see :mod:`cnndiff_xr.analysis.metrics`).
    block_size
        Images per distance block (default: sized so a gathered block is ~128 MiB). A set in one block is one task;
        larger sets collect their distances, or, beyond 64 MiB of them, take the exact one-pass windowed median
        (:mod:`cnndiff_xr.analysis.median`). Every path gives the exact ``np.median`` of the float64 distances.

    Returns
    -------
    xarray.DataArray
        ``differentiation`` with dims ``(set, layer, n_units, resample)``; coordinates
        ``n_units_used`` (layer, n_units), ``layer_size``, ``layer_index`` and ``n_images``.
        Dask-backed: building it computes nothing.

    Notes
    -----
    Each image chunk of a layer is read by one task that gathers the units of a group of
    draws; row blocks of the gathered units then feed per-block-pair Gram tasks. The gathered
    data of a group, ``n_images x (union of its draws' units) x 8`` bytes for float32 data
    (the gathered chunks and the float32 row blocks made from them), fit the memory budget:
    the dask config setting ``"cnndiff_xr.analysis-memory"`` (bytes or a size such as
    ``"4GiB"``; ``"auto"`` or unset: 40 % of the smallest worker memory limit with a
    distributed Client or on a worker, 3 GiB otherwise), read when the graph is built. All
    draws are one group, read once, when they fit; otherwise each group reads the layer again
    (a draw larger than the budget is a group alone). Peak memory is then about the budget
    plus, per running task, a few ``block_size^2`` float64 Gram blocks, plus a set's median
    window (at most 256 MiB). ``"top"`` draws are one group, and read each chunk twice: once
    for the unit means, once to gather.
    """
    spec = distance_spec(norm, metric)
    check_choice("constant", constant, CONSTANT_POLICIES)
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
    tables = [
        draw_table(coll.layer(name), n_list, resamples, unit_type=unit_type, seed=seed, filter_dim=filter_dim)
        for name in layer_names
    ]

    # the draws of a layer in groups whose gathered row blocks fit the memory budget (each group reads the layer)
    n_rows = int(np.unique(np.concatenate(list(groups.values()))).size)
    budget = analysis_memory()
    ranges = [draw_groups(table, n_rows, coll.layer(name).data.dtype, budget)
              for name, table in zip(layer_names, tables, strict=True)]
    # everything the numbers depend on: the data (by dask name), the draws (each table names its layer, shape and
    # units), the sets in their order (a dict would be tokenized sorted), the distance and the blocks; and the draw
    # groups, which change the graph's tasks (not its numbers)
    token = tokenize(
        [coll.layer(name).data.name for name in layer_names], tables, list(groups), list(groups.values()), spec,
        reduction, constant, block_size, coll.completed_token(), ranges,
    )
    graph = GraphBuilder(f"differentiation-{token}")
    n_used, sizes = [], []
    for li, (name, table) in enumerate(zip(layer_names, tables, strict=True)):
        layer = coll.layer(name)
        single = len(ranges[li]) == 1
        per_group: list[Key] = []  # per draw group: the values of every set
        for j, (lo, hi) in enumerate(ranges[li]):
            sub = _subtable(table, lo, hi)
            # a later group reads its own copy of the chunk reads (its gather is then fused with them, and the
            # groups do not share, and hold, every chunk)
            source = layer if j == 0 else dataclasses.replace(
                layer, array=layer.array.copy(data=clone(layer.data, seed=(graph.name, li, j))))
            blocks = build_groups(graph, coll, source, groups, sub, spec=spec, constant=constant,
                                  block_size=block_size, index=(li, j))
            values: list[Key] = []
            for g, group in enumerate(blocks):
                if group.in_one_block:  # a single task from the gathered chunks to the values (or output chunk)
                    chunks, block = group.one_block()
                    task = OneBlockReduction(block, reduction, group.n_pairs, table.index)
                    if single:
                        graph.output((g, li, 0, 0), _one_task_output, chunks, group.plan, task)
                    else:
                        values.append(graph.add("one-task", (li, j, g), _one_task_values, chunks, group.plan, task))
                else:
                    key = reduce_group(graph, group, reduction, (li, j, g))
                    if single:
                        graph.output((g, li, 0, 0), _expand, key, table.index)
                    else:
                        values.append(key)
            if not single:
                # one task per group that needs every set's values: dask's ordering then finishes a group (all its
                # sets) before the next group's reads, and the memory holds one group's gathered data at a time
                per_group.append(graph.add("draw-group", (li, j), _group_values, values))
        for g in range(len(groups) if per_group else 0):
            graph.output((g, li, 0, 0), _expand_set, per_group, g, table.index)
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
        attrs=settings_attrs(unit_type=unit_type, norm=norm, metric=metric, reduction=reduction, seed=seed,
                             constant=constant),
    )
