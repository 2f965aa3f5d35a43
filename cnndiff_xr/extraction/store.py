"""The store: a Zarr v3 layout written through :class:`xarray.DataTree`, opened lazily.

Layout (see DESIGN.md, "Store schema")::

    /                 attrs: provenance (model, weights, input size, resize, preprocessing, layers, dtype, versions)
                      coords image (unique str id), set, source; predicted_class/label/probability (ImageNet heads)
                      data   completed (image) bool  -- set per batch, only after that batch's activations
    /<layer>          activation (image, y, x, filter) or (image, filter); coords filter, y, x and (repeated, since
                      xarray inherits only indexed coordinates) the image coordinates set, source, predicted_*

Every array is chunked along ``image`` only, with one chunk per extraction batch, so each Dask task writes whole
chunks of every layer and no lock is needed *between tasks*. The store holds no pickled objects: attributes are JSON,
strings are Zarr's variable-length UTF-8 type; :func:`read_attrs` (hence :func:`open_activations` and :func:`info`)
refuses a store whose metadata names a pickle codec, so nothing executable is read back.

Safety rules (issue 6):

- **One writer per store.** An extraction holds :class:`StoreLock` — a small JSON object ``<store>.lock`` next to the
  store (outside it, so the store itself stays plain Zarr and a refused run leaves no trace in it), created
  atomically (a hard link of a complete temporary file locally, which is atomic on NFS too; ``If-None-Match: *`` on
  S3; other fsspec filesystems get their mode ``"xb"``, which may be a check-then-create) and holding pid, host, start
  time and a heartbeat refreshed every :data:`LOCK_HEARTBEAT_S` seconds. A second run is refused with :class:`StoreLockedError`
  naming the store and the holder. A lock is *stale*, and removed with a warning, when its holder ran on this host and
  that process is gone, or when its heartbeat is older than :data:`LOCK_STALE_S` (a crashed run on another host);
  ``break_lock=True`` (``cnndiff extract --break-lock``) removes any lock.
- **Completion after data.** A batch's ``completed`` flags are written only after its chunks of every layer; chunk
  writes replace whole objects (Zarr's local store writes a temporary file and renames it; an S3 PUT is atomic), so
  an interrupted write leaves at worst a chunk of an incomplete batch, which the next run rewrites.
- **Read-only analysis.** :func:`open_activations` opens with Zarr mode ``"r"``: its arrays refuse writes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from .images import ImageTable

FORMAT = "cnndiff_xr/1"
IMAGE_COORDS = ("set", "source")
PREDICTION_COORDS = ("predicted_class", "predicted_label", "predicted_probability")
COMPRESSIONS = ("zstd", "blosc", "lz4", "none")
DTYPES = ("float32", "float16")
# Attributes that must agree before a run may add to an existing store: they change the numbers.
IDENTITY_ATTRS = ("model", "weights", "weights_sha256", "input_size", "resize", "preprocessing", "layers", "dtype")


OPEN_MODES = ("r", "r+", "a", "w", "w-")


class StoreError(ValueError):
    """A path that is not a cnndiff store, or a store that does not fit the requested run."""


class StoreLockedError(StoreError):
    """Another extraction holds the store's lock; the message names the store and the holder."""


def check_url(url: Any, name: str = "store") -> str:
    """``url`` as a non-empty str (paths and fsspec URLs; os.PathLike accepted). A local path is made absolute: Dask
    workers resolve paths in their own working directory, which need not be the caller's."""
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise TypeError(f"{name} must be a non-empty path or fsspec URL (str or os.PathLike), got "
                        f"{type(url).__name__}: {url!r}")
    if url.startswith("file://"):  # a local path: Zarr's LocalStore creates folders, fsspec's file:// store does not
        url = url[len("file://"):]
    return url if "://" in url else os.path.abspath(url)


def check_storage_options(storage_options: Any) -> dict[str, Any] | None:
    """``storage_options`` as a dict (or None): the fsspec filesystem's keyword arguments."""
    if storage_options is None:
        return None
    if not isinstance(storage_options, Mapping):
        raise TypeError("storage_options must be a mapping of fsspec filesystem options (e.g. {'anon': False}) or "
                        f"None, got {type(storage_options).__name__}: {storage_options!r}")
    bad = [k for k in storage_options if not isinstance(k, str)]
    if bad:
        raise TypeError(f"storage_options keys must be str, got {bad!r}")
    return dict(storage_options)


