"""The `cnndiff` command, run through subprocess in a clean environment on tiny inputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from cli_run import main_in_process
from PIL import Image
from tiny import write_pngs

import cnndiff_xr as cx
from cnndiff_xr import cli
from cnndiff_xr.extraction import lock, store

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


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in folder.rglob("*") if p.is_file()}


def test_plot_never_overwrites_figures_unless_asked(cli_store):
    base, store = cli_store
    result = base / "plot_twice.nc"
    run("differentiation", store, "--n-units", "50", "--resamples", "2", "--reference", "noise", "--out", str(result),
        "--workers", "1")
    figs = base / "plot_twice"
    figs.mkdir()
    (figs / "my_figure.png").write_bytes(b"the user's own figure")
    first = run("plot", str(result), "--out", str(figs)).stdout.split()
    assert sorted(Path(p).name for p in first) == sorted(
        f"{name}.{ext}" for name in ("differentiation", "differentiation_by_noise", "stimulus_vs_layer_r2")
        for ext in ("png", "svg"))
    before = _snapshot(figs)

    again = run("plot", str(result), "--out", str(figs), check=False)  # the same figures again: refused
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "--overwrite" in again.stderr and "differentiation.png" in again.stderr
    assert _snapshot(figs) == before  # nothing written, nothing replaced
    assert not list(figs.glob(".cnndiff-staging-*"))

    # the store's figures have other names: they go into the same folder without --overwrite (the README's workflow)
    run("plot", store, "--out", str(figs), "--layers", "Conv1_relu", "--rdm-units", "50")
    assert (figs / "rdms.png").is_file() and (figs / "filter_means" / "Conv1_relu.png").is_file()
    with_store = _snapshot(figs)
    assert {k: v for k, v in with_store.items() if k in before} == before

    replaced = run("plot", str(result), "--out", str(figs), "--overwrite").stdout.split()
    assert sorted(replaced) == sorted(first)
    after = _snapshot(figs)
    assert after["my_figure.png"] == before["my_figure.png"]  # another file in the folder is never touched
    assert all(after[k][0] > before[k][0] for k in before if k != "my_figure.png")  # ours were replaced
    assert after["rdms.png"] == with_store["rdms.png"]


def test_plot_refuses_a_file_where_it_writes_a_folder(cli_store, tmp_path):
    _, store = cli_store
    (tmp_path / "filter_means").write_text("not a folder")
    proc = run("plot", store, "--out", str(tmp_path), "--layers", "Conv1_relu", "--rdm-units", "50",
               "--overwrite", check=False)
    assert proc.returncode == 2 and "filter_means" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "filter_means").read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filter_means"]  # nothing else was placed


def test_differentiation_with_a_reference_prints_the_normalised_table(cli_store):
    _, store = cli_store
    proc = run("differentiation", store, "--n-units", "50", "--resamples", "2", "--reference", "noise",
               "--layers", "input_layer,Conv1_relu", "--workers", "1")
    raw, normalised = proc.stdout.split("differentiation / noise")
    assert "differentiation, 50 units" in raw
    lines = normalised.splitlines()  # "(per draw), 50 units ...", "set  photos noise movie", "layer", rows
    header = next(line.split() for line in lines if line.startswith("set "))
    rows = [line.split() for line in lines if line.startswith(("input_layer", "Conv1_relu"))]
    assert [row[0] for row in rows] == ["input_layer", "Conv1_relu"]
    noise_column = header.index("noise")  # "set" heads the layer names' column
    assert all(row[noise_column] == "1.0000" for row in rows)  # the reference divided by itself
    assert any(row[c] != "1.0000" for row in rows for c in range(1, len(row)))


def test_summarize_carries_the_provenance_and_plot_draws_it(cli_store, tmp_path):
    _, store = cli_store
    attrs = cx.open_activations(store).attrs
    for out in (tmp_path / "fm.nc", tmp_path / "fm.zarr"):
        run("summarize", store, "--out", str(out), "--zscore", "--layers", "Conv1_relu,predictions",
            "--workers", "1")
        fm = xr.open_datatree(out, engine="zarr" if out.suffix == ".zarr" else None)
        for key in ("model", "weights", "weights_sha256", "input_size", "resize", "preprocessing", "dtype",
                    "cnndiff_xr_version", "created", "store_id"):
            assert key in fm.attrs, key
            expected = attrs[key]
            assert (list(fm.attrs[key]) if isinstance(expected, list) else fm.attrs[key]) == expected, key
        assert fm.attrs["store"] == store
        assert list(fm.attrs["layers"]) == ["Conv1_relu", "predictions"]  # what the file holds
        assert "format" not in fm.attrs  # never taken for an activation store
        assert "skipped_images" in fm.attrs
        assert fm["Conv1_relu"].attrs["unit_name"] == "filter" and fm["predictions"].attrs["unit_name"] == "class"
    assert run("info", str(tmp_path / "fm.zarr"), check=False).returncode != 0

    figs = tmp_path / "figs"
    printed = run("plot", str(tmp_path / "fm.nc"), "--out", str(figs)).stdout.split()
    assert sorted(Path(p).relative_to(figs).as_posix() for p in printed) == [
        "filter_means/Conv1_relu.png", "filter_means/predictions.png"]
    with Image.open(figs / "filter_means" / "Conv1_relu.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    # the same figure as from the store itself (title, units, colours, random-weights note: all from the file)
    run("plot", store, "--out", str(tmp_path / "from_store"), "--layers", "Conv1_relu", "--rdm-units", "50")
    assert (figs / "filter_means" / "Conv1_relu.png").read_bytes() == \
        (tmp_path / "from_store" / "filter_means" / "Conv1_relu.png").read_bytes()
    assert run("plot", str(tmp_path / "fm.zarr"), "--out", str(figs), check=False).returncode == 2  # exists
    run("plot", str(tmp_path / "fm.zarr"), "--out", str(tmp_path / "figs2"), "--layers", "predictions")
    assert [p.name for p in (tmp_path / "figs2" / "filter_means").iterdir()] == ["predictions.png"]


def test_differentiation_result_carries_the_provenance(cli_store, tmp_path):
    _, store = cli_store
    attrs = cx.open_activations(store).attrs
    out = tmp_path / "d.nc"
    run("differentiation", store, "--n-units", "50", "--resamples", "2", "--layers", "Conv1_relu", "--out", str(out),
        "--workers", "1")
    result = xr.open_dataset(out)
    assert result.attrs["weights"] == attrs["weights"] == "random(seed=0)"
    assert result.attrs["weights_sha256"] == attrs["weights_sha256"] and result.attrs["store"] == store
    assert result.attrs["created"] == attrs["created"] and "format" not in result.attrs


# ------------------------------------------------------- issue 16: quiet logs, CLI-shaped mistakes, Ctrl-C (items 5-6)
#: What TensorFlow prints when its logging is not kept quiet: C++ log lines, absl's notice, oneDNN's notice.
TF_NOISE = re.compile(r"^[IWEF]\d{4} |oneDNN|absl", re.M)
QUICK = ["--model", "mobilenet_v2", "--weights", "random", "--layers", "input_layer,Conv1_relu"]


def run_as_user(*args: str, env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    """``cnndiff`` in a user's environment: unlike run() above, nothing sets TF_CPP_MIN_LOG_LEVEL."""
    env = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}, **(env or {})}
    return subprocess.run([CNNDIFF, *args], capture_output=True, text=True, env=env, timeout=600, **popen)


