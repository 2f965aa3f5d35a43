"""The settings of one extraction: a frozen :class:`ExtractionConfig`, validated once when it is made.

:func:`cnndiff_xr.extraction.run.extract` turns its arguments into one :class:`ExtractionConfig` before doing any
work and passes that object down. It yields the root attributes recorded in a new store
(:meth:`ExtractionConfig.provenance`) and, from them, the settings an existing store must share before a run may add
to it (:func:`identity`, the keys :data:`IDENTITY_ATTRS`): the one definition of which settings change the numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import xarray as xr
from distributed import Client

from ..options import DTYPES, ON_ERROR, RESIZE_POLICIES, Compression, Dtype, OnError, ResizePolicy
from ..sampling import UnitDraws
from ..schema import (
    APPENDING_ATTR,
    FILTER_MEANS_ATTR,
    FORMAT,
    FORMAT_ATTR,
    LAYERS_ATTR,
    SKIPPED_ATTR,
    STORE_ID_ATTR,
    UNIT_DRAWS_ATTR,
)
from ..validation import (
    ParameterTypeError,
    ParameterValueError,
    check_bool,
    check_choice,
    check_int,
    check_optional_int,
)
from .backends import Layers, ModelBackend, ModelSpec, check_layer_selection, model_spec, package_version
from .cluster import check_address
from .reduction import Reduction
from .store import check_compression, check_storage_options, check_url, codec

__all__ = ["IDENTITY_ATTRS", "ExtractionConfig", "identity"]

#: Root attributes that must agree before a run may add to an existing store: they change the numbers. (Batch size and
#: compression do not: a resumed run keeps the store's chunks and codec.)
IDENTITY_ATTRS = ("model", "weights", "weights_sha256", "input_size", "resize", "preprocessing", LAYERS_ATTR, "dtype",
                  UNIT_DRAWS_ATTR, FILTER_MEANS_ATTR)

#: What an identity attribute means when a store does not record it (stores made before it existed).
_IDENTITY_DEFAULTS: dict[str, Any] = {UNIT_DRAWS_ATTR: None, FILTER_MEANS_ATTR: False}

#: Root attributes a run records itself; ``attrs=`` may not replace them.
_RESERVED_ATTRS = frozenset({FORMAT_ATTR, STORE_ID_ATTR, SKIPPED_ATTR, APPENDING_ATTR, *IDENTITY_ATTRS, "batch_size",
                             "compression",
                             "compression_level", "seed", "created"})


def identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a store's root attributes (its provenance) that another run must share to add to it."""
    return {key: attrs.get(key, _IDENTITY_DEFAULTS.get(key)) for key in IDENTITY_ATTRS}


