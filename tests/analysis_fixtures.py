"""Helpers for the analysis tests: synthetic store-like trees, a laziness guard, read
counters and a plain numpy/scipy reference implementation of the seed's measure."""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.spatial.distance import pdist

# network order, shapes without the image axis; the last is a dense (softmax) layer
LAYERS: dict[str, tuple[int, ...]] = {
    "input_layer": (6, 6, 3),
    "block1_conv1": (5, 5, 8),
    "block1_pool": (2, 2, 8),
    "predictions": (10,),
}
SETS: dict[str, int] = {"white_noise": 9, "cats": 7, "random": 12}


# --------------------------------------------------------------------------- laziness
class CountingScheduler:
    """A dask scheduler that counts computes and raises past ``max_computes`` (flox's)."""

    def __init__(self, max_computes: int = 0):
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(f"Too many dask computations: {self.total_computes} > {self.max_computes}")
        return dask.get(dsk, keys, **kwargs)


def raise_if_dask_computes(max_computes: int = 0):
    """Context manager: any dask compute inside raises (flox's ``raise_if_dask_computes``)."""
    return dask.config.set(scheduler=CountingScheduler(max_computes))


# --------------------------------------------------------------------------- read counting
class CountingArray:
    """Array-like that counts reads, for ``da.from_array`` (synchronous scheduler only)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return self.array[key]


# --------------------------------------------------------------------------- synthetic trees
def _activation(rng: np.random.Generator, set_index: np.ndarray, shape: tuple[int, ...], dense: bool, first: bool):
    n = set_index.size
    size = int(np.prod(shape))
    # a per-set pattern plus per-image variation; sets differ in how variable they are
    pattern = rng.normal(size=(3, size))
    spread = np.array([1.0, 0.3, 0.7])[set_index % 3][:, None]
    x = pattern[set_index % 3] * 0.5 + spread * rng.normal(size=(n, size))
    if dense:  # softmax, like predictions: positive, never constant
        e = np.exp(x - x.max(axis=1, keepdims=True))
        x = e / e.sum(axis=1, keepdims=True)
    elif not first:  # ReLU: sparse and non-negative, many exact zeros
        x = np.maximum(x - 0.3, 0.0)
    return x.reshape((n,) + shape)


def make_tree(
    sets: dict[str, int] | None = None,
    layers: dict[str, tuple[int, ...]] | None = None,
    *,
    chunk: int = 4,
    dtype: str = "float32",
    seed: int = 0,
    shuffle: bool = True,
    counting: bool = False,
) -> tuple[xr.DataTree, dict[str, Any]]:
    """An in-memory tree laid out like a store (see the store contract).

    Returns the tree and the underlying numpy arrays by layer (``CountingArray`` objects
    when ``counting``). Images of the sets are interleaved when ``shuffle`` so that sets
    straddle chunks.
    """
    sets = SETS if sets is None else sets
    layers = LAYERS if layers is None else layers
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[name] * n for name, n in sets.items()])
    if shuffle:
        labels = labels[rng.permutation(labels.size)]
    set_index = np.array([list(sets).index(s) for s in labels])
    n = labels.size
    images = np.array([f"img{i:04d}" for i in range(n)])
    sources = np.array([f"{s}/{i}.jpg" for i, s in enumerate(labels)])
    root = xr.Dataset(
        {"completed": ("image", np.ones(n, bool))},
        coords={"image": images, "set": ("image", labels), "source": ("image", sources)},
        attrs={"layers": list(layers), "model": "synthetic"},
    )
    nodes: dict[str, xr.Dataset] = {"/": root}
    raw: dict[str, Any] = {}
    for k, (name, shape) in enumerate(layers.items()):
        dense = len(shape) == 1
        values = _activation(rng, set_index, shape, dense, k == 0).astype(dtype)
        source = CountingArray(values) if counting else values
        raw[name] = source
        data = da.from_array(source, chunks=(chunk,) + shape, name=f"activation-{name}-{seed}-{dtype}-{chunk}")
        dims = ("image", "filter") if dense else ("image", "y", "x", "filter")
        coords: dict[str, Any] = {"set": ("image", labels), "source": ("image", sources),
                                  "filter": np.arange(shape[-1])}
        if not dense:
            coords |= {"y": np.arange(shape[0]), "x": np.arange(shape[1])}
        nodes[f"/{name}"] = xr.Dataset({"activation": (dims, data)}, coords=coords)
    return xr.DataTree.from_dict(nodes), raw


def reduce_tree(full_tree: xr.DataTree, draws: Any, filter_means: bool = True) -> xr.DataTree:
    """The tree of a reduced store made from a full one, per the layout of ``cnndiff_xr/schema.py``.

    ``draws``: a ``cnndiff_xr.sampling.UnitDraws`` (None: keep every layer whole, i.e. a full store with filter
    means). A layer larger than the biggest registered ``n_units`` keeps only the columns
    ``draws.kept_units(layer, shape, filter_axis=-1)`` as ``activation (image, unit)`` (same dtype, chunked
    ``(chunk, n_kept)`` like the full layer along images), with coordinates ``flat_index`` and the unit's
    ``y``/``x``/``filter`` positions along ``unit`` and attributes ``layer_shape``/``layer_dims``; other layers are
    kept as they are. With ``filter_means``, every layer gets the subgroup ``filter_means`` (``filter_mean`` float32,
    ``layer_mean`` and ``layer_css`` float64, computed plainly with numpy from the stored values). The root records
    the registration and ``filter_means``. Values are copied out of the full tree (read once, in memory), so the
    reduced tree reads nothing of the full one.
    """
    from dask.base import tokenize

    from cnndiff_xr import schema

    root = full_tree.to_dataset(inherit=False)
    root = root.assign_attrs({schema.UNIT_DRAWS_ATTR: None if draws is None else draws.to_attrs(),
                              schema.FILTER_MEANS_ATTR: bool(filter_means)})
    nodes: dict[str, xr.Dataset] = {"/": root}
    for name, child in full_tree.children.items():
        ds = child.to_dataset(inherit=False)
        nodes[f"/{name}"] = ds
        if schema.ACTIVATION not in ds.data_vars:
            continue
        act = ds[schema.ACTIVATION]
        shape, dims = tuple(int(s) for s in act.shape[1:]), tuple(str(d) for d in act.dims[1:])
        values = np.asarray(act.values)
        n = values.shape[0]
        chunks = act.data.chunks[0] if isinstance(act.data, da.Array) else (n,)
        kept = None if draws is None else draws.kept_units(name, shape, filter_axis=-1)
        if kept is not None:
            columns = values.reshape(n, -1)[:, kept]
            source = act.data.name if isinstance(act.data, da.Array) else values
            data = da.from_array(columns, chunks=(chunks, kept.size), name=f"reduced-{name}-{tokenize(source, kept)}")
            positions = np.unravel_index(kept, shape)
            unit_coords = {
                dim: (schema.UNIT_DIM, positions[axis].astype(ds[dim].dtype if dim in ds.coords else np.int32))
                for axis, dim in enumerate(dims)
            }
            image_coords = {k: v for k, v in ds.coords.items() if v.dims == (schema.IMAGE_DIM,)}
            attrs = {**act.attrs, "layer": name, schema.LAYER_SHAPE_ATTR: list(shape),
                     schema.LAYER_DIMS_ATTR: list(dims)}
            nodes[f"/{name}"] = xr.Dataset(
                {schema.ACTIVATION: ((schema.IMAGE_DIM, schema.UNIT_DIM), data, attrs)},
                coords={**image_coords, schema.FLAT_INDEX: (schema.UNIT_DIM, kept), **unit_coords},
                attrs=ds.attrs,
            )
        if filter_means:
            x = values.astype(np.float64).reshape(n, -1, shape[-1])
            flat = x.reshape(n, -1)
            layer_mean = flat.mean(axis=1)
            means = {
                schema.FILTER_MEAN: ((schema.IMAGE_DIM, schema.FILTER_DIM), x.mean(axis=1).astype(np.float32)),
                schema.LAYER_MEAN: ((schema.IMAGE_DIM,), layer_mean),
                schema.LAYER_CSS: ((schema.IMAGE_DIM,), ((flat - layer_mean[:, None]) ** 2).sum(axis=1)),
            }
            filters = ds[schema.FILTER_DIM].values if schema.FILTER_DIM in ds.coords else np.arange(shape[-1])
            nodes[f"/{name}/{schema.MEANS_GROUP}"] = xr.Dataset(
                {k: (d, da.from_array(v, chunks=(chunks,) + v.shape[1:])) for k, (d, v) in means.items()},
                coords={schema.FILTER_DIM: filters},
            )
    return xr.DataTree.from_dict(nodes)


def make_recording(n_states: int = 30, seed: int = 1) -> xr.DataArray:
    """A neurophysiology-like array: spectral state vectors ``(state, unit, frequency)``."""
    rng = np.random.default_rng(seed)
    condition = np.array(["gratings", "movie", "spontaneous"])[np.arange(n_states) % 3]
    power = rng.gamma(2.0, 1.0, size=(n_states, 12, 5)) * (1 + (condition == "movie"))[:, None, None]
    return xr.DataArray(
        power,
        dims=("state", "unit", "frequency"),
        coords={
            "state": np.arange(n_states),
            "unit": [f"cell{i}" for i in range(12)],
            "frequency": [2.0, 4.0, 8.0, 16.0, 32.0],
            "condition": ("state", condition),
        },
        name="lfp_power",
    )


def tree_or_store(request: pytest.FixtureRequest, kind: str) -> xr.DataTree:
    """``"synthetic"``: :func:`make_tree`; ``"tiny_store"``: the real store fixture when
    ``tests/conftest.py`` provides one (skipped otherwise)."""
    if kind == "synthetic":
        return make_tree()[0]
    try:
        store = request.getfixturevalue("tiny_store")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py provides no tiny_store fixture yet")
    if isinstance(store, xr.DataTree):
        return store
    if store not in _OPENED:
        import cnndiff_xr as cx

        _OPENED[store] = cx.open_activations(store)
    return _OPENED[store]


_OPENED: dict[str, xr.DataTree] = {}


# --------------------------------------------------------------------------- reference
_VALUES: dict[int, tuple[Any, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}


def _layer_values(tree: xr.DataTree, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(images x units float64 matrix, set labels) of a layer, read once per tree."""
    held, cache = _VALUES.setdefault(id(tree), (tree, {}))
    assert held is tree
    if layer not in cache:
        act = tree[layer]["activation"]
        values = np.asarray(act.values, dtype=np.float64).reshape(act.shape[0], -1)
        cache[layer] = values, np.asarray(act["set"].values).astype(str)
    return cache[layer]


