"""Spectral differentiation (Mayner et al., eNeuro 2022) against scipy written out in the tests.

The reference recipe of their code (github.com/wmayner/openscope-differentiation, ``spectral_differentiation.py``):
non-overlapping windows, ``np.square(np.abs(np.fft.rfft(window)))`` per unit, the units' spectra concatenated per
window, ``np.median(scipy.spatial.distance.pdist(states))``. Here the spectra are checked against
``scipy.signal.periodogram`` / ``spectrogram`` (rescaled as their ``scale_spectra`` does) and the distances against
``pdist``, on plain recordings and on a store's movie set with the units of ``cx.select_units``.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.signal
import xarray as xr
from analysis_fixtures import make_tree, raise_if_dask_computes, reduce_tree, synchronous, unit_indices
from scipy.spatial.distance import pdist

import cnndiff_xr as cx
from cnndiff_xr.analysis.spectral import spectral_differentiation, spectral_states
from cnndiff_xr.sampling import UnitDraws
from cnndiff_xr.validation import ParameterError, ParameterTypeError, ParameterValueError

RATE = 10.0  # samples per second of the synthetic recordings and movies


# --------------------------------------------------------------------------- plain references
def unscaled_periodogram(x: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """|rfft|^2 of each row from scipy.signal.periodogram: undo its 1/n^2 'spectrum' scaling and its doubling of
    the one-sided bins (all but DC, and Nyquist for an even length), as the reference code's scale_spectra."""
    n = x.shape[-1]
    f, p = scipy.signal.periodogram(x, fs=fs, window="boxcar", detrend=False, return_onesided=True,
                                    scaling="spectrum", axis=-1)
    p = p * n**2
    inner = slice(1, None) if n % 2 else slice(1, -1)
    p[..., inner] /= 2
    return f, p


def reference_states(x: np.ndarray, spw: int, fs: float) -> np.ndarray:
    """(time, unit) -> (window, unit x frequency) states from scipy.signal.periodogram."""
    n_windows = x.shape[0] // spw
    rows = []
    for w in range(n_windows):
        segment = x[w * spw:(w + 1) * spw].reshape(spw, -1).T  # (unit, sample)
        rows.append(unscaled_periodogram(segment, fs)[1].ravel())
    return np.array(rows)


def reference_value(x: np.ndarray, spw: int, fs: float, reduction: str = "median", scale: str = "paper") -> float:
    states = reference_states(np.asarray(x, dtype=np.float64), spw, fs)
    d = pdist(states, "euclidean")
    value = float(np.median(d) if reduction == "median" else np.mean(d))
    return value / np.sqrt(states.shape[1]) if scale == "per_dimension" else value


def recording(n_time: int = 95, shape: tuple[int, ...] = (4, 3), seed: int = 0, chunks: int | None = 17
              ) -> xr.DataArray:
    """A (time, unit, probe) recording sampled at RATE, with a time coordinate in seconds."""
    x = np.random.default_rng(seed).normal(size=(n_time, *shape)) + 2.0
    dims = ("time", "unit", "probe")[: 1 + len(shape)]
    out = xr.DataArray(x, dims=dims, coords={"time": np.arange(n_time) / RATE, "unit": np.arange(shape[0])},
                       name="rec")
    return out.chunk({"time": chunks}) if chunks else out


