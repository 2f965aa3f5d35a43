"""Bad image input through a whole extraction on the real process cluster.

The images are checked where they are decoded: in ``dask worker`` processes (see ``real_cluster.py``), which run
without the root capability to ignore file permissions, so a ``chmod 000`` file is really unreadable there, and which
keep Pillow's default decompression-bomb limit (the bomb is a real 10000 x 10000 PNG of a few kB).
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import real_cluster
from PIL import Image
from tiny import TINY_LAYERS, TINY_SIZE, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr.extraction import images, lock, store

pytestmark = pytest.mark.timeout(300)

PILLOW_DEFAULT_LIMIT = 89478485  # Image.MAX_IMAGE_PIXELS as Pillow ships it: 1024 * 1024 * 1024 // 4 // 3


@pytest.fixture(scope="session")
def process_cluster(tmp_path_factory):
    cluster = real_cluster.acquire(tmp_path_factory)
    yield cluster
    real_cluster.release()


def _bomb_png(path, width=10_000, height=10_000):
    """A valid 1-bit PNG over Pillow's pixel limit, a few kB on disk (rows of zeros compress ~1000:1)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Good-but-odd images, and bad files, in one folder; returns (folder, good paths, bad {path: reason fragment})."""
    root = tmp_path_factory.mktemp("bad-images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    good = {
        "rgb.png": Image.fromarray(rgb),
        "one_pixel.png": Image.fromarray(rgb[:1, :1]),
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (40, 30), dtype=np.uint8)]), "RGBA"),
        "palette.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "sixteen_bit.png": Image.fromarray(rng.integers(0, 65536, (40, 30), dtype=np.uint16)),
    }
    for name, im in good.items():
        im.save(root / name)
    assert Image.open(root / "sixteen_bit.png").mode.startswith("I;16")
    assert Image.open(root / "cmyk.jpg").mode == "CMYK" and Image.open(root / "palette.png").mode == "P"

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "folder.jpg").mkdir()  # a directory named like an image
    bomb = _bomb_png(root / "bomb.png")
    assert bomb.stat().st_size < 100_000
    secret = root / "secret.png"
    Image.fromarray(rgb).save(secret)
    secret.chmod(0)  # unreadable for the workers (they obey permission bits, see real_cluster.py)
    bad = {
        str(root / "truncated.jpg"): "truncated",
        str(root / "empty.jpg"): "file is empty (0 bytes)",
        str(root / "text.jpg"): "not a recognised image format",
        str(root / "folder.jpg"): "folder holds no files",
        str(bomb): f"decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = {PILLOW_DEFAULT_LIMIT})",
        str(secret): "permission denied",
        str(root / "nothing" / "*.png"): "glob pattern matched nothing",
        str(root / "gone.png"): "no such file or folder",
    }
    return root, [str(root / name) for name in good], bad


def _sets(image_folder):
    root, good, bad = image_folder
    return {
        "odd": good[1:],  # 1x1, greyscale, RGBA, palette, CMYK, 16-bit
        "mixed": [good[0], *bad],  # one good image among every kind of bad file and path
        "noise": images.white_noise(3, seed=1, size=(TINY_SIZE, TINY_SIZE)),
    }


def test_on_error_raise_names_every_bad_file_and_writes_nothing(tmp_path, image_folder, process_cluster, tiny_model):
    path = tmp_path / "raise.zarr"
    with pytest.raises(images.ImageError) as err:
        cx.extract(_sets(image_folder), store=str(path), model=tiny_model, preprocess=tiny_preprocess(),
                   client=process_cluster.address, batch_size=4, progress=False)
    message = str(err.value)
    assert "8 image(s) or path(s) cannot be read; nothing was written" in message
    lines = {line.strip() for line in message.splitlines()[1:]}
    for source, reason in image_folder[2].items():
        assert any(line.startswith(f"{source}: ") and reason in line for line in lines), (source, reason, message)
    assert not any(good in message for good in image_folder[1])
    assert list(tmp_path.iterdir()) == []  # no store, no lock: nothing written


