"""Layer and model similarity (cx.layer_similarity): CKA against its formulas, RDM comparisons against scipy and
plain loops, two stores matched by image id, reduced stores, slabs, laziness, keys and a real LocalCluster."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import (
    make_tree,
    raise_if_dask_computes,
    reduce_tree,
    reference_distances,
    synchronous,
    tree,
    unit_indices,
)
from scipy import stats

import cnndiff_xr as cx
from cnndiff_xr.analysis import similarity
from cnndiff_xr.analysis.similarity import layer_similarity
from cnndiff_xr.sampling import UnitDraws
from cnndiff_xr.validation import ChoiceError, ParameterValueError

LAYERS = ["input_layer", "block1_conv1", "block1_pool", "predictions"]


# --------------------------------------------------------------------------- plain references
def matrix(t: xr.DataTree, layer: str, units: np.ndarray | None = None) -> np.ndarray:
    """Images x units (float64) of a layer, in image order, with plain numpy."""
    act = t[layer]["activation"]
    x = np.asarray(act.values, dtype=np.float64).reshape(act.shape[0], -1)
    return x if units is None else x[:, units]


def cka_features(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from the features: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of column-centred X, Y."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def hsic_biased(k: np.ndarray, l_: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l_ @ h) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written as in the paper."""
    n = k.shape[0]
    k, l_ = k * (1 - np.eye(n)), l_ * (1 - np.eye(n))
    one = np.ones(n)
    term = np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (
        one @ k @ l_ @ one)
    return float(term / (n * (n - 3)))


def cka_gram(x: np.ndarray, y: np.ndarray, hsic) -> float:
    k, l_ = x @ x.T, y @ y.T
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def tau_a_loop(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-a by the definition: (concordant - discordant) / (P (P-1) / 2), over every pair of pairs."""
    p = x.size
    total = 0.0
    for i in range(p):
        for j in range(i + 1, p):
            total += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
    return total / (p * (p - 1) / 2)


def upper(d: np.ndarray) -> np.ndarray:
    """pdist's condensed vector (already one) or a square matrix's upper triangle."""
    return d if d.ndim == 1 else d[np.triu_indices(d.shape[0], 1)]


def as_dataset(t: xr.DataTree) -> xr.Dataset:
    """The layers of a tree as one Dataset (image, ...) per variable: a second 'store' that can be reordered."""
    layers = {}
    for name in LAYERS:
        act = t[name]["activation"]
        layers[name] = act.rename({d: f"{d}_{name}" for d in act.dims[1:]})  # feature dims of their own per layer
    return xr.Dataset(layers)


# --------------------------------------------------------------------------- CKA
@pytest.mark.parametrize("n_units", [None, 30])
def test_cka_matches_its_formulas(tree, n_units):
    biased = layer_similarity(tree, method="cka", n_units=n_units).compute()
    unbiased = layer_similarity(tree, method="cka_unbiased", n_units=n_units).compute()
    assert biased.dims == ("layer", "layer_other") and biased.dtype == np.float64
    assert list(biased["layer"].values) == LAYERS == list(biased["layer_other"].values)
    xs = {name: matrix(tree, name, None if n_units is None else unit_indices(tree, name, n_units)) for name in LAYERS}
    for i, a in enumerate(LAYERS):
        for j, b in enumerate(LAYERS):
            expected = cka_features(xs[a], xs[b])
            assert abs(biased.values[i, j] - expected) < 1e-12, (a, b)
            assert abs(cka_gram(xs[a], xs[b], hsic_biased) - expected) < 1e-12  # the two forms agree
            assert abs(unbiased.values[i, j] - cka_gram(xs[a], xs[b], hsic_unbiased)) < 1e-12, (a, b)
    for result in (biased, unbiased):
        np.testing.assert_array_equal(np.diagonal(result.values), 1.0)  # exactly
        np.testing.assert_array_equal(result.values, result.values.T)
    assert biased.attrs["method"] == "cka" and biased.attrs["n_units"] == ("all" if n_units is None else n_units)
    assert "raw activations" in biased.attrs["gram"]
    assert list(biased["n_units_used"].values) == [108 if n_units is None else 30, 200 if n_units is None else 30,
                                                    32 if n_units is None else 30, 10]


@pytest.mark.parametrize("method", ["cka", "cka_unbiased"])
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(method):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(25, 12)) + 3.0
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    z = rng.normal(size=(25, 7))
    ds = xr.Dataset({"x": (("image", "feature"), x), "rotated": (("image", "feature"), 4.5 * x @ q),
                     "other": (("image", "feature2"), z)})
    s = layer_similarity(ds, method=method).compute()
    assert abs(s.sel(layer="x", layer_other="rotated").item() - 1.0) < 1e-12
    assert s.sel(layer="x", layer_other="x").item() == 1.0
    reference = cka_gram(x, z, hsic_biased if method == "cka" else hsic_unbiased)
    assert abs(s.sel(layer="rotated", layer_other="other").item() - reference) < 1e-12


def test_similarity_from_grams_matches_the_lazy_result(tree):
    xs = [matrix(tree, name) for name in LAYERS]
    expected = layer_similarity(tree, method="cka_unbiased").values
    np.testing.assert_allclose(similarity.similarity_from_grams([x @ x.T for x in xs], method="cka_unbiased"),
                               expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- RSA
@pytest.mark.parametrize(("norm", "metric"), [("layer", "euclidean"), ("image", "correlation"),
                                              ("layer", "cosine"), ("none", "cosine"), ("image", "euclidean")])
def test_rdm_comparisons_match_scipy_and_numpy(tree, norm, metric):
    n = 40
    rho = layer_similarity(tree, method="rsa_spearman", n_units=n, norm=norm, metric=metric).compute()
    cos = layer_similarity(tree, method="rsa_cosine", n_units=n, norm=norm, metric=metric).compute()
    d = {name: reference_distances(matrix(tree, name, unit_indices(tree, name, n)), norm, metric) for name in LAYERS}
    for i, a in enumerate(LAYERS):
        for j, b in enumerate(LAYERS):
            assert abs(rho.values[i, j] - stats.spearmanr(d[a], d[b]).statistic) < 1e-9, (a, b)
            expected = d[a] @ d[b] / (np.linalg.norm(d[a]) * np.linalg.norm(d[b]))
            assert abs(cos.values[i, j] - expected) < 1e-9, (a, b)
    assert rho.attrs["norm"] == norm and rho.attrs["metric"] == metric


def test_rdm_cosine_agrees_with_the_rdms_of_cx_rdm(tree):
    """The RDMs compared are those of cx.rdm (the same draw and distance), within cx.rdm's 1e-5."""
    s = layer_similarity(tree, method="rsa_cosine", n_units=25, norm="image", metric="correlation").compute()
    rdms = dask.compute(*[cx.rdm(tree, name, n_units=25, norm="image", metric="correlation") for name in LAYERS])
    v = [upper(r.values) for r in rdms]
    expected = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in v] for a in v])
    np.testing.assert_allclose(s.values, expected, rtol=1e-5)


