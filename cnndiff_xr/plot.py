"""Figures (matplotlib): differentiation by layer, reference-normalised differentiation, filter-mean heatmaps, the
prediction-layer heatmap, RDMs and stimulus-vs-layer R² by depth.

Every function takes the package's xarray results (computed or lazy: they are computed here, the figures need the
numbers) and an optional matplotlib Axes (or a Figure for multi-panel plots), and returns the Figure and Axes.
Layer names are the x ticks, rotated as in the seed's plots. :func:`save` writes PNG and SVG.

Conventions every figure keeps, so that figures can be read side by side:

- **one colour per set**: :func:`set_colours` maps set names to colours from the sorted names; a figure uses the
  mapping it is given (``colours=``) or that of its own data's sets, and the figure-set functions
  (:func:`write_result_figures`, :func:`write_store_figures`) compute it once and pass it to every figure they draw;
- **labelled colour scales**: every heatmap has one colour scale for all its panels and a colourbar that says the
  quantity and how the scale was chosen (robust percentiles of the data, stated in the label);
- **units named as what they are**: "filter" in convolutional layers, "channel" in the input, "unit" in dense
  layers, "class" in the prediction layer (:func:`layer_unit_name`);
- **intervals say what they are over**: the shaded bands are the spread over unit redraws (resamples of the sampled
  units), not over images, and the legend says so.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from . import schema
from .analysis.metrics import DISTANCES
from .analysis.results import normalise_by_reference, resample_summary
from .outputs import OutputFolderError, check_inside, safe_name
from .sampling import UnitDraws
from .validation import check_count

if TYPE_CHECKING:  # matplotlib is imported when a figure is made, not with the package
    from types import ModuleType

    from matplotlib.axes import Axes
    from matplotlib.colorbar import Colorbar
    from matplotlib.figure import Figure, SubFigure
    from matplotlib.image import AxesImage

LINESTYLES = ("--", "-", ":", "-.")

#: matplotlib's "tab10" colours, then "Dark2": the set colours (:func:`set_colours`), cycled past 18 sets
SET_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")

#: the percentile of the data that sets the heatmaps' colour limits (the rest saturates, shown by the colourbar's
#: arrows): one extreme filter should not wash out every other one
ROBUST_PERCENTILE = 99.0

#: R² across sets is a regression on one point per set: under this many sets a figure says it means little
MIN_SETS_FOR_R2 = 4

#: at most this many image labels on a heatmap panel's axis; more get index ticks
MAX_IMAGE_LABELS = 30

#: the words for a layer's units (:func:`layer_unit_name`) and for the heatmaps' values and titles
_UNIT_WORDS = {
    "filter": ("filter mean", "Filter means (mean over y, x)"),
    "channel": ("channel mean", "Channel means (mean over y, x)"),
    "unit": ("activation", "Unit activations"),
    "class": ("activation", "Class activations"),
}


def _pyplot() -> ModuleType:
    import matplotlib.pyplot as plt

    return plt


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure | SubFigure, Axes]:
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def _layer_ticks(ax: Axes, layers: Sequence[str]) -> None:
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(layers) - 0.5)


def _integer_ticks(axis: Any, nbins: int | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=nbins if nbins is not None else "auto", integer=True))


def _ordinal(value: float) -> str:
    """``1st``, ``2nd``, ``3rd``, ``11th``, ``99th``, ``2.5th``."""
    if not float(value).is_integer():
        return f"{value:g}th"
    n = int(value)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _with_suffix(title: str, suffix: str | None) -> str:
    return f"{title}\n{suffix}" if suffix else title


def _suptitle(fig: Figure, text: str, fontsize: float = 10) -> None:
    """``fig``'s title, each line wrapped to the figure's width: a long note (the sets of a sample, the weights)
    under the title of a narrow figure (two RDM panels) would otherwise run off both sides."""
    import textwrap

    width = max(int(fig.get_figwidth() * 72 / (0.6 * fontsize)), 40)  # characters of ~0.6 em in the figure's width
    lines = [wrapped for line in text.split("\n")
             for wrapped in (textwrap.wrap(line, width, break_on_hyphens=False) or [""])]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


# ------------------------------------------------------------------------------------------------ set colours
def set_colours(sets: Iterable[Any]) -> dict[str, str]:
    """One colour per set name, from the sorted names.

    The mapping depends only on which names are given, not on their order nor on which of them a figure shows: the
    figures of one analysis (the differentiation lines, the noise-normalised lines without the reference, the
    heatmap and RDM set labels) draw each set in the same colour when they are given this mapping of all its sets.

    Parameters
    ----------
    sets
        Set names (repeats allowed, e.g. a ``set`` coordinate along ``image``).

    Returns
    -------
    dict
        ``{set name: colour}`` (hex strings from :data:`SET_PALETTE`, cycled past its length).
    """
    names = sorted({str(s) for s in (sets.ravel() if isinstance(sets, np.ndarray) else sets)})
    return {name: SET_PALETTE[i % len(SET_PALETTE)] for i, name in enumerate(names)}


def _colours_for(names: Iterable[Any], colours: Mapping[str, str] | None) -> dict[str, str]:
    """``colours`` when given (it must cover ``names``), else :func:`set_colours` of ``names``."""
    names = [str(n) for n in names]
    if colours is None:
        return set_colours(names)
    missing = [n for n in names if n not in colours]
    if missing:
        raise ValueError(f"colours has no colour for sets {missing}; pass colours=plot.set_colours(<all set names>)")
    return dict(colours)


# ------------------------------------------------------------------------------------------------ line figures
def _distance_words(attrs: Mapping[Any, Any]) -> str:
    """``"median pairwise euclidean distance / √m, norm=layer"`` from a result's attributes."""
    if attrs.get("metric") is None:
        return "median distance per unit"
    return f"{attrs.get('reduction', 'median')} pairwise {_distance_label(attrs)}, norm={attrs.get('norm')}"


def _distance_label(attrs: Mapping[Any, Any]) -> str:
    """The distance named in a result's attributes, as its spec names it (``"euclidean distance / √m"``)."""
    spec = DISTANCES.get((attrs.get("norm"), attrs.get("metric")))  # type: ignore[arg-type]  # any attrs
    return spec.label if spec is not None else f"{attrs.get('metric')} distance"