def test_extract_keeps_tensorflow_quiet_unless_verbose(tmp_path):
    """The CLI, its model build and both worker processes print no TensorFlow log line by default; --verbose (given
    after the command here) lets them through, which shows that this test sees them when they are printed."""
    common = ["--set", "noise=noise:3", *QUICK, "--batch-size", "2", "--workers", "2"]
    quiet = run_as_user("extract", str(tmp_path / "quiet.zarr"), *common)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not TF_NOISE.search(quiet.stderr), quiet.stderr[-3000:]
    assert "store size before compression" in quiet.stderr and "Traceback" not in quiet.stderr
    loud = run_as_user("extract", str(tmp_path / "loud.zarr"), *common, "--verbose")
    assert loud.returncode == 0, loud.stderr[-3000:]
    if platform.machine().lower() in ("x86_64", "amd64"):  # TensorFlow's x86 builds announce oneDNN as they load
        assert TF_NOISE.search(loud.stderr), loud.stderr[-3000:]


def test_global_options_before_or_after_the_command():
    parser = cli.build_parser()
    for argv in (["--verbose", "--debug", "info", "s.zarr"], ["info", "s.zarr", "--verbose", "--debug"]):
        args = parser.parse_args(argv)
        assert args.verbose and args.debug, argv
    args = parser.parse_args(["info", "s.zarr"])
    assert not args.verbose and not args.debug