def test_on_error_skip_records_bad_files_and_extracts_the_rest(tmp_path, image_folder, process_cluster, tiny_model):
    import keras

    path = str(tmp_path / "skip.zarr")
    tree, report = cx.extract(_sets(image_folder), store=path, model=tiny_model, preprocess=tiny_preprocess(),
                              client=process_cluster.address, batch_size=4, on_error="skip", progress=False,
                              return_report=True)
    root, good, bad = image_folder
    skipped = tree.attrs["skipped_images"]
    assert skipped == cx.open_activations(path).attrs["skipped_images"] == report.skipped
    assert {s["source"] for s in skipped} == set(bad)
    for record in skipped:
        assert bad[record["source"]] in record["reason"], record
        assert record["set"] == "mixed"
    # file-level failures name the image id that was left out; paths that named no image have none
    assert {s["image"] for s in skipped if s["image"]} == {
        f"mixed/{os.path.basename(p)}" for p in bad if os.path.isfile(p)}

    # the rest: every good image, in order, with the values of the model run here on the same files
    table = images.image_table({"odd": good[1:], "mixed": [good[0]], "noise": _sets(image_folder)["noise"]})
    assert list(tree["image"].values) == table.ids == [
        *(f"odd/{os.path.basename(p)}" for p in good[1:]), "mixed/rgb.png", "noise/noise_000000",
        "noise/noise_000001", "noise/noise_000002"]
    assert bool(store.completed(path).all()) and report.images_computed == len(table)
    x = tiny_preprocess()(images.load_batch(table.refs, (TINY_SIZE, TINY_SIZE)).astype("float32"))
    probe = keras.Model(tiny_model.input, [tiny_model.get_layer(n).output for n in TINY_LAYERS[1:]])
    expected = dict(zip(TINY_LAYERS, [x, *(np.asarray(o) for o in probe(x, training=False))], strict=True))
    for name in TINY_LAYERS:
        got = tree[name]["activation"].compute(scheduler="synchronous").values
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # greyscale and 16-bit greyscale were broadcast to three equal channels, RGBA lost its alpha
    rgb_in = images.load_batch(table.refs[:6], (TINY_SIZE, TINY_SIZE))
    assert (rgb_in[1, ..., 0] == rgb_in[1, ..., 2]).all() and (rgb_in[5, ..., 0] == rgb_in[5, ..., 1]).all()
    assert lock.read_lock(path) is None


def test_every_image_bad_with_skip_writes_nothing(tmp_path, image_folder, process_cluster, tiny_model):
    _, _, bad = image_folder
    with pytest.raises(images.ImageError, match="every image was skipped") as err:
        cx.extract({"bad": list(bad)}, store=str(tmp_path / "none.zarr"), model=tiny_model,
                   preprocess=tiny_preprocess(), client=process_cluster.address, on_error="skip", progress=False)
    assert all(source in str(err.value) for source in bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec, reason", [
    ("nothing/*.png", "glob pattern matched nothing"),
    ("gone.png", "no such file or folder"),
    ("folder.jpg", "folder holds no files"),
])
def test_a_whole_set_that_names_nothing(image_folder, spec, reason):
    """As a whole set (not a list item) too: image_table(errors="collect") records it, the default raises."""
    root = image_folder[0]
    spec = str(root / spec)
    table = images.image_table({"a": spec, "b": images.white_noise(1)}, errors="collect")
    assert table.problems == [{"set": "a", "source": spec, "reason": table.problems[0]["reason"]}]
    assert reason in table.problems[0]["reason"] and table.ids == ["b/noise_000000"]
    with pytest.raises(images.ImageError, match=reason.split()[0]) as err:
        images.image_table({"a": spec})
    assert err.value.source == spec
