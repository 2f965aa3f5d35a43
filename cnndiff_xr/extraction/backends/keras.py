"""The Keras backend: the registry of ``keras.applications`` names, weights, layer presets and the layer extractor.

The only module of the package that imports Keras or TensorFlow, and only inside functions, so that
``import cnndiff_xr`` and the analysis side never pay for them. A :class:`KerasModelSpec` (the
:class:`~cnndiff_xr.extraction.backends.ModelSpec` of this backend) is the small, picklable description of a model
that travels to Dask workers; each worker turns it into a :class:`LayerExtractor` (the
:class:`~cnndiff_xr.extraction.backends.ModelBackend`) once (see :mod:`cnndiff_xr.extraction.cluster`) -- Keras models
themselves are never shipped through Dask's serializer (distributed's Keras serializer is broken on Keras 3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ...options import Dtype
from ...schema import INPUT_LAYER
from ...validation import ChoiceError, ParameterTypeError, ParameterValueError, check_int
from ..reduction import BatchOutput, Reduction, combine_means, reduce_numpy
from . import Framework, Layers, UnknownLayerError, callable_name, check_layer_selection, package_version, verbose

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


# TensorFlow's C++ log lines (absl's format: severity letter, MMDD, time, thread id, file:line]), absl's notice that it
# logs to stderr before being initialised, and the second line of TensorFlow's CPU-instructions notice. Its shared
# libraries print them while they load, before TF_CPP_MIN_LOG_LEVEL is read ("I0000 ... port.cc:153] oneDNN custom
# operations are on ..."), so that variable cannot silence them: they are filtered out of stderr during the import.
TF_LOG_LINE = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
                         r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
                         r"|To enable the following instructions: .*rebuild TensorFlow")


@contextlib.contextmanager
def _stderr_without(pattern: re.Pattern[str]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 (C libraries and Python alike) while the block runs, then write
    it back to stderr without the lines that match ``pattern``."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not pattern.match(line))
            if kept:
                os.write(2, kept.encode())


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """Import Keras or TensorFlow in the block without their log lines: TF_CPP_MIN_LOG_LEVEL=3 before TensorFlow
    first loads (unless the environment sets it), its load-time log lines filtered out of stderr, and its Python
    logger at ERROR afterwards."""
    for key, value in FRAMEWORK.quiet_env.items():
        os.environ.setdefault(key, value)
    with _stderr_without(TF_LOG_LINE):
        yield
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _first_import(name: str) -> contextlib.AbstractContextManager[None]:
    """What to import module ``name`` (``keras`` or ``tensorflow``) under: :func:`quiet_import` the first time, unless
    :func:`~cnndiff_xr.extraction.backends.verbose`."""
    return contextlib.nullcontext() if name in sys.modules or verbose() else quiet_import()


def _keras() -> Any:
    with _first_import("keras"):
        import keras
    return keras


def _is_keras_object(model: Any) -> bool:
    """Whether ``model`` is an instance of a Keras class, told from its class's module (without importing Keras)."""
    return any(getattr(cls, "__module__", "").split(".")[0] == "keras" for cls in type(model).__mro__)


def is_model_file(model: Any) -> bool:
    """Whether ``model`` names a saved Keras model file (a str or path ending in ``.keras``, any case)."""
    return isinstance(model, (str, os.PathLike)) and os.fspath(model).lower().endswith(".keras")


def handles(model: Any) -> bool:
    """Whether ``model`` is this backend's: a ``keras.applications`` name (any case), a ``.keras`` file or a Keras
    model."""
    if is_model_file(model):
        return True
    if isinstance(model, str):
        return model.lower() in APPLICATIONS
    return _is_keras_object(model)


