"""The store: a Zarr v3 layout written through :class:`xarray.DataTree`, opened lazily.

Layout (see DESIGN.md, "Store schema")::

    /                 attrs: provenance (model, weights, input size, resize, preprocessing, layers, dtype, versions)
                      coords image (unique str id), set, source; predicted_class/label/probability (ImageNet heads)
                      data   completed (image) bool  -- set per batch, only after that batch's activations
    /<layer>          activation (image, y, x, filter) or (image, filter); coords filter, y, x and (repeated, since
                      xarray inherits only indexed coordinates) the image coordinates set, source, predicted_*

Every array is chunked along ``image`` only, with one chunk per extraction batch, so each Dask task writes whole
chunks of every layer and no lock is needed. The store holds no pickled objects: attributes are JSON, strings are
Zarr's variable-length UTF-8 type.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from .images import ImageTable

FORMAT = "cnndiff_xr/1"
IMAGE_COORDS = ("set", "source")
PREDICTION_COORDS = ("predicted_class", "predicted_label", "predicted_probability")
COMPRESSIONS = ("zstd", "blosc", "none")
DTYPES = ("float32", "float16")
# Attributes that must agree before a run may add to an existing store: they change the numbers.
IDENTITY_ATTRS = ("model", "weights", "weights_sha256", "input_size", "resize", "preprocessing", "layers", "dtype")


class StoreError(ValueError):
    """A path that is not a cnndiff store, or a store that does not fit the requested run."""


@contextlib.contextmanager
def _quiet_zarr():
    """Silence Zarr's notice that consolidated metadata is not in the v3 spec (xarray reads it; we keep it so that
    opening a remote store costs one request)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def codec(compression: str = "zstd", level: int = 1):
    """The Zarr v3 compressor for activations (None for ``"none"``)."""
    from zarr.codecs import BloscCodec, ZstdCodec  # noqa: PLC0415

    if compression == "zstd":
        return ZstdCodec(level=level)
    if compression == "blosc":
        return BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")
    if compression == "none":
        return None
    raise ValueError(f"compression={compression!r}; choose one of {COMPRESSIONS}")


def layer_dims(shape: Sequence[int]) -> tuple[str, ...]:
    """Dimension names of a layer's activation for a per-image ``shape`` (channels-last, as Keras stores it)."""
    if len(shape) == 3:
        return ("image", "y", "x", "filter")
    if len(shape) == 1:
        return ("image", "filter")
    raise ValueError(f"cannot store a layer output of per-image shape {tuple(shape)}")


def uncompressed_nbytes(shapes: Mapping[str, Sequence[int]], n_images: int, dtype: str) -> dict[str, int]:
    """Exact uncompressed size in bytes of each layer's activation array."""
    itemsize = np.dtype(dtype).itemsize
    return {name: int(n_images * np.prod(shape, dtype=np.int64) * itemsize) for name, shape in shapes.items()}


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError  # unreachable


def _strings(values: Sequence[str]) -> np.ndarray:
    # object arrays become Zarr v3 variable-length UTF-8 (fixed-width numpy unicode has no stable v3 spec)
    return np.asarray(list(values), dtype=object)


