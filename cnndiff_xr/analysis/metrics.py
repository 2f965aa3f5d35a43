"""The distances: one :class:`DistanceSpec` per (norm, metric), in the registry :data:`DISTANCES`.

Normalisations (see ``docs/architecture.md``, "Method"):

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

Every distance is computed from the Gram block of shifted vectors (:mod:`cnndiff_xr.analysis.gram`); a spec says
which shift, which rows are degenerate, and how Gram sums become distances -- from squared norms
(``n_i + n_j - 2 G_ij``, which also gives the layer SD from the same pass) or from cosine similarities
``G_ij / sqrt(n_i n_j)`` -- and so which error bound holds. Adding a metric is adding its specs to :data:`_SPECS`
(one per norm) and its name to :data:`cnndiff_xr.options.Metric`; the registry checks at import that it covers
exactly ``NORMS x METRICS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import product
from types import MappingProxyType

import numpy as np

from ..options import METRICS, NORMS, Metric, Norm
from ..validation import check_choice
from .gram import (
    ROW_MAX,
    ROW_MIN,
    ROW_SUM,
    ErrorBound,
    Shift,
    cosine_similarity,
    euclidean_distances,
    euclidean_error_bound,
    similarity_error_bound,
)

__all__ = ["DISTANCES", "DistanceSpec", "distance_spec"]

#: ``shift(stats, m, mean, centroid)``: the :class:`Shift` of a row block from its row statistics, the layer mean
#: over the group and the group's centroid
ShiftRule = Callable[[np.ndarray, int, float, np.ndarray], Shift]
#: ``degenerate(stats, m, mean, sd)``: the rows whose normalised vector is undefined or zero
DegenerateRule = Callable[[np.ndarray, int, float, float], np.ndarray]
#: ``scale(m, sd)``: what ``n_i + n_j - 2 G_ij`` is divided by before the square root
SquaredScale = Callable[[int, float], float]
#: ``distance(sim, degenerate_a, degenerate_b)``: distances from cosine similarities of the shifted vectors
FromSimilarity = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- shifts
def centroid_shift(stats: np.ndarray, m: int, mean: float, centroid: np.ndarray) -> Shift:
    """The group's centroid: any common vector keeps Euclidean distances, and it leaves only each vector's
    deviation from the mean image."""
    return Shift(common=np.asarray(centroid, np.float64))


def row_mean_shift(stats: np.ndarray, m: int, mean: float, centroid: np.ndarray) -> Shift:
    """Each row's mean: metrics of row-centred vectors (correlation, image z-scores)."""
    return Shift(rows=stats[ROW_SUM] / m)


def layer_mean_shift(stats: np.ndarray, m: int, mean: float, centroid: np.ndarray) -> Shift:
    """The layer mean (a common scalar): vectors z-scored over the layer."""
    return Shift(common=float(mean))


def no_shift(stats: np.ndarray, m: int, mean: float, centroid: np.ndarray) -> Shift:
    """Nothing: raw vectors."""
    return Shift()


# --------------------------------------------------------------------------- degenerate rows
def _constant(stats: np.ndarray) -> np.ndarray:
    constant: np.ndarray = stats[ROW_MIN] == stats[ROW_MAX]
    return constant


def no_rows(stats: np.ndarray, m: int, mean: float, sd: float) -> np.ndarray:
    """None: every vector has a distance to every other."""
    return np.zeros_like(_constant(stats))


def constant_rows(stats: np.ndarray, m: int, mean: float, sd: float) -> np.ndarray:
    """Constant vectors: centred on their own mean, they are zero."""
    return _constant(stats)


def all_zero_rows(stats: np.ndarray, m: int, mean: float, sd: float) -> np.ndarray:
    """All-zero vectors (raw cosine)."""
    out: np.ndarray = _constant(stats) & (stats[ROW_MAX] == 0)
    return out


def rows_at_layer_mean(stats: np.ndarray, m: int, mean: float, sd: float) -> np.ndarray:
    """Vectors equal to the layer mean (cosine after z-scoring over the layer); every vector when sd = 0."""
    constant = _constant(stats)
    if sd == 0:
        return np.ones_like(constant)
    out: np.ndarray = constant & (stats[ROW_SUM] / m == mean)
    return out


