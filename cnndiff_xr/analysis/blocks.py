"""Pairwise distances and RDMs from Gram matrices, on dask.

Every distance is computed from a Gram block ``G = X_a @ X_b.T`` of shifted vectors
(see :class:`Shift`: the set's centroid for Euclidean distances, so that nothing cancels)
and per-row statistics (sum, centred sum of squares, sum of squares, min, max), never
from per-pair difference vectors. Normalisations (DESIGN.md section 2):

* ``norm="layer"`` (default, the seed's): one mean and one SD (ddof=0, as ``np.std``)
  over the whole (images x sampled units) matrix of the analysed images, so
  ``D_ij = ||x_i - x_j|| / (sd * sqrt(m))``;
* ``norm="image"``: z-score each image's vector, so ``D_ij = sqrt(2 (1 - r_ij))``;
* ``norm="none"``: ``D_ij = ||x_i - x_j|| / sqrt(m)``.

Metrics: ``"euclidean"`` (divided by ``sqrt(m)``: the seed's "mean distance per
dimension"), ``"correlation"`` (``1 - r``, scipy's definition; unchanged by any of the
norms) and ``"cosine"`` (of the normalised vectors; equals correlation under "image").

Degenerate vectors. Where a normalised vector is undefined or zero -- a constant image
vector under ``norm="image"`` or ``metric="correlation"``, an all-zero vector under
cosine/"none", a vector equal to the layer mean under cosine/"layer" -- the default
``constant="raise"`` raises a ``ValueError`` naming the layer, set and images when the
statistics are computed. ``constant="zero"`` instead takes the normalised vector to be
zero (scikit-learn's convention for cosine): its similarity to every other image is 0,
so correlation/cosine distance 1, and euclidean/"image" distance 1 to a non-constant
image and 0 to another constant one. Under euclidean/"layer", a layer whose sampled
values are all equal (sd = 0) has every distance 0 (the vectors are identical); that is
exact, so it never raises. Non-finite activations always raise. Distances are never NaN.

Chunking. The units of every draw of a layer are gathered from each image chunk in one
task (one read of the chunk for all resamples and ``n_units`` values), then images are
regrouped into row blocks of at most ``block_size`` images; a task per pair of row
blocks computes the Gram blocks of all draws, so memory per task stays bounded whatever
the number of images.

Precision. Gram products run in float32 (BLAS ``sgemm``, about twice the speed of
float64 and half the memory traffic) on blocks of :data:`GRAM_BLOCK_COLUMNS` units whose
results are summed in float64; :func:`error_bound` bounds each distance's resulting
error, and the pairs whose bound exceeds :data:`DISTANCE_RTOL` (nearly identical images)
are recomputed in float64. Every distance is therefore within ``DISTANCE_RTOL``
(1e-5) relative of the float64 computation; measured errors are about 1e-8.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dask
import numpy as np
import xarray as xr
from dask.base import tokenize

from .draws import (
    UNIT_TYPES,
    Collection,
    DrawTable,
    GraphBuilder,
    LayerData,
    UnitPlan,
    UnitType,
    as_collection,
    block_keys,
    check_choice,
    check_count,
    check_n_units,
    completed_check,
    draw_table,
    make_plan,
    needs_unit_means,
    plan_for,
    sum_parts,
)

__all__ = ["NORMS", "METRICS", "CONSTANT_POLICIES", "pairwise_distances", "rdm"]

NORMS = ("layer", "image", "none")
METRICS = ("euclidean", "correlation", "cosine")
CONSTANT_POLICIES = ("raise", "zero")
Norm = Literal["layer", "image", "none"]
Metric = Literal["euclidean", "correlation", "cosine"]
ConstantPolicy = Literal["raise", "zero"]

#: target size of one gathered row block (images x union of sampled units)
ROW_BLOCK_BYTES = 64 * 2**20
MIN_BLOCK, MAX_BLOCK = 32, 2048
# rows of the per-row statistics array
_S, _CSS, _Q, _MIN, _MAX = range(5)


def check_options(norm: str, metric: str, constant: str) -> None:
    check_choice("norm", norm, NORMS)
    check_choice("metric", metric, METRICS)
    check_choice("constant", constant, CONSTANT_POLICIES)


# --------------------------------------------------------------------------- numpy kernels
#: columns per float32 Gram product; the float32 rounding error of one block's dot products
#: grows like sqrt(block), and blocks are summed in float64 (see :func:`gram`)
GRAM_BLOCK_COLUMNS = 4096
#: a distance whose float32 error bound (see :func:`error_bound`) exceeds this relative error
#: is recomputed from a float64 Gram product
DISTANCE_RTOL = 1e-5
#: unit roundoff of float32
_U32 = 2.0**-24


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
    row_means = stats[_S] / m
    mean = float(row_means.mean())
    var = (stats[_CSS].sum() + m * np.sum((row_means - mean) ** 2)) / (n * m)
    return mean, float(np.sqrt(max(var, 0.0)))


def degenerate_rows(stats: np.ndarray, m: int, norm: str, metric: str, mean: float, sd: float) -> np.ndarray:
    """Rows whose normalised vector is undefined or zero under ``(norm, metric)``."""
    constant = stats[_MIN] == stats[_MAX]
    if metric == "euclidean" and norm != "image":
        return np.zeros_like(constant)
    if metric == "correlation" or norm == "image":
        return constant
    if norm == "none":  # cosine of raw vectors: all-zero vectors
        return constant & (stats[_MAX] == 0)
    if sd == 0:  # cosine after layer z-scoring: every vector is zero
        return np.ones_like(constant)
    return constant & (stats[_S] / m == mean)


@dataclass(frozen=True)
class Shift:
    """What is subtracted from a row block before its Gram product: ``x - common - rows[:, None]``.

    Every distance here is unchanged by some shift, and the right shift removes the large
    common part of the vectors, so that ``n_i + n_j - 2 G_ij`` (or ``1 - G_ij / sqrt(n_i n_j)``)
    does not cancel and float32 products are accurate: Euclidean distances take any vector
    common to all rows -- the centroid of the set is the best, it leaves each vector's
    deviation from the set's mean image; metrics of row-centred vectors (correlation,
    ``norm="image"``) subtract each row's mean; cosine under ``"layer"`` the layer's mean
    (a common scalar); raw cosine nothing.
    """

    common: np.ndarray | float = 0.0  # (m,) or a scalar
    rows: np.ndarray | None = None  # (rows,)

    def take_rows(self, index: Any) -> Shift:
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

        def rounded(v: Any) -> Any:
            return None if v is None else np.asarray(v, np.float32).astype(np.float64)

        common = self.common if np.ndim(self.common) == 0 else rounded(self.common)
        return Shift(common, rounded(self.rows))

    def apply(self, x: np.ndarray, cols: slice, out: np.ndarray) -> np.ndarray:
        """``out[:] = x[:, cols] - shift``: into a float32 ``out`` as :meth:`for_dtype` says,
        into a float64 ``out`` in float64 (the exact products)."""
        scalar = np.ndim(self.common) == 0
        common = self.common if scalar else self.common[cols]
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


def choose_shift(stats: np.ndarray, m: int, norm: str, metric: str, mean: float, centroid: np.ndarray) -> Shift:
    """The :class:`Shift` of a row block under ``(norm, metric)``; see its doc."""
    if metric == "correlation" or norm == "image":
        return Shift(rows=stats[_S] / m)
    if metric == "euclidean":
        return Shift(common=np.asarray(centroid, np.float64))
    if metric == "cosine" and norm == "layer":
        return Shift(common=float(mean))
    return Shift()


def gram(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None = None,
         *, with_sums: bool = False) -> tuple[np.ndarray, ...]:
    """Gram block of shifted rows, float32 products summed in float64.

    ``xb=None``: the block with itself (a symmetric rank-k update). Columns are taken
    :data:`GRAM_BLOCK_COLUMNS` at a time: each block is shifted into a float32 buffer that
    stays in cache, multiplied by BLAS ``sgemm``/``ssyrk`` and added to a float64
    accumulator, so a float32 rounding error stays about ``u * sqrt(block)`` of the sum of
    the terms' magnitudes (Higham & Mary's probabilistic bound) and never grows with the
    number of units. :func:`error_bound` turns that into a bound per distance.

    Returns ``(G, norms_a, norms_b)`` (squared norms of the shifted rows) and, with
    ``with_sums``, the column sums of the shifted ``xa`` rows.
    """
    same = xb is None
    shift_a = shift_a.for_dtype(xa.dtype)
    shift_b = None if same else shift_b.for_dtype(xb.dtype)
    na, m = xa.shape
    nb = na if same else xb.shape[0]
    g = np.zeros((na, nb))
    norms_a, norms_b, sums = np.zeros(na), np.zeros(nb), np.zeros(m if with_sums else 0)
    width = min(m, GRAM_BLOCK_COLUMNS)
    buf_a = np.empty((na, width), np.float32)
    buf_b = None if same else np.empty((nb, width), np.float32)
    ones = np.ones(na, np.float32) if with_sums else None
    for lo in range(0, m, width):
        cols = slice(lo, min(lo + width, m))
        ya = shift_a.apply(xa, cols, buf_a[:, : cols.stop - lo])
        if same:
            part = ya @ ya.T  # numpy runs x @ x.T as ssyrk
            norms_a += np.diagonal(part)
        else:
            yb = shift_b.apply(xb, cols, buf_b[:, : cols.stop - lo])
            part = ya @ yb.T
            norms_a += np.einsum("ij,ij->i", ya, ya)
            norms_b += np.einsum("ij,ij->i", yb, yb)
        g += part
        if with_sums:
            sums[cols] = ones @ ya  # BLAS sgemv: ~3x faster than ya.sum(axis=0)
    if same:
        norms_b = norms_a
    return (g, norms_a, norms_b, sums) if with_sums else (g, norms_a, norms_b)


def exact_gram(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`gram` in float64 throughout (the fallback for ill-conditioned pairs)."""

    def shifted(x, shift):
        return shift.for_dtype(x.dtype).apply(x, slice(None), np.empty(x.shape, np.float64))

    ya = shifted(xa, shift_a)
    yb = ya if xb is None else shifted(xb, shift_b)
    g = ya @ yb.T
    norms_a = np.einsum("ij,ij->i", ya, ya)
    return g, norms_a, norms_a if xb is None else np.einsum("ij,ij->i", yb, yb)


