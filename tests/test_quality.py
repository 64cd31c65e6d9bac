"""The quality issue: the public decoder view, warm starts, the CUDA training
path (by mocks on CPU), argument checks of the inference methods and the
package's exports."""

import contextlib
import copy
import sys
import warnings
from pathlib import Path

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


# ------------------------------------------- the CUDA training path, on CPU
def _small_fit(X, **params):
    vae = CovarianceVAE(**{**WARM, "device": "cpu", **params})
    return _fit_quietly(vae, X)


@pytest.fixture
def copies_to_device(monkeypatch):
    """Pretend ``to_tensor(..., device)`` copies: count the copies it makes.

    A tensor that the spy returned counts as on the device already.
    """
    import skorch.net

    import sk_covvae._net as net_module

    moved, copies = [], []

    def to_tensor(X, device, accept_sparse=False):
        if any(X is m for m in moved):
            return X
        copies.append(tuple(X.shape))
        moved.append(X.clone())
        return moved[-1]

    monkeypatch.setattr(skorch.net, "to_tensor", to_tensor)
    monkeypatch.setattr(net_module, "to_tensor", to_tensor)
    return copies


def test_each_batch_goes_to_the_device_once(images, copies_to_device):
    vae = _small_fit(images, max_epochs=1)
    net = vae.net_
    net.device = "cuda"  # only where to_tensor is asked to copy to
    batch = (torch.as_tensor(images[:16], dtype=torch.float32), None)
    copies_to_device.clear()
    net.train_step(batch)
    assert copies_to_device == [(16, 64)]
    net.validation_step(batch)
    assert copies_to_device == [(16, 64), (16, 64)]


def test_losses_are_read_on_the_host_every_few_steps(images, monkeypatch):
    from sk_covvae._net import VAENet

    # Host reads of tensors (synchronisations on a GPU) in skorch's loop
    # over the batches of an epoch; not Adam's reads of its step counter,
    # which stays on the CPU when the weights are on a GPU.
    reads, in_loop = [], [False]
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if in_loop[0] and not caller.startswith("torch.optim"):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    run_single_epoch = VAENet.run_single_epoch

    def counted(self, *args, **kwargs):
        in_loop[0] = True
        try:
            return run_single_epoch(self, *args, **kwargs)
        finally:
            in_loop[0] = False

    monkeypatch.setattr(VAENet, "run_single_epoch", counted)
    reference = _small_fit(images, batch_size=8, max_epochs=2)
    per_step = len(reads)
    reads.clear()
    monkeypatch.setattr(VAENet, "_finite_check_interval", lambda self: 4, False)
    vae = _small_fit(images, batch_size=8, max_epochs=2)
    # 18 training and 2 validation batches per epoch: 5 + 1 reads, where
    # every step reads at least once.
    assert per_step >= 2 * 20
    assert len(reads) == 2 * (5 + 1)
    # What is recorded is what every-step reads record, in the same order.
    for ours, theirs in zip(vae.net_.history, reference.net_.history):
        assert [list(b.items()) for b in ours["batches"]] == [
            list(b.items()) for b in theirs["batches"]
        ]
        for key in ("train_loss", "valid_loss"):
            assert ours[key] == theirs[key]
    np.testing.assert_array_equal(vae.transform(images), reference.transform(images))


def test_a_late_read_non_finite_loss_restores_the_last_checked_state(
    images, monkeypatch
):
    from sk_covvae._net import NegativeELBO, VAENet

    monkeypatch.setattr(VAENet, "_finite_check_interval", lambda self: 4, False)
    states, calls = [], []
    forward = NegativeELBO.forward

    def poisoned(self, *args):
        loss = forward(self, *args)
        calls.append(None)
        # The 6th training step of the first epoch.
        return loss * float("nan") if len(calls) == 6 else loss

    def on_batch_end(self, net, batch=None, training=False, **kwargs):
        if training:
            states.append(
                (
                    {k: v.clone() for k, v in net.module_.state_dict().items()},
                    copy.deepcopy(net.optimizer_.state_dict()),
                )
            )

    monkeypatch.setattr(NegativeELBO, "forward", poisoned)
    monkeypatch.setattr(VAENet, "on_batch_end", on_batch_end, False)
    vae = CovarianceVAE(
        **{**WARM, "device": "cpu", "validation_fraction": None, "patience": None}
    )
    with pytest.raises(FloatingPointError, match="non-finite"):
        vae.fit(images)
    weights, optimizer = states[3]  # after step 4, the last read before the NaN
    for name, value in vae.net_.module_.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    restored = vae.net_.optimizer_.state_dict()["state"]
    for key, state in optimizer["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(restored[key][name], value, rtol=0, atol=0)
    assert np.isfinite(vae.transform(images)).all()


def test_fit_seeds_only_the_generators_it_forks(images, monkeypatch):
    seeded = []
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeded.append("all"))
    monkeypatch.setattr(
        torch.cuda, "manual_seed_all", lambda seed: seeded.append("all cuda")
    )
    _small_fit(images, max_epochs=1)
    assert seeded == []


