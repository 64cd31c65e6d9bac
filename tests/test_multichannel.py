"""Multi-channel images: CovarianceVAE(image_shape=(C, H, W)).

The (C, H, W) log-density is checked against a dense multivariate normal
with the block-diagonal precision built by hand from each channel's own
factor, at the distribution, the decoder and the estimator level (the
per-channel standardization and its Jacobian included).
"""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE, make_images, shared
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline

from sk_covvae import CovarianceVAE, LatentCollapseWarning
from sk_covvae._estimator import _SCORE_SEED
from sk_covvae.distributions import (
    BandedPrecisionNormal,
    DiagonalPrecisionNormal,
    IndependentChannels,
    SphericalPrecisionNormal,
    StencilPrecisionNormal,
)
from sk_covvae.preprocessing import StampPreprocessor

short_fit = pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")

CASES = [
    {"covariance": "banded"},
    {"covariance": "banded", "neighbourhood": "3x3"},
    {"covariance": "diagonal"},
    {"covariance": "spherical"},
]
SHAPE = (3, 8, 8)


def three_channel_images(n=240, seed=0):
    """Blob-or-bar images in three channels of very different levels and units.

    Channel 0 is the image, channel 1 the same plus 1000 and times 50 (a
    science plane in counts), channel 2 an independent copy with other noise.
    """
    X, y = make_images(n, seed)
    other, _ = make_images(n, seed + 1)
    stack = np.stack([X, 1000.0 + 50.0 * X, other], axis=1)
    return stack.reshape(n, -1).astype(np.float32), y


@pytest.fixture(scope="module")
def data3():
    return three_channel_images()


def _random_parameters(kind, shape, generator):
    """Parameters of a precision-factor Gaussian of batch (N, C), float64."""

    def rand(*s):
        return torch.rand(*s, generator=generator, dtype=torch.float64)

    loc = rand(*shape) - 0.5
    log_diag = 0.5 * (rand(*shape) - 0.5)
    if kind == "spherical":
        return (loc, log_diag[..., 0, 0])
    if kind == "diagonal":
        return (loc, log_diag)
    if kind == "banded":
        return (loc, log_diag, 0.4 * (rand(*shape) - 0.5), 0.4 * (rand(*shape) - 0.5))
    return (loc, log_diag, 0.2 * (rand(*shape[:-2], 4, *shape[-2:]) - 0.5))


def _make(kind, params):
    if kind == "spherical":
        return SphericalPrecisionNormal(*params)
    if kind == "diagonal":
        return DiagonalPrecisionNormal(*params)
    if kind == "banded":
        return BandedPrecisionNormal(*params)
    return StencilPrecisionNormal(*params, neighbourhood="3x3")


# --------------------------------------------------------------------------
# the distribution
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["spherical", "diagonal", "banded", "3x3"])
def test_independent_channels_matches_dense_normal(kind):
    g = torch.Generator().manual_seed(0)
    N, C, H, W = 4, 3, 4, 5
    params = _random_parameters(kind, (N, C, H, W), g)
    d = IndependentChannels(_make(kind, params))
    assert d.batch_shape == (N,) and d.event_shape == (C, H, W)
    # The block-diagonal factor, from one distribution per image and channel.
    L = torch.stack(
        [
            torch.block_diag(
                *[
                    _make(kind, [p[n, c] for p in params]).precision_factor
                    for c in range(C)
                ]
            )
            for n in range(N)
        ]
    )
    torch.testing.assert_close(d.precision_factor, L, rtol=0, atol=0)
    dense = torch.distributions.MultivariateNormal(
        params[0].reshape(N, -1), precision_matrix=L @ L.mT
    )
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        d.log_prob(x), dense.log_prob(x.reshape(N, -1)), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(d.covariance_matrix, dense.covariance_matrix)
    torch.testing.assert_close(d.entropy(), dense.entropy(), rtol=0, atol=1e-9)
    # whiten is L^T (x - mu) over the whole image; reparameterize inverts it.
    e = (x - params[0]).reshape(N, -1, 1)
    torch.testing.assert_close(
        d.whiten(x).reshape(N, -1), (L.mT @ e)[..., 0], rtol=0, atol=1e-12
    )
    torch.testing.assert_close(d.reparameterize(d.whiten(x)), x)