def error_bound(g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray, metric: str, norm: str) -> np.ndarray:
    """Bound on the relative error of each distance computed from a :func:`gram` block.

    Each float32 block product of length ``k`` errs by at most about
    ``u sqrt(k) sum_l |a_l b_l|`` (Higham & Mary 2019, probabilistic), the float32 shift
    adds ``u`` per term, and ``sum_l |a_l b_l| <= ||a|| ||b||``: so ``G_ij`` is within
    ``eps sqrt(n_i n_j)`` and ``n_i`` within ``eps n_i``, with ``eps = u (sqrt(k) + 2)``.
    Euclidean: ``D^2 = n_i + n_j - 2 G_ij`` errs by at most ``eps (sqrt(n_i) + sqrt(n_j))^2``,
    a relative error of half that over ``D^2`` for ``D``. Similarity ``G_ij / sqrt(n_i n_j)``:
    within ``2 eps``, relative to ``1 - sim`` for the distance. On correlated ReLU-like rows
    the measured errors sit 25-60x below this bound (tests/test_distance.py asserts they stay
    below it). It is large only where the shifted vectors are nearly parallel or the distance
    is tiny against the norms -- near-duplicate images.
    """
    eps = _U32 * (np.sqrt(GRAM_BLOCK_COLUMNS) + 2)
    ra, rb = np.sqrt(np.maximum(norms_a, 0.0)), np.sqrt(np.maximum(norms_b, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "euclidean" and norm != "image":
            d2 = norms_a[:, None] + norms_b[None, :] - 2.0 * g
            spread = (ra[:, None] + rb[None, :]) ** 2
            bound = np.where(d2 > 0, eps * spread / (2.0 * d2), np.inf)
            bound[spread == 0] = 0.0  # both shifted vectors exactly zero: distance exactly 0
        else:
            den = ra[:, None] * rb[None, :]
            gap = 1.0 - g / den
            bound = np.where(gap > 0, 2.0 * eps / gap, np.inf)
            bound[den == 0] = 0.0  # degenerate rows: their distances are set by convention
    return bound


def accurate_gram(xa: np.ndarray, xb: np.ndarray | None, shift_a: Shift, shift_b: Shift | None, metric: str,
                  norm: str, *, with_sums: bool = False) -> tuple[np.ndarray, ...]:
    """:func:`gram`, with the pairs whose :func:`error_bound` exceeds :data:`DISTANCE_RTOL`
    recomputed in float64 (only the rows involved), so every distance is within that
    relative error of a float64 computation."""
    out = gram(xa, xb, shift_a, shift_b, with_sums=with_sums)
    g, norms_a, norms_b = out[:3]
    unsure = error_bound(g, norms_a, norms_b, metric, norm) > DISTANCE_RTOL
    if xb is None:
        np.fill_diagonal(unsure, False)  # distance 0 by definition
    if unsure.any():
        g, norms_a, norms_b = _redo_in_float64(xa, xb, shift_a, shift_b, g, norms_a, norms_b, unsure)
    return (g, norms_a, norms_b, *out[3:])


def _redo_in_float64(xa, xb, shift_a, shift_b, g, norms_a, norms_b, unsure):
    if xb is None:
        rows = np.flatnonzero(unsure.any(axis=0) | unsure.any(axis=1))
        sub, sub_norms, _ = exact_gram(xa[rows], None, shift_a.take_rows(rows))
        g[np.ix_(rows, rows)] = sub
        norms_a[rows] = sub_norms
        return g, norms_a, norms_a
    rows_a, rows_b = np.flatnonzero(unsure.any(axis=1)), np.flatnonzero(unsure.any(axis=0))
    sub, sub_a, sub_b = exact_gram(xa[rows_a], xb[rows_b], shift_a.take_rows(rows_a), shift_b.take_rows(rows_b))
    g[np.ix_(rows_a, rows_b)] = sub
    norms_a, norms_b = norms_a.copy(), norms_b.copy()
    norms_a[rows_a], norms_b[rows_b] = sub_a, sub_b
    return g, norms_a, norms_b


def distance_block(
    gram: np.ndarray,
    norms_a: np.ndarray,
    norms_b: np.ndarray,
    m: int,
    norm: str,
    metric: str,
    sd: float = 1.0,
    degenerate_a: np.ndarray | None = None,
    degenerate_b: np.ndarray | None = None,
) -> np.ndarray:
    """Distances between two row blocks from the Gram block of their shifted vectors.

    ``gram``, ``norms_*``: from :func:`accurate_gram` with the :func:`choose_shift` shift.
    ``degenerate_*`` rows follow the ``constant="zero"`` rule (see the module doc).
    """
    if metric == "euclidean" and norm != "image":
        d2 = norms_a[:, None] + norms_b[None, :] - 2.0 * gram
        np.maximum(d2, 0.0, out=d2)
        scale = m * (sd * sd if norm == "layer" else 1.0)
        if scale == 0:  # all sampled values equal: identical vectors
            return np.zeros_like(d2)
        out = np.sqrt(d2 / scale)
    else:
        # the shifted vectors are the normalised ones up to a positive factor per row
        den = np.sqrt(np.outer(norms_a, norms_b))
        sim = np.divide(gram, den, out=np.zeros_like(gram), where=den > 0)
        np.clip(sim, -1.0, 1.0, out=sim)
        if degenerate_a is None:
            degenerate_a = np.zeros(sim.shape[0], bool)
        if degenerate_b is None:
            degenerate_b = np.zeros(sim.shape[1], bool)
        sim[degenerate_a[:, None] | degenerate_b[None, :]] = 0.0
        if metric == "euclidean":  # image norm: ||z_i - z_j||^2 / m, z = 0 for degenerate rows
            self_a = (~degenerate_a).astype(np.float64)
            self_b = (~degenerate_b).astype(np.float64)
            d2 = self_a[:, None] + self_b[None, :] - 2.0 * sim
            out = np.sqrt(np.maximum(d2, 0.0))
        else:
            out = 1.0 - sim
    out += 0.0  # turn -0.0 into +0.0 (the radix select relies on the sign bit)
    return out


def _non_finite(bad: np.ndarray, layer: str, group: str, names: np.ndarray) -> ValueError:
    return ValueError(f"layer {layer!r}, set {group!r}: non-finite activations in {int(bad.sum())} image(s) "
                      f"(e.g. {list(names[bad][:3])})")


def _check_group(
    stats: np.ndarray,
    m: int,
    norm: str,
    metric: str,
    constant: str,
    *,
    layer: str,
    group: str,
    names: np.ndarray,
) -> tuple[float, float, np.ndarray]:
    bad = ~(np.isfinite(stats[_S]) & np.isfinite(stats[_Q]))  # a sum meets any inf or nan
    if bad.any():
        raise _non_finite(bad, layer, group, names)
    mean, sd = pooled_scale(stats, m)
    degenerate = degenerate_rows(stats, m, norm, metric, mean, sd)
    if constant == "raise" and degenerate.any():
        what = "all-zero" if (metric == "cosine" and norm == "none") else "constant"
        raise ValueError(
            f"layer {layer!r}, set {group!r}: {int(degenerate.sum())} of {degenerate.size} image(s) have {what} "
            f"activations over the {m} sampled units (e.g. {list(names[degenerate][:3])}), so "
            f"norm={norm!r}, metric={metric!r} is undefined for them. Sample more units, use "
            f"metric='euclidean' with norm='layer' or 'none', or pass constant='zero'."
        )
    return mean, sd, degenerate


def pairwise_distances(
    x: np.ndarray,
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    constant: ConstantPolicy = "raise",
) -> np.ndarray:
    """All pairwise distances of the rows of an in-memory ``(n, m)`` matrix (Gram-based).

    The same Gram products the lazy functions run per block (:func:`accurate_gram`); for
    Euclidean distances under "layer"/"none" the layer SD comes from the same single pass
    (shifted norms and column sums) instead of :func:`row_stats`. See the module doc for
    the norms, metrics and degenerate rows. Returns a symmetric ``(n, n)``
    float64 array with a zero diagonal.
    """
    check_options(norm, metric, constant)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"expected an (n, m) matrix with m >= 1, got shape {x.shape}")
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float64)
    n, m = x.shape
    if metric == "euclidean" and norm != "image":
        d = one_pass_euclidean(x, norm)
        if d is None:
            bad = ~np.all(np.isfinite(x), axis=1)
            raise ValueError(f"non-finite values in {int(bad.sum())} row(s) (e.g. rows {list(np.flatnonzero(bad)[:3])})")
        return d
    stats = row_stats(x)
    mean, sd, degenerate = _check_group(
        stats, m, norm, metric, constant, layer="<array>", group="<array>", names=np.arange(n)
    )
    shift = choose_shift(stats, m, norm, metric, mean, np.zeros(m))
    g, norms, _ = accurate_gram(x, None, shift, None, metric, norm)
    d = distance_block(g, norms, norms, m, norm, metric, sd, degenerate, degenerate)
    return _symmetrise(d)


