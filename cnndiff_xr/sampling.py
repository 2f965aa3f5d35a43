"""Unit draws, shared by extraction and analysis: the seeded draw itself (:func:`draw_units`) and a registration of
draws made before extraction (:class:`UnitDraws`).

The analysis draws units with :func:`draw_units`; a *reduced* store keeps, per layer, exactly the union of the units
its registered draws select (:meth:`UnitDraws.kept_units`), computed with the same function and seeds from the
layer's full size. That is why the function lives here, below both halves of the package: extraction must not import
the analysis, and the two must never draw differently. The module imports only the bottom layer (``options``,
``validation``).

Seeding (``docs/architecture.md``, "Unit draws"): draw ``(layer, n_units, resample)`` uses
``np.random.default_rng(SeedSequence([seed, blake2b_8(layer), n_units, resample]))``, the same in every process and
Python version.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .options import UNIT_TYPES, UnitType
from .validation import (
    ParameterTypeError,
    ParameterValueError,
    check_choice,
    check_count,
    check_int,
    check_n_units,
)

__all__ = ["REGISTRABLE_UNIT_TYPES", "UnitDraws", "draw_units", "registered_units", "unit_seed"]

#: The unit types a store can keep in advance: their units do not depend on the data. ("top" ranks units by their
#: mean over the analysed images, so it needs every unit; "all" needs no registration: it is the full store.)
REGISTRABLE_UNIT_TYPES: tuple[UnitType, ...] = ("random", "per_filter")


# --------------------------------------------------------------------------- seeded draws
def unit_seed(seed: int, layer: str, n_units: int, resample: int) -> np.random.SeedSequence:
    """The seed sequence of one draw, derived from ``(seed, layer, n_units, resample)``.

    The layer name enters through an 8-byte BLAKE2b digest, so the value is the same in
    every process and Python version.
    """
    digest = hashlib.blake2b(str(layer).encode("utf-8"), digest_size=8).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest, "little"), int(n_units), int(resample)])


def draw_units(
    feature_shape: Sequence[int],
    n_units: int,
    unit_type: UnitType = "random",
    *,
    seed: int = 0,
    layer: str = "",
    resample: int = 0,
    means: np.ndarray | None = None,
    filter_axis: int | None = -1,
) -> np.ndarray:
    """Choose units of one layer; return their sorted flat (C-order) indices.

    Parameters
    ----------
    feature_shape
        Shape of one sample's activation, e.g. ``(y, x, filter)``.
    n_units
        Number of units; all units when ``n_units`` >= the layer size (the seed's rule).
    unit_type
        ``"random"``: uniform without replacement (the seed's choice). ``"top"``: the
        ``n_units`` largest values of ``means`` (ties go to the lower flat index).
        ``"per_filter"``: the same number of units from every filter (when ``n_units`` is
        not a multiple of the filter count, randomly chosen filters get one more), each
        filter's positions uniform without replacement. ``"all"``: every unit.
    seed, layer, resample
        Identify the draw; see :func:`unit_seed`.
    means
        Mean activation per unit (flat), required for ``"top"``.
    filter_axis
        Axis of ``feature_shape`` holding filters, for ``"per_filter"``.

    Returns
    -------
    numpy.ndarray
        Sorted ``int64`` flat indices, the same for every image.
    """
    check_choice("unit_type", unit_type, UNIT_TYPES)
    shape = tuple(int(s) for s in feature_shape)
    size = int(np.prod(shape))
    n = min(int(n_units), size)
    if unit_type == "all" or n == size:
        return np.arange(size, dtype=np.int64)
    if unit_type == "top":
        if means is None:
            raise ParameterValueError("unit_type='top' needs the mean activation of every unit")
        order = np.argsort(-np.asarray(means, dtype=np.float64).reshape(-1), kind="stable")
        return np.sort(order[:n]).astype(np.int64)
    rng = np.random.default_rng(unit_seed(seed, layer, n_units, resample))
    if unit_type == "random":
        return np.sort(rng.choice(size, size=n, replace=False)).astype(np.int64)
    # per_filter
    if filter_axis is None:
        raise ParameterValueError("unit_type='per_filter' needs a filter dimension")
    axis = filter_axis % len(shape)
    n_filters = shape[axis]
    other = shape[:axis] + shape[axis + 1 :]
    per_position = int(np.prod(other))
    base, extra = divmod(n, n_filters)
    counts = np.full(n_filters, base, dtype=np.int64)
    if extra:
        counts[rng.choice(n_filters, size=extra, replace=False)] += 1
    parts: list[np.ndarray] = []
    for f in np.flatnonzero(counts):
        positions = rng.choice(per_position, size=int(counts[f]), replace=False)
        index: tuple[np.ndarray, ...] = np.unravel_index(positions, other) if other else ()
        full = (*index[:axis], np.full(positions.size, f), *index[axis:])
        parts.append(np.ravel_multi_index(full, shape))
    return np.sort(np.concatenate(parts)).astype(np.int64)


# --------------------------------------------------------------------------- registered draws
@dataclasses.dataclass(frozen=True)
class UnitDraws:
    """Draws registered before extraction: a reduced store keeps, per layer, the union of the units they select.

    ``cx.extract(..., units=UnitDraws(n_units=[200, 10000], resamples=10, seed=0))`` keeps, for every layer larger than
    the biggest ``n_units``, exactly the units of draws ``(n, r)`` for every ``n`` in ``n_units`` and ``r`` in
    ``0..resamples-1`` (the same :func:`draw_units` and seeds as the analysis); smaller layers are kept whole. The
    analysis of such a store with any subset of these draws (some of the ``n_units`` values, the first ``k``
    resamples, the same seed and unit type) gives the same numbers, bit for bit, as on a full store of the same
    images.

    Parameters
    ----------
    n_units
        Unit counts (an int or a sequence of positive ints).
    resamples
        Draws per ``n_units`` value: resamples ``0..resamples-1``.
    seed
        The draws' seed (as ``seed=`` of :func:`cnndiff_xr.differentiation`).
    unit_type
        ``"random"`` or ``"per_filter"``. ``"top"`` cannot be registered: its units are those with the highest mean
        over the analysed images, which are not known before extraction (and need every unit).
    """

    n_units: tuple[int, ...] = (200, 10000)
    resamples: int = 10
    seed: int = 0
    unit_type: UnitType = "random"

    def __post_init__(self) -> None:
        if isinstance(self.n_units, str):
            raise ParameterTypeError(f"n_units must be an int or a sequence of ints, got {self.n_units!r}")
        object.__setattr__(self, "n_units", tuple(sorted(set(check_n_units(self.n_units)))))
        object.__setattr__(self, "resamples", check_int("resamples", self.resamples, 1))
        object.__setattr__(self, "seed", check_count("seed", self.seed, 0))
        if self.unit_type == "top":
            raise ParameterValueError(
                "unit_type='top' cannot be registered for a reduced store: 'top' units are those with the highest "
                "mean over the analysed images, which are known only after extraction and need every unit. Keep "
                f"the full store (units='all') for 'top', or register one of {REGISTRABLE_UNIT_TYPES}")
        check_choice("unit_type", self.unit_type, REGISTRABLE_UNIT_TYPES,
                     message=f"unit_type={self.unit_type!r}; a reduced store registers one of "
                             f"{REGISTRABLE_UNIT_TYPES}")

    @property
    def max_units(self) -> int:
        """The biggest registered ``n_units``: layers no larger than this are kept whole."""
        return max(self.n_units)

    def to_attrs(self) -> dict[str, Any]:
        """The registration as JSON values (the store's root attribute ``schema.UNIT_DRAWS_ATTR``)."""
        return {"n_units": list(self.n_units), "resamples": self.resamples, "seed": self.seed,
                "unit_type": self.unit_type}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any] | None) -> UnitDraws | None:
        """The registration recorded in a store (None for a full store)."""
        if not attrs:
            return None
        return cls(n_units=tuple(attrs["n_units"]), resamples=int(attrs["resamples"]), seed=int(attrs["seed"]),
                   unit_type=attrs["unit_type"])

    def describe(self) -> str:
        """One line for messages: what the store holds."""
        return (f"n_units {list(self.n_units)}, resamples 0..{self.resamples - 1}, seed {self.seed}, "
                f"unit_type {self.unit_type!r}")

    def keeps_whole(self, feature_shape: Sequence[int]) -> bool:
        """Whether a layer of this per-image shape is kept whole (no larger than the biggest ``n_units``)."""
        return int(np.prod(feature_shape)) <= self.max_units

    def kept_units(self, layer: str, feature_shape: Sequence[int], filter_axis: int | None = -1) -> np.ndarray | None:
        """Sorted flat indices of the units a reduced store keeps of ``layer``: the union of every registered draw;
        None when the layer is kept whole."""
        shape = tuple(int(s) for s in feature_shape)
        if self.keeps_whole(shape):
            return None
        size = int(np.prod(shape))
        kept = np.zeros(size, dtype=bool)  # a mask, not np.unique: linear in the layer size
        for n in self.n_units:
            for r in range(self.resamples):
                kept[draw_units(shape, n, self.unit_type, seed=self.seed, layer=layer, resample=r,
                                filter_axis=filter_axis)] = True
        return np.flatnonzero(kept).astype(np.int64)

    def missing(self, n_units: Sequence[int], resamples: Sequence[int], *, seed: int, unit_type: str) -> str | None:
        """Why draws ``(n, r)`` for ``n`` in ``n_units``, ``r`` in ``resamples`` are not all held; None if they are."""
        problems = []
        if unit_type != self.unit_type:
            problems.append(f"unit_type {unit_type!r}")
        if seed != self.seed:
            problems.append(f"seed {seed}")
        extra_n = [int(n) for n in n_units if int(n) not in self.n_units]
        if extra_n:
            problems.append(f"n_units {extra_n}")
        extra_r = [int(r) for r in resamples if not 0 <= int(r) < self.resamples]
        if extra_r:
            problems.append(f"resamples {extra_r}")
        return ", ".join(problems) if problems else None


@functools.lru_cache(maxsize=256)
def registered_units(draws: UnitDraws, layer: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """:meth:`UnitDraws.kept_units` of a layer as a store lays it out (per-image ``shape``, channels last): the units
    a reduced store keeps, read-only. Cached: the layout, the workers' model build, the size preflight and every
    analysis plan of the layer ask for the same units."""
    kept = draws.kept_units(layer, shape, filter_axis=-1)
    if kept is not None:
        kept.setflags(write=False)
    return kept
