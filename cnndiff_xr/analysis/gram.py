"""Numpy kernels of the distances: row statistics, shifted Gram products, their error bounds, and the conversions
from Gram sums to distances.

Every distance is computed from a Gram block ``G = Y_a @ Y_b.T`` of shifted vectors ``Y = X - shift`` (see
:class:`Shift`) and per-row statistics, never from per-pair difference vectors. Which shift, which conversion and
which rows are degenerate is the distance's :class:`~cnndiff_xr.analysis.metrics.DistanceSpec`; this module holds
the arithmetic they share and knows nothing of norms or metrics.

Precision. Gram products run in float32 (BLAS ``sgemm``, about twice the speed of float64 and half the memory
traffic) on blocks of :data:`GRAM_BLOCK_COLUMNS` units whose results are summed in float64; an error bound
(:func:`euclidean_error_bound`, :func:`similarity_error_bound`) bounds each distance's resulting error, and
:func:`accurate_gram` recomputes in float64 the pairs whose bound exceeds :data:`DISTANCE_RTOL` (nearly identical
images). Every distance is therefore within ``DISTANCE_RTOL`` (1e-5) relative of the float64 computation; measured
errors are about 1e-8.

Threads. A Gram product run by a pool of threads (dask's threaded scheduler, a distributed worker with several
threads) uses one BLAS thread (:func:`one_blas_thread_in_pools`): the pool already runs one product per core, and
BLAS's own threads on top of that (one per core per product) oversubscribe the cores -- measured at 20,000 images:
2.43x the Gram floor with BLAS's default threads, 1.96x with one (``benchmarks/RESULTS.md``). A product on the main
thread (the synchronous scheduler) keeps every BLAS thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .float16 import half_to_float

__all__ = [
    "DISTANCE_RTOL",
    "GRAM_BLOCK_COLUMNS",
    "STRIP_BYTES",
    "ErrorBound",
    "Shift",
    "accurate_gram",
    "one_blas_thread_in_pools",
    "cosine_similarity",
    "euclidean_distances",
    "euclidean_error_bound",
    "euclidean_median",
    "exact_gram",
    "gram",
    "one_pass",
    "one_pass_gram",
    "partition_median",
    "pooled_scale",
    "row_stats",
    "similarity_error_bound",
    "strip_rows",
    "symmetrise",
    "unsure_pairs",
    "upper_triangle",
]

#: columns per float32 Gram product; the float32 rounding error of one block's dot products
#: grows like sqrt(block), and blocks are summed in float64 (see :func:`gram`)
GRAM_BLOCK_COLUMNS = 4096
#: a distance whose float32 error bound exceeds this relative error is recomputed from a float64 Gram product
DISTANCE_RTOL = 1e-5
#: bytes of float64 per strip of the elementwise passes over a Gram block (error bounds, distances, median
#: windows): a strip's temporaries stay in the core's cache, where a whole block's would each stream through memory
STRIP_BYTES = 2**19
#: unit roundoff of float32
_U32 = 2.0**-24
#: :func:`euclidean_median` takes a pair's distance to lie within this many of its error bounds of its float32
#: value when it decides on which side of the median the pair is (the bound is probabilistic, Higham & Mary's, and
#: the measured errors sit 25-60x below it)
SIDE_MARGIN = 4.0

#: rows of the per-row statistics array of :func:`row_stats`
ROW_SUM, ROW_CSS, ROW_SQUARES, ROW_MIN, ROW_MAX = range(5)

#: ``bound(G, norms_a, norms_b)``: bound on the relative error of each distance computed from a float32 Gram block
ErrorBound = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- row statistics
def row_stats(x: np.ndarray) -> np.ndarray:
    """Per-row sum, centred sum of squares, sum of squares, min and max: ``(5, n)`` float64.

    float64 data: single pass, ``css = q - s^2/m``, recomputed two-pass for the rows where
    that would cancel (mean far above the spread). float16/float32 data, without a float64
    copy: sums by numpy's pairwise summation (error ``O(u log m)``); the centred sum of
    squares two-pass, as float32 dot products of at most :data:`GRAM_BLOCK_COLUMNS` terms of
    the row minus its mean, added in float64 (a single-pass ``q - s^2/m`` in float32 would
    lose ``(mean/spread)^2`` of its precision); ``q = css + s^2/m``. Constant rows get
    ``css = 0`` exactly.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float64)
    n, m = x.shape
    low, high = x.min(axis=1).astype(np.float64), x.max(axis=1).astype(np.float64)
    if x.dtype == np.float64:
        s = x.sum(axis=1)
        q = np.einsum("ij,ij->i", x, x)
        css = np.maximum(q - s * s / m, 0.0)
        for i in np.flatnonzero(css <= 1e-6 * q):
            centred = x[i] - s[i] / m
            css[i] = centred @ centred
    else:
        s = x.sum(axis=1, dtype=np.float32).astype(np.float64)
        mean = (s / m).astype(np.float32)[:, None]
        css = np.zeros(n)
        width = min(m, GRAM_BLOCK_COLUMNS)
        buf = np.empty((n, width), np.float32)
        for lo in range(0, m, width):
            centred = np.subtract(x[:, lo : lo + width], mean, out=buf[:, : min(width, m - lo)], dtype=np.float32)
            css += np.einsum("ij,ij->i", centred, centred)
        q = css + s * s / m
    css[low == high] = 0.0
    return np.stack([s, css, q, low, high])