def _flag(name: str, value: Any) -> bool:
    return check_bool(name, value, message=f"{name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractionConfig:
    """Every setting of one extraction, checked when the object is made (each message names the parameter and what
    it accepts); see :func:`cnndiff_xr.extraction.run.extract` for what each one means.

    Normalised on the way in: ``store`` is an absolute path or a URL, ``storage_options`` a dict, ``layers`` None, a
    preset or a tuple of names, and ``spec`` is the model backend's picklable description of ``model`` (with
    ``weights``, ``seed`` and ``preprocess``), made by the first backend that handles ``model``.
    """

    store: str
    storage_options: Mapping[str, Any] | None = None
    model: Any = "vgg16"
    weights: str | os.PathLike[str] | None = "imagenet"
    layers: Layers = None
    dtype: Dtype = "float32"
    batch_size: int = 8
    resize: ResizePolicy = "nearest"
    seed: int = 0
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None
    on_error: OnError = "raise"
    compression: Compression = "lz4"
    compression_level: int = 1
    client: Client | str | None = None
    n_workers: int | None = None
    progress: bool = True
    break_lock: bool = False
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    units: UnitDraws | Literal["all"] = "all"
    filter_means: bool = False
    spec: ModelSpec = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def normalise(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: only here, while the object is being made

        normalise("store", check_url(self.store))
        normalise("storage_options", check_storage_options(self.storage_options))
        check_choice("dtype", self.dtype, DTYPES, message=f"dtype={self.dtype!r}; choose one of {DTYPES}")
        normalise("batch_size", check_int("batch_size", self.batch_size, 1))
        check_choice("resize", self.resize, RESIZE_POLICIES,
                     message=f"resize={self.resize!r}; choose one of {RESIZE_POLICIES}")
        check_choice("on_error", self.on_error, ON_ERROR,
                     message=f"on_error={self.on_error!r}; choose one of {ON_ERROR}")
        normalise("compression_level", check_compression(self.compression, self.compression_level)[1])
        normalise("seed", check_int("seed", self.seed, 0))
        normalise("layers", check_layer_selection(self.layers))
        if self.preprocess is not None and not callable(self.preprocess):
            raise ParameterTypeError(f"preprocess must be a function (RGB 0..255 float batch -> model input) or None, "
                                     f"got {type(self.preprocess).__name__}")
        self._check_cluster()
        if not (isinstance(self.units, UnitDraws) or (isinstance(self.units, str) and self.units == "all")):
            raise ParameterTypeError(
                f"units must be 'all' (every unit: the full store) or a cnndiff_xr.UnitDraws(n_units=[200, 10000], "
                f"resamples=10, seed=0) naming the draws to keep, got {type(self.units).__name__}: {self.units!r}")
        for name in ("progress", "break_lock", "filter_means"):
            _flag(name, getattr(self, name))
        normalise("attrs", self._checked_attrs())
        normalise("spec", model_spec(self.model, weights=self.weights, seed=self.seed, preprocess=self.preprocess))

    def _check_cluster(self) -> None:
        if self.client is not None and not isinstance(self.client, (str, Client)):
            raise ParameterTypeError(
                f"client must be None (an embedded LocalCluster), a scheduler address such as 'tcp://10.0.0.5:8786' "
                f"or a distributed.Client, got {type(self.client).__name__}: {self.client!r}")
        if isinstance(self.client, str):
            check_address(self.client, "client")
        check_optional_int("n_workers", self.n_workers, 1, what="a positive int or None (one per core)")
        if self.n_workers is not None and self.client is not None:
            raise ParameterValueError("n_workers sizes the embedded LocalCluster; it cannot be combined with "
                                      "client=...")

    def _checked_attrs(self) -> dict[str, Any]:
        if not isinstance(self.attrs, Mapping) or not all(isinstance(k, str) for k in self.attrs):
            raise ParameterTypeError(f"attrs must be a mapping of str to JSON values, got {self.attrs!r}")
        reserved = sorted(_RESERVED_ATTRS & set(self.attrs))
        if reserved:
            raise ParameterValueError(f"attrs may not set {reserved}: the extraction records them itself")
        try:
            return dict(json.loads(json.dumps(dict(self.attrs))))
        except (TypeError, ValueError) as err:
            raise ParameterTypeError(f"attrs must hold JSON values (str, numbers, lists, dicts): {err}") from None

    @property
    def reduction(self) -> Reduction:
        """What each batch keeps (:class:`~cnndiff_xr.extraction.reduction.Reduction`)."""
        return Reduction(units=None if self.units == "all" else self.units, filter_means=self.filter_means)

    @property
    def in_memory(self) -> bool:
        """Whether the store is an fsspec ``memory://`` store, which lives in one process (then run on threads)."""
        return self.store.startswith("memory://")

    def codec(self) -> Any:
        """The Zarr compressor of the activations (None for ``compression="none"``)."""
        return codec(self.compression, self.compression_level)

    def provenance(self, model: ModelBackend) -> dict[str, Any]:
        """The root attributes of a new store made with these settings and ``model`` (JSON types only): what was
        extracted and how, the versions of the software that did it, and ``attrs``."""
        attrs = {
            FORMAT_ATTR: FORMAT,
            "model": model.model_label,
            "weights": model.weights_label,
            "weights_sha256": model.weights_digest(),
            "input_size": [int(s) for s in model.input_size],
            "resize": self.resize,
            "preprocessing": model.preprocessing,
            LAYERS_ATTR: list(model.layers),
            "dtype": self.dtype,
            UNIT_DRAWS_ATTR: None if self.reduction.units is None else self.reduction.units.to_attrs(),
            FILTER_MEANS_ATTR: self.filter_means,
            "batch_size": self.batch_size,
            "compression": self.compression,
            "compression_level": self.compression_level,
            "seed": self.seed,
            "cnndiff_xr_version": package_version("cnndiff_xr"),
            **model.framework_versions(),
            "xarray_version": xr.__version__,
            "zarr_version": package_version("zarr"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **self.attrs,
        }
        return dict(json.loads(json.dumps(attrs)))

