"""``cnndiff demo``: the seed's analysis end to end, offline, with images that installed packages ship.

Three sets, as in the seed: ``random_photos`` (scikit-image's bundled photographs and textures), ``tabby_cats``
(crops and flips of one cat photograph, scikit-image's "chelsea": a same-category set) and ``white_noise``
(generated). VGG16 runs on an embedded local Dask cluster into a Zarr store; differentiation for 200 and 10,000 units
with resamples, the figures and a short text report go into the output folder.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .outputs import FolderManifest

if TYPE_CHECKING:
    from distributed import Client

# scikit-image's bundled images that load without a download (checked on scikit-image 0.26)
PHOTOS = ("astronaut", "coffee", "rocket", "camera", "coins", "moon", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "page", "text", "clock", "brick", "grass", "gravel", "cell", "logo")
BANNER = "!" * 78


def _skimage_data() -> ModuleType:
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("the demo builds its image sets from scikit-image's bundled photographs: "
                          "pip install 'cnndiff_xr[demo]' (or scikit-image)") from err
    return data


def cat_variants(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` different views of one cat photograph: random crops (50-95 % of each side) and horizontal flips."""
    cat = _skimage_data().chelsea()
    rng = np.random.default_rng(seed)
    h, w = cat.shape[:2]
    views = []
    for i in range(n):
        fh, fw = rng.uniform(0.5, 0.95, size=2)
        ch, cw = int(h * fh), int(w * fw)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        view = cat[top:top + ch, left:left + cw]
        views.append(view[:, ::-1] if i % 2 else view)
    return views


def write_image_sets(folder: Path, n_per_set: int) -> dict[str, str]:
    """Write the photo and cat sets as PNG files (the demo then reads files, as a user's run would)."""
    from PIL import Image

    data = _skimage_data()
    if n_per_set > len(PHOTOS):
        raise ValueError(f"n_images={n_per_set}: the demo has {len(PHOTOS)} bundled photographs per set at most")
    sets = {"random_photos": [getattr(data, name)() for name in PHOTOS[:n_per_set]],
            "tabby_cats": cat_variants(n_per_set)}
    paths = {}
    for set_name, pictures in sets.items():
        target = folder / set_name
        target.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            picture = np.asarray(picture)
            if picture.dtype == bool:
                picture = picture.astype(np.uint8) * 255
            Image.fromarray(picture).save(target / f"{set_name}_{i:03d}.png")
        paths[set_name] = str(target)
    return paths


#: The demo's output folder: what it writes there (top-level names) and, per step, the names its files get, so that
#: a rerun can remove the files of a step that was interrupted before it recorded them (see ``outputs``).
MANIFEST = ".cnndiff-demo.json"
STORE = "activations.zarr"
STEPS = {
    "images": r"images/[^/]+/[^/]+_\d{3}\.png",
    STORE: r"activations\.zarr(\.lock|/(.+/)?zarr\.json|/(.+/)?c/.+)",  # Zarr v3: zarr.json + chunks under c/
    "results": r"results/differentiation\.(nc|csv)",
    "figures": r"figures/.+\.(png|svg)",
    "report.txt": r"report\.txt",
}
ENTRIES = (*STEPS, f"{STORE}.lock")  # the store's writer lock sits next to it while the extraction runs


def claim_folder(out: str | Path) -> FolderManifest:
    """Make ``out`` ready for a demo run: remove what an earlier demo wrote there and nothing else.

    Raises
    ------
    OutputFolderError
        ``out`` holds files the demo did not write where it writes, or is a non-empty folder that no demo wrote.
    """
    return FolderManifest.claim(
        out, name=MANIFEST, job="cnndiff demo", entries=ENTRIES,
        remedy=f"Give a new or empty folder (cnndiff demo --out NEW_FOLDER; run_demo(out=...)), or move your files "
               f"out of {out}.")


def random_weights_notes() -> list[str]:
    """What each figure means when the network is untrained, in plain words (paths relative to the output folder)."""
    return [
        "What RANDOM weights mean for each figure (an untrained VGG16: the architecture with random filters):",
        "  figures/predictions.png: the 1,000 output units are not ImageNet classes; which unit an image drives most",
        "    means nothing (and the predicted labels in the store are empty).",
        "  figures/differentiation.png, figures/differentiation_by_white_noise.png: what convolution, ReLU and",
        "    pooling with random filters do to each set. Where photos or cats rise above white noise, the rise comes",
        "    from the architecture and the images' own statistics (smooth regions vs independent pixels), not from",
        "    training; ImageNet weights are needed to see what learning adds.",
        "  figures/stimulus_vs_layer_r2.png: how well the input's differentiation predicts each layer's across the",
        "    sets; with random filters, how much the architecture alone preserves. With 3 sets an R² rests on one",
        "    degree of freedom: read it as a sketch, not a result.",
        "  figures/rdms.png: distances between images per layer; any structure is inherited from the pixels through",
        "    random filters, not learned categories.",
        "  figures/filter_means/: each random filter's mean response; it follows brightness and colour, not features.",
    ]