def weights_digest(model: Any) -> str:
    """sha256 over every weight array of ``model`` (shape, dtype and bytes): the identity of the weights a store was
    made with, whatever file or seed they came from."""
    digest = hashlib.sha256()
    keras = _keras()
    # TensorFlow: the variable's tensor as numpy directly (VGG16: 0.2 s, where keras.ops.convert_to_numpy's first
    # pass over fresh weights takes ~2 s); the same bytes, so the digests of existing stores still match
    tensorflow = keras.backend.backend() == "tensorflow"
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.value) if tensorflow else keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.data)  # the array's own buffer: tobytes() copied every weight once more (VGG16: 0.5 GB)
    return digest.hexdigest()


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded files (``$KERAS_HOME/models`` or ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _check_name(name: str) -> str:
    if name not in APPLICATIONS:
        raise ChoiceError(
            f"model={name!r} is not a known keras.applications model; choose one of {sorted(APPLICATIONS)} "
            "or pass a keras.Model or a .keras file (with preprocess=...)"
        )
    return name


def _application(name: str) -> tuple[ModuleType, Any]:
    module_name, constructor = APPLICATIONS[_check_name(name)]
    module = importlib.import_module(f"keras.applications.{module_name}")
    return module, getattr(module, constructor)


def preprocess_name(name: str) -> str:
    """The name of a ``keras.applications`` model's preprocessing function, as the provenance records it."""
    return f"keras.applications.{APPLICATIONS[name][0]}.preprocess_input"


CLASS_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"


def load_imagenet_class_labels(*, download: bool = False) -> list[str] | None:
    """The 1000 ImageNet class labels (what ``decode_predictions`` uses) from the Keras cache; with ``download``,
    fetched into the cache first when missing. None when they cannot be had (offline): labels are then left empty."""
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
class KerasModelSpec:
    """Everything a worker needs to rebuild the same model: small and picklable (the backend's ``ModelSpec``).

    One of three, each with the trust its source deserves:

    - ``name`` (a keras.applications model) with ``weights`` ("imagenet", None = random, or a file path) and
      ``seed``;
    - ``model_payload``: a ``keras.Model`` the user passed in their own process (:func:`user_model_payload`: its
      config, its weights, and the Python objects the config names -- custom layer classes, ``Lambda`` functions --
      pickled with cloudpickle), rebuilt with Keras' safe mode off. That is safe because the object is the user's
      own and already runs in their process: the payload comes from that process through Dask, which workers trust
      for every task anyway (each task is a pickle from the client), and unpickling it already runs whatever it
      holds, so safe mode would guard nothing. Safe mode refuses Python code from *files*, which this is not;
    - ``model_bytes``: a ``.keras`` file named by path (``model_file``, for messages), read on the client and loaded
      on every worker in Keras' safe mode: a file may come from anywhere, and a ``Lambda`` layer in it is code that
      would run on load, so it is refused (:func:`_load_model_file` says how to run it knowingly). Nothing read from
      a store ever becomes a spec: stores hold no pickles and no code.

    The last two come with ``preprocess``.
    """

    name: str | None = None
    weights: str | None = "imagenet"
    seed: int = 0
    model_bytes: bytes | None = None
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None
    label: str = ""
    model_payload: bytes | None = None
    model_file: str | None = None

    @property
    def key(self) -> str:
        """A stable identifier (the plugin name on workers)."""
        digest = hashlib.sha256(repr((self.name, self.weights, self.seed)).encode())
        if self.model_bytes is not None:
            digest.update(self.model_bytes)
        if self.model_payload is not None:
            digest.update(b"payload")  # never the same key as a file of the same bytes
            digest.update(self.model_payload)
        if self.preprocess is not None:  # two runs of one model with different preprocessing are different plugins
            import cloudpickle

            digest.update(cloudpickle.dumps(self.preprocess))
        return digest.hexdigest()[:16]

    @property
    def model_label(self) -> str:
        return self.name or self.label

    @property
    def weights_label(self) -> str:
        if self.model_bytes is not None or self.model_payload is not None:
            return "custom"
        if self.weights is None:
            return f"random(seed={self.seed})"
        return self.weights

    @property
    def preprocessing(self) -> str:
        return preprocess_name(self.name) if self.name else callable_name(self.preprocess)

    def prepare_process(self) -> None:
        # Workers this package starts get one TF thread each (FRAMEWORK.worker_env); a user's own workers keep their
        # settings
        if "TF_NUM_INTRAOP_THREADS" in os.environ:
            set_tf_threads(int(os.environ["TF_NUM_INTRAOP_THREADS"]), int(os.environ.get("TF_NUM_INTEROP_THREADS", 1)))

    def backend(self, layers: Layers, dtype: Dtype = "float32", reduction: Reduction | None = None) -> LayerExtractor:
        return LayerExtractor(self, layers, dtype=dtype, reduction=reduction)

    def build(self) -> Any:
        """Build the Keras model described by this spec (in the calling process)."""
        keras = _keras()
        if self.model_payload is not None:
            return _rebuild_user_model(self.model_payload, self.label)
        if self.model_bytes is not None:
            return _load_model_file(self.model_bytes, self.model_file or self.label)
        assert self.name is not None  # a spec holds a name, a user's model or a file's bytes
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
                    f"could not be downloaded ({err}). Alternatives: weights=None (--weights random; random "
                    "weights, seeded by seed=... / --seed N), weights='/path/to/weights.h5' (--weights "
                    "/path/to/weights.h5: a local file, e.g. the keras-applications release file copied from a "
                    f"machine with internet), or copy that file into {keras_cache_dir()}."
                ) from err
        if not os.path.isfile(self.weights):
            raise FileNotFoundError(
                f"weights={self.weights!r} is neither 'imagenet', None nor an existing weights file"
            )
        return constructor(weights=self.weights)

    def preprocess_function(self) -> Callable[[np.ndarray], np.ndarray]:
        if self.preprocess is not None:
            return self.preprocess
        assert self.name is not None  # a spec holds a name or a preprocessing function
        module, _ = _application(self.name)
        return module.preprocess_input


