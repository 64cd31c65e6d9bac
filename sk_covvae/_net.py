r"""The training objective and the skorch net that minimises it.

For an image ``x`` with posterior :math:`q(z|x) = N(\mu, \mathrm{diag}\,
\sigma^2)`, prior :math:`p(z) = N(0, I)` and decoder :math:`p(x|z)`:

.. math::

    \mathrm{ELBO}(x) = E_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z))
    \le \log p(x),

    \mathrm{KL} = \tfrac12 \sum_k (\mu_k^2 + \sigma_k^2 - 1 - \log\sigma_k^2),

and the importance-weighted bound with ``k`` particles
:math:`z_j \sim q(z|x)` (Burda et al., 2016),

.. math::

    \log \frac1k \sum_{j=1}^k \frac{p(x|z_j)\,p(z_j)}{q(z_j|x)}
    \le \log p(x),

which equals the ELBO in expectation for ``k = 1`` and tightens as ``k``
grows. Training minimises the negative ELBO with one reparameterised ``z``
per image, averaged over the mini-batch.
"""

import copy
import math

import torch
from skorch import NeuralNet
from skorch.callbacks import Callback
from skorch.dataset import get_len, unpack_data
from skorch.utils import to_tensor
from torch.utils.data import Subset

_LOG_2PI = math.log(2.0 * math.pi)
# Training steps between two host reads of the losses on an accelerator
# (see ``VAENet.run_single_epoch``).
_FINITE_CHECK_STEPS = 32


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def negative_elbo(mu, logvar, px, x) -> torch.Tensor:
    """Per-image negative ELBO, -log p(x|z) + KL, with z already drawn in ``px``.

    Parameters
    ----------
    mu, logvar : torch.Tensor of shape (N, K)
        Parameters of q(z|x).
    px : BandedPrecisionNormal
        Decoder distribution at one z drawn from q(z|x), batch (N,).
    x : torch.Tensor of shape (N, H, W)

    Returns
    -------
    torch.Tensor of shape (N,)
    """
    return -px.log_prob(x) + gaussian_kl(mu, logvar)


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)


def _posterior_draws(module, x_flat, eps, dtype):
    """Encode ``x_flat`` and draw ``z_j = mu + sigma * eps_j`` for every ``j``.

    Returns ``mu``, ``logvar`` (N, K) and the draws ``z`` (k, N, K) in
    ``dtype``, and the images ``x`` (N, H, W) as they are.
    """
    mu, logvar = module.encode(x_flat, dtype=dtype)
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps.to(dtype)[:, None, :]
    return mu, logvar, module.images(x_flat), z


def _decoder_log_prob(module, z, x, dtype):
    """log p(x|z): decoder maps in the network's dtype, per-image sums in ``dtype``.

    The sums, where float32 would lose digits, are in ``dtype``; the maps
    before them cost half as much in float32 as in float64. Whether an image
    shares its batch with others moves its result by float32 rounding at
    most: the estimator passes blocks of a fixed number of rows (256, a
    multiple of every vector width), so vectorised kernels treat every pixel
    alike, except that a few elements where a thread's share of a block ends
    mid-vector (thread counts other than powers of two) may round their last
    bit differently, ~1e-7 relative on one pixel's term.
    """
    return module.decode(z).log_prob(x, sum_dtype=dtype)


def log_likelihood_bound(module, x_flat, eps, dtype=torch.float64):
    """Per-image lower bound on log p(x) with fixed noise ``eps``.

    Parameters
    ----------
    module : VAEModule
    x_flat : torch.Tensor of shape (N, D)
    eps : torch.Tensor of shape (k, K)
        Standard normal draws shared by every image: ``z_j = mu + sigma *
        eps_j``. Sharing them (common random numbers) makes the result of an
        image independent of the batch it comes in.

    dtype : torch.dtype, default=torch.float64
        Dtype of the posterior's elementwise maps (see ``VAEModule.encode``),
        of the per-image sums of the decoder's log-density and of the result.

    Returns
    -------
    torch.Tensor of shape (N,)
        The ELBO with analytic KL for ``k = 1``; the importance-weighted
        bound for ``k > 1``.
    """
    mu, logvar, x, z = _posterior_draws(module, x_flat, eps, dtype)
    k = len(z)
    if k == 1:
        return _decoder_log_prob(module, z[0], x, dtype) - gaussian_kl(mu, logvar)
    half_logdet = 0.5 * logvar.sum(-1)
    log_w = []
    for z_j, eps_j in zip(z, eps.to(dtype)):
        log_q = _standard_normal_log_prob(eps_j.expand_as(mu)) - half_logdet
        log_p = _decoder_log_prob(module, z_j, x, dtype)
        log_w.append(log_p + _standard_normal_log_prob(z_j) - log_q)
    return torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k)


