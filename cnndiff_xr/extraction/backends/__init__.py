"""Model backends: what extraction needs from a deep-learning framework, and how one is chosen.

Extraction talks to a model only through two protocols:

* :class:`ModelSpec` -- the small, picklable description of a model (a name and weights, or a user's model saved to
  bytes) that travels to the Dask workers; each worker builds it once.
* :class:`ModelBackend` -- the model built in one process: its input size, the layers it stores and their shapes, one
  call from a batch of RGB images to every layer's activation, and the facts that go into a store's provenance.

Each module of this package is one framework's implementation. It declares itself with a module-level
``FRAMEWORK = Framework(...)``: which ``model`` arguments it handles and how it turns one into a :class:`ModelSpec`.
:func:`frameworks` finds those modules with :mod:`pkgutil`, so a new backend (PyTorch, say) is one new module here and
needs no change anywhere else. Only a backend module may import its framework, and only inside functions, so that
``import cnndiff_xr`` stays fast and analysis-only users never load one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import pkgutil
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from ...options import LAYER_PRESETS, Dtype, LayerPreset
from ...validation import ChoiceError, ParameterTypeError, ParameterValueError, UnknownLabelError, check_choice
from ..reduction import BatchOutput, Reduction

#: What ``layers=`` may be: None (every layer but pure reshapes), a preset name, or layer names in any order.
Layers = LayerPreset | Sequence[str] | None
#: ``layers=`` once checked (:func:`check_layer_selection`): the names as a tuple.
LayerSelection = LayerPreset | tuple[str, ...] | None

#: Set to "1" to let the frameworks log as they do by default (the CLI's ``--verbose`` sets it). Without it, each
#: backend keeps its framework's start-up and C++ log lines (TensorFlow's "I0000 ... oneDNN custom operations are
#: on" and the like) off stderr. An environment variable, so that the worker processes this package starts inherit it.
VERBOSE_ENV = "CNNDIFF_XR_VERBOSE"


def verbose() -> bool:
    """Whether framework logging is wanted (:data:`VERBOSE_ENV` set to anything but "" or "0")."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Turn framework logging on or off for this process and the worker processes it starts from now on (sets
    :data:`VERBOSE_ENV`). It cannot unsay what a framework already imported in this process has printed."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


class UnknownLayerError(UnknownLabelError):
    """Layer names that the model does not have.

    Attributes
    ----------
    unknown
        The names asked for that the model lacks, in the order given.
    closest
        For each unknown name, the model's most similar layer names (possibly none), best first.
    model
        The model's name, for messages.
    """

    def __init__(self, unknown: Sequence[str], available: Sequence[str], model: str) -> None:
        self.unknown = list(unknown)
        self.available = list(available)
        self.closest = {name: closest_names(name, available) for name in self.unknown}
        self.model = model
        hints = "; ".join(f"for {name!r} did you mean {' or '.join(map(repr, close))}?"
                          for name, close in self.closest.items() if close)
        super().__init__(f"layers: {self.unknown} are not layers of model {model!r}"
                         f"{f' ({hints})' if hints else ''}; it has {self.available}")

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its parts, not its message, where it is unpickled
        return type(self), (self.unknown, self.available, self.model)


