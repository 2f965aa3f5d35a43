"""The README's Python, run as a user runs it: saved as a script and run by a fresh interpreter (a subprocess).

Every ```python block of README.md is run, in README order, as one plain script in a temporary folder, with only these
substitutions (each must apply, so that a README change that moves its target fails here rather than going
untested):

* ``weights="imagenet"`` -> ``weights=None``: there are no ImageNet weights offline;
* ``white_noise(43, ...)`` -> ``white_noise(8, ...)``: VGG16 at 224 x 224 runs ~5-10 images/s on two cores, and 43
  noise images would also write ~2.5 GB;
* ``"tcp://scheduler:8786"`` -> the address of a real ``dask scheduler`` with two ``dask worker`` processes started here
  (``real_cluster.ProcessCluster``, working in the script's folder, so that relative store paths mean the same there);
* the reduced-store block gets the first two as well, and its differentiation must equal the ten lines' (the same
  images, layers and draws: a reduced store gives a full store's numbers bit for bit);
* the object-storage block gets ``weights=None`` too (it takes the default, ImageNet), and runs against a real S3
  server (moto's, on loopback) whose bucket ``lab-bucket`` holds ``cats/*.jpg``; the script and the workers get its
  address and credentials through the environment, as the README says.

The folder holds a few JPEG photos at ``data/tabby_cats/*.jpg``, the path the README names. After each block the
script prints what the block computed, for the test to check. The same ten lines are also run without their
``if __name__ == "__main__":`` guard, which is how a newcomer first types them (issue 16: the embedded cluster's worker
processes re-ran the script and it failed with "Nanny failed to start" and a lock held by itself).

Smaller scripts check the same for any extraction (the tiny model): a script without the guard extracts exactly once
and gives what a guarded one gives; a child process that re-runs a script (``multiprocessing``'s "spawn") is refused
at ``extract`` before it touches the store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from moto_s3 import moto_server
from real_cluster import ProcessCluster
from tiny import TINY_SIZE

import cnndiff_xr as cx
from cnndiff_xr.extraction import lock, store

pytestmark = pytest.mark.timeout(900)

README = Path(__file__).resolve().parents[1] / "README.md"
TESTS_DIR = Path(__file__).resolve().parent
GUARD = 'if __name__ == "__main__":'
N_NOISE, N_CATS, N_S3_CATS = 8, 4, 2
#: What TensorFlow prints when its logging is not kept quiet (C++ log lines, absl's notice, oneDNN's notice).
TF_NOISE = re.compile(r"^[IWEF]\d{4} |oneDNN|absl", re.M)


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def _substitute(code: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        code, n = re.subn(pattern, replacement, code)
        assert n, f"README substitution {pattern!r} no longer applies; update tests/test_readme.py"
    return code


def _unguarded(block: str) -> str:
    """The block as typed without its ``if __name__ == "__main__":`` line, the guarded lines dedented."""
    head, sep, body = block.partition(GUARD)
    assert sep, "the README's ten lines show the guard"
    body = body.split("\n", 1)[1]  # the rest of the guard's line is its comment
    return head + textwrap.dedent(body)


def _check(facts: str, *, guarded: bool) -> str:
    """Script lines that print ``facts`` (a Python expression) as one JSON line for the test to read."""
    line = f"print('CHECK', json.dumps({facts}, default=str), flush=True)"
    return f"\n{GUARD}\n    {line}\n" if guarded else f"\n{line}\n"


def _kind(block: str) -> str:
    if "cx.UnitDraws(" in block:
        return "reduced"
    if "cx.extract(" in block and "white_noise" in block:
        return "ten_lines"
    if "xr.open_datatree" in block:
        return "plain_xarray"
    if "s3://" in block:
        return "object_storage"
    if "cx.compare_sets(" in block:
        return "beyond"
    return "other"


# What each block computed (read by the script right after the block; "other" blocks only have to run)
FACTS = {
    "ten_lines": '{"block": "ten_lines", "d": dict(d.sizes), "sets": sorted(set(map(str, tree["set"].values))), '
                 '"conv": dict(conv.sizes), "n_images": int(tree.sizes["image"])}',
    "plain_xarray": '{"block": "plain_xarray", "cats": int(cats.sizes["image"]), '
                    '"means": [str(image_means.dtype), int(image_means.sizes["image"])]}',
    # the reduced store's differentiation is the full store's of the ten lines (same images, layers, draws), bit for bit
    "reduced": '{"block": "reduced", "same_as_full": bool((d_small == d).all()), "d": dict(d_small.sizes), '
               '"heat_layers": len(heat.children), "unit_dims": list(small["block1_conv1"]["activation"].dims)}',
    "beyond": '{"block": "beyond", "boot": dict(boot.sizes), "interval": sorted(interval.data_vars), '
              '"p": [float(test["p_value"].min()), float(test["p_value"].max())], "cka": dict(cka.sizes), '
              '"cka_diagonal": bool(abs(cka.values.diagonal() - 1).max() < 1e-9)}',
    "object_storage": '{"block": "object_storage", "layers": len(tree.attrs["layers"]), "d": dict(d.sizes)}',
}


def _run(script: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run([sys.executable, script.name], cwd=script.parent, env=env, capture_output=True, text=True,
                          timeout=840)
    checks = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("CHECK ")]
    return proc, checks


def _assert_clean(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    for bad in ("Traceback", "StoreLockedError", "Nanny failed", "Error"):
        assert bad not in proc.stderr, proc.stderr[-4000:]
    assert not TF_NOISE.search(proc.stderr), proc.stderr[-4000:]  # TensorFlow stays quiet (issue 16, item 6)


def _write_jpegs(folder: Path, n: int, seed: int) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    cat = data.chelsea()  # a photograph of a tabby cat, packaged with scikit-image
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):  # different crops of it
        y, x = rng.integers(0, 60, 2)
        path = folder / f"tabby_{i:02d}.jpg"
        Image.fromarray(cat[y:y + 240, x:x + 360]).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory):
    """The script's folder with its photos, a real S3 server with the bucket the README names, and a real Dask
    scheduler with two worker processes (in the environment of that server, working in the script's folder)."""
    import fsspec
    import s3fs

    root = tmp_path_factory.mktemp("readme")
    _write_jpegs(root / "data" / "tabby_cats", N_CATS, seed=0)
    cluster = None
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        s3 = {"AWS_ACCESS_KEY_ID": "readme-key", "AWS_SECRET_ACCESS_KEY": "readme-secret", "AWS_DEFAULT_REGION":
              "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": os.devnull}
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        for name, value in s3.items():
            mp.setenv(name, value)
        try:
            s3fs.S3FileSystem.clear_instance_cache()
            fs = fsspec.filesystem("s3")
            fs.mkdir("lab-bucket")
            for path in _write_jpegs(root / "s3_upload", N_S3_CATS, seed=1):
                fs.put_file(str(path), f"lab-bucket/cats/{path.name}")
            # VGG16 with its dense layers needs more than the 2 GiB the fault tests give a worker; the workers
            # inherit the S3 environment
            cluster = ProcessCluster(root, n_workers=2, memory_limit="6GiB").start()
            env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
            yield root, cluster.address, env
        finally:
            if cluster is not None:
                cluster.stop()
            s3fs.S3FileSystem.clear_instance_cache()


def test_readme_python_blocks_run_as_one_script(readme_world):
    root, address, env = readme_world
    blocks = python_blocks()
    kinds = [_kind(b) for b in blocks]
    assert {"ten_lines", "object_storage"} <= set(kinds), kinds
    rules = {
        "ten_lines": [(r'weights="imagenet"', "weights=None"),
                      (r"white_noise\(43, ", f"white_noise({N_NOISE}, "),
                      (r'"tcp://scheduler:8786"', repr(address))],
        "reduced": [(r'weights="imagenet"', "weights=None"), (r"white_noise\(43, ", f"white_noise({N_NOISE}, ")],
        "object_storage": [(r'client="tcp://scheduler:8786"\)', f"client={address!r}, weights=None)")],
    }
    parts = ["import json\n"]
    for block, kind in zip(blocks, kinds, strict=True):
        parts.append(_substitute(block, rules.get(kind, [])))
        if kind in FACTS:
            parts.append(_check(FACTS[kind], guarded=GUARD in block))
    script = root / "readme.py"
    script.write_text("\n".join(parts))

    proc, checks = _run(script, env)
    _assert_clean(proc)
    by_block = {c["block"]: c for c in checks}
    assert [c["block"] for c in checks] == [k for k in kinds if k in FACTS]  # every checked block ran, in order
    ten = by_block["ten_lines"]
    assert ten["sets"] == ["cats", "white_noise"] and ten["n_images"] == N_NOISE + N_CATS
    assert ten["d"] == {"set": 2, "layer": 21, "n_units": 2, "resample": 10}  # the seed's 21 VGG16 layers
    assert ten["conv"] == {"image": N_NOISE + N_CATS, "y": 224, "x": 224}
    if "plain_xarray" in by_block:
        assert by_block["plain_xarray"] == {"block": "plain_xarray", "cats": N_CATS,
                                            "means": ["float32", N_NOISE + N_CATS]}
    reduced = by_block["reduced"]  # the reduced store: the same numbers as the full store of the ten lines
    assert reduced == {"block": "reduced", "same_as_full": True, "d": ten["d"], "heat_layers": 21,
                       "unit_dims": ["image", "unit"]}
    beyond = by_block["beyond"]  # images resampled, sets compared, layers related, on the ten lines' store
    assert beyond["boot"] == {"set": 2, "layer": 21, "n_units": 1, "resample": 10, "bootstrap": 1000}
    assert beyond["interval"] == ["lower", "mean", "sd", "upper"]
    assert 1 / 1001 <= beyond["p"][0] <= beyond["p"][1] <= 1
    assert beyond["cka"] == {"layer": 21, "layer_other": 21} and beyond["cka_diagonal"]
    s3 = by_block["object_storage"]
    assert s3["layers"] == 22 and s3["d"]["set"] == 1  # VGG16's default layers: all but flatten
    assert cx.open_activations(str(root / "acts.zarr")).cnndiff.complete
    assert lock.read_lock(str(root / "acts.zarr")) is None


def test_readme_ten_lines_without_the_guard(readme_world):
    """Issue 16, item 1: the ten lines as a newcomer saves them, unguarded. The embedded cluster's worker processes
    re-ran the script, extracted again in each worker, and the run died ("Nanny failed to start", a StoreLockedError
    naming the script itself). Now they do not re-run it. (Run after the test above, this resumes its store: the
    embedded cluster still starts, which is what failed.)"""
    root, address, env = readme_world
    (block,) = [b for b in python_blocks() if _kind(b) == "ten_lines"]
    code = _substitute(_unguarded(block), [(r'weights="imagenet"', "weights=None"),
                                           (r"white_noise\(43, ", f"white_noise({N_NOISE}, "),
                                           (r'"tcp://scheduler:8786"', repr(address))])
    assert GUARD not in code
    script = root / "ten_lines_unguarded.py"
    script.write_text("import json\n" + code + _check(FACTS["ten_lines"], guarded=False))
    proc, checks = _run(script, env)
    _assert_clean(proc)
    assert len(checks) == 1 and checks[0]["d"] == {"set": 2, "layer": 21, "n_units": 2, "resample": 10}
    assert lock.read_lock(str(root / "acts.zarr")) is None


# ---------------------------------------------------------------------------------------- any script, tiny model
# (its preprocessing function is defined in the script itself: the workers, which do not run the script, get it
# through Dask's serialisation)
TINY_SCRIPT = """\
import json
import numpy as np
import cnndiff_xr as cx
from tiny import TINY_SIZE, build_tiny_model

OFFSET = 1.0

def scale(batch):
    return batch / 127.5 - OFFSET

{guard}tree = cx.extract({{"noise": cx.images.white_noise(6, seed=1, size=(TINY_SIZE, TINY_SIZE))}},
{indent}                  store={store!r}, model=build_tiny_model(), preprocess=scale, n_workers=2,
{indent}                  batch_size=2, progress=False)
{indent}print("CHECK", json.dumps({{"n": int(tree.sizes["image"]), "pid": __import__("os").getpid()}}))
"""


def _script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return env


def test_a_script_without_the_guard_extracts_once_like_a_guarded_one(tmp_path):
    results = {}
    for name, guard in (("guarded", GUARD + "\n    "), ("unguarded", "")):
        folder = tmp_path / name
        folder.mkdir()
        script = folder / "extract_tiny.py"
        script.write_text(TINY_SCRIPT.format(guard=guard, indent="    " if guard else "", store="acts.zarr"))
        proc, checks = _run(script, _script_env())
        assert proc.returncode == 0, proc.stderr[-4000:]
        for bad in ("Traceback", "StoreLockedError", "Nanny failed"):
            assert bad not in proc.stderr, proc.stderr[-4000:]
        # the extraction ran once, in the script's own process (a worker that re-ran it would print a second line)
        assert checks == [{"n": 6, "pid": checks[0]["pid"]}], proc.stdout
        path = str(folder / "acts.zarr")
        assert store.completed(path).all() and lock.read_lock(path) is None
        results[name] = cx.open_activations(path)
    for layer in results["guarded"].attrs["layers"]:
        np.testing.assert_array_equal(results["unguarded"][layer]["activation"].values,
                                      results["guarded"][layer]["activation"].values, err_msg=layer)
    # the script's own function ran in the workers: the stored input is the noise scaled to -1..1
    noise = cx.images.white_noise(6, seed=1, size=(TINY_SIZE, TINY_SIZE))
    rgb = cx.images.load_batch([ref for _, _, ref in noise.entries()], (TINY_SIZE, TINY_SIZE))
    np.testing.assert_allclose(results["guarded"]["input_layer"]["activation"].values, rgb / 127.5 - 1.0, atol=1e-6)


def test_a_child_that_reruns_a_script_is_refused_at_extract(tmp_path):
    """The other way to meet an unguarded script: a process started with multiprocessing's "spawn" re-runs the main
    script first, so its top-level extract() would run there too, as a second writer of the same store. It is
    refused at once with the remedy, before the store or its lock is touched."""
    script = tmp_path / "spawns.py"
    script.write_text(textwrap.dedent(f"""\
        import multiprocessing, os
        import cnndiff_xr as cx
        from tiny import TINY_SIZE, build_tiny_model, tiny_preprocess

        {GUARD}
            child = multiprocessing.get_context("spawn").Process(target=print, args=("child ran",))
            child.start()
            child.join()
            print("child exit code", child.exitcode, "store after child", os.path.exists("acts.zarr"),
                  os.path.exists("acts.zarr.lock"), flush=True)
        cx.extract({{"noise": cx.images.white_noise(2, seed=0, size=(TINY_SIZE, TINY_SIZE))}}, store="acts.zarr",
                   model=build_tiny_model(), preprocess=tiny_preprocess(), n_workers=1, progress=False)
        print("parent extracted", flush=True)
    """))
    proc, _ = _run(script, _script_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "child exit code 1 store after child False False" in proc.stdout, proc.stdout
    assert "parent extracted" in proc.stdout and "child ran" not in proc.stdout
    assert "extract() was called while a new process re-ran" in proc.stderr, proc.stderr[-3000:]
    assert GUARD in proc.stderr and "StoreLockedError" not in proc.stderr
    assert store.completed(str(tmp_path / "acts.zarr")).all()
