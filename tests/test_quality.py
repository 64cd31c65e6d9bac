"""The quality issue: the public decoder view, warm starts, the CUDA training
path (by mocks on CPU), argument checks of the inference methods and the
package's exports."""

import warnings

import numpy as np
import pytest
import torch
from conftest import make_images

from sk_covvae import CovarianceVAE, LatentCollapseWarning

# Small and quick.
SMALL = dict(
    n_components=3,
    max_epochs=6,
    batch_size=32,
    channels=(4, 8),
    hidden_units=32,
    lr=3e-3,
    random_state=0,
)


@pytest.fixture(scope="module")
def images():
    return make_images(160)[0]


@pytest.fixture(
    scope="module",
    params=[
        ("banded", "cross", 5.0),
        ("banded", "3x3", None),
        ("diagonal", "cross", 2.0),
    ],
    ids=["banded-stretch", "3x3-nostretch", "diagonal-stretch"],
)
def model(request, images):
    covariance, neighbourhood, stretch = request.param
    vae = CovarianceVAE(
        covariance=covariance, neighbourhood=neighbourhood, stretch=stretch, **SMALL
    )
    with warnings.catch_warnings():
        # What the latent space learned is beside the point here.
        warnings.simplefilter("ignore", LatentCollapseWarning)
        return vae.fit(images)


def _model_units(model, X):
    """The stamps as the model sees them, by hand, in float64."""
    u = (np.asarray(X, dtype=np.float64) - model.offset_) / model.scale_
    if model.stretch_ is None:
        return u
    return model.stretch_ * np.arcsinh(u / model.stretch_)


# ---------------------------------------------------------- decoder view
def test_decoder_distribution_is_the_module_at_the_posterior_means(model, images):
    X = images[:5]
    px = model.decoder_distribution(X)
    module = model.net_.module_.eval()
    y = torch.as_tensor(_model_units(model, X), dtype=torch.float32)
    with torch.no_grad():
        mu, _ = module.encode(y.to(model.net_.device))
        ref = module.decode(mu, dtype=torch.float64)
    assert type(px) is type(ref)
    assert tuple(px.batch_shape) == (5,)
    assert tuple(px.event_shape) == model.image_shape_
    assert px.loc.dtype == torch.float64
    # z is the posterior mean of transform.
    np.testing.assert_allclose(
        model.transform(X), mu.cpu().numpy(), rtol=1e-4, atol=1e-5
    )
    for name in ("loc", "precision_matrix"):
        np.testing.assert_allclose(
            getattr(px, name).cpu().numpy(),
            getattr(ref, name).cpu().numpy(),
            rtol=1e-4,
            atol=1e-5,
            err_msg=name,
        )


def test_decoder_distribution_validates_its_input(model, images):
    with pytest.raises(ValueError, match="features"):
        model.decoder_distribution(images[:, :10])
    with pytest.raises(ValueError, match="NaN"):
        model.decoder_distribution(np.full_like(images[:2], np.nan))


def test_to_data_units_inverts_the_model_units(model, images):
    X = images[:7]
    np.testing.assert_allclose(
        model.to_data_units(_model_units(model, X)), X, rtol=1e-10, atol=1e-10
    )
    y = torch.as_tensor(_model_units(model, X)).reshape(7, *model.image_shape_)
    back = model.to_data_units(y)
    assert back.shape == (7, *model.image_shape_) and back.dtype == np.float64


def test_inverse_transform_is_the_decoder_location_in_data_units(model, images):
    X = images[:9]
    px = model.decoder_distribution(X)
    np.testing.assert_allclose(
        model.to_data_units(px.loc.reshape(9, -1)),
        model.inverse_transform(model.transform(X)),
        rtol=1e-5,
        atol=1e-6 * model.scale_,
    )


def _gauss_hermite(n=60):
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return nodes, weights / np.sqrt(2 * np.pi)


