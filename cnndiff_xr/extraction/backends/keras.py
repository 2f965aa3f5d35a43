"""Keras models: the registry of ``keras.applications`` names, weights, layer presets and the layer extractor.

Keras/TensorFlow are imported inside functions only, so that ``import cnndiff_xr`` and the analysis side never pay
for them. A :class:`ModelSpec` is the small, picklable description of a model that travels to Dask workers; each
worker turns it into a :class:`LayerExtractor` once (see :mod:`cnndiff_xr.cluster`) — Keras models themselves are
never shipped through Dask's serializer (distributed's Keras serializer is broken on Keras 3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The stable group name of the model input, whatever Keras called the input layer in this process
#: (Keras 3 auto-names inputs ``input_layer``, ``input_layer_1``, ... per process).
INPUT_LAYER = "input_layer"

#: name -> (module under keras.applications, constructor)
APPLICATIONS: dict[str, tuple[str, str]] = {
    "vgg16": ("vgg16", "VGG16"),
    "vgg19": ("vgg19", "VGG19"),
    "resnet50": ("resnet50", "ResNet50"),
    "resnet101": ("resnet", "ResNet101"),
    "inception_v3": ("inception_v3", "InceptionV3"),
    "mobilenet_v2": ("mobilenet_v2", "MobileNetV2"),
    "densenet121": ("densenet", "DenseNet121"),
    "xception": ("xception", "Xception"),
    "efficientnet_b0": ("efficientnet", "EfficientNetB0"),
}

LAYER_PRESETS = ("seed",)

# Layers whose output is only a re-arrangement of their input (or the identity at inference): left out of the
# default layer list because they duplicate another layer's numbers.
_PURE_RESHAPES = frozenset(
    {
        "Flatten", "Reshape", "Permute", "RepeatVector", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
        "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization",
    }
)
# The seed's VGG16 list: the input, every convolution, every pooling, flatten and the prediction layer
# (fc1 and fc2 were left out). Applied to any model as "input + Conv2D + pooling + Flatten + last layer".
_SEED_LAYER_TYPES = frozenset({"InputLayer", "Conv2D", "MaxPooling2D", "AveragePooling2D", "Flatten"})


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither in the Keras cache nor downloadable (e.g. an offline machine)."""


def _keras():
    import keras

    return keras


def _sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(model) -> str:
    """sha256 over every weight array of ``model`` (shape, dtype and bytes): the identity of the weights a store was
    made with, whatever file or seed they came from."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(_keras().ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded files (``$KERAS_HOME/models`` or ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _application(name: str):
    if name not in APPLICATIONS:
        raise ValueError(
            f"model={name!r} is not a known keras.applications model; choose one of {sorted(APPLICATIONS)} "
            "or pass a keras.Model (with preprocess=...)"
        )
    module_name, constructor = APPLICATIONS[name]
    module = importlib.import_module(f"keras.applications.{module_name}")
    return module, getattr(module, constructor)


def preprocess_name(name: str) -> str:
    return f"keras.applications.{APPLICATIONS[name][0]}.preprocess_input"


CLASS_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"


def load_imagenet_class_labels(download: bool = False) -> list[str] | None:
    """The 1000 ImageNet class labels (what ``decode_predictions`` uses) from the Keras cache; with ``download``,
    fetched into the cache first when missing. None when they cannot be had (offline): labels are then left empty."""
    import json

    index_file = keras_cache_dir() / "imagenet_class_index.json"
    if not index_file.is_file() and download:
        try:
            _keras().utils.get_file("imagenet_class_index.json", CLASS_INDEX_URL, cache_subdir="models")
        except Exception:
            return None
    if not index_file.is_file():
        return None
    with open(index_file) as fh:
        index = json.load(fh)
    return [index[str(i)][1] for i in range(len(index))]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild the same model: small and picklable.

    Either ``name`` (a keras.applications model) with ``weights`` ("imagenet", None = random, or a file path) and
    ``seed``, or ``model_bytes`` (a user's model saved in the ``.keras`` format) with ``preprocess``.
    """

    name: str | None = None
    weights: str | None = "imagenet"
    seed: int = 0
    model_bytes: bytes | None = None
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None
    label: str = ""

    @property
    def key(self) -> str:
        """A stable identifier (the plugin name on workers)."""
        digest = hashlib.sha256(repr((self.name, self.weights, self.seed)).encode())
        if self.model_bytes is not None:
            digest.update(self.model_bytes)
        if self.preprocess is not None:  # two runs of one model with different preprocessing are different plugins
            import cloudpickle

            digest.update(cloudpickle.dumps(self.preprocess))
        return digest.hexdigest()[:16]

    def build(self):
        """Build the Keras model described by this spec (in the calling process)."""
        keras = _keras()
        if self.model_bytes is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.keras")
                with open(path, "wb") as fh:
                    fh.write(self.model_bytes)
                return keras.models.load_model(path, compile=False)
        _, constructor = _application(self.name)
        if self.weights is None:
            # Keras initialisers draw from the global seed: the same seed builds the same weights in every process.
            # The caller's Python and numpy generators are put back afterwards (extract() must not reseed a session).
            import random

            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                keras.utils.set_random_seed(self.seed)
                return constructor(weights=None)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        if self.weights == "imagenet":
            try:
                return constructor(weights="imagenet")
            except Exception as err:  # keras raises a bare Exception on a failed download
                raise WeightsUnavailableError(
                    f"ImageNet weights for model={self.name!r} are not in the Keras cache ({keras_cache_dir()}) and "
                    f"could not be downloaded ({err}). Alternatives: weights=None (random weights, seeded by "
                    "seed=...), weights='/path/to/weights.h5' (a local file, e.g. the keras-applications release "
                    f"file copied from a machine with internet), or copy that file into {keras_cache_dir()}."
                ) from err
        if not os.path.isfile(self.weights):
            raise FileNotFoundError(
                f"weights={self.weights!r} is neither 'imagenet', None nor an existing weights file"
            )
        return constructor(weights=self.weights)

    def preprocess_function(self) -> Callable[[np.ndarray], np.ndarray]:
        if self.preprocess is not None:
            return self.preprocess
        module, _ = _application(self.name)
        return module.preprocess_input


