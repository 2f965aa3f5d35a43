"""Content identity: every image's sha256 is recorded in the store, and a rerun whose images changed is refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings

import numpy as np
import pytest
import zarr
from PIL import Image
from tiny import TINY_SIZE, tiny_preprocess, write_pngs

import cnndiff_xr as cx
from cnndiff_xr.extraction import images, store
from cnndiff_xr.schema import SHA256_COORD


# --------------------------------------------------------------------------------------------------- the digests
def test_digest_of_each_kind_of_image(tmp_path):
    (path,) = write_pngs(tmp_path, 1)
    assert images.image_digest(images.FileRef(str(path))) == hashlib.sha256(path.read_bytes()).hexdigest()

    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    base = images.image_digest(images.ArrayRef(pixels, (0, 255)))
    assert images.image_digest(images.ArrayRef(pixels.copy(), (0, 255))) == base  # content, not identity
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    others = [
        images.ArrayRef(changed, (0, 255)),  # one bit
        images.ArrayRef(pixels.reshape(6, 4, 3), (0, 255)),  # same bytes, another shape
        images.ArrayRef(pixels.astype(np.uint16), (0, 255)),  # same values, another dtype
        images.ArrayRef(pixels, (0, 510)),  # another value range: other decoded pixels
    ]
    digests = [images.image_digest(ref) for ref in others]
    assert base not in digests and len(set(digests)) == len(digests)

    # a movie frame is hashed like an array with the same content (its dtype's default value range made explicit)
    movie = np.stack([pixels, changed])
    np.save(tmp_path / "movie.npy", movie)
    frame = images.NpyFrameRef(str(tmp_path / "movie.npy"), 1)
    assert images.image_digest(frame) == images.image_digest(images.ArrayRef(changed, (0, 255)))
    assert images.image_digest(images.NpyFrameRef(str(tmp_path / "movie.npy"), 0)) == base

    noise = images.NoiseRef(seed=3, index=2, height=8, width=8)
    variants = [images.NoiseRef(4, 2, 8, 8), images.NoiseRef(3, 1, 8, 8), images.NoiseRef(3, 2, 8, 9)]
    assert images.image_digest(noise) == images.image_digest(images.NoiseRef(3, 2, 8, 8))
    assert images.image_digest(noise) not in {images.image_digest(v) for v in variants}


class PixelsOnly:
    """A user's own reference without digest(): identified by its decoded pixels."""

    def __init__(self, value: int):
        self.value = value

    def read(self) -> np.ndarray:
        return np.full((5, 5, 3), self.value, dtype=np.uint8)

    def describe(self) -> str:
        return f"constant {self.value}"


def test_reference_without_digest_is_identified_by_its_pixels(tmp_path):
    ref = PixelsOnly(7)
    assert images.image_digest(ref) == images.image_digest(images.ArrayRef(ref.read(), (0, 255)))
    assert images.image_digest(ref) != images.image_digest(PixelsOnly(8))
    assert images.screen_image(ref) == (None, images.image_digest(ref))


def test_screen_image_decodes_and_hashes_once(tmp_path):
    (path,) = write_pngs(tmp_path, 1)
    assert images.screen_image(images.FileRef(str(path))) == (None, hashlib.sha256(path.read_bytes()).hexdigest())
    broken = tmp_path / "broken.png"
    broken.write_bytes(path.read_bytes()[:40])
    reason, digest = images.screen_image(images.FileRef(str(broken)))
    assert digest is None and reason == images.check_image(images.FileRef(str(broken))) is not None
    assert images.screen_image(images.FileRef(str(tmp_path / "gone.png"))) == ("file not found", None)


# --------------------------------------------------------------------------------------------------- in a store
@pytest.fixture()
def photo_sets(tmp_path):
    folder = tmp_path / "photos"
    write_pngs(folder, 5)
    rng = np.random.default_rng(1)
    return {
        "photos": str(folder),
        "array": rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
        "noise": images.white_noise(3, seed=3, size=(TINY_SIZE, TINY_SIZE)),
    }


def _extract(sets, path, model, client, **kwargs):
    kwargs.setdefault("progress", False)
    return cx.extract(sets, store=path, model=model, preprocess=tiny_preprocess(), client=client, batch_size=4,
                      return_report=True, **kwargs)


def _files(path):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(path) for f in names}


