"""BandedPrecisionNormal and its special cases against dense references."""

import functools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal

from sk_covvae.distributions import (
    NEIGHBOURHOODS,
    BandedPrecisionNormal,
    DiagonalPrecisionNormal,
    SphericalPrecisionNormal,
    StencilPrecisionNormal,
    constrain_banded_parameters,
    constrain_stencil_parameters,
    covariance_eigenvalue_bounds,
)

SHAPES = [(1, 1), (1, 3), (3, 1), (2, 2), (3, 5), (5, 3), (6, 6)]


def _random_params(shape, batch=(2,), seed=0, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    full = (*batch, *shape)
    kw = dict(generator=g, dtype=torch.float64)
    return (
        torch.randn(full, **kw),
        0.5 * torch.randn(full, **kw),
        scale * torch.randn(full, **kw),
        scale * torch.randn(full, **kw),
    )


def _dense_reference(d):
    return MultivariateNormal(d.loc.flatten(-2), precision_matrix=d.precision_matrix)


@pytest.mark.parametrize("shape", SHAPES)
def test_log_prob_matches_dense_multivariate_normal(shape):
    d = BandedPrecisionNormal(*_random_params(shape))
    x = torch.randn(4, 2, *shape, dtype=torch.float64)
    expected = _dense_reference(d).log_prob(x.flatten(-2))
    torch.testing.assert_close(d.log_prob(x), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(3, 4), (4, 3)])
def test_precision_matrix_has_the_documented_factor(shape):
    loc, log_diag, right, down = _random_params(shape, batch=())
    H, W = shape
    L = BandedPrecisionNormal(loc, log_diag, right, down).precision_factor
    expected = torch.zeros(H * W, H * W, dtype=torch.float64)
    for r in range(H):
        for c in range(W):
            i = r * W + c
            expected[i, i] = log_diag[r, c].exp()
            if c < W - 1:
                expected[i + 1, i] = right[r, c]
            if r < H - 1:
                expected[i + W, i] = down[r, c]
    torch.testing.assert_close(L, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (3, 5)])
def test_boundary_couplings_are_ignored(shape):
    loc, log_diag, right, down = _random_params(shape)
    d = BandedPrecisionNormal(loc, log_diag, right, down)
    right2, down2 = right.clone(), down.clone()
    right2[..., :, -1] = torch.tensor([7.0, float("nan")])[:, None]
    down2[..., -1, :] = torch.tensor([float("inf"), -3.0])[:, None]
    d2 = BandedPrecisionNormal(loc, log_diag, right2, down2)
    x = torch.randn(5, 2, *shape, dtype=torch.float64)
    eps = torch.randn(5, 2, *shape, dtype=torch.float64)
    torch.testing.assert_close(d2.log_prob(x), d.log_prob(x), rtol=0, atol=0)
    torch.testing.assert_close(d2.reparameterize(eps), d.reparameterize(eps))
    torch.testing.assert_close(d2.precision_matrix, d.precision_matrix)


def _log_prob_by_dense(loc, log_diag, right, down, x):
    """log_prob through autograd of the dense reference (the slow, obvious way)."""
    d = BandedPrecisionNormal(loc, log_diag, right, down)
    return _dense_reference(d).log_prob(x.flatten(-2))


def _absolute(log_diag, right, down, relative):
    if not relative:
        return right, down
    return log_diag.exp() * right, log_diag.exp() * down


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (3, 5)])
def test_log_prob_gradients_match_dense_autograd(shape, relative):
    # Every parameter and the value get gradients, the value with extra sample
    # dimensions (the IWAE layout), and they agree with autograd through the
    # dense MultivariateNormal.
    params = [t.requires_grad_() for t in _random_params(shape, seed=3)]
    loc, log_diag, right, down = params
    x = torch.randn(3, 2, *shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 2, dtype=torch.float64)
    ours = torch.autograd.grad(
        (BandedPrecisionNormal(*params, relative=relative).log_prob(x) * weights).sum(),
        [*params, x],
    )
    absolute = _absolute(log_diag, right, down, relative)
    dense = torch.autograd.grad(
        (_log_prob_by_dense(loc, log_diag, *absolute, x) * weights).sum(),
        [*params, x],
        allow_unused=True,  # 1x1 images have no couplings at all
        materialize_grads=True,
    )
    H, W = shape
    for name, a, b in zip(["loc", "log_diag", "right", "down", "x"], ours, dense):
        if name == "right" and W > 1:  # the dense path never sees the last column
            b = b.clone()
            b[..., :, -1] = 0.0
        if name == "down" and H > 1:
            b = b.clone()
            b[..., -1, :] = 0.0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("relative", [False, True])
