"""What a batch keeps of each layer's output: every unit, or only the registered draws' units, and the spatial means.

A :class:`Reduction` is the small, picklable description of that choice. It travels to the workers with the model
(:class:`~cnndiff_xr.extraction.cluster.ModelPlugin`); each backend applies it inside its model call where its
framework allows (the Keras backend gathers and averages in the same call as the forward pass), so only the kept
values leave the model. :func:`reduce_numpy` is the plain numpy definition of the same outputs: the fallback for
values that do not come out of the framework's graph (the preprocessed input layer), and the reference the tests and
the backends are checked against.

Both the store layout (:mod:`cnndiff_xr.extraction.store`) and the workers ask :meth:`Reduction.kept` which units of
a layer are kept: the union of the registered draws, drawn by :func:`cnndiff_xr.sampling.draw_units` with the seeds
the analysis uses, from the layer's full size (:meth:`cnndiff_xr.sampling.UnitDraws.kept_units`).

Means are computed from the model's float32 output, before it is rounded to the store's dtype: per image, the mean
over ``(y, x)`` of every filter (stored as float32), and over all units of the layer the mean and the centred sum of
squares (float64; the moments from which :func:`cnndiff_xr.filter_means` z-scores over a set), from per-filter sums
and the per-image sum of squares (``css = sum x^2 - n mean^2``, in float64). On a float32 store they equal the
analysis of a full store within 1e-6 relative. On a float16 store they are closer to the model than a full float16
store's means, which average values rounded to 11 significant bits: the two differ by that rounding's mean (about
1e-5 relative for a layer of 14 x 14 positions). Averaging the rounded values instead would cost a rounding pass over
every activation (~15 % of the VGG16 forward pass on 2 cores, benchmarks/RESULTS.md), which is what a reduced store
avoids.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np

from ..sampling import UnitDraws, registered_units

__all__ = ["BatchOutput", "LayerMeans", "Reduction", "combine_means", "reduce_numpy"]


@dataclasses.dataclass(frozen=True)
class Reduction:
    """What a batch keeps: ``units`` (None: every unit) and whether to compute the spatial means of every layer."""

    units: UnitDraws | None = None
    filter_means: bool = False

    @property
    def key(self) -> str:
        """A stable text of the reduction (part of the workers' model plugin name)."""
        return json.dumps([None if self.units is None else self.units.to_attrs(), self.filter_means])

    @property
    def is_identity(self) -> bool:
        """Whether the batch keeps every unit and nothing more (today's full store)."""
        return self.units is None and not self.filter_means

    def means_for(self, layer: str, shape: Sequence[int]) -> bool:
        """Whether the means of ``layer`` are stored: with ``filter_means``, for every layer with positions (a dense
        layer's filter means are its activations, and with ``filter_means`` it is kept whole)."""
        return self.filter_means and len(shape) > 1

    def kept(self, layer: str, shape: Sequence[int]) -> np.ndarray | None:
        """Sorted flat indices of the units of ``layer`` (per-image ``shape``, channels last) that are kept; None for
        every unit."""
        if self.units is None or (self.filter_means and len(shape) == 1):
            # with filter means, a dense layer is kept whole: its filter means are its activations, and storing them
            # beside its kept units would take more room (4 bytes per unit) than the whole layer in the store's dtype
            return None
        return registered_units(self.units, layer, tuple(int(s) for s in shape))


@dataclasses.dataclass(frozen=True)
class LayerMeans:
    """One batch's means of one layer: ``filter_mean`` (batch, filters) float32, ``layer_mean`` and ``layer_css``
    (batch,) float64."""

    filter_mean: np.ndarray
    layer_mean: np.ndarray
    layer_css: np.ndarray


@dataclasses.dataclass(frozen=True)
class BatchOutput:
    """What one model call returns: per layer the kept activations (``(batch, *shape)`` whole, or ``(batch, kept)``),
    in the store's dtype; per layer the means (empty without ``filter_means``); the class probabilities (float32
    ``(batch, classes)``; None without an ImageNet head)."""

    activations: Mapping[str, np.ndarray]
    means: Mapping[str, LayerMeans]
    probabilities: np.ndarray | None


def combine_means(filter_sum: np.ndarray, sum_of_squares: np.ndarray, n_positions: int) -> LayerMeans:
    """Per-image means and moments from ``filter_sum`` (batch, filters), each filter's sum over ``n_positions``
    spatial positions (1 for a dense layer), and ``sum_of_squares`` (batch,) over all units."""
    sums = np.asarray(filter_sum, dtype=np.float64)
    n = n_positions * sums.shape[1]
    mean = sums.sum(axis=1) / n
    # float64 from float32 sums: for activations whose SD is not tiny next to their mean (ReLU outputs, the
    # preprocessed input) the cancellation costs at most a digit of the float32 sums' ~1e-7
    css = np.maximum(np.asarray(sum_of_squares, dtype=np.float64) - n * mean**2, 0.0)
    return LayerMeans((sums / n_positions).astype(np.float32), mean, css)


def reduce_numpy(values: np.ndarray, kept: np.ndarray | None, *, dtype: str,
                 filter_means: bool) -> tuple[np.ndarray, LayerMeans | None]:
    """One layer's batch ``(batch, *shape)`` -> (kept values in ``dtype``, means or None), in plain numpy."""
    values = np.asarray(values)
    flat = values.reshape(values.shape[0], -1)
    kept_values = (values if kept is None else np.take(flat, kept, axis=1)).astype(dtype, copy=False)
    if not filter_means:
        return kept_values, None
    x = values.astype(np.float64)  # the model's output, before rounding to the store's dtype (see the module doc)
    per_filter = x.reshape(x.shape[0], -1, x.shape[-1])
    return kept_values, combine_means(per_filter.sum(axis=1), (per_filter**2).sum(axis=(1, 2)), per_filter.shape[1])