def test_kendall_tau_a_by_an_explicit_loop():
    small, _ = make_tree(sets={"a": 6, "b": 5}, seed=2)  # 11 images: 55 pairs
    s = layer_similarity(small, method="rsa_kendall", n_units=20).compute()
    d = {name: reference_distances(matrix(small, name, unit_indices(small, name, 20)), "layer", "euclidean")
         for name in LAYERS}
    for i, a in enumerate(LAYERS):
        for j, b in enumerate(LAYERS):
            assert abs(s.values[i, j] - tau_a_loop(d[a], d[b])) < 1e-12, (a, b)


def test_kendall_tau_a_counts_ties_as_neither_concordant_nor_discordant():
    # norm="image" with constant="zero": two constant images have distance 1 to every other image, so the RDM ties
    x = np.random.default_rng(0).normal(size=(8, 6))
    x[2] = 1.0
    x[5] = 2.0
    y = x ** 3 + 0.1 * np.random.default_rng(1).normal(size=x.shape)
    ds = xr.Dataset({"x": (("image", "f"), x), "y": (("image", "f"), y)})
    s = layer_similarity(ds, method="rsa_kendall", n_units=6, norm="image", metric="euclidean",
                         constant="zero").compute()
    dx = upper(similarity.rdm_from_gram(similarity._finish(similarity._accumulate([x], None), _identity_task(x)),
                                        6, cx.analysis.metrics.distance_spec("image", "euclidean"), "zero",
                                        layer="x", group="all", names=np.arange(8)))
    assert np.unique(dx).size < dx.size  # there are ties
    dy = reference_distances(y, "image", "euclidean")
    assert abs(s.sel(layer="x", layer_other="y").item() - tau_a_loop(dx, dy)) < 1e-12
    assert s.sel(layer="x", layer_other="x").item() == pytest.approx(tau_a_loop(dx, dx), abs=1e-12)
    assert s.sel(layer="x", layer_other="x").item() < 1.0  # tau-a of a tied vector with itself


