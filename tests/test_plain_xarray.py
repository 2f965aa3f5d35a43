"""A store opened with plain xarray, as the README promises (issue 16, item 3).

Real extracted stores (the tiny CNN on the 2-process cluster): the README's plain-xarray code block runs as written,
in a fresh interpreter that never imports cnndiff_xr, and selects the right images; a float16 store decodes to float32
in plain xarray, so its reductions do not accumulate (and overflow) in float16, while ``cx.open_activations`` keeps
the stored float16 and the analysis gives the same numbers as over the float32-decoded values.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from tiny import tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr.extraction.store import StoreError
from cnndiff_xr.schema import ACTIVATION, CF_FILL_VALUE, CF_SCALE_FACTOR, FLOAT16_DECODING, SET_COORD

README = Path(__file__).resolve().parents[1] / "README.md"
CONV = "conv1"  # the tiny model's first convolution: (image, y, x, filter)
SET = "photos"


@pytest.fixture(scope="module")
def float16_store(tmp_path_factory, tiny_model, tiny_sets, local_client) -> str:
    """The tiny store's images and model, extracted with dtype="float16"."""
    path = str(tmp_path_factory.mktemp("stores") / "tiny16.zarr")
    cx.extract(tiny_sets, store=path, model=tiny_model, preprocess=tiny_preprocess(), client=local_client,
               batch_size=4, progress=False, dtype="float16")
    return path


@pytest.fixture(params=["float32", "float16"])
def store(request) -> str:
    return str(request.getfixturevalue("tiny_store" if request.param == "float32" else "float16_store"))


def stored(path: str, layer: str) -> np.ndarray:
    """A layer's activations exactly as stored (Zarr, no xarray decoding)."""
    return np.asarray(zarr.open_array(f"{path}/{layer}/{ACTIVATION}", mode="r")[:])


def stored_sets(path: str) -> np.ndarray:
    return np.asarray([str(s) for s in zarr.open_array(f"{path}/{SET_COORD}", mode="r")[:]])


