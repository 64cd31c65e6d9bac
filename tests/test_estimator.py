"""Behaviour of the fitted CovarianceVAE: facts about the model and the API."""

import copy
import pickle
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEVICE, REF_ATOL, REF_RTOL, SIDE, correlated_noise
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from sk_covvae import CovarianceVAE
from sk_covvae._estimator import ImageShapeWarning
from sk_covvae.distributions import BandedPrecisionNormal

COVARIANCES = ["banded", "diagonal", "spherical"]
# For fits of a few epochs, or on pure noise, where a collapsed latent space
# is expected and beside the point (tests/test_training.py tests the warning).
short_fit = pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")


@pytest.fixture(scope="module", params=COVARIANCES)
def fitted(request, data):
    # One training stage and no stretch: the model is a Gaussian in the
    # standardized units, which the hand-made references below rebuild.
    # (tests/test_training.py checks the stages and the stretch.)
    X, _ = data
    vae = CovarianceVAE(
        n_components=4,
        covariance=request.param,
        max_epochs=30,
        mean_epochs=0,
        stretch=None,
        batch_size=32,
        lr=3e-3,
        random_state=0,
    )
    return vae.fit(X)


def test_fitted_attributes(fitted, data):
    X, _ = data
    assert fitted.image_shape_ == (SIDE, SIDE)
    assert fitted.n_features_in_ == SIDE * SIDE
    assert fitted.device_ == DEVICE
    assert 1 <= fitted.n_epochs_ <= 30
    low, median, high = np.quantile(X, [0.01, 0.5, 0.99])
    assert fitted.offset_ == pytest.approx(median)
    assert fitted.scale_ == pytest.approx((high - low) / 4.6527, rel=1e-4)
    # Blobs and bars: the latent space is in use.
    assert fitted.kl_per_component_.shape == fitted.latent_activity_.shape == (4,)
    assert 1 <= fitted.n_active_components_ <= 4


def test_training_loss_goes_down(fitted):
    losses = fitted.net_.history[:, "train_loss"]
    assert losses[-1] < losses[0] - 10  # nats per image


def test_transform_is_deterministic_and_keeps_dtype(fitted, data):
    X, _ = data
    Z = fitted.transform(X)
    assert Z.shape == (len(X), 4) and Z.dtype == np.float64
    np.testing.assert_array_equal(Z, fitted.transform(X))
    Z32 = fitted.transform(X.astype(np.float32))
    assert Z32.dtype == np.float32
    np.testing.assert_allclose(Z32, Z, rtol=1e-4, atol=1e-5)


def test_transform_is_the_posterior_mean(fitted, data):
    X, _ = data
    module = fitted.net_.module_
    x = torch.as_tensor((X[:5] - fitted.offset_) / fitted.scale_, dtype=torch.float32)
    with torch.no_grad():
        mu, _ = module.encode(x.to(DEVICE))
    # float32 network: agreement to float32 resolution (the estimator runs
    # fixed-size padded batches, so the last bits may differ from a 5-row pass).
    np.testing.assert_allclose(
        fitted.transform(X[:5]), mu.cpu().numpy(), rtol=1e-5, atol=1e-6
    )


def test_score_is_mean_of_score_samples(fitted, data):
    X, _ = data
    s = fitted.score_samples(X)
    assert s.shape == (len(X),) and np.isfinite(s).all()
    for _ in range(3):  # the same on every call (fixed noise)
        np.testing.assert_array_equal(fitted.score_samples(X), s)
    assert fitted.score(X) == pytest.approx(s.mean(), rel=1e-12)