def test_independent_channels_samples_have_the_block_covariance():
    g = torch.Generator().manual_seed(1)
    d = IndependentChannels(_make("3x3", _random_parameters("3x3", (1, 2, 3, 3), g)))
    torch.manual_seed(0)
    draws = d.rsample((40_000,))[:, 0].reshape(40_000, -1)
    empirical = torch.cov(draws.T)
    scale = d.covariance_matrix[0].diagonal().max()
    torch.testing.assert_close(
        empirical, d.covariance_matrix[0], rtol=0, atol=0.05 * float(scale)
    )
    # channels independent: the off-diagonal blocks vanish
    assert empirical[:9, 9:].abs().max() < 0.05 * scale


def test_independent_channels_rejects_what_it_cannot_model():
    with pytest.raises(TypeError, match="precision-factor Gaussian"):
        IndependentChannels(torch.distributions.Normal(0.0, 1.0))
    base = DiagonalPrecisionNormal(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="channel dimension"):
        IndependentChannels(base)
    d = IndependentChannels(
        DiagonalPrecisionNormal(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    )
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 4, 4\)"):
        d.log_prob(torch.zeros(2, 4, 4))
    assert d.expand((5, 2)).batch_shape == (5, 2)


# --------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c.values()))
def fitted3(request, data3):
    X, _ = data3
    vae = CovarianceVAE(
        image_shape=SHAPE,
        n_components=3,
        max_epochs=4,
        batch_size=64,
        channels=(4, 8),
        hidden_units=32,
        random_state=0,
        device=DEVICE,
        **request.param,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatentCollapseWarning)
        return vae.fit(X)


def test_per_channel_standardization(fitted3, data3):
    X, _ = data3
    assert fitted3.image_shape_ == SHAPE
    assert fitted3.offset_.shape == (3,) and fitted3.scale_.shape == (3,)
    stamps = X.reshape(len(X), 3, -1).astype(np.float64)
    for c in range(3):
        low, median, high = np.quantile(stamps[:, c], [0.01, 0.5, 0.99])
        assert fitted3.offset_[c] == pytest.approx(median, rel=1e-12)
        assert fitted3.scale_[c] == pytest.approx((high - low) / 4.652695748, 1e-9)
    # channel 1 is channel 0 times 50 plus 1000
    assert fitted3.scale_[1] == pytest.approx(50 * fitted3.scale_[0], rel=1e-5)
    assert fitted3.offset_[1] == pytest.approx(1000 + 50 * fitted3.offset_[0], rel=1e-5)


def _hand_elbo(vae, X):
    """score_samples by hand: per-channel scaling, the dense block-diagonal
    Gaussian of the decoder, the stretch's Jacobian and the analytic KL."""
    module = vae.net_.module_.eval()
    C, H, W = vae.image_shape_
    offset = np.repeat(vae.offset_, H * W)
    scale = np.repeat(vae.scale_, H * W)
    u = (X.astype(np.float64) - offset) / scale
    a = vae.stretch_
    y = u if a is None else a * np.arcsinh(u / a)
    log_det = -np.log(scale).sum() - (
        0 if a is None else 0.5 * np.log1p((u / a) ** 2).sum(1)
    )
    yt = torch.as_tensor(
        y, dtype=torch.float32, device=module.encoder.fc[0].weight.device
    )
    eps = torch.randn(
        1, vae._n_latent, generator=torch.Generator().manual_seed(_SCORE_SEED)
    )
    with torch.no_grad():
        mu, logvar = module.encode(yt, dtype=torch.float64)
        z = mu + torch.exp(0.5 * logvar) * eps.to(mu)
        px = module.decode(z, dtype=torch.float64)
        dense = torch.distributions.MultivariateNormal(
            px.loc.reshape(len(X), -1), precision_matrix=px.precision_matrix
        )
        log_px = dense.log_prob(yt.double().reshape(len(X), -1))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    return (log_px - kl).cpu().numpy() + log_det


