"""cnndiff_xr: layer-by-layer differentiation of CNN responses, on labelled Zarr stores and Dask.

Heavy frameworks (TensorFlow/Keras) are imported only when a model is built, so
``import cnndiff_xr`` stays fast and analysis-only users never load them.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("cnndiff_xr")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .extraction import images, store  # noqa: E402
from .extraction.store import open_activations, select  # noqa: E402
from .extraction.run import extract  # noqa: E402
from .analysis.differentiation import (  # noqa: E402
    differentiation,
    normalise_by_reference,
    rdm,
    rdm_regression,
    resample_summary,
    stimulus_regression,
)
from .analysis.summaries import filter_means, layer_means  # noqa: E402
from .analysis.draws import select_units  # noqa: E402