def readme_plain_xarray_block() -> str:
    """The Python block of the README's "The store" section."""
    text = README.read_text()
    section = text[text.index("\n## The store"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "README's 'The store' section should hold one Python block: the plain-xarray lines"
    return blocks[0]


def plain_open(path: str) -> xr.DataTree:
    return xr.open_datatree(path, engine="zarr", chunks={})


# --------------------------------------------------------------------------------------------------- the README
def test_readme_plain_xarray_lines_run_as_written_in_a_fresh_interpreter(store, tmp_path):
    block = readme_plain_xarray_block()
    assert 'xr.open_datatree("acts.zarr", engine="zarr", chunks={})' in block
    # the README's names, pointed at the tiny store: its path, its first convolution and one of its sets
    for readme_name, ours in (('"acts.zarr"', repr(store)), ('"block1_conv1"', repr(CONV)), ('"cats"', repr(SET))):
        assert readme_name in block
        block = block.replace(readme_name, ours)
    script = tmp_path / "plain_xarray.py"
    script.write_text(block + textwrap.dedent(f"""
        import json, sys
        assert "cnndiff_xr" not in sys.modules  # plain xarray: the package is never imported
        json.dump({{"cats": [str(i) for i in cats.image.values], "cats_sets": [str(s) for s in cats.set.values],
                    "cats_values": cats.values.astype("float64").tolist(), "cats_dtype": str(cats.dtype),
                    "means": image_means.values.astype("float64").tolist(), "means_dtype": str(image_means.dtype)}},
                  open({str(tmp_path / "out.json")!r}, "w"))
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads((tmp_path / "out.json").read_text())

    values, sets = stored(store, CONV), stored_sets(store)
    ids = [str(i) for i in zarr.open_array(f"{store}/image", mode="r")[:]]
    rows = np.flatnonzero(sets == SET)
    assert out["cats"] == [ids[i] for i in rows] and len(rows) == 5  # exactly the set's images, in store order
    assert set(out["cats_sets"]) == {SET}
    np.testing.assert_array_equal(np.asarray(out["cats_values"]), values[rows].astype(np.float64))
    reference = values.astype(np.float64).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out["means"], reference, rtol=1e-5)  # float16 accumulation is off by ~1e-3
    assert out["means_dtype"] == out["cats_dtype"] == "float32"  # float16 stores decode to float32


def test_the_readme_needs_the_computed_condition_with_plain_xarray(tiny_store):
    """Why the README computes the condition: no layout makes xarray load a non-index coordinate under chunks={},
    and a lazy condition cannot drop. If a future xarray loads it, the README can go back to the shorter line."""
    act = plain_open(tiny_store)[CONV][ACTIVATION]
    with pytest.raises(KeyError, match="boolean dask array"):
        act.where(act.set == SET, drop=True)


# --------------------------------------------------------------------------------------------------- float16
def test_float16_store_reads_as_float32_in_plain_xarray_with_the_stored_values(float16_store):
    tree = plain_open(float16_store)
    for layer in cx.open_activations(float16_store).cnndiff.layers:
        act = tree[layer][ACTIVATION]
        assert act.dtype == np.float32, layer
        values = stored(float16_store, layer)
        assert values.dtype == np.float16
        np.testing.assert_array_equal(act.values, values.astype(np.float32))  # float16 -> float32 is exact


def test_plain_xarray_reductions_of_a_float16_store_are_right(float16_store):
    act = plain_open(float16_store)[CONV][ACTIVATION]
    values = stored(float16_store, CONV).astype(np.float64)
    means = act.mean(["y", "x", "filter"])
    assert means.dtype == np.float32
    np.testing.assert_allclose(means.values, values.mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(float(act.mean()), values.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(act.sum()), values.sum(), rtol=1e-5)


def test_package_reads_the_stored_float16_undecoded(float16_store):
    act = cx.open_activations(float16_store)[CONV][ACTIVATION]
    assert act.dtype == np.float16
    np.testing.assert_array_equal(act.values, stored(float16_store, CONV))
    assert CF_SCALE_FACTOR not in act.attrs and CF_FILL_VALUE not in act.attrs  # nothing left to apply


def test_float16_differentiation_equals_the_float32_decoded_computation(float16_store):
    options = dict(n_units=[20, 100], resamples=2)
    raw = cx.differentiation(cx.open_activations(float16_store), **options).compute()
    decoded = cx.differentiation(plain_open(float16_store), **options).compute()
    assert decoded.sizes == raw.sizes
    np.testing.assert_array_equal(raw.values, decoded.values)  # bit for bit: no scale applied twice or lost


def test_float16_layout_carries_the_decoding_attributes_and_float32_stores_are_unchanged(float16_store, tiny_store):
    f16 = zarr.open_array(f"{float16_store}/{CONV}/{ACTIVATION}", mode="r")
    assert {k: f16.attrs[k] for k in FLOAT16_DECODING} == dict(FLOAT16_DECODING)
    assert CF_FILL_VALUE not in f16.attrs and np.isnan(f16.fill_value)
    f32 = zarr.open_array(f"{tiny_store}/{CONV}/{ACTIVATION}", mode="r")
    assert CF_SCALE_FACTOR not in f32.attrs and CF_FILL_VALUE in f32.attrs  # as before: xarray's default NaN fill
    package, plain = cx.open_activations(tiny_store)[CONV][ACTIVATION], plain_open(tiny_store)[CONV][ACTIVATION]
    assert package.dtype == plain.dtype == np.float32
    assert package.attrs == plain.attrs  # the package's reader shows a float32 store as plain xarray decodes it
    assert set(package.encoding) == set(plain.encoding) and np.isnan(package.encoding[CF_FILL_VALUE])


# --------------------------------------------------------------------------------------------------- old and foreign
def copy_with_attrs(source: str, target: Path, layers: list[str], *, drop: tuple[str, ...] = (),
                    **attrs: object) -> str:
    """A copy of the store ``source`` whose activations of ``layers`` lose the attributes ``drop`` and get ``attrs``
    (written with Zarr, as another writer would)."""
    shutil.copytree(source, target)
    for layer in layers:
        array = zarr.open_array(f"{target}/{layer}/{ACTIVATION}", mode="r+")
        for key in drop:
            del array.attrs[key]
        array.attrs.update(attrs)
    zarr.consolidate_metadata(str(target))
    return str(target)


def test_float16_store_of_the_earlier_layout_still_opens_with_the_package(float16_store, tmp_path):
    """A float16 store written before the decoding attributes (a NaN _FillValue, no scale_factor) opens as before."""
    layers = cx.open_activations(float16_store).cnndiff.layers
    old = copy_with_attrs(float16_store, tmp_path / "old.zarr", layers, drop=tuple(FLOAT16_DECODING),
                          **{CF_FILL_VALUE: "AAAAAAAA+H8="})  # the base64 NaN that xarray wrote there
    assert plain_open(old)[CONV][ACTIVATION].dtype == np.float16  # what plain xarray made of such a store
    tree = cx.open_activations(old)
    assert tree[CONV][ACTIVATION].dtype == np.float16
    np.testing.assert_array_equal(tree[CONV][ACTIVATION].values, stored(float16_store, CONV))
    options = dict(n_units=[20], resamples=1)
    np.testing.assert_array_equal(cx.differentiation(tree, **options).values,
                                  cx.differentiation(cx.open_activations(float16_store), **options).values)


def test_package_refuses_activations_packed_by_someone_else(float16_store, tmp_path):
    """Read undecoded, a real scale factor would be silently lost: the package refuses it instead."""
    packed = copy_with_attrs(float16_store, tmp_path / "packed.zarr", [CONV], **{CF_SCALE_FACTOR: 0.5})
    with pytest.raises(StoreError, match=rf"{CONV}.*scale_factor"):
        cx.open_activations(packed)
