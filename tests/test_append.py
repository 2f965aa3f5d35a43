"""Adding sets to a store: the image dimension grows, and the store equals a one-shot extraction of all sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import faults
import numpy as np
import pytest
import real_cluster
import zarr
from PIL import Image
from tiny import TINY_SIZE, tiny_preprocess, write_pngs

import cnndiff_xr as cx
from cnndiff_xr.extraction import images, lock, store
from cnndiff_xr.extraction.run import ExtractionError
from cnndiff_xr.schema import APPENDING_ATTR, COMPLETED, IMAGE_DIM, PREDICTED_CLASS, SHA256_COORD, STORE_ID_ATTR

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def three_sets(tmp_path):
    """Files, an array and white noise; with batches of 4 the first two sets (11 images) end in a partial batch."""
    folder = tmp_path / "photos"
    write_pngs(folder, 5)
    rng = np.random.default_rng(1)
    return {
        "photos": str(folder),
        "array": rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
        "noise": images.white_noise(7, seed=3, size=(TINY_SIZE, TINY_SIZE)),
    }


def _extract(sets, path, model, client, preprocess=None, **kwargs):
    return cx.extract(sets, store=path, model=model, preprocess=preprocess or tiny_preprocess(), client=client,
                      batch_size=4, progress=False, return_report=True, **kwargs)


def _arrays(path):
    """Every array of the store's Zarr hierarchy by path (read from its own metadata, not the consolidated copy)."""
    group = zarr.open_group(path, mode="r", use_consolidated=False)
    return {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def assert_same_store(path, reference):
    """Every array of the two hierarchies (activations, coordinates, predictions, completion) is equal, bit for bit,
    and the consolidated view that the analysis opens agrees."""
    got, want = _arrays(path), _arrays(reference)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].shape == array.shape, name
        assert got[name].metadata.dimension_names == array.metadata.dimension_names, name
        a, b = got[name][...], array[...]
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b, err_msg=name)  # NaN == NaN here
        else:
            assert a.tolist() == b.tolist(), name
    tree, ref = cx.open_activations(path), cx.open_activations(reference)
    assert tree.sizes[IMAGE_DIM] == ref.sizes[IMAGE_DIM]
    for coord in ref.coords:
        assert tree[coord].values.tolist() == ref[coord].values.tolist(), coord
    for layer in ref.cnndiff.layers:
        np.testing.assert_array_equal(tree[layer]["activation"].values, ref[layer]["activation"].values)
    assert tree.cnndiff.complete


def _mtimes(path, batches, layer="conv1"):
    root = os.path.join(path, layer, "activation", "c")
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for b in batches for d, _, fs in os.walk(os.path.join(root, str(b))) for f in fs}


def test_append_equals_one_shot(tmp_path, three_sets, tiny_model, local_client):
    path, clean = str(tmp_path / "grown.zarr"), str(tmp_path / "clean.zarr")
    first_two = {k: three_sets[k] for k in ("photos", "array")}
    _extract(first_two, path, tiny_model, local_client)
    old_batches = _mtimes(path, [0, 1])
    store_id = store.read_store_id(path)

    tree, report = _extract(three_sets, path, tiny_model, local_client)
    # batches: 0..3, 4..7 kept; 8..11 (old 8..10 with the new 11) recomputed; 12..15, 16..17 new
    assert (report.n_images, report.batches_already_complete, report.batches_computed) == (18, 2, 3)
    assert report.images_computed == 10
    assert _mtimes(path, [0, 1]) == old_batches  # the complete old batches were not rewritten
    assert store.read_store_id(path) != store_id  # tasks of an earlier run (old shapes) drop their results
    assert tree.sizes[IMAGE_DIM] == 18 and cx.open_activations(path).sizes[IMAGE_DIM] == 18
    for name, array in _arrays(path).items():  # every image array grew, wherever it is in the hierarchy
        if array.metadata.dimension_names[0] == IMAGE_DIM:
            assert array.shape[0] == 18, name
    assert "appending_from" not in store.read_attrs(path)

    _extract(three_sets, clean, tiny_model, local_client)
    assert_same_store(path, clean)
    # analysis of the grown store sees the new set
    d = cx.differentiation(cx.open_activations(path), n_units=(10,), resamples=1).compute(scheduler="synchronous")
    assert "noise" in d["set"].values.tolist()


def test_append_to_a_reduced_store_with_means_equals_one_shot(tmp_path, three_sets, tiny_model, local_client):
    """A reduced store with filter means: the (image, unit) arrays and the means subgroups grow like the rest."""
    draws = cx.UnitDraws(n_units=[20, 100], resamples=2, seed=4)
    path, clean = str(tmp_path / "grown.zarr"), str(tmp_path / "clean.zarr")
    first_two = {k: three_sets[k] for k in ("photos", "array")}
    _extract(first_two, path, tiny_model, local_client, units=draws, filter_means=True)
    _, report = _extract(three_sets, path, tiny_model, local_client, units=draws, filter_means=True)
    assert (report.n_images, report.batches_computed) == (18, 3)
    _extract(three_sets, clean, tiny_model, local_client, units=draws, filter_means=True)
    assert any("/filter_means/" in name for name in _arrays(path))  # the subgroups are there, and compared
    assert_same_store(path, clean)


