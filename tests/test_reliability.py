"""Bad input, numerical safety, persistence, interruption and warm starts."""

import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import white_noise
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

import sk_covvae._net as net_module
from sk_covvae import CovarianceVAE, LatentCollapseWarning
from sk_covvae._estimator import (
    TrainingInterruptedWarning,
    _reproducible_kernels,
)
from sk_covvae._net import VAENet
from sk_covvae.distributions import covariance_eigenvalue_bounds

# One training stage: epoch counts below are those of one early-stopping run.
FAST = dict(n_components=2, mean_epochs=0, max_epochs=2, batch_size=16, random_state=0)

# The images here are white noise, which no latent dimension can carry: the
# collapse warning is right, and tests/test_training.py checks it.
pytestmark = pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")


@pytest.fixture(scope="module")
def fitted():
    return CovarianceVAE(**FAST).fit(white_noise())


# ----------------------------------------------------------------- bad input
X_NAN = white_noise()
X_NAN[3, 5] = np.nan
X_INF = white_noise()
X_INF[0, 0] = np.inf

BAD_FIT_INPUT = [
    (X_NAN, ValueError, "Input X contains NaN"),
    (X_INF, ValueError, "Input X contains infinity"),
    (sp.csr_matrix(white_noise()), TypeError, "Sparse data was passed"),
    (white_noise()[0], ValueError, "Expected 2D array, got 1D array"),
    (white_noise().reshape(64, 6, 6), ValueError, "Found array with dim 3"),
    (np.empty((0, 36)), ValueError, "0 sample"),
    (np.empty((5, 0)), ValueError, "0 feature"),
    (white_noise()[:1], ValueError, "1 sample"),
    (np.array([["a", "b"], ["c", "d"]]), ValueError, "could not convert|dtype"),
    (white_noise().astype(complex), ValueError, "Complex data not supported"),
]


@pytest.mark.parametrize("X, error, match", BAD_FIT_INPUT)
def test_bad_input_to_fit(X, error, match):
    with pytest.raises(error, match=match):
        CovarianceVAE(**FAST).fit(X)


@pytest.mark.parametrize(
    "method", ["transform", "score_samples", "score", "reconstruction_log_likelihood"]
)
@pytest.mark.parametrize(
    "X, match",
    [
        (X_NAN, "Input X contains NaN"),
        (X_INF, "Input X contains infinity"),
        (white_noise()[:, :25], "X has 25 features, but CovarianceVAE is expecting 36"),
        (white_noise()[0], "Expected 2D array"),
    ],
)
def test_bad_input_after_fit(fitted, method, X, match):
    with pytest.raises(ValueError, match=match):
        getattr(fitted, method)(X)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad, match", [(np.nan, "NaN"), (-np.inf, "infinity")])
def test_non_finite_value_far_into_a_large_input_is_reported(fitted, dtype, bad, match):
    # Inference checks finiteness while it standardizes, chunk by chunk: a
    # bad value in a late chunk is still found, with scikit-learn's message.
    X = np.zeros((5000, 36), dtype=dtype)
    X[4700, 7] = bad
    with pytest.raises(ValueError, match=f"Input X contains {match}"):
        fitted.transform(X)


