"""Layer and model similarity: linear CKA and comparisons of RDMs between the layers of one store, or between the
layers of two stores of the same images (two models), out of core from image Gram matrices.

Every method starts from one matrix per layer: the **image Gram** ``K = X X^T`` of the layer's raw activations
``X`` (images x units: every unit when ``n_units`` is None, else one unit draw, the units of
:func:`cnndiff_xr.select_units`), accumulated in float64 over slabs of units, so a task holds ``N x N`` values and
one slab of the gathered activations, never ``N x units`` (see :func:`layer_similarity`, Notes). Then, per layer:

* ``"cka"``: linear CKA (Kornblith et al. 2019) with the biased HSIC, ``HSIC(K, L) = tr(K H L H) / (n-1)^2``: the
  centred Gram ``Kc = H K H`` (``H = I - 11^T/n``), and ``CKA = <Kc, Lc> / (||Kc|| ||Lc||)`` (Frobenius), which
  equals ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` of column-centred ``X``, ``Y``. The Gram is of **raw**
  activations: CKA centres it itself, so no ``norm`` applies.
* ``"cka_unbiased"``: the same ratio with the unbiased HSIC estimator of Song et al. (2012), as used by Nguyen,
  Raghu and Kornblith (2021): the U-centred Gram (zero diagonal, ``K_ij - r_i - r_j + t`` off it, with
  ``r_i = sum_j K~_ij / (n-2) - sum K~ / (2 (n-1)(n-2))`` of the diagonal-free ``K~``), whose inner products are
  ``n (n-3) HSIC_1``. Needs at least 4 images.
* ``"rsa_spearman"``, ``"rsa_kendall"``, ``"rsa_cosine"``: comparisons of the layers' RDMs, the distances of
  :func:`cnndiff_xr.rdm` for the same draw, ``norm``, ``metric`` and ``constant`` (the same
  :class:`~cnndiff_xr.analysis.metrics.DistanceSpec`, its shift applied to the Gram, in float64), over their upper
  triangles: Spearman's rho (Pearson of average ranks), Kendall's tau-a (``(C - D) / (P (P-1) / 2)`` over the ``P``
  pairs of images, as rsatoolbox; from scipy's tau-b and the tie counts), or the cosine similarity.

A layer whose comparison is undefined -- every image with the same activations (centred Gram zero), an RDM whose
distances are all equal -- raises with ``constant="raise"`` and gives NaN in its row and column with
``constant="zero"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.graph_manipulation import clone

from ..options import (
    CONSTANT_POLICIES,
    SIMILARITY_METHODS,
    UNIT_TYPES,
    ConstantPolicy,
    Metric,
    Norm,
    SimilarityMethod,
    UnitType,
)
from ..schema import FILTER_DIM, IMAGE_DIM, SET_COORD
from ..validation import ParameterValueError, check_choice, check_count
from .blocks import check_rows
from .collection import Collection, LayerData, as_collection, completed_check
from .differentiation import analysis_memory
from .draws import UnitPlan, check_single_draw, draw_table, plan_for
from .gram import GRAM_BLOCK_COLUMNS, symmetrise
from .graph import GraphBuilder, Key, block_keys
from .metrics import DistanceSpec, distance_spec

__all__ = ["layer_similarity", "similarity_from_grams"]

#: the methods that compare RDMs
RSA_METHODS = ("rsa_spearman", "rsa_kendall", "rsa_cosine")
#: the fewest images each method is defined for
MIN_IMAGES = {"cka": 3, "cka_unbiased": 4, "rsa_spearman": 3, "rsa_kendall": 3, "rsa_cosine": 3}


# --------------------------------------------------------------------------- task payloads
@dataclass(frozen=True)
class Slab:
    """Static data of one slab of a layer's Gram: the columns ``lo:hi`` of the plan's gathered units."""

    lo: int
    hi: int


@dataclass(frozen=True, eq=False)
class LayerTask:
    """Static data of one layer of one store: names for messages, the draw's unit count, and the order that puts
    the store's selected images (gathered in its own sample order) in the reference store's order."""

    layer: str
    store: str  # "" for the (first) store, "other store " for the second: prefixes messages
    images: str  # what the images are, for messages
    m: int
    labels: np.ndarray  # the images in the reference order
    order: np.ndarray | None  # positions of the reference order among this store's selected rows; None: identity


@dataclass(frozen=True, eq=False)
class MethodTask:
    """Static data of the per-layer preparation: the method, the distance of the RDM methods, the policy."""

    method: SimilarityMethod
    spec: DistanceSpec
    constant: ConstantPolicy


@dataclass(frozen=True)
class GramSums:
    """A layer's raw image Gram (float64; the upper triangle while accumulating) and per-image sum, min and max."""

    gram: np.ndarray
    sums: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True)