def make_spec(
    model: Any,
    weights: str | os.PathLike | None = "imagenet",
    seed: int = 0,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ModelSpec:
    """Validate the user's model arguments and turn them into a :class:`ModelSpec`.

    ``model`` is a keras.applications name (see :data:`APPLICATIONS`) or a ``keras.Model``; a ``keras.Model`` needs
    ``preprocess``, a function from a float32 batch of RGB pixels in 0..255 (B, H, W, 3) to the model's input.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(model, str):
        name = model.lower()
        _application(name)  # validates the name
        if preprocess is not None:
            raise ValueError("preprocess= is only for a keras.Model; named models use their own preprocess_input")
        if weights is not None and weights != "imagenet":
            weights = os.path.abspath(os.fspath(weights))
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"weights file {weights!r} does not exist (weights= takes 'imagenet', None "
                                        "for random weights, or a path to a weights file)")
        return ModelSpec(name=name, weights=weights, seed=int(seed))
    keras = _keras()
    if isinstance(model, keras.Model):
        if preprocess is None or not callable(preprocess):
            raise ValueError("a keras.Model needs preprocess=<function mapping RGB 0..255 float batches to its input>")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            model_bytes = Path(path).read_bytes()
        return ModelSpec(name=None, weights=None, seed=int(seed), model_bytes=model_bytes, preprocess=preprocess,
                         label=f"custom:{model.name}")
    raise TypeError(f"model must be a keras.applications name or a keras.Model, got {type(model).__name__}")


def _layer_kind(layer) -> str:
    return type(layer).__name__


def resolve_layers(model, layers: str | Sequence[str] | None) -> list[str]:
    """The store names of the layers to extract, in network order.

    ``None``: every layer output except pure reshapes and inference-time identities (Flatten, Reshape, Dropout...).
    ``"seed"``: the seed notebook's list (for VGG16 its 21 layers: the input, 13 convolutions, 5 poolings, flatten,
    predictions). A list of names: those layers (the input may be called ``"input_layer"``).
    """
    model_layers = list(model.layers)
    input_name = model_layers[0].name if _layer_kind(model_layers[0]) == "InputLayer" else None
    store_names = [INPUT_LAYER if layer.name == input_name else layer.name for layer in model_layers]
    if layers is None:
        chosen = [n for n, layer in zip(store_names, model_layers) if _layer_kind(layer) not in _PURE_RESHAPES]
    elif isinstance(layers, str):
        if layers != "seed":
            raise ValueError(f"layers={layers!r}: a preset must be one of {LAYER_PRESETS}; or pass a list of names")
        chosen = [
            n for i, (n, layer) in enumerate(zip(store_names, model_layers))
            if _layer_kind(layer) in _SEED_LAYER_TYPES or i == len(model_layers) - 1
        ]
    else:
        requested = [str(n) for n in layers]
        if not requested:
            raise ValueError("layers=[] selects nothing; pass None for the default list")
        aliases = {input_name: INPUT_LAYER} if input_name else {}
        requested = [aliases.get(n, n) for n in requested]
        duplicates = sorted({n for n in requested if requested.count(n) > 1})
        if duplicates:
            raise ValueError(f"layers lists {duplicates} more than once")
        unknown = [n for n in requested if n not in store_names]
        if unknown:
            raise ValueError(f"layers: {unknown} are not layers of model {model.name!r}; it has {store_names}")
        chosen = [n for n in store_names if n in set(requested)]  # network order
    for name in chosen:
        rank = len(model_layers[store_names.index(name)].output.shape)
        if rank not in (2, 4):
            raise ValueError(f"layer {name!r} has a rank-{rank} output; only (batch, y, x, filter) and "
                             "(batch, filter) layers can be stored")
    return chosen


class LayerExtractor:
    """A built model that maps a uint8 RGB batch to the activations of the chosen layers, in the store's dtype.

    The input layer's activation is the preprocessed batch itself; the other layers come from one call of a
    multi-output sub-model (``model(x, training=False)``, not ``.predict`` per batch: no per-call setup cost). For
    float16 stores the cast is part of that sub-model: TensorFlow's vectorised cast costs half of numpy's
    ``astype("float16")`` (measured in benchmarks/RESULTS.md), on ~60 MB per VGG16 image.
    """

    def __init__(self, spec: ModelSpec, layers: str | Sequence[str] | None, dtype: str = "float32"):
        self.spec = spec
        self.dtype = str(np.dtype(dtype))
        self.model = spec.build()
        if len(self.model.inputs) != 1:
            raise ValueError(f"model {self.model.name!r} has {len(self.model.inputs)} inputs; one is supported")
        self.layers = resolve_layers(self.model, layers)
        self._preprocess = spec.preprocess_function()
        keras = _keras()
        by_store_name = {
            (INPUT_LAYER if i == 0 and _layer_kind(layer) == "InputLayer" else layer.name): layer
            for i, layer in enumerate(self.model.layers)
        }
        self._computed = [n for n in self.layers if n != INPUT_LAYER]
        self.has_imagenet_head = tuple(self.model.output.shape[1:]) == (1000,) and spec.name is not None
        outputs = [by_store_name[n].output for n in self._computed]
        if self.dtype != "float32":
            outputs = [keras.ops.cast(o, self.dtype) for o in outputs]
        if self.has_imagenet_head:
            outputs.append(self.model.output)  # float32 probabilities, recorded even when that layer is not stored
        self._submodel = keras.Model(self.model.input, outputs) if outputs else None
        self.shapes = {n: tuple(int(d) for d in by_store_name[n].output.shape[1:]) for n in self.layers}
        height, width = self.model.input.shape[1:3]
        if height is None or width is None:
            raise ValueError(f"model {self.model.name!r} has no fixed input size; build it with input_shape=...")
        self.input_size = (int(height), int(width))

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        # a fresh float32 copy: keras' preprocess_input works in place on float arrays
        return np.asarray(self._preprocess(rgb.astype("float32")), dtype="float32")

    def run(self, rgb: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Activations per store layer name (in this extractor's dtype) and the model's output probabilities
        (float32, or None without an ImageNet head)."""
        keras = _keras()
        x = self.preprocess(rgb)
        outs = self._submodel(x, training=False) if self._submodel is not None else []
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        outs = [_as_numpy(o, keras) for o in outs]
        probabilities = outs.pop() if self.has_imagenet_head else None
        acts = dict(zip(self._computed, outs))
        if INPUT_LAYER in self.layers:
            acts[INPUT_LAYER] = x.astype(self.dtype, copy=False)
        return {n: acts[n] for n in self.layers}, probabilities


