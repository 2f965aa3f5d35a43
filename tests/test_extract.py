"""Extraction end to end on a real LocalCluster: values, layout, resume, provenance, laziness."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import xarray as xr
import zarr
from tiny import TINY_LAYERS, TINY_SIZE, build_tiny_model, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr.extraction import images, store
from cnndiff_xr.extraction.run import ExtractionError


def _reference_outputs(model, sets):
    """The model's own outputs for the same preprocessed images, computed here in the test process."""
    import keras

    table = images.image_table(sets)
    rgb = images.load_batch(table.refs, (TINY_SIZE, TINY_SIZE), "nearest")
    x = tiny_preprocess()(rgb.astype("float32"))
    names = [layer.name for layer in model.layers[1:]]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    outs = dict(zip(names, (np.asarray(o) for o in probe(x, training=False)), strict=True))
    outs["input_layer"] = x
    return table, outs


def test_store_equals_model_outputs(tiny_store, tiny_model, tiny_sets):
    tree = cx.open_activations(tiny_store)
    table, expected = _reference_outputs(tiny_model, tiny_sets)
    assert tree.attrs["layers"] == TINY_LAYERS  # default list leaves out the Flatten reshape
    for name in TINY_LAYERS:
        act = tree[name]["activation"]
        np.testing.assert_allclose(act.values, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert list(tree["image"].values) == table.ids
    assert bool(tree["completed"].all())


def test_layout_dims_coords_and_chunks(tiny_store):
    tree = cx.open_activations(tiny_store)
    conv = tree["conv1"]["activation"]
    assert conv.dims == ("image", "y", "x", "filter")
    assert conv.shape == (18, 30, 30, 4)
    assert tree["dense"]["activation"].dims == ("image", "filter")
    assert conv.chunks[0] == (4, 4, 4, 4, 2)  # one chunk per batch, whole images
    assert all(len(c) == 1 for c in conv.chunks[1:])
    # non-index image coordinates are repeated in every layer group and loaded into memory
    assert isinstance(conv["set"].data, np.ndarray)
    assert sorted(set(conv["set"].values)) == ["array", "photos", "white_noise"]
    cats = conv.where(conv.set == "photos", drop=True)
    assert cats.sizes["image"] == 5
    assert len(set(tree["image"].values)) == 18
    # plain xarray opens it too, without package code
    plain = xr.open_datatree(tiny_store, engine="zarr", chunks={})
    xr.testing.assert_allclose(plain["pool1"]["activation"].load(), tree["pool1"]["activation"].load())
    assert "set" in plain["pool1"]["activation"].coords
    # compression as recorded
    arr = zarr.open_group(tiny_store, mode="r")["conv1/activation"]
    assert type(arr.compressors[0]).__name__ == "BloscCodec" and arr.compressors[0].cname.value == "lz4"


def test_provenance_attrs(tiny_store):
    attrs = cx.open_activations(tiny_store).attrs
    for key in ("model", "weights", "weights_sha256", "input_size", "resize", "preprocessing", "layers", "dtype",
                "keras_version", "tensorflow_version", "cnndiff_xr_version", "created"):
        assert key in attrs, key
    assert attrs["input_size"] == [TINY_SIZE, TINY_SIZE]
    assert attrs["resize"] == "nearest"
    assert attrs["preprocessing"].endswith("preprocess_input")
    assert len(attrs["weights_sha256"]) == 64


def test_open_and_slice_is_lazy(tiny_store):
    from analysis_fixtures import raise_if_dask_computes

    with raise_if_dask_computes():
        tree = cx.open_activations(tiny_store)
        sliced = tree["conv1"]["activation"].sel(filter=2)
        sub = tree.cnndiff.sel(["conv1", "dense"], filter=[0, 1], sets="photos")
        assert sub["conv1"]["activation"].shape == (5, 30, 30, 2)
        assert sliced.dims == ("image", "y", "x")
    np.testing.assert_array_equal(sliced.values, tree["conv1"]["activation"].values[..., 2])


def test_resume_after_failed_batch(tmp_path, local_client, tiny_model):
    """A preprocessing function that fails on one batch (while a flag file exists) interrupts the run; the rerun
    computes only the missing batch and the store equals an uninterrupted run."""
    flag = tmp_path / "fail-now"
    flag.write_text("x")
    marker = np.full((1, 10, 10, 3), 7, dtype=np.uint8)
    rng = np.random.default_rng(5)
    pixels = np.concatenate([rng.integers(0, 256, (9, 10, 10, 3), dtype=np.uint8), marker,
                             rng.integers(0, 256, (2, 10, 10, 3), dtype=np.uint8)])
    sets = {"a": pixels}
    failing = _FailOnMarker(str(flag))
    broken, clean = str(tmp_path / "broken.zarr"), str(tmp_path / "clean.zarr")
    with pytest.raises(ExtractionError, match="1 of 4 batches failed"):
        cx.extract(sets, store=broken, model=tiny_model, preprocess=failing, client=local_client, batch_size=3,
                   progress=False)
    done = store.completed(broken)
    assert done.sum() == 9 and not done[9:12].any()  # batch 3 (images 9..11) is the one with the marker
    mtimes = {p: os.stat(p).st_mtime_ns for p in _chunk_files(broken, "conv1")}
    flag.unlink()
    _, report = cx.extract(sets, store=broken, model=tiny_model, preprocess=failing, client=local_client,
                           batch_size=3, progress=False, return_report=True)
    assert (report.batches_computed, report.batches_already_complete, report.images_computed) == (1, 3, 3)
    # chunks written by the first run were not rewritten
    after = {p: os.stat(p).st_mtime_ns for p in _chunk_files(broken, "conv1")}
    assert all(after[p] == t for p, t in mtimes.items())
    cx.extract(sets, store=clean, model=tiny_model, preprocess=failing, client=local_client, batch_size=3,
               progress=False)
    resumed, reference = cx.open_activations(broken), cx.open_activations(clean)
    for name in TINY_LAYERS:
        xr.testing.assert_identical(resumed[name]["activation"].load(), reference[name]["activation"].load())
    assert bool(resumed["completed"].all())


def test_a_new_stores_model_is_set_up_on_the_workers_while_its_layout_is_written(tmp_path, local_client, tiny_model,
                                                                                 monkeypatch):
    """The workers build the model (a framework import and a build each: seconds, ~10 s for VGG16) while the client
    writes a new store's layout, not after it; a layout that fails waits for that setup to end and raises its own
    error, leaving nothing running."""

    def registering() -> bool:
        return any(t.name == "cnndiff-register-model" for t in threading.enumerate())

    seen = []
    create_store = store.create_store

    def watched(*args, **kwargs):
        seen.append(registering())
        return create_store(*args, **kwargs)

    monkeypatch.setattr(store, "create_store", watched)
    sets = {"noise": cx.images.white_noise(4, seed=2, size=(TINY_SIZE, TINY_SIZE))}
    tree = cx.extract(sets, store=str(tmp_path / "a.zarr"), model=tiny_model, preprocess=tiny_preprocess(),
                      client=local_client, batch_size=2, progress=False)
    assert seen == [True] and bool(tree["completed"].all())
    assert not registering()

    def failing(*args, **kwargs):
        raise OSError("injected: the layout could not be written")

    monkeypatch.setattr(store, "create_store", failing)
    with pytest.raises(OSError, match="injected"):
        cx.extract(sets, store=str(tmp_path / "b.zarr"), model=tiny_model, preprocess=tiny_preprocess(),
                   client=local_client, batch_size=2, progress=False)
    assert not registering()


class _FailOnMarker:
    """Picklable preprocessing that raises on a batch holding an all-7 image while a flag file exists."""

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self, batch):
        if os.path.exists(self.flag) and (batch == 7).all(axis=(1, 2, 3)).any():
            raise RuntimeError("injected failure")
        return tiny_preprocess()(batch)