class Prepared:
    """What one layer brings to every comparison: a centred Gram, or an RDM's upper triangle (ranked, as is, or
    raw for Kendall), its inner product with itself, the number of tied pairs of values (Kendall), and whether it
    is undefined (NaN in every comparison)."""

    values: np.ndarray | None
    self_product: float
    ties: float = 0.0

    @property
    def undefined(self) -> bool:
        return self.values is None


# --------------------------------------------------------------------------- Gram, slab by slab
def _gate(previous: GramSums) -> None:
    """Nothing: the reads of a slab wait for the previous slab's Gram, so one slab is held at a time."""
    return None


def _gather_slab(chunk: np.ndarray, local_rows: np.ndarray, plan: UnitPlan, slab: Slab, _check: None,
                 _gate: None) -> np.ndarray:
    """The selected rows of one image chunk, columns ``slab.lo:slab.hi`` of the plan's gathered units, copied out
    of the chunk (in its stored dtype) so that the chunk itself is released."""
    flat = np.asarray(chunk).reshape(chunk.shape[0], -1)
    if local_rows.size != flat.shape[0] or np.any(local_rows != np.arange(flat.shape[0])):
        flat = flat[local_rows]
    columns = plan.read[slab.lo : slab.hi]
    if columns.size == flat.shape[1]:  # every stored column, in order (the read columns are sorted)
        return flat
    if columns.size and columns[-1] - columns[0] == columns.size - 1:
        return flat[:, int(columns[0]) : int(columns[-1]) + 1].copy()
    return np.take(flat, columns, axis=1)


def _accumulate(parts: list[np.ndarray], previous: GramSums | None) -> GramSums:
    """Add one slab's ``X X^T`` (upper triangle, float64 products of :data:`GRAM_BLOCK_COLUMNS` columns at a time,
    BLAS ``dsyrk`` in place) and its row sums, minima and maxima to the previous slabs'."""
    from scipy.linalg.blas import dsyrk

    n = sum(p.shape[0] for p in parts)
    width = parts[0].shape[1]
    gram = np.zeros((n, n), order="F")  # dsyrk updates a Fortran-ordered matrix in place
    sums, low, high = np.zeros(n), np.full(n, np.inf), np.full(n, -np.inf)
    buffer = np.empty((n, min(width, GRAM_BLOCK_COLUMNS)))
    for lo in range(0, width, GRAM_BLOCK_COLUMNS):
        hi = min(lo + GRAM_BLOCK_COLUMNS, width)
        x = buffer if hi - lo == buffer.shape[1] else np.empty((n, hi - lo))
        row = 0
        for part in parts:
            x[row : row + part.shape[0]] = part[:, lo:hi]  # float16/32 -> float64 exactly
            row += part.shape[0]
        # x (C order) is x.T in Fortran order: trans=1 computes (x.T)^T x.T = x x^T
        gram = dsyrk(1.0, x.T, beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1)
        sums += x.sum(axis=1)
        np.minimum(low, x.min(axis=1), out=low)
        np.maximum(high, x.max(axis=1), out=high)
    if previous is not None:
        gram += previous.gram
        sums += previous.sums
        np.minimum(low, previous.low, out=low)
        np.maximum(high, previous.high, out=high)
    return GramSums(gram, sums, low, high)


