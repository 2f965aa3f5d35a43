"""Stores nobody should trust (issue 17, point 8): a store or a result file is a folder anyone can send.

Real stores are written on disk (the synthetic tree of the analysis tests laid out as a store, no model), then
tampered with as an attacker would: names in the data, shapes and codecs in the ``zarr.json`` documents (the root's
consolidated metadata, which is what readers use, and each node's own document). Nothing here may put a file
outside the chosen output folder, allocate what the metadata claims, or decode a codec that is not zarr's own."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import tracemalloc
import unicodedata
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
from cli_run import main_in_process

matplotlib.use("Agg")

import dask
import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import make_tree

import cnndiff_xr as cx
from cnndiff_xr import cli, plot, schema
from cnndiff_xr.extraction import store
from cnndiff_xr.outputs import OutputFolderError, check_inside, place_files, safe_name

#: names an attacker gives to sets, images and layers
HOSTILE = ["../../evil", "a/b", "x\x00y", "\n"]

#: layers of the test stores: small, one of them with a name that is a valid group name but not a plain file name
LAYERS = {"input_layer": (6, 6, 3), "..hidden": (3, 3, 4), "predictions": (5,)}


def _files(root: Path) -> set[str]:
    """Every file and link under ``root``, relative to it."""
    found = set()
    for here, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            found.add(os.path.relpath(os.path.join(here, name), root))
    return found


def _write_store(path: Path, sets: dict[str, int], *, image_ids: list[str] | None = None,
                 layers: dict[str, tuple[int, ...]] | None = None) -> str:
    """``sets`` laid out as a cnndiff store at ``path`` (format attribute, variable-length strings), chunks of 4."""
    tree = make_tree(sets=sets, layers=layers or LAYERS, chunk=4)[0]
    tree.attrs[schema.FORMAT_ATTR] = schema.FORMAT
    if image_ids is not None:
        root = tree.to_dataset(inherit=False)
        tree.dataset = root.assign_coords({schema.IMAGE_DIM: np.array(image_ids, dtype=object)})
    tree = tree.map_over_datasets(lambda ds: ds.assign_coords(
        {c: ds[c].astype(object) for c in (schema.IMAGE_DIM, schema.SET_COORD, "source") if c in ds.coords}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Zarr: consolidated metadata is not in the v3 specification
        tree.to_zarr(str(path), mode="w", consolidated=True)
    return str(path)


def _tamper(path: str, edit) -> None:
    """``edit(name, metadata)`` on every node's metadata: in the root's consolidated metadata and in the node's own
    ``zarr.json`` (the root document itself is edited as name ``""``)."""
    root = Path(path)
    document = json.loads((root / "zarr.json").read_text())
    edit("", document)
    for name, meta in document["consolidated_metadata"]["metadata"].items():
        edit(name, meta)
    (root / "zarr.json").write_text(json.dumps(document))
    for doc in root.rglob("zarr.json"):
        if doc.parent != root:
            meta = json.loads(doc.read_text())
            edit(doc.parent.relative_to(root).as_posix(), meta)
            doc.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory) -> str:
    return _write_store(tmp_path_factory.mktemp("plain") / "plain.zarr", {"cats": 5, "dogs": 4})


def _copy(src: str, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# ------------------------------------------------------------------------------------------- file names from data
def test_safe_name_keeps_plain_names_and_makes_the_rest_safe_and_distinct():
    for plain in ("block1_conv1", "Conv1_relu", "white_noise", "predictions", "input_layer", "conv2d.1", "a+b-c"):
        assert safe_name(plain) == plain
    tricky = [*HOSTILE, "..", ".", "", ".hidden", "a\\b", "a_b", "a b", "CON", "con.txt", "-rf", "x" * 500,
              "x" * 499 + "y", "a\u202eb", "été", "a:b", "a*b?", "a.", "x\x01y", "x_y"]
    names = [safe_name(label) for label in tricky]
    assert len(set(names)) == len(tricky), dict(zip(tricky, names, strict=True))  # distinct labels stay distinct
    for label, name in zip(tricky, names, strict=True):
        assert name and len(name) <= 80, (label, name)
        assert "/" not in name and "\\" not in name and ".." not in name and ":" not in name, (label, name)
        assert not name.startswith((".", "-")) and not name.endswith("."), (label, name)
        assert all(unicodedata.category(ch)[0] != "C" for ch in name), (label, name)
        assert name.split(".")[0].upper() not in ("CON", "NUL"), (label, name)
        assert safe_name(label) == name  # the same label always gets the same file
    assert safe_name("a/b").startswith("a_b~") and safe_name("a/b") != safe_name("a_b")


def test_check_inside_refuses_paths_and_links_that_lead_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert check_inside(out / "x.png", out) == out / "x.png"
    for escaping in (out / ".." / "evil.png", out, out / "sub" / ".." / ".." / "evil.png"):
        with pytest.raises(OutputFolderError, match="outside the output folder"):
            check_inside(escaping, out, label="../evil")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "linked").symlink_to(elsewhere)
    with pytest.raises(OutputFolderError, match="'a/b'.*outside the output folder.*symbolic link"):
        check_inside(out / "linked" / "x.png", out, label="a/b")


def test_plain_text_escapes_control_characters_and_dollars():
    assert plot.plain_text("x\x00y") == "x\\x00y"
    assert plot.plain_text("a\u202eb") == "a\\u202eb"
    assert plot.plain_text("line one\nline two") == "line one\nline two"  # the package's own line breaks stay
    assert plot.plain_text("$\\frac$") == "\\$\\frac\\$"
    assert plot.plain_text(plot.plain_text("x\x00$y$")) == plot.plain_text("x\x00$y$")  # idempotent
    assert len(plot.plain_text("x" * 10_000)) == plot.MAX_TEXT_LINE


def test_hostile_set_image_and_layer_names_never_leave_the_output_folder(tmp_path):
    """Sets and images named like paths and control characters, and a layer whose name starts with dots: the store
    figures and the result figures (with a hostile reference set) land in the output folder and nowhere else, one
    file per figure, and their SVGs are well-formed XML (no control characters in them)."""
    sets = dict.fromkeys(HOSTILE, 3)
    ids = [f"{name}/{i}" for name in HOSTILE for i in range(3)]
    path = _write_store(tmp_path / "hostile.zarr", sets, image_ids=ids)
    before = _files(tmp_path)
    out = tmp_path / "deep" / "out"
    tree = cx.open_activations(path)
    assert sorted(set(tree.dataset[schema.SET_COORD].values)) == sorted(HOSTILE)  # the names did reach the data
    inputs = plot.store_figure_inputs(tree, layers=["..hidden"], rdm_units=20)  # fewer figures: a faster test
    d = cx.differentiation(tree, n_units=20, resamples=2)
    with dask.config.set(scheduler="synchronous"):
        computed, d = dask.compute(inputs, d)
    written = plot.write_store_figures(tree, computed, out)
    written += plot.write_result_figures(d, out, reference="../../evil")
    new = _files(tmp_path) - before
    assert new and all(name.startswith(os.path.join("deep", "out") + os.sep) for name in new), sorted(new)
    assert {str(p.relative_to(tmp_path)) for p in written} == new  # every file written is reported
    names = {p.name for p in written}
    assert f"differentiation_by_{safe_name('../../evil')}.png" in names
    assert f"{safe_name('..hidden')}.png" in {p.name for p in written if p.parent.name == "filter_means"}
    for svg in (p for p in written if p.suffix == ".svg"):
        ET.parse(svg)  # a control character would make it unreadable XML
    for p in written:
        assert all(unicodedata.category(ch)[0] != "C" for ch in str(p.relative_to(out))), p


def test_filter_mean_files_of_hostile_layer_names_stay_distinct_and_inside(tmp_path, plain_store):
    """A ``cnndiff summarize`` file is data too: its layer groups may be named anything a group name can hold."""
    tree = cx.open_activations(plain_store)
    fm = cx.filter_means(tree, zscore=True, layers=["input_layer"]).compute(scheduler="synchronous")
    hostile = ["x\x00y", "\n", "a\\b", "..", "CON"]
    layers = [name for name in hostile if name != ".."]  # a DataTree cannot hold a child named ".."
    fm_hostile = xr.DataTree.from_dict({f"/{name}": fm["input_layer"].to_dataset() for name in layers})
    out = tmp_path / "out"
    written = plot.write_filter_mean_figures(fm_hostile, out, layers=layers, unit_names={},
                                             colours=plot.set_colours(["cats", "dogs"]))
    assert len({p.name for p in written}) == len(layers)
    assert _files(tmp_path) == {str(p.relative_to(tmp_path)) for p in written}
    assert {p.name for p in written} == {Path(plot.filter_mean_file(name)).name for name in layers}


# ------------------------------------------------------------------------------------------ the one CLI run
_main = main_in_process


def test_cnndiff_plot_of_hostile_results_writes_only_into_out(tmp_path):
    """``cnndiff plot`` of a result file whose sets and recorded reference are paths, and of a store of hostile
    names, writes only under --out; a link in --out to elsewhere is refused before anything moves."""
    sets = dict.fromkeys(HOSTILE, 3)
    path = _write_store(tmp_path / "hostile.zarr", sets)
    d = cx.differentiation(cx.open_activations(path), n_units=20, resamples=1).compute(scheduler="synchronous")
    result = d.to_dataset(name="differentiation")
    result.attrs = {**{k: v for k, v in d.attrs.items() if isinstance(v, (str, int, float))},
                    "reference": "../../evil"}
    result = result.assign_coords(set=result["set"].astype(object))
    result_file = tmp_path / "result.zarr"  # (NetCDF strings cannot hold a NUL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Zarr: consolidated metadata is not in the v3 specification
        result.to_zarr(result_file, mode="w")
    before = _files(tmp_path)
    out = tmp_path / "out"
    code, printed, err = _main(["plot", str(result_file), "--out", str(out), "--quiet"])
    assert code == 0, err
    code, printed_store, err = _main(["plot", path, "--out", str(out / "store"), "--layers", "..hidden",
                                      "--rdm-units", "20", "--quiet"])
    assert code == 0, err
    new = _files(tmp_path) - before
    assert new and all(name.startswith("out" + os.sep) for name in new), sorted(new)
    assert f"differentiation_by_{safe_name('../../evil')}.png" in printed
    assert "filter_means" in printed_store
    # a folder of --out that is a link to elsewhere: refused, and nothing written there or anywhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked = tmp_path / "linked_out"
    linked.mkdir()
    (linked / "filter_means").symlink_to(elsewhere)
    before = _files(tmp_path)
    code, _, err = _main(["plot", path, "--out", str(linked), "--layers", "..hidden", "--rdm-units", "20",
                          "--quiet"])
    assert code == 2 and "outside the output folder" in err and "symbolic link" in err, err
    assert _files(tmp_path) == before and not any(elsewhere.iterdir())


def test_place_files_refuses_a_linked_folder_before_moving_anything(tmp_path):
    staging, target, elsewhere = tmp_path / "staging", tmp_path / "target", tmp_path / "elsewhere"
    for folder in (staging / "sub", target, elsewhere):
        folder.mkdir(parents=True)
    (staging / "a.png").write_text("a")
    (staging / "sub" / "b.png").write_text("b")
    (target / "sub").symlink_to(elsewhere)
    with pytest.raises(OutputFolderError, match="sub/b.png"):
        place_files([staging / "a.png", staging / "sub" / "b.png"], staging, target, overwrite=True)
    assert not (target / "a.png").exists() and not any(elsewhere.iterdir())
    # a link standing where a file goes is replaced (renamed onto), never written through
    (target / "sub").unlink()
    (target / "a.png").symlink_to(elsewhere / "victim.png")
    place_files([staging / "a.png"], staging, target, overwrite=True)
    assert not (target / "a.png").is_symlink() and not (elsewhere / "victim.png").exists()


# ------------------------------------------------------------------------------------------ absurd metadata
def _image_arrays(edit):
    """An edit applied to every array whose first dimension is ``image``."""
    def apply(name, meta):
        if meta.get("node_type") == "array" and (meta.get("dimension_names") or [None])[0] == schema.IMAGE_DIM:
            edit(name, meta)
    return apply


def _set_shape(target: str, axis: int, value: int, *, chunks: bool = False):
    def apply(name, meta):
        if name == target:
            meta["shape"][axis] = value
            if chunks:
                meta["chunk_grid"]["configuration"]["chunk_shape"][axis] = value
    return apply


def _set_chunks(target: str, value: int):
    def apply(name, meta):
        if name == target:
            meta["chunk_grid"]["configuration"]["chunk_shape"][0] = value
    return apply


ABSURD = {
    # 10**12 images claimed consistently by every array along image
    "1e12 images": (_image_arrays(lambda name, meta: meta["shape"].__setitem__(0, 10**12)),
                    r"array '(completed|image|set|source)' claims the shape \[1000000000000\]"),
    # one layer claims more images than the image table holds
    "one layer's images": (_set_shape("..hidden/activation", 0, 10**6),
                           r"array '\.\.hidden/activation' claims 1,000,000 along 'image', but the image table holds "
                           "9"),
    # a layer's y axis of a million (its y coordinate says 3)
    "layer y": (_set_shape("..hidden/activation", 1, 10**6, chunks=True),
                r"array '\.\.hidden/(activation|y)' claims .* along 'y'"),
    # a chunk of 10**12 elements on a 9-element array
    "chunk": (_set_chunks("completed", 10**12), r"array 'completed' claims the chunk shape \[1000000000000\]"),
    # a billion one-image chunks
    "chunk count": (_image_arrays(lambda name, meta: (meta["shape"].__setitem__(0, 2**30),
                                                      meta["chunk_grid"]["configuration"]["chunk_shape"]
                                                      .__setitem__(0, 1))),
                    r"claims (the shape \[1073741824\]|1,073,741,824 chunks)"),
    # a dense layer of 2**41 units, its coordinate too
    "elements": (lambda name, meta: (_set_shape("predictions/activation", 1, 2**41, chunks=True)(name, meta),
                                     _set_shape("predictions/filter", 0, 2**41, chunks=True)(name, meta)),
                 r"array 'predictions/(activation|filter)' claims the (chunk )?shape"),
    # shapes that are not shapes
    "negative": (_set_shape("image", 0, -1), r"array 'image' claims the shape \[-1\]"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_metadata_is_refused_before_anything_is_allocated(case, plain_store, tmp_path):
    edit, claim = ABSURD[case]
    path = _copy(plain_store, tmp_path / "absurd.zarr")
    _tamper(path, edit)
    for call in (cx.open_activations, store.info):
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with pytest.raises(store.UnsafeStoreError, match=claim) as refused:
                call(path)
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        message = str(refused.value)
        assert repr(path) in message and "refusing to open it" in message and "Re-extract" in message, message
        assert elapsed < 5 and peak < 64 * 2**20, (case, call.__name__, elapsed, peak)
    assert store.is_store(path)  # still a store: `cnndiff plot` opens it as one, and is refused with the reason


@pytest.mark.parametrize("layers", [["../../evil"], ["a/b"], ["x\x00y"], ["\n"], ["input_layer", "missing"], "x"])
def test_layer_names_that_are_paths_or_missing_are_refused(layers, plain_store, tmp_path):
    path = _copy(plain_store, tmp_path / "layers.zarr")

    def edit(name, meta):
        if name == "":
            meta["attributes"][schema.LAYERS_ATTR] = layers
    _tamper(path, edit)
    for call in (cx.open_activations, store.info):
        named = repr(layers[-1] if isinstance(layers, list) else layers)
        with pytest.raises(store.UnsafeStoreError, match=f"root attribute 'layers' .*{re.escape(named)}"):
            call(path)


def test_a_sound_store_opens_and_its_check_is_cheap(plain_store):
    """The checks read only the metadata already parsed (no file is opened for them): a few percent of an open at
    most (measured: 4 ms for a store of 22 layers, whose open takes about a second)."""
    attrs, nodes = store._read_store(plain_store, None)
    start = time.perf_counter()
    for _ in range(20):
        store._check_metadata(plain_store, attrs, nodes)
    check = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    tree = cx.open_activations(plain_store)
    opening = time.perf_counter() - start
    assert check < 0.05 * opening, (check, opening)
    assert tree.dataset.sizes[schema.IMAGE_DIM] == 9
    assert store.info(plain_store)["n_images"] == 9


# ------------------------------------------------------------------------------------------------- codecs
def _codec_of_set(codec_name: str):
    def apply(name, meta):
        if name == schema.SET_COORD and meta.get("node_type") == "array":
            meta["codecs"][-1] = {"name": codec_name, "configuration": {}}
    return apply


@pytest.mark.parametrize(("codec", "why"), [("numcodecs.pickle", "pickled objects .set: numcodecs.pickle"),
                                            ("evil.codec", "codecs that zarr does not know .set: evil.codec")])
def test_pickle_and_unknown_codecs_are_refused_naming_the_array(codec, why, plain_store, tmp_path):
    """zarr 3.1 knows neither codec and refuses the whole group without naming the array; the refusal says which
    array and which codec. (A pickle codec that zarr does know is refused too: test_reliability.)"""
    path = _copy(plain_store, tmp_path / "codec.zarr")
    _tamper(path, _codec_of_set(codec))
    for call in (cx.open_activations, store.info, store.read_attrs):
        with pytest.raises(store.UnsafeStoreError, match=why):
            call(path)
    assert store.is_store(path)  # refused as a store, never read as something else (cnndiff plot's result files)
    code, _, err = _main(["plot", path, "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 1 and "UnsafeStoreError" in err and why.split(" .")[0] in err, err
    assert not (tmp_path / "out").exists()


def test_a_foreign_group_with_an_unknown_codec_is_not_a_store(plain_store, tmp_path):
    path = _copy(plain_store, tmp_path / "foreign.zarr")

    def edit(name, meta):
        if name == "":
            del meta["attributes"][schema.FORMAT_ATTR]
        _codec_of_set("evil.codec")(name, meta)
    _tamper(path, edit)
    with pytest.raises(store.StoreError, match="evil.codec") as refused:
        store.read_attrs(path)
    assert not isinstance(refused.value, store.UnsafeStoreError)
    assert not store.is_store(path)
