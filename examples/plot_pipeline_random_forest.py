"""
==============================================================
Real/bogus classification with VAE features and a RandomForest
==============================================================

A :class:`~sk_covvae.CovarianceVAE` is a scikit-learn transformer: its
``transform`` returns the posterior means of the latent variables, a handful
of features per image that any classifier can use. Here a
:class:`~sklearn.pipeline.Pipeline` chains a banded-covariance VAE with a
:class:`~sklearn.ensemble.RandomForestClassifier` to separate real
transients from artefacts ("bogus") in simulated difference-image stamps,
and compares it with a RandomForest on the raw pixels.

The settings (a few hundred stamps, a few epochs, small layers) keep the
example under a minute on a laptop CPU; they are far from what a real
survey would use, so read the numbers as a demonstration, not a result.
"""

# %%
# Simulated stamps
# ----------------
# :func:`~sk_covvae.datasets.make_difference_stamps` simulates 21x21 stamps
# of real point-source transients and of eight kinds of artefact, divided by
# the background noise. Half are real.
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import RocCurveDisplay, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from sk_covvae import CovarianceVAE
from sk_covvae.datasets import make_difference_stamps

# The networks here are tiny: one CPU thread trains them several times faster
# than many threads, which mostly wait on each other.
torch.set_num_threads(1)

X, y = make_difference_stamps(1500, random_state=0, return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.33, stratify=y, random_state=0
)
print(f"{len(X_train)} training and {len(X_test)} test stamps of {X.shape[1]} px")

# %%
# The pipeline
# ------------
# The VAE learns from the images only (it ignores ``y``); the forest learns
# the labels from its 8 latent features.
vae = CovarianceVAE(
    n_components=8,
    covariance="banded",
    max_epochs=25,
    batch_size=64,
    channels=(8, 16),
    hidden_units=64,
    device="cpu",
    random_state=0,
)
pipe = Pipeline(
    [
        ("vae", vae),
        ("rf", RandomForestClassifier(n_estimators=200, random_state=0)),
    ]
)
pipe.fit(X_train, y_train)
print("features:", pipe["vae"].get_feature_names_out()[:4], "...")
print("epochs run:", pipe["vae"].n_epochs_)

# %%
# Compress the dynamic range first
# --------------------------------
# The VAE standardizes its input by one robust global scale (``scale_``
# below, close to the background noise of a stamp). Saturated stars and bad
# columns still reach thousands of noise sigmas, and a Gaussian decoder
# spends its capacity on those few pixels. An ``arcsinh`` in front, linear
# near zero and logarithmic for bright pixels, compresses that range in one
# line of the pipeline (densities are then those of the transformed data).
print(f"scale_ on raw stamps: {pipe['vae'].scale_:.1f}")
pipe_asinh = Pipeline(
    [
        ("asinh", FunctionTransformer(np.arcsinh)),
        ("vae", clone(vae)),
        ("rf", RandomForestClassifier(n_estimators=200, random_state=0)),
    ]
)
pipe_asinh.fit(X_train, y_train)
print(f"scale_ after arcsinh: {pipe_asinh['vae'].scale_:.2f}")

# %%
# Compare with a RandomForest on the 441 raw pixels
# --------------------------------------------------
raw = RandomForestClassifier(n_estimators=200, random_state=0).fit(X_train, y_train)

scores = {
    "banded VAE (8 features) + RF": pipe.predict_proba(X_test)[:, 1],
    "arcsinh, banded VAE + RF": pipe_asinh.predict_proba(X_test)[:, 1],
    "raw pixels (441 features) + RF": raw.predict_proba(X_test)[:, 1],
}
fig, ax = plt.subplots(figsize=(4.5, 4.5))
for name, score in scores.items():
    auc = roc_auc_score(y_test, score)
    print(f"{name:>30}: ROC AUC {auc:.3f}")
    RocCurveDisplay.from_predictions(y_test, score, name=name, ax=ax)
ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
ax.set_title("real/bogus on held-out simulated stamps", fontsize=9)
fig.tight_layout()

# %%
# Latent features of real and bogus stamps
# ----------------------------------------
# The two latent dimensions with the largest spread (of the arcsinh
# pipeline), coloured by class.
Z = pipe_asinh[:-1].transform(X_test)
top = np.argsort(Z.std(axis=0))[::-1][:2]
fig, ax = plt.subplots(figsize=(4.5, 4))
for label, name, colour in ((0, "bogus", "tab:red"), (1, "real", "tab:blue")):
    mask = y_test == label
    ax.scatter(Z[mask, top[0]], Z[mask, top[1]], s=6, alpha=0.6, c=colour, label=name)
ax.set_xlabel(f"latent {top[0]}")
ax.set_ylabel(f"latent {top[1]}")
ax.legend()
fig.tight_layout()

plt.show()
