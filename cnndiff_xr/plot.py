"""Figures (matplotlib): differentiation by layer, reference-normalised differentiation, filter-mean heatmaps, the
prediction-layer heatmap, RDMs and stimulus-vs-layer R² by depth.

Every function takes the package's xarray results (computed or lazy: they are computed here, the figures need the
numbers) and an optional matplotlib Axes (or a Figure for multi-panel plots), and returns the Figure and Axes.
Layer names are the x ticks, rotated as in the seed's plots. :func:`save` writes PNG and SVG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from . import schema
from .analysis.results import normalise_by_reference, resample_summary

if TYPE_CHECKING:  # matplotlib is imported when a figure is made, not with the package
    from types import ModuleType

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

LINESTYLES = ("--", "-", ":", "-.")


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


def _with_suffix(title: str, suffix: str | None) -> str:
    return f"{title}\n{suffix}" if suffix else title


def _line_panel(ax: Axes, d: xr.DataArray, interval: float, ylabel: str) -> None:
    """One line per set (colour) and n_units (line style), with the resample interval as a band."""
    d = d.compute()
    layers = [str(v) for v in d["layer"].values]
    x = np.arange(len(layers))
    has_resamples = "resample" in d.dims and d.sizes["resample"] > 1
    summary = resample_summary(d, interval=interval) if has_resamples else None
    centre = summary["mean"] if summary is not None else (d.mean("resample") if "resample" in d.dims else d)
    n_units_values = list(d["n_units"].values) if "n_units" in d.dims else [None]
    colours = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for s, set_name in enumerate(d["set"].values):
        colour = colours[s % len(colours)]
        for k, n in enumerate(n_units_values):
            pick = {"set": set_name, **({"n_units": n} if n is not None else {})}
            label = f"{set_name}" + (f", {n} units" if n is not None else "")
            ax.plot(x, centre.sel(pick).values, LINESTYLES[k % len(LINESTYLES)], color=colour, label=label,
                    marker=".")
            if summary is not None:
                ax.fill_between(x, summary["lower"].sel(pick).values, summary["upper"].sel(pick).values,
                                color=colour, alpha=0.15, linewidth=0)
    _layer_ticks(ax, layers)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize=7, ncol=2)


def differentiation_by_layer(d: xr.DataArray, ax: Axes | None = None, *, interval: float = 0.95,
                             title: str | None = None, note: str | None = None) -> tuple[Figure | SubFigure, Axes]:
    """Differentiation by layer: a line per set, a line style per ``n_units``, a band for the resample interval.

    ``d`` is :func:`cnndiff_xr.differentiation` output (dims set, layer, n_units, resample).
    """
    fig, ax = _axes(ax, (12, 4.5))
    _line_panel(ax, d, interval, "differentiation (median distance per unit)")
    ax.set_title(_with_suffix(title or "Differentiation by layer", note))
    return fig, ax


def normalised_differentiation(d: xr.DataArray, reference: str = "white_noise", ax: Axes | None = None, *,
                               interval: float = 0.95, title: str | None = None,
                               note: str | None = None) -> tuple[Figure | SubFigure, Axes]:
    """Differentiation divided by the reference set's (per layer and draw), the seed's "normalised by noise"."""
    fig, ax = _axes(ax, (12, 4.5))
    ratio = normalise_by_reference(d.compute(), reference=reference, drop=True)
    _line_panel(ax, ratio, interval, f"differentiation / {reference}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_title(_with_suffix(title or f"Differentiation normalised by {reference}", note))
    return fig, ax


def _sets_of(da_: xr.DataArray, sets: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(str(s) for s in da_["set"].values))
    return present if sets is None else [s for s in sets if s in present]


def filter_mean_heatmap(fm: xr.DataArray, fig: Figure | None = None, *, sets: Sequence[str] | None = None,
                        vmin: float = -1, vmax: float = 1, title: str | None = None,
                        note: str | None = None) -> tuple[Figure, np.ndarray]:
    """Filter means of one layer as heatmaps (image x filter), one panel per set (the seed's figure).

    ``fm`` is one layer of :func:`cnndiff_xr.filter_means` (dims image, filter; coordinate ``set``).
    """
    plt = _pyplot()
    fm = fm.compute()
    names = _sets_of(fm, sets)
    if fig is None:
        fig = plt.figure(figsize=(5 * len(names) + 1, 3), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    image = None
    for ax, name in zip(axes, names, strict=True):
        part = fm.isel(image=np.asarray(fm["set"].values == name))
        image = ax.imshow(part.values, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax,
                          cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("filter")
        ax.set_ylabel("image")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8)
    layer = fm.attrs.get("layer") or fm.name or ""
    fig.suptitle(_with_suffix(title or f"Filter means, layer {layer}", note), fontsize=10)
    return fig, axes


def prediction_heatmap(predictions: xr.DataArray, fig: Figure | None = None, *, sets: Sequence[str] | None = None,
                       title: str | None = None, note: str | None = None) -> tuple[Figure, np.ndarray]:
    """The prediction layer's activations (image x class), one panel per set (the seed's first figure)."""
    plt = _pyplot()
    predictions = predictions.compute()
    names = _sets_of(predictions, sets)
    if fig is None:
        fig = plt.figure(figsize=(14, 1.2 + 1.3 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        part = predictions.isel(image=np.asarray(predictions["set"].values == name))
        ax.imshow(part.values, aspect="auto", interpolation="nearest", vmin=0, vmax=max(float(part.max()), 1e-9))
        ax.set_ylabel(name, fontsize=8)
        ax.set_yticks([])
    axes[-1].set_xlabel("class (filter)")
    fig.suptitle(_with_suffix(title or "Activations in the prediction layer", note), fontsize=10)
    return fig, axes


def rdm_panels(rdms: dict[str, xr.DataArray] | xr.DataArray, fig: Figure | None = None, *, ncols: int = 6,
               title: str | None = None, note: str | None = None) -> tuple[Figure, np.ndarray]:
    """RDMs (image x image) per layer, one panel each, sharing one colour scale."""
    plt = _pyplot()
    if isinstance(rdms, xr.DataArray):
        rdms = {str(rdms.attrs.get("layer", rdms.name or "rdm")): rdms}
    rdms = {k: v.compute() for k, v in rdms.items()}
    n = len(rdms)
    cols = min(ncols, n)
    rows = int(np.ceil(n / cols))
    if fig is None:
        fig = plt.figure(figsize=(2.4 * cols + 1, 2.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    vmax = max(float(np.nanmax(v.values)) for v in rdms.values()) if rdms else 1.0
    image = None
    for ax, (layer, values) in zip(axes, rdms.items(), strict=False):  # the grid may have spare panels
        image = ax.imshow(values.values, vmin=0, vmax=vmax, cmap="magma", interpolation="nearest")
        ax.set_title(layer, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:n]), shrink=0.8)
    fig.suptitle(_with_suffix(title or "RDMs by layer", note), fontsize=10)
    return fig, axes[:n]


def r2_by_depth(regression: xr.Dataset, ax: Axes | None = None, *, title: str | None = None,
                note: str | None = None) -> tuple[Figure | SubFigure, Axes]:
    """R² of layer differentiation regressed on input differentiation across sets, by layer depth.

    ``regression`` is :func:`cnndiff_xr.differentiation.stimulus_regression` output (``r2`` over layer and
    possibly n_units / resample: resamples are averaged, one line per n_units).
    """
    fig, ax = _axes(ax, (12, 4))
    r2 = regression["r2"].compute()
    if "resample" in r2.dims:
        r2 = r2.mean("resample")
    layers = [str(v) for v in r2["layer"].values]
    x = np.arange(len(layers))
    for k, n in enumerate(r2["n_units"].values if "n_units" in r2.dims else [None]):
        values = r2.sel(n_units=n) if n is not None else r2
        ax.plot(x, values.values, LINESTYLES[k % len(LINESTYLES)], marker="o",
                label=f"{n} units" if n is not None else None)
    _layer_ticks(ax, layers)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("R² (layer vs input differentiation)")
    ax.grid(True, alpha=0.4)
    if "n_units" in r2.dims:
        ax.legend(fontsize=8)
    ax.set_title(_with_suffix(title or "Stimulus vs layer differentiation across sets", note))
    return fig, ax


def save(fig: Figure | SubFigure, path_stem: str | Path, formats: Sequence[str] = ("png", "svg"),
         dpi: int = 110) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.png`` and ``.svg`` (or the given formats) and close it."""
    root = fig.get_figure(root=True)  # a Figure is its own root; a SubFigure is saved with its whole figure
    assert root is not None
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        root.savefig(path, dpi=dpi)
        paths.append(path)
    _pyplot().close(root)
    return paths


