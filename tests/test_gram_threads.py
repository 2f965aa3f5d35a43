"""Gram products in pool threads use one BLAS thread (the pool already runs one product per core)."""

from __future__ import annotations

import threading

import numpy as np
from threadpoolctl import threadpool_info

from cnndiff_xr.analysis.gram import Shift, gram, one_blas_thread_in_pools


def blas_threads() -> list[int]:
    """Threads of numpy's BLAS, the one the Gram products use (scipy's own BLAS, loaded later by other tests, is
    another library that the limit, taken when the first product ran, need not cover)."""
    return [lib["num_threads"] for lib in threadpool_info()
            if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]


def test_one_blas_thread_in_a_fresh_interpreter():
    """The test below in a fresh interpreter: in a full test run, other tests' threads and libraries change the
    process's BLAS state (seen in CI: 2 threads inside the limit)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_gram_threads as t; "
            "t.check_one_blas_thread_while_any_pool_thread_computes_then_restored()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def check_one_blas_thread_while_any_pool_thread_computes_then_restored() -> None:
    before = blas_threads()
    assert len(before) == 1, threadpool_info()  # numpy's BLAS, seen by threadpoolctl
    seen: dict[str, list[int]] = {}
    first_in, second_in, first_may_leave = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with one_blas_thread_in_pools():
            seen["first"] = blas_threads()
            first_in.set()
            first_may_leave.wait(10)
        seen["first left, second still in"] = blas_threads()
        second_in.set()

    def second() -> None:
        first_in.wait(10)
        with one_blas_thread_in_pools():
            first_may_leave.set()
            second_in.wait(10)
            seen["second"] = blas_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["first"] == [1] * len(before)
    assert seen["first left, second still in"] == [1] * len(before)  # the count is per process: held until the last
    assert seen["second"] == [1] * len(before)
    assert blas_threads() == before  # restored


def test_the_main_thread_keeps_every_blas_thread_and_numbers_do_not_change():
    before = blas_threads()
    with one_blas_thread_in_pools():
        assert blas_threads() == before
    rng = np.random.default_rng(0)
    x = rng.random((300, 5000), dtype=np.float32)
    main = gram(x, None, Shift(0.0, None))
    out: list[tuple[np.ndarray, ...]] = []
    t = threading.Thread(target=lambda: out.append(gram(x, None, Shift(0.0, None))))
    t.start()
    t.join()
    np.testing.assert_allclose(out[0][0], main[0], rtol=1e-6)  # BLAS may sum in another order with other threads
    np.testing.assert_allclose(main[0], x.astype(np.float64) @ x.T.astype(np.float64), rtol=1e-5)
