"""Damaged chunks: caught when read, found by verification, repaired by re-extraction.

A chunk file can be damaged after it was written (a flipped bit on a disk or in a copy, a file cut short by a full
disk or an interrupted transfer). A lz4 or zstd chunk with a flipped byte often still decodes -- to wrong numbers, which
the analysis would silently use. So:

- **Checksums.** New stores append Zarr v3's ``crc32c`` codec to every array's codec pipeline, after compression
  (:func:`add_checksums`, called by :func:`cnndiff_xr.extraction.store.build_layout`): each chunk carries the CRC-32C
  of its compressed bytes, and zarr refuses a chunk whose bytes do not match. Stores made before keep their codecs
  (an append or a resume writes with the codecs in the store's metadata) and stay readable; the codecs are not part
  of the store's identity. The dask config setting ``"cnndiff_xr.chunk-checksums"`` (default True) set to False
  writes new stores without them (for readers without crc32c, or to measure their cost: benchmarks/RESULTS.md).
- **Reads name the chunk.** :func:`checked_reads` (called by :func:`cnndiff_xr.extraction.store.open_activations`)
  makes every image-chunked data variable a dask array whose read tasks turn any failure to read or decode a chunk
  into a :class:`DamagedChunkError` naming the store, the layer, the array, the chunk's key and its images, and the
  remedy. Every analysis reads through these tasks, so this is the one place; the error propagates out of
  ``.compute()``, and nothing is computed from the chunk. A chunk of a local store in this package's layout
  (``bytes`` -> ``blosc`` [-> ``crc32c``]) is read straight from its file, checked and decoded in the reading thread
  (:class:`_LocalChunkFiles`: zarr's values, without its event loop's round trips); everything else, and every chunk
  that fails there, goes through zarr, whose errors are the ones named.
- **Verification.** :func:`verify_store` reads every chunk of every array, one Dask task per batch of images (and
  one per array not chunked along ``image``), on the cluster, and lists the damaged chunks (:class:`DamagedChunk`).
  A chunk file of a completed batch that is missing (zarr would read it as NaN) is listed too.
- **Repair.** :func:`mark_for_repair` sets the completion flags of the batches holding damaged chunks to False, so
  that the normal resume of :func:`cnndiff_xr.extract` re-extracts exactly them (``repair=True``); a batch rewrites
  its chunks whole, so the store then equals a clean one. Damage the batches do not rewrite (the image table, the
  dimension coordinates) is refused with the remedy (a new store).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..schema import (
    ACTIVATION,
    COMPLETED,
    FILTER_MEAN,
    IMAGE_DIM,
    LAYER_CSS,
    LAYER_MEAN,
    PREDICTED_CLASS,
    PREDICTED_LABEL,
    PREDICTED_PROBABILITY,
    STORE_ID_ATTR,
)
from . import store as _store

__all__ = ["CHECKSUM_CONFIG", "CheckedRows", "DamagedChunk", "DamagedChunkError", "add_checksums", "checked_reads",
           "checksum_codec", "checksums_enabled", "format_damage", "has_checksums", "mark_for_repair",
           "read_rows", "verify_store"]

#: The dask config key that turns the checksums of new stores off (True by default)
CHECKSUM_CONFIG = "cnndiff_xr.chunk-checksums"
#: How many image ids a message names before "and N more"
_NAMED_IMAGES = 8
#: Arrays (by name, in any group) that a batch task writes whole per batch, or that the extraction rewrites whole
#: after its batches (the predicted labels and the copies of the predictions in every layer group): a damaged chunk
#: of one is repaired by re-extracting its batch
_REWRITTEN = frozenset({ACTIVATION, FILTER_MEAN, LAYER_MEAN, LAYER_CSS, COMPLETED, PREDICTED_CLASS,
                        PREDICTED_PROBABILITY, PREDICTED_LABEL})
#: Arrays whose chunk files every completed batch has written (the batch writes them with write_empty_chunks): a
#: missing file there is damage, where zarr would silently read the fill value
_ALWAYS_WRITTEN = frozenset({ACTIVATION, FILTER_MEAN, LAYER_MEAN, LAYER_CSS})

REMEDY = ("List every damaged chunk with 'cnndiff info STORE --verify' (cx.verify_store), and re-extract the "
          "damaged batches from the images with the extraction command and '--repair' (cx.extract(..., "
          "repair=True)).")


# --------------------------------------------------------------------------------------------------- the codec
def checksums_enabled() -> bool:
    """Whether new stores get the crc32c codec (dask config ``"cnndiff_xr.chunk-checksums"``, default True)."""
    import dask

    return bool(dask.config.get(CHECKSUM_CONFIG, True))


def checksum_codec() -> Any:
    """Zarr v3's crc32c codec (a bytes-to-bytes codec: it goes after the compressor)."""
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


