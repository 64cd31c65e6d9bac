"""PyTorch modules of the convolutional VAE: encoder, decoder and its heads.

The layer sizes follow from the image shape, so that one architecture serves
28x28 Fashion-MNIST, 21x21 survey stamps, non-square images and the tiny
images of scikit-learn's common checks: each of the two convolutions halves a
dimension (stride 2) while it is at least ``_MIN_SIZE_TO_STRIDE`` pixels and
keeps it otherwise, and the transposed convolutions undo exactly that.

Images are (H, W), one channel, or (C, H, W): the encoder then reads C input
channels and the decoder gives each channel its own mean and covariance
parameters (:class:`~sk_covvae.distributions.IndependentChannels`).
"""

import math

import torch
from torch import nn

from sk_covvae.distributions import (
    NEIGHBOURHOODS,
    BandedPrecisionNormal,
    DiagonalPrecisionNormal,
    IndependentChannels,
    SphericalPrecisionNormal,
    StencilPrecisionNormal,
    constrain_banded_parameters,
    constrain_stencil_parameters,
)

_MIN_SIZE_TO_STRIDE = 8
# Posterior log-variances are soft-clamped to (-_LOGVAR_BOUND, _LOGVAR_BOUND):
# q(z|x) standard deviations in about [0.02, 55], far outside the useful range
# on either side, but never 0 or inf.
_LOGVAR_BOUND = 8.0


def _downsampling_plan(size: int) -> list[tuple[int, int, int]]:
    """(stride, input size, output size) of the two convolutions along one axis."""
    plan = []
    for _ in range(2):
        stride = 2 if size >= _MIN_SIZE_TO_STRIDE else 1
        out = (size - 1) // stride + 1  # kernel 3, padding 1
        plan.append((stride, size, out))
        size = out
    return plan


def _split_shape(image_shape):
    """(C, H, W) of an image shape (H, W) or (C, H, W)."""
    if len(image_shape) == 2:
        return (1, *image_shape)
    return tuple(image_shape)


def _conv_transpose(in_channels, out_channels, plan_h, plan_w):
    """Transposed convolution inverting the convolution of ``plan_h``/``plan_w``.

    ``ConvTranspose2d`` (kernel 3, padding 1) maps n to (n - 1) * s + 1 + p;
    the output padding p restores the exact input size of the convolution.
    """
    (sh, in_h, out_h), (sw, in_w, out_w) = plan_h, plan_w
    pad_h = in_h - ((out_h - 1) * sh + 1)
    pad_w = in_w - ((out_w - 1) * sw + 1)
    return nn.ConvTranspose2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=(sh, sw),
        padding=1,
        output_padding=(pad_h, pad_w),
    )