def _filesystem(url: str, storage_options: Mapping | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _forget_cached(fs: Any, path: str) -> None:
    """Drop what ``fs`` has cached about ``path``: object stores cache listings, and another process may have written
    or replaced the store since."""
    with contextlib.suppress(AttributeError):
        fs.invalidate_cache(path)


@contextlib.contextmanager
def _quiet_zarr():
    """Silence Zarr's notice that consolidated metadata is not in the v3 spec (xarray reads it; we keep it so that
    opening a remote store costs one request)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


#: Allowed ``compression_level`` per codec (inclusive): zstd 0 (its default) to 22, blosc 0..9; ignored for "none".
COMPRESSION_LEVELS = {"zstd": (0, 22), "blosc": (0, 9), "lz4": (0, 9), "none": (0, 22)}


def check_compression(compression: Any, level: Any) -> tuple[str, int]:
    """Validate ``compression`` and its ``compression_level``; the messages name the parameter and the choices."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}; choose one of {COMPRESSIONS}")
    lo, hi = COMPRESSION_LEVELS[compression]
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not lo <= level <= hi:
        raise ValueError(f"compression_level={level!r}: for compression={compression!r} it must be an int in "
                         f"{lo}..{hi}")
    return compression, int(level)


def codec(compression: str = "lz4", level: int = 1):
    """The Zarr v3 compressor for activations (None for ``"none"``)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    compression, level = check_compression(compression, level)
    if compression == "zstd":
        return ZstdCodec(level=level)
    if compression == "blosc":
        return BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")
    if compression == "lz4":
        return BloscCodec(cname="lz4", clevel=level, shuffle="bitshuffle")
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
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {DTYPES}")
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 0:
        raise ValueError(f"n_images must be a non-negative int, got {n_images!r}")
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
    import dask.array as da

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
    comp = provenance.get("compression", "lz4")
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
    """The root Zarr group at ``url`` (``mode`` as :func:`zarr.open_group`: one of :data:`OPEN_MODES`)."""
    import zarr

    url = check_url(url)
    storage_options = check_storage_options(storage_options)
    if mode not in OPEN_MODES:
        raise ValueError(f"mode={mode!r}; choose one of {OPEN_MODES}")

    with _quiet_zarr():
        return zarr.open_group(url, mode=mode, storage_options=dict(storage_options or {}) or None)


def exists(url: str, storage_options: Mapping | None = None) -> bool:
    """Whether anything (a Zarr group or array, or any other file or non-empty folder) is at ``url``."""
    url, storage_options = check_url(url), check_storage_options(storage_options)
    fs, path = _filesystem(url, storage_options)
    _forget_cached(fs, path)
    return fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path)))


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


def _check_no_pickle(url: str, root_meta: Mapping[str, Any], storage_options: Mapping | None) -> None:
    """Refuse a store any of whose arrays would be decoded with pickle (reading it could run code)."""
    nodes: dict[str, Any] = {}
    consolidated = root_meta.get("consolidated_metadata") or {}
    if isinstance(consolidated, Mapping) and isinstance(consolidated.get("metadata"), Mapping):
        nodes.update(consolidated["metadata"])
    else:  # not consolidated: walk the hierarchy (reads each node's metadata document, never lists chunks)
        group = open_group(url, "r", storage_options)
        nodes.update({name: node.metadata.to_dict() for name, node in group.members(max_depth=None)})
    bad = {name: unsafe for name, meta in nodes.items() if isinstance(meta, Mapping) and (unsafe := unsafe_codecs(meta))}
    if bad:
        listing = "; ".join(f"{name}: {', '.join(codecs)}" for name, codecs in sorted(bad.items()))
        raise StoreError(f"store {url!r} holds arrays stored with pickled objects ({listing}); refusing to read it, "
                         "since decoding pickles can run arbitrary code. cnndiff_xr never writes such arrays.")


def read_store_id(url: str, storage_options: Mapping | None = None) -> str | None:
    """The ``store_id`` root attribute of the store at ``url``, read fresh from its root ``zarr.json``; ``None`` where
    there is no such file (the store was deleted) or no such attribute.

    Each extraction batch asks twice (before its data, before its completion record). Opening the group instead
    parses the consolidated metadata of every array (~17 ms for VGG16's 22 layers, ~1.5 % of a batch)."""
    fs, path = _filesystem(check_url(url), check_storage_options(storage_options))
    key = f"{path.rstrip('/')}/zarr.json"
    _forget_cached(fs, key)
    try:
        document = json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    return document.get("attributes", {}).get("store_id")


def read_attrs(url: str, storage_options: Mapping | None = None) -> dict[str, Any]:
    """The root attributes of a cnndiff store; :class:`StoreError` if ``url`` is not one, or if the store holds
    pickled objects."""
    url, storage_options = check_url(url), check_storage_options(storage_options)
    try:
        group = open_group(url, "r", storage_options)
    except Exception as err:  # zarr raises several types for "nothing here" / "not a group"
        what = "nothing is there" if not exists(url, storage_options) else "no Zarr group could be opened there"
        raise StoreError(f"{url!r} is not a cnndiff_xr store ({what}: {type(err).__name__}: {err})") from err
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{url!r} is a Zarr group but not a cnndiff_xr store (root attribute format="
                         f"{attrs.get('format')!r}, expected {FORMAT!r})")
    _check_no_pickle(url, group.metadata.to_dict(), storage_options)
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
    """Open a cnndiff store lazily and **read-only** as an :class:`xarray.DataTree`.

    Activations stay dask arrays over Zarr arrays opened with mode ``"r"`` (writing to them raises). The small image
    coordinates (set, source, predictions, labels) and the completion record are loaded into memory, in this process,
    so that ``activation.where(activation.set == "cats", drop=True)`` and ``.sel`` by set just work.

    Raises
    ------
    StoreError
        ``url`` holds nothing, is not a Zarr group, is a Zarr group but not a cnndiff store, or holds pickled data.
    """
    url, storage_options = check_url(url), check_storage_options(storage_options)
    attrs = read_attrs(url, storage_options)
    with _quiet_zarr():
        tree = xr.open_datatree(url, engine="zarr", chunks={}, consolidated=True, mode="r",
                                storage_options=storage_options or None)
    image_coords = [c for c in (*IMAGE_COORDS, *PREDICTION_COORDS, "label") if c]

    def load(var: xr.DataArray) -> xr.DataArray:
        import dask

        # Read here with the synchronous scheduler, not whatever scheduler is active: these are a few small arrays,
        # and a distributed Client may run on machines that cannot see this store (memory://, a laptop's disk).
        (values,) = dask.compute(var.variable, scheduler="synchronous")
        return var.copy(data=values.data)

    def as_unicode(var: xr.DataArray) -> xr.DataArray:
        # Zarr returns variable-length strings as numpy's StringDType, which much numpy/pandas code cannot cast;
        # plain fixed-width unicode behaves everywhere
        if var.dtype.kind == "T":
            return var.copy(data=np.asarray(var.values.tolist(), dtype=str))
        return var

    def load_small(ds: xr.Dataset) -> xr.Dataset:
        names = [c for c in image_coords if c in ds.coords]
        ds = ds.assign_coords({c: as_unicode(load(ds.coords[c])) for c in names}) if names else ds
        if "image" in ds.indexes:
            ds = ds.assign_coords(image=as_unicode(ds.coords["image"]))
        if "completed" in ds.data_vars:  # one bool per image: the completion record, checked by the analysis
            ds["completed"] = load(ds["completed"])
        return ds

    tree = tree.map_over_datasets(load_small)
    tree.attrs.update(attrs)
    return tree


# --------------------------------------------------------------------------------------------------- the writer lock
#: Seconds between heartbeats of a held lock (the holder rewrites the lock object with the current time).
LOCK_HEARTBEAT_S = 60.0
#: A lock whose heartbeat is older than this many seconds is stale (its holder crashed or lost its connection).
LOCK_STALE_S = 600.0
LOCK_SUFFIX = ".lock"


def lock_url(url: str) -> str:
    """Where the writer lock of the store at ``url`` lives: ``<store>.lock``, next to the store."""
    return check_url(url).rstrip("/") + LOCK_SUFFIX


def read_lock(url: str, storage_options: Mapping | None = None) -> dict[str, Any] | None:
    """The lock record of the store at ``url`` (pid, host, started, heartbeat, ...) or None when it is not locked."""
    fs, path = _filesystem(lock_url(url), check_storage_options(storage_options))
    _forget_cached(fs, path)
    try:
        with fs.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict):  # not written by us, or damaged: held by an unknown holder
        record = {"token": None, "unreadable": raw[:200].decode(errors="replace")}
    return record


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stale_reason(record: Mapping[str, Any], stale_after: float, now: float | None = None) -> str | None:
    """Why a lock record is stale, or None if its holder may still be running."""
    now = time.time() if now is None else now
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return f"its process {pid} on this host ({host}) is no longer running"
    beat = record.get("heartbeat")
    if isinstance(beat, (int, float)) and now - beat > stale_after:
        return f"its last heartbeat was {now - beat:.0f} s ago (a lock is stale after {stale_after:.0f} s)"
    return None


