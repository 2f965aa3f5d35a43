"""Every name of the store layout, in one place: the writer (``extraction/store.py``) and the readers
(``analysis/collection.py``, the CLI) spell the layout only through this module.

::

    /                 attrs: FORMAT_ATTR = FORMAT, LAYERS_ATTR (network order), STORE_ID_ATTR, provenance
                      coords IMAGE_DIM (unique str id), SET_COORD, SOURCE_COORD, PREDICTION_COORDS (ImageNet heads)
                      data   COMPLETED (image) bool -- set per batch, only after that batch's activations
    /<layer>          ACTIVATION (image, y, x, filter) or (image, filter); coords FILTER_DIM, Y_DIM, X_DIM,
                      LABEL_COORD (class labels of an ImageNet head) and, repeated because xarray inherits only
                      indexed coordinates, the image coordinates SET_COORD, SOURCE_COORD, PREDICTION_COORDS;
                      a float16 ACTIVATION carries FLOAT16_DECODING (see there) and no CF_FILL_VALUE attribute.
                      In a reduced store (root UNIT_DRAWS_ATTR) a layer larger than the biggest registered n_units
                      is ACTIVATION (image, UNIT_DIM) instead, with coords FLAT_INDEX, Y_DIM, X_DIM, FILTER_DIM
                      along UNIT_DIM and attrs LAYER_SHAPE_ATTR, LAYER_DIMS_ATTR
    /<layer>/MEANS_GROUP   (root FILTER_MEANS_ATTR true) FILTER_MEAN (image, filter), LAYER_MEAN, LAYER_CSS (image)

The module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

FORMAT = "cnndiff_xr/1"

# ---- root attributes
FORMAT_ATTR = "format"
LAYERS_ATTR = "layers"
STORE_ID_ATTR = "store_id"
SKIPPED_ATTR = "skipped_images"
#: the draws registered for a reduced store (``sampling.UnitDraws.to_attrs()``); absent or null in a full store
UNIT_DRAWS_ATTR = "unit_draws"
#: set while new images are being appended (the old image count): a rerun that finds it redoes the append
APPENDING_ATTR = "appending_from"
#: whether every layer carries the spatial means computed at extraction (the MEANS_GROUP subgroup)
FILTER_MEANS_ATTR = "filter_means"

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
#: sha256 of every image's content (file bytes; array bytes for arrays and movie frames; generator and parameters for
#: noise): a rerun whose images changed under the same id is refused
SHA256_COORD = "sha256"

# ---- reduced layers: ACTIVATION (IMAGE_DIM, UNIT_DIM), one column per kept unit
UNIT_DIM = "unit"
#: C-order position of each kept unit in the layer's full (y, x, filter) or (filter,) output, sorted ascending
FLAT_INDEX = "flat_index"
#: activation attributes of a reduced layer: the full per-image shape and its dimension names
LAYER_SHAPE_ATTR = "layer_shape"
LAYER_DIMS_ATTR = "layer_dims"

# ---- spatial means computed at extraction: the subgroup /<layer>/MEANS_GROUP
MEANS_GROUP = "filter_means"
FILTER_MEAN = "filter_mean"  # (IMAGE_DIM, FILTER_DIM) float32: mean over (y, x) of every filter
LAYER_MEAN = "layer_mean"  # (IMAGE_DIM,) float64: mean over all units of the layer
LAYER_CSS = "layer_css"  # (IMAGE_DIM,) float64: centred sum of squares over all units of the layer

# ---- variables
ACTIVATION = "activation"
COMPLETED = "completed"

# ---- CF attributes of the activations, as plain xarray reads them
CF_SCALE_FACTOR = "scale_factor"
CF_ADD_OFFSET = "add_offset"
CF_FILL_VALUE = "_FillValue"
#: The attributes of a float16 activation that make plain ``xr.open_datatree(store, engine="zarr")`` decode it to
#: float32 (half precision is for storage: xarray's and dask's sums accumulate in the array's dtype, and a float16 sum
#: of a layer overflows), with values unchanged: xarray's CF scale decoder runs when a ``scale_factor`` attribute is
#: present and, when its value is null (and no ``_FillValue`` attribute is present), casts float16 to float32 and
#: scales by nothing. A numeric scale factor would decode to float64 (JSON numbers read back as Python floats), a
#: ``_FillValue`` attribute would keep float16. cnndiff_xr's own reader reads the stored float16 undecoded.
FLOAT16_DECODING: Mapping[str, None] = MappingProxyType({CF_SCALE_FACTOR: None})

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


def means_path(layer: str, name: str = "") -> str:
    """The Zarr path of a layer's means subgroup, or of array ``name`` in it."""
    return f"{layer}/{MEANS_GROUP}" + (f"/{name}" if name else "")