def pooled_scale(stats: np.ndarray, m: int) -> tuple[float, float]:
    """Mean and SD (ddof=0) of all values of the rows described by ``stats``.

    Pooled from within-row centred sums of squares plus the spread of row means, which
    avoids the cancellation of ``E[x^2] - E[x]^2``.
    """
    n = stats.shape[1]
    row_means = stats[ROW_SUM] / m
    mean = float(row_means.sum() / n)  # ndarray.mean's value, bit for bit, without its per-call overhead
    var = (stats[ROW_CSS].sum() + m * np.sum((row_means - mean) ** 2)) / (n * m)
    return mean, float(np.sqrt(max(var, 0.0)))


# --------------------------------------------------------------------------- shifted Gram products
@dataclass(frozen=True)
class Shift:
    """What is subtracted from a row block before its Gram product: ``x - common - rows[:, None]``.

    Every distance here is unchanged by some shift, and the right shift removes the large
    common part of the vectors, so that ``n_i + n_j - 2 G_ij`` (or ``1 - G_ij / sqrt(n_i n_j)``)
    does not cancel and float32 products are accurate: Euclidean distances take any vector
    common to all rows -- the centroid of the set is the best, it leaves each vector's
    deviation from the set's mean image; metrics of row-centred vectors (correlation,
    ``norm="image"``) subtract each row's mean; cosine under ``"layer"`` the layer's mean
    (a common scalar); raw cosine nothing. Each distance's spec says which.
    """

    common: np.ndarray | float = 0.0  # (m,) or a scalar
    rows: np.ndarray | None = None  # (rows,)

    def take_rows(self, index: np.ndarray) -> Shift:
        return Shift(self.common, None if self.rows is None else self.rows[index])

    def for_dtype(self, dtype: np.dtype) -> Shift:
        """The shift actually applied to data of ``dtype``, the same in the float32 and the
        float64 products. float64 data are shifted in float64 (a large common part cancels
        before rounding). Other data: a common vector and row offsets are rounded to
        float32 and subtracted in float32 (exact for any common vector under Euclidean
        distances; second order for row means); a common scalar (cosine under "layer", where
        its rounding would be first order) stays float64 and is subtracted in float64."""
        if dtype == np.float64:
            return self
        common = self.common if np.ndim(self.common) == 0 else _rounded(np.asarray(self.common))
        return Shift(common, None if self.rows is None else _rounded(self.rows))

    def apply(self, x: np.ndarray, cols: slice, out: np.ndarray) -> np.ndarray:
        """``out[:] = x[:, cols] - shift``: into a float32 ``out`` as :meth:`for_dtype` says,
        into a float64 ``out`` in float64 (the exact products). float16 ``x`` is converted into a float32 ``out``
        first (exact; :func:`~cnndiff_xr.analysis.float16.half_to_float`), then shifted there, so a float16 row
        block is converted one cache-sized column block at a time, never as a whole float32 copy: the same values
        as shifting its float32 conversion."""
        scalar = np.ndim(self.common) == 0
        common = self.common if scalar else np.asarray(self.common)[cols]
        if x.dtype == np.float16 and out.dtype == np.float32:
            x, cols = half_to_float(x[:, cols], out=out), slice(None)
        in_float64 = x.dtype == np.float64 or out.dtype == np.float64
        if self.rows is None:
            work = np.float64 if in_float64 or (scalar and common != 0) else np.float32
            np.subtract(x[:, cols], common, out=out, dtype=work, casting="same_kind")
        elif in_float64:
            out[...] = x[:, cols] - common - self.rows[:, None]
        else:
            np.subtract(x[:, cols], common, out=out, dtype=np.float32)
            out -= self.rows[:, None].astype(np.float32)
        return out


