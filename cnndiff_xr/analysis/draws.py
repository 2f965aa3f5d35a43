"""Unit sampling: which units of a layer enter the distances, as labelled coordinates.

This is the first analysis stage. It also owns the adapter that turns what the user
passes (a store's :class:`xarray.DataTree`, a single :class:`xarray.DataArray` with a
sample dimension, or a :class:`xarray.Dataset` of such arrays) into per-layer dask
arrays of shape ``(sample, *features)`` chunked along the sample dimension only.

Draws follow the seed notebook (DESIGN.md section 2): per layer, ``n_units`` units drawn
uniformly without replacement from all ``y * x * filter`` units, **the same units for
every image** (the seed's early bug drew afresh per image), all units when ``n_units``
is at least the layer size. Each draw gets its own generator,
``np.random.default_rng(SeedSequence([seed, blake2b(layer), n_units, resample]))``:
stable across processes and Python versions (Python's ``hash()`` is salted per process),
and the units of one draw do not depend on which other layers, sets or ``n_units``
values are analysed in the same call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.core import flatten
from dask.graph_manipulation import clone
from dask.highlevelgraph import HighLevelGraph

from ..validation import UnknownLabelError, check_choice, check_count, check_n_units

__all__ = [
    "UNIT_TYPES",
    "UnknownLabelError",
    "unit_seed",
    "draw_units",
    "select_units",
]

UNIT_TYPES = ("random", "top", "per_filter", "all")
UnitType = Literal["random", "top", "per_filter", "all"]

#: name given to the single group of samples when the data carry no set coordinate
ALL_SAMPLES = "all"


# --------------------------------------------------------------------------- seeded draws
def unit_seed(seed: int, layer: str, n_units: int, resample: int) -> np.random.SeedSequence:
    """The seed sequence of one draw, derived from ``(seed, layer, n_units, resample)``.

    The layer name enters through an 8-byte BLAKE2b digest, so the value is the same in
    every process and Python version.
    """
    digest = hashlib.blake2b(str(layer).encode("utf-8"), digest_size=8).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest, "little"), int(n_units), int(resample)])


def draw_units(
    feature_shape: Sequence[int],
    n_units: int,
    unit_type: UnitType = "random",
    *,
    seed: int = 0,
    layer: str = "",
    resample: int = 0,
    means: np.ndarray | None = None,
    filter_axis: int | None = -1,
) -> np.ndarray:
    """Choose units of one layer; return their sorted flat (C-order) indices.

    Parameters
    ----------
    feature_shape
        Shape of one sample's activation, e.g. ``(y, x, filter)``.
    n_units
        Number of units; all units when ``n_units`` >= the layer size (the seed's rule).
    unit_type
        ``"random"``: uniform without replacement (the seed's choice). ``"top"``: the
        ``n_units`` largest values of ``means`` (ties go to the lower flat index).
        ``"per_filter"``: the same number of units from every filter (when ``n_units`` is
        not a multiple of the filter count, randomly chosen filters get one more), each
        filter's positions uniform without replacement. ``"all"``: every unit.
    seed, layer, resample
        Identify the draw; see :func:`unit_seed`.
    means
        Mean activation per unit (flat), required for ``"top"``.
    filter_axis
        Axis of ``feature_shape`` holding filters, for ``"per_filter"``.

    Returns
    -------
    numpy.ndarray
        Sorted ``int64`` flat indices, the same for every image.
    """
    check_choice("unit_type", unit_type, UNIT_TYPES)
    shape = tuple(int(s) for s in feature_shape)
    size = int(np.prod(shape))
    n = min(int(n_units), size)
    if unit_type == "all" or n == size:
        return np.arange(size, dtype=np.int64)
    if unit_type == "top":
        if means is None:
            raise ValueError("unit_type='top' needs the mean activation of every unit")
        order = np.argsort(-np.asarray(means, dtype=np.float64).reshape(-1), kind="stable")
        return np.sort(order[:n]).astype(np.int64)
    rng = np.random.default_rng(unit_seed(seed, layer, n_units, resample))
    if unit_type == "random":
        return np.sort(rng.choice(size, size=n, replace=False)).astype(np.int64)
    # per_filter
    if filter_axis is None:
        raise ValueError("unit_type='per_filter' needs a filter dimension")
    axis = filter_axis % len(shape)
    n_filters = shape[axis]
    other = shape[:axis] + shape[axis + 1 :]
    per_position = int(np.prod(other))
    base, extra = divmod(n, n_filters)
    counts = np.full(n_filters, base, dtype=np.int64)
    if extra:
        counts[rng.choice(n_filters, size=extra, replace=False)] += 1
    parts = []
    for f in np.flatnonzero(counts):
        positions = rng.choice(per_position, size=int(counts[f]), replace=False)
        index = np.unravel_index(positions, other) if other else ()
        full = tuple(index[:axis]) + (np.full(positions.size, f),) + tuple(index[axis:])
        parts.append(np.ravel_multi_index(full, shape))
    return np.sort(np.concatenate(parts)).astype(np.int64)


# --------------------------------------------------------------------------- data adapter
@dataclass(frozen=True)
class LayerData:
    """One layer as ``(sample, *features)``, dask-backed, one chunk along every feature dim."""

    name: str
    array: xr.DataArray

    @property
    def data(self) -> da.Array:
        return self.array.data

    @property
    def feature_dims(self) -> tuple[str, ...]:
        return tuple(self.array.dims[1:])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def size(self) -> int:
        return int(np.prod(self.feature_shape))

    def filter_axis(self, filter_dim: str) -> int | None:
        dims = self.feature_dims
        return dims.index(filter_dim) if filter_dim in dims else None

    def block_bounds(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.data.chunks[0])]).astype(np.int64)


@dataclass(frozen=True)
class Collection:
    """Everything the analysis needs from its input, independent of its container."""

    sample_dim: str
    samples: np.ndarray
    set_labels: np.ndarray
    layers: dict[str, LayerData]
    completed: Any  # None, a numpy bool array, or a dask bool array along the samples

    @property
    def set_names(self) -> list[str]:
        _, first = np.unique(self.set_labels, return_index=True)
        return [str(self.set_labels[i]) for i in sorted(first)]

    def layer(self, name: str) -> LayerData:
        if name not in self.layers:
            raise UnknownLabelError(f"unknown layer {name!r}; the data have layers {list(self.layers)}")
        return self.layers[name]

    def layer_names(self, layers: str | Iterable[str] | None) -> list[str]:
        if layers is None:
            return list(self.layers)
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ValueError("layers is empty; pass None for every layer")
        for name in names:
            self.layer(name)
        return names

    def rows(self, sets: str | Iterable[str] | None, *, min_size: int = 1) -> dict[str, np.ndarray]:
        """Row indices of each requested set, in sample order."""
        known = self.set_names
        names = known if sets is None else ([sets] if isinstance(sets, str) else list(sets))
        if not names:
            raise ValueError("sets is empty; pass None for every set")
        out = {}
        for name in names:
            if name not in known:
                raise UnknownLabelError(f"unknown set {name!r}; the data have sets {known}")
            rows = np.flatnonzero(self.set_labels == name)
            if rows.size < min_size:
                raise ValueError(
                    f"set {name!r} has {rows.size} image(s); pairwise distances need at least {min_size}"
                    + ("" if sets is not None else "; choose the other sets with sets=[...]")
                )
            out[str(name)] = rows
        return out


def _as_layer(array: xr.DataArray, name: str, sample_dim: str) -> LayerData:
    if sample_dim not in array.dims:
        raise ValueError(f"{name!r} has no sample dimension {sample_dim!r} (dims {array.dims}); pass sample_dim=")
    if array.ndim < 2:
        raise ValueError(f"{name!r} has no feature dimension besides {sample_dim!r}")
    array = array.transpose(sample_dim, ...)
    if not isinstance(array.data, da.Array):
        row_bytes = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
        array = array.chunk({sample_dim: max(1, (64 * 2**20) // row_bytes)})
    if any(len(c) > 1 for c in array.data.chunks[1:]):
        # gathering units needs whole samples in a block (a store is chunked like this already)
        array = array.chunk({d: -1 for d in array.dims[1:]})
    return LayerData(name, array)


def _load_labels(values: Any) -> np.ndarray:
    # Store contract: non-index image coordinates are numpy; a lazy one is loaded (tiny).
    array = np.asarray(values.values if hasattr(values, "values") else values)
    if array.dtype.kind in "TO":  # numpy StringDType (zarr's variable-length strings) or objects
        array = np.array([str(v) for v in array.tolist()], dtype=str)
    return array


def as_collection(obj: Any, *, sample_dim: str = "image", set_coord: str = "set") -> Collection:
    """Adapt a store tree, a DataArray or a Dataset to a :class:`Collection`.

    * :class:`xarray.DataTree`: one layer per child group with an ``activation`` variable,
      in the order of the root attribute ``"layers"`` when present; the root variable
      ``completed`` (if any) guards against analysing unfinished images.
    * :class:`xarray.DataArray`: one layer named after the array (``"data"`` if unnamed);
      every dim except ``sample_dim`` is a feature dim, e.g. ``(state, unit, frequency)``.
    * :class:`xarray.Dataset`: one layer per data variable that has ``sample_dim``.

    Samples are grouped by the ``set_coord`` coordinate along ``sample_dim``; without it all
    samples form one set named ``"all"``.
    """
    completed = None
    if isinstance(obj, xr.DataTree):
        order = [str(n) for n in obj.attrs.get("layers", [])]
        children = [n for n in obj.children if "activation" in obj[n].data_vars]
        names = [n for n in order if n in children] + [n for n in children if n not in order]
        arrays = {n: obj[n]["activation"] for n in names}
        if "completed" in obj.ds.data_vars:
            completed = obj["completed"]
        fallback = obj.ds.coords
    elif isinstance(obj, xr.DataArray):
        arrays = {str(obj.name) if obj.name is not None else "data": obj}
        fallback = {}
    elif isinstance(obj, xr.Dataset):
        arrays = {str(k): v for k, v in obj.data_vars.items() if sample_dim in v.dims}
        fallback = obj.coords
    else:
        raise TypeError(f"expected an xarray DataTree, DataArray or Dataset, got {type(obj).__name__}")
    if not arrays:
        raise ValueError(f"no layer with a sample dimension {sample_dim!r} found")
    layers = {name: _as_layer(arr, name, sample_dim) for name, arr in arrays.items()}
    first = next(iter(layers.values())).array
    n = first.sizes[sample_dim]
    samples = _load_labels(first[sample_dim]) if sample_dim in first.coords else np.arange(n)
    if set_coord in first.coords:
        set_labels = _load_labels(first.coords[set_coord])
    elif set_coord in fallback:
        set_labels = _load_labels(fallback[set_coord])
    else:
        set_labels = np.full(n, ALL_SAMPLES)
    set_labels = set_labels.astype(str)
    for layer in layers.values():
        if layer.array.sizes[sample_dim] != n:
            raise ValueError(f"layer {layer.name!r} has {layer.array.sizes[sample_dim]} samples, expected {n}")
    if completed is not None:
        completed = completed.data if isinstance(completed.data, da.Array) else np.asarray(completed.values, bool)
    return Collection(sample_dim, samples, set_labels, layers, completed)


def completed_check(coll: Collection, rows: np.ndarray) -> Any:
    """Refuse unfinished images: raise now for an in-memory record; otherwise a ``dask.delayed``
    check to make the reading tasks depend on (``None`` when the data have no record)."""
    if coll.completed is None:
        return None
    if isinstance(coll.completed, np.ndarray):
        _raise_incomplete(coll.completed[rows], coll.samples[rows])
        return None
    return dask.delayed(_raise_incomplete, pure=True)(coll.completed[rows], coll.samples[rows])


def _raise_incomplete(flags: np.ndarray, names: np.ndarray) -> None:
    missing = np.flatnonzero(~np.asarray(flags, bool))
    if missing.size:
        raise ValueError(
            f"{missing.size} of the selected images are not completed in the store "
            f"(e.g. {list(names[missing[:3]])}); finish the extraction first"
        )


# --------------------------------------------------------------------------- draw plans
@dataclass(frozen=True)
class DrawTable:
    """The distinct draws of one layer for a grid of ``n_units`` x ``resamples``.

    Draws that give the same units (all units, ``"top"`` across resamples) are computed
    once; ``index[i, r]`` says which distinct draw serves ``(n_units[i], resample r)``.
    """

    layer: str
    feature_shape: tuple[int, ...]
    unit_type: str
    seed: int
    filter_axis: int | None
    keys: tuple[tuple[int, int], ...]  # a representative (n_units, resample) per distinct draw
    index: np.ndarray
    n_used: tuple[int, ...]  # units actually used per requested n_units

    @property
    def size(self) -> int:
        return int(np.prod(self.feature_shape))


def draw_table(
    layer: LayerData,
    n_units: Sequence[int],
    resamples: int | Sequence[int],
    unit_type: str,
    seed: int,
    filter_dim: str,
) -> DrawTable:
    """Work out the distinct draws of a layer without drawing anything.

    ``resamples``: a count (resamples ``0..R-1``) or the resample ids themselves.
    """
    resample_ids = list(range(resamples)) if isinstance(resamples, (int, np.integer)) else list(resamples)
    filter_axis = layer.filter_axis(filter_dim)
    if unit_type == "per_filter" and filter_axis is None:
        raise ValueError(
            f"unit_type='per_filter' needs a filter dimension {filter_dim!r}; layer {layer.name!r} "
            f"has feature dims {layer.feature_dims} (pass filter_dim=)"
        )
    size = layer.size
    keys: dict[tuple, int] = {}
    reps: list[tuple[int, int]] = []
    index = np.empty((len(n_units), len(resample_ids)), dtype=np.int64)
    for i, n in enumerate(n_units):
        for j, r in enumerate(resample_ids):
            if unit_type == "all" or n >= size:
                key: tuple = ("all",)
            elif unit_type == "top":
                key = ("top", n)
            else:
                key = (n, r)
            if key not in keys:
                keys[key] = len(reps)
                reps.append((n, r))
            index[i, j] = keys[key]
    n_used = tuple(size if unit_type == "all" else min(n, size) for n in n_units)
    return DrawTable(layer.name, layer.feature_shape, unit_type, seed, filter_axis, tuple(reps), index, n_used)


@dataclass(frozen=True)
class UnitPlan:
    """Concrete units of every distinct draw (per group for ``"top"``) and their union.

    A chunk is gathered once, as the union of all draws (sorted: reading it is a forward
    sweep through each image's activations); ``columns`` locate each draw inside the
    union, from which row blocks take one contiguous array per draw.
    """

    union: np.ndarray
    units: tuple[tuple[np.ndarray, ...], ...]  # [group][draw]; a single shared group unless "top"
    columns: tuple[tuple[Any, ...], ...]  # [group][draw]: slice or index array into the union

    def _group(self, group: int) -> int:
        return group if len(self.units) > 1 else 0

    def draw(self, group: int, d: int) -> np.ndarray:
        return self.units[self._group(group)][d]

    def positions(self, group: int, d: int) -> Any:
        """Columns of draw ``d`` within the gathered union columns (a slice when contiguous)."""
        return self.columns[self._group(group)][d]


def make_plan(table: DrawTable, means: np.ndarray | None = None) -> UnitPlan:
    """Draw the units of every distinct draw (``means``: (groups, units) for ``"top"``)."""
    groups = [None] if means is None else list(means)
    units = tuple(
        tuple(
            draw_units(
                table.feature_shape,
                n,
                table.unit_type,  # type: ignore[arg-type]
                seed=table.seed,
                layer=table.layer,
                resample=r,
                means=group_means,
                filter_axis=table.filter_axis,
            )
            for n, r in table.keys
        )
        for group_means in groups
    )
    chosen = np.zeros(table.size, dtype=bool)  # a mask, not np.unique: linear in the layer size
    for group in units:
        for u in group:
            chosen[u] = True
    union = np.flatnonzero(chosen)
    where = np.empty(table.size, dtype=np.int64)  # only the union's entries are ever read
    where[union] = np.arange(union.size)
    columns = tuple(
        tuple(slice(0, union.size) if u.size == union.size else where[u] for u in group) for group in units
    )
    return UnitPlan(union, units, columns)


class GraphBuilder:
    """A low-level dask graph under construction: tuple tasks with explicit, deterministic keys.

    Cheaper to build than ``dask.delayed`` by orders of magnitude, which matters with
    thousands of block-pair tasks. Output chunks are keyed ``(name, *index)``.
    """

    def __init__(self, name: str):
        self.name = name
        self.tasks: dict[Any, Any] = {}
        self.dependencies: list[Any] = []

    def add(self, stage: str, index: tuple, func: Callable, *args: Any) -> tuple:
        key = (f"{stage}-{self.name}", *index)
        self.tasks[key] = (func, *args)
        return key

    def output(self, index: tuple, func: Callable, *args: Any) -> tuple:
        key = (self.name, *index)
        self.tasks[key] = (func, *args)
        return key

    def depend(self, collection: Any) -> None:
        self.dependencies.append(collection)

    def reduce(self, stage: str, index: tuple, keys: list, combine: Callable, fan_in: int = 8) -> Any:
        """Combine many partial results in a tree with bounded fan-in; returns the final key."""
        if not keys:
            raise ValueError("nothing to reduce")
        level = 0
        while len(keys) > 1:
            keys = [
                self.add(stage, (*index, level, i), combine, keys[j : j + fan_in]) if len(keys[j : j + fan_in]) > 1
                else keys[j]
                for i, j in enumerate(range(0, len(keys), fan_in))
            ]
            level += 1
        return keys[0]

    def array(self, chunks: tuple, dtype: Any) -> da.Array:
        graph = HighLevelGraph.from_collections(self.name, self.tasks, dependencies=self.dependencies)
        return da.Array(graph, self.name, chunks=chunks, dtype=dtype)


def sum_parts(parts: list[Any]) -> Any:
    """Sum numpy arrays elementwise."""
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def block_keys(array: da.Array) -> list:
    """Keys of the blocks of an array chunked along its first axis only, in order."""
    return list(flatten(array.__dask_keys__()))


def _block_group_sums(block: np.ndarray, local_rows: list[np.ndarray]) -> np.ndarray:
    flat = block.reshape(block.shape[0], -1)
    out = np.zeros((len(local_rows), flat.shape[1]), dtype=np.float64)
    for g, rows in enumerate(local_rows):
        if rows.size:
            out[g] = flat[rows].sum(axis=0, dtype=np.float64)
    return out


def _divide_rows(total: np.ndarray, counts: list[int]) -> np.ndarray:
    return total / np.asarray(counts, dtype=np.float64)[:, None]


def group_unit_means(graph: GraphBuilder, layer: LayerData, groups: Sequence[np.ndarray], index: tuple) -> tuple:
    """Key of the mean activation of every unit over each group of rows: ``(groups, units)``.

    One task per image chunk (partial sums for all groups), then a tree sum. The chunks
    are read through a clone of the array's graph: sharing the reading tasks with the
    later gather pass would make dask hold every chunk in memory until all means are
    known, so ``"top"`` reads each chunk twice instead, each read streaming.
    """
    source = clone(layer.data)
    graph.depend(source)
    bounds = layer.block_bounds()
    parts = []
    for k, chunk in enumerate(block_keys(source)):
        lo, hi = bounds[k], bounds[k + 1]
        local = [rows[(rows >= lo) & (rows < hi)] - lo for rows in groups]
        if any(r.size for r in local):
            parts.append(graph.add("unit-sums", (*index, k), _block_group_sums, chunk, local))
    total = graph.reduce("unit-sums-total", index, parts, sum_parts)
    return graph.add("unit-means", index, _divide_rows, total, [len(rows) for rows in groups])


def needs_unit_means(table: DrawTable) -> bool:
    """Whether the draws depend on the data (``"top"`` units of fewer than all units)."""
    return table.unit_type == "top" and any(n < table.size for n, _ in table.keys)


def plan_for(graph: GraphBuilder, table: DrawTable, layer: LayerData, groups: Sequence[np.ndarray],
             index: tuple) -> tuple:
    """Key of the layer's :class:`UnitPlan` (``"top"``: after a pass for the unit means)."""
    if needs_unit_means(table):
        return graph.add("plan", index, make_plan, table, group_unit_means(graph, layer, groups, index))
    return graph.add("plan", index, make_plan, table)


# --------------------------------------------------------------------------- public
def _first_draw(plan: UnitPlan) -> np.ndarray:
    return plan.draw(0, 0)


def _unravel_labels(flat: np.ndarray, shape: tuple[int, ...], axis: int, labels: np.ndarray) -> np.ndarray:
    return labels[np.unravel_index(flat, shape)[axis]]


def select_units(
    obj: Any,
    layer: str | None = None,
    n_units: int = 10000,
    unit_type: UnitType = "random",
    seed: int = 0,
    resample: int = 0,
    *,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = "image",
    set_coord: str = "set",
    filter_dim: str = "filter",
) -> xr.Dataset:
    """The units one draw uses, as labelled coordinates.

    :func:`cnndiff_xr.differentiation` and :func:`cnndiff_xr.rdm` use exactly these units
    for ``(layer, n_units, seed, resample)`` (for ``"top"``: over the same images).

    Parameters
    ----------
    obj
        Store tree, DataArray or Dataset (see :func:`as_collection`).
    layer
        Layer name; may be omitted when there is a single layer.
    n_units, unit_type, seed, resample
        The draw; see :func:`draw_units`. ``"top"`` ranks units by their mean over the
        images of ``sets`` (all images when ``None``) and does not depend on ``seed``.
    sets
        Images whose means rank the units for ``"top"``.

    Returns
    -------
    xarray.Dataset
        Dimension ``unit`` (``sampled_unit`` when a feature dim is already called
        ``unit``); one variable per feature dim (e.g. ``y``, ``x``, ``filter``)
        holding the coordinate labels of each unit, and ``flat_index`` (C-order position
        in the layer). Scalar coordinate ``layer``. Lazy (dask) for ``"top"``. Reuse:
        ``activation.sel({d: units[d] for d in feature_dims})`` gives ``(image, unit)``.
    """
    coll = as_collection(obj, sample_dim=sample_dim, set_coord=set_coord)
    if layer is None:
        if len(coll.layers) != 1:
            raise ValueError(f"pass layer=; the data have layers {list(coll.layers)}")
        layer = next(iter(coll.layers))
    data = coll.layer(layer)
    (n,) = check_n_units(n_units)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    seed = check_count("seed", seed, 0)
    resample = check_count("resample", resample, 0)
    table = draw_table(data, (n,), [resample], unit_type, seed, filter_dim)
    n_used = table.n_used[0]
    shape = data.feature_shape
    if unit_type == "top" and n_used < data.size:
        rows = np.sort(np.concatenate(list(coll.rows(sets).values())))
        graph = GraphBuilder(f"top-units-{tokenize(data.data.name, rows, table)}")
        plan = plan_for(graph, table, data, [rows], ())
        graph.output((0,), _first_draw, plan)
        flat = graph.array(((n_used,),), np.int64)
    else:
        flat = draw_units(shape, n, unit_type, seed=seed, layer=layer, resample=resample, filter_axis=table.filter_axis)
    # "unit" names the new dimension, unless the data already use it (a recording's cells)
    unit_dim = "unit" if "unit" not in data.feature_dims else "sampled_unit"
    variables = {}
    for axis, dim in enumerate(data.feature_dims):
        labels = data.array[dim].values if dim in data.array.coords else np.arange(shape[axis])
        if isinstance(flat, da.Array):
            values = flat.map_blocks(_unravel_labels, shape, axis, labels, dtype=labels.dtype)
        else:
            values = _unravel_labels(flat, shape, axis, labels)
        variables[dim] = (unit_dim, values)
    return xr.Dataset(
        variables,
        coords={unit_dim: np.arange(n_used), "flat_index": (unit_dim, flat), "layer": layer},
        attrs={"n_units": n, "unit_type": unit_type, "seed": seed, "resample": resample},
    )
