"""Reduced stores: extraction throughput against the bare forward pass, store sizes, and analysis against one read.

Setting (issue 14): VGG16 (random weights), 224 x 224, the default layers, float16, registered draws n_units 200 and
10,000 x 10 resamples, filter means. Measured in one run:

1. the bare forward pass: the same PNG images, already decoded, through the same multi-output model in this process
   (TensorFlow on every core), outputs converted to numpy and discarded (as ``bench_extract.py``);
2. reduced extraction end to end (embedded LocalCluster, default settings: decode, forward pass with the gather and
   the means in the model call, writes) of ``--small`` and ``--large`` images; the **marginal throughput**
   ``(large - small) / (t_large - t_small)`` cancels cluster start-up and model builds;
3. the store size per image of the reduced store (10 resamples), of one with 1 resample, and of the full float16
   store (``--small`` images), all on disk;
4. differentiation (200 and 10,000 units, 10 resamples) of the large reduced store against one plain read of every
   array in it, on the same scheduler: dask's threads (no Client), then the embedded LocalCluster of single-threaded
   worker processes that ``cnndiff differentiation`` runs on (``--rounds`` rounds each, read and analysis
   alternating; the median round is reported).

    python benchmarks/bench_reduced.py [--small 32] [--large 192] [--repeats 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_extract import bare_forward
from common import machine_info, natural_image_sets


def disk_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def pick(folders: dict[str, str], n: int) -> dict[str, list[str]]:
    """The first ``n`` images of the sets, in order (the photos set holds 18, the cats the rest)."""
    out: dict[str, list[str]] = {}
    for name, folder in folders.items():
        paths = sorted(str(p) for p in Path(folder).glob("*.png"))[: n - sum(map(len, out.values()))]
        if paths:
            out[name] = paths
    return out


def gram_floor(result) -> float:
    """Seconds of the analysis' Gram products alone, for the draws of ``result`` (a computed differentiation): per
    set, layer, ``n_units`` and resample one float32 ``x @ x.T`` of the set's images x the draw's units, as the
    analysis' BLAS call (ssyrk), on random values (the time does not depend on them) already in memory, with this
    process's BLAS threads. A draw of every unit is the same for every resample and counted once, as the analysis
    shares it. No read, no gather, no conversion, no distances: what any exact method has to pay for these draws."""
    rng = np.random.default_rng(0)
    shapes: list[tuple[int, int]] = []
    for n_set in result["n_images"].values:
        for li in range(result.sizes["layer"]):
            for ni in range(result.sizes["n_units"]):
                m = int(result["n_units_used"].values[li, ni])
                every = m >= int(result["layer_size"].values[li])
                shapes += [(int(n_set), m)] * (1 if every else result.sizes["resample"])
    total = 0.0
    for shape in sorted(set(shapes)):
        x = rng.random(shape, dtype=np.float32)
        x @ x.T  # warm-up
        t0 = time.perf_counter()
        x @ x.T
        total += (time.perf_counter() - t0) * shapes.count(shape)
    return total


def timed_extract(sets, store: str, **kwargs) -> float:
    import cnndiff_xr as cx

    t0 = time.perf_counter()
    cx.extract(sets, store=store, model="vgg16", weights=None, dtype="float16", progress=False, **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # multiples of 16 (2 workers x batches of 8), so that no run ends on a half-idle round of batches
    parser.add_argument("--small", type=int, default=32)
    parser.add_argument("--large", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of read + differentiation per scheduler")
    args = parser.parse_args()
    print(machine_info())
    import cnndiff_xr as cx

    draws = cx.UnitDraws(n_units=[200, 10000], resamples=10, seed=0)
    one = cx.UnitDraws(n_units=[200, 10000], resamples=1, seed=0)
    work = Path(tempfile.mkdtemp(prefix="cnndiff-bench-reduced-"))
    try:
        folders = natural_image_sets(work / "images", args.large)
        small, large = pick(folders, args.small), pick(folders, args.large)
        n_small, n_large = (sum(map(len, s.values())) for s in (small, large))
        paths = sorted(p for files in large.values() for p in files)
        # Repeats interleave the bare pass and the two extractions, each repeat giving one ratio: single runs on this
        # VM vary by ~10-15 % from minute to minute (its neighbours), so only numbers measured side by side compare.
        ratios, marginals, bares = [], [], []
        for k in range(args.repeats):
            bare = bare_forward(paths, args.batch_size, repeats=1)
            times = {}
            for label, sets in (("small", small), ("large", large)):
                path = work / f"reduced-{label}-{k}.zarr"
                times[label] = timed_extract(sets, str(path), units=draws, filter_means=True,
                                             batch_size=args.batch_size)
                if k < args.repeats - 1 or label == "small":
                    shutil.rmtree(path)
            marginal = (n_large - n_small) / (times["large"] - times["small"])
            ratios.append(marginal / bare)
            marginals.append(marginal)
            bares.append(bare)
            print(f"repeat {k}: bare forward pass {bare:.2f} images/s; reduced extraction {times['small']:.1f} s "
                  f"({n_small} images), {times['large']:.1f} s ({n_large}): marginal {marginal:.2f} images/s = "
                  f"{marginal / bare:.2f}x bare")
        shutil.move(str(work / f"reduced-large-{args.repeats - 1}.zarr"), str(work / "reduced-large.zarr"))
        timed_extract(small, str(work / "reduced-small.zarr"), units=draws, filter_means=True,
                      batch_size=args.batch_size)
        print(f"bare forward pass (in-process, TF on all cores, {len(paths)} images): median "
              f"{np.median(bares):.2f} images/s")
        print(f"reduced extraction, marginal throughput: median {np.median(marginals):.2f} images/s; ratio to the "
              f"bare pass of the same repeat: median {np.median(ratios):.2f}x (each: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.95x)")

        timed_extract(small, str(work / "one.zarr"), units=one, filter_means=True, batch_size=args.batch_size)
        timed_extract(small, str(work / "full.zarr"), batch_size=args.batch_size)
        per_image = {label: disk_bytes(str(work / name)) / n_small
                     for label, name in (("full float16", "full.zarr"), ("reduced, 10 resamples", "reduced-small.zarr"),
                                         ("reduced, 1 resample", "one.zarr"))}
        for label, size in per_image.items():
            ratio = per_image["full float16"] / size
            print(f"store size per image, {label}: {size / 2**20:.2f} MiB ({ratio:.1f}x smaller than full)")

        import dask

        from cnndiff_xr.extraction.cluster import get_client

        tree = cx.open_activations(str(work / "reduced-large.zarr"))
        layers = cx.store.layer_names(tree)
        arrays = [tree[layer]["activation"].data for layer in layers]
        arrays += [tree[layer]["filter_means"][v].data for layer in layers if "filter_means" in tree[layer].children
                   for v in ("filter_mean", "layer_mean", "layer_css")]
        size = disk_bytes(str(work / "reduced-large.zarr")) / 2**20

        def rounds(label: str) -> None:
            reads, analyses = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                dask.compute(*[a.astype("float32").sum() for a in arrays])
                reads.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                result = cx.differentiation(tree, n_units=[200, 10000], resamples=10, seed=0).compute()
                analyses.append(time.perf_counter() - t0)
            ratios = [a / r for a, r in zip(analyses, reads, strict=True)]
            k = int(np.argsort(ratios)[len(ratios) // 2])
            print(f"{label}: reduced store of {n_large} images ({size:.0f} MiB on disk), median round of "
                  f"{args.rounds}: one read of every array {reads[k]:.2f} s; differentiation (200 and 10,000 units "
                  f"x 10 resamples) {analyses[k]:.2f} s = {ratios[k]:.2f}x the read (target <= 1.2x; rounds: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})")
            if label.startswith("threads"):
                floor = gram_floor(result)
                print(f"  the Gram products alone (in memory, BLAS only) {floor:.2f} s: one read plus them = "
                      f"{(reads[k] + floor) / reads[k]:.2f}x the read")

        with dask.config.set(scheduler="threads"):
            rounds("threads (dask's threaded scheduler, no Client)")
        with get_client(None) as client:
            n_workers = len(client.scheduler_info()["workers"])
            rounds(f"embedded LocalCluster ({n_workers} single-threaded worker processes)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