def test_score_samples_matches_dense_reference(fitted3, data3):
    X, _ = data3
    got = fitted3.score_samples(X[:6])
    np.testing.assert_allclose(got, _hand_elbo(fitted3, X[:6]), rtol=0, atol=1e-3)
    # a model that does not know the channels apart would not see this
    assert np.ptp(got) > 1.0


@short_fit
def test_score_samples_matches_dense_reference_without_stretch(data3):
    X, _ = data3
    vae = CovarianceVAE(
        image_shape=SHAPE,
        n_components=2,
        max_epochs=2,
        channels=(4, 8),
        hidden_units=32,
        stretch=None,
        random_state=0,
        device=DEVICE,
    ).fit(X)
    np.testing.assert_allclose(
        vae.score_samples(X[:5]), _hand_elbo(vae, X[:5]), rtol=0, atol=1e-3
    )
    # the moments in data units: each channel's scale on its own block
    mean, cov = vae.decoder_moments(X[:2])
    px = vae.decoder_distribution(X[:2])
    s = np.repeat(vae.scale_, 64)
    np.testing.assert_allclose(
        mean, px.loc.reshape(2, -1).cpu().numpy() * s + np.repeat(vae.offset_, 64)
    )
    np.testing.assert_allclose(
        cov, px.covariance_matrix.cpu().numpy() * np.outer(s, s), rtol=1e-12
    )
    assert np.all(cov[:, :64, 64:] == 0)


def test_every_method_works_for_three_channels(fitted3, data3):
    X, _ = data3
    n = 5
    Z = fitted3.transform(X[:n])
    assert Z.shape == (n, 3) and Z.dtype == np.float32
    back = fitted3.inverse_transform(Z)
    assert back.shape == (n, 192) and np.isfinite(back).all()
    # reconstructions are in each channel's own units
    levels = back.reshape(n, 3, -1).mean(axis=(0, 2))
    assert 500 < levels[1] < 1500 and abs(levels[0]) < 5
    samples = fitted3.sample(7, random_state=0)
    assert samples.shape == (7, 192) and np.isfinite(samples).all()
    assert 500 < samples.reshape(7, 3, -1)[:, 1].mean() < 1500
    rec = fitted3.reconstruction_log_likelihood(X[:n], n_particles=2)
    assert rec.shape == (n,) and np.isfinite(rec).all()
    for method in ("elbo", "iwae", "typicality", "likelihood_ratio"):
        score = fitted3.anomaly_score(X[:n], method=method, n_particles=3)
        assert score.shape == (n,) and np.isfinite(score).all()
    np.testing.assert_allclose(
        fitted3.anomaly_score(X[:n]), -fitted3.score_samples(X[:n])
    )
    px = fitted3.decoder_distribution(X[:2])
    assert isinstance(px, IndependentChannels) and px.event_shape == SHAPE
    images = fitted3.to_data_units(px.loc)
    np.testing.assert_allclose(
        images.reshape(2, -1), fitted3.to_data_units(px.loc.reshape(2, -1))
    )
    with pytest.raises(ValueError, match="one scale per channel"):
        fitted3.to_data_units(np.zeros((2, 5)))


def test_likelihood_ratio_uses_one_reference_per_channel(fitted3, data3):
    X, _ = data3
    x = X[:4].astype(np.float64)
    elbo = -fitted3.score_samples(X[:4])
    got = fitted3.anomaly_score(X[:4], method="likelihood_ratio")
    reference = np.zeros(4)
    for c in range(3):
        part = x[:, c * 64 : (c + 1) * 64]
        sq = ((part - part.mean(1, keepdims=True)) ** 2).sum(1)
        v = np.maximum(sq / 64, (fitted3.min_scale * fitted3.scale_[c]) ** 2)
        reference += 32 * np.log(2 * math.pi * v) + 0.5 * sq / v
    np.testing.assert_allclose(got, elbo - reference, rtol=1e-12)