def build_layout(
    table: ImageTable,
    shapes: Mapping[str, Sequence[int]],
    provenance: Mapping[str, Any],
    *,
    dtype: str,
    batch_size: int,
    with_predictions: bool,
    filter_labels: Mapping[str, Sequence[str]] | None = None,
) -> tuple[xr.DataTree, dict[str, dict[str, dict[str, Any]]]]:
    """The lazy DataTree describing an empty store, and the per-group encoding for ``to_zarr``.

    Activations are zero-filled dask arrays so that ``to_zarr(compute=False)`` writes only metadata and coordinates.
    """
    import dask.array as da  # noqa: PLC0415

    n = len(table)
    image_coords = {
        "image": ("image", _strings(table.ids)),
        "set": ("image", _strings(table.sets)),
        "source": ("image", _strings(table.sources)),
    }
    prediction_coords = {}
    if with_predictions:
        prediction_coords = {
            "predicted_class": ("image", np.full(n, -1, dtype="int32")),
            "predicted_label": ("image", _strings([""] * n)),
            "predicted_probability": ("image", np.full(n, np.nan, dtype="float32")),
        }
    root = xr.Dataset(
        {"completed": ("image", np.zeros(n, dtype=bool))},
        coords={**image_coords, **prediction_coords},
        attrs=dict(provenance),
    )
    root["completed"].attrs["description"] = "True once the image's activations are written to every layer"
    per_batch = {"chunks": (batch_size,)}
    encoding: dict[str, dict[str, dict[str, Any]]] = {"/": {"completed": per_batch}}
    for name in prediction_coords:
        encoding["/"][name] = per_batch  # written per batch by the extraction tasks: one chunk per batch
    comp = provenance.get("compression", "zstd")
    compressors = [c] if (c := codec(comp, provenance.get("compression_level", 1))) is not None else []
    groups = {"/": root}
    for name, shape in shapes.items():
        dims = layer_dims(shape)
        chunks = (batch_size, *shape)
        data = da.zeros((n, *shape), dtype=dtype, chunks=chunks)
        coords: dict[str, Any] = {"filter": ("filter", np.arange(shape[-1], dtype="int32"))}
        if len(shape) == 3:
            coords["y"] = ("y", np.arange(shape[0], dtype="int32"))
            coords["x"] = ("x", np.arange(shape[1], dtype="int32"))
        if filter_labels and name in filter_labels:
            coords["label"] = ("filter", _strings(filter_labels[name]))
        for cname in ("set", "source", *prediction_coords):
            coords[cname] = root[cname].variable
        ds = xr.Dataset({"activation": (dims, data)}, coords=coords)
        ds["activation"].attrs.update(layer=name, units="activation")
        groups[f"/{name}"] = ds
        encoding[f"/{name}"] = {"activation": {"chunks": chunks, "compressors": compressors}}
    return xr.DataTree.from_dict(groups), encoding


def create_store(tree: xr.DataTree, encoding, url: str, storage_options: Mapping | None = None) -> None:
    """Write the layout (metadata and coordinates; no activations) to ``url``."""
    with _quiet_zarr():
        tree.to_zarr(url, mode="w-", compute=False, encoding=encoding, consolidated=True,
                     storage_options=dict(storage_options or {}) or None)


def open_group(url: str, mode: str = "r", storage_options: Mapping | None = None):
    import zarr  # noqa: PLC0415

    with _quiet_zarr():
        return zarr.open_group(url, mode=mode, storage_options=dict(storage_options or {}) or None)


def exists(url: str, storage_options: Mapping | None = None) -> bool:
    """Whether anything (a Zarr group or array) is at ``url``."""
    import fsspec  # noqa: PLC0415

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path)))


def read_attrs(url: str, storage_options: Mapping | None = None) -> dict[str, Any]:
    """The root attributes of a cnndiff store; :class:`StoreError` if ``url`` is not one."""
    try:
        group = open_group(url, "r", storage_options)
    except Exception as err:  # zarr raises several types for "nothing here" / "not a group"
        raise StoreError(f"{url!r} is not a cnndiff_xr store (no Zarr group could be opened: {err})") from err
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{url!r} is a Zarr group but not a cnndiff_xr store (root attribute format="
                         f"{attrs.get('format')!r}, expected {FORMAT!r})")
    return attrs


def completed(url: str, storage_options: Mapping | None = None) -> np.ndarray:
    """The per-image completion record (bool array in store order)."""
    return np.asarray(open_group(url, "r", storage_options)["completed"][:], dtype=bool)


def check_compatible(url: str, attrs: Mapping[str, Any], new: Mapping[str, Any], table: ImageTable,
                     storage_options: Mapping | None = None) -> None:
    """Refuse to add to a store made with other settings or another image table; say what differs."""
    diffs = []
    for key in IDENTITY_ATTRS:
        old_value, new_value = attrs.get(key), json.loads(json.dumps(new.get(key)))
        if old_value != new_value:
            diffs.append(f"{key}: store has {old_value!r}, this run asks for {new_value!r}")
    if diffs:
        raise StoreError(f"store {url!r} was made with different settings; refusing to mix them:\n  "
                         + "\n  ".join(diffs) + "\nUse another store path, or rerun with the store's settings.")
    group = open_group(url, "r", storage_options)
    stored = {name: [str(v) for v in group[name][:]] for name in ("image", "set", "source")}
    ours = {"image": table.ids, "set": table.sets, "source": table.sources}
    for name in ("image", "set", "source"):
        if stored[name] != list(ours[name]):
            n_old, n_new = len(stored[name]), len(ours[name])
            first = next((i for i, (a, b) in enumerate(zip(stored[name], ours[name])) if a != b), min(n_old, n_new))
            raise StoreError(
                f"store {url!r} holds a different image table ({name}: {n_old} stored, {n_new} requested; first "
                f"difference at position {first}). A store's images are fixed when it is created: use a new store."
            )


