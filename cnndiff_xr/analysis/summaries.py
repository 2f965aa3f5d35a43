"""Filter means and layer means: per-image summaries of every layer, lazily.

The seed's heatmaps showed, per layer, the mean over ``(y, x)`` of every filter for every
image, on activations z-scored over the layer: one mean and one SD over each set's
images x all units of the layer (the seed held each set's activations separately).
One task per image chunk computes, from a single read, the filter means and each image's
mean and centred sum of squares; the z-scoring is an affine map of those, so raw and
z-scored results cost the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import xarray as xr

from ..schema import FILTER_DIM, FILTER_MEAN, IMAGE_DIM, LAYER_CSS, LAYER_MEAN, MEANS_GROUP, SET_COORD
from ..validation import ParameterValueError, check_bool
from .collection import Collection, LayerData, as_collection, completed_flags, refuse_incomplete

__all__ = ["filter_means", "layer_means"]


def _block_summary(block: np.ndarray, flags: np.ndarray, n_spatial: int) -> np.ndarray:
    """``(images, filters + 2)``: filter means, then each image's mean and centred sum of squares."""
    refuse_incomplete(flags)  # a lazy completion record is checked by the task that reads the chunk
    n_filters = block.shape[-1]
    out = np.empty((block.shape[0], n_filters + 2))
    for i, image in enumerate(block):  # one image at a time in float64 keeps the copy small
        x = np.asarray(image, dtype=np.float64)
        out[i, :n_filters] = x.reshape(-1, n_filters).mean(axis=0)
        mean = x.mean()
        out[i, n_filters] = mean
        out[i, n_filters + 1] = np.sum((x - mean) ** 2)
    return out


def _stored_summary(filter_mean: np.ndarray, layer_mean: np.ndarray, layer_css: np.ndarray, flags: np.ndarray
                    ) -> np.ndarray:
    """:func:`_block_summary`'s ``(images, filters + 2)`` from the means stored at extraction."""
    refuse_incomplete(flags)  # the means of a batch are written before its completion flags, as its activations
    n_filters = filter_mean.shape[1]
    out = np.empty((filter_mean.shape[0], n_filters + 2))
    out[:, :n_filters] = filter_mean
    out[:, n_filters] = layer_mean
    out[:, n_filters + 1] = layer_css
    return out


def _uses_stored_means(layer: LayerData, filter_dim: str) -> bool:
    """Whether the layer's summaries come from its means subgroup (cheaper than reading the activations, and the
    only way for a reduced layer); refuses a reduced layer without one."""
    stored = layer.means is not None and filter_dim == FILTER_DIM and all(
        name in layer.means.data_vars for name in (FILTER_MEAN, LAYER_MEAN, LAYER_CSS))
    if layer.reduced and not stored:
        why = (f"filter_dim={filter_dim!r}: its means were stored over {FILTER_DIM!r}"
               if layer.means is not None and filter_dim != FILTER_DIM else
               f"it has no {MEANS_GROUP!r} subgroup with {FILTER_MEAN!r}, {LAYER_MEAN!r} and {LAYER_CSS!r}")
        raise ParameterValueError(
            f"layer {layer.name!r} is reduced (the store keeps only the units of its registered draws), so its filter "
            f"and layer means must come from the means stored at extraction, and {why}. Re-extract with "
            "filter_means=True (cnndiff extract --filter-means), or use a full store"
        )
    return stored