def test_weights_hint_uses_cli_syntax(tmp_path):
    """ImageNet weights that cannot be downloaded (a real download, through a proxy that refuses): the remedy is
    spelled as the command line spells it."""
    proxy = "http://127.0.0.1:9"  # the discard port: nothing listens there
    env = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy,
           "http_proxy": proxy}
    proc = run_as_user("extract", str(tmp_path / "s.zarr"), "--set", "a=noise:2", "--model", "mobilenet_v2",
                       "--layers", "input_layer,Conv1_relu", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "WeightsUnavailableError" in proc.stderr and "--weights random" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "s.zarr").exists()


def test_ctrl_c_during_extract_says_what_was_saved_and_exits_130(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group (the command and its worker processes),
    in the middle of the extraction. One line, no traceback; the store keeps what was written and resumes."""
    path = tmp_path / "big.zarr"
    args = ["extract", str(path), "--set", "noise=noise:2000", *QUICK, "--batch-size", "4", "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    # Ctrl-C's default disposition in the command, as a shell gives it: an ignored SIGINT is inherited across exec
    # (and Python then installs no KeyboardInterrupt handler), and something earlier in a full test run leaves this
    # process ignoring it -- the cause of two CI failures where the command ran on to its end
    proc = subprocess.Popen([CNNDIFF, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                if store.completed(str(path)).sum() >= 8:  # two batches written, 1990-odd images to go
                    break
            except Exception:  # not created yet
                pass
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        # Seen once in CI on a loaded machine: the first Ctrl-C lost (the extraction ran on to its end, exit 0; the
        # cause is not found: a KeyboardInterrupt raised inside a finaliser is reported and dropped by Python). A
        # user presses again; so does this test, but only once the store shows the run going on regardless.
        at_signal = int(store.completed(str(path)).sum())
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if int(store.completed(str(path)).sum()) >= at_signal + 40:  # 10 more batches: not stopping
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    done = int(store.completed(str(path)).sum())
    assert 8 <= done < 2000
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [f"cnndiff extract: interrupted (Ctrl-C); {done} of 2000 images are saved in {path}; rerun the "
                     "same command to extract the rest (it resumes)"], err[-3000:]
    assert err.rstrip().endswith(lines[0])  # the last word, after the progress bar
    assert lock.read_lock(str(path)) is None  # released: the rerun is not refused


def test_analysis_messages_name_images_by_their_ids(cli_store):
    """Random MobileNetV2's class probabilities are the same for every image, so correlation distances are
    undefined there; the message names the images as the store does, not as numpy's np.str_('...') reprs."""
    _, store_path = cli_store
    proc = run("differentiation", store_path, "--layers", "predictions", "--metric", "correlation", "--n-units", "20",
               "--resamples", "1", "--workers", "1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "constant activations" in proc.stderr, proc.stderr[-3000:]
    assert "np.str_" not in proc.stderr
    assert re.search(r"\(e\.g\. \['(photos|noise|movie)/[^']+'", proc.stderr), proc.stderr[-3000:]


# ----------------------------------------------------------------------- issue 14: reduced stores on the command line
#: draws registered by the reduced stores below: every layer of LAYERS is larger than 500 units, so all are reduced
DRAWS = ["--n-units", "50,500", "--resamples", "3"]


_main = main_in_process  # the workers of the session's cluster have built the models already


def _extract_like_cli_store(base: Path, path: Path, address: str, *more: str) -> tuple[str, str]:
    """The images and model of ``cli_store`` into ``path`` with more options; stdout and stderr."""
    code, out, err = _main(["extract", str(path), "--set", f"photos={base / 'photos'}", "--set", "noise=noise:4:1",
                            "--set", f"movie={base / 'movie.npy'}", "--frame-step", "4", "--model", "mobilenet_v2",
                            "--weights", "random", "--layers", LAYERS, "--batch-size", "3", "--scheduler", address,
                            *more])
    assert code == 0, err[-3000:]
    return out, err


@pytest.fixture(scope="module")
def reduced_stores(cli_store, local_client, tmp_path_factory):
    """``cli_store``'s images extracted twice more with --units draws: with --filter-means, and without them with
    another draw seed. Returns (folder, full store, reduced store, its extract stderr, reduced store without means)."""
    base, full = cli_store
    folder = tmp_path_factory.mktemp("reduced")
    address = local_client.scheduler.address
    _, err = _extract_like_cli_store(base, folder / "reduced.zarr", address, "--units", "draws", *DRAWS,
                                     "--filter-means")
    _extract_like_cli_store(base, folder / "no_means.zarr", address, "--units", "draws", "--n-units", "50",
                            "--resamples", "1", "--draw-seed", "1", "--quiet")
    return folder, full, str(folder / "reduced.zarr"), err, str(folder / "no_means.zarr")


def test_extract_units_draws_writes_a_reduced_store_that_info_describes(reduced_stores):
    folder, full, reduced, err, no_means = reduced_stores
    # the size preflight gives every layer's reduced size next to its full size
    assert "keeping the units of draws n_units [50, 500], resamples 0..2, seed 0, unit_type 'random'" in err
    assert re.search(r"Conv1_relu +\(112, 112, 32\) +[\d.]+ kB \(every unit: [\d.]+ MB\)", err), err[-3000:]
    tree = cx.open_activations(reduced)
    assert tree.attrs["unit_draws"] == {"n_units": [50, 500], "resamples": 3, "seed": 0, "unit_type": "random"}
    assert tree.attrs["filter_means"] is True and tree.cnndiff.complete
    assert tree.cnndiff["Conv1_relu"].dims == ("image", "unit")
    assert list(tree["set"].values) == list(cx.open_activations(full)["set"].values)
    other = cx.open_activations(no_means).attrs  # --draw-seed, not --seed (the weights' seed, 0 here)
    assert other["unit_draws"] == {"n_units": [50], "resamples": 1, "seed": 1, "unit_type": "random"}
    assert other["filter_means"] is False and other["weights"] == "random(seed=0)"

    code, text, _ = _main(["info", reduced])
    assert code == 0
    assert "draws: n_units [50, 500], resamples 0..2, seed 0, unit_type 'random'" in text
    assert "filter means: stored at extraction" in text
    kept = cx.open_activations(reduced).cnndiff["Conv1_relu"].sizes["unit"]
    assert re.search(rf"^Conv1_relu +\(112, 112, 32\) +{kept} of 401408 ", text, re.M), text
    assert "filter means: not stored" in _main(["info", no_means])[1]
    assert "units: every unit of every layer (a full store)" in _main(["info", full])[1]
    code, text, _ = _main(["info", reduced, "--json"])
    summary = json.loads(text)
    assert summary["unit_draws"] == tree.attrs["unit_draws"] and summary["filter_means"] is True
    layer = next(item for item in summary["layers"] if item["layer"] == "Conv1_relu")
    assert (layer["units"], layer["units_kept"], layer["layer_shape"]) == (401408, kept, [112, 112, 32])


def test_unit_draws_from_the_extract_options():
    parse = cli.build_parser().parse_args
    common = ["extract", "s.zarr", "--set", "a=noise:2"]
    assert cli._unit_draws(parse(common)) == "all"
    assert cli._unit_draws(parse([*common, "--units", "draws"])) == cx.UnitDraws()  # 200,10000 x 10, seed 0, random
    assert cli._unit_draws(parse([*common, "--units", "draws", "--seed", "4", "--n-units", "10000,30",
                                  "--resamples", "2", "--unit-type", "per_filter"])) == cx.UnitDraws(
        n_units=(30, 10000), resamples=2, seed=4, unit_type="per_filter")  # --seed seeds the draws too
    assert cli._unit_draws(parse([*common, "--units", "draws", "--seed", "4", "--draw-seed", "7"])).seed == 7


@pytest.mark.parametrize(
    "more, fragment",
    [
        (["--n-units", "200"], "--n-units register unit draws for a reduced store: add --units draws"),
        (["--resamples", "2", "--unit-type", "per_filter"], "--resamples, --unit-type register unit draws"),
        (["--draw-seed", "1"], "--draw-seed register unit draws for a reduced store: add --units draws"),
        (["--units", "draws", "--unit-type", "top"], "argument --unit-type: invalid choice: 'top'"),
        (["--units", "draws", "--n-units", "200,0"], "--n-units '200,0': expected positive integers"),
        (["--units", "some"], "argument --units: invalid choice: 'some'"),
    ],
)
def test_extract_draw_options_need_units_draws(tmp_path, monkeypatch, more, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["extract", "s.zarr", "--set", "a=noise:2", "--model", "mobilenet_v2", "--weights", "random",
                          *more])
    assert code == 2 and fragment in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_differentiation_of_a_reduced_store_defaults_to_its_draws(reduced_stores, local_client):
    folder, full, reduced, _, _ = reduced_stores
    address = local_client.scheduler.address
    code, table, err = _main(["differentiation", reduced, "--out", str(folder / "reduced.nc"), "--scheduler", address])
    assert code == 0, err
    assert ("reduced store: using its registered draws, n_units [50, 500], resamples 0..2, seed 0, unit_type 'random'"
            in err)
    assert "differentiation, 50 units (mean over 3 resamples)" in table and "500 units" in table
    code, full_table, err = _main(["differentiation", full, *DRAWS, "--seed", "0", "--unit-type", "random",
                                   "--out", str(folder / "full.nc"), "--scheduler", address])
    assert code == 0 and "reduced store" not in err, err
    assert table.split("wrote ")[0] == full_table.split("wrote ")[0]  # the printed tables
    assert (folder / "reduced.csv").read_text() == (folder / "full.csv").read_text()
    got, expected = xr.open_dataset(folder / "reduced.nc"), xr.open_dataset(folder / "full.nc")
    xr.testing.assert_identical(got["differentiation"], expected["differentiation"])
    assert got["differentiation"].shape == (3, 4, 2, 3)

    # a subset of the draws: the rest from the store, said so
    code, _, err = _main(["differentiation", reduced, "--n-units", "50", "--layers", "Conv1_relu",
                          "--scheduler", address])
    assert code == 0 and ("reduced store: --resamples, --seed, --unit-type from its registered draws; using n_units "
                          "[50], resamples 0..2, seed 0, unit_type 'random'") in err, err
    # a draw the store does not hold: a bad argument, with what the store holds
    code, _, err = _main(["differentiation", reduced, "--n-units", "100", "--scheduler", address])
    assert code == 2 and "does not hold draws with n_units [100]" in err and "Traceback" not in err, err
    assert "registered draws (n_units [50, 500], resamples 0..2, seed 0, unit_type 'random')" in err


def test_summarize_and_plot_a_reduced_store(reduced_stores, local_client, tmp_path):
    folder, full, reduced, _, no_means = reduced_stores
    address = local_client.scheduler.address
    # filter means: from the means stored at extraction, equal to the full store's; refused without them
    for store_path, out in ((reduced, tmp_path / "fm_reduced.nc"), (full, tmp_path / "fm_full.nc")):
        code, _, err = _main(["summarize", store_path, "--out", str(out), "--zscore", "--scheduler", address])
        assert code == 0, err
    got, expected = xr.open_datatree(tmp_path / "fm_reduced.nc"), xr.open_datatree(tmp_path / "fm_full.nc")
    for name in LAYERS.split(","):
        np.testing.assert_allclose(got[name]["filter_mean"].values, expected[name]["filter_mean"].values,
                                   rtol=1e-6, atol=1e-6)
        assert got[name].attrs["unit_name"] == expected[name].attrs["unit_name"]
    code, _, err = _main(["summarize", no_means, "--out", str(tmp_path / "fm.nc"), "--scheduler", address])
    assert code == 2 and "--filter-means" in err and "Traceback" not in err, err
    assert not (tmp_path / "fm.nc").exists()

    # the RDMs of a registered draw (the largest not above --rdm-units), the same figure as the full store's
    code, printed, err = _main(["plot", reduced, "--out", str(tmp_path / "reduced"), "--rdm-units", "300"])
    assert code == 0, err
    assert ("reduced store: RDMs from its registered draw of 50 units (the largest registered not above --rdm-units "
            "300), seed 0, unit_type 'random', resample 0") in err
    # with filter means a dense layer is kept whole (its filter means are its activations): the prediction heatmap
    # is drawn from it as from a full store
    assert "no prediction heatmap" not in err
    written = sorted(Path(p).relative_to(tmp_path / "reduced").as_posix() for p in printed.split())
    assert [p for p in written if not p.startswith("predictions")] == sorted(
        [*(f"filter_means/{name}.png" for name in LAYERS.split(",")), "rdms.png", "rdms.svg"])
    assert any(p.startswith("predictions") for p in written), written
    code, _, err = _main(["plot", full, "--out", str(tmp_path / "full"), "--rdm-units", "50"])
    assert code == 0 and "reduced store" not in err, err
    assert (tmp_path / "reduced" / "rdms.png").read_bytes() == (tmp_path / "full" / "rdms.png").read_bytes()
    with Image.open(tmp_path / "reduced" / "filter_means" / "Conv1_relu.png") as im:
        assert im.format == "PNG" and im.size[0] > 300

    # without filter means: the figures it can give, and a note naming --filter-means for the others
    code, printed, err = _main(["plot", no_means, "--out", str(tmp_path / "no_means"), "--layers",
                                "input_layer,Conv1_relu"])
    assert code == 0, err
    assert ("reduced store without filter means: no filter-mean heatmap of input_layer, Conv1_relu (only sampled "
            "units are stored); extract with --filter-means for them") in err
    assert "registered draw of 50 units (the largest registered not above --rdm-units 10000), seed 1" in err
    assert sorted(Path(p).name for p in printed.split()) == ["rdms.png", "rdms.svg"]
    assert not (tmp_path / "no_means" / "filter_means").exists()


# ----------------------------------------------------------------------- issue 15: large sets and progress bars
#: a synthetic store (no model: written from the analysis tests' tree) whose sets straddle a cap of 5 images per set
LARGE_SETS = {"cats": 23, "dogs": 14, "white_noise": 4}


@pytest.fixture(scope="module")
def large_store(tmp_path_factory):
    """``LARGE_SETS`` laid out as a store (root format attribute, variable-length strings), chunks of 4 images."""
    from analysis_fixtures import make_tree

    from cnndiff_xr import schema

    tree = make_tree(sets=LARGE_SETS, chunk=4)[0]
    tree.attrs[schema.FORMAT_ATTR] = schema.FORMAT
    tree = tree.map_over_datasets(lambda ds: ds.assign_coords(
        {c: ds[c].astype(object) for c in (schema.IMAGE_DIM, schema.SET_COORD, "source") if c in ds.coords}))
    path = str(tmp_path_factory.mktemp("large") / "large.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Zarr: consolidated metadata is not in the v3 specification
        tree.to_zarr(path, mode="w", consolidated=True)
    assert store.is_store(path)
    return path


@pytest.fixture
def titles(monkeypatch):
    """The figures ``cnndiff plot`` draws in this process, by file name: title and heatmap panels' image rows."""
    from cnndiff_xr import plot

    seen: dict[str, dict] = {}
    real_save = plot.save

    def looking_save(fig, path_stem, *args, **kwargs):
        title = fig._suptitle.get_text() if fig._suptitle else ""
        rows = {(ax.get_title() or ax.get_ylabel()): ax.images[0].get_array().shape[0]
                for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"}
        stem = Path(path_stem)  # under the staging folder: name it as under --out
        seen[f"filter_means/{stem.name}" if stem.parent.name == "filter_means" else stem.name] = {
            "title": title, "rows": rows}
        return real_save(fig, path_stem, *args, **kwargs)

    monkeypatch.setattr(plot, "save", looking_save)
    return seen


def test_plot_of_a_large_store_draws_a_named_sample(large_store, tmp_path, titles):
    code, printed, err = _main(["plot", large_store, "--out", str(tmp_path / "capped"), "--max-images-per-set", "5",
                                "--rdm-units", "50"])
    assert code == 0, err
    assert "rdms.png" in printed and "filter_means/block1_conv1.png" in printed
    expected_rows = {name: min(n, 5) for name, n in LARGE_SETS.items()}
    for name in ("filter_means/block1_conv1", "filter_means/predictions", "predictions", "rdms"):
        title = titles[name]["title"]
        assert "at most 5 images per set, seeded sample (seed 0): " in title, (name, title)
        assert all(part in title for part in ("cats 5 of 23", "dogs 5 of 14", "white_noise all 4")), title
    assert titles["filter_means/block1_conv1"]["rows"] == expected_rows
    assert titles["predictions"]["rows"] == expected_rows
    assert set(titles["rdms"]["rows"].values()) == {sum(expected_rows.values())}  # 14 x 14 panels
    # the default cap (500) is above every set: every image, and not a word about a sample
    titles.clear()
    code, _, err = _main(["plot", large_store, "--out", str(tmp_path / "all"), "--rdm-units", "50"])
    assert code == 0, err
    assert titles["filter_means/block1_conv1"]["rows"] == LARGE_SETS
    assert not [name for name, seen in titles.items() if "images per set" in seen["title"]]
    code, _, err = _main(["plot", large_store, "--out", str(tmp_path / "bad"), "--max-images-per-set", "0"])
    assert code == 2 and "--max-images-per-set" in err and "at least 1" in err, err


def test_plot_of_a_large_summarize_file_draws_a_named_sample(large_store, local_client, tmp_path, titles):
    out = tmp_path / "fm.nc"
    code, _, err = _main(["summarize", large_store, "--out", str(out), "--scheduler", local_client.scheduler.address])
    assert code == 0, err
    code, _, err = _main(["plot", str(out), "--out", str(tmp_path / "figs"), "--max-images-per-set", "5"])
    assert code == 0, err
    for name in ("filter_means/input_layer", "filter_means/block1_pool"):
        assert "at most 5 images per set, seeded sample (seed 0): " in titles[name]["title"]
        assert titles[name]["rows"] == {name: min(n, 5) for name, n in LARGE_SETS.items()}
    # the same images as the store's figures (the sample depends on the sets' images only)
    titles.clear()
    code, _, err = _main(["plot", str(out), "--out", str(tmp_path / "whole")])
    assert code == 0 and titles["filter_means/block1_pool"]["rows"] == LARGE_SETS, err
    assert "images per set" not in titles["filter_means/block1_pool"]["title"]


def _user_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return {k: v for k, v in env.items() if v}


def run_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """``cnndiff ARGS`` in a subprocess whose stderr is a terminal (a pseudo-terminal; stdout a file, as when a user
    redirects the tables): exit code, stdout, and everything written to the terminal."""
    import pty
    import tempfile

    master, slave = pty.openpty()
    with tempfile.TemporaryFile() as stdout:
        proc = subprocess.Popen([CNNDIFF, *args], stdin=subprocess.DEVNULL, stdout=stdout, stderr=slave,
                                env=_user_env())
        os.close(slave)
        received = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            received.append(data)
        code = proc.wait(timeout=600)
        os.close(master)
        stdout.seek(0)
        return code, stdout.read().decode(), b"".join(received).decode(errors="replace")


#: a progress bar, dask's or distributed's (they draw the same line)
BAR = re.compile(r"\[#+ *\] \| \d+% Completed")


def test_progress_bars_on_a_terminal(large_store, local_client, tmp_path):
    address = local_client.scheduler.address
    commands = {
        "differentiation": ["differentiation", large_store, "--n-units", "20", "--resamples", "2",
                            "--scheduler", address],  # on a Client: distributed's bar
        "summarize": ["summarize", large_store, "--out", str(tmp_path / "fm.nc"), "--scheduler", address],
        "plot": ["plot", large_store, "--out", str(tmp_path / "figs"), "--rdm-units", "50", "--layers",
                 "block1_pool"],  # dask's local bar (one layer: matplotlib takes most of the time)
    }
    for name, args in commands.items():
        code, out, err = run_on_a_terminal(*args)
        assert code == 0, err[-3000:]
        assert BAR.search(err) and "100% Completed" in err, (name, err[-2000:])
        assert "Completed" not in out, (name, out)  # stdout keeps only the command's output


@contextlib.contextmanager
def _stderr_on_a_terminal() -> Iterator[list[bytes]]:
    """This process's ``sys.stderr`` on a pseudo-terminal for the block; yields what reached the terminal (drained
    by a thread, so that a bar never fills the terminal's buffer and blocks the writer)."""
    import pty
    import threading

    master, slave = pty.openpty()
    received: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(slave, "w") as terminal, contextlib.redirect_stderr(terminal):
        assert sys.stderr.isatty()
        yield received
    reader.join(timeout=10)
    os.close(master)


def test_no_progress_bar_in_logs_or_with_quiet(large_store, local_client, tmp_path):
    address = local_client.scheduler.address
    # stderr to a pipe, as in a CI log: no bar
    proc = run("differentiation", large_store, "--n-units", "20", "--resamples", "2", "--scheduler", address)
    assert "Completed" not in proc.stderr and "Completed" not in proc.stdout, proc.stderr[-2000:]
    # --quiet with stderr on a terminal, and stderr not a terminal, for every command (in this process)
    def commands(run_name: str) -> dict[str, list[str]]:
        return {
            "differentiation": ["differentiation", large_store, "--n-units", "20", "--resamples", "2",
                                "--scheduler", address],
            "summarize": ["summarize", large_store, "--out", str(tmp_path / f"fm_{run_name}.nc"),
                          "--scheduler", address],
            "plot": ["plot", large_store, "--out", str(tmp_path / f"figs_{run_name}"), "--rdm-units", "50",
                     "--layers", "block1_pool"],
        }

    for name, args in commands("quiet").items():
        with _stderr_on_a_terminal() as received:
            code, _, err = _main([*args, "--quiet"])
        assert code == 0, err[-2000:]
        assert b"Completed" not in b"".join(received), (name, b"".join(received)[-2000:])
    for name, args in commands("log").items():
        code, out, err = _main(args)
        assert code == 0 and "Completed" not in err + out, (name, err[-2000:])