def _describe_holder(record: Mapping[str, Any], now: float | None = None) -> str:
    if "unreadable" in record:
        return f"an unknown holder (the lock object is not a cnndiff lock record: {record['unreadable']!r})"
    now = time.time() if now is None else now
    beat = record.get("heartbeat")
    ago = f"{now - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return (f"pid {record.get('pid')} on host {record.get('host')!r}, started {record.get('started')}, "
            f"last heartbeat {ago}, command {record.get('command')!r}")


def _remove(url: str, storage_options: Mapping | None) -> None:
    fs, path = _filesystem(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def break_lock(url: str, storage_options: Mapping | None = None) -> dict[str, Any] | None:
    """Remove the store's writer lock whoever holds it; return the removed record (None if there was none).

    Only for a lock whose holder is known to be dead: a live holder keeps writing, and a second run could then write
    the same chunks at the same time (the same bytes, since batches are deterministic, but nothing guarantees it).
    """
    record = read_lock(url, storage_options)
    if record is not None:
        _remove(lock_url(url), check_storage_options(storage_options))
    return record


def _protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


class StoreLock:
    """The writer lock of one store: ``with StoreLock(url): ...`` (the rules are in the module docstring).

    Parameters
    ----------
    url, storage_options
        The store (the lock object is ``<url>.lock``).
    break_lock
        Remove an existing lock whatever its state (for a holder known to be dead).
    stale_after
        Seconds without a heartbeat after which a lock counts as stale.
    heartbeat
        Seconds between heartbeats of this lock while held (shorter than ``stale_after``).
    """

    def __init__(self, url: str, storage_options: Mapping | None = None, *, break_lock: bool = False,
                 stale_after: float = LOCK_STALE_S, heartbeat: float = LOCK_HEARTBEAT_S):
        self.url = check_url(url)
        self.storage_options = check_storage_options(storage_options)
        if not isinstance(break_lock, bool):
            raise TypeError(f"break_lock must be True or False, got {break_lock!r}")
        for name, value in (("stale_after", stale_after), ("heartbeat", heartbeat)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if heartbeat >= stale_after:
            raise ValueError(f"heartbeat={heartbeat!r} must be shorter than stale_after={stale_after!r} (seconds)")
        self.break_lock, self.stale_after, self.heartbeat = break_lock, float(stale_after), float(heartbeat)
        self.lock_url = lock_url(self.url)
        self.token: str | None = None
        self.record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the lock object
    def _new_record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "lock": "cnndiff_xr store writer lock",
            "store": self.url,
            "token": uuid.uuid4().hex,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": now,
            "command": " ".join(sys.argv)[:300],
        }

    def _create(self, record: Mapping[str, Any]) -> bool:
        """Create the lock object holding ``record`` if none exists, atomically; False if one exists."""
        fs, path = _filesystem(self.lock_url, self.storage_options)
        data = json.dumps(record).encode()
        if "file" in _protocols(fs):
            # The complete record appears at once or not at all: write a private temporary file, then hard-link it to
            # the lock name (link fails if the name exists), as Zarr's LocalStore does for its exclusive writes.
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.{record['token']}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            # "xb": exclusive create. s3fs sends If-None-Match: * with the PUT, so S3 itself refuses a second creator.
            with fs.open(path, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            return False
        except OSError as err:  # a failed precondition (412) on object stores that report it differently
            if "PreconditionFailed" in str(err) or "412" in str(err):
                return False
            raise
        return True

    def _rewrite(self, record: Mapping[str, Any]) -> None:
        fs, path = _filesystem(self.lock_url, self.storage_options)
        data = json.dumps(record).encode()
        if "file" in _protocols(fs):
            tmp = f"{path}.{record['token']}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)  # atomic: readers see the old or the new record
        else:
            with fs.open(path, "wb") as fh:  # one PUT on object stores: atomic too
                fh.write(data)

    # ---- acquire / release
    def acquire(self) -> StoreLock:
        """Take the lock, removing a stale one (with a warning); :class:`StoreLockedError` if it is held."""
        for _ in range(5):
            record = self._new_record()
            if self._create(record):
                self.token, self.record = record["token"], record
                self._start_heartbeat()
                return self
            held = read_lock(self.url, self.storage_options)
            if held is None:
                continue  # released between our attempt and the read: try again
            reason = "break_lock=True was given" if self.break_lock else _stale_reason(held, self.stale_after)
            if reason is None:
                raise StoreLockedError(
                    f"store {self.url!r} is being written by another extraction: {_describe_holder(held)} (lock "
                    f"object {self.lock_url!r}). Two runs must not write one store at once; wait for that run to "
                    f"finish (rerunning afterwards finishes only what is missing). If it is dead, its lock is "
                    f"removed automatically once its process is gone (same host) or {self.stale_after:.0f} s after "
                    f"its last heartbeat; or pass break_lock=True (cnndiff extract --break-lock) to remove it now."
                )
            warnings.warn(f"removing the lock of store {self.url!r} held by {_describe_holder(held)}: {reason}",
                          stacklevel=2)
            # Remove it only if it is still the lock we judged: two runs breaking one stale lock at once must not
            # remove each other's new lock (a narrow race remains between this read and the removal).
            again = read_lock(self.url, self.storage_options)
            if again is not None and again.get("token") == held.get("token") and again.get("heartbeat") == \
                    held.get("heartbeat"):
                _remove(self.lock_url, self.storage_options)
        raise StoreLockedError(f"store {self.url!r}: could not take its lock {self.lock_url!r}: other runs keep "
                               "taking it; try again")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock object if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.token is None:
            return
        held = read_lock(self.url, self.storage_options)
        if held is not None and held.get("token") == self.token:
            _remove(self.lock_url, self.storage_options)
        self.token = None

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"cnndiff-lock-heartbeat {self.url}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                held = read_lock(self.url, self.storage_options)
                if held is None or held.get("token") != self.token:
                    warnings.warn(f"the lock of store {self.url!r} was removed or taken by another run while this "
                                  "run held it (break_lock?); two runs may now be writing the store", stacklevel=1)
                    return
                self.record = {**held, "heartbeat": time.time()}
                self._rewrite(self.record)
            except Exception as err:  # a transient storage error must not kill the run; the next beat retries
                warnings.warn(f"could not refresh the lock of store {self.url!r}: {err}", stacklevel=1)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def layer_names(tree: xr.DataTree) -> list[str]:
    """The stored layers in network order."""
    names = tree.attrs.get("layers")
    return list(names) if names else [c for c in tree.children if "activation" in tree[c].data_vars]


def _disk_bytes(url: str, group: str, storage_options: Mapping | None) -> int:
    import fsspec

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
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    import keras

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
                raise KeyError(f"sets {missing} are not in this store; it has "
                               f"{sorted(str(v) for v in np.unique(ds['set'].values))}")
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


def is_store(url: str, storage_options: Mapping | None = None) -> bool:
    """Whether ``url`` holds a cnndiff store (never raises for a missing or foreign path)."""
    try:
        read_attrs(url, storage_options)
    except (StoreError, OSError, ValueError):
        return False
    return True
