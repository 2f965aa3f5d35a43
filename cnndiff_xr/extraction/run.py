"""Extraction: Dask tasks that decode a batch of images, run the model and write whole chunks of every layer.

Order of work (DESIGN.md, "Extraction on Dask"):

1. build the image table and the model description; learn layer shapes; print the exact uncompressed size;
2. check every image (decoded in the workers) — ``on_error="raise"`` stops here, before anything is written;
3. create the store layout (metadata and coordinates), or check that an existing store was made with the same
   settings and images;
4. submit one task per batch that is not yet complete; each task writes its batch's chunk of every layer, then its
   predictions, then — last — its completion record, so an interrupted run leaves no chunk marked complete that is
   not written;
5. copy the predictions into every layer group (xarray inherits only indexed coordinates).

Steps 3-5 run under the store's writer lock (:class:`cnndiff_xr.store.StoreLock`): a second run on the same store is
refused while the first is alive, and the lock of a dead run is removed (see the store module for the rules).

Faults (issue 6), and why the store stays right:

- **A worker dies** (SIGKILL, out of memory): Dask reruns its tasks on another worker. A task that died mid-batch
  wrote no completion record; its rerun rewrites the batch's chunks whole.
- **The client dies** (SIGKILL, lost session): the scheduler drops the client's tasks, but tasks already *executing*
  on workers cannot be interrupted and finish as orphans, writing their batch. Rerunning the same command takes the
  dead client's lock (its process is gone), reads the completion record and submits only the batches not yet
  complete. An orphan may still be writing one of those: then two writers write the same batch. That is safe:
  (a) a batch's bytes depend only on its images, the model and the settings, all fixed by the store's provenance, so
  both write identical chunks; (b) every chunk write replaces a whole object atomically (Zarr's local store writes a
  temporary file and renames it; an S3 PUT is atomic), so a reader sees the old or the new chunk, never a mix; (c) the
  completion record is written after the data by each writer, so "complete" always means "all chunks written". Task
  keys are deterministic per (store, batch), so a rerun's task often simply takes over the orphan's running task.
- **The store is replaced while orphans run** (deleted and recreated at the same URL): each store gets a random
  ``store_id`` at creation; a task checks it just before writing data and again before writing completion, and drops
  its results if it changed, so an orphan never writes into, or marks complete, a different store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import images
from . import store as _store
from .backends.keras import (
    LayerExtractor,
    ModelSpec,
    load_imagenet_class_labels,
    make_spec,
    preprocess_name,
    weights_digest,
)
from .cluster import ModelPlugin, check_address, get_client, worker_extractor

ON_ERROR = ("raise", "skip")


class ExtractionError(RuntimeError):
    """Some batches failed; the others are written and a rerun finishes only what is missing."""


@dataclasses.dataclass
class ExtractionReport:
    """What a run did: counts, the time to load the model on the workers, and throughput (images per second over
    the batches: decode, forward pass, compression and writes)."""

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
_GROUP_CACHE: dict[str, Any] = {}


def _writable_group(url: str, storage_options: Mapping | None, store_id: str | None):
    # Keyed by store_id too: a store deleted and recreated at the same URL has other array shapes, and a cached group
    # would keep the old ones.
    key = json.dumps([url, dict(storage_options or {}), store_id], sort_keys=True, default=str)
    if key not in _GROUP_CACHE:
        if len(_GROUP_CACHE) > 16:  # a long-lived worker serving many stores
            _GROUP_CACHE.clear()
        _GROUP_CACHE[key] = _store.open_group(url, "r+", storage_options)
    return _GROUP_CACHE[key]


def _check_same_store(url: str, storage_options: Mapping | None, store_id: str | None) -> None:
    """Raise if the store at ``url`` is no longer the one this task was submitted for (read fresh, not cached)."""
    current = _store.read_store_id(url, storage_options)
    if current != store_id:
        raise _store.StoreError(f"the store at {url!r} was replaced while this task ran (store_id {current!r}, the "
                                f"task belongs to {store_id!r}); its results are dropped")


def _check_images(refs: Sequence[images.ImageRef]) -> list[str | None]:
    return [images.check_image(ref) for ref in refs]


def _extract_batch(
    plugin: str, url: str, storage_options: Mapping | None, start: int, refs: Sequence[images.ImageRef],
    resize: str, dtype: str, with_predictions: bool, store_id: str | None = None,
) -> int:
    """Decode, run and write one batch (a whole chunk of every layer); return the number of images."""
    extractor = worker_extractor(plugin)
    rgb = images.load_batch(refs, extractor.input_size, resize)
    activations, probabilities = extractor.run(rgb)
    _check_same_store(url, storage_options, store_id)
    group = _writable_group(url, storage_options, store_id)
    stop = start + len(refs)
    # write_empty_chunks: a chunk is a batch of whole images and never all fill value, so skip Zarr's check for it
    # (a full scan that cost more than writing the uncompressed bytes; benchmarks/RESULTS.md)
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        for name, values in activations.items():
            group[f"{name}/activation"][start:stop] = values.astype(dtype, copy=False)  # whole chunks, atomic writes
        if with_predictions:
            group["predicted_class"][start:stop] = probabilities.argmax(axis=1).astype("int32")
            group["predicted_probability"][start:stop] = probabilities.max(axis=1).astype("float32")
        _check_same_store(url, storage_options, store_id)
        group["completed"][start:stop] = True  # last: the completion record follows the data
    return len(refs)


# --------------------------------------------------------------------------------------------- client side
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _validate(*, dtype: Any, batch_size: Any, resize: Any, on_error: Any, compression: Any, level: Any, seed: Any,
              layers: Any, preprocess: Any, client: Any, n_workers: Any, flags: Mapping[str, Any]) -> None:
    """Check every argument of :func:`extract` that can be checked without a model or a cluster; each message names
    the parameter and what it accepts."""
    if dtype not in _store.DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {_store.DTYPES}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if resize not in images.RESIZE_POLICIES:
        raise ValueError(f"resize={resize!r}; choose one of {images.RESIZE_POLICIES}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR}")
    _store.check_compression(compression, level)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not (layers is None or isinstance(layers, str)
            or (isinstance(layers, Sequence) and all(isinstance(n, str) for n in layers))):
        raise TypeError(f"layers must be None (every layer but reshapes), 'seed' or a list of layer names, got "
                        f"{type(layers).__name__}: {layers!r}")
    if preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be a function (RGB 0..255 float batch -> model input) or None, got "
                        f"{type(preprocess).__name__}")
    from distributed import Client

    if client is not None and not isinstance(client, (str, Client)):
        raise TypeError(f"client must be None (an embedded LocalCluster), a scheduler address such as "
                        f"'tcp://10.0.0.5:8786' or a distributed.Client, got {type(client).__name__}: {client!r}")
    if isinstance(client, str):
        check_address(client, "client")
    if n_workers is not None:
        if not _is_int(n_workers) or n_workers < 1:
            raise ValueError(f"n_workers must be a positive int or None (one per core), got {n_workers!r}")
        if client is not None:
            raise ValueError("n_workers sizes the embedded LocalCluster; it cannot be combined with client=...")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def size_report(shapes: Mapping[str, Sequence[int]], n_images: int, dtype: str) -> str:
    """The size preflight: exact uncompressed bytes per layer and in total."""
    sizes = _store.uncompressed_nbytes(shapes, n_images, dtype)
    width = max(map(len, sizes)) if sizes else 5
    lines = [f"store size before compression, {n_images} images, {dtype}:"]
    lines += [f"  {name:<{width}}  {str(tuple(shapes[name])):<18} {_store.format_bytes(b):>10}"
              for name, b in sizes.items()]
    lines.append(f"  {'total':<{width}}  {'':<18} {_store.format_bytes(sum(sizes.values())):>10}")
    return "\n".join(lines)


def _drop(table: images.ImageTable, bad: set[int]) -> images.ImageTable:
    keep = [i for i in range(len(table)) if i not in bad]
    return images.ImageTable(ids=[table.ids[i] for i in keep], sets=[table.sets[i] for i in keep],
                             sources=[table.sources[i] for i in keep], refs=[table.refs[i] for i in keep])


def _screen_images(client, table: images.ImageTable, on_error: str, chunk: int = 64):
    """Decode every image in the workers; raise naming every bad file and every path that named no image, or drop
    them (``on_error="skip"``) and return the records of what was skipped (set, image id, source, reason)."""
    futures = [client.submit(_check_images, table.refs[i:i + chunk], pure=False)
               for i in range(0, len(table), chunk)]
    reasons = [r for batch in client.gather(futures) for r in batch]
    bad = {i: r for i, r in enumerate(reasons) if r is not None}
    skipped = [{"set": p["set"], "image": "", "source": p["source"], "reason": p["reason"]} for p in table.problems]
    skipped += [{"set": table.sets[i], "image": table.ids[i], "source": table.sources[i], "reason": r}
                for i, r in bad.items()]
    if not skipped:
        return table, []
    if on_error == "raise":
        listing = "\n".join(f"  {s['source']}: {s['reason']}" for s in skipped)
        raise images.ImageError(f"{len(skipped)} image(s) or path(s) cannot be read; nothing was written "
                                f"(pass on_error='skip' to extract the rest):\n{listing}")
    remaining = _drop(table, set(bad))
    if len(remaining) == 0:
        raise images.ImageError("every image was skipped as unreadable (or named nothing); nothing to extract:\n"
                                + "\n".join(f"  {s['source']}: {s['reason']}" for s in skipped))
    return remaining, skipped


def _finalise_predictions(url: str, layers: Sequence[str], storage_options: Mapping | None) -> None:
    """Labels from the class ids, and the predictions copied into every layer group (small arrays, one writer)."""
    group = _store.open_group(url, "r+", storage_options)
    classes = np.asarray(group["predicted_class"][:])
    labels = load_imagenet_class_labels()
    if labels is not None:
        group["predicted_label"][:] = np.asarray([labels[c] if c >= 0 else "" for c in classes], dtype=object)
    values = {name: group[name][:] for name in _store.PREDICTION_COORDS}
    for layer in layers:
        for name, value in values.items():
            group[f"{layer}/{name}"][:] = value


def extract(
    sets: Mapping[str, Any],
    store: str,
    model: Any = "vgg16",
    weights: str | None = "imagenet",
    layers: str | Sequence[str] | None = None,
    dtype: str = "float32",
    client: Any = None,
    *,
    batch_size: int = 8,
    resize: str = "nearest",
    seed: int = 0,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    on_error: str = "raise",
    compression: str = "lz4",
    compression_level: int = 1,
    n_workers: int | None = None,
    storage_options: Mapping | None = None,
    progress: bool = True,
    return_report: bool = False,
    break_lock: bool = False,
) -> xr.DataTree | tuple[xr.DataTree, ExtractionReport]:
    """Run a Keras CNN over image sets and write every chosen layer's activations to a Zarr store, on Dask.

    Parameters
    ----------
    sets
        Set name -> image source: a glob, folder, file or list of paths, a numpy array (N, H, W[, C]), or an
        :class:`cnndiff_xr.images.ImageSource` (e.g. ``images.white_noise(43)``, ``images.movie_frames(...)``).
    store
        Path or fsspec URL of the store. If a store made with the same
        settings and images exists there, only its missing batches are computed (resume).
    model, weights, seed, preprocess
        A keras.applications name with ``weights`` "imagenet", None (random, seeded by ``seed``) or a weights file;
        or a ``keras.Model`` with ``preprocess``.
    layers
        None (every layer except pure reshapes), ``"seed"`` (the seed notebook's 21 VGG16 layers) or a list of names.
    dtype
        "float32" (default) or "float16" (half the disk, the analysis accumulates in float64).
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
        ``skipped_images`` attribute.
    compression, compression_level
        Activation codec and its level: "lz4" (default: blosc/lz4 with bit shuffle, level 0..9), "zstd" (level
        0..22), "blosc" (blosc/zstd with bit shuffle, 0..9), "none". Chosen by measurement (benchmarks/RESULTS.md):
        lz4 keeps extraction closest to the bare forward pass; zstd makes ~1.5x smaller stores at ~15 % lower
        extraction throughput on 2 cores.
    n_workers
        Worker processes of the embedded LocalCluster (only with ``client=None``).
    storage_options
        fsspec options of the store's filesystem (e.g. for S3; credentials are best left to the environment).
    break_lock
        Remove the store's writer lock even if its holder may be alive. Only for a holder known to be dead on
        another host: a dead holder on this host, or one silent for ``store.LOCK_STALE_S`` seconds, is removed
        anyway. See :class:`cnndiff_xr.store.StoreLock`.

    Raises
    ------
    StoreLockedError
        Another extraction is writing this store.
    StoreError
        The store was made with other settings or images, or ``store`` is something else.
    ImageError
        Unreadable images with ``on_error="raise"`` (before anything is written).
    ExtractionError
        Some batches failed; the others are written, and rerunning finishes the rest.

    Returns
    -------
    The lazy :class:`xarray.DataTree` of the store (and an :class:`ExtractionReport` if ``return_report``).
    """
    url = _store.check_url(store)
    storage_options = _store.check_storage_options(storage_options)
    _validate(dtype=dtype, batch_size=batch_size, resize=resize, on_error=on_error, compression=compression,
              level=compression_level, seed=seed, layers=layers, preprocess=preprocess, client=client,
              n_workers=n_workers, flags={"progress": progress, "return_report": return_report,
                                          "break_lock": break_lock})
    # Paths and globs that name no image are collected, not raised at the first, so that on_error="raise" can name
    # every bad file and path at once (in _screen_images), and on_error="skip" can record them.
    table = images.image_table(sets, errors="collect")
    with _store.StoreLock(url, storage_options, break_lock=break_lock):
        tree, report = _extract_locked(url, storage_options, table, model=model, weights=weights, layers=layers,
                                       dtype=dtype, client=client, batch_size=batch_size, resize=resize, seed=seed,
                                       preprocess=preprocess, on_error=on_error, compression=compression,
                                       compression_level=compression_level, n_workers=n_workers, progress=progress)
    return (tree, report) if return_report else tree


def _extract_locked(url, storage_options, table, *, model, weights, layers, dtype, client, batch_size, resize, seed,
                    preprocess, on_error, compression, compression_level, n_workers, progress):
    """The body of :func:`extract`, run while holding the store's writer lock."""
    if _store.exists(url, storage_options):
        _store.read_attrs(url, storage_options)  # a path that holds something else is refused before any work
    if len(table) == 0:  # every path named nothing: say so now, before building a model or starting a cluster
        listing = "\n".join(f"  {p['source']}: {p['reason']}" for p in table.problems)
        raise images.ImageError(f"no images: every path or glob named nothing; nothing was written:\n{listing}")
    spec = make_spec(model, weights, seed, preprocess)
    local = LayerExtractor(spec, layers)
    shapes, layer_list, input_size = local.shapes, local.layers, local.input_size
    with_predictions = local.has_imagenet_head
    attrs = _store.provenance(
        model=spec.name or spec.label,
        weights=_weights_label(spec),
        weights_sha256=weights_digest(local.model),
        input_size=input_size, resize=resize,
        preprocessing=preprocess_name(spec.name) if spec.name else _callable_name(spec.preprocess),
        layers=layer_list, dtype=dtype, batch_size=batch_size, compression=compression,
        compression_level=compression_level, seed=seed,
    )
    filter_labels = None
    if with_predictions and (labels := load_imagenet_class_labels(download=spec.weights == "imagenet")) is not None:
        filter_labels = {layer_list[-1]: labels} if layer_list[-1] == local.model.layers[-1].name else None
    del local  # the client does not keep a copy of the weights
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    say(size_report(shapes, len(table), dtype))

    memory_store = url.startswith("memory://")  # in-memory fsspec stores live in one process: use threads
    with get_client(client, n_workers=n_workers, processes=not memory_store) as dask_client:
        table, skipped = _screen_images(dask_client, table, on_error)
        attrs["skipped_images"] = skipped
        if _store.exists(url, storage_options):
            existing = _store.read_attrs(url, storage_options)
            _store.check_compatible(url, existing, attrs, table, storage_options)
            batch_size = int(existing["batch_size"])
            store_id = existing.get("store_id")
        else:
            store_id = attrs["store_id"] = uuid.uuid4().hex  # identifies this store, not its settings
            tree, encoding = _store.build_layout(table, shapes, attrs, dtype=dtype, batch_size=batch_size,
                                                with_predictions=with_predictions, filter_labels=filter_labels)
            _store.create_store(tree, encoding, url, storage_options)
        report = _run_batches(dask_client, spec, layer_list, url, storage_options, table, batch_size, resize,
                              dtype, with_predictions, progress, skipped, store_id)
    if with_predictions:
        _finalise_predictions(url, layer_list, storage_options)
    say(f"extracted {report.images_computed} images in {report.seconds:.1f} s "
        f"({report.images_per_second:.2f} images/s); {report.batches_already_complete} of {report.n_batches} "
        f"batches were already complete; store: {url}")
    return _store.open_activations(url, storage_options), report


def _run_batches(client, spec: ModelSpec, layer_list, url, storage_options, table, batch_size, resize, dtype,
                 with_predictions, progress, skipped, store_id) -> ExtractionReport:
    from distributed import as_completed
    from tqdm.auto import tqdm

    done = _store.completed(url, storage_options)
    starts = list(range(0, len(table), batch_size))
    missing = [s for s in starts if not done[s:s + batch_size].all()]
    plugin = ModelPlugin(spec, layer_list, dtype)  # the model is built on every worker while registering
    t_load = time.perf_counter()
    if missing:
        client.register_plugin(plugin)
    t0 = time.perf_counter()
    # Keys are deterministic per (store, batch, model): two stores extracted at once on one cluster never share a
    # key (the scheduler would hand one run the other's result), and a rerun after a dead client reuses the keys of
    # the orphaned tasks, so the scheduler may simply let a still-running orphan finish for it.
    store_key = hashlib.sha256(json.dumps([url, store_id]).encode()).hexdigest()[:12]
    futures = {
        client.submit(_extract_batch, plugin.name, url, storage_options, s, table.refs[s:s + batch_size], resize,
                      dtype, with_predictions, store_id, pure=False,
                      key=f"cnndiff-batch-{s}-{plugin.name}-{store_key}"): s
        for s in missing
    }
    failures = []
    n_computed = 0
    with tqdm(total=sum(len(table.refs[s:s + batch_size]) for s in missing), unit="img", disable=not progress,
              desc="extract", file=sys.stderr) as bar:
        # loop=: a Client passed in need not be the default client (set_as_default=False)
        for future in as_completed(futures, loop=client.loop):
            if future.status == "error":
                failures.append((futures[future], future.exception()))
            else:
                n_computed += future.result()
                bar.update(len(table.refs[futures[future]:futures[future] + batch_size]))
    seconds = time.perf_counter() - t0
    if failures:
        first_start, first_error = min(failures, key=lambda f: f[0])
        # Release (not cancel) our futures: with deterministic keys, a retry in this session whose traceback still
        # holds them would otherwise be handed the same failed futures instead of recomputing
        for future in futures:
            future.release()
        futures.clear()
        raise ExtractionError(
            f"{len(failures)} of {len(missing)} batches failed (first: images {first_start}.."
            f"{first_start + batch_size - 1}: {type(first_error).__name__}: {first_error}). The other batches are "
            f"written; rerun the same extraction to finish the missing ones."
        ) from first_error
    return ExtractionReport(store=url, n_images=len(table), n_batches=len(starts),
                            batches_already_complete=len(starts) - len(missing), batches_computed=len(missing),
                            images_computed=n_computed, seconds=seconds, skipped=skipped,
                            model_load_seconds=t0 - t_load)


def _weights_label(spec: ModelSpec) -> str:
    if spec.model_bytes is not None:
        return "custom"
    if spec.weights is None:
        return f"random(seed={spec.seed})"
    return spec.weights


def _callable_name(fn: Callable | None) -> str:
    """A stable name of the preprocessing function for the provenance (the same in every process and run)."""
    if fn is None:
        return "none"
    if not hasattr(fn, "__qualname__"):  # a callable instance: its class (repr would hold a memory address)
        fn = type(fn)
    return f"{getattr(fn, '__module__', '?')}.{fn.__qualname__}"