def _as_numpy(tensor: Any, keras: Any) -> np.ndarray:
    """A backend tensor as numpy without a copy where the backend allows it: ``np.asarray`` views a CPU
    TensorFlow/JAX/PyTorch tensor's buffer, while ``keras.ops.convert_to_numpy`` copies it (~10 ms per 50 MB,
    some 60 MB per VGG16 image)."""
    try:
        return np.asarray(tensor)
    except Exception:
        return np.asarray(keras.ops.convert_to_numpy(tensor))


def set_tf_threads(intra_op: int = 1, inter_op: int = 1) -> None:
    """Limit TensorFlow's thread pools (must run before TF executes anything in this process)."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(intra_op))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(inter_op))
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except (ImportError, RuntimeError):  # another backend, or TF already initialised: the env vars still apply
        pass


def auto_weights(name: str) -> tuple[str | None, str | None]:
    """``weights="auto"``: ImageNet weights when the Keras cache has them or they can be downloaded, else random.

    Returns ``(weights, warning)``: ``("imagenet", None)``, or ``(None, message)`` saying why random weights are used.
    """
    try:
        make_spec(name, weights="imagenet").build()
    except WeightsUnavailableError as err:
        return None, (f"ImageNet weights for {name} are unavailable ({err.__cause__}); using RANDOM weights. The "
                      "numbers below are those of an untrained network, not the seed's.")
    return "imagenet", None
