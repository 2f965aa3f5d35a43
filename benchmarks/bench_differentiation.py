"""Differentiation over a stored corpus vs one read of the store.

A VGG16 store (random weights, default layers; float32, the default, and float16) of natural photos and white noise
is made first; then, on the same scheduler, (a) one read: every chunk of every layer decompressed and discarded, and
(b) differentiation of every layer for 200 and 10,000 units with 10 resamples (plus filter means in the same pass).
The ratio b/a is the result (target <= 1.5x). Two schedulers: dask's local threads (what ``.compute()`` uses
without a Client) and the embedded LocalCluster of single-threaded worker processes.

    python benchmarks/bench_differentiation.py [--images 48] [--dtype float32 float16] [--store PATH ...] [--rounds 3]
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

from common import machine_info, natural_image_sets


def run(client, collections) -> float:
    """Seconds to compute ``collections`` on ``client`` (a distributed Client), or with dask's local threaded
    scheduler when ``client`` is None (what ``.compute()`` does without a Client)."""
    import dask

    t0 = time.perf_counter()
    if client is None:
        dask.compute(collections, scheduler="threads", num_workers=os.cpu_count())
    else:
        client.compute(collections, sync=True)
    return time.perf_counter() - t0


def read_once(tree, client) -> float:
    """Seconds to decompress every chunk of every layer and discard it."""
    import dask.array as da
    import numpy as np

    def discard(block):
        return np.zeros((1,) * block.ndim, dtype=np.int8)

    parts = []
    for layer in tree.attrs["layers"]:
        data = tree[layer]["activation"].data
        parts.append(da.map_blocks(discard, data, dtype=np.int8, chunks=tuple((1,) * len(c) for c in data.chunks)))
    return run(client, parts)


def measure(cx, tree, client, resamples: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of one read, differentiation, and differentiation + filter means. The three alternate
    within each round, so that the machine's drift (+-30 % between minutes here) hits both sides of a ratio."""
    read_once(tree, client)  # warm the page cache the same way for every measurement
    times: dict[str, list[float]] = {"read": [], "diff": [], "both": []}
    for r in range(rounds):
        times["read"].append(read_once(tree, client))
        times["diff"].append(run(client, cx.differentiation(tree, n_units=[200, 10000], resamples=resamples,
                                                            seed=2 * r)))
        times["both"].append(run(client, [cx.differentiation(tree, n_units=[200, 10000], resamples=resamples,
                                                             seed=2 * r + 1), cx.filter_means(tree)]))
    return times


def ratios(times: dict[str, list[float]], key: str) -> tuple[float, float]:
    """(best over best, median of the per-round ratios) of ``key`` against one read."""
    import numpy as np

    per_round = np.array(times[key]) / np.array(times["read"])
    return min(times[key]) / min(times["read"]), float(np.median(per_round))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images in the corpus (half photos, half cats)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"], help="store dtypes to measure")
    parser.add_argument("--store", nargs="+", default=None, help="reuse these stores (one per --dtype)")
    parser.add_argument("--resamples", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (read, differentiation, + filter means)")
    args = parser.parse_args()
    print(machine_info())
    import cnndiff_xr as cx
    from cnndiff_xr.extraction.cluster import get_client

    work = Path(tempfile.mkdtemp(prefix="cnndiff-bench-diff-"))
    rows = []
    try:
        with get_client(None) as client:
            n_workers = len(client.scheduler_info()["workers"])
            for i, dtype in enumerate(args.dtype):
                store = args.store[i] if args.store else None
                if store is None:
                    store = str(work / f"corpus-{dtype}.zarr")
                    folders = natural_image_sets(work / "images", args.images)
                    sets = {**folders, "white_noise": cx.images.white_noise(args.images // 2, seed=0)}
                    cx.extract(sets, store=store, model="vgg16", weights=None, dtype=dtype, client=client,
                               progress=False)
                tree = cx.open_activations(store)
                info = cx.store.info(store)
                print(f"corpus: {info['n_images']} images, {len(tree.attrs['layers'])} layers, "
                      f"{tree[tree.attrs['layers'][0]]['activation'].dtype}, "
                      f"{info['uncompressed_bytes'] / 1e9:.2f} GB uncompressed, "
                      f"{info['disk_bytes'] / 1e9:.2f} GB on disk")
                for label, where in (("threads", None), ("processes", client)):
                    times = measure(cx, tree, where, args.resamples, args.rounds)
                    rows.append((dtype, label, times))
                    (diff, diff_med), (both, both_med) = ratios(times, "diff"), ratios(times, "both")
                    print(f"[{dtype}, {label}] best of {args.rounds}: one read of the store "
                          f"{min(times['read']):.1f} s; "
                          f"differentiation, all layers, n_units 200 and 10000, {args.resamples} resamples: "
                          f"{min(times['diff']):.1f} s = {diff:.2f}x one read (median round {diff_med:.2f}x); "
                          f"+ filter means together: {min(times['both']):.1f} s = {both:.2f}x "
                          f"(median round {both_med:.2f}x)", flush=True)
        print("\nthreads: dask's local threaded scheduler (what .compute() uses without a Client)")
        print(f"processes: the embedded LocalCluster, {n_workers} single-threaded worker "
              "processes (extraction's layout; the CLI's default without --scheduler)")
        print(f"best of {args.rounds} rounds over best of {args.rounds}; in brackets the median of the rounds' "
              "own ratios")
        print("dtype    scheduler   read s  diff s  diff/read        diff+means s  (diff+means)/read")
        for dtype, label, times in rows:
            (diff, diff_med), (both, both_med) = ratios(times, "diff"), ratios(times, "both")
            print(f"{dtype:8s} {label:10s} {min(times['read']):6.1f} {min(times['diff']):7.1f} {diff:6.2f}x "
                  f"({diff_med:.2f}x) {min(times['both']):12.1f} {both:8.2f}x ({both_med:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
