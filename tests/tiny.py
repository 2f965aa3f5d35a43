"""The tiny functional CNN and image-writing helpers shared by tests (importable as ``tiny``)."""

from __future__ import annotations

import numpy as np
from PIL import Image

TINY_SIZE = 32
TINY_LAYERS = ["input_layer", "conv1", "pool1", "conv2", "dense", "predictions"]  # default: no Flatten


def tiny_preprocess():
    """A preprocessing function importable on workers (scales 0..255 to -1..1)."""
    from keras.applications.mobilenet_v2 import preprocess_input

    return preprocess_input


def build_tiny_model(seed: int = 0):
    """A small functional CNN at 32x32: conv -> pool -> conv -> flatten -> dense -> softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny")


def write_pngs(folder, n, seed=0, size=(24, 20)):
    """n RGB PNG files with random pixels; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
