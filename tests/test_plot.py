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
import xarray as xr
from analysis_fixtures import make_tree, synchronous

import cnndiff_xr as cx
from cnndiff_xr import plot
from cnndiff_xr.validation import ParameterTypeError, ParameterValueError


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


# ------------------------------------------------------------------------------------------------ issue 15: large sets
# Store and filter-mean figures draw at most ``max_images_per_set`` images per set (a seeded sample, chosen before
# anything is read) and say so in every title; below the cap nothing changes and nothing is said.
LARGE_SETS = {"cats": 23, "dogs": 14, "white_noise": 4}  # above, above and below a cap of 5


def _rows_by_set(description):
    """The number of image rows of each heatmap panel, by the panel's set (title or y label)."""
    rows = {}
    for ax in description["axes"]:
        if ax["clims"]:
            name = ax["title"] or ax["ylabel"]
            rows[name] = ax
    return rows


def test_image_sample_is_seeded_per_set_and_capped():
    labels = np.array(["b"] * 30 + ["a"] * 12 + ["c"] * 3)[np.random.default_rng(3).permutation(45)]
    sample = plot.image_sample(labels, max_images_per_set=5)
    order = list(dict.fromkeys(labels))  # the sets in order of first appearance, as the figures show them
    assert list(sample.total) == order and sample.total == {"b": 30, "a": 12, "c": 3}
    assert sample.shown == {"b": 5, "a": 5, "c": 3}
    chosen = labels[sample.positions]
    assert {name: int(np.sum(chosen == name)) for name in ("a", "b", "c")} == {"a": 5, "b": 5, "c": 3}
    assert np.all(np.diff(sample.positions) > 0)  # sorted, no repeats: the images keep their order
    assert np.array_equal(plot.image_sample(labels, max_images_per_set=5).positions, sample.positions)  # seeded
    assert not np.array_equal(plot.image_sample(labels, max_images_per_set=5, seed=1).positions, sample.positions)
    # a set's sample depends on its own images only: not on the other sets, nor on their order
    alone = plot.image_sample(labels[labels == "b"], max_images_per_set=5)
    assert np.array_equal(np.flatnonzero(labels == "b")[alone.positions], sample.positions[chosen == "b"])
    parts = {"b": "b 5 of 30", "a": "a 5 of 12", "c": "c all 3"}
    assert sample.note() == f"at most 5 images per set, seeded sample (seed 0): {', '.join(parts[n] for n in order)}"
    assert plot.image_sample(["x"] * 20 + ["y"] * 20, max_images_per_set=5).note() == (
        "5 of 20 images per set, seeded sample (seed 0)")
    below = plot.image_sample(labels, max_images_per_set=30)
    assert not below.subsampled and below.note() is None and np.array_equal(below.positions, np.arange(45))
    with pytest.raises(ParameterValueError, match="max_images_per_set must be an integer >= 1"):
        plot.image_sample(labels, max_images_per_set=0)
    with pytest.raises(ParameterTypeError, match="max_images_per_set"):
        plot.image_sample(labels, max_images_per_set=2.5)


