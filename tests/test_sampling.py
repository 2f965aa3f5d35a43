"""Unit sampling: seeded, labelled, the same units for every image."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_fixtures import LAYERS, make_recording, make_tree, raise_if_dask_computes

from cnndiff_xr.analysis.collection import as_collection
from cnndiff_xr.analysis.draws import draw_table, draw_units, select_units, unit_seed
from cnndiff_xr.validation import UnknownLabelError


@pytest.fixture(scope="module")
def tree():
    return make_tree()[0]


def test_seed_is_stable_and_specific():
    a = unit_seed(3, "block1_conv1", 200, 1).generate_state(4)
    assert np.array_equal(a, unit_seed(3, "block1_conv1", 200, 1).generate_state(4))
    for other in [(4, "block1_conv1", 200, 1), (3, "block1_conv2", 200, 1), (3, "block1_conv1", 201, 1),
                  (3, "block1_conv1", 200, 2)]:
        assert not np.array_equal(a, unit_seed(*other).generate_state(4))


def test_seed_independent_of_python_hash_and_no_tensorflow():
    import os
    import subprocess
    import sys

    # another process with another string-hash salt draws the same units, and importing the
    # analysis does not load TensorFlow/Keras
    code = (
        "import sys, cnndiff_xr.analysis.draws as s, cnndiff_xr.analysis.differentiation, "
        "cnndiff_xr.analysis.summaries; "
        "print(s.draw_units((50, 50, 4), 7, seed=1, layer='conv').tolist()); "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    units, heavy = out.strip().splitlines()
    assert units == str(draw_units((50, 50, 4), 7, seed=1, layer="conv").tolist())
    assert heavy == "[]"


@pytest.mark.parametrize("unit_type", ["random", "per_filter"])
def test_random_draws_are_sorted_unique_and_seeded(unit_type):
    shape = (7, 6, 5)
    u = draw_units(shape, 40, unit_type, seed=1, layer="l", resample=0, filter_axis=-1)
    assert u.size == 40 and np.all(np.diff(u) > 0) and u.min() >= 0 and u.max() < 210
    assert np.array_equal(u, draw_units(shape, 40, unit_type, seed=1, layer="l", resample=0))
    assert not np.array_equal(u, draw_units(shape, 40, unit_type, seed=1, layer="l", resample=1))
    assert not np.array_equal(u, draw_units(shape, 40, unit_type, seed=2, layer="l", resample=0))


def test_all_units_when_n_units_reaches_layer_size():
    for unit_type in ("random", "per_filter", "top", "all"):
        u = draw_units((3, 4), 12, unit_type, means=np.arange(12.0))
        assert np.array_equal(u, np.arange(12))
        assert np.array_equal(draw_units((3, 4), 10**6, unit_type, means=np.arange(12.0)), np.arange(12))
    assert np.array_equal(draw_units((3, 4), 1, "all"), np.arange(12))


def test_per_filter_takes_equal_counts_per_filter():
    shape = (6, 6, 8)
    for n in (16, 21, 5):
        u = draw_units(shape, n, "per_filter", seed=0, layer="x", filter_axis=-1)
        counts = np.bincount(np.unravel_index(u, shape)[2], minlength=8)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    # filter axis first (generic arrays)
    u = draw_units((4, 3, 3), 8, "per_filter", seed=0, layer="x", filter_axis=0)
    assert np.array_equal(np.bincount(np.unravel_index(u, (4, 3, 3))[0]), [2, 2, 2, 2])


def test_top_picks_the_largest_mean_units(tree):
    act = tree["block1_conv1"]["activation"]
    cats = act["set"].values == "cats"
    means = act.values[cats].reshape(cats.sum(), -1).astype(np.float64).mean(axis=0)
    units = select_units(tree, "block1_conv1", n_units=15, unit_type="top", sets=["cats"])
    chosen = units["flat_index"].values
    assert chosen.size == 15
    assert means[chosen].min() >= np.sort(means)[-15]
    # ties go to the lower flat index: the choice is the stable top-k
    assert np.array_equal(chosen, np.sort(np.argsort(-means, kind="stable")[:15]))


def test_top_is_lazy(tree):
    with raise_if_dask_computes():
        units = select_units(tree, "block1_conv1", n_units=15, unit_type="top")
    assert units["flat_index"].chunks is not None
    assert units["y"].shape == (15,)


def test_units_are_labelled_and_reusable(tree):
    units = select_units(tree, "block1_conv1", n_units=12, seed=5, resample=2)
    assert units.sizes["unit"] == 12
    assert set(units.data_vars) == {"y", "x", "filter"}
    assert units["layer"].item() == "block1_conv1"
    act = tree["block1_conv1"]["activation"]
    picked = act.sel({d: units[d] for d in ("y", "x", "filter")})  # (image, unit): same units for every image
    assert picked.dims == ("image", "unit")
    flat = act.values.reshape(act.shape[0], -1)[:, units["flat_index"].values]
    np.testing.assert_array_equal(picked.values, flat)
    # same draw as draw_units with the same identity
    expected = draw_units(act.shape[1:], 12, seed=5, layer="block1_conv1", resample=2)
    np.testing.assert_array_equal(units["flat_index"].values, expected)


def test_generic_array_units_use_its_labels():
    rec = make_recording()
    units = select_units(rec, n_units=7, sample_dim="state", set_coord="condition")
    assert set(units.data_vars) == {"unit", "frequency"}
    assert all(str(u).startswith("cell") for u in units["unit"].values)
    picked = rec.sel(unit=units["unit"], frequency=units["frequency"])
    assert picked.shape == (30, 7)


def test_draw_table_merges_identical_draws(tree):
    coll = as_collection(tree)
    dense = coll.layer("predictions")  # 10 units
    table = draw_table(dense, (5, 10, 50), 3, unit_type="random", seed=0, filter_dim="filter")
    assert table.n_used == (5, 10, 10)
    assert len(table.keys) == 3 + 1  # three random draws of 5 units, one "all"
    assert np.all(table.index[1:] == table.index[1, 0])
    top = draw_table(coll.layer("block1_conv1"), (5, 10), 4, unit_type="top", seed=0, filter_dim="filter")
    assert len(top.keys) == 2


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"n_units": 0}, ValueError, "n_units"),
        ({"n_units": -3}, ValueError, "n_units"),
        ({"n_units": 2.5}, TypeError, "n_units"),
        ({"unit_type": "best"}, ValueError, "unit_type"),
        ({"layer": "block9_conv9"}, UnknownLabelError, "block1_conv1"),
        ({"seed": -1}, ValueError, "seed"),
        ({"resample": -1}, ValueError, "resample"),
    ],
)
def test_bad_arguments_are_named(tree, kwargs, exc, words):
    args = {"layer": "block1_conv1", "n_units": 5} | kwargs
    with pytest.raises(exc, match=words):
        select_units(tree, **args)


def test_unknown_layer_is_key_and_value_error(tree):
    with pytest.raises(KeyError):
        select_units(tree, "nope", n_units=5)
    with pytest.raises(ValueError, match="input_layer"):
        select_units(tree, "nope", n_units=5)


def test_per_filter_needs_a_filter_dim():
    with pytest.raises(ValueError, match="filter_dim"):
        select_units(make_recording(), n_units=5, unit_type="per_filter", sample_dim="state")
    units = select_units(make_recording(), n_units=10, unit_type="per_filter", sample_dim="state",
                         filter_dim="frequency")
    assert np.bincount(np.searchsorted([2.0, 4.0, 8.0, 16.0, 32.0], units["frequency"].values)).tolist() == [2] * 5


def test_layer_order_follows_root_attrs(tree):
    assert list(as_collection(tree).layers) == list(LAYERS)
