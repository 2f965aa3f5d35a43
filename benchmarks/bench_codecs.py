"""Codec choice for activation chunks: zstd, blosc or lz4, chosen by measurement.

VGG16 (random weights) activations of natural photos, every default layer, float32 and float16: compression ratio
and single-thread encode/decode throughput of candidate Zarr v3 codecs on the real chunk bytes.

    python benchmarks/bench_codecs.py [--images 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info, natural_image_sets

CANDIDATES = {
    "zstd-1": lambda: __import__("zarr.codecs", fromlist=["ZstdCodec"]).ZstdCodec(level=1),
    "zstd-3": lambda: __import__("zarr.codecs", fromlist=["ZstdCodec"]).ZstdCodec(level=3),
    "blosc-lz4-shuffle": lambda: __import__("zarr.codecs", fromlist=["BloscCodec"]).BloscCodec(
        cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd1-bitshuffle": lambda: __import__("zarr.codecs", fromlist=["BloscCodec"]).BloscCodec(
        cname="zstd", clevel=1, shuffle="bitshuffle"),
    "blosc-zstd1-shuffle": lambda: __import__("zarr.codecs", fromlist=["BloscCodec"]).BloscCodec(
        cname="zstd", clevel=1, shuffle="shuffle"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    print(machine_info())
    import numcodecs
    import numpy as np

    from cnndiff_xr.extraction import images
    from cnndiff_xr.extraction.backends import model_spec

    numcodecs.blosc.set_nthreads(1)  # per-worker cost: one thread, like a Dask worker
    with tempfile.TemporaryDirectory() as tmp:
        folders = natural_image_sets(Path(tmp), args.images)
        paths = sorted(p for f in folders.values() for p in Path(f).glob("*.png"))[: args.images]
        extractor = model_spec("vgg16", weights=None).backend(None)
        rgb = images.load_batch([images.FileRef(str(p)) for p in paths], extractor.input_size)
        acts = extractor.run(rgb).activations
    import zarr

    for dtype in ("float32", "float16"):
        chunks = [a.astype(dtype) for a in acts.values()]
        raw = sum(c.nbytes for c in chunks)
        print(f"\n{dtype}: {len(chunks)} layers, {raw / 1e6:.0f} MB for {len(paths)} images; zeros "
              f"{np.mean([np.mean(c == 0) for c in chunks]):.0%} of values (mean over layers)")
        print(f"{'codec':<24} {'ratio':>6} {'encode MB/s':>12} {'decode MB/s':>12}")
        for name, make in CANDIDATES.items():
            with tempfile.TemporaryDirectory() as tmp:
                t_enc = t_dec = 0.0
                disk = 0
                for k, c in enumerate(chunks):
                    arr = zarr.create_array(f"{tmp}/a{k}.zarr", shape=c.shape, chunks=c.shape, dtype=dtype,
                                            compressors=[make()], fill_value=0)
                    t0 = time.perf_counter()
                    arr[...] = c
                    t_enc += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    arr[...]
                    t_dec += time.perf_counter() - t0
                    disk += sum(f.stat().st_size for f in Path(f"{tmp}/a{k}.zarr").rglob("c/**/*") if f.is_file())
                print(f"{name:<24} {raw / disk:>6.2f} {raw / 1e6 / t_enc:>12.0f} {raw / 1e6 / t_dec:>12.0f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
