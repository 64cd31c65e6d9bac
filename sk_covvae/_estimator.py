"""The scikit-learn face of the model: the :class:`CovarianceVAE` estimator."""

import contextlib
import copy
import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import assert_all_finite, check_array, check_random_state
from sklearn.utils._param_validation import (
    Interval,
    InvalidParameterError,
    StrOptions,
)
from sklearn.utils.validation import check_is_fitted, validate_data
from skorch.callbacks import EarlyStopping
from skorch.dataset import ValidSplit

from sk_covvae._modules import VAEModule
from sk_covvae._net import (
    NegativeELBO,
    SliceLoader,
    StageRecorder,
    VAENet,
    expected_log_likelihood,
    log_likelihood_bound,
    whitened_residual_sq_norm,
)
from sk_covvae._onnx import export_onnx as _export_onnx

__all__ = [
    "CovarianceVAE",
    "ImageShapeWarning",
    "LatentCollapseWarning",
    "TrainingInterruptedWarning",
]

# Off-diagonal mass of each row of L^T relative to its diagonal; see
# sk_covvae.distributions.constrain_banded_parameters.
_RHO = 0.9
# Images per forward pass in transform, score_samples and friends. Every
# pass has exactly this many rows (the last one is zero-padded): float32
# matrix products may pick their algorithm and thread split by batch size,
# which would make a sample's result depend, in the last bits, on how many
# rows come with it (sklearn checks subset invariance).
_INFERENCE_BATCH = 256
# The block of inference_batch_size="auto" on a CUDA device: large enough to
# keep a GPU busy with these small networks (kernel launches, not arithmetic,
# limit 256-row blocks there), small enough for any card's memory at 64x64.
_CUDA_INFERENCE_BATCH = 8192
# Rows standardized at once, in fit and at inference (a multiple of
# _INFERENCE_BATCH).
_STANDARDIZE_ROWS = 16 * _INFERENCE_BATCH
# Largest share of a CUDA device's free memory that fit puts the
# standardized training data in (the rest: the network, its activations and
# the optimizer's state).
_DEVICE_DATA_SHARE = 0.5
# Validation rows used for the latent diagnostics after fit.
_DIAGNOSTIC_ROWS = 10_000
# Seed of the noise shared by all images in score_samples.
_SCORE_SEED = 0


class ImageShapeWarning(UserWarning):
    """Warned when ``image_shape=None`` and the pixels cannot form a square."""


class TrainingInterruptedWarning(UserWarning):
    """Warned when training is interrupted (Ctrl-C) before it finished."""


class LatentCollapseWarning(ConvergenceWarning):
    """Warned when a fitted model's latent space carries (almost) nothing.

    Posterior collapse: the encoder's posterior equals the prior for every
    sample, so the decoder ignores ``z`` and explains the images by its noise
    model alone; :meth:`CovarianceVAE.transform` then returns features without
    information. A subclass of scikit-learn's ``ConvergenceWarning``, so
    filters on that catch it too.
    """


# A latent dimension is active when the variance over the data of its
# posterior mean exceeds this (Burda et al., 2016, section 5.2).
_ACTIVITY_THRESHOLD = 1e-2
# Interquartile range of a normal distribution, in standard deviations.
_IQR_PER_STD = 1.3489795


# The 1st-99th percentile range of a normal distribution, in standard
# deviations: 2 * Phi^-1(0.99).
_NORMAL_SPREAD_1_99 = 4.652695748


# Pixels drawn (with a fixed seed) to estimate the global offset and scale.
_SCALING_SUBSAMPLE = 200_000


def _global_standardization(X, n_channels=None):
    """Robust global offset and scale of all pixels of X.

    With ``n_channels`` (rows flattened channel-first), one offset and one
    scale per channel, as float64 arrays of shape (C,), each computed as
    below from that channel's pixels.

    The offset is the median pixel value and the scale the 1st-99th
    percentile range over 4.65, which equals the standard deviation for
    normal data but ignores the rare extreme pixels (saturated stars, cosmic
    rays) that would otherwise shrink every typical pixel towards 0. When that
    range is 0 (images that are mostly constant) the standard deviation is
    used, and 1 when that is 0 too. Above ``_SCALING_SUBSAMPLE`` pixels, the
    quantiles are those of that many pixels drawn with a fixed seed (their
    standard error is far below a percent).
    """
    if n_channels is not None:
        per_channel = np.asarray(X).reshape(X.shape[0], n_channels, -1)
        pairs = [_global_standardization(per_channel[:, c]) for c in range(n_channels)]
        return tuple(np.array(v, dtype=np.float64) for v in zip(*pairs))
    values = np.asarray(X).ravel()
    if values.size > _SCALING_SUBSAMPLE:
        rng = np.random.default_rng(0)
        values = values[rng.integers(0, values.size, _SCALING_SUBSAMPLE)]
    values = values.astype(np.float64)
    low, offset, high = np.quantile(values, [0.01, 0.5, 0.99])
    scale = (high - low) / _NORMAL_SPREAD_1_99
    if not scale > 0:
        scale = np.std(values)
    if not (np.isfinite(offset) and np.isfinite(scale)):
        raise ValueError("The spread of the values in X overflows float64; rescale X.")
    return float(offset), float(scale) if scale > 0 else 1.0


def _writable_rows(rows):
    """``rows`` as a C-contiguous array torch may view without a warning.

    Read-only input (memory maps, Arrow buffers, ``np.frombuffer``) is
    copied, one chunk at a time: torch warns when it views a read-only
    array, though nothing here writes to it.
    """
    rows = np.ascontiguousarray(rows)
    return rows if rows.flags.writeable else rows.copy()


def _standardized_chunks(
    X, offset, scale, chunk=_INFERENCE_BATCH, device=None, stretch=None
):
    """Yield float32 tensors of ``(X - offset) / scale``, ``chunk`` rows at a time.

    With ``stretch`` ``a``, the values are then mapped by
    ``a * asinh(u / a)`` (see :func:`_stretch_log_det`).

    float32 input is standardized in float32 (exactly rounded elementwise
    operations, so a row's result does not depend on its chunk); float64
    input in float64, then rounded, so that a large offset costs no
    precision. No standardized copy of all of ``X`` is made. With a CUDA
    ``device``, each chunk is copied there as it is and standardized there
    (one copy per chunk, no CPU pass). Raises ValueError if ``X`` holds NaN
    or inf (scikit-learn's message) or if a standardized value overflows
    float32.
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    # The torch paths take per-feature vectors (one value per channel,
    # repeated) as tensors in the dtype the rows are standardized in, as they
    # take a Python scalar.
    offset_t, scale_t = offset, scale
    if np.ndim(offset) > 0:
        where = "cpu" if on_cpu else device
        dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        offset_t = torch.as_tensor(offset, dtype=dtype, device=where)
        scale_t = torch.as_tensor(scale, dtype=dtype, device=where)
    for start in range(0, X.shape[0], chunk):
        rows = X[start : start + chunk]
        if not on_cpu:
            block = torch.from_numpy(_writable_rows(rows)).to(device)
            block = ((block - offset_t) / scale_t).to(torch.float32)
        elif rows.dtype == np.float32:
            block = torch.from_numpy(_writable_rows(rows)) - offset_t
            block.div_(scale_t)
        else:
            block = (np.asarray(rows, dtype=np.float64) - offset) / scale
            with np.errstate(over="ignore"):  # reported below, with the cause
                block = torch.from_numpy(block.astype(np.float32))
        # A NaN or inf in X, or an overflow, makes the sum non-finite: one
        # pass where the elementwise test is four (a large finite sum can
        # overflow too; the exact tests then decide). X's own values are
        # checked first, with scikit-learn's message.
        if not torch.isfinite(block.sum()) and not torch.isfinite(block).all():
            _assert_finite(rows)
            raise ValueError(
                "X holds values too far from the training data to represent in "
                "float32 after standardization (|X - offset_| / scale_ > 3.4e38)."
            )
        if stretch is not None:
            block = torch.asinh(block / stretch).mul_(stretch)
        yield block


_NAN_HINT = (
    " Survey stamps have missing pixels (NaN) where a cutout touches a CCD "
    "edge: fill them first, e.g. with sk_covvae.preprocessing.StampPreprocessor "
    "(fill_value=0.0) in a Pipeline before CovarianceVAE."
)


def _assert_finite(X):
    """scikit-learn's check that X is finite, its message pointing to the fix."""
    try:
        assert_all_finite(X, input_name="X")
    except ValueError as exc:
        raise ValueError(str(exc) + _NAN_HINT) from None


