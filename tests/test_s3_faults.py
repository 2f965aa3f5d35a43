"""Object-store hiccups: extraction into, and analysis from, ``s3://`` through a proxy that fails requests.

A real moto S3 server on loopback, and in front of it :class:`flaky_proxy.FlakyProxy`, which answers a seeded share
of requests (2 % while extracting, 10 % while analysing) with a 503 SlowDown or closes the connection without a
response. The store's ``endpoint_url`` points at the proxy (``storage_options``, which travel to the worker processes
of the session's LocalCluster). What survives it is the retries of botocore (5 attempts: 5xx, throttling, dropped
connections) within those of s3fs (5 tries: SlowDown, connection errors); the package adds none. A store that stays
down ends with :class:`~cnndiff_xr.extraction.store.StoreUnreachableError` naming the URL.

Kept fast, as every injected fault costs botocore a backoff of up to a second or more: 4 images; a low fault rate
while extracting (~1,000 requests even for 4 images, so ~20 faults) that still injects both kinds; the
reference store extracted to local disk and uploaded to moto directly; and, for the store that stays down,
botocore's retries cut to 2 attempts through ``config_kwargs`` (the package passes ``storage_options`` on
untouched; the default legacy mode's 5 attempts within s3fs's 5 tries take ~25 s per operation).
"""

from __future__ import annotations

import os
import time

import pytest
import xarray as xr
from faults import assert_same_store
from flaky_proxy import FlakyProxy
from moto_s3 import moto_server
from tiny import TINY_SIZE, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr.extraction import store

pytestmark = pytest.mark.timeout(600)

BUCKET = "cnndiff-faults"
KEY, SECRET = "cnndiff-test-key", "cnndiff-test-secret"
#: Fault rates: while extracting (most requests; every fault costs a backoff) and while analysing (few requests)
EXTRACT_FAIL_RATE, ANALYSE_FAIL_RATE = 0.02, 0.1
#: botocore's retries for the store that stays down: 2 attempts per call (within s3fs's own 5 tries)
FEW_RETRIES = {"retries": {"mode": "standard", "max_attempts": 2}}
#: With FEW_RETRIES a store that stays down must be reported within this many seconds per operation (~7 s measured;
#: the default retries, legacy mode's 5 attempts, took ~25 s)
DOWN_WITHIN_S = 20


def _options(endpoint: str, **extra) -> dict:
    """Explicit credentials and endpoint: the session's workers did not inherit this test's environment."""
    return {"key": KEY, "secret": SECRET, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"},
            **extra}


@pytest.fixture(scope="module")
def moto_url():
    import s3fs

    with moto_server() as url, pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)  # no ~/.aws settings
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")  # s3fs's bucket creation asks for a location otherwise
        s3fs.S3FileSystem.clear_instance_cache()
        # no region_name: s3fs would send it as a LocationConstraint, which us-east-1 refuses
        s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=url).mkdir(BUCKET)
        try:
            yield url
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def _sets():
    size = (TINY_SIZE, TINY_SIZE)
    return {"a": cx.images.white_noise(2, seed=1, size=size), "b": cx.images.white_noise(2, seed=2, size=size)}


def _extract(url, options, model, client):
    return cx.extract(_sets(), store=url, model=model, preprocess=tiny_preprocess(), client=client, batch_size=2,
                      progress=False, storage_options=options, return_report=True)


def _differentiation(tree):
    return cx.differentiation(tree, n_units=(20, 400), resamples=2, seed=1).compute(scheduler="threads")


@pytest.fixture(scope="module")
def local_clean_store(tmp_path_factory, tiny_model, local_client):
    """The reference extraction, on local disk: the same arrays as through S3 without a thousand S3 requests."""
    path = str(tmp_path_factory.mktemp("s3_faults") / "clean.zarr")
    _extract(path, None, tiny_model, local_client)
    return path