def _chunk_files(path, layer):
    root = os.path.join(path, layer, "activation", "c")
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_provenance_mismatch_is_refused(tmp_path, tiny_store, tiny_model, tiny_sets, local_client):
    before = {p: os.stat(p).st_mtime_ns for p in _chunk_files(tiny_store, "conv1")}
    with pytest.raises(store.StoreError, match="dtype: store has 'float32', this run asks for 'float16'"):
        cx.extract(tiny_sets, store=tiny_store, model=tiny_model, preprocess=tiny_preprocess(),
                   client=local_client, batch_size=4, dtype="float16", progress=False)
    with pytest.raises(store.StoreError, match="layers"):
        cx.extract(tiny_sets, store=tiny_store, model=tiny_model, preprocess=tiny_preprocess(),
                   client=local_client, batch_size=4, layers=["conv1"], progress=False)
    other_weights = build_tiny_model(seed=1)
    with pytest.raises(store.StoreError, match="weights_sha256"):
        cx.extract(tiny_sets, store=tiny_store, model=other_weights, preprocess=tiny_preprocess(),
                   client=local_client, batch_size=4, progress=False)
    with pytest.raises(store.StoreError, match="different image table"):
        cx.extract({"photos": tiny_sets["photos"]}, store=tiny_store, model=tiny_model,
                   preprocess=tiny_preprocess(), client=local_client, batch_size=4, progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in _chunk_files(tiny_store, "conv1")} == before