def test_append_records_predictions_like_one_shot(tmp_path, local_client):
    """A model with an ImageNet head: predictions (root and per layer) grow with fill values and are then computed."""
    rng = np.random.default_rng(4)
    sets = {"a": rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8),
            "b": rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)}
    kwargs = dict(model="mobilenet_v2", weights=None, layers=["predictions"], client=local_client, batch_size=2,
                  progress=False)
    path, clean = str(tmp_path / "grown.zarr"), str(tmp_path / "clean.zarr")
    cx.extract({"a": sets["a"]}, store=path, **kwargs)
    tree = cx.extract(sets, store=path, **kwargs)
    assert (tree[PREDICTED_CLASS].values >= 0).all()
    cx.extract(sets, store=clean, **kwargs)
    assert_same_store(path, clean)


def test_append_refused_when_existing_images_change(tmp_path, three_sets, tiny_model, local_client):
    path = str(tmp_path / "s.zarr")
    first_two = {k: three_sets[k] for k in ("photos", "array")}
    _extract(first_two, path, tiny_model, local_client)
    before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
              for d, _, fs in os.walk(path) for f in fs}

    removed = {"photos": three_sets["photos"], "noise": three_sets["noise"]}
    with pytest.raises(store.StoreError, match=r"different image table \(11 images stored, 12 requested\): 6 stored "
                                               r"image\(s\) are not in this run: array/000000"):
        _extract(removed, path, tiny_model, local_client)
    inserted = {"photos": three_sets["photos"], "noise": three_sets["noise"], "array": three_sets["array"]}
    with pytest.raises(store.StoreError, match="image 'noise/noise_000000' would come at position 5, before the "
                                               "store's image 'array/000000'"):
        _extract(inserted, path, tiny_model, local_client)
    grown = dict(first_two, array=np.concatenate([three_sets["array"], three_sets["array"][:1]]))
    with pytest.raises(store.StoreError, match=r"set\(s\) \['array'\] are already in the store .*\(array/000006\)"):
        _extract(grown, path, tiny_model, local_client)
    changed = dict(three_sets, array=three_sets["array"].copy())
    changed["array"][2] = 255 - changed["array"][2]
    with pytest.raises(store.StoreError, match=r"1 of its 11 images changed content(.|\n)*array/000002"):
        _extract(changed, path, tiny_model, local_client)
    renamed = {"photos": three_sets["photos"], "arrays": three_sets["array"]}
    with pytest.raises(store.StoreError, match="different image table"):
        _extract(renamed, path, tiny_model, local_client)
    after = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs}
    assert after == before  # every refusal came before anything was written


def test_append_keeps_identity_check(tmp_path, three_sets, tiny_model, local_client):
    path = str(tmp_path / "s.zarr")
    _extract({"photos": three_sets["photos"]}, path, tiny_model, local_client)
    with pytest.raises(store.StoreError, match="dtype: store has 'float32', this run asks for 'float16'"):
        _extract(three_sets, path, tiny_model, local_client, dtype="float16")
    assert cx.open_activations(path).sizes[IMAGE_DIM] == 5


class FailOnMarker:
    """Picklable preprocessing that raises on a batch holding an all-7 image while a flag file exists."""

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self, batch):
        if os.path.exists(self.flag) and (batch == 7).all(axis=(1, 2, 3)).any():
            raise RuntimeError("injected failure")
        return tiny_preprocess()(batch)


def test_resume_after_a_failed_append_equals_one_shot(tmp_path, three_sets, tiny_model, local_client):
    """The new set holds an image whose batch fails: the store is grown, its new images partly incomplete; the rerun
    finishes them."""
    flag = tmp_path / "fail-now"
    flag.write_text("x")
    failing = FailOnMarker(str(flag))
    sets = dict(three_sets, marked=np.concatenate([np.full((1, 8, 8, 3), 7, np.uint8),
                                                   np.zeros((4, 8, 8, 3), np.uint8)]))
    first_two = {k: sets[k] for k in ("photos", "array")}
    path, clean = str(tmp_path / "grown.zarr"), str(tmp_path / "clean.zarr")
    _extract(first_two, path, tiny_model, local_client, preprocess=failing)
    with pytest.raises(ExtractionError, match="1 of 4 batches failed"):
        _extract(sets, path, tiny_model, local_client, preprocess=failing)
    done = store.completed(path)
    assert done.shape == (23,) and done[:16].all() and not done[16:20].any() and done[20:].all()
    flag.unlink()
    _, report = _extract(sets, path, tiny_model, local_client, preprocess=failing)
    assert (report.batches_computed, report.images_computed) == (1, 4)
    _extract(sets, clean, tiny_model, local_client, preprocess=failing)
    assert_same_store(path, clean)