def open_activations(url: str, storage_options: Mapping | None = None) -> xr.DataTree:
    """Open a cnndiff store lazily (read-only) as an :class:`xarray.DataTree`.

    Activations stay dask arrays; the small image coordinates (set, source, predictions) are loaded into memory so
    that ``activation.where(activation.set == "cats", drop=True)`` and ``.sel`` by set just work.
    """
    attrs = read_attrs(url, storage_options)
    with _quiet_zarr():
        tree = xr.open_datatree(url, engine="zarr", chunks={}, consolidated=True,
                                storage_options=dict(storage_options or {}) or None)
    image_coords = [c for c in (*IMAGE_COORDS, *PREDICTION_COORDS, "label") if c]

    def load_small(ds: xr.Dataset) -> xr.Dataset:
        names = [c for c in image_coords if c in ds.coords]
        return ds.assign_coords({c: ds.coords[c].load() for c in names}) if names else ds

    tree = tree.map_over_datasets(load_small)
    tree.attrs.update(attrs)
    return tree


def layer_names(tree: xr.DataTree) -> list[str]:
    """The stored layers in network order."""
    names = tree.attrs.get("layers")
    return list(names) if names else [c for c in tree.children if "activation" in tree[c].data_vars]


def _disk_bytes(url: str, group: str, storage_options: Mapping | None) -> int:
    import fsspec  # noqa: PLC0415

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    try:
        return int(fs.du(f"{path.rstrip('/')}/{group}", total=True))
    except FileNotFoundError:
        return 0


def info(url: str, storage_options: Mapping | None = None) -> dict[str, Any]:
    """Layers, shapes, dtype, sizes (on disk and uncompressed), compression ratio, completion, provenance."""
    attrs = read_attrs(url, storage_options)
    group = open_group(url, "r", storage_options)
    done = np.asarray(group["completed"][:], dtype=bool)
    layers = []
    for name in attrs["layers"]:
        arr = group[f"{name}/activation"]
        raw = int(np.prod(arr.shape, dtype=np.int64) * arr.dtype.itemsize)
        disk = _disk_bytes(url, f"{name}/activation", storage_options)
        layers.append({"layer": name, "shape": tuple(arr.shape), "chunks": tuple(arr.chunks), "dtype": str(arr.dtype),
                       "uncompressed_bytes": raw, "disk_bytes": disk})
    raw_total = sum(layer["uncompressed_bytes"] for layer in layers)
    disk_total = sum(layer["disk_bytes"] for layer in layers)
    done_fraction = done.mean() if done.size else 1.0
    # the ratio only means something over what has been written
    written_raw = raw_total * done_fraction
    return {
        "store": url,
        "n_images": int(done.size),
        "n_completed": int(done.sum()),
        "sets": dict(zip(*np.unique([str(s) for s in group["set"][:]], return_counts=True))),
        "layers": layers,
        "uncompressed_bytes": raw_total,
        "disk_bytes": disk_total,
        "compression_ratio": (written_raw / disk_total) if disk_total else float("nan"),
        "provenance": attrs,
    }


