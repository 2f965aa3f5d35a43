"""Extraction: Dask tasks that decode a batch of images, run the model and write whole chunks of every layer.

Order of work (``docs/architecture.md`` draws it):

1. check every argument once (:class:`~cnndiff_xr.extraction.config.ExtractionConfig`) and build the image table;
2. build the model on the client (:mod:`cnndiff_xr.extraction.backends`) to learn its layers and their shapes; print
   the exact uncompressed size;
3. check every image (decoded in the workers) -- ``on_error="raise"`` stops here, before anything is written;
4. create the store layout (metadata and coordinates), or check that an existing store was made with the same
   settings and images;
5. submit one task per batch that is not yet complete; each task writes its batch's chunk of every layer, then its
   predictions, then -- last -- its completion record, so an interrupted run leaves no chunk marked complete that is
   not written;
6. copy the predictions into every layer group (xarray inherits only indexed coordinates).

Steps 2-6 run under the store's writer lock (:class:`cnndiff_xr.extraction.lock.StoreLock`): a second run on the
same store is refused while the first is alive, and the lock of a dead run is removed (see the lock module for the
rules).

Faults, and why the store stays right:

- **A worker dies** (SIGKILL, out of memory): Dask reruns its tasks on another worker. A task that died mid-batch
  wrote no completion record; its rerun rewrites the batch's chunks whole. A worker that dies while the model is
  being set up (the plugin's registration, before any batch) makes the scheduler's broadcast fail; the registration
  is tried again (``PLUGIN_ATTEMPTS``), on the workers that remain.
- **The scheduler dies** (or the connection to it): the run stops with one :class:`SchedulerLostError` saying how
  much is saved; the lock is released as for any error, and a rerun against a new scheduler resumes. The old
  scheduler's workers may finish the batch they were running: orphans, as below.
- **The client dies** (SIGKILL, lost session): the scheduler drops the client's tasks, but tasks already *executing*
  on workers cannot be interrupted and finish as orphans, writing their batch. Rerunning the same command takes the
  dead client's lock (its process is gone), reads the completion record and submits only the batches not yet
  complete. An orphan may still be writing one of those: then two writers write the same batch. That is safe:
  (a) a batch's bytes depend only on its images, the model and the settings, all fixed by the store's provenance, so
  both write identical chunks; (b) every chunk write replaces a whole object atomically (Zarr's local store writes a
  temporary file and renames it; an S3 PUT is atomic), so a reader sees the old or the new chunk, never a mix; (c) the
  completion record is written after the data by each writer, so "complete" always means "all chunks written". Task
  keys are deterministic per (store, batch), so a rerun's task often simply takes over the orphan's running task.
- **A float16 store's values overflow** (finite in the model, 65520 or more in magnitude): the batch task finds it
  before writing anything of its batch (:class:`Float16OverflowError`, naming the layer and the images), and the run
  stops there; the batches already written stay complete, the overflowing one is not marked complete.
- **The disk fills** (ENOSPC, or EDQUOT for a quota): the write that fails raises in the batch task before its
  completion flags (the block's last write), as :class:`DiskFullError`; the client stops the run at the first one
  (the rest released) and says the free space now and the bytes still needed. A chunk cut short leaves nothing
  behind: Zarr's local store writes a temporary file and renames it, and deletes the temporary file when the write
  fails, so the batch's other chunks (written together with it) are whole and the batch is merely incomplete; a
  rerun after freeing space writes it again. The lock's heartbeat, which rewrites ``<store>.lock`` next to the store,
  fails too: it warns and leaves the lock as it was (no temporary file), and the lock is released as for any error.
  Before starting, a local store whose disk is clearly too small is refused (:class:`NotEnoughSpaceError`,
  ``force=True`` overrides).
- **The store is replaced while orphans run** (deleted and recreated at the same URL): each store gets a random
  ``store_id`` at creation; a task checks it just before writing data and again before writing completion, and drops
  its results if it changed, so an orphan never writes into, or marks complete, a different store.
- **A chunk is damaged after it was written** (a flipped byte, a file cut short, a file lost): new stores carry a
  crc32c per chunk, so reading it fails naming the chunk (never wrong numbers); ``repair=True`` verifies every chunk
  on the cluster, marks the batches holding damaged ones incomplete, and the resume rewrites them whole
  (:mod:`cnndiff_xr.extraction.checksums`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import xarray as xr
from distributed import Client

from ..options import Compression, Dtype, LayerPreset, OnError, ResizePolicy
from ..sampling import UnitDraws
from ..schema import (
    COMPLETED,
    FILTER_MEAN,
    IMAGE_DIM,
    LAYER_CSS,
    LAYER_MEAN,
    LAYERS_ATTR,
    PREDICTED_CLASS,
    PREDICTED_LABEL,
    PREDICTED_PROBABILITY,
    PREDICTION_COORDS,
    SET_COORD,
    SKIPPED_ATTR,
    SOURCE_COORD,
    STORE_ID_ATTR,
    activation_path,
    means_path,
)
from ..validation import check_bool
from . import images
from . import store as _store
from .cluster import ModelPlugin, WeightsMismatchError, get_client, refuse_in_starting_child, worker_model
from .config import ExtractionConfig, identity
from .diskspace import activation_bytes, disk_full_cause, free_bytes, local_folder, preflight_need
from .lock import StoreLock
from .reduction import Reduction

__all__ = ["BatchTask", "DiskFullError", "ExtractionError", "ExtractionReport", "Float16OverflowError",
           "NotEnoughSpaceError", "SchedulerLostError", "extract", "size_report"]


class ExtractionError(RuntimeError):
    """Some batches failed; the others are written and a rerun finishes only what is missing."""


class SchedulerLostError(ExtractionError):
    """The connection to the scheduler was lost during the run (the scheduler died or the network went away).

    The batches whose completion is recorded are whole and stay; a rerun of the same extraction against a running
    scheduler (a new one will do) computes only the missing ones."""


#: float16's largest finite value
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
#: The smallest magnitude that float32 -> float16 rounds to inf: halfway between 65504 and 2**16, where round-half-
#: to-even goes up (65504's last mantissa bit is odd)
FLOAT16_OVERFLOW = 65520.0
#: How many images an overflow message names before "and N more"
_NAMED_IMAGES = 5


class Float16OverflowError(ExtractionError):
    """A layer's values are finite in the model but beyond float16's range (magnitude 65520 or more), so a float16
    store would hold them as inf.

    Raised by the batch task before it writes anything of its batch (so the batch is not marked complete), and
    raised again by :func:`extract`, which stops the run at the first one. Values the model itself made inf or NaN
    are not overflow: they are stored as they are, as a float32 store would.

    Attributes
    ----------
    store
        The store being extracted.
    layer
        The first layer, in network order, that overflowed in the batch; ``other_layers`` the later ones.
    images
        The overflowing images of that layer, named as the image table names them (id and source).
    largest
        The largest magnitude of the overflowing values (float32, as the model computed it).
    """

    def __init__(self, store: str, layer: str, images: Sequence[str], largest: float,
                 other_layers: Sequence[str] = ()) -> None:
        self.store, self.layer, self.largest = store, layer, float(largest)
        self.images, self.other_layers = list(images), list(other_layers)
        named = ", ".join(self.images[:_NAMED_IMAGES])
        if len(self.images) > _NAMED_IMAGES:
            named += f" and {len(self.images) - _NAMED_IMAGES} more"
        also = f" (and in layer(s) {', '.join(map(repr, self.other_layers))})" if self.other_layers else ""
        super().__init__(
            f"layer {layer!r} has values beyond float16's range in {len(self.images)} image(s){also}: {named}. Their "
            f"largest magnitude is {self.largest:.4g}, above float16's largest value {FLOAT16_MAX:g}: a float16 store "
            f"would hold them as inf. The run stopped before writing that batch; the batches already written stay in "
            f"{store!r}. Extract into a new store (another path: the dtype is part of a store's identity, so this one "
            f"takes only float16) with dtype='float32' (--dtype float32).")

    def __reduce__(self) -> tuple[Any, ...]:  # travels from a worker to the client by pickle: keep the fields
        return type(self), (self.store, self.layer, self.images, self.largest, self.other_layers)


def _or_unknown(n: int | None, why: str) -> str:
    return _store.format_bytes(n) if n is not None else f"unknown ({why})"


class DiskFullError(ExtractionError):
    """The store's disk (or the user's quota) filled up during the run: a write failed with ENOSPC or EDQUOT.

    The batch task raises it without writing its completion flags (a batch cut short stays incomplete and a rerun
    writes it again whole); :func:`extract` stops the run at the first one and raises it again with the free space
    now and the bytes still needed. The batches recorded complete stay; free space and rerun the same extraction:
    it resumes.

    Attributes
    ----------
    store
        The store being extracted.
    detail
        What failed (the write and the operating system's message).
    free
        Free bytes now on the store's filesystem (None: unknown, e.g. an fsspec URL).
    needed
        Estimated bytes the images not yet complete still need (None: not estimated, e.g. in the worker).
    remaining
        How many images are not complete.
    basis
        How ``needed`` was estimated.
    """

    def __init__(self, store: str, detail: str, free: int | None = None, needed: int | None = None,
                 remaining: int | None = None, basis: str = "") -> None:
        self.store, self.detail, self.free, self.needed = store, detail, free, needed
        self.remaining, self.basis = remaining, basis
        need = "" if remaining is None else (
            f"; still needed: about {_or_unknown(needed, 'nothing to estimate it from')} for the {remaining} images "
            f"not yet complete ({basis})")
        super().__init__(
            f"the disk holding store {store!r} is full: {detail}. Free space now: "
            f"{_or_unknown(free, 'not a local store')}{need}. The run stopped; the batches recorded complete are "
            f"whole and stay (a batch cut short is not recorded complete). Free at least that much space (or quota) "
            f"and rerun the same extraction: it computes only the missing batches.")

    def __reduce__(self) -> tuple[Any, ...]:  # travels from a worker to the client by pickle: keep the fields
        return type(self), (self.store, self.detail, self.free, self.needed, self.remaining, self.basis)


class NotEnoughSpaceError(DiskFullError):
    """Refused before anything is written: the store's filesystem has clearly less free space than the images still
    to extract need, even compressed :data:`~cnndiff_xr.extraction.diskspace.PREFLIGHT_RATIO` times (see there for
    why). ``force=True`` (``cnndiff extract --force``) starts anyway."""

    def __init__(self, store: str, free: int, needed: int, uncompressed: int, remaining: int, folder: str) -> None:
        self.store, self.free, self.needed, self.remaining = store, free, needed, remaining
        self.uncompressed, self.folder = uncompressed, folder
        self.detail, self.basis = "refused before writing", ""
        fmt = _store.format_bytes
        ExtractionError.__init__(
            self, f"not enough free space for store {store!r}: only {fmt(free)} is free on {folder!r}, and its "
            f"{remaining} images still to extract are {fmt(uncompressed)} uncompressed, so even compressed well they "
            f"need at least {fmt(needed)}. Nothing was written. Free space or choose a store on a larger disk; "
            f"force=True (cnndiff extract --force) starts anyway (a run that fills the disk stops with "
            f"DiskFullError and resumes once space is freed).")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.store, self.free, self.needed, self.uncompressed, self.remaining, self.folder)


@contextlib.contextmanager
def _disk_full_reported(store: str, start: int, stop: int) -> Iterator[None]:
    """In the batch task: a write that fails for a full disk becomes :class:`DiskFullError` (other errors pass)."""
    try:
        yield
    except Exception as err:
        cause = disk_full_cause(err)
        if cause is None:
            raise
        raise DiskFullError(store, f"writing images {start}..{stop - 1} failed: {cause}") from err


@dataclasses.dataclass
class ExtractionReport:
    """What a run did: counts, the time to load the model on the workers (for a new store, partly while its layout
    was written), and throughput (images per second over the batches: decode, forward pass, compression and
    writes)."""

    store: str
    n_images: int
    n_batches: int
    batches_already_complete: int
    batches_computed: int
    images_computed: int
    seconds: float
    skipped: list[dict[str, str]]
    model_load_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images_computed / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------- worker-side tasks
@dataclasses.dataclass(frozen=True)
class BatchTask:
    """What every batch task of one run shares; each task gets this, its first image's index and its references.

    Attributes
    ----------
    store, storage_options
        The store the batch is written to.
    store_id
        The store's random id: a task writes only while the store at ``store`` still has it.
    plugin
        The name of the worker plugin that holds the built model (:func:`cnndiff_xr.extraction.cluster.plugin_name`).
    resize, dtype
        How images are resized to the model's input, and the dtype the activations are stored in.
    with_predictions
        Whether the model has an ImageNet head, whose top class and probability are recorded per image.
    """

    store: str
    storage_options: Mapping[str, Any] | None
    store_id: str | None
    plugin: str
    resize: ResizePolicy
    dtype: Dtype
    with_predictions: bool


class _WritableStore:
    """One store's root group opened for writing, and its arrays opened as the batches first write them.

    Kept by each worker for the batches of a run (:func:`_writable_store`): opening an array reads its metadata, and
    a batch of a reduced store with filter means writes ~80 arrays (~45 ms of opening per batch for VGG16)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._arrays: dict[str, Any] = {}

    def array(self, path: str) -> Any:
        if path not in self._arrays:
            # a chunk is a batch of whole images and never all fill value: skip Zarr's check for it (a full scan that
            # cost more than writing the uncompressed bytes; benchmarks/RESULTS.md)
            self._arrays[path] = self.group[path].with_config({"write_empty_chunks": True})
        return self._arrays[path]

    def write(self, rows: slice, values: Mapping[str, np.ndarray]) -> None:
        """Write ``values`` (array path -> whole chunks of ``rows``) together: Zarr's event loop encodes and stores
        them concurrently, where one array after another waits for each write's round trips through its thread pool
        (~2 ms per array here: ~180 against ~95 ms for the ~80 arrays of a batch; more against object storage).
        Every write has ended, written or failed, when this returns; the first failure is raised."""
        from zarr.core.sync import sync

        arrays = [(self.array(path), v) for path, v in values.items()]

        async def write_all() -> None:
            outcomes = await asyncio.gather(*(a.async_array.setitem(rows, v) for a, v in arrays),
                                            return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome

        sync(write_all())


_STORE_CACHE: dict[str, _WritableStore] = {}


def _writable_store(url: str, storage_options: Mapping[str, Any] | None, store_id: str | None) -> _WritableStore:
    # Keyed by store_id too: a store deleted and recreated at the same URL has other array shapes, and a cached group
    # would keep the old ones (an append gives the store a new store_id, so grown arrays are opened afresh).
    key = json.dumps([url, dict(storage_options or {}), store_id], sort_keys=True, default=str)
    if key not in _STORE_CACHE:
        if len(_STORE_CACHE) > 16:  # a long-lived worker serving many stores
            _STORE_CACHE.clear()
        _STORE_CACHE[key] = _WritableStore(_store.open_group(url, "r+", storage_options=storage_options))
    return _STORE_CACHE[key]


def _check_same_store(url: str, storage_options: Mapping[str, Any] | None, store_id: str | None) -> None:
    """Raise if the store at ``url`` is no longer the one this task was submitted for (read fresh, not cached)."""
    current = _store.read_store_id(url, storage_options=storage_options)
    if current != store_id:
        raise _store.StoreError(f"the store at {url!r} was replaced while this task ran (store_id {current!r}, the "
                                f"task belongs to {store_id!r}); its results are dropped")


def _check_images(refs: Sequence[images.ImageRef]) -> list[tuple[str | None, str | None]]:
    """``(reason, digest)`` per image (:func:`~cnndiff_xr.extraction.images.screen_image`): the workers decode every
    image anyway, so they hash its content too, and the client never reads the files."""
    return [images.screen_image(ref) for ref in refs]


def _exponent_all_ones(values: np.ndarray, block: int = 1 << 16) -> bool:
    """Whether any value of a float16 array is inf or NaN (its exponent bits all ones), cheaply.

    On the uint16 bit patterns, block by block: each block's ``& 0x7C00`` stays in cache and its maximum is 0x7C00
    only where the exponent is all ones; whole-array temporaries cost 4-7x more. Measured on an 8 x 224 x 224 x 64
    layer (VGG16's block1, 51 MB in float16): ~6 ms of CPU, against ~33 ms for TensorFlow's float32 -> float16 cast
    of it and ~165 ms for numpy's ``astype``; under 1 % of the batch's forward pass.
    """
    flat = np.ascontiguousarray(values).reshape(-1).view(np.uint16)
    buffer = np.empty(min(block, flat.size), dtype=np.uint16)
    for i in range(0, flat.size, block):
        part = flat[i:i + block]
        exponent = np.bitwise_and(part, 0x7C00, out=buffer[:part.size])
        if exponent.max() == 0x7C00:
            return True
    return False


def _float16_overflow(task: BatchTask, activations: Mapping[str, np.ndarray], rgb: np.ndarray,
                      labels: Sequence[str]) -> Float16OverflowError | None:
    """The overflow of a float16 batch, or None: values that the model computed finite and the cast made inf.

    Cheap when nothing is inf (the usual case): one pass over the bit patterns. Only when a layer holds an inf does
    it run the batch again through a float32 copy of the model, to tell overflow from an inf the model itself made
    (the model's float32 output is cast inside its call, so it is gone) and to find the largest magnitude.
    """
    # layers holding an inf (a NaN alone is never overflow: it was NaN in the model already)
    infinite = [name for name, values in activations.items()
                if values.dtype == np.float16 and values.size and _exponent_all_ones(values)
                and bool(((np.ascontiguousarray(values).view(np.uint16) & 0x7FFF) == 0x7C00).any())]
    if not infinite:
        return None
    # only the layers holding an inf: a smaller graph to build and trace
    exact = worker_model(task.plugin, "float32", layers=infinite).run(rgb).activations
    found: list[tuple[str, list[int], float]] = []
    for name in infinite:
        values = exact[name]
        over = np.isfinite(values) & (np.abs(values) >= FLOAT16_OVERFLOW)
        if over.any():
            per_image = over.reshape(len(values), -1).any(axis=1)
            found.append((name, [int(i) for i in np.flatnonzero(per_image)], float(np.abs(values[over]).max())))
    if not found:  # every inf was the model's own
        return None
    layer, rows, largest = found[0]
    return Float16OverflowError(task.store, layer, [labels[i] for i in rows], largest,
                                other_layers=[name for name, _, _ in found[1:]])


def _extract_batch(task: BatchTask, start: int, refs: Sequence[images.ImageRef],
                   labels: Sequence[str] | None = None) -> int:
    """Decode, run and write one batch (a whole chunk of every layer); return the number of images.

    ``labels`` name the batch's images in messages (id and source, as the image table names them)."""
    model = worker_model(task.plugin)
    rgb = images.load_batch(refs, model.input_size, task.resize)
    output = model.run(rgb)
    activations, probabilities = output.activations, output.probabilities
    if task.dtype == "float16":  # before anything of the batch is written: an overflowing batch stays incomplete
        overflow = _float16_overflow(task, activations, rgb,
                                     labels if labels is not None else [ref.describe() for ref in refs])
        if overflow is not None:
            raise overflow
    _check_same_store(task.store, task.storage_options, task.store_id)
    store = _writable_store(task.store, task.storage_options, task.store_id)
    rows = slice(start, start + len(refs))
    values = {activation_path(name): v.astype(task.dtype, copy=False) for name, v in activations.items()}
    for name, means in output.means.items():
        values[means_path(name, FILTER_MEAN)] = means.filter_mean
        values[means_path(name, LAYER_MEAN)] = means.layer_mean
        values[means_path(name, LAYER_CSS)] = means.layer_css
    if task.with_predictions and probabilities is not None:
        values[PREDICTED_CLASS] = probabilities.argmax(axis=1).astype("int32")
        values[PREDICTED_PROBABILITY] = probabilities.max(axis=1).astype("float32")
    # a full disk: DiskFullError, before the completion flags (the last write of the block) are written
    with _disk_full_reported(task.store, rows.start, rows.stop):
        store.write(rows, values)  # whole chunks of every array: each chunk write is atomic
        _check_same_store(task.store, task.storage_options, task.store_id)
        store.array(COMPLETED)[rows] = True  # last: the completion record follows the data
    return len(refs)


# --------------------------------------------------------------------------------------------- client side
logger = logging.getLogger(__name__)

#: How often the model plugin's registration is tried when workers die during their model setup
PLUGIN_ATTEMPTS = 3


#: Seconds to wait for the client to notice that its scheduler is gone after a call to it failed on a closed comm
SCHEDULER_LOSS_GRACE_S = 10.0


def _scheduler_lost(client: Client, error: BaseException) -> bool:
    """Whether ``error`` means the client lost its scheduler (rather than a task or a worker failing)."""
    from distributed.client import FutureCancelledError
    from distributed.comm import CommClosedError

    if isinstance(error, FutureCancelledError):
        return "scheduler-connection-lost" in error.reason
    if not isinstance(error, CommClosedError | OSError | TimeoutError):
        return False
    # A call to the scheduler (a gather, the plugin's registration) can fail on the closed comm before the client has
    # noticed the loss on its own stream: give it a moment to change its status ("connecting", then "closed"). Only
    # for a closed comm: other OSErrors (the store's) are not delayed
    deadline = time.monotonic() + (SCHEDULER_LOSS_GRACE_S if isinstance(error, CommClosedError) else 0.0)
    while client.status == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    return client.status != "running"


@contextlib.contextmanager
def _scheduler_loss_reported(client: Client, url: str, storage_options: Mapping[str, Any] | None) -> Iterator[None]:
    """Turn whatever distributed raises when the scheduler goes away mid-run into one :class:`SchedulerLostError`
    that says what is saved and that a rerun resumes."""
    try:
        yield
    except Exception as err:
        if not _scheduler_lost(client, err):
            raise
        try:
            saved = f"{int(_store.completed(url, storage_options=storage_options).sum())} images are saved"
        except Exception:  # the store may not exist yet: the scheduler died before it was made
            saved = "nothing was saved"
        address = getattr(client.scheduler, "address", None) or "the scheduler"
        raise SchedulerLostError(
            f"lost the connection to the scheduler ({address}) while extracting into {url!r}: {saved} (whole "
            f"batches, their completion recorded). Start a scheduler (and workers) and rerun the same extraction: it "
            f"computes only the missing batches.") from err


def _register_plugin(client: Client, plugin: ModelPlugin) -> None:
    """Register the model plugin with the scheduler, which sets it up (builds the model) on every worker.

    A worker that dies during its setup makes the scheduler's broadcast fail ("Stream is closed"), although the
    scheduler has kept the plugin (for the workers still alive and for any that join later): register again, which
    sets it up anew on the workers that remain. A lost scheduler is not retried (the caller reports it)."""
    from distributed.comm import CommClosedError

    for attempt in range(1, PLUGIN_ATTEMPTS + 1):
        try:
            client.register_plugin(plugin)
            return
        except (CommClosedError, OSError) as err:
            if attempt == PLUGIN_ATTEMPTS or _scheduler_lost(client, err):
                raise
            logger.warning("a worker was lost while the model was set up (%s); registering it again", err)


class _Registration:
    """:func:`_register_plugin` in a background thread, started while the client writes a new store's layout: the
    workers build the model (VGG16: ~10 s on two cores) while the layout of dozens of arrays is written (~3 s), and
    neither needs the other. :meth:`wait` re-raises what the registration raised. A daemon thread: an interrupted
    run never waits for it at exit."""

    def __init__(self, client: Client, plugin: ModelPlugin) -> None:
        self._error: BaseException | None = None
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._register, args=(client, plugin), daemon=True,
                                        name="cnndiff-register-model")
        self._thread.start()

    def _register(self, client: Client, plugin: ModelPlugin) -> None:
        try:
            _register_plugin(client, plugin)
        except BaseException as err:  # re-raised by wait(), in the caller's thread
            self._error = err

    def wait(self) -> None:
        """Until the model is set up on every worker; raises what the registration raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error


def _disk_full_now(task: BatchTask, error: DiskFullError, n_images: int, image_nbytes: int) -> DiskFullError:
    """The client's :class:`DiskFullError`: the worker's, with the free space now and the bytes still needed (the
    images not complete x the average compressed bytes per complete image, or their uncompressed size when none is
    complete; the activations only: the other arrays are a few bytes per image)."""
    url, options = task.store, task.storage_options
    try:
        done = int(_store.completed(url, storage_options=options).sum())
        layers = list(_store.read_attrs(url, storage_options=options).get(LAYERS_ATTR) or [])
    except Exception:  # an unreadable store must not hide the full disk
        done, layers = 0, []
    remaining = n_images - done
    stored = activation_bytes(url, layers, options) if done and layers else None
    if stored is not None and done:
        per_image = stored / done
        basis = (f"{_store.format_bytes(per_image)} per image, the average compressed size of the {done} complete "
                 f"images")
    else:
        per_image = float(image_nbytes)
        basis = "their uncompressed size: no image is complete to measure the compression"
    needed = int(remaining * per_image) if per_image else None
    return DiskFullError(url, error.detail, free_bytes(url, options), needed, remaining, basis)


def _remove_half_made_layout(url: str, options: Mapping[str, Any] | None) -> None:
    """Remove a layout that this run began and a full disk cut short: its root attributes are written first, so it
    would pass a rerun's checks as a store and then fail every batch (arrays missing from its metadata). Only this
    run's own writes: the store did not exist before (``create_store`` refuses an existing one, under the lock)."""
    fs, path = _store._filesystem(url, options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _refuse_when_disk_too_small(url: str, options: Mapping[str, Any] | None, *, remaining: int, image_nbytes: int,
                                compression: str, force: bool, say: Callable[[str], None]) -> None:
    """The space preflight (a local store only): :class:`NotEnoughSpaceError` when the free space is below
    :func:`~cnndiff_xr.extraction.diskspace.preflight_need` of the ``remaining`` images' uncompressed bytes, unless
    ``force`` (then a note)."""
    free, folder = free_bytes(url, options), local_folder(url, options)
    uncompressed = remaining * image_nbytes
    needed = preflight_need(uncompressed, compression)
    if free is None or folder is None or free >= needed:
        return
    if force:
        say(f"only {_store.format_bytes(free)} free for {_store.format_bytes(uncompressed)} uncompressed: going on "
            f"(force=True); the run stops with DiskFullError if the disk fills")
        return
    raise NotEnoughSpaceError(url, free, needed, uncompressed, remaining, os.path.dirname(folder))


def size_report(shapes: Mapping[str, Sequence[int]], n_images: int, dtype: Dtype,
                reduction: Reduction | None = None) -> str:
    """The size preflight: exact uncompressed bytes per layer and in total (of what is kept: a reduced store's layers
    hold only their kept units, shown next to the full size; stored filter means included)."""
    reduction = reduction if reduction is not None else Reduction()
    full = _store.uncompressed_nbytes(shapes, n_images, dtype)
    kept = _store.kept_nbytes(shapes, n_images, dtype, reduction)
    width = max(map(len, full)) if full else 5
    reduced = reduction.units is not None
    what = "" if not reduced else f", keeping the units of draws {reduction.units.describe()}"  # type: ignore[union-attr]
    if reduction.filter_means:
        what += ", with filter means"
    lines = [f"store size before compression, {n_images} images, {dtype}{what}:"]
    for name, b in full.items():
        line = f"  {name:<{width}}  {str(tuple(shapes[name])):<18} {_store.format_bytes(kept[name]):>10}"
        if reduced:
            whole = reduction.kept(name, shapes[name]) is None
            line += " (whole)" if whole else f" (every unit: {_store.format_bytes(b)})"
        lines.append(line)
    total = f"  {'total':<{width}}  {'':<18} {_store.format_bytes(sum(kept.values())):>10}"
    if reduced:
        total += f" (every unit: {_store.format_bytes(sum(full.values()))})"
    lines.append(total)
    return "\n".join(lines)


def _drop(table: images.ImageTable, bad: set[int]) -> images.ImageTable:
    keep = [i for i in range(len(table)) if i not in bad]
    digests = None if table.digests is None else [table.digests[i] for i in keep]
    return images.ImageTable(ids=[table.ids[i] for i in keep], sets=[table.sets[i] for i in keep],
                             sources=[table.sources[i] for i in keep], refs=[table.refs[i] for i in keep],
                             digests=digests)


def _screen_images(client: Client, table: images.ImageTable, on_error: OnError,
                   chunk: int = 64) -> tuple[images.ImageTable, list[dict[str, str]]]:
    """Decode and hash every image in the workers; raise naming every bad file and every path that named no image, or
    drop them (``on_error="skip"``) and return the records of what was skipped (set, image id, source, reason). The
    table returned carries every kept image's content digest."""
    futures = [client.submit(_check_images, table.refs[i:i + chunk], pure=False)
               for i in range(0, len(table), chunk)]
    screened = [r for batch in client.gather(futures) for r in batch]
    bad = {i: reason for i, (reason, _) in enumerate(screened) if reason is not None}
    table = dataclasses.replace(table, digests=[digest or "" for _, digest in screened])
    # one record per skipped image or path, by the store's image coordinates (no image id for a path that named none)
    skipped = [{SET_COORD: p["set"], IMAGE_DIM: "", SOURCE_COORD: p["source"], "reason": p["reason"]}
               for p in table.problems]
    skipped += [{SET_COORD: table.sets[i], IMAGE_DIM: table.ids[i], SOURCE_COORD: table.sources[i], "reason": r}
                for i, r in bad.items()]
    if not skipped:
        return table, []
    if on_error == "raise":
        listing = "\n".join(f"  {s[SOURCE_COORD]}: {s['reason']}" for s in skipped)
        raise images.ImageError(f"{len(skipped)} image(s) or path(s) cannot be read; nothing was written "
                                f"(pass on_error='skip' (--on-error skip) to extract the rest):\n{listing}")
    remaining = _drop(table, set(bad))
    if len(remaining) == 0:
        raise images.ImageError("every image was skipped as unreadable (or named nothing); nothing to extract:\n"
                                + "\n".join(f"  {s[SOURCE_COORD]}: {s['reason']}" for s in skipped))
    return remaining, skipped


def _refuse_sets_naming_nothing(table: images.ImageTable) -> None:
    """Raise, before anything is started or written, for every set whose paths and globs all named no image.

    Whatever ``on_error``: "skip" leaves out unreadable images and paths within a set, but a set that names nothing
    at all is a mistake in the call (a mistyped glob, a folder not yet copied), not a bad image, and a store without
    that set would quietly change every analysis of it.
    """
    found = set(table.sets)
    empty = [p for p in table.problems if p["set"] not in found]
    if empty:
        listing = "\n".join(f"  set {p['set']!r}: {p['source']}: {p['reason']}" for p in empty)
        names = list(dict.fromkeys(p["set"] for p in empty))
        raise images.ImageError(
            f"{len(names)} image set(s) name no image at all; nothing was written. Fix the path or glob, or leave "
            f"the set out (on_error='skip' (--on-error skip) leaves out unreadable images, not whole sets):\n"
            f"{listing}")


def _finalise_predictions(url: str, layers: Sequence[str], labels: Sequence[str] | None,
                          storage_options: Mapping[str, Any] | None) -> None:
    """Labels from the class ids, and the predictions copied into every layer group (small arrays, one writer)."""
    group = _store.open_group(url, "r+", storage_options=storage_options)
    classes = np.asarray(group[PREDICTED_CLASS][:])
    if labels is not None:
        group[PREDICTED_LABEL][:] = np.asarray([labels[c] if c >= 0 else "" for c in classes], dtype=object)
    values = {name: group[name][:] for name in PREDICTION_COORDS}
    for layer in layers:
        for name, value in values.items():
            group[f"{layer}/{name}"][:] = value


@overload
def extract(
    sets: Mapping[str, Any],
    store: str,
    *,
    model: Any = "vgg16",
    weights: str | os.PathLike[str] | None = "imagenet",
    layers: LayerPreset | Sequence[str] | None = None,
    dtype: Dtype = "float32",
    client: Client | str | None = None,
    batch_size: int = 8,
    resize: ResizePolicy = "nearest",
    seed: int = 0,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    on_error: OnError = "raise",
    compression: Compression = "lz4",
    compression_level: int = 1,
    n_workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    progress: bool = True,
    return_report: Literal[False] = False,
    break_lock: bool = False,
    units: UnitDraws | Literal["all"] = "all",
    filter_means: bool = False,
    force: bool = False,
    repair: bool = False,
) -> xr.DataTree: ...


@overload
def extract(
    sets: Mapping[str, Any],
    store: str,
    *,
    model: Any = "vgg16",
    weights: str | os.PathLike[str] | None = "imagenet",
    layers: LayerPreset | Sequence[str] | None = None,
    dtype: Dtype = "float32",
    client: Client | str | None = None,
    batch_size: int = 8,
    resize: ResizePolicy = "nearest",
    seed: int = 0,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    on_error: OnError = "raise",
    compression: Compression = "lz4",
    compression_level: int = 1,
    n_workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    progress: bool = True,
    return_report: Literal[True],
    break_lock: bool = False,
    units: UnitDraws | Literal["all"] = "all",
    filter_means: bool = False,
    force: bool = False,
    repair: bool = False,
) -> tuple[xr.DataTree, ExtractionReport]: ...


def extract(
    sets: Mapping[str, Any],
    store: str,
    *,
    model: Any = "vgg16",
    weights: str | os.PathLike[str] | None = "imagenet",
    layers: LayerPreset | Sequence[str] | None = None,
    dtype: Dtype = "float32",
    client: Client | str | None = None,
    batch_size: int = 8,
    resize: ResizePolicy = "nearest",
    seed: int = 0,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    on_error: OnError = "raise",
    compression: Compression = "lz4",
    compression_level: int = 1,
    n_workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    progress: bool = True,
    return_report: bool = False,
    break_lock: bool = False,
    units: UnitDraws | Literal["all"] = "all",
    filter_means: bool = False,
    force: bool = False,
    repair: bool = False,
) -> xr.DataTree | tuple[xr.DataTree, ExtractionReport]:
    """Run a CNN over image sets and write every chosen layer's activations to a Zarr store, on Dask.

    Parameters
    ----------
    sets
        Set name -> image source: a glob, folder, file or list of paths, a numpy array (N, H, W[, C]), a list of
        image references (any objects with ``read()`` and ``describe()``, see
        :class:`cnndiff_xr.extraction.images.ImageRef`), or an :class:`cnndiff_xr.extraction.images.ImageSource`
        (e.g. ``images.white_noise(43)``, ``images.movie_frames(...)``).
    store
        Path or fsspec URL of the store. If a store made with the same settings and images exists there, only its
        missing batches are computed (resume); if its images are the first of ``sets`` (the same sets, then new ones),
        the new sets are appended to it. Every image's content is fingerprinted (sha256): a rerun whose images changed
        under the same names is refused, naming them.
    model, weights, seed, preprocess
        A model name (a keras.applications name such as ``"vgg16"``) with ``weights`` "imagenet", None (random,
        seeded by ``seed``) or a weights file; or a model object of a backend's framework (a ``keras.Model``) with
        ``preprocess``, a function from a float32 batch of RGB pixels in 0..255 to the model's input. The model
        object is the user's own: it runs on every worker as it runs here, ``Lambda`` layers and custom layer classes
        included (a class in an importable module must be importable on the workers too; one defined in the main
        script travels by value). A saved Keras model file (``model="my_model.keras"``, with ``preprocess``) is
        loaded in Keras' safe mode: a file holding Python code (a ``Lambda`` layer) is refused.
    layers
        None (every layer except pure reshapes), ``"seed"`` (the seed notebook's 21 VGG16 layers) or a list of names.
    dtype
        "float32" (default) or "float16" (half the disk, the analysis accumulates in float64). A float16 run stops
        with :class:`Float16OverflowError` at the first batch with values beyond float16's range (65504).
    client
        None (an embedded LocalCluster, one single-threaded worker process per core), a scheduler address, or a
        ``distributed.Client``.
    batch_size
        Images per task; also the chunk length along ``image`` of every array (kept from the store on resume).
    resize
        "nearest" (the seed: stretch to the model's input size, nearest neighbour), "bilinear" or "center_crop".
    on_error
        "raise": stop before writing anything, naming every unreadable image and every path or glob that names no
        image; "skip": leave them out and record each one (set, image id, source and reason) in the store's
        ``skipped_images`` attribute. Either way, a set whose paths and globs name no image at all is refused before
        anything starts: a missing set is a mistake in the call, not a bad image.
    compression, compression_level
        Activation codec and its level: "lz4" (default: blosc/lz4 with bit shuffle, level 0..9), "zstd" (level
        0..22), "blosc" (blosc/zstd with bit shuffle, 0..9), "none". Chosen by measurement (benchmarks/RESULTS.md):
        lz4 keeps extraction closest to the bare forward pass; zstd makes ~1.5x smaller stores at ~15 % lower
        extraction throughput on 2 cores.
    n_workers
        Worker processes of the embedded LocalCluster (only with ``client=None``).
    storage_options
        fsspec options of the store's filesystem (e.g. for S3; credentials are best left to the environment).
    attrs
        More root attributes recorded in a new store (JSON values; a note such as a warning), next to the
        provenance. They are not part of the settings a resumed run must share, and a resumed run leaves them as
        they are.
    progress
        Print the size preflight and a progress bar to stderr.
    return_report
        Also return an :class:`ExtractionReport`.
    units
        ``"all"`` (default): every unit of every layer (the full store, ~27 MiB per VGG16 image in float16). Or a
        :class:`cnndiff_xr.UnitDraws` registering the draws the analysis will use (``UnitDraws(n_units=[200, 10000],
        resamples=10, seed=0)``): a *reduced* store that keeps, per layer, only the union of those draws' units
        (layers no larger than the biggest ``n_units`` whole), some 7x smaller for 10 resamples and 50x for one.
        :func:`cnndiff_xr.differentiation`, :func:`cnndiff_xr.rdm` and :func:`cnndiff_xr.select_units` with any of
        the registered draws give the same numbers, bit for bit, as on a full store of the same images; other draws
        (and ``unit_type="top"``, which needs every unit) are refused. The draws are part of the store's identity.
    filter_means
        Also store, per layer, every filter's mean over ``(y, x)`` and each image's mean and centred sum of squares
        over the layer (a ``filter_means`` subgroup), computed in the model call from its float32 output, so that
        :func:`cnndiff_xr.filter_means` (raw and z-scored) works on a reduced store. Part of the identity.
    break_lock
        Remove the store's writer lock even if its holder may be alive. Only for a holder known to be dead on
        another host: a dead holder on this host, or one silent for ``lock.LOCK_STALE_S`` seconds, is removed
        anyway. See :class:`cnndiff_xr.extraction.lock.StoreLock`.
    force
        Start even when the space preflight finds the store's disk clearly too small (a local store with less free
        space than the images still to extract need compressed
        :data:`~cnndiff_xr.extraction.diskspace.PREFLIGHT_RATIO` times; without compression, uncompressed). A run
        that then fills the disk stops with :class:`DiskFullError` and resumes once space is freed.
    repair
        First verify every chunk of an existing store, on the cluster
        (:func:`cnndiff_xr.extraction.checksums.verify_store`), and mark the batches holding damaged chunks
        incomplete, so that this run re-extracts exactly them from the images (the store then equals a clean one).
        Damage that batches do not rewrite (the image table, dimension coordinates) is refused before anything is
        written.

    Raises
    ------
    StoreLockedError
        Another extraction is writing this store.
    RuntimeError
        Called while a child process re-runs its parent's main script: the code belongs under
        ``if __name__ == "__main__":`` (:func:`cnndiff_xr.extraction.cluster.refuse_in_starting_child`).
    StoreError
        The store was made with other settings or images, or ``store`` is something else.
    ImageError
        Unreadable images with ``on_error="raise"``, or a set that names no image (before anything is written).
    Float16OverflowError
        With ``dtype="float16"``: a layer's values are finite in the model but beyond float16's range (they would be
        stored as inf). Raised at the first batch that overflows, naming the layer and the images, before anything
        of that batch is written; the run stops and the batches already written stay. Extract into a new store with
        ``dtype="float32"``.
    NotEnoughSpaceError
        Before anything is written: the preflight found too little free space (both numbers in the message);
        ``force=True`` overrides.
    DiskFullError
        The disk (or quota) filled during the run. The message names the store, the free space now and the bytes
        still needed; the batches recorded complete are whole and stay, and a rerun after freeing space resumes.
    ExtractionError
        Some batches failed; the others are written, and rerunning finishes the rest.
    WeightsMismatchError
        A worker built the model with other weights than the client (another weights file at the same path or in its
        Keras cache, another framework version): it computed none of its batches. The message names the worker and
        both digests (:class:`cnndiff_xr.extraction.cluster.WeightsMismatchError`).

    Returns
    -------
    The lazy :class:`xarray.DataTree` of the store (and an :class:`ExtractionReport` if ``return_report``).
    """
    refuse_in_starting_child("extract()")  # before the lock: the parent running this script holds it
    config = ExtractionConfig(
        store=store, storage_options=storage_options, model=model, weights=weights, layers=layers, dtype=dtype,
        batch_size=batch_size, resize=resize, seed=seed, preprocess=preprocess, on_error=on_error,
        compression=compression, compression_level=compression_level, client=client, n_workers=n_workers,
        progress=progress, break_lock=break_lock, attrs={} if attrs is None else attrs, units=units,
        filter_means=filter_means,
    )
    check_bool("return_report", return_report, message=f"return_report must be True or False, got {return_report!r}")
    # Paths and globs that name no image are collected, not raised at the first, so that on_error="raise" can name
    # every bad file and path at once (in _screen_images), and on_error="skip" can record them -- unless they leave a
    # whole set empty, which is refused now.
    table = images.image_table(sets, errors="collect")
    _refuse_sets_naming_nothing(table)
    force = check_bool("force", force, message=f"force must be True or False, got {force!r}")
    repair = check_bool("repair", repair, message=f"repair must be True or False, got {repair!r}")
    try:
        with StoreLock(config.store, storage_options=config.storage_options, break_lock=config.break_lock):
            tree, report = _extract_locked(table, config, force=force, repair=repair)
    except DiskFullError:
        raise
    except Exception as err:  # the client's own writes (lock, layout, appended images, predictions) filled the disk
        cause = disk_full_cause(err)
        if cause is None:
            raise
        raise DiskFullError(config.store, f"writing the store's lock or metadata failed: {cause}",
                            free_bytes(config.store, config.storage_options)) from err
    return (tree, report) if return_report else tree


def _extract_locked(table: images.ImageTable, config: ExtractionConfig,
                    force: bool = False, repair: bool = False) -> tuple[xr.DataTree, ExtractionReport]:
    """The body of :func:`extract`, run while holding the store's writer lock (``force``: skip the space
    preflight's refusal)."""
    url, options = config.store, config.storage_options
    if _store.exists(url, storage_options=options):
        _store.read_attrs(url, storage_options=options)  # a path that holds something else is refused before any work
    if len(table) == 0:  # every path named nothing: say so now, before building a model or starting a cluster
        listing = "\n".join(f"  {p['source']}: {p['reason']}" for p in table.problems)
        raise images.ImageError(f"no images: every path or glob named nothing; nothing was written:\n{listing}")
    model = config.spec.backend(config.layers)
    attrs = config.provenance(model)
    shapes, layers, with_predictions = model.shapes, model.layers, model.has_imagenet_head
    labels = model.class_labels()
    filter_labels = {layers[-1]: labels} if labels is not None and layers[-1] == model.output_layer else None
    del model  # the client does not keep a copy of the weights
    say: Callable[[str], None] = (lambda msg: print(msg, file=sys.stderr)) if config.progress else (lambda msg: None)
    say(size_report(shapes, len(table), config.dtype, config.reduction))
    image_nbytes = sum(_store.kept_nbytes(shapes, 1, config.dtype, config.reduction).values())

    # in-memory fsspec stores live in one process: use threads there
    with get_client(config.client, n_workers=config.n_workers, processes=not config.in_memory) as client, \
            _scheduler_loss_reported(client, url, options):
        table, skipped = _screen_images(client, table, config.on_error)
        attrs[SKIPPED_ATTR] = skipped
        # registering the plugin builds the model on every worker, each checking that it built the weights whose
        # digest the store records
        plugin = ModelPlugin(config.spec, layers, config.dtype, config.reduction,
                             weights_sha256=attrs["weights_sha256"])
        registration: _Registration | None = None
        if _store.exists(url, storage_options=options):
            existing = _store.read_attrs(url, storage_options=options)
            kept = _store.check_compatible(url, existing, identity=identity(attrs), table=table,
                                           storage_options=options)
            batch_size = int(existing["batch_size"])
            store_id = existing.get(STORE_ID_ATTR)
            _refuse_when_disk_too_small(  # before growing it; the images not complete (and any appended) remain
                url, options, remaining=len(table) - int(_store.completed(url, storage_options=options).sum()),
                image_nbytes=image_nbytes, compression=str(existing.get("compression")), force=force, say=say)
            if kept is not None:  # new sets after the stored images (or an interrupted append): grow the store
                store_id = _store.append_images(url, table, kept, skipped=skipped, storage_options=options)
                if len(table) > kept:
                    say(f"adding {len(table) - kept} images in set(s) "
                        f"{', '.join(dict.fromkeys(table.sets[kept:]))} after the store's {kept} images")
        else:
            batch_size = config.batch_size
            _refuse_when_disk_too_small(url, options, remaining=len(table), image_nbytes=image_nbytes,
                                        compression=config.compression, force=force, say=say)
            store_id = attrs[STORE_ID_ATTR] = uuid.uuid4().hex  # identifies this store, not its settings
            tree, encoding = _store.build_layout(table, shapes, attrs=attrs, dtype=config.dtype, batch_size=batch_size,
                                                 compressor=config.codec(), with_predictions=with_predictions,
                                                 filter_labels=filter_labels, reduction=config.reduction)
            # every batch of a new store is missing: the workers build the model while the layout is written
            registration = _Registration(client, plugin) if len(table) else None
            try:
                _store.create_store(tree, encoding, url, storage_options=options)
            except Exception as err:
                if registration is not None:  # not left running against a cluster about to close
                    with contextlib.suppress(Exception):
                        registration.wait()
                if disk_full_cause(err) is not None:
                    _remove_half_made_layout(url, options)
                raise
            repair = False  # a new store: nothing to repair
        if repair:  # batches holding damaged chunks marked incomplete: the resume below re-extracts exactly them
            _mark_damaged(client, url, options, say)
        task = BatchTask(store=url, storage_options=options, store_id=store_id, plugin=plugin.name,
                         resize=config.resize, dtype=config.dtype, with_predictions=with_predictions)
        report = _run_batches(client, task, plugin, table, batch_size=batch_size, progress=config.progress,
                              skipped=skipped, image_nbytes=image_nbytes, registration=registration)
    if with_predictions:
        _finalise_predictions(url, layers, labels, options)
    say(f"extracted {report.images_computed} images in {report.seconds:.1f} s "
        f"({report.images_per_second:.2f} images/s); {report.batches_already_complete} of {report.n_batches} "
        f"batches were already complete; store: {url}")
    return _store.open_activations(url, storage_options=options), report


def _mark_damaged(client: Client, url: str, storage_options: Mapping[str, Any] | None,
                  say: Callable[[str], None]) -> None:
    """``repair=True``: verify every chunk on the cluster and mark the batches holding damaged ones incomplete."""
    from .checksums import mark_for_repair, verify_store

    damaged = verify_store(url, client=client, storage_options=storage_options)
    starts = mark_for_repair(url, damaged, storage_options=storage_options)
    say(f"repair: {len(damaged)} damaged chunk(s) in {len(starts)} batch(es)"
        + (f" (first images {', '.join(map(str, starts[:10]))}); re-extracting them" if starts else ""))


def _run_batches(client: Client, task: BatchTask, plugin: ModelPlugin, table: images.ImageTable, *, batch_size: int,
                 progress: bool, skipped: list[dict[str, str]], image_nbytes: int = 0,
                 registration: _Registration | None = None) -> ExtractionReport:
    """Submit one task per batch not yet complete, wait for all, and report (or raise naming the first failure).

    ``image_nbytes``: one image's uncompressed bytes in the store, for a full disk's estimate of what is needed.
    ``registration``: the plugin's registration, already started (a new store); else it is registered here when a
    batch is missing."""
    from distributed import as_completed
    from tqdm.std import tqdm  # a text bar: tqdm.auto warns "IProgress not found" in notebooks without ipywidgets

    done = _store.completed(task.store, storage_options=task.storage_options)
    starts = list(range(0, len(table), batch_size))
    missing = [s for s in starts if not done[s:s + batch_size].all()]
    t_load = time.perf_counter()
    if registration is not None:
        t_load = registration.started  # the model's setup began before the layout was written
        registration.wait()
    elif missing:
        _register_plugin(client, plugin)
    t0 = time.perf_counter()
    # Keys are deterministic per (store, batch, model): two stores extracted at once on one cluster never share a
    # key (the scheduler would hand one run the other's result), and a rerun after a dead client reuses the keys of
    # the orphaned tasks, so the scheduler may simply let a still-running orphan finish for it.
    store_key = hashlib.sha256(json.dumps([task.store, task.store_id]).encode()).hexdigest()[:12]
    labels = [f"{i} ({source})" for i, source in zip(table.ids, table.sources, strict=True)]
    futures = {
        client.submit(_extract_batch, task, s, table.refs[s:s + batch_size], labels[s:s + batch_size], pure=False,
                      key=f"cnndiff-batch-{s}-{plugin.name}-{store_key}"): s
        for s in missing
    }
    failures = []
    fatal: Float16OverflowError | DiskFullError | None = None
    n_computed = 0
    with tqdm(total=sum(len(table.refs[s:s + batch_size]) for s in missing), unit="img", disable=not progress,
              desc="extract", file=sys.stderr) as bar:
        # loop=: a Client passed in need not be the default client (set_as_default=False)
        completed = as_completed(futures, loop=client.loop)
        for future in completed:
            if future.status == "error":
                error = future.exception()
                # an overflow or a full disk stops the run at once: every later batch would fail the same way
                if isinstance(error, Float16OverflowError | DiskFullError):
                    fatal = error
                    completed.clear()
                    break
                failures.append((futures[future], error))
            else:
                n_computed += future.result()
                bar.update(len(table.refs[futures[future]:futures[future] + batch_size]))
    seconds = time.perf_counter() - t0
    if fatal is not None or failures:
        # Release (not cancel) our futures: the scheduler drops the batches not yet started (those running finish
        # and write whole, complete batches), and with deterministic keys a retry in this session whose traceback
        # still holds them would otherwise be handed the same failed futures instead of recomputing
        for future in futures:
            future.release()
        futures.clear()
    # each with its own message, not "1 of N batches failed": the remedy is another dtype, or space, not a rerun
    # alone; a fresh copy, so that the traceback is this call's and not the worker's
    if isinstance(fatal, Float16OverflowError):
        raise Float16OverflowError(fatal.store, fatal.layer, fatal.images, fatal.largest, fatal.other_layers) from None
    if isinstance(fatal, DiskFullError):
        raise _disk_full_now(task, fatal, len(table), image_nbytes) from None
    if failures:
        first_start, first_error = min(failures, key=lambda f: f[0])
        mismatch = next((error for _, error in sorted(failures, key=lambda f: f[0])
                         if isinstance(error, WeightsMismatchError)), None)
        if mismatch is not None:  # its own message: the remedy is that worker's files or versions, not a rerun alone
            raise WeightsMismatchError(mismatch.worker, mismatch.expected, mismatch.built) from None
        raise ExtractionError(
            f"{len(failures)} of {len(missing)} batches failed (first: images {first_start}.."
            f"{first_start + batch_size - 1}: {type(first_error).__name__}: {first_error}). The other batches are "
            f"written in {task.store!r}; rerun the same extraction to finish the missing ones."
        ) from first_error
    return ExtractionReport(store=task.store, n_images=len(table), n_batches=len(starts),
                            batches_already_complete=len(starts) - len(missing), batches_computed=len(missing),
                            images_computed=n_computed, seconds=seconds, skipped=skipped,
                            model_load_seconds=t0 - t_load)