# --------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("window", [1.0, 0.7])  # 10 samples (even: a Nyquist bin) and 7 (odd)
def test_states_are_scipy_periodograms_unscaled(window):
    rec = recording()
    spw = int(round(window * RATE))
    states = spectral_states(rec, RATE, window)
    assert states.dims == ("state", "unit", "probe", "frequency")
    n_windows = 95 // spw
    assert states.attrs["dropped_samples"] == 95 - n_windows * spw
    values = states.values
    for w in range(n_windows):
        f, p = unscaled_periodogram(rec.values[w * spw:(w + 1) * spw].transpose(1, 2, 0), RATE)
        np.testing.assert_allclose(values[w], p, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(states["frequency"].values, f)
    np.testing.assert_allclose(states["state_start"].values, np.arange(n_windows) * spw / RATE)
    np.testing.assert_array_equal(states["unit"].values, rec["unit"].values)


def test_sample_rate_inferred_from_the_time_coordinate():
    rec = recording(chunks=None)
    seconds = spectral_states(rec, None, 1.0)
    as_datetimes = rec.assign_coords(time=np.datetime64("2024-01-01") + (rec["time"].values * 1e9).astype(
        "timedelta64[ns]"))
    assert seconds.attrs["sample_rate"] == pytest.approx(RATE)
    np.testing.assert_array_equal(spectral_states(as_datetimes, None, 1.0).values, seconds.values)
    assert float(spectral_differentiation(rec, None, 1.0)) == float(spectral_differentiation(rec, RATE, 1.0))


def test_taper_follows_the_reference_spectrogram_path():
    """Their sensitivity analysis: scipy.signal.spectrogram with a taper, rescaled by scale_spectra."""
    rec = recording(n_time=80, shape=(5,), chunks=None)
    spw, taper = 10, ("tukey", 0.25)
    w = scipy.signal.get_window(taper, spw)
    f, _, s = scipy.signal.spectrogram(rec.values.T, fs=RATE, window=w, nperseg=spw, noverlap=0, detrend=False,
                                       return_onesided=True, scaling="spectrum", mode="psd", axis=-1)
    s = np.moveaxis(s, -1, 0) * w.sum() ** 2  # (window, unit, frequency), then scale_spectra
    s[..., 1:-1] /= 2
    states = spectral_states(rec, RATE, 1.0, taper=taper)
    np.testing.assert_allclose(states.values, s, rtol=1e-10, atol=1e-12)
    expected = float(np.median(pdist(s.reshape(s.shape[0], -1))))
    assert float(spectral_differentiation(rec, RATE, 1.0, taper=taper)) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- the measure on a recording
@pytest.mark.parametrize(("reduction", "scale"), [("median", "paper"), ("mean", "paper"),
                                                  ("median", "per_dimension")])
@pytest.mark.parametrize("window", [1.0, 0.5])
def test_recording_equals_median_pdist_of_periodogram_states(window, reduction, scale):
    rec = recording()  # 95 samples: a trailing partial window at both windows
    out = spectral_differentiation(rec, RATE, window, reduction=reduction, scale=scale)
    assert out.dims == ()
    spw = int(round(window * RATE))
    expected = reference_value(rec.values[: (95 // spw) * spw], spw, RATE, reduction, scale)
    assert float(out) == pytest.approx(expected, rel=1e-12)
    assert out.attrs["n_states"] == 95 // spw and out.attrs["dropped_samples"] == 95 % spw
    assert int(out["n_dims"]) == 12 * (spw // 2 + 1)


def test_unit_blocks_sum_to_one_pdist():
    """The distance task works through units in blocks: the squared distances add up to pdist's."""
    from cnndiff_xr.analysis.spectral import state_distances, window_power

    x = np.random.default_rng(3).normal(size=(60, 50))
    states = window_power(x, 6).transpose(0, 2, 1).reshape(10, -1)
    np.testing.assert_allclose(state_distances(x, 6, block_bytes=1), pdist(states), rtol=1e-13)
    np.testing.assert_allclose(state_distances(x, 6), pdist(states), rtol=1e-14)  # one block: sum order


def test_varied_windows_differ_more_than_a_steady_sinusoid():
    """Sinusoids in noise: the same frequency in every window vs a frequency that changes from window to window."""
    rng = np.random.default_rng(7)
    n_windows, spw, units = 12, 20, 6
    t = np.arange(spw) / RATE
    steady = np.concatenate([np.sin(2 * np.pi * 2.0 * t)[:, None] * np.ones(units) for _ in range(n_windows)])
    varied = np.concatenate([np.sin(2 * np.pi * f * t)[:, None] * np.ones(units)
                             for f in rng.choice([0.5, 1.5, 2.5, 3.5, 4.5], n_windows)])
    noise = 0.3 * rng.normal(size=steady.shape)
    values = {}
    for name, signal in {"steady": steady, "varied": varied}.items():
        rec = xr.DataArray(signal + noise, dims=("time", "unit"))
        values[name] = float(spectral_differentiation(rec, RATE, spw / RATE))
        assert values[name] == pytest.approx(reference_value(signal + noise, spw, RATE), rel=1e-12)
    assert values["varied"] > 3 * values["steady"]  # 4.9x here


def test_composition_with_differentiation_is_the_per_dimension_value():
    """differentiation(spectral_states(x), norm="none", every unit) = the per-dimension value, to 1e-5."""
    rec = recording()
    states = spectral_states(rec, RATE, 1.0)
    composed = cx.differentiation(states, n_units=10**9, unit_type="all", norm="none", resamples=1,
                                  sample_dim="state")
    ours = spectral_differentiation(rec, RATE, 1.0, scale="per_dimension")
    assert float(composed.squeeze()) == pytest.approx(float(ours), rel=1e-5)


def test_a_dataset_is_one_layer_per_variable():
    rec = recording()
    ds = xr.Dataset({"v1": rec, "lm": rec * 2 + 1})
    out = spectral_differentiation(ds, RATE, 1.0)
    assert out.dims == ("layer",) and list(out["layer"].values) == ["v1", "lm"]
    for name in ("v1", "lm"):
        expected = reference_value(ds[name].values[:90], 10, RATE)
        assert float(out.sel(layer=name)) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- a store's movie set
MOVIE = {"photos": 6, "movie": 40, "noise": 5}  # the movie's 40 frames: 8 windows of 5 at 0.5 s


def movie_tree(dtype: str = "float32") -> xr.DataTree:
    return make_tree(MOVIE, shuffle=False, dtype=dtype, chunk=6)[0]  # chunks straddle the sets


def movie_frames(tree: xr.DataTree, layer: str, units: np.ndarray) -> np.ndarray:
    act = tree[layer]["activation"]
    values = np.asarray(act.values).reshape(act.shape[0], -1).astype(np.float64)
    return values[np.asarray(act["set"].values).astype(str) == "movie"][:, units]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_movie_set_per_layer_equals_numpy_on_the_drawn_units(dtype):
    tree = movie_tree(dtype)
    out = spectral_differentiation(tree, RATE, 0.5, n_units=[5, 30], resamples=3, sets="movie")
    assert out.dims == ("layer", "n_units", "resample")
    values = out.compute()
    for layer in out["layer"].values:
        for n in (5, 30):
            for r in range(3):
                units = unit_indices(tree, str(layer), n, resample=r)
                expected = reference_value(movie_frames(tree, str(layer), units), 5, RATE)
                assert float(values.sel(layer=layer, n_units=n, resample=r)) == pytest.approx(expected, rel=1e-12)
    size = {"input_layer": 108, "block1_conv1": 200, "block1_pool": 32, "predictions": 10}
    np.testing.assert_array_equal(values["n_units_used"].sel(n_units=30).values,
                                  [min(30, size[str(layer)]) for layer in out["layer"].values])


def test_movie_every_unit_and_top_units():
    tree = movie_tree()
    every = spectral_differentiation(tree, RATE, 0.5, sets="movie", layers=["block1_pool", "predictions"])
    assert every.dims == ("layer",)
    for layer in ("block1_pool", "predictions"):
        x = movie_frames(tree, layer, np.arange(int(every["layer_size"].sel(layer=layer))))
        assert float(every.sel(layer=layer)) == pytest.approx(reference_value(x, 5, RATE), rel=1e-12)
    top = spectral_differentiation(tree, RATE, 0.5, n_units=7, unit_type="top", resamples=2, sets="movie",
                                   layers="block1_conv1")
    units = unit_indices(tree, "block1_conv1", 7, unit_type="top", sets=["movie"])  # 40 frames: all analysed
    expected = reference_value(movie_frames(tree, "block1_conv1", units), 5, RATE)
    np.testing.assert_allclose(top.values, expected, rtol=1e-12)


def test_reduced_store_gives_the_full_stores_numbers():
    full = movie_tree()
    reduced = reduce_tree(full, UnitDraws(n_units=[5, 30], resamples=3, seed=0), filter_means=False)
    kwargs = dict(n_units=[5, 30], resamples=3, sets="movie")
    np.testing.assert_array_equal(spectral_differentiation(reduced, RATE, 0.5, **kwargs).values,
                                  spectral_differentiation(full, RATE, 0.5, **kwargs).values)
    with pytest.raises(ParameterValueError, match="n_units=None.*reduced"):
        spectral_differentiation(reduced, RATE, 0.5, sets="movie")
    with pytest.raises(ParameterValueError, match="does not hold"):
        spectral_differentiation(reduced, RATE, 0.5, n_units=[5, 30], resamples=3, seed=1, sets="movie")


# --------------------------------------------------------------------------- laziness, schedulers, keys
def test_nothing_is_computed_until_asked():
    tree = movie_tree()
    rec = recording()
    with raise_if_dask_computes():
        a = spectral_differentiation(tree, RATE, 0.5, n_units=[5, 30], resamples=2, sets="movie")
        b = spectral_differentiation(tree, RATE, 0.5, n_units=7, unit_type="top", sets="movie")
        c = spectral_differentiation(rec, RATE, 1.0)
        d = spectral_states(rec, RATE, 1.0)
    for result in (a, b, c, d):
        assert isinstance(result.data, da.Array)


def test_local_cluster_equals_synchronous(local_client):
    tree = movie_tree()
    out = spectral_differentiation(tree, RATE, 0.5, n_units=[5, 30], resamples=2, sets="movie")
    with dask.config.set(scheduler="synchronous"):
        expected = out.compute()
    got = local_client.compute(out, sync=True)
    np.testing.assert_array_equal(got.values, expected.values)


def _names(obj: xr.DataArray) -> set:
    return {k[0] if isinstance(k, tuple) else k for k in dask.core.flatten(obj.data.__dask_keys__())}


def test_graph_keys_follow_every_parameter():
    tree = movie_tree()
    base = dict(n_units=[5, 30], resamples=2, sets="movie")
    first = spectral_differentiation(tree, RATE, 0.5, **base)
    again = spectral_differentiation(movie_tree(), RATE, 0.5, **base)
    assert _names(first) == _names(again)
    assert set(dict(first.data.__dask_graph__())) == set(dict(again.data.__dask_graph__()))
    variants = {
        "sample_rate": spectral_differentiation(tree, 2 * RATE, 0.25, **base),
        "window": spectral_differentiation(tree, RATE, 1.0, **base),
        "n_units": spectral_differentiation(tree, RATE, 0.5, **{**base, "n_units": [5, 31]}),
        "resamples": spectral_differentiation(tree, RATE, 0.5, **{**base, "resamples": 3}),
        "seed": spectral_differentiation(tree, RATE, 0.5, seed=1, **base),
        "unit_type": spectral_differentiation(tree, RATE, 0.5, unit_type="per_filter", **base),
        "taper": spectral_differentiation(tree, RATE, 0.5, taper="hann", **base),
        "reduction": spectral_differentiation(tree, RATE, 0.5, reduction="mean", **base),
        "scale": spectral_differentiation(tree, RATE, 0.5, scale="per_dimension", **base),
        "layers": spectral_differentiation(tree, RATE, 0.5, layers=["predictions"], **base),
        "data": spectral_differentiation(make_tree(MOVIE, shuffle=False, chunk=6, seed=1)[0], RATE, 0.5, **base),
    }
    for name, other in variants.items():
        assert not _names(other) & _names(first), name
    # computed together (the chunk reads shared), each keeps its own numbers
    some = [first, variants["window"], variants["seed"], variants["taper"], variants["scale"]]
    together = dask.compute(*some)
    for a, b in zip(together, some, strict=True):
        np.testing.assert_array_equal(a.values, b.compute().values)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(window=0.15), ParameterValueError, "whole number of samples"),
    (dict(window=0.1), ParameterValueError, "at least 2 samples"),
    (dict(window=5.0), ParameterValueError, "at least 2 windows"),
    (dict(window=0.0), ParameterValueError, "window must be a positive number"),
    (dict(window="1"), ParameterTypeError, "window must be a positive number"),
    (dict(sample_rate=-3.0), ParameterValueError, "sample_rate must be a positive number"),
    (dict(sample_rate=True), ParameterTypeError, "sample_rate"),
    (dict(taper="no-such-window"), ParameterValueError, "taper must be None"),
    (dict(scale="total"), ParameterValueError, "scale"),
    (dict(reduction="max"), ParameterValueError, "reduction"),
    (dict(unit_type="best"), ParameterValueError, "unit_type"),
    (dict(n_units=0), ParameterError, "n_units"),
    (dict(time_dim="t"), ParameterValueError, "'t'"),
])
def test_recording_parameters_are_refused_by_name(kwargs, error, match):
    kwargs = {"sample_rate": RATE, "window": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        spectral_differentiation(recording(), **kwargs)


def test_store_refusals():
    tree = movie_tree()
    with pytest.raises(ParameterValueError, match="pass sample_rate="):
        spectral_differentiation(tree, None, 0.5, sets="movie")
    with pytest.raises(ParameterValueError, match="pass sets=.*3 sets"):
        spectral_differentiation(tree, RATE, 0.5)
    with pytest.raises(ParameterTypeError, match="one set"):
        spectral_differentiation(tree, RATE, 0.5, sets=["movie", "photos"])
    with pytest.raises(KeyError, match="unknown set"):
        spectral_differentiation(tree, RATE, 0.5, sets="film")
    with pytest.raises(ParameterValueError, match="set 'photos' has 6 samples, 1 whole window"):
        spectral_differentiation(tree, RATE, 0.5, sets="photos")


def test_uneven_time_refused_and_non_finite_values_raise_when_computed():
    rec = recording(chunks=None)
    uneven = rec.assign_coords(time=np.sort(np.random.default_rng(0).uniform(0, 9, rec.sizes["time"])))
    with pytest.raises(ParameterValueError, match="not evenly spaced"):
        spectral_differentiation(uneven, None, 1.0)
    with pytest.raises(ParameterValueError, match="pass sample_rate="):
        spectral_states(rec.drop_vars("time"), None, 1.0)
    bad = rec.copy(data=rec.values.copy())
    bad[3, 0, 0] = np.nan
    result = spectral_differentiation(bad, RATE, 1.0)  # building is fine: nothing is read
    with pytest.raises(ValueError, match="non-finite values in 1 frame"):
        result.compute()


# --------------------------------------------------------------------------- figure
def test_figure_draws_a_line_per_n_units_with_the_computed_values():
    import matplotlib

    matplotlib.use("Agg")
    from cnndiff_xr.plot import spectral_differentiation_by_layer

    tree = movie_tree()
    sd = spectral_differentiation(tree, RATE, 0.5, n_units=[5, 30], resamples=3, sets="movie").compute()
    fig, ax = spectral_differentiation_by_layer(sd)
    lines = [line for line in ax.get_lines() if line.get_label().startswith("movie")]
    assert [line.get_label() for line in lines] == ["movie, 5 units", "movie, 30 units"]
    np.testing.assert_allclose(lines[1].get_ydata(), sd.sel(n_units=30).mean("resample").values)
    assert "'movie', 8 windows of 0.5 s at 10 Hz" in ax.get_title()
    with pytest.raises(ValueError, match="layer dimension"):
        spectral_differentiation_by_layer(spectral_differentiation(recording(), RATE, 1.0))
    matplotlib.pyplot.close(fig)
