"""Unit draws: which units of a layer enter the distances, and the plan that gathers them.

Draws follow the seed notebook (see ``docs/architecture.md``, "Method"): per layer, ``n_units`` units drawn
uniformly without replacement from all ``y * x * filter`` units, **the same units for every image** (the seed's early
bug drew afresh per image), all units when ``n_units`` is at least the layer size. Each draw gets its own generator,
``np.random.default_rng(SeedSequence([seed, blake2b(layer), n_units, resample]))``: stable across processes and
Python versions (Python's ``hash()`` is salted per process), and the units of one draw do not depend on which other
layers, sets or ``n_units`` values are analysed in the same call.

A layer's draws for a grid of ``n_units`` x resamples are first listed without drawing (:class:`DrawTable`: draws
that give the same units are listed once), then drawn together (:class:`UnitPlan`), for ``"top"`` inside the graph
after a pass for the unit means (:func:`plan_for`). :func:`select_units` shows a draw as labelled coordinates.

Every draw is shared by all sets of one call, ``"top"`` included: ``"top"`` ranks the units by their mean over all
images analysed in the call (every set of a differentiation together; an RDM's images; ``select_units``' ``sets``),
not over each set's own images, so per-draw ratios between sets (reference normalisation) compare the same units.

On a reduced layer (a store extracted with registered draws) the draws are computed exactly as on the full layer, from
its logical shape; :func:`refuse_unheld` refuses those the store does not hold before any graph is built, and the
plan maps the union to the stored columns (:attr:`UnitPlan.read`), so the gathered matrix is the full store's. A
reduced layer's stored units travel to the plan's task by their recipe (:class:`RegisteredUnits`), not as a list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.graph_manipulation import clone

from ..options import UNIT_TYPES, UnitType
from ..sampling import UnitDraws, draw_units, registered_units, unit_seed
from ..schema import FILTER_DIM, IMAGE_DIM, SET_COORD
from ..validation import ParameterValueError, check_choice, check_count, check_n_units
from .collection import LayerData, as_collection, stored_columns
from .graph import GraphBuilder, Key, block_keys, sum_parts

__all__ = [
    "DrawTable",
    "RegisteredUnits",
    "UnitPlan",
    "draw_table",
    "draw_units",
    "make_plan",
    "plan_for",
    "refuse_unheld",
    "select_units",
    "stored_units_of",
    "unit_seed",
]


# --------------------------------------------------------------------------- draw plans
@dataclass(frozen=True)
class RegisteredUnits:
    """A reduced layer's stored units by their recipe: the union of the store's registered draws
    (:meth:`~cnndiff_xr.sampling.UnitDraws.kept_units`), checked against the stored index (its size and sha256).

    The plan's task redraws them (:meth:`flat_index`) where it runs. Listed, they would travel in the graph at 8 bytes
    per stored unit: 12 MiB for VGG16's 22 layers at 10 x 10,000 units, shipped to the scheduler on every call, and
    distributed warns "Sending large graph" (the CLI printed it on every reduced store). The client compares the
    recipe with the stored index when it lists the draws (:func:`stored_units_of`); the task compares its redraw with
    the digest, so a process that draws differently fails with a message instead of gathering other columns."""

    draws: UnitDraws
    layer: str
    shape: tuple[int, ...]
    size: int
    sha256: str
    numpy_version: str  # where the recipe was checked against the stored index, for the message

    def flat_index(self) -> np.ndarray:
        """The stored units' sorted flat indices, redrawn in this process (cached; the extraction's layout made them
        with the same :func:`~cnndiff_xr.sampling.registered_units`)."""
        units = registered_units(self.draws, self.layer, self.shape)
        if units is None or units.size != self.size or _sha256(units) != self.sha256:
            drawn = "the whole layer" if units is None else f"{units.size} other units"
            raise ValueError(
                f"layer {self.layer!r}: the store's registered draws ({self.draws.describe()}) drawn in this process "
                f"give {drawn}, not the {self.size} units the store keeps: this process (numpy {np.__version__}) "
                f"draws units differently from the one that opened the store (numpy {self.numpy_version}); run the "
                "analysis where both have the same numpy and cnndiff_xr versions"
            )
        return units


def _sha256(units: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(units, dtype=np.int64).view(np.uint8).data).hexdigest()


def stored_units_of(layer: LayerData) -> np.ndarray | RegisteredUnits | None:
    """What a plan needs of a layer's stored units: None for a whole layer, the recipe when the stored index is
    exactly its registration's union (every store extracted with ``units=``), else the index itself."""
    if layer.stored is None:
        return None
    flat = layer.stored.flat_index
    if layer.draws is not None:
        kept = registered_units(layer.draws, layer.name, layer.feature_shape)
        if kept is not None and np.array_equal(kept, flat):
            return RegisteredUnits(layer.draws, layer.name, layer.feature_shape, int(flat.size), _sha256(flat),
                                   np.__version__)
    return flat


