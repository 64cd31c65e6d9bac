r"""
==========================================================
Decoder means, samples and the covariance of one image
==========================================================

The three covariance models of :class:`~sk_covvae.CovarianceVAE` share the
encoder and the decoder's mean; they differ in the noise they put around that
mean. ``'spherical'`` has one scale for every pixel, ``'diagonal'`` one scale
per pixel, and ``'banded'`` also couples each pixel to its right-hand and
lower neighbours through the Cholesky factor ``L`` of the precision matrix
:math:`\Lambda = L L^\top`. This example fits the three models to simulated
difference stamps (tiny settings, to stay fast) and shows, per model, the
decoder mean and samples; then, for one image, the banded model's precision
and covariance matrices and the pixel correlations they imply.
"""

# %%
# Fit the three models
# --------------------
import matplotlib.pyplot as plt
import numpy as np
import torch

from sk_covvae import CovarianceVAE
from sk_covvae.datasets import make_difference_stamps
from sk_covvae.distributions import covariance_eigenvalue_bounds

# The networks here are tiny: one CPU thread trains them several times faster
# than many threads, which mostly wait on each other.
torch.set_num_threads(1)

# Real candidates only: a point source (sometimes on a host galaxy) in
# correlated noise. Bright artefacts such as saturated stars would dominate
# the global scale of the data that the VAE standardizes by.
stamps = make_difference_stamps(1000, real_fraction=1.0, random_state=3)
X = stamps.data
shape = stamps.image_shape
X_train, X_show = X[:900], X[900:]

models = {}
for covariance in ("spherical", "diagonal", "banded"):
    models[covariance] = CovarianceVAE(
        n_components=8,
        covariance=covariance,
        max_epochs=25,
        batch_size=64,
        channels=(8, 16),
        hidden_units=64,
        device="cpu",
        random_state=0,
    ).fit(X_train)
    score = models[covariance].score(X_show)
    print(f"{covariance:>9}: held-out ELBO {score:8.1f} nats per stamp")

# %%
# Data, decoder mean and a sample of p(x|z), per model
# ----------------------------------------------------
# For each stamp, ``z`` is its posterior mean (:meth:`transform`); the decoder
# mean is :meth:`inverse_transform` of it, and the sample adds noise drawn
# from the decoder's covariance at that ``z``.
# :meth:`~sk_covvae.CovarianceVAE.decoder_distribution` returns that
# distribution, a Gaussian in the model's units (the stamps standardized by
# ``offset_`` and ``scale_``, then softened by the asinh ``stretch``);
# :meth:`~sk_covvae.CovarianceVAE.to_data_units` maps its draws back to the
# units of the stamps.
n_show = 5
rows = [("data", X_show[:n_show])]
for covariance, vae in models.items():
    px = vae.decoder_distribution(X_show[:n_show])
    sample = vae.to_data_units(px.rsample()).reshape(n_show, -1)
    rows.append(
        (f"{covariance}\nmean", vae.inverse_transform(vae.transform(X_show[:n_show])))
    )
    rows.append((f"{covariance}\nsample", sample))

fig, axes = plt.subplots(len(rows), n_show, figsize=(1.3 * n_show, 1.3 * len(rows)))
for r, (name, images) in enumerate(rows):
    for c in range(n_show):
        ax = axes[r, c]
        ax.imshow(
            images[c].reshape(shape), cmap="RdBu_r", vmin=-6, vmax=6, origin="lower"
        )
        ax.set_xticks([])
        ax.set_yticks([])
    axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
fig.tight_layout()

# %%
# Samples from the prior
# ----------------------
# :meth:`~sk_covvae.CovarianceVAE.sample` draws ``z`` from the prior and an
# image from ``p(x|z)``: decoder mean plus structured noise.
fig, axes = plt.subplots(3, 6, figsize=(7.5, 4))
for r, (covariance, vae) in enumerate(models.items()):
    for c, image in enumerate(vae.sample(n_samples=6, random_state=0)):
        axes[r, c].imshow(
            image.reshape(shape), cmap="RdBu_r", vmin=-6, vmax=6, origin="lower"
        )
        axes[r, c].set_axis_off()
    axes[r, 0].set_title(covariance, fontsize=8, loc="left")
fig.tight_layout()