def _line_panel(ax: Axes, d: xr.DataArray, interval: float, ylabel: str, colours: Mapping[str, str], *,
                reference: str | None = None, bootstrap: xr.DataArray | None = None) -> None:
    """One line per set (its colour) and n_units (line style), the resample interval as a band (said in the
    legend: it is the spread over unit redraws, not over images); ``reference``: a grey line at 1 for that set;
    ``bootstrap``: error bars, the percentile interval over image resamples (:func:`_bootstrap_bars`)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    d = d.compute()
    layers = [str(v) for v in d["layer"].values]
    x = np.arange(len(layers))
    n_resamples = d.sizes["resample"] if "resample" in d.dims else 1
    summary = resample_summary(d, interval=interval) if n_resamples > 1 else None
    centre = summary["mean"] if summary is not None else (d.mean("resample") if "resample" in d.dims else d)
    n_units_values = list(d["n_units"].values) if "n_units" in d.dims else [None]
    for set_name in d["set"].values:
        colour = colours[str(set_name)]
        for k, n in enumerate(n_units_values):
            pick = {"set": set_name, **({"n_units": n} if n is not None else {})}
            label = f"{set_name}" + (f", {n} units" if n is not None else "")
            ax.plot(x, centre.sel(pick).values, LINESTYLES[k % len(LINESTYLES)], color=colour, label=label,
                    marker=".")
            if summary is not None:
                ax.fill_between(x, summary["lower"].sel(pick).values, summary["upper"].sel(pick).values,
                                color=colour, alpha=0.15, linewidth=0)
            if bootstrap is not None:
                _bootstrap_bars(ax, x + 0.08 * (k - (len(n_units_values) - 1) / 2), bootstrap.sel(pick), interval,
                                colour)
    if reference is not None:
        ax.axhline(1.0, color="grey", linewidth=0.8, label=f"{reference} (the reference: 1)")
    _layer_ticks(ax, layers)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.4)
    handles, _ = ax.get_legend_handles_labels()
    if summary is not None:
        low, high = 50 * (1 - interval), 50 * (1 + interval)
        handles.append(Patch(facecolor="0.5", alpha=0.3, linewidth=0,
                             label=f"band: {low:g}–{_ordinal(high)} percentile over\n{n_resamples} unit redraws "
                                   "(resamples of the\nsampled units), not over images"))
        legend_title = f"set, units drawn\n(line: mean of {n_resamples} redraws)"
    else:
        legend_title = "set, units drawn" + ("\n(one draw: no interval)" if n_units_values != [None] else "")
    if bootstrap is not None:
        low, high = 50 * (1 - interval), 50 * (1 + interval)
        handles.append(Line2D([], [], color="0.3", marker="_", linestyle="-", linewidth=1.0,
                              label=f"bars: {low:g}–{_ordinal(high)} percentile over\n{bootstrap.sizes['bootstrap']} "
                                    "image bootstraps (images\nresampled with replacement)"))
    ax.legend(handles=handles, fontsize=7, title=legend_title, title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def differentiation_by_layer(d: xr.DataArray, ax: Axes | None = None, *, interval: float = 0.95,
                             title: str | None = None, note: str | None = None,
                             colours: Mapping[str, str] | None = None,
                             bootstrap: xr.DataArray | None = None) -> tuple[Figure | SubFigure, Axes]:
    """Differentiation by layer: a line per set, a line style per ``n_units``, a band for the resample interval.

    ``d`` is :func:`cnndiff_xr.differentiation` output (dims set, layer, n_units, resample). ``colours``: the set
    colours (default :func:`set_colours` of ``d``'s sets). ``bootstrap``: a
    :func:`cnndiff_xr.bootstrap_differentiation` of the same sets, layers and draws; adds error bars, the central
    ``interval`` of the bootstrap distribution over images (of the mean over unit redraws), so both sources of
    uncertainty show: the band over units, the bars over images.
    """
    fig, ax = _axes(ax, (13, 4.5))
    _line_panel(ax, d, interval, f"differentiation\n({_distance_words(d.attrs)})",
                _colours_for(d["set"].values, colours),
                bootstrap=None if bootstrap is None else bootstrap.compute())
    ax.set_title(_with_suffix(title or "Differentiation by layer", note))
    return fig, ax


def _bootstrap_interval(b: xr.DataArray, interval: float) -> tuple[np.ndarray, np.ndarray]:
    """Central ``interval`` over ``bootstrap`` (percentiles, as numpy's) of ``b`` averaged over its unit redraws."""
    if "resample" in b.dims:
        b = b.mean("resample")
    q = np.nanpercentile(np.asarray(b.transpose(..., "bootstrap").values), [50 * (1 - interval),
                                                                           50 * (1 + interval)], axis=-1)
    return q[0], q[1]


def _bootstrap_bars(ax: Axes, x: np.ndarray, b: xr.DataArray, interval: float, colour: str) -> None:
    """Error bars from the lower to the upper bootstrap percentile at each layer (no marker: the line has one)."""
    lower, upper = _bootstrap_interval(b, interval)
    ax.vlines(x, lower, upper, color=colour, linewidth=1.2, alpha=0.8)
    ax.plot(x, lower, "_", color=colour, markersize=5, alpha=0.8)
    ax.plot(x, upper, "_", color=colour, markersize=5, alpha=0.8)


def set_comparison(c: xr.Dataset, ax: Axes | None = None, *, interval: float = 0.95, alpha: float = 0.05,
                   bootstrap: xr.DataArray | None = None, title: str | None = None, note: str | None = None
                   ) -> tuple[Figure | SubFigure, Axes]:
    """The per-layer comparison of two sets (:func:`cnndiff_xr.compare_sets`): their difference in differentiation
    (mean over unit redraws), a grey bar for the central ``interval`` of the permutation null (what relabelling the
    images gives: a difference outside it is unusual), and ``*`` over the layers whose Holm-adjusted p (over the
    layers) is below ``alpha``. A marker shape per ``n_units``.

    ``bootstrap``: a :func:`cnndiff_xr.bootstrap_differentiation` holding both sets (same layers and draws); adds the
    bootstrap interval over images of the difference (each set's images resampled independently) as error bars.
    """
    from matplotlib.lines import Line2D

    fig, ax = _axes(ax, (13, 4.5))
    c = c.compute()
    a, b = str(c.attrs.get("a", c["set"].values[0])), str(c.attrs.get("b", c["set"].values[1]))
    layers = [str(v) for v in c["layer"].values]
    x = np.arange(len(layers))
    n_values = list(c["n_units"].values)
    width = 0.6 / max(1, len(n_values))
    lo_q, hi_q = 50 * (1 - interval), 50 * (1 + interval)
    if bootstrap is not None:
        boot = bootstrap.sel(set=[a, b]).compute()
    markers = ("o", "s", "^", "D")
    top = []
    for k, n in enumerate(n_values):
        xs = x + (k - (len(n_values) - 1) / 2) * width
        pick = c.sel(n_units=n)
        null_lo, null_hi = np.percentile(pick["null"].values, [lo_q, hi_q], axis=-1)
        null_label = (f"null: {lo_q:g}–{_ordinal(hi_q)} percentile of the\ndifferences of "
                      f"{c.sizes['permutation']} relabellings\nof the images (same draws)")
        ax.bar(xs, null_hi - null_lo, bottom=null_lo, width=width * 0.8, color="0.85", edgecolor="0.6",
               linewidth=0.5, label=null_label if k == 0 else None)
        diff = pick["difference"].values
        ax.plot(xs, diff, markers[k % len(markers)], color="black", markersize=5, linestyle="none",
                label=f"{a} − {b}, {n} units")
        highs = [np.maximum(diff, null_hi)]
        if bootstrap is not None:
            d = boot.sel(set=a, n_units=n, drop=True) - boot.sel(set=b, n_units=n, drop=True)
            lower, upper = _bootstrap_interval(d, interval)
            boot_label = (f"{a} − {b}: {lo_q:g}–{_ordinal(hi_q)} percentile\n"
                          f"over {boot.sizes['bootstrap']} image bootstraps")
            ax.errorbar(xs, diff, yerr=[diff - lower, upper - diff], fmt="none", ecolor="tab:blue", elinewidth=1.2,
                        capsize=3, label=boot_label if k == 0 else None)
            highs.append(upper)
        high = np.max(highs, axis=0)
        top.append(high)
        for xi, yi, p in zip(xs, high, pick["p_holm"].values, strict=True):
            if p < alpha:
                ax.annotate("*", (xi, yi), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=13, fontweight="bold")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    _layer_ticks(ax, layers)
    span = np.ptp(np.concatenate([np.ravel(t) for t in top] + [c["difference"].values.ravel()]))
    ax.set_ylim(top=float(np.max(top)) + 0.12 * (span or 1.0))
    ax.set_ylabel(f"differentiation {a} − {b}\n({_distance_words(c.attrs)})")
    ax.grid(True, axis="y", alpha=0.4)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none", marker="$*$", color="black", markersize=8,
                          label=f"Holm-adjusted p < {alpha:g}\n(two-sided, over {len(layers)} layers)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(_with_suffix(title or f"Differentiation: {a} vs {b} by layer", note))
    return fig, ax


def normalised_differentiation(d: xr.DataArray, reference: str = "white_noise", ax: Axes | None = None, *,
                               interval: float = 0.95, title: str | None = None, note: str | None = None,
                               colours: Mapping[str, str] | None = None) -> tuple[Figure | SubFigure, Axes]:
    """Differentiation divided by the reference set's (per layer and draw), the seed's "normalised by noise".

    The reference set (all ones) is left out and drawn as the grey line at 1; the other sets keep the colours they
    have in :func:`differentiation_by_layer` (``colours`` default: :func:`set_colours` of all of ``d``'s sets,
    the reference included). The y axis starts at 0: a ratio is read against 0 and 1.
    """
    fig, ax = _axes(ax, (13, 4.5))
    palette = _colours_for(d["set"].values, colours)
    ratio = normalise_by_reference(d.compute(), reference=reference, drop=True)
    _line_panel(ax, ratio, interval, f"differentiation / {reference}'s\n(ratio per layer and unit draw)", palette,
                reference=reference)
    ax.set_ylim(bottom=0.0)
    ax.set_title(_with_suffix(title or f"Differentiation normalised by {reference}", note))
    return fig, ax


def spectral_differentiation_by_layer(sd: xr.DataArray, ax: Axes | None = None, *, interval: float = 0.95,
                                      title: str | None = None, note: str | None = None,
                                      colours: Mapping[str, str] | None = None) -> tuple[Figure | SubFigure, Axes]:
    """Spectral differentiation of a movie set by layer: a line per ``n_units`` (line style), a band for the
    resample interval, as :func:`differentiation_by_layer`.

    ``sd`` is :func:`cnndiff_xr.spectral_differentiation` output of a store or Dataset (dims ``layer`` and, when
    units were drawn, ``n_units`` and ``resample``). The line takes the analysed set's colour (``colours``:
    default :func:`set_colours` of that set alone; pass the store's mapping to match its other figures).
    """
    if "layer" not in sd.dims:
        raise ValueError(f"sd needs a layer dimension (a store's or Dataset's result), got dims {sd.dims}")
    set_name = str(sd.attrs.get("set", "all"))
    fig, ax = _axes(ax, (13, 4.5))
    per_dimension = sd.attrs.get("scale") == "per_dimension"
    distance = "Euclidean distance" + (" / √(units × frequencies)" if per_dimension else "")
    ylabel = (f"spectral differentiation\n({sd.attrs.get('reduction', 'median')} pairwise {distance}\n"
              "between the windows' power spectra)")
    _line_panel(ax, sd.expand_dims(set=[set_name]), interval, ylabel, _colours_for([set_name], colours))
    window = sd.attrs.get("window")
    states = sd.attrs.get("n_states")
    default = f"Spectral differentiation by layer: {set_name!r}"
    if window is not None and states is not None:
        default += f", {states} windows of {float(window):g} s at {float(sd.attrs.get('sample_rate', 0)):g} Hz"
    ax.set_title(_with_suffix(title or default, note))
    return fig, ax


def r2_by_depth(regression: xr.Dataset, ax: Axes | None = None, *, title: str | None = None,
                note: str | None = None) -> tuple[Figure | SubFigure, Axes]:
    """R² of layer differentiation regressed on input differentiation across sets, by layer depth.

    ``regression`` is :func:`cnndiff_xr.differentiation.stimulus_regression` output (``r2`` over layer and
    possibly n_units / resample: resamples are averaged, one line per n_units). The title says over how many sets
    the regression ran; under :data:`MIN_SETS_FOR_R2` sets the figure says in red that the R² values mean little
    (each is a line fitted through that many points).
    """
    fig, ax = _axes(ax, (12, 4))
    r2 = regression["r2"].compute()
    n_resamples = r2.sizes["resample"] if "resample" in r2.dims else 1
    if "resample" in r2.dims:
        r2 = r2.mean("resample")
    layers = [str(v) for v in r2["layer"].values]
    x = np.arange(len(layers))
    for k, n in enumerate(r2["n_units"].values if "n_units" in r2.dims else [None]):
        values = r2.sel(n_units=n) if n is not None else r2
        ax.plot(x, values.values, LINESTYLES[k % len(LINESTYLES)], marker="o", color="black",
                label=f"{n} units" if n is not None else None)
    _layer_ticks(ax, layers)
    n_points = int(regression.attrs["n"]) if "n" in regression.attrs else None
    dim = str(regression.attrs.get("dim", "set"))
    source = regression.attrs.get("input_layer", "the input layer")
    over = f"{n_points} {dim}s" if n_points is not None else f"the {dim}s"
    few = n_points is not None and n_points < MIN_SETS_FOR_R2
    ax.set_ylim(-0.05, 1.35 if few else 1.05)  # room above R² = 1 for the warning
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.set_ylabel(f"R² over {over}\n(layer vs {source} differentiation)")
    ax.grid(True, alpha=0.4)
    if n_points is not None and few:
        df = n_points - 2
        ax.text(0.5, 0.97, f"only {n_points} {dim}s: each R² is a line fitted through {n_points} points "
                f"({df} residual degree{'' if df == 1 else 's'} of freedom) — nearly meaningless; "
                f"use ≥ {MIN_SETS_FOR_R2} {dim}s",
                transform=ax.transAxes, ha="center", va="top", fontsize=9, color="firebrick",
                bbox={"facecolor": "white", "edgecolor": "firebrick", "alpha": 0.9})
    if "n_units" in r2.dims:
        ax.legend(fontsize=8, title="units drawn" + (f" (mean R² of {n_resamples} redraws)" if n_resamples > 1
                                                     else ""), title_fontsize=8, loc="best")
    default = (f"Stimulus vs layer differentiation: R² across {over} (one point per {dim}); "
               f"{source} itself is 1 by construction")
    ax.set_title(_with_suffix(title or default, note))
    return fig, ax


# ------------------------------------------------------------------------------------------------ heatmaps
def _sets_of(da_: xr.DataArray, sets: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(str(s) for s in da_["set"].values))
    return present if sets is None else [s for s in sets if s in present]


def layer_unit_name(tree: xr.DataTree, layer: str) -> str:
    """What a layer's ``filter`` axis counts: ``"channel"`` (the input), ``"filter"`` (a layer with y, x),
    ``"class"`` (the store's last layer when it is dense: the prediction layer) or ``"unit"`` (another dense layer).
    """
    if layer == schema.INPUT_LAYER:
        return "channel"
    activation = tree[layer].dataset[schema.ACTIVATION]
    # a reduced layer (image, unit) records the dimensions of its full output
    dims = tuple(activation.attrs.get(schema.LAYER_DIMS_ATTR, activation.dims[1:]))
    if dims != (schema.FILTER_DIM,):
        return "filter"
    return "class" if layer == str(tree.attrs[schema.LAYERS_ATTR][-1]) else "unit"


def _robust_limits(values: np.ndarray, *, symmetric: bool, percentile: float) -> tuple[float, float]:
    """Colour limits from the data: ±(percentile of |x|) when ``symmetric``, else the (100 - p)th..pth
    percentiles; never an empty range."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        bound = float(np.percentile(np.abs(finite), percentile))
        bound = bound if bound > 0 else float(np.max(np.abs(finite))) or 1.0
        return -bound, bound
    low, high = (float(v) for v in np.percentile(finite, [100 - percentile, percentile]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
    return low, high


def _extend(values: np.ndarray, low: float, high: float) -> str:
    """The colourbar's arrows: which ends of the scale some values lie beyond (saturated)."""
    below, above = bool(np.any(values < low)), bool(np.any(values > high))
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")


def _image_ticks(ax: Axes, images: np.ndarray, set_name: str, *, max_labels: int = MAX_IMAGE_LABELS) -> None:
    """Image ids (without the ``set/`` prefix) as y tick labels where they fit, else integer index ticks: the row's
    index among the set's images drawn, which is not its index in the set when a figure draws a sample of it."""
    if len(images) <= max_labels:
        prefix = f"{set_name}/"
        labels = [str(i)[len(prefix):] if str(i).startswith(prefix) else str(i) for i in images]
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=6 if len(labels) <= 15 else 5)
        ax.set_ylabel("image", fontsize=8)
    else:
        _integer_ticks(ax.yaxis)
        ax.set_ylabel("image (index among those shown)", fontsize=8)


def _colourbar(fig: Figure | SubFigure, image: AxesImage, axes: Iterable[Axes], label: str, extend: str,
               **kwargs: Any) -> Colorbar:
    bar = fig.colorbar(image, ax=list(axes), extend=extend, **kwargs)
    bar.set_label(label, fontsize=8)
    return bar


def filter_mean_heatmap(fm: xr.DataArray, fig: Figure | None = None, *, sets: Sequence[str] | None = None,
                        vmin: float | None = None, vmax: float | None = None, title: str | None = None,
                        note: str | None = None, layer: str | None = None, unit_name: str | None = None,
                        zscore: bool | None = None, colours: Mapping[str, str] | None = None,
                        percentile: float = ROBUST_PERCENTILE) -> tuple[Figure, np.ndarray]:
    """Filter means of one layer as heatmaps (image x filter), one panel per set (the seed's figure).

    Parameters
    ----------
    fm
        One layer of :func:`cnndiff_xr.filter_means` (dims image, filter; coordinate ``set``), e.g.
        ``filter_means(tree)[layer]["filter_mean"]``.
    fig
        A Figure to draw into (default a new one).
    sets
        The sets to show, in this order (default all, in ``fm``'s order).
    vmin, vmax
        Fixed colour limits; by default both come from the data: ±(the ``percentile``-th percentile of |value|)
        around 0 on a diverging map for z-scored means, the (100 - p)th..pth percentiles otherwise. One scale for
        all panels; the colourbar label says which, and its arrows show that values beyond it saturate.
    title, note
        The title (default "Filter means, layer <layer>", with the layer's unit noun) and a line under it.
    layer
        The layer's name (default ``fm.attrs["layer"]``).
    unit_name
        What the filter axis counts: ``"filter"``, ``"channel"``, ``"unit"`` or ``"class"`` (default
        ``"channel"`` for the input layer, else ``"filter"``; :func:`layer_unit_name` tells it from a store).
    zscore
        Whether the means are z-scored (default ``fm.attrs["zscore"]``; unknown: the scale is symmetric when the
        values have both signs).
    colours
        The set colours of the panel titles (default :func:`set_colours` of ``fm``'s sets).
    percentile
        The percentile behind the default colour limits.

    Returns
    -------
    (Figure, numpy.ndarray of Axes)
        One Axes per set.
    """
    plt = _pyplot()
    fm = fm.compute()
    layer = layer if layer is not None else (str(fm.attrs["layer"]) if "layer" in fm.attrs else None)
    zscore = zscore if zscore is not None else (bool(fm.attrs["zscore"]) if "zscore" in fm.attrs else None)
    noun = unit_name or ("channel" if layer == schema.INPUT_LAYER else "filter")
    if noun not in _UNIT_WORDS:
        raise ValueError(f"unit_name must be one of {sorted(_UNIT_WORDS)}, got {noun!r}")
    quantity, heading = _UNIT_WORDS[noun]
    names = _sets_of(fm, sets)
    palette = _colours_for(fm["set"].values, colours)
    parts = {name: fm.isel(image=np.asarray(fm["set"].values == name)) for name in names}
    values = np.concatenate([p.values.ravel() for p in parts.values()]) if parts else np.zeros(0)
    symmetric = zscore if zscore is not None else bool(values.size and values.min() < 0 < values.max())
    low, high = _robust_limits(values, symmetric=symmetric, percentile=percentile)
    if vmin is not None or vmax is not None:
        low, high = (vmin if vmin is not None else low), (vmax if vmax is not None else high)
        scale = f"colour scale fixed: {low:.3g} … {high:.3g}"
    elif symmetric:
        scale = f"colour scale ±{high:.3g}: {_ordinal(percentile)} pct of |value|"
    else:
        scale = f"colour scale {low:.3g} … {high:.3g}: {_ordinal(100 - percentile)}–{_ordinal(percentile)} pct"
    what = f"z-scored {quantity}" if zscore else quantity
    how = {True: "z-scored within each set over its images × the layer's units", False: "raw activations",
           None: ""}[zscore]
    if fig is None:
        # a row per image up to the images that can be labelled; past them (index ticks) the height stops growing:
        # 500 images would make a panel 70 inches tall
        tallest = min(max((p.sizes["image"] for p in parts.values()), default=1), MAX_IMAGE_LABELS)
        fig = plt.figure(figsize=(4.5 * len(names) + 1.5, max(3.2, 1.5 + 0.14 * tallest)), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    image = None
    for ax, name in zip(axes, names, strict=True):
        part = parts[name]
        # "auto": nearest when each cell gets several pixels, antialiased when a layer has more units than the
        # panel has pixels (nearest would silently drop columns)
        image = ax.imshow(part.values, aspect="auto", interpolation="auto", vmin=low, vmax=high,
                          cmap="RdBu_r" if symmetric else "viridis")
        ax.set_title(name, fontsize=9, color=palette[name], fontweight="bold")
        ax.set_xlabel(noun, fontsize=8)
        _integer_ticks(ax.xaxis, nbins=5)  # 5-digit unit indices fit a 4.5-inch panel
        _image_ticks(ax, part["image"].values, name)
    if image is not None:
        _colourbar(fig, image, axes, f"{what}\n{scale}", _extend(values, low, high), shrink=0.9)
    named = (f"{heading}, layer {layer}" if layer else heading) + (f"; {how}" if how else "")
    _suptitle(fig, _with_suffix(title or named, note))
    return fig, axes


def _is_softmax(values: np.ndarray) -> bool:
    """Non-negative rows summing to 1 (to float16 precision): probabilities."""
    if values.size == 0 or values.ndim != 2 or np.any(values < 0):
        return False
    return bool(np.allclose(values.astype(np.float64).sum(axis=1), 1.0, atol=1e-2))


def prediction_heatmap(predictions: xr.DataArray, fig: Figure | None = None, *, sets: Sequence[str] | None = None,
                       title: str | None = None, note: str | None = None, layer: str | None = None,
                       colours: Mapping[str, str] | None = None) -> tuple[Figure, np.ndarray]:
    """The prediction layer's activations (image x class), one panel per set (the seed's first figure).

    All panels share one colour scale (0 to the largest value when none is negative: no value saturates) and one
    labelled colourbar, so that panels compare; each panel names its images where they fit (ids without the
    ``set/`` prefix) and its set in the set's colour (``colours``, default :func:`set_colours` of the sets).
    ``layer`` names the layer in the title.
    """
    plt = _pyplot()
    predictions = predictions.compute()
    names = _sets_of(predictions, sets)
    palette = _colours_for(predictions["set"].values, colours)
    parts = {name: predictions.isel(image=np.asarray(predictions["set"].values == name)) for name in names}
    values = np.concatenate([p.values.ravel() for p in parts.values()]) if parts else np.zeros(0)
    finite = values[np.isfinite(values)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    high = high if high > low else low + 1e-9
    probabilities = _is_softmax(np.concatenate([p.values for p in parts.values()])) if parts else False
    quantity = "softmax probability" if probabilities else "activation"
    # panels as tall as their images up to the images that can be labelled (then index ticks), not beyond it
    heights = [min(max(p.sizes["image"], 1), MAX_IMAGE_LABELS) for p in parts.values()]
    if fig is None:
        fig = plt.figure(figsize=(14, 1.3 + sum(0.45 + 0.13 * h for h in heights)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False, sharex=True,
                        gridspec_kw={"height_ratios": heights} if heights else None)[:, 0]
    image = None
    for ax, name in zip(axes, names, strict=True):
        part = parts[name]
        image = ax.imshow(part.values, aspect="auto", interpolation="nearest", vmin=low, vmax=high, cmap="viridis")
        _image_ticks(ax, part["image"].values, name)
        ax.set_ylabel(name, fontsize=8, color=palette[name], fontweight="bold")
        _integer_ticks(ax.xaxis)
    if len(names):
        axes[-1].set_xlabel(f"class (unit index of layer {layer})" if layer else "class (unit index)")
    if image is not None:
        _colourbar(fig, image, axes, f"{quantity}\n(one scale for all sets: {low:.3g} … {high:.3g}, the range of the "
                   "values)", "neither", shrink=0.9, pad=0.01)
    heading = f"Activations in the prediction layer ({layer})" if layer else "Activations in the prediction layer"
    _suptitle(fig, _with_suffix(title or heading, note))
    return fig, axes


def _by_set(rdm: xr.DataArray, order: Sequence[str]) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """The RDM's values with images grouped by set (stable: the images' order within a set is kept) and the
    ``(set, first row, end row)`` blocks; no blocks when the RDM has no ``set`` coordinate."""
    values = np.asarray(rdm.values)
    first_dim = rdm.dims[0]
    labels_coord = next((c for name, c in rdm.coords.items() if name == schema.SET_COORD
                         and c.dims == (first_dim,)), None)
    if labels_coord is None:
        return values, []
    labels = np.asarray(labels_coord.values).astype(str)
    rank = {name: k for k, name in enumerate(order)}
    for name in labels:
        rank.setdefault(str(name), len(rank))
    index = np.argsort([rank[str(s)] for s in labels], kind="stable")
    values = values[np.ix_(index, index)]
    sorted_labels = labels[index]
    blocks = []
    start = 0
    for name in dict.fromkeys(sorted_labels):
        end = start + int(np.sum(sorted_labels == name))
        blocks.append((str(name), start, end))
        start = end
    return values, blocks


def _rdm_scale_words(attrs: Mapping[Any, Any]) -> str:
    if attrs.get("metric") is None:
        return "distance"
    units = attrs.get("n_units")
    drawn = f"m ≤ {units} {attrs.get('unit_type', 'random')} units per layer" if units is not None else "m units"
    return f"{_distance_label(attrs)}, norm={attrs.get('norm')}\n({drawn}, seed {attrs.get('seed')})"


def rdm_panels(rdms: dict[str, xr.DataArray] | xr.DataArray, fig: Figure | None = None, *, ncols: int = 6,
               title: str | None = None, note: str | None = None,
               colours: Mapping[str, str] | None = None) -> tuple[Figure, np.ndarray]:
    """RDMs (image x image) per layer, one panel each, sharing one colour scale.

    Images are grouped by set (in the order the sets first appear), with lines at the set boundaries and the set
    names as tick labels in their colours (``colours``, default :func:`set_colours` of the sets): y labels on the
    first column, x labels on the panels with no panel below. The colourbar names the distance (metric, norm,
    units drawn, from the RDMs' attributes); the panel titles give the units used per layer.
    """
    plt = _pyplot()
    if isinstance(rdms, xr.DataArray):
        rdms = {str(rdms.attrs.get("layer", rdms.name or "rdm")): rdms}
    rdms = {k: v.compute() for k, v in rdms.items()}
    n = len(rdms)
    cols = max(min(ncols, n), 1)
    rows = int(np.ceil(n / cols))
    if fig is None:
        fig = plt.figure(figsize=(2.6 * cols + 1.6, 2.6 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    set_order = list(dict.fromkeys(str(s) for v in rdms.values() if schema.SET_COORD in v.coords
                                   for s in np.asarray(v[schema.SET_COORD].values).ravel()))
    palette = _colours_for(set_order, colours)
    grouped = {layer: _by_set(v, set_order) for layer, v in rdms.items()}
    finite = [v[np.isfinite(v)] for v, _ in grouped.values()]
    vmax = max((float(f.max()) for f in finite if f.size), default=1.0) or 1.0
    image = None
    for k, (ax, (layer, (values, blocks))) in enumerate(zip(axes, grouped.items(), strict=False)):
        image = ax.imshow(values, vmin=0, vmax=vmax, cmap="magma", interpolation="nearest")
        used = rdms[layer].attrs.get("n_units_used")
        ax.set_title(layer if used is None else f"{layer}\nm = {used} units", fontsize=7)
        centres = [(start + end - 1) / 2 for _, start, end in blocks]
        for _, _, end in blocks[:-1]:
            ax.axhline(end - 0.5, color="white", linewidth=0.8)
            ax.axvline(end - 0.5, color="white", linewidth=0.8)
        ax.set_xticks(centres)
        ax.set_yticks(centres)
        first_column, bottom = k % cols == 0, k + cols >= n
        ax.set_yticklabels([name for name, _, _ in blocks] if first_column else [], fontsize=7)
        ax.set_xticklabels([name for name, _, _ in blocks] if bottom else [], fontsize=7, rotation=45, ha="right")
        for label, (name, _, _) in zip(ax.get_yticklabels() + ax.get_xticklabels(), blocks + blocks, strict=False):
            label.set_color(palette[name])
        ax.tick_params(length=0)
    for ax in axes[n:]:
        ax.set_visible(False)
    if image is not None:
        first = next(iter(rdms.values()))
        _colourbar(fig, image, axes[:n], f"{_rdm_scale_words(first.attrs)}\none scale for all layers: 0 … {vmax:.3g}",
                   "neither", shrink=0.8)
    _suptitle(fig, _with_suffix(title or "RDMs by layer (images grouped by set)", note))
    return fig, axes[:n]


# ------------------------------------------------------------------------------------------------ files
#: the fixed colour range of each layer-similarity method (:func:`similarity_matrix`) and the words for it: biased
#: CKA and the cosine of two RDMs (non-negative distances) lie in [0, 1]; unbiased CKA, Spearman and Kendall in
#: [-1, 1]
_SIMILARITY_SCALES = {
    "cka": (0.0, 1.0, "linear CKA (biased HSIC)"),
    "cka_unbiased": (-1.0, 1.0, "linear CKA (unbiased HSIC)"),
    "rsa_spearman": (-1.0, 1.0, "RDM Spearman ρ"),
    "rsa_kendall": (-1.0, 1.0, "RDM Kendall τ-a"),
    "rsa_cosine": (0.0, 1.0, "RDM cosine similarity"),
}


def similarity_matrix(sim: xr.DataArray, ax: Axes | None = None, *, title: str | None = None,
                      note: str | None = None, annotate: bool | None = None) -> tuple[Figure | SubFigure, Axes]:
    """Layer-by-layer similarity (:func:`cnndiff_xr.layer_similarity`) as a heatmap, layer names on both axes.

    The colour range is fixed by the method, not by the data -- [0, 1] for CKA and the RDMs' cosine, [-1, 1] for
    unbiased CKA, Spearman and Kendall -- so matrices of different stores, draws or layers can be read side by side;
    the colourbar names the method and the range. NaN entries (undefined comparisons) are grey. ``annotate``: write
    the values in the cells (default: when both axes have at most 12 layers).
    """
    from matplotlib import colormaps

    sim = sim.compute()
    method = str(sim.attrs.get("method", ""))
    low, high, words = _SIMILARITY_SCALES.get(method, (-1.0, 1.0, method or "similarity"))
    rows, columns = [str(v) for v in sim["layer"].values], [str(v) for v in sim["layer_other"].values]
    fig, ax = _axes(ax, (max(6.0, 3.2 + 0.45 * len(columns)), 2.4 + 0.45 * len(rows)))
    cmap = colormaps["viridis" if low == 0 else "RdBu_r"].with_extremes(bad="0.8")
    values = np.asarray(sim.values, dtype=np.float64)
    image = ax.imshow(np.ma.masked_invalid(values), vmin=low, vmax=high, cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    two = int(sim.attrs.get("stores", 1)) == 2
    ax.set_ylabel("layer" + (" (store)" if two else ""))
    ax.set_xlabel("layer" + (" (other store)" if two else ""))
    if annotate if annotate is not None else max(len(rows), len(columns)) <= 12:
        for i in range(len(rows)):
            for j in range(len(columns)):
                if np.isfinite(values[i, j]):
                    shade = (values[i, j] - low) / (high - low)
                    dark = shade < 0.6 if low == 0 else abs(shade - 0.5) > 0.3
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    units = sim.attrs.get("n_units", "all")
    drawn = "every unit" if units == "all" else (f"{units} {sim.attrs.get('unit_type', 'random')} units, seed "
                                                  f"{sim.attrs.get('seed')}, resample {sim.attrs.get('resample')}")
    distance = (f", {sim.attrs.get('metric')} distance, norm={sim.attrs.get('norm')}"
                if method.startswith("rsa") else "")
    _colourbar(fig, image, [ax], f"{words}\nfixed scale {low:g} … {high:g}", "neither", shrink=0.9)
    default = f"Layer similarity: {words}\n{sim.attrs.get('n_images', '?')} images, {drawn}{distance}"
    ax.set_title(_with_suffix(title or default, note), fontsize=9)
    return fig, ax


def save(fig: Figure | SubFigure, path_stem: str | Path, formats: Sequence[str] = ("png", "svg"),
         dpi: int = 110, *, folder: str | Path | None = None, label: object = None) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.png`` and ``.svg`` (or the given formats) and close it.

    The format is appended (a stem ``filter_means/block1.conv`` gives ``block1.conv.png``). ``folder``: the output
    folder, which every file must resolve inside (:func:`~cnndiff_xr.outputs.check_inside`; ``label``: the data's
    name the stem was made from, for the message). Every text of the figure is made plain first
    (:func:`plain_text`): labels from the data can neither break the SVG nor make matplotlib fail."""
    root = fig.get_figure(root=True)  # a Figure is its own root; a SubFigure is saved with its whole figure
    assert root is not None
    stem = Path(path_stem)
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    if folder is not None:
        for path in paths:
            check_inside(path, folder, label=label)
    _plain_texts(root)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        root.savefig(path, dpi=dpi)
    _pyplot().close(root)
    return paths


#: the longest line of a figure's text; longer lines (a label from the data can be any length) end in "…"
MAX_TEXT_LINE = 300


def plain_text(text: str) -> str:
    """``text`` as matplotlib draws it literally: control and format characters (other than the newline) escaped as
    ``\\xNN``/``\\uNNNN`` (an SVG cannot hold most of them, and bidirectional overrides would disguise a name),
    every ``$`` escaped (a label from the data must not start mathtext, whose parser raises on what it cannot read),
    each line cut at :data:`MAX_TEXT_LINE` characters. Idempotent: an escaped text stays as it is."""
    escaped = "".join(
        ch if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs")
        else f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000
        else f"\\U{ord(ch):08x}"
        for ch in text)
    escaped = re.sub(r"(?<!\\)\$", r"\\$", escaped)
    return "\n".join(line if len(line) <= MAX_TEXT_LINE else line[:MAX_TEXT_LINE - 1] + "…"
                     for line in escaped.split("\n"))


def _plain_texts(fig: Figure) -> None:
    """Every text of ``fig`` through :func:`plain_text`: titles, axis labels, legends, annotations and tick labels.
    Tick labels given as strings live in the axis' formatter (a ``FuncFormatter`` since matplotlib 3.9, a
    ``FixedFormatter`` before), which sets them again when the figure is drawn: it is wrapped too. Numeric formatters
    are left alone (their mathtext is matplotlib's own)."""
    from matplotlib.text import Text
    from matplotlib.ticker import FixedFormatter, FuncFormatter

    for artist in fig.findobj(Text):
        text = artist.get_text()
        if text:
            artist.set_text(plain_text(text))
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for formatter in (axis.get_major_formatter(), axis.get_minor_formatter()):
                if isinstance(formatter, FixedFormatter):
                    formatter.seq = [plain_text(str(item)) for item in formatter.seq]
                elif isinstance(formatter, FuncFormatter):
                    formatter.func = _PlainLabels(formatter.func)


@dataclass(frozen=True)
class _PlainLabels:
    """A ``FuncFormatter``'s function whose labels go through :func:`plain_text`."""

    func: Callable[..., Any]

    def __call__(self, x: Any, pos: Any = None) -> str:
        return plain_text(str(self.func(x, pos)))


def figure_note(attrs: Mapping[Any, Any]) -> str | None:
    """A loud note for figures made with random weights (from a store's provenance)."""
    weights = str(attrs.get("weights", ""))
    if weights.startswith("random"):
        return f"RANDOM WEIGHTS ({weights}) — not ImageNet: these numbers are not the seed's"
    return None


def _with_note(*notes: str | None) -> str | None:
    """The lines under a figure's title: the given notes that are not None, one per line (None if none)."""
    given = [n for n in notes if n]
    return "\n".join(given) if given else None


# ------------------------------------------------------------------------------------------------ image samples
#: the most images per set that the store and filter-mean figures draw (:func:`image_sample`): an RDM of 20,000
#: images is 400 million cells on a panel of a few hundred pixels, and reading every image of a large store for
#: figures that cannot show them would take as long as the analysis itself
MAX_IMAGES_PER_SET = 500

#: the default seed of that sample (fixed: the same store gives the same figures)
SAMPLE_SEED = 0


@dataclass(frozen=True)
class ImageSample:
    """The images of each set that a figure set draws (:func:`image_sample`).

    ``positions``: their positions along ``image`` (sorted, so that images keep their order); ``shown`` and
    ``total``: per set, in order of first appearance, how many are drawn and how many there are; ``limit`` and
    ``seed``: the cap per set and the sample's seed."""

    positions: np.ndarray
    shown: dict[str, int]
    total: dict[str, int]
    limit: int
    seed: int

    @property
    def subsampled(self) -> bool:
        """Whether some set has more images than ``limit`` (otherwise every image is drawn)."""
        return any(self.shown[name] < self.total[name] for name in self.total)

    def note(self) -> str | None:
        """What a figure title says of the sample: None when every image is drawn, else e.g. ``"500 of 20,000 images
        per set, seeded sample (seed 0)"``, or per set when the sets differ."""
        if not self.subsampled:
            return None
        how = f"seeded sample (seed {self.seed})"
        over = {name: n for name, n in self.total.items() if self.shown[name] < n}
        if len(over) == len(self.total) and len(set(over.values())) == 1:
            return f"{self.limit:,} of {next(iter(over.values())):,} images per set, {how}"
        parts = [f"{name} {self.shown[name]:,} of {n:,}" if name in over else f"{name} all {n:,}"
                 for name, n in self.total.items()]
        if len(parts) > 6:  # a title line, not a table
            return (f"at most {self.limit:,} images per set, {how}: {len(over)} of {len(self.total)} sets "
                    f"subsampled (largest {max(over.values()):,} images)")
        return f"at most {self.limit:,} images per set, {how}: {', '.join(parts)}"


def _set_seed(seed: int, name: str) -> np.random.SeedSequence:
    """The seed of one set's sample: from ``seed`` and the set's name (blake2b, the same in every process, as the
    unit draws' seeds are), so that a set's sample does not depend on the other sets nor on their order."""
    digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return np.random.SeedSequence([seed, digest])


def image_sample(sets: Iterable[Any], *, max_images_per_set: int = MAX_IMAGES_PER_SET,
                 seed: int = SAMPLE_SEED) -> ImageSample:
    """At most ``max_images_per_set`` images of every set, drawn uniformly without replacement (seeded).

    Figures cannot show more than a few hundred images per set (an RDM panel has a few hundred pixels), so the store
    figures draw a sample, chosen before anything is computed: only the sampled images are read. A set with at most
    ``max_images_per_set`` images is drawn whole. The sample depends only on ``seed``, the set's name and its images'
    positions: every layer's figure shows the same images, and a rerun the same figures.

    Parameters
    ----------
    sets
        The set label of every image, in the images' order (a store's ``set`` coordinate).
    max_images_per_set
        The cap per set (an integer >= 1; default :data:`MAX_IMAGES_PER_SET`).
    seed
        The sample's seed (an integer >= 0; default :data:`SAMPLE_SEED`).
    """
    limit = check_count("max_images_per_set", max_images_per_set, 1)
    seed = check_count("seed", seed, 0)
    labels = np.asarray([str(s) for s in (sets.ravel() if isinstance(sets, np.ndarray) else sets)])
    names = list(dict.fromkeys(labels.tolist()))
    chosen, shown, total = [], {}, {}
    for name in names:
        rows = np.flatnonzero(labels == name)
        total[name] = int(rows.size)
        if rows.size > limit:
            rows = np.sort(np.random.default_rng(_set_seed(seed, name)).choice(rows, size=limit, replace=False))
        shown[name] = int(rows.size)
        chosen.append(rows)
    positions = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return ImageSample(positions.astype(np.int64), shown, total, limit, seed)


def sample_store(tree: xr.DataTree, *, max_images_per_set: int = MAX_IMAGES_PER_SET,
                 seed: int = SAMPLE_SEED) -> tuple[xr.DataTree, ImageSample]:
    """The store ``tree`` restricted, lazily, to :func:`image_sample` of its sets, and the sample.

    The tree is returned as it is when no set is larger than the cap (nothing changes: the same graphs, the same
    numbers); otherwise every layer (and its means) keeps only the sampled images (``cnndiff_xr.select``), so an
    analysis of the sampled tree reads only the chunks that hold them."""
    from .extraction.store import select

    sample = image_sample(tree.dataset[schema.SET_COORD].values, max_images_per_set=max_images_per_set, seed=seed)
    if not sample.subsampled:
        return tree, sample
    images = np.asarray(tree.dataset[schema.IMAGE_DIM].values)[sample.positions]
    sampled = select(tree, image=images)
    sampled.attrs = dict(tree.attrs)
    return sampled, sample


# ------------------------------------------------------------------------------------------------ figure sets
# The CLI (`cnndiff plot`) and the demo write their figures through these three functions, so both make the same
# figures with the same names.

#: formats of the one-per-layer heatmaps (a store has up to ~20 layers: PNG only keeps the folder small)
HEATMAP_FORMATS = ("png",)


def rdm_draw(tree: xr.DataTree, rdm_units: int = 10000) -> UnitDraws:
    """The one draw (``n_units``, seed 0 or the registered seed, unit type; resample 0) of the store figures' RDMs.

    A full store: ``rdm_units`` random units, seed 0. A reduced store holds only its registered draws, so the RDMs use
    one of them: the largest registered ``n_units`` not above ``rdm_units`` (the smallest registered when all are
    above it), with the registration's seed and unit type -- the same RDMs as a full store of the same images gives
    for that draw."""
    registered = UnitDraws.from_attrs(tree.attrs.get(schema.UNIT_DRAWS_ATTR))
    if registered is None:
        return UnitDraws(n_units=(rdm_units,), resamples=1, seed=0, unit_type="random")
    below = [n for n in registered.n_units if n <= rdm_units]
    n_units = max(below) if below else min(registered.n_units)
    return UnitDraws(n_units=(n_units,), resamples=1, seed=registered.seed, unit_type=registered.unit_type)


def layers_without_means(tree: xr.DataTree, layers: Sequence[str]) -> list[str]:
    """The ``layers`` whose filter means cannot be computed: reduced layers (only their sampled units are stored)
    of a store extracted without filter means (no ``schema.MEANS_GROUP`` subgroup)."""
    return [layer for layer in layers if layer in tree.children  # an unknown name is for the analysis to refuse
            and schema.UNIT_DIM in tree[layer].dataset[schema.ACTIVATION].dims
            and schema.MEANS_GROUP not in tree[layer].children]


def store_figure_inputs(tree: xr.DataTree, *, layers: Sequence[str] | None = None, rdm_units: int = 10000,
                        max_images_per_set: int = MAX_IMAGES_PER_SET, sample_seed: int = SAMPLE_SEED) -> dict[str, Any]:
    """The lazy analyses behind :func:`write_store_figures`: ``{"filter_means": <DataTree> or None, "rdms": {layer:
    RDM}, "predictions": <DataArray> or None, "sample": ImageSample}``.

    Computed together (``dask.compute`` or ``client.compute``), each layer's chunks are read once for all. Every
    figure draws the same images: at most ``max_images_per_set`` per set, a seeded sample (:func:`sample_store`,
    ``sample_seed``) chosen before anything is computed, so that only those images are read and a 20,000-image store
    is drawn in seconds; the figures say so in their titles (``ImageSample.note``). On a sample, the RDMs' layer
    normalisation and the heatmaps' z-scores are over the sampled images. The RDMs use :func:`rdm_draw` (on a reduced
    store, one of its registered draws). The filter means leave out the layers of :func:`layers_without_means` (None
    when that is every layer): the other figures of such a store can still be drawn, and the caller says what was
    left out. ``predictions``: the store's last layer when it is a whole dense layer (the prediction heatmap).
    """
    import cnndiff_xr as cx

    chosen = list(layers) if layers is not None else list(tree.attrs[schema.LAYERS_ATTR])
    sampled, sample = sample_store(tree, max_images_per_set=max_images_per_set, seed=sample_seed)
    without = set(layers_without_means(sampled, chosen))
    with_means = [layer for layer in chosen if layer not in without]
    draw = rdm_draw(sampled, rdm_units)
    last = str(tree.attrs[schema.LAYERS_ATTR][-1])
    predictions = sampled[last].dataset[schema.ACTIVATION]
    return {
        "filter_means": cx.filter_means(sampled, zscore=True, layers=with_means) if with_means else None,
        "rdms": {layer: cx.rdm(sampled, layer=layer, n_units=draw.max_units, seed=draw.seed,
                               unit_type=draw.unit_type)
                 for layer in chosen},
        "predictions": predictions if predictions.dims == (schema.IMAGE_DIM, schema.FILTER_DIM) else None,
        "sample": sample,
    }


def filter_mean_file(layer: object) -> str:
    """The file of a layer's filter-mean heatmap, relative to the output folder: ``filter_means/<layer>.png``, the
    layer's name made safe (:func:`~cnndiff_xr.outputs.safe_name`: a name from the data never leads elsewhere)."""
    return f"filter_means/{safe_name(layer)}.{HEATMAP_FORMATS[0]}"


def reference_figure_name(reference: object) -> str:
    """The stem of the figure normalised by set ``reference``: ``differentiation_by_<reference>``, the set's name
    made safe (:func:`~cnndiff_xr.outputs.safe_name`)."""
    return f"differentiation_by_{safe_name(reference)}"


def distinct_file_names(labels: Iterable[Any], *, what: str) -> dict[Any, str]:
    """``{label: safe_name(label)}``, refusing two labels that would share a file (a digest collision between
    escaped names: practically never, but a figure must never silently replace another)."""
    names: dict[Any, str] = {}
    seen: dict[str, Any] = {}
    for label in labels:
        name = safe_name(label)
        if name in seen and seen[name] != label:
            raise OutputFolderError(f"the {what}s {seen[name]!r} and {label!r} would both be written as {name!r}; "
                                    f"rename one of them in the data, or draw them separately (--layers)")
        names[label], seen[name] = name, label
    return names


def write_store_figures(tree: xr.DataTree, inputs: dict[str, Any], out: str | Path, *, note: str | None = None,
                        colours: Mapping[str, str] | None = None) -> list[Path]:
    """Filter-mean heatmaps (``filter_means/<layer>``), the prediction heatmap (``predictions``, when the store's last
    layer is a dense layer) and the RDM panels (``rdms``) under ``out``, from :func:`store_figure_inputs` computed.

    ``colours``: the set colours of every figure (default :func:`set_colours` of the store's sets, which is what
    :func:`write_result_figures` uses for a result over the same sets). Every figure's title says when it draws a
    sample of the images (``inputs["sample"]``, under ``note``). Returns the paths written."""
    out = Path(out)
    fm, rdms = inputs["filter_means"], inputs["rdms"]
    sample: ImageSample | None = inputs.get("sample")
    note = _with_note(note, sample.note() if sample is not None else None)
    palette = _colours_for(tree.dataset[schema.SET_COORD].values, colours)
    written: list[Path] = []
    if fm is not None:  # None, or fewer layers than the RDMs, on a reduced store without filter means
        with_means = [layer for layer in rdms if layer in fm.children]
        # the means are of the sample already (a cap above the default must not sample them again)
        written += write_filter_mean_figures(fm, out, layers=with_means, note=note, colours=palette,
                                             unit_names={layer: layer_unit_name(tree, layer) for layer in with_means},
                                             max_images_per_set=sample.limit if sample is not None else
                                             MAX_IMAGES_PER_SET)
    last = str(tree.attrs[schema.LAYERS_ATTR][-1])
    if "predictions" in inputs:  # store_figure_inputs: the sampled images' predictions, or None
        predictions = inputs["predictions"]
    else:  # inputs made by hand: the store's own last layer when it is a whole dense layer
        predictions = tree[last].dataset[schema.ACTIVATION]
        predictions = predictions if predictions.dims == (schema.IMAGE_DIM, schema.FILTER_DIM) else None
    if predictions is not None:
        written += save(prediction_heatmap(predictions, note=note, layer=last, colours=palette)[0],
                        out / "predictions", folder=out)
    written += save(rdm_panels(rdms, note=note, colours=palette)[0], out / "rdms", folder=out)
    return written


def write_filter_mean_figures(fm: xr.DataTree, out: str | Path, *, layers: Sequence[str],
                              unit_names: Mapping[str, str | None], note: str | None = None,
                              colours: Mapping[str, str], max_images_per_set: int = MAX_IMAGES_PER_SET,
                              sample_seed: int = SAMPLE_SEED) -> list[Path]:
    """One filter-mean heatmap per layer (``filter_means/<layer>``) under ``out``, from :func:`cnndiff_xr.filter_means`
    (or a ``cnndiff summarize`` file, computed or lazily opened): the store figures and ``cnndiff plot FILTER_MEANS``
    both draw them here. ``unit_names``: what each layer's units are called (:func:`layer_unit_name`).

    A heatmap shows at most ``max_images_per_set`` rows per set: larger sets are drawn as :func:`image_sample`
    (``sample_seed``; the same images in every layer, whose image coordinates are the same), selected before the
    values are read, and the title says so. Returns the paths written."""
    out = Path(out)
    names = distinct_file_names(layers, what="layer")
    written: list[Path] = []
    for layer in layers:
        node = fm[layer].dataset
        sample = image_sample(node[schema.SET_COORD].values, max_images_per_set=max_images_per_set,
                              seed=sample_seed)
        if sample.subsampled:
            node = node.isel({schema.IMAGE_DIM: sample.positions})
        fig, _ = filter_mean_heatmap(node["filter_mean"], note=_with_note(note, sample.note()), layer=layer,
                                     unit_name=unit_names.get(layer), zscore=bool(node.attrs.get("zscore")),
                                     colours=colours)
        written += save(fig, out / "filter_means" / names[layer], formats=HEATMAP_FORMATS, folder=out, label=layer)
    return written


def write_result_figures(d: xr.DataArray, out: str | Path, *, reference: str | None = None, note: str | None = None,
                         colours: Mapping[str, str] | None = None, bootstrap: xr.DataArray | None = None
                         ) -> list[Path]:
    """Differentiation by layer (``differentiation``), normalised by ``reference`` (``differentiation_by_<ref>``)
    and, with three or more sets and the input layer, R² by depth (``stimulus_vs_layer_r2``) under ``out``.

    R² across two sets is 1 by construction, so it is not drawn; with three sets (a line through three points) the
    figure is drawn and says in red that it is nearly meaningless (:func:`r2_by_depth`, :data:`MIN_SETS_FOR_R2`).
    ``colours``: the set colours (default :func:`set_colours` of ``d``'s sets). ``bootstrap``: a
    :func:`cnndiff_xr.bootstrap_differentiation` of the same draws, drawn as intervals over images in the first
    figure. Returns the paths written."""
    import cnndiff_xr as cx

    out = Path(out)
    palette = _colours_for(d["set"].values, colours)
    written = save(differentiation_by_layer(d, note=note, colours=palette, bootstrap=bootstrap)[0],
                   out / "differentiation", folder=out)
    if reference:
        written += save(normalised_differentiation(d, reference, note=note, colours=palette)[0],
                        out / reference_figure_name(reference), folder=out, label=reference)
    if d.sizes["set"] >= 3 and schema.INPUT_LAYER in d["layer"].values:
        written += save(r2_by_depth(cx.stimulus_regression(d), note=note)[0], out / "stimulus_vs_layer_r2",
                        folder=out)
    return written


def write_comparison_figure(c: xr.Dataset, out: str | Path, *, note: str | None = None) -> list[Path]:
    """The comparison of two sets (:func:`cnndiff_xr.compare_sets`, with the bootstrap of both sets in its
    ``bootstrap`` variable when ``cnndiff compare --bootstrap`` made one) as ``comparison`` under ``out``."""
    boot = c["bootstrap"] if "bootstrap" in c else None
    return save(set_comparison(c.drop_vars("bootstrap", errors="ignore"), bootstrap=boot, note=note)[0],
                Path(out) / "comparison", folder=out)


def write_similarity_figure(s: xr.DataArray, out: str | Path, *, note: str | None = None) -> list[Path]:
    """A layer similarity matrix (:func:`cnndiff_xr.layer_similarity`) as ``similarity`` under ``out``."""
    return save(similarity_matrix(s, note=note)[0], Path(out) / "similarity", folder=out)
