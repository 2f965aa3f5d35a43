"""Object storage: extraction into, and analysis from, an S3 bucket through fsspec/s3fs.

The S3 server is real: moto's server mode, started here on 127.0.0.1 on a free port. Credentials and the endpoint come
only from environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``); no
``storage_options`` are passed anywhere. The extraction runs on the embedded LocalCluster, whose worker process is
spawned after the environment is set and so inherits it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from moto_s3 import moto_server
from tiny import TINY_LAYERS, TINY_SIZE, tiny_preprocess, write_pngs

import cnndiff_xr as cx
from cnndiff_xr.extraction import images, lock, store

pytestmark = pytest.mark.timeout(300)

BUCKET = "cnndiff-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on loopback, and the environment that points s3fs (and child processes) at it."""
    import s3fs

    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        env = {"AWS_ACCESS_KEY_ID": "cnndiff-test-key", "AWS_SECRET_ACCESS_KEY": "cnndiff-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)  # no ~/.aws settings
        for name, value in env.items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        try:
            yield env
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_store(s3_env, tmp_path_factory, tiny_model):
    """Images uploaded to the bucket; the tiny model's activations extracted from there into s3://.../acts.zarr."""
    import fsspec

    local = tmp_path_factory.mktemp("s3-images")
    paths = write_pngs(local, 5, seed=4)
    fs = fsspec.filesystem("s3")
    for p in paths:
        fs.put_file(str(p), f"{BUCKET}/images/{p.name}")
    sets = {"photos": f"s3://{BUCKET}/images/*.png", "noise": images.white_noise(3, seed=2, size=(TINY_SIZE,) * 2)}
    url = f"s3://{BUCKET}/acts.zarr"
    tree, report = cx.extract(sets, store=url, model=tiny_model, preprocess=tiny_preprocess(), n_workers=1,
                              batch_size=2, progress=False, return_report=True)
    return url, paths, sets, report


def test_extract_into_s3(s3_store, tiny_model):
    import fsspec
    import keras

    url, paths, sets, report = s3_store
    assert report.images_computed == 8 and report.batches_computed == 4
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"{BUCKET}/acts.zarr/zarr.json") and fs.exists(f"{BUCKET}/acts.zarr/conv1/activation/c/3/0/0/0")
    assert not fs.exists(f"{BUCKET}/acts.zarr.lock")  # the writer lock was released
    assert not os.path.exists("s3:") and not os.path.exists(f"s3:/{BUCKET}")  # nothing went to a local folder
    tree = cx.open_activations(url)
    assert bool(tree["completed"].values.all())
    ids = list(tree["image"].values)
    assert ids[:5] == [f"photos/{p.name}" for p in paths] and len(set(ids)) == 8
    assert tree["conv1"]["activation"].sel(image="photos/img00.png")["source"].item() == \
        f"s3://{BUCKET}/images/img00.png"
    # values: the model run here on the same files read from the local disk
    table = images.image_table({"photos": [str(p) for p in paths], "noise": sets["noise"]})
    x = tiny_preprocess()(images.load_batch(table.refs, (TINY_SIZE, TINY_SIZE)).astype("float32"))
    dense = keras.Model(tiny_model.input, tiny_model.get_layer("dense").output)(x, training=False)
    np.testing.assert_allclose(tree["dense"]["activation"].compute(scheduler="synchronous").values,
                               np.asarray(dense), rtol=1e-5, atol=1e-6)


def test_analysis_from_s3(s3_store, tmp_path):
    import fsspec

    url = s3_store[0]
    tree = cx.open_activations(url)
    sliced = tree["conv2"]["activation"].sel(filter=[1, 3]).isel(image=slice(1, 6), y=slice(0, 4))
    assert sliced.chunks is not None  # still lazy: nothing read yet
    got = sliced.compute(scheduler="threads")
    assert got.shape == (5, 4, 13, 2)
    d = cx.differentiation(tree, n_units=(20, 400), resamples=2, seed=1).compute(scheduler="threads")
    assert np.isfinite(d.values).all() and d.sizes["layer"] == len(TINY_LAYERS)
    # the same from a local copy of the bucket's store: it is a plain Zarr store, and the numbers agree
    local = str(tmp_path / "copy.zarr")
    fsspec.filesystem("s3").get(f"{BUCKET}/acts.zarr", local, recursive=True)
    copy = cx.open_activations(local)
    xr.testing.assert_identical(got, copy["conv2"]["activation"].sel(filter=[1, 3]).isel(
        image=slice(1, 6), y=slice(0, 4)).compute(scheduler="synchronous"))
    xr.testing.assert_allclose(d, cx.differentiation(copy, n_units=(20, 400), resamples=2, seed=1).compute(
        scheduler="synchronous"))


def test_rerun_on_s3_is_a_no_op_and_lock_is_exclusive(s3_store, tiny_model):
    import fsspec

    url, _, sets, _ = s3_store
    _, again = cx.extract(sets, store=url, model=tiny_model, preprocess=tiny_preprocess(), n_workers=1,
                          batch_size=2, progress=False, return_report=True)
    assert (again.batches_computed, again.batches_already_complete) == (0, 4)
    # the server enforces exclusive creation (If-None-Match: *), which the lock relies on
    fs = fsspec.filesystem("s3")
    with fs.open(f"{BUCKET}/exclusive", "xb") as fh:
        fh.write(b"1")
    with pytest.raises(FileExistsError):
        with fs.open(f"{BUCKET}/exclusive", "xb") as fh:
            fh.write(b"2")
    assert fs.cat(f"{BUCKET}/exclusive") == b"1"
    with lock.StoreLock(url) as held:
        assert lock.read_lock(url)["token"] == held.token
        with pytest.raises(lock.StoreLockedError, match=f"store '{url}' is being written"):
            lock.StoreLock(url).acquire()
        with pytest.raises(lock.StoreLockedError):
            cx.extract(sets, store=url, model=tiny_model, preprocess=tiny_preprocess(), n_workers=1, progress=False)
    assert lock.read_lock(url) is None


def test_cli_info_on_s3_with_environment_credentials_only(s3_store, s3_env):
    url = s3_store[0]
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cnndiff"), "info", url],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **s3_env})
    assert result.returncode == 0, result.stderr
    assert "images: 8 of 8 complete" in result.stdout and "conv1" in result.stdout