# %%
# Precision and covariance of one image (banded model)
# ----------------------------------------------------
# The decoder's :class:`~sk_covvae.distributions.BandedPrecisionNormal` builds
# the dense 441 x 441 matrices on request, in the model's units. The precision
# :math:`L L^\top` has five nonzero diagonals (offsets 0, +-1 and +-21);
# its inverse, the covariance, is dense but concentrated near the diagonal.
# :meth:`~sk_covvae.CovarianceVAE.decoder_moments` gives the covariance of
# the stamp's pixels in their own units (exact, through the stretch).
# Right: the top-left 63 x 63 block (three image rows).
banded = models["banded"]
px = banded.decoder_distribution(X_show[:1])
precision = px.precision_matrix[0].numpy()
covariance = banded.decoder_moments(X_show[:1])[1][0]

fig, axes = plt.subplots(2, 2, figsize=(7, 7))
for row, (name, matrix) in enumerate(
    (("precision (model units)", precision), ("covariance", covariance))
):
    for col, block in enumerate((matrix, matrix[:63, :63])):
        lim = np.percentile(np.abs(block), 99.5)
        axes[row, col].imshow(block, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[row, col].set_title(
            f"{name}" + (" (first 3 rows of pixels)" if col else ""), fontsize=9
        )
fig.tight_layout()

# %%
# The conditioning bound
# ----------------------
# The covariance head is constrained so that every eigenvalue of the
# decoder's covariance (in the model's units) lies in a known interval,
# whatever the network outputs: see
# :func:`~sk_covvae.distributions.constrain_banded_parameters`.
eigenvalues = np.linalg.eigvalsh(px.covariance_matrix[0].numpy())
lower, upper = covariance_eigenvalue_bounds(
    (-np.log(banded.max_scale), -np.log(banded.min_scale)), rho=0.9
)
print(
    f"eigenvalues of this image's covariance: [{eigenvalues.min():.3g}, "
    f"{eigenvalues.max():.3g}]"
)
print(f"guaranteed interval:                    [{lower:.3g}, {upper:.3g}]")

# %%
# Implied pixel correlations
# --------------------------
# Left: the correlation of the central pixel with every other pixel (in the
# stamps' units, from :meth:`~sk_covvae.CovarianceVAE.decoder_moments`). Right:
# the mean correlation between horizontal and vertical neighbours at lags 1
# to 4, from the model's covariance, beside the correlation of the
# background noise measured on the data (the top five rows of stamps without
# a host). A diagonal or spherical decoder has zero correlation at every lag
# by construction.
std = np.sqrt(np.diag(covariance))
correlation = covariance / np.outer(std, std)
H, W = shape
centre = (H // 2) * W + W // 2
idx = np.arange(H * W).reshape(shape)


def model_lag_correlation(lag, axis):
    pairs = (
        (idx[:, :-lag], idx[:, lag:]) if axis == 1 else (idx[:-lag, :], idx[lag:, :])
    )
    return correlation[pairs[0].ravel(), pairs[1].ravel()].mean()


quiet = ~stamps.has_host
background = X[quiet].reshape(-1, *shape)[:, :5, :]
background = background - background.mean(axis=(1, 2), keepdims=True)


def data_lag_correlation(lag):
    return (background[:, :, :-lag] * background[:, :, lag:]).mean() / (
        background.var()
    )


lags = np.arange(1, 5)
fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
im = axes[0].imshow(
    correlation[centre].reshape(shape), cmap="RdBu_r", vmin=-1, vmax=1, origin="lower"
)
fig.colorbar(im, ax=axes[0], shrink=0.8)
axes[0].set_title("correlation with the central pixel", fontsize=9)
axes[1].plot(
    lags,
    [model_lag_correlation(k, 1) for k in lags],
    "o-",
    label="banded model, horizontal",
)
axes[1].plot(
    lags,
    [model_lag_correlation(k, 0) for k in lags],
    "s-",
    label="banded model, vertical",
)
axes[1].plot(
    lags,
    [data_lag_correlation(k) for k in lags],
    "k^--",
    label="data background, horizontal",
)
axes[1].axhline(0, color="0.7", lw=0.8)
axes[1].set_xticks(lags)
axes[1].set_xlabel("lag [pixels]")
axes[1].set_ylabel("correlation")
axes[1].legend(fontsize=7)
fig.tight_layout()

plt.show()