def _identity_task(x: np.ndarray) -> similarity.LayerTask:
    return similarity.LayerTask("x", "", "all images", x.shape[1], np.arange(x.shape[0]), None)


# --------------------------------------------------------------------------- two stores
@pytest.mark.parametrize("method", ["cka", "rsa_spearman"])
def test_two_stores_of_the_same_images_in_another_order(tree, method):
    ds = as_dataset(tree)
    shuffled = ds.isel(image=np.random.default_rng(3).permutation(ds.sizes["image"]))
    one = layer_similarity(tree, method=method, n_units=30).compute()
    two = layer_similarity(tree, shuffled, method=method, n_units=30, layers=LAYERS[:2]).compute()
    np.testing.assert_allclose(two.values, one.values[:2], rtol=0, atol=1e-12)
    assert list(two["layer_other"].values) == LAYERS and two.attrs["stores"] == 2


def test_two_different_models_match_a_plain_reference(tree):
    other, _ = make_tree(seed=9)  # the same image ids, other activations
    s = layer_similarity(tree, other, method="cka", layers_other=["block1_pool", "predictions"]).compute()
    for i, a in enumerate(LAYERS):
        for j, b in enumerate(["block1_pool", "predictions"]):
            assert abs(s.values[i, j] - cka_features(matrix(tree, a), matrix(other, b))) < 1e-12


def test_mismatched_image_ids_are_refused(tree):
    ds = as_dataset(tree)
    fewer = ds.isel(image=slice(2, None))
    with pytest.raises(ParameterValueError, match=r"tree has 28 selected images, other 26; 2 of tree's are not in "
                                                  r"other \(e\.g\. \['img0000', 'img0001'\]\)"):
        layer_similarity(tree, fewer)
    renamed = ds.assign_coords(image=[f"x{i}" for i in range(ds.sizes["image"])])
    with pytest.raises(ParameterValueError, match="28 of other's are not in tree"):
        layer_similarity(tree, renamed, method="rsa_cosine", n_units=10)


def test_sets_select_the_same_images_in_both_stores(tree):
    ds = as_dataset(tree)
    shuffled = ds.isel(image=np.random.default_rng(5).permutation(ds.sizes["image"]))
    s = layer_similarity(tree, shuffled, sets=["cats", "random"], layers=["block1_pool"],
                         layers_other=["predictions"]).compute()
    keep = np.isin(tree["block1_pool"]["set"].values, ["cats", "random"])
    expected = cka_features(matrix(tree, "block1_pool")[keep], matrix(tree, "predictions")[keep])
    assert abs(s.item() - expected) < 1e-12
    assert s.attrs["n_images"] == int(keep.sum()) and s.attrs["sets"] == ["cats", "random"]


# --------------------------------------------------------------------------- reduced stores, slabs
def test_reduced_store_needs_a_registered_draw_and_matches_the_full_store(tree):
    draws = UnitDraws(n_units=[20], resamples=2, seed=0)
    reduced = reduce_tree(tree, draws, filter_means=False)
    with pytest.raises(ParameterValueError, match=r"n_units=None uses every unit.*n_units \[20\], resamples 0\.\.1, "
                                                  r"seed 0, unit_type 'random'"):
        layer_similarity(reduced)
    for method in ("cka", "rsa_spearman"):
        full = layer_similarity(tree, method=method, n_units=20, resample=1).compute()
        red = layer_similarity(reduced, method=method, n_units=20, resample=1).compute()
        np.testing.assert_array_equal(red.values, full.values)  # the same gathered values, the same sums
    with pytest.raises(ParameterValueError, match="does not hold draws"):
        layer_similarity(reduced, n_units=20, resample=2)