def _rounded(v: np.ndarray) -> np.ndarray:
    """``v`` rounded to float32, held in float64."""
    return np.asarray(v, np.float32).astype(np.float64)


class _BlasLimit:
    """The process's BLAS thread count held at one while any pool thread computes a Gram product.

    BLAS libraries keep one thread count per process, not per thread, so the limit is reference-counted: set by the
    first product to start, restored (to what it was) by the last to finish."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limiter: Any = None
        self._controller: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if threading.current_thread() is threading.main_thread():
            yield
            return
        with self._lock:
            if self._users == 0:
                if self._controller is None:
                    from threadpoolctl import ThreadpoolController

                    self._controller = ThreadpoolController()
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._limiter.restore_original_limits()
                    self._limiter = None


#: ``with one_blas_thread_in_pools():`` -- one BLAS thread in a pool thread, all of them on the main thread
one_blas_thread_in_pools = _BlasLimit()


def gram(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None = None,
         *, with_sums: bool = False) -> tuple[np.ndarray, ...]:
    """The Gram block of :func:`_gram`; one BLAS thread when a pool thread asks (:func:`one_blas_thread_in_pools`)."""
    with one_blas_thread_in_pools():
        return _gram(xa, xb, shift_a, shift_b, with_sums=with_sums)


def _gram(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None = None,
          *, with_sums: bool = False) -> tuple[np.ndarray, ...]:
    """Gram block of shifted rows, float32 products summed in float64.

    ``xb=None``: the block with itself (a symmetric rank-k update). Columns are taken
    :data:`GRAM_BLOCK_COLUMNS` at a time: each block is shifted into a float32 buffer that
    stays in cache, multiplied by BLAS ``sgemm``/``ssyrk`` and added to a float64
    accumulator, so a float32 rounding error stays about ``u * sqrt(block)`` of the sum of
    the terms' magnitudes (Higham & Mary's probabilistic bound) and never grows with the
    number of units. The error bounds turn that into a bound per distance.

    Returns ``(G, norms_a, norms_b)`` (squared norms of the shifted rows) and, with
    ``with_sums``, the column sums of the shifted ``xa`` rows.
    """
    shift_a = shift_a.for_dtype(xa.dtype)
    other = None if xb is None else (xb, _required(shift_b).for_dtype(xb.dtype))
    na, m = xa.shape
    nb = na if other is None else other[0].shape[0]
    g = np.empty((na, nb))
    part = np.empty((na, nb), np.float32)  # one product buffer for every column block
    norms_a, norms_b, sums = np.zeros(na), np.zeros(nb), np.zeros(m if with_sums else 0)
    width = min(m, GRAM_BLOCK_COLUMNS)
    buf_a = np.empty((na, width), np.float32)
    buf_b = None if other is None else np.empty((nb, width), np.float32)
    ones = np.ones(na, np.float32) if with_sums else None
    for lo in range(0, m, width):
        cols = slice(lo, min(lo + width, m))
        ya = shift_a.apply(xa, cols, buf_a[:, : cols.stop - lo])
        if other is None or buf_b is None:
            np.matmul(ya, ya.T, out=part)  # numpy runs x @ x.T as ssyrk
            norms_a += np.diagonal(part)
        else:
            yb = other[1].apply(other[0], cols, buf_b[:, : cols.stop - lo])
            np.matmul(ya, yb.T, out=part)
            norms_a += np.einsum("ij,ij->i", ya, ya)
            norms_b += np.einsum("ij,ij->i", yb, yb)
        if lo == 0:
            g[...] = part  # the accumulator starts as the first block's product (no pass over zeros)
        else:
            g += part
        if ones is not None:
            sums[cols] = ones @ ya  # BLAS sgemv: ~3x faster than ya.sum(axis=0)
    if other is None:
        norms_b = norms_a
    return (g, norms_a, norms_b, sums) if with_sums else (g, norms_a, norms_b)


def _required(shift: Shift | None) -> Shift:
    if shift is None:
        raise ValueError("a Gram block of two row blocks needs the shift of each")
    return shift


def exact_gram(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`gram` in float64 throughout (the fallback for ill-conditioned pairs)."""

    def shifted(x: np.ndarray, shift: Shift) -> np.ndarray:
        return shift.for_dtype(x.dtype).apply(x, slice(None), np.empty(x.shape, np.float64))

    ya = shifted(xa, shift_a)
    yb = ya if xb is None else shifted(xb, _required(shift_b))
    g = ya @ yb.T
    norms_a = np.einsum("ij,ij->i", ya, ya)
    return g, norms_a, norms_a if xb is None else np.einsum("ij,ij->i", yb, yb)