@pytest.fixture(scope="module")
def clean_store(moto_url, local_clean_store):
    """The reference store's files uploaded to moto directly (no proxy): an S3 store to read through the proxy."""
    import fsspec

    url = f"s3://{BUCKET}/clean.zarr"
    fsspec.filesystem("s3", **_options(moto_url)).put(local_clean_store, url.removeprefix("s3://"), recursive=True)
    return url


def test_extraction_and_analysis_survive_a_flaky_store(moto_url, local_clean_store, clean_store, tiny_model,
                                                       local_client, tmp_path):
    direct = _options(moto_url)
    url = f"s3://{BUCKET}/flaky.zarr"
    with FlakyProxy(moto_url, fail_rate=EXTRACT_FAIL_RATE, seed=0) as proxy:
        _, report = _extract(url, _options(proxy.url), tiny_model, local_client)
        extraction_faults = dict(proxy.injected)
        assert report.batches_computed == 2 and report.images_computed == 4
        proxy.fail_rate = ANALYSE_FAIL_RATE
        tree = cx.open_activations(clean_store, storage_options=_options(proxy.url))
        got = _differentiation(tree)
        analysis_faults = proxy.n_injected - sum(extraction_faults.values())
    # both kinds of fault happened in the extraction, and some in the analysis
    assert extraction_faults.get("503", 0) > 0 and extraction_faults.get("drop", 0) > 0, extraction_faults
    assert analysis_faults > 0
    # the store written through the proxy is the clean one, value for value (read back directly from moto)
    import fsspec

    fs = fsspec.filesystem("s3", **direct)
    assert not fs.exists(f"{BUCKET}/flaky.zarr.lock")  # the lock was released through the proxy too
    fs.get(url.removeprefix("s3://"), str(tmp_path / "flaky"), recursive=True)
    assert_same_store(str(tmp_path / "flaky"), local_clean_store)
    # the analysis read through the proxy gives the clean numbers
    xr.testing.assert_identical(got, _differentiation(cx.open_activations(clean_store, storage_options=direct)))


@pytest.mark.parametrize("fault", [
    "503",
    # a call whose last attempt lost its connection raises botocore's ConnectionClosedError (a BotoCoreError, not an
    # OSError): store.reaching passed it on unnamed until it recognised botocore's errors too
    "drop",
])
def test_a_store_that_stays_down_is_reported_naming_the_url(moto_url, clean_store, tiny_model, local_client, fault):
    with FlakyProxy(moto_url, fail_rate=1.0, faults=(fault,), seed=1) as proxy:
        options = _options(proxy.url, config_kwargs=FEW_RETRIES)
        t0 = time.monotonic()
        with pytest.raises(store.StoreUnreachableError, match=f"could not reach store '{clean_store}' while "):
            cx.open_activations(clean_store, storage_options=options)
        assert time.monotonic() - t0 < DOWN_WITHIN_S
        url = f"s3://{BUCKET}/down-{fault}.zarr"
        t0 = time.monotonic()
        with pytest.raises(store.StoreUnreachableError, match=f"could not reach store '{url}' while ") as info:
            _extract(url, options, tiny_model, local_client)
        assert time.monotonic() - t0 < DOWN_WITHIN_S
        assert isinstance(info.value, OSError) and "rerun" in str(info.value)
        assert proxy.forwarded == 0 and proxy.n_injected > 0
    assert not store.exists(url, storage_options=_options(moto_url))  # nothing was written


def test_reaching_leaves_local_and_path_errors_alone(tmp_path):
    with pytest.raises(OSError) as info, store.reaching(str(tmp_path), "testing"):
        raise OSError(5, "local disk error")
    assert not isinstance(info.value, store.StoreUnreachableError)
    with pytest.raises(FileNotFoundError), store.reaching("s3://bucket/x.zarr", "testing"):
        raise FileNotFoundError("s3://bucket/x.zarr")
    with pytest.raises(store.StoreUnreachableError, match="'s3://bucket/x.zarr' while testing: OSError"), \
            store.reaching("s3://bucket/x.zarr", "testing"):
        raise OSError(16, "Service Unavailable")
