"""Differentiation: the median (or mean) pairwise distance per layer and image set.

The seed's measure (see ``docs/architecture.md``, "Method"): per layer and per image set, the median of
the upper-triangle (i < j) distances between the images' vectors of ``n_units`` sampled
units, z-scored over the layer (``norm="layer"``) with Euclidean distance divided by
``sqrt(n_units)``. Several ``n_units`` values and ``resamples`` independent draws come
back as one lazy array; all of them are served by one read of each image chunk.

A set that fits one row block (``block_size``) is one task from the gathered chunks to its output chunk; larger
sets are reduced over their pairs of row blocks (the median: :mod:`cnndiff_xr.analysis.median`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from dask.base import tokenize

from ..options import CONSTANT_POLICIES, REDUCTIONS, UNIT_TYPES, ConstantPolicy, Metric, Norm, Reduction, UnitType
from ..schema import FILTER_DIM, IMAGE_DIM, SET_COORD
from ..validation import check_choice, check_count, check_n_units
from .blocks import (
    BlockPair,
    GroupBlocks,
    GroupStats,
    OneBlock,
    RowBlock,
    build_groups,
    iter_pair_values,
    one_block_distances,
)
from .collection import as_collection
from .draws import UnitPlan, draw_table
from .graph import GraphBuilder, Key, sum_parts
from .median import add_median, partition_median
from .metrics import distance_spec

__all__ = ["differentiation"]


@dataclass(frozen=True, eq=False)
class OneBlockReduction:
    """Static data of the single task of a set in one row block: the block, the reduction, and where each
    ``(n_units, resample)`` finds its distinct draw."""

    block: OneBlock
    reduction: Reduction
    n_pairs: int
    draw_index: np.ndarray  # DrawTable.index


def _one_task_output(parts: list[np.ndarray], plan: UnitPlan, task: OneBlockReduction) -> np.ndarray:
    """Median or mean of every draw of a group that fits one row block, straight into its
    output chunk: the whole group is one task."""
    out = np.empty(task.block.group.n_draws)
    upper = np.triu_indices(sum(rows.size for rows in task.block.positions), 1)  # the same pairs for every draw
    for d, values in one_block_distances(parts, plan, task.block):
        out[d] = partition_median(values[upper]) if task.reduction == "median" else values[upper].sum() / task.n_pairs
    return _expand(out, task.draw_index)


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


def reduce_group(graph: GraphBuilder, group: GroupBlocks, reduction: Reduction, index: tuple[int, ...]) -> Key:
    """Add the reduction of one set of one layer that spans several row blocks; returns the key of its
    per-draw values (a set in one row block is a single task: :func:`_one_task_output`)."""
    if reduction == "mean":
        total = graph.reduce("pair-sum-total", index, group.add_pair_tasks(graph, "pair-sum", index, _pair_sum),
                             sum_parts)
        return graph.add("mean", index, _mean, total, group.n_pairs)
    return add_median(graph, group, index)


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
        ``"random"`` (the seed's), ``"top"`` (the units with the highest mean over the
        set's own images; the same for every resample), ``"per_filter"``, ``"all"``.
        See :func:`cnndiff_xr.analysis.draws.draw_units`.
    norm, metric
        See :mod:`cnndiff_xr.analysis.metrics`; the defaults are the seed's (one mean and SD over
        each set's images x sampled units, Euclidean / sqrt(m)).
    reduction
        ``"median"`` (the seed's) or ``"mean"`` of the i < j distances.
    resamples
        Independent unit draws per ``n_units`` value. Random draws do not depend on the
        set, so every set of a resample sees the same units.
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

    # everything the numbers depend on: the data (by dask name), the draws (each table names its layer, shape and
    # units), the sets in their order (a dict would be tokenized sorted), the distance and the blocks
    token = tokenize(
        [coll.layer(name).data.name for name in layer_names], tables, list(groups), list(groups.values()), spec,
        reduction, constant, block_size, coll.completed_token(),
    )
    graph = GraphBuilder(f"differentiation-{token}")
    n_used, sizes = [], []
    for li, (name, table) in enumerate(zip(layer_names, tables, strict=True)):
        layer = coll.layer(name)
        blocks = build_groups(graph, coll, layer, groups, table, spec=spec, constant=constant, block_size=block_size,
                              index=(li,))
        for g, group in enumerate(blocks):
            if group.in_one_block:  # a single task from the gathered chunks to the output chunk
                chunks, block = group.one_block()
                graph.output((g, li, 0, 0), _one_task_output, chunks, group.plan,
                             OneBlockReduction(block, reduction, group.n_pairs, table.index))
            else:
                values = reduce_group(graph, group, reduction, (li, g))
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
