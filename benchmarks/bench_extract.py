"""Extraction throughput vs the bare forward pass.

End-to-end extraction (decode PNG files + VGG16 forward pass + compressed Zarr write of every default layer, on the
embedded LocalCluster with default settings), float16 and float32, against the bare forward pass: the same images,
already decoded, through the same multi-output model in this process (TensorFlow using every core), outputs
converted to numpy and discarded. Both are measured in the same run; the ratio is the result.

    python benchmarks/bench_extract.py [--images 32] [--batch-size 8] [--fill-page-cache]

``--fill-page-cache`` first fills the machine's free memory with clean page cache (a scratch file, written, synced and
kept until the end), the state a long extraction reaches once its own writes have filled RAM. On VMs whose free
memory is handed back to the host (a balloon driver's free page reporting), writing a new file into never-used or
long-free memory costs a host page fault per 4 KiB page, ~3 ns per byte on the development VM, while reusing page
cache costs ~0.7 ns; every store written on a freshly booted VM pays the first until RAM is full.
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


def bare_forward(image_paths: list, batch_size: int, repeats: int = 1) -> float:
    """Images per second of the forward pass alone (model built and warmed up first)."""
    from cnndiff_xr.extraction import images
    from cnndiff_xr.extraction.backends import model_spec

    extractor = model_spec("vgg16", weights=None).backend(None)
    refs = [images.FileRef(str(p)) for p in image_paths]
    rgb = images.load_batch(refs, extractor.input_size, "nearest")
    extractor.run(rgb[:batch_size])  # warm-up: graph tracing, allocator
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, len(rgb), batch_size):
            outs = extractor.run(rgb[start:start + batch_size]).activations
            del outs
        best = min(best, time.perf_counter() - t0)
    return len(rgb) / best


def free_memory() -> int:
    """Bytes of free memory (MemFree: neither used nor page cache), from /proc/meminfo; 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fill_page_cache(path: Path, leave: int = 512 * 2**20) -> int:
    """Write and sync a scratch file of (free memory - ``leave``) bytes, so that most free memory becomes page cache;
    returns its size. One pass, not "until free memory is low": the kernel frees memory of its own as the file grows
    and keeps ~2 GiB free on the development VM. The caller deletes the file when done."""
    size = max(0, free_memory() - leave)
    block = bytes(64 * 2**20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return size


def extraction(sets: dict, store: str, dtype: str, batch_size: int, client, compression: str | None):
    import cnndiff_xr as cx

    options = {} if compression is None else {"compression": compression}
    t0 = time.perf_counter()
    _, report = cx.extract(sets, store=store, model="vgg16", weights=None, dtype=dtype, batch_size=batch_size,
                           client=client, progress=False, return_report=True, **options)
    return report.images_per_second, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compressions", default="default",
                        help="comma-separated codecs to compare on float16 (default: the package default only)")
    parser.add_argument("--fill-page-cache", action="store_true",
                        help="measure with free memory filled by clean page cache (see the module doc)")
    args = parser.parse_args()
    print(machine_info())
    work = Path(tempfile.mkdtemp(prefix="cnndiff-bench-extract-"))
    try:
        folders = natural_image_sets(work / "images", args.images)
        paths = sorted(p for f in folders.values() for p in Path(f).glob("*.png"))
        if args.fill_page_cache:
            t0 = time.perf_counter()
            filled = fill_page_cache(work / "page-cache-fill")
            print(f"filled {filled / 2**30:.1f} GiB of free memory with page cache in {time.perf_counter() - t0:.0f} s")
        print(f"free memory before measuring: {free_memory() / 2**30:.1f} GiB")
        from cnndiff_xr.extraction.cluster import get_client

        results = {}
        with get_client(None) as client:
            workers = len(client.scheduler_info()["workers"])
            runs = [("float16", None if c == "default" else c) for c in args.compressions.split(",")]
            runs.append(("float32", None))
            for dtype, compression in runs:
                store = str(work / f"{dtype}-{compression}.zarr")
                label = f"{dtype}, {compression or 'default codec'}"
                results[label] = extraction(folders, store, dtype, args.batch_size, client, compression)
                size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
                results[label] += (size,)
                shutil.rmtree(store)
        bare = bare_forward(paths, args.batch_size, repeats=2)  # best of two: single timings varied 6.7-8.3 images/s
        print(f"{len(paths)} PNG images, VGG16 (random weights), 224x224, default layers (22), batch "
              f"{args.batch_size}; extraction on {workers} single-threaded worker processes")
        print(f"bare forward pass (in-process, TF on all cores): {bare:.2f} images/s")
        for label, (ips, wall, size) in results.items():
            print(f"extract {label}: {ips:.2f} images/s over the batches ({ips / bare:.2f}x bare), "
                  f"{wall:.1f} s end to end incl. cluster start and model builds; {size / 1e6:.0f} MB on disk")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
