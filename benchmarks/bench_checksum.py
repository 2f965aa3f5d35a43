"""The cost of the per-chunk crc32c checksum (issue 17 point 4): extraction throughput and full read time, with and
without it, on the same images in the same run.

MobileNetV2 with random weights (every default layer, a full store, float16, lz4 as by default), natural photos, the
embedded LocalCluster (one worker per core). Each store is extracted with and without ``crc32c`` (the dask config
``"cnndiff_xr.chunk-checksums"``), in alternating order, ``--repeats`` times; then every chunk of every layer is read
back (``open_activations``, one dask task per chunk on the threaded scheduler, each chunk decoded and its checksum
checked), and ``cx.verify_store`` runs on the checksummed store. Reported: images/s of extraction (the batches:
decode, forward pass, compression, checksum, writes), read seconds (best of ``--repeats``), and the ratios.

    python benchmarks/bench_checksum.py [--images 192] [--repeats 2]
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

MODEL = "mobilenet_v2"


def _touch(block):
    import numpy as np

    return np.zeros((1,) * block.ndim, dtype=block.dtype)


def read_all(store: str) -> float:
    """Seconds to read and decode every chunk of every layer's activations (threaded scheduler)."""
    import dask

    import cnndiff_xr as cx

    tree = cx.open_activations(store)
    parts = []
    for layer in tree.cnndiff.layers:
        data = tree[layer]["activation"].data
        parts.append(data.map_blocks(_touch, chunks=tuple((1,) * len(c) for c in data.chunks), dtype=data.dtype))
    t0 = time.perf_counter()
    dask.compute(*parts, scheduler="threads")
    return time.perf_counter() - t0


def disk_bytes(store: str) -> int:
    return sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(machine_info())
    print(f"load average at start: {os.getloadavg()}")
    import dask

    import cnndiff_xr as cx
    from cnndiff_xr.extraction.checksums import CHECKSUM_CONFIG
    from cnndiff_xr.extraction.cluster import get_client

    work = Path(tempfile.mkdtemp(prefix="cnndiff-bench-checksum-"))
    try:
        sets = natural_image_sets(work / "images", args.images)
        n = sum(1 for f in sets.values() for _ in Path(f).glob("*.png"))
        rates: dict[bool, list[float]] = {True: [], False: []}
        reads: dict[bool, list[float]] = {True: [], False: []}
        sizes: dict[bool, int] = {}
        with get_client(None) as client:
            workers = len(client.scheduler_info()["workers"])
            print(f"{MODEL} (random weights), {n} images, batch {args.batch_size}, float16, lz4, {workers} workers")
            for repeat in range(args.repeats):
                order = (True, False) if repeat % 2 == 0 else (False, True)
                for checksum in order:
                    store = str(work / f"store-{checksum}-{repeat}.zarr")
                    with dask.config.set({CHECKSUM_CONFIG: checksum}):
                        _, report = cx.extract(sets, store=store, model=MODEL, weights=None, dtype="float16",
                                               batch_size=args.batch_size, client=client, progress=False,
                                               return_report=True)
                    rates[checksum].append(report.images_per_second)
                    sizes[checksum] = disk_bytes(store)
                    reads[checksum].append(read_all(store))
                    print(f"  repeat {repeat} crc32c={checksum!s:<5}: extraction {report.images_per_second:6.2f} "
                          f"images/s, read {reads[checksum][-1]:.2f} s", flush=True)
                    if repeat < args.repeats - 1 or not checksum:
                        shutil.rmtree(store)
            checked = str(work / f"store-True-{args.repeats - 1}.zarr")
            t0 = time.perf_counter()
            damaged = cx.verify_store(checked, client=client)
            verify_s = time.perf_counter() - t0
        raw = sum(layer["uncompressed_bytes"] for layer in cx.store.info(checked)["layers"])
        best = {c: max(rates[c]) for c in rates}
        fastest = {c: min(reads[c]) for c in reads}
        print(f"\nstore: {raw / 1e6:.0f} MB uncompressed; on disk {sizes[True] / 1e6:.1f} MB with crc32c, "
              f"{sizes[False] / 1e6:.1f} MB without (+{sizes[True] - sizes[False]} bytes: 4 per chunk)")
        print(f"extraction, best of {args.repeats}: {best[True]:.2f} images/s with crc32c, {best[False]:.2f} without: "
              f"ratio {best[True] / best[False]:.3f}")
        print(f"full read, best of {args.repeats}: {fastest[True]:.2f} s with crc32c, {fastest[False]:.2f} s without: "
              f"ratio {fastest[True] / fastest[False]:.3f}")
        print(f"verify_store (every chunk of every array, on the cluster): {verify_s:.2f} s, {len(damaged)} damaged")
        print(f"load average at end: {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