@dataclass(frozen=True)
class DrawTable:
    """The distinct draws of one layer for a grid of ``n_units`` x ``resamples``.

    Draws that give the same units (all units, ``"top"`` across resamples) are computed
    once; ``index[i, r]`` says which distinct draw serves ``(n_units[i], resample r)``.
    """

    layer: str
    feature_shape: tuple[int, ...]
    unit_type: UnitType
    seed: int
    filter_axis: int | None
    keys: tuple[tuple[int, int], ...]  # a representative (n_units, resample) per distinct draw
    index: np.ndarray
    n_used: tuple[int, ...]  # units actually used per requested n_units
    #: a reduced layer's stored units (:func:`stored_units_of`: their recipe, or their flat indices); None for a whole
    #: layer
    stored: np.ndarray | RegisteredUnits | None = None

    @property
    def size(self) -> int:
        """Units of the layer."""
        return int(np.prod(self.feature_shape))

    @property
    def n_draws(self) -> int:
        """Distinct draws."""
        return len(self.keys)

    @property
    def width(self) -> int:
        """Units of all distinct draws together: the columns of a row block of one group."""
        return sum(min(n, self.size) for n, _ in self.keys)

    def needs_unit_means(self) -> bool:
        """Whether the draws depend on the data (``"top"`` units of fewer than all units)."""
        return self.unit_type == "top" and any(n < self.size for n, _ in self.keys)


def draw_table(
    layer: LayerData,
    n_units: Sequence[int],
    resamples: int | Sequence[int],
    *,
    unit_type: UnitType,
    seed: int,
    filter_dim: str,
) -> DrawTable:
    """Work out the distinct draws of a layer without drawing anything.

    ``resamples``: a count (resamples ``0..R-1``) or the resample ids themselves.
    """
    resample_ids = list(range(resamples)) if isinstance(resamples, (int, np.integer)) else list(resamples)
    filter_axis = layer.filter_axis(filter_dim)
    if unit_type == "per_filter" and filter_axis is None:
        raise ParameterValueError(
            f"unit_type='per_filter' needs a filter dimension {filter_dim!r}; layer {layer.name!r} "
            f"has feature dims {layer.feature_dims} (pass filter_dim=)"
        )
    refuse_unheld(layer, n_units, resample_ids, unit_type=unit_type, seed=seed, filter_dim=filter_dim)
    size = layer.size
    keys: dict[tuple[str | int, ...], int] = {}
    reps: list[tuple[int, int]] = []
    index = np.empty((len(n_units), len(resample_ids)), dtype=np.int64)
    for i, n in enumerate(n_units):
        for j, r in enumerate(resample_ids):
            key: tuple[str | int, ...]
            if unit_type == "all" or n >= size:
                key = ("all",)
            elif unit_type == "top":
                key = ("top", n)
            else:
                key = (n, r)
            if key not in keys:
                keys[key] = len(reps)
                reps.append((n, r))
            index[i, j] = keys[key]
    n_used = tuple(size if unit_type == "all" else min(n, size) for n in n_units)
    table = DrawTable(layer.name, layer.feature_shape, unit_type, seed, filter_axis, tuple(reps), index, n_used,
                      stored_units_of(layer))
    if layer.reduced and layer.draws is None:  # no registration to compare with: check the units themselves now
        make_plan(table)
    return table