# --------------------------------------------------------------------------- error bounds
def _eps() -> float:
    """Relative error of one shifted float32 block product (read at call time: tests shrink the blocks)."""
    return _U32 * (np.sqrt(GRAM_BLOCK_COLUMNS) + 2)


def euclidean_error_bound(g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray) -> np.ndarray:
    """Bound on the relative error of each distance ``sqrt(n_i + n_j - 2 G_ij)`` from a :func:`gram` block.

    Each float32 block product of length ``k`` errs by at most about
    ``u sqrt(k) sum_l |a_l b_l|`` (Higham & Mary 2019, probabilistic), the float32 shift
    adds ``u`` per term, and ``sum_l |a_l b_l| <= ||a|| ||b||``: so ``G_ij`` is within
    ``eps sqrt(n_i n_j)`` and ``n_i`` within ``eps n_i``, with ``eps = u (sqrt(k) + 2)``.
    ``D^2 = n_i + n_j - 2 G_ij`` then errs by at most ``eps (sqrt(n_i) + sqrt(n_j))^2``,
    a relative error of half that over ``D^2`` for ``D``. On correlated ReLU-like rows
    the measured errors sit 25-60x below this bound (the tests assert they stay
    below it). It is large only where the distance is tiny against the norms -- near-duplicate images.
    """
    ra, rb = np.sqrt(np.maximum(norms_a, 0.0)), np.sqrt(np.maximum(norms_b, 0.0))
    return _euclidean_bound(_squared_distances(g, norms_a, norms_b), ra[:, None], rb[None, :])


def _euclidean_bound(d2: np.ndarray, root_a: np.ndarray, root_b: np.ndarray) -> np.ndarray:
    """:func:`euclidean_error_bound` from ``d^2`` and the root norms, elementwise (whole blocks or chosen pairs)."""
    eps = _eps()
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = (root_a + root_b) ** 2
        bound = np.where(d2 > 0, eps * spread / (2.0 * d2), np.inf)
        bound[spread == 0] = 0.0  # both shifted vectors exactly zero: distance exactly 0
    return bound