def figure_note(attrs: Mapping[Any, Any]) -> str | None:
    """A loud note for figures made with random weights (from a store's provenance)."""
    weights = str(attrs.get("weights", ""))
    if weights.startswith("random"):
        return f"RANDOM WEIGHTS ({weights}) — not ImageNet: these numbers are not the seed's"
    return None


# ------------------------------------------------------------------------------------------------ figure sets
# The CLI (`cnndiff plot`) and the demo write their figures through these three functions, so both make the same
# figures with the same names.

#: formats of the one-per-layer heatmaps (a store has up to ~20 layers: PNG only keeps the folder small)
HEATMAP_FORMATS = ("png",)


def store_figure_inputs(tree: xr.DataTree, *, layers: Sequence[str] | None = None,
                        rdm_units: int = 10000) -> dict[str, Any]:
    """The lazy analyses behind :func:`write_store_figures`: ``{"filter_means": <DataTree>, "rdms": {layer: RDM}}``.

    Computed together (``dask.compute`` or ``client.compute``), each layer's chunks are read once for both.
    """
    import cnndiff_xr as cx

    chosen = list(layers) if layers is not None else list(tree.attrs[schema.LAYERS_ATTR])
    return {
        "filter_means": cx.filter_means(tree, zscore=True, layers=chosen),
        "rdms": {layer: cx.rdm(tree, layer=layer, n_units=rdm_units, seed=0) for layer in chosen},
    }