@short_fit
def test_one_channel_in_three_dimensions_equals_two(data3):
    X, _ = make_images(120)
    params = dict(n_components=2, max_epochs=2, channels=(4, 8), hidden_units=16)
    flat = CovarianceVAE(image_shape=(8, 8), random_state=0, **params).fit(X)
    cube = CovarianceVAE(image_shape=(1, 8, 8), random_state=0, **params).fit(X)
    assert np.shape(cube.offset_) == (1,) and np.ndim(flat.offset_) == 0
    np.testing.assert_allclose(cube.transform(X[:9]), flat.transform(X[:9]))
    np.testing.assert_allclose(
        cube.score_samples(X[:9]), flat.score_samples(X[:9]), rtol=1e-10
    )


def test_image_shape_is_checked(data3):
    X, _ = data3
    with pytest.raises(ValueError, match=r"holds 243 values but X has 192"):
        CovarianceVAE(image_shape=(3, 9, 9)).fit(X)
    with pytest.raises(ValueError, match=r"three \(C, H, W\)"):
        CovarianceVAE(image_shape=(1, 3, 8, 8)).fit(X)


@short_fit
def test_save_and_load_three_channels(fitted3, data3, tmp_path):
    X, _ = data3
    path = tmp_path / "m.covvae"
    fitted3.save(path)
    loaded = CovarianceVAE.load(path)
    np.testing.assert_array_equal(loaded.offset_, fitted3.offset_)
    np.testing.assert_array_equal(loaded.scale_, fitted3.scale_)
    np.testing.assert_array_equal(
        loaded.score_samples(X[:5]), fitted3.score_samples(X[:5])
    )


def test_nan_is_refused_with_a_pointer_to_the_preprocessor(data3):
    X, _ = data3
    X = X.copy()
    X[3, 7] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN.*StampPreprocessor"):
        CovarianceVAE(image_shape=SHAPE, max_epochs=1).fit(X)


# --------------------------------------------------------------------------
# real triplets
# --------------------------------------------------------------------------


@short_fit
def test_three_channel_pipeline_on_real_ztf_triplets():
    with np.load(shared("ztf_triplets", "ztf_triplets.npz")) as f:
        X = f["X"].reshape(1673, -1)
        drb = f["drb"]
    labelled = np.flatnonzero(np.isfinite(drb))[:400]
    X, y = X[labelled], (drb[labelled] >= 0.5).astype(int)
    assert not np.isfinite(X).all()  # NaN at CCD edges, and 3.4e38 templates
    pipe = Pipeline(
        [
            ("stamps", StampPreprocessor((3, 63, 63), crop=(21, 21))),
            (
                "vae",
                CovarianceVAE(
                    image_shape=(3, 21, 21),
                    n_components=4,
                    max_epochs=2,
                    channels=(4, 8),
                    hidden_units=32,
                    random_state=0,
                ),
            ),
            ("forest", RandomForestClassifier(n_estimators=20, random_state=0)),
        ]
    )
    pipe.fit(X[:300], y[:300])
    proba = pipe.predict_proba(X[300:])
    assert proba.shape == (100, 2) and np.isfinite(proba).all()
    vae = pipe.named_steps["vae"]
    assert vae.offset_.shape == (3,)
    # science and template are in counts above a sky; the difference is not
    assert vae.offset_[0] > 10 * abs(vae.offset_[2])
    scores = vae.score_samples(pipe[:1].transform(X[300:]))
    assert np.isfinite(scores).all()


@short_fit
def test_pipeline_scores_alerts_it_has_never_seen():
    pytest.importorskip("fastavro")
    pytest.importorskip("astropy")
    from sk_covvae.datasets import read_alerts

    paths = sorted(shared("ztf_alert_archive").glob("*.avro"))
    train = read_alerts(paths[:120], size=63)
    test = read_alerts(paths[120:160], size=63)
    pipe = Pipeline(
        [
            ("stamps", StampPreprocessor((3, 63, 63), crop=(21, 21))),
            (
                "vae",
                CovarianceVAE(
                    image_shape=(3, 21, 21),
                    n_components=3,
                    max_epochs=2,
                    channels=(4, 8),
                    hidden_units=32,
                    random_state=0,
                ),
            ),
        ]
    )
    pipe.fit(train.images.reshape(len(train.images), -1))
    scores = pipe.score_samples(test.images.reshape(len(test.images), -1))
    assert scores.shape == (40,) and np.isfinite(scores).all()
    assert len(np.unique(scores)) == 40