def make_spec(
    model: Any,
    *,
    weights: str | os.PathLike[str] | None = "imagenet",
    seed: int = 0,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> KerasModelSpec:
    """Validate the user's model arguments and turn them into a :class:`KerasModelSpec`.

    ``model`` is a keras.applications name (see :data:`APPLICATIONS`), a ``keras.Model`` (the user's own object: it
    runs on the workers as it is, ``Lambda`` layers and custom classes included) or the path of a ``.keras`` file
    (loaded in Keras' safe mode); the last two need ``preprocess``, a function from a float32 batch of RGB pixels in
    0..255 (B, H, W, 3) to the model's input. See :class:`KerasModelSpec` for what is trusted and why.
    """
    seed = check_int("seed", seed, 0)
    if is_model_file(model):
        path = os.path.abspath(os.fspath(model))
        _check_preprocess(preprocess, f"model={os.fspath(model)!r} (a model file)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path!r} does not exist (model= takes a keras.applications name, a "
                                    "keras.Model or the path of a saved .keras model)")
        data = Path(path).read_bytes()
        return KerasModelSpec(name=None, weights=None, seed=seed, model_bytes=data, preprocess=preprocess,
                              label=f"custom:{_model_file_name(data, path)}", model_file=path)
    if isinstance(model, str):
        name = _check_name(model.lower())
        if preprocess is not None:
            raise ParameterValueError("preprocess= is only for a keras.Model; named models use their own "
                                      "preprocess_input")
        if weights is None or weights == "imagenet":
            return KerasModelSpec(name=name, weights=weights, seed=seed)
        path = os.path.abspath(os.fspath(weights))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path!r} does not exist (weights= takes 'imagenet', None for "
                                    "random weights, or a path to a weights file)")
        return KerasModelSpec(name=name, weights=path, seed=seed)
    keras = _keras() if _is_keras_object(model) else None
    if keras is not None and isinstance(model, keras.Model):
        _check_preprocess(preprocess, "a keras.Model")
        return KerasModelSpec(name=None, weights=None, seed=seed, model_payload=user_model_payload(model),
                              preprocess=preprocess, label=f"custom:{model.name}")
    raise ParameterTypeError(f"model must be {FRAMEWORK.accepts}, got {type(model).__name__}")


def _check_preprocess(preprocess: Any, what: str) -> None:
    if preprocess is None or not callable(preprocess):
        raise ParameterValueError(f"{what} needs preprocess=<function mapping RGB 0..255 float batches to its input>")