def write_store_figures(tree: xr.DataTree, inputs: dict[str, Any], out: str | Path, *,
                        note: str | None = None) -> list[Path]:
    """Filter-mean heatmaps (``filter_means/<layer>``), the prediction heatmap (``predictions``, when the store's last
    layer is a dense layer) and the RDM panels (``rdms``) under ``out``, from :func:`store_figure_inputs` computed.
    Returns the paths written."""
    out = Path(out)
    fm, rdms = inputs["filter_means"], inputs["rdms"]
    written: list[Path] = []
    for layer in rdms:
        written += save(filter_mean_heatmap(fm[layer]["filter_mean"], note=note)[0], out / "filter_means" / layer,
                        formats=HEATMAP_FORMATS)
    last = tree.attrs[schema.LAYERS_ATTR][-1]
    predictions = tree[last].dataset[schema.ACTIVATION]
    if predictions.dims == (schema.IMAGE_DIM, schema.FILTER_DIM):
        written += save(prediction_heatmap(predictions, note=note)[0], out / "predictions")
    written += save(rdm_panels(rdms, note=note)[0], out / "rdms")
    return written


def write_result_figures(d: xr.DataArray, out: str | Path, *, reference: str | None = None,
                         note: str | None = None) -> list[Path]:
    """Differentiation by layer (``differentiation``), normalised by ``reference`` (``differentiation_by_<ref>``)
    and, with two or more sets and the input layer, R² by depth (``stimulus_vs_layer_r2``) under ``out``.
    Returns the paths written."""
    import cnndiff_xr as cx

    out = Path(out)
    written = save(differentiation_by_layer(d, note=note)[0], out / "differentiation")
    if reference:
        written += save(normalised_differentiation(d, reference, note=note)[0], out / f"differentiation_by_{reference}")
    if d.sizes["set"] >= 2 and schema.INPUT_LAYER in d["layer"].values:
        written += save(r2_by_depth(cx.stimulus_regression(d), note=note)[0], out / "stimulus_vs_layer_r2")
    return written
