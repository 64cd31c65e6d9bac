"""Data sets: Fashion-MNIST, simulated difference stamps and survey readers.

``load_*`` and ``read_*`` functions read files, ``make_*`` functions generate
data, as in :mod:`sklearn.datasets`. This subpackage needs numpy, scipy and
scikit-learn only (and, lazily, the ``astro`` extra: fastavro, pandas,
pyarrow, astropy and lsst-alert-packet for :func:`read_alerts`,
:func:`iter_alerts` and :func:`read_alert_cutouts`); it never imports torch.

The real/bogus stamps of :func:`make_difference_stamps` and
:func:`load_hits_chunks` have ``target`` :data:`REAL_LABEL` (1) for real and
:data:`BOGUS_LABEL` (0) for bogus; ``target_names[target]`` names them.
"""

from sk_covvae.datasets._alerts import read_alert_cutouts
from sk_covvae.datasets._fashion_mnist import load_fashion_mnist
from sk_covvae.datasets._hits import load_hits_chunks
from sk_covvae.datasets._readers import (
    ALERT_CHANNELS,
    AlertReadError,
    AlertReadWarning,
    iter_alerts,
    read_alerts,
)
from sk_covvae.datasets._stamps import (
    ARTEFACT_TYPES,
    BOGUS_LABEL,
    DEFAULT_ARTEFACT_WEIGHTS,
    REAL_LABEL,
    make_difference_stamps,
)

__all__ = [
    "ALERT_CHANNELS",
    "ARTEFACT_TYPES",
    "AlertReadError",
    "AlertReadWarning",
    "BOGUS_LABEL",
    "DEFAULT_ARTEFACT_WEIGHTS",
    "REAL_LABEL",
    "load_fashion_mnist",
    "iter_alerts",
    "load_hits_chunks",
    "make_difference_stamps",
    "read_alert_cutouts",
    "read_alerts",
]