def one_pass_euclidean(x: np.ndarray, norm: str) -> np.ndarray | None:
    """Euclidean distances of the rows of ``x`` under ``norm`` "layer" or "none" in one pass
    over the data, without :func:`row_stats`; ``None`` when some value is not finite.

    Shift by an approximate centroid ``c`` (any common vector keeps the distances; a few
    rows' mean removes the common part), one Gram product, and the layer SD from the same
    pass: shifted norms and column sums of ``y = x - c``, as
    ``sum (x - mu)^2 = sum_i |y_i|^2 + 2 (c - mu) . sum_i y_i + n |c - mu|^2``.
    """
    n, m = x.shape
    probe = x[:: max(1, n // 16)][:16]  # a view: up to 16 rows spread over the matrix
    # any common vector will do, and it is rounded to float32 for float32 data anyway: summed in float32
    centroid = np.add.reduce(probe, axis=0, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    centroid /= probe.shape[0]  # probe.mean, without its per-call overhead (once per draw)
    shift = Shift(common=centroid.astype(np.float64)).for_dtype(x.dtype)
    g, norms, _, column_sums = accurate_gram(x, None, shift, None, "euclidean", norm, with_sums=True)
    if not (np.all(np.isfinite(norms)) and np.all(np.isfinite(column_sums))):
        return None
    offset = shift.common
    mean = (column_sums.sum() / n + offset.sum()) / m
    dev = offset - mean
    sd = float(np.sqrt(max((norms.sum() + 2.0 * dev @ column_sums + n * (dev @ dev)) / (n * m), 0.0)))
    return _symmetrise(distance_block(g, norms, norms, m, norm, "euclidean", sd))


def _symmetrise(d: np.ndarray) -> np.ndarray:
    upper = np.triu(d, 1)
    return upper + upper.T


# --------------------------------------------------------------------------- graph pieces
@dataclass(frozen=True)
class GroupStats:
    """Per distinct draw: unit count, layer mean/SD over the group, row stats, degenerate
    rows, and the group's centroid (mean vector, the Euclidean :class:`Shift`)."""

    m: np.ndarray  # (draws,)
    stats: np.ndarray  # (draws, 5, n)
    mean: np.ndarray  # (draws,)
    sd: np.ndarray  # (draws,)
    degenerate: np.ndarray  # (draws, n) bool
    centroid: tuple[np.ndarray, ...]  # (m_d,) per draw

    def shift(self, d: int, rows: slice, norm: str, metric: str) -> Shift:
        return choose_shift(self.stats[d][:, rows], int(self.m[d]), norm, metric, float(self.mean[d]),
                            self.centroid[d])


@dataclass(frozen=True)
class GroupBlocks:
    """One group (set) of one layer: graph keys of its gathered row blocks and statistics."""

    name: str
    index: int  # position of the group in the plan (groups differ only for "top")
    rows: np.ndarray  # global sample rows, in sample order
    bounds: tuple[tuple[int, int], ...]  # row-block ranges within the group
    blocks: tuple[Any, ...]  # keys -> row blocks (one (rows, m) array per draw)
    stats: Any  # key -> GroupStats
    one_task: tuple = ()  # arguments of :func:`one_block_distances` (a single row block)

    @property
    def n(self) -> int:
        return int(self.rows.size)

    @property
    def n_pairs(self) -> int:
        return self.n * (self.n - 1) // 2

    def pairs(self) -> Iterator[tuple[int, int]]:
        for a in range(len(self.blocks)):
            for b in range(a, len(self.blocks)):
                yield a, b


def _gather(block: np.ndarray, local_rows: np.ndarray, plan: UnitPlan, _check: Any = None) -> np.ndarray:
    """Read one image chunk once: the union of every draw's units for the selected images."""
    flat = np.asarray(block).reshape(block.shape[0], -1)
    if local_rows.size != flat.shape[0] or np.any(local_rows != np.arange(flat.shape[0])):
        flat = flat[local_rows]
    if plan.union.size == flat.shape[1]:
        return flat
    # np.take keeps rows C-ordered; flat[:, union] comes out column-major, and every later
    # row-wise pass over it (concatenating, taking each draw) would stride through memory
    return np.take(flat, plan.union, axis=1, mode="clip")


#: every float16 bit pattern's float32 value (256 KiB), for :func:`half_to_float`
_HALF_TO_FLOAT = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
_HALF_PIECE = 2**15  # values converted at a time by :func:`half_to_float` (cache-sized)
_HALF_INF_BITS = 0x7C00  # float16 +inf: bit patterns from here up are inf, NaN or negative
_HALF_TO_FLOAT_SCALE = np.float32(2.0**112)  # 2**(127 - 15): float16's exponent bias to float32's


def half_to_float(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 -> float32 (into ``out`` if given), bit-identical to ``x.astype(np.float32)``.

    numpy's cast branches on each value (zero, subnormal, normal, inf/nan) with no SIMD path;
    on ReLU activations, about half zeros in no predictable order, it runs at ~3.5 ns per
    value. When every value is finite and non-negative (any ReLU layer; one integer
    reduction tells), the float16 bits shifted into float32's exponent and mantissa places
    and multiplied by 2**112 are the value: zeros stay zero, subnormals come out normal and
    exact, all in vectorised integer and float passes (~0.4 ns per value). Anything else
    (negative values, inf, NaN) goes by a 65,536-entry table lookup (~1.5 ns per value).
    Both run in cache-sized pieces (``np.take`` first copies its indices to intp, 8 bytes
    per value: over a whole block that temporary costs more than the lookup). A 2-d ``x``
    (say a column slice of a row block) is converted a few whole rows at a time, without a
    contiguous copy.
    """
    x = np.asarray(x)
    if out is None:
        out = np.empty(x.shape, np.float32)
    if not out.flags.c_contiguous or out.shape != x.shape:
        raise ValueError("half_to_float: out must be C-contiguous and of x's shape")
    if not x.size:
        return out
    bits = x.view(np.uint16)  # same item size: a view even of a strided x
    by_shift = int(bits.max()) < _HALF_INF_BITS

    def convert(piece_bits: np.ndarray, piece_out: np.ndarray) -> None:
        if by_shift:
            np.left_shift(piece_bits, 13, out=piece_out.view(np.uint32), dtype=np.uint32)
            np.multiply(piece_out, _HALF_TO_FLOAT_SCALE, out=piece_out)
        else:
            np.take(_HALF_TO_FLOAT, piece_bits, out=piece_out)

    if x.ndim == 2:  # whole rows at a time (a column slice needs no copy)
        step = max(1, _HALF_PIECE // x.shape[1])
        for lo in range(0, x.shape[0], step):
            convert(bits[lo : lo + step], out[lo : lo + step])
        return out
    bits, flat = bits.reshape(-1), out.reshape(-1)
    for lo in range(0, bits.size, _HALF_PIECE):
        convert(bits[lo : lo + _HALF_PIECE], flat[lo : lo + _HALF_PIECE])
    return out


def _gather_in_read(block: np.ndarray, plan: UnitPlan, _check: Any, selected: np.ndarray,
                    block_info: dict | None = None) -> np.ndarray:
    """:func:`_gather` of the ``selected`` rows that fall in this block (``map_blocks``)."""
    lo, hi = block_info[0]["array-location"][0]
    rows = selected[(selected >= lo) & (selected < hi)] - lo
    return _gather(block, rows, plan)


def _row_block(parts: list[np.ndarray], positions: list[np.ndarray], plan: UnitPlan, group: int) -> list[np.ndarray]:
    """A row block from gathered chunks: one C-contiguous ``(rows, m)`` array per draw of
    the group, float32 (float64 and integer data: float64), converted once here rather than
    in every statistic and product over it.

    Each draw is taken from every chunk's gathered union straight into its rows of the
    block, in the stored dtype (float16: half the bytes to move), and converted after: the
    chunks' unions are never concatenated into a copy first."""
    n_draws = len(plan.units[group if len(plan.units) > 1 else 0])
    sources = [p[_as_slice(i)] for p, i in zip(parts, positions)]  # views where the rows are a range
    n = sum(src.shape[0] for src in sources)
    dtype = parts[0].dtype
    kept = dtype in (np.float32, np.float64)  # taken arrays are the result; others are converted from a buffer
    taken = None
    out = []
    for d in range(n_draws):
        cols = plan.positions(group, d)
        width = sources[0][:0, cols].shape[1]
        if kept or taken is None or taken.shape[1] != width:
            taken = np.empty((n, width), dtype)
        lo = 0
        for src in sources:
            hi = lo + src.shape[0]
            if isinstance(cols, slice):
                taken[lo:hi] = src[:, cols]
            else:
                np.take(src, cols, axis=1, mode="clip", out=taken[lo:hi])
            lo = hi
        if kept:
            out.append(taken)
        elif dtype == np.float16:
            out.append(half_to_float(taken))
        else:  # integers: exact in float64
            out.append(taken.astype(np.float64))
    return out


def _as_slice(index: np.ndarray) -> Any:
    """``index`` as a slice when it is a run of consecutive integers (a view, not a copy)."""
    if index.size and index[-1] - index[0] == index.size - 1 and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _row_stats_task(block: list[np.ndarray], n_draws: int) -> tuple[np.ndarray, list]:
    """Row statistics and column sums (for the centroid) of every draw of a row block."""
    stats, column_sums = [], []
    for d in range(n_draws):
        x = block[d]
        stats.append(row_stats(x))
        column_sums.append(x.sum(axis=0).astype(np.float64))  # any common shift is exact: no need for more
    return np.stack(stats), column_sums


def _group_stats(
    parts: list[tuple[np.ndarray, list]],
    plan: UnitPlan,
    group: int,
    norm: str,
    metric: str,
    constant: str,
    layer: str,
    group_name: str,
    names: np.ndarray,
) -> GroupStats:
    stats = np.concatenate([p[0] for p in parts], axis=2)
    n_draws, n = stats.shape[0], stats.shape[2]
    m = np.array([plan.draw(group, d).size for d in range(n_draws)])
    out = [
        _check_group(stats[d], int(m[d]), norm, metric, constant, layer=layer, group=group_name, names=names)
        for d in range(n_draws)
    ]
    centroid = tuple(sum_parts([p[1][d] for p in parts]) / n for d in range(n_draws))
    return GroupStats(
        m=m,
        stats=stats,
        mean=np.array([o[0] for o in out]),
        sd=np.array([o[1] for o in out]),
        degenerate=np.stack([o[2] for o in out]),
        centroid=centroid,
    )


def iter_distance_blocks(
    block_a: list[np.ndarray],
    block_b: list[np.ndarray],
    stats: GroupStats,
    rows_a: tuple[int, int],
    rows_b: tuple[int, int],
    norm: str,
    metric: str,
    draws: Sequence[int] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(draw, distances)`` for a pair of row blocks (``rows_a == rows_b``: diagonal)."""
    same = rows_a == rows_b
    sa, sb = slice(*rows_a), slice(*rows_b)
    for d in range(len(stats.m)) if draws is None else draws:
        xa, shift_a = block_a[d], stats.shift(d, sa, norm, metric)
        if same:
            xb, shift_b = None, None
        else:
            xb, shift_b = block_b[d], stats.shift(d, sb, norm, metric)
        g, norms_a, norms_b = accurate_gram(xa, xb, shift_a, shift_b, metric, norm)
        out = distance_block(g, norms_a, norms_b, int(stats.m[d]), norm, metric, float(stats.sd[d]),
                             stats.degenerate[d][sa], stats.degenerate[d][sb])
        yield d, (_symmetrise(out) if same else out)


def one_block_distances(parts: list[np.ndarray], positions: list[np.ndarray], plan: UnitPlan, group: int,
                        n_draws: int, norm: str, metric: str, constant: str, layer: str, group_name: str,
                        names: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Row block, statistics and distances of a group that fits one row block, in one task:
    the graph's row-block, row-stats, group-stats and pair steps without moving the block
    between tasks. Yields ``(draw, distances)``."""
    block = _row_block(parts, positions, plan, group)
    if metric == "euclidean" and norm != "image":
        # the whole group is here: no row statistics needed (the SD comes out of the Gram pass)
        for d in range(n_draws):
            out = one_pass_euclidean(block[d], norm)
            if out is None:
                raise _non_finite(~np.all(np.isfinite(block[d]), axis=1), layer, group_name, names)
            yield d, out
        return
    stats = _group_stats([_row_stats_task(block, n_draws)], plan, group, norm, metric, constant, layer, group_name,
                         names)
    rows = (0, block[0].shape[0])
    yield from iter_distance_blocks(block, block, stats, rows, rows, norm, metric)


def auto_block_size(width: int, itemsize: int) -> int:
    """Images per row block so one gathered block is about ``ROW_BLOCK_BYTES`` (row blocks
    hold float32 or float64, whatever the stored dtype)."""
    return int(np.clip(ROW_BLOCK_BYTES // max(1, width * max(4, itemsize)), MIN_BLOCK, MAX_BLOCK))


def build_groups(
    graph: GraphBuilder,
    coll: Collection,
    layer: LayerData,
    groups: dict[str, np.ndarray],
    table: DrawTable,
    *,
    norm: str,
    metric: str,
    constant: str,
    block_size: int | None,
    index: tuple = (),
) -> list[GroupBlocks]:
    """Add a layer's gathered row blocks and group statistics to ``graph``.

    Each image chunk of the layer is read by exactly one task, which gathers the union of
    the units of all draws (all ``n_units`` values and resamples) for all groups. Returns
    one :class:`GroupBlocks` per group.
    """
    selected = np.unique(np.concatenate(list(groups.values())))
    bounds = layer.block_bounds()
    block_of = np.searchsorted(bounds, selected, side="right") - 1
    chunk_rows = {int(k): selected[block_of == k] for k in np.unique(block_of)}  # global rows read from chunk k
    position = np.full(bounds[-1], -1, dtype=np.int64)
    for rows in chunk_rows.values():
        position[rows] = np.arange(rows.size)
    check = completed_check(coll, selected)
    if needs_unit_means(table):
        plan = plan_for(graph, table, layer, list(groups.values()), index)
        if check is not None:
            graph.depend(check)
        graph.depend(layer.data)
        chunk_keys = block_keys(layer.data)
        gathered = {
            k: graph.add("gather", (*index, k), _gather, chunk_keys[k], rows - bounds[k], plan,
                         None if check is None else check.key)
            for k, rows in chunk_rows.items()
        }
    else:
        # The plan needs no data: gather as an array operation on the layer, which dask fuses with
        # the chunk reads (one task per chunk that decompresses, gathers and drops the chunk, as a
        # plain read does; a separate gather task kept each whole chunk in memory until it ran)
        plan_delayed = dask.delayed(make_plan, pure=True)(table)
        gathered_array = layer.data.map_blocks(
            _gather_in_read, plan_delayed, check, selected,
            dtype=layer.data.dtype, meta=np.empty((0,) * layer.data.ndim, layer.data.dtype),
        )
        graph.depend(gathered_array)
        graph.depend(plan_delayed)
        plan = plan_delayed.key
        keys = block_keys(gathered_array)
        gathered = {k: keys[k] for k in chunk_rows}

    n_draws = len(table.keys)
    width = sum(min(n, layer.size) for n, _ in table.keys)  # a row block: one group's draws
    size = block_size or auto_block_size(width, layer.data.dtype.itemsize)
    out = []
    for g, (name, rows) in enumerate(groups.items()):
        plan_group = g if table.unit_type == "top" else 0
        row_ranges = tuple((lo, min(lo + size, rows.size)) for lo in range(0, rows.size, size))
        blocks, parts, sources = [], [], []
        for b, (lo, hi) in enumerate(row_ranges):
            part_rows = rows[lo:hi]
            ks = block_of[np.searchsorted(selected, part_rows)]
            order = np.unique(ks)
            sources.append(([gathered[int(k)] for k in order], [position[part_rows[ks == k]] for k in order]))
            blocks.append(graph.add("row-block", (*index, g, b), _row_block, *sources[-1], plan, plan_group))
            parts.append(graph.add("row-stats", (*index, g, b), _row_stats_task, blocks[-1], n_draws))
        stats = graph.add("group-stats", (*index, g), _group_stats, parts, plan, plan_group, norm, metric, constant,
                          layer.name, name, coll.samples[rows])
        one_task = ()
        if len(row_ranges) == 1:  # whole group in one task, no row block or statistics passed around
            one_task = (*sources[0], plan, plan_group, n_draws, norm, metric, constant, layer.name, name,
                        coll.samples[rows])
        out.append(GroupBlocks(name, plan_group, rows, row_ranges, tuple(blocks), stats, one_task))
    return out


# --------------------------------------------------------------------------- RDM
def _rdm_block(
    block_a: list[np.ndarray],
    block_b: list[np.ndarray],
    stats: GroupStats,
    rows_a: tuple[int, int],
    rows_b: tuple[int, int],
    norm: str,
    metric: str,
) -> np.ndarray:
    ((_, out),) = iter_distance_blocks(block_a, block_b, stats, rows_a, rows_b, norm, metric, [0])
    return out


def _one_block_rdm(*one_task: Any) -> np.ndarray:
    ((_, out),) = one_block_distances(*one_task)
    return out


def rdm(
    tree: Any,
    layer: str | None = None,
    n_units: int = 10000,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    seed: int = 0,
    resample: int = 0,
    *,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = "image",
    set_coord: str = "set",
    filter_dim: str = "filter",
    constant: ConstantPolicy = "raise",
    block_size: int | None = None,
) -> xr.DataArray:
    """Lazy representational dissimilarity matrix of one layer.

    Parameters
    ----------
    tree
        A store tree (``cx.open_activations``), or any DataArray/Dataset with a sample
        dimension (e.g. ``(state, unit, frequency)``; see ``sample_dim``).
    layer
        Layer name (may be omitted when the data have a single layer).
    n_units, unit_type, seed, resample
        The unit draw, as :func:`cnndiff_xr.select_units` (same units as
        :func:`cnndiff_xr.differentiation` uses for that draw).
    norm, metric, constant
        See :mod:`cnndiff_xr.distance`. ``norm="layer"`` scales by the SD over all images
        of the RDM (``sets``), so an RDM of one set matches that set's differentiation.
    sets
        Images of these sets (all images when ``None``), in sample order.
    sample_dim, set_coord, filter_dim
        Names of the sample dimension, the set coordinate along it, and the filter
        dimension (for ``unit_type="per_filter"``).
    block_size
        Images per row block (chunk size of the result); default sized from memory.

    Returns
    -------
    xarray.DataArray
        ``(image, image_other)`` float64, symmetric, zero diagonal, dask-backed; nothing is
        computed until ``.compute()``.
    """
    check_options(norm, metric, constant)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    (n,) = check_n_units(n_units)
    seed = check_count("seed", seed, 0)
    resample = check_count("resample", resample, 0)
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    if layer is None:
        if len(coll.layers) != 1:
            raise ValueError(f"pass layer=; the data have layers {list(coll.layers)}")
        layer = next(iter(coll.layers))
    data = coll.layer(layer)
    rows = np.sort(np.concatenate(list(coll.rows(sets).values())))
    if rows.size < 2:
        raise ValueError(f"an RDM needs at least 2 images; sets={sets!r} select {rows.size}")
    if block_size is not None:
        block_size = check_count("block_size", block_size, 1)
    table = draw_table(data, (n,), [resample], unit_type, seed, filter_dim)
    label = "+".join(coll.rows(sets)) if sets is not None else "all images"
    graph = GraphBuilder(f"rdm-{tokenize(data.data.name, rows, table, norm, metric, constant, block_size)}")
    (group,) = build_groups(
        graph, coll, data, {label: rows}, table, norm=norm, metric=metric, constant=constant, block_size=block_size
    )
    nb = len(group.blocks)
    if group.one_task:  # the same single task as differentiation's: the same numbers
        graph.output((0, 0), _one_block_rdm, *group.one_task)
    else:
        for a in range(nb):
            for b in range(nb):
                if a <= b:
                    graph.output((a, b), _rdm_block, group.blocks[a], group.blocks[b], group.stats, group.bounds[a],
                                 group.bounds[b], norm, metric)
                else:
                    graph.output((a, b), np.transpose, (graph.name, b, a))
    sizes = tuple(hi - lo for lo, hi in group.bounds)
    data_ = graph.array((sizes, sizes), np.float64)
    other = f"{sample_dim}_other"
    labels, set_labels = coll.samples[rows], coll.set_labels[rows]
    return xr.DataArray(
        data_,
        dims=(sample_dim, other),
        coords={
            sample_dim: labels,
            other: labels,
            set_coord: (sample_dim, set_labels),
            f"{set_coord}_other": (other, set_labels),
        },
        name="distance",
        attrs={
            "layer": layer,
            "n_units": n,
            "n_units_used": table.n_used[0],
            "unit_type": unit_type,
            "norm": norm,
            "metric": metric,
            "seed": seed,
            "resample": resample,
        },
    )
