"""Figures: each function takes the package's xarray results and returns the Figure/Axes with the expected panels;
what a reader sees (titles, labels, colourbars, scales, ticks, set colours) is read back from the matplotlib objects."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import dask
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pytest
from analysis_fixtures import make_tree, synchronous

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


# ------------------------------------------------------------------------------------------------ issue 16, item 4
# Every figure is read back from its matplotlib objects: titles, axis labels, colourbar labels, colour limits, tick
# values and colours. The figure-set functions are run for real; ``plot.save`` is wrapped only to look at each
# figure before it is written and closed.

@pytest.fixture(scope="module")
def synthetic():
    """The synthetic store-like tree (input layer 3 channels, two spatial layers, a dense 10-class prediction
    layer; 3 sets whose images are interleaved), its differentiation and the computed store-figure inputs."""
    tree = make_tree()[0]
    with dask.config.set(scheduler="synchronous"):
        d = cx.differentiation(tree, n_units=[20, 100], resamples=4, seed=0).compute()
        (inputs,) = dask.compute(plot.store_figure_inputs(tree, rdm_units=100))
    return tree, d, inputs


@pytest.fixture
def drawn(monkeypatch):
    """The figures the figure-set functions draw, by file stem (looked at before ``save`` closes them)."""
    figures = {}
    real_save = plot.save

    def looking_save(fig, path_stem, *args, **kwargs):
        figures[str(path_stem)] = _describe(fig)
        return real_save(fig, path_stem, *args, **kwargs)

    monkeypatch.setattr(plot, "save", looking_save)
    return figures


def _colourbar(fig):
    """The one colourbar of a heatmap figure (its panels share one scale)."""
    bars = [im.colorbar for ax in fig.axes for im in ax.images if im.colorbar is not None]
    assert len(bars) == 1, f"{len(bars)} colourbars"
    return bars[0]


def _colourbar_label(fig):
    return _colourbar(fig).ax.get_ylabel()


def _describe(fig):
    """What a reader sees in a figure: every text with its colour, per axes, and the heatmaps' scales."""
    axes = []
    for ax in fig.axes:
        axes.append({
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "ylabel_colour": mcolors.to_hex(ax.yaxis.label.get_color()),
            "title_colour": mcolors.to_hex(ax.title.get_color()),
            "lines": [(line.get_label(), mcolors.to_hex(line.get_color())) for line in ax.lines],
            "ytick_labels": [(t.get_text(), mcolors.to_hex(t.get_color())) for t in ax.get_yticklabels()],
            "xtick_labels": [(t.get_text(), mcolors.to_hex(t.get_color())) for t in ax.get_xticklabels()],
            "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
            "clims": [im.get_clim() for im in ax.images],
            "colourbars": [im.colorbar.ax.get_ylabel() for im in ax.images if im.colorbar is not None],
            "texts": [t.get_text() for t in ax.texts],
        })
    return {"suptitle": fig._suptitle.get_text() if fig._suptitle else "", "axes": axes}


def _set_colour_in(description, set_name):
    """The colours a figure gives a set: its lines, panel titles, panel y labels and tick labels."""
    found = set()
    for ax in description["axes"]:
        found |= {c for label, c in ax["lines"] if label.split(",")[0] == set_name}
        if ax["title"] == set_name:
            found.add(ax["title_colour"])
        if ax["ylabel"] == set_name:
            found.add(ax["ylabel_colour"])
        found |= {c for text, c in ax["ytick_labels"] + ax["xtick_labels"] if text == set_name}
    return found


def test_filter_mean_heatmap_names_the_layer_from_the_data_array_alone(synthetic):
    # fm[layer]["filter_mean"] has no layer attribute on the node's variable unless filter_means puts it there; the
    # old title read "Filter means, layer filter_mean" (the variable's name)
    _, _, inputs = synthetic
    fig, _ = plot.filter_mean_heatmap(inputs["filter_means"]["block1_conv1"]["filter_mean"])
    title = fig._suptitle.get_text()
    assert "layer block1_conv1" in title and "filter_mean" not in title
    assert "z-scored" in title
    plt.close(fig)


def test_filter_mean_scale_comes_from_the_data_and_is_labelled(synthetic):
    _, _, inputs = synthetic
    fm = inputs["filter_means"]["block1_conv1"]["filter_mean"]
    fig, axes = plot.filter_mean_heatmap(fm, layer="block1_conv1")
    values = np.abs(fm.values.ravel())
    bound = np.percentile(values, plot.ROBUST_PERCENTILE)
    clims = {ax.images[0].get_clim() for ax in axes}
    assert clims == {(-bound, bound)}  # one symmetric scale for all panels, from the data (not a fixed +/-1)
    assert np.mean(values > bound) <= 0.02  # only the top 1 % saturates
    image = axes[0].images[0]
    assert image.get_cmap().name == "RdBu_r"  # z-scores: a diverging map centred on 0
    label = _colourbar_label(fig)
    assert "z-scored filter mean" in label and f"±{bound:.3g}" in label and "99th" in label
    assert _colourbar(fig).extend in ("max", "min", "both")  # the arrows say values beyond the scale saturate
    plt.close(fig)
    fixed, fixed_axes = plot.filter_mean_heatmap(fm, vmin=-1, vmax=1)
    assert fixed_axes[0].images[0].get_clim() == (-1, 1) and "fixed" in _colourbar_label(fixed)
    plt.close(fixed)