# --------------------------------------------------------------------------- conversions
def per_layer_sd(m: int, sd: float) -> float:
    """Euclidean / ``sqrt(m)`` of vectors z-scored over the layer: ``D^2 = d^2 / (m sd^2)``."""
    return m * (sd * sd)


def per_unit(m: int, sd: float) -> float:
    """Euclidean / ``sqrt(m)`` of raw vectors."""
    return m * 1.0


def one_minus_similarity(sim: np.ndarray, degenerate_a: np.ndarray, degenerate_b: np.ndarray) -> np.ndarray:
    """``1 - sim``: correlation and cosine distances."""
    out: np.ndarray = 1.0 - sim
    return out


def unit_vector_euclidean(sim: np.ndarray, degenerate_a: np.ndarray, degenerate_b: np.ndarray) -> np.ndarray:
    """``||z_i - z_j|| / sqrt(m)`` of image z-scores ``z`` (``|z|^2 = m``, ``z = 0`` for degenerate rows)."""
    self_a = (~degenerate_a).astype(np.float64)
    self_b = (~degenerate_b).astype(np.float64)
    d2 = self_a[:, None] + self_b[None, :] - 2.0 * sim
    out: np.ndarray = np.sqrt(np.maximum(d2, 0.0))
    return out


# --------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class DistanceSpec:
    """How one (norm, metric) distance comes out of shifted Gram products.

    Exactly one of ``squared_scale`` (distances from squared norms, ``sqrt((n_i + n_j - 2 G_ij) / scale)``) and
    ``from_similarity`` (distances from cosine similarities of the shifted vectors) is given; the first kind needs
    no row statistics when a whole group is in one block (:attr:`one_pass`).
    """

    norm: Norm
    metric: Metric
    shift: ShiftRule
    degenerate: DegenerateRule
    squared_scale: SquaredScale | None = None
    from_similarity: FromSimilarity | None = None
    #: what a degenerate vector is called in the error message
    degenerate_word: str = "constant"
    #: every distance >= 0 (and +0.0, never -0.0): the radix-select median orders distances by their bits
    non_negative: bool = True
    #: divided by ``sqrt(m)`` ("mean distance per dimension"), so that it does not grow with the number of units
    per_unit: bool = False

    def __post_init__(self) -> None:
        if (self.squared_scale is None) == (self.from_similarity is None):
            raise TypeError(f"{self.key}: give exactly one of squared_scale and from_similarity")

    @property
    def key(self) -> tuple[Norm, Metric]:
        return (self.norm, self.metric)

    @property
    def label(self) -> str:
        """How figures and tables name this distance: ``"euclidean distance / √m"``, ``"cosine distance"``."""
        return f"{self.metric} distance" + (" / √m" if self.per_unit else "")

    @property
    def one_pass(self) -> bool:
        """Whether a group in one block takes its distances from one Gram pass, without row statistics: the
        distances come from squared norms, and the layer SD from the same pass's norms and column sums."""
        return self.squared_scale is not None

    def error_bound(self, g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray) -> np.ndarray:
        """Bound on the relative error of each distance computed from a float32 Gram block (an
        :data:`~cnndiff_xr.analysis.gram.ErrorBound`): it follows from what the distance is a function of."""
        bound: ErrorBound = euclidean_error_bound if self.squared_scale is not None else similarity_error_bound
        return bound(g, norms_a, norms_b)

    def row_shift(self, stats: np.ndarray, m: int, mean: float, centroid: np.ndarray) -> Shift:
        """The :class:`~cnndiff_xr.analysis.gram.Shift` of a row block with statistics ``stats``."""
        return self.shift(stats, m, mean, centroid)

    def degenerate_rows(self, stats: np.ndarray, m: int, mean: float, sd: float) -> np.ndarray:
        """Rows whose normalised vector is undefined or zero (bool)."""
        return self.degenerate(stats, m, mean, sd)

    def distances(self, g: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray, m: int, *, sd: float = 1.0,
                  degenerate_a: np.ndarray | None = None, degenerate_b: np.ndarray | None = None) -> np.ndarray:
        """Distances between two row blocks from the Gram block of their shifted vectors.

        ``g``, ``norms_*``: from :func:`~cnndiff_xr.analysis.gram.accurate_gram` with :meth:`row_shift`'s shifts
        and :meth:`error_bound`. ``degenerate_*`` rows follow the ``constant="zero"`` rule.
        """
        if self.squared_scale is not None:
            out = euclidean_distances(g, norms_a, norms_b, self.squared_scale(m, sd))
        else:
            assert self.from_similarity is not None  # __post_init__
            if degenerate_a is None:
                degenerate_a = np.zeros(g.shape[0], bool)
            if degenerate_b is None:
                degenerate_b = np.zeros(g.shape[1], bool)
            sim = cosine_similarity(g, norms_a, norms_b, degenerate_a, degenerate_b)
            out = self.from_similarity(sim, degenerate_a, degenerate_b)
        out += 0.0  # turn -0.0 into +0.0 (the radix select relies on the sign bit)
        return out

    def __reduce__(self) -> tuple[Callable[[str, str], DistanceSpec], tuple[Norm, Metric]]:
        # a task argument: pickled as its key, unpickled as the registry's own object
        return (distance_spec, self.key)

    def __dask_tokenize__(self) -> tuple[str, Norm, Metric]:
        return ("DistanceSpec", self.norm, self.metric)


