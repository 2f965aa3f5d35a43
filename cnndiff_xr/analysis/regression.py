"""Regressions on the input layer: across sets, of each layer's differentiation on the input's
(:func:`stimulus_regression`); within a set, of each layer's RDM on the input's (:func:`rdm_regression`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from dask.base import tokenize

from ..options import CONSTANT_POLICIES, ConstantPolicy, Metric, Norm, UnitType
from ..schema import FILTER_DIM, IMAGE_DIM, INPUT_LAYER, SET_COORD
from ..validation import ParameterValueError, UnknownLabelError, check_choice, check_count
from .blocks import BlockPair, GroupStats, RowBlock, auto_block_size, build_groups, iter_distance_blocks, upper_values
from .collection import as_collection
from .draws import check_single_draw, draw_table
from .graph import GraphBuilder, Key, sum_parts
from .metrics import distance_spec
from .results import check_dim, one_chunk

__all__ = ["rdm_regression", "stimulus_regression"]


def _p_value(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p of a correlation ``r`` over ``n`` points (t with n - 2 df, as :func:`scipy.stats.linregress`)."""
    from scipy import stats

    df = n - 2
    if df < 1:
        return np.full(np.shape(r), np.nan)
    r = np.clip(np.asarray(r, dtype=np.float64), -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / ((1.0 - r) * (1.0 + r)))
    p: np.ndarray = 2 * stats.t.sf(np.abs(t), df)
    return p


def _input_layer(layers: Sequence[str], input_layer: str | None) -> str:
    if input_layer is None:
        return INPUT_LAYER if INPUT_LAYER in layers else layers[0]
    if input_layer not in layers:
        raise UnknownLabelError(f"unknown input layer {input_layer!r}; have layers {list(layers)}")
    return input_layer


# --------------------------------------------------------------------------- across sets
def stimulus_regression(d: xr.DataArray, *, input_layer: str | None = None, dim: str = "set") -> xr.Dataset:
    """Across stimulus sets, regress each layer's differentiation on the input layer's.

    Parameters
    ----------
    d
        :func:`cnndiff_xr.differentiation` output (optionally averaged over ``resample`` first).
    input_layer
        The regressor layer: the model input, ``"input_layer"`` (default when present,
        else the first layer). The seed regressed on block1_conv1 by mistake.
    dim
        The dimension the regression runs along.

    Returns
    -------
    xarray.Dataset
        ``slope``, ``intercept``, ``r``, ``r2``, ``p`` (two-sided, t with n - 2 df, as
        :func:`scipy.stats.linregress`; NaN with fewer than 3 sets) for every remaining
        coordinate (layer, n_units, resample). A constant regressor gives NaN.
    """
    check_dim(d, dim)
    n = d.sizes[dim]
    if n < 2:
        raise ParameterValueError(f"stimulus_regression needs at least 2 {dim}s, got {n}")
    source = _input_layer([str(v) for v in d["layer"].values], input_layer)
    d = one_chunk(d)
    x = d.sel(layer=source, drop=True)
    xc, yc = x - x.mean(dim), d - d.mean(dim)
    sx, sy, sxx, syy, sxy = x.sum(dim), d.sum(dim), (xc * xc).sum(dim), (yc * yc).sum(dim), (xc * yc).sum(dim)
    # least squares from sums (sx, sy) and centred sums of products
    slope = sxy / sxx
    r = sxy / np.sqrt(sxx * syy)
    fit = {"slope": slope, "intercept": sy / n - slope * sx / n, "r": r, "r2": r * r}
    fit["p"] = xr.apply_ufunc(_p_value, fit["r"], kwargs={"n": n}, dask="parallelized", output_dtypes=[float])
    return xr.Dataset(fit, attrs={"input_layer": source, "n": n, "dim": dim})


# --------------------------------------------------------------------------- within a set
def _pair_regression_sums(x_a: RowBlock, x_b: RowBlock, x_stats: GroupStats, y_a: RowBlock, y_b: RowBlock,
                          y_stats: GroupStats, pair: BlockPair) -> np.ndarray:
    """Sums of x, y, x^2, y^2, xy over the i < j pairs of a block pair (x: input layer)."""
    ((_, dx),) = iter_distance_blocks(x_a, x_b, x_stats, pair, [0])
    ((_, dy),) = iter_distance_blocks(y_a, y_b, y_stats, pair, [0])
    x, y = upper_values(dx, pair.same), upper_values(dy, pair.same)
    return np.array([x.sum(), y.sum(), x @ x, y @ y, x @ y])


def _fit_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    """``(1, 1, 6)``: slope, intercept, r, r2, p, n from sums over n pairs."""
    sx, sy, sxx, syy, sxy = sums
    cxx, cyy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = cxy / cxx
        r = np.clip(cxy / np.sqrt(cxx * cyy), -1.0, 1.0)
    return np.array([slope, (sy - slope * sx) / n, r, r * r, float(_p_value(r, n)), n])[None, None]