def test_not_a_store_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(store.StoreError, match="not a cnndiff_xr store"):
        cx.open_activations(str(tmp_path / "plain.zarr"))
    with pytest.raises(store.StoreError, match="not a cnndiff_xr store"):
        cx.open_activations(str(tmp_path / "missing.zarr"))


def test_a_batch_refuses_a_replaced_or_deleted_store(tmp_path, tiny_store):
    """The check each batch makes before writing: the root zarr.json's store_id, read fresh (not the group)."""
    import importlib
    import shutil

    check_same_store = importlib.import_module("cnndiff_xr.extraction.run")._check_same_store
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store, copy)
    store_id = store.read_attrs(copy)["store_id"]
    assert store.read_store_id(copy) == store_id and len(store_id) == 32
    check_same_store(copy, None, store_id)  # the same store: no error
    with pytest.raises(store.StoreError, match=f"replaced while this task ran .store_id '{store_id}'"):
        check_same_store(copy, None, "another-run")
    shutil.rmtree(copy)
    assert store.read_store_id(copy) is None
    with pytest.raises(store.StoreError, match="replaced while this task ran .store_id None"):
        check_same_store(copy, None, store_id)


def test_memory_url_store_float16(tiny_model):
    """An fsspec memory:// store (run on in-process workers, since memory stores live in one process)."""
    url = "memory://cnndiff-test/float16.zarr"
    rng = np.random.default_rng(2)
    sets = {"a": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)}
    tree = cx.extract(sets, store=url, model=tiny_model, preprocess=tiny_preprocess(), dtype="float16",
                      batch_size=2, n_workers=1, progress=False)
    # a memory:// store exists only in this process: read it with local threads, not the session's process cluster
    act = tree["conv2"]["activation"].compute(scheduler="threads")
    assert act.dtype == np.float16 and act.shape[0] == 5
    assert store.read_store_id(url) == tree.attrs["store_id"]  # read through fsspec, not a local path
    _, expected = _reference_outputs(tiny_model, sets)
    np.testing.assert_allclose(act.values.astype("float32"), expected["conv2"], rtol=2e-3, atol=2e-3)


def test_info_reports_sizes(tiny_store):
    summary = store.info(tiny_store)
    assert summary["n_images"] == summary["n_completed"] == 18
    conv = next(layer for layer in summary["layers"] if layer["layer"] == "conv1")
    assert conv["uncompressed_bytes"] == 18 * 30 * 30 * 4 * 4
    assert 0 < conv["disk_bytes"]
    text = store.format_info(summary)
    assert "conv1" in text and "compression ratio" in text


def test_size_preflight_is_exact():
    from cnndiff_xr.extraction.run import size_report

    sizes = store.uncompressed_nbytes({"a": (2, 3, 4), "b": (10,)}, 5, "float16")
    assert sizes == {"a": 5 * 24 * 2, "b": 5 * 10 * 2}
    assert "total" in size_report({"a": (2, 3, 4)}, 5, "float16")


def test_file_url_store(tmp_path, local_client, tiny_model):
    """A store given as a file:// URL: extraction, lazy opening and info (file:// is taken as the local path)."""
    url = "file://" + str(tmp_path / "url.zarr")
    rng = np.random.default_rng(9)
    sets = {"a": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)}
    tree = cx.extract(sets, store=url, model=tiny_model, preprocess=tiny_preprocess(), client=local_client,
                      batch_size=2, progress=False)
    _, expected = _reference_outputs(tiny_model, sets)
    np.testing.assert_allclose(cx.open_activations(url)["pool1"]["activation"].values, expected["pool1"],
                               rtol=1e-5, atol=1e-6)
    assert tree.cnndiff.complete and (tmp_path / "url.zarr" / "zarr.json").is_file()
    assert store.info(url)["n_completed"] == 5


def test_config_validates_once_and_defines_provenance_and_identity(tmp_path, tiny_model):
    import dataclasses

    from cnndiff_xr.extraction.config import IDENTITY_ATTRS, ExtractionConfig, identity

    config = ExtractionConfig(store="s.zarr", model=tiny_model, preprocess=tiny_preprocess(), layers=["conv1"],
                              attrs={"note": "made by a test"})
    assert config.layers == ("conv1",) and config.store == os.path.abspath("s.zarr")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = "float16"
    attrs = config.provenance(config.spec.backend(config.layers))
    assert attrs["layers"] == ["conv1"] and attrs["model"] == "custom:tiny" and attrs["note"] == "made by a test"
    assert identity(attrs) == {key: attrs[key] for key in IDENTITY_ATTRS}
    assert "batch_size" not in identity(attrs) and "created" not in identity(attrs)
    with pytest.raises(ValueError, match=r"attrs may not set \['dtype'\]"):
        ExtractionConfig(store="s.zarr", model=tiny_model, preprocess=tiny_preprocess(), attrs={"dtype": "x"})