def test_log_prob_passes_gradcheck_and_gradgradcheck(relative):
    params = [t.requires_grad_() for t in _random_params((3, 4), batch=(2,), seed=4)]
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(*args):
        return BandedPrecisionNormal(*args[:4], relative=relative).log_prob(args[4])

    assert torch.autograd.gradcheck(f, (*params, x))
    assert torch.autograd.gradgradcheck(f, (*params, x))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_log_prob_works_under_torch_func_transforms():
    # Per-sample gradients with vmap(grad(...)) agree with a loop of backward().
    params = _random_params((3, 4), batch=(3,), seed=6)
    x = torch.randn(3, 3, 4, dtype=torch.float64)

    def log_prob(loc, log_diag, right, down, value):
        # (Value checks are data-dependent control flow, which vmap forbids.)
        d = BandedPrecisionNormal(
            loc, log_diag, right, down, validate_args=False, relative=True
        )
        return d.log_prob(value)

    grads = torch.func.vmap(torch.func.grad(log_prob, argnums=(0, 1, 2)))(*params, x)
    for i in range(3):
        leaves = [p[i].clone().requires_grad_() for p in params[:3]]
        log_prob(*leaves, params[3][i], x[i]).backward()
        for g, leaf in zip(grads, leaves):
            torch.testing.assert_close(g[i], leaf.grad)


def test_relative_couplings_define_the_same_distribution():
    loc, log_diag, right_rel, down_rel = _random_params((4, 5), seed=5)
    rel = BandedPrecisionNormal(loc, log_diag, right_rel, down_rel, relative=True)
    right, down = _absolute(log_diag, right_rel, down_rel, relative=True)
    ab = BandedPrecisionNormal(loc, log_diag, right, down)
    torch.testing.assert_close(rel.right, ab.right, rtol=1e-12, atol=0)
    torch.testing.assert_close(rel.down, ab.down, rtol=1e-12, atol=0)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(rel.log_prob(x), ab.log_prob(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(rel.whiten(x), ab.whiten(x), rtol=1e-12, atol=1e-12)
    eps = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(rel.reparameterize(eps), ab.reparameterize(eps))
    torch.testing.assert_close(rel.precision_matrix, ab.precision_matrix)
    expanded = rel.expand((3, 2))
    torch.testing.assert_close(expanded.log_prob(x), ab.log_prob(x), rtol=1e-12, atol=0)
    # The constrained relative couplings are the absolute ones over the diagonal.
    raw = torch.randn(3, 4, 5, dtype=torch.float64)
    ld, r, d = constrain_banded_parameters(raw[0], raw[1], raw[2])
    ld2, r2, d2 = constrain_banded_parameters(raw[0], raw[1], raw[2], relative=True)
    torch.testing.assert_close(ld2, ld, rtol=0, atol=0)
    torch.testing.assert_close(ld.exp() * r2, r, rtol=1e-12, atol=0)
    torch.testing.assert_close(ld.exp() * d2, d, rtol=1e-12, atol=0)
    assert (r2.abs() + d2.abs() <= 0.9).all()


def test_boundary_couplings_get_zero_gradient_even_when_not_finite():
    loc, log_diag, right, down = _random_params((3, 4))
    right[..., :, -1] = float("nan")
    down[..., -1, :] = float("inf")
    right.requires_grad_()
    down.requires_grad_()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    lp = BandedPrecisionNormal(loc, log_diag, right, down).log_prob(x)
    assert torch.isfinite(lp).all()
    g_right, g_down = torch.autograd.grad(lp.sum(), [right, down])
    assert (g_right[..., :, -1] == 0).all() and (g_down[..., -1, :] == 0).all()
    assert (g_right[..., :, :-1] != 0).all() and (g_down[..., :-1, :] != 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_covariance_is_inverse_of_precision(shape):
    d = BandedPrecisionNormal(*_random_params(shape))
    eye = torch.eye(shape[0] * shape[1], dtype=torch.float64).expand(2, -1, -1)
    torch.testing.assert_close(
        d.covariance_matrix @ d.precision_matrix, eye, rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_reparameterize_solves_the_transposed_factor(shape):
    d = BandedPrecisionNormal(*_random_params(shape))
    eps = torch.randn(3, 2, *shape, dtype=torch.float64)
    x = d.reparameterize(eps)
    torch.testing.assert_close(d.whiten(x), eps, rtol=0, atol=1e-10)
    # Against a dense triangular solve of L^T y = eps.
    L = d.precision_factor
    y = torch.linalg.solve_triangular(
        L.mT.expand(3, -1, -1, -1), eps.flatten(-2)[..., None], upper=True
    )[..., 0]
    torch.testing.assert_close((x - d.loc).flatten(-2), y, rtol=0, atol=1e-10)


def test_empirical_covariance_of_samples_matches_covariance_matrix():
    torch.manual_seed(0)
    loc, log_diag, right, down = _random_params((3, 4), batch=(), scale=0.6)
    d = BandedPrecisionNormal(loc, log_diag, right, down)
    x = d.rsample((200_000,)).flatten(-2)
    empirical = torch.cov(x.T)
    cov = d.covariance_matrix
    # Standard error of a covariance entry ~ sqrt(S_ii S_jj / n) ~ 0.2% here.
    scale = cov.diagonal().sqrt()
    torch.testing.assert_close(
        empirical / scale / scale[:, None],
        cov / scale / scale[:, None],
        rtol=0,
        atol=0.01,
    )
    torch.testing.assert_close(x.mean(0), loc.flatten(), rtol=0, atol=0.01 * 5)


def test_rsample_is_reparameterised():
    loc, log_diag, right, down = (
        t.requires_grad_() for t in _random_params((3, 3), batch=())
    )
    d = BandedPrecisionNormal(loc, log_diag, right, down)
    torch.manual_seed(0)
    d.rsample((4,)).sum().backward()
    torch.testing.assert_close(loc.grad, torch.full_like(loc, 4.0))
    for t in (log_diag, right, down):
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (3, 5), (6, 6)])
def test_reparameterize_gradients_match_dense_autograd(shape, relative):
    # The anti-diagonal solver's backward pass (through splits, not slices)
    # against autograd through a dense triangular solve of L^T y = eps, with
    # noise of an extra sample dimension broadcast against the batch.
    params = [t.requires_grad_() for t in _random_params(shape, seed=7)]
    loc, log_diag, right, down = params
    eps = torch.randn(3, 2, *shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 2, *shape, dtype=torch.float64)
    grad = functools.partial(
        torch.autograd.grad,
        inputs=[*params, eps],
        allow_unused=True,  # 1x1 images have no couplings at all
        materialize_grads=True,
    )
    d = BandedPrecisionNormal(*params, relative=relative)
    ours = grad((d.reparameterize(eps) * weights).sum())
    absolute = _absolute(log_diag, right, down, relative)
    L = BandedPrecisionNormal(loc, log_diag, *absolute).precision_factor
    y = torch.linalg.solve_triangular(
        L.mT.expand(3, -1, -1, -1), eps.flatten(-2)[..., None], upper=True
    )[..., 0]
    dense = grad(((loc + y.unflatten(-1, shape)) * weights).sum())
    for name, a, b in zip(["loc", "log_diag", "right", "down", "eps"], ours, dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    # The couplings that are in L do get a gradient.
    assert (ours[2][..., :, :-1] != 0).all() and (ours[3][..., :-1, :] != 0).all()


def test_shapes_batching_and_expand():
    d = BandedPrecisionNormal(*_random_params((2, 3), batch=(4,)))
    assert d.batch_shape == (4,) and d.event_shape == (2, 3)
    assert d.rsample((5,)).shape == (5, 4, 2, 3)
    assert d.log_prob(torch.zeros(7, 1, 2, 3, dtype=torch.float64)).shape == (7, 4)
    e = BandedPrecisionNormal(*_random_params((2, 3), batch=(1,))).expand((6,))
    assert e.batch_shape == (6,)
    assert e.rsample().shape == (6, 2, 3)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5)])