def run_demo(
    out: str | Path = "cnndiff-demo",
    *,
    n_images: int = 12,
    weights: str | None = "auto",
    n_units: Sequence[int] = (200, 10000),
    resamples: int = 5,
    client: Client | str | None = None,
    n_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Run the demo into the folder ``out``; return the path of its report. See the module docstring.

    ``out`` must be new, empty, or a folder an earlier demo wrote: a rerun deletes only the files the earlier run
    recorded in ``out/.cnndiff-demo.json``, and refuses (:class:`~cnndiff_xr.outputs.OutputFolderError`, before
    anything is written or removed) when other files are where the demo writes.
    """
    import cnndiff_xr as cx

    from . import plot
    from .analysis.results import resample_summary
    from .extraction.backends import keras as models
    from .extraction.cluster import get_client

    if not isinstance(n_images, int) or n_images < 3:
        raise ValueError(f"n_images must be an int >= 3 (images per set), got {n_images!r}")
    if n_images > len(PHOTOS):
        raise ValueError(f"n_images={n_images}: the demo has {len(PHOTOS)} bundled photographs per set at most")
    out = Path(out).absolute()  # the manifest and the workers take paths relative to the folder, or absolute
    manifest = claim_folder(out)  # before any work: a refused folder costs nothing
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    t_start = time.perf_counter()
    warning = None
    if weights == "auto":
        weights, warning = models.auto_weights("vgg16")
    elif weights == "random":
        weights, warning = None, "RANDOM weights were requested (--weights random): an untrained network."
    if warning:
        say(f"{BANNER}\n{warning}\n{BANNER}")
    manifest.begin("images", STEPS["images"])
    sets: dict[str, Any] = {"white_noise": cx.images.white_noise(n_images, seed=0),
                            **write_image_sets(out / "images", n_images)}
    manifest.record_tree("images")
    store_path = out / STORE
    manifest.begin(STORE, STEPS[STORE])
    with get_client(client, n_workers=n_workers) as dask_client:
        n_workers_used = len(dask_client.scheduler_info().get("workers", {}))
        t_extract = time.perf_counter()
        tree, report = cx.extract(sets, store=str(store_path), model="vgg16", weights=weights, layers="seed",
                                  dtype="float16", client=dask_client, batch_size=4, progress=progress,
                                  attrs={"warning": warning} if warning else None, return_report=True)
        t_extract = time.perf_counter() - t_extract
        manifest.record_tree(STORE)
        t_analysis = time.perf_counter()
        layers = tree.attrs["layers"]
        lazy = {
            "d": cx.differentiation(tree, n_units=list(n_units), resamples=resamples, seed=0),
            "figures": plot.store_figure_inputs(tree, rdm_units=10000),
        }
        say(f"analysis: {len(layers)} layers, n_units={list(n_units)}, {resamples} resamples, filter means, RDMs")
        computed = dask_client.compute(lazy, sync=True)
        t_analysis = time.perf_counter() - t_analysis
    d = computed["d"]
    note = plot.figure_note(tree.attrs)

    results = out / "results"
    manifest.begin("results", STEPS["results"])
    results.mkdir(exist_ok=True)
    d.to_netcdf(results / "differentiation.nc")
    d.to_dataframe(name="differentiation").to_csv(results / "differentiation.csv")
    manifest.record([results / "differentiation.nc", results / "differentiation.csv"], entry="results")
    figures = out / "figures"
    manifest.begin("figures", STEPS["figures"])
    t_figures = time.perf_counter()
    written = plot.write_result_figures(d, figures, reference="white_noise", note=note)
    written += plot.write_store_figures(tree, computed["figures"], figures, note=note)
    t_figures = time.perf_counter() - t_figures
    manifest.record(written, entry="figures")

    summary = resample_summary(d)["mean"]
    setup = t_extract - report.seconds
    mb = 1e6
    lines = [
        "cnndiff_xr demo report",
        "=" * 22,
        *([BANNER, warning, BANNER] if warning else ["weights: ImageNet (Keras cache)"]),
        f"store: {store_path}: {report.n_images} images, {len(layers)} layers, float16, "
        f"{manifest.total_bytes(STORE) / mb:,.0f} MB on disk",
        f"extraction: {t_extract:.1f} s wall time for {report.n_images} images "
        f"({report.n_images / t_extract:.2f} images/s overall), of which",
        f"  {setup:.1f} s setting up and finishing (building VGG16, checking the images, writing the store's",
        f"    layout, loading the model on {n_workers_used} worker(s), copying the predictions into every layer),",
        f"  {report.seconds:.1f} s running the batches: {report.images_per_second:.2f} images/s (decoding, forward "
        "pass, compression, writing)",
        f"analysis: {t_analysis:.1f} s wall time (differentiation for n_units={list(n_units)}, {resamples} "
        f"resamples; filter means; RDMs of 10,000 units)",
        f"figures: {t_figures:.1f} s; total: {time.perf_counter() - t_start:.1f} s wall time",
        "",
        "differentiation (median pairwise distance per unit, mean over resamples):",
    ]
    for n in summary["n_units"].values:
        table = summary.sel(n_units=n).to_pandas().T  # rows: layers, columns: sets
        lines += [f"-- {n} units", table.to_string(float_format=lambda v: f"{v:.3f}"), ""]
    if warning:
        lines += [*random_weights_notes(), ""]
    lines += ["files:", f"  {results / 'differentiation.nc'}", f"  {results / 'differentiation.csv'}",
              *(f"  {p}" for p in written if p.suffix == ".png" and "filter_means" not in p.parts),
              f"  {figures / 'filter_means'}/<layer>.png ({len(layers)} layers)",
              "",
              f"disk: {manifest.total_bytes() / mb:,.0f} MB written into {out} (the store "
              f"{manifest.total_bytes(STORE) / mb:,.0f} MB). A rerun into {out} replaces exactly",
              f"  these files (listed in {MANIFEST} there) and never touches others."]
    report_path = out / "report.txt"
    manifest.begin("report.txt", STEPS["report.txt"])
    report_path.write_text("\n".join(lines) + "\n")
    manifest.record([report_path], entry="report.txt")
    manifest.finish()
    say(f"demo finished in {time.perf_counter() - t_start:.0f} s; report: {report_path}; figures: {figures}")
    return report_path