def _describe_asked(n_units: Sequence[int], resample_ids: Sequence[int], unit_type: str, seed: int) -> str:
    ids = [int(r) for r in resample_ids]
    resamples = f"0..{ids[-1]}" if ids == list(range(len(ids))) and len(ids) > 2 else str(ids)
    return f"n_units {[int(n) for n in n_units]}, resamples {resamples}, seed {seed}, unit_type {unit_type!r}"


def refuse_unheld(layer: LayerData, n_units: Sequence[int], resample_ids: Sequence[int], *, unit_type: str,
                  seed: int, filter_dim: str) -> None:
    """Refuse, before any graph is built, draws that a reduced layer does not hold.

    A reduced store keeps only the units of its registered draws (``sampling.UnitDraws``): other ``n_units``,
    resamples, seeds or unit types, ``"top"`` (data-dependent, needs every unit) and ``"all"`` (or ``n_units`` at
    least the layer size) cannot be computed from it. Whole layers accept every draw.
    """
    if layer.stored is None:
        return
    kept, size = layer.stored.flat_index.size, layer.size
    holds = layer.draws.describe() if layer.draws is not None else "no registration recorded"
    where = (f"layer {layer.name!r} is reduced: the store keeps {kept} of its {size} units, those of its registered "
             f"draws ({holds}); asked for {_describe_asked(n_units, resample_ids, unit_type, seed)}")
    full = "Analyse a full store (extracted with units='all') for that"
    if unit_type == "top":
        raise ParameterValueError(
            f"unit_type='top' cannot be computed here: {where}. 'top' ranks every unit of the layer by its mean over "
            f"the analysed images, so it needs every unit, and reduced layers keep only the registered draws. {full}"
        )
    whole = [int(n) for n in n_units if int(n) >= size]
    if unit_type == "all" or whole:
        what = "unit_type='all'" if unit_type == "all" else f"n_units {whole} (at least the layer's {size} units)"
        raise ParameterValueError(f"{what} needs every unit: {where}. Ask for registered draws. {full}")
    if layer.draws is None:
        return  # checked unit by unit by draw_table
    missing = layer.draws.missing(n_units, resample_ids, seed=seed, unit_type=unit_type)
    if missing is not None:
        raise ParameterValueError(
            f"the store does not hold draws with {missing}: {where}. Ask for some of its n_units, resamples below "
            f"{layer.draws.resamples}, seed {layer.draws.seed} and unit_type {layer.draws.unit_type!r}, or extract a "
            f"store that registers these draws. {full}"
        )
    axis = layer.filter_axis(filter_dim)
    if unit_type == "per_filter" and axis != len(layer.feature_dims) - 1:
        raise ParameterValueError(
            f"filter_dim={filter_dim!r}: {where}; its per-filter draws were registered along its last dimension "
            f"{layer.feature_dims[-1]!r}. Pass filter_dim={layer.feature_dims[-1]!r}"
        )


def check_single_draw(n_units: Any, unit_type: Any, seed: Any, resample: Any) -> tuple[int, int, int]:
    """The options of one draw (:func:`select_units`, :func:`~cnndiff_xr.rdm`, :func:`~cnndiff_xr.rdm_regression`),
    checked: ``(n_units, seed, resample)`` as ints; ``unit_type`` must be one of :data:`UNIT_TYPES`."""
    (n,) = check_n_units(n_units)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    return n, check_count("seed", seed, 0), check_count("resample", resample, 0)


@dataclass(frozen=True)
class UnitPlan:
    """Concrete units of every distinct draw and their union.

    A chunk is gathered once, as the union of all draws (sorted: reading it is a forward
    sweep through each image's activations); ``columns`` locate each draw inside the
    union, from which row blocks take one contiguous array per draw.

    Every group (set) of a call uses the same units, ``"top"`` included (its units rank the means over all analysed
    images), so the plan holds a single group; the accessors take a group's index and serve every group from it.
    """

    union: np.ndarray
    units: tuple[tuple[np.ndarray, ...], ...]  # [group][draw]: one group, shared by every set of the call
    columns: tuple[tuple[slice | np.ndarray, ...], ...]  # [group][draw]: slice or index array into the union
    #: the columns of a stored chunk (flattened per sample) that hold the union, in its order: the union itself for
    #: a whole layer, their positions among the stored units for a reduced layer (the same gathered values)
    read: np.ndarray

    def n_draws(self, group: int) -> int:
        """Distinct draws (the same for every group)."""
        return len(self.units[0])

    def draw(self, group: int, d: int) -> np.ndarray:
        """Flat unit indices of draw ``d`` (the same for every group)."""
        return self.units[0][d]

    def positions(self, group: int, d: int) -> slice | np.ndarray:
        """Columns of draw ``d`` within the gathered union columns (a slice when contiguous)."""
        return self.columns[0][d]


