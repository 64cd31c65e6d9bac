r"""Gaussian distributions over images with a banded precision factor.

A :class:`BandedPrecisionNormal` is a Gaussian over images ``x`` of shape
``(H, W)``, flattened row-major into ``D = H * W`` pixels (pixel
``i = row * W + col``), with mean ``loc`` and precision matrix
:math:`\Lambda = L L^\top`, where the lower-triangular factor ``L`` has

* ``L[i, i] = exp(log_diag[i])`` (always positive),
* ``L[i + 1, i] = right[i]`` (the right-hand neighbour; ignored where
  ``col == W - 1``),
* ``L[i + W, i] = down[i]`` (the neighbour below; ignored where
  ``row == H - 1``),

and zeros elsewhere. With :math:`e = x - \mu`,

.. math::

    \log p(x) = -\tfrac{D}{2}\log 2\pi + \sum_i \mathrm{log\_diag}_i
                - \tfrac12 \lVert L^\top e \rVert^2,
    \qquad
    (L^\top e)_i = e^{\mathrm{log\_diag}_i} e_i + \mathrm{right}_i e_{i+1}
                   + \mathrm{down}_i e_{i+W},

which costs O(D) and builds no D x D matrix. A sample is
:math:`x = \mu + L^{-\top}\varepsilon` with :math:`\varepsilon \sim N(0, I)`:
the upper-triangular system :math:`L^\top y = \varepsilon` is solved by back
substitution. Pixel ``(r, c)`` depends only on ``(r, c + 1)`` and
``(r + 1, c)``, so all pixels on one anti-diagonal ``r + c = s`` are solved
at once, from ``s = H + W - 2`` down to ``0``: ``H + W - 1`` vectorised steps,
O(D) work and memory.

A :class:`StencilPrecisionNormal` couples each pixel to a larger stencil of
later neighbours (:data:`NEIGHBOURHOODS`): with ``'3x3'``, the right,
below-left, below and below-right ones. The below-left neighbour shares its
pixel's anti-diagonal, so its back substitution runs along the wavefronts
``2 r + c = t`` instead: ``2 (H - 1) + W`` vectorised steps, O(D) still.

Multi-channel images ``(C, H, W)`` (a survey's science, template and
difference stamps) are modelled by :class:`IndependentChannels`: one such
Gaussian per channel, the channels independent, so the precision factor of
the ``D = C * H * W`` pixels (flattened channel-first) is block diagonal and
the log-density is the sum of the channels' own.

The module also holds :func:`constrain_banded_parameters` and
:func:`constrain_stencil_parameters`, the maps from unconstrained network
outputs to parameters whose covariance is well conditioned by construction
(see their docstrings for the eigenvalue bound).
"""

import functools
import math
from types import MappingProxyType

import torch
from torch.distributions import Distribution, constraints
from torch.distributions.utils import lazy_property

__all__ = [
    "NEIGHBOURHOODS",
    "BandedPrecisionNormal",
    "DiagonalPrecisionNormal",
    "IndependentChannels",
    "SphericalPrecisionNormal",
    "StencilPrecisionNormal",
    "constrain_banded_parameters",
    "constrain_stencil_parameters",
    "covariance_eigenvalue_bounds",
]

_LOG_2PI = math.log(2.0 * math.pi)

#: Neighbours of a pixel that come after it in row-major order, as (row
#: offset, column offset), in the order of the coupling channels of
#: :class:`StencilPrecisionNormal`. Read-only: the wavefront solver is proved
#: for these stencils (one row down at most), not for any.
NEIGHBOURHOODS = MappingProxyType(
    {
        "cross": ((0, 1), (1, 0)),
        "3x3": ((0, 1), (1, -1), (1, 0), (1, 1)),
    }
)


