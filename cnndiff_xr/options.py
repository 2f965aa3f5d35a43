"""Every string option of the package, once: a ``Literal`` for type checkers and, derived from it, the tuple of
choices that validation, the registries and the CLI use (as xarray keeps its options in ``core/types.py``).

The module imports nothing from the package. A registry keyed by an option (the distance specs by
``(Norm, Metric)``, the codecs by ``Compression``) checks at import time that it covers exactly these choices.
"""

from __future__ import annotations

from typing import Literal, get_args

# ---- analysis
Norm = Literal["layer", "image", "none"]
Metric = Literal["euclidean", "correlation", "cosine"]
ConstantPolicy = Literal["raise", "zero"]
UnitType = Literal["random", "top", "per_filter", "all"]
Reduction = Literal["median", "mean"]
SimilarityMethod = Literal["cka", "cka_unbiased", "rsa_spearman", "rsa_kendall", "rsa_cosine"]
#: spectral differentiation's distance: the paper's Euclidean distance of the concatenated spectra, or divided by
#: sqrt(units x frequencies) as differentiation's Euclidean "per dimension"
SpectralScale = Literal["paper", "per_dimension"]

NORMS: tuple[Norm, ...] = get_args(Norm)
METRICS: tuple[Metric, ...] = get_args(Metric)
CONSTANT_POLICIES: tuple[ConstantPolicy, ...] = get_args(ConstantPolicy)
UNIT_TYPES: tuple[UnitType, ...] = get_args(UnitType)
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)
SIMILARITY_METHODS: tuple[SimilarityMethod, ...] = get_args(SimilarityMethod)
SPECTRAL_SCALES: tuple[SpectralScale, ...] = get_args(SpectralScale)

# ---- extraction
Dtype = Literal["float32", "float16"]
Compression = Literal["zstd", "blosc", "lz4", "none"]
ResizePolicy = Literal["nearest", "bilinear", "center_crop"]
OnError = Literal["raise", "skip"]
LayerPreset = Literal["seed"]
SpecErrors = Literal["raise", "collect"]
OpenMode = Literal["r", "r+", "a", "w", "w-"]

DTYPES: tuple[Dtype, ...] = get_args(Dtype)
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)
RESIZE_POLICIES: tuple[ResizePolicy, ...] = get_args(ResizePolicy)
ON_ERROR: tuple[OnError, ...] = get_args(OnError)
LAYER_PRESETS: tuple[LayerPreset, ...] = get_args(LayerPreset)
SPEC_ERRORS: tuple[SpecErrors, ...] = get_args(SpecErrors)
OPEN_MODES: tuple[OpenMode, ...] = get_args(OpenMode)
