"""Shared benchmark helpers: machine description, natural test images, timing."""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path


def machine_info() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import keras
    import numpy
    import scipy
    import xarray
    import zarr

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas_name = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - informational only
        blas_name = "unknown BLAS"
    return (f"{platform.node()}: {cores} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"Python {platform.python_version()}, numpy {numpy.__version__} ({blas_name}), scipy {scipy.__version__}, "
            f"xarray {xarray.__version__}, zarr {zarr.__version__}, keras {keras.__version__} "
            f"({keras.backend.backend()})")


def natural_image_sets(folder: Path, n_per_set: int) -> dict[str, str]:
    """Photo and cat sets written as PNG files (the demo's images)."""
    from cnndiff_xr.demo import write_image_sets

    return write_image_sets(folder, n_per_set)


@contextmanager
def timer(results: dict, key: str):
    t0 = time.perf_counter()
    yield
    results[key] = time.perf_counter() - t0