def layer_matrix(tree: xr.DataTree, layer: str, set_name: str | None, units: np.ndarray) -> np.ndarray:
    """The images x sampled units matrix of a set, gathered with plain numpy (float64)."""
    values, labels = _layer_values(tree, layer)
    if set_name is not None:
        values = values[labels == set_name]
    return values[:, units]


def reference_distances(x: np.ndarray, norm: str, metric: str) -> np.ndarray:
    """The seed's recipe with numpy/scipy: normalise, ``pdist``, ``/ sqrt(m)`` for Euclidean."""
    x = np.asarray(x, dtype=np.float64)
    if norm == "layer":
        z = (x - x.mean()) / x.std()
    elif norm == "image":
        z = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
    else:
        z = x
    d = pdist(z, metric=metric)
    return d / np.sqrt(x.shape[1]) if metric == "euclidean" else d


def reference_reduce(d: np.ndarray, reduction: str) -> float:
    return float(np.median(d) if reduction == "median" else np.mean(d))


_UNITS: dict[tuple, tuple[Any, np.ndarray]] = {}


def unit_indices(tree: Any, layer: str, n_units: int, unit_type: str = "random", seed: int = 0,
                 resample: int = 0, sets: Sequence[str] | None = None) -> np.ndarray:
    """Flat indices of a draw, through the public ``select_units`` (cached per tree)."""
    from cnndiff_xr.analysis.draws import select_units

    key = (id(tree), layer, n_units, unit_type, seed, resample, tuple(sets or ()))
    if key not in _UNITS:
        units = select_units(tree, layer, n_units=n_units, unit_type=unit_type, seed=seed, resample=resample,
                             sets=sets)
        _UNITS[key] = tree, np.asarray(units["flat_index"].values)
    held, units = _UNITS[key]
    assert held is tree
    return units