def _means_summary(coll: Collection, layer: LayerData, rows: np.ndarray) -> tuple[da.Array, np.ndarray]:
    """The summary of :func:`_summary` read from the layer's means subgroup: no activation is read."""
    assert layer.means is not None
    means = layer.means
    if rows.size != means.sizes[coll.sample_dim] or np.any(rows != np.arange(rows.size)):
        means = means.isel({coll.sample_dim: rows})
    fm = da.asarray(means[FILTER_MEAN].transpose(coll.sample_dim, FILTER_DIM).data)
    fm = fm.rechunk({1: -1})
    chunks = (fm.chunks[0],)
    mean = da.asarray(means[LAYER_MEAN].data).rechunk(chunks)
    css = da.asarray(means[LAYER_CSS].data).rechunk(chunks)
    flags = da.asarray(completed_flags(coll, rows)).rechunk(chunks)
    n_filters, expected = fm.shape[1], layer.feature_shape[layer.feature_dims.index(FILTER_DIM)]
    if n_filters != expected:
        raise ValueError(f"layer {layer.name!r}: its stored {FILTER_MEAN!r} has {n_filters} filters, the layer "
                         f"{expected}; the store is damaged, re-extract it")
    out = da.blockwise(_stored_summary, "if", fm, "if", mean, "i", css, "i", flags, "i", dtype=np.float64,
                       concatenate=True, adjust_chunks={"f": n_filters + 2})
    if not layer.reduced and FILTER_DIM in layer.array.coords:  # the labels a whole layer's activations give
        return out, np.asarray(layer.array[FILTER_DIM].values)
    return out, np.asarray(means[FILTER_DIM].values) if FILTER_DIM in means.coords else np.arange(n_filters)


def _summary(coll: Collection, layer: LayerData, rows: np.ndarray, filter_dim: str) -> tuple[da.Array, np.ndarray]:
    """``(images, filters + 2)`` (filter means, then each image's mean and centred sum of squares) and the filter
    labels: from the means stored at extraction when the layer has them, else from one read of its activations."""
    if filter_dim not in layer.feature_dims:
        raise ParameterValueError(
            f"layer {layer.name!r} has no filter dimension {filter_dim!r} (feature dims {layer.feature_dims}); "
            "pass filter_dim="
        )
    if _uses_stored_means(layer, filter_dim):
        return _means_summary(coll, layer, rows)
    spatial = [d for d in layer.feature_dims if d != filter_dim]
    array = layer.array.transpose(coll.sample_dim, *spatial, filter_dim)
    if rows.size != array.shape[0] or np.any(rows != np.arange(rows.size)):
        array = array.isel({coll.sample_dim: rows})
    data = array.data
    flags = da.asarray(completed_flags(coll, rows)).rechunk((data.chunks[0],))
    n_filters = data.shape[-1]
    index = "i" + "".join(chr(ord("j") + k) for k in range(len(spatial))) + "f"
    out = da.blockwise(
        _block_summary, "if", data, index, flags, "i",
        n_spatial=len(spatial), dtype=np.float64, concatenate=True, adjust_chunks={"f": n_filters + 2},
    )
    return out, np.asarray(array[filter_dim].values) if filter_dim in array.coords else np.arange(n_filters)


def _set_scale(mean: da.Array, css: da.Array, onehot: np.ndarray, n_units: int) -> tuple[da.Array, da.Array]:
    """Per-image mean and SD of its set's (images x units) values, pooled without cancellation."""
    counts = onehot.sum(axis=0)
    set_mean = (mean[:, None] * onehot).sum(axis=0) / counts
    image_set_mean = (onehot * set_mean[None, :]).sum(axis=1)
    between = ((mean - image_set_mean) ** 2)[:, None] * onehot
    var = ((css[:, None] * onehot).sum(axis=0) + n_units * between.sum(axis=0)) / (counts * n_units)
    return image_set_mean, (onehot * da.sqrt(var)[None, :]).sum(axis=1)


def _zscore(values: da.Array, centre: da.Array, scale: da.Array) -> da.Array:
    # a set whose values are all equal has SD 0: its z-scores are defined as 0
    safe = da.where(scale > 0, scale, 1.0)
    return da.where(scale > 0, (values - centre) / safe, 0.0)