def test_entropy_and_variance_match_dense(shape):
    d = BandedPrecisionNormal(*_random_params(shape))
    ref = _dense_reference(d)
    torch.testing.assert_close(d.entropy(), ref.entropy())
    torch.testing.assert_close(d.variance.flatten(-2), ref.variance)


def test_diagonal_matches_independent_normal():
    loc, log_diag, _, _ = _random_params((4, 5))
    d = DiagonalPrecisionNormal(loc, log_diag)
    ref = Independent(Normal(loc, torch.exp(-log_diag)), 2)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(d.variance, ref.variance)
    torch.testing.assert_close(d.entropy(), ref.entropy())
    eps = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(d.reparameterize(eps), loc + eps * torch.exp(-log_diag))


def test_spherical_matches_independent_normal():
    loc = torch.randn(3, 4, 5, dtype=torch.float64)
    log_diag = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    d = SphericalPrecisionNormal(loc, log_diag)
    ref = Independent(Normal(loc, torch.exp(-log_diag)[:, None, None]), 2)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    assert d.batch_shape == (3,)


def _sampling_memory_growth(construct):
    """Growth of peak resident memory when one sample is drawn from the
    distribution built by the statement ``construct`` (names ``shape`` and
    ``d``), measured in a fresh process after a warm-up draw."""
    code = (
        textwrap.dedent(
            """
        import resource, torch
        from sk_covvae.distributions import (
            BandedPrecisionNormal, StencilPrecisionNormal)
        torch.set_num_threads(1)
        shape = (8, 128, 128)
        """
        )
        + textwrap.dedent(construct)
        + textwrap.dedent(
            """
        d.rsample((1,))  # warm up allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = d.rsample()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert x.shape == shape and bool(torch.isfinite(x).all())
        print((after - before) * 1024)
        """
        )
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def test_sampling_128x128_uses_little_memory():
    # A dense covariance for 8 images of 128x128 would need 8 * 16384**2 * 4
    # bytes = 8.6 GB; the structured solver needs a few MB. Measured in a
    # fresh process as the growth of its peak resident memory.
    grown = _sampling_memory_growth(
        """
        d = BandedPrecisionNormal(torch.zeros(shape), torch.zeros(shape),
                                  0.4 * torch.ones(shape), -0.4 * torch.ones(shape))
        """
    )
    assert grown < 200 * 2**20


@pytest.mark.parametrize("raw", [1e4, -1e4, 0.0, 30.0])
def test_constrained_parameters_bound_covariance_eigenvalues(raw):
    bounds, rho = (-2.0, 3.0), 0.9
    g = torch.Generator().manual_seed(1)
    shape = (4, 5)
    raws = [
        raw + 50 * torch.randn(shape, generator=g, dtype=torch.float64)
        for _ in range(3)
    ]
    raws[2] = -raws[2]  # couplings of opposite signs
    log_diag, right, down = constrain_banded_parameters(
        *raws, log_diag_bounds=bounds, rho=rho
    )
    assert (log_diag >= bounds[0]).all() and (log_diag <= bounds[1]).all()
    assert (right.abs() + down.abs() <= rho * log_diag.exp() * (1 + 1e-12)).all()
    d = BandedPrecisionNormal(
        torch.zeros(shape, dtype=torch.float64), log_diag, right, down
    )
    eig = torch.linalg.eigvalsh(d.covariance_matrix)
    low, high = covariance_eigenvalue_bounds(bounds, rho)
    assert eig.min() >= low * (1 - 1e-9)
    assert eig.max() <= high * (1 + 1e-9)


def test_worst_case_couplings_approach_but_respect_the_bound():
    # Saturated couplings of alternating sign stress the bound hardest.
    rho = 0.9
    shape = (6, 6)
    big = torch.full(shape, 1e3, dtype=torch.float64)
    log_diag, right, down = constrain_banded_parameters(
        torch.zeros(shape, dtype=torch.float64),
        big,
        -big,
        log_diag_bounds=(-1e-9, 1e-9),
        rho=rho,
    )
    d = BandedPrecisionNormal(
        torch.zeros(shape, dtype=torch.float64), log_diag, right, down
    )
    eig = torch.linalg.eigvalsh(d.covariance_matrix)
    low, high = covariance_eigenvalue_bounds((-1e-9, 1e-9), rho)
    assert low <= eig.min() and eig.max() <= high
    assert eig.max() > 2.0  # the couplings do matter: well above white noise


def test_constrain_rejects_bad_arguments():
    with pytest.raises(ValueError, match="log_diag_bounds"):
        constrain_banded_parameters(torch.zeros(1), log_diag_bounds=(1.0, 1.0))
    with pytest.raises(ValueError, match="rho"):
        constrain_banded_parameters(torch.zeros(1), rho=1.0)


def test_loc_must_be_an_image():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        BandedPrecisionNormal(torch.zeros(3), torch.zeros(3))


@settings(max_examples=40, deadline=None)
@given(
    H=st.integers(1, 5),
    W=st.integers(1, 5),
    batch=st.integers(1, 3),
    coupling=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_property_log_prob_and_sampling_match_dense(H, W, batch, coupling, seed):
    loc, log_diag, right, down = _random_params(
        (H, W), batch=(batch,), seed=seed, scale=coupling
    )
    d = BandedPrecisionNormal(loc, log_diag, right, down)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, H, W, generator=g, dtype=torch.float64)
    ref = _dense_reference(d)
    np.testing.assert_allclose(
        d.log_prob(x).numpy(),
        ref.log_prob(x.flatten(-2)).numpy(),
        rtol=1e-6,
        atol=1e-9,
    )
    eps = torch.randn(batch, H, W, generator=g, dtype=torch.float64)
    y = d.reparameterize(eps) - loc
    L = d.precision_factor
    np.testing.assert_allclose(
        (L.mT @ y.flatten(-2)[..., None])[..., 0].numpy(),
        eps.flatten(-2).numpy(),
        rtol=1e-8,
        atol=1e-8,
    )


def test_validation_rejects_nan_parameters_and_values_like_torch():
    loc, log_diag, right, down = _random_params((3, 4))
    bad = log_diag.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="parameter log_diag"):
        BandedPrecisionNormal(loc, bad, right, down, validate_args=True)
    # NaN in an ignored boundary entry is no error: that entry is not in L.
    right_nan = right.clone()
    right_nan[0, 1, -1] = float("nan")
    d = BandedPrecisionNormal(loc, log_diag, right_nan, down, validate_args=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="within the support"):
        d.log_prob(x)
    # Infinite values are real numbers to torch's constraint, even when an
    # image's sum is NaN (inf - inf): the exact test decides then.
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    x[1, 0, 0], x[1, 2, 2] = float("inf"), float("-inf")
    assert d.log_prob(x).shape == (2,)
    # Validation off: no check at all.
    BandedPrecisionNormal(loc, bad, right, down, validate_args=False)