def test_filter_mean_raw_values_get_a_sequential_percentile_scale(synthetic):
    tree, _, _ = synthetic
    with dask.config.set(scheduler="synchronous"):
        raw = cx.filter_means(tree, zscore=False, layers=["block1_pool"]).compute()["block1_pool"]["filter_mean"]
    fig, axes = plot.filter_mean_heatmap(raw)
    low, high = np.percentile(raw.values, [1, 99])
    assert axes[0].images[0].get_clim() == (low, high)
    assert axes[0].images[0].get_cmap().name == "viridis"
    assert "1st–99th" in _colourbar_label(fig) and "z-scored" not in _colourbar_label(fig)
    plt.close(fig)


def test_units_are_named_and_ticked_as_what_they_are(synthetic, tmp_path, drawn):
    tree, _, inputs = synthetic
    assert [plot.layer_unit_name(tree, layer) for layer in tree.attrs["layers"]] == [
        "channel", "filter", "filter", "class"]
    two_dense = make_tree(layers={"block1_conv1": (4, 4, 2), "fc1": (6,), "predictions": (3,)})[0]
    assert plot.layer_unit_name(two_dense, "fc1") == "unit"
    plot.write_store_figures(tree, inputs, tmp_path, note="synthetic")
    expected = {"input_layer": ("channel", "Channel means"), "block1_conv1": ("filter", "Filter means"),
                "predictions": ("class", "Class activations")}
    for layer, (noun, heading) in expected.items():
        figure = drawn[str(tmp_path / "filter_means" / layer)]
        assert figure["suptitle"].startswith(f"{heading}") and f"layer {layer}" in figure["suptitle"]
        panels = [ax for ax in figure["axes"] if ax["clims"]]
        assert len(panels) == 3 and all(ax["xlabel"] == noun for ax in panels)
    # the input layer's 3 channels: integer ticks only (matplotlib's default put ticks at 0.5, 1.5, ...)
    fig, axes = plot.filter_mean_heatmap(inputs["filter_means"]["input_layer"]["filter_mean"])
    ticks = [t for t in axes[0].get_xticks() if -0.5 <= t <= 2.5]
    assert ticks == [0, 1, 2] and axes[0].get_xlabel() == "channel"
    plt.close(fig)
    with pytest.raises(ValueError, match="unit_name"):
        plot.filter_mean_heatmap(inputs["filter_means"]["input_layer"]["filter_mean"], unit_name="neuron")


def test_every_figure_gives_a_set_the_same_colour(synthetic, tmp_path, drawn):
    tree, d, inputs = synthetic
    assert plot.set_colours(["b", "a", "c"]) == plot.set_colours(["c", "b", "a", "a"])  # order does not matter
    plot.write_result_figures(d, tmp_path, reference="white_noise")
    plot.write_store_figures(tree, inputs, tmp_path)
    names = ["differentiation", "differentiation_by_white_noise", "filter_means/block1_conv1", "predictions",
             "rdms"]
    colour_of = {}
    for set_name in d["set"].values:
        seen = set()
        for name in names:
            if name == "differentiation_by_white_noise" and set_name == "white_noise":
                continue  # the reference is the grey line at 1
            in_figure = _set_colour_in(drawn[str(tmp_path / name)], set_name)
            assert in_figure, f"{name} does not show {set_name} in a colour"
            seen |= in_figure
        # one colour in every figure: "random" is second in one figure and first in the next (the reference
        # dropped), and the old figures coloured by each figure's own set positions
        assert len(seen) == 1, (set_name, seen)
        colour_of[str(set_name)] = seen.pop()
    assert len(set(colour_of.values())) == d.sizes["set"]  # and sets stay apart
    assert colour_of == plot.set_colours(d["set"].values)


def test_prediction_heatmap_has_one_labelled_scale_and_image_labels(synthetic):
    tree, _, _ = synthetic
    predictions = tree["predictions"]["activation"]
    fig, axes = plot.prediction_heatmap(predictions, layer="predictions")
    values = predictions.values
    clims = {ax.images[0].get_clim() for ax in axes}
    assert clims == {(0.0, float(values.max()))}  # one scale: a set is not brighter because it is scaled alone
    assert "softmax probability" in _colourbar_label(fig)
    assert [ax.get_ylabel() for ax in axes] == list(dict.fromkeys(predictions["set"].values))
    cats = predictions.isel(image=predictions["set"].values == "cats")["image"].values
    cats_panel = axes[[ax.get_ylabel() for ax in axes].index("cats")]
    assert [t.get_text() for t in cats_panel.get_yticklabels()] == [str(i) for i in cats]
    assert "class" in axes[-1].get_xlabel()
    assert "predictions" in fig._suptitle.get_text()
    plt.close(fig)