def format_info(summary: Mapping[str, Any]) -> str:
    """A human-readable report of :func:`info`."""
    lines = [f"store: {summary['store']}",
             f"images: {summary['n_completed']} of {summary['n_images']} complete; sets: "
             + ", ".join(f"{k} ({int(v)})" for k, v in summary["sets"].items())]
    width = max(len(layer["layer"]) for layer in summary["layers"]) if summary["layers"] else 5
    lines.append(f"{'layer':<{width}}  {'shape':<24} {'dtype':<8} {'uncompressed':>13} {'on disk':>11}")
    for layer in summary["layers"]:
        lines.append(f"{layer['layer']:<{width}}  {str(layer['shape']):<24} {layer['dtype']:<8} "
                     f"{format_bytes(layer['uncompressed_bytes']):>13} {format_bytes(layer['disk_bytes']):>11}")
    lines.append(f"total uncompressed {format_bytes(summary['uncompressed_bytes'])}, on disk "
                 f"{format_bytes(summary['disk_bytes'])}, compression ratio {summary['compression_ratio']:.2f} "
                 "(over the completed images)")
    lines.append("provenance:")
    for key, value in summary["provenance"].items():
        if key != "layers":
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def provenance(*, model: str, weights: str, weights_sha256: str, input_size: Sequence[int], resize: str,
               preprocessing: str, layers: Sequence[str], dtype: str, batch_size: int, compression: str,
               compression_level: int, seed: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The root attributes recorded in a new store (JSON types only)."""
    import importlib.metadata as md  # noqa: PLC0415

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    import keras  # noqa: PLC0415

    attrs = {
        "format": FORMAT,
        "model": model,
        "weights": weights,
        "weights_sha256": weights_sha256,
        "input_size": [int(s) for s in input_size],
        "resize": resize,
        "preprocessing": preprocessing,
        "layers": list(layers),
        "dtype": dtype,
        "batch_size": int(batch_size),
        "compression": compression,
        "compression_level": int(compression_level),
        "seed": int(seed),
        "cnndiff_xr_version": version("cnndiff_xr"),
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "tensorflow_version": version("tensorflow-cpu") if version("tensorflow") == "not installed"
        else version("tensorflow"),
        "xarray_version": xr.__version__,
        "zarr_version": version("zarr"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    attrs.update(extra or {})
    return json.loads(json.dumps(attrs))


def select(tree: xr.DataTree, layers: str | Sequence[str] | None = None, *, filter: Any = None,
           sets: str | Sequence[str] | None = None, image: Any = None) -> xr.DataTree:
    """Labelled, lazy slicing across layers: a new tree with only ``layers`` and, in each, only the given filters
    (by label), image sets and images. Nothing is read."""
    available = layer_names(tree)
    chosen = available if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise KeyError(f"layers {unknown} are not in this store; it has {available}")
    groups = {"/": tree.to_dataset(inherit=False)}
    for name in chosen:
        ds = tree[name].to_dataset(inherit=True)
        if sets is not None:
            wanted = [sets] if isinstance(sets, str) else list(sets)
            missing = sorted(set(wanted) - set(np.unique(ds["set"].values)))
            if missing:
                raise KeyError(f"sets {missing} are not in this store; it has {sorted(np.unique(ds['set'].values))}")
            ds = ds.isel(image=np.isin(ds["set"].values, wanted))
        if image is not None:
            ds = ds.sel(image=image)
        if filter is not None:
            ds = ds.sel(filter=filter)
        groups[f"/{name}"] = ds
    if sets is not None or image is not None:
        root = groups["/"]
        groups["/"] = root.sel(image=groups[f"/{chosen[0]}"]["image"].values) if chosen else root
    return xr.DataTree.from_dict(groups)


@xr.register_datatree_accessor("cnndiff")
class CnndiffAccessor:
    """``tree.cnndiff``: labelled helpers on a store's DataTree (in the style of cf-xarray's accessor).

    >>> tree.cnndiff.layers                                  # network order
    >>> tree.cnndiff["block1_conv1"]                         # that layer's activation DataArray
    >>> tree.cnndiff.sel(layers=["block1_conv1", "block5_conv3"], filter=31, sets="cats")
    """

    def __init__(self, tree: xr.DataTree):
        self._tree = tree

    @property
    def layers(self) -> list[str]:
        return layer_names(self._tree)

    def __getitem__(self, layer: str) -> xr.DataArray:
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} is not in this store; it has {self.layers}")
        return self._tree[layer]["activation"]

    def sel(self, layers: str | Sequence[str] | None = None, *, filter: Any = None,
            sets: str | Sequence[str] | None = None, image: Any = None) -> xr.DataTree:
        return select(self._tree, layers, filter=filter, sets=sets, image=image)

    @property
    def complete(self) -> bool:
        return bool(np.asarray(self._tree["completed"].values).all())
