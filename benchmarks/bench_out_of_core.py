"""Out-of-core analysis: a store at least 5x the memory of the cluster's workers.

A VGG16 store (random weights, the seed's 21 layers, float16) of five equal white-noise sets is extracted first (on
an unlimited cluster: the model alone needs ~0.6 GB per worker). Then a LocalCluster whose workers have a hard
memory limit computes differentiation (200 and 10,000 units, 10 resamples) and filter means over one set (1x) and
over all five sets (5x), while a sampler records every worker's RSS. Reported: the store size vs total worker memory,
peak worker RSS vs the limit, worker deaths/spilling, and the time ratio 5x/1x (linear: ~5).

    python benchmarks/bench_out_of_core.py [--per-set 70] [--memory-limit 1GiB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info


class RssSampler:
    """Polls every worker's resident memory in the background; keeps the maximum."""

    def __init__(self, client, period: float = 0.25):
        self.client, self.period, self.peak = client, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                self.peak = max(self.peak, *rss.values())
            except Exception:
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes as parse

    return parse(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=70, help="images per set (5 sets)")
    parser.add_argument("--memory-limit", default="1GiB", help="memory limit of each analysis worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", default=None, help="reuse a store made by an earlier run")
    args = parser.parse_args()
    print(machine_info())
    import cnndiff_xr as cx
    from cnndiff_xr.extraction.cluster import get_client

    work = Path(tempfile.mkdtemp(prefix="cnndiff-bench-ooc-"))
    limit = parse_bytes(args.memory_limit)
    try:
        store = args.store or str(work / "big.zarr")
        if args.store is None:
            sets = {f"noise{k}": cx.images.white_noise(args.per_set, seed=k) for k in range(5)}
            t0 = time.perf_counter()
            cx.extract(sets, store=store, model="vgg16", weights=None, layers="seed", dtype="float16",
                       progress=True)
            print(f"extraction: {time.perf_counter() - t0:.0f} s")
        info = cx.store.info(store)
        total_limit = limit * args.workers
        print(f"store: {info['n_images']} images, {info['uncompressed_bytes'] / 2**30:.2f} GiB of activations "
              f"({info['disk_bytes'] / 2**30:.2f} GiB on disk) = {info['uncompressed_bytes'] / total_limit:.1f}x the "
              f"{args.workers} x {args.memory_limit} of worker memory")
        tree = cx.open_activations(store)
        sets = sorted(set(tree["set"].values))
        timings = {}
        with get_client(None, n_workers=args.workers, memory_limit=limit) as client:
            before = set(client.scheduler_info()["workers"])
            for label, chosen in (("1x", sets[:1]), ("5x", sets)):
                work_items = [cx.differentiation(tree, n_units=[200, 10000], resamples=10, sets=chosen, seed=0),
                              cx.filter_means(tree, sets=chosen)]
                with RssSampler(client) as sampler:
                    t0 = time.perf_counter()
                    client.compute(work_items, sync=True)
                    timings[label] = (time.perf_counter() - t0, sampler.peak)
            # a worker killed for exceeding its limit is restarted by its nanny under a new address
            workers = set(client.scheduler_info()["workers"])
            deaths = len(before - workers)
            spilled = client.run(lambda dask_worker: getattr(dask_worker.data, "spilled_total", None)
                                 if hasattr(dask_worker, "data") else None)
        for label, (seconds, peak) in timings.items():
            print(f"{label}: {seconds:.1f} s, peak worker RSS {peak / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB "
                  f"({peak / limit:.0%})")
        print(f"time 5x / 1x = {timings['5x'][0] / timings['1x'][0]:.2f} (linear: 5)")
        print(f"workers alive at the end: {len(workers)} of {args.workers}; worker restarts: {deaths}; "
              f"spilled bytes per worker: {spilled}")
    finally:
        if args.store is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