def arrays_in_graph(collection: Any) -> list[np.ndarray]:
    """The distinct numpy arrays that pickling ``collection``'s graph writes: what a distributed scheduler is sent
    (distributed pickles a graph at once, so an array held by many tasks is written once)."""
    found: dict[int, np.ndarray] = {}

    class Recorder(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, np.ndarray):
                found.setdefault(id(obj), obj)
            return NotImplemented

    Recorder(io.BytesIO()).dump(dict(collection.__dask_graph__()))
    return list(found.values())


def graph_dependents(collection: Any, prefix: str) -> set:
    """Keys of the (unoptimised) graph that read a chunk whose key name starts with ``prefix``."""
    graph = dict(collection.__dask_graph__())
    deps = collection.__dask_graph__().get_all_dependencies()
    readers = set()
    for key, dependencies in deps.items():
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith(prefix):
            continue
        if any(str(d[0] if isinstance(d, tuple) else d).startswith(prefix) for d in dependencies):
            readers.add(key)
    assert graph  # a real graph
    return readers


# ------------------------------------------------------------------------- fixtures shared by the analysis tests
# (imported into each analysis test module, which makes pytest use them there)
@pytest.fixture(autouse=True)
def synchronous():
    """Compute in-process even when a session fixture has made a distributed Client the default."""
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def tree():
    return make_tree()[0]


@pytest.fixture(params=["synthetic", "tiny_store"])
def any_tree(request):
    return tree_or_store(request, request.param)