def test_the_forked_generators_of_a_cuda_fit(monkeypatch):
    from sk_covvae import _estimator

    forked, seeded, current = [], [], [None]
    real_fork = torch.random.fork_rng

    @contextlib.contextmanager
    def fork_rng(devices=None, **kwargs):
        forked.append(list(devices))
        with real_fork(devices=[]):
            yield

    @contextlib.contextmanager
    def device(index):
        current[0] = index
        yield
        current[0] = None

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "manual_seed", lambda s: seeded.append((s, current[0]))
    )
    for name, index in (("cuda:1", 1), ("cuda", 2)):
        forked.clear(), seeded.clear()
        with _estimator._forked_rng(name, 123) as devices:
            assert devices == [index]
            # The CPU generator is seeded too (the mini-batch order).
            assert torch.default_generator.initial_seed() == 123
        assert forked == [[index]] and seeded == [(123, index)]


def test_cpu_fit_data_stay_where_they_were(images):
    from sk_covvae import _estimator

    Xt = _estimator._training_tensor(images, 0.5, 2.0, 5.0, "cpu")
    expected = _estimator._standardized_tensor(images, 0.5, 2.0, 5.0)
    assert Xt.device.type == "cpu"
    torch.testing.assert_close(Xt, expected, rtol=0, atol=0)


@pytest.mark.parametrize("free, on_device", [(10_000, False), (10**9, True)])
def test_cuda_fit_data_go_to_the_device_when_they_fit(
    images, monkeypatch, free, on_device
):
    from sk_covvae import _estimator

    class OnDevice(Exception):
        pass

    def chunks(*args, device=None, **kwargs):
        if device is not None:
            raise OnDevice(str(device))
        yield from original(*args, **kwargs)

    original = _estimator._standardized_chunks
    monkeypatch.setattr(_estimator, "_standardized_chunks", chunks)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 10**10))
    monkeypatch.setattr(torch, "empty", _cpu_empty(torch.empty))
    if on_device:
        with pytest.raises(OnDevice, match="cuda:0"):
            _estimator._training_tensor(images, 0.5, 2.0, 5.0, "cuda:0")
    else:
        Xt = _estimator._training_tensor(images, 0.5, 2.0, 5.0, "cuda:0")
        assert Xt.device.type == "cpu"


def _cpu_empty(empty):
    """``torch.empty`` that ignores ``device``: no CUDA here."""

    def cpu_empty(*args, device=None, **kwargs):
        return empty(*args, **kwargs)

    return cpu_empty


# ------------------------------------------------- counts of the inference API
@pytest.fixture(scope="module")
def tiny(images):
    return _fit_quietly(CovarianceVAE(**{**WARM, "max_epochs": 1}), images)


@pytest.mark.parametrize("value", [True, False, 2.0, 0, -3, "2", None])
@pytest.mark.parametrize("method", ["sample", "reconstruction_log_likelihood"])
def test_counts_reject_booleans_and_non_integers_alike(tiny, images, method, value):
    from sklearn.utils._param_validation import InvalidParameterError

    name = {"sample": "n_samples", "reconstruction_log_likelihood": "n_particles"}
    call = {
        "sample": lambda v: tiny.sample(v),
        "reconstruction_log_likelihood": lambda v: tiny.reconstruction_log_likelihood(
            images[:3], n_particles=v
        ),
    }[method]
    with pytest.raises(
        InvalidParameterError, match=f"^{name[method]} must be a positive integer"
    ):
        call(value)


@pytest.mark.parametrize("value", [1, 3, np.int64(2), np.uint8(1)])
def test_counts_accept_python_and_numpy_integers(tiny, images, value):
    assert tiny.sample(value).shape == (int(value), images.shape[1])
    assert tiny.reconstruction_log_likelihood(images[:3], n_particles=value).shape == (
        3,
    )


# ------------------------------------------------------- exports and API page
def test_show_versions_is_exported(capsys):
    import sk_covvae
    from sk_covvae import show_versions

    assert "show_versions" in sk_covvae.__all__
    show_versions()
    assert "sk_covvae" in capsys.readouterr().out


API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.rst"


@pytest.mark.parametrize(
    "module, names",
    [
        ("sk_covvae", None),
        ("sk_covvae.distributions", None),
        ("sk_covvae.preprocessing", None),
        (
            "sk_covvae.datasets",
            [
                "read_alerts",
                "iter_alerts",
                "AlertReadError",
                "AlertReadWarning",
                "REAL_LABEL",
                "BOGUS_LABEL",
                "ALERT_CHANNELS",
            ],
        ),
        ("sk_covvae.report", ["write_run", "render_report", "redraw"]),
    ],
)
def test_the_api_page_lists_the_public_names(module, names):
    import importlib

    # Each autosummary block follows the ``currentmodule`` it documents.
    blocks, current = {}, None
    for line in API_PAGE.read_text().splitlines():
        if line.startswith(".. currentmodule:: "):
            current = line.split()[-1]
        elif line.startswith("   ") and line.strip() and ":" not in line:
            blocks.setdefault(current, set()).add(line.strip())
    if names is None:
        names = [n for n in importlib.import_module(module).__all__ if n[0] != "_"]
    missing = set(names) - blocks.get(module, set())
    assert not missing, f"{module}: {sorted(missing)}"
