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
    """Run the demo; return the path of its report. See the module docstring."""
    import cnndiff_xr as cx

    from . import plot
    from .analysis.results import resample_summary
    from .extraction.backends import keras as models
    from .extraction.cluster import get_client

    if not isinstance(n_images, int) or n_images < 3:
        raise ValueError(f"n_images must be an int >= 3 (images per set), got {n_images!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a rerun (perhaps with other options) starts afresh: remove what an earlier demo wrote here, and only that
    import shutil

    for owned in ("images", "activations.zarr", "activations.zarr.lock", "figures", "results", "report.txt"):
        path = out / owned
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    warning = None
    if weights == "auto":
        weights, warning = models.auto_weights("vgg16")
    elif weights == "random":
        weights, warning = None, "RANDOM weights were requested (--weights random): an untrained network."
    if warning:
        say(f"{BANNER}\n{warning}\n{BANNER}")
    t0 = time.perf_counter()
    image_folder = out / "images"
    sets: dict[str, Any] = {"white_noise": cx.images.white_noise(n_images, seed=0),
                            **write_image_sets(image_folder, n_images)}
    store_path = out / "activations.zarr"
    with get_client(client, n_workers=n_workers) as dask_client:
        tree, report = cx.extract(sets, store=str(store_path), model="vgg16", weights=weights, layers="seed",
                                  dtype="float16", client=dask_client, batch_size=4, progress=progress,
                                  attrs={"warning": warning} if warning else None, return_report=True)
        t_extract = time.perf_counter() - t0
        t1 = time.perf_counter()
        layers = tree.attrs["layers"]
        lazy = {
            "d": cx.differentiation(tree, n_units=list(n_units), resamples=resamples, seed=0),
            "figures": plot.store_figure_inputs(tree, rdm_units=10000),
        }
        say(f"analysis: {len(layers)} layers, n_units={list(n_units)}, {resamples} resamples, filter means, RDMs")
        computed = dask_client.compute(lazy, sync=True)
    d = computed["d"]
    t_analysis = time.perf_counter() - t1
    note = plot.figure_note(tree.attrs)

    results = out / "results"
    results.mkdir(exist_ok=True)
    d.to_netcdf(results / "differentiation.nc")
    d.to_dataframe(name="differentiation").to_csv(results / "differentiation.csv")
    figures = out / "figures"
    written = plot.write_result_figures(d, figures, reference="white_noise", note=note)
    written += plot.write_store_figures(tree, computed["figures"], figures, note=note)

    summary = resample_summary(d)["mean"]
    lines = [
        "cnndiff_xr demo report",
        "=" * 22,
        *( [BANNER, warning, BANNER] if warning else ["weights: ImageNet (Keras cache)"] ),
        f"store: {store_path} ({report.n_images} images; extraction {t_extract:.1f} s, "
        f"{report.images_per_second:.2f} images/s)",
        f"analysis: differentiation for n_units={list(n_units)}, {resamples} resamples; filter means "
        f"({t_analysis:.1f} s)",
        "",
        "differentiation (median pairwise distance per unit, mean over resamples):",
    ]
    for n in summary["n_units"].values:
        table = summary.sel(n_units=n).to_pandas().T  # rows: layers, columns: sets
        lines += [f"-- {n} units", table.to_string(float_format=lambda v: f"{v:.3f}"), ""]
    lines += ["files:", f"  {results / 'differentiation.nc'}", f"  {results / 'differentiation.csv'}",
              *(f"  {p}" for p in written if p.suffix == ".png" and "filter_means" not in p.parts),
              f"  {figures / 'filter_means'}/<layer>.png ({len(layers)} layers)"]
    report_path = out / "report.txt"
    report_path.write_text("\n".join(lines) + "\n")
    say(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {report_path}; figures: {figures}")
    return report_path