def test_relative_validation_checks_the_couplings_as_given():
    # A huge diagonal with zero relative coupling is a valid distribution;
    # the derived absolute coupling inf * 0 = nan must not make it invalid.
    shape = (2, 3, 4)
    zeros = torch.zeros(shape, dtype=torch.float64)
    log_diag = torch.full(shape, 1e3, dtype=torch.float64)
    d = BandedPrecisionNormal(
        zeros, log_diag, zeros, zeros, validate_args=True, relative=True
    )
    assert d.batch_shape == (2,)
    # A nan inside the image is still an invalid argument, named as passed...
    bad = torch.full(shape, 0.1, dtype=torch.float64)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="parameter down"):
        BandedPrecisionNormal(
            zeros, zeros, zeros, bad, validate_args=True, relative=True
        )
    # ... and one in an ignored boundary entry is none.
    bad = torch.full(shape, 0.1, dtype=torch.float64)
    bad[..., -1, :] = float("nan")
    BandedPrecisionNormal(zeros, zeros, zeros, bad, validate_args=True, relative=True)


@pytest.mark.parametrize("relative", [False, True])
def test_nan_boundary_couplings_leave_every_gradient_finite(relative):
    loc, log_diag, right, down = (
        t.requires_grad_() for t in _random_params((3, 4), seed=8)
    )
    right_nan = torch.where(
        torch.arange(4) == 3, torch.tensor(float("nan"), dtype=torch.float64), right
    )
    d = BandedPrecisionNormal(loc, log_diag, right_nan, down, relative=relative)
    torch.manual_seed(0)
    loss = d.rsample((2,)).sum() + d.precision_matrix.sum() + d.variance.sum()
    for g in torch.autograd.grad(loss, [loc, log_diag, right, down]):
        assert torch.isfinite(g).all()


