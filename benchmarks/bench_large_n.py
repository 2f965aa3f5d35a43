"""Differentiation of one large set against the Gram floor, and of many draws in bounded memory (issue 15).

Time table: one set of N images (``--sizes``, default 2,000, 5,000, 10,000 and 20,000), float32, a layer of
``--units`` (10,000) units analysed whole (``n_units=10000``, one draw), on the generic DataArray path: a dask array
of seeded uniform random values chunked along the samples (``--chunk`` images per chunk), dask's threaded
scheduler. The Gram floor is ``N^2 m / 2`` multiply-adds at the float32 GEMM rate measured in the same process just
before and just after (plain ``(B, m) @ (m, B)`` sgemms, ``B`` = 4,096 and the row block size, best of 3 each, all
cores; the highest rate, so the strictest floor); time / floor is the result (target <= 2.0 at 20,000 images).
Peak RSS: the process's resident memory sampled every 20 ms by a psutil thread.

Memory run (``--memory-images``, default 20,000): 10 draws of 10,000 units from a 200,000-unit layer (chunks of
64 images), threaded scheduler, with the default budget (``cnndiff_xr.analysis-memory``, 3 GiB) unless
``--memory`` says otherwise; peak RSS (target < 4 GiB). ``--cluster`` repeats it on the embedded LocalCluster and
reports the peak RSS of each worker process and its memory limit.

Each measurement runs in a fresh Python process, so that one's memory does not count in the next's peak. The time
runs are made twice (``--blas``): with BLAS's default threads (each product as wide as the machine, so dask's threads
and BLAS's compete: twice as many busy threads as cores), and with one BLAS thread per dask thread
(``OPENBLAS_NUM_THREADS=1``, what the embedded cluster's workers run with); the floor is the machine's GEMM rate
either way (:func:`best_gemm_rate`).

    python benchmarks/bench_large_n.py [--sizes 2000,5000,10000,20000] [--no-memory-run] [--cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


# --------------------------------------------------------------------------- measured in a child process
class PeakRSS:
    """The peak resident memory of this process (and, with ``children``, of each of its descendants) while the
    block runs, sampled by a thread."""

    def __init__(self, children: bool = False, every: float = 0.02):
        import psutil

        self.process, self.children, self.every = psutil.Process(), children, every
        self.peak = 0
        self.child_peaks: dict[int, int] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
                if self.children:
                    for child in self.process.children(recursive=True):
                        try:
                            rss = child.memory_info().rss
                        except psutil.Error:
                            continue
                        self.child_peaks[child.pid] = max(self.child_peaks.get(child.pid, 0), rss)
            except psutil.Error:
                pass
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _random_block(block_info=None, *, seed: int, units: int):
    import numpy as np

    info = block_info[None]
    (lo, hi), _ = info["array-location"]
    rng = np.random.default_rng([seed, info["chunk-location"][0]])
    return rng.random((hi - lo, units), dtype=np.float32)


def synthetic(n: int, units: int, chunk: int, seed: int = 0):
    """A lazy ``(image, unit)`` DataArray of seeded uniform float32 values, chunked along the images."""
    import dask.array as da
    import numpy as np
    import xarray as xr

    chunks = (tuple(min(chunk, n - lo) for lo in range(0, n, chunk)), (units,))
    data = da.map_blocks(_random_block, seed=seed, units=units, chunks=chunks, dtype=np.float32,
                         meta=np.empty((0, 0), np.float32))
    return xr.DataArray(data, dims=("image", "unit"), name=f"synthetic-{n}x{units}")


def gemm_rate(m: int, rows: int = 4096, repeats: int = 3, concurrent: int = 1) -> float:
    """Multiply-adds per second of plain float32 ``(rows, m) @ (m, rows)`` products, best of ``repeats``:
    ``concurrent`` of them at once in as many threads (the machine's throughput when BLAS runs one thread per
    caller), else one (BLAS's own threads)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pairs = [(rng.random((rows, m), dtype=np.float32), rng.random((rows, m), dtype=np.float32))
             for _ in range(concurrent)]
    best = np.inf
    for _ in range(repeats):
        threads = [threading.Thread(target=lambda a=a, b=b: a @ b.T) for a, b in pairs]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return concurrent * rows * rows * m / best


