"""Differentiation and filter means over a full VGG16 store of >= 1,000 images on the embedded cluster (issue 15).

Images: ``--per-set`` distinct PNG views of scikit-image's photographs (set ``photos``) and of its cat photograph
(set ``cats``), written as ``bench_corpus.py`` writes them. They are extracted into a **full** float16 store (every
unit of VGG16's default layers, ~26.6 MiB per image; random weights), then analysed on one embedded LocalCluster with
its default settings (one single-threaded worker per core, memory limit = the machine's memory / workers):

1. differentiation, 200 and 10,000 units x 10 resamples, every set and layer;
2. filter means, raw and z-scored, every layer.

Per stage: wall time, the peak resident memory of any worker (sampled every 0.25 s), each worker's memory limit,
bytes spilled to disk (distributed's SpillBuffer totals, summed over workers) and worker restarts (workers that left
the cluster). The extraction is timed too, for scale. With ``--work DIR`` the images and the store are kept there
(a rerun resumes the extraction and then only analyses).

    python benchmarks/bench_full_store.py [--per-set 500] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_corpus import disk_bytes, write_corpus
from bench_out_of_core import RssSampler
from common import machine_info, tree_datasets


def spilled(client) -> int:
    """Bytes spilled to disk so far, summed over the workers (0 where a worker keeps no SpillBuffer)."""

    def on_worker(dask_worker) -> int:
        total = getattr(dask_worker.data, "spilled_total", None)
        return int(getattr(total, "disk", 0) or 0) if total is not None else 0

    return sum(client.run(on_worker).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=500, help="images in each of the photos and cats sets")
    parser.add_argument("--work", default=None, help="keep images and the store here (resumable)")
    args = parser.parse_args()
    print(machine_info(), flush=True)
    import cnndiff_xr as cx
    from cnndiff_xr.extraction.cluster import get_client

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cnndiff-bench-full-"))
    work.mkdir(parents=True, exist_ok=True)
    path = str(work / "full.zarr")
    try:
        sets = write_corpus(work / "images", args.per_set)
        n_images = 2 * args.per_set
        with get_client(None) as client:
            info = client.scheduler_info()["workers"]
            workers = set(info)
            limits = sorted({w["memory_limit"] for w in info.values()})
            t0 = time.perf_counter()
            tree = cx.extract(sets, store=path, model="vgg16", weights=None, dtype="float16", client=client,
                              progress=False)
            extraction = time.perf_counter() - t0
            print(f"extraction: {n_images} images, {extraction:.0f} s, {disk_bytes(path) / 2**30:.1f} GiB on disk",
                  flush=True)
            stages = {
                "differentiation (200, 10,000 units x 10 resamples)":
                    lambda: cx.differentiation(tree, n_units=[200, 10000], resamples=10, seed=0),
                "filter means (raw and z-scored)":
                    lambda: tree_datasets(cx.filter_means(tree)) + tree_datasets(cx.filter_means(tree, zscore=True)),
            }
            rows = []
            for stage, build in stages.items():
                before = spilled(client)
                with RssSampler(client) as sampler:
                    t0 = time.perf_counter()
                    result = client.compute(build(), sync=True)
                    seconds = time.perf_counter() - t0
                now = client.scheduler_info()["workers"]
                rows.append((stage, seconds, sampler.peak, spilled(client) - before, len(workers - set(now))))
                print(f"{stage}: {seconds:.0f} s, peak worker RSS {sampler.peak / 2**30:.2f} GiB", flush=True)
                if stage.startswith("differentiation"):
                    d = result
        print(f"\nfull float16 VGG16 store: {n_images} images ({args.per_set} photo views, {args.per_set} cat views), "
              f"{disk_bytes(path) / 2**30:.1f} GiB; embedded cluster: {len(workers)} workers, memory limit "
              f"{', '.join(f'{v / 2**30:.1f} GiB' for v in limits)} each")
        print("| stage | time | peak worker RSS | spilled to disk | worker restarts |")
        print("|---|---|---|---|---|")
        for stage, seconds, peak, spill, restarts in rows:
            print(f"| {stage} | {seconds:.0f} s | {peak / 2**30:.2f} GiB | {spill / 2**20:.0f} MiB | {restarts} |")
        print("differentiation, 10,000 units, mean over resamples (rows: layers):")
        print(d.sel(n_units=10000).mean("resample").to_pandas().T.to_string(float_format=lambda v: f"{v:.4f}"))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