def test_image_labels_drop_the_set_prefix_and_give_way_to_indices_when_crowded():
    tree = make_tree(sets={"cats": 40, "dogs": 3}, layers={"predictions": (4,)}, seed=2)[0]
    act = tree["predictions"]["activation"]
    act = act.assign_coords(image=[f"{s}/{i}.png" for i, s in zip(act["image"].values, act["set"].values,
                                                                    strict=True)])
    fig, axes = plot.prediction_heatmap(act)
    crowded, few = (axes[0], axes[1]) if axes[0].get_ylabel() == "cats" else (axes[1], axes[0])
    dogs = act.isel(image=act["set"].values == "dogs")["image"].values
    assert [t.get_text() for t in few.get_yticklabels()] == [str(i).removeprefix("dogs/") for i in dogs]
    ticks = [t for t in crowded.get_yticks() if -0.5 <= t <= 39.5]
    assert 2 <= len(ticks) < 40 and all(float(t).is_integer() for t in ticks)  # 40 ids would not be readable
    plt.close(fig)


def test_rdm_panels_show_set_blocks_and_a_labelled_distance_scale(synthetic):
    tree, _, inputs = synthetic
    rdms = inputs["rdms"]
    fig, axes = plot.rdm_panels(rdms, ncols=2)
    first = rdms["block1_conv1"]
    labels = first["set"].values
    order = list(dict.fromkeys(labels))  # the synthetic tree interleaves sets: the panels group them
    counts = [int(np.sum(labels == s)) for s in order]
    edges = list(np.cumsum(counts)[:-1] - 0.5)
    ax = axes[1]
    assert sorted({line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1]}) == edges
    assert [t.get_text() for t in axes[0].get_yticklabels()] == order  # first column: set names
    assert [t.get_text() for t in axes[2].get_xticklabels()] == order  # no panel below: set names
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["", "", ""]  # a panel below carries them
    index = np.argsort([order.index(s) for s in labels], kind="stable")
    np.testing.assert_array_equal(ax.images[0].get_array(), first.values[np.ix_(index, index)])
    label = _colourbar_label(fig)
    assert "euclidean distance / √m" in label and "norm=layer" in label and "100" in label
    vmax = max(float(v.max()) for v in rdms.values())
    assert {a.images[0].get_clim() for a in axes} == {(0.0, vmax)}
    assert "m = 32 units" in axes[2].get_title()  # block1_pool has 32 units: the panel says how many were used
    plt.close(fig)


def test_normalised_axis_starts_at_zero_and_bands_say_what_they_are(synthetic):
    _, d, _ = synthetic
    fig, ax = plot.normalised_differentiation(d, "white_noise")
    assert ax.get_ylim()[0] == 0.0
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "white_noise (the reference: 1)" in legend
    assert re.search(r"2\.5–97\.5th percentile over\s+4 unit redraws", legend)
    assert "not over images" in legend
    assert "mean of 4 redraws" in ax.get_legend().get_title().get_text()
    plt.close(fig)
    one_draw = d.isel(resample=[0])
    fig, ax = plot.differentiation_by_layer(one_draw)
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "redraws" not in legend and "one draw: no interval" in ax.get_legend().get_title().get_text()
    assert not ax.collections
    plt.close(fig)


@pytest.mark.parametrize("n_sets, warned", [(3, True), (4, False)])
def test_r2_figure_says_how_many_sets_and_warns_under_four(n_sets, warned):
    sets = dict(list({"white_noise": 6, "cats": 5, "random": 7, "faces": 6}.items())[:n_sets])
    tree = make_tree(sets=sets)[0]
    with dask.config.set(scheduler="synchronous"):
        d = cx.differentiation(tree, n_units=[20], resamples=2, seed=0).compute()
    fig, ax = plot.r2_by_depth(cx.stimulus_regression(d))
    assert f"across {n_sets} sets" in ax.get_title() and f"over {n_sets} sets" in ax.get_ylabel()
    warnings = [t.get_text() for t in ax.texts if "nearly meaningless" in t.get_text()]
    assert bool(warnings) == warned
    plt.close(fig)


def test_result_figures_draw_r2_from_three_sets(tmp_path, drawn):
    tree = make_tree(sets={"white_noise": 6, "cats": 5, "random": 7})[0]
    with dask.config.set(scheduler="synchronous"):
        d = cx.differentiation(tree, n_units=[20], resamples=2, seed=0).compute()
    two = plot.write_result_figures(d.sel(set=["white_noise", "cats"]), tmp_path / "two")
    assert not [p for p in two if p.stem == "stimulus_vs_layer_r2"]  # R² over 2 sets is 1 by construction
    three = plot.write_result_figures(d, tmp_path / "three")
    assert (tmp_path / "three" / "stimulus_vs_layer_r2.png") in three
    r2 = drawn[str(tmp_path / "three" / "stimulus_vs_layer_r2")]
    assert any("nearly meaningless" in text for ax in r2["axes"] for text in ax["texts"])