def _stretch_log_det(X, offset, scale, stretch, chunk=_STANDARDIZE_ROWS):
    r"""Per-sample log-determinant of the Jacobian of the data map, float64.

    The model sees :math:`y = a\,\mathrm{asinh}(u / a)` with :math:`u = (x -
    \mathrm{offset}) / \mathrm{scale}` (no asinh when ``stretch`` is None),
    so :math:`\log p(x) = \log p(y) + \sum_i \log |dy_i/dx_i|` with

    .. math::

        \log \left|\frac{dy_i}{dx_i}\right| = -\log \mathrm{scale}
        - \tfrac12 \log\bigl(1 + (u_i / a)^2\bigr).
    """
    n_features = X.shape[1]
    if np.ndim(scale) > 0:  # one scale per feature
        const = -float(np.sum(np.log(scale)))
    else:
        const = -n_features * math.log(scale)
    if stretch is None:
        return np.full(X.shape[0], const)
    out = np.empty(X.shape[0])
    for start in range(0, X.shape[0], chunk):
        u = (np.asarray(X[start : start + chunk], dtype=np.float64) - offset) / scale
        out[start : start + len(u)] = const - 0.5 * np.log1p((u / stretch) ** 2).sum(1)
    return out


_ANOMALY_METHODS = StrOptions({"elbo", "iwae", "typicality", "likelihood_ratio"})


def _reference_code_length(X, var_floor, n_channels=1, chunk=_STANDARDIZE_ROWS):
    r"""Per-row code length, in nats, of each row under its own Gaussian, float64.

    With ``n_channels`` C > 1 (rows flattened channel-first), each channel
    has its own Gaussian (its own mean and variance, floored at that
    channel's entry of ``var_floor``, shape (C,)) and the code lengths add.

    Row ``x`` (D values) under :math:`N(m, v I)` with its own mean
    :math:`m = \bar x` and variance :math:`v = \max(\frac1D \sum_i (x_i -
    m)^2, \mathrm{var\_floor})`: :math:`L(x) = -\log N(x; m, v I) =
    \frac{D}{2} (\log(2\pi v) + 1)` when the floor is not reached (the
    maximum-likelihood fit), :math:`\frac{D}{2} \log(2\pi v) + \frac{1}{2v}
    \sum_i (x_i - m)^2` in general.
    """
    out = np.empty(X.shape[0])
    for start in range(0, X.shape[0], chunk):
        x = np.asarray(X[start : start + chunk], dtype=np.float64)
        if n_channels > 1:
            x = x.reshape(len(x), n_channels, -1)
        sq = ((x - x.mean(-1, keepdims=True)) ** 2).sum(-1)
        D = x.shape[-1]
        v = np.maximum(sq / D, var_floor)
        length = 0.5 * D * np.log(2.0 * np.pi * v) + 0.5 * sq / v
        out[start : start + len(x)] = length.sum(-1) if n_channels > 1 else length
    return out


def _per_feature(value, image_shape):
    """A per-channel ``offset_`` or ``scale_`` as one value per feature.

    Scalars (one-channel images) are returned as they are.
    """
    if np.ndim(value) == 0:
        return value
    return np.repeat(np.asarray(value, dtype=np.float64), math.prod(image_shape[1:]))


def _outer_square(scale):
    """``scale**2``, or the outer product of a per-feature scale with itself."""
    if np.ndim(scale) == 0:
        return scale**2
    return np.multiply.outer(scale, scale)


def _unstretch(y, stretch):
    """Inverse of the stretch on standardized values (float64 ndarray)."""
    return y if stretch is None else stretch * np.sinh(y / stretch)


def _data_unit_moments(loc, cov, offset, scale, stretch):
    r"""Mean and covariance of ``x = offset + scale * a * sinh(y / a)``, y Gaussian.

    ``loc`` (..., D) and ``cov`` (..., D, D) are the mean and covariance of
    ``y`` (float64). Without a stretch the map is affine: ``offset + scale *
    loc`` and ``scale**2 * cov``. With one, write :math:`u = y / a`, a
    Gaussian with mean :math:`\mu`, covariance :math:`C`, variances
    :math:`s_i = C_{ii}`. From :math:`E[e^{w}] = e^{E w + \mathrm{Var}\,w / 2}`
    for a Gaussian ``w`` and :math:`\sinh u_i \sinh u_j = (\cosh(u_i + u_j) -
    \cosh(u_i - u_j)) / 2`:

    .. math::

        E[\sinh u_i] = \sinh \mu_i \, e^{s_i / 2},

        \mathrm{Cov}(\sinh u_i, \sinh u_j) = e^{(s_i + s_j) / 2} \bigl(
        \cosh\mu_i \cosh\mu_j \sinh C_{ij}
        + 2 \sinh\mu_i \sinh\mu_j \sinh^2(C_{ij} / 2)\bigr),

    (:math:`\cosh C - 1 = 2 \sinh^2(C / 2)`, which keeps the digits of a
    small :math:`C_{ij}`), then times ``scale * a`` and ``(scale * a)**2``.
    Entries overflow to inf only for variances of hundreds of ``a**2``.
    """
    if stretch is None:
        return loc * scale + offset, cov * _outer_square(scale)
    a = float(stretch)
    u = loc / a
    c = cov / a**2
    s = np.diagonal(c, axis1=-2, axis2=-1)
    half = np.exp(0.5 * s)
    mean = offset + scale * a * np.sinh(u) * half
    sh, ch = np.sinh(u), np.cosh(u)
    cov_x = (half[..., :, None] * half[..., None, :]) * (
        ch[..., :, None] * ch[..., None, :] * np.sinh(c)
        + 2.0 * sh[..., :, None] * sh[..., None, :] * np.sinh(0.5 * c) ** 2
    )
    if np.ndim(scale) == 0:
        return mean, cov_x * (scale * a) ** 2
    return mean, cov_x * (_outer_square(scale) * a**2)


def _pad_rows(block, rows=_INFERENCE_BATCH):
    """Zero-pad a 2-D tensor to ``rows`` rows (see ``_INFERENCE_BATCH``)."""
    missing = rows - block.shape[0]
    if missing <= 0:
        return block
    return torch.cat([block, block.new_zeros(missing, *block.shape[1:])])


def _standardized_tensor(X, offset, scale, stretch=None, device=None):
    """All of ``X`` as the model sees it, as one float32 tensor on ``device``.

    On a CUDA ``device`` the rows are copied there and standardized there,
    chunk by chunk (see :func:`_standardized_chunks`).
    """
    out = torch.empty(X.shape, dtype=torch.float32, device=device)
    start = 0
    for block in _standardized_chunks(
        X, offset, scale, chunk=_STANDARDIZE_ROWS, device=device, stretch=stretch
    ):
        out[start : start + len(block)] = block
        start += len(block)
    return out


def _training_tensor(X, offset, scale, stretch, device):
    """The training data as the model sees them, where they are cheapest.

    On CUDA, one tensor on the device when it takes at most
    ``_DEVICE_DATA_SHARE`` of the device's free memory: standardized there
    (like the data at inference), copied once, and indexed there by the
    mini-batches. Otherwise (and on CPU) a CPU tensor, whose batches are
    copied to the device one at a time.
    """
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if 4 * X.shape[0] * X.shape[1] <= _DEVICE_DATA_SHARE * free:
            return _standardized_tensor(X, offset, scale, stretch, device=device)
    return _standardized_tensor(X, offset, scale, stretch)


@contextlib.contextmanager
def _forked_rng(device, seed):
    """Fork torch's CPU generator and the training device's, and seed both.

    ``torch.manual_seed`` would seed the generator of every GPU, where
    ``fork_rng`` restores only those it forks: here only the CPU's and the
    training device's are touched, and both are restored on exit (the
    seeds are those ``torch.manual_seed`` sets). Yields the forked CUDA
    device indices.
    """
    devices = []
    if torch.device(device).type == "cuda":
        index = torch.device(device).index
        devices = [torch.cuda.current_device() if index is None else index]
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield devices


