"""A user's own Keras model on worker processes, model files in safe mode, and workers that check their weights.

Issue 17, point 9: ``cx.extract(..., model=my_keras_model)`` runs the user's own object on process workers, ``Lambda``
layers and custom layer classes included, while a ``.keras`` file named by path is still loaded in Keras' safe mode.
Point 5: a worker that builds other weights than the client refuses, naming both digests and its address.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os

import keras
import numpy as np
import pytest
import zarr
from tiny import TINY_LAYERS, TINY_SIZE, build_tiny_model, tiny_preprocess

import cnndiff_xr as cx
from cnndiff_xr.extraction import config as config_module
from cnndiff_xr.extraction import images
from cnndiff_xr.extraction.backends import keras as models
from cnndiff_xr.extraction.cluster import WeightsMismatchError
from cnndiff_xr.validation import ParameterValueError

SIZE = 16


class Offset(keras.layers.Layer):
    """A custom layer class of this test module (not registered with Keras): a learned offset per filter."""

    def build(self, input_shape):
        self.offset = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="offset")

    def call(self, x):
        return x + self.offset


def _user_model():
    """A functional model with what Keras' own files cannot carry to another process: a Lambda naming a global
    (``keras``), a custom class of this module, and one defined in a function body (as a class of a user's main
    script, it can only travel by value)."""

    class Gain(keras.layers.Layer):
        def __init__(self, gain=1.0, **kwargs):
            super().__init__(**kwargs)
            self.gain = gain

        def call(self, x):
            return x * self.gain

        def get_config(self):
            return {**super().get_config(), "gain": self.gain}

    keras.utils.set_random_seed(7)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(x)
    x = keras.layers.Lambda(lambda t: keras.ops.relu(t), name="relu")(x)
    x = Offset(name="offset")(x)
    outputs = Gain(0.5, name="gain")(x)
    return keras.Model(inputs, outputs, name="user_model")


def _expected(model, sets, size):
    """Every layer's output for the preprocessed images, computed here by the model object itself."""
    table = images.image_table(sets)
    x = tiny_preprocess()(images.load_batch(table.refs, (size, size), "nearest").astype("float32"))
    names = [layer.name for layer in model.layers[1:]]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    outs = dict(zip(names, (np.asarray(o) for o in probe(x, training=False)), strict=True))
    return {"input_layer": x, **outs}


def test_users_model_with_lambda_and_custom_classes_runs_on_worker_processes(tmp_path, local_client):
    """Before: refused by Keras' safe mode on the workers (and, with safe mode off, the relu lambda lost its global
    ``keras`` and the unregistered classes were not found)."""
    model = _user_model()
    sets = {"noise": cx.images.white_noise(5, seed=2, size=(SIZE, SIZE))}
    expected = _expected(model, sets, SIZE)
    # the reference really goes through both lambdas and both custom layers
    conv = expected["conv"]
    np.testing.assert_allclose(expected["gain"], 0.5 * (np.maximum(conv * 2.0 + 1.0, 0)
                                                        + model.get_layer("offset").offset.numpy()), rtol=1e-6)
    tree = cx.extract(sets, store=str(tmp_path / "user.zarr"), model=model, preprocess=tiny_preprocess(),
                      client=local_client, batch_size=2, progress=False)
    assert tree.attrs["layers"] == ["input_layer", "conv", "affine", "relu", "offset", "gain"]
    assert tree.attrs["model"] == "custom:user_model" and tree.attrs["weights"] == "custom"
    assert tree.attrs["weights_sha256"] == models.weights_digest(model)
    for name, values in expected.items():
        np.testing.assert_allclose(tree[name]["activation"].values, values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_model_file_is_loaded_in_safe_mode(tmp_path, local_client):
    """A .keras file named by path: extracted like the model object, but a Lambda in it is refused before anything
    starts, saying how to run it knowingly."""
    tiny = build_tiny_model(seed=3)
    file = tmp_path / "tiny.keras"
    tiny.save(file)
    sets = {"noise": cx.images.white_noise(3, seed=1, size=(TINY_SIZE, TINY_SIZE))}
    tree = cx.extract(sets, store=str(tmp_path / "file.zarr"), model=str(file), preprocess=tiny_preprocess(),
                      client=local_client, batch_size=2, progress=False)
    assert tree.attrs["model"] == "custom:tiny" and tree.attrs["weights_sha256"] == models.weights_digest(tiny)
    expected = _expected(tiny, sets, TINY_SIZE)
    for name in TINY_LAYERS:
        np.testing.assert_allclose(tree[name]["activation"].values, expected[name], rtol=1e-5, atol=1e-6)

    _user_model().save(tmp_path / "lambda.keras")  # Keras writes the lambdas' bytecode into the file
    store = tmp_path / "refused.zarr"
    with pytest.raises(ParameterValueError) as info:
        cx.extract(sets, store=str(store), model=str(tmp_path / "lambda.keras"), preprocess=tiny_preprocess(),
                   client=local_client, progress=False)
    message = str(info.value)
    assert str(tmp_path / "lambda.keras") in message and "Lambda layer" in message and "safe mode" in message
    assert "safe_mode=False" in message and "pass that object" in message
    assert not store.exists()


@dataclasses.dataclass(frozen=True)
class DriftingSpec(models.KerasModelSpec):
    """The same model as its parent spec, but built in a worker process (a child of multiprocessing) its first
    weight is nudged: a worker that builds other weights than the client from the same spec."""

    @property
    def key(self) -> str:
        return "drift-" + super().key

    def build(self):
        model = super().build()
        if multiprocessing.parent_process() is not None:
            _nudge(model)
        return model


def _nudge(model):
    first = model.weights[0]
    first.assign(keras.ops.convert_to_numpy(first) + np.float32(1e-3))


def test_worker_with_other_weights_refuses_naming_both_digests_and_itself(tmp_path, local_client, monkeypatch):
    tiny = build_tiny_model(seed=4)
    real_model_spec = config_module.model_spec

    def drifting_spec(model, **kwargs):
        spec = real_model_spec(model, **kwargs)
        return DriftingSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})

    monkeypatch.setattr(config_module, "model_spec", drifting_spec)  # the spec the client makes for the run
    nudged = build_tiny_model(seed=4)
    _nudge(nudged)
    client_digest, worker_digest = models.weights_digest(tiny), models.weights_digest(nudged)
    assert client_digest != worker_digest
    store = str(tmp_path / "drift.zarr")
    sets = {"noise": cx.images.white_noise(4, seed=0, size=(TINY_SIZE, TINY_SIZE))}
    with pytest.raises(WeightsMismatchError) as info:
        cx.extract(sets, store=store, model=tiny, preprocess=tiny_preprocess(), client=local_client, batch_size=2,
                   progress=False)
    error = info.value
    assert (error.expected, error.built) == (client_digest, worker_digest)
    assert error.worker in local_client.scheduler_info()["workers"]
    assert client_digest in str(error) and worker_digest in str(error) and error.worker in str(error)
    root = zarr.open_group(store, mode="r")
    assert root.attrs["weights_sha256"] == client_digest  # the digest the workers were checked against
    assert not np.asarray(root["completed"][:]).any()  # no batch of the other weights was written
    assert os.path.isdir(store)
