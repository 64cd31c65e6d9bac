"""Data sets: Fashion-MNIST, simulated difference stamps and survey readers.

``load_*`` and ``read_*`` functions read files, ``make_*`` functions generate
data, as in :mod:`sklearn.datasets`. This subpackage needs numpy, scipy and
scikit-learn only (and, lazily, fastavro and astropy for
:func:`read_alert_cutouts`); it never imports torch.
"""

from sk_covvae.datasets._alerts import read_alert_cutouts
from sk_covvae.datasets._fashion_mnist import load_fashion_mnist
from sk_covvae.datasets._hits import load_hits_chunks
from sk_covvae.datasets._stamps import (
    ARTEFACT_TYPES,
    DEFAULT_ARTEFACT_WEIGHTS,
    make_difference_stamps,
)

__all__ = [
    "ARTEFACT_TYPES",
    "DEFAULT_ARTEFACT_WEIGHTS",
    "load_fashion_mnist",
    "load_hits_chunks",
    "make_difference_stamps",
    "read_alert_cutouts",
]