def test_rerun_finishes_an_append_interrupted_while_growing(tmp_path, three_sets, tiny_model, local_client):
    """What a crash inside the append leaves (the marker set, some arrays grown, a few new ids written, no
    consolidated metadata of the new shapes): the rerun redoes the append and equals a one-shot extraction."""
    first_two = {k: three_sets[k] for k in ("photos", "array")}
    path, clean = str(tmp_path / "grown.zarr"), str(tmp_path / "clean.zarr")
    _extract(first_two, path, tiny_model, local_client)
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    group.attrs.update({APPENDING_ATTR: 11, STORE_ID_ATTR: "a-crashed-append"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(group.store_path)
    for name in (IMAGE_DIM, COMPLETED, "conv1/activation", "conv1/set"):  # grown to more than the rerun asks
        group[name].resize((20, *group[name].shape[1:]))
    group[IMAGE_DIM][11:13] = np.array(["noise/noise_000000", "half-written"], dtype=object)
    assert cx.open_activations(path).sizes[IMAGE_DIM] == 11  # readers still see the old store

    _, report = _extract(three_sets, path, tiny_model, local_client)
    assert (report.n_images, report.batches_computed) == (18, 3)
    _extract(three_sets, clean, tiny_model, local_client)
    assert_same_store(path, clean)

    # a crash between the last two writes (marker removed, consolidated metadata not yet rewritten): repaired
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    group.attrs.update({"note": "rewrites zarr.json without the consolidated metadata"})
    _, report = _extract(three_sets, path, tiny_model, local_client)
    assert report.batches_computed == 0
    assert_same_store(path, clean)


_CLIENT_SCRIPT = """
import sys
import faults
from tiny import build_tiny_model
import cnndiff_xr as cx
from test_append import slow_sets
cx.extract(slow_sets(), store=sys.argv[2], model=build_tiny_model(), preprocess=faults.slow_preprocess,
           client=sys.argv[1], batch_size=2, progress=False)
"""


def slow_sets(new: bool = True):
    """Two stored sets (11 images, the last batch of 2 partial) and, with ``new``, 24 new images."""
    size = (TINY_SIZE, TINY_SIZE)
    sets = {"a": images.white_noise(6, seed=1, size=size), "b": images.white_noise(5, seed=2, size=size)}
    if new:
        sets["c"] = images.white_noise(24, seed=5, size=size)
    return sets


def test_client_sigkill_during_an_append_then_rerun_equals_one_shot(tmp_path, tiny_model, local_client):
    """A real client process is SIGKILLed after it grew the store, while the new batches run; the same command again
    finishes the new images, and the store equals a one-shot extraction."""
    path, clean = str(tmp_path / "grown.zarr"), str(tmp_path / "clean.zarr")
    kwargs = dict(model=tiny_model, preprocess=faults.slow_preprocess, client=local_client, batch_size=2,
                  progress=False)
    cx.extract(slow_sets(new=False), store=path, **kwargs)
    address = local_client.scheduler.address
    with open(tmp_path / "client.err", "wb") as err:
        client = subprocess.Popen([sys.executable, "-c", _CLIENT_SCRIPT, address, path], cwd=real_cluster.TESTS_DIR,
                                  env=real_cluster.child_env(), stdout=subprocess.DEVNULL, stderr=err,
                                  start_new_session=True, preexec_fn=real_cluster.child_setup())
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the store is grown and a few, not all, new batches are complete
            assert client.poll() is None, (tmp_path / "client.err").read_text()
            assert time.monotonic() < deadline, "the append did not start"
            group = zarr.open_group(path, mode="r", use_consolidated=False)
            done = group[COMPLETED][:]
            if done.shape[0] == 35 and 2 <= done[12:].sum() <= 16:
                break
            time.sleep(0.01)
    finally:
        real_cluster.kill_group(client)
    done = store.completed(path)
    assert done.shape == (35,) and not done.all()  # the kill landed after the grow, before the end
    assert "appending_from" not in store.read_attrs(path)

    with pytest.warns(UserWarning, match="no longer running"):  # the dead client's lock is removed
        _, report = cx.extract(slow_sets(), store=path, return_report=True, **kwargs)
    assert report.batches_computed > 0 and report.n_images == 35
    assert lock.read_lock(path) is None
    cx.extract(slow_sets(), store=clean, **kwargs)
    assert_same_store(path, clean)
    assert [str(s) for s in cx.open_activations(path)[SHA256_COORD].values] == \
        [images.image_digest(r) for r in images.image_table(slow_sets()).refs]


def test_append_records_the_skipped_images_of_new_sets(tmp_path, three_sets, tiny_model, local_client):
    """With on_error="skip", the skipped images of the new sets join the store's record of skipped images."""
    path = str(tmp_path / "s.zarr")
    _extract({"photos": three_sets["photos"]}, path, tiny_model, local_client, on_error="skip")
    bad = tmp_path / "more"
    write_pngs(bad, 2)
    (bad / "img01.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(bad / "img02.png")
    sets = {"photos": three_sets["photos"], "more": str(bad)}
    tree, _ = _extract(sets, path, tiny_model, local_client, on_error="skip")
    skipped = json.loads(json.dumps(tree.attrs["skipped_images"]))
    assert [s["image"] for s in skipped] == ["more/img01.png"]
    assert tree.sizes[IMAGE_DIM] == 7 and tree.cnndiff.complete
