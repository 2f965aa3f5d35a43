"""The analysis' view of its input: per-layer dask arrays of shape ``(sample, *features)`` and the sets of samples.

:func:`as_collection` adapts what the user passes -- a store's :class:`xarray.DataTree`, a single
:class:`xarray.DataArray` with a sample dimension, or a :class:`xarray.Dataset` of such arrays -- to a
:class:`Collection`, chunked along the sample dimension only. A store is read through the names of
:mod:`cnndiff_xr.schema` alone; its ``completed`` record guards every analysis against unfinished images
(:func:`completed_check`, :func:`completed_flags`, :func:`refuse_incomplete`).

A *reduced* layer (a store extracted with registered unit draws, ``schema.py``) is stored as ``(image, unit)``: only
the units its draws select, with their flat indices. Its :class:`LayerData` still describes the logical layer
(``feature_shape``, ``feature_dims``, ``size`` are those of the full layer, which is what draws are computed from)
and carries what it stores (:class:`StoredUnits`), the registration (:class:`~cnndiff_xr.sampling.UnitDraws`) and,
when extracted with filter means, the layer's means subgroup.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.delayed import Delayed

from ..sampling import UnitDraws
from ..schema import (
    ACTIVATION,
    COMPLETED,
    FLAT_INDEX,
    IMAGE_DIM,
    LAYER_DIMS_ATTR,
    LAYER_SHAPE_ATTR,
    LAYERS_ATTR,
    MEANS_GROUP,
    SET_COORD,
    UNIT_DIM,
    UNIT_DRAWS_ATTR,
)
from ..validation import ParameterTypeError, ParameterValueError, UnknownLabelError

__all__ = [
    "ALL_SAMPLES",
    "Collection",
    "LayerData",
    "StoredUnits",
    "as_collection",
    "completed_check",
    "completed_flags",
    "refuse_incomplete",
    "stored_columns",
]

#: name given to the single group of samples when the data carry no set coordinate
ALL_SAMPLES = "all"
#: target size of a chunk along the samples when in-memory data are chunked for the analysis
_SAMPLE_CHUNK_BYTES = 64 * 2**20

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class StoredUnits:
    """What a reduced layer stores: the columns of its ``(sample, unit)`` array are the units ``flat_index`` (sorted
    C-order positions) of a logical layer of per-sample ``shape`` with feature dims ``dims``."""

    flat_index: np.ndarray  # int64, sorted
    shape: tuple[int, ...]
    dims: tuple[str, ...]


def stored_columns(flat_index: np.ndarray, units: np.ndarray, layer: str) -> np.ndarray:
    """The columns of a reduced layer (stored units ``flat_index``) that hold the sorted logical flat indices
    ``units``; raises a ``ValueError`` naming the units that are not stored: the safety net behind the refusal of
    unregistered draws (:func:`~cnndiff_xr.analysis.draws.draw_table`)."""
    columns = np.searchsorted(flat_index, units)
    held = columns < flat_index.size
    held[held] = flat_index[columns[held]] == units[held]
    if not held.all():
        missing = np.asarray(units)[~held]
        raise ValueError(
            f"layer {layer!r}: {missing.size} drawn unit(s) are not among the {flat_index.size} units the store keeps "
            f"(e.g. flat indices {missing[:5].tolist()}); the draw is not one the store registered (n_units, "
            "resample, seed, unit_type and the filter dimension must be those of the extraction). Analyse a full "
            "store for other draws"
        )
    return columns.astype(np.int64)


@dataclass(frozen=True)
class LayerData:
    """One layer as ``(sample, *features)``, dask-backed, one chunk along every feature dim.

    A reduced layer's ``array`` is ``(sample, unit)``, its columns the units of ``stored``; ``feature_shape``,
    ``feature_dims`` and ``size`` describe the logical (full) layer either way, so that draws are computed as on a
    full store. ``draws``: the store's registration (None for a full store or plain data); ``means``: the layer's
    means subgroup (``schema.MEANS_GROUP``, lazy) when the store has one.
    """

    name: str
    array: xr.DataArray
    stored: StoredUnits | None = None
    draws: UnitDraws | None = None
    means: xr.Dataset | None = None

    @property
    def data(self) -> da.Array:
        data: da.Array = self.array.data
        return data

    @property
    def reduced(self) -> bool:
        """Whether only some units of the layer are stored (the units of the registered draws)."""
        return self.stored is not None

    @property
    def flat_index(self) -> np.ndarray | None:
        """The stored units' flat indices of a reduced layer; None when the layer is whole."""
        return None if self.stored is None else self.stored.flat_index

    @property
    def feature_dims(self) -> tuple[str, ...]:
        if self.stored is not None:
            return self.stored.dims
        return tuple(str(d) for d in self.array.dims[1:])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        if self.stored is not None:
            return self.stored.shape
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def size(self) -> int:
        """Units per sample (of the logical layer)."""
        return int(np.prod(self.feature_shape))

    def filter_axis(self, filter_dim: str) -> int | None:
        """Axis of ``filter_dim`` among the feature dims (``None`` without one)."""
        dims = self.feature_dims
        return dims.index(filter_dim) if filter_dim in dims else None

    def labels(self, axis: int) -> np.ndarray:
        """Labels of feature axis ``axis`` (its coordinate, else ``0..n-1``; a reduced layer's are ``0..n-1``, as a
        store's ``y``, ``x`` and ``filter``)."""
        dim = self.feature_dims[axis]
        if self.stored is None and dim in self.array.coords:
            return np.asarray(self.array[dim].values)
        if self.stored is None:
            return np.arange(self.feature_shape[axis])
        # a reduced layer's coordinate of that name holds each stored unit's position: its dtype is the labels'
        dtype = self.array[dim].dtype if dim in self.array.coords else np.dtype(np.int64)
        return np.arange(self.feature_shape[axis], dtype=dtype)

    def block_bounds(self) -> np.ndarray:
        """First sample of every chunk, and the sample count: ``(chunks + 1,)`` int64."""
        return np.concatenate([[0], np.cumsum(self.data.chunks[0])]).astype(np.int64)


