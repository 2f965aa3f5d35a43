"""cnndiff_xr: layer-by-layer differentiation of CNN responses, on labelled Zarr stores and Dask.

Heavy frameworks (TensorFlow/Keras) are imported only when a model is built, so
``import cnndiff_xr`` stays fast and analysis-only users never load them.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("cnndiff_xr")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .analysis.differentiation import differentiation
from .analysis.draws import select_units
from .analysis.inference import bootstrap_differentiation, compare_sets
from .analysis.rdm import rdm
from .analysis.regression import rdm_regression, stimulus_regression
from .analysis.results import normalise_by_reference, resample_summary
from .analysis.similarity import layer_similarity
from .analysis.spectral import spectral_differentiation, spectral_states
from .analysis.summaries import filter_means, layer_means
from .extraction import images, store
from .extraction.checksums import verify_store
from .extraction.run import extract
from .extraction.store import open_activations, select
from .sampling import UnitDraws

__all__ = [
    "UnitDraws",
    "__version__",
    "bootstrap_differentiation",
    "compare_sets",
    "differentiation",
    "extract",
    "filter_means",
    "images",
    "layer_means",
    "layer_similarity",
    "normalise_by_reference",
    "open_activations",
    "rdm",
    "rdm_regression",
    "resample_summary",
    "select",
    "select_units",
    "spectral_differentiation",
    "spectral_states",
    "stimulus_regression",
    "store",
    "verify_store",
]
