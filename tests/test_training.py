"""Training stages and the latent-space diagnostics of CovarianceVAE."""

import warnings

import numpy as np
import pytest
import torch

from sk_covvae import CovarianceVAE, LatentCollapseWarning
from sk_covvae._modules import VAEModule
from sk_covvae.distributions import SphericalPrecisionNormal

SMALL = {"channels": (4, 8), "hidden_units": 32, "batch_size": 32, "device": "cpu"}


def blobs(n, side=8, seed=0, noise=0.3):
    """Images of one Gaussian blob of random position and brightness, plus noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:side, :side]
    cy, cx = rng.uniform(2, side - 3, (2, n))
    amp = rng.uniform(1.0, 4.0, n)
    images = amp[:, None, None] * np.exp(
        -((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 2.0
    )
    return images.reshape(n, -1) + noise * rng.normal(size=(n, side * side))


@pytest.mark.parametrize("covariance", ["banded", "diagonal"])
def test_mean_stage_uses_one_scale_for_every_pixel(covariance):
    module = VAEModule((6, 5), 3, covariance=covariance)
    module.stage = "mean"
    _, _, px = module(torch.randn(4, 30))
    assert isinstance(px, SphericalPrecisionNormal)
    module.stage = "joint"
    _, _, px = module(torch.randn(4, 30))
    assert not isinstance(px, SphericalPrecisionNormal)


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="stage"):
        VAEModule((4, 4), 2).stage = "both"


@pytest.mark.parametrize(
    "stage, trained",
    [
        ("mean", {"encoder", "decoder.trunk", "decoder.mean_head", "decoder.raw"}),
        ("covariance", {"decoder.covariance_head"}),
        (
            "joint",
            {
                "encoder",
                "decoder.trunk",
                "decoder.mean_head",
                "decoder.covariance_head",
            },
        ),
    ],
)
def test_each_stage_trains_exactly_its_parameters(stage, trained):
    torch.manual_seed(0)
    module = VAEModule((6, 6), 3, covariance="banded", channels=(2, 4), hidden_units=8)
    module.stage = stage
    mu, logvar, px = module(torch.randn(5, 36))
    (-px.log_prob(torch.randn(5, 6, 6)).sum() + mu.pow(2).sum()).backward()
    got = set()
    for name, p in module.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            prefix = ".".join(name.split(".")[:2])
            got.add("decoder.raw" if prefix == "decoder.raw_log_diag" else prefix)
    got = {g if not g.startswith("encoder") else "encoder" for g in got}
    assert got == trained


@pytest.mark.parametrize("covariance", ["banded", "diagonal"])
def test_frozen_mean_keeps_the_latents_of_the_mean_stage(covariance):
    # With the same seed, the mean stage is the spherical model's training
    # step for step; freeze_mean then keeps its encoder exactly.
    X = blobs(120)
    common = dict(validation_fraction=None, patience=None, random_state=0, **SMALL)
    spherical = CovarianceVAE(2, covariance="spherical", max_epochs=3, **common).fit(X)
    frozen = CovarianceVAE(
        2,
        covariance=covariance,
        mean_epochs=3,
        max_epochs=2,
        freeze_mean=True,
        **common,
    ).fit(X)
    np.testing.assert_array_equal(frozen.transform(X), spherical.transform(X))
    np.testing.assert_array_equal(
        frozen.inverse_transform(frozen.transform(X[:5])),
        spherical.inverse_transform(spherical.transform(X[:5])),
    )
    # ... while its covariance head did learn: the density differs.
    assert not np.allclose(frozen.score_samples(X), spherical.score_samples(X))


def test_joint_second_stage_moves_the_encoder():
    X = blobs(120)
    common = dict(validation_fraction=None, patience=None, random_state=0, **SMALL)
    spherical = CovarianceVAE(2, covariance="spherical", max_epochs=3, **common).fit(X)
    joint = CovarianceVAE(2, mean_epochs=3, max_epochs=2, freeze_mean=False, **common)
    joint.fit(X)
    assert not np.allclose(joint.transform(X), spherical.transform(X))


def test_history_records_the_stage_of_every_epoch():
    X = blobs(120)
    vae = CovarianceVAE(
        2, mean_epochs=3, max_epochs=2, patience=None, random_state=0, **SMALL
    ).fit(X)
    assert vae.net_.history[:, "stage"] == ["mean"] * 3 + ["joint"] * 2
    assert vae.n_epochs_ == 5
    # The module is left in the joint stage: inference uses the full model.
    assert vae.net_.module_.stage == "joint"


def test_spherical_and_mean_epochs_zero_have_one_stage():
    X = blobs(100)
    for params in ({"covariance": "spherical"}, {"mean_epochs": 0}):
        vae = CovarianceVAE(
            2, max_epochs=2, patience=None, random_state=0, **params, **SMALL
        ).fit(X)
        assert vae.net_.history[:, "stage"] == ["joint", "joint"]


def test_each_stage_stops_early_on_its_own():
    X = blobs(200)
    vae = CovarianceVAE(
        2, mean_epochs=50, max_epochs=50, patience=1, lr=0.05, random_state=0, **SMALL
    ).fit(X)
    stages = vae.net_.history[:, "stage"]
    n_mean = stages.count("mean")
    assert 2 <= n_mean < 50  # stopped early, yet went on to the second stage
    assert stages[n_mean:] == ["joint"] * (len(stages) - n_mean)
    assert 2 <= len(stages) - n_mean < 50


def test_warm_start_continues_the_last_stage():
    X = blobs(100)
    vae = CovarianceVAE(
        2,
        mean_epochs=2,
        max_epochs=1,
        patience=None,
        warm_start=True,
        freeze_mean=True,
        random_state=0,
        **SMALL,
    ).fit(X)
    vae.fit(X)
    assert vae.net_.history[:, "stage"] == ["mean", "mean", "covariance", "covariance"]


def test_latent_diagnostics_match_a_hand_computation():
    X = blobs(150)
    vae = CovarianceVAE(
        3, max_epochs=3, patience=None, validation_fraction=0.2, random_state=0, **SMALL
    ).fit(X)
    Xt, _ = _model_view(vae, X)
    _, valid = vae.net_.get_split_datasets(Xt)
    with torch.no_grad():
        rows = Xt[torch.as_tensor(valid.indices)]
        mu, logvar = vae.net_.module_.encode(rows, dtype=torch.float64)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).numpy()
    np.testing.assert_allclose(vae.kl_per_component_, np.median(kl, 0), rtol=1e-5)
    q25, q75 = np.percentile(mu.numpy(), [25, 75], axis=0)
    activity = ((q75 - q25) / 1.3489795) ** 2
    np.testing.assert_allclose(vae.latent_activity_, activity, rtol=1e-5, atol=1e-9)
    assert vae.n_active_components_ == int(np.sum(activity > 0.01))
    assert vae.kl_per_component_.shape == (3,)


def test_collapse_warning_fires_on_pure_noise_and_not_on_images_with_structure():
    # White noise has nothing for the latents to carry: the posterior
    # collapses to the prior, and fit says so.
    rng = np.random.RandomState(0)
    noise = rng.normal(size=(400, 64))
    with pytest.warns(LatentCollapseWarning, match="collapsed"):
        vae = CovarianceVAE(
            2, covariance="diagonal", max_epochs=15, random_state=0, **SMALL
        ).fit(noise)
    assert vae.n_active_components_ == 0
    # Blobs of varying position and brightness: the latents carry them.
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentCollapseWarning)
        vae = CovarianceVAE(
            2, covariance="diagonal", max_epochs=15, random_state=0, **SMALL
        ).fit(blobs(400))
    assert vae.n_active_components_ >= 1


def test_fit_leaves_malloc_alone(monkeypatch):
    from sk_covvae import _allocator

    calls = []
    monkeypatch.setattr(_allocator, "retain_freed_memory", lambda: calls.append(1))
    monkeypatch.setitem(_allocator._state, "applied", None)
    vae = CovarianceVAE(2, max_epochs=1, patience=None, random_state=0, **SMALL)
    vae.fit(blobs(64)).score_samples(blobs(8))
    assert calls == []
    assert _allocator._state["applied"] is None


@pytest.fixture(scope="module")
def stretched():
    rng = np.random.RandomState(1)
    X = blobs(150, seed=1)
    X[:5] += 200.0 * rng.rand(5, 1)  # a few extreme images
    vae = CovarianceVAE(
        2, stretch=2.0, max_epochs=2, mean_epochs=1, random_state=0, **SMALL
    ).fit(X)
    return vae, X


def _model_view(vae, X):
    u = (X - vae.offset_) / vae.scale_
    y = vae.stretch_ * np.arcsinh(u / vae.stretch_)
    log_det = -X.shape[1] * np.log(vae.scale_) - 0.5 * np.log1p(
        (u / vae.stretch_) ** 2
    ).sum(1)
    return torch.as_tensor(y, dtype=torch.float32), log_det


def test_stretched_scores_are_the_change_of_variables(stretched):
    from sk_covvae._net import log_likelihood_bound

    vae, X = stretched
    y, log_det = _model_view(vae, X)
    eps = vae._fixed_noise(1)
    with torch.no_grad():
        bound = log_likelihood_bound(vae.net_.module_.eval(), y, eps).numpy()
    np.testing.assert_allclose(vae.score_samples(X), bound + log_det, rtol=1e-5)


def test_stretched_means_and_samples_come_back_in_data_units(stretched):
    vae, X = stretched
    y, _ = _model_view(vae, X[:4])
    module = vae.net_.module_.eval()
    with torch.no_grad():
        mu, _ = module.encode(y)
        loc = module.decode(mu).mean.reshape(4, -1).double().numpy()
    expected = vae.offset_ + vae.scale_ * 2.0 * np.sinh(loc / 2.0)
    np.testing.assert_allclose(
        vae.inverse_transform(vae.transform(X[:4])), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(vae.transform(X[:4]), mu.numpy(), rtol=1e-5, atol=1e-6)
    assert np.isfinite(vae.sample(20, random_state=0)).all()


def test_no_stretch_is_a_gaussian_in_data_units():
    X = blobs(100)
    vae = CovarianceVAE(2, stretch=None, max_epochs=1, random_state=0, **SMALL).fit(X)
    from sk_covvae._net import log_likelihood_bound

    y = torch.as_tensor((X - vae.offset_) / vae.scale_, dtype=torch.float32)
    with torch.no_grad():
        bound = log_likelihood_bound(vae.net_.module_.eval(), y, vae._fixed_noise(1))
    np.testing.assert_allclose(
        vae.score_samples(X),
        bound.numpy() - X.shape[1] * np.log(vae.scale_),
        rtol=1e-5,
    )
