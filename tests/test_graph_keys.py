"""Graph keys of the analyses, in the style of dask's ``same_keys`` tests.

The analyses build their dask graphs by hand: a graph's name is a ``tokenize`` of the
parameters, and nothing else keeps two analyses from colliding when they are computed
together in one ``dask.compute`` (dask merges graphs by key: the same key for two different
tasks silently gives one analysis the other's numbers). So, for every public analysis:

* identical calls -- twice on one tree, and on a second tree built the same way -- give the
  same output keys and the same set of graph keys;
* calls differing in one parameter that changes the result give different output keys, and
  any key the two graphs share (the chunk reads, a draw plan) stands for the same task;
* two different analyses computed in one ``dask.compute`` give each its own numbers;
* different data of the same shapes give different keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import arrays_in_graph, make_recording, make_tree, synchronous
from dask.base import tokenize
from dask.core import flatten

import cnndiff_xr as cx

# --------------------------------------------------------------------------- graph helpers


def dask_arrays(obj: Any) -> list[da.Array]:
    """The dask arrays of a DataArray, of a Dataset's variables or of every node of a DataTree."""
    if isinstance(obj, xr.DataTree):
        return [a for node in obj.subtree for a in dask_arrays(node.to_dataset(inherit=False))]
    if isinstance(obj, xr.Dataset):
        return [a for name in sorted(obj.data_vars) for a in dask_arrays(obj[name])]
    assert isinstance(obj, xr.DataArray)
    return [obj.data] if isinstance(obj.data, da.Array) else []


def output_keys(obj: Any) -> set:
    keys = set()
    for array in dask_arrays(obj):
        keys.update(flatten(array.__dask_keys__()))
    assert keys, "not a lazy result"
    return keys


def output_names(obj: Any) -> set[str]:
    return {key[0] for key in output_keys(obj)}


def graph(obj: Any) -> dict:
    """The merged, unoptimised graph of every dask array of ``obj``."""
    out: dict = {}
    for array in dask_arrays(obj):
        out.update(dict(array.__dask_graph__()))
    return out


def same_keys(a: Any, b: Any) -> bool:
    """dask's ``same_keys`` for xarray objects: equal output keys and equal graph keys."""
    return output_keys(a) == output_keys(b) and sorted(graph(a), key=str) == sorted(graph(b), key=str)


def colliding_keys(a: Any, b: Any) -> list:
    """Keys present in both graphs that stand for different tasks (a shared key must be the same work)."""
    ga, gb = graph(a), graph(b)
    return sorted((k for k in ga.keys() & gb.keys() if tokenize(ga[k]) != tokenize(gb[k])), key=str)


def compute_arrays(*objs: Any) -> list[list[np.ndarray]]:
    """Every dask array of every object, in one ``dask.compute``."""
    arrays = [dask_arrays(obj) for obj in objs]
    return [list(values) for values in dask.compute(*arrays)]


# --------------------------------------------------------------------------- the analyses
# Options always by keyword; each analysis gets a small base call, varied one parameter at a time.
DIFF = dict(n_units=[5, 40], resamples=2)


def _on_differentiation(func: Callable[..., Any]) -> Callable[..., Any]:
    """An analysis of a differentiation result; ``upstream`` replaces the differentiation's options."""

    def call(tree: xr.DataTree, upstream: dict | None = None, **kwargs: Any) -> Any:
        return func(cx.differentiation(tree, **(DIFF if upstream is None else upstream)), **kwargs)

    return call


ANALYSES: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "differentiation": (cx.differentiation, DIFF),
    "rdm": (cx.rdm, dict(layer="block1_conv1", n_units=40)),
    "rdm_regression": (cx.rdm_regression, dict(n_units=40)),
    "stimulus_regression": (_on_differentiation(cx.stimulus_regression), {}),
    "resample_summary": (_on_differentiation(cx.resample_summary), {}),
    "normalise_by_reference": (_on_differentiation(cx.normalise_by_reference), {}),
    "filter_means": (cx.filter_means, {}),
    "layer_means": (cx.layer_means, {}),
}
# lazy only for "top" (the units depend on the data); checked for identical calls only
SELECT_TOP = dict(layer="block1_conv1", n_units=20, unit_type="top")