def best_gemm_rate(units: int) -> float:
    """The machine's float32 GEMM rate: the best of one product (BLAS's threads) and one per core at once (one
    BLAS thread each), each for a square-ish product and for the pair tasks' own shape (row blocks of
    :func:`~cnndiff_xr.analysis.blocks.auto_block_size` images): the higher rate, the stricter floor."""
    from cnndiff_xr.analysis.blocks import auto_block_size

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(gemm_rate(units, rows=rows, concurrent=k)
               for rows in (4096, auto_block_size(units, 4)) for k in sorted({1, cores}))


def measure_time(n: int, units: int, chunk: int) -> dict:
    import dask

    import cnndiff_xr as cx

    rate = best_gemm_rate(units)
    arr = synthetic(n, units, chunk)
    d = cx.differentiation(arr, n_units=units, resamples=1)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        (value,) = dask.compute(d, scheduler="threads")
        seconds = time.perf_counter() - t0
    rate = max(rate, best_gemm_rate(units))  # measured before and after: the machine's load drifts
    floor = n * n * units / 2 / rate
    return {"n": n, "units": units, "seconds": seconds, "rate": rate, "floor": floor, "peak": peak.peak,
            "value": float(value.squeeze())}


def measure_memory(n: int, layer_units: int, n_units: int, resamples: int, chunk: int, cluster: bool,
                   memory: str | None) -> dict:
    import dask

    import cnndiff_xr as cx
    from cnndiff_xr.analysis.collection import as_collection
    from cnndiff_xr.analysis.differentiation import analysis_memory, draw_groups
    from cnndiff_xr.analysis.draws import draw_table

    rate = best_gemm_rate(n_units)
    arr = synthetic(n, layer_units, chunk, seed=1)
    settings = {} if memory is None else {"cnndiff_xr.analysis-memory": memory}
    out: dict = {"n": n, "layer_units": layer_units, "n_units": n_units, "resamples": resamples, "cluster": cluster}
    with dask.config.set(settings):
        if cluster:
            from cnndiff_xr.extraction.cluster import get_client

            with get_client(None) as client:
                workers = client.scheduler_info(n_workers=-1)["workers"].values()
                out["worker_limits"] = [int(w["memory_limit"]) for w in workers]
                budget = analysis_memory()
                d = cx.differentiation(arr, n_units=n_units, resamples=resamples)
                with PeakRSS(children=True) as peak:
                    t0 = time.perf_counter()
                    values = client.compute(d, sync=True)
                    out["seconds"] = time.perf_counter() - t0
                out["worker_peaks"] = sorted(peak.child_peaks.values(), reverse=True)[: len(out["worker_limits"])]
        else:
            budget = analysis_memory()
            d = cx.differentiation(arr, n_units=n_units, resamples=resamples)
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                (values,) = dask.compute(d, scheduler="threads")
                out["seconds"] = time.perf_counter() - t0
        table = draw_table(as_collection(arr).layer(arr.name), [n_units], resamples, unit_type="random", seed=0,
                           filter_dim="filter")
        out["groups"] = len(draw_groups(table, n, arr.dtype, budget))
    rate = max(rate, best_gemm_rate(n_units))
    out.update(budget=budget, peak=peak.peak, values=[float(v) for v in values.values.ravel()], rate=rate,
               floor=resamples * n * n * n_units / 2 / rate)
    return out