def expected_log_likelihood(module, x_flat, eps, dtype=torch.float64):
    """Per-image estimate of E_q(z|x)[log p(x|z)], the reconstruction term.

    The mean of ``log p(x|z_j)`` over ``z_j = mu + sigma * eps_j``; minus this
    is the metric of the Fashion-MNIST table of Rojas Herrera's thesis (see
    ``docs/reproduction.md``). Same arguments as
    :func:`log_likelihood_bound`.

    Returns
    -------
    torch.Tensor of shape (N,)
    """
    _, _, x, z = _posterior_draws(module, x_flat, eps, dtype)
    return sum(_decoder_log_prob(module, z_j, x, dtype) for z_j in z) / len(z)


def whitened_residual_sq_norm(module, x_flat, dtype=torch.float64):
    r"""Per-image :math:`\lVert L^\top (x - \mu_\theta(z)) \rVert^2` at z = E[z|x].

    The decoder's distribution at the posterior mean (as
    ``CovarianceVAE.decoder_distribution`` builds it: the encoder's float32
    mean, decoder parameters in ``dtype``) whitens the image: under that
    Gaussian, :math:`r = L^\top (x - \mu)` is standard normal, so the result
    is :math:`\chi^2_D`-distributed, D = H * W (C * H * W for C channels).

    Parameters
    ----------
    module : VAEModule
    x_flat : torch.Tensor of shape (N, D)
    dtype : torch.dtype, default=torch.float64
        Dtype of the decoder's parameters, of the residual and of the sum.

    Returns
    -------
    torch.Tensor of shape (N,)
    """
    mu, _ = module.encode(x_flat)
    px = module.decode(mu, dtype=dtype)
    r = px.whiten(module.images(x_flat).to(dtype))
    return r.pow(2).sum(tuple(range(-len(px.event_shape), 0)))