DENSE = ["precision_factor", "precision_matrix", "covariance_matrix", "variance"]


@pytest.mark.parametrize("name", DENSE)
def test_dense_matrices_are_computed_once(name):
    d = BandedPrecisionNormal(*_random_params((3, 4)))
    assert name not in vars(d)
    assert getattr(d, name) is getattr(d, name)
    assert name in vars(d)


@pytest.mark.parametrize("cached", [False, True])
def test_expand_keeps_dense_matrices_consistent(cached):
    d = BandedPrecisionNormal(*_random_params((2, 3), batch=(1,)))
    if cached:
        values = {name: getattr(d, name) for name in DENSE}
    e = d.expand((3,))
    fresh = BandedPrecisionNormal(e.loc, e.log_diag, e.right, e.down)
    for name in DENSE:
        torch.testing.assert_close(getattr(e, name), getattr(fresh, name), msg=name)
        if cached:  # views of what was computed, not a recomputation
            ptr = getattr(e, name).untyped_storage().data_ptr()
            assert ptr == values[name].untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "make",
    [
        lambda loc, ld: DiagonalPrecisionNormal(loc, ld),
        lambda loc, ld: SphericalPrecisionNormal(loc, ld[..., 0, 0]),
    ],
    ids=["diagonal", "spherical"],
)
def test_special_cases_expand(make):
    loc, log_diag, _, _ = _random_params((2, 3), batch=(1,))
    d = make(loc, log_diag)
    e = d.expand((4,))
    assert type(e) is type(d) and e.batch_shape == (4,)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(e.log_prob(x), d.log_prob(x))


@pytest.mark.parametrize(
    "shapes",
    [
        [(2, 3, 4), (2, 3, 5), (2, 3, 4), (2, 3, 4)],  # log_diag
        [(2, 3, 4), (2, 3, 4), (3, 3, 4), (2, 3, 4)],  # right: batch
        [(2, 3, 4), (2, 3, 4), (2, 3, 4), (2, 4, 4)],  # down
        [(2, 1, 1), (2, 3, 4), (2, 3, 4), (2, 3, 4)],  # loc is no full image
    ],
)
def test_mismatched_parameter_shapes_raise_value_error(shapes):
    params = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)") as info:
        BandedPrecisionNormal(*params)
    for shape in set(shapes):
        assert str(shape) in str(info.value)


@pytest.mark.parametrize("validate_args", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 4, 4), (3, 3, 4), (12,)])
def test_values_of_the_wrong_shape_raise_value_error(shape, validate_args):
    d = BandedPrecisionNormal(
        *_random_params((3, 4)), validate_args=validate_args, relative=True
    )
    value = torch.zeros(shape, dtype=torch.float64)
    for method in (d.log_prob, d.whiten, d.reparameterize):
        with pytest.raises(ValueError, match=str(shape)):
            method(value)


def test_log_prob_sums_in_the_requested_dtype():
    params64 = _random_params((5, 6), seed=9)
    params32 = [t.float() for t in params64]
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    d32 = BandedPrecisionNormal(*params32, relative=True)
    d64 = BandedPrecisionNormal(*params64, relative=True)
    lp = d32.log_prob(x.float(), sum_dtype=torch.float64)
    assert lp.dtype == torch.float64
    assert torch.equal(d32.log_prob(x.float(), sum_dtype=None), d32.log_prob(x.float()))
    # Only the float32 maps round: closer to the float64 result than float32 sums.
    err64 = (lp - d64.log_prob(x)).abs().max()
    err32 = (d32.log_prob(x.float()).double() - d64.log_prob(x)).abs().max()
    assert err64 < 1e-4 and err64 <= err32