@dataclass(frozen=True)
class Collection:
    """Everything the analysis needs from its input, independent of its container."""

    sample_dim: str
    samples: np.ndarray  # labels along the sample dimension
    set_labels: np.ndarray  # str, the set of every sample
    layers: dict[str, LayerData]
    completed: np.ndarray | da.Array | None  # bool along the samples: finished in the store (None: no record)
    _shared: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def shared(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, made once per ``key`` for this collection, so that the tasks of every layer of a graph built
        from it hold one object where they need equal ones (the sets' rows and labels) and the graph pickles it once.
        Copies per layer were most of a 5,000-image differentiation's graph (the labels and row indices of every set,
        once per layer: 15-20 MiB for VGG16's 22 layers), growing with images x layers; distributed warns of a graph
        over 10 MiB and the scheduler holds it."""
        if key not in self._shared:
            self._shared[key] = make()
        value: T = self._shared[key]
        return value

    def labels(self, rows: np.ndarray) -> np.ndarray:
        """``samples[rows]`` (for messages), one array per distinct ``rows`` (:meth:`shared`)."""
        def make() -> np.ndarray:
            labels = self.samples[rows]
            labels.setflags(write=False)  # every layer's tasks hold it
            return labels

        return self.shared(("labels", np.asarray(rows, np.int64).tobytes()), make)

    @property
    def set_names(self) -> list[str]:
        """The sets, in order of their first sample."""
        _, first = np.unique(self.set_labels, return_index=True)
        return [str(self.set_labels[i]) for i in sorted(first)]

    def layer(self, name: str) -> LayerData:
        if name not in self.layers:
            raise UnknownLabelError(f"unknown layer {name!r}; the data have layers {list(self.layers)}")
        return self.layers[name]

    def single_layer(self, name: str | None) -> LayerData:
        """Layer ``name``, or the only layer when ``name`` is ``None``."""
        if name is None:
            if len(self.layers) != 1:
                raise ParameterValueError(f"pass layer=; the data have layers {list(self.layers)}")
            name = next(iter(self.layers))
        return self.layer(name)

    def layer_names(self, layers: str | Iterable[str] | None) -> list[str]:
        """The requested layers (all when ``None``), checked."""
        if layers is None:
            return list(self.layers)
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ParameterValueError("layers is empty; pass None for every layer")
        for name in names:
            self.layer(name)
        return names

    def rows(self, sets: str | Iterable[str] | None, *, min_size: int = 1) -> dict[str, np.ndarray]:
        """Row indices of each requested set, in sample order."""
        known = self.set_names
        names = known if sets is None else ([sets] if isinstance(sets, str) else list(sets))
        if not names:
            raise ParameterValueError("sets is empty; pass None for every set")
        out = {}
        for name in names:
            if name not in known:
                raise UnknownLabelError(f"unknown set {name!r}; the data have sets {known}")
            rows = np.flatnonzero(self.set_labels == name)
            if rows.size < min_size:
                raise ParameterValueError(
                    f"set {name!r} has {rows.size} image(s); pairwise distances need at least {min_size}"
                    + ("" if sets is not None else "; choose the other sets with sets=[...]")
                )
            out[str(name)] = rows
        return out

    def selected_rows(self, sets: str | Iterable[str] | None) -> np.ndarray:
        """The rows of all requested sets together, in sample order."""
        return np.sort(np.concatenate(list(self.rows(sets).values())))

    def completed_token(self) -> str | np.ndarray | None:
        """What identifies the completion record in a graph name (a lazy record by its dask name)."""
        if isinstance(self.completed, da.Array):
            name: str = self.completed.name
            return name
        return self.completed


def _stored_units(array: xr.DataArray, name: str, sample_dim: str) -> StoredUnits | None:
    """A reduced layer's :class:`StoredUnits`: an array ``(sample, unit)`` with a flat-index coordinate along
    ``unit`` and the logical layer's shape and dims as attributes; None for any other array."""
    if set(array.dims) != {sample_dim, UNIT_DIM} or LAYER_SHAPE_ATTR not in array.attrs:
        return None
    if LAYER_DIMS_ATTR not in array.attrs or FLAT_INDEX not in array.coords or array[FLAT_INDEX].dims != (UNIT_DIM,):
        raise ValueError(
            f"layer {name!r} is stored reduced ({sample_dim}, {UNIT_DIM}) with attribute {LAYER_SHAPE_ATTR!r} but "
            f"lacks attribute {LAYER_DIMS_ATTR!r} or coordinate {FLAT_INDEX!r} along {UNIT_DIM!r}: the store is "
            "damaged or was not written by cnndiff_xr; re-extract it"
        )
    flat = array[FLAT_INDEX].variable
    if isinstance(flat.data, da.Array):  # a store opened lazily: read the small index here, in this process
        (flat,) = dask.compute(flat, scheduler="synchronous")
    shape = tuple(int(s) for s in array.attrs[LAYER_SHAPE_ATTR])
    dims = tuple(str(d) for d in array.attrs[LAYER_DIMS_ATTR])
    flat_index = np.asarray(flat.values, dtype=np.int64)
    if len(shape) != len(dims) or (flat_index.size and (np.any(np.diff(flat_index) <= 0) or flat_index[0] < 0
                                                         or flat_index[-1] >= int(np.prod(shape)))):
        raise ValueError(
            f"layer {name!r}: {FLAT_INDEX!r} must be sorted unique indices into a layer of shape {shape} with dims "
            f"{dims}; the store is damaged or was not written by cnndiff_xr"
        )
    return StoredUnits(flat_index, shape, dims)


def _as_layer(array: xr.DataArray, name: str, sample_dim: str, draws: UnitDraws | None = None,
              means: xr.Dataset | None = None) -> LayerData:
    if sample_dim not in array.dims:
        raise ParameterValueError(
            f"{name!r} has no sample dimension {sample_dim!r} (dims {array.dims}); pass sample_dim="
        )
    if array.ndim < 2:
        raise ValueError(f"{name!r} has no feature dimension besides {sample_dim!r}")
    array = array.transpose(sample_dim, ...)
    if not isinstance(array.data, da.Array):
        row_bytes = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
        array = array.chunk({sample_dim: max(1, _SAMPLE_CHUNK_BYTES // row_bytes)})
    if any(len(c) > 1 for c in array.data.chunks[1:]):
        # gathering units needs whole samples in a block (a store is chunked like this already)
        array = array.chunk({d: -1 for d in array.dims[1:]})
    return LayerData(name, array, _stored_units(array, name, sample_dim), draws, means)


def _variable(node: xr.DataTree, name: str) -> xr.DataArray:
    variable = node[name]
    if not isinstance(variable, xr.DataArray):
        raise TypeError(f"{name!r} of {node.path!r} is a group, not a variable")
    return variable


def _load_labels(values: xr.DataArray | np.ndarray) -> np.ndarray:
    # Store contract: non-index image coordinates are numpy; a lazy one is loaded (tiny).
    array = np.asarray(values.values if isinstance(values, xr.DataArray) else values)
    if array.dtype.kind in "TO":  # numpy StringDType (zarr's variable-length strings) or objects
        array = np.array([str(v) for v in array.tolist()], dtype=str)
    return array


def as_collection(obj: xr.DataTree | xr.DataArray | xr.Dataset, *, sample_dim: str = IMAGE_DIM,
                  set_coord: str = SET_COORD) -> Collection:
    """Adapt a store tree, a DataArray or a Dataset to a :class:`Collection`.

    * :class:`xarray.DataTree`: one layer per child group with an activation variable, in the order of the root's
      layers attribute when present; the root's completion record (if any) guards against analysing unfinished
      images.
    * :class:`xarray.DataArray`: one layer named after the array (``"data"`` if unnamed); every dim except
      ``sample_dim`` is a feature dim, e.g. ``(state, unit, frequency)``.
    * :class:`xarray.Dataset`: one layer per data variable that has ``sample_dim``.

    Samples are grouped by the ``set_coord`` coordinate along ``sample_dim``; without it all samples form one set
    named ``"all"``.

    A reduced layer -- an array ``(sample_dim, "unit")`` with attributes ``schema.LAYER_SHAPE_ATTR`` and
    ``schema.LAYER_DIMS_ATTR`` and a ``schema.FLAT_INDEX`` coordinate along ``"unit"`` -- becomes a layer of its
    logical shape that stores some units (:class:`StoredUnits`). The registration (``schema.UNIT_DRAWS_ATTR``) is read
    from the tree's (or the DataArray's, or the Dataset's) attributes, a layer's means from its
    ``schema.MEANS_GROUP`` subgroup.
    """
    record: xr.DataArray | None = None
    fallback: Mapping[Hashable, Any]
    means: dict[str, xr.Dataset] = {}
    if isinstance(obj, xr.DataTree):
        order = [str(n) for n in obj.attrs.get(LAYERS_ATTR, [])]
        children = [str(n) for n in obj.children if ACTIVATION in obj[n].data_vars]
        names = [n for n in order if n in children] + [n for n in children if n not in order]
        arrays = {n: _variable(obj.children[n], ACTIVATION) for n in names}
        means = {n: obj.children[n].children[MEANS_GROUP].to_dataset() for n in names
                 if MEANS_GROUP in obj.children[n].children}
        if COMPLETED in obj.ds.data_vars:
            record = _variable(obj, COMPLETED)
        fallback = obj.ds.coords
        registered = obj.attrs.get(UNIT_DRAWS_ATTR)
    elif isinstance(obj, xr.DataArray):
        arrays = {str(obj.name) if obj.name is not None else "data": obj}
        fallback = {}
        registered = obj.attrs.get(UNIT_DRAWS_ATTR)
    elif isinstance(obj, xr.Dataset):
        arrays = {str(k): v for k, v in obj.data_vars.items() if sample_dim in v.dims}
        fallback = obj.coords
        registered = obj.attrs.get(UNIT_DRAWS_ATTR)
    else:
        raise ParameterTypeError(f"expected an xarray DataTree, DataArray or Dataset, got {type(obj).__name__}")
    if not arrays:
        raise ValueError(f"no layer with a sample dimension {sample_dim!r} found")
    draws = UnitDraws.from_attrs(registered)
    layers = {name: _as_layer(arr, name, sample_dim, draws, means.get(name)) for name, arr in arrays.items()}
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
    completed: np.ndarray | da.Array | None = None
    if record is not None:
        completed = record.data if isinstance(record.data, da.Array) else np.asarray(record.values, bool)
    return Collection(sample_dim, samples, set_labels, layers, completed)


def refuse_incomplete(flags: np.ndarray, names: np.ndarray | None = None) -> None:
    """Raise a ``ValueError`` if any of ``flags`` (the completion record of the selected images) is false.

    ``names``: the images' labels, for the message (a chunk task may not have them).
    """
    missing = np.flatnonzero(~np.asarray(flags, bool))
    if missing.size:
        example = "" if names is None else f" (e.g. {[str(n) for n in names[missing[:3]]]})"
        raise ValueError(
            f"{missing.size} of the selected images are not completed in the store{example}; "
            "finish the extraction first"
        )


def completed_check(coll: Collection, rows: np.ndarray) -> Delayed | None:
    """Refuse unfinished images among ``rows``: raise now for an in-memory record; otherwise a ``dask.delayed``
    check for the reading tasks to depend on (``None`` when the data have no record)."""
    if coll.completed is None:
        return None
    if isinstance(coll.completed, np.ndarray):
        refuse_incomplete(coll.completed[rows], coll.samples[rows])
        return None
    check: Delayed = dask.delayed(refuse_incomplete, pure=True)(coll.completed[rows], coll.samples[rows])
    return check


def completed_flags(coll: Collection, rows: np.ndarray) -> np.ndarray | da.Array:
    """The completion record of ``rows`` for chunk tasks to check as they read (:func:`refuse_incomplete`):
    all true when there is no record or an in-memory one (checked here, now), else the lazy record."""
    if isinstance(coll.completed, da.Array):
        flags: da.Array = coll.completed[rows]
        return flags
    if coll.completed is not None:
        refuse_incomplete(coll.completed[rows], coll.samples[rows])
    return np.ones(rows.size, bool)
