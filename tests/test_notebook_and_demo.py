"""The notebook executes top to bottom at small scale; `cnndiff demo` completes offline with random weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_executes_at_small_scale(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CNNDIFF_NB_IMAGES", "3")
    monkeypatch.setenv("CNNDIFF_NB_WEIGHTS", "random")
    monkeypatch.setenv("CNNDIFF_NB_RESAMPLES", "2")
    monkeypatch.setenv("CNNDIFF_NB_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    nb = nbformat.read(ROOT / "notebooks" / "seed_vgg16.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 10  # predictions, 7 filter-mean heatmaps, differentiation, normalised, R²
    assert (tmp_path / "run" / "vgg16.zarr").is_dir()


def test_demo_runs_offline_with_random_weights(tmp_path):
    out = tmp_path / "demo"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_HOME": str(tmp_path / "keras")}  # an empty Keras cache: no ImageNet weights
    proc = subprocess.run([str(Path(sys.executable).with_name("cnndiff")), "demo", "--out", str(out), "--n-images",
                           "3", "--resamples", "2", "--workers", "2"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM" in proc.stderr  # said loudly on the console
    report = (out / "report.txt").read_text()
    assert "RANDOM" in report and "block5_conv3" in report and "tabby_cats" in report
    import cnndiff_xr as cx

    tree = cx.open_activations(str(out / "activations.zarr"))
    assert tree.attrs["weights"] == "random(seed=0)" and "RANDOM" in tree.attrs["warning"]
    assert len(tree.attrs["layers"]) == 21 and tree["image"].size == 9
    expected = ["differentiation", "differentiation_by_white_noise", "stimulus_vs_layer_r2", "predictions", "rdms"]
    for name in expected:
        assert (out / "figures" / f"{name}.svg").is_file()
        with Image.open(out / "figures" / f"{name}.png") as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 200
    heatmaps = sorted((out / "figures" / "filter_means").glob("*.png"))
    assert [p.stem for p in heatmaps] == sorted(tree.attrs["layers"])
    assert (out / "results" / "differentiation.csv").read_text().count("\n") == 3 * 21 * 2 * 2 + 1


def test_committed_notebook_carries_outputs_of_a_real_run():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "seed_vgg16.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [o for cell in code for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 10
    assert all(cell.get("execution_count") for cell in code if cell.get("outputs"))
