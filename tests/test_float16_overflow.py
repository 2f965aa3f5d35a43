"""Issue 17 point 6: a float16 store's values beyond float16's range are found at extraction, per batch and layer.

The run stops naming the layer and the images, before anything of the overflowing batch is written; the batches
already written keep their data and completion record. Values the model itself made inf are not overflow.
"""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import zarr
from tiny import tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr import cli
from cnndiff_xr.extraction import lock, store
from cnndiff_xr.extraction.run import (
    FLOAT16_OVERFLOW,
    ExtractionError,
    Float16OverflowError,
    _exponent_all_ones,
)

SIZE = 16
BRIGHT = 5  # the one image whose "scaled" values overflow float16 (batch 2 of 4, with batch_size=2)


def _bright_model():
    """``bright`` is relu(mean RGB - 0.9) of the preprocessed pixels (-1..1): 0 for an image darker than ~242 in
    every channel, 0.1 for a white one; ``scaled`` multiplies it by 1e6 (1e5: finite in float32, inf in float16);
    ``huge`` is its exponential (1 for a dark image; exp(1e5) for a white one: inf in float32 already, the model's
    own)."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    bright = keras.layers.Conv2D(1, 1, activation="relu", name="bright",
                                 kernel_initializer=keras.initializers.Constant(1 / 3),
                                 bias_initializer=keras.initializers.Constant(-0.9))(inputs)
    scaled = keras.layers.Rescaling(1e6, name="scaled")(bright)
    huge = keras.layers.Activation("exponential", name="huge")(scaled)
    return keras.Model(inputs, huge, name="bright")


@pytest.fixture(scope="module")
def bright_model():
    return _bright_model()


@pytest.fixture(scope="module")
def pixels():
    """8 images; all dark (at most 200) except image BRIGHT, white."""
    out = np.random.default_rng(0).integers(0, 201, (8, SIZE, SIZE, 3), dtype=np.uint8)
    out[BRIGHT] = 255
    return out


def _wait_idle(client, timeout: float = 30.0) -> None:
    """Wait until no task runs on the cluster (a batch running when the run stopped finishes on its own)."""
    deadline = time.monotonic() + timeout
    while any(client.processing().values()):
        assert time.monotonic() < deadline, client.processing()
        time.sleep(0.05)


def test_overflow_stops_the_run_naming_layer_and_images(tmp_path, local_client, bright_model, pixels):
    path = str(tmp_path / "f16.zarr")
    with pytest.raises(Float16OverflowError) as info:
        cx.extract({"a": pixels}, store=path, model=bright_model, preprocess=tiny_preprocess(), dtype="float16",
                   client=local_client, batch_size=2, progress=False)
    err = info.value
    message = str(err)
    assert isinstance(err, ExtractionError)
    # the layer that overflowed, not "huge" (inf in the model itself), and only the bright image
    assert err.layer == "scaled" and err.other_layers == []
    assert err.images == [f"a/{BRIGHT:06d} (array:array[{BRIGHT}])"]
    assert err.largest == pytest.approx(1e5, rel=1e-5)
    assert "layer 'scaled'" in message and f"a/{BRIGHT:06d}" in message and "a/000004" not in message
    assert "1e+05" in message and "65504" in message
    assert "dtype='float32' (--dtype float32)" in message and "new store" in message
    assert "batches failed" not in message  # its own message, not buried in a failure count
    assert "\n" not in message
    assert lock.read_lock(path) is None  # the writer lock is released

    _wait_idle(local_client)
    done = store.completed(path)
    assert done[:4].all() and not done[4:6].any()  # batches 0 and 1 complete, the overflowing batch 2 not
    # nothing of the overflowing batch was written: no chunk of any layer for batch 2 (chunk files c/<batch>/0/0/0)
    layers = ("input_layer", "bright", "scaled", "huge")
    assert zarr.open_group(path, mode="r")["scaled/activation"].chunks[0] == 2
    for layer in layers:
        chunks = {p.parts[-4] for p in (tmp_path / "f16.zarr" / layer / "activation" / "c").glob("*/0/0/0")}
        assert {"0", "1"} <= chunks and "2" not in chunks, (layer, sorted(chunks))
    # the batches already written keep their data: the dark images' "scaled" values are 0
    written = cx.open_activations(path)["scaled"]["activation"].isel(image=slice(0, 4)).values
    assert written.dtype == np.float16 and written.shape == (4, SIZE, SIZE, 1) and not written.any()


def test_the_same_extraction_in_float32_succeeds_with_finite_values(tmp_path, local_client, bright_model, pixels):
    path = str(tmp_path / "f32.zarr")
    tree = cx.extract({"a": pixels}, store=path, model=bright_model, preprocess=tiny_preprocess(), dtype="float32",
                      layers=["input_layer", "bright", "scaled"], client=local_client, batch_size=2, progress=False)
    values = tree["scaled"]["activation"].values
    assert np.isfinite(values).all() and bool(tree["completed"].all())
    assert values[BRIGHT].min() >= FLOAT16_OVERFLOW and values[BRIGHT].max() == pytest.approx(1e5, rel=1e-5)
    assert np.all(np.delete(values, BRIGHT, axis=0) == 0)


def test_inf_made_by_the_model_is_not_overflow(tmp_path, local_client, bright_model, pixels):
    """"huge" is inf in the model's float32 output: a float16 store holds it as a float32 store would (the analysis
    refuses non-finite values), and the run completes."""
    tree = cx.extract({"a": pixels}, store=str(tmp_path / "inf.zarr"), model=bright_model,
                      preprocess=tiny_preprocess(), dtype="float16", layers=["bright", "huge"], client=local_client,
                      batch_size=2, progress=False)
    huge = tree["huge"]["activation"].values
    assert bool(tree["completed"].all())
    assert np.isposinf(huge[BRIGHT]).all() and np.all(np.delete(huge, BRIGHT, axis=0) == 1)


def test_message_names_a_handful_of_images_and_survives_pickling():
    """The error travels from a worker to the client by pickle, with its fields."""
    names = [f"s/{i:06d} (array:array[{i}])" for i in range(8)]
    err = Float16OverflowError("acts.zarr", "block5_conv3", names, 3.2e6, other_layers=["fc1"])
    message = str(err)
    assert "s/000004" in message and "s/000005" not in message and "and 3 more" in message
    assert "8 image(s)" in message and "(and in layer(s) 'fc1')" in message and "3.2e+06" in message
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is Float16OverflowError and str(copy) == message
    assert (copy.store, copy.layer, copy.images, copy.largest, copy.other_layers) == (
        "acts.zarr", "block5_conv3", names, 3.2e6, ["fc1"])


@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
def test_exponent_check_finds_inf_and_nan_anywhere(special):
    values = np.full(3 * (1 << 16) + 5, np.float16(65504))  # float16's largest finite value: not flagged
    values[1::7] *= -1
    assert not _exponent_all_ones(values)
    for position in (0, (1 << 16) - 1, 1 << 16, values.size - 1):  # block edges and the short last block
        flagged = values.copy()
        flagged[position] = special
        assert _exponent_all_ones(flagged.reshape(-1, 1)), position


@pytest.fixture(scope="module")
def overflowing_weights(tmp_path_factory):
    """A MobileNetV2 weights file (random weights) whose first convolution is 1e6 times larger."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None)
    conv = model.get_layer("Conv1")
    conv.set_weights([w * 1e6 for w in conv.get_weights()])
    path = tmp_path_factory.mktemp("weights") / "conv1_x1e6.weights.h5"
    model.save_weights(str(path))
    return str(path)


def test_cli_prints_one_paragraph_and_exits_non_zero(tmp_path, local_client, overflowing_weights, capsys):
    path = tmp_path / "cli.zarr"
    code = cli.main(["extract", str(path), "--set", "a=noise:2", "--model", "mobilenet_v2", "--weights",
                     overflowing_weights, "--layers", "input_layer,Conv1", "--dtype", "float16", "--quiet",
                     "--scheduler", local_client.scheduler.address])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("cnndiff extract: error: Float16OverflowError: layer 'Conv1' has values beyond "
                                "float16's range"), err[-3000:]
    assert "a/noise_000000" in lines[-1] and "--dtype float32" in lines[-1]
    assert lock.read_lock(str(path)) is None