def _finish(total: GramSums, task: LayerTask) -> GramSums:
    """The symmetric Gram in the reference order; non-finite activations raise, naming the images."""
    gram = np.ascontiguousarray(total.gram)
    step = max(1, min(2**22 // max(1, gram.shape[0]), 2048))
    for lo in range(0, gram.shape[0], step):  # the lower triangle from the upper one, a strip of rows at a time
        hi = lo + step
        gram[lo:hi, :lo] = gram[:lo, lo:hi].T
        square = gram[lo:hi, lo:hi]
        square[...] = np.triu(square) + np.triu(square, 1).T
    sums, low, high = total.sums, total.low, total.high
    if task.order is not None:
        gram = gram[np.ix_(task.order, task.order)]
        sums, low, high = sums[task.order], low[task.order], high[task.order]
    bad = ~(np.isfinite(sums) & np.isfinite(np.diagonal(gram)))
    if bad.any():
        raise ValueError(f"{task.store}layer {task.layer!r}, {task.images}: non-finite activations in "
                         f"{int(bad.sum())} image(s) (e.g. {[str(v) for v in task.labels[bad][:3]]})")
    return GramSums(gram, sums, low, high)


# --------------------------------------------------------------------------- per layer
def centred_gram(gram: np.ndarray) -> np.ndarray:
    """``H K H``: the Gram of the column-centred activations (biased HSIC)."""
    means = gram.mean(axis=0)
    out: np.ndarray = gram - means[:, None] - means[None, :] + means.mean()
    return out


def u_centred_gram(gram: np.ndarray) -> np.ndarray:
    """The U-centred Gram (Song et al. 2012; Kornblith's ``center_gram(unbiased=True)``): its inner product with
    another's is ``n (n-3)`` times the unbiased HSIC estimate."""
    n = gram.shape[0]
    out = np.array(gram, dtype=np.float64, copy=True)
    np.fill_diagonal(out, 0.0)
    means = out.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    out -= means[:, None]
    out -= means[None, :]
    np.fill_diagonal(out, 0.0)
    return out


def rdm_from_gram(sums: GramSums, m: int, spec: DistanceSpec, constant: ConstantPolicy, *, layer: str, group: str,
                  names: np.ndarray) -> np.ndarray:
    """The ``(n, n)`` distances of :func:`cnndiff_xr.rdm` under ``spec`` from a raw Gram and row sums.

    The row statistics are those of :func:`~cnndiff_xr.analysis.gram.row_stats` (the centred sum of squares from
    ``K_ii - s_i^2 / m``), checked as an RDM's (:func:`~cnndiff_xr.analysis.blocks.check_rows`: degenerate rows
    raise or follow ``constant="zero"``); the shift ``a_i`` of the spec is applied to the Gram,
    ``(x_i - a_i)(x_j - a_j) = K_ij - a_j s_i - a_i s_j + m a_i a_j``. Euclidean distances need no shift (any common
    vector leaves them unchanged). Computed in float64 throughout.
    """
    gram, s = sums.gram, sums.sums
    q = np.diagonal(gram).copy()
    css = np.maximum(q - s * s / m, 0.0)
    css[sums.low == sums.high] = 0.0
    stats = np.stack([s, css, q, sums.low, sums.high])
    mean, sd, degenerate = check_rows(stats, m, spec, constant, layer=layer, group=group, names=names)
    if spec.squared_scale is not None:
        shifted, norms = gram, q
    else:
        shift = spec.row_shift(stats, m, mean, np.zeros(0))
        if np.ndim(shift.common) != 0:
            raise NotImplementedError(f"{spec.key}: a vector shift of a similarity-based distance")
        a = np.full(s.size, float(shift.common)) + (0.0 if shift.rows is None else shift.rows)
        shifted = gram - np.outer(a, s) - np.outer(s, a) + m * np.outer(a, a)
        norms = np.diagonal(shifted).copy()
    distances = spec.distances(shifted, norms, norms, m, sd=sd, degenerate_a=degenerate, degenerate_b=degenerate)
    return symmetrise(distances)


def _undefined(task: LayerTask, method: MethodTask, why: str) -> Prepared:
    if method.constant == "raise":
        raise ValueError(
            f"{task.store}layer {task.layer!r}, {task.images}: {why}, so {method.method!r} is undefined for it. "
            "Sample other units, compare other layers, or pass constant='zero' (NaN in its row and column)."
        )
    return Prepared(None, float("nan"))


def _prepare(sums: GramSums, task: LayerTask, method: MethodTask) -> Prepared:
    """One layer's part of every comparison (see :class:`Prepared`)."""
    from scipy.stats import rankdata

    if method.method in ("cka", "cka_unbiased"):
        centred = centred_gram(sums.gram) if method.method == "cka" else u_centred_gram(sums.gram)
        product = _inner(centred, centred)
        # a centred Gram at the rounding level of the raw one: the images' activations are the same to float64
        if not np.sqrt(max(product, 0.0)) > 1e-12 * np.linalg.norm(sums.gram):
            what = ("every image has the same activations (its centred Gram is zero to float64 precision)"
                    if method.method == "cka" or product >= 0
                    else f"its unbiased HSIC with itself is {product:.3g}, not positive")
            return _undefined(task, method, what)
        return Prepared(centred, product)
    distances = rdm_from_gram(sums, task.m, method.spec, method.constant, layer=task.layer,
                              group=task.images, names=task.labels)
    upper = distances[np.triu_indices(distances.shape[0], 1)]
    if np.all(upper == upper[0]):
        return _undefined(task, method, f"its RDM's distances are all equal ({upper[0]:.6g})")
    if method.method == "rsa_kendall":
        _, counts = np.unique(upper, return_counts=True)
        return Prepared(upper, float("nan"), ties=float(np.sum(counts * (counts - 1.0) / 2.0)))
    if method.method == "rsa_spearman":
        upper = rankdata(upper)  # average ranks of ties
        upper -= upper.mean()
    return Prepared(upper, _inner(upper, upper))


def _inner(a: np.ndarray, b: np.ndarray) -> float:
    """Frobenius inner product (the same arithmetic for a pair and for a layer with itself, so ``CKA(K, K)`` is 1
    exactly: ``sqrt(fl(x * x)) == x``)."""
    return float(np.dot(a.ravel(), b.ravel()))


def _compare(a: Prepared, b: Prepared, method: SimilarityMethod) -> float:
    """The similarity of two prepared layers."""
    if a.values is None or b.values is None:
        return float("nan")
    if method == "rsa_kendall":
        from scipy.stats import kendalltau

        pairs = a.values.size * (a.values.size - 1) / 2.0
        tau_b = float(kendalltau(a.values, b.values).statistic)
        return tau_b * float(np.sqrt((pairs - a.ties) * (pairs - b.ties))) / pairs
    return _inner(a.values, b.values) / float(np.sqrt(a.self_product * b.self_product))


def _assemble(values: list[float], rows: int, columns: int, mirror: bool) -> np.ndarray:
    """The ``(rows, columns)`` matrix from its computed entries (row by row; the upper triangle only when
    ``mirror``)."""
    shape = (rows, columns)
    out = np.empty(shape)
    if mirror:
        i, j = np.triu_indices(shape[0])
        out[i, j] = values
        out[j, i] = values
    else:
        out[...] = np.reshape(values, shape)
    return out


def similarity_from_grams(grams: Sequence[np.ndarray], grams_other: Sequence[np.ndarray] | None = None, *,
                          method: SimilarityMethod = "cka") -> np.ndarray:
    """CKA (``"cka"``, ``"cka_unbiased"``) between in-memory image Gram matrices, as :func:`layer_similarity`
    computes it from its lazy Grams: ``(len(grams), len(grams_other))`` float64 (``grams`` with itself when
    ``grams_other`` is None). For data already in memory (e.g. kernels other than linear ones)."""
    check_choice("method", method, ("cka", "cka_unbiased"))
    centre = centred_gram if method == "cka" else u_centred_gram
    mine = [centre(np.asarray(g, dtype=np.float64)) for g in grams]
    theirs = mine if grams_other is None else [centre(np.asarray(g, dtype=np.float64)) for g in grams_other]
    out = np.empty((len(mine), len(theirs)))
    for i, a in enumerate(mine):
        for j, b in enumerate(theirs):
            out[i, j] = _inner(a, b) / np.sqrt(_inner(a, a) * _inner(b, b))
    return out


# --------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class _Side:
    """One store of the comparison: its collection, selected rows (sample order), layers and, for the second
    store, the order that puts its images in the first store's order."""

    coll: Collection
    rows: np.ndarray
    layers: list[str]
    order: np.ndarray | None
    name: str  # "" or "other store "


def _slab_width(m: int, n: int, itemsize: int, budget: int) -> int:
    """Units per slab: the gathered slab (``n`` images x width, stored dtype) fits ``budget``, in whole
    :data:`GRAM_BLOCK_COLUMNS` blocks, and the slabs are of about equal width."""
    fit = max(GRAM_BLOCK_COLUMNS, budget // max(1, n * itemsize) // GRAM_BLOCK_COLUMNS * GRAM_BLOCK_COLUMNS)
    n_slabs = -(-m // fit)
    return -(-m // n_slabs)


def _layer_gram(graph: GraphBuilder, coll: Collection, layer: LayerData, rows: np.ndarray, plan: Key, slabs: list[Slab],
                task: LayerTask, index: tuple[int, ...]) -> Key:
    """Add the tasks of one layer's Gram: per slab, a gather task per image chunk (the slab's columns of the
    selected rows) and one accumulation task; each slab after the first reads the layer again, after the previous
    slab's Gram is done. Returns the key of the finished :class:`GramSums`."""
    check = completed_check(coll, rows)
    if check is not None:
        graph.depend(check)
    bounds = layer.block_bounds()
    local = [(k, rows[(rows >= bounds[k]) & (rows < bounds[k + 1])] - bounds[k]) for k in range(bounds.size - 1)]
    local = [(k, r) for k, r in local if r.size]
    total: Key | None = None
    gate: Key | None = None
    for s, slab in enumerate(slabs):
        # one slab shares the array's reading tasks; more slabs read through clones, each read streaming
        source = layer.data if len(slabs) == 1 else clone(layer.data, seed=(graph.name, *index, s))
        graph.depend(source)
        chunks = block_keys(source)
        parts = [graph.add("gather", (*index, s, k), _gather_slab, chunks[k], r, plan, slab,
                           None if check is None else check.key, gate) for k, r in local]
        total = graph.add("gram", (*index, s), _accumulate, parts, total)
        if s + 1 < len(slabs):
            gate = graph.add("gate", (*index, s), _gate, total)
    assert total is not None
    return graph.add("gram-done", index, _finish, total, task)


def _other_order(tree_labels: np.ndarray, other_labels: np.ndarray, sample_dim: str) -> np.ndarray | None:
    """Positions of ``tree_labels`` among ``other_labels`` (None when already in that order); refuses differing id
    sets, naming a few ids missing on each side and the two counts."""
    mine, theirs = [str(v) for v in tree_labels.tolist()], [str(v) for v in other_labels.tolist()]
    where = {label: i for i, label in enumerate(theirs)}
    if len(where) != len(theirs) or len(set(mine)) != len(mine):
        raise ParameterValueError(f"the images' ids ({sample_dim!r}) must be unique in both stores to match them")
    if set(mine) != set(theirs):
        only_tree = [v for v in mine if v not in where]
        known = set(mine)
        only_other = [v for v in theirs if v not in known]
        raise ParameterValueError(
            f"other must hold the same images as tree, matched by id ({sample_dim!r}): tree has {len(mine)} "
            f"selected images, other {len(theirs)}; {len(only_tree)} of tree's are not in other (e.g. "
            f"{only_tree[:3]}) and {len(only_other)} of other's are not in tree (e.g. {only_other[:3]}). Extract "
            "both models from the same images, or select matching sets with sets="
        )
    order = np.array([where[v] for v in mine], dtype=np.int64)
    return None if np.array_equal(order, np.arange(order.size)) else order


def layer_similarity(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    other: xr.DataTree | xr.DataArray | xr.Dataset | None = None,
    *,
    method: SimilarityMethod = "cka",
    layers: str | Sequence[str] | None = None,
    layers_other: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    n_units: int | None = None,
    unit_type: UnitType = "random",
    seed: int = 0,
    resample: int = 0,
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    constant: ConstantPolicy = "raise",
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
) -> xr.DataArray:
    """Similarity of every pair of layers, of one store or of two stores of the same images, as one lazy matrix.

    Parameters
    ----------
    tree
        A store tree (``cx.open_activations``), or any DataArray/Dataset with a sample dimension.
    other
        A second store of the same images (e.g. another model), or None to compare the layers of ``tree`` with one
        another. Its images are matched to ``tree``'s by id (the ``sample_dim`` coordinate) and put in ``tree``'s
        order; differing id sets are refused.
    method
        ``"cka"`` (linear CKA, biased HSIC), ``"cka_unbiased"`` (unbiased HSIC, Song et al. 2012; at least 4
        images), ``"rsa_spearman"``, ``"rsa_kendall"`` (tau-a), ``"rsa_cosine"`` (comparisons of the layers' RDMs'
        upper triangles). See :mod:`cnndiff_xr.analysis.similarity`.
    layers, layers_other
        The rows' layers (of ``tree``) and the columns' (of ``other``, or of ``tree`` again); default all, in
        network order. With ``other=None`` and ``layers_other=None`` the columns are ``layers``.
    sets
        The images compared (of these sets, in both stores; all when None), at least 3 (4 for ``"cka_unbiased"``).
    n_units, unit_type, seed, resample
        ``n_units=None`` (default): every unit of each layer. Otherwise one unit draw per layer, the units of
        :func:`cnndiff_xr.select_units` (``"top"``: ranked over the compared images), which :func:`cnndiff_xr.rdm`
        uses too; a reduced store holds only its registered draws, so it needs ``n_units``.
    norm, metric, constant
        The RDMs' distance (RSA methods only; see :mod:`cnndiff_xr.analysis.metrics`); CKA takes the Gram of the raw
        activations and centres it itself. ``constant`` also decides what a layer whose comparison is undefined
        gives (see the module docstring): ``"raise"``, or ``"zero"``: NaN.
    sample_dim, set_coord, filter_dim
        Names of the sample dimension, the set coordinate along it, and the filter dimension (``"per_filter"``).

    Returns
    -------
    xarray.DataArray
        ``similarity`` with dims ``(layer, layer_other)``, float64, coordinates ``n_units_used`` (layer) and
        ``n_units_used_other`` (layer_other), attributes naming the method and the draw. Symmetric with a diagonal
        of 1 for CKA and Spearman when ``other`` is None and the columns are the rows. Dask-backed: building it
        computes nothing.

    Notes
    -----
    Out of core: each layer's image Gram ``X X^T`` (``N x N`` float64) is accumulated over slabs of its units; a
    slab of the gathered activations (``N x slab`` in the stored dtype) fits the memory budget (the dask config
    setting ``"cnndiff_xr.analysis-memory"``, as :func:`cnndiff_xr.differentiation`), so a layer larger than the
    budget is read once per slab, one slab after the other, and nothing ever holds ``N x units`` values. Every
    layer then holds its ``N x N`` Gram and one prepared ``N x N`` matrix (CKA) or RDM triangle (RSA) until its
    comparisons are done: about ``16 N^2`` bytes per layer.
    """
    method = check_choice("method", method, SIMILARITY_METHODS)
    spec = distance_spec(norm, metric)
    check_choice("constant", constant, CONSTANT_POLICIES)
    if n_units is None:
        check_choice("unit_type", unit_type, UNIT_TYPES)
        seed, resample = check_count("seed", seed, 0), check_count("resample", resample, 0)
    else:
        n_units, seed, resample = check_single_draw(n_units, unit_type, seed, resample)

    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    rows = coll.selected_rows(sets)
    minimum = MIN_IMAGES[method]
    if rows.size < minimum:
        raise ParameterValueError(f"method={method!r} needs at least {minimum} images; sets={sets!r} select "
                                  f"{rows.size}")
    labels = coll.samples[rows]
    names = coll.layer_names(layers)
    sides = [_Side(coll, rows, names, None, "")]
    if other is None:
        names_other = names if layers_other is None else coll.layer_names(layers_other)
        sides[0] = _Side(coll, rows, list(dict.fromkeys([*names, *names_other])), None, "")
        columns_side = 0
    else:
        coll_other = as_collection(other, sample_dim=sample_dim, set_coord=set_coord)
        rows_other = coll_other.selected_rows(sets)
        order = _other_order(labels, coll_other.samples[rows_other], sample_dim)
        names_other = coll_other.layer_names(layers_other)
        sides.append(_Side(coll_other, rows_other, names_other, order, "other store "))
        columns_side = 1

    images = "all images" if sets is None else f"sets {'+'.join(coll.rows(sets))}"
    budget = analysis_memory()
    method_task = MethodTask(method, spec, constant)
    # everything the numbers depend on, per store: the data read (dask names), the draw tables (layer, shape,
    # units), the rows read and their order, the slabs (their bounds change the float64 sums' rounding), the
    # completion record; then the method, the distance and the policy
    described: list[Any] = []
    layer_plans: dict[tuple[int, str], tuple[Any, list[Slab], LayerTask]] = {}
    used: dict[tuple[int, str], int] = {}
    for si, side in enumerate(sides):
        for name in side.layers:
            layer = side.coll.layer(name)
            if n_units is None:
                if layer.reduced:
                    registered = layer.draws.describe() if layer.draws is not None else "no registration recorded"
                    raise ParameterValueError(
                        f"n_units=None uses every unit, but {side.name}layer {name!r} is reduced: the store keeps "
                        f"only the {layer.flat_index.size if layer.flat_index is not None else 0} of its "
                        f"{layer.size} units that its registered draws select ({registered}). Pass one of those "
                        "draws (n_units=, seed=, resample=, unit_type=), or compare full stores"
                    )
                table = draw_table(layer, (layer.size,), [0], unit_type="all", seed=seed, filter_dim=filter_dim)
            else:
                table = draw_table(layer, (n_units,), [resample], unit_type=unit_type, seed=seed,
                                   filter_dim=filter_dim)
            m = table.n_used[0]
            width = _slab_width(m, side.rows.size, layer.data.dtype.itemsize, budget)
            slabs = [Slab(lo, min(lo + width, m)) for lo in range(0, m, width)]
            task = LayerTask(name, side.name, images, m, labels, side.order)
            layer_plans[(si, name)] = (table, slabs, task)
            used[(si, name)] = m
            described.append([layer.data.name, table, [(s.lo, s.hi) for s in slabs]])
        described.append([side.rows, side.order, side.coll.completed_token()])
    token = tokenize(described, method, spec if method in RSA_METHODS else None, constant,
                     [names, names_other, columns_side])
    graph = GraphBuilder(f"layer-similarity-{token}")

    prepared: dict[tuple[int, str], Key] = {}
    for (si, name), (table, slabs, task) in layer_plans.items():
        side = sides[si]
        layer = side.coll.layer(name)
        index = (si, side.layers.index(name))
        plan = plan_for(graph, table, layer, [side.rows], index)
        gram = _layer_gram(graph, side.coll, layer, side.rows, plan, slabs, task, index)
        prepared[(si, name)] = graph.add("prepared", index, _prepare, gram, task, method_task)

    mirror = other is None and names_other == names
    pairs = [(i, j) for i in range(len(names)) for j in range(len(names_other)) if not mirror or j >= i]
    values = [graph.add("compare", (i, j), _compare, prepared[(0, names[i])],
                        prepared[(columns_side, names_other[j])], method) for i, j in pairs]
    graph.output((0, 0), _assemble, values, len(names), len(names_other), mirror)
    data = graph.array(((len(names),), (len(names_other),)), np.float64)

    attrs: dict[str, Any] = {
        "method": method,
        "n_units": "all" if n_units is None else n_units,
        "unit_type": "all" if n_units is None else unit_type,
        "seed": seed,
        "resample": resample,
        "n_images": int(rows.size),
        "stores": len(sides),
        "sets": "all" if sets is None else list(coll.rows(sets)),
    }
    if method in RSA_METHODS:
        attrs |= {"norm": norm, "metric": metric}
    else:
        attrs["gram"] = "raw activations (CKA centres the Gram itself)"
    attrs["constant"] = constant
    return xr.DataArray(
        data,
        dims=("layer", "layer_other"),
        coords={
            "layer": names,
            "layer_other": names_other,
            "n_units_used": ("layer", [used[(0, n)] for n in names]),
            "n_units_used_other": ("layer_other", [used[(columns_side, n)] for n in names_other]),
        },
        name="similarity",
        attrs=attrs,
    )
