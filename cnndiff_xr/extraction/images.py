"""Image sources, decoding to RGB uint8, resizing, and the image table of a store.

This is the first stage of the flow (images -> model -> store -> analysis). It knows nothing
about models or stores: it turns what a user names (globs, folders, lists of files, in-memory
arrays, ``.npy`` movies, white noise) into an ordered table of small, picklable *references*,
and turns one reference into pixels on whichever Dask worker the reference was shipped to.

An image reference is anything that follows the :class:`ImageRef` protocol: it can read its
pixels and describe itself (and may hash its content: :func:`image_digest`, which a store records
per image so that a rerun over changed images is refused). :class:`FileRef`, :class:`NpyFrameRef`, :class:`ArrayRef` and
:class:`NoiseRef` are the four kinds this module makes; a new kind of image (frames of a video
file, say) is one more such class, which :func:`from_refs` (or a list of them given as a set)
turns into a source.

Pixels are always ``uint8`` RGB of shape ``(height, width, 3)``; the model's own preprocessing
(``preprocess_input``) is applied later, by the model backend (:mod:`cnndiff_xr.extraction.backends`).

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import posixpath
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..options import RESIZE_POLICIES, SPEC_ERRORS, ResizePolicy, SpecErrors
from ..validation import ParameterTypeError, ParameterValueError, check_choice, check_index

__all__ = [
    "DEFAULT_EXTENSIONS",
    "RESIZE_POLICIES",
    "ImageError",
    "FileRef",
    "NpyFrameRef",
    "ArrayRef",
    "NoiseRef",
    "ImageRef",
    "ImageSource",
    "files",
    "from_array",
    "movie_frames",
    "white_noise",
    "from_refs",
    "as_source",
    "ImageTable",
    "image_table",
    "read_rgb",
    "resize",
    "load_batch",
    "check_image",
    "image_digest",
    "screen_image",
    "SPEC_ERRORS",
]

#: File name extensions that a folder search picks up (compared case-insensitively).
DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")



class ImageError(ValueError):
    """A bad image or image source.

    The message names the file (or array, frame, source spec) and says what is wrong with it.

    Parameters
    ----------
    message : str
        The full message.
    source : str, optional
        What was being read (a path, URL, ``path#frame=i``, ...), when the error is about one image.
    reason : str, optional
        Why it could not be read, without the source; :func:`check_image` returns this.
    """

    def __init__(self, message: str, *, source: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason if reason is not None else message

    def __reduce__(self) -> tuple[Callable[..., ImageError], tuple[str, str | None, str | None]]:
        # Exceptions cross process boundaries on Dask; the default pickling would keep only
        # ``args`` and lose ``source``/``reason``.
        return (_rebuild_image_error, (str(self), self.source, self.reason))


def _rebuild_image_error(message: str, source: str | None, reason: str | None) -> ImageError:
    return ImageError(message, source=source, reason=reason)


def _unreadable(source: str, reason: str) -> ImageError:
    return ImageError(f"cannot read image {source}: {reason}", source=source, reason=reason)


def _spec_error(spec: str, reason: str) -> ImageError:
    """A spec (path, glob, folder, URL) that names no image; ``source`` is the spec as given."""
    if reason.startswith("glob pattern"):
        message = f"glob pattern {spec!r}{reason[len('glob pattern'):]}"
    elif reason.startswith("folder holds"):
        message = f"folder {spec!r}{reason[len('folder'):]}"
    else:
        message = f"{reason}: {spec!r}"
    return ImageError(message, source=spec, reason=reason)


def _check_spec_errors(errors: Any) -> SpecErrors:
    """The ``errors`` argument of :func:`files` and :func:`image_table` (one of ``SPEC_ERRORS``)."""
    return check_choice("errors", errors, SPEC_ERRORS, message=f"errors={errors!r}; choose one of {SPEC_ERRORS}")


# --------------------------------------------------------------------------------------------
# References: one small, picklable object per image. Workers receive these, not pixels.
# --------------------------------------------------------------------------------------------


@runtime_checkable
class ImageRef(Protocol):
    """One image: a small, picklable reference that Dask workers receive instead of pixels.

    Any object with these two methods is an image reference: :func:`image_table` takes it from
    any source, :func:`read_rgb`, :func:`check_image` and :func:`load_batch` read it. It must
    pickle (it travels to the workers), and reading it must give the same pixels in every
    process, since a rerun rewrites a batch and expects the same bytes.

    A reference may also have an optional ``digest() -> str`` method: the sha256 hex digest of
    its *content*, the thing that fixes its pixels (a file's bytes, an array's bytes, a
    generator's parameters), cheaper or more meaningful than hashing the decoded pixels. A
    store records every image's digest and refuses a rerun whose images changed under the same
    id; :func:`image_digest` falls back to the sha256 of the decoded pixels (``read()``) for a
    reference without one. ``digest()`` raises :class:`ImageError` like ``read()``.
    """

    def read(self) -> np.ndarray:
        """The pixels as an owned, writeable ``(H, W, 3)`` uint8 array.

        Raises :class:`ImageError` (naming :meth:`describe` and the reason) when the image
        cannot be read; :func:`check_image` reports that reason.
        """
        ...

    def describe(self) -> str:
        """A short human-readable name of the image (a path, ``path#frame=i``, ...) for messages."""
        ...


@dataclass(frozen=True)
class FileRef:
    """An image file.

    Parameters
    ----------
    path : str
        An absolute local path, or an fsspec URL (anything containing ``"://"``) that is
        opened with :func:`fsspec.open`.
    """

    path: str

    def read(self) -> np.ndarray:
        return _decode_file(self.path)

    def describe(self) -> str:
        return self.path

    def digest(self) -> str:
        """The plain sha256 of the file's bytes (what ``sha256sum`` prints), whatever its format."""
        return hashlib.sha256(_read_bytes(self.path)).hexdigest()


@dataclass(frozen=True)
class NpyFrameRef:
    """One frame of a ``.npy`` movie of shape ``(frames, H, W[, C])``.

    The reader opens the file with ``np.load(mmap_mode="r")`` so that only this frame is read.

    Parameters
    ----------
    path : str
        Absolute path of the ``.npy`` file.
    frame : int
        Index along the first axis.
    value_range : tuple of float, optional
        The pixel values that map to 0 and 255; ``None`` picks the default for the file's
        dtype (see :func:`from_array`).
    """

    path: str
    frame: int
    # An addition to (path, frame): without it float movies could only be read as 0..1.
    value_range: tuple[float, float] | None = None

    def read(self) -> np.ndarray:
        pixels, value_range = _npy_frame_pixels(self)
        return _pixels_to_rgb(pixels, value_range, self.describe())

    def describe(self) -> str:
        return f"{self.path}#frame={self.frame}"

    def digest(self) -> str:
        """The sha256 of the frame's bytes with its dtype, shape and value range (see :func:`image_digest`): the
        same frame content gives the same digest, wherever the file is."""
        pixels, value_range = _npy_frame_pixels(self)
        return _array_digest(pixels, value_range, self.describe())


# eq=False: equality and hashing by identity. Comparing pixel arrays element-wise would make
# ``ref == ref`` an array, and hashing an ndarray is impossible.
@dataclass(frozen=True, eq=False)
class ArrayRef:
    """One in-memory image.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W)`` or ``(H, W, C)`` with ``C`` in {1, 3, 4}.
    value_range : tuple of float
        The values that map to 0 and 255.
    """

    pixels: np.ndarray
    value_range: tuple[float, float]

    def __repr__(self) -> str:
        return f"ArrayRef(shape={self.pixels.shape}, dtype={self.pixels.dtype}, value_range={self.value_range})"

    def read(self) -> np.ndarray:
        where = self.describe()
        pixels = np.asarray(self.pixels)
        good_shape = pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (1, 3, 4))
        if not good_shape or min(pixels.shape[:2], default=0) == 0:
            raise _unreadable(where, "pixels must be a non-empty (H, W) or (H, W, C) array with C in 1, 3, 4")
        try:
            _default_value_range(pixels.dtype)  # rejects object/str/complex dtypes
        except ImageError as exc:
            raise _unreadable(where, str(exc)) from None
        return _pixels_to_rgb(pixels, self.value_range, where)

    def describe(self) -> str:
        return f"in-memory array image of shape {getattr(self.pixels, 'shape', '?')}"

    def digest(self) -> str:
        """The sha256 of the array's bytes with its dtype, shape and value range (see :func:`image_digest`)."""
        return _array_digest(np.asarray(self.pixels), self.value_range, self.describe())


@dataclass(frozen=True)
class NoiseRef:
    """One white-noise image, generated from ``np.random.default_rng([seed, index])``.

    Parameters
    ----------
    seed, index : int
        Non-negative; together they fix the pixels, whoever generates them and in what order.
    height, width : int
        Image size.
    """

    seed: int
    index: int
    height: int
    width: int

    def read(self) -> np.ndarray:
        height, width = _check_size((self.height, self.width), "NoiseRef (height, width)")
        rng = np.random.default_rng([self.seed, self.index])
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)

    def describe(self) -> str:
        return f"white_noise(seed={self.seed})[{self.index}]"

    def digest(self) -> str:
        """The sha256 of a canonical JSON of the generator and every parameter that fixes the pixels: no pixels
        are made to hash them."""
        return _json_digest({"kind": "white_noise", "generator": _NOISE_GENERATOR, "seed": int(self.seed),
                             "index": int(self.index), "height": int(self.height), "width": int(self.width)})


def _is_refs(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty list or tuple of image references (a set given as references)."""
    return isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(item, ImageRef) for item in obj)


def _names_files(obj: Any) -> bool:
    """Whether ``obj`` names files for :func:`files`: a path, glob, folder or URL, or a list of them."""
    return isinstance(obj, (str, os.PathLike)) or (isinstance(obj, (list, tuple)) and not _is_refs(obj))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ImageSource:
    """Base class of image sources: something that lists images in a deterministic order.

    Subclasses implement :meth:`entries`. The factories :func:`files`, :func:`from_array`,
    :func:`movie_frames`, :func:`white_noise` and :func:`from_refs` return instances;
    :func:`as_source` turns plain Python objects into one.
    """

    def entries(self) -> list[tuple[str, str, ImageRef]]:
        """List the images.

        Returns
        -------
        list of (str, str, ImageRef)
            ``(local_id, source_description, ref)`` per image, in a deterministic order.
            ``local_id`` is unique within the source; :func:`image_table` prefixes it with the
            set name.
        """
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.entries())

    @property
    def problems(self) -> list[tuple[str, str]]:
        """``(spec, reason)`` for each part of the source that named no image (only ``files(errors="collect")``
        records any; other sources raise instead)."""
        return []


class _ListedSource(ImageSource):
    """A source whose entries were resolved when it was made (so errors surface early)."""

    def __init__(self, description: str, entries: Iterable[tuple[str, str, ImageRef]],
                 problems: Iterable[tuple[str, str]] = ()) -> None:
        self.description = description
        self._entries = tuple(entries)
        self._problems = tuple(problems)

    @property
    def problems(self) -> list[tuple[str, str]]:
        return list(self._problems)

    def entries(self) -> list[tuple[str, str, ImageRef]]:
        return list(self._entries)  # a copy: callers may not mutate the source

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<ImageSource {self.description}: {len(self._entries)} images>"


# ---- files ----------------------------------------------------------------------------------


def _normalise_extensions(extensions: Iterable[str] | None) -> tuple[str, ...] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):  # files(spec, ".png") would otherwise iterate characters
        extensions = (extensions,)
    out = []
    for ext in extensions:
        if not isinstance(ext, str):
            raise ParameterTypeError(f"extensions must be strings such as '.png', got {ext!r}")
        if not ext.strip("."):
            raise ParameterValueError(f"extensions must be strings such as '.png', got {ext!r}")
        out.append(("." + ext.lstrip(".")).lower())
    if not out:
        raise ParameterValueError("extensions is empty; pass None to accept every file in a folder")
    return tuple(out)


def _has_extension(name: str, extensions: tuple[str, ...] | None) -> bool:
    return extensions is None or name.lower().endswith(extensions)


def _is_hidden(rel_posix: str) -> bool:
    # Hidden files (".DS_Store", macOS "._x.jpg" resource forks) and hidden folders are not
    # images even when their names end in ".jpg"; a folder search skips them.
    return any(part.startswith(".") for part in rel_posix.split("/") if part not in (".", ".."))


def _glob_base(pattern: str, dirname: Callable[[str], str]) -> str:
    """The longest leading part of ``pattern`` without glob magic (its folder)."""
    head = dirname(pattern)
    while glob.has_magic(head):
        head = dirname(head)
    return head


@dataclass
class _Expanded:
    """What one spec resolved to: a base folder and the files under it."""

    fs: Any  # None for local paths, else an fsspec filesystem
    base: str  # local absolute folder, or fsspec path ("" = filesystem root)
    paths: list[str]  # local absolute paths, or fsspec paths without protocol


def _walk_local(folder: str, extensions: tuple[str, ...] | None) -> list[str]:
    """Files under ``folder`` (recursively) with one of ``extensions``, not hidden."""
    found = []
    seen_dirs: set[tuple[int, int]] = set()
    # followlinks=True because datasets are often assembled from symlinked folders; the
    # (device, inode) set stops symlink cycles.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.join(dirpath, name)
            for name in filenames
            if not name.startswith(".") and _has_extension(name, extensions)
        ]
    return found


def _expand_local(spec: str, extensions: tuple[str, ...] | None) -> _Expanded:
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        base = os.path.abspath(path)
        found = _walk_local(base, extensions)
        if not found:
            raise _spec_error(spec, f"folder holds no files with extensions {extensions} (searched recursively)")
        return _Expanded(None, base, found)
    # A literal path is tried before glob magic so that names with "[" or "*" in them work.
    if os.path.lexists(path):
        absolute = os.path.abspath(path)
        return _Expanded(None, os.path.dirname(absolute), [absolute])
    if glob.has_magic(path):
        matches = glob.glob(path, recursive=True)
        if not matches:
            raise _spec_error(spec, "glob pattern matched nothing")
        # A folder whose name happens to match (say a folder "x.jpg") is not an image.
        found = [os.path.abspath(m) for m in matches if not os.path.isdir(m)]
        if not found:
            raise _spec_error(spec, "glob pattern matched only folders, no files")
        base = os.path.abspath(_glob_base(path, os.path.dirname) or ".")
        return _Expanded(None, base, found)
    raise _spec_error(spec, "no such file or folder")


def _expand_url(spec: str, extensions: tuple[str, ...] | None) -> _Expanded:
    import fsspec  # only URL users pay for fsspec's import

    fs, path = fsspec.core.url_to_fs(spec)
    if fs.isdir(path):
        base = path.rstrip("/") or path
        found = []
        for p in fs.find(path):  # files only, recursive
            rel = posixpath.relpath(p, base) if base else p.lstrip("/")
            if not _is_hidden(rel) and _has_extension(posixpath.basename(p), extensions):
                found.append(p)
        if not found:
            raise _spec_error(spec, f"folder holds no files with extensions {extensions} (searched recursively)")
        return _Expanded(fs, base, found)
    if fs.isfile(path):
        return _Expanded(fs, posixpath.dirname(path), [path])
    if glob.has_magic(path):
        matches = fs.glob(path, detail=True)
        if not matches:
            raise _spec_error(spec, "glob pattern matched nothing")
        found = [p for p, info in matches.items() if info.get("type") != "directory"]
        if not found:
            raise _spec_error(spec, "glob pattern matched only folders, no files")
        return _Expanded(fs, _glob_base(path, posixpath.dirname), found)
    raise _spec_error(spec, "no such file or folder")


def _protocols(fs: Any) -> tuple[str, ...]:
    # fsspec filesystems declare one protocol name or several aliases ("s3", "s3a").
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _spec_to_str(item: Any, where: str) -> str:
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        if isinstance(text, str) and text:
            return text
    raise ParameterTypeError(f"{where} must be a non-empty str or os.PathLike, got {type(item).__name__}: {item!r}")


def _relative(expanded: _Expanded, base: str, path: str) -> str:
    if expanded.fs is None:
        return os.path.relpath(path, base).replace(os.sep, "/")
    return posixpath.relpath(path, base) if base else path.lstrip("/")


def files(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    extensions: Iterable[str] | None = DEFAULT_EXTENSIONS,
    errors: SpecErrors = "raise",
) -> ImageSource:
    """Image files named by a glob pattern, a folder, a file, a URL, or a list of those.

    Parameters
    ----------
    spec : str, os.PathLike, or list/tuple of them
        - a folder: searched **recursively** for files with one of ``extensions`` (hidden
          files and folders, whose names start with ".", are skipped);
        - a glob pattern (``"data/cats/*.jpg"``; ``"**"`` recurses): every *file* it matches,
          whatever its extension (the pattern is the user's explicit choice); folders it
          matches are skipped, never taken as images;
        - a single file: taken as given, whatever its extension;
        - an fsspec URL (``"memory://..."``, ``"file://..."``, ``"s3://..."``): the same three
          cases, listed with fsspec; the references keep the URL;
        - a list or tuple of any of these: each expanded as above (a folder in the list is
          searched like a folder), in the order given; a file reached twice is kept once.
    extensions : iterable of str or None, default DEFAULT_EXTENSIONS
        Extensions a folder search accepts, case-insensitive. ``None`` accepts every file.
    errors : {"raise", "collect"}, default "raise"
        What to do with a spec (or list item) that names no image — a missing path, a glob
        that matches nothing or only folders, a folder without matching files: ``"raise"`` an
        :class:`ImageError` at the first one; ``"collect"`` leave it out and record
        ``(spec, reason)`` in the source's :attr:`ImageSource.problems` (the source may then
        hold no images). Extraction uses it to name every bad spec at once, and with
        ``on_error="skip"`` to record the specs it leaves out of a set that names other images
        (a set that names none is refused).

    Returns
    -------
    ImageSource
        Entries sorted by path within each spec. ``local_id`` is the path relative to the
        spec's base folder (a glob's non-magic leading folder, the folder itself, a file's
        folder; for a list, the common parent of its items' base folders), with "/"
        separators, so same-named files in different subfolders stay distinct.
        ``source_description`` is the absolute path (or the URL).

    Raises
    ------
    ImageError
        A missing path, a glob that matches nothing (or only folders), a folder without
        matching files, an empty list, a ``.npy`` file (use :func:`movie_frames`), or a list
        mixing local paths and URLs of different protocols. The message names the spec.
    TypeError
        ``spec`` (or a list item) is not a str or path.
    """
    exts = _normalise_extensions(extensions)
    errors = _check_spec_errors(errors)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ImageError("files(): the list of paths is empty")
        items = [_spec_to_str(item, "each item of the files() list") for item in spec]
        description = f"files([{', '.join(map(repr, items[:3]))}{', ...' if len(items) > 3 else ''}])"
    else:
        items = [_spec_to_str(spec, "files() spec")]
        description = f"files({items[0]!r})"

    expansions: list[_Expanded] = []
    problems: list[tuple[str, str]] = []
    for item in items:
        try:
            expansions.append(_expand_url(item, exts) if "://" in item else _expand_local(item, exts))
        except ImageError as err:
            if errors == "raise" or err.source is None:
                raise
            problems.append((err.source, err.reason))
    if not expansions:  # errors="collect" and nothing usable: an empty source that says why
        return _ListedSource(description, [], problems)

    # One namespace per call: a common parent of a local path and an S3 key does not exist.
    namespaces = {None if e.fs is None else _protocols(e.fs) for e in expansions}
    if len(namespaces) > 1:
        raise ImageError(
            f"{description}: mixes local paths and URLs (or several URL protocols); give them as separate image sets"
        )
    if len(expansions) == 1:
        base = expansions[0].base
    else:
        bases = [e.base for e in expansions]
        try:
            base = (os.path if expansions[0].fs is None else posixpath).commonpath(bases)
        except ValueError:  # different drives, or absolute mixed with relative keys
            base = "" if expansions[0].fs is not None else os.path.abspath(os.sep)

    entries: list[tuple[str, str, ImageRef]] = []
    seen: set[str] = set()
    for e in expansions:
        ordered = sorted(e.paths, key=lambda p: _relative(e, e.base, p))
        for p in ordered:
            if p in seen:
                continue
            seen.add(p)
            if p.lower().endswith(".npy"):
                raise ImageError(
                    f"{description}: {p} is a .npy array, not an image file; use movie_frames() for .npy movies"
                )
            location = p if e.fs is None else e.fs.unstrip_protocol(p)
            entries.append((_relative(e, base, p), location, FileRef(location)))
    return _ListedSource(description, entries, problems)


# ---- arrays -----------------------------------------------------------------------------------


def _default_value_range(dtype: np.dtype) -> tuple[float, float]:
    if dtype == np.bool_:
        # (0, 1) rather than (0, 255): True must become white (255), not 1.
        return (0, 1)
    if dtype == np.uint16:
        return (0, 65535)
    if np.issubdtype(dtype, np.integer):
        return (0, 255)  # uint8, and other integers that are expected to hold 8-bit values
    if np.issubdtype(dtype, np.floating):
        return (0, 1)
    raise ImageError(f"pixel dtype {dtype} is not supported (use bool, integer or float pixels)")


def _check_value_range(value_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ImageError(f"value_range must be two numbers (low, high), got {value_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ImageError(f"value_range must be finite with high > low, got {value_range!r}")
    return (lo, hi)


def _check_pixel_values(pixels: np.ndarray, value_range: tuple[float, float], where: str) -> None:
    """Raise if values fall outside ``value_range``: clipping would hide a wrong range."""
    lo, hi = value_range
    if pixels.dtype == np.bool_ or pixels.size == 0:
        return
    if pixels.dtype == np.uint8 and lo <= 0 and hi >= 255:
        return  # cannot be out of range; skip the pass over the data
    if np.issubdtype(pixels.dtype, np.floating) and np.isnan(pixels).any():
        raise ImageError(f"{where}: pixels contain NaN")
    vmin, vmax = pixels.min(), pixels.max()
    if vmin < lo or vmax > hi:
        raise ImageError(
            f"{where}: pixel values span [{vmin}, {vmax}], outside value_range ({lo:g}, {hi:g}); "
            "pass value_range=(low, high) covering the data"
        )


def _to_uint8(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Map ``value_range`` linearly onto 0..255 and round."""
    lo, hi = value_range
    if pixels.dtype == np.uint8 and (lo, hi) == (0, 255):
        return pixels
    scaled = (pixels.astype(np.float64) - lo) / (hi - lo) * 255.0
    # The clip only guards float round-off at the ends; values outside the range were refused.
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _pixels_to_rgb(pixels: np.ndarray, value_range: tuple[float, float], where: str) -> np.ndarray:
    """(H, W) or (H, W, C in {1, 3, 4}) pixels of any supported dtype -> (H, W, 3) uint8."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4):
        pixels = pixels[..., :3]  # drops alpha
    elif pixels.ndim != 2:
        raise ImageError(f"{where}: pixels must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {pixels.shape}")
    value_range = _check_value_range(value_range)
    _check_pixel_values(pixels, value_range, where)
    out = _to_uint8(pixels, value_range)
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[-1] == 1:  # greyscale: the same value in R, G and B
        out = np.broadcast_to(out, out.shape[:2] + (3,))
    return np.array(out, dtype=np.uint8, order="C")  # an owned, writeable copy


def _check_image_stack(shape: tuple[int, ...], dtype: np.dtype, name: str, where: str) -> None:
    if len(shape) not in (3, 4):
        raise ImageError(f"{name}: {where} must be (N, H, W) or (N, H, W, C); got shape {shape}")
    if len(shape) == 4 and shape[3] not in (1, 3, 4):
        raise ImageError(f"{name}: {where} has {shape[3]} channels; C must be 1, 3 or 4 (shape {shape})")
    if min(shape[:3]) == 0:
        raise ImageError(f"{name}: {where} holds no pixels (shape {shape})")
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageError(f"{name}: {where} has dtype {dtype}; use bool, integer or float pixels")


def from_array(
    array: np.ndarray, *, name: str = "array", value_range: tuple[float, float] | None = None
) -> ImageSource:
    """Images held in a NumPy array.

    Parameters
    ----------
    array : array_like
        ``(N, H, W)`` greyscale or ``(N, H, W, C)`` with ``C`` in {1, 3, 4} (alpha is dropped).
        A single image needs a leading axis of length 1.
    name : str, default "array"
        Names the array in ``source`` descriptions and messages.
    value_range : (float, float), optional
        The values that map to 0 and 255 (linearly, rounded). Default by dtype: uint8 (0, 255),
        uint16 (0, 65535), other integers (0, 255), floats (0, 1), bool (0, 1) so that True is
        white. Values outside the range raise rather than being clipped.

    Returns
    -------
    ImageSource
        ``local_id`` ``f"{i:06d}"``, source ``f"array:{name}[{i}]"``, refs :class:`ArrayRef`
        holding views of ``array`` (pickling one sends only that image).

    Raises
    ------
    ImageError
        Bad shape or dtype (naming ``array``), a bad ``value_range``, or values outside it.
    """
    array = np.asarray(array)
    _check_image_stack(array.shape, array.dtype, "from_array", f"array {name!r}")
    if value_range is None:
        value_range = _default_value_range(array.dtype)
    value_range = _check_value_range(value_range)
    _check_pixel_values(array, value_range, f"from_array: array {name!r}")
    entries: list[tuple[str, str, ImageRef]] = [
        (f"{i:06d}", f"array:{name}[{i}]", ArrayRef(array[i], value_range)) for i in range(array.shape[0])
    ]
    return _ListedSource(f"from_array({name!r})", entries)


# ---- movies -----------------------------------------------------------------------------------


def _open_npy(path: str) -> np.ndarray:
    """Memory-map a .npy file (reads only its header until frames are indexed)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise _unreadable(path, "file not found") from None
    except PermissionError:
        raise _unreadable(path, "permission denied") from None
    except IsADirectoryError:
        raise _unreadable(path, "is a directory, not a .npy file") from None
    except (OSError, ValueError, EOFError) as exc:  # not .npy, pickled objects, truncated header
        raise _unreadable(path, f"not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for .npz archives
        raise _unreadable(path, "not a .npy array (an .npz archive?)")
    return arr


def _index_at_least(name: str, value: Any, minimum: int, hint: str = "") -> int:
    """An integer (``operator.index``) >= ``minimum``; the message reads "{name} must be >= {minimum}{hint}"."""
    index = check_index(name, value)
    if index < minimum:
        raise ParameterValueError(f"{name} must be >= {minimum}{hint}, got {index}")
    return index


def movie_frames(
    path: str | os.PathLike[str],
    *,
    step: int = 1,
    start: int = 0,
    stop: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> ImageSource:
    """Every ``step``-th frame of a ``.npy`` movie.

    Parameters
    ----------
    path : str or os.PathLike
        A local ``.npy`` file holding ``(frames, H, W)`` or ``(frames, H, W, C)``.
    step : int, default 1
        Take frames ``start, start + step, ...`` (the seed used 30: one per second at 30 Hz).
    start : int, default 0
        First frame.
    stop : int, optional
        Frames up to but excluding ``stop``; like slicing, a ``stop`` past the end means the
        end. Default: the end.
    value_range : (float, float), optional
        As in :func:`from_array`; default by dtype. Values outside it raise when a frame is read.

    Returns
    -------
    ImageSource
        ``local_id`` ``f"{stem}_frame{idx:06d}"``, source ``f"{abspath}#frame={idx}"``,
        refs :class:`NpyFrameRef`. Only the file's header is read here.

    Raises
    ------
    ImageError
        A missing or unreadable file, a bad shape or dtype, or a selection with no frames.
    ValueError, TypeError
        A bad ``step``, ``start`` or ``stop`` (the message names it).
    """
    spec = _spec_to_str(path, "movie_frames() path")
    step = _index_at_least("step", step, 1)
    start = _index_at_least("start", start, 0)
    if stop is not None:
        stop = _index_at_least("stop", stop, 0, " or None")
    if value_range is not None:
        value_range = _check_value_range(value_range)

    abspath = os.path.abspath(os.path.expanduser(spec))
    movie = _open_npy(abspath)
    shape, dtype = movie.shape, movie.dtype
    del movie  # only the header was needed; do not keep the mapping open
    _check_image_stack(shape, dtype, "movie_frames", f"movie {abspath}")
    if value_range is None:
        _default_value_range(dtype)  # fail now, not per frame, for unsupported dtypes

    n = shape[0]
    indices = range(start, n if stop is None else min(stop, n), step)
    if len(indices) == 0:
        raise ImageError(f"movie_frames: start={start}, stop={stop} select no frames of {abspath} ({n} frames)")
    stem = Path(abspath).stem
    entries: list[tuple[str, str, ImageRef]] = [
        (f"{stem}_frame{i:06d}", f"{abspath}#frame={i}", NpyFrameRef(abspath, i, value_range)) for i in indices
    ]
    return _ListedSource(f"movie_frames({spec!r}, step={step})", entries)


# ---- white noise -----------------------------------------------------------------------------


def _check_size(size: Any, name: str = "size") -> tuple[int, int]:
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ParameterTypeError(f"{name} must be (height, width), got {size!r}") from None
    height, width = check_index(name, height), check_index(name, width)
    if height < 1 or width < 1:
        raise ParameterValueError(f"{name} must be positive (height, width), got {size!r}")
    return height, width


def white_noise(n: int, *, seed: int = 0, size: tuple[int, int] = (224, 224)) -> ImageSource:
    """Uniform uint8 RGB noise images.

    Parameters
    ----------
    n : int
        Number of images (>= 1).
    seed : int, default 0
        Non-negative. Image ``i`` comes from ``np.random.default_rng([seed, i])``, so its
        pixels do not depend on batching, workers or reading order.
    size : (int, int), default (224, 224)
        (height, width).

    Returns
    -------
    ImageSource
        ``local_id`` ``f"noise_{i:06d}"``, source ``f"white_noise(seed={seed})[{i}]"``,
        refs :class:`NoiseRef`.
    """
    n = _index_at_least("n", n, 1)
    seed = _index_at_least("seed", seed, 0, " (numpy seeds are non-negative)")
    height, width = _check_size(size)
    entries: list[tuple[str, str, ImageRef]] = [
        (f"noise_{i:06d}", f"white_noise(seed={seed})[{i}]", NoiseRef(seed, i, height, width)) for i in range(n)
    ]
    return _ListedSource(f"white_noise({n}, seed={seed}, size=({height}, {width}))", entries)


# ---- any image references ----------------------------------------------------------------------


def from_refs(refs: ImageRef | Sequence[ImageRef], *, name: str = "refs") -> ImageSource:
    """Images given as references of any kind that follows the :class:`ImageRef` protocol.

    This is how a new kind of image joins an extraction without a new source class: write a
    small picklable class with ``read()`` and ``describe()`` (one frame of a video file, one
    tile of a slide) and pass a list of its instances as a set.

    Parameters
    ----------
    refs : ImageRef or sequence of ImageRef
        The images, in store order.
    name : str, default "refs"
        Names the source in its ``repr``.

    Returns
    -------
    ImageSource
        ``local_id`` ``f"{i:06d}"``, source ``ref.describe()``, the references themselves.

    Raises
    ------
    TypeError
        An item does not follow the :class:`ImageRef` protocol.
    ValueError
        ``refs`` is empty.
    """
    items = [refs] if isinstance(refs, ImageRef) else list(refs)
    if not items:
        raise ParameterValueError("from_refs(): the list of image references is empty")
    for item in items:
        if not isinstance(item, ImageRef):
            raise ParameterTypeError(f"from_refs(): {type(item).__name__} is not an image reference (an object with "
                                     "read() and describe() methods)")
    entries = [(f"{i:06d}", ref.describe(), ref) for i, ref in enumerate(items)]
    return _ListedSource(f"from_refs({name!r})", entries)


def as_source(obj: Any) -> ImageSource:
    """Turn what a user passes for an image set into an :class:`ImageSource`.

    Parameters
    ----------
    obj : str, os.PathLike, list, tuple, numpy.ndarray, ImageRef or ImageSource
        Paths, globs, folders and URLs (alone or in a list/tuple) go to :func:`files`;
        arrays to :func:`from_array`; an image reference or a list of them (any object with
        ``read()`` and ``describe()``, see :class:`ImageRef`) to :func:`from_refs`; sources
        are returned unchanged.

    Raises
    ------
    TypeError
        Any other type; the message names it.
    """
    if isinstance(obj, ImageSource):
        return obj
    if isinstance(obj, ImageRef) or _is_refs(obj):
        return from_refs(obj)
    if _names_files(obj):
        return files(obj)
    if isinstance(obj, np.ndarray):
        return from_array(obj)
    raise ParameterTypeError(
        f"cannot make an image source from {type(obj).__name__}; pass a path, glob, folder, URL, "
        "a list of those, a numpy array, image references, or an ImageSource"
    )


# --------------------------------------------------------------------------------------------
# The image table
# --------------------------------------------------------------------------------------------


@dataclass
class ImageTable:
    """The images of a store, in store order.

    Attributes
    ----------
    ids : list of str
        Unique ``f"{set_name}/{local_id}"``.
    sets : list of str
        The set of each image.
    sources : list of str
        Where each image came from (path, URL, ``path#frame=i``, ``array:name[i]``, ...).
    refs : list of ImageRef
        What a worker reads.
    problems : list of dict
        Specs that named no image, left out by ``image_table(..., errors="collect")``: one
        ``{"set": ..., "source": spec, "reason": ...}`` each (JSON-ready). Empty otherwise.
    digests : list of str, or None
        Each image's content digest (:func:`image_digest`), once the images were screened
        (the extraction takes them in the workers, while it decodes every image); None before.
        Kept here, beside the references, so that the references stay small.
    """

    ids: list[str]
    sets: list[str]
    sources: list[str]
    refs: list[ImageRef]
    problems: list[dict[str, str]] = field(default_factory=list)
    digests: list[str] | None = None

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.sets) == len(self.sources) == len(self.refs):
            raise ValueError("ImageTable: ids, sets, sources and refs must have the same length")
        if self.digests is not None and len(self.digests) != len(self.ids):
            raise ValueError("ImageTable: digests must have one entry per image")

    def __len__(self) -> int:
        return len(self.ids)

    def set_names(self) -> list[str]:
        """The set names, in order of first appearance."""
        return list(dict.fromkeys(self.sets))


def image_table(sets: Mapping[str, Any], *, errors: SpecErrors = "raise") -> ImageTable:
    """Build the image table from named image sets.

    Parameters
    ----------
    sets : Mapping[str, Any]
        Set name -> anything :func:`as_source` accepts. Names must be non-empty strings
        without "/" (ids are ``f"{set}/{local_id}"``). The same images may appear in several
        sets; they get different ids.
    errors : {"raise", "collect"}, default "raise"
        Path/glob specs that name no image (missing path, glob matching nothing, empty
        folder): raise at the first, or leave them out and list them in
        :attr:`ImageTable.problems` (see :func:`files`). A table may then be empty.

    Returns
    -------
    ImageTable

    Raises
    ------
    ValueError
        ``sets`` is empty, or a set name is invalid.
    ImageError
        Two images get the same id (a source listing a ``local_id`` twice), or a source fails.
    TypeError
        ``sets`` is not a mapping, or a source yields something that is not an image reference.
    """
    if not isinstance(sets, Mapping):
        raise ParameterTypeError(f"sets must be a mapping of set name -> images, got {type(sets).__name__}")
    if not sets:
        raise ParameterValueError("sets is empty; give at least one image set, e.g. {'cats': 'data/cats/*.jpg'}")
    errors = _check_spec_errors(errors)
    ids: list[str] = []
    set_of: list[str] = []
    sources: list[str] = []
    refs: list[ImageRef] = []
    problems: list[dict[str, str]] = []
    for set_name, spec in sets.items():
        if not isinstance(set_name, str) or not set_name or "/" in set_name:
            raise ParameterValueError(f"set name {set_name!r} is invalid: set names must be non-empty strings "
                                      "without '/'")
        source_obj = files(spec, errors="collect") if errors == "collect" and _names_files(spec) else as_source(spec)
        problems += [{"set": set_name, "source": str(where), "reason": str(why)} for where, why in source_obj.problems]
        for local_id, source, ref in source_obj.entries():
            if not isinstance(ref, ImageRef):
                raise ParameterTypeError(f"set {set_name!r}: {type(ref).__name__} is not an image reference (an "
                                         f"object with read() and describe() methods) ({source})")
            if not isinstance(local_id, str) or not local_id:
                raise ParameterValueError(f"set {set_name!r}: local ids must be non-empty strings, got {local_id!r}")
            ids.append(f"{set_name}/{local_id}")
            set_of.append(set_name)
            sources.append(source)
            refs.append(ref)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups: list[str] = []
        for image_id in ids:
            if image_id in seen and image_id not in dups:
                dups.append(image_id)
            seen.add(image_id)
        raise ImageError(f"duplicate image ids: {dups[:5]}{' ...' if len(dups) > 5 else ''}")
    return ImageTable(ids, set_of, sources, refs, problems)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    """The bytes of a local file or fsspec URL; OS errors become ImageError with a reason."""
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as fh:
                return fh.read()
        # The builtin ``open`` (looked up in this module so tests can simulate failures).
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise _unreadable(path, "file not found") from None
    except PermissionError:
        raise _unreadable(path, "permission denied") from None
    except IsADirectoryError:
        raise _unreadable(path, "is a directory, not an image file") from None
    except OSError as exc:
        raise _unreadable(path, f"cannot be opened ({exc.strerror or exc})") from None


def _bomb_reason(detail: str) -> str:
    return (
        f"exceeds Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): "
        f"{detail}; raise that limit if the file is trusted"
    )


class _UnsupportedPixels(Exception):
    """A decoded image whose pixels cannot be mapped to 8-bit RGB (the reason is the message)."""


def _scale_16bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (and I/F) greyscale -> uint8 by scaling 0..65535 onto 0..255: round(v / 257)."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise _UnsupportedPixels(f"mode {mode!r} image holds NaN or infinite values")
    vmin, vmax = values.min(), values.max()
    if vmin < 0 or vmax > 65535:
        # Any other mapping (min..max, clipping) would depend on the image or lose data.
        raise _UnsupportedPixels(
            f"mode {mode!r} values span [{vmin:g}, {vmax:g}], outside the 16-bit range 0..65535 "
            "that is scaled to 8 bits; convert the file, or load it with numpy and use from_array(value_range=...)"
        )
    return np.rint(values / 257.0).astype(np.uint8)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """A loaded Pillow image of any mode -> (H, W, 3) uint8."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in ("L", "1", "LA", "La"):
        grey = np.array(im.convert("L") if mode != "L" else im, dtype=np.uint8)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_16bit(np.asarray(im), mode)
    elif mode in ("P", "PA"):
        # Via RGBA: Pillow resolves palette transparency that way (P -> RGB warns about it).
        return np.array(im.convert("RGBA"), dtype=np.uint8)[..., :3]
    else:  # RGBA, RGBX, CMYK, YCbCr, ...: Pillow's own conversion; alpha is discarded
        try:
            return np.array(im.convert("RGB"), dtype=np.uint8)
        except ValueError:
            raise _UnsupportedPixels(f"image mode {mode!r} cannot be converted to RGB") from None
    return np.repeat(grey[..., None], 3, axis=2)


def _decode_file(path: str) -> np.ndarray:
    return _decode_bytes(path, _read_bytes(path))


def _decode_bytes(path: str, data: bytes) -> np.ndarray:
    """Decode the bytes of the image file ``path`` (named in messages)."""
    if not data:
        raise _unreadable(path, "file is empty (0 bytes)")
    try:
        # Pillow warns (DecompressionBombWarning) between MAX_IMAGE_PIXELS and twice that, and
        # raises above it. Both are refusals here: a warning in a worker log is easily missed.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                # catch_warnings is process-global and not thread-safe, so check the size
                # directly as well rather than relying on the filter alone.
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and im.width * im.height > limit:
                    size = f"image is {im.width}x{im.height} = {im.width * im.height} pixels"
                    raise _unreadable(path, _bomb_reason(size))
                # First frame of multi-frame GIF/TIFF (what Image.open selects). EXIF
                # orientation is deliberately not applied: raw pixels, as in the seed.
                im.load()  # full decode: truncated files fail here
                return _pil_to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise _unreadable(path, _bomb_reason(str(exc))) from None
    except _UnsupportedPixels as exc:
        raise _unreadable(path, str(exc)) from None
    except UnidentifiedImageError:
        raise _unreadable(path, "not a recognised image format (Pillow cannot identify it)") from None
    except MemoryError:
        raise  # the machine's problem, not the file's
    except Exception as exc:  # corrupt data makes decoders raise many types (OSError, SyntaxError, ...)
        raise _unreadable(path, f"cannot decode: {exc} (the file may be truncated or corrupt)") from None


def _npy_frame_pixels(ref: NpyFrameRef) -> tuple[np.ndarray, tuple[float, float]]:
    """The frame's stored pixels (an owned copy) and the value range they map from (the dtype's default if none)."""
    where = ref.describe()
    movie = _open_npy(ref.path)
    try:
        _check_image_stack(movie.shape, movie.dtype, "NpyFrameRef", f"movie {ref.path}")
        frame = check_index("frame", ref.frame)
        if not 0 <= frame < movie.shape[0]:
            raise _unreadable(where, f"frame {frame} is out of range: the movie has {movie.shape[0]} frames")
        pixels = np.array(movie[frame])  # copies this frame only, out of the mapping
    finally:
        del movie
    value_range = ref.value_range if ref.value_range is not None else _default_value_range(pixels.dtype)
    return pixels, value_range


def read_rgb(ref: ImageRef) -> np.ndarray:
    """Decode one image to RGB uint8 at its own size.

    Parameters
    ----------
    ref : ImageRef
        :class:`FileRef`, :class:`NpyFrameRef`, :class:`ArrayRef`, :class:`NoiseRef`, or any
        other object that follows the :class:`ImageRef` protocol (it reads itself).

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8, an owned writeable array.

    Raises
    ------
    ImageError
        The image cannot be read; the message names it and says why (file not found,
        permission denied, a directory, empty file, not an image, truncated or corrupt,
        over Pillow's decompression-bomb limit, pixel values that cannot be mapped to 8 bits).
    TypeError
        ``ref`` is not an image reference.

    Notes
    -----
    Files are decoded with Pillow, keeping the stored pixels:

    - greyscale (``L``, ``1``) is copied into R, G and B;
    - alpha (``RGBA``, ``LA``, ``PA``) is **discarded**: the colour channels are kept as
      stored, not composited onto any background (what ``PIL.Image.convert("RGB")``, used by
      ``keras.utils.load_img`` in the seed, does);
    - palette images (``P``) are converted via RGBA, so palette transparency is resolved the
      same way;
    - ``CMYK``, ``YCbCr`` etc. use Pillow's conversion to RGB;
    - 16-bit greyscale (``I;16``, ``I;16B``, ...), and ``I`` and ``F`` images (treated as
      16-bit), are scaled, not clipped: ``round(v / 257)`` maps 0..65535 onto 0..255. ``I``/``F``
      values outside 0..65535, NaN or infinities raise, since any other mapping would depend
      on the image; load such data with numpy and use :func:`from_array` with a ``value_range``;
    - 16-bit-per-channel RGB(A) PNG/TIFF are reduced to 8 bits by Pillow's own decoder,
      which keeps the high byte (``v // 256``): also a scaling, at most one level below
      ``round(v / 257)``;
    - multi-frame GIF/TIFF: the first frame;
    - EXIF orientation is **not** applied (raw pixels, like the seed);
    - truncated files are errors unless the caller has set
      ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` (a global that is left alone here).

    Arrays and ``.npy`` frames are mapped from their ``value_range`` onto 0..255 (linear,
    rounded; values outside the range raise), greyscale or one channel is copied into three,
    and a fourth (alpha) channel is dropped.
    """
    if not isinstance(ref, ImageRef):
        raise ParameterTypeError(f"read_rgb needs an image reference (an object with read() and describe() methods, "
                                 f"such as FileRef, NpyFrameRef, ArrayRef, NoiseRef), got {type(ref).__name__}")
    return ref.read()


def check_image(ref: ImageRef) -> str | None:
    """Fully decode one image to find out whether it is usable.

    Parameters
    ----------
    ref : ImageRef

    Returns
    -------
    str or None
        ``None`` if the image decodes, else the reason it does not (without the file name,
        which the caller has). Never raises for a bad image.
    """
    try:
        read_rgb(ref)
    except ImageError as exc:
        return exc.reason
    return None


# --------------------------------------------------------------------------------------------
# Content identity: one sha256 per image
# --------------------------------------------------------------------------------------------

#: How :class:`NoiseRef` makes its pixels; part of its digest, so that a change of generator changes every digest.
_NOISE_GENERATOR = "numpy.random.default_rng([seed, index]).integers(0, 256, (height, width, 3), uint8)"


def _json_digest(document: Mapping[str, Any]) -> str:
    """The sha256 of a canonical JSON (sorted keys, no spaces) of ``document``."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _array_digest(pixels: np.ndarray, value_range: Any, where: str) -> str:
    """The sha256 of a header (kind, dtype with byte order, shape, value range) followed by the array's C-order bytes.

    The header makes a reshape, a cast or another value range (all of which change the decoded pixels) a different
    digest even where the raw bytes are the same.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype.hasobject or pixels.dtype.kind not in "biuf":
        raise _unreadable(where, f"pixel dtype {pixels.dtype} is not supported (use bool, integer or float pixels)")
    lo, hi = (float(v) for v in value_range)
    header = {"kind": "array", "dtype": pixels.dtype.str, "shape": list(pixels.shape), "value_range": [lo, hi]}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\0")
    h.update(np.ascontiguousarray(pixels).reshape(-1).view(np.uint8).data)  # the bytes, without a copy
    return h.hexdigest()


def _pixels_digest(rgb: np.ndarray, where: str) -> str:
    """The digest of decoded pixels: what a reference without ``digest()`` is identified by."""
    return _array_digest(rgb, (0, 255), where)


def image_digest(ref: ImageRef) -> str:
    """The sha256 hex digest of one image's content.

    Parameters
    ----------
    ref : ImageRef

    Returns
    -------
    str
        64 hex digits: ``ref.digest()`` where the reference has one -- a file's bytes
        (:class:`FileRef`; the plain sha256 of the file), an array's or movie frame's bytes
        with their dtype, shape and value range (:class:`ArrayRef`, :class:`NpyFrameRef`), the
        generator and its parameters (:class:`NoiseRef`) -- else the digest of the decoded
        pixels (``read()``), hashed like a uint8 array.

    Raises
    ------
    ImageError
        The content cannot be read.
    """
    if not isinstance(ref, ImageRef):
        raise ParameterTypeError(f"image_digest needs an image reference (an object with read() and describe() "
                                 f"methods), got {type(ref).__name__}")
    digest = getattr(ref, "digest", None)
    if callable(digest):
        value = digest()
        if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
            raise ParameterValueError(f"{type(ref).__name__}.digest() of {ref.describe()} must return a sha256 hex "
                                      f"digest (64 lower-case hex digits), got {value!r}")
        return value
    return _pixels_digest(ref.read(), ref.describe())


def screen_image(ref: ImageRef) -> tuple[str | None, str | None]:
    """Fully decode one image and take its content digest, reading its data once where possible.

    What an extraction asks of each image in the workers before it writes anything.

    Returns
    -------
    (reason, digest)
        ``(None, digest)`` for a usable image; ``(reason, None)`` for one that cannot be read
        (the reason without the file name, as :func:`check_image`). Never raises for a bad image.
    """
    try:
        if type(ref) is FileRef:  # exactly FileRef: a subclass may read otherwise
            data = _read_bytes(ref.path)
            _decode_bytes(ref.path, data)
            return None, hashlib.sha256(data).hexdigest()
        if type(ref) is NpyFrameRef:
            pixels, value_range = _npy_frame_pixels(ref)
            _pixels_to_rgb(pixels, value_range, ref.describe())
            return None, _array_digest(pixels, value_range, ref.describe())
        rgb = read_rgb(ref)
        digest = getattr(ref, "digest", None)
        return None, image_digest(ref) if callable(digest) else _pixels_digest(rgb, ref.describe())
    except ImageError as exc:
        return exc.reason, None


# --------------------------------------------------------------------------------------------
# Resizing and batches
# --------------------------------------------------------------------------------------------


def _check_policy(policy: Any) -> ResizePolicy:
    return check_choice("resize", policy, RESIZE_POLICIES,
                        message=f"unknown resize policy {policy!r}: resize must be one of {RESIZE_POLICIES}")


def _centre_box(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the largest central box with the target aspect ratio."""
    # Integer arithmetic (rounded half up) so the box does not depend on float round-off.
    if width * target_h > height * target_w:  # source is wider: crop the sides
        crop_h = height
        crop_w = min(width, max(1, (2 * height * target_w + target_h) // (2 * target_h)))
    else:  # source is taller (or the same aspect): crop top and bottom
        crop_w = width
        crop_h = min(height, max(1, (2 * width * target_h + target_w) // (2 * target_w)))
    # An odd leftover puts the extra row/column at the bottom/right.
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize(rgb: np.ndarray, size: tuple[int, int], policy: ResizePolicy = "nearest") -> np.ndarray:
    """Resize an RGB uint8 image to the model's input size.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8.
    size : (int, int)
        Target (height, width).
    policy : {"nearest", "bilinear", "center_crop"}, default "nearest"
        - ``"nearest"``: stretch to ``size`` with nearest-neighbour sampling; the aspect
          ratio is **not** kept. This is what the seed did (``load_img(target_size=...)``)
          and the package default.
        - ``"bilinear"``: stretch with Pillow's bilinear filter (which, when shrinking,
          averages over the whole footprint, i.e. antialiases).
        - ``"center_crop"``: crop the largest central box with the target aspect ratio,
          then resize it bilinearly; nothing is distorted, the borders are lost.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` uint8. Deterministic: Pillow's ``Image.resize`` on uint8.

    Raises
    ------
    ValueError
        Unknown policy (the message lists the allowed ones), bad ``size`` or ``rgb``.
    """
    policy = _check_policy(policy)
    height, width = _check_size(size)
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise ParameterValueError(
            f"rgb must be an (H, W, 3) uint8 array, got {type(rgb).__name__} "
            f"{getattr(rgb, 'shape', '')} {getattr(rgb, 'dtype', '')}"
        )
    if min(rgb.shape[:2]) == 0:
        raise ParameterValueError(f"rgb holds no pixels (shape {rgb.shape})")
    if policy == "center_crop":
        top, left, crop_h, crop_w = _centre_box(rgb.shape[0], rgb.shape[1], height, width)
        rgb = rgb[top : top + crop_h, left : left + crop_w]
    if rgb.shape[:2] == (height, width):
        return np.array(rgb)  # a copy, as Pillow would return
    resample = Image.Resampling.NEAREST if policy == "nearest" else Image.Resampling.BILINEAR
    image = Image.fromarray(np.ascontiguousarray(rgb))
    return np.array(image.resize((width, height), resample), dtype=np.uint8)  # Pillow sizes are (w, h)


def load_batch(refs: Sequence[ImageRef], size: tuple[int, int], policy: ResizePolicy = "nearest") -> np.ndarray:
    """Read and resize a batch of images.

    Parameters
    ----------
    refs : sequence of ImageRef
    size : (int, int)
        (height, width).
    policy : str, default "nearest"
        See :func:`resize`.

    Returns
    -------
    numpy.ndarray
        ``(len(refs), height, width, 3)`` uint8.

    Raises
    ------
    ImageError
        An image cannot be read (the first one, named in the message).
    ValueError
        Bad ``policy`` or ``size``, checked before anything is read.
    """
    policy = _check_policy(policy)
    height, width = _check_size(size)
    refs = list(refs)
    batch = np.empty((len(refs), height, width, 3), dtype=np.uint8)
    for i, ref in enumerate(refs):
        batch[i] = resize(read_rgb(ref), (height, width), policy)
    return batch
