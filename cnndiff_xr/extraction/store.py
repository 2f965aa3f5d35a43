"""The store: a Zarr v3 layout written through :class:`xarray.DataTree`, opened lazily.

The layout, and every name in it, is spelled in :mod:`cnndiff_xr.schema`; this module writes it
(:func:`build_layout`, :func:`create_store`) and reads it (:func:`open_activations`, :func:`info`, :func:`select`,
the ``tree.cnndiff`` accessor). Every array is chunked along ``image`` only, with one chunk per extraction batch, so
each Dask task writes whole chunks of every layer and no lock is needed *between tasks* (two *runs* are kept apart by
:class:`cnndiff_xr.extraction.lock.StoreLock`). The store holds no pickled objects: attributes are JSON, strings are
Zarr's variable-length UTF-8 type; :func:`read_attrs` (hence :func:`open_activations` and :func:`info`) refuses a
store whose metadata names a pickle codec or a codec zarr does not know, so nothing executable is read back; and
:func:`open_activations` and :func:`info` refuse metadata that claims what no store holds (absurd or inconsistent
shapes and chunks, layers that are not there) before anything is allocated (:class:`UnsafeStoreError`: a store is a
folder anyone can send).

Safety rules:

- **Completion after data.** A batch's ``completed`` flags are written only after its chunks of every layer; chunk
  writes replace whole objects (Zarr's local store writes a temporary file and renames it; an S3 PUT is atomic), so
  an interrupted write leaves at worst a chunk of an incomplete batch, which the next run rewrites.
- **Read-only analysis.** :func:`open_activations` opens with Zarr mode ``"r"``: its arrays refuse writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import unicodedata
import uuid
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..options import COMPRESSIONS, DTYPES, OPEN_MODES, Compression, Dtype, OpenMode
from ..sampling import UnitDraws
from ..schema import (
    ACTIVATION,
    APPENDING_ATTR,
    CF_ADD_OFFSET,
    CF_FILL_VALUE,
    CF_SCALE_FACTOR,
    COMPLETED,
    FILTER_DIM,
    FILTER_MEAN,
    FILTER_MEANS_ATTR,
    FLAT_INDEX,
    FLOAT16_DECODING,
    FORMAT,
    FORMAT_ATTR,
    IMAGE_COORDS,
    IMAGE_DIM,
    LABEL_COORD,
    LAYER_CSS,
    LAYER_DIMS_ATTR,
    LAYER_MEAN,
    LAYER_SHAPE_ATTR,
    LAYERS_ATTR,
    MEANS_GROUP,
    PREDICTED_CLASS,
    PREDICTED_LABEL,
    PREDICTED_PROBABILITY,
    PREDICTION_COORDS,
    SET_COORD,
    SHA256_COORD,
    SKIPPED_ATTR,
    SOURCE_COORD,
    STORE_ID_ATTR,
    UNIT_DIM,
    UNIT_DRAWS_ATTR,
    X_DIM,
    Y_DIM,
    activation_path,
    layer_dims,
    means_path,
)
from ..validation import ParameterTypeError, ParameterValueError, UnknownLabelError, check_choice, check_int, is_int
from .images import ImageTable
from .reduction import Reduction

__all__ = [
    "COMPRESSION_LEVELS",
    "CnndiffAccessor",
    "StoreError",
    "StoreUnreachableError",
    "UnsafeStoreError",
    "append_images",
    "build_layout",
    "check_compatible",
    "check_compression",
    "check_storage_options",
    "check_url",
    "codec",
    "completed",
    "create_store",
    "exists",
    "format_bytes",
    "format_info",
    "info",
    "is_store",
    "kept_nbytes",
    "layer_dims",
    "layer_names",
    "open_activations",
    "open_group",
    "read_attrs",
    "read_store_id",
    "select",
    "uncompressed_nbytes",
    "unsafe_codecs",
]


class StoreError(ValueError):
    """A path that is not a cnndiff store, or a store that does not fit the requested run."""


class UnsafeStoreError(StoreError):
    """A store that says it is a cnndiff store (or a Zarr group) but that is refused before anything is read from it:
    it holds pickled objects or codecs zarr does not know, or its metadata claims what no cnndiff store holds. The
    message names the array and the claim."""


class StoreUnreachableError(OSError):
    """The store's filesystem kept failing (an object store down, throttling or dropping connections beyond the
    retries of s3fs and botocore, a network gone): the message names the store, what was being done and the last
    error. An ``OSError``, as the error it wraps; a rerun of an extraction resumes from what was written."""


#: OSErrors that say something about the path, not about reaching the store: they keep their own meaning
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith(("file://", "local://"))


@contextlib.contextmanager
def reaching(url: str, doing: str) -> Iterator[None]:
    """Turn an ``OSError`` that the filesystem of a remote ``url`` raised after its own retries into one
    :class:`StoreUnreachableError` naming the store and ``doing`` (a local path's errors pass unchanged: they name
    their file already). Wrapped where a store is opened or written, not around every read."""
    try:
        yield
    except StoreUnreachableError:
        raise
    except Exception as err:
        # OSError from fsspec; botocore's connection errors (a dropped connection on the last retry raises
        # botocore's ConnectionClosedError, which is not an OSError) by their module, botocore not being a dependency
        connection = isinstance(err, OSError) or type(err).__module__.startswith("botocore")
        if not connection or isinstance(err, _PATH_ERRORS) or not _is_remote(url):
            raise
        raise StoreUnreachableError(
            f"could not reach store {url!r} while {doing}: {type(err).__name__}: {err}. Its filesystem still failed "
            "after s3fs's and botocore's retries (for S3: 5 botocore attempts within each of 5 s3fs tries, for "
            "throttling, 5xx responses and dropped connections). Check the endpoint, the network and the "
            "credentials, or raise botocore's retries in storage_options (e.g. {'config_kwargs': {'retries': "
            "{'max_attempts': 10, 'mode': 'standard'}}}), and rerun: an extraction resumes from the batches "
            "already written.") from err


def check_url(url: Any, name: str = "store") -> str:
    """``url`` as a non-empty str (paths and fsspec URLs; os.PathLike accepted). A local path is made absolute: Dask
    workers resolve paths in their own working directory, which need not be the caller's."""
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise ParameterTypeError(f"{name} must be a non-empty path or fsspec URL (str or os.PathLike), got "
                                 f"{type(url).__name__}: {url!r}")
    if url.startswith("file://"):  # a local path: Zarr's LocalStore creates folders, fsspec's file:// store does not
        url = url[len("file://"):]
    return url if "://" in url else os.path.abspath(url)


def check_storage_options(storage_options: Any) -> dict[str, Any] | None:
    """``storage_options`` as a dict (or None): the fsspec filesystem's keyword arguments."""
    if storage_options is None:
        return None
    if not isinstance(storage_options, Mapping):
        raise ParameterTypeError("storage_options must be a mapping of fsspec filesystem options (e.g. {'anon': "
                                 f"False}}) or None, got {type(storage_options).__name__}: {storage_options!r}")
    bad = [k for k in storage_options if not isinstance(k, str)]
    if bad:
        raise ParameterTypeError(f"storage_options keys must be str, got {bad!r}")
    return dict(storage_options)


def _filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, str(path)


def _forget_cached(fs: Any, path: str) -> None:
    """Drop what ``fs`` has cached about ``path``: object stores cache listings, and another process may have written
    or replaced the store since."""
    with contextlib.suppress(AttributeError):
        fs.invalidate_cache(path)


def _protocols(fs: Any) -> tuple[str, ...]:
    """The protocol names of an fsspec filesystem (one, or several aliases such as "s3", "s3a")."""
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Silence Zarr's notice that consolidated metadata is not in the v3 spec (xarray reads it; we keep it so that
    opening a remote store costs one request)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


