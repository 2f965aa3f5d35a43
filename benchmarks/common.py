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
    except Exception:
        blas_name = "unknown BLAS"
    return (f"{platform.node()}: {cores} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"Python {platform.python_version()}, numpy {numpy.__version__} ({blas_name}), scipy {scipy.__version__}, "
            f"xarray {xarray.__version__}, zarr {zarr.__version__}, keras {keras.__version__} "
            f"({keras.backend.backend()})")


def natural_image_sets(folder: Path, n_images: int) -> dict[str, str]:
    """``n_images`` natural photographs as PNG files in two sets, the demo's: scikit-image's bundled photos (up to
    18) and crops and flips of its cat photograph (the rest)."""
    from PIL import Image

    from cnndiff_xr.demo import PHOTOS, cat_variants, write_image_sets

    n_photos = min(len(PHOTOS), max(n_images // 2, 1))
    sets = write_image_sets(folder, n_photos)  # n_photos photos and n_photos cats
    for i, view in enumerate(cat_variants(max(n_images - 2 * n_photos, 0), seed=1)):
        Image.fromarray(view).save(Path(sets["tabby_cats"]) / f"tabby_cats_more_{i:03d}.png")
    return sets


@contextmanager
def timer(results: dict, key: str):
    t0 = time.perf_counter()
    yield
    results[key] = time.perf_counter() - t0


def tree_datasets(tree) -> list:
    """The datasets of a lazy DataTree's nodes that hold variables: what a Client computes (a DataTree is not a dask
    collection, so ``client.compute(tree)`` hands it back uncomputed)."""
    return [node.to_dataset() for node in tree.subtree if node.data_vars]
