"""Damaged chunks (issue 17, point 4): every new store carries a crc32c per chunk; a flipped byte or a file cut short
fails the analysis naming the layer, the chunk and its images; ``cnndiff info --verify`` lists exactly the damaged
chunks; ``extract(repair=True)`` re-extracts exactly their batches and the store then equals a clean one.

Real parts throughout: the tiny CNN extracted on the session's 2-process LocalCluster, real Zarr stores on disk
damaged byte by byte."""

from __future__ import annotations

import json
import os
import shutil

import dask
import numpy as np
import pytest
from faults import assert_same_store
from tiny import TINY_SIZE, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr import cli
from cnndiff_xr.extraction import store as cx_store
from cnndiff_xr.extraction.checksums import (
    CHECKSUM_CONFIG,
    DamagedChunk,
    DamagedChunkError,
    mark_for_repair,
    verify_store,
)

BATCH = 4
FLIPPED = ("conv1/activation", "c/0/0/0/0")  # images 0..3
TRUNCATED = ("conv2/activation", "c/2/0/0/0")  # images 8..11
DELETED = ("pool1/activation", "c/1/0/0/0")  # images 4..7


def _sets():
    size = (TINY_SIZE, TINY_SIZE)
    return {"a": cx.images.white_noise(6, seed=1, size=size), "b": cx.images.white_noise(6, seed=2, size=size)}


def _extract(path, model, client, **kwargs):
    return cx.extract(_sets(), store=str(path), model=model, preprocess=tiny_preprocess(), client=client,
                      batch_size=BATCH, progress=False, **kwargs)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, tiny_model, local_client):
    path = tmp_path_factory.mktemp("checksums") / "clean.zarr"
    _extract(path, tiny_model, local_client)
    return str(path)


def _chunk_file(store, array, chunk):
    return os.path.join(store, array, *chunk.split("/"))


def _flip_byte(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0x10
        f.seek(0)
        f.write(data)


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.fixture
def damaged_store(clean_store, tmp_path):
    path = str(tmp_path / "damaged.zarr")
    shutil.copytree(clean_store, path)
    _flip_byte(_chunk_file(path, *FLIPPED))
    _truncate(_chunk_file(path, *TRUNCATED))
    return path


def _ids(store, start, stop):
    return [str(i) for i in cx.open_activations(store)["image"].values[start:stop]]


def test_new_stores_carry_crc32c_on_every_array(clean_store):
    document = json.load(open(os.path.join(clean_store, "zarr.json")))
    arrays = {name: meta for name, meta in document["consolidated_metadata"]["metadata"].items()
              if meta["node_type"] == "array"}
    assert arrays
    without = [name for name, meta in arrays.items() if meta["codecs"][-1]["name"] != "crc32c"]
    assert without == []  # last: after the compressor
    codecs = [c["name"] for c in arrays["conv1/activation"]["codecs"]]
    assert codecs == ["bytes", "blosc", "crc32c"]


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_analysis_fails_naming_layer_chunk_and_images(clean_store, damaged_store, damage):
    array, chunk = FLIPPED if damage == "flipped" else TRUNCATED
    layer = array.split("/")[0]
    start = int(chunk.split("/")[1]) * BATCH
    tree = cx.open_activations(damaged_store)
    d = cx.differentiation(tree, n_units=10, resamples=1, layers=[layer])
    with pytest.raises(DamagedChunkError) as info:
        d.compute()
    err = info.value
    assert (err.layer, err.array, err.chunk) == (layer, array, chunk)
    assert err.images == _ids(clean_store, start, start + BATCH)
    message = str(err)
    for part in (damaged_store, repr(layer), repr(chunk), *err.images, "--verify", "--repair"):
        assert part in message
    # the other layers are whole and still give the clean store's numbers
    other = "pool1"
    np.testing.assert_array_equal(
        cx.differentiation(tree, n_units=10, resamples=1, layers=[other]).values,
        cx.differentiation(cx.open_activations(clean_store), n_units=10, resamples=1, layers=[other]).values)


def test_damage_is_reported_through_a_distributed_client(damaged_store, local_client):
    tree = cx.open_activations(damaged_store)
    with pytest.raises(DamagedChunkError, match="c/0/0/0/0"):
        local_client.compute(tree["conv1"]["activation"].data).result()


def test_verify_lists_exactly_the_damaged_chunks(clean_store, damaged_store, local_client, capsys):
    os.remove(_chunk_file(damaged_store, *DELETED))  # a completed batch's chunk file gone: zarr would read NaN
    assert verify_store(clean_store) == []
    found = verify_store(damaged_store, client=local_client)
    assert [(d.array, d.chunk) for d in found] == [FLIPPED, TRUNCATED, DELETED]  # by array
    by_array = {d.array: d for d in found}
    assert by_array[FLIPPED[0]].images == tuple(_ids(clean_store, 0, 4))
    assert (by_array[DELETED[0]].start, by_array[DELETED[0]].stop) == (4, 8)
    assert "missing" in by_array[DELETED[0]].reason

    assert cli.main(["info", damaged_store, "--verify"]) != 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if "chunk '" in line]
    assert len(listed) == 3
    for array, chunk in (FLIPPED, TRUNCATED, DELETED):
        assert any(f"'{array}'" in line and f"'{chunk}'" in line for line in listed)
    assert cli.main(["info", clean_store, "--verify"]) == 0
    assert "none is damaged" in capsys.readouterr().out


