"""Reduced stores, extracted for real: the tiny CNN (and VGG16 at a few images) into a full store and into reduced
stores of the same images, compared value by value and through the analysis."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from tiny import TINY_LAYERS, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr import schema
from cnndiff_xr.extraction import store
from cnndiff_xr.extraction.run import size_report
from cnndiff_xr.validation import ParameterError

DRAWS = cx.UnitDraws(n_units=[20, 100], resamples=3, seed=4)  # the tiny CNN's layers have 5 to 3,600 units
N_IMAGES = 18  # tiny_sets: 5 photos, 6 array images, 7 noise images


def _extract(tiny_sets, tiny_model, client, path, **kwargs):
    return cx.extract(tiny_sets, store=str(path), model=tiny_model, preprocess=tiny_preprocess(), client=client,
                      batch_size=4, progress=False, **kwargs)


@pytest.fixture(scope="module", params=["float32", "float16"])
def pair(request, tmp_path_factory, tiny_sets, tiny_model, local_client):
    """(full store, reduced store with filter means) of the same 18 images, in one dtype."""
    folder = tmp_path_factory.mktemp(f"reduced-{request.param}")
    full = _extract(tiny_sets, tiny_model, local_client, folder / "full.zarr", dtype=request.param)
    reduced = _extract(tiny_sets, tiny_model, local_client, folder / "reduced.zarr", dtype=request.param,
                       units=DRAWS, filter_means=True)
    return full, reduced


def _values(tree, layer):
    return tree[layer][schema.ACTIVATION].compute(scheduler="synchronous")


def test_reduced_layers_keep_exactly_the_registered_units_bit_for_bit(pair):
    full, reduced = pair
    assert reduced.attrs[schema.UNIT_DRAWS_ATTR] == DRAWS.to_attrs() and reduced.attrs[schema.FILTER_MEANS_ATTR]
    assert full.attrs.get(schema.UNIT_DRAWS_ATTR) is None
    n_reduced = 0
    for layer in TINY_LAYERS:
        whole, kept = _values(full, layer), _values(reduced, layer)
        shape = whole.shape[1:]
        expected = DRAWS.kept_units(layer, shape)  # the union of the registered draws, drawn independently here
        union = np.zeros(int(np.prod(shape)), bool)
        for n in DRAWS.n_units:
            for r in range(DRAWS.resamples):
                union[cx.select_units(full, layer, n_units=n, seed=DRAWS.seed, resample=r)["flat_index"].values] = 1
        if int(np.prod(shape)) <= max(DRAWS.n_units):  # kept whole, in the full layout
            assert expected is None
            xr.testing.assert_identical(kept, whole)
            continue
        n_reduced += 1
        assert np.array_equal(expected, np.flatnonzero(union))
        assert kept.dims == (schema.IMAGE_DIM, schema.UNIT_DIM) and kept.dtype == whole.dtype
        assert np.array_equal(kept[schema.FLAT_INDEX].values, expected)
        assert kept.attrs[schema.LAYER_SHAPE_ATTR] == list(shape)
        assert kept.attrs[schema.LAYER_DIMS_ATTR] == list(whole.dims[1:])
        flat = whole.values.reshape(whole.shape[0], -1)
        assert np.array_equal(kept.values, flat[:, expected])  # the same bits as the full store's columns
        for axis, dim in enumerate(whole.dims[1:]):  # each unit's labelled position
            assert np.array_equal(kept[dim].values, np.unravel_index(expected, shape)[axis])
        assert np.array_equal(kept[schema.SET_COORD].values, whole[schema.SET_COORD].values)
    assert n_reduced == 4  # input, conv1, pool1, conv2; dense (16) and predictions (5) whole


def test_stored_means_equal_the_full_float32_stores_within_1e_6(pair, tmp_path_factory, tiny_sets, tiny_model,
                                                                 local_client):
    full, reduced = pair
    # the means are of the model's float32 output (see extraction/reduction.py), so they are compared with a float32
    # full store's activations, averaged here in plain numpy float64
    reference = full if full[TINY_LAYERS[0]][schema.ACTIVATION].dtype == np.float32 else None
    if reference is None:
        reference = _extract(tiny_sets, tiny_model, local_client,
                             tmp_path_factory.mktemp("f32ref") / "full.zarr", dtype="float32")
    for layer in TINY_LAYERS:
        x = _values(reference, layer).values.astype(np.float64)
        if x.ndim == 2 and schema.UNIT_DIM not in reduced[layer][schema.ACTIVATION].dims:
            # a dense layer kept whole: its filter means are its activations, not stored twice
            assert schema.MEANS_GROUP not in reduced[layer].children
            continue
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        means = reduced[layer][schema.MEANS_GROUP].to_dataset().compute(scheduler="synchronous")
        np.testing.assert_allclose(means[schema.FILTER_MEAN].values, x.mean(axis=1), rtol=1e-6,
                                   atol=1e-6 * np.abs(x).max())
        image_mean = x.mean(axis=(1, 2))
        np.testing.assert_allclose(means[schema.LAYER_MEAN].values, image_mean, rtol=1e-6,
                                   atol=1e-7 * np.abs(x).max())
        css = ((x - image_mean[:, None, None]) ** 2).sum(axis=(1, 2))
        np.testing.assert_allclose(means[schema.LAYER_CSS].values, css, rtol=1e-5)
        assert means[schema.FILTER_MEAN].dtype == np.float32


def test_filter_means_of_a_reduced_store_equal_the_full_stores(pair):
    full, reduced = pair
    float16 = full[TINY_LAYERS[0]][schema.ACTIVATION].dtype == np.float16
    for zscore in (False, True):
        got = cx.filter_means(reduced, zscore=zscore).compute()
        want = cx.filter_means(full, zscore=zscore).compute()
        for layer in TINY_LAYERS:
            a, b = got[layer]["filter_mean"], want[layer]["filter_mean"]
            # raw means relative to the layer's largest; z-scores are in SDs, whose unit is their natural scale
            scale = 1.0 if zscore else float(np.abs(b).max())
            # float16: a full store averages values rounded to 11 bits; the stored means are of the unrounded output
            rtol = 2.0**-10 if float16 else 1e-6
            np.testing.assert_allclose(a.values, b.values, rtol=rtol, atol=rtol * scale)
            np.testing.assert_allclose(got[layer]["layer_mean"].values, want[layer]["layer_mean"].values,
                                       rtol=rtol, atol=rtol * scale)


def test_registered_draws_give_bit_identical_differentiation_and_rdms(pair):
    full, reduced = pair
    for subset in ({"n_units": [20, 100], "resamples": 3}, {"n_units": 100, "resamples": 2},
                   {"n_units": [20], "resamples": 1}):
        for norm, metric in (("layer", "euclidean"), ("image", "correlation"), ("none", "cosine")):
            options = {**subset, "seed": DRAWS.seed, "norm": norm, "metric": metric}
            a = cx.differentiation(reduced, **options).compute()
            b = cx.differentiation(full, **options).compute()
            assert np.array_equal(a.values, b.values), (subset, norm, metric)
    for layer in ("conv1", "dense"):
        a = cx.rdm(reduced, layer=layer, n_units=100, seed=DRAWS.seed, resample=2).compute()
        b = cx.rdm(full, layer=layer, n_units=100, seed=DRAWS.seed, resample=2).compute()
        assert np.array_equal(a.values, b.values)
        xr.testing.assert_identical(cx.select_units(reduced, layer, n_units=20, seed=DRAWS.seed, resample=1),
                                    cx.select_units(full, layer, n_units=20, seed=DRAWS.seed, resample=1))


@pytest.mark.parametrize("options, named", [
    ({"n_units": 50}, "n_units"), ({"n_units": 20, "resamples": 4}, "resamples"),
    ({"n_units": 20, "seed": 0}, "seed"), ({"n_units": 20, "unit_type": "per_filter"}, "unit_type"),
    ({"n_units": 20, "unit_type": "top"}, "top"), ({"n_units": 20, "unit_type": "all"}, "all"),
])
def test_draws_the_store_does_not_hold_are_refused_naming_what_it_holds(pair, options, named):
    _, reduced = pair
    options = {"seed": DRAWS.seed, **options}
    with pytest.raises(ParameterError) as err:
        cx.differentiation(reduced, layers="conv1", **options)
    message = str(err.value)
    assert named in message and "conv1" in message
    assert "[20, 100]" in message  # what the store holds


def test_top_and_bad_units_are_refused_at_extraction(tmp_path, tiny_sets, tiny_model, local_client):
    with pytest.raises(ParameterError, match="'top' cannot be registered.*highest mean over the analysed images"):
        cx.UnitDraws(n_units=[20], unit_type="top")
    with pytest.raises(ParameterError, match="units must be 'all'"):
        _extract(tiny_sets, tiny_model, local_client, tmp_path / "x.zarr", units={"n_units": [20]})
    with pytest.raises(ParameterError, match="n_units must be positive"):
        cx.UnitDraws(n_units=[0])
    assert not (tmp_path / "x.zarr").exists()


def test_the_registered_draws_and_means_are_part_of_the_identity(tmp_path, tiny_sets, tiny_model, local_client):
    path = tmp_path / "r.zarr"
    _extract(tiny_sets, tiny_model, local_client, path, units=DRAWS)
    for other, named in ((cx.UnitDraws(n_units=[20, 100], resamples=4, seed=4), "unit_draws"),
                         ("all", "unit_draws")):
        with pytest.raises(store.StoreError, match=named):
            _extract(tiny_sets, tiny_model, local_client, path, units=other)
    with pytest.raises(store.StoreError, match="filter_means"):
        _extract(tiny_sets, tiny_model, local_client, path, units=DRAWS, filter_means=True)
    _, report = cx.extract(tiny_sets, store=str(path), model=tiny_model, preprocess=tiny_preprocess(),
                           client=local_client, batch_size=4, progress=False, units=DRAWS, return_report=True)
    assert report.batches_computed == 0  # the same registration resumes (here: nothing left to do)


def test_size_preflight_and_info_report_the_kept_units(pair, tiny_model):
    _, reduced = pair
    shapes = {"conv1": (30, 30, 4), "dense": (16,)}
    from cnndiff_xr.extraction.reduction import Reduction

    text = size_report(shapes, 10, "float32", Reduction(DRAWS, filter_means=False))
    kept = DRAWS.kept_units("conv1", (30, 30, 4)).size
    assert f"{kept * 40 / 1000:.1f} kB (every unit: 144.0 kB)" in text and "(whole)" in text
    assert "n_units [20, 100], resamples 0..2, seed 4" in text
    summary = store.info(reduced.attrs.get("store", "")) if "store" in reduced.attrs else None
    assert summary is None or summary["unit_draws"] == DRAWS.to_attrs()


def test_info_shows_the_draws_and_the_units_kept(tmp_path, tiny_sets, tiny_model, local_client):
    path = tmp_path / "info.zarr"
    _extract(tiny_sets, tiny_model, local_client, path, units=DRAWS, filter_means=True)
    summary = store.info(str(path))
    assert summary["unit_draws"] == DRAWS.to_attrs() and summary["filter_means"] is True
    by_layer = {layer["layer"]: layer for layer in summary["layers"]}
    assert by_layer["conv1"]["units"] == 3600
    assert by_layer["conv1"]["units_kept"] == DRAWS.kept_units("conv1", (30, 30, 4)).size
    assert by_layer["dense"]["units_kept"] == by_layer["dense"]["units"] == 16
    text = store.format_info(summary)
    assert "reduced store" in text and f"{by_layer['conv1']['units_kept']} of 3600" in text


def test_select_keeps_the_units_of_chosen_filters_and_the_means(pair):
    _, reduced = pair
    picked = cx.select(reduced, ["conv1", "dense"], filter=[1, 2], sets="photos")
    conv = picked["conv1"][schema.ACTIVATION]
    assert set(np.unique(conv[schema.FILTER_DIM].values)) == {1, 2}
    assert conv.sizes[schema.IMAGE_DIM] == 5
    means = picked["conv1"][schema.MEANS_GROUP]
    assert list(means[schema.FILTER_DIM].values) == [1, 2] and means.sizes[schema.IMAGE_DIM] == 5


def test_vgg16_reduced_store_equals_the_full_store(tmp_path, local_client):
    """The real network at 224 x 224 (random weights), 4 images, float16, every default layer."""
    sets = {"noise": cx.images.white_noise(2, seed=1), "more": cx.images.white_noise(2, seed=2)}
    draws = cx.UnitDraws(n_units=[200, 10000], resamples=2, seed=0)
    common = {"model": "vgg16", "weights": None, "dtype": "float16", "client": local_client, "batch_size": 2,
              "progress": False}
    full = cx.extract(sets, store=str(tmp_path / "full.zarr"), **common)
    reduced = cx.extract(sets, store=str(tmp_path / "reduced.zarr"), units=draws, filter_means=True, **common)
    options = {"n_units": [200, 10000], "resamples": 2, "seed": 0}
    a, b = cx.differentiation(reduced, **options).compute(), cx.differentiation(full, **options).compute()
    assert np.array_equal(a.values, b.values) and np.isfinite(a.values).all()
    full_bytes, reduced_bytes = store.info(str(tmp_path / "full.zarr")), store.info(str(tmp_path / "reduced.zarr"))
    assert reduced_bytes["uncompressed_bytes"] * 5 < full_bytes["uncompressed_bytes"]
    got = cx.filter_means(reduced, layers="block5_conv3").compute()["block5_conv3"]["filter_mean"]
    want = cx.filter_means(full, layers="block5_conv3").compute()["block5_conv3"]["filter_mean"]
    np.testing.assert_allclose(got.values, want.values, rtol=2.0**-10, atol=2.0**-10 * float(np.abs(want).max()))
