"""Cost of the bootstrap over images and of the permutation test, against one differentiation of the same data.

In one run, on the same data and draws (n_units 200 and 10,000 x ``--resamples``), dask's threaded scheduler:

1. ``cx.differentiation`` (the reference: one read of the data, the Gram products, the medians);
2. ``cx.bootstrap_differentiation(..., n_boot=1000)`` (one RDM per set and draw, then 1,000 weighted medians);
3. ``cx.compare_sets(a, b, n_permutations=1000)`` (the union's Gram per draw, then 1,000 relabellings).

Data: ``--store PATH`` (a cnndiff store; ``--layers`` to choose some, ``--sets A,B`` the two sets), or by default a
synthetic layer of ``--units`` seeded uniform float32 units for two sets of ``--per-set`` images (the generic
DataArray path, chunks of 64 images).

    python benchmarks/bench_inference.py [--per-set 500] [--units 50000] [--resamples 10]
    python benchmarks/bench_inference.py --store full.zarr --layers block1_conv1,block5_pool --sets photos,cats
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info


def synthetic(per_set: int, units: int):
    """Seeded uniform values, one task per chunk of 64 images (``bench_large_n.synthetic``)."""
    import numpy as np
    from bench_large_n import synthetic as blocks

    array = blocks(2 * per_set, units, 64)
    return array.assign_coords(image=np.arange(2 * per_set), set=("image", np.repeat(["a", "b"], per_set)))


def timed(label: str, build) -> float:
    import dask

    obj = build()
    t0 = time.perf_counter()
    dask.compute(obj, scheduler="threads")
    seconds = time.perf_counter() - t0
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=500)
    parser.add_argument("--units", type=int, default=50000)
    parser.add_argument("--resamples", type=int, default=10)
    parser.add_argument("--store", default=None)
    parser.add_argument("--layers", default=None)
    parser.add_argument("--sets", default="a,b")
    args = parser.parse_args()
    print(machine_info(), flush=True)
    import cnndiff_xr as cx

    if args.store:
        data = cx.open_activations(args.store)
        layers = args.layers.split(",") if args.layers else None
        what = f"store {args.store}, layers {layers or 'all'}"
    else:
        data, layers = synthetic(args.per_set, args.units), None
        what = f"synthetic: 2 sets x {args.per_set} images, one layer of {args.units} float32 units"
    a, b = args.sets.split(",")
    common = {"n_units": [200, 10000], "resamples": args.resamples, "seed": 0, "layers": layers}
    runs = {
        "differentiation": lambda: cx.differentiation(data, sets=[a, b], **common),
        "bootstrap, 1,000 resamples of the images": lambda: cx.bootstrap_differentiation(
            data, sets=[a, b], n_boot=1000, **common),
        "compare_sets, 1,000 permutations": lambda: cx.compare_sets(data, a, b, n_permutations=1000, **common),
    }
    seconds = {label: timed(label, build) for label, build in runs.items()}
    base = seconds["differentiation"]
    print(f"\n{what}; n_units 200 and 10,000 x {args.resamples} resamples; threaded scheduler")
    print("| analysis | time | vs one differentiation |")
    print("|---|---|---|")
    for label, s in seconds.items():
        print(f"| {label} | {s:.1f} s | {s / base:.2f}x |")


if __name__ == "__main__":
    main()
