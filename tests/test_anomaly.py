"""CovarianceVAE.anomaly_score: each method against a hand computation."""

import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE, REF_ATOL, REF_RTOL, SIDE
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from sk_covvae import CovarianceVAE, LatentCollapseWarning

METHODS = ["elbo", "iwae", "typicality", "likelihood_ratio"]
D = SIDE * SIDE


@pytest.fixture(scope="module")
def fitted(data):
    # The default stretch, so that the hand-made y below goes through it.
    X, _ = data
    vae = CovarianceVAE(
        n_components=4,
        max_epochs=8,
        batch_size=32,
        lr=3e-3,
        device=DEVICE,
        random_state=0,
    )
    with warnings.catch_warnings():
        # A few epochs: a collapsed latent space is beside the point here.
        warnings.simplefilter("ignore", LatentCollapseWarning)
        return vae.fit(X)


def model_units(est, X):
    """The images as the model sees them, y = a asinh((x - offset) / (a scale))."""
    u = (X - est.offset_) / est.scale_
    a = est.stretch_
    return u if a is None else a * np.arcsinh(u / a)


def test_elbo_is_minus_score_samples(fitted, data):
    X, _ = data
    np.testing.assert_array_equal(fitted.anomaly_score(X), -fitted.score_samples(X))
    np.testing.assert_array_equal(
        fitted.anomaly_score(X, method="elbo"), -fitted.score_samples(X)
    )


def test_iwae_with_one_particle_is_elbo(fitted, data):
    X, _ = data
    np.testing.assert_array_equal(
        fitted.anomaly_score(X, method="iwae", n_particles=1),
        fitted.anomaly_score(X, method="elbo"),
    )


def test_iwae_is_the_importance_weighted_bound(fitted, data):
    # By hand: log mean_j p(y|z_j) p(z_j) / q(z_j|y), z_j = mu + sigma eps_j
    # with the estimator's fixed noise, plus the Jacobian of the data map.
    X, _ = data
    k = 8
    module = fitted.net_.module_
    y = torch.as_tensor(model_units(fitted, X), dtype=torch.float32).to(DEVICE)
    eps = torch.randn(k, 4, generator=torch.Generator().manual_seed(0)).double()
    eps = eps.to(DEVICE)
    with torch.no_grad():
        mu, logvar = module.encode(y, dtype=torch.float64)
        std = torch.exp(0.5 * logvar)
        log_w = []
        for e in eps:
            z = mu + std * e
            log_p = module.decode(z, dtype=torch.float64).log_prob(
                module.images(y).double()
            )
            log_prior = -0.5 * (z**2 + np.log(2 * np.pi)).sum(-1)
            log_q = (-0.5 * (e**2 + np.log(2 * np.pi)) - 0.5 * logvar).sum(-1)
            log_w.append(log_p + log_prior - log_q)
        bound = torch.logsumexp(torch.stack(log_w), 0) - np.log(k)
    u = (X - fitted.offset_) / fitted.scale_
    log_det = -D * np.log(fitted.scale_) - 0.5 * np.log1p(
        (u / fitted.stretch_) ** 2
    ).sum(1)
    expected = -(bound.cpu().numpy() + log_det)
    np.testing.assert_allclose(
        fitted.anomaly_score(X, method="iwae", n_particles=k),
        expected,
        rtol=REF_RTOL,
        atol=REF_ATOL,
    )


def test_iwae_tightens_with_more_particles(fitted, data):
    X, _ = data
    elbo = fitted.anomaly_score(X, method="iwae", n_particles=1).mean()
    iwae = fitted.anomaly_score(X, method="iwae", n_particles=32).mean()
    assert iwae < elbo


