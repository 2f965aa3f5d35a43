"""Tests for cnndiff_xr.extraction.images: sources, decoding, resizing, the image table."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import uuid
import warnings
import zlib

import fsspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from cnndiff_xr.extraction import images
from cnndiff_xr.extraction.images import (
    ArrayRef,
    FileRef,
    ImageError,
    ImageRef,
    ImageSource,
    NoiseRef,
    NpyFrameRef,
    as_source,
    check_image,
    files,
    from_array,
    from_refs,
    image_table,
    load_batch,
    movie_frames,
    read_rgb,
    resize,
    white_noise,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path, array: np.ndarray | Image.Image, fmt: str | None = None) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    img.save(path, format=fmt)
    return path


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    h, w = array.shape[:2]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _ids(source: ImageSource) -> list[str]:
    return [local_id for local_id, _, _ in source.entries()]


# ---------------------------------------------------------------------------------------------
# files()
# ---------------------------------------------------------------------------------------------


def test_files_glob_sorted_with_absolute_sources(tmp_path, monkeypatch):
    for name in ["b.jpg", "a.jpg", "c.png"]:
        _save(tmp_path / "cats" / name, _rgb(4, 4))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)  # a relative pattern must still give absolute paths

    source = files("cats/*.jpg")
    entries = source.entries()

    assert [e[0] for e in entries] == ["a.jpg", "b.jpg"]
    expected = [str(tmp_path / "cats" / n) for n in ["a.jpg", "b.jpg"]]
    assert [e[1] for e in entries] == expected
    assert [e[2] for e in entries] == [FileRef(p) for p in expected]
    assert len(source) == 2


def test_files_folder_is_searched_recursively_by_extension(tmp_path):
    _save(tmp_path / "set" / "a.PNG", _rgb(3, 3))
    _save(tmp_path / "set" / "sub" / "b.jpeg", _rgb(3, 3))
    _save(tmp_path / "set" / "sub" / "deeper" / "c.TIF", _rgb(3, 3), "TIFF")
    (tmp_path / "set" / "readme.txt").write_text("x")
    _save(tmp_path / "set" / ".hidden.jpg", _rgb(3, 3))  # e.g. macOS "._x.jpg"
    _save(tmp_path / "set" / ".cache" / "d.jpg", _rgb(3, 3))

    assert _ids(files(tmp_path / "set")) == ["a.PNG", "sub/b.jpeg", "sub/deeper/c.TIF"]
    # Extensions are configurable (and normalised: no dot, upper case).
    assert _ids(files(tmp_path / "set", extensions=["PNG"])) == ["a.PNG"]
    everything = ["a.PNG", "readme.txt", "sub/b.jpeg", "sub/deeper/c.TIF"]
    assert _ids(files(str(tmp_path / "set"), extensions=None)) == everything


def test_files_recursive_glob(tmp_path):
    _save(tmp_path / "d" / "x.png", _rgb(2, 2))
    _save(tmp_path / "d" / "s" / "y.png", _rgb(2, 2))
    assert _ids(files(str(tmp_path / "d" / "**" / "*.png"))) == ["s/y.png", "x.png"]


def test_files_explicit_list_keeps_order_uses_common_parent_and_dedupes(tmp_path):
    one = _save(tmp_path / "a" / "one.png", _rgb(2, 2))
    _save(tmp_path / "b" / "two.png", _rgb(2, 2))
    _save(tmp_path / "b" / "inner" / "three.jpg", _rgb(2, 2))

    source = files([tmp_path / "b", one, one])
    assert _ids(source) == ["b/inner/three.jpg", "b/two.png", "a/one.png"]
    assert [e[1] for e in source.entries()][-1] == one

    # A list of two files in one folder: ids relative to that folder.
    assert _ids(files((str(tmp_path / "b" / "two.png"), str(tmp_path / "b" / "inner" / "three.jpg")))) == [
        "two.png",
        "inner/three.jpg",
    ]


def test_same_file_name_in_two_subfolders_gets_distinct_ids(tmp_path):
    _save(tmp_path / "data" / "x" / "img.png", _rgb(2, 2, seed=1))
    _save(tmp_path / "data" / "y" / "img.png", _rgb(2, 2, seed=2))

    assert _ids(files(tmp_path / "data")) == ["x/img.png", "y/img.png"]
    assert _ids(files(str(tmp_path / "data" / "*" / "img.png"))) == ["x/img.png", "y/img.png"]
    table = image_table({"s": tmp_path / "data"})
    assert table.ids == ["s/x/img.png", "s/y/img.png"]


@pytest.mark.parametrize("spec", ["missing_folder", "missing.jpg", "nothing/*.jpg", "*.nope"])
def test_files_missing_or_no_match_names_the_spec(tmp_path, spec):
    (tmp_path / "nothing").mkdir()
    full = str(tmp_path / spec)
    with pytest.raises(ImageError, match=re.escape(repr(full))):
        files(full)


def test_files_empty_folder_and_empty_list(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ImageError, match=re.escape(str(tmp_path / "empty"))):
        files(tmp_path / "empty")
    with pytest.raises(ImageError, match="empty"):
        files([])
    with pytest.raises(TypeError, match="int"):
        files([str(tmp_path), 3])


def test_glob_matching_a_folder_named_like_an_image_skips_it(tmp_path):
    _save(tmp_path / "a.jpg", _rgb(2, 2))
    (tmp_path / "x.jpg").mkdir()
    _save(tmp_path / "x.jpg" / "inside.png", _rgb(2, 2))

    entries = files(str(tmp_path / "*.jpg")).entries()
    assert [e[0] for e in entries] == ["a.jpg"]

    with pytest.raises(ImageError, match="only folders"):
        files(str(tmp_path / "x.j*g"))

    # Named explicitly in a list, the folder is searched like any folder.
    assert _ids(files([tmp_path / "x.jpg"])) == ["inside.png"]


def test_files_refuses_npy_movies(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ImageError, match="movie_frames"):
        files(tmp_path / "m.npy")


def test_files_fsspec_memory_and_file_urls(tmp_path):
    root = f"/cnndiff_test_{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    pixels = _rgb(5, 6, seed=3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    try:
        fs.pipe(f"{root}/cats/a.png", buf.getvalue())
        fs.pipe(f"{root}/cats/sub/b.PNG", buf.getvalue())
        fs.pipe(f"{root}/cats/notes.txt", b"x")

        globbed = files(f"memory://{root}/cats/*.png")
        assert _ids(globbed) == ["a.png"]
        (_, source, ref) = globbed.entries()[0]
        assert ref.path == source == f"memory://{root}/cats/a.png"
        np.testing.assert_array_equal(read_rgb(ref), pixels)

        assert _ids(files(f"memory://{root}/cats")) == ["a.png", "sub/b.PNG"]
        with pytest.raises(ImageError, match="matched nothing"):
            files(f"memory://{root}/cats/*.gif")
        assert "file not found" in check_image(FileRef(f"memory://{root}/cats/gone.png"))
    finally:
        fs.rm(root, recursive=True)

    local = _save(tmp_path / "u" / "p.png", pixels)
    url_source = files(f"file://{tmp_path / 'u'}")
    assert _ids(url_source) == ["p.png"]
    assert url_source.entries()[0][1].startswith("file://")
    np.testing.assert_array_equal(read_rgb(url_source.entries()[0][2]), read_rgb(FileRef(local)))

    with pytest.raises(ImageError, match="mixes local paths and URLs"):
        files([local, f"file://{local}"])


# ---------------------------------------------------------------------------------------------
# from_array(), movie_frames(), white_noise(), as_source()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 5), (3, 4, 5, 1), (3, 4, 5, 3), (3, 4, 5, 4)])
def test_from_array_uint8_shapes(shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    source = from_array(array, name="stim")
    entries = source.entries()

    assert [e[0] for e in entries] == ["000000", "000001", "000002"]
    assert [e[1] for e in entries] == ["array:stim[0]", "array:stim[1]", "array:stim[2]"]
    if len(shape) == 3 or shape[3] == 1:
        expected = np.repeat(array.reshape(3, 4, 5, 1), 3, axis=3)
    else:
        expected = array[..., :3]
    got = np.stack([read_rgb(ref) for _, _, ref in entries])
    assert got.dtype == np.uint8 and got.shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(got, expected)


def test_from_array_uint16_float_bool_and_explicit_ranges():
    rng = np.random.default_rng(1)
    a16 = rng.integers(0, 65536, size=(2, 3, 4), dtype=np.uint16)
    a16[0, 0, :3] = [0, 65535, 32896]  # ends of the range and an exact 128 * 257
    got = read_rgb(from_array(a16).entries()[0][2])[..., 0]
    np.testing.assert_array_equal(got, np.round(a16[0] / 257).astype(np.uint8))
    assert list(got[0, :3]) == [0, 255, 128]

    af = rng.random((2, 3, 4, 3))
    np.testing.assert_array_equal(read_rgb(from_array(af).entries()[1][2]), np.rint(af[1] * 255).astype(np.uint8))

    ab = np.array([[[True, False]]])
    assert read_rgb(from_array(ab).entries()[0][2])[0, :, 0].tolist() == [255, 0]

    ai = np.array([[[-1000, 0, 1000]]], dtype=np.int16)
    got = read_rgb(from_array(ai, value_range=(-1000, 1000)).entries()[0][2])[0, :, 0]
    assert got.tolist() == [0, 128, 255]  # 127.5 rounds to even: 128


def test_from_array_out_of_range_values_raise_naming_value_range():
    with pytest.raises(ImageError, match="value_range"):
        from_array(np.full((1, 2, 2), 300, dtype=np.int32))
    with pytest.raises(ImageError, match="value_range"):
        from_array(np.full((1, 2, 2), 2.0))  # float images in 0..255 need value_range=(0, 255)
    with pytest.raises(ImageError, match="NaN"):
        from_array(np.full((1, 2, 2), np.nan))
    with pytest.raises(ImageError, match="value_range"):
        from_array(np.zeros((1, 2, 2)), value_range=(1, 1))
    # In range for an explicit value_range: fine.
    assert len(from_array(np.full((1, 2, 2), 300, dtype=np.int32), value_range=(0, 1000))) == 1


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 5), np.uint8),  # one image without its leading axis
        np.zeros((1, 2, 3, 4, 5), np.uint8),
        np.zeros((2, 4, 5, 2), np.uint8),  # two channels
        np.zeros((0, 4, 5), np.uint8),
        np.zeros((2, 4, 5), dtype=object),
        np.zeros((2, 4, 5), dtype=complex),
    ],
)
def test_from_array_bad_shapes_and_dtypes_name_the_array(array):
    with pytest.raises(ImageError, match="array"):
        from_array(array)


def test_movie_frames_every_kth_frame(tmp_path):
    frames = np.arange(10 * 4 * 5 * 3, dtype=np.uint16).reshape(10, 4, 5, 3) % 256
    frames = frames.astype(np.uint8)
    frames[:, 0, 0, 0] = np.arange(10)  # frame index in a pixel
    path = tmp_path / "movie_one.npy"
    np.save(path, frames)

    source = movie_frames(path, step=3)
    entries = source.entries()
    assert [e[0] for e in entries] == [f"movie_one_frame{i:06d}" for i in (0, 3, 6, 9)]
    assert [e[1] for e in entries] == [f"{path}#frame={i}" for i in (0, 3, 6, 9)]
    assert [e[2] for e in entries] == [NpyFrameRef(str(path), i) for i in (0, 3, 6, 9)]
    for (_, _, ref), i in zip(entries, (0, 3, 6, 9), strict=True):
        np.testing.assert_array_equal(read_rgb(ref), frames[i])

    assert [e[2].frame for e in movie_frames(path, step=2, start=1, stop=6).entries()] == [1, 3, 5]
    assert [e[2].frame for e in movie_frames(path, step=4, stop=100).entries()] == [0, 4, 8]


def test_movie_frames_greyscale_and_float(tmp_path):
    grey = np.random.default_rng(2).integers(0, 256, size=(4, 3, 5), dtype=np.uint8)
    np.save(tmp_path / "grey.npy", grey)
    ref = movie_frames(tmp_path / "grey.npy", step=2).entries()[1][2]
    np.testing.assert_array_equal(read_rgb(ref), np.repeat(grey[2][..., None], 3, axis=2))

    floats = np.random.default_rng(3).random((3, 2, 2)) * 10
    np.save(tmp_path / "f.npy", floats)
    ref = movie_frames(tmp_path / "f.npy", value_range=(0, 10)).entries()[2][2]
    np.testing.assert_array_equal(read_rgb(ref)[..., 0], np.rint(floats[2] / 10 * 255).astype(np.uint8))
    # Without the range the default (0, 1) does not fit: an error naming the frame, not clipping.
    with pytest.raises(ImageError, match=re.escape("f.npy#frame=0")):
        read_rgb(movie_frames(tmp_path / "f.npy").entries()[0][2])


def test_movie_frames_validation(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.zeros((5, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="step"):
        movie_frames(path, step=0)
    with pytest.raises(TypeError, match="step"):
        movie_frames(path, step=1.5)
    with pytest.raises(ValueError, match="start"):
        movie_frames(path, start=-1)
    with pytest.raises(ImageError, match="no frames"):
        movie_frames(path, start=5)
    with pytest.raises(ImageError, match="file not found"):
        movie_frames(tmp_path / "missing.npy")
    np.save(tmp_path / "flat.npy", np.zeros((5, 2), np.uint8))
    with pytest.raises(ImageError, match="flat.npy"):
        movie_frames(tmp_path / "flat.npy")
    assert "out of range" in check_image(NpyFrameRef(str(path), 7))


def test_white_noise_reproducible_and_order_independent():
    a = white_noise(4, seed=7, size=(6, 5))
    entries = a.entries()
    assert [e[0] for e in entries] == [f"noise_{i:06d}" for i in range(4)]
    assert [e[1] for e in entries] == [f"white_noise(seed=7)[{i}]" for i in range(4)]

    forward = [read_rgb(ref) for _, _, ref in entries]
    backward = [read_rgb(ref) for _, _, ref in reversed(white_noise(4, seed=7, size=(6, 5)).entries())][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert x.shape == (6, 5, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, y)
    # Image 2 alone equals image 2 of the batch; a different index or seed differs.
    np.testing.assert_array_equal(read_rgb(NoiseRef(7, 2, 6, 5)), forward[2])
    assert not np.array_equal(forward[0], forward[1])
    assert not np.array_equal(read_rgb(white_noise(1, seed=8, size=(6, 5)).entries()[0][2]), forward[0])
    with pytest.raises(ValueError, match="n must"):
        white_noise(0)
    with pytest.raises(ValueError, match="size"):
        white_noise(1, size=(0, 3))


def test_as_source_dispatch(tmp_path):
    _save(tmp_path / "a.png", _rgb(2, 2))
    src = white_noise(1)
    assert as_source(src) is src
    assert _ids(as_source(str(tmp_path))) == ["a.png"]
    assert _ids(as_source(tmp_path)) == ["a.png"]
    assert _ids(as_source([str(tmp_path / "a.png")])) == ["a.png"]
    assert _ids(as_source(np.zeros((2, 3, 3), np.uint8))) == ["000000", "000001"]
    with pytest.raises(TypeError, match="dict"):
        as_source({"a": 1})


def test_refs_and_errors_pickle():
    for ref in [FileRef("/x.png"), NpyFrameRef("/m.npy", 3), NoiseRef(1, 2, 3, 4)]:
        assert pickle.loads(pickle.dumps(ref)) == ref
    arr_ref = from_array(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)).entries()[1][2]
    copy = pickle.loads(pickle.dumps(arr_ref))
    np.testing.assert_array_equal(read_rgb(copy), read_rgb(arr_ref))
    assert arr_ref == arr_ref and hash(arr_ref) == hash(arr_ref)

    err = pickle.loads(pickle.dumps(ImageError("cannot read image /a.png: boom", source="/a.png", reason="boom")))
    assert (str(err), err.source, err.reason) == ("cannot read image /a.png: boom", "/a.png", "boom")


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def test_decode_rgb_png_and_1x1(tmp_path):
    pixels = _rgb(7, 9)
    np.testing.assert_array_equal(read_rgb(FileRef(_save(tmp_path / "a.png", pixels))), pixels)
    one = read_rgb(FileRef(_save(tmp_path / "one.bmp", np.array([[[1, 2, 3]]], np.uint8))))
    assert one.shape == (1, 1, 3) and one.tolist() == [[[1, 2, 3]]]


def test_decode_greyscale_and_bilevel(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, size=(4, 6), dtype=np.uint8)
    got = read_rgb(FileRef(_save(tmp_path / "g.png", grey)))
    np.testing.assert_array_equal(got, np.stack([grey] * 3, axis=-1))

    bits = np.array([[True, False, True]])
    got = read_rgb(FileRef(_save(tmp_path / "b.png", Image.fromarray(bits).convert("1"))))
    assert got[0, :, 1].tolist() == [255, 0, 255]


def test_decode_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.array([[[200, 100, 50, 0], [10, 20, 30, 128]]], dtype=np.uint8)
    got = read_rgb(FileRef(_save(tmp_path / "a.png", rgba)))
    np.testing.assert_array_equal(got, rgba[..., :3])

    la = Image.fromarray(np.array([[[90, 0], [40, 255]]], dtype=np.uint8), mode="LA")
    got = read_rgb(FileRef(_save(tmp_path / "la.png", la)))
    assert got[0, :, 2].tolist() == [90, 40]


def test_decode_palette_with_transparency(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (768 - 9))
    im.putdata([0, 1, 2])
    im.info["transparency"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the RGBA route must not trigger Pillow's palette warning
        got = read_rgb(FileRef(_save(tmp_path / "p.png", im)))
    assert got.tolist() == [[[10, 20, 30], [40, 50, 60], [70, 80, 90]]]


def test_decode_cmyk(tmp_path):
    cmyk = np.array([[[0, 255, 0, 0], [100, 50, 200, 30], [200, 200, 200, 200]]], dtype=np.uint8)
    path = _save(tmp_path / "c.tif", Image.frombytes("CMYK", (3, 1), cmyk.tobytes()), "TIFF")
    got = read_rgb(FileRef(path)).astype(int)
    c = cmyk.astype(float)
    expected = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255
    np.testing.assert_allclose(got, expected, atol=0.51)


def test_decode_16bit_greyscale_scales_not_clips(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 40000, 65535]], dtype=np.uint16)
    expected = np.round(values / 257).astype(np.uint8)  # [0, 1, 4, 128, 156, 255]

    png = tmp_path / "g16.png"
    png.write_bytes(_png16(values, color_type=0))
    with Image.open(png) as im:
        assert im.mode == "I;16"
    np.testing.assert_array_equal(read_rgb(FileRef(str(png)))[..., 0], expected)

    big_endian = _save(tmp_path / "g16.tif", Image.fromarray(values.astype(">u2")), "TIFF")
    np.testing.assert_array_equal(read_rgb(FileRef(big_endian))[..., 1], expected)

    mode_i = _save(tmp_path / "i.tif", Image.fromarray(values.astype(np.int32)), "TIFF")
    np.testing.assert_array_equal(read_rgb(FileRef(mode_i))[..., 2], expected)

    mode_f = _save(tmp_path / "f.tif", Image.fromarray(values.astype(np.float32)), "TIFF")
    np.testing.assert_array_equal(read_rgb(FileRef(mode_f))[..., 0], expected)


def test_decode_32bit_int_outside_16bit_range_is_an_error(tmp_path):
    path = _save(tmp_path / "i.tif", Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "TIFF")
    reason = check_image(FileRef(path))
    assert reason is not None and "0..65535" in reason


def test_decode_16bit_rgb_uses_pillows_high_byte(tmp_path):
    values = np.array([[[0, 255, 256], [65535, 32768, 1000]]], dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png16(values, color_type=2))
    np.testing.assert_array_equal(read_rgb(FileRef(str(path))), (values >> 8).astype(np.uint8))


def test_decode_multiframe_gif_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((3, 3, 3), v, np.uint8)) for v in (0, 255)]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.n_frames == 2
    assert read_rgb(FileRef(path)).max() == 0


def test_decode_keeps_raw_pixels_ignoring_exif_orientation(tmp_path):
    pixels = _rgb(2, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees"
    path = str(tmp_path / "rot.png")
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as im:  # the tag was stored: honouring it would rotate the image
        assert ImageOps.exif_transpose(im).size == (2, 4)
    np.testing.assert_array_equal(read_rgb(FileRef(path)), pixels)


@pytest.fixture
def bad_files(tmp_path):
    """Paths of broken images, with a snippet of the reason each must give."""
    jpeg = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(jpeg, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("this is not a JPEG\n")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {
        str(truncated): "truncated",
        str(empty): "empty",
        str(text): "not a recognised image format",
        str(folder): "directory",
        str(tmp_path / "missing.png"): "not found",
    }


def test_bad_files_raise_image_error_naming_file_and_reason(bad_files):
    for path, reason in bad_files.items():
        with pytest.raises(ImageError) as info:
            read_rgb(FileRef(path))
        assert path in str(info.value)
        assert reason in str(info.value)
        assert info.value.source == path


def test_check_image_reports_reasons_and_none_for_good(tmp_path, bad_files):
    for path, reason in bad_files.items():
        got = check_image(FileRef(path))
        assert isinstance(got, str) and reason in got
    good = _save(tmp_path / "good.jpg", _rgb(8, 8))
    assert check_image(FileRef(good)) is None
    assert check_image(white_noise(1).entries()[0][2]) is None
    assert check_image(ArrayRef(np.full((2, 2), 9.0), (0, 1))) is not None  # out of range


@pytest.mark.parametrize("side", [12, 20])  # 144 px: Pillow warns; 400 px (> 2x limit): Pillow raises
def test_decompression_bomb_limit_is_an_error(tmp_path, monkeypatch, side):
    path = _save(tmp_path / "big.png", _rgb(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageError, match="exceeds Pillow's decompression-bomb limit") as info:
        read_rgb(FileRef(path))
    assert path in str(info.value)
    assert "decompression-bomb" in check_image(FileRef(path))
    assert warnings.filters == filters_before  # the module's warning filter did not leak
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert check_image(FileRef(path)) is None


def test_unreadable_file_is_permission_denied(tmp_path, monkeypatch):
    path = _save(tmp_path / "secret.png", _rgb(2, 2))
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            # Running as root: chmod does not block reads, so make opening fail the way the OS
            # would (the module opens local files with the builtin ``open``, looked up globally).
            real_open = open

            def fake_open(file, *args, **kwargs):
                if os.fspath(file) == path:
                    raise PermissionError(13, "Permission denied", path)
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr(images, "open", fake_open, raising=False)
        with pytest.raises(ImageError, match="permission denied") as info:
            read_rgb(FileRef(path))
        assert path in str(info.value)
        assert check_image(FileRef(path)) == "permission denied"
    finally:
        os.chmod(path, 0o644)


class _Checkerboard:
    """A new kind of image in one small class: it reads and describes itself (the ImageRef protocol)."""

    def __init__(self, size: int):
        self.size = size

    def read(self) -> np.ndarray:
        board = (np.indices((self.size, self.size)).sum(axis=0) % 2 * 255).astype(np.uint8)
        return np.repeat(board[..., None], 3, axis=2)

    def describe(self) -> str:
        return f"checkerboard({self.size})"


def test_any_object_following_the_protocol_is_an_image_reference():
    refs = [_Checkerboard(4), _Checkerboard(6)]
    assert all(isinstance(ref, ImageRef) for ref in refs)
    assert all(isinstance(ref, ImageRef) for ref in [FileRef("/x.png"), NoiseRef(0, 0, 2, 2)])
    table = image_table({"boards": refs, "noise": white_noise(1)})
    assert table.ids == ["boards/000000", "boards/000001", "noise/noise_000000"]
    assert table.sources[:2] == ["checkerboard(4)", "checkerboard(6)"]
    batch = load_batch(table.refs, (4, 4))
    np.testing.assert_array_equal(batch[0], refs[0].read())
    assert check_image(refs[1]) is None
    assert pickle.loads(pickle.dumps(refs[1])).describe() == "checkerboard(6)"  # travels to workers
    assert _ids(as_source(refs[0])) == ["000000"]
    with pytest.raises(TypeError, match="str is not an image reference"):
        from_refs([refs[0], "x.png"])


def test_read_rgb_rejects_non_refs():
    with pytest.raises(TypeError, match="str"):
        read_rgb("/a/path.png")


# ---------------------------------------------------------------------------------------------
# resize() and load_batch()
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), ky=st.integers(1, 4), kx=st.integers(1, 4), seed=st.integers(0, 99))
def test_nearest_integer_upscale_matches_numpy_indexing(h, w, ky, kx, seed):
    rgb = _rgb(h, w, seed)
    rows = np.arange(h * ky) // ky
    cols = np.arange(w * kx) // kx
    np.testing.assert_array_equal(resize(rgb, (h * ky, w * kx)), rgb[rows][:, cols])


def test_nearest_stretch_ignores_aspect_and_bilinear_keeps_constants():
    rgb = _rgb(10, 30)
    out = resize(rgb, (8, 8), "nearest")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert set(map(tuple, out.reshape(-1, 3))) <= set(map(tuple, rgb.reshape(-1, 3)))  # only existing pixels

    flat = np.full((9, 13, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize(flat, (5, 4), "bilinear"), np.full((5, 4, 3), 77, np.uint8))
    # Deterministic.
    np.testing.assert_array_equal(resize(rgb, (7, 11), "bilinear"), resize(rgb, (7, 11), "bilinear"))


def test_center_crop_keeps_the_centre():
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, 50:150] = 255  # the central square
    out = resize(wide, (50, 50), "center_crop")
    assert out.shape == (50, 50, 3)
    assert out.min() == 255
    assert resize(wide, (50, 50), "nearest").min() == 0  # stretching keeps the black borders

    tall = np.zeros((90, 30, 3), np.uint8)
    tall[30:60] = 200
    out = resize(tall, (20, 40), "center_crop")  # target 1:2 -> central 15 x 30 rows 37..51
    assert out.shape == (20, 40, 3)
    assert out.min() == 200 == out.max()


def test_resize_errors():
    rgb = _rgb(4, 4)
    with pytest.raises(ValueError, match="resize") as info:
        resize(rgb, (2, 2), "bicubic")
    for name in ("nearest", "bilinear", "center_crop"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="size"):
        resize(rgb, (0, 2))
    with pytest.raises(ValueError, match="rgb"):
        resize(rgb.astype(np.float32), (2, 2))


def test_load_batch_mixes_ref_types(tmp_path):
    path = _save(tmp_path / "a.png", _rgb(6, 8))
    refs = [FileRef(path), NoiseRef(0, 1, 5, 5), from_array(np.zeros((1, 3, 3), np.uint8)).entries()[0][2]]
    batch = load_batch(refs, (4, 4))
    assert batch.shape == (3, 4, 4, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], resize(read_rgb(FileRef(path)), (4, 4)))
    assert batch[2].max() == 0
    assert load_batch([], (4, 5)).shape == (0, 4, 5, 3)
    # The policy is checked before any image is read.
    with pytest.raises(ValueError, match="resize"):
        load_batch([FileRef(str(tmp_path / "missing.png"))], (4, 4), "area")
    with pytest.raises(ImageError, match="missing.png"):
        load_batch([FileRef(str(tmp_path / "missing.png"))], (4, 4))


# ---------------------------------------------------------------------------------------------
# image_table()
# ---------------------------------------------------------------------------------------------


def test_image_table_ids_sets_sources(tmp_path):
    _save(tmp_path / "cats" / "a.png", _rgb(2, 2))
    _save(tmp_path / "cats" / "b.png", _rgb(2, 2))
    table = image_table({"noise": white_noise(2), "cats": tmp_path / "cats", "arr": np.zeros((1, 2, 2), np.uint8)})

    assert table.ids == ["noise/noise_000000", "noise/noise_000001", "cats/a.png", "cats/b.png", "arr/000000"]
    assert table.sets == ["noise", "noise", "cats", "cats", "arr"]
    assert table.sources[2] == str(tmp_path / "cats" / "a.png")
    assert table.refs[2] == FileRef(str(tmp_path / "cats" / "a.png"))
    assert len(table) == 5 and len(set(table.ids)) == 5
    assert table.set_names() == ["noise", "cats", "arr"]


def test_image_table_same_images_in_two_sets_get_distinct_ids(tmp_path):
    _save(tmp_path / "a.png", _rgb(2, 2))
    table = image_table({"one": tmp_path, "two": str(tmp_path)})
    assert table.ids == ["one/a.png", "two/a.png"]
    assert table.refs[0] == table.refs[1]


def test_image_table_duplicate_ids_from_a_source_raise():
    class Twice(ImageSource):
        def entries(self):
            ref = NoiseRef(0, 0, 2, 2)
            return [("same", "x", ref), ("same", "y", ref)]

    with pytest.raises(ImageError, match="s/same"):
        image_table({"s": Twice()})


@pytest.mark.parametrize("name", ["", "a/b", 3])
def test_image_table_bad_set_names(name):
    with pytest.raises(ValueError, match="set name"):
        image_table({name: white_noise(1)})


def test_image_table_empty_and_non_mapping():
    with pytest.raises(ValueError, match="sets"):
        image_table({})
    with pytest.raises(TypeError, match="mapping"):
        image_table([("a", white_noise(1))])