def rdm_regression(
    tree: xr.DataTree | xr.DataArray | xr.Dataset,
    *,
    n_units: int = 10000,
    unit_type: UnitType = "random",
    norm: Norm = "layer",
    metric: Metric = "euclidean",
    seed: int = 0,
    resample: int = 0,
    layers: str | Sequence[str] | None = None,
    sets: str | Sequence[str] | None = None,
    input_layer: str | None = None,
    sample_dim: str = IMAGE_DIM,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
    constant: ConstantPolicy = "raise",
    block_size: int | None = None,
) -> xr.Dataset:
    """Per set and layer, regress the layer's RDM upper triangle on the input layer's.

    The RDMs are those of :func:`cnndiff_xr.rdm` for each set (same draws and
    normalisation). Sums over the i < j pairs are accumulated block pair by block pair,
    so the RDMs are never held whole; each layer's chunks are read once for all sets.
    ``p`` (two-sided, as :func:`scipy.stats.linregress`) treats the pairs as independent,
    which they are not: a nominal value.

    Parameters
    ----------
    tree
        A store tree, or any DataArray/Dataset with a sample dimension (as :func:`cnndiff_xr.rdm`).
    n_units, unit_type, seed, resample
        The unit draw of every layer, as :func:`cnndiff_xr.select_units`. ``"top"``: per layer, the units with
        the highest mean over the images of all analysed sets together (``select_units(..., sets=sets)``), so
        every set uses the same units -- not those of ``cx.rdm`` of that set alone, which ranks its own images.
    norm, metric, constant
        The distance; see :mod:`cnndiff_xr.analysis.metrics`.
    layers, sets
        Subsets (default all). Every analysed set needs at least 3 images.
    input_layer
        The regressor layer (default ``"input_layer"`` when present, else the first layer).
    sample_dim, set_coord, filter_dim
        Names of the sample dimension, the set coordinate along it, and the filter dimension.
    block_size
        Images per row block, the same for every layer so that blocks pair up (default sized from memory).

    Returns
    -------
    xarray.Dataset
        ``slope``, ``intercept``, ``r``, ``r2``, ``p``, ``n_pairs`` with dims (set, layer),
        lazy.
    """
    spec = distance_spec(norm, metric)
    check_choice("constant", constant, CONSTANT_POLICIES)
    n, seed, resample = check_single_draw(n_units, unit_type, seed, resample)
    coll = as_collection(tree, sample_dim=sample_dim, set_coord=set_coord)
    layer_names = coll.layer_names(layers)
    source = _input_layer(list(coll.layers), input_layer)
    groups = coll.rows(sets, min_size=3)
    tables = {
        name: draw_table(coll.layer(name), (n,), [resample], unit_type=unit_type, seed=seed, filter_dim=filter_dim)
        for name in dict.fromkeys([source, *layer_names])
    }
    if block_size is None:  # one row partition for every layer, so blocks pair up
        block_size = min(auto_block_size(t.n_used[0], coll.layer(k).data.dtype.itemsize) for k, t in tables.items())
    else:
        block_size = check_count("block_size", block_size, 2)
    # the layers read (each table names its layer), the regressor and the regressed layers in their order, the sets
    # in their order (a dict would be tokenized sorted), the distance and the blocks
    token = tokenize(
        [coll.layer(k).data.name for k in tables], list(tables.values()), source, layer_names, list(groups),
        list(groups.values()), spec, constant, block_size, coll.completed_token(),
    )
    graph = GraphBuilder(f"rdm-regression-{token}")
    built = {}
    for li, (name, table) in enumerate(tables.items()):
        built[name] = build_groups(graph, coll, coll.layer(name), groups, table, spec=spec, constant=constant,
                                   block_size=block_size, index=(li,))
    x_groups = built[source]
    for li, name in enumerate(layer_names):
        y_groups = built[name]
        for g, (xg, yg) in enumerate(zip(x_groups, y_groups, strict=True)):
            parts: list[Key] = [
                graph.add("pair-regression", (li, g, a, b), _pair_regression_sums,
                          xg.blocks[a], xg.blocks[b], xg.stats, yg.blocks[a], yg.blocks[b], yg.stats, xg.pair(a, b))
                for a, b in xg.pairs()
            ]
            total = graph.reduce("regression-sums", (li, g), parts, sum_parts)
            graph.output((g, li, 0), _fit_from_sums, total, xg.n * (xg.n - 1) // 2)
    fits = graph.array(((1,) * len(groups), (1,) * len(layer_names), (6,)), np.float64)
    fits = fits.rechunk((len(groups), len(layer_names), 6))
    coords = {"set": list(groups), "layer": layer_names}
    names = ("slope", "intercept", "r", "r2", "p", "n_pairs")
    variables = {k: (("set", "layer"), fits[..., i]) for i, k in enumerate(names)}
    variables["n_pairs"] = (("set", "layer"), fits[..., 5].astype(np.int64))
    attrs = {"input_layer": source, "n_units": n, "unit_type": unit_type, "norm": norm, "metric": metric,
             "seed": seed, "resample": resample}
    return xr.Dataset(variables, coords=coords, attrs=attrs)