# --------------------------------------------------------------------------------------------------- codecs, sizes
#: Allowed ``compression_level`` per codec (inclusive): zstd 0 (its default) to 22, blosc 0..9; ignored for "none".
COMPRESSION_LEVELS: dict[Compression, tuple[int, int]] = {"zstd": (0, 22), "blosc": (0, 9), "lz4": (0, 9),
                                                          "none": (0, 22)}


def check_compression(compression: Any, level: Any) -> tuple[Compression, int]:
    """Validate ``compression`` and its ``compression_level``; the messages name the parameter and the choices."""
    compression = check_choice("compression", compression, COMPRESSIONS,
                               message=f"compression={compression!r}; choose one of {COMPRESSIONS}")
    lo, hi = COMPRESSION_LEVELS[compression]
    message = f"compression_level={level!r}: for compression={compression!r} it must be an int in {lo}..{hi}"
    if not is_int(level):
        raise ParameterTypeError(message)
    if not lo <= level <= hi:
        raise ParameterValueError(message)
    return compression, int(level)


def codec(compression: Compression = "lz4", level: int = 1) -> Any:
    """The Zarr v3 compressor for activations (None for ``"none"``)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    compression, level = check_compression(compression, level)
    if compression == "zstd":
        return ZstdCodec(level=level)
    if compression == "blosc":
        return BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")
    if compression == "lz4":
        return BloscCodec(cname="lz4", clevel=level, shuffle="bitshuffle")
    return None  # "none"


def uncompressed_nbytes(shapes: Mapping[str, Sequence[int]], n_images: int, dtype: Dtype) -> dict[str, int]:
    """Exact uncompressed size in bytes of each layer's activation array."""
    check_choice("dtype", dtype, DTYPES, message=f"dtype={dtype!r}; choose one of {DTYPES}")
    n_images = check_int("n_images", n_images, 0)
    itemsize = np.dtype(dtype).itemsize
    return {name: int(n_images * np.prod(shape, dtype=np.int64) * itemsize) for name, shape in shapes.items()}


def kept_nbytes(shapes: Mapping[str, Sequence[int]], n_images: int, dtype: Dtype,
                reduction: Reduction) -> dict[str, int]:
    """Exact uncompressed size in bytes of what a store keeps of each layer (all units, or a reduced layer's kept
    units) plus its means when ``reduction`` asks for them."""
    full = uncompressed_nbytes(shapes, n_images, dtype)
    itemsize = np.dtype(dtype).itemsize
    out = {}
    for name, shape in shapes.items():
        kept = reduction.kept(name, shape)
        out[name] = full[name] if kept is None else int(n_images) * int(kept.size) * itemsize
        if reduction.means_for(name, shape):
            out[name] += int(n_images) * (4 * int(shape[-1]) + 16)  # float32 per filter, two float64 per image
    return out


def format_bytes(n: float) -> str:
    """``n`` bytes in B, kB, MB, GB or TB (powers of 1000), one decimal."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------------------------------- the writer
def _strings(values: Sequence[str]) -> np.ndarray:
    # object arrays become Zarr v3 variable-length UTF-8 (fixed-width numpy unicode has no stable v3 spec)
    return np.asarray(list(values), dtype=object)


def _layer_coords(shape: Sequence[int]) -> dict[str, Any]:
    """The dimension coordinates of a whole layer: integer positions along y, x and filter."""
    coords: dict[str, Any] = {FILTER_DIM: (FILTER_DIM, np.arange(shape[-1], dtype="int32"))}
    if len(shape) == 3:
        coords[Y_DIM] = (Y_DIM, np.arange(shape[0], dtype="int32"))
        coords[X_DIM] = (X_DIM, np.arange(shape[1], dtype="int32"))
    return coords


def _unit_coords(shape: Sequence[int], kept: np.ndarray) -> dict[str, Any]:
    """The coordinates of a reduced layer's kept units: their flat index and their y, x and filter positions."""
    positions = np.unravel_index(kept, tuple(shape))
    coords: dict[str, Any] = {FLAT_INDEX: (UNIT_DIM, kept.astype("int64"))}
    for dim, values in zip(layer_dims(shape)[1:], positions, strict=True):
        coords[dim] = (UNIT_DIM, values.astype("int32"))
    return coords


def _means_layout(n: int, shape: Sequence[int], batch_size: int,
                  compressors: list[Any]) -> tuple[xr.Dataset, dict[str, dict[str, Any]]]:
    """The empty means subgroup of a layer and its encoding: one chunk per batch, like the activations."""
    import dask.array as da

    n_filters = int(shape[-1])
    ds = xr.Dataset(
        {
            FILTER_MEAN: ((IMAGE_DIM, FILTER_DIM),
                          da.zeros((n, n_filters), dtype="float32", chunks=(batch_size, n_filters)),
                          {"description": "mean over (y, x) of every filter, of the model's float32 output"}),
            LAYER_MEAN: ((IMAGE_DIM,), da.zeros(n, dtype="float64", chunks=batch_size),
                         {"description": "mean over every unit of the layer"}),
            LAYER_CSS: ((IMAGE_DIM,), da.zeros(n, dtype="float64", chunks=batch_size),
                        {"description": "sum over every unit of the layer of (activation - layer_mean)**2"}),
        },
        coords={FILTER_DIM: (FILTER_DIM, np.arange(n_filters, dtype="int32"))},
    )
    encoding: dict[str, dict[str, Any]] = {
        FILTER_MEAN: {"chunks": (batch_size, n_filters), "compressors": compressors},
        LAYER_MEAN: {"chunks": (batch_size,)},
        LAYER_CSS: {"chunks": (batch_size,)},
    }
    return ds, encoding


