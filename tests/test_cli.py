"""The `cnndiff` command, run through subprocess in a clean environment on tiny inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from tiny import write_pngs

import cnndiff_xr as cx

CNNDIFF = str(Path(sys.executable).with_name("cnndiff"))
LAYERS = "input_layer,Conv1_relu,out_relu,predictions"  # a light slice of MobileNetV2


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": os.environ.get("KERAS_HOME", "")}
    env = {k: v for k, v in env.items() if v}
    proc = subprocess.run([CNNDIFF, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cnndiff {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    write_pngs(base / "photos", 4, size=(40, 30))
    movie = np.random.default_rng(0).integers(0, 256, (12, 20, 20), dtype=np.uint8)
    np.save(base / "movie.npy", movie)
    store = str(base / "acts.zarr")
    proc = run("extract", store, "--set", f"photos={base / 'photos'}", "--set", "noise=noise:4:1",
               "--set", f"movie={base / 'movie.npy'}", "--frame-step", "4", "--model", "mobilenet_v2",
               "--weights", "random", "--layers", LAYERS, "--batch-size", "3", "--workers", "2")
    assert "images/s" in proc.stdout
    assert "store size before compression" in proc.stderr and "total" in proc.stderr
    return base, store


def test_extract_and_info(cli_store):
    _, store = cli_store
    tree = cx.open_activations(store)
    assert tree.attrs["layers"] == LAYERS.split(",")
    assert tree.attrs["weights"] == "random(seed=0)"
    sets = list(tree["set"].values)
    assert sets.count("photos") == 4 and sets.count("noise") == 4 and sets.count("movie") == 3  # frames 0, 4, 8
    assert bool(tree["completed"].all())
    info = run("info", store).stdout
    assert "Conv1_relu" in info and "compression ratio" in info and "11 of 11 complete" in info


def test_differentiation_plot_and_summarize(cli_store):
    base, store = cli_store
    out = base / "d.nc"
    proc = run("differentiation", store, "--n-units", "50,500", "--resamples", "3", "--reference", "noise",
               "--out", str(out), "--workers", "1")
    assert "photos" in proc.stdout and "out_relu" in proc.stdout
    result = xr.open_dataset(out)
    assert result["differentiation"].dims == ("set", "layer", "n_units", "resample")
    assert result["differentiation"].shape == (3, 4, 2, 3)
    # (random MobileNetV2's softmax is flat: 0 differentiation at predictions, so 0/0 there)
    np.testing.assert_allclose(result["normalised"].sel(set="noise").drop_sel(layer="predictions").values, 1.0)
    assert (base / "d.csv").read_text().startswith("set,layer,n_units,resample")
    figs = base / "figs"
    run("plot", str(out), "--out", str(figs))
    for name in ("differentiation", "differentiation_by_noise", "stimulus_vs_layer_r2"):
        for ext in ("png", "svg"):
            assert (figs / f"{name}.{ext}").stat().st_size > 1000
        with Image.open(figs / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 500
    run("summarize", store, "--out", str(base / "fm.nc"), "--zscore", "--workers", "1")
    fm = xr.open_datatree(base / "fm.nc")
    assert fm["Conv1_relu"]["filter_mean"].dims == ("image", "filter")
    assert fm["Conv1_relu"]["filter_mean"].shape == (11, 32)
    store_figs = base / "store_figs"
    run("plot", store, "--out", str(store_figs), "--layers", "Conv1_relu,predictions", "--rdm-units", "100")
    for name in ("filter_means/Conv1_relu", "filter_means/predictions", "predictions", "rdms"):
        assert (store_figs / f"{name}.png").is_file()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["extract", "x.zarr"], "--set"),
        (["extract", "x.zarr", "--set", "nonsense"], "--set 'nonsense'"),
        (["extract", "x.zarr", "--set", "a=noise:x"], "noise:N"),
        (["extract", "x.zarr", "--set", "a=noise:3", "--weights", "/no/such.h5"], "--weights"),
        (["extract", "x.zarr", "--set", "a=noise:3", "--batch-size", "0"], "--batch-size"),
        (["extract", "x.zarr", "--set", "a=noise:3", "--dtype", "int8"], "--dtype"),
        (["extract", "x.zarr", "--set", "a=/no/such/folder"], "/no/such/folder"),
        (["extract", "x.zarr", "--set", "a=noise:3", "--model", "alexnet"], "alexnet"),
        (["info", "/no/such/store.zarr"], "not a cnndiff_xr store"),
        (["differentiation", "/no/such/store.zarr"], "not a cnndiff_xr store"),
        (["differentiation", "STORE", "--n-units", "0"], "--n-units"),
        (["differentiation", "STORE", "--norm", "weird"], "--norm"),
        (["differentiation", "STORE", "--reference", "nope"], "nope"),
        (["differentiation", "STORE", "--layers", "block9"], "block9"),
        (["differentiation", "STORE", "--out", "result.txt"], "--out"),
        (["summarize", "STORE", "--out", "fm.txt"], "--out"),
        (["plot", "/no/such/file.nc", "--out", "figs"], "/no/such/file.nc"),
        (["demo", "--n-images", "-1"], "--n-images"),
        (["demo", "--n-images", "19"], "--n-images 19"),
        (["differentiation", "STORE", "--out", "STORE"], "refusing to overwrite"),
        (["summarize", "STORE", "--out", "STORE"], "refusing to overwrite"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_non_zero_and_name_the_argument(cli_store, args, fragment):
    _, store = cli_store
    args = [store if a == "STORE" else a for a in args]
    proc = run(*args, check=False)
    assert proc.returncode != 0
    assert cx.open_activations(store).cnndiff.complete  # a refused command never harms the store
    assert fragment in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_help_on_every_subcommand():
    for command in ("extract", "info", "differentiation", "summarize", "plot", "demo"):
        proc = run(command, "--help")
        assert "usage: cnndiff " + command in proc.stdout