def run(name: str, tree: xr.DataTree, **change: Any) -> Any:
    func, base = (cx.select_units, SELECT_TOP) if name == "select_units" else ANALYSES[name]
    return func(tree, **{**base, **change})


def variant(name: str, change: dict, common: dict | None = None, *, shares_outputs: bool = False) -> Any:
    """Calls ``name(base | common)`` and ``name(base | common | change)``, which compute different things.

    ``shares_outputs``: a result some of whose arrays are unchanged (the same layer's filter means,
    a summary's mean when only its interval changes), which may keep their keys; every other
    variant must change every output key.
    """
    common = common or {}
    label = ",".join(f"{k}={v}" for k, v in change.items()) + "".join(f",from {k}={v}" for k, v in common.items())
    return pytest.param(name, common, change, shares_outputs, id=f"{name}-{label}")


PER_FILTER = dict(unit_type="per_filter", layers=["block1_conv1", "block1_pool"])  # layers with a y dim
ZERO = dict(constant="zero")  # few units of sparse ReLU layers: some vectors are constant
TWO_SETS = dict(sets=["cats", "random"])
VARIANTS = [
    variant("differentiation", dict(n_units=[5, 30])),
    variant("differentiation", dict(n_units=[40, 5])),
    variant("differentiation", dict(unit_type="per_filter")),
    variant("differentiation", dict(unit_type="top")),
    variant("differentiation", dict(unit_type="all")),
    variant("differentiation", dict(norm="image"), ZERO),
    variant("differentiation", dict(norm="none")),
    variant("differentiation", dict(metric="correlation"), ZERO),
    variant("differentiation", dict(metric="cosine")),
    variant("differentiation", dict(reduction="mean")),
    variant("differentiation", dict(resamples=3)),
    variant("differentiation", dict(seed=1)),
    variant("differentiation", dict(layers=["block1_conv1"])),
    variant("differentiation", dict(layers=["block1_pool", "block1_conv1"]),
            dict(layers=["block1_conv1", "block1_pool"])),
    variant("differentiation", TWO_SETS),
    variant("differentiation", dict(sets=["random", "cats"]), TWO_SETS),
    variant("differentiation", dict(constant="zero")),
    variant("differentiation", dict(block_size=4)),
    variant("differentiation", dict(block_size=5), dict(block_size=4)),
    variant("differentiation", dict(filter_dim="y"), PER_FILTER),
    variant("rdm", dict(layer="block1_pool")),
    variant("rdm", dict(n_units=30)),
    variant("rdm", dict(unit_type="per_filter")),
    variant("rdm", dict(unit_type="top")),
    variant("rdm", dict(norm="image")),
    variant("rdm", dict(metric="correlation")),
    variant("rdm", dict(metric="cosine", norm="none")),
    variant("rdm", dict(seed=1)),
    variant("rdm", dict(resample=1)),
    variant("rdm", dict(sets="cats")),
    variant("rdm", dict(constant="zero")),
    variant("rdm", dict(block_size=4)),
    variant("rdm", dict(filter_dim="y"), dict(unit_type="per_filter")),
    variant("rdm_regression", dict(n_units=30)),
    variant("rdm_regression", dict(unit_type="per_filter")),
    variant("rdm_regression", dict(norm="image")),
    variant("rdm_regression", dict(metric="cosine")),
    variant("rdm_regression", dict(seed=1)),
    variant("rdm_regression", dict(resample=1)),
    variant("rdm_regression", dict(layers=["block1_conv1"])),
    variant("rdm_regression", dict(layers=["input_layer", "block1_conv1"]), dict(layers=["block1_conv1"])),
    variant("rdm_regression", dict(input_layer="block1_conv1")),
    variant("rdm_regression", TWO_SETS),
    variant("rdm_regression", dict(sets=["random", "cats"]), TWO_SETS),
    variant("rdm_regression", dict(constant="zero")),
    variant("rdm_regression", dict(block_size=4)),
    variant("rdm_regression", dict(filter_dim="y"), PER_FILTER),
    variant("stimulus_regression", dict(input_layer="block1_conv1")),
    variant("stimulus_regression", dict(dim="n_units")),
    variant("stimulus_regression", dict(upstream={**DIFF, "norm": "image", **ZERO})),
    variant("resample_summary", dict(interval=0.9), shares_outputs=True),  # mean and sd unchanged
    variant("resample_summary", dict(ddof=0), shares_outputs=True),  # only sd changes
    variant("resample_summary", dict(dim="n_units")),
    variant("resample_summary", dict(upstream={**DIFF, "seed": 1})),
    variant("normalise_by_reference", dict(reference="cats")),
    variant("normalise_by_reference", dict(drop=True)),
    variant("normalise_by_reference", dict(upstream={**DIFF, "metric": "correlation", **ZERO})),
    variant("filter_means", dict(zscore=True)),
    variant("filter_means", dict(layers=["block1_conv1"]), shares_outputs=True),
    variant("filter_means", dict(sets=["cats"])),
    variant("filter_means", dict(filter_dim="y"), dict(layers=["block1_conv1"])),
    variant("layer_means", dict(zscore=True)),
    variant("layer_means", dict(layers=["block1_conv1"])),
    variant("layer_means", dict(sets=["cats"])),
]