def _model_file_name(data: bytes, path: str) -> str:
    """The model's name in a ``.keras`` file (its ``config.json``, read as JSON: nothing is deserialized), so that the
    provenance names it as it names the same model passed as an object; the file name when it has none."""
    import io

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            name = json.loads(archive.read("config.json"))["config"]["name"]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError) as err:
        raise ParameterValueError(f"model={path!r} is not a Keras model file saved by model.save('....keras') "
                                  f"({type(err).__name__}: {err})") from None
    return str(name) if name else os.path.basename(path)


def _load_model_file(data: bytes, path: str) -> Any:
    """Load the bytes of the ``.keras`` file at ``path`` in Keras' safe mode (which refuses the Python code a
    ``Lambda`` layer holds): the file may come from anywhere."""
    keras = _keras()
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "model.keras")
        with open(file, "wb") as fh:
            fh.write(data)
        try:
            return keras.models.load_model(file, compile=False, safe_mode=True)
        except Exception as err:
            if not any("safe_mode" in str(e) for e in _chain(err)):
                raise ParameterValueError(f"model={path!r}: Keras could not load this model file "
                                          f"({type(err).__name__}: {err})") from err
            raise ParameterValueError(
                f"model={path!r} holds Python code (a Lambda layer), which Keras' safe mode refuses to load from a "
                f"file: code in a file from elsewhere runs with your rights. If you trust the file, load it yourself, "
                f"model = keras.saving.load_model({path!r}, safe_mode=False), and pass that object (model=model): "
                f"your own model object runs on every worker, Lambda layers included.") from err


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during (Keras wraps the safe-mode refusal of a layer)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# Packages whose classes and functions Keras deserializes by name itself; everything else in a config is the user's.
_KERAS_PACKAGES = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp"})
# The names under which a user model's functions are handed back to Keras (the custom_objects of the rebuild).
_USER_FUNCTION = "cnndiff_xr>user_function_{}"


def _users(module: Any) -> bool:
    """Whether a config's ``module`` entry names a user's module (not Keras', not Python's builtins)."""
    return isinstance(module, str) and module != "builtins" and module.split(".")[0] not in _KERAS_PACKAGES