def test_out_of_range_input_after_fit(fitted):
    with pytest.raises(ValueError, match="float32 after standardization"):
        fitted.transform(np.full((2, 36), 1e300))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"covariance": "full"}, "covariance"),
        ({"n_components": 0}, "n_components"),
        ({"n_components": 2.5}, "n_components"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"mean_epochs": -1}, "mean_epochs"),
        ({"freeze_mean": "yes"}, "freeze_mean"),
        ({"stretch": 0.0}, "stretch"),
        ({"neighbourhood": "5x5"}, "neighbourhood"),
        ({"patience": 0}, "patience"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"image_shape": "6x6"}, "image_shape"),
        ({"random_state": "seed"}, "random_state"),
        ({"warm_start": "yes"}, "warm_start"),
    ],
)
def test_invalid_parameters_are_named(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        CovarianceVAE(**{**FAST, **params}).fit(white_noise())


@pytest.mark.parametrize(
    "params, match",
    [
        ({"image_shape": (0, 36)}, "two positive integers"),
        ({"image_shape": (6.0, 6.0)}, "two positive integers"),
        ({"image_shape": (1, 2, 3, 6)}, r"two positive integers \(H, W\) or three"),
        ({"image_shape": (0, 6, 6)}, "three"),
        ({"image_shape": (5, 5)}, "holds 25 values but X has 36 features"),
        ({"image_shape": (2, 3, 3)}, "holds 18 values but X has 36 features"),
        ({"min_scale": 1.0, "max_scale": 0.5}, "min_scale=1.0 must be smaller"),
        ({"validation_fraction": None}, "Early stopping needs a validation set"),
        ({"channels": (4,)}, "channels must be two positive integers"),
        ({"device": "gpu0"}, "not a valid torch device"),
    ],
)
def test_inconsistent_parameters_are_clear_errors(params, match):
    with pytest.raises(ValueError, match=match):
        CovarianceVAE(**{**FAST, **params}).fit(white_noise())


def test_too_few_samples_for_the_validation_split():
    with pytest.raises(ValueError, match="too few to hold out"):
        CovarianceVAE(**FAST, validation_fraction=0.6).fit(white_noise(n=2))
    # Without a validation split two samples are enough.
    CovarianceVAE(**FAST, validation_fraction=None, patience=None).fit(white_noise(n=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda(device):
    with pytest.raises(ValueError, match="CUDA is not available"):
        CovarianceVAE(**{**FAST, "device": device}).fit(white_noise())


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_sample_needs_a_positive_integer(fitted, n):
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        fitted.sample(n_samples=n)


def test_inverse_transform_checks_its_input(fitted):
    with pytest.raises(ValueError, match="n_components=2"):
        fitted.inverse_transform(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        fitted.inverse_transform(np.full((3, 2), np.nan))


def test_unfitted_estimator_says_so():
    for method in ("transform", "score_samples", "inverse_transform"):
        with pytest.raises(NotFittedError):
            getattr(CovarianceVAE(), method)(white_noise())
    with pytest.raises(NotFittedError):
        CovarianceVAE().sample()


def test_uint8_input_is_converted_without_rescaling():
    X8 = np.random.RandomState(0).randint(0, 256, size=(64, 36)).astype(np.uint8)
    a = CovarianceVAE(**FAST).fit(X8)
    b = CovarianceVAE(**FAST).fit(X8.astype(np.float64))
    assert a.offset_ == pytest.approx(np.median(X8))
    np.testing.assert_array_equal(a.transform(X8), b.transform(X8.astype(float)))


# --------------------------------------------------------- numerical safety
def _adversarial(kind):
    rng = np.random.RandomState(0)
    n, side = 64, 6
    if kind == "constant":
        return np.full((n, side * side), 3.0)
    if kind == "zeros":
        return np.zeros((n, side * side))
    if kind == "dynamic_range":  # faint noise and saturated bright sources
        X = rng.normal(size=(n, side * side))
        X[::4, 14] = 1e5
        return X
    if kind == "spikes":
        X = np.zeros((n, side * side))
        X[np.arange(n), rng.randint(0, side * side, n)] = 1.0
        return X
    if kind == "float32_huge":
        return rng.normal(size=(n, side * side)).astype(np.float32) * 1e37
    if kind == "float32_tiny":
        return rng.normal(size=(n, side * side)).astype(np.float32) * 1e-37
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    ["constant", "zeros", "dynamic_range", "spikes", "float32_huge", "float32_tiny"],
)
@pytest.mark.parametrize("covariance", ["banded", "diagonal", "spherical"])
def test_adversarial_images_fit_without_nan(kind, covariance):
    # Both training stages, and the default stretch.
    X = _adversarial(kind)
    params = {**FAST, "covariance": covariance, "mean_epochs": 1, "max_epochs": 3}
    vae = CovarianceVAE(**params).fit(X)
    assert np.isfinite(vae.net_.history[:, "train_loss"]).all()
    assert np.isfinite(vae.transform(X)).all()
    assert np.isfinite(vae.score_samples(X)).all()
    assert np.isfinite(vae.inverse_transform(vae.transform(X))).all()
    assert np.isfinite(vae.sample(16, random_state=0)).all()


@pytest.mark.parametrize(
    "params",
    [
        {"covariance": "banded"},
        {"covariance": "banded", "neighbourhood": "3x3"},
        {"covariance": "diagonal"},
        {"covariance": "spherical"},
    ],
)
def test_decoder_covariance_stays_inside_the_stated_bound(params):
    vae = CovarianceVAE(**FAST, **params).fit(white_noise())
    module = vae.net_.module_
    # Latent codes far outside the prior push the heads to extreme outputs.
    z = torch.cat([torch.zeros(1, 2), 1e4 * torch.randn(7, 2)]).to(vae.device_)
    with torch.no_grad():
        px = module.decode(z, dtype=torch.float64)
        eig = torch.linalg.eigvalsh(px.covariance_matrix)
    low, high = covariance_eigenvalue_bounds((-np.log(10.0), -np.log(1e-3)), 0.9)
    assert torch.isfinite(eig).all()
    assert eig.min() >= low * (1 - 1e-9) and eig.max() <= high * (1 + 1e-9)


def test_non_finite_loss_stops_training_and_keeps_best_weights(monkeypatch):
    calls = {"n": 0}
    original = net_module.negative_elbo

    def failing(mu, logvar, px, x):
        calls["n"] += 1
        loss = original(mu, logvar, px, x)
        return loss * np.nan if calls["n"] > 12 else loss

    monkeypatch.setattr(net_module, "negative_elbo", failing)
    vae = CovarianceVAE(**{**FAST, "max_epochs": 50})
    X = white_noise()
    with pytest.raises(FloatingPointError, match="non-finite.*best so far"):
        vae.fit(X)
    monkeypatch.setattr(net_module, "negative_elbo", original)
    # The estimator is usable, with finite weights from a good epoch.
    assert np.isfinite(vae.transform(X)).all()
    assert np.isfinite(vae.score_samples(X)).all()
    for p in vae.net_.module_.parameters():
        assert torch.isfinite(p).all()


# --------------------------------------------------------------- persistence
def test_model_fitted_on_cuda_loads_on_cpu(fitted):
    # Emulate a CUDA-fitted pickle: skorch records the device and maps the
    # tensors to the CPU on loading where CUDA is absent.
    if torch.cuda.is_available():
        pytest.skip("emulation only meaningful without CUDA")
    X = white_noise()
    state = pickle.dumps(fitted)
    clone_ = pickle.loads(state)
    clone_.net_.device = "cuda"
    clone_.device_ = "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skorch's DeviceWarning
        restored = pickle.loads(pickle.dumps(clone_))
    assert str(restored.net_.device) == "cpu"
    np.testing.assert_array_equal(restored.transform(X), fitted.transform(X))
    np.testing.assert_array_equal(restored.score_samples(X), fitted.score_samples(X))


# ----------------------------------------------- interruption and warm start
def test_keyboard_interrupt_keeps_a_usable_estimator(monkeypatch):
    def interrupt_in_epoch_4(self, net, **kwargs):
        if len(net.history) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(VAENet, "on_epoch_end", interrupt_in_epoch_4, raising=False)
    X = white_noise()
    vae = CovarianceVAE(**{**FAST, "max_epochs": 20})
    with pytest.warns(TrainingInterruptedWarning, match="interrupted after 4 epochs"):
        vae.fit(X)
    assert vae.n_epochs_ == 4
    assert np.isfinite(vae.transform(X)).all()
    stopper = dict(vae.net_.callbacks_)["early_stopping"]
    state = vae.net_.module_.state_dict()
    for name, saved in stopper.best_model_weights_.items():
        torch.testing.assert_close(state[name], saved, rtol=0, atol=0)

    monkeypatch.undo()
    vae.set_params(warm_start=True, max_epochs=3, patience=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingInterruptedWarning)
        vae.fit(X)
    assert vae.n_epochs_ == 7


def test_warm_start_continues_instead_of_restarting():
    X = white_noise()
    cold = CovarianceVAE(**{**FAST, "max_epochs": 3}).fit(X)
    warm = CovarianceVAE(**{**FAST, "max_epochs": 3, "warm_start": True}).fit(X)
    np.testing.assert_array_equal(warm.transform(X), cold.transform(X))
    module = warm.net_.module_
    warm.fit(X)
    assert warm.net_.module_ is module
    assert warm.n_epochs_ == 6
    assert not np.array_equal(warm.transform(X), cold.transform(X))
    with pytest.raises(ValueError, match="X has 16 features"):
        warm.fit(white_noise(n_features=16))


def test_reproducible_kernels_sets_and_restores_cudnn_flags():
    # Inference and training run under this context on CUDA (same scores on
    # every call, same fit for the same random_state, no TF32); it must leave
    # the process's flags as it found them, also when the body raises.
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul

    def flags():
        return (
            cudnn.deterministic,
            cudnn.benchmark,
            cudnn.allow_tf32,
            matmul.allow_tf32,
        )

    before = flags()
    with _reproducible_kernels("cpu"):
        assert flags() == before
    with pytest.raises(RuntimeError, match="inside"):
        with _reproducible_kernels("cuda:0"):
            assert flags() == (True, False, False, False)
            raise RuntimeError("inside")
    assert flags() == before


@pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_only_input_neither_raises_nor_warns(dtype, tmp_path):
    # What workers hand over: memory maps, Arrow buffers, np.frombuffer views.
    X = white_noise(n=80).astype(dtype)
    path = tmp_path / "X.npy"
    np.save(path, X)
    mapped = np.load(path, mmap_mode="r")
    viewed = np.frombuffer(X.tobytes(), dtype=dtype).reshape(X.shape)
    assert not mapped.flags.writeable and not viewed.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", LatentCollapseWarning)
        vae = CovarianceVAE(n_components=2, max_epochs=1, random_state=0).fit(mapped)
        for data in (mapped, viewed):
            vae.transform(data)
            vae.score_samples(data)
            for method in ("typicality", "likelihood_ratio"):
                vae.anomaly_score(data, method=method)
            vae.decoder_moments(data[:2])
            Z = vae.transform(data)
            Z.flags.writeable = False
            vae.inverse_transform(Z)
    np.testing.assert_array_equal(vae.score_samples(viewed), vae.score_samples(X))
