"""Bad parameters: every public function of extraction, store, lock, images and cluster, and every CLI option,
refuses bad input with an error that names the parameter and what it accepts.

Every call here fails during validation, before any model is built or any cluster started (the few that need the
tiny model to know its layers build it in this process).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from tiny import build_tiny_model, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr import cli
from cnndiff_xr.extraction import cluster, images, lock, store

pytestmark = pytest.mark.timeout(120)

SETS = {"a": images.white_noise(2, seed=0, size=(32, 32))}


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


# (keyword arguments of extract beyond sets/store/model/preprocess, exception type, message fragment)
EXTRACT_CASES = [
    ({"store": 123}, TypeError, "store must be a non-empty path or fsspec URL"),
    ({"store": ""}, TypeError, "store must be a non-empty path or fsspec URL"),
    ({"sets": "photos/*.jpg"}, TypeError, "sets must be a mapping of set name -> images"),
    ({"sets": {}}, ValueError, "sets is empty"),
    ({"sets": {"a/b": images.white_noise(1)}}, ValueError, "set name 'a/b' is invalid"),
    ({"sets": {"a": 5}}, TypeError, "cannot make an image source from int"),
    ({"dtype": "float64"}, ValueError, "dtype='float64'; choose one of ('float32', 'float16')"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
    ({"batch_size": 2.5}, ValueError, "batch_size must be a positive int, got 2.5"),
    ({"batch_size": True}, ValueError, "batch_size must be a positive int, got True"),
    ({"resize": "cubic"}, ValueError, "resize='cubic'; choose one of ('nearest', 'bilinear', 'center_crop')"),
    ({"on_error": "ignore"}, ValueError, "on_error='ignore'; choose one of ('raise', 'skip')"),
    ({"compression": "lz5"}, ValueError, "compression='lz5'; choose one of ('zstd', 'blosc', 'lz4', 'none')"),
    ({"compression_level": 99}, ValueError, "compression_level=99: for compression='lz4' it must be an int in 0..9"),
    ({"compression": "zstd", "compression_level": 23}, ValueError, "for compression='zstd' it must be an int in 0..22"),
    ({"compression_level": "3"}, ValueError, "compression_level='3'"),
    ({"compression": "blosc", "compression_level": 12}, ValueError,
     "for compression='blosc' it must be an int in 0..9"),
    ({"seed": -1}, ValueError, "seed must be a non-negative int, got -1"),
    ({"seed": 1.5}, ValueError, "seed must be a non-negative int, got 1.5"),
    ({"layers": 5}, TypeError, "layers must be None (every layer but reshapes), 'seed' or a list of layer names"),
    ({"layers": ["conv1", 2]}, TypeError, "layers must be None"),
    ({"layers": "all"}, ValueError, "layers='all': a preset must be one of ('seed',)"),
    ({"layers": ["nope"]}, ValueError, "layers: ['nope'] are not layers of model 'tiny'"),
    ({"layers": []}, ValueError, "layers=[] selects nothing"),
    ({"preprocess": 5}, TypeError, "preprocess must be a function"),
    ({"preprocess": None}, ValueError, "a keras.Model needs preprocess="),
    ({"client": 5}, TypeError, "client must be None (an embedded LocalCluster), a scheduler address"),
    ({"client": "not an address"}, ValueError, "client='not an address' is not a Dask scheduler address"),
    ({"client": "http://x:1"}, ValueError, "schemes: tcp, tls"),
    ({"n_workers": 0}, ValueError, "n_workers must be a positive int or None"),
    ({"n_workers": 2, "client": "tcp://127.0.0.1:8786"}, ValueError, "cannot be combined with client="),
    ({"storage_options": "anon"}, TypeError, "storage_options must be a mapping of fsspec filesystem options"),
    ({"storage_options": {1: 2}}, TypeError, "storage_options keys must be str"),
    ({"progress": "yes"}, TypeError, "progress must be True or False, got 'yes'"),
    ({"return_report": 1}, TypeError, "return_report must be True or False"),
    ({"break_lock": "no"}, TypeError, "break_lock must be True or False"),
    ({"model": "nope", "preprocess": None}, ValueError, "model='nope' is not a known keras.applications model; choose"),
    ({"model": 5, "preprocess": None}, TypeError, "model must be a keras.applications name or a keras.Model"),
    ({"model": "vgg16", "preprocess": None, "weights": "/no/such/weights.h5"}, FileNotFoundError,
     "weights file '/no/such/weights.h5' does not exist (weights= takes 'imagenet', None"),
    ({"model": "vgg16"}, ValueError, "preprocess= is only for a keras.Model"),
    ({"sets": {"a": "/no/such/folder/*.png"}}, images.ImageError,
     "/no/such/folder/*.png: glob pattern matched nothing"),
    # a set that names no image is refused with on_error="skip" too: it is not an unreadable image (issue 16)
    ({"sets": {**SETS, "b": "/no/such/folder/*.png"}, "on_error": "skip"}, images.ImageError,
     "1 image set(s) name no image at all; nothing was written. Fix the path or glob, or leave the set out "
     "(on_error='skip' (--on-error skip) leaves out unreadable images, not whole sets):\n"
     "  set 'b': /no/such/folder/*.png: glob pattern matched nothing"),
]


@pytest.mark.parametrize("kwargs, error, fragment", EXTRACT_CASES, ids=[
    "-".join(f"{k}={v!r}"[:30] for k, v in case[0].items()) for case in EXTRACT_CASES])
def test_extract_rejects_bad_arguments(tmp_path, model, kwargs, error, fragment):
    path = str(tmp_path / "s.zarr")
    call = {"sets": SETS, "store": path, "model": model, "preprocess": tiny_preprocess(), "progress": False,
            **kwargs}
    with pytest.raises(error) as err:
        cx.extract(**call)
    assert fragment in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no lock left behind


def _tree():
    ds = xr.Dataset({"activation": (("image", "filter"), np.zeros((2, 3), "float32"))},
                    coords={"image": ["a/0", "a/1"], "set": ("image", ["a", "a"]), "filter": [0, 1, 2]})
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs={"layers": ["dense"]}), "/dense": ds})


STORE_CASES = [
    (lambda p: cx.open_activations(123), TypeError, "store must be a non-empty path or fsspec URL"),
    (lambda p: cx.open_activations(p, storage_options=5), TypeError, "storage_options must be a mapping"),
    (lambda p: cx.open_activations(p), store.StoreError, "is not a cnndiff_xr store (nothing is there"),
    (lambda p: store.info(None), TypeError, "store must be a non-empty path"),
    (lambda p: store.open_group(p, mode="x"), ValueError, "mode='x'; choose one of ('r', 'r+', 'a', 'w', 'w-')"),
    (lambda p: store.completed(p, storage_options=[1]), TypeError, "storage_options must be a mapping"),
    (lambda p: store.codec("lz5"), ValueError, "compression='lz5'; choose one of ('zstd', 'blosc', 'lz4', 'none')"),
    (lambda p: store.codec("zstd", 50), ValueError, "compression_level=50: for compression='zstd'"),
    (lambda p: store.uncompressed_nbytes({}, -1, "float32"), ValueError, "n_images must be a non-negative int"),
    (lambda p: store.uncompressed_nbytes({}, 1, "int8"), ValueError, "dtype='int8'; choose one of"),
    (lambda p: store.layer_dims((2, 3)), ValueError, "cannot store a layer output of per-image shape (2, 3)"),
    (lambda p: store.select(_tree(), ["nope"]), KeyError, "layers ['nope'] are not in this store; it has ['dense']"),
    (lambda p: store.select(_tree(), sets="b"), KeyError, "sets ['b'] are not in this store; it has ['a']"),
    (lambda p: lock.StoreLock(p, stale_after=0), ValueError, "stale_after must be a positive number of seconds"),
    (lambda p: lock.StoreLock(p, heartbeat=10, stale_after=5), ValueError,
     "heartbeat=10 must be shorter than stale_after=5"),
    (lambda p: lock.StoreLock(p, break_lock="yes"), TypeError, "break_lock must be True or False"),
    (lambda p: lock.lock_url(None), TypeError, "store must be a non-empty path"),
]

IMAGE_CASES = [
    (lambda p: images.files(5), TypeError, "files() spec must be a non-empty str or os.PathLike, got int"),
    (lambda p: images.files([]), images.ImageError, "files(): the list of paths is empty"),
    (lambda p: images.files(p, extensions=[""]), ValueError, "extensions must be strings such as '.png'"),
    (lambda p: images.files(p, errors="ignore"), ValueError, "errors='ignore'; choose one of ('raise', 'collect')"),
    (lambda p: images.image_table(SETS, errors="skip"), ValueError, "errors='skip'; choose one of"),
    (lambda p: images.white_noise(0), ValueError, "n must be >= 1, got 0"),
    (lambda p: images.white_noise(2, seed=-1), ValueError, "seed must be >= 0"),
    (lambda p: images.white_noise(2, seed=1.5), TypeError, "seed must be an integer"),
    (lambda p: images.white_noise(2, size=(0, 3)), ValueError, "size must be positive (height, width)"),
    (lambda p: images.white_noise(2, size=5), ValueError, "size must be (height, width), got 5"),
    (lambda p: images.movie_frames(p, step=0), ValueError, "step must be >= 1, got 0"),
    (lambda p: images.movie_frames(p, start=-1), ValueError, "start must be >= 0"),
    (lambda p: images.from_array(np.zeros((2, 2))), images.ImageError, "from_array: array 'array' must be (N, H, W)"),
    (lambda p: images.from_array(np.zeros((1, 2, 2)), value_range=(1, 0)), images.ImageError,
     "value_range must be finite with high > low"),
    (lambda p: images.as_source(5), TypeError, "cannot make an image source from int"),
    (lambda p: images.resize(np.zeros((2, 2, 3), "uint8"), (4, 4), "cubic"), ValueError,
     "unknown resize policy 'cubic': resize must be one of ('nearest', 'bilinear', 'center_crop')"),
    (lambda p: images.resize(np.zeros((2, 2), "uint8"), (4, 4)), ValueError, "rgb must be an (H, W, 3) uint8 array"),
    (lambda p: images.load_batch([], (0, 4)), ValueError, "size must be positive"),
    (lambda p: images.read_rgb("x.png"), TypeError, "read_rgb needs an image reference"),
    (lambda p: images.check_image(5), TypeError, "read_rgb needs an image reference"),
]


def _enter(client=None, **kwargs):
    with cluster.get_client(client, **kwargs):
        pass


CLUSTER_CASES = [
    (lambda p: _enter(5), TypeError, "client must be None, a scheduler address or a distributed.Client, got int"),
    (lambda p: _enter("two words"), ValueError, "client='two words' is not a Dask scheduler address"),
    (lambda p: _enter(n_workers=0), ValueError, "n_workers must be a positive int or None"),
    (lambda p: _enter(processes="yes"), TypeError, "processes must be True (worker processes) or False"),
    (lambda p: _enter(memory_limit=-1), ValueError, "memory_limit must be 'auto', a size such as '4GiB'"),
    (lambda p: cluster.check_address("tcp://"), ValueError, "is not a Dask scheduler address"),
]

_D = xr.DataArray(np.ones((2, 1, 1, 3)), dims=("set", "layer", "n_units", "resample"),
                  coords={"set": ["a", "b"], "layer": ["input_layer"], "n_units": [5]})
ANALYSIS_CASES = [
    (lambda p: cx.resample_summary(_D, interval="x"), ValueError, "interval must be a number in (0, 1)"),
    (lambda p: cx.resample_summary(_D, interval=1.5), ValueError, "interval=1.5"),
    (lambda p: cx.resample_summary(_D, ddof=-1), ValueError, "ddof must be a non-negative int"),
    (lambda p: cx.normalise_by_reference(_D, "nope"), KeyError, "unknown reference set 'nope'"),
    (lambda p: cx.filter_means(_tree(), zscore="yes"), TypeError, "zscore must be True or False"),
    (lambda p: cx.differentiation(_tree(), n_units=0), ValueError, "n_units"),
    (lambda p: cx.differentiation(_tree(), norm="weird"), ValueError, "norm"),
]


@pytest.mark.parametrize("call, error, fragment", STORE_CASES + IMAGE_CASES + CLUSTER_CASES + ANALYSIS_CASES)
def test_public_functions_reject_bad_arguments(tmp_path, call, error, fragment):
    with pytest.raises(error) as err:
        call(str(tmp_path / "thing"))
    assert fragment in str(err.value)


# ------------------------------------------------------------------------------------------------------------- CLI
# (argv, exit code, fragment of stderr). Exit 2: bad arguments (argparse or the CLI's own checks); 1: the job refused.
CLI_CASES = [
    (["extract"], 2, "the following arguments are required: store"),
    (["extract", "S"], 2, "--set: give at least one image set"),
    (["extract", "S", "--set", "bad"], 2, "--set 'bad': expected NAME=GLOB_OR_DIR_OR_NPY"),
    (["extract", "S", "--set", "a=noise:x"], 2, "--set 'a=noise:x': white noise is noise:N or noise:N:SEED"),
    (["extract", "S", "--set", "a=noise:2", "--set", "a=noise:3"], 2, "--set 'a' is given twice"),
    (["extract", "S", "--set", "a=noise:2", "--dtype", "float64"], 2,
     "argument --dtype: invalid choice: 'float64' (choose from"),
    (["extract", "S", "--set", "a=noise:2", "--batch-size", "0"], 2, "argument --batch-size: '0' must be at least 1"),
    (["extract", "S", "--set", "a=noise:2", "--batch-size", "x"], 2, "argument --batch-size: 'x' is not an integer"),
    (["extract", "S", "--set", "a=noise:2", "--resize", "cubic"], 2, "argument --resize: invalid choice: 'cubic'"),
    (["extract", "S", "--set", "a=noise:2", "--frame-step", "0"], 2, "argument --frame-step: '0' must be at least 1"),
    (["extract", "S", "--set", "a=noise:2", "--seed", "x"], 2, "argument --seed: 'x' is not an integer"),
    (["extract", "S", "--set", "a=noise:2", "--on-error", "ignore"], 2, "argument --on-error: invalid choice"),
    (["extract", "S", "--set", "a=noise:2", "--compression", "lz5"], 2, "argument --compression: invalid choice"),
    (["extract", "S", "--set", "a=noise:2", "--level", "x"], 2, "argument --level: invalid int value: 'x'"),
    (["extract", "S", "--set", "a=noise:2", "--level", "99"], 2, "--level 99: with --compression lz4 use 0..9"),
    (["extract", "S", "--set", "a=noise:2", "--seed", "-1"], 2, "argument --seed: '-1' must be at least 0"),
    (["extract", "S", "--set", "a=noise:2", "--workers", "0"], 2, "argument --workers: '0' must be at least 1"),
    (["extract", "S", "--set", "a=noise:2", "--scheduler", "tcp://h:1", "--workers", "2"], 2,
     "argument --workers: not allowed with argument --scheduler"),
    (["extract", "S", "--set", "a=noise:2", "--scheduler", "two words"], 2,
     "--scheduler='two words' is not a Dask scheduler address"),
    (["extract", "S", "--set", "a=noise:2", "--weights", "/no/such.h5"], 2,
     "--weights '/no/such.h5': use 'imagenet', 'random' or the path of a weights file"),
    (["extract", "S", "--set", "a=noise:2", "--model", "nope"], 2, "--model 'nope': choose one of"),
    (["extract", "S", "--set", "a=noise:2", "--layers", ",,"], 2, "--layers ',,': give 'default', 'seed' or a"),
    (["extract", "S", "--set", "a=/no/such/*.png", "--weights", "random"], 1,
     "/no/such/*.png: glob pattern matched nothing"),
    # a set that names nothing is a mistake, not an unreadable image: refused with --on-error skip too (issue 16)
    (["extract", "S", "--set", "a=noise:2", "--set", "b=/no/such/*.png", "--on-error", "skip", "--weights", "random"],
     1, "(--on-error skip) leaves out unreadable images, not whole sets):\n  set 'b': /no/such/*.png: glob pattern"),
    # an unknown layer is a bad argument (known once the model is built), with the closest names (issue 16)
    (["extract", "S", "--set", "a=noise:2", "--model", "mobilenet_v2", "--weights", "random", "--layers",
      "input_layer,Conv1_rel"], 2, "--layers: 'Conv1_rel' (did you mean 'Conv1_relu' or"),
    (["info"], 2, "the following arguments are required: store"),
    (["info", "/no/such/store.zarr"], 1, "'/no/such/store.zarr' is not a cnndiff_xr store"),
    (["frobnicate"], 2, "argument COMMAND: invalid choice: 'frobnicate'"),
]


def _run_main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, code, fragment", CLI_CASES, ids=[" ".join(c[0])[:50] for c in CLI_CASES])
def test_cli_rejects_bad_options(tmp_path, monkeypatch, capsys, argv, code, fragment):
    monkeypatch.chdir(tmp_path)
    got, err = _run_main(argv, capsys)
    assert got == code, err
    assert fragment in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_subprocess_exit_codes_and_messages(tmp_path):
    """The installed ``cnndiff`` command, as a user runs it (a few cases, concurrently: each start costs seconds)."""
    exe = os.path.join(os.path.dirname(sys.executable), "cnndiff")
    cases = [c for c in CLI_CASES if c[0][-2:] in (["--dtype", "float64"], ["--level", "99"])
             or c[0][:1] == ["info"] and len(c[0]) == 2]
    procs = [(subprocess.Popen([exe, *argv], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True), code, fragment) for argv, code, fragment in cases]
    assert len(procs) == 3
    for proc, code, fragment in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, (proc.args, err)
        assert fragment in err and "Traceback" not in err, (proc.args, err)
        assert re.match(r"(usage: cnndiff|cnndiff (extract|info): error: )", err), err
    assert list(tmp_path.iterdir()) == []
