"""Differentiation over a stored corpus vs one read of the store (issue 5).

A VGG16 store (random weights, default layers; float32, the default, and float16) of natural photos and white noise
is made first; then, on the same embedded LocalCluster, (a) one read: every chunk of every layer decompressed and
discarded, and (b) differentiation of every layer for 200 and 10,000 units with 10 resamples (plus filter means in
the same pass). The ratio b/a is the result (target <= 1.5x).

    python benchmarks/bench_differentiation.py [--images 48] [--dtype float32 float16] [--store PATH ...]
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

from common import machine_info, natural_image_sets  # noqa: E402


def read_once(tree, client) -> float:
    """Seconds to decompress every chunk of every layer and discard it."""
    import dask
    import dask.array as da
    import numpy as np

    def discard(block):
        return np.zeros((1,) * block.ndim, dtype=np.int8)

    parts = []
    for layer in tree.attrs["layers"]:
        data = tree[layer]["activation"].data
        parts.append(da.map_blocks(discard, data, dtype=np.int8, chunks=tuple((1,) * len(c) for c in data.chunks)))
    t0 = time.perf_counter()
    client.compute(parts, sync=True)
    del dask
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images in the corpus (half photos, half cats)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"], help="store dtypes to measure")
    parser.add_argument("--store", nargs="+", default=None, help="reuse these stores (one per --dtype)")
    parser.add_argument("--resamples", type=int, default=10)
    args = parser.parse_args()
    print(machine_info())
    import cnndiff_xr as cx
    from cnndiff_xr.cluster import get_client

    work = Path(tempfile.mkdtemp(prefix="cnndiff-bench-diff-"))
    rows = []
    try:
        with get_client(None) as client:
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
                      f"{info['uncompressed_bytes'] / 1e9:.2f} GB uncompressed, {info['disk_bytes'] / 1e9:.2f} GB on disk")
                read_once(tree, client)  # warm the page cache the same way for both measurements
                t_read = min(read_once(tree, client) for _ in range(2))
                d = cx.differentiation(tree, n_units=[200, 10000], resamples=args.resamples, seed=0)
                t0 = time.perf_counter()
                client.compute(d, sync=True)
                t_diff = time.perf_counter() - t0
                both = [cx.differentiation(tree, n_units=[200, 10000], resamples=args.resamples, seed=1),
                        cx.filter_means(tree)]
                t0 = time.perf_counter()
                client.compute(both, sync=True)
                t_both = time.perf_counter() - t0
                rows.append((dtype, t_read, t_diff, t_both))
                print(f"[{dtype}] one read of the store: {t_read:.1f} s; differentiation, all layers, n_units 200 and "
                      f"10000, {args.resamples} resamples: {t_diff:.1f} s = {t_diff / t_read:.2f}x one read; "
                      f"+ filter means together: {t_both:.1f} s = {t_both / t_read:.2f}x", flush=True)
        print("\ndtype    read s  diff s  diff/read  diff+means s  (diff+means)/read")
        for dtype, t_read, t_diff, t_both in rows:
            print(f"{dtype:8s} {t_read:6.1f} {t_diff:7.1f} {t_diff / t_read:9.2f}x {t_both:12.1f} {t_both / t_read:12.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