def test_store_figures_of_large_sets_draw_a_named_sample(tmp_path, drawn):
    tree, raw = make_tree(sets=LARGE_SETS, counting=True, chunk=4)
    with dask.config.set(scheduler="synchronous"):
        inputs = plot.store_figure_inputs(tree, rdm_units=1000, max_images_per_set=5)  # every unit of each layer
        sample = inputs["sample"]
        images = tree["image"].values[sample.positions]
        for a in raw.values():
            a.reads = 0
        (computed,) = dask.compute(inputs)
    # only the chunks that hold sampled images are read, each once for all the figures
    touched = np.unique(sample.positions // 4).size
    assert touched < -(-sum(LARGE_SETS.values()) // 4)
    assert {a.reads for a in raw.values()} == {touched}
    plot.write_store_figures(tree, computed, tmp_path, note="synthetic")
    note = "at most 5 images per set, seeded sample (seed 0): "
    for name in ["filter_means/input_layer", "filter_means/block1_conv1", "filter_means/predictions", "predictions",
                 "rdms"]:
        title = drawn[str(tmp_path / name)]["suptitle"]
        assert "synthetic" in title and note in title, (name, title)
        for set_name, n in LARGE_SETS.items():
            assert (f"{set_name} all {n}" if n <= 5 else f"{set_name} 5 of {n}") in title
    # every figure draws exactly the sampled rows, and the same images
    for name in ["filter_means/block1_conv1", "predictions"]:
        panels = _rows_by_set(drawn[str(tmp_path / name)])
        assert set(panels) == set(LARGE_SETS)
        for set_name, ax in panels.items():
            shown = [text for text, _ in ax["ytick_labels"]]
            assert shown == [str(i) for i in images[tree["set"].values[sample.positions] == set_name]]
    rdm = computed["rdms"]["block1_conv1"]
    assert rdm.shape == (len(images), len(images)) == (5 + 5 + 4,) * 2
    assert list(rdm["image"].values) == list(images)
    assert list(computed["filter_means"]["block1_conv1"]["image"].values) == list(images)
    # the sampled RDM is the RDM of the sampled images, and their distances plain numpy's (norm "layer": one SD over
    # the sampled images' units)
    subset = cx.select(tree, image=images)
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_array_equal(rdm.values, cx.rdm(subset, layer="block1_conv1", n_units=1000).values)
    x = raw["block1_conv1"].array[sample.positions].reshape(len(images), -1).astype(np.float64)
    expected = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / (x.std() * np.sqrt(x.shape[1]))
    np.testing.assert_allclose(rdm.values, expected, rtol=1e-5, atol=1e-6)


def test_store_figures_below_the_cap_say_nothing_and_change_nothing(tmp_path, drawn):
    tree = make_tree(sets=LARGE_SETS)[0]
    with dask.config.set(scheduler="synchronous"):
        inputs = plot.store_figure_inputs(tree, rdm_units=100, max_images_per_set=23)
        assert not inputs["sample"].subsampled
        # the very graphs of the whole store: the same keys as the analyses called directly
        assert inputs["rdms"]["block1_conv1"].data.name == cx.rdm(tree, layer="block1_conv1", n_units=100).data.name
        (computed,) = dask.compute(inputs)
    assert computed["rdms"]["block1_conv1"].shape == (41, 41)
    plot.write_store_figures(tree, computed, tmp_path)
    for name in ["filter_means/block1_conv1", "predictions", "rdms"]:
        title = drawn[str(tmp_path / name)]["suptitle"]
        assert "images per set" not in title and "sample" not in title, title


def test_the_sample_and_its_graph_keys_follow_the_cap_and_the_seed():
    tree = make_tree(sets=LARGE_SETS)[0]

    def rdm_name(**kwargs):
        return plot.store_figure_inputs(tree, rdm_units=100, **kwargs)["rdms"]["block1_conv1"].data.name

    assert rdm_name(max_images_per_set=5) == rdm_name(max_images_per_set=5)
    assert len({rdm_name(max_images_per_set=5), rdm_name(max_images_per_set=6),
                rdm_name(max_images_per_set=5, sample_seed=1)}) == 3
    with pytest.raises(ParameterValueError, match="max_images_per_set"):
        plot.store_figure_inputs(tree, max_images_per_set=0)


def test_filter_mean_files_of_large_sets_draw_a_named_sample(tmp_path, drawn):
    # the heatmaps of a 'cnndiff summarize' file (not the store): the same sample, chosen before the rows are read
    tree = make_tree(sets=LARGE_SETS)[0]
    with dask.config.set(scheduler="synchronous"):
        fm = cx.filter_means(tree, zscore=False)
    fm.to_zarr(tmp_path / "fm.zarr")
    opened = xr.open_datatree(tmp_path / "fm.zarr", engine="zarr")  # lazy, as 'cnndiff plot FILTER_MEANS' opens it
    plot.write_filter_mean_figures(opened, tmp_path, layers=["block1_pool"], unit_names={}, colours=plot.set_colours(
        LARGE_SETS), max_images_per_set=5)
    figure = drawn[str(tmp_path / "filter_means" / "block1_pool")]
    note = figure["suptitle"].split("\n")[-1]
    assert note.startswith("at most 5 images per set, seeded sample (seed 0): ")
    assert sorted(note.split(": ")[1].split(", ")) == ["cats 5 of 23", "dogs 5 of 14", "white_noise all 4"]
    sample = plot.image_sample(tree["set"].values, max_images_per_set=5)
    panels = _rows_by_set(figure)
    for set_name, ax in panels.items():
        keep = tree["set"].values[sample.positions] == set_name
        assert [t for t, _ in ax["ytick_labels"]] == list(tree["image"].values[sample.positions][keep])
    # the drawn values are the file's rows of the sampled images
    fig, axes = plot.filter_mean_heatmap(opened["block1_pool"]["filter_mean"].isel(image=sample.positions))
    cats = fm["block1_pool"]["filter_mean"].values[sample.positions][tree["set"].values[sample.positions] == "cats"]
    np.testing.assert_array_equal(axes[[ax.get_title() for ax in axes].index("cats")].images[0].get_array(), cats)
    plt.close(fig)


def test_a_reduced_store_draws_the_same_sample_as_the_full_store():
    # the sample is taken on the tree (its layers and their stored means alike): a reduced store's sampled RDMs are
    # its full store's, bit for bit, and its heatmaps those of the means stored at extraction
    from analysis_fixtures import reduce_tree

    full = make_tree(sets=LARGE_SETS)[0]
    reduced = reduce_tree(full, cx.UnitDraws(n_units=(20,), resamples=1, seed=0), filter_means=True)
    with dask.config.set(scheduler="synchronous"):
        got, expected = dask.compute(plot.store_figure_inputs(reduced, rdm_units=20, max_images_per_set=5),
                                     plot.store_figure_inputs(full, rdm_units=20, max_images_per_set=5))
    assert got["sample"].note() == expected["sample"].note() and got["sample"].subsampled
    for layer, rdm in expected["rdms"].items():
        assert rdm.shape == (14, 14)
        np.testing.assert_array_equal(got["rdms"][layer].values, rdm.values)
        np.testing.assert_allclose(got["filter_means"][layer]["filter_mean"].values,
                                   expected["filter_means"][layer]["filter_mean"].values, rtol=1e-6, atol=1e-6)


def test_large_sets_keep_figures_a_readable_size():
    # 500 images per set made a filter-mean figure 70 inches tall and the prediction heatmap 200; a sample's note
    # under a two-panel RDM figure ran off both sides
    tree = make_tree(sets={"cats": 200, "dogs": 150}, layers={"block1_conv1": (3, 3, 4), "predictions": (5,)})[0]
    with dask.config.set(scheduler="synchronous"):
        (inputs,) = dask.compute(plot.store_figure_inputs(tree, rdm_units=100, max_images_per_set=120))
    fig, axes = plot.filter_mean_heatmap(inputs["filter_means"]["block1_conv1"]["filter_mean"])
    assert fig.get_figheight() <= 6 and [ax.images[0].get_array().shape[0] for ax in axes] == [120, 120]
    assert axes[0].get_ylabel() == "image (index among those shown)"  # not the image's index in its set
    plt.close(fig)
    fig, axes = plot.prediction_heatmap(inputs["predictions"])
    assert fig.get_figheight() <= 12 and [ax.images[0].get_array().shape[0] for ax in axes] == [120, 120]
    plt.close(fig)
    note = inputs["sample"].note()
    assert "cats 120 of 200" in note and "dogs 120 of 150" in note
    long_note = f"{note}; " * 3
    fig, _ = plot.rdm_panels(inputs["rdms"], note=long_note)
    width = fig.get_figwidth() * 72 / 6  # characters of ~0.6 em at 10 pt
    lines = fig._suptitle.get_text().split("\n")
    assert len(lines) > 2 and max(len(line) for line in lines) <= width
    assert " ".join(lines[1:]).split() == long_note.split()  # wrapped, not cut
    plt.close(fig)


def test_a_cap_above_the_default_is_kept_by_every_figure(tmp_path, drawn):
    tree = make_tree(sets={"cats": 510, "dogs": 520}, layers={"block1_conv1": (2, 2, 3), "predictions": (4,)})[0]
    with dask.config.set(scheduler="synchronous"):
        (inputs,) = dask.compute(plot.store_figure_inputs(tree, rdm_units=10, max_images_per_set=515))
    plot.write_store_figures(tree, inputs, tmp_path)
    for name in ("filter_means/block1_conv1", "predictions"):
        figure = drawn[str(tmp_path / name)]
        assert figure["suptitle"].count("images per set") == 1  # one note: the means are not sampled again
        assert "cats all 510, dogs 515 of 520" in figure["suptitle"] or "dogs 515 of 520, cats all 510" in \
            figure["suptitle"]