@contextlib.contextmanager
def _reproducible_kernels(device):
    """On CUDA, deterministic full-float32 kernels; elsewhere nothing.

    cuDNN may otherwise pick algorithms that sum in a varying order (the
    transposed convolutions of the decoder run as such), so that two calls
    of ``score_samples`` on the same data, or two fits with the same
    ``random_state``, differ in the last bits; and it runs float32
    convolutions in TF32 by default, whose 10-bit mantissa moves
    log-densities by about 1e-3 relative. Inside, both are off (the networks
    are small: kernel launches, not arithmetic, bound their speed), so CUDA
    results agree with CPU results to float32 rounding. The flags are
    restored on exit; CPU kernels are deterministic already.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.deterministic, cudnn.benchmark = True, False
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = saved[:3]
        matmul.allow_tf32 = saved[3]


class _EarlyStopping(EarlyStopping):
    """skorch's ``EarlyStopping``, which a warm start can resume.

    skorch forgets the best score and weights at the start of every training
    loop (``on_train_begin``). :meth:`resume` hands it the weights a warm fit
    starts from and their validation loss, so that this loop counts its
    patience from them and restores them if no epoch beats them: the weights
    kept are the best on validation over all the calls.
    """

    def resume(self, score, epoch, weights):
        """Start the next training loop with ``weights`` of ``epoch`` as the best."""
        self._resume_from = (score, epoch, weights)

    def on_train_begin(self, net, **kwargs):
        super().on_train_begin(net, **kwargs)
        resume = vars(self).pop("_resume_from", None)
        if resume is not None:
            score, self.best_epoch_, self.best_model_weights_ = resume
            self.dynamic_threshold_ = self._calc_new_threshold(score)


def _validation_loss(net, Xt):
    """Validation loss of the current weights, as skorch computes an epoch's.

    The mean of the batch losses weighted by batch size, over skorch's
    validation split of ``Xt``; None without a split. It draws ``z`` from
    torch's generators: the caller forks them.
    """
    _, valid = net.get_split_datasets(Xt)
    if valid is None or len(valid) == 0:
        return None
    total, count = 0.0, 0
    for batch in net.get_iterator(valid, training=False):
        n = len(batch[0])
        total += net.validation_step(batch)["loss"].item() * n
        count += n
    return total / count


def _resume_early_stopping(net, Xt, devices):
    """Give a warm fit's early stopping the weights it starts from.

    Their validation loss is computed with forked generators (``devices``),
    so that the training that follows draws what it would have drawn.
    """
    stopper = dict(net.callbacks_).get("early_stopping")
    if not isinstance(stopper, _EarlyStopping):  # none, or from an old pickle
        return
    with torch.random.fork_rng(devices=devices):
        score = _validation_loss(net, Xt)
    if score is not None:
        epoch = stopper.best_epoch_ or len(net.history)
        stopper.resume(score, epoch, copy.deepcopy(net.module_.state_dict()))


def _restore_best_weights(net):
    """Load the early-stopping callback's best weights; return their epoch."""
    stopper = dict(getattr(net, "callbacks_", [])).get("early_stopping")
    if stopper is None or getattr(stopper, "best_model_weights_", None) is None:
        return None
    net.module_.load_state_dict(stopper.best_model_weights_)
    return stopper.best_epoch_


def _why_stopped(net, n_run, epochs):
    """Why one ``partial_fit`` of ``epochs`` epochs ended after ``n_run``."""
    stopper = dict(net.callbacks_).get("early_stopping")
    if stopper is not None and stopper.misses_ >= stopper.patience:
        return "early_stopping"
    if n_run < epochs:
        return "interrupted"
    return "max_epochs"


_COUNT = Interval(Integral, 1, None, closed="left")


def _check_count(value, name):
    """``value`` as an int if it is a positive integer, else raise.

    The rule of ``_parameter_constraints`` for counts (scikit-learn's
    ``Interval`` of integers) and its error, ``InvalidParameterError`` (a
    ``ValueError`` and a ``TypeError``), for arguments of methods; booleans,
    which ``Interval`` takes for integers, are refused too.
    """
    if isinstance(value, bool | np.bool_) or not _COUNT.is_satisfied_by(value):
        raise InvalidParameterError(
            f"{name} must be a positive integer, got {value!r}."
        )
    return int(value)


def _resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"device={device!r} is not a valid torch device; use 'auto', 'cpu', "
            "'cuda' or 'cuda:N'."
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available on this "
            "machine; use device='auto' or device='cpu'."
        )
    return device


