"""Representational dissimilarity matrices: every pairwise distance of a layer's images, lazily, block by block."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from dask.base import tokenize

from ..options import CONSTANT_POLICIES, ConstantPolicy, Metric, Norm, UnitType
from ..schema import FILTER_DIM, IMAGE_DIM, SET_COORD
from ..validation import ParameterValueError, check_choice, check_count
from .blocks import BlockPair, GroupStats, OneBlock, RowBlock, build_groups, iter_distance_blocks, one_block_distances
from .collection import as_collection
from .draws import UnitPlan, check_single_draw, draw_table
from .graph import GraphBuilder
from .metrics import distance_spec

__all__ = ["rdm"]


def _rdm_block(block_a: RowBlock, block_b: RowBlock, stats: GroupStats, pair: BlockPair) -> np.ndarray:
    ((_, out),) = iter_distance_blocks(block_a, block_b, stats, pair, [0])
    return out


def _one_block_rdm(parts: list[np.ndarray], plan: UnitPlan, block: OneBlock) -> np.ndarray:
    ((_, out),) = one_block_distances(parts, plan, block)
    return out


def rdm(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    layer: str | None = None,
    *,
    n_units: int = 10000,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    seed: int = 0,
    resample: int = 0,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
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
        :func:`cnndiff_xr.differentiation` uses for that draw). ``"top"``: the units with the highest mean
        over all images of the RDM (``sets`` together), ties to the lower flat index; the same units as a
        differentiation of the same ``sets``.
    norm, metric, constant
        See :mod:`cnndiff_xr.analysis.metrics`. ``norm="layer"`` scales by the SD over all images
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
    spec = distance_spec(norm, metric)
    check_choice("constant", constant, CONSTANT_POLICIES)
    n, seed, resample = check_single_draw(n_units, unit_type, seed, resample)
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    data = coll.single_layer(layer)
    rows = coll.selected_rows(sets)
    if rows.size < 2:
        raise ParameterValueError(f"an RDM needs at least 2 images; sets={sets!r} select {rows.size}")
    if block_size is not None:
        block_size = check_count("block_size", block_size, 1)
    table = draw_table(data, (n,), [resample], unit_type=unit_type, seed=seed, filter_dim=filter_dim)
    label = "+".join(coll.rows(sets)) if sets is not None else "all images"
    token = tokenize(data.data.name, rows, table, spec, constant, block_size, coll.completed_token())
    graph = GraphBuilder(f"rdm-{token}")
    (group,) = build_groups(graph, coll, data, {label: rows}, table, spec=spec, constant=constant,
                            block_size=block_size)
    nb = len(group.blocks)
    if group.in_one_block:  # the same single task as differentiation's: the same numbers
        chunks, block = group.one_block()
        graph.output((0, 0), _one_block_rdm, chunks, group.plan, block)
    else:
        for a in range(nb):
            for b in range(nb):
                if a <= b:
                    graph.output((a, b), _rdm_block, group.blocks[a], group.blocks[b], group.stats, group.pair(a, b))
                else:
                    graph.output((a, b), np.transpose, (graph.name, b, a))
    sizes = tuple(hi - lo for lo, hi in group.bounds)
    distances = graph.array((sizes, sizes), np.float64)
    other = f"{sample_dim}_other"
    labels, set_labels = coll.samples[rows], coll.set_labels[rows]
    return xr.DataArray(
        distances,
        dims=(sample_dim, other),
        coords={
            sample_dim: labels,
            other: labels,
            set_coord: (sample_dim, set_labels),
            f"{set_coord}_other": (other, set_labels),
        },
        name="distance",
        attrs={
            "layer": data.name,
            "n_units": n,
            "n_units_used": table.n_used[0],
            "unit_type": unit_type,
            "norm": norm,
            "metric": metric,
            "seed": seed,
            "resample": resample,
        },
    )
