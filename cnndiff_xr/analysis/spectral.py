"""Spectral differentiation: how different a response's power spectra are from one time window to the next.

The measure of Mayner et al. (2022), "Measuring stimulus-evoked neurophysiological differentiation in distinct
populations of neurons in mouse visual cortex", eNeuro 9(1), ENEURO.0280-21.2021, following their reference code
(github.com/wmayner/openscope-differentiation, ``spectral_differentiation.py``; see ``docs/architecture.md``,
"Spectral differentiation"):

1. the ``(time, unit)`` response is cut into non-overlapping windows of ``window`` seconds, the *states*
   (``window * sample_rate`` samples each, which must be a whole number); a trailing partial window is dropped,
   as their code truncates to whole windows;
2. each unit's power spectrum in each window is ``|rfft(x)|^2``: numpy's one-sided FFT, no taper (their main
   analysis; ``taper=`` applies a ``scipy.signal.get_window`` taper first, as their sensitivity analysis), no
   scaling, no doubling of the one-sided bins, the DC and (for an even window) the Nyquist bin included, linear
   frequencies (``frequency = rfftfreq(samples_per_window, 1 / sample_rate)``);
3. a state is the spectra of all units concatenated, one vector of ``units x frequencies`` values;
4. the differentiation is the median of the Euclidean distances between every pair of states
   (``np.median(scipy.spatial.distance.pdist(states))``).

:func:`spectral_states` gives the states of a plain recording; :func:`spectral_differentiation` the measure, on a
recording or on a store's movie set (its images are consecutive frames), per layer with the unit draws of
:func:`cnndiff_xr.differentiation` (the same units for the same ``n_units``, ``unit_type``, ``seed`` and resample,
reduced stores included). Both are lazy.

Why not ``differentiation(spectral_states(x), sample_dim="state", norm="none")``? For a plain recording with every
unit that composition gives the same number divided by ``sqrt(units x frequencies)`` (differentiation's Euclidean
is "per dimension"), within differentiation's distance tolerance (1e-5 relative: float32 Gram products with a
bound), and the tests check it. But a draw must take *units* with all their frequencies, whereas differentiation
draws columns of the state matrix (unit-frequency pairs), and a reduced store holds only the drawn units' frames,
from which the states of every unit cannot be formed. So the store path gathers the drawn units' frames (the gather
of :mod:`cnndiff_xr.analysis.blocks`, one read of each chunk for every draw) and computes the spectra and the
distances of each draw in float64, exactly as the reference code (``pdist``), block of units by block of units.
The states are few (one per window: 30 for a 30-s movie at 1-s windows), so the pairs are few and the cost is the
FFTs and ``states^2 x units x frequencies`` for the distances.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from ..options import REDUCTIONS, SPECTRAL_SCALES, UNIT_TYPES, Reduction, SpectralScale, UnitType
from ..schema import FILTER_DIM, IMAGE_DIM, SET_COORD
from ..validation import (
    ParameterTypeError,
    ParameterValueError,
    check_choice,
    check_count,
    check_n_units,
)
from .blocks import _gather, _gather_in_read
from .collection import Collection, LayerData, as_collection, completed_check
from .differentiation import MEDIAN_CONVENTION
from .draws import DrawTable, UnitPlan, draw_table, make_plan, plan_for
from .graph import GraphBuilder, Key, block_keys

__all__ = [
    "REFERENCE",
    "infer_sample_rate",
    "samples_per_window",
    "spectral_differentiation",
    "spectral_states",
    "state_distances",
    "taper_window",
    "window_power",
]

#: the method and the reference code the numbers follow
REFERENCE = ("Mayner et al. (2022) eNeuro 9(1) ENEURO.0280-21.2021; "
             "github.com/wmayner/openscope-differentiation spectral_differentiation.py")
#: bytes of float64 spectra a distance task holds at a time (it works through a draw's units in blocks)
STATE_BLOCK_BYTES = 32 * 2**20
#: target bytes of one chunk of :func:`spectral_states`' input (a whole number of windows per chunk)
STATES_CHUNK_BYTES = 64 * 2**20
#: how far ``window * sample_rate`` may be from a whole number of samples (relative), for rates such as 29.97
WHOLE_SAMPLES_RTOL = 1e-9


# --------------------------------------------------------------------------- parameters
def _check_positive(name: str, value: Any, example: str) -> float:
    """A finite number > 0 (``sample_rate``, ``window``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParameterTypeError(f"{name} must be a positive number, e.g. {example}, got {name}={value!r}")
    if not (np.isfinite(value) and value > 0):
        raise ParameterValueError(f"{name} must be a positive number, e.g. {example}, got {name}={value!r}")
    return float(value)


def samples_per_window(sample_rate: float, window: float) -> int:
    """``window * sample_rate`` as a whole number of samples, at least 2 (a spectrum needs two samples); refuses a
    fractional number of samples, as the reference code does, rather than rounding the window."""
    exact = window * sample_rate
    n = int(round(exact))
    if abs(exact - n) > WHOLE_SAMPLES_RTOL * max(1.0, exact):
        raise ParameterValueError(
            f"window must span a whole number of samples: window={window!r} s at sample_rate={sample_rate!r} Hz is "
            f"{exact!r} samples; pass a window that is a multiple of 1 / sample_rate = {1 / sample_rate!r} s"
        )
    if n < 2:
        raise ParameterValueError(
            f"window must span at least 2 samples (a power spectrum of one sample is just its square): "
            f"window={window!r} s at sample_rate={sample_rate!r} Hz is {n} sample(s); pass window >= "
            f"{2 / sample_rate!r}"
        )
    return n


def _seconds(values: np.ndarray) -> np.ndarray:
    """A time coordinate in seconds (datetime64 and timedelta64 converted; numbers taken as seconds)."""
    if np.issubdtype(values.dtype, np.datetime64):
        values = values - values[0]
    if np.issubdtype(values.dtype, np.timedelta64):
        return values.astype("timedelta64[ns]").astype(np.float64) / 1e9
    if values.dtype.kind not in "iuf":
        raise ParameterValueError("no numeric time coordinate")
    return values.astype(np.float64)


def infer_sample_rate(data: xr.DataArray, time_dim: str) -> float:
    """Samples per second from an evenly spaced ``time_dim`` coordinate (datetime64, timedelta64, or numbers
    in seconds); refuses data without one."""
    hint = "pass sample_rate= (samples per second) explicitly"
    if time_dim not in data.coords or data.sizes[time_dim] < 2:
        raise ParameterValueError(f"sample_rate=None needs a coordinate along {time_dim!r} to infer it from; {hint}")
    try:
        t = _seconds(np.asarray(data[time_dim].values))
    except ParameterValueError:
        raise ParameterValueError(
            f"sample_rate=None: the {time_dim!r} coordinate is {data[time_dim].dtype}, not times; {hint}") from None
    step = np.diff(t)
    if not (np.all(step > 0) and np.allclose(step, step[0], rtol=1e-6, atol=0)):
        raise ParameterValueError(
            f"sample_rate=None: the {time_dim!r} coordinate is not evenly spaced and increasing; {hint}")
    return float(1.0 / step.mean())


def taper_window(taper: Any, n: int) -> np.ndarray | None:
    """``scipy.signal.get_window(taper, n)`` (periodic, as ``scipy.signal.spectrogram`` uses it), or None for no
    taper (the reference code's main analysis: a rectangular window)."""
    if taper is None:
        return None
    import scipy.signal  # here, not at the top: ~0.7 s to import, which every process importing cnndiff_xr paid

    try:
        values = np.asarray(scipy.signal.get_window(taper, n), dtype=np.float64)
    except (ValueError, TypeError) as error:
        raise ParameterValueError(
            f"taper must be None (no taper, the paper's main analysis) or a scipy.signal.get_window window such as "
            f"'hann', ('kaiser', 14.0) or ('tukey', 0.25), got taper={taper!r} ({error})"
        ) from None
    return values


# --------------------------------------------------------------------------- numpy kernels
def window_power(x: np.ndarray, spw: int, taper: np.ndarray | None = None) -> np.ndarray:
    """Power spectra of consecutive windows: ``x`` ``(n_windows * spw, ...)`` -> ``(n_windows, n_frequencies, ...)``
    float64, ``np.square(np.abs(np.fft.rfft(window, axis=0)))`` per window (after ``taper``), as the reference code."""
    x = np.asarray(x, dtype=np.float64)
    windows = x.reshape((x.shape[0] // spw, spw) + x.shape[1:])
    if taper is not None:
        windows = windows * taper.reshape((1, spw) + (1,) * (x.ndim - 1))
    return np.square(np.abs(np.fft.rfft(windows, axis=1)))


def _states_block(block: np.ndarray, spw: int, taper: np.ndarray | None) -> np.ndarray:
    """:func:`spectral_states` of one chunk (whole windows): ``(windows, *features, frequency)``."""
    return np.moveaxis(window_power(block, spw, taper), 1, -1)


@dataclass(frozen=True, eq=False)
class SpectralTask:
    """Static data of one draw's distance task: where the draw's units are in the gathered chunks, the windows,
    and how the distances are reduced."""

    layer: str
    draw: int
    spw: int
    n_windows: int
    taper: np.ndarray | None
    reduction: Reduction
    scale: SpectralScale
    samples: np.ndarray  # the frames' labels, for messages


def state_distances(x: np.ndarray, spw: int, taper: np.ndarray | None = None, *,
                    block_bytes: int = STATE_BLOCK_BYTES) -> np.ndarray:
    """The condensed pairwise Euclidean distances (``pdist`` order) between the spectral states of ``x``
    ``(n_windows * spw, units)``: the squared distances of blocks of units are summed in float64, so only a block's
    spectra are held at a time; equal to ``pdist(states)`` but for the order of the sums."""
    from scipy.spatial.distance import pdist  # here: scipy.spatial is slow to import, and few processes need it

    n_windows = x.shape[0] // spw
    n_freq = spw // 2 + 1
    units = x.shape[1]
    width = max(1, block_bytes // (8 * n_windows * (n_freq + spw)))
    total = np.zeros(n_windows * (n_windows - 1) // 2)
    for lo in range(0, units, width):
        power = window_power(x[:, lo:lo + width], spw, taper)  # (windows, frequencies, block units)
        total += pdist(power.reshape(n_windows, -1), "sqeuclidean")
    return np.sqrt(total)


def _draw_value(parts: list[np.ndarray], plan: UnitPlan, task: SpectralTask) -> float:
    """The spectral differentiation of one draw from the gathered chunks of the analysed frames (in time order)."""
    cols = plan.positions(0, task.draw)
    x = np.concatenate([p[:, cols] for p in parts], axis=0)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"layer {task.layer!r}: non-finite values in {int(bad.sum())} frame(s) "
                         f"(e.g. {[str(s) for s in task.samples[bad][:3]]})")
    distances = state_distances(x, task.spw, task.taper)
    value = float(np.median(distances)) if task.reduction == "median" else float(distances.mean())
    if task.scale == "per_dimension":
        value /= np.sqrt(x.shape[1] * (task.spw // 2 + 1))
    return value


def _expand(values: list[float], index: np.ndarray) -> np.ndarray:
    """The distinct draws' values -> one ``(1, n_units, resample)`` output chunk."""
    return np.asarray(values, dtype=np.float64)[index][None]


# --------------------------------------------------------------------------- public
def spectral_states(
    data: xr.DataArray,
    sample_rate: float | None = None,
    window: float = 1.0,
    *,
    time_dim: str = "time",
    taper: Any = None,
) -> xr.DataArray:
    """The spectral states of a recording: each unit's power spectrum in each window, lazily.

    Parameters
    ----------
    data
        A DataArray ``(time, unit...)`` of neural data (or of anything sampled in time); every dim other than
        ``time_dim`` is a feature dim and is kept.
    sample_rate
        Samples per second. ``None``: inferred from an evenly spaced ``time_dim`` coordinate (datetime64,
        timedelta64, or numbers taken as seconds).
    window
        Seconds per state; ``window * sample_rate`` must be a whole number of samples, at least 2. Non-overlapping
        windows from the first sample; a trailing partial window is dropped (``dropped_samples`` attribute).
    time_dim
        The time dimension.
    taper
        ``None`` (the paper's main analysis: no taper) or a :func:`scipy.signal.get_window` window applied to every
        window before the FFT (their sensitivity analysis, without the overlap).

    Returns
    -------
    xarray.DataArray
        ``spectral_states``, float64, dims ``(state, *features, frequency)``: ``|rfft|^2`` of every window, unscaled,
        one-sided (not doubled), DC and Nyquist included (see the module docstring). Coordinates ``state``,
        ``frequency`` (Hz), ``state_start`` (the time coordinate of each window's first sample, when ``data`` has
        one) and ``data``'s feature coordinates. Dask-backed, chunked along states; nothing is computed.
        :func:`spectral_differentiation` of ``data`` is the median pairwise Euclidean distance between these states
        flattened to vectors.
    """
    if not isinstance(data, xr.DataArray):
        raise ParameterTypeError(f"data must be an xarray DataArray (time, unit...), got {type(data).__name__}")
    if time_dim not in data.dims:
        raise ParameterValueError(f"data has no time dimension {time_dim!r} (dims {data.dims}); pass time_dim=")
    rate = infer_sample_rate(data, time_dim) if sample_rate is None else _check_positive(
        "sample_rate", sample_rate, "30.0")
    window = _check_positive("window", window, "1.0")
    spw = samples_per_window(rate, window)
    taper_values = taper_window(taper, spw)
    n_time = data.sizes[time_dim]
    n_windows = n_time // spw
    if n_windows < 1:
        raise ParameterValueError(
            f"window={window!r} s is {spw} samples at sample_rate={rate!r} Hz, longer than the {n_time} samples of "
            f"data; pass a shorter window"
        )
    arr = data.transpose(time_dim, ...).isel({time_dim: slice(0, n_windows * spw)})
    features = arr.shape[1:]
    per_window = spw * max(1, int(np.prod(features))) * 8
    windows_per_chunk = max(1, STATES_CHUNK_BYTES // per_window)
    x = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.values), chunks=-1)
    x = x.rechunk({0: windows_per_chunk * spw})
    n_freq = spw // 2 + 1
    chunks = (tuple(c // spw for c in x.chunks[0]), *x.chunks[1:], (n_freq,))
    states = da.map_blocks(_states_block, x, spw, taper_values, chunks=chunks, new_axis=[x.ndim],
                           dtype=np.float64, meta=np.empty((0,) * (x.ndim + 1)),
                           name=f"spectral-states-{tokenize(x.name, spw, taper_values)}")
    feature_dims = [str(d) for d in arr.dims[1:]]
    coords: dict[Hashable, Any] = {
        "state": np.arange(n_windows),
        "frequency": ("frequency", np.fft.rfftfreq(spw, d=1.0 / rate), {"units": "Hz"}),
    }
    for name, coord in arr.coords.items():
        if time_dim not in coord.dims and name not in (time_dim, "state", "frequency"):
            coords[name] = coord.variable
    if time_dim in arr.coords:
        coords["state_start"] = ("state", np.asarray(arr[time_dim].values)[::spw][:n_windows])
    return xr.DataArray(
        states,
        dims=("state", *feature_dims, "frequency"),
        coords=coords,
        name="spectral_states",
        attrs={
            "sample_rate": rate,
            "window": window,
            "samples_per_window": spw,
            "dropped_samples": n_time - n_windows * spw,
            "taper": "none" if taper is None else str(taper),
            "power": "|rfft(window)|^2: one-sided, unscaled, DC included",
            "reference": REFERENCE,
        },
    )


def _one_set(coll: Collection, sets: str | None) -> tuple[str, np.ndarray]:
    """The analysed set (its name and rows in sample order): ``sets``, or the only set of the data."""
    if sets is not None and not isinstance(sets, str):
        raise ParameterTypeError(
            f"sets must be the name of one set (the movie's frames, in time order) or None, got sets={sets!r}; "
            "call once per set"
        )
    if sets is None:
        known = coll.set_names
        if len(known) != 1:
            raise ParameterValueError(
                f"pass sets=: the data have {len(known)} sets {known}; spectral differentiation analyses one set "
                "whose samples are consecutive frames (a movie)"
            )
        sets = known[0]
    rows = coll.rows(sets)
    return sets, rows[sets]


def spectral_differentiation(
    data: xr.DataArray | xr.Dataset | xr.DataTree,
    sample_rate: float | None = None,
    window: float = 1.0,
    *,
    n_units: int | Sequence[int] | None = None,
    unit_type: UnitType = "random",
    resamples: int = 10,
    seed: int = 0,
    layers: str | Sequence[str] | None = None,
    sets: str | None = None,
    time_dim: str | None = None,
    set_coord: str = SET_COORD,
    filter_dim: str = FILTER_DIM,
    taper: Any = None,
    reduction: Reduction = "median",
    scale: SpectralScale = "paper",
) -> xr.DataArray:
    """Spectral differentiation (Mayner et al., eNeuro 2022): the median pairwise Euclidean distance between the
    power spectra of a response's non-overlapping time windows, lazily.

    Parameters
    ----------
    data
        A DataArray ``(time, unit...)`` of neural data (every dim but ``time_dim`` is a feature), a Dataset of such
        arrays (one "layer" each), or a store tree (``cx.open_activations``) whose set ``sets`` holds consecutive
        movie frames: its images in store order are the time axis, each layer a response ``(frame, y, x, filter)``.
    sample_rate
        Samples (frames) per second: for a store, the frame rate of the movie as extracted (every k-th frame of a
        30 Hz movie: 30 / k). ``None``: inferred from an evenly spaced time coordinate of a DataArray or Dataset
        (see :func:`spectral_states`); a store has none, so it needs the rate.
    window
        Seconds per state (1 s in the paper); ``window * sample_rate`` must be a whole number of samples, at least
        2, and the set must hold at least 2 whole windows. A trailing partial window is dropped
        (``dropped_samples`` attribute).
    n_units
        ``None`` (default): every unit of each layer, and no ``n_units``/``resample`` dims. Else units per draw
        (one or several values), drawn exactly as :func:`cnndiff_xr.differentiation` draws them for the same
        ``unit_type``, ``seed`` and resample (``"top"``: ranked by their mean over the analysed frames, those of
        the whole windows), so reduced stores work for their registered draws; a draw takes a unit with all its
        frequencies.
    unit_type, resamples, seed
        The draws, as :func:`cnndiff_xr.differentiation` (ignored with ``n_units=None``).
    layers
        Layers to analyse (default all, in network order).
    sets
        The one set analysed (default: the only set of the data). A store's other sets (photos, noise) are not
        time series; call once per movie set.
    time_dim
        The time dimension of a DataArray or Dataset (default ``"time"``); a store's is its image dimension.
    set_coord, filter_dim
        The set coordinate along time, and the filter dimension for ``unit_type="per_filter"``.
    taper
        ``None`` (the paper: no taper) or a :func:`scipy.signal.get_window` window applied to every window before
        its FFT (their sensitivity analysis, without its overlap).
    reduction
        ``"median"`` (the paper) or ``"mean"`` of the pairwise distances.
    scale
        ``"paper"``: the Euclidean distance of the concatenated spectra, the paper's number (it grows as
        ``sqrt(units x frequencies)`` and as the square of the response's amplitude). ``"per_dimension"``: divided
        by ``sqrt(units x frequencies)`` (coordinate ``n_dims``), like :func:`cnndiff_xr.differentiation`'s
        Euclidean distance under ``norm="none"``, so draws of different sizes compare.

    Returns
    -------
    xarray.DataArray
        ``spectral_differentiation``, float64: dims ``(layer, n_units, resample)`` for a store or Dataset (without
        ``n_units``/``resample`` when ``n_units=None``); for a DataArray the same without ``layer`` (0-d with
        ``n_units=None``). Coordinates ``n_units_used``, ``n_dims`` (units x frequencies), ``layer_size``,
        ``layer_index``; attributes ``sample_rate``, ``window``, ``samples_per_window``, ``n_states``,
        ``n_frequencies``, ``dropped_samples``, ``set``, ``taper``, ``reduction``, ``scale``, ``reference``.
        Dask-backed: building it computes nothing.

    Notes
    -----
    Each chunk of a layer is read once by a task that gathers the union of the draws' units for the analysed
    frames (reduced stores: the same values from the stored columns); one task per layer and distinct draw then
    computes the spectra and the distances in float64, block of units by block of units, holding the draw's
    ``frames x units`` values and about 32 MiB of spectra. With ``n_units=None`` on a large layer the gathered
    frames are the whole layer: pass ``n_units`` for VGG-sized layers.

    The relation to :func:`cnndiff_xr.differentiation`: for a DataArray ``x`` with every unit,
    ``differentiation(spectral_states(x, rate, w), n_units=<all>, norm="none", sample_dim="state")`` equals
    ``spectral_differentiation(x, rate, w, scale="per_dimension")`` to within differentiation's 1e-5 distance
    tolerance.
    """
    window = _check_positive("window", window, "1.0")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("scale", scale, SPECTRAL_SCALES)
    check_choice("unit_type", unit_type, UNIT_TYPES)
    resamples = check_count("resamples", resamples, 1)
    seed = check_count("seed", seed, 0)
    all_units = n_units is None
    n_list = None if n_units is None else check_n_units(n_units)
    is_tree = isinstance(data, xr.DataTree)
    if not isinstance(data, (xr.DataTree, xr.DataArray, xr.Dataset)):
        raise ParameterTypeError(f"data must be an xarray DataArray, Dataset or DataTree, got {type(data).__name__}")
    if time_dim is None:
        time_dim = IMAGE_DIM if is_tree else "time"
    elif is_tree and time_dim != IMAGE_DIM:
        raise ParameterValueError(f"a store's time axis is its {IMAGE_DIM!r} dimension; got time_dim={time_dim!r}")
    coll = as_collection(data, sample_dim=time_dim, set_coord=set_coord)
    set_name, rows = _one_set(coll, sets)
    if sample_rate is None:
        if is_tree:
            raise ParameterValueError(
                "a store has no time coordinate: pass sample_rate= (the movie's frame rate as extracted, frames per "
                "second)")
        first = data if isinstance(data, xr.DataArray) else next(iter(coll.layers.values())).array
        rate = infer_sample_rate(first.isel({time_dim: rows}), time_dim)
    else:
        rate = _check_positive("sample_rate", sample_rate, "30.0")
    spw = samples_per_window(rate, window)
    taper_values = taper_window(taper, spw)
    n_windows = rows.size // spw
    if n_windows < 2:
        raise ParameterValueError(
            f"window={window!r} s is {spw} samples at sample_rate={rate!r} Hz: set {set_name!r} has {rows.size} "
            f"samples, {n_windows} whole window(s), and differentiation needs at least 2 windows (states) to "
            f"compare; pass a shorter window"
        )
    used = rows[: n_windows * spw]
    n_freq = spw // 2 + 1
    layer_names = coll.layer_names(layers)
    tables: list[DrawTable] = []
    for name in layer_names:
        layer = coll.layer(name)
        if all_units and layer.reduced:
            raise ParameterValueError(
                f"n_units=None (every unit) needs every unit, but layer {name!r} is reduced: the store keeps "
                f"{layer.flat_index.size if layer.flat_index is not None else 0} of its {layer.size} units, those of "
                "its registered draws; pass n_units= (and resamples, seed, unit_type) of those draws"
            )
        if all_units:
            tables.append(draw_table(layer, (layer.size,), 1, unit_type="all", seed=0, filter_dim=filter_dim))
        else:
            assert n_list is not None
            tables.append(draw_table(layer, n_list, resamples, unit_type=unit_type, seed=seed,
                                     filter_dim=filter_dim))
    token = tokenize(
        "spectral-differentiation-1", [coll.layer(name).data.name for name in layer_names], tables, set_name, used,
        rate, window, spw, taper_values, reduction, scale, coll.completed_token(),
    )
    graph = GraphBuilder(f"spectral-differentiation-{token}")
    samples = coll.samples[used]
    for li, (name, table) in enumerate(zip(layer_names, tables, strict=True)):
        parts, plan = _gather_frames(graph, coll, coll.layer(name), table, used, (li,))
        values = [
            graph.add("spectral", (li, d), _draw_value, parts, plan,
                      SpectralTask(name, d, spw, n_windows, taper_values, reduction, scale, samples))
            for d in range(table.n_draws)
        ]
        graph.output((li, 0, 0), _expand, values, table.index)
    n_cols = 1 if all_units else len(n_list or ())
    n_res = 1 if all_units else resamples
    array = graph.array(((1,) * len(layer_names), (n_cols,), (n_res,)), np.float64)
    n_used = np.array([t.n_used for t in tables], dtype=np.int64)
    all_names = list(coll.layers)
    out = xr.DataArray(
        array,
        dims=("layer", "n_units", "resample"),
        coords={
            "layer": layer_names,
            "n_units": [0] if all_units else list(n_list or ()),  # (dropped with n_units=None)
            "resample": np.arange(n_res),
            "n_units_used": (("layer", "n_units"), n_used),
            "n_dims": (("layer", "n_units"), n_used * n_freq),
            "layer_size": ("layer", np.array([t.size for t in tables], dtype=np.int64)),
            "layer_index": ("layer", np.array([all_names.index(n) for n in layer_names])),
        },
        name="spectral_differentiation",
        attrs={
            "sample_rate": rate,
            "window": window,
            "samples_per_window": spw,
            "n_states": n_windows,
            "n_frequencies": n_freq,
            "dropped_samples": int(rows.size - used.size),
            "set": set_name,
            "taper": "none" if taper is None else str(taper),
            "unit_type": "all" if all_units else unit_type,
            "seed": seed,
            "reduction": reduction,
            "scale": scale,
            "reference": REFERENCE,
            "median_convention": MEDIAN_CONVENTION,
        },
    )
    if all_units:
        out = out.isel(n_units=0, resample=0, drop=True)
    if isinstance(data, xr.DataArray):
        out = out.isel(layer=0)
    return out


def _gather_frames(graph: GraphBuilder, coll: Collection, layer: LayerData, table: DrawTable, rows: np.ndarray,
                   index: tuple[int, ...]) -> tuple[list[Key], Key]:
    """Keys of the gathered chunks holding ``rows`` (sorted), in time order, and of the layer's plan: one read of
    each chunk gathers the union of every draw's units, as :func:`~cnndiff_xr.analysis.blocks.build_groups`."""
    bounds = layer.block_bounds()
    block_of = np.searchsorted(bounds, rows, side="right") - 1
    chunks = [int(k) for k in np.unique(block_of)]
    check = completed_check(coll, rows)
    if table.needs_unit_means():  # "top": a pass for the unit means over the analysed frames first
        plan = plan_for(graph, table, layer, [rows], index)
        if check is not None:
            graph.depend(check)
        graph.depend(layer.data)
        keys = block_keys(layer.data)
        parts = [graph.add("gather", (*index, k), _gather, keys[k], rows[block_of == k] - bounds[k], plan,
                           None if check is None else check.key) for k in chunks]
        return parts, plan
    # the plan needs no data: the gather is fused with the chunk reads (as build_groups does)
    plan_delayed = dask.delayed(make_plan, pure=True)(table)
    gathered = da.map_blocks(_gather_in_read, layer.data, plan_delayed, check, rows, dtype=layer.data.dtype,
                             meta=np.empty((0,) * layer.data.ndim, layer.data.dtype))
    graph.depend(gathered)
    graph.depend(plan_delayed)
    keys = block_keys(gathered)
    return [keys[k] for k in chunks], plan_delayed.key