def test_digests_are_recorded_and_an_unchanged_rerun_passes(tmp_path, photo_sets, tiny_model, local_client):
    path = str(tmp_path / "s.zarr")
    tree, _ = _extract(photo_sets, path, tiny_model, local_client)
    table = images.image_table(photo_sets)
    recorded = [str(v) for v in tree[SHA256_COORD].values]
    assert recorded == [images.image_digest(ref) for ref in table.refs]
    first = table.refs[0]
    assert recorded[0] == hashlib.sha256(open(first.path, "rb").read()).hexdigest()
    before = _files(path)
    _, report = _extract(photo_sets, path, tiny_model, local_client)
    assert report.batches_computed == 0 and report.batches_already_complete == 4
    assert _files(path) == before  # nothing rewritten


def test_changed_file_is_refused_naming_it(tmp_path, photo_sets, tiny_model, local_client):
    path = str(tmp_path / "s.zarr")
    _extract(photo_sets, path, tiny_model, local_client)
    before = _files(path)
    victim = os.path.join(photo_sets["photos"], "img03.png")
    Image.fromarray(np.zeros((24, 20, 3), dtype=np.uint8)).save(victim)  # same name, other pixels
    with pytest.raises(store.StoreError) as info:
        _extract(photo_sets, path, tiny_model, local_client)
    message = str(info.value)
    assert "1 of its 14 images changed content" in message and path in message
    assert f"photos/img03.png: {victim}" in message and "img02" not in message
    assert "new store" in message and "restore" in message
    assert _files(path) == before  # refused before anything was written


def test_changed_array_is_refused(tmp_path, photo_sets, tiny_model, local_client):
    path = str(tmp_path / "s.zarr")
    _extract(photo_sets, path, tiny_model, local_client)
    changed = dict(photo_sets, array=photo_sets["array"].copy())
    changed["array"][[1, 4], 0, 0, 0] ^= 1  # one bit in each of two images
    with pytest.raises(store.StoreError, match=r"2 of its 14 images changed content[^\n]*\n"
                                               r"  array/000001: array:array\[1\]\n  array/000004: array:array\[4\]"):
        _extract(changed, path, tiny_model, local_client)


def test_changed_noise_parameters_are_refused(tmp_path, photo_sets, tiny_model, local_client):
    path = str(tmp_path / "s.zarr")
    _extract(photo_sets, path, tiny_model, local_client)
    # another size: same ids and sources, other pixels
    resized = dict(photo_sets, noise=images.white_noise(3, seed=3, size=(TINY_SIZE, TINY_SIZE + 1)))
    with pytest.raises(store.StoreError, match=r"3 of its 14 images changed content(.|\n)*noise/noise_000000: "
                                               r"white_noise\(seed=3\)\[0\]"):
        _extract(resized, path, tiny_model, local_client)
    # another seed also names other sources: refused as another image table
    reseeded = dict(photo_sets, noise=images.white_noise(3, seed=4, size=(TINY_SIZE, TINY_SIZE)))
    with pytest.raises(store.StoreError, match="different image table"):
        _extract(reseeded, path, tiny_model, local_client)


def test_store_without_digests_still_resumes(tmp_path, photo_sets, tiny_model, local_client, capsys):
    """A store made before content digests (no sha256 coordinate) resumes as before, without a check or a warning."""
    path, clean = str(tmp_path / "old.zarr"), str(tmp_path / "clean.zarr")
    _extract(photo_sets, clean, tiny_model, local_client)
    shutil.copytree(clean, path)
    shutil.rmtree(os.path.join(path, SHA256_COORD))  # what an older version wrote: no sha256 coordinate
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    group["completed"][12:] = False  # the last batch (images 12, 13) is missing
    with warnings.catch_warnings():  # zarr's notice that consolidated metadata is not in the v3 spec
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(group.store_path)
    assert SHA256_COORD not in cx.open_activations(path).coords
    capsys.readouterr()
    tree, report = _extract(photo_sets, path, tiny_model, local_client, progress=True)
    err = capsys.readouterr().err
    assert (report.batches_computed, report.batches_already_complete) == (1, 3)
    assert "sha256" not in err and "warn" not in err.lower() and "changed" not in err
    assert SHA256_COORD not in tree.coords and tree.cnndiff.complete
    reference = cx.open_activations(clean)
    for layer in tree.cnndiff.layers:
        np.testing.assert_array_equal(tree[layer]["activation"].values, reference[layer]["activation"].values)
