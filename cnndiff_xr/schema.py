"""Every name of the store layout, in one place: the writer (``extraction/store.py``) and the readers
(``analysis/collection.py``, the CLI) spell the layout only through this module.

::

    /                 attrs: FORMAT_ATTR = FORMAT, LAYERS_ATTR (network order), STORE_ID_ATTR, provenance
                      coords IMAGE_DIM (unique str id), SET_COORD, SOURCE_COORD, PREDICTION_COORDS (ImageNet heads)
                      data   COMPLETED (image) bool -- set per batch, only after that batch's activations
    /<layer>          ACTIVATION (image, y, x, filter) or (image, filter); coords FILTER_DIM, Y_DIM, X_DIM,
                      LABEL_COORD (class labels of an ImageNet head) and, repeated because xarray inherits only
                      indexed coordinates, the image coordinates SET_COORD, SOURCE_COORD, PREDICTION_COORDS

The module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Sequence

FORMAT = "cnndiff_xr/1"

# ---- root attributes
FORMAT_ATTR = "format"
LAYERS_ATTR = "layers"
STORE_ID_ATTR = "store_id"
SKIPPED_ATTR = "skipped_images"

# ---- dimensions and coordinates
IMAGE_DIM = "image"
Y_DIM = "y"
X_DIM = "x"
FILTER_DIM = "filter"
SET_COORD = "set"
SOURCE_COORD = "source"
LABEL_COORD = "label"
IMAGE_COORDS = (SET_COORD, SOURCE_COORD)
PREDICTED_CLASS = "predicted_class"
PREDICTED_LABEL = "predicted_label"
PREDICTED_PROBABILITY = "predicted_probability"
PREDICTION_COORDS = (PREDICTED_CLASS, PREDICTED_LABEL, PREDICTED_PROBABILITY)

# ---- variables
ACTIVATION = "activation"
COMPLETED = "completed"

#: The stable group name of the model input, whatever the framework called its input layer in this process
#: (Keras 3 auto-names inputs ``input_layer``, ``input_layer_1``, ... per process).
INPUT_LAYER = "input_layer"


def layer_dims(shape: Sequence[int]) -> tuple[str, ...]:
    """Dimension names of a layer's activation for a per-image ``shape`` (channels-last)."""
    if len(shape) == 3:
        return (IMAGE_DIM, Y_DIM, X_DIM, FILTER_DIM)
    if len(shape) == 1:
        return (IMAGE_DIM, FILTER_DIM)
    raise ValueError(f"cannot store a layer output of per-image shape {tuple(shape)}")


def activation_path(layer: str) -> str:
    """The Zarr path of a layer's activation array."""
    return f"{layer}/{ACTIVATION}"
