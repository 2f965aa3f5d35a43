"""Shared fixtures: a tiny functional CNN, a real 2-process LocalCluster, and a real store made from them."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np
import pytest
from tiny import TINY_SIZE, build_tiny_model, tiny_preprocess, write_pngs


@pytest.fixture(scope="session")
def local_client():
    """A real dask.distributed LocalCluster: 2 worker processes, one thread each."""
    from distributed import Client, LocalCluster

    from cnndiff_xr.extraction.cluster import WORKER_ENV

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=WORKER_ENV) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_sets(tmp_path_factory):
    """Three sets of different kinds: PNG files, an in-memory array, white noise."""
    import cnndiff_xr as cx

    folder = tmp_path_factory.mktemp("photos")
    write_pngs(folder, 5)
    rng = np.random.default_rng(1)
    return {
        "photos": str(folder),
        "array": rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
        "white_noise": cx.images.white_noise(7, seed=3, size=(TINY_SIZE, TINY_SIZE)),
    }


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model, tiny_sets, local_client):
    """A real store: the tiny CNN over 18 images in 3 sets, batch 4, written on the 2-process cluster."""
    import cnndiff_xr as cx

    path = str(tmp_path_factory.mktemp("stores") / "tiny.zarr")
    cx.extract(tiny_sets, store=path, model=tiny_model, preprocess=tiny_preprocess(), client=local_client,
               batch_size=4, progress=False)
    return path


#: Modules that take minutes (real VGG16 runs, the demo, the notebook, CLI subprocesses), slowest first: they run
#: before the rest, so that under pytest-xdist (pyproject's addopts) none of them starts last and becomes the suite's
#: tail while the other process has nothing left to do. Seconds from a serial run's --durations (2 cores, 2026-12).
SLOW_MODULES = ("test_readme.py",  # 436 s
                "test_cli.py",  # 333 s
                "test_notebook_and_demo.py",  # ~200 s
                "test_models.py",  # 105 s
                "test_append.py",  # 69 s
                "test_reduced_extraction.py",  # 64 s
                "test_s3_faults.py",  # 61 s
                "test_large_n.py",  # 49 s
                "test_cluster_faults.py")  # 49 s


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its own order