def test_slabs_read_the_layer_in_pieces_and_give_the_same_numbers(tree, monkeypatch):
    whole = layer_similarity(tree, method="cka")
    monkeypatch.setattr(similarity, "GRAM_BLOCK_COLUMNS", 16)
    with dask.config.set({"cnndiff_xr.analysis-memory": 16 * 28 * 4}):  # one 16-column slab of 28 float32 images
        sliced = layer_similarity(tree, method="cka")
    gates = [k for k in sliced.__dask_graph__() if isinstance(k, tuple) and str(k[0]).startswith("gate-")]
    assert len(gates) == (-(-108 // 16) - 1) + (-(-200 // 16) - 1) + (-(-32 // 16) - 1)  # predictions: one slab
    assert sliced.data.name != whole.data.name  # the slabs are part of the key
    np.testing.assert_allclose(sliced.values, whole.values, rtol=0, atol=1e-13)
    np.testing.assert_allclose(sliced.values[0, 1], cka_features(matrix(tree, LAYERS[0]), matrix(tree, LAYERS[1])),
                               rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- undefined comparisons, arguments
def test_a_constant_layer_raises_or_gives_nan():
    x = np.random.default_rng(0).normal(size=(10, 5))
    ds = xr.Dataset({"x": (("image", "f"), x), "flat": (("image", "f"), np.ones((10, 5)))})
    for method in ("cka", "rsa_cosine"):
        with pytest.raises(ValueError, match=f"layer 'flat'.*{method!r} is undefined"):
            layer_similarity(ds, method=method, norm="none").compute()
        s = layer_similarity(ds, method=method, norm="none", constant="zero").compute()
        assert np.isnan(s.sel(layer="flat").values).all() and np.isnan(s.sel(layer_other="flat").values).all()
        assert s.sel(layer="x", layer_other="x").item() == 1.0


@pytest.mark.parametrize(("kwargs", "exc", "words"), [
    ({"method": "cca"}, ChoiceError, "method='cca'"),
    ({"norm": "z"}, ChoiceError, "norm='z'"),
    ({"n_units": 0}, ParameterValueError, "n_units"),
    ({"layers": ["nope"]}, KeyError, "nope"),
    ({"sets": ["cats"], "method": "cka_unbiased", "n_units": 5}, None, None),
])
def test_bad_arguments_are_named(tree, kwargs, exc, words):
    if exc is None:  # cats has 7 images: enough
        layer_similarity(tree, **kwargs)
        return
    with pytest.raises(exc, match=words):
        layer_similarity(tree, **kwargs)


def test_too_few_images_are_refused():
    small, _ = make_tree(sets={"a": 3, "b": 2}, seed=1)
    with pytest.raises(ParameterValueError, match="method='cka_unbiased' needs at least 4 images"):
        layer_similarity(small, method="cka_unbiased", sets="a")


# --------------------------------------------------------------------------- laziness, keys, cluster
def test_building_computes_nothing(tree):
    other, _ = make_tree(seed=9)
    with raise_if_dask_computes():
        for method in ("cka", "cka_unbiased", "rsa_spearman", "rsa_kendall", "rsa_cosine"):
            layer_similarity(tree, method=method)
            layer_similarity(tree, other, method=method, n_units=20, unit_type="top")


def test_graph_keys(tree):
    a = layer_similarity(tree, method="cka", n_units=20)
    b = layer_similarity(tree, method="cka", n_units=20)
    assert a.data.name == b.data.name and set(a.__dask_graph__()) == set(b.__dask_graph__())
    changed = [layer_similarity(tree, method="cka_unbiased", n_units=20),
               layer_similarity(tree, method="cka", n_units=21),
               layer_similarity(tree, method="cka", n_units=20, seed=1),
               layer_similarity(tree, method="cka", n_units=20, layers=LAYERS[::-1]),
               layer_similarity(tree, method="rsa_spearman", n_units=20),
               layer_similarity(tree, method="rsa_spearman", n_units=20, metric="cosine")]
    names = {c.data.name for c in changed} | {a.data.name}
    assert len(names) == len(changed) + 1
    together = dask.compute(a, *changed)
    for alone, computed in zip([a, *changed], together, strict=True):
        np.testing.assert_array_equal(alone.compute().values, computed.values)
    # norm and metric do not change CKA, so they do not change its keys
    assert layer_similarity(tree, method="cka", n_units=20, norm="image").data.name == a.data.name


def test_local_cluster_equals_synchronous(tree, local_client):
    other, _ = make_tree(seed=9)
    cases = [layer_similarity(tree, other, method="cka_unbiased", n_units=15, unit_type="top"),
             layer_similarity(tree, method="rsa_kendall", n_units=20)]
    sync = dask.compute(*cases, scheduler="sync")
    distributed = local_client.compute(list(cases), sync=True)
    for s, d in zip(sync, distributed, strict=True):
        np.testing.assert_allclose(d.values, s.values, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- figure
def test_similarity_matrix_figure(tree):
    import matplotlib

    matplotlib.use("Agg")
    from cnndiff_xr import plot

    sim = layer_similarity(tree, method="rsa_spearman", n_units=20)
    fig, ax = plot.similarity_matrix(sim)
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    image = ax.get_images()[0]
    assert image.get_clim() == (-1.0, 1.0)
    label = fig.axes[-1].get_ylabel()
    assert "Spearman" in label and "-1 … 1" in label
    plot._pyplot().close(fig)
