"""The seed's approach vs cnndiff_xr, end to end.

Seed style: every layer's activations of every image held in RAM as numpy arrays (Keras forward pass, the seed's 21
layers), then per layer the same 10,000 (or 200) units drawn with numpy for all images, z-scored over the layer, and
``scipy.spatial.distance.pdist`` / sqrt(m), median. cnndiff_xr: extraction to a float16 Zarr store on the embedded
LocalCluster, then ``cx.differentiation`` for the same n_units. Both at several image counts, each in a fresh process
so that its peak RSS is its own; the largest image count each can run on this machine is extrapolated from the
measured memory per image (seed) and disk per image / flat memory (cnndiff_xr).

    python benchmarks/bench_seed_baseline.py [--sizes 12,24,48]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info


def seed_style(n: int, n_units: list[int]) -> dict:
    import numpy as np
    from scipy.spatial.distance import pdist

    import cnndiff_xr as cx
    from cnndiff_xr.extraction import images
    from cnndiff_xr.extraction.backends import model_spec

    t0 = time.perf_counter()
    extractor = model_spec("vgg16", weights=None).backend("seed")
    refs = [r for _, _, r in cx.images.white_noise(n, seed=0).entries()]
    activations = [[] for _ in extractor.layers]
    for start in range(0, n, 8):  # the seed kept every layer of every image in one Python object
        outs = extractor.run(images.load_batch(refs[start:start + 8], extractor.input_size)).activations
        for k, name in enumerate(extractor.layers):
            activations[k].append(outs[name])
    activations = [np.concatenate(a).reshape(n, -1) for a in activations]
    t_forward = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    for m in n_units:
        for x in activations:
            cols = rng.choice(x.shape[1], size=min(m, x.shape[1]), replace=False)
            sub = x[:, cols].astype("float64")
            sub = (sub - sub.mean()) / sub.std()
            np.median(pdist(sub) / np.sqrt(sub.shape[1]))
    return {"seconds": time.perf_counter() - t0, "forward_seconds": t_forward}


def cnndiff_style(n: int, n_units: list[int], store: str) -> dict:
    import cnndiff_xr as cx
    from cnndiff_xr.extraction.cluster import get_client

    t0 = time.perf_counter()
    with get_client(None) as client:
        tree = cx.extract({"noise": cx.images.white_noise(n, seed=0)}, store=store, model="vgg16", weights=None,
                          layers="seed", dtype="float16", client=client, progress=False)
        client.compute(cx.differentiation(tree, n_units=n_units, resamples=1), sync=True)
        import psutil

        worker_peak = max(client.run(lambda: psutil.Process().memory_info().rss).values())
    disk = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - t0, "disk_bytes": disk, "worker_rss_at_end": worker_peak}


def child(kind: str, n: int, store: str) -> None:
    out = seed_style(n, [200, 10000]) if kind == "seed" else cnndiff_style(n, [200, 10000], store)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="12,24,48")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    import tempfile

    import psutil

    print(machine_info())
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cnndiff-bench-seed-") as work:
        for n in sizes:
            for kind in ("seed", "cnndiff"):
                store = os.path.join(work, f"{kind}-{n}.zarr")
                proc = subprocess.run([sys.executable, __file__, "--child", kind, str(n), store],
                                      capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{kind} n={n} failed:\n{proc.stderr[-2000:]}")
                rows[(kind, n)] = json.loads(line[7:])
    print(f"{'images':>6} {'seed s':>8} {'seed peak RSS':>14} {'cnndiff s':>10} {'client RSS':>11} "
          f"{'worker RSS':>11} {'store on disk':>14}")
    for n in sizes:
        s, c = rows[("seed", n)], rows[("cnndiff", n)]
        print(f"{n:>6} {s['seconds']:>8.1f} {s['peak_rss'] / 2**30:>11.2f} GiB {c['seconds']:>10.1f} "
              f"{c['peak_rss'] / 2**30:>7.2f} GiB {c['worker_rss_at_end'] / 2**30:>7.2f} GiB "
              f"{c['disk_bytes'] / 2**30:>10.2f} GiB")
    # memory per image from the two largest runs: what bounds the seed; disk per image bounds cnndiff_xr
    (n1, n2) = sizes[-2:]
    per_image = (rows[("seed", n2)]["peak_rss"] - rows[("seed", n1)]["peak_rss"]) / (n2 - n1)
    base = rows[("seed", n2)]["peak_rss"] - per_image * n2
    ram = psutil.virtual_memory().total
    disk_per_image = rows[("cnndiff", n2)]["disk_bytes"] / n2
    free = psutil.disk_usage(tempfile.gettempdir()).free
    print(f"seed style: {per_image / 2**20:.0f} MiB of RAM per image -> at most ~{int((ram - base) / per_image)} "
          f"images in {ram / 2**30:.0f} GiB")
    print(f"cnndiff_xr: memory flat in the image count (bounded by chunk and block sizes); "
          f"{disk_per_image / 2**20:.1f} MiB of disk per image (float16, compressed) -> ~{int(free / disk_per_image)} "
          f"images in the {free / 2**30:.0f} GiB free on this disk")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