def test_repair_reextracts_the_damaged_batches(clean_store, damaged_store, tiny_model, local_client):
    os.remove(_chunk_file(damaged_store, *DELETED))
    _, report = _extract(damaged_store, tiny_model, local_client, repair=True, return_report=True)
    assert report.batches_computed == 3  # batches 0, 1 and 2: one damaged chunk each
    assert verify_store(damaged_store) == []
    assert_same_store(damaged_store, clean_store)
    # a repair of a sound store computes nothing
    _, report = _extract(damaged_store, tiny_model, local_client, repair=True, return_report=True)
    assert report.batches_computed == 0


def test_damage_outside_the_batches_is_refused_unchanged(damaged_store):
    before = cx_store.completed(damaged_store).copy()
    image_table = DamagedChunk("image", "c/0", None, 0, 12, (), "ValueError: checksum")
    with pytest.raises(cx_store.StoreError, match="new store"):
        mark_for_repair(damaged_store, [image_table])
    np.testing.assert_array_equal(cx_store.completed(damaged_store), before)


def test_a_store_without_checksums_still_opens_and_resumes(clean_store, tmp_path, tiny_model, local_client):
    path = tmp_path / "old.zarr"
    with dask.config.set({CHECKSUM_CONFIG: False}):
        _extract(path, tiny_model, local_client)
    document = json.load(open(path / "zarr.json"))
    codecs = [c["name"] for meta in document["consolidated_metadata"]["metadata"].values()
              for c in meta.get("codecs", [])]
    assert "crc32c" not in codecs and "blosc" in codecs
    assert_same_store(str(path), clean_store)
    # a resume of a batch keeps the store's own codecs (no checksum appears)
    group = cx_store.open_group(str(path), "r+")
    group["completed"][0:BATCH] = False
    _, report = _extract(path, tiny_model, local_client, return_report=True)
    assert report.batches_computed == 1
    assert_same_store(str(path), clean_store)
    assert all(c["name"] != "crc32c" for c in json.load(open(path / "conv1" / "activation" / "zarr.json"))["codecs"])
    assert verify_store(str(path)) == []


# --------------------------------------------------------------------------------------------- direct chunk reads
def _zarr_read(path, selection=Ellipsis):
    """zarr's own read of an array: the reference every direct read must equal, byte for byte."""
    import zarr

    return np.asarray(zarr.open_array(path, mode="r")[selection])


def test_chunks_of_a_local_store_are_read_from_their_files_without_zarr(clean_store, monkeypatch):
    """The analysis' chunk reads of a local store decode the chunk files in the reading thread (checksum, blosc),
    not through zarr's event loop, and return exactly zarr's values: with zarr's array reads made to fail, every
    activation and means array still reads, equal to zarr's read of it."""
    import zarr

    tree = cx.open_activations(clean_store)
    layers = cx.store.layer_names(tree)
    lazy = {f"{layer}/activation": tree[layer]["activation"].data for layer in layers}
    lazy.update({f"{layer}/filter_means/{name}": tree[layer]["filter_means"][name].data for layer in layers
                 if "filter_means" in tree[layer].children for name in ("filter_mean", "layer_mean")})
    expected = {path: _zarr_read(os.path.join(clean_store, path)) for path in lazy}

    def no_zarr_reads(self, selection):
        raise AssertionError("a chunk was read through zarr")

    monkeypatch.setattr(zarr.Array, "__getitem__", no_zarr_reads)
    for path, data in lazy.items():
        got = data.compute(scheduler="sync")
        assert got.dtype == expected[path].dtype and got.tobytes() == expected[path].tobytes(), path


@pytest.mark.parametrize("codecs", ["blosc+crc32c", "blosc", "zstd+crc32c"])
def test_direct_reads_take_any_selection_and_leave_other_codecs_to_zarr(tmp_path, codecs):
    """Selections across chunk borders and into the last, partial chunk equal zarr's read; a store written with
    other codecs (zstd) is left to zarr (no direct reader)."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    from cnndiff_xr.extraction.checksums import _direct_reader

    compressors = {"blosc+crc32c": [BloscCodec(cname="lz4", shuffle="bitshuffle"), Crc32cCodec()],
                   "blosc": [BloscCodec(cname="lz4", shuffle="bitshuffle")],
                   "zstd+crc32c": [ZstdCodec(), Crc32cCodec()]}[codecs]
    values = np.random.default_rng(0).normal(size=(11, 7, 5)).astype(np.float16)  # 11 rows: a last partial chunk
    path = str(tmp_path / "a.zarr")
    array = zarr.create_array(path, shape=values.shape, chunks=(4, 3, 5), dtype=values.dtype,
                              compressors=compressors)
    array[...] = values
    reader = _direct_reader(zarr.open_array(path, mode="r"))
    if codecs.startswith("zstd"):
        assert reader is None
        return
    assert reader is not None and (reader.checksum is not None) == codecs.endswith("crc32c")
    for selection in [(slice(0, 4), slice(0, 3), slice(0, 5)), (slice(3, 10), slice(1, 7), slice(2, 4)),
                      (slice(8, 11), slice(None), slice(None)), (slice(5, 5), slice(None), slice(None))]:
        got = reader.read(selection, values.shape)
        assert got is not None
        assert got.tobytes() == _zarr_read(path, selection).tobytes() == values[selection].tobytes(), selection
    # what it does not take (a step, an integer index) and a chunk file it cannot use are left to zarr
    assert reader.read((slice(0, 11, 2), slice(None), slice(None)), values.shape) is None
    assert reader.read((0, slice(None), slice(None)), values.shape) is None
    os.remove(os.path.join(path, "c", "1", "0", "0"))
    assert reader.read((slice(4, 8), slice(0, 3), slice(None)), values.shape) is None
