"""
=====================================================
Anomaly scores: ranking artefacts by -score_samples
=====================================================

:meth:`~sk_covvae.CovarianceVAE.score_samples` returns a lower bound on the
log-likelihood of each image (the ELBO, in nats): higher means more typical.
Fitted on real transients only, the VAE finds artefacts unlikely, so
``-score_samples`` is an anomaly score with the sign convention of
:class:`~sklearn.ensemble.IsolationForest`, and it needs no labelled
artefacts at all. The training here is tiny (a few hundred stamps, a few
epochs) to keep the example fast.
"""

# %%
# Fit on real candidates only
# ---------------------------
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sk_covvae import CovarianceVAE
from sk_covvae.datasets import REAL_LABEL, make_difference_stamps

# The networks here are tiny: one CPU thread trains them several times faster
# than many threads, which mostly wait on each other.
torch.set_num_threads(1)

stamps = make_difference_stamps(1600, random_state=2)
X, y, kind = stamps.data, stamps.target, stamps.artefact_type
train = np.zeros(len(y), dtype=bool)
train[np.flatnonzero(y == REAL_LABEL)[:500]] = True  # 500 real stamps
test = ~train  # the remaining real stamps and every bogus one

vae = CovarianceVAE(
    n_components=8,
    covariance="banded",
    max_epochs=30,
    batch_size=64,
    channels=(8, 16),
    hidden_units=64,
    device="cpu",
    random_state=0,
).fit(X[train])

anomaly = -vae.score_samples(X[test])
is_bogus = y[test] == 0
print(f"artefact-detection ROC AUC: {roc_auc_score(is_bogus, anomaly):.3f}")

# %%
# Which artefacts stand out
# -------------------------
# The ROC AUC of each artefact type against the held-out real stamps: 1 means
# every artefact of that type scores as more anomalous than every real
# transient, 0.5 means the score cannot tell them apart.
types = [t for t in stamps.artefact_types if np.any(kind[test] == t)]
real_test = kind[test] == "real"
for t in types:
    mask = real_test | (kind[test] == t)
    auc = roc_auc_score(kind[test][mask] == t, anomaly[mask])
    print(f"{t:>15}: ROC AUC {auc:.3f}")

# %%
# Histogram of the anomaly scores
# -------------------------------
# A symmetric-log axis: the scores of bright artefacts (saturated stars,
# bad columns) are orders of magnitude above those of real transients.
fig, ax = plt.subplots(figsize=(5.5, 3.5))
bins = np.quantile(anomaly, np.linspace(0, 1, 41))
ax.hist(anomaly[~is_bogus], bins=bins, alpha=0.6, label="real (held out)")
ax.hist(anomaly[is_bogus], bins=bins, alpha=0.6, label="bogus")
ax.set_xscale("symlog", linthresh=1000)
ax.set_xlabel("-score_samples [nats]")
ax.set_ylabel("stamps")
ax.legend()
fig.tight_layout()

# %%
# The most and least anomalous stamps
# -----------------------------------
order = np.argsort(anomaly)
picks = np.concatenate([order[:6], order[-6:]])
fig, axes = plt.subplots(2, 6, figsize=(7.5, 3))
for ax, i in zip(axes.ravel(), picks):
    ax.imshow(
        X[test][i].reshape(stamps.image_shape),
        cmap="RdBu_r",
        vmin=-8,
        vmax=8,
        origin="lower",
    )
    ax.set_title(kind[test][i], fontsize=7)
    ax.set_axis_off()
axes[0, 0].text(
    -0.2,
    0.5,
    "typical",
    rotation=90,
    va="center",
    ha="right",
    transform=axes[0, 0].transAxes,
)
axes[1, 0].text(
    -0.2,
    0.5,
    "anomalous",
    rotation=90,
    va="center",
    ha="right",
    transform=axes[1, 0].transAxes,
)
fig.tight_layout()

plt.show()
