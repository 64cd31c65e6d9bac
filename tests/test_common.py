"""scikit-learn's common estimator checks on a small, fast CovarianceVAE."""

import warnings

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from sk_covvae import CovarianceVAE
from sk_covvae._estimator import ImageShapeWarning


def _fast_instances():
    # The common checks use tiny non-square feature counts (1x3, 1x2, ...),
    # which the estimator treats as 1-D signals with a warning.
    return [
        CovarianceVAE(
            n_components=2,
            covariance=covariance,
            max_epochs=2,
            batch_size=16,
            channels=(2, 4),
            hidden_units=8,
            random_state=0,
        )
        for covariance in ("banded", "diagonal", "spherical")
    ]


@pytest.fixture(autouse=True)
def _quiet_image_shape_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageShapeWarning)
        yield


@parametrize_with_checks(_fast_instances())
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