# every analysis once as called by default, plus the draws and paths with graphs of their own
IDENTICAL = [pytest.param(name, {}, id=name) for name in ANALYSES] + [
    pytest.param("differentiation", dict(unit_type="top"), id="differentiation-top"),
    pytest.param("differentiation", dict(unit_type="per_filter", block_size=4), id="differentiation-blocks"),
    pytest.param("rdm", dict(unit_type="top"), id="rdm-top"),
    pytest.param("rdm", dict(block_size=4), id="rdm-blocks"),
    pytest.param("rdm_regression", dict(block_size=4, metric="correlation"), id="rdm_regression-blocks"),
    pytest.param("filter_means", dict(zscore=True), id="filter_means-zscore"),
    pytest.param("select_units", {}, id="select_units-top"),
]


@pytest.fixture(scope="module")
def trees() -> tuple[xr.DataTree, xr.DataTree]:
    """Two trees built the same way (make_tree names its dask arrays deterministically)."""
    return make_tree()[0], make_tree()[0]


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("name", "change"), IDENTICAL)
def test_identical_calls_give_identical_keys(trees, name, change):
    first, second = trees
    a = run(name, first, **change)
    assert same_keys(a, run(name, first, **change))
    assert same_keys(a, run(name, second, **change))


@pytest.mark.parametrize(("name", "common", "change", "shares_outputs"), VARIANTS)
def test_a_changed_parameter_gives_other_keys(trees, name, common, change, shares_outputs):
    tree = trees[0]
    a, b = run(name, tree, **common), run(name, tree, **{**common, **change})
    assert output_keys(a) != output_keys(b)
    if not shares_outputs:
        assert not output_names(a) & output_names(b)
    # what the two graphs share (chunk reads, draw plans, the unchanged layers) must be the same work
    assert not colliding_keys(a, b)


@pytest.mark.parametrize(("name", "common", "change", "shares_outputs"), VARIANTS)
def test_analyses_computed_together_keep_their_own_numbers(trees, name, common, change, shares_outputs):
    tree = trees[0]
    a, b = run(name, tree, **common), run(name, tree, **{**common, **change})
    together_a, together_b = compute_arrays(a, b)
    (alone_a,), (alone_b,) = compute_arrays(a), compute_arrays(b)
    for together, alone in zip(together_a + together_b, alone_a + alone_b, strict=True):
        np.testing.assert_array_equal(together, alone)