def _layer_parts(
    coll: Collection, layer: LayerData, rows: np.ndarray, zscore: bool, filter_dim: str
) -> tuple[da.Array, da.Array, np.ndarray]:
    out, filters = _summary(coll, layer, rows, filter_dim)
    n_filters = filters.size
    fm, mean, css = out[:, :n_filters], out[:, n_filters], out[:, n_filters + 1]
    if zscore:
        labels = coll.set_labels[rows]
        names = list(dict.fromkeys(labels))
        onehot = (labels[:, None] == np.array(names)[None, :]).astype(np.float64)
        centre, scale = _set_scale(mean, css, onehot, layer.size)
        return _zscore(fm, centre[:, None], scale[:, None]), _zscore(mean, centre, scale), filters
    return fm, mean, filters


def _selection(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    layers: str | Sequence[str] | None,
    sets: str | Sequence[str] | None,
    sample_dim: str,
    set_coord: str,
) -> tuple[Collection, list[str], np.ndarray]:
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    return coll, coll.layer_names(layers), coll.selected_rows(sets)


def filter_means(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    *,
    zscore: bool = False,
    layers: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
) -> xr.DataTree:
    """Per layer, the mean over space of every filter for every image, lazily.

    Parameters
    ----------
    tree
        A store tree (or a DataArray/Dataset with ``sample_dim`` and ``filter_dim``).
    zscore
        ``False``: raw activations. ``True``: on activations z-scored with one mean and SD
        (ddof=0) over each set's images x all units of the layer, as the seed's heatmaps
        (a set whose values are all equal gets z-scores of 0).
    layers, sets
        Subsets (default all).

    Returns
    -------
    xarray.DataTree
        One group per layer with ``filter_mean`` ``(image, filter)`` and ``layer_mean``
        ``(image,)`` (the image's mean over all units, on the same scale), coordinates
        ``image``, ``set`` and ``filter``. Dense layers' filter means are the activations.
        Computing a layer reads each of its chunks once.
    """
    zscore = check_bool("zscore", zscore)
    coll, names, rows = _selection(tree, layers, sets, sample_dim, set_coord)
    sample_coords = {sample_dim: coll.samples[rows], set_coord: (sample_dim, coll.set_labels[rows])}
    nodes: dict[str, xr.Dataset] = {
        "/": xr.Dataset(attrs={"layers": names, "zscore": zscore, "sets": list(dict.fromkeys(coll.set_labels[rows]))})
    }
    for name in names:
        fm, mean, filters = _layer_parts(coll, coll.layer(name), rows, zscore, filter_dim)
        # also on the variables: fm[layer]["filter_mean"] alone (what a figure is given) still names its layer
        variable_attrs = {"layer": name, "zscore": zscore}
        nodes[f"/{name}"] = xr.Dataset(
            {
                "filter_mean": ((sample_dim, filter_dim), fm, variable_attrs),
                "layer_mean": ((sample_dim,), mean, variable_attrs),
            },
            coords={**sample_coords, filter_dim: filters},
            attrs={"layer": name, "zscore": zscore},
        )
    return xr.DataTree.from_dict(nodes)


def layer_means(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    *,
    zscore: bool = False,
    layers: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
) -> xr.DataArray:
    """Mean activation of every image in every layer: lazy ``(layer, image)``.

    Shares its per-chunk tasks with :func:`filter_means` (same arguments, same graph keys),
    so computing both together reads each chunk once. ``zscore`` as in
    :func:`filter_means`.
    """
    zscore = check_bool("zscore", zscore)
    coll, names, rows = _selection(tree, layers, sets, sample_dim, set_coord)
    means = [_layer_parts(coll, coll.layer(name), rows, zscore, filter_dim)[1] for name in names]
    return xr.DataArray(
        da.stack(means),
        dims=("layer", sample_dim),
        coords={"layer": names, sample_dim: coll.samples[rows], set_coord: (sample_dim, coll.set_labels[rows])},
        name="layer_mean",
        attrs={"zscore": zscore},
    )
