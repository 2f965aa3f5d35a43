"""How an opened store is read: few tasks for small per-image arrays and for selections of images.

A 20,000-image store of batch 8 has 2,500 chunks per array. One dask task per stored chunk made ``cnndiff plot``
(which draws a seeded sample of 1,000 images) spend most of its 105 s scheduling: the image coordinates were loaded
one chunk per task, the filter means (a few KiB per batch) read one chunk per task, and the sampled activations one
task per chunk they touch plus a selection on top. Now the coordinates are read with one zarr call per array, the
means a few stored chunks per task, and a selection of images through the store's reader, a selection's rows per
task (benchmarks/RESULTS.md, ``bench_plot.py``). The values must not change.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr
from tiny import TINY_LAYERS, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr.schema import FILTER_MEAN, LAYER_CSS, LAYER_MEAN, means_path


def _tasks(array) -> int:
    return len(dict(array.__dask_graph__()))


def test_a_selection_of_images_is_read_in_one_task_per_array(tiny_store):
    tree = cx.open_activations(tiny_store)
    ids = tree["image"].values
    positions = np.array([0, 5, 6, 13, 17])
    sub = cx.select(tree, image=ids[positions])
    raw = zarr.open_group(tiny_store, mode="r")
    for layer in TINY_LAYERS:
        whole = tree[layer]["activation"]
        picked = sub[layer]["activation"]
        assert len(whole.data.chunks[0]) == 5  # 18 images, batch 4: one task per stored chunk
        assert picked.data.chunks[0] == (5,) and _tasks(picked.data) <= 2  # the reader and one read of 5 rows
        expected = np.asarray(raw[f"{layer}/activation"][...])[positions]  # zarr itself, then numpy's indexing
        np.testing.assert_array_equal(picked.values, expected)
        assert list(picked["image"].values) == list(ids[positions])
        xr.testing.assert_identical(picked.compute(), whole.isel(image=positions).compute())
    # a selection by set goes the same way; one image by label still drops the dimension, as xarray's sel
    cats = cx.select(tree, sets="photos")
    assert cats[TINY_LAYERS[0]]["activation"].sizes["image"] == int((tree["set"].values == "photos").sum())
    one = cx.select(tree, image=ids[3])
    assert "image" not in one[TINY_LAYERS[0]]["activation"].dims


def test_opened_coordinates_equal_plain_xarray(tiny_store):
    """The image coordinates and completion record, read with one zarr call per array, are what xarray decodes."""
    ours = cx.open_activations(tiny_store)
    plain = xr.open_datatree(tiny_store, engine="zarr", consolidated=True)
    for path in ["/", f"/{TINY_LAYERS[-1]}"]:
        mine, theirs = ours[path].to_dataset(inherit=False), plain[path].to_dataset(inherit=False)
        names = [n for n in theirs.variables if theirs[n].dims == ("image",)]
        assert {"set", "source"} | ({"completed", "sha256"} if path == "/" else set()) <= set(names), names
        for name in names:
            a, b = mine[name].values, theirs[name].values
            assert isinstance(mine[name].variable._data, np.ndarray) or name == "image"  # loaded, not lazy
            if a.dtype.kind in "fc":
                np.testing.assert_array_equal(a, b)
            else:
                assert [str(v) for v in a.tolist()] == [str(v) for v in b.tolist()], name


def test_small_per_image_arrays_are_read_several_chunks_per_task(tmp_path, tiny_model, tiny_sets, local_client):
    path = str(tmp_path / "means.zarr")
    cx.extract(tiny_sets, store=path, model=tiny_model, preprocess=tiny_preprocess(), client=local_client,
               batch_size=2, progress=False, filter_means=True)
    tree = cx.open_activations(path)
    raw = zarr.open_group(path, mode="r")
    n = tree.sizes["image"]
    with_means = [layer for layer in TINY_LAYERS if "filter_means" in tree[layer].children]
    assert len(with_means) >= 3, with_means
    for layer in with_means:
        assert len(tree[layer]["activation"].data.chunks[0]) == -(-n // 2)  # the activations: one task per batch
        means = tree[means_path(layer)]
        for name in (FILTER_MEAN, LAYER_MEAN, LAYER_CSS):
            assert means[name].data.chunks[0] == (n,)  # a few KiB: every batch's chunk in one read
            np.testing.assert_array_equal(means[name].values, np.asarray(raw[f"{means_path(layer)}/{name}"][...]))
    # and the filter means computed from them are the numbers the activations give (rel 1e-6, as a full store's)
    fm = cx.filter_means(tree, zscore=False, layers=with_means).compute()
    for layer in with_means:
        x = tree[layer]["activation"].values.astype(np.float64)
        spatial = x.reshape(n, -1, x.shape[-1]).mean(axis=1) if x.ndim > 2 else x
        np.testing.assert_allclose(fm[layer]["filter_mean"].values, spatial, rtol=1e-6, atol=1e-7)