def build_layout(
    table: ImageTable,
    shapes: Mapping[str, Sequence[int]],
    *,
    attrs: Mapping[str, Any],
    dtype: Dtype,
    batch_size: int,
    compressor: Any,
    with_predictions: bool,
    filter_labels: Mapping[str, Sequence[str]] | None = None,
    reduction: Reduction | None = None,
) -> tuple[xr.DataTree, dict[str, dict[str, dict[str, Any]]]]:
    """The lazy DataTree describing an empty store, and the per-group encoding for ``to_zarr``.

    ``attrs`` become the root attributes (the provenance), ``compressor`` the activations' codec (:func:`codec`;
    None for none). Activations are zero-filled dask arrays so that ``to_zarr(compute=False)`` writes only metadata
    and coordinates. ``reduction`` (None: every unit, no means) gives the layers it reduces the ``(image, unit)``
    layout and every layer a means subgroup when it asks for means (:mod:`cnndiff_xr.schema`).
    """
    import dask.array as da

    n = len(table)
    image_coords = {
        IMAGE_DIM: (IMAGE_DIM, _strings(table.ids)),
        SET_COORD: (IMAGE_DIM, _strings(table.sets)),
        SOURCE_COORD: (IMAGE_DIM, _strings(table.sources)),
        **({SHA256_COORD: (IMAGE_DIM, _strings(table.digests))} if table.digests is not None else {}),
    }
    prediction_coords = {}
    if with_predictions:
        prediction_coords = {
            PREDICTED_CLASS: (IMAGE_DIM, np.full(n, -1, dtype="int32")),
            PREDICTED_LABEL: (IMAGE_DIM, _strings([""] * n)),
            PREDICTED_PROBABILITY: (IMAGE_DIM, np.full(n, np.nan, dtype="float32")),
        }
    root = xr.Dataset(
        {COMPLETED: (IMAGE_DIM, np.zeros(n, dtype=bool))},
        coords={**image_coords, **prediction_coords},
        attrs=dict(attrs),
    )
    root[COMPLETED].attrs["description"] = "True once the image's activations are written to every layer"
    per_batch = {"chunks": (batch_size,)}
    encoding: dict[str, dict[str, dict[str, Any]]] = {"/": {COMPLETED: per_batch}}
    for name in prediction_coords:
        encoding["/"][name] = per_batch  # written per batch by the extraction tasks: one chunk per batch
    compressors = [compressor] if compressor is not None else []
    groups = {"/": root}
    reduction = reduction if reduction is not None else Reduction()
    for name, shape in shapes.items():
        kept = reduction.kept(name, shape)
        coords: dict[str, Any] = {cname: root[cname].variable for cname in (*IMAGE_COORDS, *prediction_coords)}
        if kept is None:
            dims, chunks = layer_dims(shape), (batch_size, *shape)
            coords.update(_layer_coords(shape))
            if filter_labels and name in filter_labels:
                coords[LABEL_COORD] = (FILTER_DIM, _strings(filter_labels[name]))
        else:
            dims, chunks = (IMAGE_DIM, UNIT_DIM), (batch_size, kept.size)
            coords.update(_unit_coords(shape, kept))
        data = da.zeros((n, *chunks[1:]), dtype=dtype, chunks=chunks)
        ds = xr.Dataset({ACTIVATION: (dims, data)}, coords=coords)
        ds[ACTIVATION].attrs.update(layer=name, units=ACTIVATION)  # arbitrary units: the layer's own output
        if kept is not None:
            ds[ACTIVATION].attrs.update({LAYER_SHAPE_ATTR: [int(s) for s in shape],
                                         LAYER_DIMS_ATTR: list(layer_dims(shape)[1:])})
        groups[f"/{name}"] = ds
        encoding[f"/{name}"] = {ACTIVATION: {"chunks": chunks, "compressors": compressors}}
        if np.dtype(dtype) == np.float16:
            # Plain xarray decodes these attributes to float32 with the values unchanged (schema.FLOAT16_DECODING), so
            # that its reductions do not accumulate, and overflow, in float16. No _FillValue attribute: with one,
            # xarray keeps float16 (Zarr's own fill value stays NaN). The batches write the raw float16 values, which
            # are the decoded values: there is no scale to apply.
            ds[ACTIVATION].attrs.update(FLOAT16_DECODING)
            encoding[f"/{name}"][ACTIVATION][CF_FILL_VALUE] = None
        if reduction.means_for(name, shape):
            groups[f"/{means_path(name)}"], encoding[f"/{means_path(name)}"] = _means_layout(n, shape, batch_size,
                                                                                              compressors)
    layout = xr.DataTree.from_dict(groups)
    from .checksums import add_checksums, checksums_enabled  # it imports this module

    if checksums_enabled():  # a crc32c per chunk of every array, after compression (extraction/checksums.py)
        add_checksums(layout, encoding)
    return layout, encoding