#: one entry per (norm, metric)
_SPECS = (
    DistanceSpec("layer", "euclidean", centroid_shift, no_rows, squared_scale=per_layer_sd, per_unit=True),
    DistanceSpec("layer", "correlation", row_mean_shift, constant_rows, from_similarity=one_minus_similarity),
    DistanceSpec("layer", "cosine", layer_mean_shift, rows_at_layer_mean, from_similarity=one_minus_similarity),
    DistanceSpec("image", "euclidean", row_mean_shift, constant_rows, from_similarity=unit_vector_euclidean,
                 per_unit=True),
    DistanceSpec("image", "correlation", row_mean_shift, constant_rows, from_similarity=one_minus_similarity),
    DistanceSpec("image", "cosine", row_mean_shift, constant_rows, from_similarity=one_minus_similarity),
    DistanceSpec("none", "euclidean", centroid_shift, no_rows, squared_scale=per_unit, per_unit=True),
    DistanceSpec("none", "correlation", row_mean_shift, constant_rows, from_similarity=one_minus_similarity),
    DistanceSpec("none", "cosine", no_shift, all_zero_rows, from_similarity=one_minus_similarity,
                 degenerate_word="all-zero"),
)

#: every distance, by ``(norm, metric)``
DISTANCES: Mapping[tuple[Norm, Metric], DistanceSpec] = MappingProxyType({spec.key: spec for spec in _SPECS})


def _check_registry() -> None:
    declared = set(product(NORMS, METRICS))
    if len(DISTANCES) != len(_SPECS) or set(DISTANCES) != declared:
        raise ImportError(
            f"the distance registry must hold one spec per (norm, metric) of cnndiff_xr.options: "
            f"missing {sorted(declared - set(DISTANCES))}, unknown {sorted(set(DISTANCES) - declared)}, "
            f"{len(_SPECS) - len(DISTANCES)} repeated"
        )


_check_registry()


def distance_spec(norm: str, metric: str) -> DistanceSpec:
    """The :class:`DistanceSpec` of ``(norm, metric)``; a :class:`~cnndiff_xr.validation.ChoiceError` naming the
    parameter for an unknown choice."""
    return DISTANCES[(check_choice("norm", norm, NORMS), check_choice("metric", metric, METRICS))]


def never_degenerate() -> str:
    """The distances that have no degenerate vectors, for messages: ``"metric='euclidean' with norm='layer' or
    'none'"``."""
    by_metric: dict[str, list[str]] = {}
    for spec in _SPECS:
        if spec.degenerate is no_rows:
            by_metric.setdefault(spec.metric, []).append(repr(spec.norm))
    return ", or ".join(f"metric={metric!r} with norm={' or '.join(norms)}" for metric, norms in by_metric.items())