def test_score_samples_is_the_elbo(fitted, data):
    # Reconstruct the ELBO by hand from the module, with the same fixed noise.
    X, _ = data
    module = fitted.net_.module_
    x = torch.as_tensor((X - fitted.offset_) / fitted.scale_, dtype=torch.float32)
    x = x.to(DEVICE)
    eps = torch.randn(1, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        mu, logvar = module.encode(x, dtype=torch.float64)
        px = module.decode(
            mu + torch.exp(0.5 * logvar) * eps[0].double(), dtype=torch.float64
        )
        rec = px.log_prob(module.images(x).double())
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
    expected = (rec - kl).cpu().numpy() - X.shape[1] * np.log(fitted.scale_)
    np.testing.assert_allclose(
        fitted.score_samples(X), expected, rtol=REF_RTOL, atol=REF_ATOL
    )


def test_reconstruction_term_exceeds_elbo_by_the_kl(fitted, data):
    X, _ = data
    gap = fitted.reconstruction_log_likelihood(X) - fitted.score_samples(X)
    module = fitted.net_.module_
    x = torch.as_tensor((X - fitted.offset_) / fitted.scale_, dtype=torch.float32)
    with torch.no_grad():
        mu, logvar = module.encode(x.to(DEVICE), dtype=torch.float64)
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)).cpu().numpy()
    np.testing.assert_allclose(gap, kl, rtol=REF_RTOL, atol=max(1e-9, REF_ATOL))
    assert (kl >= 0).all()


def test_importance_weighting_tightens_the_bound(fitted, data):
    X, _ = data
    elbo = fitted.score(X)
    # n_score_particles acts at scoring time: no refit needed.
    iw = copy.deepcopy(fitted).set_params(n_score_particles=32)
    assert iw.score(X) > elbo


def test_inverse_transform_returns_decoder_means_in_data_units(fitted, data):
    X, _ = data
    Xr = fitted.inverse_transform(fitted.transform(X))
    assert Xr.shape == X.shape
    # Reconstructions beat the best constant image.
    assert np.mean((Xr - X) ** 2) < np.mean((X - X.mean(0)) ** 2)
    with pytest.raises(ValueError, match="n_components=4"):
        fitted.inverse_transform(np.zeros((2, 3)))


def test_sample_is_reproducible_and_finite(fitted):
    a = fitted.sample(n_samples=7, random_state=0)
    assert a.shape == (7, SIDE * SIDE) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, fitted.sample(n_samples=7, random_state=0))
    assert not np.array_equal(a, fitted.sample(n_samples=7, random_state=1))
    with pytest.raises(ValueError, match="n_samples"):
        fitted.sample(n_samples=0)


def test_samples_carry_the_data_scale(fitted, data):
    X, _ = data
    Xs = fitted.sample(n_samples=500, random_state=0)
    assert 0.5 < Xs.std() / X.std() < 2.0


@short_fit
def test_feature_names_and_pandas_output(fitted, data):
    X, _ = data
    names = fitted.get_feature_names_out()
    assert list(names) == [f"covariancevae{i}" for i in range(4)]
    est = clone(fitted).set_params(max_epochs=1).set_output(transform="pandas")
    out = est.fit_transform(pd.DataFrame(X))
    assert list(out.columns) == list(names)


def test_pickle_and_joblib_round_trips_are_exact(fitted, data, tmp_path):
    X, _ = data
    for restored in (
        pickle.loads(pickle.dumps(fitted)),
        joblib.load(joblib.dump(fitted, tmp_path / "vae.joblib")[0]),
    ):
        np.testing.assert_array_equal(restored.transform(X), fitted.transform(X))
        np.testing.assert_array_equal(
            restored.score_samples(X), fitted.score_samples(X)
        )


@short_fit
def test_same_random_state_gives_identical_fits(data):
    # Two short stages: the mean stage and the joint one.
    X, _ = data
    kw = dict(n_components=2, mean_epochs=2, max_epochs=2)
    a, b = (CovarianceVAE(**kw, random_state=3).fit(X) for _ in range(2))
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    c = CovarianceVAE(**kw, random_state=4).fit(X)
    assert not np.array_equal(a.transform(X), c.transform(X))


@short_fit
def test_fit_leaves_global_torch_rng_alone(data):
    X, _ = data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    CovarianceVAE(n_components=2, mean_epochs=1, max_epochs=1, random_state=0).fit(X)
    torch.testing.assert_close(torch.rand(3), expected)