class CovarianceVAE(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    r"""Convolutional variational autoencoder with a structured-covariance decoder.

    The decoder is a Gaussian :math:`p(x|z) = N(\mu_\theta(z),
    \Lambda_\theta(z)^{-1})` whose precision :math:`\Lambda = L L^\top` has a
    lower-triangular factor ``L`` coupling each pixel to its right-hand
    neighbour and to the pixel below (``covariance='banded'``), so it models
    the correlated noise of difference images. ``'diagonal'`` (independent
    pixels, one scale each) and ``'spherical'`` (one learned scale for all
    pixels) are the classical special cases. The encoder is
    :math:`q(z|x) = N(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2)` and the
    prior :math:`N(0, I)`. Training minimises the negative ELBO with Adam,
    through skorch, stopping early on a held-out validation fraction.

    Data are standardized internally by one global offset and scale, robust
    to rare extreme pixels: the median of all training pixels and their
    1st-99th percentile range over 4.65 (the standard deviation for normal
    data). Every output is in the units of ``X`` and log-densities include
    the Jacobian of that map.

    The network computes in float32. float64 input is accepted and
    standardized in float64 (a large offset costs no digits), then rounded
    to float32; :meth:`transform` and :meth:`inverse_transform` return the
    dtype of their input, so float64 results carry float32 precision
    (about 1e-7 relative), and :meth:`score_samples` returns float64 sums
    of float32 per-pixel terms.

    Parameters
    ----------
    n_components : int, default=50
        Size of the latent space.
    covariance : {'banded', 'diagonal', 'spherical'}, default='banded'
        Structure of the decoder's covariance.
    neighbourhood : {'cross', '3x3'}, default='cross'
        Neighbours coupled to each pixel by the banded precision factor:
        ``'cross'``, the right-hand pixel and the one below; ``'3x3'``, the
        lower half of a 3x3 stencil (right, below-left, below, below-right),
        which also models correlation along diagonals (resampled templates).
        Each of the ``K`` couplings is bounded by ``0.9 / K`` of the
        diagonal (see :func:`~sk_covvae.distributions.constrain_stencil_parameters`)
        for ``'3x3'``. Ignored unless ``covariance='banded'``.
    image_shape : tuple of int (H, W) or (C, H, W), or None, default=None
        Shape of each image; rows of ``X`` are images flattened row-major,
        channel first for ``(C, H, W)`` (C order: channel, row, column; e.g.
        a survey's science, template and difference stamps). ``None`` means
        square one-channel images when ``n_features`` is a perfect square,
        otherwise 1-D signals of shape ``(1, n_features)`` (with an
        :class:`ImageShapeWarning`). With C channels the encoder reads all C,
        each channel is standardized on its own (``offset_``, ``scale_``) and
        the decoder gives each channel its own mean and covariance (the
        channels independent given z; see
        :class:`~sk_covvae.distributions.IndependentChannels`).
    max_epochs : int, default=100
        Maximum number of passes over the training data.
    batch_size : int, default=256
        Mini-batch size for training.
    lr : float, default=1e-3
        Learning rate of Adam.
    mean_epochs : int, default=0
        Maximum epochs of a *mean stage*, a first training stage for the
        ``'diagonal'`` and ``'banded'`` decoders in which their noise model
        is one learned scale for every pixel (the ``'spherical'`` model), so
        that the encoder and the decoder's mean learn the images before a
        flexible noise model can explain them as noise (posterior collapse;
        see the user guide). It stops early, like the second stage, on its
        own validation loss; with the same ``random_state`` it trains exactly
        as the ``'spherical'`` model does. ``0`` (the default, chosen from
        the measurements in the user guide) trains the full model from the
        start. Ignored for ``'spherical'``, which has one stage.
    freeze_mean : bool, default=False
        Used when ``mean_epochs > 0``. If True, the second stage trains only
        the covariance head: the encoder and the decoder's mean stay as the
        mean stage left them (the structured-residual training of Dorta et
        al., 2018b), so the latent features and decoder means are those of
        the spherical model. If False, everything trains jointly in the
        second stage.
    patience : int or None, default=20
        Stop when the validation loss has not improved for this many epochs,
        and restore the weights of the best epoch. ``None`` trains for
        ``max_epochs`` (still keeping the best validation epoch's weights when
        ``validation_fraction`` is set).
    validation_fraction : float in (0, 1) or None, default=0.1
        Fraction of the training data held out to monitor the loss. ``None``
        trains on all data; then ``patience`` must be ``None``.
    channels : tuple of int (c1, c2), default=(16, 32)
        Channels of the encoder's two convolutions (mirrored in the decoder).
    hidden_units : int, default=256
        Width of the hidden fully connected layers.
    min_scale, max_scale : float, default=1e-3, 10.0
        Bounds on the decoder's per-pixel scale ``1 / L_ii``, in units of the
        data's global scale ``scale_``. With the coupling bound
        ``|right_i| + |down_i| <= 0.9 L_ii``, every eigenvalue of the
        decoder's covariance lies in ``[min_scale**2 / 1.9**2,
        max_scale**2 / 0.1**2]`` (times ``scale_**2``); ``min_scale`` is
        also the floor that keeps the density of constant pixels finite.
    stretch : float or None, default=5.0
        Softening ``a`` of an asinh stretch of the standardized data, in
        units of ``scale_``: the model sees ``a * asinh((X - offset_) /
        (scale_ * a))``, which is the identity within about ``a`` of the
        median and grows logarithmically beyond, as astronomers' asinh
        magnitudes do. The decoder is then Gaussian in the stretched values
        and heavy-tailed in the units of ``X``, so that the rare images with
        pixels thousands of times the typical spread (saturated stars,
        cosmic rays) neither dominate training nor drive the other images'
        latent space into collapse. Every output stays in the units of ``X``:
        log-densities include the Jacobian of the stretch,
        ``inverse_transform`` and ``sample`` map back through ``sinh``.
        ``None`` models ``X`` itself (a Gaussian in its units).
    n_score_particles : int, default=1
        Particles ``k`` used by :meth:`score_samples`: 1 gives the ELBO, more
        give the tighter importance-weighted bound (``k`` times the cost).
    inference_batch_size : int or 'auto', default='auto'
        Rows per forward pass of :meth:`transform`, :meth:`score_samples`
        and the other inference methods. Every pass has exactly this many
        rows (the last is zero-padded), so that an image's result does not
        depend on the other rows of ``X``. ``'auto'``: 256 on CPU (larger
        blocks gain nothing there), 8192 on a CUDA device, where small blocks
        leave the GPU waiting for kernel launches; on a GPU with little
        memory or for large images, set a smaller power of two. Results
        agree between block sizes to float32 rounding, not bit for bit.
    warm_start : bool, default=False
        If True and the estimator is fitted, ``fit`` continues training the
        current weights for ``max_epochs`` more epochs instead of starting
        afresh (in the last training stage), with the current ``lr``,
        ``batch_size``, ``patience``, ``verbose``, ``freeze_mean`` and
        ``random_state``, and Adam's state where the last fit left it. What
        the first fit set up stays: the architecture (``n_components``,
        ``covariance``, ``neighbourhood``, ``channels``, ``hidden_units``,
        ``min_scale``, ``max_scale``), the data scaling (``offset_``,
        ``scale_``, ``stretch_``), the validation split and the device; a
        changed value of those is ignored with a ``UserWarning`` naming it.
        Early stopping goes on from the weights the call starts with: their
        validation loss is the best so far, patience counts from it, and they
        are restored if no new epoch beats them, so the weights kept are the
        best on validation over all the calls. Use it to resume after an
        interruption.
    device : str, default='auto'
        Torch device for training and inference; ``'auto'`` uses CUDA when
        available. Requesting CUDA where it is absent raises ``ValueError``.
    random_state : int, RandomState instance or None, default=None
        Seeds weight initialisation, mini-batch order, the validation split
        and the training noise. Fits with the same integer are identical on
        the same hardware.
    verbose : int, default=0
        If positive, print skorch's table of losses per epoch.

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The fitted net; ``net_.module_`` is the PyTorch module and
        ``net_.history`` the per-epoch losses (in standardized units).
    image_shape_ : tuple of int (H, W) or (C, H, W)
        Shape of the images.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when ``X`` has string column names.
    offset_, scale_ : float, or ndarray of shape (C,)
        Robust standardization: the model sees ``(X - offset_) / scale_``
        (stretched, see ``stretch``); one value for (H, W) images, one per
        channel for (C, H, W) ones.
    stretch_ : float or None
        The stretch of the fit (a warm start keeps the first fit's).
    n_epochs_ : int
        Number of epochs run, over both training stages.
    kl_per_component_ : ndarray of shape (n_components,)
        KL divergence, in nats, of each latent dimension's posterior from
        the prior, median over the validation data (the training data when
        ``validation_fraction=None``): what each dimension carries for a
        typical image. The median, not the mean, so that the few extreme
        images of survey data (saturated stars) do not hide a latent space
        that typical images leave unused.
    latent_activity_ : ndarray of shape (n_components,)
        Spread over the same data of each dimension's posterior mean: the
        activity of Burda et al. (2016), the variance, made robust in the same
        way (the squared interquartile range over 1.349). A dimension whose
        posterior mean does not vary between typical images carries nothing.
    n_active_components_ : int
        Latent dimensions whose activity exceeds 0.01 (Burda et al., 2016).
        ``0`` means the latent space collapsed; ``fit`` then warns with a
        :class:`LatentCollapseWarning`.
    device_ : str
        Device the model was fitted on.

    See Also
    --------
    sklearn.decomposition.PCA : Linear latent features with a spherical
        Gaussian noise model.
    sklearn.decomposition.FactorAnalysis : Linear latent features with a
        diagonal Gaussian noise model.
    sk_covvae.distributions.BandedPrecisionNormal : The decoder's
        distribution.

    Notes
    -----
    The estimator leaves process-wide state alone: the global random number
    generators (it draws from a forked one), thread counts, warning filters
    and malloc settings. On CPU under Linux, training runs a quarter to a
    third faster when glibc keeps freed memory for reuse (see
    ``docs/performance.md``); a training script may ask for that with
    :func:`sk_covvae.retain_freed_memory`, as the ``covvae`` command does.

    References
    ----------
    .. [1] Kingma, D. P. and Welling, M., "Auto-Encoding Variational Bayes",
       ICLR 2014.
    .. [2] Dorta, G., Vicente, S., Agapito, L., Campbell, N. D. F. and
       Simpson, I., "Structured Uncertainty Prediction Networks", CVPR 2018.
    .. [3] Burda, Y., Grosse, R. and Salakhutdinov, R., "Importance Weighted
       Autoencoders", ICLR 2016.
    .. [4] Dorta, G., Vicente, S., Agapito, L., Campbell, N. D. F. and
       Simpson, I., "Training VAEs Under Structured Residuals", arXiv
       1804.01050, 2018.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_covvae import CovarianceVAE
    >>> X = np.random.RandomState(0).normal(size=(64, 36))
    >>> vae = CovarianceVAE(n_components=2, max_epochs=3, random_state=0).fit(X)
    >>> vae.image_shape_
    (6, 6)
    >>> vae.transform(X).shape
    (64, 2)
    >>> vae.sample(n_samples=3, random_state=0).shape
    (3, 36)
    >>> bool(np.isclose(vae.score(X), vae.score_samples(X).mean()))
    True
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance": [StrOptions({"banded", "diagonal", "spherical"})],
        "neighbourhood": [StrOptions({"cross", "3x3"})],
        "image_shape": [tuple, list, None],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "mean_epochs": [Interval(Integral, 0, None, closed="left")],
        "freeze_mean": ["boolean"],
        "patience": [Interval(Integral, 1, None, closed="left"), None],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither"), None],
        "channels": [tuple, list],
        "hidden_units": [Interval(Integral, 1, None, closed="left")],
        "min_scale": [Interval(Real, 0, None, closed="neither")],
        "stretch": [Interval(Real, 0, None, closed="neither"), None],
        "max_scale": [Interval(Real, 0, None, closed="neither")],
        "n_score_particles": [Interval(Integral, 1, None, closed="left")],
        "inference_batch_size": [
            Interval(Integral, 1, None, closed="left"),
            StrOptions({"auto"}),
        ],
        "warm_start": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_components=50,
        *,
        covariance="banded",
        neighbourhood="cross",
        image_shape=None,
        max_epochs=100,
        batch_size=256,
        lr=1e-3,
        mean_epochs=0,
        freeze_mean=False,
        patience=20,
        validation_fraction=0.1,
        channels=(16, 32),
        hidden_units=256,
        min_scale=1e-3,
        max_scale=10.0,
        stretch=5.0,
        n_score_particles=1,
        inference_batch_size="auto",
        warm_start=False,
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.n_components = n_components
        self.covariance = covariance
        self.neighbourhood = neighbourhood
        self.image_shape = image_shape
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.mean_epochs = mean_epochs
        self.freeze_mean = freeze_mean
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.channels = channels
        self.hidden_units = hidden_units
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.stretch = stretch
        self.n_score_particles = n_score_particles
        self.inference_batch_size = inference_batch_size
        self.warm_start = warm_start
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ checks
    def _check_params(self, n_features):
        """Check what ``_parameter_constraints`` cannot; return the image shape."""
        if self.min_scale >= self.max_scale:
            raise ValueError(
                f"min_scale={self.min_scale} must be smaller than "
                f"max_scale={self.max_scale}."
            )
        if self.patience is not None and self.validation_fraction is None:
            raise ValueError(
                "Early stopping needs a validation set: set validation_fraction "
                "(e.g. 0.1) or patience=None."
            )
        channels = tuple(self.channels)
        if len(channels) != 2 or not all(
            isinstance(c, Integral) and not isinstance(c, bool) and c >= 1
            for c in channels
        ):
            raise ValueError(
                f"channels must be two positive integers, got {self.channels!r}."
            )
        return self._image_shape(n_features)

    def _image_shape(self, n_features):
        if self.image_shape is None:
            side = math.isqrt(n_features)
            if side * side == n_features:
                return (side, side)
            warnings.warn(
                f"n_features={n_features} is not a perfect square, so each row "
                f"is treated as a 1-D signal of shape (1, {n_features}). Pass "
                "image_shape=(H, W) with H * W == n_features for images.",
                ImageShapeWarning,
                stacklevel=3,
            )
            return (1, n_features)
        shape = tuple(self.image_shape)
        if len(shape) not in (2, 3) or not all(
            isinstance(s, Integral | np.integer) and not isinstance(s, bool) and s >= 1
            for s in shape
        ):
            raise ValueError(
                "image_shape must be None, two positive integers (H, W) or three "
                f"(C, H, W), got {self.image_shape!r}."
            )
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != n_features:
            raise ValueError(
                f"image_shape={shape} holds {math.prod(shape)} values but X has "
                f"{n_features} features."
            )
        return shape

    def _validate_X(self, X, reset, check_finite=True):
        """``validate_data``; ``check_finite=False`` where the caller's
        standardization pass checks finiteness itself (``_batches``)."""
        X = validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            ensure_min_samples=2 if reset else 1,
            ensure_all_finite=False,
        )
        if check_finite:
            _assert_finite(X)
        return X

    # --------------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the VAE to images.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Images flattened row-major. Integer input (e.g. uint8) is
            converted to float without rescaling.
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        self : CovarianceVAE
            The fitted estimator.
        """
        warm = self.warm_start and hasattr(self, "net_")
        X = self._validate_X(X, reset=not warm)
        image_shape = self._check_params(X.shape[1])
        device = _resolve_device(self.device)
        n_samples = X.shape[0]
        if self.validation_fraction is not None:
            n_valid = math.ceil(self.validation_fraction * n_samples)
            if n_samples - n_valid < 1:
                raise ValueError(
                    f"n_samples={n_samples} is too few to hold out "
                    f"validation_fraction={self.validation_fraction}: no training "
                    "sample would remain. Pass more samples or "
                    "validation_fraction=None, patience=None."
                )
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))

        if warm:
            if image_shape != self.image_shape_:
                raise ValueError(
                    f"warm_start=True needs the image shape of the first fit, "
                    f"{self.image_shape_}; got {image_shape}."
                )
            net, offset, scale = self.net_, self.offset_, self.scale_
            stretch = self.stretch_
            self._warn_unapplied_changes(net, device)
            # The weights stay where they are (skorch may have mapped a CUDA
            # model to the CPU when it was unpickled).
            device = str(net.device)
            # lr is one of skorch's virtual parameters: it updates the
            # optimizer's param groups in place, keeping Adam's moments.
            net.set_params(
                max_epochs=self.max_epochs,
                verbose=self.verbose,
                lr=self.lr,
                batch_size=self.batch_size,
            )
            stopper = dict(net.callbacks_).get("early_stopping")
            if stopper is not None:
                stopper.patience = math.inf if self.patience is None else self.patience
            n_before = len(net.history)
        else:
            n_channels = image_shape[0] if len(image_shape) == 3 else None
            offset, scale = _global_standardization(X, n_channels)
            stretch = self.stretch
            net = self._build_net(image_shape, device, seed)
            n_before = 0
        Xt = _training_tensor(
            X,
            _per_feature(offset, image_shape),
            _per_feature(scale, image_shape),
            stretch,
            device,
        )

        try:
            stopped_by = self._train(net, Xt, device, seed, initialize=not warm)
        except FloatingPointError:
            # The best weights so far are restored: keep a usable estimator.
            self._set_fitted(net, image_shape, offset, scale, stretch, device)
            raise
        self._set_fitted(net, image_shape, offset, scale, stretch, device)
        self._report_stop(stopped_by, n_before)
        self._latent_diagnostics(net, Xt)
        return self

    def _warn_unapplied_changes(self, net, device):
        """Warn about parameters a warm start leaves as the first fit set them.

        ``device`` is the one the parameters ask for (resolved).
        """
        bounds = net.module__log_diag_bounds
        split = net.train_split
        stopper = dict(net.callbacks_).get("early_stopping")
        first = {
            "n_components": net.module__n_components,
            "covariance": net.module__covariance,
            # Nets pickled before the 3x3 stencil have no neighbourhood.
            "neighbourhood": getattr(net, "module__neighbourhood", "cross"),
            "channels": tuple(net.module__channels),
            "hidden_units": net.module__hidden_units,
            "min_scale": bounds[1],
            "max_scale": bounds[0],
            "stretch": self.stretch_,
            "validation_fraction": None if split is None else split.cv,
            "device": torch.device(net.device),
        }
        now = {
            "n_components": self.n_components,
            "covariance": self.covariance,
            "neighbourhood": self.neighbourhood,
            "channels": tuple(int(c) for c in self.channels),
            "hidden_units": self.hidden_units,
            # Compared as the net holds them, computed the same way.
            "min_scale": -math.log(self.min_scale),
            "max_scale": -math.log(self.max_scale),
            "stretch": self.stretch,
            "validation_fraction": self.validation_fraction,
            "device": torch.device(device),
        }
        shown = {
            "min_scale": lambda bound: math.exp(-bound),
            "max_scale": lambda bound: math.exp(-bound),
            "device": str,
        }
        changed = []
        for name, value in now.items():
            if name == "device":
                same = value.type == first[name].type and (value.index or 0) == (
                    first[name].index or 0
                )
            else:
                same = value == first[name]
            if not same:
                kept = shown.get(name, lambda v: v)(first[name])
                changed.append(f"{name}={getattr(self, name)!r} (kept: {kept!r})")
        if stopper is None and self.patience is not None:
            changed.append(
                f"patience={self.patience!r} (kept: none, no validation split)"
            )
        if changed:
            warnings.warn(
                "warm_start=True continues training the model of the first "
                "fit, which these changed parameters would alter; they are "
                "ignored: " + ", ".join(changed) + ". Set warm_start=False to "
                "fit a new model with them.",
                UserWarning,
                stacklevel=3,
            )

    def _set_fitted(self, net, image_shape, offset, scale, stretch, device):
        self.net_ = net
        self.image_shape_ = image_shape
        self.offset_ = offset
        self.scale_ = scale
        self.stretch_ = stretch
        self.n_epochs_ = len(net.history)
        self.device_ = device

    def _build_net(self, image_shape, device, seed):
        callbacks = [("stage", StageRecorder())]
        if self.validation_fraction is not None:
            patience = self.patience if self.patience is not None else math.inf
            callbacks.append(
                (
                    "early_stopping",
                    _EarlyStopping(
                        monitor="valid_loss",
                        patience=patience,
                        # Losses in nats can be negative: compare absolutely.
                        threshold=0.0,
                        threshold_mode="abs",
                        load_best=True,
                    ),
                )
            )
        train_split = None
        if self.validation_fraction is not None:
            train_split = ValidSplit(
                self.validation_fraction, stratified=False, random_state=seed
            )
        return VAENet(
            module=VAEModule,
            module__image_shape=image_shape,
            module__n_components=self.n_components,
            module__covariance=self.covariance,
            module__channels=tuple(int(c) for c in self.channels),
            module__hidden_units=self.hidden_units,
            module__log_diag_bounds=(
                -math.log(self.max_scale),
                -math.log(self.min_scale),
            ),
            module__rho=_RHO,
            module__neighbourhood=self.neighbourhood,
            criterion=NegativeELBO,
            optimizer=torch.optim.Adam,
            lr=self.lr,
            max_epochs=self.max_epochs,
            batch_size=self.batch_size,
            iterator_train=SliceLoader,
            iterator_valid=SliceLoader,
            iterator_train__shuffle=True,
            train_split=train_split,
            callbacks=callbacks,
            device=device,
            verbose=self.verbose,
        )

    def _stages(self, initialize):
        """The training stages of this fit: (stage, maximum epochs) pairs."""
        if self.covariance == "spherical" or self.mean_epochs == 0:
            return [("joint", self.max_epochs)]
        last = "covariance" if self.freeze_mean else "joint"
        if not initialize:  # warm start: go on with the last stage
            return [(last, self.max_epochs)]
        return [("mean", self.mean_epochs), (last, self.max_epochs)]

    def _train(self, net, Xt, device, seed, initialize):
        """Run skorch's training loop once per stage; return why it ended.

        Each stage is one ``partial_fit`` of the same net with the module in
        that stage (see ``Decoder.stage``); the optimizer and the history
        carry over, and early stopping starts afresh on the stage's own
        validation loss. skorch ends a loop on the ``KeyboardInterrupt`` that
        both Ctrl-C and early stopping raise, then restores the best epoch's
        weights (``on_train_end``); an interruption ends the fit. A
        non-finite loss raises ``FloatingPointError`` from
        ``VAENet.get_loss``; the best weights so far are restored here before
        the error propagates.

        Returns
        -------
        {'max_epochs', 'early_stopping', 'interrupted'}
        """
        stopped_by = "max_epochs"
        with _forked_rng(device, seed) as devices, _reproducible_kernels(device):
            if initialize:
                net.initialize()
            module = net.module_
            try:
                for stage, epochs in self._stages(initialize):
                    module.stage = stage
                    if not initialize:
                        _resume_early_stopping(net, Xt, devices)
                    n_before = len(net.history)
                    net.partial_fit(Xt, None, epochs=epochs)
                    stopped_by = _why_stopped(net, len(net.history) - n_before, epochs)
                    if stopped_by == "interrupted":
                        break
            except FloatingPointError as exc:
                restored = _restore_best_weights(net)
                raise FloatingPointError(
                    f"{exc} Training stopped; the estimator keeps "
                    + (
                        f"the weights of epoch {restored}, the best so far."
                        if restored
                        else "the weights before the failing step."
                    )
                    + " Lower lr, or check X for extreme values."
                ) from exc
            finally:
                module.stage = "joint"
        return stopped_by

    def _report_stop(self, stopped_by, n_before):
        if stopped_by != "interrupted":
            return
        stopper = dict(self.net_.callbacks_).get("early_stopping")
        best = (
            f" the weights of epoch {stopper.best_epoch_}, the best on validation,"
            if stopper is not None and stopper.best_epoch_
            else " the last weights"
        )
        warnings.warn(
            f"Training was interrupted after {self.n_epochs_ - n_before} "
            f"epochs; the estimator is usable and holds"
            f"{best}. Set warm_start=True and call fit again to continue.",
            TrainingInterruptedWarning,
            stacklevel=4,
        )

    def _latent_diagnostics(self, net, Xt):
        """Per-dimension KL and activity of the posterior on validation data.

        Sets ``kl_per_component_``, ``latent_activity_`` and
        ``n_active_components_``, and warns when no dimension is active. The
        validation rows are those of skorch's split (the same seed gives the
        same split); at most ``_DIAGNOSTIC_ROWS`` of them are used.
        """
        rows = Xt
        if net.train_split is not None:
            _, valid = net.get_split_datasets(Xt)
            if valid is not None and len(valid) > 0:
                rows = Xt[torch.as_tensor(valid.indices, dtype=torch.long)]
        rows = rows[:_DIAGNOSTIC_ROWS]
        module = self._module()
        mus, logvars = [], []
        with torch.inference_mode(), _reproducible_kernels(net.device):
            for block in rows.split(self._block_rows()):
                mu, logvar = module.encode(block.to(net.device), dtype=torch.float64)
                mus.append(mu.cpu())
                logvars.append(logvar.cpu())
        mu, logvar = torch.cat(mus), torch.cat(logvars)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
        self.kl_per_component_ = np.median(kl.numpy(), axis=0)
        q25, q75 = np.percentile(mu.numpy(), [25, 75], axis=0)
        self.latent_activity_ = ((q75 - q25) / _IQR_PER_STD) ** 2
        self.n_active_components_ = int(
            np.sum(self.latent_activity_ > _ACTIVITY_THRESHOLD)
        )
        if self.n_active_components_ == 0:
            warnings.warn(
                f"The latent space collapsed: none of the {mu.shape[1]} latent "
                "dimensions varies with the images (largest activity "
                f"{self.latent_activity_.max():.2g}, total KL "
                f"{self.kl_per_component_.sum():.2g} nats), so transform "
                "returns no information. Check that the images differ by more "
                "than noise; keep a stretch (a few extreme images otherwise "
                "dominate training), train longer, or train the mean first "
                "(mean_epochs > 0, freeze_mean=True).",
                LatentCollapseWarning,
                stacklevel=4,
            )

    # --------------------------------------------------------------- inference
    def _batches(self, X):
        """Yield standardized, zero-padded blocks of ``_block_rows()`` rows.

        Rows are standardized ``_STANDARDIZE_ROWS`` at a time (few, large
        elementwise operations, and a bounded amount of memory), then cut into
        blocks, each with the number of its real (unpadded) rows.
        """
        device = torch.device(self.net_.device)
        offset, scale = self._feature_scaling()
        rows = self._block_rows()
        for chunk in _standardized_chunks(
            X,
            offset,
            scale,
            chunk=rows * max(1, _STANDARDIZE_ROWS // rows),
            device=device,
            stretch=self.stretch_,
        ):
            for block in chunk.split(rows):
                yield _pad_rows(block, rows), len(block)

    def _block_rows(self):
        """Rows per inference pass: ``inference_batch_size`` resolved."""
        # Estimators pickled before the parameter existed have no attribute.
        size = getattr(self, "inference_batch_size", "auto")
        if size != "auto":
            return int(size)
        if torch.device(self.net_.device).type == "cuda":
            return _CUDA_INFERENCE_BATCH
        return _INFERENCE_BATCH

    def _feature_scaling(self):
        """``offset_`` and ``scale_``: scalars, or one value per feature."""
        return (
            _per_feature(self.offset_, self.image_shape_),
            _per_feature(self.scale_, self.image_shape_),
        )

    def _module(self):
        module = self.net_.module_
        module.eval()
        return module

    def transform(self, X):
        """Posterior means of the latent variables, E[z | x].

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            Deterministic latent features, in the dtype of ``X`` (float32
            or float64). The encoder runs in float32: float64 features hold
            float32 values (about 1e-7 relative precision).
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False, check_finite=False)
        module = self._module()
        with torch.inference_mode(), _reproducible_kernels(self.net_.device):
            # One copy back at the end: no synchronisation per block on a GPU.
            Z = [module.encode(xb)[0][:n] for xb, n in self._batches(X)]
        return torch.cat(Z).cpu().numpy().astype(X.dtype, copy=False)

    def inverse_transform(self, X):
        """Decoder means for latent vectors, in the units of the data.

        The mean of the decoder's Gaussian, mapped by :meth:`to_data_units`.
        With a stretch that is each pixel's median under p(x|z) in the units
        of ``X`` (the decoder is heavy-tailed there; :meth:`decoder_moments`
        gives the mean); without one, the mean.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Latent vectors, e.g. from :meth:`transform`.

        Returns
        -------
        X_original : ndarray of shape (n_samples, `n_features_in_`)
            In the dtype of ``X`` (float32 or float64). The decoder runs in
            float32 and its output is mapped to the data's units in float64:
            float64 results have float32 precision relative to ``scale_``.
        """
        check_is_fitted(self)
        Z = check_array(X, dtype=[np.float64, np.float32])
        if Z.shape[1] != self._n_latent:
            raise ValueError(
                f"X has {Z.shape[1]} features, but {type(self).__name__} expects "
                f"latent vectors with n_components={self._n_latent} features."
            )
        module = self._module()
        Zt = torch.from_numpy(_writable_rows(Z.astype(np.float32, copy=False)))
        means = []
        with torch.inference_mode(), _reproducible_kernels(self.net_.device):
            rows = self._block_rows()
            for i in range(0, Zt.shape[0], rows):
                block = Zt[i : i + rows]
                px = module.decode(_pad_rows(block, rows).to(self.net_.device))
                means.append(px.mean[: len(block)].reshape(len(block), -1).cpu())
        means = self._to_data_units(torch.cat(means).numpy().astype(np.float64))
        return means.astype(Z.dtype, copy=False)

    # ------------------------------------------------------------- the decoder
    def decoder_distribution(self, X):
        r"""The decoder's distribution p(x|z) at the posterior mean of each image.

        For each row of ``X``, ``z = E[z|x]`` (what :meth:`transform`
        returns) and the distribution is the decoder's Gaussian at that
        ``z``, in the **model's units**: the values the network sees,

        .. math::

            y = a \,\mathrm{asinh}\!\left(\frac{x - \mathrm{offset\_}}
            {a \cdot \mathrm{scale\_}}\right), \quad a = \mathrm{stretch\_},

        or :math:`y = (x - \mathrm{offset\_}) / \mathrm{scale\_}` when
        ``stretch_`` is None. Its ``mean``, samples, ``precision_matrix`` and
        ``covariance_matrix`` are in those units; :meth:`to_data_units` maps
        values (the mean, samples) to the units of ``X``, and
        :meth:`decoder_moments` gives the mean and covariance there. The
        decoder is Gaussian in ``y``: in the units of ``X`` it is that
        Gaussian only when ``stretch_`` is None (mean ``offset_ + scale_ *
        y``, covariance times ``scale_**2``), heavy-tailed otherwise. The
        analogue of :meth:`sklearn.decomposition.FactorAnalysis.get_covariance`
        for a model whose noise depends on the image.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Images, validated and standardized as by :meth:`transform`.

        Returns
        -------
        distribution : torch.distributions.Distribution
            A :class:`~sk_covvae.distributions.BandedPrecisionNormal` (or its
            diagonal and spherical special cases, or a
            :class:`~sk_covvae.distributions.StencilPrecisionNormal` for
            ``neighbourhood='3x3'``) with batch shape ``(n_samples,)``, event
            shape ``image_shape_``, float64 parameters, on the model's device
            (``net_.device``). It holds the parameters of every image: the
            dense matrices are for a few small images.

        See Also
        --------
        decoder_moments : Mean and covariance in the units of ``X``.
        to_data_units : Map values from the model's units to those of ``X``.

        Examples
        --------
        >>> import numpy as np
        >>> from sk_covvae import CovarianceVAE
        >>> X = np.random.RandomState(0).normal(size=(64, 36))
        >>> vae = CovarianceVAE(n_components=2, max_epochs=2, random_state=0)
        >>> px = vae.fit(X).decoder_distribution(X[:3])
        >>> tuple(px.batch_shape), tuple(px.event_shape)
        ((3,), (6, 6))
        >>> px.covariance_matrix.shape
        torch.Size([3, 36, 36])
        >>> vae.to_data_units(px.sample()).shape
        (3, 6, 6)
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False, check_finite=False)
        module = self._module()
        # no_grad, not inference_mode: the distribution's lazy matrices are
        # computed later, outside this block.
        with torch.no_grad(), _reproducible_kernels(self.net_.device):
            Z = torch.cat([module.encode(xb)[0][:n] for xb, n in self._batches(X)])
            return module.decode(Z, dtype=torch.float64)

    def decoder_moments(self, X):
        r"""Mean and covariance of p(x|z) in the units of ``X``, at z = E[z|x].

        The exact moments of the decoder's distribution of
        :meth:`decoder_distribution` mapped to the units of ``X``. Without a
        stretch they are the Gaussian's own, scaled: ``offset_ + scale_ *
        mean`` and ``scale_**2 * covariance``. With the stretch ``a``, pixel
        values are ``offset_ + scale_ * a * sinh(y / a)`` of the Gaussian
        ``y``, whose moments have a closed form (for ``u = y / a`` of mean
        :math:`\mu` and variance :math:`\sigma^2`, :math:`E[\sinh u] =
        \sinh\mu \, e^{\sigma^2/2}`, and its two-pixel analogue); the mean is
        then slightly larger in magnitude than :meth:`inverse_transform`'s
        decoder mean mapped back, which is each pixel's median.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        mean : ndarray of shape (n_samples, n_features)
            float64.
        covariance : ndarray of shape (n_samples, n_features, n_features)
            float64; dense, so meant for a few small images.

        See Also
        --------
        decoder_distribution : The distribution itself, in the model's units.
        """
        px = self.decoder_distribution(X)
        n = px.loc.shape[0]
        loc = px.loc.reshape(n, -1).cpu().numpy()
        cov = px.covariance_matrix.cpu().numpy()
        offset, scale = self._feature_scaling()
        return _data_unit_moments(loc, cov, offset, scale, self.stretch_)

    def to_data_units(self, Y):
        """Map values from the model's units to the units of ``X``.

        The model's units are those of :meth:`decoder_distribution`. Computes
        ``offset_ + scale_ * a * sinh(Y / a)`` with ``a = stretch_``, or
        ``offset_ + scale_ * Y`` when ``stretch_`` is None: for decoder
        means, samples or quantiles of one pixel (the map is
        monotone), not for variances.

        Parameters
        ----------
        Y : array-like or torch.Tensor of any shape
            Values in the model's units.

        Returns
        -------
        ndarray of the shape of ``Y``, float64
        """
        check_is_fitted(self)
        if isinstance(Y, torch.Tensor):
            Y = Y.detach().cpu().numpy()
        return self._to_data_units(np.asarray(Y, dtype=np.float64))

    def _to_data_units(self, y):
        """``to_data_units`` of a float64 ndarray."""
        if np.ndim(self.scale_) == 0:
            return _unstretch(y, self.stretch_) * self.scale_ + self.offset_
        # One scale per channel: Y holds flattened images (..., C * H * W)
        # or images (..., C, H, W).
        if y.shape[-1:] == (self.n_features_in_,):
            offset, scale = self._feature_scaling()
        elif y.shape[-3:] == tuple(self.image_shape_):
            offset = self.offset_[:, None, None]
            scale = self.scale_[:, None, None]
        else:
            raise ValueError(
                "With one scale per channel, Y must hold flattened images (..., "
                f"{self.n_features_in_}) or images (..., "
                f"{', '.join(map(str, self.image_shape_))}); got shape "
                f"{tuple(y.shape)}."
            )
        return _unstretch(y, self.stretch_) * scale + offset

    def score_samples(self, X):
        """Lower bound on the log-likelihood log p(x) of each sample, in nats.

        With ``n_score_particles=1`` the evidence lower bound (ELBO),
        ``E_q[log p(x|z)] - KL(q(z|x) || p(z))``, its expectation estimated
        with one ``z``; with ``k > 1`` the importance-weighted bound with
        ``k`` particles. The standard normal draws are fixed and shared by all
        samples, so the result is deterministic and does not depend on the
        other rows of ``X`` (bit for bit with 1, 2, 4 or 8 torch threads; with
        other thread counts, to float32 rounding of a pixel or two, about
        1e-9 relative). Densities are in the units of ``X`` (the
        Jacobian of the internal standardization is included). Higher means
        more typical; ``-score_samples`` is an anomaly score.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            float64 for float32 and float64 ``X`` alike: per-image sums in
            float64 of the float32 network's per-pixel terms, each of float32
            precision (about 1e-7 relative), not float64's.
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False, check_finite=False)
        return self._log_densities(log_likelihood_bound, X, self.n_score_particles)

    def _log_densities(self, estimate, X, n_particles):
        """Per-sample ``estimate(module, x, eps)`` in nats, in the units of ``X``.

        ``X`` is already validated; ``eps`` is the fixed noise of
        ``n_particles`` draws shared by all samples; the Jacobian of the
        standardization is subtracted.
        """
        module = self._module()
        eps = self._fixed_noise(n_particles)
        with torch.inference_mode(), _reproducible_kernels(self.net_.device):
            values = [estimate(module, xb, eps)[:n] for xb, n in self._batches(X)]
        offset, scale = self._feature_scaling()
        log_det = _stretch_log_det(X, offset, scale, self.stretch_)
        return torch.cat(values).double().cpu().numpy() + log_det

    def _fixed_noise(self, n_particles):
        generator = torch.Generator().manual_seed(_SCORE_SEED)
        return torch.randn(n_particles, self._n_latent, generator=generator).to(
            self.net_.device
        )

    def reconstruction_log_likelihood(self, X, n_particles=1):
        """Estimate of E_q(z|x)[log p(x|z)] for each sample, in nats.

        The reconstruction term of the ELBO (its negative is the metric of
        the Fashion-MNIST table of Rojas Herrera's thesis, see
        ``docs/reproduction.md``), in the units of ``X``, with the same fixed
        noise as :meth:`score_samples`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        n_particles : int, default=1
            Draws of z per sample: a positive integer (not a bool), else
            scikit-learn's ``InvalidParameterError`` (a ``ValueError``).

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False, check_finite=False)
        n_particles = _check_count(n_particles, "n_particles")
        return self._log_densities(expected_log_likelihood, X, n_particles)

    def anomaly_score(self, X, method="elbo", *, n_particles=16):
        r"""Anomaly score of each sample: higher means more unusual.

        Every method scores each image on its own, in the fixed-size blocks
        of :meth:`score_samples` (an image's score does not depend on the
        other rows of ``X``), with the posterior's fixed noise where it draws.

        - ``'elbo'``: ``-score_samples(X)``, minus the evidence lower bound
          (or the importance-weighted bound when ``n_score_particles > 1``),
          in nats in the units of ``X``; the sign convention of
          :class:`sklearn.ensemble.IsolationForest`.
        - ``'iwae'``: minus the importance-weighted bound on log p(x) with
          ``n_particles`` draws of z (Burda et al., 2016), in nats in the
          units of ``X``. The same fixed draws as :meth:`score_samples`; it
          equals ``'elbo'`` for ``n_particles=1`` (with
          ``n_score_particles=1``) and its expectation decreases towards
          ``-log p(x)`` as ``n_particles`` grows.
        - ``'typicality'``: a goodness-of-fit test of the image against the
          decoder at its posterior mean. With ``y`` the image in the model's
          units (see :meth:`decoder_distribution`) and :math:`p(y|z) =
          N(\mu, (L L^\top)^{-1})` the decoder at :math:`z = E[z|x]`, the
          whitened residual :math:`r = L^\top (y - \mu)` is standard normal,
          :math:`r \sim N(0, I_D)`, when ``y`` is drawn from that Gaussian,
          so :math:`Q = \lVert r \rVert^2 \sim \chi^2_D` (D = H * W), of
          mean D and variance 2D. The score is the two-sided z-score of
          that statistic,

          .. math::

              \frac{|Q - D|}{\sqrt{2D}},

          large both for a residual too large for the model (structure it
          cannot reconstruct) and for one too small (an image smoother than
          the model's noise, e.g. a constant or saturated stamp, which a
          likelihood can rate as very typical). For large D it is
          approximately the absolute value of a standard normal under the
          model. Dimensionless, and independent of ``n_particles``.
        - ``'likelihood_ratio'``: the complexity-corrected score of Serrà et
          al. (2020), :math:`S(x) = -\log p(x) - L(x)`, with
          :math:`-\log p(x)` the ``'elbo'`` score and :math:`L(x)` the code
          length of the image, in nats, under a reference density that
          needs no training: an independent Gaussian over the image's D
          pixels with the image's own mean :math:`m` and (biased) variance
          :math:`v = \frac1D \sum_i (x_i - m)^2`, both in the units of ``X``,

          .. math::

              L(x) = -\log N(x; m, v I_D) = \frac{D}{2}\left(\log(2\pi v)
              + 1\right).

          Both terms are log-densities over the same space (the units of
          ``X``), so the score is a log-likelihood ratio: a change of the
          units of ``X`` shifts both by the same amount. Images that are
          simply smooth or plain (low :math:`v`) get a high likelihood under
          any model; the reference removes that. For a nearly constant
          image, ``v`` is floored at ``(min_scale * scale_)**2`` (then
          :math:`L(x) = \frac{D}{2} \log(2\pi v) + \frac{1}{2v} \sum_i
          (x_i - m)^2`), which keeps the score finite.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        method : {'elbo', 'iwae', 'typicality', 'likelihood_ratio'}, default='elbo'
            The score; see above.
        n_particles : int, default=16
            Draws of z per sample for ``method='iwae'`` (ignored otherwise,
            but validated): a positive integer (not a bool), else
            scikit-learn's ``InvalidParameterError`` (a ``ValueError``).

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            float64.

        Raises
        ------
        sklearn.utils._param_validation.InvalidParameterError
            For an unknown ``method`` or an invalid ``n_particles`` (a
            ``ValueError``).

        See Also
        --------
        score_samples : The log-likelihood bound, ``-anomaly_score(X)``.
        decoder_distribution : The decoder at the posterior mean, whose
            ``whiten`` gives the residual of ``'typicality'``.

        References
        ----------
        .. [1] Burda, Y., Grosse, R. and Salakhutdinov, R., "Importance
           Weighted Autoencoders", ICLR 2016.
        .. [2] Serrà, J., Álvarez, D., Gómez, V., Slizovskaia, O., Núñez,
           J. F. and Luque, J., "Input Complexity and Out-of-distribution
           Detection with Likelihood-based Generative Models", ICLR 2020.
        .. [3] Nalisnick, E., Matsukawa, A., Teh, Y. W. and
           Lakshminarayanan, B., "Detecting Out-of-Distribution Inputs to Deep
           Generative Models Using Typicality", arXiv 1906.02994, 2019.

        Examples
        --------
        >>> import numpy as np
        >>> from sk_covvae import CovarianceVAE
        >>> X = np.random.RandomState(0).normal(size=(64, 36))
        >>> vae = CovarianceVAE(n_components=2, max_epochs=2, random_state=0)
        >>> vae.fit(X).anomaly_score(X[:3], method="typicality").shape
        (3,)
        """
        check_is_fitted(self)
        if not (isinstance(method, str) and _ANOMALY_METHODS.is_satisfied_by(method)):
            raise InvalidParameterError(
                f"method must be a str among {sorted(_ANOMALY_METHODS.options)}, "
                f"got {method!r}."
            )
        n_particles = _check_count(n_particles, "n_particles")
        X = self._validate_X(X, reset=False, check_finite=False)
        if method == "iwae":
            return -self._log_densities(log_likelihood_bound, X, n_particles)
        if method == "typicality":
            return self._typicality(X)
        scores = -self._log_densities(log_likelihood_bound, X, self.n_score_particles)
        if method == "likelihood_ratio":
            var_floor = (self.min_scale * self.scale_) ** 2
            n_channels = self.image_shape_[0] if len(self.image_shape_) == 3 else 1
            scores -= _reference_code_length(X, var_floor, n_channels)
        return scores

    def _typicality(self, X):
        """``anomaly_score(X, method='typicality')`` of validated ``X``."""
        module = self._module()
        with torch.inference_mode(), _reproducible_kernels(self.net_.device):
            q = [
                whitened_residual_sq_norm(module, xb)[:n] for xb, n in self._batches(X)
            ]
        q = torch.cat(q).double().cpu().numpy()
        D = X.shape[1]
        return np.abs(q - D) / math.sqrt(2.0 * D)

    def score(self, X, y=None):
        """Mean of :meth:`score_samples`, a lower bound on the mean log-likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X)))

    def sample(self, n_samples=1, random_state=None):
        """Draw images from the model: z ~ N(0, I), then x ~ p(x|z).

        Each image is the decoder mean plus noise with the decoder's
        structured covariance, drawn by back substitution.

        Parameters
        ----------
        n_samples : int, default=1
            Number of images to draw: a positive integer (not a bool), else
            scikit-learn's ``InvalidParameterError`` (a ``ValueError``).
        random_state : int, RandomState instance or None, default=None
            Seeds the draws.

        Returns
        -------
        X : ndarray of shape (n_samples, `n_features_in_`)
        """
        check_is_fitted(self)
        n_samples = _check_count(n_samples, "n_samples")
        rng = check_random_state(random_state)
        generator = torch.Generator().manual_seed(
            int(rng.randint(np.iinfo(np.int32).max))
        )
        module = self._module()
        device = self.net_.device
        out = []
        with torch.inference_mode(), _reproducible_kernels(self.net_.device):
            rows = self._block_rows()
            for start in range(0, n_samples, rows):
                n = min(rows, n_samples - start)
                z = torch.randn(n, self._n_latent, generator=generator)
                eps = torch.randn(n, *self.image_shape_, generator=generator)
                px = module.decode(z.to(device))
                out.append(px.reparameterize(eps.to(device)).reshape(n, -1).cpu())
        return self._to_data_units(torch.cat(out).numpy().astype(np.float64))

    # ------------------------------------------------------------ sklearn glue
    @property
    def _n_latent(self):
        """Latent size of the fitted model (raises AttributeError before fit)."""
        return self.net_.module_.encoder.n_components

    @property
    def _n_features_out(self):
        return self._n_latent

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ------------------------------------------------------------------- ONNX
    def export_onnx(self, path, method="score_samples", *, opset=None, verify=True):
        return _export_onnx(self, path, method, opset=opset, verify=verify)

    # The documentation lives with the code, in sk_covvae._onnx.
    export_onnx.__doc__ = _export_onnx.__doc__

    # ------------------------------------------------------------- model files
    def save(self, path):
        """Write the fitted model to a single file, without pickle.

        The file is a zip archive: a JSON manifest (format version, the
        versions of sk_covvae, torch, scikit-learn and skorch that wrote it,
        the parameters and the fitted attributes) and the module's weights
        and fitted arrays in numpy's ``.npy`` format. Unlike a pickle, it
        runs no code when loaded and does not depend on the classes'
        internals. A ``random_state`` that is a ``RandomState`` instance is
        recorded as None. The training history, the optimizer's state and
        the early-stopping state are not saved.

        Parameters
        ----------
        path : str or path-like
            File to write (replaced if it exists); ``.covvae`` or ``.zip``
            are fitting suffixes.

        Returns
        -------
        self : CovarianceVAE
            The estimator, unchanged.

        See Also
        --------
        load : Read a model file.
        """
        from sk_covvae import _persistence

        _persistence.save(self, path)
        return self

    @classmethod
    def load(cls, path, device="cpu"):
        """Read a model file written by :meth:`save`.

        The net and module are rebuilt as ``fit`` builds them, without
        training, and the saved weights are loaded onto ``device``:
        :meth:`transform`, :meth:`score_samples`, :meth:`inverse_transform`
        and :meth:`sample` then give the saved model's results (bit for bit
        on the same kind of device). The loaded model is meant for
        inference. ``fit`` with ``warm_start=True`` continues training its
        weights, but with a fresh Adam state and an empty history:
        ``n_epochs_`` and ``net_.history`` then count the epochs since
        loading, and early stopping starts from the loaded weights' validation
        loss (the validation split is the original one when ``random_state``
        was an integer and ``X`` is the same).

        Parameters
        ----------
        path : str or path-like
            A file written by :meth:`save`.
        device : str, default='cpu'
            Torch device for the loaded model (``'auto'``, ``'cpu'``,
            ``'cuda'``, ``'cuda:N'``); it replaces the saved ``device``
            parameter. ``device_`` keeps the device of the original fit.

        Returns
        -------
        estimator : CovarianceVAE
            A fitted estimator.

        Raises
        ------
        ValueError
            Naming the file and the problem when it is not a model file, is
            truncated or corrupt, has a newer format version than this
            sk_covvae reads, or holds weights whose shapes do not match the
            architecture of its parameters.

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> from sk_covvae import CovarianceVAE
        >>> X = np.random.RandomState(0).normal(size=(64, 36))
        >>> vae = CovarianceVAE(n_components=2, max_epochs=2, random_state=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.covvae")
        >>> _ = vae.fit(X).save(path)
        >>> loaded = CovarianceVAE.load(path)
        >>> bool(np.array_equal(loaded.score_samples(X), vae.score_samples(X)))
        True
        """
        from sk_covvae import _persistence

        return _persistence.load(cls, path, device=device)