# StencilPrecisionNormal: the 3x3 neighbourhood (and the cross through it).

STENCIL_SHAPES = [(1, 1), (1, 4), (4, 1), (2, 2), (2, 5), (5, 2), (3, 5), (6, 6)]
OFFSETS = {"cross": [(0, 1), (1, 0)], "3x3": [(0, 1), (1, -1), (1, 0), (1, 1)]}


def _stencil_params(shape, batch=(2,), seed=0, scale=0.3, k=4):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    return (
        torch.randn(*batch, *shape, **kw),
        0.5 * torch.randn(*batch, *shape, **kw),
        scale * torch.randn(*batch, k, *shape, **kw),
    )


def _stencil(params, neighbourhood="3x3", relative=False, **kwargs):
    return StencilPrecisionNormal(
        *params, neighbourhood=neighbourhood, relative=relative, **kwargs
    )


def _stencil_reference_factor(log_diag, couplings, neighbourhood):
    """L written out entry by entry from the definition."""
    H, W = log_diag.shape[-2:]
    L = torch.zeros(H * W, H * W, dtype=log_diag.dtype)
    for r in range(H):
        for c in range(W):
            i = r * W + c
            L[i, i] = log_diag[r, c].exp()
            for k, (dr, dc) in enumerate(OFFSETS[neighbourhood]):
                if r + dr < H and 0 <= c + dc < W:
                    L[(r + dr) * W + c + dc, i] = couplings[k, r, c]
    return L


def test_neighbourhoods_are_documented_offsets():
    assert {k: list(v) for k, v in NEIGHBOURHOODS.items()} == OFFSETS


@pytest.mark.parametrize("neighbourhood", ["cross", "3x3"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1), (2, 2), (3, 4), (4, 3)])
def test_stencil_precision_factor_has_the_documented_entries(shape, neighbourhood):
    k = len(OFFSETS[neighbourhood])
    loc, log_diag, couplings = _stencil_params(shape, batch=(), k=k)
    d = _stencil((loc, log_diag, couplings), neighbourhood)
    expected = _stencil_reference_factor(log_diag, couplings, neighbourhood)
    torch.testing.assert_close(d.precision_factor, expected, rtol=0, atol=0)


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("shape", STENCIL_SHAPES)
def test_stencil_log_prob_matches_dense_multivariate_normal(shape, relative):
    d = _stencil(_stencil_params(shape), relative=relative)
    x = torch.randn(4, 2, *shape, dtype=torch.float64)
    expected = _dense_reference(d).log_prob(x.flatten(-2))
    torch.testing.assert_close(d.log_prob(x), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        d.log_prob(x, sum_dtype=torch.float64), expected, rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("shape", STENCIL_SHAPES)
def test_stencil_reparameterize_solves_the_transposed_factor(shape, relative):
    d = _stencil(_stencil_params(shape, seed=1), relative=relative)
    eps = torch.randn(3, 2, *shape, dtype=torch.float64)
    x = d.reparameterize(eps)
    torch.testing.assert_close(d.whiten(x), eps, rtol=0, atol=1e-10)
    y = torch.linalg.solve_triangular(
        d.precision_factor.mT.expand(3, -1, -1, -1),
        eps.flatten(-2)[..., None],
        upper=True,
    )[..., 0]
    torch.testing.assert_close((x - d.loc).flatten(-2), y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("relative", [False, True])
def test_stencil_cross_is_the_banded_distribution(relative):
    loc, log_diag, couplings = _stencil_params((4, 5), seed=2, k=2)
    d = _stencil((loc, log_diag, couplings), "cross", relative)
    banded = BandedPrecisionNormal(
        loc, log_diag, couplings[:, 0], couplings[:, 1], relative=relative
    )
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), banded.log_prob(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(d.whiten(x), banded.whiten(x))
    torch.testing.assert_close(d.reparameterize(eps), banded.reparameterize(eps))
    torch.testing.assert_close(d.precision_matrix, banded.precision_matrix)
    # The constraint for the cross is the banded one.
    raw = torch.randn(3, 4, 5, dtype=torch.float64)
    ld, c = constrain_stencil_parameters(
        raw[0], raw[1:], neighbourhood="cross", relative=relative
    )
    ld2, r, b = constrain_banded_parameters(raw[0], raw[1], raw[2], relative=relative)
    assert torch.equal(ld, ld2) and torch.equal(c, torch.stack([r, b]))


@pytest.mark.parametrize("relative", [False, True])
def test_stencil_relative_couplings_define_the_same_distribution(relative):
    loc, log_diag, rel = _stencil_params((3, 4), seed=3)
    a = _stencil((loc, log_diag, rel), relative=True)
    b = _stencil((loc, log_diag, log_diag.exp()[:, None] * rel))
    torch.testing.assert_close(a.couplings, b.couplings, rtol=1e-12, atol=0)
    x = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(a.log_prob(x), b.log_prob(x), rtol=1e-12, atol=0)
    eps = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(a.reparameterize(eps), b.reparameterize(eps))


def test_stencil_empirical_covariance_of_samples_matches_covariance_matrix():
    torch.manual_seed(0)
    loc, log_diag, couplings = _stencil_params((3, 4), batch=(), scale=0.5)
    d = _stencil((loc, log_diag, couplings))
    x = d.rsample((200_000,)).flatten(-2)
    cov = d.covariance_matrix
    # Standard error of a correlation ~ 1 / sqrt(n) ~ 0.2% here.
    scale = cov.diagonal().sqrt()
    torch.testing.assert_close(
        torch.cov(x.T) / scale / scale[:, None],
        cov / scale / scale[:, None],
        rtol=0,
        atol=0.01,
    )
    torch.testing.assert_close(x.mean(0), loc.flatten(), rtol=0, atol=0.01 * 5)
    # The diagonal neighbours are correlated: the 3x3 stencil matters.
    corr = cov / scale / scale[:, None]
    assert corr[0, 5].abs() > 0.05  # pixel (0, 0) and (1, 1)


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (2, 2), (3, 5)])
def test_stencil_boundary_couplings_have_no_effect(shape, relative):
    # Every entry whose neighbour is outside the image holds nan or inf:
    # no value, sample, matrix or gradient changes.
    params = _stencil_params(shape, seed=4)
    H, W = shape
    rows = torch.arange(H)[:, None]
    cols = torch.arange(W)
    inside = torch.stack(
        [
            (rows + dr < H) & (cols + dc >= 0) & (cols + dc < W)
            for dr, dc in OFFSETS["3x3"]
        ]
    )
    poison = torch.tensor([float("nan"), float("inf")], dtype=torch.float64)
    couplings = torch.where(inside, params[2], poison[:, None, None, None])
    leaves = [params[0], params[1], couplings]
    leaves = [t.clone().requires_grad_() for t in leaves]
    clean = _stencil(params, relative=relative)
    d = _stencil(leaves, relative=relative, validate_args=True)
    x = torch.randn(5, 2, *shape, dtype=torch.float64)
    eps = torch.randn(5, 2, *shape, dtype=torch.float64)
    lp, sample = d.log_prob(x), d.reparameterize(eps)
    torch.testing.assert_close(lp, clean.log_prob(x), rtol=0, atol=0)
    torch.testing.assert_close(sample, clean.reparameterize(eps), rtol=0, atol=0)
    torch.testing.assert_close(d.precision_matrix, clean.precision_matrix)
    loss = lp.sum() + sample.sum() + d.precision_matrix.sum() + d.variance.sum()
    grads = torch.autograd.grad(loss, leaves)
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[2][:, ~inside] == 0).all()