def _mask_boundary(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero the last entry of ``t`` along ``dim`` (-1: last column, -2: last row).

    ``right`` in the last column and ``down`` in the last row would link a
    pixel to a neighbour outside the image; they are not part of ``L``.
    ``torch.where`` (not a product with a 0/1 mask) keeps them out even when
    they hold inf or NaN.
    """
    n = t.shape[dim]
    keep = torch.arange(n, device=t.device) < n - 1
    if dim == -2:
        keep = keep[:, None]
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


class _RealImages(constraints.independent):
    """``independent(real, 2)`` checked through one sum per image.

    A NaN anywhere in an image makes its sum NaN, so images whose sum is a
    number are valid; only when some sum is NaN (also for images holding both
    +inf and -inf, which are valid) is the exact elementwise test run. The
    verdict is torch's, at a fraction of the cost of validating every pixel.
    """

    def __init__(self):
        super().__init__(constraints.real, 2)

    def check(self, value):
        valid = ~torch.isnan(value.sum((-2, -1)))
        if bool(valid.all()):
            return valid
        return super().check(value)


_REAL_IMAGES = _RealImages()


def _add_couplings_(out, right, down, e):
    """Add ``right * e_{i+1} + down * e_{i+W}`` into ``out`` in place.

    ``e_{i+1}`` and ``e_{i+W}`` are ``e`` shifted left by one column and up
    by one row. Only the entries of ``right`` outside the last column and of
    ``down`` outside the last row are read, so those boundary entries never
    matter, whatever they hold; no shifted, padded copy of ``e`` is made.
    """
    out[..., :, :-1].addcmul_(right[..., :, :-1], e[..., :, 1:])
    out[..., :-1, :].addcmul_(down[..., :-1, :], e[..., 1:, :])
    return out


def _add_couplings_t_(out, right, down, g):
    """Transpose of :func:`_add_couplings_`: shifts right and down instead."""
    out[..., :, 1:].addcmul_(right[..., :, :-1], g[..., :, :-1])
    out[..., 1:, :].addcmul_(down[..., :-1, :], g[..., :-1, :])
    return out


def _factor_t_product(e, d, right, down, relative):
    r"""Return :math:`L^\top e` given the diagonal ``d = exp(log_diag)``.

    With absolute couplings, :math:`(L^\top e)_i = d_i e_i + r_i e_{i+1} +
    b_i e_{i+W}`; with couplings relative to the diagonal
    (:math:`r_i = d_i \kappa^r_i`, :math:`b_i = d_i \kappa^b_i`), the same
    product is :math:`d_i (e_i + \kappa^r_i e_{i+1} + \kappa^b_i e_{i+W})`,
    i.e. :math:`L^\top = D (I + N)` with ``N`` holding the relative couplings.
    """
    if relative:
        return d * _add_couplings_(e.clone(), right, down, e)
    return _add_couplings_(d * e, right, down, e)


class _FactorTransposeProduct(torch.autograd.Function):
    r"""Autograd for :math:`u = L^\top e` with a hand-written backward.

    With :math:`g = \partial \ell / \partial u` and absolute couplings, the
    gradients are :math:`L g` for ``e`` (the transposed stencil: ``g`` shifted
    right by one column and down by one row), :math:`g \odot d \odot e` for
    ``log_diag``, and :math:`g_i e_{i+1}`, :math:`g_i e_{i+W}` for ``right``
    and ``down`` (zero on the ignored boundary entries). With relative
    couplings, :math:`u = d \odot v` and :math:`v = (I + N) e`: the same
    expressions with :math:`d \odot g` in place of ``g``, and
    :math:`g \odot u` for ``log_diag``.

    Written out, the backward pass is a few fused elementwise operations
    instead of the slice-and-copy nodes that autograd would record for the
    in-place forward. It is itself made of differentiable operations
    (recomputing ``d`` from ``log_diag`` when a graph of the backward pass is
    asked for), so double backward works, and so do ``torch.func``
    transforms (``generate_vmap_rule``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(e, log_diag, right, down, relative):
        d = log_diag.exp()
        return _factor_t_product(e, d, right, down, relative), d

    @staticmethod
    def setup_context(ctx, inputs, output):
        e, log_diag, right, down, relative = inputs
        u, d = output
        ctx.mark_non_differentiable(d)
        ctx.save_for_backward(e, log_diag, d, right, down, u if relative else None)
        ctx.shapes = [t.shape for t in inputs[:4]]
        ctx.relative = relative

    @staticmethod
    def backward(ctx, grad_u, _grad_d):
        e, log_diag, d, right, down, u = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: ``d`` must carry its dependence on log_diag.
            d = log_diag.exp()
        shape_e, shape_ld, shape_r, shape_b = ctx.shapes
        need = ctx.needs_input_grad
        # Gradient with respect to the stencil's output, (I + N) e or L^T e.
        g = d * grad_u if ctx.relative else grad_u
        grad_e = grad_ld = grad_r = grad_b = None
        if need[0]:
            grad_e = g.clone() if ctx.relative else d * grad_u
            grad_e = _add_couplings_t_(grad_e, right, down, g).sum_to_size(shape_e)
        if need[1]:
            grad_ld = grad_u * u if ctx.relative else grad_u * d * e
            grad_ld = grad_ld.sum_to_size(shape_ld)
        if need[2]:
            grad_r = torch.nn.functional.pad(
                g[..., :, :-1] * e[..., :, 1:], (0, 1)
            ).sum_to_size(shape_r)
        if need[3]:
            grad_b = torch.nn.functional.pad(
                g[..., :-1, :] * e[..., 1:, :], (0, 0, 0, 1)
            ).sum_to_size(shape_b)
        return grad_e, grad_ld, grad_r, grad_b, None


def _apply_factor_t(
    e: torch.Tensor,
    log_diag: torch.Tensor,
    right: torch.Tensor,
    down: torch.Tensor,
    relative: bool = False,
) -> torch.Tensor:
    r"""Return :math:`L^\top e` for images ``e`` of shape (..., H, W).

    See :func:`_factor_t_product`; boundary entries of ``right`` and ``down``
    are ignored. Differentiable in every tensor argument.
    """
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (e, log_diag, right, down)
    ):
        return _FactorTransposeProduct.apply(e, log_diag, right, down, relative)[0]
    return _factor_t_product(e, log_diag.exp(), right, down, relative)


@functools.lru_cache(maxsize=64)
def _antidiagonal_order(H: int, W: int, device: torch.device):
    """Raster indices sorted by anti-diagonal, their inverse, and sizes.

    Anti-diagonal ``s`` holds the pixels ``(r, s - r)`` with ``r`` ascending.
    Cached: the order depends on the image shape only.
    """
    rows = torch.arange(H, device=device)[:, None].expand(H, W)
    cols = torch.arange(W, device=device)[None, :].expand(H, W)
    key = (rows + cols) * H + rows  # sort by diagonal, then by row
    order = torch.argsort(key.reshape(-1))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(H * W, device=device)
    sizes = [min(s, H - 1) - max(0, s - W + 1) + 1 for s in range(H + W - 1)]
    return order, inverse, sizes


def _solve_factor_t(
    eps: torch.Tensor, log_diag: torch.Tensor, right: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    r"""Solve :math:`L^\top y = \varepsilon` for ``y``, all of shape (..., H, W).

    Back substitution :math:`y_i = (\varepsilon_i - r_i y_{i+1} - b_i y_{i+W})
    / d_i`, one anti-diagonal at a time from the bottom-right corner. In
    anti-diagonal order, the right and lower neighbours of the ``n_s`` pixels
    of diagonal ``s`` are two contiguous runs of diagonal ``s + 1``, once that
    diagonal is padded with a zero at each end (the zeros stand for the
    neighbours outside the image). Every step is a few vectorised ops on
    runs; no D x D matrix is formed and autograd flows through (the sample
    is reparameterised). Splitting (not slicing) the diagonal-ordered inputs
    keeps the backward pass O(H * W), as in :func:`_solve_stencil_t`: the
    gradient of a split is one concatenation, where a slice per step would
    scatter into a full-size zero tensor per step, O(H * W * (H + W)).
    """
    H, W = eps.shape[-2:]
    batch_shape = eps.shape[:-2]
    order, inverse, sizes = _antidiagonal_order(H, W, eps.device)
    inv_d = torch.exp(-log_diag)

    def by_diagonal(t):
        return t.reshape(*batch_shape, H * W)[..., order].split(sizes, dim=-1)

    a = by_diagonal(eps * inv_d)
    g_right = by_diagonal(right * inv_d)
    g_down = by_diagonal(down * inv_d)
    pieces = [None] * len(sizes)
    previous = None  # diagonal s + 1, zero-padded at both ends
    for s in range(len(sizes) - 1, -1, -1):
        y, n = a[s], sizes[s]
        if previous is not None:
            # First row on diagonal s, minus first row on diagonal s + 1.
            offset = max(0, s - W + 1) - max(0, s + 2 - W) + 1
            # Two fused multiply-subtracts: few kernels per step matters on
            # GPUs, where the H + W - 1 steps are bound by launch latency.
            # Out of place first: ``a[s]`` is a view of the input.
            y = torch.addcmul(
                y, g_right[s], previous[..., offset : offset + n], value=-1
            ).addcmul_(g_down[s], previous[..., offset + 1 : offset + 1 + n], value=-1)
        pieces[s] = y
        previous = torch.nn.functional.pad(y, (1, 1))
    y = torch.cat(pieces, dim=-1)
    return y[..., inverse].reshape(*batch_shape, H, W)


def _dense_factor(
    log_diag: torch.Tensor, right: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Dense lower-triangular ``L`` of shape (..., D, D); for small images."""
    H, W = log_diag.shape[-2:]
    D = H * W
    batch_shape = log_diag.shape[:-2]
    L = torch.diag_embed(log_diag.exp().reshape(*batch_shape, D))
    idx = torch.arange(D, device=log_diag.device)
    r = right.reshape(*batch_shape, D)
    b = down.reshape(*batch_shape, D)
    # Boundary entries of right/down are already zero, so writing them adds
    # nothing, except for right[D - 1] and down[i >= D - W] which would fall
    # outside the matrix: skip those indices.
    L[..., idx[:-1] + 1, idx[:-1]] = r[..., :-1]
    if H > 1:
        L[..., idx[:-W] + W, idx[:-W]] = b[..., :-W]
    return L


def _offsets(neighbourhood: str) -> tuple:
    """Offsets of ``neighbourhood``, or a ``ValueError`` naming the known ones."""
    try:
        return NEIGHBOURHOODS[neighbourhood]
    except (KeyError, TypeError):
        raise ValueError(
            f"neighbourhood must be one of {sorted(NEIGHBOURHOODS)}, "
            f"got {neighbourhood!r}."
        ) from None


def _check_coupling_channels(couplings, neighbourhood, name="couplings"):
    """Raise a ``ValueError`` unless ``couplings`` is (..., K, H, W)."""
    K = len(_offsets(neighbourhood))
    if couplings.dim() < 3 or couplings.shape[-3] != K:
        raise ValueError(
            f"{name} must have shape (..., {K}, H, W) for neighbourhood "
            f"{neighbourhood!r}, one channel per neighbour; got shape "
            f"{tuple(couplings.shape)}."
        )


@functools.lru_cache(maxsize=64)
def _neighbour_masks(H: int, W: int, offsets: tuple, device: torch.device):
    """Boolean (K, H, W): whether each pixel's k-th neighbour is in the image."""
    rows = torch.arange(H, device=device)[:, None]
    cols = torch.arange(W, device=device)[None, :]
    return torch.stack(
        [(rows + dr < H) & (cols + dc >= 0) & (cols + dc < W) for dr, dc in offsets]
    )


def _neighbour_slices(H: int, W: int, dr: int, dc: int):
    """Slices of the pixels whose neighbour ``(dr, dc)`` is in the image.

    Returns ``(rows, cols)`` of those pixels and ``(rows, cols)`` of their
    neighbours, regions of the same size.
    """
    pixels = slice(0, H - dr), slice(max(0, -dc), W - max(0, dc))
    neighbours = slice(dr, H), slice(max(0, dc), W - max(0, -dc))
    return pixels, neighbours


def _stencil_t_product(e, d, couplings, offsets, relative):
    r"""Return :math:`L^\top e` for a stencil factor, images of shape (..., H, W).

    :math:`(L^\top e)_i = d_i e_i + \sum_k c_{k,i}\, e_{i + \delta_k}` over the
    neighbours :math:`i + \delta_k` inside the image; with couplings relative
    to the diagonal, :math:`d_i (e_i + \sum_k \kappa_{k,i}\, e_{i+\delta_k})`.
    Each neighbour adds one product of two slices, so the coupling entries of
    pixels whose neighbour is outside the image are never read (nor do they
    get a gradient), whatever they hold. ``e`` must have the full shape.
    """
    H, W = e.shape[-2:]
    out = e.clone() if relative else d * e
    for k, (dr, dc) in enumerate(offsets):
        (rows, cols), (n_rows, n_cols) = _neighbour_slices(H, W, dr, dc)
        out[..., rows, cols].addcmul_(
            couplings[..., k, rows, cols], e[..., n_rows, n_cols]
        )
    return d * out if relative else out


@functools.lru_cache(maxsize=64)
def _wavefront_plan(H: int, W: int, offsets: tuple, device: torch.device):
    """Pixels ordered by wavefront, and where each wavefront's neighbours are.

    Wavefront ``t`` holds the pixels ``(r, t - a r)``, ``r`` ascending, with
    the smallest slope ``a >= 1`` that puts every neighbour ``(r + dr, c +
    dc)`` on a later wavefront ``t + a dr + dc``: ``a = 1`` (anti-diagonals)
    for the cross, ``a = 2`` for the 3x3 stencil, whose below-left neighbour
    shares its pixel's anti-diagonal; ``a (H - 1) + W`` wavefronts.

    The k-th neighbours of the pixels of wavefront ``t`` (rows ``lo(t)`` ...)
    are rows ``lo(t) + dr`` ... of wavefront ``u = t + a dr + dc``: a run of
    consecutive entries of ``u`` once ``u`` is padded with one zero at each
    end, which stand for the neighbours outside the image (a step of the run
    leaves the image only at its ends, where ``r + dr`` passes the first or
    last row of ``u`` by one).

    Returns
    -------
    order, inverse : torch.Tensor
        Raster indices in wavefront order, and the inverse permutation.
    sizes : list of int
        Pixels per wavefront (zero on some when ``W = 1``).
    steps : list of list of (k, u, start)
        For wavefront ``t``: neighbour channel ``k``, neighbour wavefront
        ``u`` and start of the run in padded ``u``; neighbours outside the
        image for the whole wavefront are left out.
    """
    a = max([1] + [-((dc - 1) // dr) for dr, dc in offsets if dr > 0])
    rows = torch.arange(H, device=device)[:, None].expand(H, W)
    cols = torch.arange(W, device=device)[None, :].expand(H, W)
    key = (a * rows + cols) * H + rows  # by wavefront, then by row
    order = torch.argsort(key.reshape(-1))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(H * W, device=device)
    n_waves = a * (H - 1) + W
    lo = [max(0, -((W - 1 - t) // a)) for t in range(n_waves)]
    sizes = [max(0, min(H - 1, t // a) - lo[t] + 1) for t in range(n_waves)]
    steps = []
    for t in range(n_waves):
        step = []
        for k, (dr, dc) in enumerate(offsets):
            u = t + a * dr + dc
            if sizes[t] and u < n_waves and sizes[u]:
                step.append((k, u, lo[t] + dr - lo[u] + 1))
        steps.append(step)
    return order, inverse, sizes, steps


def _solve_stencil_t(
    eps: torch.Tensor, inv_d: torch.Tensor, g: torch.Tensor, offsets: tuple
) -> torch.Tensor:
    r"""Solve :math:`L^\top y = \varepsilon` for a stencil factor.

    ``eps`` is (..., H, W), ``inv_d = exp(-log_diag)`` and the couplings over
    the diagonal ``g = c / d`` (..., K, H, W), zero where a neighbour is
    outside the image. Back substitution :math:`y_i = \varepsilon_i / d_i -
    \sum_k g_{k,i}\, y_{i + \delta_k}`, one wavefront at a time from the last
    (see :func:`_wavefront_plan`): each step is one fused multiply-subtract
    per neighbour on contiguous runs, O(H * W) work and memory in all.
    Splitting (not slicing) the wavefront-ordered inputs keeps the backward
    pass O(H * W) too: its gradient is one concatenation, where a slice per
    step would scatter into a full-size zero tensor per step.
    """
    H, W = eps.shape[-2:]
    order, inverse, sizes, steps = _wavefront_plan(H, W, offsets, eps.device)

    def by_wavefront(t):
        return t.flatten(-2)[..., order].split(sizes, dim=-1)

    a = by_wavefront(eps * inv_d)
    g = [by_wavefront(g_k) for g_k in g.unbind(-3)]
    pieces = [None] * len(sizes)
    padded = [None] * len(sizes)
    for t in range(len(sizes) - 1, -1, -1):
        y, n = a[t], sizes[t]
        for j, (k, u, start) in enumerate(steps[t]):
            neighbours = padded[u][..., start : start + n]
            if j == 0:  # out of place: ``a[t]`` is a view of the input
                y = torch.addcmul(y, g[k][t], neighbours, value=-1)
            else:
                y.addcmul_(g[k][t], neighbours, value=-1)
        pieces[t] = y
        padded[t] = torch.nn.functional.pad(y, (1, 1))
    y = torch.cat(pieces, dim=-1)
    return y[..., inverse].unflatten(-1, (H, W))


def _dense_stencil_factor(
    log_diag: torch.Tensor, couplings: torch.Tensor, offsets: tuple
) -> torch.Tensor:
    """Dense lower-triangular ``L`` (..., D, D) of a stencil; for small images.

    ``L[i + dr * W + dc, i]`` is the k-th coupling of pixel ``i`` wherever
    that neighbour is in the image.
    """
    H, W = log_diag.shape[-2:]
    L = torch.diag_embed(log_diag.exp().flatten(-2))
    masks = _neighbour_masks(H, W, offsets, log_diag.device)
    flat = couplings.flatten(-2)
    for k, (dr, dc) in enumerate(offsets):
        i = masks[k].flatten().nonzero()[:, 0]
        L[..., i + dr * W + dc, i] = flat[..., k, i]
    return L


def _broadcastable(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts against ``target`` (torch's rule)."""
    return all(
        i == j or i == 1 or j == 1 for i, j in zip(reversed(shape), reversed(target))
    )


def _common_shape(
    loc: torch.Tensor, shapes: dict, channels: str | None = None
) -> torch.Size:
    """Broadcast shape of the parameters, whose last two dimensions are loc's.

    ``shapes`` maps each parameter's name to its shape; the parameter named
    ``channels`` has a channel dimension, (..., K, H, W), left out of the
    broadcast. A mismatch raises a ``ValueError`` naming every shape, where
    broadcasting would raise a ``RuntimeError`` naming none or, worse,
    succeed with another image shape.
    """
    images = [s[:-3] + s[-2:] if n == channels else s for n, s in shapes.items()]
    try:
        shape = torch.broadcast_shapes(*images)
    except RuntimeError:
        shape = None
    if shape is None or shape[-2:] != loc.shape[-2:]:
        got = ", ".join(f"{name} {tuple(s)}" for name, s in shapes.items())
        raise ValueError(
            "The parameters must broadcast to one shape (..., H, W) with the "
            f"image shape (H, W) = {tuple(loc.shape[-2:])} of loc; got shapes "
            f"{got}."
        )
    return shape


class _PrecisionFactorNormal(Distribution):
    r"""What Gaussians over images with a precision factor ``L`` share.

    Subclasses set ``loc`` and ``log_diag`` (of the full batch and event
    shape) and define ``_whiten`` (:math:`L^\top (x - \mu)`, shapes
    checked), :meth:`reparameterize`, ``_dense_factor`` and
    ``_has_couplings``. Dense matrices are lazy properties, computed on first
    access and then stored on the instance, as in :mod:`torch.distributions`.
    """

    support = _REAL_IMAGES
    has_rsample = True

    def _check_argument(self, name, value):
        """Validate ``value`` as parameter ``name``, with torch's message."""
        constraint = self.arg_constraints[name]
        if not bool(constraint.check(value).all()):
            raise ValueError(
                f"Expected parameter {name} "
                f"({type(value).__name__} of shape {tuple(value.shape)}) "
                f"of distribution {self!r} "
                f"to satisfy the constraint {constraint!r}, "
                f"but found invalid values:\n{value}"
            )

    def _check_value_shape(self, value, name="value"):
        """Raise a ``ValueError`` unless ``value`` is images that broadcast."""
        shape = self.batch_shape + self.event_shape
        if value.shape[-2:] != self.event_shape or not _broadcastable(
            value.shape, shape
        ):
            raise ValueError(
                f"{name} must have shape (..., {', '.join(map(str, shape))}), "
                "its leading dimensions broadcastable with the batch shape "
                f"{tuple(self.batch_shape)}; got shape {tuple(value.shape)}."
            )

    def _expand_cached(self, new, batch_shape):
        """Give ``new`` views of the lazy properties ``self`` has computed."""
        n = len(self.batch_shape)
        for name, value in vars(self).items():
            if isinstance(getattr(type(self), name, None), lazy_property):
                setattr(new, name, value.expand(batch_shape + value.shape[n:]))

    @property
    def mean(self):
        return self.loc

    @property
    def mode(self):
        return self.loc

    @lazy_property
    def variance(self):
        """Marginal variances, shape (..., H, W).

        Exact and cheap without couplings; otherwise the diagonal of the dense
        :attr:`covariance_matrix` (small images only).
        """
        if not self._has_couplings:
            return torch.exp(-2.0 * self.log_diag)
        return torch.diagonal(self.covariance_matrix, dim1=-2, dim2=-1).reshape(
            self.loc.shape
        )

    @lazy_property
    def precision_factor(self):
        """Dense lower-triangular factor ``L``, shape (..., D, D)."""
        return self._dense_factor()

    @lazy_property
    def precision_matrix(self):
        """Dense precision ``L @ L.mT``, shape (..., D, D)."""
        L = self.precision_factor
        return L @ L.mT

    @lazy_property
    def covariance_matrix(self):
        """Dense covariance, the inverse of the precision, shape (..., D, D)."""
        # Sigma = L^-T L^-1, from the inverse of the triangular factor.
        L = self.precision_factor
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
        return L_inv.mT @ L_inv

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.reparameterize(eps)

    def log_prob(self, value, *, sum_dtype=None):
        r"""Log-density of images ``value``.

        :math:`-\tfrac{D}{2}\log 2\pi + \sum_i \mathrm{log\_diag}_i -
        \tfrac12 \lVert L^\top (x - \mu) \rVert^2`, in O(H * W) per image.

        Parameters
        ----------
        value : torch.Tensor of shape (..., H, W)
            Images; the leading dimensions broadcast with :attr:`batch_shape`.
        sum_dtype : torch.dtype, optional
            Dtype of the two per-image sums (of ``log_diag`` and of the
            squared whitened residual) and of the result; ``None``: the dtype
            of the parameters. With float32 parameters, ``torch.float64``
            keeps sums over many pixels from losing digits, at a fraction of
            the cost of float64 throughout (``CovarianceVAE`` scores so).

        Returns
        -------
        torch.Tensor of the broadcast batch shape
        """
        self._check_value_shape(value)
        if self._validate_args:
            self._validate_sample(value)
        u = self._whiten(value)
        D = self.event_shape.numel()
        return (
            -0.5 * D * _LOG_2PI
            + self.log_diag.sum((-2, -1), dtype=sum_dtype)
            - 0.5 * u.pow(2).sum((-2, -1), dtype=sum_dtype)
        )

    def entropy(self):
        D = self.event_shape.numel()
        return 0.5 * D * (1.0 + _LOG_2PI) - self.log_diag.sum((-2, -1))

    def whiten(self, value):
        r"""Return :math:`L^\top (x - \mu)`, standard normal noise under the model.

        Parameters
        ----------
        value : torch.Tensor of shape (..., H, W)
            Images; the leading dimensions broadcast with :attr:`batch_shape`.

        Returns
        -------
        torch.Tensor of the broadcast shape
        """
        self._check_value_shape(value)
        return self._whiten(value)


class BandedPrecisionNormal(_PrecisionFactorNormal):
    r"""Gaussian over images whose precision has a banded Cholesky factor.

    The precision is :math:`\Lambda = L L^\top` with ``L`` lower triangular,
    ``L[i, i] = exp(log_diag[i])``, ``L[i + 1, i] = right[i]`` and
    ``L[i + W, i] = down[i]`` for pixels flattened row-major (see the module
    docstring). ``log_prob`` and ``rsample`` cost O(H * W) per image and build
    no dense matrix.

    Parameters
    ----------
    loc : torch.Tensor of shape (..., H, W)
        Mean image.
    log_diag : torch.Tensor broadcastable to (..., H, W)
        Logarithm of the diagonal of ``L``.
    right : torch.Tensor broadcastable to (..., H, W) or None
        Coupling of each pixel to its right-hand neighbour. Entries in the
        last column are ignored. ``None`` means zero.
    down : torch.Tensor broadcastable to (..., H, W) or None
        Coupling of each pixel to the pixel below. Entries in the last row
        are ignored. ``None`` means zero.
    validate_args : bool, optional
        Passed to :class:`torch.distributions.Distribution`. The couplings
        are checked as passed (relative ones too), boundary entries aside.
    relative : bool, default=False
        If True, ``right`` and ``down`` are given relative to the diagonal:
        ``L[i + 1, i] = exp(log_diag[i]) * right[i]``, and likewise for
        ``down``. This is the form in which
        :func:`constrain_banded_parameters` bounds them (``|right| + |down|
        <= rho``), and ``log_prob`` is then a little cheaper; the attributes
        :attr:`right` and :attr:`down` always hold the absolute couplings.

    Attributes
    ----------
    right, down : torch.Tensor of shape (..., H, W)
        Absolute couplings, zero on the ignored boundary entries.
    precision_factor : torch.Tensor of shape (..., D, D)
        Dense ``L``; for small images and plots.
    precision_matrix : torch.Tensor of shape (..., D, D)
        Dense ``L @ L.mT``.
    covariance_matrix : torch.Tensor of shape (..., D, D)
        Dense inverse of the precision.
    variance : torch.Tensor of shape (..., H, W)
        Marginal variances (from the dense covariance when coupled).

    These are computed on first access and then kept, as in
    :mod:`torch.distributions`; the dense ones need O(D^2) memory and the
    covariance O(D^3) time.

    Raises
    ------
    ValueError
        If the parameters do not broadcast to one shape with the image shape
        of ``loc``, or, when validating, if one holds NaN.

    See Also
    --------
    DiagonalPrecisionNormal : ``right = down = 0``.
    SphericalPrecisionNormal : one scale for every pixel.
    torch.distributions.MultivariateNormal : the dense equivalent.

    References
    ----------
    .. [1] Dorta, G., Vicente, S., Agapito, L., Campbell, N. D. F. and
       Simpson, I., "Structured Uncertainty Prediction Networks", CVPR 2018.

    Examples
    --------
    >>> import torch
    >>> from sk_covvae.distributions import BandedPrecisionNormal
    >>> loc = torch.zeros(2, 3, 4)
    >>> d = BandedPrecisionNormal(loc, torch.zeros(2, 3, 4),
    ...                           0.3 * torch.ones(2, 3, 4), -0.2 * torch.ones(2, 3, 4))
    >>> d.batch_shape, d.event_shape
    (torch.Size([2]), torch.Size([3, 4]))
    >>> d.log_prob(torch.zeros(2, 3, 4)).shape
    torch.Size([2])
    >>> d.log_prob(torch.zeros(2, 3, 4), sum_dtype=torch.float64).dtype
    torch.float64
    >>> d.rsample((5,)).shape
    torch.Size([5, 2, 3, 4])
    >>> d.precision_matrix.shape
    torch.Size([2, 12, 12])
    """

    arg_constraints = {
        "loc": _REAL_IMAGES,
        "log_diag": _REAL_IMAGES,
        "right": _REAL_IMAGES,
        "down": _REAL_IMAGES,
    }

    def __init__(
        self,
        loc,
        log_diag,
        right=None,
        down=None,
        validate_args=None,
        *,
        relative=False,
    ):
        if loc.dim() < 2:
            raise ValueError(
                "loc must have at least 2 dimensions (..., H, W), "
                f"got shape {tuple(loc.shape)}."
            )
        given = {"loc": loc, "log_diag": log_diag, "right": right, "down": down}
        _common_shape(
            loc, {name: t.shape for name, t in given.items() if t is not None}
        )
        self._banded = right is not None or down is not None
        zero = torch.zeros((), dtype=loc.dtype, device=loc.device)
        right = zero if right is None else right
        down = zero if down is None else down
        loc, log_diag, right, down = torch.broadcast_tensors(loc, log_diag, right, down)
        self.loc = loc
        self.log_diag = log_diag
        # Kept as given: log_prob never reads the boundary entries, and the
        # lazy properties ``right`` and ``down`` mask them.
        self._right = right
        self._down = down
        self._relative = bool(relative) and self._banded
        # torch validates loc and log_diag, and skips the lazy right and down:
        # those derive from log_diag when relative (inf * 0 where the diagonal
        # overflows), so the couplings are checked as passed instead.
        super().__init__(
            batch_shape=loc.shape[:-2],
            event_shape=loc.shape[-2:],
            validate_args=validate_args,
        )
        if self._validate_args and self._banded:
            self._check_argument("right", _mask_boundary(self._right, -1))
            self._check_argument("down", _mask_boundary(self._down, -2))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BandedPrecisionNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.event_shape
        new.loc = self.loc.expand(shape)
        new.log_diag = self.log_diag.expand(shape)
        new._right = self._right.expand(shape)
        new._down = self._down.expand(shape)
        new._banded = self._banded
        new._relative = self._relative
        self._expand_cached(new, batch_shape)
        super(BandedPrecisionNormal, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @property
    def _has_couplings(self):
        return self._banded

    def _absolute(self, coupling, dim):
        if not self._banded:
            return coupling
        if self._relative:
            # Masked before the product too: a NaN boundary entry would
            # otherwise make the gradient of log_diag NaN (0 * NaN).
            coupling = self.log_diag.exp() * _mask_boundary(coupling, dim)
        return _mask_boundary(coupling, dim)

    @lazy_property
    def right(self):
        """Couplings ``L[i + 1, i]`` to the right neighbour, 0 in the last column."""
        return self._absolute(self._right, -1)

    @lazy_property
    def down(self):
        """Couplings ``L[i + W, i]`` to the neighbour below, 0 in the last row."""
        return self._absolute(self._down, -2)

    def _dense_factor(self):
        return _dense_factor(self.log_diag, self.right, self.down)

    def _whiten(self, value):
        e = value - self.loc
        if not self._banded:
            return self.log_diag.exp() * e
        return _apply_factor_t(
            e, self.log_diag, self._right, self._down, self._relative
        )

    def reparameterize(self, eps):
        r"""Map standard normal noise to samples, :math:`\mu + L^{-\top}\varepsilon`.

        The inverse of :meth:`whiten`. Useful to draw samples with a
        :class:`torch.Generator` of one's own.

        Parameters
        ----------
        eps : torch.Tensor of shape (..., H, W)
            Noise whose trailing dimensions match :attr:`batch_shape` +
            :attr:`event_shape` (or broadcast with it).

        Returns
        -------
        torch.Tensor of the broadcast shape
        """
        self._check_value_shape(eps, "eps")
        if not self._banded:
            return self.loc + torch.exp(-self.log_diag) * eps
        shape = torch.broadcast_shapes(eps.shape, self.loc.shape)
        params = [t.expand(shape) for t in (self.log_diag, self.right, self.down)]
        return self.loc + _solve_factor_t(eps.expand(shape), *params)


class DiagonalPrecisionNormal(BandedPrecisionNormal):
    r"""Independent pixels with scales ``exp(-log_diag)``.

    The special case ``right = down = 0`` of :class:`BandedPrecisionNormal`;
    the same as ``Independent(Normal(loc, exp(-log_diag)), 2)``.

    Parameters
    ----------
    loc : torch.Tensor of shape (..., H, W)
    log_diag : torch.Tensor broadcastable to (..., H, W)
        Log precision square root of each pixel (minus its log scale).
    validate_args : bool, optional

    Examples
    --------
    >>> import torch
    >>> from sk_covvae.distributions import DiagonalPrecisionNormal
    >>> d = DiagonalPrecisionNormal(torch.zeros(3, 3), torch.zeros(3, 3))
    >>> round(float(d.log_prob(torch.zeros(3, 3))), 4)
    -8.2704
    """

    def __init__(self, loc, log_diag, validate_args=None):
        super().__init__(loc, log_diag, None, None, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalPrecisionNormal, _instance)
        return super().expand(batch_shape, _instance=new)


class SphericalPrecisionNormal(BandedPrecisionNormal):
    r"""One scale ``exp(-log_diag)`` shared by every pixel of an image.

    Parameters
    ----------
    loc : torch.Tensor of shape (..., H, W)
    log_diag : torch.Tensor of shape (...,) or a scalar tensor
        Log precision square root shared by the pixels of each image.
    validate_args : bool, optional

    Examples
    --------
    >>> import torch
    >>> from sk_covvae.distributions import SphericalPrecisionNormal
    >>> d = SphericalPrecisionNormal(torch.zeros(4, 2, 2), torch.tensor(1.0))
    >>> d.variance[0]
    tensor([[0.1353, 0.1353],
            [0.1353, 0.1353]])
    """

    def __init__(self, loc, log_diag, validate_args=None):
        log_diag = torch.as_tensor(log_diag, dtype=loc.dtype, device=loc.device)
        super().__init__(
            loc, log_diag[..., None, None], None, None, validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SphericalPrecisionNormal, _instance)
        return super().expand(batch_shape, _instance=new)


class StencilPrecisionNormal(_PrecisionFactorNormal):
    r"""Gaussian over images whose precision factor couples a stencil of pixels.

    The precision is :math:`\Lambda = L L^\top` with ``L`` lower triangular,
    ``L[i, i] = exp(log_diag[i])`` and, for each neighbour ``(dr, dc)`` of
    the stencil that lies in the image, ``L[i + dr * W + dc, i] =
    couplings[k, i]`` (pixels flattened row-major). The neighbourhoods, in
    the order of the coupling channels ``k``:

    * ``'cross'``: right ``(0, 1)``, below ``(1, 0)``; the same distribution
      as :class:`BandedPrecisionNormal`.
    * ``'3x3'``: right ``(0, 1)``, below-left ``(1, -1)``, below ``(1, 0)``,
      below-right ``(1, 1)``: the lower half of a 3x3 stencil. The
      precision then couples each pixel with its eight neighbours, and with
      the pixels at offsets ``(0, +-2)``, ``(1, -2)`` and ``(-1, 2)``.

    With :math:`e = x - \mu`, :math:`\log p(x) = -\tfrac{D}{2}\log 2\pi +
    \sum_i \mathrm{log\_diag}_i - \tfrac12 \lVert L^\top e \rVert^2` and
    :math:`(L^\top e)_i = d_i e_i + \sum_k c_{k,i}\, e_{i + \delta_k}`, O(K D)
    per image. Samples :math:`\mu + L^{-\top}\varepsilon` come from back
    substitution along wavefronts ``t = a * row + col`` (``a = 2`` for the
    3x3 stencil, where the below-left neighbour lies on its pixel's
    anti-diagonal; ``a = 1`` for the cross): ``a (H - 1) + W`` vectorised
    steps, O(K D) work and memory, differentiable, on any device.

    Parameters
    ----------
    loc : torch.Tensor of shape (..., H, W)
        Mean image.
    log_diag : torch.Tensor broadcastable to (..., H, W)
        Logarithm of the diagonal of ``L``.
    couplings : torch.Tensor broadcastable to (..., K, H, W)
        Coupling of each pixel to each of its ``K`` neighbours (channel
        ``k`` for the k-th neighbour above). Entries whose neighbour is
        outside the image are ignored, even inf or NaN.
    validate_args : bool, optional
        Passed to :class:`torch.distributions.Distribution`; the couplings
        are checked as passed, ignored entries aside.
    neighbourhood : {'3x3', 'cross'}, default='3x3'
        The stencil; see :data:`NEIGHBOURHOODS`.
    relative : bool, default=False
        If True, ``couplings`` are given relative to the diagonal,
        ``L[i + dr * W + dc, i] = exp(log_diag[i]) * couplings[k, i]``: the
        form in which :func:`constrain_stencil_parameters` bounds them, and
        a little cheaper. The attribute :attr:`couplings` always holds the
        absolute couplings.

    Attributes
    ----------
    neighbourhood : str
        The stencil's name.
    couplings : torch.Tensor of shape (..., K, H, W)
        Absolute couplings, zero where the neighbour is outside the image.
    precision_factor, precision_matrix, covariance_matrix : torch.Tensor
        Dense ``L``, ``L @ L.mT`` and its inverse, shape (..., D, D); for
        small images and plots.
    variance : torch.Tensor of shape (..., H, W)
        Marginal variances, from the dense covariance.

    These are computed on first access and then kept, as in
    :mod:`torch.distributions`.

    Raises
    ------
    ValueError
        If ``neighbourhood`` is unknown, ``couplings`` has not one channel per
        neighbour, the parameters do not broadcast to one shape with the image
        shape of ``loc``, or, when validating, a parameter holds NaN.

    See Also
    --------
    BandedPrecisionNormal : The cross, with a faster ``log_prob`` backward.
    constrain_stencil_parameters : Well-conditioned parameters from network
        outputs.

    Examples
    --------
    >>> import torch
    >>> from sk_covvae.distributions import StencilPrecisionNormal
    >>> loc = torch.zeros(2, 3, 4)
    >>> couplings = 0.2 * torch.ones(2, 4, 3, 4)
    >>> d = StencilPrecisionNormal(loc, torch.zeros(2, 3, 4), couplings)
    >>> d.batch_shape, d.event_shape
    (torch.Size([2]), torch.Size([3, 4]))
    >>> d.log_prob(torch.zeros(2, 3, 4)).shape
    torch.Size([2])
    >>> d.rsample((5,)).shape
    torch.Size([5, 2, 3, 4])

    Row 5 of ``L``, pixel ``(1, 1)``, holds the couplings of the pixels whose
    neighbour it is, ``(0, 0)``, ``(0, 1)``, ``(0, 2)`` and ``(1, 0)``:

    >>> d.precision_factor[0, 5, :6]
    tensor([0.2000, 0.2000, 0.2000, 0.0000, 0.2000, 1.0000])
    """

    arg_constraints = {
        "loc": _REAL_IMAGES,
        "log_diag": _REAL_IMAGES,
        "couplings": _REAL_IMAGES,
    }

    def __init__(
        self,
        loc,
        log_diag,
        couplings,
        validate_args=None,
        *,
        neighbourhood="3x3",
        relative=False,
    ):
        if loc.dim() < 2:
            raise ValueError(
                "loc must have at least 2 dimensions (..., H, W), "
                f"got shape {tuple(loc.shape)}."
            )
        offsets = _offsets(neighbourhood)
        _check_coupling_channels(couplings, neighbourhood)
        shape = _common_shape(
            loc,
            {
                "loc": loc.shape,
                "log_diag": log_diag.shape,
                "couplings": couplings.shape,
            },
            channels="couplings",
        )
        self.loc = loc.expand(shape)
        self.log_diag = log_diag.expand(shape)
        # Kept as given, as in BandedPrecisionNormal.
        self._couplings = couplings.expand(shape[:-2] + (len(offsets),) + shape[-2:])
        self.neighbourhood = neighbourhood
        self._offsets = offsets
        self._relative = bool(relative)
        super().__init__(
            batch_shape=shape[:-2], event_shape=shape[-2:], validate_args=validate_args
        )
        if self._validate_args:
            self._check_argument("couplings", self._mask(self._couplings))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StencilPrecisionNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.log_diag = self.log_diag.expand(batch_shape + self.event_shape)
        new._couplings = self._couplings.expand(
            batch_shape + self._couplings.shape[-3:]
        )
        new.neighbourhood = self.neighbourhood
        new._offsets = self._offsets
        new._relative = self._relative
        self._expand_cached(new, batch_shape)
        super(StencilPrecisionNormal, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    _has_couplings = True

    def _mask(self, couplings):
        """Zero the entries whose neighbour is outside the image.

        ``torch.where``, not a product with a 0/1 mask, so that inf or NaN
        there neither shows nor reaches a gradient.
        """
        H, W = self.event_shape
        keep = _neighbour_masks(H, W, self._offsets, couplings.device)
        zero = torch.zeros((), dtype=couplings.dtype, device=couplings.device)
        return torch.where(keep, couplings, zero)

    @lazy_property
    def couplings(self):
        """Couplings ``L[i + dr * W + dc, i]``, 0 where the neighbour is outside."""
        couplings = self._mask(self._couplings)
        if self._relative:
            # Masked after the product too: an infinite diagonal times 0.
            couplings = self._mask(self.log_diag.exp()[..., None, :, :] * couplings)
        return couplings

    def _dense_factor(self):
        return _dense_stencil_factor(self.log_diag, self.couplings, self._offsets)

    def _whiten(self, value):
        return _stencil_t_product(
            value - self.loc,
            self.log_diag.exp(),
            self._couplings,
            self._offsets,
            self._relative,
        )

    def reparameterize(self, eps):
        r"""Map standard normal noise to samples, :math:`\mu + L^{-\top}\varepsilon`.

        The inverse of :meth:`whiten`.

        Parameters
        ----------
        eps : torch.Tensor of shape (..., H, W)
            Noise whose trailing dimensions match :attr:`batch_shape` +
            :attr:`event_shape` (or broadcast with it).

        Returns
        -------
        torch.Tensor of the broadcast shape
        """
        self._check_value_shape(eps, "eps")
        inv_d = torch.exp(-self.log_diag)
        if self._relative:
            g = self._mask(self._couplings)
        else:
            g = self.couplings * inv_d[..., None, :, :]
        shape = torch.broadcast_shapes(eps.shape, self.loc.shape)
        return self.loc + _solve_stencil_t(eps.expand(shape), inv_d, g, self._offsets)


class IndependentChannels(Distribution):
    r"""Gaussian over multi-channel images (C, H, W) with independent channels.

    Wraps a precision-factor Gaussian ``base`` (any of the classes above)
    whose last batch dimension is the channel: ``base`` has batch shape
    (..., C) and event shape (H, W), and this distribution has batch shape
    (...) and event shape (C, H, W). Channel ``c`` has its own mean and
    precision factor :math:`L_c`; the factor of the whole image, flattened
    channel-first (pixel ``i = (c * H + row) * W + col``), is the block
    diagonal :math:`L = \mathrm{diag}(L_1, \dots, L_C)`, so

    .. math::

        \log p(x) = \sum_c \log p_c(x_c), \qquad
        L^\top (x - \mu) = (L_c^\top (x_c - \mu_c))_c ,

    in O(C * H * W), and a sample draws every channel by its own back
    substitution. What a user of ``base`` would use (:meth:`whiten`,
    :meth:`reparameterize`, the dense matrices) has the same meaning here,
    over the ``D = C * H * W`` pixels.

    Parameters
    ----------
    base : BandedPrecisionNormal or StencilPrecisionNormal
        Batch shape (..., C), event shape (H, W).
    validate_args : bool, optional
        Checks values passed to :meth:`log_prob` against the support.

    Examples
    --------
    >>> import torch
    >>> from sk_covvae.distributions import (
    ...     BandedPrecisionNormal, IndependentChannels)
    >>> loc = torch.zeros(5, 3, 4, 4)  # 5 images of 3 channels
    >>> base = BandedPrecisionNormal(loc, torch.zeros_like(loc),
    ...                              0.3 * torch.ones_like(loc), None)
    >>> d = IndependentChannels(base)
    >>> d.batch_shape, d.event_shape
    (torch.Size([5]), torch.Size([3, 4, 4]))
    >>> d.log_prob(torch.zeros(5, 3, 4, 4)).shape
    torch.Size([5])
    >>> d.covariance_matrix.shape
    torch.Size([5, 48, 48])
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, base, validate_args=None):
        if not isinstance(base, _PrecisionFactorNormal):
            raise TypeError(
                "base must be a precision-factor Gaussian of sk_covvae."
                f"distributions, got {type(base).__name__}."
            )
        if len(base.batch_shape) < 1:
            raise ValueError(
                "base needs a channel dimension: batch shape (..., C), got "
                f"{tuple(base.batch_shape)}."
            )
        self.base = base
        super().__init__(
            batch_shape=base.batch_shape[:-1],
            event_shape=base.batch_shape[-1:] + base.event_shape,
            validate_args=validate_args,
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(IndependentChannels, _instance)
        batch_shape = torch.Size(batch_shape)
        new.base = self.base.expand(batch_shape + self.event_shape[:1])
        super(IndependentChannels, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def _check_value_shape(self, value, name="value"):
        if value.shape[-3:] != self.event_shape:
            raise ValueError(
                f"{name} must have shape (..., "
                f"{', '.join(map(str, self.event_shape))}), its leading "
                f"dimensions broadcastable with the batch shape "
                f"{tuple(self.batch_shape)}; got shape {tuple(value.shape)}."
            )

    @property
    def loc(self):
        """Means, shape (..., C, H, W)."""
        return self.base.loc

    @property
    def log_diag(self):
        """Log diagonal of each channel's factor, shape (..., C, H, W)."""
        return self.base.log_diag

    @property
    def mean(self):
        return self.base.mean

    @property
    def mode(self):
        return self.base.mode

    @property
    def variance(self):
        """Marginal variances, shape (..., C, H, W)."""
        return self.base.variance

    def _block_diagonal(self, blocks):
        """(..., C, d, d) channel blocks as one (..., C * d, C * d) matrix."""
        C, d = blocks.shape[-3], blocks.shape[-1]
        out = blocks.new_zeros(blocks.shape[:-3] + (C, d, C, d))
        for c in range(C):
            out[..., c, :, c, :] = blocks[..., c, :, :]
        return out.reshape(blocks.shape[:-3] + (C * d, C * d))

    @lazy_property
    def precision_factor(self):
        """Dense block-diagonal lower-triangular factor, shape (..., D, D)."""
        return self._block_diagonal(self.base.precision_factor)

    @lazy_property
    def precision_matrix(self):
        """Dense block-diagonal precision, shape (..., D, D)."""
        return self._block_diagonal(self.base.precision_matrix)

    @lazy_property
    def covariance_matrix(self):
        """Dense block-diagonal covariance, shape (..., D, D)."""
        return self._block_diagonal(self.base.covariance_matrix)

    def rsample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape)

    def log_prob(self, value, *, sum_dtype=None):
        """Log-density of images ``value``: the sum of the channels' own.

        Parameters
        ----------
        value : torch.Tensor of shape (..., C, H, W)
        sum_dtype : torch.dtype, optional
            As in :meth:`BandedPrecisionNormal.log_prob`; the sum over
            channels is in the same dtype.

        Returns
        -------
        torch.Tensor of the broadcast batch shape
        """
        self._check_value_shape(value)
        if self._validate_args:
            self._validate_sample(value)
        return self.base.log_prob(value, sum_dtype=sum_dtype).sum(-1)

    def entropy(self):
        return self.base.entropy().sum(-1)

    def whiten(self, value):
        r"""Return :math:`L^\top (x - \mu)`, shape (..., C, H, W).

        Parameters
        ----------
        value : torch.Tensor of shape (..., C, H, W)
        """
        self._check_value_shape(value)
        return self.base.whiten(value)

    def reparameterize(self, eps):
        r"""Map standard normal noise (..., C, H, W) to samples.

        Parameters
        ----------
        eps : torch.Tensor of shape (..., C, H, W)
        """
        self._check_value_shape(eps, "eps")
        return self.base.reparameterize(eps)


def constrain_banded_parameters(
    raw_log_diag: torch.Tensor,
    raw_right: torch.Tensor | None = None,
    raw_down: torch.Tensor | None = None,
    *,
    log_diag_bounds: tuple[float, float] = (-2.3, 6.9),
    rho: float = 0.9,
    relative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    r"""Map unconstrained outputs to well-conditioned precision parameters.

    .. math::

        \mathrm{log\_diag} = a + (b - a)\,\sigma(\mathrm{raw}), \quad
        \mathrm{right} = \tfrac{\rho}{2} e^{\mathrm{log\_diag}}
                         \tanh(\mathrm{raw\_right}), \quad
        \mathrm{down} = \tfrac{\rho}{2} e^{\mathrm{log\_diag}}
                        \tanh(\mathrm{raw\_down}),

    with :math:`(a, b)` = ``log_diag_bounds`` and :math:`\sigma` the logistic
    function. Hence :math:`e^a \le L_{ii} \le e^b` and
    :math:`|\mathrm{right}_i| + |\mathrm{down}_i| \le \rho L_{ii}`, so
    :math:`L^\top` is strictly diagonally dominant by rows.

    **Eigenvalue bound.** Write :math:`L^\top = D (I + N)` with
    :math:`N = D^{-1}(R + B)`, where ``R`` and ``B`` hold the right and down
    couplings on single off-diagonals. A matrix with one nonzero
    off-diagonal has 2-norm equal to its largest entry, so
    :math:`\lVert N \rVert_2 \le \rho/2 + \rho/2 = \rho < 1` and the singular
    values of :math:`L` lie in :math:`[(1-\rho) e^a, (1+\rho) e^b]`. The
    covariance :math:`\Sigma = (L L^\top)^{-1}` therefore has every eigenvalue
    in

    .. math::

        \left[\frac{e^{-2b}}{(1+\rho)^2},\; \frac{e^{-2a}}{(1-\rho)^2}\right],

    whatever the raw outputs (``nan`` aside); see
    :func:`covariance_eigenvalue_bounds`. Every pixel's marginal variance
    and every sample's deviation from the mean are bounded accordingly, which
    rules out the extreme pixels of ill-conditioned covariances.

    Parameters
    ----------
    raw_log_diag : torch.Tensor
        Unconstrained output for the log diagonal.
    raw_right, raw_down : torch.Tensor or None
        Unconstrained outputs for the couplings (``None``: not modelled).
    log_diag_bounds : tuple of float (a, b), default=(-2.3, 6.9)
        Interval of ``log_diag``: per-pixel scales ``exp(-log_diag)`` lie in
        ``[exp(-b), exp(-a)]``, i.e. about [1e-3, 10] by default.
    rho : float in [0, 1), default=0.9
        Bound on the off-diagonal mass of each row of :math:`L^\top` relative
        to its diagonal.
    relative : bool, default=False
        If True, return ``right`` and ``down`` divided by the diagonal,
        :math:`\tfrac{\rho}{2}\tanh(\mathrm{raw})`, for
        ``BandedPrecisionNormal(..., relative=True)`` (same distribution,
        fewer operations).

    Returns
    -------
    log_diag, right, down : torch.Tensor (``right``/``down`` None if not given)

    Examples
    --------
    >>> import torch
    >>> from sk_covvae.distributions import constrain_banded_parameters
    >>> ld, r, d = constrain_banded_parameters(
    ...     torch.tensor([1e4]), torch.tensor([1e4]), torch.tensor([-1e4]))
    >>> bool(r.abs() + d.abs() <= 0.9 * ld.exp() + 1e-6)
    True
    """
    low, high = log_diag_bounds
    if not low < high:
        raise ValueError(f"log_diag_bounds must satisfy a < b, got {log_diag_bounds}.")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must lie in [0, 1), got {rho}.")
    log_diag = low + (high - low) * torch.sigmoid(raw_log_diag)
    half = 0.5 * rho if relative else 0.5 * rho * log_diag.exp()
    right = None if raw_right is None else half * torch.tanh(raw_right)
    down = None if raw_down is None else half * torch.tanh(raw_down)
    return log_diag, right, down


def constrain_stencil_parameters(
    raw_log_diag: torch.Tensor,
    raw_couplings: torch.Tensor,
    *,
    neighbourhood: str = "3x3",
    log_diag_bounds: tuple[float, float] = (-2.3, 6.9),
    rho: float = 0.9,
    relative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Map unconstrained outputs to well-conditioned stencil parameters.

    For :class:`StencilPrecisionNormal` with ``K`` neighbours per pixel
    (``K = 2`` for ``'cross'``, 4 for ``'3x3'``):

    .. math::

        \mathrm{log\_diag} = a + (b - a)\,\sigma(\mathrm{raw}), \qquad
        c_{k,i} = \tfrac{\rho}{K}\, e^{\mathrm{log\_diag}_i}
                  \tanh(\mathrm{raw}_{k,i}),

    so :math:`e^a \le d_i \le e^b` and every coupling over its diagonal,
    :math:`\kappa_{k,i} = c_{k,i} / d_i`, has :math:`|\kappa_{k,i}| \le
    \rho / K`. For ``'cross'`` this is :func:`constrain_banded_parameters`.

    **Eigenvalue bound.** The covariance has every eigenvalue in

    .. math::

        \left[\frac{e^{-2b}}{(1+\rho)^2},\; \frac{e^{-2a}}{(1-\rho)^2}\right],

    the interval of :func:`covariance_eigenvalue_bounds`, whatever the raw
    outputs (NaN aside) and whatever ``K``.

    *Proof.* Let ``D`` be the diagonal matrix of the :math:`d_i`. Then
    :math:`L^\top = D (I + N)` with :math:`N = \sum_k N_k`, where
    :math:`(N_k)_{i,\, i + \delta_k} = \kappa_{k,i}` for the pixels whose
    k-th neighbour, at raster offset :math:`\delta_k = dr_k W + dc_k > 0`,
    is in the image, and every other entry of :math:`N_k` is zero. As
    :math:`i \mapsto i + \delta_k` is injective, :math:`N_k` has at most one
    nonzero entry per row and per column, so :math:`N_k^\top N_k` is diagonal
    with entries :math:`\kappa_{k,i}^2` and :math:`\lVert N_k \rVert_2 =
    \max_i |\kappa_{k,i}| \le \rho / K`. By the triangle inequality
    :math:`\lVert N \rVert_2 \le K \cdot \rho / K = \rho < 1`. For a unit
    vector :math:`x`, :math:`1 - \rho \le \lVert (I + N) x \rVert \le
    1 + \rho`, and :math:`e^a \lVert y \rVert \le \lVert D y \rVert \le e^b
    \lVert y \rVert`; so the singular values of :math:`L^\top` lie in
    :math:`[(1 - \rho) e^a, (1 + \rho) e^b]`. The eigenvalues of
    :math:`\Lambda = L L^\top` are their squares, and those of
    :math:`\Sigma = \Lambda^{-1}` the reciprocals: the interval above.
    :math:`\square`

    Why per coupling: a bound on each row's total, :math:`\sum_k
    |\kappa_{k,i}| \le \rho` (strict diagonal dominance of :math:`L^\top` by
    rows), bounds only :math:`\lVert N \rVert_\infty`, the largest row sum,
    and the spectral norm needs the columns too (:math:`\lVert N \rVert_2
    \le \sqrt{\lVert N \rVert_1 \lVert N \rVert_\infty}`). A pixel is the
    neighbour of up to ``K`` pixels (pixel ``(1, 1)`` of the 3x3 stencil is
    the right, below-right, below and below-left neighbour of ``(1, 0)``,
    ``(0, 0)``, ``(0, 1)`` and ``(0, 2)``), so with row totals alone a
    column of :math:`N` can hold ``K`` entries :math:`\rho`: then
    :math:`\lVert N \rVert_2 \ge \sqrt{K} \rho` (:math:`2 \rho` for the
    3x3 stencil), which proves nothing once it reaches 1. With
    :math:`\rho / K` per coupling, rows and columns of :math:`N` both sum to
    at most :math:`\rho`.

    Parameters
    ----------
    raw_log_diag : torch.Tensor of shape (..., H, W)
        Unconstrained output for the log diagonal.
    raw_couplings : torch.Tensor of shape (..., K, H, W)
        Unconstrained outputs for the couplings, one channel per neighbour
        in the order of :data:`NEIGHBOURHOODS`.
    neighbourhood : {'3x3', 'cross'}, default='3x3'
    log_diag_bounds : tuple of float (a, b), default=(-2.3, 6.9)
        Interval of ``log_diag``, as in :func:`constrain_banded_parameters`.
    rho : float in [0, 1), default=0.9
        Bound on the spectral norm of :math:`N`; each coupling gets
        :math:`\rho / K` of the diagonal.
    relative : bool, default=False
        If True, return the couplings over the diagonal,
        :math:`\tfrac{\rho}{K}\tanh(\mathrm{raw})`, for
        ``StencilPrecisionNormal(..., relative=True)``.

    Returns
    -------
    log_diag : torch.Tensor of shape (..., H, W)
    couplings : torch.Tensor of shape (..., K, H, W)

    Examples
    --------
    >>> import torch
    >>> from sk_covvae.distributions import (
    ...     StencilPrecisionNormal, constrain_stencil_parameters,
    ...     covariance_eigenvalue_bounds)
    >>> g = torch.Generator().manual_seed(0)
    >>> raw = 1e3 * torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    >>> log_diag, couplings = constrain_stencil_parameters(
    ...     raw[0], raw[1:], log_diag_bounds=(0.0, 1.0), rho=0.9)
    >>> d = StencilPrecisionNormal(torch.zeros(6, 6, dtype=torch.float64),
    ...                            log_diag, couplings)
    >>> eig = torch.linalg.eigvalsh(d.covariance_matrix)
    >>> low, high = covariance_eigenvalue_bounds((0.0, 1.0), rho=0.9)
    >>> bool(low <= eig.min()) and bool(eig.max() <= high)
    True
    """
    _check_coupling_channels(raw_couplings, neighbourhood, "raw_couplings")
    K = raw_couplings.shape[-3]
    log_diag, _, _ = constrain_banded_parameters(
        raw_log_diag, log_diag_bounds=log_diag_bounds, rho=rho
    )
    share = rho / K if relative else rho / K * log_diag.exp()[..., None, :, :]
    return log_diag, share * torch.tanh(raw_couplings)


def covariance_eigenvalue_bounds(
    log_diag_bounds: tuple[float, float] = (-2.3, 6.9), rho: float = 0.9
) -> tuple[float, float]:
    """Bounds on the covariance's eigenvalues of constrained parameters.

    They hold for :func:`constrain_banded_parameters` and for
    :func:`constrain_stencil_parameters` with any neighbourhood, with the same
    ``log_diag_bounds`` and ``rho``: each splits ``rho`` among a pixel's
    ``K`` couplings, so the interval does not depend on ``K`` (see the proof
    in :func:`constrain_stencil_parameters`).

    Parameters
    ----------
    log_diag_bounds : tuple of float (a, b)
    rho : float in [0, 1)

    Returns
    -------
    lower, upper : float
        ``exp(-2 b) / (1 + rho)**2`` and ``exp(-2 a) / (1 - rho)**2``.

    Examples
    --------
    >>> from sk_covvae.distributions import covariance_eigenvalue_bounds
    >>> lo, hi = covariance_eigenvalue_bounds((0.0, 1.0), rho=0.5)
    >>> round(lo, 4), round(hi, 4)
    (0.0601, 4.0)
    """
    low, high = log_diag_bounds
    return (
        math.exp(-2.0 * high) / (1.0 + rho) ** 2,
        math.exp(-2.0 * low) / (1.0 - rho) ** 2,
    )
