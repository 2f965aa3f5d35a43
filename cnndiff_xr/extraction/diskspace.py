"""Disk space of a store: the preflight's estimate before a run, and what a run that filled its disk still needs.

Plain helpers without the run's error classes (those are :class:`cnndiff_xr.extraction.run.DiskFullError` and
:class:`~cnndiff_xr.extraction.run.NotEnoughSpaceError`), so that :mod:`~cnndiff_xr.extraction.run` and the tests
share one definition of "the disk is full" and of how free space and stored bytes are measured.

Free space is known only for a store on a local filesystem (``shutil.disk_usage`` of its folder, or of the nearest
folder above it that exists for a store not made yet); for an fsspec URL (S3, GCS, ...) it is unknown and the
preflight is skipped.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from ..schema import activation_path
from .store import _disk_bytes, _filesystem, _protocols

__all__ = ["DISK_FULL_ERRNOS", "PREFLIGHT_RATIO", "activation_bytes", "disk_full_cause", "free_bytes",
           "local_folder", "preflight_need"]

#: The errnos of a full disk: no space left on the device, or the user's disk quota exceeded.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: The compression ratio the preflight assumes, so that it refuses only when the disk is *clearly* too small: the
#: best ratio measured on VGG16 activations is 1.8 (float32, lz4; float16: 1.13 lz4, 1.73 zstd-1;
#: ``benchmarks/RESULTS.md``), with random weights, whose activations are denser than ImageNet weights' (43 % zeros
#: against 60-90 %), so real stores compress better. 4 leaves more than twice the measured ratio for that; a run it
#: lets through may still fill the disk, which stops it cleanly (DiskFullError) and a rerun resumes.
PREFLIGHT_RATIO = 4.0


def disk_full_cause(error: BaseException | None) -> OSError | None:
    """The ``OSError`` with errno ENOSPC or EDQUOT that ``error`` is or was raised from (its cause or context
    chain), or None when the error is not a full disk."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def local_folder(url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """The store's folder when it is on a local filesystem, else None (an fsspec URL: S3, memory, ...)."""
    fs, path = _filesystem(url, storage_options)
    return os.path.abspath(path) if "file" in _protocols(fs) else None


def free_bytes(url: str, storage_options: Mapping[str, Any] | None) -> int | None:
    """Free bytes on the filesystem of a local store (of the nearest existing folder above a store not made yet), or
    None when unknown (not a local store)."""
    path = local_folder(url, storage_options)
    if path is None:
        return None
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def activation_bytes(url: str, layers: Sequence[str], storage_options: Mapping[str, Any] | None) -> int | None:
    """Bytes the store's activation arrays take on disk (compressed chunks and their metadata), or None when they
    cannot be measured."""
    try:
        return sum(_disk_bytes(url, activation_path(name), storage_options) for name in layers)
    except Exception:  # a filesystem that cannot list sizes: the caller falls back to the uncompressed size
        return None


def preflight_need(uncompressed: int, compression: str) -> int:
    """The free bytes below which the preflight refuses, for ``uncompressed`` bytes still to write: all of them
    without compression, else a :data:`PREFLIGHT_RATIO`-th."""
    return int(uncompressed if compression == "none" else uncompressed / PREFLIGHT_RATIO)