class Encoder(nn.Module):
    """Two convolutions and two fully connected layers giving q(z|x).

    Parameters
    ----------
    image_shape : tuple of int (H, W) or (C, H, W)
    n_components : int
        Size of the latent space.
    channels : tuple of int (c1, c2)
        Channels of the two convolutions.
    hidden_units : int
        Width of the hidden fully connected layer.
    """

    def __init__(self, image_shape, n_components, channels, hidden_units):
        super().__init__()
        C, H, W = _split_shape(image_shape)
        plan_h, plan_w = _downsampling_plan(H), _downsampling_plan(W)
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(C, c1, 3, stride=(plan_h[0][0], plan_w[0][0]), padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=(plan_h[1][0], plan_w[1][0]), padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        flat = c2 * plan_h[1][2] * plan_w[1][2]
        self.fc = nn.Sequential(
            nn.Linear(flat, hidden_units),
            nn.ReLU(),
            nn.Linear(hidden_units, 2 * n_components),
        )
        self.n_components = n_components

    def forward(self, x, dtype=None):
        """Return the mean and log-variance of q(z|x) for images (N, C, H, W).

        ``dtype`` (default: that of the weights) is the dtype of the outputs
        and of the soft clamp of the log-variance; see ``VAEModule.encode``.
        """
        h = self.fc(self.conv(x))
        if dtype is not None:
            h = h.to(dtype)
        mu, raw_logvar = h.split(self.n_components, dim=-1)
        logvar = _LOGVAR_BOUND * torch.tanh(raw_logvar / _LOGVAR_BOUND)
        return mu, logvar


def _head(c2, c1, out_channels, plan_h, plan_w):
    return nn.Sequential(
        _conv_transpose(c2, c1, plan_h[1], plan_w[1]),
        nn.ReLU(),
        _conv_transpose(c1, out_channels, plan_h[0], plan_w[0]),
    )


class Decoder(nn.Module):
    """Two fully connected layers feeding a mean head and a covariance head.

    Each head is two transposed convolutions. The covariance head emits the
    unconstrained ``log_diag`` (and, for ``'banded'``, ``right`` and ``down``),
    which :func:`~sk_covvae.distributions.constrain_banded_parameters` maps to
    a well-conditioned precision factor; ``'spherical'`` has no head, only one
    learned scalar. With C channels, the heads emit these for every channel
    (output channel ``c * (1 + K) + j`` is parameter ``j`` of channel ``c``)
    and ``'spherical'`` learns one scalar per channel.

    Parameters
    ----------
    image_shape : tuple of int (H, W) or (C, H, W)
    n_components : int
    covariance : {'spherical', 'diagonal', 'banded'}
    channels : tuple of int (c1, c2)
    hidden_units : int
    log_diag_bounds : tuple of float (a, b)
        Interval of the log diagonal of the precision factor.
    rho : float in [0, 1)
        Off-diagonal mass of each row of L^T relative to its diagonal.
    neighbourhood : {'cross', '3x3'}, default='cross'
        Neighbours of each pixel in the banded factor: right and below, or
        the lower half of a 3x3 stencil (right, below-left, below,
        below-right; :class:`StencilPrecisionNormal`).

    Attributes
    ----------
    stage : {'joint', 'mean', 'covariance'}
        What training shapes (see ``CovarianceVAE``'s ``mean_epochs``):
        ``'joint'`` (default) everything; ``'mean'`` the trunk and the mean
        head under one learned scale for every pixel (the spherical noise
        model, whatever ``covariance``), the covariance head unused;
        ``'covariance'`` only the covariance head: the encoder's output, the
        trunk and the mean are detached, so what the mean stage learned
        stays as it is. The distribution returned is the model's own in the
        'joint' and 'covariance' stages.
    """

    def __init__(
        self,
        image_shape,
        n_components,
        covariance,
        channels,
        hidden_units,
        log_diag_bounds,
        rho,
        neighbourhood="cross",
    ):
        super().__init__()
        C, H, W = _split_shape(image_shape)
        # (H, W) images keep the shapes, parameters and results they always
        # had; (C, H, W) ones have a channel dimension throughout.
        self.multichannel = len(image_shape) == 3
        self.n_channels = C
        plan_h, plan_w = _downsampling_plan(H), _downsampling_plan(W)
        c1, c2 = channels
        h2, w2 = plan_h[1][2], plan_w[1][2]
        self.trunk = nn.Sequential(
            nn.Linear(n_components, hidden_units),
            nn.ReLU(),
            nn.Linear(hidden_units, c2 * h2 * w2),
            nn.ReLU(),
            nn.Unflatten(1, (c2, h2, w2)),
        )
        self.mean_head = _head(c2, c1, C, plan_h, plan_w)
        self.covariance = covariance
        self.log_diag_bounds = tuple(log_diag_bounds)
        self.rho = rho
        self.neighbourhood = neighbourhood
        self.stage = "joint"
        # Start every pixel at log_diag = 0, a unit scale on standardized data.
        low, high = self.log_diag_bounds
        frac = min(max((0.0 - low) / (high - low), 1e-3), 1 - 1e-3)
        start = math.log(frac / (1.0 - frac))
        # The one learned scale of 'spherical'; for the other covariances the
        # noise model of the mean stage (see ``stage``).
        self.raw_log_diag = nn.Parameter(
            torch.full((C,), start) if self.multichannel else torch.tensor(start)
        )
        if covariance != "spherical":
            n_out = 1
            if covariance == "banded":
                n_out += len(NEIGHBOURHOODS[neighbourhood])
            self.n_parameters = n_out
            # Drawn from a copy of the generator, which is left as the
            # spherical model leaves it: with the same seed, the mean stage
            # then trains exactly as the spherical model does.
            with torch.random.fork_rng(devices=[]):
                self.covariance_head = _head(c2, c1, C * n_out, plan_h, plan_w)
            last = self.covariance_head[-1]
            with torch.no_grad():
                last.bias.zero_()
                last.bias.view(C, n_out)[:, 0] = start

    def forward(self, z, dtype=None):
        """Return the decoder distribution p(x|z), batch (N,), event the image's.

        The event is (H, W), or (C, H, W) for multi-channel images (an
        :class:`~sk_covvae.distributions.IndependentChannels`). ``dtype``
        (default: that of the weights) is the dtype of the distribution's
        parameters; see ``VAEModule.decode``.
        """
        px = self._channels(z, dtype)
        return IndependentChannels(px, validate_args=False) if self.multichannel else px

    def _raw_covariance(self, h, dtype):
        """Covariance head outputs, (N, 1 + K, H, W) or (N, C, 1 + K, H, W)."""
        raw = self.covariance_head(h).to(dtype)
        if self.multichannel:
            raw = raw.unflatten(1, (self.n_channels, self.n_parameters))
        return raw

    def _channels(self, z, dtype):
        """The decoder distribution with the channel as a batch dimension."""
        weight = self.trunk[0].weight
        h = self.trunk(z.to(weight.dtype))
        # squeeze/unbind rather than indexing: their backward is one view or
        # one stack, where each index would scatter into a zero-filled copy.
        loc = self.mean_head(h)
        if not self.multichannel:
            loc = loc.squeeze(1)
        dtype = weight.dtype if dtype is None else dtype
        loc = loc.to(dtype)
        if self.stage == "covariance":
            h, loc = h.detach(), loc.detach()
        if self.covariance == "spherical" or self.stage == "mean":
            log_diag, _, _ = constrain_banded_parameters(
                self.raw_log_diag.to(dtype),
                log_diag_bounds=self.log_diag_bounds,
                rho=self.rho,
            )
            return SphericalPrecisionNormal(
                loc, log_diag.expand(loc.shape[:-2]), validate_args=False
            )
        if self.neighbourhood != "cross" and self.covariance == "banded":
            return self._stencil(loc, self._raw_covariance(h, dtype))
        raw = self._raw_covariance(h, dtype).unbind(-3)
        if self.covariance == "diagonal":
            log_diag, _, _ = constrain_banded_parameters(
                raw[0], log_diag_bounds=self.log_diag_bounds, rho=self.rho
            )
            return DiagonalPrecisionNormal(loc, log_diag, validate_args=False)
        log_diag, right, down = constrain_banded_parameters(
            *raw, log_diag_bounds=self.log_diag_bounds, rho=self.rho, relative=True
        )
        return BandedPrecisionNormal(
            loc, log_diag, right, down, validate_args=False, relative=True
        )

    def _stencil(self, loc, raw):
        """Decoder for a neighbourhood other than the cross: raw (..., 1+K, H, W)."""
        log_diag, couplings = constrain_stencil_parameters(
            raw.select(-3, 0),
            raw.narrow(-3, 1, raw.shape[-3] - 1),
            neighbourhood=self.neighbourhood,
            log_diag_bounds=self.log_diag_bounds,
            rho=self.rho,
            relative=True,
        )
        return StencilPrecisionNormal(
            loc,
            log_diag,
            couplings,
            validate_args=False,
            neighbourhood=self.neighbourhood,
            relative=True,
        )


class VAEModule(nn.Module):
    """Convolutional VAE with a structured Gaussian decoder.

    Takes flattened images (N, H * W), or (N, C * H * W) flattened
    channel-first, as scikit-learn passes them.

    Parameters
    ----------
    image_shape : tuple of int (H, W) or (C, H, W)
    n_components : int
    covariance : {'spherical', 'diagonal', 'banded'}
    channels : tuple of int (c1, c2), default=(16, 32)
    hidden_units : int, default=256
    log_diag_bounds : tuple of float, default=(-2.3, 6.9)
    rho : float, default=0.9
    neighbourhood : {'cross', '3x3'}, default='cross'
    """

    def __init__(
        self,
        image_shape,
        n_components,
        covariance="banded",
        channels=(16, 32),
        hidden_units=256,
        log_diag_bounds=(-2.3, 6.9),
        rho=0.9,
        neighbourhood="cross",
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.encoder = Encoder(self.image_shape, n_components, channels, hidden_units)
        self.decoder = Decoder(
            self.image_shape,
            n_components,
            covariance,
            channels,
            hidden_units,
            log_diag_bounds,
            rho,
            neighbourhood,
        )

    def images(self, x):
        """View flattened images (N, D) as (N, H, W) or (N, C, H, W)."""
        return x.reshape(x.shape[0], *self.image_shape)

    def encode(self, x, dtype=None):
        """Mean and log-variance of q(z|x) for flattened images (N, H * W).

        Parameters
        ----------
        x : torch.Tensor of shape (N, D)
        dtype : torch.dtype, optional
            Dtype of the outputs and of the elementwise maps that produce
            them. Vectorised float32 transcendental functions may round the
            last bit differently for elements in a vector body and in its
            tail, i.e. depending on a row's position in the batch; float64
            makes results independent of batch layout to far below float32
            resolution.
        """
        images = self.images(x)
        if len(self.image_shape) == 2:
            images = images[:, None]
        return self.encoder(images.to(self.encoder.fc[0].weight.dtype), dtype=dtype)

    def decode(self, z, dtype=None):
        """Decoder distribution p(x|z) over images (N, H, W) or (N, C, H, W).

        Parameters
        ----------
        z : torch.Tensor of shape (N, n_components)
        dtype : torch.dtype, optional
            Dtype of the distribution's parameters (see :meth:`encode`).
        """
        return self.decoder(z, dtype=dtype)

    @property
    def stage(self):
        """Training stage of the decoder (see ``Decoder.stage``)."""
        return self.decoder.stage

    @stage.setter
    def stage(self, value):
        if value not in ("joint", "mean", "covariance"):
            raise ValueError(f"Unknown training stage {value!r}.")
        self.decoder.stage = value

    def forward(self, x):
        """Encode, draw one reparameterised z, decode.

        In the ``'covariance'`` stage the posterior is detached: only the
        covariance head learns.

        Returns
        -------
        mu, logvar : torch.Tensor of shape (N, n_components)
            Parameters of q(z|x).
        px : BandedPrecisionNormal
            p(x|z) at the drawn z.
        """
        mu, logvar = self.encode(x)
        if self.stage == "covariance":
            mu, logvar = mu.detach(), logvar.detach()
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return mu, logvar, self.decode(z)
