"""A scikit-learn variational autoencoder with a structured-covariance decoder.

``sk_covvae`` provides :class:`CovarianceVAE`, a convolutional variational
autoencoder trained through skorch whose Gaussian decoder models the
correlation between neighbouring pixels through a banded Cholesky factor of
its precision matrix.
"""

from sk_covvae._allocator import retain_freed_memory
from sk_covvae._estimator import (
    CovarianceVAE,
    ImageShapeWarning,
    LatentCollapseWarning,
    TrainingInterruptedWarning,
)
from sk_covvae._show_versions import show_versions

__version__ = "0.1.0.dev0"

__all__ = [
    "CovarianceVAE",
    "ImageShapeWarning",
    "LatentCollapseWarning",
    "TrainingInterruptedWarning",
    "__version__",
    "retain_freed_memory",
    "show_versions",
]
