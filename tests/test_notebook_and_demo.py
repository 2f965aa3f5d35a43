"""The notebook executes top to bottom at small scale; `cnndiff demo` completes offline with random weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cnndiff_xr.demo import MANIFEST, STEPS, STORE, claim_folder
from cnndiff_xr.outputs import OutputFolderError

ROOT = Path(__file__).resolve().parents[1]

#: what must not be in the committed notebook's outputs: paths of the machine that ran it ...
LOCAL_PATHS = re.compile(r"/tmp/|/var/folders/|/private/var/|/work/|/home/|/root/|/Users/|[A-Za-z]:\\{1,2}[A-Za-z]|"
                         r"\.venv|/venv/|site-packages|dask-scratch-space")
#: ... and log noise: TensorFlow/absl C++ and Python log lines, tqdm's widget warning
LOG_NOISE = re.compile(r"(^|\n)[IWEF]\d{4} \d\d:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |"
                       r"WARNING:tensorflow|WARNING:absl|tensorflow/core|external/local_xla|oneDNN|cuda_|"
                       r"This TensorFlow binary|TqdmWarning|IProgress")


def _output_texts(nb) -> list[tuple[int, str]]:
    """(cell index, text) of every text an output holds: streams, text/plain and text/html, tracebacks."""
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            texts = [output.get("text", ""), *output.get("traceback", [])]
            texts += [v for k, v in output.get("data", {}).items() if k.startswith("text/")]
            found += [(index, text if isinstance(text, str) else "".join(text)) for text in texts]
    return found


def _matches(pattern: re.Pattern, texts: list[tuple[int, str]]) -> list[str]:
    return [f"cell {i}: ...{text[max(0, m.start() - 60):m.end() + 60]!r}..."
            for i, text in texts for m in pattern.finditer(text)]


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
    assert not _matches(LOG_NOISE, _output_texts(nb))  # e.g. tqdm.auto's "IProgress not found" warning


def test_demo_runs_offline_with_random_weights(tmp_path):
    out = tmp_path / "demo"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_HOME": str(tmp_path / "keras")}  # an empty Keras cache: no ImageNet weights
    # --out relative to the working directory, as the README's `cnndiff demo` (default: cnndiff-demo) is run
    proc = subprocess.run([str(Path(sys.executable).with_name("cnndiff")), "demo", "--out", "demo", "--n-images",
                           "3", "--resamples", "2", "--workers", "2"], capture_output=True, text=True, env=env,
                          timeout=900, cwd=tmp_path)
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
    _check_report_truths(report)

    # every file the demo wrote is in its manifest, with the size it has
    manifest = json.loads((out / ".cnndiff-demo.json").read_text())
    on_disk = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert {rel: size for rel, (size, _) in manifest["files"].items()} == \
        {rel: size for rel, size in on_disk.items() if rel != ".cnndiff-demo.json"}
    assert not manifest["pending"] and manifest["running"] is None

    # a user's figure where the demo writes: the command refuses before anything is deleted, exit 2
    (out / "my_notes.txt").write_text("mine")  # outside the demo's places: allowed
    (out / "figures" / "my_figure.png").write_bytes(b"my own figure")
    report_before = (out / "report.txt").read_bytes()
    proc = subprocess.run([str(Path(sys.executable).with_name("cnndiff")), "demo", "--out", str(out), "--n-images",
                           "3", "--resamples", "2", "--workers", "2", "--quiet"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "my_figure.png" in proc.stderr and "did not write" in proc.stderr
    assert (out / "figures" / "my_figure.png").read_bytes() == b"my own figure"
    assert (out / "report.txt").read_bytes() == report_before
    assert cx.open_activations(str(out / "activations.zarr")).cnndiff.complete

    # once that figure is moved out, a rerun claims the folder: what this real run wrote (store, figures, results,
    # images, report) is removed, the user's own file is kept. This is the rerun's first step (run_demo calls
    # claim_folder before any work); the rest of a rerun is a run in a fresh folder, which the run above is, so it
    # is not repeated here (a second VGG16 demo costs the suite ~1.5 minutes). A rerun after an interrupted run is
    # tested below on a recorded manifest.
    (out / "figures" / "my_figure.png").unlink()
    claim_folder(out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [MANIFEST, "my_notes.txt"]
    assert (out / "my_notes.txt").read_text() == "mine"


def _agrees_to_display_precision(rate: float, n: int, seconds: float) -> bool:
    """``rate`` (printed to 0.01) is ``n / seconds`` for some time that prints as ``seconds`` (to 0.1 s).

    A 1.7 s batch time may be 1.749 s (5.15 images/s for 9 images): with times of one or two seconds the rounding of
    the printed seconds alone moves the implied rate by ~3 %, so a fixed relative tolerance is wrong there.
    """
    slowest, fastest = n / (seconds + 0.05), n / max(seconds - 0.05, 1e-9)
    return slowest - 0.005 <= rate <= fastest + 0.005


def _check_report_truths(report: str) -> None:
    """Wall time and throughput agree; each says what it covers; random weights are explained per figure."""
    overall = re.search(r"extraction: ([\d.]+) s wall time for (\d+) images \(([\d.]+) images/s overall\)", report)
    assert overall, report
    wall, n, rate = float(overall[1]), int(overall[2]), float(overall[3])
    assert _agrees_to_display_precision(rate, n, wall), report
    batches = re.search(r"([\d.]+) s running the batches: ([\d.]+) images/s", report)
    assert batches, report
    seconds, batch_rate = float(batches[1]), float(batches[2])
    assert seconds <= wall and _agrees_to_display_precision(batch_rate, n, seconds), report
    assert re.search(r"disk: [\d,]+ MB written into", report)
    assert "not ImageNet classes" in report and "from the architecture" in report and "not" in report


def test_committed_notebook_carries_outputs_of_a_real_run():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "seed_vgg16.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [o for cell in code for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 10
    assert all(cell.get("execution_count") for cell in code if cell.get("outputs"))


def test_committed_notebook_shows_no_local_paths_nor_log_noise():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "seed_vgg16.ipynb", as_version=4)
    texts = _output_texts(nb)
    assert texts  # it has outputs to check
    assert not _matches(LOCAL_PATHS, texts)
    assert not _matches(LOG_NOISE, texts)
    assert not _matches(LOCAL_PATHS, [(i, cell.source) for i, cell in enumerate(nb.cells)])


@pytest.mark.parametrize("text, pattern", [
    ("'/tmp/nbrun/run/images/cats'", LOCAL_PATHS),
    ("/work/venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.", LOCAL_PATHS),
    ("Local directory: /tmp/dask-scratch-space/worker-ow6azrzr", LOCAL_PATHS),
    ("/home/me/project/.venv/bin/python", LOCAL_PATHS),
    ("'C:\\\\Users\\\\me\\\\AppData\\\\Local\\\\Temp'", LOCAL_PATHS),
    ("TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.", LOG_NOISE),
    ("E0000 00:00:1732950000.123456   1234 onednn_ops.cc:12] oneDNN supports DT_HALF only on platforms with AVX-512",
     LOG_NOISE),
    ("2025-11-30 05:02:11.123456: I tensorflow/core/util/port.cc:153] oneDNN custom operations are on.", LOG_NOISE),
    ("WARNING:tensorflow:5 out of the last 5 calls to <function> triggered tf.function retracing", LOG_NOISE),
])
def test_the_notebook_checks_catch_what_the_issue_found(text, pattern):
    assert _matches(pattern, [(0, text)])
    assert not _matches(pattern, [(0, "store: notebook-run/vgg16.zarr (36 images), random_photos/astronaut.png")])


# ---------------------------------------------------------------------------- the demo's folder: never the user's files
def _user_files(folder: Path) -> dict[str, bytes]:
    """The files of the issue's report: a user's figure, results and report in the folder given to the demo."""
    files = {"figures/my_figure.png": b"my figure", "results/my_results.csv": b"a,b\n1,2\n", "report.txt": b"mine"}
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return files


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    _user_files(folder)
    before = _contents(folder)
    with pytest.raises(OutputFolderError, match="not a folder that cnndiff demo wrote") as err:
        claim_folder(folder)
    assert "new or empty folder" in str(err.value) and MANIFEST in str(err.value)
    assert _contents(folder) == before
    # the command line: exit 2, one message naming the folder and the remedy, and nothing touched
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([str(Path(sys.executable).with_name("cnndiff")), "demo", "--out", str(folder)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--out {str(folder)!r}" in proc.stderr and "new or empty folder" in proc.stderr
    assert _contents(folder) == before
    # a new folder, and an empty one, are fine
    claim_folder(tmp_path / "new" / "demo")
    (tmp_path / "empty").mkdir()
    claim_folder(tmp_path / "empty")
    assert (tmp_path / "empty" / MANIFEST).is_file()


def _fake_demo_run(folder: Path) -> None:
    """What a demo run records, step by step, with small stand-ins for its files."""
    manifest = claim_folder(folder)
    manifest.begin("images", STEPS["images"])
    (folder / "images" / "cats").mkdir(parents=True)
    (folder / "images" / "cats" / "cats_000.png").write_bytes(b"png")
    manifest.record_tree("images")
    manifest.begin(STORE, STEPS[STORE])
    (folder / STORE / "layer" / "activation" / "c" / "0").mkdir(parents=True)
    (folder / STORE / "zarr.json").write_text("{}")
    (folder / STORE / "layer" / "activation" / "c" / "0" / "0").write_bytes(b"chunk")
    manifest.record_tree(STORE)
    manifest.begin("figures", STEPS["figures"])
    (folder / "figures").mkdir()
    (folder / "figures" / "rdms.png").write_bytes(b"figure")
    manifest.record([folder / "figures" / "rdms.png"], entry="figures")
    manifest.begin("report.txt", STEPS["report.txt"])
    (folder / "report.txt").write_text("report")
    manifest.record(["report.txt"], entry="report.txt")
    manifest.finish()


def test_a_demo_rerun_removes_only_what_the_demo_wrote(tmp_path):
    folder = tmp_path / "demo"
    _fake_demo_run(folder)
    (folder / "my_notes.txt").write_text("mine")  # outside the demo's places: allowed and kept
    claim_folder(folder)
    assert _contents(folder).keys() == {"my_notes.txt", MANIFEST}
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "my_notes.txt"]  # emptied folders removed too

    # the issue's files inside a demo folder: refused, nothing deleted, every offending file named
    _fake_demo_run(tmp_path / "demo2")
    folder = tmp_path / "demo2"
    (folder / "report.txt").unlink()
    _user_files(folder)
    before = _contents(folder)
    with pytest.raises(OutputFolderError) as err:
        claim_folder(folder)
    for rel in ("figures/my_figure.png", "results/my_results.csv", "report.txt"):
        assert str(folder / rel) in str(err.value)
    assert _contents(folder) == before

    # a file the demo wrote and the user changed since counts as the user's
    _fake_demo_run(tmp_path / "demo3")
    folder = tmp_path / "demo3"
    (folder / "report.txt").write_text("my edited report, a different size")
    with pytest.raises(OutputFolderError, match="changed since"):
        claim_folder(folder)
    assert (folder / "report.txt").read_text() == "my edited report, a different size"


def test_a_demo_rerun_cleans_up_after_an_interrupted_run(tmp_path):
    folder = tmp_path / "demo"
    manifest = claim_folder(folder)
    manifest.begin(STORE, STEPS[STORE])  # killed while extracting: the store's files were never recorded
    (folder / STORE / "block1_conv1" / "activation" / "c" / "0" / "0").mkdir(parents=True)
    (folder / STORE / "zarr.json").write_text("{}")
    (folder / STORE / "block1_conv1" / "activation" / "c" / "0" / "0" / "0").write_bytes(b"chunk")
    (folder / f"{STORE}.lock").write_text("{}")
    assert json.loads((folder / MANIFEST).read_text())["running"]["pid"] == os.getpid()
    claim_folder(folder)  # the same process: not "another demo is running"
    assert _contents(folder).keys() == {MANIFEST}

    # ... but a file that is not one of the step's own names stays, and the rerun is refused
    manifest = claim_folder(folder)
    manifest.begin(STORE, STEPS[STORE])
    (folder / STORE).mkdir()
    (folder / STORE / "my_data.csv").write_text("mine")
    with pytest.raises(OutputFolderError, match="my_data.csv"):
        claim_folder(folder)
    assert (folder / STORE / "my_data.csv").read_text() == "mine"


def test_a_demo_running_in_the_folder_is_not_disturbed(tmp_path):
    folder = tmp_path / "demo"
    claim_folder(folder)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = json.loads((folder / MANIFEST).read_text())
        record["running"]["pid"] = sleeper.pid
        (folder / MANIFEST).write_text(json.dumps(record))
        with pytest.raises(OutputFolderError, match=f"pid {sleeper.pid}"):
            claim_folder(folder)
    finally:
        sleeper.kill()
        sleeper.wait()
    claim_folder(folder)  # its writer is gone: the folder is free again
