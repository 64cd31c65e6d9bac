"""What several test modules share: small image makers, data and tolerances.

The test modules import the constants and makers from here (``from conftest
import ...``; ``tests`` is on ``sys.path`` under pytest's default import
mode) and receive the fixtures by name.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from sk_covvae.datasets import _readers
from sk_covvae.distributions import BandedPrecisionNormal

# Every Avro record goes through the compiled decoder from the first one
# (outside the tests, fastavro decodes a process's first records: see
# _readers._FAST_AFTER); tests/test_fast_readers.py compares the two.
_readers._FAST_AFTER = 0

#: The shared real data beside the project (``../shared/data``): tests that
#: read it skip when it is absent (see ``shared``).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(*parts):
    """Path of a file or folder of the shared data; skip the test if absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is absent")
    return path


#: A tiny CovarianceVAE, for tests of the machinery around the model (model
#: files, scoring engines), not of what it learns.
TINY_MODEL = dict(
    n_components=2,
    max_epochs=2,
    channels=(4, 8),
    hidden_units=16,
    batch_size=64,
    random_state=0,
    device="cpu",
)


def tiny_pipeline(image_shape, **prep):
    """``StampPreprocessor(image_shape, **prep)``, then a ``TINY_MODEL`` VAE."""
    from sklearn.pipeline import Pipeline

    from sk_covvae import CovarianceVAE
    from sk_covvae.preprocessing import StampPreprocessor

    return Pipeline(
        [
            ("prep", StampPreprocessor(image_shape, **prep)),
            ("vae", CovarianceVAE(**TINY_MODEL)),
        ]
    )


@pytest.fixture(scope="session")
def ztf_pipeline_file(tmp_path_factory):
    """A tiny pipeline of the 15x15 difference plane, fitted on 200 real ZTF
    triplets and saved with joblib: ``(path, pipeline, X)``, X the triplets
    flattened. Shared by the scoring engines' tests (Dask, Spark)."""
    import joblib

    X = np.load(shared("ztf_triplets", "ztf_triplets.npz"))["X"][:200]
    X = X.reshape(len(X), -1)
    pipe = tiny_pipeline((3, 63, 63), crop=(15, 15), channels=[2]).fit(X)
    path = tmp_path_factory.mktemp("model") / "model.joblib"
    joblib.dump(pipe, path)
    return path, pipe, X


# device="auto" (the default) trains on the GPU where there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Hand-made references compute in float64 after the network layers, the
# estimator with float32 maps and float64 sums: on CPU they agree to float32
# rounding of the D = 64 pixel terms (of order 1-10), a few 1e-6 nats. On a
# GPU the float32 layers may also pick other kernels for the references'
# batch size than for the estimator's 256-row blocks.
REF_RTOL = 1e-6 if DEVICE == "cpu" else 1e-5
REF_ATOL = 2e-5 if DEVICE == "cpu" else 1e-4

# Side of the images of make_images.
SIDE = 8


def correlated_noise(n, shape, coupling=0.4, seed=0):
    """Images of Gaussian noise with neighbour correlation (a banded precision).

    The precision factor has diagonal 4 and couplings ``4 * coupling`` to the
    right and lower neighbours; rows are the images flattened row-major.
    """
    torch.manual_seed(seed)
    zeros = torch.zeros(shape, dtype=torch.float64)
    d = BandedPrecisionNormal(
        zeros, zeros + np.log(4.0), zeros + 4.0 * coupling, zeros + 4.0 * coupling
    )
    return d.rsample((n,)).reshape(n, -1).numpy()


def make_images(n=240, seed=0):
    """Two classes of 8x8 images: a blob or a bar, plus correlated noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    y = rng.randint(0, 2, n)
    cy, cx = rng.uniform(2.5, 4.5, (2, n))
    blob = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 3)
    bar = np.exp(-((xx - cx[:, None, None]) ** 2) / 0.8) * (abs(yy - 3.5) < 3)
    images = np.where(y[:, None, None] == 1, blob, bar)
    X = images.reshape(n, -1) + correlated_noise(n, (SIDE, SIDE), seed=seed)
    return X, y


def white_noise(n=64, n_features=36, seed=0):
    """``n`` rows of standard normal noise: 6x6 images by default."""
    return np.random.RandomState(seed).normal(size=(n, n_features))


@pytest.fixture(scope="session")
def data():
    """``make_images()``: 240 blob-or-bar images and their classes.

    Shared by the whole session: tests must not modify the arrays.
    """
    return make_images()