@short_fit
def test_log_density_is_in_data_units(data):
    # Scaling X by 4 (exact in floating point) leaves the standardized data,
    # hence the stretch and the fit, unchanged; log-densities shift by -D log 4.
    X, _ = data
    kw = dict(n_components=2, mean_epochs=1, max_epochs=2, random_state=0)
    a = CovarianceVAE(**kw).fit(X)
    b = CovarianceVAE(**kw).fit(4.0 * X)
    np.testing.assert_allclose(
        b.score_samples(4.0 * X),
        a.score_samples(X) - X.shape[1] * np.log(4.0),
        rtol=1e-9,
    )
    np.testing.assert_allclose(b.transform(4.0 * X), a.transform(X), rtol=1e-6)


@short_fit
def test_banded_decoder_wins_on_correlated_noise():
    # Pure noise with a banded precision: the banded decoder can represent it
    # exactly (a Gaussian in the units of X: no stretch), independent pixels
    # cannot, so its held-out likelihood is higher.
    side = 6
    X = correlated_noise(500, (side, side), coupling=0.45, seed=1)
    train, test = X[:400], X[400:]
    kw = dict(
        n_components=2,
        max_epochs=25,
        mean_epochs=0,
        stretch=None,
        batch_size=50,
        lr=3e-3,
        random_state=0,
    )
    scores = {
        cov: CovarianceVAE(covariance=cov, **kw).fit(train).score(test)
        for cov in COVARIANCES
    }
    assert scores["banded"] > scores["diagonal"] + 3
    assert scores["banded"] > scores["spherical"] + 3
    # The true model's log-likelihood is an upper reference for the banded fit.
    zeros = torch.zeros(side, side, dtype=torch.float64)
    true = BandedPrecisionNormal(zeros, zeros + np.log(4.0), zeros + 1.8, zeros + 1.8)
    true_ll = true.log_prob(torch.as_tensor(test).reshape(-1, side, side)).mean()
    assert scores["banded"] <= float(true_ll) + 1


@short_fit
def test_early_stopping_stops_and_restores_best_epoch():
    # One stage, so that the history is that of one early-stopping run.
    X = np.random.RandomState(0).normal(size=(200, 16))
    vae = CovarianceVAE(
        n_components=2,
        max_epochs=200,
        mean_epochs=0,
        patience=3,
        lr=1e-2,
        random_state=0,
    ).fit(X)
    history = vae.net_.history
    assert vae.n_epochs_ < 200
    valid = np.array(history[:, "valid_loss"])
    best = int(np.argmin(valid))
    assert vae.n_epochs_ == best + 1 + 3
    # The module holds the weights saved at the best epoch, not the last ones.
    stopper = dict(vae.net_.callbacks_)["early_stopping"]
    assert stopper.best_epoch_ == best + 1
    state = vae.net_.module_.state_dict()
    for name, saved in stopper.best_model_weights_.items():
        torch.testing.assert_close(state[name], saved, rtol=0, atol=0)


@short_fit
@pytest.mark.parametrize(
    "shape, n_features",
    [((28, 28), 784), ((21, 21), 441), ((12, 20), 240), ((1, 3), 3), ((2, 2), 4)],
)
def test_image_shapes(shape, n_features):
    # One epoch of each stage: both decoders handle the shape.
    X = np.random.RandomState(0).uniform(size=(20, n_features))
    vae = CovarianceVAE(
        n_components=2,
        image_shape=shape,
        mean_epochs=1,
        max_epochs=1,
        batch_size=10,
        random_state=0,
    ).fit(X)
    assert vae.image_shape_ == shape
    assert vae.sample(2, random_state=0).shape == (2, n_features)
    assert np.isfinite(vae.score_samples(X)).all()


@short_fit
def test_non_square_features_warn_and_become_signals():
    X = np.random.RandomState(0).uniform(size=(20, 10))
    with pytest.warns(ImageShapeWarning, match=r"Pass image_shape=\(H, W\)"):
        vae = CovarianceVAE(
            n_components=2, mean_epochs=0, max_epochs=1, random_state=0
        ).fit(X)
    assert vae.image_shape_ == (1, 10)


