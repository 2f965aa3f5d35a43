"""`cnndiff plot` on stores of 2,000 and 20,000 images: the figures subsample, so the time must not grow with N.

Stores: MobileNetV2 (random weights; a model fast enough to put 20,000 images through on this machine), 224 x 224,
eight of its layers (``LAYERS``; its default preset has 155, whose store layout alone takes minutes to create),
float16, a reduced store (registered draws n_units 200 and 10,000 x 1 resample, filter means) of
two white-noise sets of N / 2 images each (``--sizes``). Each store is timed with ``cnndiff plot STORE --out DIR``
run as a user runs it (a fresh process: imports, the embedded cluster, every figure written as PNG and SVG), default
settings (at most 500 images per set drawn, RDMs of 10,000 units). With ``--work DIR`` the stores are kept there.

    python benchmarks/bench_plot.py [--sizes 2000,20000] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info

#: MobileNetV2 layers from the input to the predictions
LAYERS = ["input_layer", "Conv1_relu", "block_3_expand_relu", "block_6_expand_relu", "block_10_expand_relu",
          "block_13_expand_relu", "out_relu", "predictions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    print(machine_info(), flush=True)
    import cnndiff_xr as cx

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cnndiff-bench-plot-"))
    work.mkdir(parents=True, exist_ok=True)
    cnndiff = str(Path(sys.executable).with_name("cnndiff"))
    rows = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            path = work / f"noise-{n}.zarr"
            sets = {"noise_a": cx.images.white_noise(n // 2, seed=1), "noise_b": cx.images.white_noise(n // 2, seed=2)}
            t0 = time.perf_counter()
            cx.extract(sets, store=str(path), model="mobilenet_v2", weights=None, dtype="float16", layers=LAYERS,
                       units=cx.UnitDraws(n_units=[200, 10000], resamples=1, seed=0), filter_means=True,
                       progress=False)
            extraction = time.perf_counter() - t0
            layers = len(cx.open_activations(str(path)).children)
            out = work / f"figures-{n}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.run([cnndiff, "plot", str(path), "--out", str(out), "--quiet"], capture_output=True,
                                  text=True, check=False)
            seconds = time.perf_counter() - t0
            if proc.returncode:
                sys.exit(proc.stderr)
            figures = len(list(out.rglob("*.png")))
            rows.append((n, layers, extraction, seconds, figures))
            print(f"{n} images: extraction {extraction:.0f} s; cnndiff plot {seconds:.1f} s, {figures} PNG figures",
                  flush=True)
        print("\n| images | layers | `cnndiff plot` (end to end) | PNG figures |")
        print("|---|---|---|---|")
        for n, layers, _, seconds, figures in rows:
            print(f"| {n:,} | {layers} | {seconds:.1f} s | {figures} |")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