# --------------------------------------------------------------------------- the parent
#: the environment of a child whose BLAS runs one thread per calling thread (as the embedded cluster's workers)
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def child(args: list[str], one_blas_thread: bool = False) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(ONE_BLAS_THREAD if one_blas_thread else {})}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"measurement {args} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], units: int) -> None:
    gib = 2**30
    print(f"\nOne set, float32, {units} units, 1 draw, generic DataArray path, threaded scheduler")
    print("| images | BLAS threads | time | Gram floor* | time / floor | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['blas']} | {r['seconds']:.1f} s | {r['floor']:.2f} s | "
              f"{r['seconds'] / r['floor']:.2f}x | {r['peak'] / gib:.2f} GiB |")
    rates = ", ".join(f"{r['rate'] / 1e9:.0f}" for r in rows)
    print(f"*N^2 m / 2 multiply-adds at the machine's float32 GEMM rate measured in the same process, before and "
          f"after ({rates} G/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,5000,10000,20000", help="images per set, comma-separated")
    parser.add_argument("--units", type=int, default=10000, help="units of the layer (all analysed, one draw)")
    parser.add_argument("--chunk", type=int, default=500, help="images per chunk of the time runs' data")
    parser.add_argument("--memory-images", type=int, default=20000, help="images of the memory run")
    parser.add_argument("--memory-layer", type=int, default=200000, help="units of the memory run's layer")
    parser.add_argument("--memory", default=None, help="cnndiff_xr.analysis-memory for the memory run")
    parser.add_argument("--no-memory-run", action="store_true")
    parser.add_argument("--cluster", action="store_true", help="repeat the memory run on the embedded cluster")
    parser.add_argument("--blas", choices=["default", "one", "both"], default="both",
                        help="BLAS threads of the time runs: its default (one per core, per call), one per dask "
                             "thread (OPENBLAS_NUM_THREADS=1), or both")
    parser.add_argument("--_time", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_memory", choices=["threads", "cluster"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._time is not None:
        print(json.dumps(measure_time(args._time, args.units, args.chunk)))
        return
    if args._memory is not None:
        print(json.dumps(measure_memory(args.memory_images, args.memory_layer, 10000, 10, 64,
                                        args._memory == "cluster", args.memory)))
        return

    from common import machine_info

    print(machine_info(), flush=True)
    gib = 2**30
    rows = []
    modes = {"default": [False], "one": [True], "both": [False, True]}[args.blas]
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        for one in modes:
            r = child(["--_time", str(n), "--units", str(args.units), "--chunk", str(args.chunk)], one)
            r["blas"] = "1 per dask thread" if one else "default"
            rows.append(r)
            print(f"{n} images, BLAS threads {r['blas']}: {r['seconds']:.1f} s, floor {r['floor']:.2f} s "
                  f"({r['rate'] / 1e9:.0f} G/s), {r['seconds'] / r['floor']:.2f}x, peak RSS {r['peak'] / gib:.2f} GiB",
                  flush=True)
    if rows:
        print_table(rows, args.units)
    if args.no_memory_run:
        return
    extra = [] if args.memory is None else ["--memory", args.memory]
    base = ["--memory-images", str(args.memory_images), "--memory-layer", str(args.memory_layer), *extra]
    for mode in ["threads", *(["cluster"] if args.cluster else [])]:
        r = child(["--_memory", mode, *base])
        print(f"\nMemory run ({mode}): {r['n']:,} images x 10 draws of 10,000 units from a {r['layer_units']:,}-unit "
              f"layer: {r['seconds']:.1f} s ({r['seconds'] / r['floor']:.2f}x its Gram floor of {r['floor']:.1f} s at "
              f"{r['rate'] / 1e9:.0f} G/s), budget {r['budget'] / gib:.2f} GiB -> {r['groups']} draw groups "
              f"(reads of the layer), peak RSS {r['peak'] / gib:.2f} GiB", flush=True)
        if mode == "cluster":
            peaks = ", ".join(f"{p / gib:.2f}" for p in r["worker_peaks"])
            limits = ", ".join(f"{p / gib:.2f}" for p in r["worker_limits"])
            print(f"  worker peak RSS {peaks} GiB; worker memory limits {limits} GiB")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
