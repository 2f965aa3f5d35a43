"""Models: the keras.applications registry, layer presets, weights handling, the input-layer name."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import cnndiff_xr as cx
from cnndiff_xr.extraction.backends import keras as models

SEED_VGG16_LAYERS = (
    ["input_layer"]
    + [f"block1_conv{i}" for i in (1, 2)] + ["block1_pool"]
    + [f"block2_conv{i}" for i in (1, 2)] + ["block2_pool"]
    + [f"block3_conv{i}" for i in (1, 2, 3)] + ["block3_pool"]
    + [f"block4_conv{i}" for i in (1, 2, 3)] + ["block4_pool"]
    + [f"block5_conv{i}" for i in (1, 2, 3)] + ["block5_pool"]
    + ["flatten", "predictions"]
)


def test_vgg16_seed_preset_store(tmp_path, local_client):
    """VGG16 (random weights) at 224x224 on a few images: the "seed" preset gives exactly the 21 layers."""
    import keras

    keras.Input((8, 8, 3))  # another input first: Keras would now call VGG16's input "input_layer_1"
    path = str(tmp_path / "vgg.zarr")
    tree = cx.extract({"noise": cx.images.white_noise(3, seed=0)}, store=path, model="vgg16", weights=None,
                      layers="seed", client=local_client, batch_size=2, progress=False)
    assert len(SEED_VGG16_LAYERS) == 21
    assert tree.attrs["layers"] == SEED_VGG16_LAYERS
    assert sorted(tree.children) == sorted(SEED_VGG16_LAYERS)
    assert tree["input_layer"]["activation"].shape == (3, 224, 224, 3)
    assert tree["block1_conv1"]["activation"].shape == (3, 224, 224, 64)
    assert tree["block3_pool"]["activation"].shape == (3, 28, 28, 256)
    assert tree["block5_conv3"]["activation"].shape == (3, 14, 14, 512)
    assert tree["flatten"]["activation"].dims == ("image", "filter")
    assert tree["flatten"]["activation"].shape == (3, 25088)
    assert tree["predictions"]["activation"].shape == (3, 1000)
    assert tree.attrs["weights"] == "random(seed=0)"
    # ImageNet head: top-1 class and probability recorded per image, in the root and in every layer group
    probs = tree["predictions"]["activation"].values
    np.testing.assert_array_equal(tree["predicted_class"].values, probs.argmax(axis=1))
    np.testing.assert_allclose(tree["block2_pool"]["activation"]["predicted_probability"].values,
                               probs.max(axis=1), rtol=1e-6)
    # VGG preprocessing: RGB -> BGR minus the ImageNet means
    rgb = cx.images.load_batch([r for _, _, r in cx.images.white_noise(3, seed=0).entries()], (224, 224))
    expected = rgb[..., ::-1].astype("float32") - np.array([103.939, 116.779, 123.68], dtype="float32")
    np.testing.assert_allclose(tree["input_layer"]["activation"].values, expected, rtol=1e-6)


def test_default_layers_leave_out_reshapes():
    import keras

    model = keras.applications.VGG16(weights=None)
    default = models.resolve_layers(model, None)
    assert "flatten" not in default and {"fc1", "fc2", "predictions", "input_layer"} <= set(default)
    assert len(default) == len(model.layers) - 1
    assert models.resolve_layers(model, "seed") == SEED_VGG16_LAYERS
    assert models.resolve_layers(model, ["predictions", "block1_conv1"]) == ["block1_conv1", "predictions"]
    with pytest.raises(ValueError, match="not layers of model"):
        models.resolve_layers(model, ["block9_conv1"])
    with pytest.raises(ValueError, match="preset"):
        models.resolve_layers(model, "everything")


def test_random_weights_are_seeded():
    # MobileNetV2 (3.5 M weights, random kernels and fixed batch-norm initialisers): the seeding and the digest do
    # not depend on the architecture, and three VGG16 builds plus Keras' own conversion cost the suite 20-50 s.
    # VGG16's seeded weights are checked across processes wherever a store is extracted with weights=None: every
    # worker's digest must equal the client's (test_vgg16_seed_preset_store, the README and demo tests).
    first = models.make_spec("mobilenet_v2", weights=None, seed=3).build()
    digest = models.weights_digest(first)
    assert models.weights_digest(models.make_spec("mobilenet_v2", weights=None, seed=3).build()) == digest
    assert models.weights_digest(models.make_spec("mobilenet_v2", weights=None, seed=4).build()) != digest
    # the digest stores record: sha256 over each weight's path, shape and dtype, then its bytes (a store made before
    # the digest was computed faster must still match its rerun)
    import keras

    plain = hashlib.sha256()
    for weight in first.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        plain.update(f"{weight.path}:{value.shape}:{value.dtype}".encode())
        plain.update(value.tobytes())
    assert digest == plain.hexdigest()


def test_imagenet_weights_unavailable_offline(tmp_path, monkeypatch):
    """No internet here: the error says where the cache is and names the alternatives."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    spec = models.make_spec("mobilenet_v2", weights="imagenet")
    with pytest.raises(models.WeightsUnavailableError) as info:
        spec.build()
    message = str(info.value)
    assert "weights=None" in message and "keras-home" in message and "weights='/path/to/weights.h5'" in message


def test_weights_file_round_trip(tmp_path):
    spec = models.make_spec("mobilenet_v2", weights=None, seed=1)
    model = spec.build()
    path = tmp_path / "mnv2.weights.h5"
    model.save_weights(str(path))
    from_file = models.make_spec("mobilenet_v2", weights=str(path)).build()
    assert models.weights_digest(from_file) == models.weights_digest(model)


@pytest.mark.parametrize("name", ["vgg19", "resnet50", "inception_v3", "mobilenet_v2"])
def test_named_models_build_with_their_preprocessing(name):
    extractor = models.LayerExtractor(models.make_spec(name, weights=None), layers=None)
    assert extractor.layers[0] == "input_layer"
    h, w = extractor.input_size
    rgb = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    module = __import__(f"keras.applications.{models.APPLICATIONS[name][0]}", fromlist=["preprocess_input"])
    np.testing.assert_allclose(extractor.preprocess(rgb), module.preprocess_input(rgb.astype("float32")), rtol=1e-6)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="not a known keras.applications model"):
        models.make_spec("alexnet")
    with pytest.raises(FileNotFoundError, match="weights file"):
        models.make_spec("vgg16", weights="/nonexistent/file.h5")
    with pytest.raises(TypeError, match="keras.applications name or a keras.Model"):
        models.make_spec(42)
    with pytest.raises(ValueError, match="preprocess"):
        import keras

        inputs = keras.Input((4, 4, 3))
        models.make_spec(keras.Model(inputs, keras.layers.Flatten()(inputs)))


def test_backends_are_discovered_and_chosen_by_the_model_argument():
    from cnndiff_xr.extraction import backends

    assert [f.name for f in backends.frameworks()] == ["keras"]
    assert "vgg16" in backends.model_names()
    spec = backends.model_spec("VGG16", weights=None, seed=2)
    assert isinstance(spec, models.KerasModelSpec) and (spec.name, spec.weights, spec.seed) == ("vgg16", None, 2)
    assert spec.key == models.make_spec("vgg16", weights=None, seed=2).key
    with pytest.raises(ValueError, match="model='alexnet' is not a known keras.applications model"):
        backends.model_spec("alexnet")
    with pytest.raises(TypeError, match="model must be a keras.applications name or a keras.Model, got int"):
        backends.model_spec(42)
