"""Operations on a differentiation result: summaries over resamples, and normalisation by a reference set."""

from __future__ import annotations

import dask.array as da
import xarray as xr

from ..validation import UnknownLabelError, check_bool, check_fraction, check_int

__all__ = ["check_dim", "normalise_by_reference", "one_chunk", "resample_summary"]


def check_dim(d: xr.DataArray, dim: str) -> None:
    """Refuse a ``dim`` that ``d`` does not have."""
    if dim not in d.dims:
        raise UnknownLabelError(f"unknown dimension {dim!r}; d has dims {d.dims}")


def one_chunk(d: xr.DataArray) -> xr.DataArray:
    """``d`` in one chunk: results are small, and one chunk keeps the xarray arithmetic on them to a handful of
    tasks (the data only: ``.chunk()`` would also turn the small coordinates into dask arrays)."""
    return d.copy(data=d.data.rechunk(-1)) if isinstance(d.data, da.Array) else d


def resample_summary(d: xr.DataArray, *, interval: float = 0.95, dim: str = "resample", ddof: int = 1) -> xr.Dataset:
    """Mean, SD and central percentile interval over resamples (lazy if ``d`` is).

    Parameters
    ----------
    d
        Output of :func:`cnndiff_xr.differentiation` (or anything with ``dim``).
    interval
        Width of the central interval, e.g. 0.95 for the 2.5th-97.5th percentiles
        (linear interpolation, as :func:`numpy.percentile`).
    dim
        The dimension summarised.
    ddof
        Delta degrees of freedom of the SD (1: sample SD; NaN with a single resample).

    Returns
    -------
    xarray.Dataset
        ``mean``, ``sd``, ``lower``, ``upper`` without ``dim``.
    """
    interval = check_fraction("interval", interval, 0.95)
    ddof = check_int("ddof", ddof, 0)
    check_dim(d, dim)
    d = one_chunk(d)
    q = [(1 - interval) / 2, (1 + interval) / 2]
    bounds = d.quantile(q, dim=dim)
    return xr.Dataset(
        {
            "mean": d.mean(dim),
            "sd": d.std(dim, ddof=ddof),
            "lower": bounds.isel(quantile=0, drop=True),
            "upper": bounds.isel(quantile=1, drop=True),
        },
        attrs={"interval": interval, "ddof": ddof, **d.attrs},
    )


def normalise_by_reference(d: xr.DataArray, reference: str = "white_noise", *, dim: str = "set",
                           drop: bool = False) -> xr.DataArray:
    """Divide every set's differentiation by a reference set's, per layer and draw.

    The seed divided by white noise ("normalising by spontaneous activity"). Within a call to
    :func:`cnndiff_xr.differentiation` a resample uses the same units in every set, whatever the ``unit_type``
    ("top" ranks the units over every analysed image together), so the ratio is taken per draw; summarise
    afterwards with :func:`resample_summary`.

    Parameters
    ----------
    d
        Output of :func:`cnndiff_xr.differentiation`.
    reference
        The label along ``dim`` to divide by.
    dim
        The dimension holding the reference.
    drop
        Leave the reference (all ones) out of the result.
    """
    drop = check_bool("drop", drop)
    check_dim(d, dim)
    known = [str(v) for v in d[dim].values]
    if reference not in known:
        raise UnknownLabelError(f"unknown reference {dim} {reference!r}; d has {dim}s {known}")
    out = d / d.sel({dim: reference}, drop=True)
    if drop:
        out = out.drop_sel({dim: reference})
    out.name = f"{d.name or 'differentiation'}_by_{reference}"
    out.attrs = {**d.attrs, "reference": reference}
    return out