def test_typicality_is_the_z_score_of_the_whitened_residual(fitted, data):
    # r = L^T (y - mu) with the dense factor L of the decoder at z = E[z|x].
    X, _ = data
    X = X[:20]
    module = fitted.net_.module_
    y = torch.as_tensor(model_units(fitted, X), dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        z = module.encode(y)[0]
        px = module.decode(z, dtype=torch.float64)
        L = px.precision_factor
        e = y.double() - px.loc.reshape(len(X), -1)
        r = (L.mT @ e[..., None])[..., 0]
    q = (r**2).sum(-1).cpu().numpy()
    expected = np.abs(q - D) / np.sqrt(2 * D)
    np.testing.assert_allclose(
        fitted.anomaly_score(X, method="typicality"), expected, rtol=1e-5, atol=1e-5
    )


def test_whitened_residual_of_decoder_draws_is_chi_square(fitted, data):
    # At a fixed z, images drawn from the decoder have ||L^T (y - mu)||^2
    # ~ chi^2_D: mean D, variance 2D.
    X, _ = data
    n = 4000
    module = fitted.net_.module_
    y = torch.as_tensor(model_units(fitted, X[:1]), dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        px = module.decode(module.encode(y.to(DEVICE))[0], dtype=torch.float64)
        draws = px.rsample((n,))[:, 0]
        L = px.precision_factor[0]
        e = (draws - px.loc[0]).reshape(n, -1)
        q = ((e @ L) ** 2).sum(-1).cpu().numpy()
        q_whiten = px.whiten(draws[:, None])[:, 0].pow(2).sum((-2, -1)).cpu().numpy()
    np.testing.assert_allclose(q_whiten, q, rtol=1e-9)
    # Standard errors of the sample mean and variance of chi^2_D.
    se_mean = np.sqrt(2 * D / n)
    se_var = np.sqrt((8 * D**2 + 48 * D) / n)
    assert abs(q.mean() - D) < 5 * se_mean
    assert abs(q.var() - 2 * D) < 5 * se_var
    # So the score is about |N(0, 1)|: mean sqrt(2 / pi).
    score = np.abs(q - D) / np.sqrt(2 * D)
    assert abs(score.mean() - np.sqrt(2 / np.pi)) < 5 * score.std() / np.sqrt(n)


def test_likelihood_ratio_subtracts_the_gaussian_code_length(fitted, data):
    X, _ = data
    m = X.mean(1, keepdims=True)
    v = ((X - m) ** 2).mean(1)
    assert (v > (fitted.min_scale * fitted.scale_) ** 2).all()
    code_length = 0.5 * D * (np.log(2 * np.pi * v) + 1)
    np.testing.assert_allclose(
        fitted.anomaly_score(X, method="likelihood_ratio"),
        -fitted.score_samples(X) - code_length,
        rtol=1e-12,
        atol=1e-9,
    )


def test_likelihood_ratio_of_a_constant_image_is_finite(fitted, data):
    X, _ = data
    flat = np.full((1, D), X.mean())
    v = (fitted.min_scale * fitted.scale_) ** 2
    code_length = 0.5 * D * np.log(2 * np.pi * v)
    score = fitted.anomaly_score(flat, method="likelihood_ratio")
    assert np.isfinite(score).all()
    np.testing.assert_allclose(
        score, -fitted.score_samples(flat) - code_length, rtol=1e-12
    )


@pytest.mark.parametrize("method", METHODS)
def test_scores_are_subset_invariant(fitted, data, method):
    X, _ = data
    full = fitted.anomaly_score(X, method=method, n_particles=4)
    assert full.shape == (len(X),) and full.dtype == np.float64
    np.testing.assert_allclose(
        fitted.anomaly_score(X[:5], method=method, n_particles=4),
        full[:5],
        rtol=1e-9,
        atol=1e-9,
    )
    np.testing.assert_allclose(
        fitted.anomaly_score(X[::-1], method=method, n_particles=4),
        full[::-1],
        rtol=1e-9,
        atol=1e-9,
    )


@pytest.mark.parametrize("method", ["ELBO", "nll", None, 1])
def test_unknown_method_raises(fitted, data, method):
    X, _ = data
    with pytest.raises(InvalidParameterError, match="method must be"):
        fitted.anomaly_score(X, method=method)


@pytest.mark.parametrize("n_particles", [0, -1, 2.5, True, "4"])
def test_bad_n_particles_raises(fitted, data, n_particles):
    X, _ = data
    with pytest.raises(ValueError, match="n_particles must be"):
        fitted.anomaly_score(X, method="iwae", n_particles=n_particles)


def test_unfitted_raises(data):
    X, _ = data
    with pytest.raises(NotFittedError):
        CovarianceVAE().anomaly_score(X)


def test_wrong_number_of_features_raises(fitted, data):
    X, _ = data
    with pytest.raises(ValueError, match="features"):
        fitted.anomaly_score(X[:, :-1], method="typicality")


@pytest.mark.parametrize("method", METHODS)
def test_float32_input_agrees_with_float64(fitted, data, method):
    # The network runs in float32 either way: the scores differ by the
    # rounding of the input only.
    X, _ = data
    np.testing.assert_allclose(
        fitted.anomaly_score(X.astype(np.float32), method=method, n_particles=4),
        fitted.anomaly_score(X, method=method, n_particles=4),
        rtol=1e-5,
        atol=1e-4,
    )
