"""Figures: each function takes the package's xarray results and returns the Figure/Axes with the expected panels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import cnndiff_xr as cx
from cnndiff_xr import plot


@pytest.fixture(scope="module")
def results(tiny_store):
    tree = cx.open_activations(tiny_store)
    d = cx.differentiation(tree, n_units=[10, 100], resamples=3, seed=0).compute(scheduler="sync")
    fm = cx.filter_means(tree, zscore=True).compute(scheduler="sync")
    return tree, d, fm


def test_differentiation_figure_lines_and_ticks(results):
    _, d, _ = results
    fig, ax = plot.differentiation_by_layer(d, note="RANDOM WEIGHTS")
    assert len(ax.lines) == d.sizes["set"] * d.sizes["n_units"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(d.layer.values)
    assert all(t.get_rotation() == 60 for t in ax.get_xticklabels())
    assert len(ax.collections) == d.sizes["set"] * d.sizes["n_units"]  # the resample bands
    assert "RANDOM WEIGHTS" in ax.get_title()
    # values plotted are the resample means
    np.testing.assert_allclose(ax.lines[0].get_ydata(), d.isel(set=0, n_units=0).mean("resample").values)


def test_normalised_and_r2_on_given_axes(results):
    import matplotlib.pyplot as plt

    _, d, _ = results
    fig, axes = plt.subplots(2, 1)
    out_fig, ax = plot.normalised_differentiation(d, "white_noise", ax=axes[0])
    assert out_fig is fig and ax is axes[0]
    assert len(ax.lines) == (d.sizes["set"] - 1) * d.sizes["n_units"] + 1  # reference set dropped; +1: the y=1 line
    regression = cx.stimulus_regression(d)
    _, ax2 = plot.r2_by_depth(regression, ax=axes[1])
    assert len(ax2.lines) == d.sizes["n_units"]
    plt.close(fig)


def test_heatmaps_and_rdms_panels(results, tmp_path):
    tree, _, fm = results
    fig, axes = plot.filter_mean_heatmap(fm["conv1"]["filter_mean"])
    assert len(axes) == 3 and [a.get_title() for a in axes] == ["photos", "array", "white_noise"]
    assert axes[0].images[0].get_array().shape == (5, 4)  # 5 photos x 4 filters
    fig2, axes2 = plot.prediction_heatmap(tree["predictions"]["activation"])
    assert len(axes2) == 3
    rdms = {layer: cx.rdm(tree, layer=layer, n_units=50) for layer in ("conv1", "dense")}
    fig3, axes3 = plot.rdm_panels(rdms)
    assert len(axes3) == 2 and axes3[0].images[0].get_array().shape == (18, 18)
    paths = plot.save(fig3, tmp_path / "rdms")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)
    for f in (fig, fig2):
        matplotlib.pyplot.close(f)


def test_figure_note_only_for_random_weights():
    assert "RANDOM" in plot.figure_note({"weights": "random(seed=0)"})
    assert plot.figure_note({"weights": "imagenet"}) is None