def test_stencil_sampling_128x128_uses_little_memory():
    # As for the cross: a dense covariance would need 8.6 GB; the wavefront
    # solver a few MB for 8 images.
    grown = _sampling_memory_growth(
        """
        c = 0.2 * torch.ones(8, 4, 128, 128)
        d = StencilPrecisionNormal(torch.zeros(shape), torch.zeros(shape), c)
        """
    )
    assert grown < 200 * 2**20


@pytest.mark.parametrize("relative", [False, True])
def test_stencil_log_prob_and_rsample_pass_gradcheck(relative):
    params = [t.requires_grad_() for t in _stencil_params((3, 4), seed=5)]
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)

    def log_prob(*args):
        return _stencil(args[:3], relative=relative).log_prob(args[3])

    def rsample(*args):
        torch.manual_seed(0)
        return _stencil(args, relative=relative).rsample((2,))

    assert torch.autograd.gradcheck(log_prob, (*params, x))
    assert torch.autograd.gradgradcheck(log_prob, (*params, x))
    assert torch.autograd.gradcheck(rsample, params)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5)])
def test_stencil_entropy_and_variance_match_dense(shape):
    d = _stencil(_stencil_params(shape))
    ref = _dense_reference(d)
    torch.testing.assert_close(d.entropy(), ref.entropy())
    torch.testing.assert_close(d.variance.flatten(-2), ref.variance)


@pytest.mark.parametrize("raw", [1e4, -1e4, 0.0, 30.0])
def test_stencil_constrained_parameters_bound_covariance_eigenvalues(raw):
    bounds, rho = (-2.0, 3.0), 0.9
    g = torch.Generator().manual_seed(1)
    shape = (5, 6)
    raws = raw + 50 * torch.randn(5, *shape, generator=g, dtype=torch.float64)
    raws[2:4] = -raws[2:4]  # couplings of both signs
    log_diag, couplings = constrain_stencil_parameters(
        raws[0], raws[1:], log_diag_bounds=bounds, rho=rho
    )
    assert (log_diag >= bounds[0]).all() and (log_diag <= bounds[1]).all()
    assert (couplings.abs() <= rho / 4 * log_diag.exp() * (1 + 1e-12)).all()
    d = _stencil((torch.zeros(shape, dtype=torch.float64), log_diag, couplings))
    eig = torch.linalg.eigvalsh(d.covariance_matrix)
    low, high = covariance_eigenvalue_bounds(bounds, rho)
    assert eig.min() >= low * (1 - 1e-9)
    assert eig.max() <= high * (1 + 1e-9)