def make_plan(table: DrawTable, means: np.ndarray | None = None) -> UnitPlan:
    """Draw the units of every distinct draw (``means``: the ``(units,)`` means over all analysed images, for
    ``"top"``); one set of units serves every group of the call."""
    units = tuple(
        draw_units(
            table.feature_shape,
            n,
            table.unit_type,
            seed=table.seed,
            layer=table.layer,
            resample=r,
            means=means,
            filter_axis=table.filter_axis,
        )
        for n, r in table.keys
    )
    chosen = np.zeros(table.size, dtype=bool)  # a mask, not np.unique: linear in the layer size
    for u in units:
        chosen[u] = True
    union = np.flatnonzero(chosen)
    stored = table.stored.flat_index() if isinstance(table.stored, RegisteredUnits) else table.stored
    read = union if stored is None else stored_columns(stored, union, table.layer)
    where = np.empty(table.size, dtype=np.int64)  # only the union's entries are ever read
    where[union] = np.arange(union.size)
    columns = tuple(slice(0, union.size) if u.size == union.size else where[u] for u in units)
    return UnitPlan(union, (units,), (columns,), read)


def _block_sums(block: np.ndarray, local_rows: np.ndarray) -> np.ndarray:
    return block.reshape(block.shape[0], -1)[local_rows].sum(axis=0, dtype=np.float64)


def _divide(total: np.ndarray, count: int) -> np.ndarray:
    return total / np.float64(count)


def unit_means(graph: GraphBuilder, layer: LayerData, rows: np.ndarray, index: tuple[int, ...]) -> Key:
    """Key of the mean activation of every unit over ``rows`` (sorted, unique): a ``(units,)`` float64 array.

    One task per image chunk that holds some of the rows (their float64 sums), then a tree sum. The chunks
    are read through a clone of the array's graph: sharing the reading tasks with the
    later gather pass would make dask hold every chunk in memory until all means are
    known, so ``"top"`` reads each chunk twice instead, each read streaming. The clone is
    seeded by the graph's name: its keys are as deterministic as the graph's own.
    """
    source = clone(layer.data, seed=(graph.name, *index))
    graph.depend(source)
    bounds = layer.block_bounds()
    parts: list[Key] = []
    for k, chunk in enumerate(block_keys(source)):
        lo, hi = bounds[k], bounds[k + 1]
        local = rows[(rows >= lo) & (rows < hi)] - lo
        if local.size:
            parts.append(graph.add("unit-sums", (*index, k), _block_sums, chunk, local))
    total = graph.reduce("unit-sums-total", index, parts, sum_parts)
    return graph.add("unit-means", index, _divide, total, int(rows.size))


def plan_for(graph: GraphBuilder, table: DrawTable, layer: LayerData, groups: Sequence[np.ndarray],
             index: tuple[int, ...]) -> Key:
    """Key of the layer's :class:`UnitPlan`, one for all ``groups`` (row indices of each analysed set).

    ``"top"`` (fewer than all units) adds a pass for the unit means over the rows of all groups together, so every
    group gets the same units: those with the highest mean over every image analysed in the call.
    """
    if table.needs_unit_means():
        rows = np.unique(np.concatenate([np.asarray(g, dtype=np.int64) for g in groups]))
        return graph.add("plan", index, make_plan, table, unit_means(graph, layer, rows, index))
    return graph.add("plan", index, make_plan, table)


# --------------------------------------------------------------------------- public
def _first_draw(plan: UnitPlan) -> np.ndarray:
    return plan.draw(0, 0)


