"""Gram-based distances vs ``scipy.spatial.distance.pdist`` on the same sampled matrix.

The seed computed differentiation as: z-score the (images x sampled units) matrix over
the layer, ``pdist``, divide by sqrt(m), median. cnndiff_xr computes the same distances
from Gram products of centroid-shifted rows (float32 BLAS on blocks of 4096 units summed
in float64, pairs with a large error bound redone in float64). Both run here in the same
process, on the same float32 matrix (sparse, non-negative, like sampled ReLU
activations), so the ratio is meaningful on a shared, noisy machine even when absolute
times drift.

Columns:
  pdist      seed recipe: float64 z-scoring + pdist + / sqrt(m) (condensed distances)
  gram       cnndiff_xr.analysis.blocks.pairwise_distances: the per-block kernel the lazy graph runs
  lazy       cnndiff_xr.differentiation(..., resamples=1) end to end on a dask array
             (gather, row stats, Gram blocks, exact median), synchronous scheduler
  gram64     information only: the float64 Gram kernel this replaced (one float64 copy,
             row statistics, mean shift, dsyrk)
  largest relative difference: of any single distance, Gram kernel vs pdist (the
             package promises <= 1e-5, cnndiff_xr.analysis.gram.DISTANCE_RTOL)

Run: ``python benchmarks/bench_distances.py`` (about a minute; ``--quick`` skips
1000 x 100k).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def sampled_matrix(n: int, m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.2, 1.0, size=(n, m)).astype(np.float32)
    np.maximum(x, 0, out=x)  # about 40 % exact zeros, like ReLU units
    return x


def seed_recipe(x: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import pdist

    x64 = x.astype(np.float64)
    z = (x64 - x64.mean()) / x64.std()
    return pdist(z) / np.sqrt(x.shape[1])


def gram_kernel(x: np.ndarray) -> np.ndarray:
    from cnndiff_xr.analysis.blocks import pairwise_distances

    return pairwise_distances(x, norm="layer", metric="euclidean")


def lazy_median(x: np.ndarray) -> float:
    import dask
    import dask.array as da
    import xarray as xr

    import cnndiff_xr as cx

    chunks = (max(1, 2**26 // (x.shape[1] * 4)), x.shape[1])  # ~64 MB image chunks, like a store
    arr = xr.DataArray(da.from_array(x, chunks=chunks, name=False), dims=("image", "unit"), name="layer")
    d = cx.differentiation(arr, n_units=x.shape[1], resamples=1)
    with dask.config.set(scheduler="synchronous"):
        return float(d.compute().squeeze())


def gram64(x: np.ndarray) -> np.ndarray:
    """The float64 kernel of the previous release, for comparison."""
    x64 = np.array(x, dtype=np.float64)
    m = x.shape[1]
    s = x64.sum(axis=1)
    q = np.einsum("ij,ij->i", x64, x64)
    mean = s.sum() / x64.size
    sd = np.sqrt(max(q.sum() / x64.size - mean**2, 0.0))
    x64 -= mean
    g = x64 @ x64.T
    n2 = np.diagonal(g)
    d2 = np.maximum(n2[:, None] + n2[None, :] - 2 * g, 0)
    return np.sqrt(d2 / (m * sd * sd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1000 x 100k case")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the fast timings")
    args = parser.parse_args()
    sizes = [(43, 10_000), (200, 100_000)] + ([] if args.quick else [(1000, 100_000)])

    print(machine_info())
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ}
    print(f"BLAS threads: {threads or 'default (all cores)'}; load average before: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (a shared machine: compare ratios, not times)")
    header = f"{'images x units':>16} {'pdist s':>9} {'gram s':>8} {'lazy s':>8} {'gram64 s':>9} " \
             f"{'pdist/gram':>10} {'pdist/lazy':>10} {'pdist/gram64':>12} {'median rel diff':>16}"
    print(header)
    print("-" * len(header))
    rows = []
    for n, m in sizes:
        x = sampled_matrix(n, m)
        t_pdist, condensed = best_of(lambda x=x: seed_recipe(x), 1 if n * m > 5e7 else args.repeats)
        t_gram, square = best_of(lambda x=x: gram_kernel(x), args.repeats)
        t_lazy, lazy = best_of(lambda x=x: lazy_median(x), args.repeats)
        t_64, _ = best_of(lambda x=x: gram64(x), args.repeats)
        reference = float(np.median(condensed))
        upper = square[np.triu_indices(n, 1)]
        max_rel = float(np.max(np.abs(upper - condensed) / condensed))
        rel = abs(lazy - reference) / reference
        rows.append((n, m, t_pdist, t_gram, t_lazy, t_64))
        print(f"{f'{n} x {m}':>16} {t_pdist:9.3f} {t_gram:8.3f} {t_lazy:8.3f} {t_64:9.3f} "
              f"{t_pdist / t_gram:9.1f}x {t_pdist / t_lazy:9.1f}x {t_pdist / t_64:11.1f}x {rel:16.1e}")
        print(f"{'':>16} (largest relative difference of any single distance, gram vs pdist: {max_rel:.1e})")
    print(f"\nload average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("ratios > 1: cnndiff_xr faster. 'lazy' includes building and running the dask graph.")


if __name__ == "__main__":
    main()