def add_checksums(tree: xr.DataTree, encoding: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Append the crc32c codec to the compressors of every array ``tree`` writes (data and coordinates of every
    group; an array without compressors in ``encoding`` keeps zarr's default, zstd), in place in ``encoding``."""
    from zarr.codecs import ZstdCodec

    for node in tree.subtree:
        group = "/" if node.path == "/" else node.path
        ds = node.to_dataset(inherit=False)
        entries = encoding.setdefault(group, {})
        for name in ds.variables:
            entry = entries.setdefault(str(name), {})
            compressors = entry.get("compressors")
            compressors = [ZstdCodec()] if compressors is None else list(compressors)  # zarr's default
            entry["compressors"] = [*compressors, checksum_codec()]


def has_checksums(meta: Mapping[str, Any]) -> bool:
    """Whether one array's Zarr v3 metadata (its ``zarr.json`` as a dict) has the crc32c codec."""
    return any(isinstance(c, Mapping) and c.get("name") == "crc32c" for c in meta.get("codecs", []))


# --------------------------------------------------------------------------------------------------- damage
@dataclasses.dataclass(frozen=True)
class DamagedChunk:
    """One damaged chunk: the array (its path in the store), the chunk's key (its file under the array), the layer
    (None for an array outside the layer groups), the image rows ``start:stop`` it holds (None, None for an array not
    along ``image``) and their ids, and what is wrong with it."""

    array: str
    chunk: str
    layer: str | None
    start: int | None
    stop: int | None
    images: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        where = f"layer {self.layer!r}, " if self.layer else ""
        rows = f", images {self.start}..{self.stop - 1}" if self.start is not None and self.stop is not None else ""
        return f"{where}array {self.array!r}, chunk {self.chunk!r}{rows}{_named(self.images)}: {self.reason}"


def _named(ids: Sequence[str]) -> str:
    if not ids:
        return ""
    shown = ", ".join(ids[:_NAMED_IMAGES])
    return f" ({shown}{f' and {len(ids) - _NAMED_IMAGES} more' if len(ids) > _NAMED_IMAGES else ''})"


class DamagedChunkError(_store.StoreError):
    """A chunk of a store cannot be read or decoded (a checksum mismatch, a file cut short, an unreadable file).

    Attributes: ``store``, ``array`` (the array's path), ``chunk`` (its key), ``layer``, ``images`` (ids of the
    chunk's images) and ``reason`` (what zarr or the codec said)."""

    def __init__(self, store: str, array: str, chunk: str, layer: str | None, images: Sequence[str],
                 reason: str) -> None:
        self.store, self.array, self.chunk, self.layer = store, array, chunk, layer
        self.images, self.reason = list(images), reason
        what = f"layer {layer!r} (array {array!r})" if layer else f"array {array!r}"
        super().__init__(
            f"store {store!r}: chunk {chunk!r} of {what} is damaged and cannot be read ({reason}); it holds "
            f"{len(self.images)} image(s){_named(self.images) or ''}. Nothing was computed from it. {REMEDY}")

    def __reduce__(self) -> tuple[Any, ...]:  # travels from a worker to the client by pickle: keep the fields
        return type(self), (self.store, self.array, self.chunk, self.layer, self.images, self.reason)


def _layer_of(array_path: str) -> str | None:
    """The layer an array belongs to (its first group), or None for a root array."""
    parts = array_path.strip("/").split("/")
    return parts[0] if len(parts) > 1 else None


def _chunk_key(array: Any, coords: Sequence[int]) -> str:
    return str(array.metadata.encode_chunk_key(tuple(int(c) for c in coords)))


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _image_ids(group: Any, start: int, stop: int) -> tuple[str, ...]:
    """The ids of image rows ``start:stop`` (empty when the image table itself cannot be read)."""
    try:
        return tuple(str(v) for v in group[IMAGE_DIM][start:stop])
    except Exception:  # the image table damaged too: the rows still say which images
        return ()


# --------------------------------------------------------------------------------------------------- checked reads
_ARRAY_CACHE: dict[str, tuple[Any, dict[str, tuple[Any, _LocalChunkFiles | None]]]] = {}


def _open_array(url: str, storage_options: Mapping[str, Any] | None, store_id: str | None, path: str,
                shape: Sequence[int] | None = None) -> tuple[Any, Any, _LocalChunkFiles | None]:
    """The root group (read-only), one array of it and the array's direct reader (:func:`_direct_reader`; None:
    read through zarr), all cached per process (each read task asks: opening the array from the group's metadata
    again took ~0.5 ms of zarr's event-loop round trips per task, ~20 % of a read of a reduced store).

    Keyed by ``store_id`` too, and reopened when the array's shape is not ``shape``: an append grows the arrays (and
    gives the store a new id), and a store replaced at the same URL may have other shapes or codecs."""
    key = json.dumps([url, dict(storage_options or {}), store_id], sort_keys=True, default=str)
    cached = _ARRAY_CACHE.get(key)
    opened = None
    if cached is not None:
        opened = cached[1].get(path)
        if opened is None:
            array = cached[0][path]
            opened = cached[1][path] = (array, _direct_reader(array))
    if cached is None or opened is None or (shape is not None and tuple(opened[0].shape) != tuple(shape)):
        if len(_ARRAY_CACHE) > 16:  # a long-lived worker reading many stores
            _ARRAY_CACHE.clear()
        group = _store.open_group(url, "r", storage_options=storage_options)
        array = group[path]
        opened = (array, _direct_reader(array))
        cached = _ARRAY_CACHE[key] = (group, {path: opened})
    return cached[0], opened[0], opened[1]


@dataclasses.dataclass(frozen=True)
class _LocalChunkFiles:
    """The chunk files of one array of a local store in the layout this package writes (regular chunks, codecs
    ``bytes`` (little-endian) -> ``blosc`` [-> ``crc32c``]), read and decoded in the calling thread.

    Why: zarr reads every chunk through its event loop thread (the file read and the blosc decode each handed to a
    thread pool and back), ~2 ms of round trips per chunk that need the GIL; under an analysis whose threads compute
    at the same time a read task waited ~4.5 ms per chunk, which left the cores idle. The same file read, checksum
    and blosc decode here (each a C call that releases the GIL) take ~1 ms: one read of a reduced VGG16 store and its
    differentiation ~35 % and ~25 % faster (``benchmarks/RESULTS.md``). The bytes decoded and the array returned are
    those zarr would return; anything else -- another codec, a missing file (zarr's fill value), a checksum mismatch,
    a file that does not decode -- returns None, and the caller reads through zarr, which raises as before."""

    folder: str
    encode_key: Any  # the array's chunk key encoding: chunk coordinates -> "c/0/0"
    chunks: tuple[int, ...]
    dtype: np.dtype[Any]
    checksum: Any  # google_crc32c.value, or None for an array without the crc32c codec
    decode: Any  # numcodecs' blosc decode

    def read(self, index: Any, shape: Sequence[int]) -> np.ndarray | None:
        """The values at ``index`` (slices of step 1, what dask's getter passes for a chunk), or None."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != len(shape) or not all(isinstance(i, slice) for i in index):
            return None
        bounds = [i.indices(int(n)) for i, n in zip(index, shape, strict=True)]
        if any(step != 1 or stop < start for start, stop, step in bounds):
            return None
        out = np.empty(tuple(stop - start for start, stop, _ in bounds), self.dtype)
        if not out.size:
            return out
        ranges = [range(start // c, (stop - 1) // c + 1)
                  for (start, stop, _), c in zip(bounds, self.chunks, strict=True)]
        for coords in itertools.product(*ranges):
            chunk = self._chunk(coords)
            if chunk is None:
                return None
            take, put = [], []
            for (start, stop, _), c, k in zip(bounds, self.chunks, coords, strict=True):
                lo, hi = max(start, k * c), min(stop, (k + 1) * c)
                take.append(slice(lo - k * c, hi - k * c))
                put.append(slice(lo - start, hi - start))
            out[tuple(put)] = chunk[tuple(take)]
        return out

    def _chunk(self, coords: tuple[int, ...]) -> np.ndarray | None:
        try:
            with open(f"{self.folder}/{self.encode_key(coords)}", "rb") as f:
                data = np.frombuffer(f.read(), np.uint8)
            if self.checksum is not None:
                if data.size < 4 or self.checksum(data[:-4]) != int.from_bytes(data[-4:].tobytes(), "little"):
                    return None
                data = data[:-4]
            values = np.frombuffer(self.decode(data), self.dtype)
            return values.reshape(self.chunks) if values.size == math.prod(self.chunks) else None
        except Exception:  # missing, unreadable or undecodable: zarr decides (fill value or its error)
            return None


def _direct_reader(array: Any) -> _LocalChunkFiles | None:
    """The direct reader of ``array``'s chunks when it is in a local store with the codecs this package writes,
    else None."""
    import sys

    try:  # zarr.core's names may move in a later zarr: then every read goes through zarr
        import google_crc32c
        from numcodecs import Blosc
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.storage import LocalStore

        store, meta = array.store_path.store, array.metadata
        codecs = list(meta.codecs)
        dtype = np.dtype(array.dtype)
        if getattr(meta, "storage_transformers", ()):
            return None
    except Exception:  # zarr v2 metadata, another store or array type
        return None
    checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    codecs = codecs[:-1] if checksum else codecs
    if not (isinstance(store, LocalStore) and isinstance(meta.chunk_grid, RegularChunkGrid) and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
            and dtype.kind in "fiub" and sys.byteorder == "little"
            and (dtype.itemsize == 1 or getattr(codecs[0].endian, "value", None) == "little")):
        return None
    return _LocalChunkFiles(folder=f"{store.root}/{array.path}", encode_key=meta.encode_chunk_key,
                            chunks=tuple(int(c) for c in meta.chunk_grid.chunk_shape), dtype=dtype,
                            checksum=google_crc32c.value if checksum else None, decode=Blosc().decode)


def _covered(index: Any, shape: Sequence[int], chunks: Sequence[int]) -> list[list[int]]:
    """Per dimension, the chunk numbers a read of ``index`` (what dask's getter passes: slices, integers or integer
    arrays) touches."""
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for i, n, c in zip(index, shape, chunks, strict=False):
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            rows = np.arange(start, stop, step)
        else:
            rows = np.atleast_1d(np.asarray(i)).reshape(-1)
        out.append(sorted({int(r) // c for r in rows}) or [0])
    return out


@dataclasses.dataclass(frozen=True)
class CheckedChunks:
    """One stored array, read chunk by chunk for dask (:func:`dask.array.from_array`): any failure to read or
    decode becomes a :class:`DamagedChunkError` naming the chunk and its images. Small and picklable (the array is
    reopened, once per process, in the worker)."""

    url: str
    storage_options: Mapping[str, Any] | None
    store_id: str | None
    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        group, array, files = _open_array(self.url, self.storage_options, self.store_id, self.path, self.shape)
        if files is not None:
            direct = files.read(index, self.shape)
            if direct is not None:
                return direct
        try:  # anything the direct read does not take, and every failure of it, goes through zarr (and its errors)
            return np.asarray(array[index])
        except Exception as err:
            covered = _covered(index, self.shape, self.chunks)
            keys = [_chunk_key(array, coords) for coords in itertools.product(*covered)]
            chunk = keys[0] if len(keys) == 1 else f"one of {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            start = covered[0][0] * self.chunks[0]
            stop = min((covered[0][-1] + 1) * self.chunks[0], self.shape[0])
            raise DamagedChunkError(self.url, self.path, chunk, _layer_of(self.path),
                                    _image_ids(group, start, stop), _reason(err)) from err


#: Arrays read many stored chunks per dask task: small per-image values (a few KiB per batch) that the figures and
#: summaries read whole; one task per stored chunk made ``cnndiff plot`` of a 20,000-image store spend a minute in
#: scheduling. The activations keep one task per stored chunk: the analysis' row blocks (and so its float32 Gram
#: sums, bit for bit) follow their chunks.
_READ_TOGETHER = frozenset({FILTER_MEAN, LAYER_MEAN, LAYER_CSS})
#: Bytes a read task of several stored chunks (or of selected rows, :class:`CheckedRows`) aims at
READ_TASK_BYTES = 32 * 2**20
#: The reader behind each dask array :func:`checked_reads` made, by the array's dask name (this process only): what
#: :func:`read_rows` needs to read a selection of images together
_READERS: dict[str, CheckedChunks] = {}


def _rows_per_task(row_bytes: int, multiple: int = 1) -> int:
    """Rows per read task of about :data:`READ_TASK_BYTES`, a multiple of ``multiple`` (a stored chunk's rows)."""
    return multiple * max(1, READ_TASK_BYTES // max(1, row_bytes * multiple))


def _grouped_chunks(shape: Sequence[int], stored: Sequence[int], itemsize: int) -> tuple[tuple[int, ...], ...]:
    """Dask chunks of whole stored chunks along the first axis, about :data:`READ_TASK_BYTES` each."""
    rows = _rows_per_task(int(np.prod(shape[1:], dtype=np.int64)) * itemsize, int(stored[0]))
    n = int(shape[0])
    first = tuple(min(rows, n - lo) for lo in range(0, n, rows)) or (0,)
    return (first, *((int(s),) for s in shape[1:]))


@dataclasses.dataclass(frozen=True)
class CheckedRows:
    """Some rows (images, by position) of a :class:`CheckedChunks` array, for dask: each task reads its rows at once
    (zarr fetches the stored chunks they touch concurrently, in one call) instead of one task per stored chunk and
    a selection on top. Read errors name the chunk as :class:`CheckedChunks` does."""

    source: CheckedChunks
    positions: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions), *self.source.shape[1:])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.source.dtype

    @property
    def ndim(self) -> int:
        return self.source.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        rows = self.positions[index[0]]
        if rows.size == 0:
            empty = np.empty((0, *self.source.shape[1:]), dtype=self.source.dtype)
            return empty[(slice(None),) + tuple(index[1:])]
        return self.source[(rows,) + tuple(index[1:])]


def read_rows(var: xr.DataArray, positions: np.ndarray) -> xr.DataArray | None:
    """``var.isel(image=positions)`` read through its :class:`CheckedChunks` reader, the selected rows of several
    stored chunks per task (:class:`CheckedRows`), or None when ``var`` is not an array :func:`checked_reads` made in
    this process (the caller selects as usual). Same values; other dask chunks (the selection's rows, about
    :data:`READ_TASK_BYTES` per task)."""
    import dask.array as da
    from dask.base import tokenize

    data = var.data
    reader = _READERS.get(getattr(data, "name", "")) if isinstance(data, da.Array) else None
    if reader is None or tuple(data.shape) != reader.shape:
        return None
    positions = np.asarray(positions, dtype=np.int64)
    rows = CheckedRows(reader, positions)
    per_task = _rows_per_task(int(np.prod(reader.shape[1:], dtype=np.int64)) * reader.dtype.itemsize)
    chunks = (tuple(min(per_task, len(positions) - lo) for lo in range(0, len(positions), per_task)) or (0,),
              *((int(s),) for s in reader.shape[1:]))
    out = da.from_array(rows, chunks=chunks, name=f"{data.name}-rows-{tokenize(positions)}", lock=False,
                        asarray=False, meta=np.empty((0,) * var.ndim, dtype=var.dtype))
    return var.isel({var.dims[0]: positions}).copy(data=out)


def checked_reads(tree: xr.DataTree, url: str, storage_options: Mapping[str, Any] | None) -> xr.DataTree:
    """``tree`` (as :func:`~cnndiff_xr.extraction.store.open_activations` opened it) with every data variable
    along ``image`` that is still a dask array read through :class:`CheckedChunks`.

    The dask name is xarray's (deterministic for the store) with ``-checked`` appended, so graph keys stay what
    identifies the data read; the chunks are the stored chunks, as xarray's ``chunks={}`` gives them."""
    import dask.array as da

    group = _store.open_group(url, "r", storage_options=storage_options)
    store_id = group.attrs.get(STORE_ID_ATTR)
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        replaced = {}
        for name, var in ds.data_vars.items():
            if not isinstance(var.data, da.Array) or not var.dims or var.dims[0] != IMAGE_DIM:
                continue
            path = f"{node.path.strip('/')}/{name}".strip("/")
            array = group[path]
            if tuple(array.shape) != tuple(var.shape):  # not the stored array as it is: leave it to xarray
                continue
            reader = CheckedChunks(url, storage_options, store_id, path, tuple(int(s) for s in array.shape),
                                   tuple(int(c) for c in array.chunks), var.dtype)
            chunks = (_grouped_chunks(reader.shape, reader.chunks, var.dtype.itemsize) if name in _READ_TOGETHER
                      else var.data.chunks)
            data = da.from_array(reader, chunks=chunks, name=f"{var.data.name}-checked", lock=False,
                                 asarray=False, meta=np.empty((0,) * var.ndim, dtype=var.dtype))
            if len(_READERS) > 4096:  # a long session opening many stores
                _READERS.clear()
            _READERS[data.name] = reader
            replaced[name] = var.copy(data=data)
        if replaced:
            node.dataset = ds.assign(replaced)
    return tree


# --------------------------------------------------------------------------------------------------- verification
@dataclasses.dataclass(frozen=True)
class _VerifyTask:
    """What every verification task shares: the store, and for each array it reads, its path."""

    url: str
    storage_options: Mapping[str, Any] | None
    store_id: str | None


def _verify_chunks(task: _VerifyTask, items: Sequence[tuple[str, tuple[int, ...]]],
                   completed: np.ndarray | None) -> list[DamagedChunk]:
    """Read each ``(array path, chunk coordinates)``; the damaged ones. ``completed`` (the completion record, None
    when unreadable) says which batches must have written their chunk files."""
    fs, root = _store._filesystem(task.url, task.storage_options)
    damaged = []
    for path, coords in items:
        group, array, _ = _open_array(task.url, task.storage_options, task.store_id, path)
        chunks, shape = array.chunks, array.shape
        index: tuple[slice, ...] = tuple(slice(c * n, min((c + 1) * n, s))
                                         for c, n, s in zip(coords, chunks, shape, strict=True))
        dims = tuple(getattr(array.metadata, "dimension_names", None) or ())
        along_image = bool(dims) and dims[0] == IMAGE_DIM
        start: int | None = int(index[0].start) if along_image else None
        stop: int | None = int(index[0].stop) if along_image else None
        key = _chunk_key(array, coords)
        reason = None
        try:
            values = np.asarray(array[index])
        except Exception as err:
            reason = _reason(err)
        else:
            name = path.rsplit("/", 1)[-1]
            must_exist = (along_image and name in _ALWAYS_WRITTEN and completed is not None
                          and bool(completed[start:stop].all()))
            # a missing chunk reads as the fill value (NaN): only then is the file looked for
            if must_exist and values.dtype.kind == "f" and bool(np.isnan(values).all()) \
                    and not fs.exists(f"{root.rstrip('/')}/{path}/{key}"):
                reason = "the chunk file is missing although its images are marked complete"
        if reason is not None:
            ids = _image_ids(group, start, stop) if start is not None and stop is not None else ()
            damaged.append(DamagedChunk(path, key, _layer_of(path), start, stop, ids, reason))
    return damaged


def _arrays(group: Any) -> list[tuple[str, Any]]:
    import zarr

    return [(str(path), node) for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]


def verify_store(url: str, *, client: Any = None, storage_options: Mapping[str, Any] | None = None
                 ) -> list[DamagedChunk]:
    """Read every chunk of every array of the store at ``url`` and list the damaged ones (empty: none).

    One Dask task per batch of images (every image-chunked array's chunk of that batch: activations, means,
    predictions, completion) and one per other array; run on ``client`` (a ``distributed.Client`` or a scheduler
    address) when given, else on dask's current scheduler. A chunk is damaged when zarr cannot read or decode it (a
    crc32c mismatch in a store with checksums, a file cut short, a decompression error), or when it is the chunk file
    of a completed batch's activations or means and is missing. A store without checksums can hold a damaged chunk
    that still decodes, to wrong values: only stores with checksums are verified fully.

    Raises
    ------
    StoreError
        ``url`` is not a cnndiff store.
    """
    import dask

    url = _store.check_url(url)
    storage_options = _store.check_storage_options(storage_options)
    attrs = _store.read_attrs(url, storage_options=storage_options)
    group = _store.open_group(url, "r", storage_options=storage_options)
    try:
        completed: np.ndarray | None = np.asarray(group[COMPLETED][:], dtype=bool)
    except Exception:  # its own chunks are verified (and listed) below
        completed = None
    batch_size = int(attrs.get("batch_size") or 0)
    per_batch: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    others: list[list[tuple[str, tuple[int, ...]]]] = []
    for path, array in _arrays(group):
        dims = tuple(getattr(array.metadata, "dimension_names", None) or ())
        grid = [range(-(-int(s) // int(c))) for s, c in zip(array.shape, array.chunks, strict=True)]
        coords = list(itertools.product(*grid))
        if dims and dims[0] == IMAGE_DIM and int(array.chunks[0]) == batch_size:
            for c in coords:
                per_batch.setdefault(c[0], []).append((path, c))
        else:
            others.append([(path, c) for c in coords])
    task = _VerifyTask(url, storage_options, attrs.get(STORE_ID_ATTR))
    verify = dask.delayed(_verify_chunks, pure=True)
    tasks = [verify(task, items, completed) for _, items in sorted(per_batch.items())]
    tasks += [verify(task, items, completed) for items in others if items]
    if client is None:
        results = dask.compute(*tasks)
    else:
        from .cluster import get_client

        with get_client(client) as connected:
            results = dask.compute(*tasks, scheduler=connected.get)
    return sorted((d for part in results for d in part), key=lambda d: (d.array, d.start or 0, d.chunk))


def format_damage(url: str, damaged: Sequence[DamagedChunk]) -> str:
    """The report of :func:`verify_store` for people: every damaged chunk, and the remedy."""
    if not damaged:
        return f"verified every chunk of {url}: none is damaged"
    lines = [f"store {url}: {len(damaged)} damaged chunk(s):"]
    lines += [f"  {d.describe()}" for d in damaged]
    lines.append(REMEDY)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- repair
def _unrepairable(damaged: Iterable[DamagedChunk]) -> list[DamagedChunk]:
    """Damaged chunks that re-extracting batches does not rewrite: the image table, the dimension coordinates."""
    return [d for d in damaged if d.start is None or d.array.rsplit("/", 1)[-1] not in _REWRITTEN]


def mark_for_repair(url: str, damaged: Sequence[DamagedChunk], *,
                    storage_options: Mapping[str, Any] | None = None) -> list[int]:
    """Set to False the completion flags of every batch holding a damaged chunk (the store's own completion chunks,
    nothing else), so that a resume re-extracts exactly those batches; return the batches' first image rows.

    Call it under the store's writer lock (:func:`cnndiff_xr.extract` with ``repair=True`` does).

    Raises
    ------
    StoreError
        A damaged chunk that re-extraction does not rewrite (the image table or a dimension coordinate), before
        anything is written: the store cannot be repaired in place.
    """
    url = _store.check_url(url)
    storage_options = _store.check_storage_options(storage_options)
    bad = _unrepairable(damaged)
    if bad:
        listing = "\n".join(f"  {d.describe()}" for d in bad)
        raise _store.StoreError(
            f"store {url!r}: {len(bad)} damaged chunk(s) are not activations, means, predictions or completion "
            f"flags, which re-extracting batches rewrites; nothing was changed:\n{listing}\nExtract into a new store "
            "(or restore the store from a sound copy).")
    attrs = _store.read_attrs(url, storage_options=storage_options)
    batch_size = int(attrs["batch_size"])
    group = _store.open_group(url, "r+", storage_options=storage_options)
    n = int(group[COMPLETED].shape[0])
    starts = sorted({s for d in damaged if d.start is not None and d.stop is not None
                     for s in range(d.start // batch_size * batch_size, d.stop, batch_size)})
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):  # a whole chunk of False, as the batches write theirs
        for start in starts:
            group[COMPLETED][start:min(start + batch_size, n)] = False
    return starts