def _unravel_labels(flat: np.ndarray, shape: tuple[int, ...], axis: int, labels: np.ndarray) -> np.ndarray:
    return labels[np.unravel_index(flat, shape)[axis]]


def select_units(
    obj: xr.DataTree | xr.DataArray | xr.Dataset,
    layer: str | None = None,
    *,
    n_units: int = 10000,
    unit_type: UnitType = "random",
    seed: int = 0,
    resample: int = 0,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
) -> xr.Dataset:
    """The units one draw uses, as labelled coordinates.

    :func:`cnndiff_xr.differentiation` and :func:`cnndiff_xr.rdm` use exactly these units
    for ``(layer, n_units, seed, resample)`` (for ``"top"``: when they analyse the same images -- the sets of a
    differentiation call together, the images of an RDM -- as ``sets`` here).

    Parameters
    ----------
    obj
        Store tree, DataArray or Dataset (see :func:`cnndiff_xr.analysis.collection.as_collection`).
    layer
        Layer name; may be omitted when there is a single layer.
    n_units, unit_type, seed, resample
        The draw; see :func:`draw_units`. ``"top"``: the ``n_units`` units with the highest mean over all
        images of ``sets`` together (all images when ``None``), ties to the lower flat index; it does not
        depend on ``seed`` or ``resample``.
    sets
        Images whose means rank the units for ``"top"``: pass the sets of the differentiation call (every set
        of that call uses these same units) or those of the RDM.
    sample_dim, set_coord, filter_dim
        Names of the sample dimension, the set coordinate along it, and the filter
        dimension (for ``unit_type="per_filter"``).

    Returns
    -------
    xarray.Dataset
        Dimension ``unit`` (``sampled_unit`` when a feature dim is already called
        ``unit``); one variable per feature dim (e.g. ``y``, ``x``, ``filter``)
        holding the coordinate labels of each unit, and ``flat_index`` (C-order position
        in the layer). Scalar coordinate ``layer``. Lazy (dask) for ``"top"``. Reuse:
        ``activation.sel({d: units[d] for d in feature_dims})`` gives ``(image, unit)``; on a reduced layer
        (stored as ``(image, unit)``), ``activation.isel(unit=np.searchsorted(activation.flat_index,
        units.flat_index))``.

    A reduced store (extracted with registered draws) returns the same units as a full store for every registered
    draw and refuses the others (:func:`refuse_unheld`).
    """
    coll = as_collection(obj, sample_dim=sample_dim, set_coord=set_coord)
    data = coll.single_layer(layer)
    n, seed, resample = check_single_draw(n_units, unit_type, seed, resample)
    table = draw_table(data, (n,), [resample], unit_type=unit_type, seed=seed, filter_dim=filter_dim)
    n_used = table.n_used[0]
    shape = data.feature_shape
    flat: np.ndarray | da.Array
    if table.needs_unit_means():
        rows = coll.selected_rows(sets)
        graph = GraphBuilder(f"top-units-{tokenize(data.data.name, rows, table)}")
        plan = plan_for(graph, table, data, [rows], ())
        graph.output((0,), _first_draw, plan)
        flat = graph.array(((n_used,),), np.int64)
    else:
        flat = draw_units(shape, n, unit_type, seed=seed, layer=data.name, resample=resample,
                          filter_axis=table.filter_axis)
        if data.flat_index is not None:  # a reduced layer: the units must be stored (refused above if not registered)
            stored_columns(data.flat_index, flat, data.name)
    # "unit" names the new dimension, unless the data already use it (a recording's cells)
    unit_dim = "unit" if "unit" not in data.feature_dims else "sampled_unit"
    variables = {}
    for axis, dim in enumerate(data.feature_dims):
        labels = data.labels(axis)
        if isinstance(flat, da.Array):
            values = da.map_blocks(_unravel_labels, flat, shape, axis, labels, dtype=labels.dtype)
        else:
            values = _unravel_labels(flat, shape, axis, labels)
        variables[dim] = (unit_dim, values)
    return xr.Dataset(
        variables,
        coords={unit_dim: np.arange(n_used), "flat_index": (unit_dim, flat), "layer": data.name},
        attrs={"n_units": n, "unit_type": unit_type, "seed": seed, "resample": resample},
    )
