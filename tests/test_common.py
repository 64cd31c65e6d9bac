"""scikit-learn's common estimator checks on a small, fast CovarianceVAE."""

import warnings

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from sk_covvae import CovarianceVAE, ImageShapeWarning, LatentCollapseWarning


def _fast_instances():
    # The common checks use tiny non-square feature counts (1x3, 1x2, ...),
    # which the estimator treats as 1-D signals with a warning. One epoch of
    # the mean stage, so that 'banded' and 'diagonal' go through both stages.
    return [
        CovarianceVAE(
            n_components=2,
            covariance=covariance,
            mean_epochs=1,
            max_epochs=2,
            batch_size=16,
            channels=(2, 4),
            hidden_units=8,
            random_state=0,
        )
        for covariance in ("banded", "diagonal", "spherical")
    ]


@pytest.fixture(autouse=True)
def _quiet_expected_warnings():
    # Two epochs on the checks' tiny random data leave the latent space
    # unused: the collapse warning is right there.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageShapeWarning)
        warnings.simplefilter("ignore", LatentCollapseWarning)
        yield


@parametrize_with_checks(_fast_instances())
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