def test_stencil_worst_case_couplings_approach_but_respect_the_bound():
    # Right and below at +rho/4, the diagonals at -rho/4: the symbol of
    # I + N reaches 1 - rho at the checkerboard frequency, the hardest case.
    rho, shape = 0.9, (8, 8)
    big = torch.full(shape, 1e3, dtype=torch.float64)
    raw = torch.stack([big, -big, big, -big])
    bounds = (-1e-9, 1e-9)
    log_diag, couplings = constrain_stencil_parameters(
        torch.zeros(shape, dtype=torch.float64),
        raw,
        log_diag_bounds=bounds,
        rho=rho,
    )
    d = _stencil((torch.zeros(shape, dtype=torch.float64), log_diag, couplings))
    eig = torch.linalg.eigvalsh(d.covariance_matrix)
    low, high = covariance_eigenvalue_bounds(bounds, rho)
    assert low <= eig.min() and eig.max() <= high
    assert eig.max() > 10.0  # well above white noise


def test_stencil_rejects_bad_arguments():
    loc, log_diag, couplings = _stencil_params((3, 4))
    with pytest.raises(ValueError, match="neighbourhood"):
        _stencil((loc, log_diag, couplings), "5x5")
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, H, W\).*\(2, 4, 3, 4\)"):
        _stencil((loc, log_diag, couplings), "cross")
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 5\)"):
        _stencil((loc, log_diag, torch.zeros(2, 4, 3, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"\(3, 3, 4\)"):
        _stencil((loc, log_diag[:1].expand(3, 3, 4), couplings))
    with pytest.raises(ValueError, match="raw_couplings"):
        constrain_stencil_parameters(log_diag, couplings[:, :3])
    with pytest.raises(ValueError, match="rho"):
        constrain_stencil_parameters(log_diag, couplings, rho=1.0)
    d = _stencil((loc, log_diag, couplings))
    for method in (d.log_prob, d.whiten, d.reparameterize):
        with pytest.raises(ValueError, match=r"\(2, 4, 3\)"):
            method(torch.zeros(2, 4, 3, dtype=torch.float64))
    # NaN inside the image is invalid when validating, named as passed.
    bad = couplings.clone()
    bad[1, 2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="parameter couplings"):
        _stencil((loc, log_diag, bad), validate_args=True)
    # A huge diagonal with zero relative couplings is valid.
    _stencil(
        (loc, torch.full_like(log_diag, 1e3), torch.zeros_like(couplings)),
        relative=True,
        validate_args=True,
    )


@pytest.mark.parametrize("cached", [False, True])
def test_stencil_expand_and_lazy_matrices(cached):
    d = _stencil(_stencil_params((2, 3), batch=(1,)))
    for name in DENSE:
        assert name not in vars(d)
    if cached:
        for name in [*DENSE, "couplings"]:
            assert getattr(d, name) is getattr(d, name)
    e = d.expand((3,))
    assert type(e) is StencilPrecisionNormal and e.batch_shape == (3,)
    fresh = _stencil((e.loc, e.log_diag, e.couplings))
    for name in [*DENSE, "couplings"]:
        torch.testing.assert_close(getattr(e, name), getattr(fresh, name), msg=name)
    assert e.rsample((2,)).shape == (2, 3, 2, 3)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(e.log_prob(x), fresh.log_prob(x))


@settings(max_examples=40, deadline=None)
@given(
    H=st.integers(1, 6),
    W=st.integers(1, 6),
    batch=st.integers(1, 3),
    coupling=st.floats(0.0, 1.5),
    seed=st.integers(0, 2**16),
)
def test_property_stencil_log_prob_and_sampling_match_dense(
    H, W, batch, coupling, seed
):
    loc, log_diag, couplings = _stencil_params(
        (H, W), batch=(batch,), seed=seed, scale=coupling
    )
    d = _stencil((loc, log_diag, couplings))
    L = torch.stack(
        [
            _stencil_reference_factor(log_diag[i], couplings[i], "3x3")
            for i in range(batch)
        ]
    )
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, H, W, generator=g, dtype=torch.float64)
    ref = MultivariateNormal(loc.flatten(-2), precision_matrix=L @ L.mT)
    np.testing.assert_allclose(
        d.log_prob(x).numpy(),
        ref.log_prob(x.flatten(-2)).numpy(),
        rtol=1e-6,
        atol=1e-9,
    )
    eps = torch.randn(batch, H, W, generator=g, dtype=torch.float64)
    y = d.reparameterize(eps) - loc
    np.testing.assert_allclose(
        (L.mT @ y.flatten(-2)[..., None])[..., 0].numpy(),
        eps.flatten(-2).numpy(),
        rtol=1e-8,
        atol=1e-8,
    )