def _entry_key(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


def user_model_payload(model: Any) -> bytes:
    """The user's own ``keras.Model``, as bytes that rebuild it in any process (:func:`_rebuild_user_model`): its
    Keras config, its weights, and the Python objects the config names, pickled with cloudpickle.

    Keras' own file format cannot carry these to another process: it writes a ``Lambda``'s function as bare bytecode
    that is reloaded without the function's globals (``lambda x: keras.ops.relu(x)`` fails to load, even with safe
    mode off), and finds custom classes and functions by name only among registered or Keras' own objects. So every
    object the config names outside Keras -- the classes of the model's custom layers, every function a layer holds
    (a ``Lambda``'s function, mask and output shape; a custom activation) -- travels as itself: cloudpickle sends a
    class or function of the main script or of a function body by value, and one of an importable module by
    reference (then that module must be importable on the workers, as for any Dask task). In the config, each such
    function's entry becomes a reference to it by a private name, and the rebuild hands Keras these objects as its
    ``custom_objects``. Nothing is written to disk.
    """
    import cloudpickle

    keras = _keras()
    layers = model._flatten_layers(include_self=True, recursive=True) if hasattr(model, "_flatten_layers") else [
        model, *model.layers]
    functions_by_entry: dict[str, Any] = {}  # a lambda's config entry (as JSON) -> the lambda
    functions_by_name: dict[str, Any] = {}  # a named function's name -> the function
    classes: dict[str, list[type]] = {}  # the name Keras looks a class up by -> the classes of that name

    def note(fn: Any, entry: Any = None) -> None:
        if fn.__name__ != "<lambda>":
            for name in {fn.__name__, keras.saving.get_registered_name(fn)}:
                functions_by_name.setdefault(name, fn)
            return
        if entry is None:
            with warnings.catch_warnings():  # Keras warns that a lambda is unsafe to write to a file: none is written
                warnings.simplefilter("ignore")
                entry = keras.saving.serialize_keras_object(fn)
        functions_by_entry.setdefault(_entry_key(entry), fn)

    def note_class(cls: type) -> None:
        if _users(cls.__module__):
            same_name = classes.setdefault(keras.saving.get_registered_name(cls), [])
            if cls not in same_name:
                same_name.append(cls)

    for layer in layers:
        note_class(type(layer))
        own = {}
        if isinstance(layer, keras.layers.Lambda):  # its functions as the Lambda writes them in its config
            config = layer.get_config()
            own = {"function": layer.function, "mask": layer.mask,
                   "output_shape": getattr(layer, "_output_shape", None)}
            for field, fn in own.items():
                if isinstance(fn, types.FunctionType) and isinstance(config.get(field), dict):
                    note(fn, config[field])
        for value in vars(layer).values():
            if isinstance(value, types.FunctionType) and _users(value.__module__) and not any(
                    value is fn for fn in own.values()):
                note(value)
            elif hasattr(value, "get_config") and not isinstance(value, type):  # a custom initializer, regularizer...
                note_class(type(value))

    custom_objects: dict[str, Any] = {}
    names: dict[int, str] = {}

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        class_name = node.get("class_name")
        fn = None
        if class_name == "__lambda__":
            fn = functions_by_entry.get(_entry_key(node))
        elif class_name == "function" and isinstance(node.get("config"), str) and (
                node.get("module") in (None, "builtins") or _users(node.get("module"))):  # not a Keras function
            fn = functions_by_name.get(node["config"])
            if fn is None and _users(node.get("module")):  # registered with Keras, not held by a layer
                fn = keras.saving.get_registered_object(node["config"])
        if fn is not None:
            name = names.setdefault(id(fn), _USER_FUNCTION.format(len(names)))
            custom_objects[name] = fn
            return {"module": None, "class_name": "function", "config": name, "registered_name": name}
        if isinstance(class_name, str) and (node.get("module") is None or _users(node.get("module"))):
            key = node.get("registered_name") or class_name
            same_name = classes.get(key, [])
            if len(same_name) > 1:
                raise ParameterValueError(
                    f"model {model.name!r} uses {len(same_name)} custom classes named {key!r} (in "
                    f"{', '.join(c.__module__ for c in same_name)}): Keras tells classes apart by name; rename one or "
                    f"register it with keras.saving.register_keras_serializable(package=...)")
            cls = same_name[0] if same_name else keras.saving.get_registered_object(key)
            if cls is not None:
                custom_objects[key] = cls
        return {k: rewrite(v) for k, v in node.items()}

    try:
        config = rewrite(keras.saving.serialize_keras_object(model))
        return cloudpickle.dumps({"config": config, "weights": model.get_weights(), "custom_objects": custom_objects})
    except ParameterValueError:  # rewrite's own message
        raise
    except Exception as err:
        raise ParameterValueError(
            f"model {model.name!r} cannot be described for the Dask workers ({type(err).__name__}: {err}). Every "
            f"custom layer needs a get_config() returning its __init__ arguments (Keras' rule for models that are "
            f"saved or cloned), and what its layers hold must be picklable by cloudpickle.") from err


def _rebuild_user_model(payload: bytes, label: str) -> Any:
    """The model of :func:`user_model_payload`, rebuilt in this process: the config deserialized with the payload's
    objects as ``custom_objects`` and safe mode off (see :class:`KerasModelSpec` for why that is safe: the payload is
    the user's own object from their own process), then the weights set."""
    import cloudpickle

    keras = _keras()
    try:
        parts = cloudpickle.loads(payload)
    except Exception as err:  # e.g. ModuleNotFoundError on a worker that lacks the module of a custom class
        raise ParameterValueError(
            f"model {label!r}: its custom classes and functions could not be unpickled in this process "
            f"({type(err).__name__}: {err}). Those of an importable module travel by reference: that module must be "
            f"importable on every worker (install it there, or call cloudpickle.register_pickle_by_value(module) "
            f"before extract to send it by value).") from err
    try:
        model = keras.saving.deserialize_keras_object(parts["config"], custom_objects=parts["custom_objects"],
                                                      safe_mode=False)
        model.set_weights(parts["weights"])
    except Exception as err:
        raise ParameterValueError(
            f"model {label!r} could not be rebuilt from its Keras config ({type(err).__name__}: {err}). Every custom "
            f"layer needs a get_config() returning its __init__ arguments (Keras' rule for models that are saved or "
            f"cloned).") from err
    return model


def _layer_kind(layer: Any) -> str:
    return type(layer).__name__


def resolve_layers(model: Any, layers: Any) -> list[str]:
    """The store names of the layers to extract, in network order.

    ``None``: every layer output except pure reshapes and inference-time identities (Flatten, Reshape, Dropout...).
    ``"seed"``: the seed notebook's list (for VGG16 its 21 layers: the input, 13 convolutions, 5 poolings, flatten,
    predictions). A list of names: those layers (the input may be called ``"input_layer"``).
    """
    layers = check_layer_selection(layers)
    model_layers = list(model.layers)
    store_names = _store_names(model)
    if layers is None:
        chosen = [n for n, layer in zip(store_names, model_layers, strict=True)
                  if _layer_kind(layer) not in _PURE_RESHAPES]
    elif isinstance(layers, str):  # the one preset, "seed"
        chosen = [
            n for i, (n, layer) in enumerate(zip(store_names, model_layers, strict=True))
            if _layer_kind(layer) in _SEED_LAYER_TYPES or i == len(model_layers) - 1
        ]
    else:
        aliases = {model_layers[0].name: INPUT_LAYER} if store_names[0] == INPUT_LAYER else {}
        requested = [aliases.get(n, n) for n in layers]
        duplicates = sorted({n for n in requested if requested.count(n) > 1})
        if duplicates:
            raise ParameterValueError(f"layers lists {duplicates} more than once")
        unknown = [n for n in requested if n not in store_names]
        if unknown:
            raise UnknownLayerError(unknown, store_names, model.name)
        chosen = [n for n in store_names if n in set(requested)]  # network order
    for name in chosen:
        rank = len(model_layers[store_names.index(name)].output.shape)
        if rank not in (2, 4):
            raise ParameterValueError(f"layer {name!r} has a rank-{rank} output; only (batch, y, x, filter) and "
                                      "(batch, filter) layers can be stored")
    return chosen


def _store_names(model: Any) -> list[str]:
    """The store name of each layer of ``model``: its Keras name, but :data:`~cnndiff_xr.schema.INPUT_LAYER` for
    the input layer (whose Keras name changes from process to process)."""
    return [INPUT_LAYER if i == 0 and _layer_kind(layer) == "InputLayer" else layer.name
            for i, layer in enumerate(model.layers)]


class LayerExtractor:
    """A built model that maps a uint8 RGB batch to the activations of the chosen layers, in the store's dtype.

    The input layer's activation is the preprocessed batch itself; the other layers come from one call of a
    multi-output sub-model (``model(x, training=False)``, not ``.predict`` per batch: no per-call setup cost). For
    float16 stores the cast is part of that sub-model: TensorFlow's vectorised cast costs half of numpy's
    ``astype("float16")`` (measured in benchmarks/RESULTS.md), on ~60 MB per VGG16 image.
    """

    def __init__(self, spec: KerasModelSpec, layers: Layers = None, *, dtype: Dtype = "float32",
                 reduction: Reduction | None = None) -> None:
        self.spec = spec
        self.dtype = str(np.dtype(dtype))
        self.reduction = reduction if reduction is not None else Reduction()
        self.model = spec.build()
        if len(self.model.inputs) != 1:
            raise ParameterValueError(f"model {self.model.name!r} has {len(self.model.inputs)} inputs; one is "
                                      "supported")
        self.layers = resolve_layers(self.model, layers)
        self._preprocess = spec.preprocess_function()
        keras = _keras()
        store_names = _store_names(self.model)
        by_store_name = dict(zip(store_names, self.model.layers, strict=True))
        self.output_layer = store_names[-1]
        self._computed = [n for n in self.layers if n != INPUT_LAYER]
        self.has_imagenet_head: bool = tuple(self.model.output.shape[1:]) == (1000,) and spec.name is not None
        self.shapes = {n: tuple(int(d) for d in by_store_name[n].output.shape[1:]) for n in self.layers}
        # The sub-model returns every computed layer's raw output; the traced call (_compiled_call) then gathers the
        # kept units, casts them and, with filter means, adds two outputs per layer (the per-filter sums and the
        # per-image sum of squares), so only the kept values leave the model call. _slots names each output, in order.
        self._slots: list[tuple[str, str]] = []
        plan: list[tuple[np.ndarray | None, bool]] = []
        for name in self._computed:
            kept = self.reduction.kept(name, self.shapes[name])
            means = self.reduction.means_for(name, self.shapes[name])
            plan.append((kept, means))
            self._slots.append((name, "activation"))
            if means:
                self._slots += [(name, "filter_sum"), (name, "sum_of_squares")]
        raw = [by_store_name[name].output for name in self._computed]
        if self.has_imagenet_head:
            raw.append(self.model.output)  # float32 probabilities, recorded even when that layer is not stored
        store_dtype = self.dtype

        def reduce(tensors: Sequence[Any]) -> list[Any]:
            outputs: list[Any] = []
            # the probabilities, last, pass through
            for out, (kept, means) in zip(tensors[:len(plan)], plan, strict=True):
                act = out if kept is None else keras.ops.take(
                    keras.ops.reshape(out, (-1, int(np.prod(out.shape[1:])))), kept, axis=1)
                if store_dtype != "float32":  # after the gather: only the kept values are cast
                    act = keras.ops.cast(act, store_dtype)
                outputs.append(act)
                if means:
                    outputs += _moment_outputs(keras, out)
            return outputs + list(tensors[len(plan):])

        self._submodel = keras.Model(self.model.input, raw) if raw else None
        self._call = _compiled_call(self._submodel, keras, reduce) if self._submodel is not None else None
        height, width = self.model.input.shape[1:3]
        if height is None or width is None:
            raise ParameterValueError(f"model {self.model.name!r} has no fixed input size; build it with "
                                      "input_shape=...")
        self.input_size = (int(height), int(width))

    # ---- provenance (the ModelBackend protocol)
    @property
    def model_label(self) -> str:
        return self.spec.model_label

    @property
    def weights_label(self) -> str:
        return self.spec.weights_label

    @property
    def preprocessing(self) -> str:
        return self.spec.preprocessing

    def weights_digest(self) -> str:
        return weights_digest(self.model)

    def framework_versions(self) -> dict[str, str]:
        keras = _keras()
        tensorflow = package_version("tensorflow")
        return {
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "tensorflow_version": package_version("tensorflow-cpu") if tensorflow == "not installed" else tensorflow,
        }

    def class_labels(self) -> list[str] | None:
        """The ImageNet class names of a named model's ImageNet head (fetched into the Keras cache with ImageNet
        weights); None without a head or when they cannot be had (offline)."""
        if not self.has_imagenet_head:
            return None
        return load_imagenet_class_labels(download=self.spec.weights == "imagenet")

    # ---- the forward pass

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        # a fresh float32 copy: keras' preprocess_input works in place on float arrays
        return np.asarray(self._preprocess(rgb.astype("float32")), dtype="float32")

    def run(self, rgb: np.ndarray) -> BatchOutput:
        """What the store keeps of a batch (:class:`~cnndiff_xr.extraction.reduction.BatchOutput`): the kept
        activations per store layer name in this extractor's dtype, the means when the reduction asks for them, and
        the model's output probabilities (float32, or None without an ImageNet head)."""
        keras = _keras()
        x = self.preprocess(rgb)
        raw = self._call(x) if self._call is not None else []
        outs = [_as_numpy(o, keras) for o in (raw if isinstance(raw, (list, tuple)) else [raw])]
        probabilities = outs.pop() if self.has_imagenet_head else None
        parts: dict[tuple[str, str], np.ndarray] = dict(zip(self._slots, outs, strict=True))
        acts = {name: parts[(name, "activation")] for name in self._computed}
        means = {}
        for name in self._computed:
            if self.reduction.means_for(name, self.shapes[name]):
                shape = self.shapes[name]
                n_positions = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                means[name] = combine_means(parts[(name, "filter_sum")], parts[(name, "sum_of_squares")], n_positions)
        if INPUT_LAYER in self.layers:  # the preprocessed batch is numpy already: reduced in numpy
            acts[INPUT_LAYER], input_means = reduce_numpy(
                x, self.reduction.kept(INPUT_LAYER, self.shapes[INPUT_LAYER]), dtype=self.dtype,
                filter_means=self.reduction.means_for(INPUT_LAYER, self.shapes[INPUT_LAYER]))
            if input_means is not None:
                means[INPUT_LAYER] = input_means
        return BatchOutput(activations={n: acts[n] for n in self.layers},
                           means={n: means[n] for n in self.layers if n in means}, probabilities=probabilities)


def _compiled_call(submodel: Any, keras: Any,
                   reduce: Callable[[Sequence[Any]], list[Any]]) -> Callable[[np.ndarray], Any]:
    """The multi-output model's forward call followed by ``reduce`` (the gather, cast and sums of what a batch keeps),
    as one TensorFlow graph where Keras runs on TensorFlow.

    Traced once (for any batch size), the call runs without
    Python between its ops, and TensorFlow's graph optimiser fuses what eager execution cannot: the gather and the
    sums of a reduced store then cost a few % of the forward pass instead of ~20 % eagerly, and the full forward pass
    itself gets ~5 % faster on 2 cores (benchmarks/RESULTS.md, "Reduced stores")."""

    def call(x: Any) -> list[Any]:
        raw = submodel(x, training=False)
        return reduce(raw if isinstance(raw, (list, tuple)) else [raw])

    if keras.backend.backend() != "tensorflow":
        return call
    with _first_import("tensorflow"):
        import tensorflow as tf

    # one trace for every batch size (the warm-up batch of one, full batches, the last short batch): a trace of a
    # large network costs seconds
    signature = [tf.TensorSpec((None, *submodel.input.shape[1:]), tf.float32)]
    return tf.function(call, input_signature=signature)


def _moment_outputs(keras: Any, out: Any) -> list[Any]:
    """Symbolic per-filter sums ``(batch, filters)`` and per-image sums of squares ``(batch,)`` of a layer output,
    in float32 (:func:`~cnndiff_xr.extraction.reduction.combine_means` turns them into means in float64).

    The per-filter sums are a product with a vector of ones, ``(1, positions) @ (positions, filters)``: BLAS sums in
    blocks (measured within 5e-7 of float64 on a 224 x 224 layer) and costs a third of TensorFlow's reduction over
    both spatial axes. The sum of squares, see :func:`_sum_of_squares`."""
    if len(out.shape) == 2:  # dense: each filter is one unit
        return [out, _sum_of_squares(keras, out)]
    positions = int(out.shape[1]) * int(out.shape[2])
    per_position = keras.ops.reshape(out, (-1, positions, int(out.shape[3])))
    sums = keras.ops.matmul(keras.ops.ones((1, 1, positions)), per_position)  # (batch, 1, filters)
    return [keras.ops.reshape(sums, (-1, int(out.shape[3]))), _sum_of_squares(keras, out)]


def _sum_of_squares(keras: Any, out: Any) -> Any:
    """Per-image sum of squares over every axis but the batch's, in float32.

    On TensorFlow, the square of its Euclidean-norm reduction: one fused pass over the tensor, where ``sum(square(x))``
    writes the squares to a temporary and reads them back (on one core 2.7x slower: 40 against 15 ms for a batch of 8
    of VGG16's first layer, ~14 % of the whole forward pass against ~5 %); within 1.1e-7 relative of float64."""
    axes = tuple(range(1, len(out.shape)))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.square(tf.math.reduce_euclidean_norm(out, axis=axes))
    return keras.ops.sum(keras.ops.square(out), axis=axes)


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
        with _first_import("tensorflow"):
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


FRAMEWORK = Framework(
    name="keras",
    names_from="keras.applications",
    model_class="a keras.Model",
    model_names=tuple(APPLICATIONS),
    handles=handles,
    make_spec=make_spec,
    # one TF thread per Dask worker thread, so that two workers on two cores do not each start a pool as wide as the
    # machine and thrash
    worker_env={"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"},
    # TensorFlow's C++ logging off, errors included: a newcomer takes "E0000 ... oneDNN supports DT_HALF only on
    # platforms with AVX-512" for a failure, and TensorFlow's real errors reach the caller as exceptions anyway
    quiet_env={"TF_CPP_MIN_LOG_LEVEL": "3"},
    modules=("keras", "tensorflow"),
    quiet_import=quiet_import,
)