# --------------------------------------------------------------- user stories
def test_story_pipeline_with_random_forest(data):
    X, y = data
    pipe = Pipeline(
        [
            (
                "vae",
                CovarianceVAE(
                    n_components=4,
                    max_epochs=30,
                    batch_size=32,
                    lr=3e-3,
                    random_state=0,
                ),
            ),
            ("rf", RandomForestClassifier(n_estimators=100, random_state=0)),
        ]
    )
    pipe.fit(X[:160], y[:160])
    proba = pipe.predict_proba(X[160:])[:, 1]
    # Blobs and bars are easy to tell apart from the latent features.
    assert roc_auc_score(y[160:], proba) > 0.9
    assert 0.8 < pipe.score(X[160:], y[160:]) <= 1.0


@short_fit
def test_story_grid_search_over_latent_size(data):
    X, y = data
    pipe = Pipeline(
        [
            (
                "vae",
                CovarianceVAE(
                    mean_epochs=0, max_epochs=3, batch_size=32, random_state=0
                ),
            ),
            ("rf", RandomForestClassifier(n_estimators=20, random_state=0)),
        ]
    )
    search = GridSearchCV(pipe, {"vae__n_components": [2, 4]}, cv=2, n_jobs=2)
    search.fit(X, y)
    assert search.best_params_["vae__n_components"] in (2, 4)
    assert search.cv_results_["mean_test_score"].shape == (2,)
    assert (
        search.best_estimator_.named_steps["vae"].transform(X).shape[1]
        == (search.best_params_["vae__n_components"])
    )


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_story_anomaly_scores_rank_out_of_distribution_images(data, covariance):
    X, _ = data
    vae = CovarianceVAE(
        n_components=4,
        covariance=covariance,
        max_epochs=15,
        batch_size=32,
        random_state=0,
    ).fit(X[:200])
    rng = np.random.RandomState(1)
    # Out of distribution: checkerboards and white noise of the same scale.
    checker = (np.indices((SIDE, SIDE)).sum(0) % 2).reshape(1, -1) * 1.0
    ood = np.vstack(
        [
            checker + 0.1 * rng.normal(size=(20, SIDE * SIDE)),
            X.std() * rng.normal(size=(20, SIDE * SIDE)) + X.mean(),
        ]
    )
    anomaly = -vae.score_samples(np.vstack([X[200:], ood]))
    labels = np.r_[np.zeros(40), np.ones(40)]
    assert roc_auc_score(labels, anomaly) > 0.95


def test_no_warning_for_square_images(data):
    # No warning at all: the images are square, and a mean stage of up to
    # 100 epochs (early stopping ends it) trains latents that carry them,
    # where a fit of a few epochs would rightly warn of a collapse.
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CovarianceVAE(
            n_components=2, mean_epochs=100, max_epochs=1, random_state=0
        ).fit(X)


def test_inference_batch_size(fitted, data):
    X, _ = data
    assert fitted.inference_batch_size == "auto" and fitted._block_rows() == (
        8192 if DEVICE == "cuda" else 256
    )
    reference = {
        "transform": fitted.transform(X),
        "score_samples": fitted.score_samples(X),
        "inverse_transform": fitted.inverse_transform(fitted.transform(X[:9])),
    }
    try:
        # 'auto' is 256 on CPU: the same blocks, the same bits
        fitted.set_params(inference_batch_size=256 if DEVICE == "cpu" else 8192)
        np.testing.assert_array_equal(
            fitted.score_samples(X), reference["score_samples"]
        )
        # other blocks: the same numbers to float32 rounding, for every row,
        # and still independent of the other rows of X
        fitted.set_params(inference_batch_size=7)
        assert fitted._block_rows() == 7
        np.testing.assert_allclose(
            fitted.transform(X), reference["transform"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            fitted.score_samples(X), reference["score_samples"], rtol=1e-6
        )
        np.testing.assert_allclose(
            fitted.inverse_transform(fitted.transform(X[:9])),
            reference["inverse_transform"],
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_array_equal(
            fitted.score_samples(X[3:10]), fitted.score_samples(X)[3:10]
        )
        assert fitted.sample(20, random_state=0).shape == (20, X.shape[1])
        fitted.set_params(inference_batch_size=0)
        with pytest.raises(ValueError, match="inference_batch_size"):
            fitted.fit(X)
    finally:
        fitted.set_params(inference_batch_size="auto")