def test_every_analysis_computed_together_keeps_its_own_numbers(trees):
    """All analyses (and two differentiations) in one compute: each equals its computation alone."""
    tree = trees[0]
    results = [run(name, tree) for name in ANALYSES] + [run("differentiation", tree, norm="image", **ZERO)]
    together = compute_arrays(*results)
    for result, values in zip(results, together, strict=True):
        (alone,) = compute_arrays(result)
        for x, y in zip(values, alone, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", list(ANALYSES))
def test_different_data_give_different_keys(trees, name):
    other = make_tree(seed=1)[0]  # same sets, layers and shapes; other values
    a, b = run(name, trees[0]), run(name, other)
    assert not output_names(a) & output_names(b)
    assert not colliding_keys(a, b)


RECORDING = dict(sample_dim="state", set_coord="condition")
ON_RECORDINGS = {
    "differentiation": lambda r: cx.differentiation(r, n_units=[6, 20], resamples=2, **RECORDING),
    "rdm": lambda r: cx.rdm(r, n_units=20, **RECORDING),
    "filter_means": lambda r: cx.filter_means(r, filter_dim="frequency", **RECORDING),
}


@pytest.mark.parametrize("name", list(ON_RECORDINGS))
def test_in_memory_data_are_keyed_by_their_values(name):
    """A numpy-backed DataArray is chunked by the analysis: keys follow its values, not the object."""
    analysis = ON_RECORDINGS[name]
    a = analysis(make_recording(seed=1))
    assert same_keys(a, analysis(make_recording(seed=1)))
    b = analysis(make_recording(seed=2))  # same shape and labels, other values
    assert not output_names(a) & output_names(b)
    assert not colliding_keys(a, b)


def _with_lazy_record(flags: np.ndarray, name: str) -> xr.DataTree:
    """The synthetic tree with a lazy completion record (as a store opened without loading it)."""
    tree = make_tree()[0]
    tree["completed"] = xr.DataArray(da.from_array(flags, chunks=4, name=name), dims="image")
    return tree


@pytest.mark.parametrize("name", ["differentiation", "rdm", "rdm_regression", "filter_means", "layer_means"])
def test_a_lazy_completion_record_enters_the_keys(name):
    """Same activations, another completion record: other keys, and only the unfinished one refuses to compute."""
    flags = np.ones(make_tree()[0].sizes["image"], bool)
    finished = run(name, _with_lazy_record(flags, "completed-finished"))
    flags[5] = False
    unfinished = run(name, _with_lazy_record(flags, "completed-unfinished"))
    assert not output_names(finished) & output_names(unfinished)
    assert not colliding_keys(finished, unfinished)
    compute_arrays(finished)
    with pytest.raises(ValueError, match="not completed"):
        compute_arrays(finished, unfinished)


# --------------------------------------------------------------------------- what a graph carries
def _bytes_of_image_sized_indices(lazy: Any, n: int) -> int:
    """Bytes of the integer and label arrays of at least ``n`` elements in ``lazy``'s graph (the data chunks, float,
    not counted)."""
    return sum(a.nbytes for a in arrays_in_graph(lazy) if a.dtype.kind in "iuU" and a.size >= n)


def test_a_graph_holds_the_sets_rows_and_labels_once_not_once_per_layer():
    # a copy per layer made 15-20 MiB of a 5,000-image VGG16 differentiation's graph, growing with images x layers
    tree = make_tree(sets={"a": 300, "b": 200}, layers={f"l{i}": (4, 4, 2) for i in range(6)}, chunk=50)[0]
    two = _bytes_of_image_sized_indices(cx.differentiation(tree, [10], resamples=2, layers=["l0", "l1"]), 200)
    six = _bytes_of_image_sized_indices(cx.differentiation(tree, [10], resamples=2), 200)
    assert 0 < six == two