class SliceLoader:
    """Mini-batches by indexing the data tensor, for skorch's ``iterator_*``.

    skorch's default ``DataLoader`` fetches and collates one row at a time;
    images are rows of one tensor, so a batch is a single indexing operation.
    Accepts the skorch ``Dataset`` holding that tensor, or a ``Subset`` of it
    (what skorch's ``ValidSplit`` returns). Shuffling draws from torch's
    global CPU generator, which ``CovarianceVAE.fit`` seeds; the order and
    the subset's indices go to the tensor's device once, so that indexing a
    tensor on a GPU needs no copy (and no synchronisation) per batch.

    Parameters
    ----------
    dataset : skorch.dataset.Dataset or torch.utils.data.Subset
    batch_size : int
    shuffle : bool, default=False
    """

    def __init__(self, dataset, batch_size, shuffle=False):
        indices = None
        if isinstance(dataset, Subset):
            indices = torch.as_tensor(dataset.indices, dtype=torch.long)
            dataset = dataset.dataset
        X = getattr(dataset, "X", None)
        if not isinstance(X, torch.Tensor):
            raise TypeError("SliceLoader needs a dataset holding one tensor X.")
        if indices is not None:
            indices = indices.to(X.device)
        self.X = X
        self.indices = indices
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self):
        n = len(self.X) if self.indices is None else len(self.indices)
        return math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.X) if self.indices is None else len(self.indices)
        order = torch.randperm(n).to(self.X.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            if order is None and self.indices is None:
                yield self.X[start:stop], None
                continue
            rows = order[start:stop] if order is not None else slice(start, stop)
            if self.indices is not None:
                rows = self.indices[rows]
            yield self.X[rows], None


class NegativeELBO(torch.nn.Module):
    """Criterion: mean negative ELBO of a batch of module outputs."""

    def forward(self, mu, logvar, px, x):
        return negative_elbo(mu, logvar, px, x).mean()


class VAENet(NeuralNet):
    """skorch net whose loss is the negative ELBO of its VAE module.

    The module returns ``(mu, logvar, px)``; the target is ignored and the
    reconstruction term compares ``px`` with the input batch itself, as in
    :meth:`skorch.probabilistic.GPBase.get_loss`.

    Each batch goes to the device once, for the forward pass and the loss.
    A non-finite loss raises ``FloatingPointError``: on CPU in
    :meth:`get_loss`, before the step changes anything; on an accelerator
    when the losses are read on the host, every ``_FINITE_CHECK_STEPS``
    steps (see :meth:`run_single_epoch`), after restoring the weights and
    the optimizer's state of the last read.
    """

    def _finite_check_interval(self):
        """Steps between host reads of the losses: 1 on CPU (free there)."""
        return 1 if torch.device(self.device).type == "cpu" else _FINITE_CHECK_STEPS

    def _batch_on_device(self, batch):
        Xi, yi = unpack_data(batch)
        return to_tensor(Xi, device=self.device), yi

    def train_step_single(self, batch, **fit_params):
        return super().train_step_single(self._batch_on_device(batch), **fit_params)

    def validation_step(self, batch, **fit_params):
        return super().validation_step(self._batch_on_device(batch), **fit_params)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        mu, logvar, px = y_pred
        # X is on the device already (see train_step_single): no copy.
        x = to_tensor(X, device=self.device).reshape(px.loc.shape)
        loss = self.criterion_(mu, logvar, px, x)
        if self._finite_check_interval() == 1 and not torch.isfinite(loss):
            raise FloatingPointError(self._non_finite_message(loss.item()))
        return loss

    def _non_finite_message(self, value):
        return (
            f"The negative ELBO became non-finite ({value}) "
            f"in epoch {len(self.history)}."
        )

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        """skorch's loop over the batches of an epoch, reading losses in groups.

        skorch reads each batch's loss on the host (``.item()``) as its step
        ends: a synchronisation per step, which makes the host wait for an
        accelerator before it queues the next step. Here the losses stay on
        the device and are read, checked and recorded in the history
        :meth:`_finite_check_interval` batches at a time (with one read),
        then recorded exactly as skorch records them. On CPU that is every
        batch, as in skorch. In training, the weights and the optimizer's
        state are copied (on the device) at each read; if a loss read is not
        finite they are put back and ``FloatingPointError`` is raised.
        """
        if iterator is None:
            return
        interval = self._finite_check_interval()
        snapshot = self._snapshot() if training and interval > 1 else None
        pending = []
        batch_count = 0
        try:
            for batch in iterator:
                self.notify("on_batch_begin", batch=batch, training=training)
                step = step_fn(batch, **fit_params)
                batch_size = (
                    get_len(batch[0])
                    if isinstance(batch, tuple | list)
                    else get_len(batch)
                )
                row = len(self.history[-1]["batches"]) - 1
                pending.append((row, step["loss"].detach(), batch_size))
                if len(pending) == interval:
                    snapshot = self._record_losses(prefix, pending, snapshot)
                    pending = []
                self.notify("on_batch_end", batch=batch, training=training, **step)
                batch_count += 1
        except KeyboardInterrupt:
            # Ctrl-C mid-epoch: the batches that ran are recorded, as by skorch.
            self._record_losses(prefix, pending, snapshot)
            raise
        self._record_losses(prefix, pending, snapshot)
        self.history.record(prefix + "_batch_count", batch_count)

    def _record_losses(self, prefix, pending, snapshot):
        """Read the ``pending`` losses on the host, check and record them.

        Returns a new snapshot of the training state after a good read, if
        ``snapshot`` is not None; restores ``snapshot`` and raises
        ``FloatingPointError`` after a bad one.
        """
        if not pending:
            return snapshot
        if len(pending) == 1:
            values = [pending[0][1].item()]
        else:
            values = torch.stack([loss for _, loss, _ in pending]).tolist()
        batches = self.history[-1]["batches"]
        for (row, _, batch_size), value in zip(pending, values):
            if not math.isfinite(value):
                if snapshot is not None:
                    self.module_.load_state_dict(snapshot[0])
                    self.optimizer_.load_state_dict(snapshot[1])
                raise FloatingPointError(self._non_finite_message(value))
            batches[row][prefix + "_loss"] = value
            batches[row][prefix + "_batch_size"] = batch_size
        return None if snapshot is None else self._snapshot()

    def _snapshot(self):
        """Copies of the module's weights and the optimizer's state."""
        weights = {k: v.detach().clone() for k, v in self.module_.state_dict().items()}
        return weights, copy.deepcopy(self.optimizer_.state_dict())


class StageRecorder(Callback):
    """Record the module's training stage in each epoch of the history.

    ``net.history[:, 'stage']`` then tells the mean stage's epochs (whose
    losses use the spherical noise model) from the others.
    """

    def on_epoch_end(self, net, **kwargs):
        net.history.record("stage", net.module_.stage)