def test_decoder_moments_are_those_of_the_data_unit_distribution(model, images):
    # The exact moments, checked pixel by pixel (and for neighbour pairs) by
    # Gauss-Hermite quadrature over the decoder's Gaussian in model units.
    X = images[:2]
    mean, cov = model.decoder_moments(X)
    D = X.shape[1]
    assert mean.shape == (2, D) and cov.shape == (2, D, D)
    assert mean.dtype == cov.dtype == np.float64
    px = model.decoder_distribution(X)
    m = px.loc.reshape(2, -1).cpu().numpy()
    S = px.covariance_matrix.cpu().numpy()
    if model.stretch_ is None:
        np.testing.assert_allclose(mean, m * model.scale_ + model.offset_, rtol=1e-12)
        np.testing.assert_allclose(cov, S * model.scale_**2, rtol=1e-12)
        return

    def to_x(y):
        return model.to_data_units(y)

    nodes, weights = _gauss_hermite()
    W = model.image_shape_[1]
    for b in range(2):
        for i in (0, D // 2, D - 1):
            y = m[b, i] + np.sqrt(S[b, i, i]) * nodes
            expected_mean = weights @ to_x(y)
            expected_var = weights @ (to_x(y) - expected_mean) ** 2
            assert mean[b, i] == pytest.approx(expected_mean, rel=1e-9, abs=1e-12)
            assert cov[b, i, i] == pytest.approx(expected_var, rel=1e-9)
        for i, j in ((0, 1), (D // 2, D // 2 + W), (3, 4 + W)):
            C = S[b][np.ix_([i, j], [i, j])]
            L = np.linalg.cholesky(C)
            e1, e2 = np.meshgrid(nodes, nodes, indexing="ij")
            w = np.outer(weights, weights)
            yi = m[b, i] + L[0, 0] * e1
            yj = m[b, j] + L[1, 0] * e1 + L[1, 1] * e2
            xi, xj = to_x(yi), to_x(yj)
            expected = (w * (xi - (w * xi).sum()) * (xj - (w * xj).sum())).sum()
            assert cov[b, i, j] == pytest.approx(expected, rel=1e-8, abs=1e-14)
            assert cov[b, j, i] == cov[b, i, j]


def _panels(fig, n_rows, n_cols):
    axes = np.array(fig.axes[: n_rows * n_cols]).reshape(n_rows, n_cols)
    return [[np.asarray(ax.images[0].get_array()) for ax in row] for row in axes]


def test_plot_reconstructions_shows_data_units_with_the_stretch(model, images):
    pytest.importorskip("matplotlib")
    from sk_covvae.plotting import plot_reconstructions

    X = images[:3]
    fig = plot_reconstructions(
        {"m": model}, X, image_shape=model.image_shape_, n_images=3, random_state=4
    )
    data, mean, sample = (np.stack(r) for r in _panels(fig, 3, 3))
    np.testing.assert_array_equal(data.reshape(3, -1), X)
    expected_mean = model.inverse_transform(model.transform(X))
    np.testing.assert_allclose(
        mean.reshape(3, -1), expected_mean, rtol=1e-5, atol=1e-6 * model.scale_
    )
    px = model.decoder_distribution(X)
    generator = torch.Generator().manual_seed(4)
    eps = torch.randn(px.loc.shape, generator=generator, dtype=torch.float64)
    expected_sample = model.to_data_units(px.reparameterize(eps).reshape(3, -1))
    np.testing.assert_allclose(sample.reshape(3, -1), expected_sample, rtol=1e-10)


def test_plot_precision_covariance_uses_the_data_unit_covariance(model, images):
    pytest.importorskip("matplotlib")
    from sk_covvae.plotting import plot_precision_covariance

    x = images[0]
    fig = plot_precision_covariance({"m": model}, x, image_shape=model.image_shape_)
    _, cov = model.decoder_moments(x[None])
    crop = 3 * model.image_shape_[1]
    shown = np.asarray(fig.axes[1].images[0].get_array())
    np.testing.assert_allclose(shown, cov[0][:crop, :crop], rtol=1e-12)


# ------------------------------------------------------------ warm start
WARM = dict(
    n_components=2,
    max_epochs=4,
    patience=None,
    batch_size=16,
    channels=(4, 8),
    hidden_units=16,
    random_state=0,
)


def _fit_quietly(vae, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatentCollapseWarning)
        return vae.fit(X)


def _state(vae):
    return {k: v.clone() for k, v in vae.net_.module_.state_dict().items()}


def test_warm_start_applies_lr_batch_size_and_patience(images):
    vae = _fit_quietly(CovarianceVAE(**WARM), images)
    vae.set_params(warm_start=True, lr=2e-4, batch_size=8, patience=3, max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is ignored
        warnings.simplefilter("ignore", LatentCollapseWarning)
        vae.fit(images)
    net = vae.net_
    assert net.lr == 2e-4
    assert [g["lr"] for g in net.optimizer_.param_groups] == [2e-4]
    n_train = len(images) - int(np.ceil(0.1 * len(images)))
    assert net.history[-1, "train_batch_count"] == int(np.ceil(n_train / 8))
    assert dict(net.callbacks_)["early_stopping"].patience == 3


def test_warm_start_warns_about_the_changes_it_cannot_apply(images):
    vae = _fit_quietly(CovarianceVAE(**WARM), images)
    vae.set_params(
        warm_start=True, n_components=3, hidden_units=8, stretch=None, max_epochs=1
    )
    with pytest.warns(UserWarning, match="warm_start") as record:
        _fit_quietly(vae, images)
    (message,) = [str(w.message) for w in record if "warm_start" in str(w.message)]
    for name in ("n_components=3", "hidden_units=8", "stretch=None"):
        assert name in message
    for name in ("covariance", "lr", "batch_size", "channels"):
        assert name not in message
    # The model is the first fit's.
    assert vae.transform(images).shape == (len(images), 2)
    assert vae.stretch_ == 5.0


def test_warm_start_keeps_the_best_weights_of_all_calls(images):
    # A learning rate far too large makes every new epoch worse on
    # validation than the weights the warm fit starts from: those stay.
    vae = _fit_quietly(CovarianceVAE(**WARM), images)
    before = _state(vae)
    vae.set_params(warm_start=True, lr=0.5, max_epochs=2)
    _fit_quietly(vae, images)
    assert vae.n_epochs_ == 6
    after = vae.net_.module_.state_dict()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)
    stopper = dict(vae.net_.callbacks_)["early_stopping"]
    assert stopper.best_epoch_ == 4