def similarity_error_bound(g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray) -> np.ndarray:
    """Bound on the relative error of each distance that is a function of ``1 - G_ij / sqrt(n_i n_j)``.

    The similarity is within ``2 eps`` (see :func:`euclidean_error_bound`), relative to ``1 - sim`` for the
    distance: large only where the shifted vectors are nearly parallel.
    """
    eps = _eps()
    ra, rb = np.sqrt(np.maximum(norms_a, 0.0)), np.sqrt(np.maximum(norms_b, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        den = ra[:, None] * rb[None, :]
        gap = 1.0 - g / den
        bound = np.where(gap > 0, 2.0 * eps / gap, np.inf)
        bound[den == 0] = 0.0  # degenerate rows: their distances are set by convention
    return bound


def strip_rows(n_columns: int) -> int:
    """Rows per strip of an elementwise pass over a Gram block of ``n_columns`` columns: :data:`STRIP_BYTES` of
    float64."""
    return max(1, STRIP_BYTES // (8 * max(1, n_columns)))


def unsure_pairs(g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray, bound: ErrorBound, *, same: bool
                 ) -> np.ndarray:
    """``bound(g, norms_a, norms_b) > DISTANCE_RTOL`` (the diagonal excluded when ``same``: distance 0 by
    definition), strip by strip: the bound's temporaries stay in cache instead of each streaming a whole block
    through memory, and a strip without a nearly parallel pair skips the bound. Every bound is elementwise, so the
    mask is the same as the whole block's.

    A bound must stay below :data:`DISTANCE_RTOL` wherever the cosine of the shifted vectors is at most
    ``1 - 2 eps / DISTANCE_RTOL`` (``eps`` of :func:`euclidean_error_bound`); both bounds here do (near-duplicate
    images are what they catch), and a new one must too, or this skips pairs it would flag."""
    unsure = np.zeros(g.shape, dtype=bool)
    # both bounds exceed DISTANCE_RTOL only where the shifted vectors are nearly parallel: cosine above
    # 1 - 2 eps / DISTANCE_RTOL (the similarity bound's threshold; the Euclidean bound's, 1 - eps / DISTANCE_RTOL,
    # is higher), so a strip without such a pair skips the bound (a margin covers the rounding of either test)
    parallel = 1.0 - 2.0 * _eps() / DISTANCE_RTOL - 1e-6
    scaled_a = np.sqrt(np.maximum(norms_a, 0.0)) * parallel
    root_b = np.sqrt(np.maximum(norms_b, 0.0))
    step = strip_rows(g.shape[1])
    for lo in range(0, g.shape[0], step):
        hi = min(lo + step, g.shape[0])
        near = np.greater(g[lo:hi], np.multiply.outer(scaled_a[lo:hi], root_b))
        if same:
            np.fill_diagonal(near[:, lo:hi], False)  # a vector with itself: distance 0 by definition
        if not near.any():
            continue
        np.greater(bound(g[lo:hi], norms_a[lo:hi], norms_b), DISTANCE_RTOL, out=unsure[lo:hi])
    if same:
        np.fill_diagonal(unsure, False)
    return unsure


def accurate_gram(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None,
                  bound: ErrorBound, *, with_sums: bool = False) -> tuple[np.ndarray, ...]:
    """:func:`gram`, with the pairs whose error ``bound`` exceeds :data:`DISTANCE_RTOL`
    recomputed in float64 (only the rows involved), so every distance is within that
    relative error of a float64 computation."""
    out = gram(xa, xb, shift_a, shift_b, with_sums=with_sums)
    g, norms_a, norms_b = out[:3]
    unsure = unsure_pairs(g, norms_a, norms_b, bound, same=xb is None)
    if unsure.any():
        g, norms_a, norms_b = _redo_in_float64(xa, xb, shift_a, shift_b, g, norms_a, norms_b, unsure)
    return (g, norms_a, norms_b, *out[3:])


def _redo_in_float64(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None,
                     g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray, unsure: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if xb is None:
        rows = np.flatnonzero(unsure.any(axis=0) | unsure.any(axis=1))
        sub, sub_norms, _ = exact_gram(xa[rows], None, shift_a.take_rows(rows))
        g[np.ix_(rows, rows)] = sub
        norms_a[rows] = sub_norms
        return g, norms_a, norms_a
    rows_a, rows_b = np.flatnonzero(unsure.any(axis=1)), np.flatnonzero(unsure.any(axis=0))
    sub, sub_a, sub_b = exact_gram(xa[rows_a], xb[rows_b], shift_a.take_rows(rows_a),
                                   _required(shift_b).take_rows(rows_b))
    g[np.ix_(rows_a, rows_b)] = sub
    norms_a, norms_b = norms_a.copy(), norms_b.copy()
    norms_a[rows_a], norms_b[rows_b] = sub_a, sub_b
    return g, norms_a, norms_b


def upper_triangle(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.triu_indices(size, 1)``, kept per size (read-only): every draw of a set takes the same one."""
    if size not in _TRIANGLES:
        pair = np.triu_indices(size, 1)
        for index in pair:
            index.flags.writeable = False
        _TRIANGLES[size] = pair
    return _TRIANGLES[size]


_TRIANGLES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def partition_median(values: np.ndarray) -> float:
    """``np.median`` of finite values, bit for bit, without its checks and copies (per draw of many small sets)."""
    k = values.size // 2
    if values.size % 2:
        return float(np.partition(values, k)[k])
    low, high = np.partition(values, (k - 1, k))[k - 1 : k + 1]
    return float(0.5 * (low + high))


def euclidean_median(x: np.ndarray, shift: Shift, g: np.ndarray, norms: np.ndarray, scale: float) -> float:
    """The median of the Euclidean distances (:func:`euclidean_distances` with ``scale``) of the pairs ``i < j`` of
    the rows of ``x``, as :func:`partition_median` of :func:`accurate_gram`'s distances would give it, redoing in
    float64 only the pairs that can decide it.

    ``g``, ``norms``: the symmetric :func:`gram` block of ``x`` with ``shift`` (float32 products, not redone). The
    distance is a non-decreasing function of ``d^2 = n_i + n_j - 2 G_ij``, so the middle pairs are found among the
    ``d^2`` and only they are turned into distances (no pass of square roots over every pair). A pair whose
    :func:`euclidean_error_bound` exceeds :data:`DISTANCE_RTOL` (nearly identical images) has its ``d^2`` within
    ``SIDE_MARGIN`` times that bound's absolute form (``eps (sqrt(n_i) + sqrt(n_j))^2``, exact for the Euclidean
    form). If that interval is below every possible value of the lower middle rank, or above every possible value of
    the upper one (each found by taking all such pairs at their interval's low, or high, end), the pair cannot be a
    middle value and any value on its side gives the same median: it keeps its interval's end. The rest (the pairs
    that can decide the median; usually none, as near-duplicates are far below it), and the pairs at ``d^2 <= 0`` in
    float32, whose bound is infinite, are recomputed from a float64 Gram product of their rows, as
    :func:`accurate_gram` does. So the median is that of distances each within ``DISTANCE_RTOL`` of float64, at the
    cost of the float32 products; a block without such pairs gives :func:`gram`'s median unchanged.
    """
    upper = upper_triangle(g.shape[0])
    if not upper[0].size:
        return float("nan")
    squares = _squared_distances(g, norms, norms)[upper]  # as euclidean_distances and the bound compute them
    k_low, k_high = (squares.size - 1) // 2, squares.size // 2
    # a pair whose bound exceeds DISTANCE_RTOL has d^2 < eps (r_i + r_j)^2 / (2 DISTANCE_RTOL) <= this (r: root norm)
    most = _eps() * 4.0 * max(float(norms.max()), 0.0) / (2.0 * DISTANCE_RTOL) * (1.0 + 1e-6)
    candidates = np.flatnonzero(squares <= most)
    if candidates.size:
        i, j = upper[0][candidates], upper[1][candidates]
        root = np.sqrt(np.maximum(norms, 0.0))
        rel = _euclidean_bound(squares[candidates], root[i], root[j])  # the block's bound at these pairs, bit for bit
        unsure = rel > DISTANCE_RTOL
        candidates, rel, i, j = candidates[unsure], rel[unsure], i[unsure], j[unsure]
    if candidates.size:
        near = squares[candidates]
        with np.errstate(invalid="ignore", over="ignore"):
            width = SIDE_MARGIN * 2.0 * rel * near  # 2 rel d^2: the bound's absolute error of d^2, eps (r_i + r_j)^2
        known = np.isfinite(width)
        low = np.where(known, near - width, -np.inf)
        high = np.where(known, near + width, np.inf)
        ends = squares.copy()
        ends[candidates] = low
        floor = np.partition(ends, k_low)[k_low]  # at most the lower middle value, whatever the unsure pairs' values
        ends[candidates] = high
        ceiling = np.partition(ends, k_high)[k_high]  # at least the upper middle value
        squares[candidates] = np.where(high < floor, high, low)  # below: a value still below; above: still above
        deciding = (high >= floor) & (low <= ceiling)
        if deciding.any():
            i, j = i[deciding], j[deciding]
            rows = np.union1d(i, j)
            sub, sub_norms, _ = exact_gram(x[rows], None, shift.take_rows(rows))
            a, b = np.searchsorted(rows, i), np.searchsorted(rows, j)
            squares[candidates[deciding]] = sub_norms[a] + sub_norms[b] - 2.0 * sub[a, b]
    # the middle values as distances, exactly as euclidean_distances (+0.0, as the distance specs) gives them
    low_d, high_d = _distances_from_squares(np.partition(squares, (k_low, k_high))[[k_low, k_high]], scale) + 0.0
    return float(low_d) if squares.size % 2 else float(0.5 * (low_d + high_d))


# --------------------------------------------------------------------------- Gram sums -> distances
def euclidean_distances(g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray, scale: float) -> np.ndarray:
    """``sqrt((n_i + n_j - 2 G_ij) / scale)``; all zero when ``scale`` is 0 (every sampled value equal)."""
    return _distances_from_squares(_squared_distances(g, norms_a, norms_b), scale)


def _squared_distances(g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray) -> np.ndarray:
    """``n_i + n_j - 2 G_ij`` (a new array): the one expression the distances, their bound and the median share."""
    out: np.ndarray = norms_a[:, None] + norms_b[None, :] - 2.0 * g
    return out


def _distances_from_squares(d2: np.ndarray, scale: float) -> np.ndarray:
    """``sqrt(max(d2, 0) / scale)``, clipping ``d2`` in place; all zero when ``scale`` is 0."""
    np.maximum(d2, 0.0, out=d2)
    if scale == 0:  # all sampled values equal: identical vectors
        return np.zeros_like(d2)
    out: np.ndarray = np.sqrt(d2 / scale)
    return out


def cosine_similarity(g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray, degenerate_a: np.ndarray,
                      degenerate_b: np.ndarray) -> np.ndarray:
    """``G_ij / sqrt(n_i n_j)`` clipped to [-1, 1]: the cosine similarity of the shifted vectors, which are the
    normalised ones up to a positive factor per row; 0 for the degenerate rows (their normalised vector is zero)."""
    den = np.sqrt(np.outer(norms_a, norms_b))
    sim = np.divide(g, den, out=np.zeros_like(g), where=den > 0)
    np.clip(sim, -1.0, 1.0, out=sim)
    sim[degenerate_a[:, None] | degenerate_b[None, :]] = 0.0
    return sim


def symmetrise(d: np.ndarray) -> np.ndarray:
    """The symmetric matrix of ``d``'s strict upper triangle (zero diagonal)."""
    upper = np.triu(d, 1)
    out: np.ndarray = upper + upper.T
    return out


# --------------------------------------------------------------------------- one pass
def one_pass_gram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Gram block of the rows of ``x`` for distances from squared norms, with the SD of all values of ``x`` from
    the same pass, without :func:`row_stats`: ``(G, norms, sd)``; ``None`` when some value is not finite.

    Shift by an approximate centroid ``c`` (any common vector keeps the distances; a few
    rows' mean removes the common part), one Gram product, and the SD from the same
    pass: shifted norms and column sums of ``y = x - c``, as
    ``sum (x - mu)^2 = sum_i |y_i|^2 + 2 (c - mu) . sum_i y_i + n |c - mu|^2``.
    """
    result = one_pass(x, redo=True)
    return None if result is None else result[:3]


def one_pass(x: np.ndarray, *, redo: bool) -> tuple[np.ndarray, np.ndarray, float, Shift] | None:
    """:func:`one_pass_gram`, with the shift it applied: ``(G, norms, sd, shift)``. ``redo=False``: the float32
    products as they are (no float64 redo of nearly identical rows, :func:`euclidean_median` does it where
    the median needs it); the SD then comes from the float32 norms. ``x`` may be float16 (converted column block by
    column block in the products, :meth:`Shift.apply`): the same numbers as its float32 conversion."""
    n, m = x.shape
    probe = x[:: max(1, n // 16)][:16]  # a view: up to 16 rows spread over the matrix
    if probe.dtype == np.float16:
        probe = half_to_float(probe)  # numpy's cast inside a reduction is several times slower and holds the GIL
    # any common vector will do, and it is rounded to float32 for float32 data anyway: summed in float32
    centroid = np.add.reduce(probe, axis=0, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    centroid /= probe.shape[0]  # probe.mean, without its per-call overhead (once per draw)
    shift = Shift(common=centroid.astype(np.float64)).for_dtype(x.dtype)
    if redo:
        g, norms, _, column_sums = accurate_gram(x, None, shift, None, euclidean_error_bound, with_sums=True)
    else:
        g, norms, _, column_sums = gram(x, None, shift, with_sums=True)
    if not (np.all(np.isfinite(norms)) and np.all(np.isfinite(column_sums))):
        return None
    offset = np.asarray(shift.common)
    mean = (column_sums.sum() / n + offset.sum()) / m
    dev = offset - mean
    sd = float(np.sqrt(max((norms.sum() + 2.0 * dev @ column_sums + n * (dev @ dev)) / (n * m), 0.0)))
    return g, norms, sd, shift