def create_store(tree: xr.DataTree, encoding: Mapping[str, Any], url: str, *,
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Write the layout (metadata and coordinates; no activations) to ``url``, then its consolidated metadata.

    Consolidated once, at the end: with ``consolidated=True`` xarray consolidates after every group it writes, each
    time reading every node written so far (42 times for a reduced VGG16 store with filter means: ~6 of the layout's
    ~9 s). A run that dies between the two leaves a store without consolidated metadata, which a rerun rewrites
    (:func:`check_compatible` hands it to :func:`append_images`)."""
    with _quiet_zarr(), reaching(url, "writing its layout"):
        tree.to_zarr(url, mode="w-", compute=False, encoding=encoding, consolidated=False,
                     storage_options=dict(storage_options or {}) or None)
        _consolidate(open_group(url, "r+", storage_options=storage_options))


def open_group(url: str, mode: OpenMode = "r", *, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The root Zarr group at ``url`` (``mode`` as :func:`zarr.open_group`: one of ``OPEN_MODES``)."""
    import zarr

    url = check_url(url)
    storage_options = check_storage_options(storage_options)
    check_choice("mode", mode, OPEN_MODES, message=f"mode={mode!r}; choose one of {OPEN_MODES}")
    with _quiet_zarr(), reaching(url, f"opening it (mode {mode!r})"):
        return zarr.open_group(url, mode=mode, storage_options=dict(storage_options or {}) or None)


def exists(url: str, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether anything (a Zarr group or array, or any other file or non-empty folder) is at ``url``."""
    url, storage_options = check_url(url), check_storage_options(storage_options)
    fs, path = _filesystem(url, storage_options)
    _forget_cached(fs, path)
    with reaching(url, "checking whether it exists"):
        return bool(fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path))))


# --------------------------------------------------------------------------------------------------- the reader
# Codecs that would run arbitrary code when decoded (pickle). Matched in every codec/filter/compressor entry of every
# array's metadata, Zarr v3 ("name") and v2 ("id").
_UNSAFE_CODEC_WORDS = ("pickle",)
_CODEC_KEYS = ("codecs", "filters", "compressor", "compressors", "serializer", "object_codec")


def _codec_identifiers(entry: Any) -> list[str]:
    """Every codec name/id in a codec entry (a dict, a list of them, nested sharding configurations)."""
    found: list[str] = []
    if isinstance(entry, Mapping):
        for key in ("name", "id"):
            if isinstance(entry.get(key), str):
                found.append(entry[key])
        for value in entry.values():
            if isinstance(value, (Mapping, list, tuple)):
                found += _codec_identifiers(value)
    elif isinstance(entry, (list, tuple)):  # JSON lists; zarr's metadata.to_dict() gives tuples
        for item in entry:
            found += _codec_identifiers(item)
    return found


def unsafe_codecs(metadata: Mapping[str, Any]) -> list[str]:
    """Codec names in one node's Zarr metadata (``zarr.json`` or ``.zarray`` as a dict) that would unpickle data."""
    names = []
    for key in _CODEC_KEYS:
        if key in metadata:
            names += _codec_identifiers(metadata[key])
    if isinstance(metadata.get("dtype"), str) and metadata["dtype"].endswith("O"):  # Zarr v2 object arrays
        names.append(f"dtype {metadata['dtype']}")
    return [n for n in names if any(w in n.lower() for w in _UNSAFE_CODEC_WORDS) or n.startswith("dtype ")]


def _node_metadata(url: str, root_meta: Mapping[str, Any],
                   storage_options: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """Every node's metadata (path in the store -> its ``zarr.json`` as a dict): the root's consolidated metadata, or
    else a walk of the hierarchy (reads each node's metadata document, never lists chunks)."""
    consolidated = root_meta.get("consolidated_metadata") or {}
    if isinstance(consolidated, Mapping) and isinstance(consolidated.get("metadata"), Mapping):
        nodes = dict(consolidated["metadata"])
    else:
        group = open_group(url, "r", storage_options=storage_options)
        try:
            nodes = {name: node.metadata.to_dict() for name, node in group.members(max_depth=None)}
        except Exception as err:  # zarr parses each node as it walks: say which store, and what zarr said
            raise _unsafe(url, f"the metadata of one of its arrays cannot be read ({type(err).__name__}: {err})"
                          ) from err
    return {str(name): meta for name, meta in nodes.items() if isinstance(meta, Mapping)}


def _check_no_pickle(url: str, nodes: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a store any of whose arrays would be decoded with pickle (reading it could run code)."""
    bad = {name: unsafe for name, meta in nodes.items() if (unsafe := unsafe_codecs(meta))}
    if bad:
        listing = "; ".join(f"{name}: {', '.join(codecs)}" for name, codecs in sorted(bad.items()))
        raise UnsafeStoreError(f"store {url!r} holds arrays stored with pickled objects ({listing}); refusing to read "
                               "it, since decoding pickles can run arbitrary code. cnndiff_xr never writes such "
                               "arrays.")


def _unknown_codecs(meta: Mapping[str, Any]) -> list[str]:
    """The codec names of one node's Zarr v3 metadata that zarr has no codec for."""
    from zarr.registry import get_codec_class

    unknown = []
    for name in _codec_identifiers(meta.get("codecs", [])):
        try:
            get_codec_class(name)
        except KeyError:
            unknown.append(name)
    return unknown


def _metadata_diagnosis(url: str, storage_options: Mapping[str, Any] | None) -> StoreError | None:
    """Why zarr could not open the store's root group, when the cause is a codec or a shape (:func:`_array_claims`):
    read from the raw root ``zarr.json`` (zarr refuses the whole group without naming the array). None when neither
    explains it.

    Only called after zarr failed, so a sound store pays nothing for it."""
    fs, path = _filesystem(url, storage_options)
    try:
        document = json.loads(fs.cat_file(f"{path.rstrip('/')}/zarr.json"))
        nodes = document["consolidated_metadata"]["metadata"]
    except Exception:  # no readable root document, or not consolidated: nothing to name
        return None
    if not isinstance(nodes, Mapping):
        return None
    nodes = {str(name): meta for name, meta in nodes.items() if isinstance(meta, Mapping)}
    # a group that does not say it is a cnndiff store is only named as what it is not (is_store: False)
    attributes = document.get("attributes")
    kind = UnsafeStoreError if isinstance(attributes, Mapping) and attributes.get(FORMAT_ATTR) == FORMAT else StoreError
    try:
        _check_no_pickle(url, nodes)
    except UnsafeStoreError as err:
        return kind(str(err))
    for name, meta in nodes.items():  # a shape zarr refuses (negative, not integers): name the array
        if meta.get("node_type", "array") == "array" and "shape" in meta:
            try:
                _array_claims(url, name, meta)
            except UnsafeStoreError as err:
                return kind(str(err))
    unknown = {name: codecs for name, meta in nodes.items() if (codecs := _unknown_codecs(meta))}
    if not unknown:
        return None
    listing = "; ".join(f"{name}: {', '.join(codecs)}" for name, codecs in sorted(unknown.items()))
    return kind(f"store {url!r} holds arrays stored with codecs that zarr does not know ({listing}); refusing to "
                "read it. cnndiff_xr writes only zarr's own codecs (blosc, zstd, bytes, vlen-utf8, crc32c); if the "
                "store needs a codec package, install it, otherwise re-extract the store.")


# ------------------------------------------------------------------------------------ what the metadata claims
# A store is a folder anyone can send. Its metadata could claim 10**12 images, and opening it would then allocate
# terabytes for the image coordinates (read into memory) before a single chunk is read; or a chunk larger than
# memory; or more chunks than a dask graph can hold. Every claim is checked against these bounds, and against the
# store's own consistency, before xarray or zarr allocates anything.

#: The most images a store may claim: its image coordinates (ids, sets, sources, completion) are read into memory
#: when it is opened. 33 million images is beyond any extraction (VGG16's first layer alone would be 900 TB).
MAX_IMAGES = 2**25
#: The most elements of one array.
MAX_ARRAY_ELEMENTS = 2**40
#: The most elements of one chunk (zarr decodes a chunk whole: a batch of 64 VGG16 images is 2**27.6).
MAX_CHUNK_ELEMENTS = 2**32
#: The most chunks of one array (each is a dask task).
MAX_CHUNKS = 2**25
#: The most elements of a one-dimensional array (the coordinates, read into memory when the store is opened).
MAX_COORD_ELEMENTS = 2**25


def _unsafe(url: str, what: str) -> UnsafeStoreError:
    """The refusal of a store whose metadata claims ``what``, with the remedy."""
    return UnsafeStoreError(f"store {url!r}: {what}; refusing to open it. Re-extract the store, or ask whoever sent "
                            "it for a sound copy.")


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _array_claims(url: str, name: str, meta: Mapping[str, Any]
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str | None, ...]]:
    """An array's shape, chunk shape and dimension names (None where unnamed), from its Zarr v3 (or v2) metadata;
    :class:`UnsafeStoreError` when they are not what Zarr allows or beyond the bounds."""
    def refuse(claim: str) -> UnsafeStoreError:
        return _unsafe(url, f"array {name!r} claims {claim}")

    shape = meta.get("shape")
    if meta.get("zarr_format") == 2:
        chunks = meta.get("chunks")
        dims = (meta.get("attributes") or {}).get("_ARRAY_DIMENSIONS")
    else:
        grid = meta.get("chunk_grid")
        config = grid.get("configuration") if isinstance(grid, Mapping) and grid.get("name") == "regular" else None
        chunks = config.get("chunk_shape") if isinstance(config, Mapping) else None
        dims = meta.get("dimension_names")
    if not isinstance(shape, (list, tuple)) or not all(_is_count(n, 0) for n in shape):
        raise refuse(f"the shape {shape!r} (not a list of non-negative integers)")
    if not isinstance(chunks, (list, tuple)) or len(chunks) != len(shape) or not all(_is_count(c, 1) for c in chunks):
        raise refuse(f"the chunk shape {chunks!r} for its shape {list(shape)} (not a regular grid of positive "
                     "integers, one per dimension)")
    if dims is None:
        dims = [None] * len(shape)
    if not isinstance(dims, (list, tuple)) or len(dims) != len(shape) \
            or not all(d is None or isinstance(d, str) for d in dims):
        raise refuse(f"the dimension names {dims!r} for its shape {list(shape)}")
    elements, chunk_elements, n_chunks = 1, 1, 1
    for n, c in zip(shape, chunks, strict=True):
        elements, chunk_elements, n_chunks = elements * n, chunk_elements * c, n_chunks * -(-n // c)
    if elements > MAX_ARRAY_ELEMENTS:
        raise refuse(f"the shape {list(shape)}, {elements:.3g} elements (at most 2**40 are accepted)")
    if len(shape) == 1 and elements > MAX_COORD_ELEMENTS:
        raise refuse(f"the shape {list(shape)} (a one-dimensional array is read into memory when the store is "
                     f"opened; at most {MAX_COORD_ELEMENTS:,} elements are accepted)")
    if chunk_elements > MAX_CHUNK_ELEMENTS:
        raise refuse(f"the chunk shape {list(chunks)}, {chunk_elements:.3g} elements per chunk (at most 2**32 are "
                     "accepted: a chunk is decoded whole)")
    if n_chunks > MAX_CHUNKS:
        raise refuse(f"{n_chunks:,} chunks (shape {list(shape)}, chunk shape {list(chunks)}; at most "
                     f"{MAX_CHUNKS:,} are accepted)")
    return tuple(shape), tuple(chunks), tuple(dims)


def _bad_layer_name(name: Any) -> bool:
    """A layer name that no model gives and no store of cnndiff_xr holds: not a string, empty, ``.``/``..``, or
    holding a path separator or a control character (layers are groups directly under the root)."""
    return not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name \
        or any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in name)


def _check_metadata(url: str, attrs: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a store whose metadata claims what no store of cnndiff_xr holds, before anything is allocated: absurd
    shapes, chunks or chunk counts (:data:`MAX_IMAGES` and the other bounds), arrays that disagree on a dimension's
    length (the image table's length, or a layer's y, x, filter, unit within its group and the groups above), and
    root attribute ``layers`` naming layers the store does not hold. Reads only the metadata already parsed."""
    arrays = {name.strip("/"): _array_claims(url, name, meta) for name, meta in nodes.items()
              if meta.get("node_type", "array") == "array" and "shape" in meta}
    if IMAGE_DIM not in arrays:
        raise _unsafe(url, f"it has no image table (array {IMAGE_DIM!r})")
    n_images = arrays[IMAGE_DIM][0][0]
    if n_images > MAX_IMAGES:
        raise _unsafe(url, f"array {IMAGE_DIM!r} claims {n_images:,} images (at most {MAX_IMAGES:,} are accepted)")
    # the first array to give each dimension its length, per group ("" is the root); a group sees its own
    # dimensions and those of the groups above it, as xarray's DataTree aligns them
    first: dict[tuple[str, str], tuple[int, str]] = {("", IMAGE_DIM): (n_images, IMAGE_DIM)}
    for name, (shape, _, dims) in sorted(arrays.items(), key=lambda item: item[0].count("/")):
        group = name.rsplit("/", 1)[0] if "/" in name else ""
        above = [""] + ["/".join(group.split("/")[:k]) for k in range(1, group.count("/") + 2)] if group else [""]
        for dim, size in zip(dims, shape, strict=True):
            if dim is None:
                continue
            claimed = next((first[(g, dim)] for g in above if (g, dim) in first), None)
            if claimed is None:
                first[(group, dim)] = (size, name)
            elif claimed[0] != size:
                what = "the image table holds" if dim == IMAGE_DIM else f"array {claimed[1]!r} has"
                raise _unsafe(url, f"array {name!r} claims {size:,} along {dim!r}, but {what} {claimed[0]:,} (a "
                                   "store cnndiff_xr wrote is consistent)")
    layers = attrs.get(LAYERS_ATTR)
    if layers is None:
        return
    if not isinstance(layers, list):
        raise _unsafe(url, f"root attribute {LAYERS_ATTR!r} is {layers!r}, not a list of layer names")
    for layer in layers:
        if _bad_layer_name(layer):
            raise _unsafe(url, f"root attribute {LAYERS_ATTR!r} names the layer {layer!r}, a name no model gives a "
                               "layer (empty, '.', '..', a path separator or a control character)")
        path = activation_path(layer)
        if path not in arrays or arrays[path][2][:1] != (IMAGE_DIM,):
            raise _unsafe(url, f"root attribute {LAYERS_ATTR!r} names the layer {layer!r}, but the store holds no "
                               f"array {path!r} along {IMAGE_DIM!r}")


def read_store_id(url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The ``store_id`` root attribute of the store at ``url``, read fresh from its root ``zarr.json``; ``None`` where
    there is no such file (the store was deleted) or no such attribute.

    Each extraction batch asks twice (before its data, before its completion record). Opening the group instead
    parses the consolidated metadata of every array (~17 ms for VGG16's 22 layers, ~1.5 % of a batch)."""
    fs, path = _filesystem(check_url(url), check_storage_options(storage_options))
    key = f"{path.rstrip('/')}/zarr.json"
    _forget_cached(fs, key)
    try:
        with reaching(url, "reading its store_id"):
            document = json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    store_id = document.get("attributes", {}).get(STORE_ID_ATTR)
    return None if store_id is None else str(store_id)


def read_attrs(url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The root attributes of a cnndiff store; :class:`StoreError` if ``url`` is not one, or if the store holds
    pickled objects or arrays stored with codecs zarr does not know."""
    return _read_store(url, storage_options)[0]


def _read_store(url: str, storage_options: Mapping[str, Any] | None,
                ) -> tuple[dict[str, Any], dict[str, Mapping[str, Any]]]:
    """:func:`read_attrs`, and every node's metadata (:func:`_node_metadata`)."""
    url, storage_options = check_url(url), check_storage_options(storage_options)
    try:
        group = open_group(url, "r", storage_options=storage_options)
    except StoreUnreachableError:  # the store may be sound: it could not be read
        raise
    except Exception as err:  # zarr raises several types for "nothing here" / "not a group"
        codec_error = _metadata_diagnosis(url, storage_options)
        if codec_error is not None:
            raise codec_error from err
        there = exists(url, storage_options=storage_options)
        what = "nothing is there" if not there else "no Zarr group could be opened there"
        raise StoreError(f"{url!r} is not a cnndiff_xr store ({what}: {type(err).__name__}: {err})") from err
    attrs = dict(group.attrs)
    if attrs.get(FORMAT_ATTR) != FORMAT:
        raise StoreError(f"{url!r} is a Zarr group but not a cnndiff_xr store (root attribute {FORMAT_ATTR}="
                         f"{attrs.get(FORMAT_ATTR)!r}, expected {FORMAT!r})")
    nodes = _node_metadata(url, group.metadata.to_dict(), storage_options)
    _check_no_pickle(url, nodes)
    return attrs, nodes


def completed(url: str, *, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """The per-image completion record (bool array in store order)."""
    return np.asarray(open_group(url, "r", storage_options=storage_options)[COMPLETED][:], dtype=bool)


#: Root attribute present only while :func:`append_images` grows a store: the number of images the store held before.
#: A rerun that finds it (the append was interrupted) keeps those images and redoes the append from there.


def _first_few(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _table_difference(url: str, on_disk: Mapping[str, list[str]], table: ImageTable) -> str | None:
    """Why ``table`` is not the store's images followed by images of new sets (None if it is)."""
    stored_ids, new_ids = on_disk[IMAGE_DIM], list(table.ids)
    n_old = len(stored_ids)
    store_sets = list(dict.fromkeys(on_disk[SET_COORD]))
    remedy = (f"A store's images are fixed once extracted: list its sets first, unchanged and in the same order "
              f"({_first_few(store_sets)}), and new sets after them; or use a new store.")
    head = f"store {url!r} holds a different image table ({n_old} images stored, {len(new_ids)} requested): "
    if new_ids[:n_old] != stored_ids:
        requested = set(new_ids)
        removed = [i for i in stored_ids if i not in requested]
        if removed:
            return head + f"{len(removed)} stored image(s) are not in this run: {_first_few(removed)}. " + remedy
        first = next(i for i, (a, b) in enumerate(zip(stored_ids, new_ids, strict=False)) if a != b)
        stored = set(stored_ids)
        if new_ids[first] not in stored:
            return head + (f"image {new_ids[first]!r} would come at position {first}, before the store's image "
                           f"{stored_ids[first]!r}: new images can only follow the stored ones. ") + remedy
        return head + (f"the images are in another order (position {first}: store has {stored_ids[first]!r}, this "
                       f"run {new_ids[first]!r}). ") + remedy
    ours = {SET_COORD: table.sets[:n_old], SOURCE_COORD: table.sources[:n_old]}
    for name, values in ours.items():
        if on_disk[name] != list(values):
            i = next(i for i, (a, b) in enumerate(zip(on_disk[name], values, strict=True)) if a != b)
            return head + (f"image {stored_ids[i]!r} has {name} {on_disk[name][i]!r} in the store, {values[i]!r} in "
                           f"this run. ") + remedy
    old_sets = set(store_sets)
    grown = [i for i, s in zip(new_ids[n_old:], table.sets[n_old:], strict=True) if s in old_sets]
    if grown:
        names = list(dict.fromkeys(table.sets[n_old + new_ids[n_old:].index(i)] for i in grown))
        return head + (f"set(s) {names} are already in the store and this run lists more images in them "
                       f"({_first_few(grown)}). A set's images are fixed once extracted: give the new images as a "
                       "new set, or use a new store.")
    return None


def check_compatible(url: str, stored: Mapping[str, Any], *, identity: Mapping[str, Any], table: ImageTable,
                     storage_options: Mapping[str, Any] | None = None) -> int | None:
    """Refuse to add to a store made with other settings, other images, or images whose content changed since; say
    what differs. Nothing is written.

    ``stored`` are the store's root attributes, ``identity`` the attributes that this run would record and that
    must agree (:meth:`cnndiff_xr.extraction.config.ExtractionConfig.identity`), ``table`` this run's screened image
    table, with its content digests.

    Returns
    -------
    None when the store holds exactly ``table`` (a resume computes its missing batches); otherwise the number of the
    store's images that ``table`` keeps, in front: the rest of ``table`` are new sets to append with
    :func:`append_images` (also returned to finish an interrupted append, or to rewrite missing consolidated
    metadata, where it may equal ``len(table)``).

    Raises
    ------
    StoreError
        Other settings; stored images removed, reordered, changed in set or source, or new images not at the end as
        new sets; or stored images whose content (sha256) changed. Stores made before content digests were recorded
        have no ``sha256`` coordinate, and their content is not checked.
    """
    diffs = []
    for key, value in identity.items():
        old_value, new_value = stored.get(key), json.loads(json.dumps(value))
        if old_value != new_value:
            diffs.append(f"{key}: store has {old_value!r}, this run asks for {new_value!r}")
    if diffs:
        raise StoreError(f"store {url!r} was made with different settings; refusing to mix them:\n  "
                         + "\n  ".join(diffs) + "\nUse another store path, or rerun with the store's settings.")
    group = open_group(url, "r", storage_options=storage_options)
    appending = stored.get(APPENDING_ATTR)
    n_kept = int(appending) if appending is not None else int(group[IMAGE_DIM].shape[0])
    on_disk = {name: [str(v) for v in group[name][:n_kept]] for name in (IMAGE_DIM, SET_COORD, SOURCE_COORD)}
    difference = _table_difference(url, on_disk, table)
    if difference is not None:
        raise StoreError(difference)
    if SHA256_COORD in group:  # stores made before content digests have none: nothing to compare
        if table.digests is None:
            raise ValueError("check_compatible needs the table's content digests (the extraction takes them while "
                             "it screens the images)")
        recorded = [str(v) for v in group[SHA256_COORD][:n_kept]]
        changed = [i for i, (a, b) in enumerate(zip(recorded, table.digests, strict=False)) if a and a != b]
        if changed:
            listing = "\n".join(f"  {table.ids[i]}: {table.sources[i]}" for i in changed[:5])
            more = f"\n  ... and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise StoreError(
                f"store {url!r}: {len(changed)} of its {n_kept} images changed content since they were extracted "
                f"(their sha256 is not the one recorded); its activations belong to the old content:\n{listing}{more}"
                "\nExtract into a new store, or restore the original images (files, arrays, movie frames, noise "
                "parameters) and rerun."
            )
    if appending is None and n_kept == len(table) and group.metadata.consolidated_metadata is not None:
        return None
    return n_kept


def _consolidate(group: Any) -> None:
    """Rewrite the consolidated metadata of the store whose root group is ``group`` (readers open it with it)."""
    import zarr

    with _quiet_zarr():
        zarr.consolidate_metadata(group.store_path)


def append_images(url: str, table: ImageTable, n_kept: int, *, skipped: Sequence[Mapping[str, str]] | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> str:
    """Grow (or set) the store's image dimension to ``table``, whose first ``n_kept`` images the store holds; return
    the store's new ``store_id``. Only metadata and image coordinates are written; the new images are incomplete.

    Call it under the writer lock, after :func:`check_compatible` returned ``n_kept``. Every array of the hierarchy
    whose first dimension is ``image`` grows, whatever it is (activations, means, repeated coordinates, predictions,
    the completion record); the new part of the image coordinates (id, set, source, sha256) is written, predictions
    get their fill values (-1, "", NaN), completion False, and the consolidated metadata is rewritten. A partial last
    batch of the old images is then incomplete with its new neighbours, and its batch is recomputed whole.

    Crash safety: the first write sets :data:`APPENDING_ATTR` (with a new ``store_id``, so that a task orphaned by an
    earlier client, which still sees the old shapes, drops its results instead of writing into the grown arrays) and
    the consolidated metadata (still the old shapes, so readers see the old store meanwhile); the last writes remove
    the attribute and consolidate the new shapes. A rerun that finds the attribute redoes the append from its
    ``n_kept``; one that finds no consolidated metadata (a crash between the last two writes) rewrites it.
    """
    import zarr

    url, storage_options = check_url(url), check_storage_options(storage_options)
    n_new = len(table)
    if not 0 < n_kept <= n_new:
        raise ValueError(f"append_images: n_kept={n_kept} must be in 1..{n_new} (the table's length)")
    options = dict(storage_options or {}) or None
    with _quiet_zarr():
        group = zarr.open_group(url, mode="r+", storage_options=options, use_consolidated=False)
        # The root's attributes are written through a handle that holds the consolidated metadata, which zarr then
        # writes back with them: through ``group`` the root document was written without it, and a reader opening
        # the store before the next _consolidate failed ("Consolidated metadata requested ... but not found")
        root = zarr.open_group(url, mode="r+", storage_options=options, use_consolidated=None)
    store_id = uuid.uuid4().hex
    root.attrs.update({STORE_ID_ATTR: store_id, APPENDING_ATTR: n_kept})
    _consolidate(group)
    values: dict[str, Sequence[str]] = {IMAGE_DIM: table.ids, SET_COORD: table.sets, SOURCE_COORD: table.sources}
    if table.digests is not None:
        values[SHA256_COORD] = table.digests
    fills: dict[str, Any] = {COMPLETED: False, PREDICTED_CLASS: -1, PREDICTED_LABEL: "",
                             PREDICTED_PROBABILITY: np.nan}
    for path, node in group.members(max_depth=None):
        if not isinstance(node, zarr.Array):
            continue
        dims = getattr(node.metadata, "dimension_names", None)
        if not dims or dims[0] != IMAGE_DIM:
            continue
        node.resize((n_new, *node.shape[1:]))
        if n_new == n_kept:
            continue
        name = path.rsplit("/", 1)[-1]
        if name in values:
            node[n_kept:] = _strings(values[name][n_kept:])
        elif name in fills:
            fill = fills[name]
            node[n_kept:] = np.full(n_new - n_kept, fill, dtype=object if isinstance(fill, str) else node.dtype)
        # anything else (activations, means) is data: the batches write it, and the completion record says when
    attrs = {key: value for key, value in root.attrs.asdict().items() if key != APPENDING_ATTR}
    if skipped is not None:
        attrs[SKIPPED_ATTR] = [dict(record) for record in skipped]
    root.attrs.put(attrs)  # with the old shapes' consolidated metadata: readers still see the old store, whole
    _consolidate(group)
    return store_id


def _is_nan(value: Any) -> bool:
    try:
        return bool(np.isnan(np.asarray(value, dtype=np.float64)).all())
    except (TypeError, ValueError):
        return False


def _as_stored(activation: xr.Variable, url: str) -> xr.Variable:
    """An activation read undecoded, its CF attributes moved to its encoding as xarray's decoding would move them.

    The CF attributes that cnndiff_xr writes are identities -- a NaN ``_FillValue`` (masking NaN with NaN changes
    nothing; float32 activations, and float16 ones written before :data:`~cnndiff_xr.schema.FLOAT16_DECODING`, carry
    it) and a null ``scale_factor`` (float16 activations) -- so the stored values are the decoded values, bit for
    bit: nothing is scaled twice, or not at all. Any other packing was not written by cnndiff_xr and is refused
    rather than read unscaled.
    """
    attrs, encoding = dict(activation.attrs), dict(activation.encoding)
    packing = {key: attrs.pop(key) for key in (CF_SCALE_FACTOR, CF_ADD_OFFSET, CF_FILL_VALUE) if key in attrs}
    scale, offset = packing.get(CF_SCALE_FACTOR), packing.get(CF_ADD_OFFSET)
    fill = packing.get(CF_FILL_VALUE)
    if scale not in (None, 1) or offset not in (None, 0) or (fill is not None and not _is_nan(fill)):
        raise StoreError(f"store {url!r}: the activation of layer {attrs.get('layer', '?')!r} carries CF packing "
                         f"attributes {packing!r} that cnndiff_xr does not write (it writes no scale, no offset and "
                         "NaN as the fill value); re-extract it with cnndiff_xr, or open it with xarray directly")
    encoding.update({key: value for key, value in packing.items() if value is not None})
    return xr.Variable(activation.dims, activation.data, attrs, encoding, fastpath=True)


def open_activations(url: str, *, storage_options: Mapping[str, Any] | None = None) -> xr.DataTree:
    """Open a cnndiff store lazily and **read-only** as an :class:`xarray.DataTree`.

    Activations stay dask arrays over Zarr arrays opened with mode ``"r"`` (writing to them raises). The small image
    coordinates (set, source, predictions, labels) and the completion record are loaded into memory, in this process,
    so that ``activation.where(activation.set == "cats", drop=True)`` and ``.sel`` by set just work. Activations keep
    the stored dtype (float16 stays float16; plain ``xr.open_datatree`` decodes a float16 store to float32).

    Parameters
    ----------
    url
        Path or fsspec URL of the store.
    storage_options
        fsspec options of the store's filesystem.

    Raises
    ------
    StoreError
        ``url`` holds nothing, is not a Zarr group, is a Zarr group but not a cnndiff store, or holds pickled data.
    """
    url, storage_options = check_url(url), check_storage_options(storage_options)
    attrs, nodes = _read_store(url, storage_options)
    _check_metadata(url, attrs, nodes)  # before xarray reads the image coordinates into memory
    with _quiet_zarr(), reaching(url, "opening it"):
        # The activations undecoded: a float16 store stays float16 here (half the bytes to read and move, and the
        # analysis' float16 paths), where plain xarray decodes it to float32 (schema.FLOAT16_DECODING)
        tree = xr.open_datatree(url, engine="zarr", chunks={}, consolidated=True, mode="r",
                                mask_and_scale={ACTIVATION: False}, storage_options=storage_options or None)
    image_coords = (*IMAGE_COORDS, *PREDICTION_COORDS, LABEL_COORD, SHA256_COORD)

    group = None  # opened on first use

    def load(var: xr.DataArray, path: str) -> xr.DataArray:
        # Read here, in this process, not with whatever scheduler is active: these are a few small arrays, and a
        # distributed Client may run on machines that cannot see this store (memory://, a laptop's disk).
        nonlocal group
        if _undecoded(var):
            # one zarr call per array: zarr fetches its chunks (one per batch) concurrently, where dask's one task
            # per chunk took 14 s to open a 20,000-image store of 8 layers
            if group is None:
                group = open_group(url, "r", storage_options=storage_options)
            values = np.asarray(group[path][...])
            if values.shape == var.shape and values.dtype == var.dtype:
                return var.copy(data=values)
        import dask

        (computed,) = dask.compute(var.variable, scheduler="synchronous")
        return var.copy(data=computed.data)

    def as_unicode(var: xr.DataArray) -> xr.DataArray:
        # Zarr returns variable-length strings as numpy's StringDType, which much numpy/pandas code cannot cast;
        # plain fixed-width unicode behaves everywhere
        if var.dtype.kind == "T":
            return var.copy(data=np.asarray(var.values.tolist(), dtype=str))
        return var

    def load_small(ds: xr.Dataset, node_path: str) -> xr.Dataset:
        # the image coordinates, and a reduced layer's unit coordinates (what the analysis maps draws with)
        def path(name: Hashable) -> str:
            return f"{node_path.strip('/')}/{name}".strip("/")

        names = [c for c in ds.coords if c in image_coords or ds.coords[c].dims == (UNIT_DIM,)]
        ds = ds.assign_coords({c: as_unicode(load(ds.coords[c], path(c))) for c in names}) if names else ds
        if IMAGE_DIM in ds.indexes:
            ds = ds.assign_coords({IMAGE_DIM: as_unicode(ds.coords[IMAGE_DIM])})
        if COMPLETED in ds.data_vars:  # one bool per image: the completion record, checked by the analysis
            ds[COMPLETED] = load(ds[COMPLETED], path(COMPLETED))
        if ACTIVATION in ds.data_vars:
            ds = ds.assign({ACTIVATION: _as_stored(ds[ACTIVATION].variable, url)})
        return ds

    with reaching(url, "reading its image coordinates and completion record"):
        tree = xr.DataTree.from_dict({node.path: load_small(node.to_dataset(inherit=False), node.path)
                                      for node in tree.subtree}, name=tree.name)
    from .checksums import checked_reads  # it imports this module

    # every chunk read names the chunk, its layer and images when it fails (a damaged chunk: extraction/checksums.py)
    tree = checked_reads(tree, url, storage_options)
    tree.attrs.update(attrs)
    return tree


def _undecoded(var: xr.DataArray) -> bool:
    """Whether xarray's decoding leaves ``var``'s stored values as they are (no scale, offset, units or masking of a
    fill value other than NaN), so that reading the Zarr array itself gives the same values."""
    encoding = var.encoding
    if any(encoding.get(key) is not None for key in ("scale_factor", "add_offset", "units", "calendar")):
        return False
    fill = encoding.get("_FillValue")
    return fill is None or (var.dtype.kind == "f" and isinstance(fill, float) and np.isnan(fill))


def is_store(url: str, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` holds a cnndiff store (never raises for a missing or foreign path).

    A store refused as unsafe (:class:`UnsafeStoreError`: pickled objects, unknown codecs) counts as one, so that
    the caller opens it as a store and is refused with the reason, never reads it some other way (``cnndiff plot``
    would otherwise open it as a result file with plain xarray, which decodes whatever codecs zarr has)."""
    try:
        read_attrs(url, storage_options=storage_options)
    except UnsafeStoreError:
        return True
    except (StoreError, OSError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------------- summaries
def layer_names(tree: xr.DataTree) -> list[str]:
    """The stored layers in network order."""
    names = tree.attrs.get(LAYERS_ATTR)
    return list(names) if names else [c for c in tree.children if ACTIVATION in tree[c].data_vars]


def _disk_bytes(url: str, path_in_store: str, storage_options: Mapping[str, Any] | None) -> int:
    fs, path = _filesystem(url, storage_options)
    try:
        return int(fs.du(f"{path.rstrip('/')}/{path_in_store}", total=True))
    except FileNotFoundError:
        return 0


def info(url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Layers, shapes, dtype, sizes (on disk and uncompressed), compression ratio, completion, provenance."""
    url, storage_options = check_url(url), check_storage_options(storage_options)
    attrs, nodes = _read_store(url, storage_options)
    _check_metadata(url, attrs, nodes)  # before the completion record is read into memory
    group = open_group(url, "r", storage_options=storage_options)
    done = np.asarray(group[COMPLETED][:], dtype=bool)
    layers = []
    for name in attrs[LAYERS_ATTR]:
        arr = group[activation_path(name)]
        raw = int(np.prod(arr.shape, dtype=np.int64) * arr.dtype.itemsize)
        if MEANS_GROUP in group[name]:  # the stored means are data too (what "on disk" below also counts)
            raw += sum(int(np.prod(a.shape, dtype=np.int64) * a.dtype.itemsize)
                       for _, a in group[means_path(name)].arrays())
        disk = _disk_bytes(url, name, storage_options)  # the layer's group: activations and means
        full_shape = arr.attrs.get(LAYER_SHAPE_ATTR)  # only reduced layers record it
        units = int(np.prod(full_shape if full_shape is not None else arr.shape[1:], dtype=np.int64))
        layers.append({"layer": name, "shape": tuple(arr.shape), "chunks": tuple(arr.chunks), "dtype": str(arr.dtype),
                       "uncompressed_bytes": raw, "disk_bytes": disk, "units": units,
                       "units_kept": int(np.prod(arr.shape[1:], dtype=np.int64)),
                       "layer_shape": tuple(full_shape) if full_shape is not None else tuple(arr.shape[1:])})
    raw_total = sum(layer["uncompressed_bytes"] for layer in layers)
    disk_total = sum(layer["disk_bytes"] for layer in layers)
    done_fraction = done.mean() if done.size else 1.0
    # the ratio only means something over what has been written
    written_raw = raw_total * done_fraction
    return {
        "store": url,
        "n_images": int(done.size),
        "n_completed": int(done.sum()),
        "sets": dict(zip(*np.unique([str(s) for s in group[SET_COORD][:]], return_counts=True), strict=True)),
        "layers": layers,
        "uncompressed_bytes": raw_total,
        "disk_bytes": disk_total,
        "compression_ratio": (written_raw / disk_total) if disk_total else float("nan"),
        "unit_draws": attrs.get(UNIT_DRAWS_ATTR),
        "filter_means": bool(attrs.get(FILTER_MEANS_ATTR, False)),
        "provenance": attrs,
    }


def format_info(summary: Mapping[str, Any]) -> str:
    """A human-readable report of :func:`info`."""
    lines = [f"store: {summary['store']}",
             f"images: {summary['n_completed']} of {summary['n_images']} complete; sets: "
             + ", ".join(f"{k} ({int(v)})" for k, v in summary["sets"].items())]
    draws = UnitDraws.from_attrs(summary.get("unit_draws"))
    if draws is not None:
        lines += ["units: a reduced store, keeping only the units of its registered draws",
                  f"  draws: {draws.describe()}",
                  f"  layers of at most {draws.max_units} units are kept whole; 'cnndiff differentiation' uses these "
                  "draws by default, and the analyses refuse draws the store does not hold"]
    else:
        lines.append("units: every unit of every layer (a full store)")
    if summary.get("filter_means"):
        lines.append("filter means: stored at extraction ('cnndiff summarize' and the filter-mean figures read them)")
    elif draws is not None:
        lines.append("filter means: not stored, so 'cnndiff summarize' and the filter-mean figures cannot use the "
                     "reduced layers (extract with --filter-means for them)")
    width = max(len(layer["layer"]) for layer in summary["layers"]) if summary["layers"] else 5
    lines.append(f"{'layer':<{width}}  {'shape':<24} {'units kept':>20} {'dtype':<8} {'uncompressed':>13} "
                 f"{'on disk':>11}")
    for layer in summary["layers"]:
        kept = layer.get("units_kept", 0)
        units = layer.get("units", kept)
        share = f"{kept} of {units}" if kept != units else "all"
        lines.append(f"{layer['layer']:<{width}}  {str(layer.get('layer_shape', layer['shape'])):<24} {share:>20} "
                     f"{layer['dtype']:<8} {format_bytes(layer['uncompressed_bytes']):>13} "
                     f"{format_bytes(layer['disk_bytes']):>11}")
    lines.append(f"total uncompressed {format_bytes(summary['uncompressed_bytes'])}, on disk "
                 f"{format_bytes(summary['disk_bytes'])}, compression ratio {summary['compression_ratio']:.2f} "
                 "(over the completed images)")
    lines.append("provenance:")
    for key, value in summary["provenance"].items():
        if key != LAYERS_ATTR:
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- selection
def _select_filters(ds: xr.Dataset, filter: Any, layer: str) -> xr.Dataset:
    """``ds`` with only the units of the given filters (labels): by the filter dimension of a whole layer, by the
    units' filter coordinate of a reduced one."""
    if FILTER_DIM in ds.dims:
        return ds.sel({FILTER_DIM: filter})
    if isinstance(filter, slice):
        raise ParameterValueError(f"layer {layer!r} keeps only sampled units (a reduced store): select its filters "
                                  f"by label or a list of labels, not a slice ({filter!r})")
    return ds.isel({UNIT_DIM: np.isin(ds[FILTER_DIM].values, np.atleast_1d(filter))})


def _take_images(ds: xr.Dataset, positions: np.ndarray) -> xr.Dataset:
    """``ds.isel(image=positions)``, with the stored arrays of an opened store read a selection's rows at a time
    (:func:`~cnndiff_xr.extraction.checksums.read_rows`: a sample of 1,000 images spread over a 20,000-image store
    is then a few read tasks per array, not one per stored chunk it touches). Same values."""
    from .checksums import read_rows  # it imports this module

    out = ds.isel({IMAGE_DIM: positions})
    replaced = {}
    for name, var in ds.data_vars.items():
        if var.dims and var.dims[0] == IMAGE_DIM:
            rows = read_rows(var, positions)
            if rows is not None:
                replaced[name] = rows
    return out.assign(replaced) if replaced else out


def select(tree: xr.DataTree, layers: str | Sequence[str] | None = None, *, filter: Any = None,
           sets: str | Sequence[str] | None = None, image: Any = None) -> xr.DataTree:
    """Labelled, lazy slicing across layers: a new tree with only ``layers`` and, in each, only the given filters
    (by label), image sets and images. Nothing is read.

    Raises
    ------
    UnknownLabelError
        A layer or set that is not in the store (a ``KeyError``).
    """
    available = layer_names(tree)
    chosen = available if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise UnknownLabelError(f"layers {unknown} are not in this store; it has {available}")
    groups = {"/": tree.to_dataset(inherit=False)}
    for name in chosen:
        ds = tree.children[name].to_dataset(inherit=True)
        positions: np.ndarray | None = None  # the selected images' positions, when a selection keeps the dimension
        if sets is not None or image is not None:
            probe = xr.DataArray(np.arange(ds.sizes[IMAGE_DIM]), dims=IMAGE_DIM, coords={IMAGE_DIM: ds[IMAGE_DIM]})
            if sets is not None:
                wanted = [sets] if isinstance(sets, str) else list(sets)
                present = np.unique(ds[SET_COORD].values)
                missing = sorted(set(wanted) - set(present))
                if missing:
                    raise UnknownLabelError(f"sets {missing} are not in this store; it has "
                                            f"{sorted(str(v) for v in present)}")
                probe = probe.isel({IMAGE_DIM: np.isin(ds[SET_COORD].values, wanted)})
            if image is not None:
                probe = probe.sel({IMAGE_DIM: image})
            if probe.ndim:
                positions = probe.values
                ds = _take_images(ds, positions)
            else:  # one image by label: the dimension goes, as with xarray's sel
                ds = ds.sel({IMAGE_DIM: image})
        if filter is not None:
            ds = _select_filters(ds, filter, name)
        groups[f"/{name}"] = ds
        if MEANS_GROUP in tree.children[name].children:  # the layer's means follow the same selection
            means = tree.children[name].children[MEANS_GROUP].to_dataset(inherit=True)
            if positions is not None and means.sizes.get(IMAGE_DIM) == tree.children[name].sizes[IMAGE_DIM]:
                means = _take_images(means, positions)
            elif sets is not None or image is not None:
                means = means.sel({IMAGE_DIM: ds[IMAGE_DIM].values})
            if filter is not None:
                means = means.sel({FILTER_DIM: filter})
            groups[f"/{means_path(name)}"] = means
    if sets is not None or image is not None:
        root = groups["/"]
        groups["/"] = root.sel({IMAGE_DIM: groups[f"/{chosen[0]}"][IMAGE_DIM].values}) if chosen else root
    return xr.DataTree.from_dict(groups)


@xr.register_datatree_accessor("cnndiff")
class CnndiffAccessor:
    """``tree.cnndiff``: labelled helpers on a store's DataTree (in the style of cf-xarray's accessor).

    >>> tree.cnndiff.layers                                  # network order
    >>> tree.cnndiff["block1_conv1"]                         # that layer's activation DataArray
    >>> tree.cnndiff.sel(layers=["block1_conv1", "block5_conv3"], filter=31, sets="cats")
    """

    def __init__(self, tree: xr.DataTree) -> None:
        self._tree = tree

    @property
    def layers(self) -> list[str]:
        """The stored layers in network order."""
        return layer_names(self._tree)

    def __getitem__(self, layer: str) -> xr.DataArray:
        if layer not in self.layers:
            raise UnknownLabelError(f"layer {layer!r} is not in this store; it has {self.layers}")
        return self._tree.children[layer].dataset[ACTIVATION]

    def sel(self, layers: str | Sequence[str] | None = None, *, filter: Any = None,
            sets: str | Sequence[str] | None = None, image: Any = None) -> xr.DataTree:
        """:func:`select` on this tree."""
        return select(self._tree, layers, filter=filter, sets=sets, image=image)

    @property
    def complete(self) -> bool:
        """Whether every image's activations are written (the completion record is all True)."""
        return bool(np.asarray(self._tree[COMPLETED].values).all())