def closest_names(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` most similar to ``name`` (difflib's ratio, case-insensitive), best first."""
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    return [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)]


class ModelBackend(Protocol):
    """A model built in one process, ready to map batches of images to the activations of the chosen layers."""

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input: images are resized to it."""
        ...

    @property
    def layers(self) -> list[str]:
        """The store names of the chosen layers, in network order (the input is ``schema.INPUT_LAYER``)."""
        ...

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image output shape of each chosen layer, channels last: ``(y, x, filter)`` or ``(filter,)``."""
        ...

    @property
    def has_imagenet_head(self) -> bool:
        """Whether the model ends in 1000 ImageNet class probabilities (then the top class is recorded per image)."""
        ...

    @property
    def output_layer(self) -> str:
        """The store name of the layer whose output is the model's output (it gets class labels as filter labels)."""
        ...

    @property
    def model_label(self) -> str:
        """The model, as the store's provenance names it (``"vgg16"``, ``"custom:tiny"``)."""
        ...

    @property
    def weights_label(self) -> str:
        """The weights, as the store's provenance names them (``"imagenet"``, ``"random(seed=0)"``, a path)."""
        ...

    @property
    def preprocessing(self) -> str:
        """A stable name of the preprocessing function (the same in every process and run)."""
        ...

    def run(self, rgb: np.ndarray) -> BatchOutput:
        """What the store keeps of a ``(batch, height, width, 3)`` uint8 RGB batch (:class:`BatchOutput`): per store
        layer name the kept activations in the backend's dtype (whole, or the reduction's kept units as
        ``(batch, kept)``), the means when the reduction asks for them, and the class probabilities (float32,
        ``(batch, classes)``; None without an ImageNet head). Apply the reduction inside the framework's model call
        where it can (only the kept values should leave the model); :func:`~cnndiff_xr.extraction.reduction.
        reduce_numpy` defines the numbers."""
        ...

    def weights_digest(self) -> str:
        """sha256 over every weight (names, shapes, dtypes, bytes): the identity of the weights a store holds."""
        ...

    def framework_versions(self) -> dict[str, str]:
        """Provenance attributes naming the framework and its version (``{"keras_version": ..., ...}``)."""
        ...

    def class_labels(self) -> list[str] | None:
        """The names of the output classes of an ImageNet head, or None (no head, or the names cannot be had)."""
        ...


class ModelSpec(Protocol):
    """A model's description: small, picklable and the same in every process, so that each Dask worker can build
    the same model once (models themselves never travel through Dask's serializer)."""

    @property
    def key(self) -> str:
        """A stable identifier of the model, its weights and preprocessing (it names the model plugin on workers)."""
        ...

    def prepare_process(self) -> None:
        """Set up the framework in this process before anything is built (thread pools: one per Dask worker
        thread on workers this package starts). Called once per worker."""
        ...

    def backend(self, layers: Layers, dtype: Dtype = "float32", reduction: Reduction | None = None) -> ModelBackend:
        """Build the model in this process, for the chosen layers, giving activations in ``dtype``, reduced as
        ``reduction`` says (None: every unit, no means)."""
        ...


class SpecFactory(Protocol):
    """A framework's ``make_spec``: the user's model arguments, validated, as a :class:`ModelSpec`."""

    def __call__(self, model: Any, *, weights: Any, seed: int, preprocess: Callable[[np.ndarray], np.ndarray] | None
                 ) -> ModelSpec: ...


@dataclasses.dataclass(frozen=True)
class Framework:
    """One backend module's declaration (its module-level ``FRAMEWORK``), found by :func:`frameworks`.

    Attributes
    ----------
    name
        The framework, e.g. ``"keras"``.
    names_from
        Where its model names come from, for messages: ``"keras.applications"``.
    model_class
        The model objects it takes, for messages: ``"a keras.Model"``.
    model_names
        The model names it builds (lower case).
    handles
        Whether a ``model`` argument is this framework's; must not import the framework to say no.
    make_spec
        Validates the model arguments and returns the :class:`ModelSpec`.
    worker_env
        Environment variables for the worker processes this package starts (thread pools).
    quiet_env
        Environment variables that keep the framework's own logging quiet; set in the worker processes this package
        starts unless :func:`verbose` (the backend quiets the processes it imports its framework in itself).
    modules, quiet_import
        The framework's top-level modules, and a context manager under which importing them prints no log lines.
        The backend imports its framework under it; in the worker processes this package starts, every first
        import of ``modules`` runs under it (:func:`quiet_framework_imports`), since what a task unpickles (a
        preprocessing function, say) may import the framework before any backend code runs.
    """

    name: str
    names_from: str
    model_class: str
    model_names: tuple[str, ...]
    handles: Callable[[Any], bool]
    make_spec: SpecFactory
    worker_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    quiet_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    modules: tuple[str, ...] = ()
    quiet_import: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext

    @property
    def accepts(self) -> str:
        """What ``model=`` this framework takes, for messages."""
        return f"a {self.names_from} name or {self.model_class}"


@functools.cache
def frameworks() -> tuple[Framework, ...]:
    """Every backend module of this package that declares a ``FRAMEWORK``, by name (imported, not its framework)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        framework = getattr(module, "FRAMEWORK", None)
        if isinstance(framework, Framework):
            found.append(framework)
    return tuple(sorted(found, key=lambda f: f.name))


def model_names() -> list[str]:
    """Every model name some backend can build (``model="vgg16"``), sorted."""
    return sorted({name for framework in frameworks() for name in framework.model_names})


def worker_env() -> dict[str, str]:
    """The environment every backend asks for in the worker processes this package starts: thread pools, and quiet
    framework logging unless :func:`verbose` (read now: call it when the workers start)."""
    quiet = not verbose()
    return {key: value for framework in frameworks()
            for key, value in {**framework.worker_env, **(framework.quiet_env if quiet else {})}.items()}


def quiet_framework_imports() -> None:
    """From now on in this process, import each framework's ``modules`` under its ``quiet_import`` (unless
    :func:`verbose`). Called in the worker processes this package starts, as they start; a user's own process is
    left alone (only the backends' own imports of a framework are quieted there)."""
    if verbose() or any(isinstance(finder, _QuietImports) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietImports({name: framework.quiet_import for framework in frameworks()
                                           for name in framework.modules}))


class _QuietImports(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: the modules it names are found by the finders after it, and their
    loaders wrapped so that executing the module runs under the framework's ``quiet_import``."""

    def __init__(self, quiet: Mapping[str, Callable[[], contextlib.AbstractContextManager[None]]]) -> None:
        self._quiet = dict(quiet)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        quiet = self._quiet.get(fullname)
        if quiet is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:  # a namespace package has none, and runs no code
            spec.loader = _QuietLoader(spec.loader, quiet)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """Delegates to ``loader``; executes the module under ``quiet``, with the real loader in its attributes."""

    def __init__(self, loader: Any, quiet: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        self._loader = loader
        self._quiet = quiet

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with self._quiet():
            self._loader.exec_module(module)


def model_spec(model: Any, *, weights: Any = "imagenet", seed: int = 0,
               preprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of ``model`` (a model name, or a framework's model object), by the first backend that
    handles it; the backend validates ``weights``, ``seed`` and ``preprocess``.

    Raises
    ------
    ChoiceError
        ``model`` is a name that no backend knows (the message lists the known names).
    ParameterTypeError
        ``model`` is neither a name nor a model object of an available framework.
    """
    for framework in frameworks():
        if framework.handles(model):
            return framework.make_spec(model, weights=weights, seed=seed, preprocess=preprocess)
    available = frameworks()
    if isinstance(model, str):
        raise ChoiceError(f"model={model!r} is not a known {' or '.join(f.names_from for f in available)} model; "
                          f"choose one of {model_names()} or pass {' or '.join(f.model_class for f in available)} "
                          "(with preprocess=...)")
    raise ParameterTypeError(f"model must be {' or '.join(f.accepts for f in available)}, got "
                             f"{type(model).__name__}")


def check_layer_selection(layers: Any) -> LayerSelection:
    """``layers=`` as None, a preset name or a tuple of layer names, checked before any model is built (which names
    a model has, each backend checks when it resolves them)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        return check_choice("layers", layers, LAYER_PRESETS, message=f"layers={layers!r}: a preset must be one of "
                            f"{LAYER_PRESETS}; or pass a list of names")
    if not (isinstance(layers, Sequence) and all(isinstance(name, str) for name in layers)):
        raise ParameterTypeError(f"layers must be None (every layer but reshapes), 'seed' or a list of layer names, "
                                 f"got {type(layers).__name__}: {layers!r}")
    if not layers:
        raise ParameterValueError("layers=[] selects nothing; pass None for the default list")
    return tuple(layers)


def package_version(distribution: str) -> str:
    """The installed version of a distribution (``"not installed"`` if it is not), for the provenance."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def callable_name(fn: Callable[..., Any] | None) -> str:
    """A stable name of a preprocessing function for the provenance (the same in every process and run)."""
    if fn is None:
        return "none"
    if not hasattr(fn, "__qualname__"):  # a callable instance: its class (repr would hold a memory address)
        fn = type(fn)
    return f"{getattr(fn, '__module__', '?')}.{fn.__qualname__}"
