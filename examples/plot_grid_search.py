"""
=====================================================
Choosing the latent size with GridSearchCV
=====================================================

``n_components``, the size of the latent space, is an ordinary
hyper-parameter of :class:`~sk_covvae.CovarianceVAE`, so
:class:`~sklearn.model_selection.GridSearchCV` can choose it. In a pipeline
with a classifier, the search addresses it as ``vae__n_components`` and picks
the latent size that classifies best. Each candidate refits the VAE on every
fold, so the grid, the folds and the training are kept tiny here.
"""

# %%
# A pipeline and a grid
# ---------------------
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

from sk_covvae import CovarianceVAE
from sk_covvae.datasets import REAL_LABEL, make_difference_stamps

# The networks here are tiny: one CPU thread trains them several times faster
# than many threads, which mostly wait on each other.
torch.set_num_threads(1)

X, y = make_difference_stamps(800, random_state=1, return_X_y=True)

pipe = Pipeline(
    [
        (
            "vae",
            CovarianceVAE(
                covariance="banded",
                max_epochs=15,
                batch_size=64,
                channels=(8, 16),
                hidden_units=64,
                device="cpu",
                random_state=0,
            ),
        ),
        ("rf", RandomForestClassifier(n_estimators=100, random_state=0)),
    ]
)
search = GridSearchCV(
    pipe,
    {"vae__n_components": [2, 6, 16]},
    scoring="roc_auc",
    cv=StratifiedKFold(n_splits=2, shuffle=True, random_state=0),
    # n_jobs=2 (or more) fits the folds in parallel processes on a machine
    # with cores to spare.
    n_jobs=1,
)
search.fit(X, y)
print("best:", search.best_params_, f"ROC AUC {search.best_score_:.3f}")

# %%
# Cross-validated ROC AUC against the latent size
# -----------------------------------------------
results = search.cv_results_
k = np.array(results["param_vae__n_components"], dtype=int)
fig, ax = plt.subplots(figsize=(4.5, 3.5))
ax.errorbar(k, results["mean_test_score"], yerr=results["std_test_score"], marker="o")
ax.set_xscale("log")
ax.set_xticks(k, [str(v) for v in k])
ax.set_xlabel("n_components")
ax.set_ylabel("ROC AUC (2-fold CV)")
ax.set_title("RandomForest on banded-VAE features", fontsize=9)
fig.tight_layout()

# %%
# The VAE on its own
# ------------------
# Without a classifier, :meth:`~sk_covvae.CovarianceVAE.score` (the mean
# lower bound on the log-likelihood of held-out images) is the default
# scoring, as for :class:`~sklearn.decomposition.PCA`: the search then picks
# the latent size that models unseen stamps best. The best estimator is
# refitted on all the data.
vae_search = GridSearchCV(
    pipe["vae"],
    {"n_components": [2, 16]},
    cv=2,
)
vae_search.fit(X[y == REAL_LABEL])
for k_, score in zip(
    vae_search.cv_results_["param_n_components"],
    vae_search.cv_results_["mean_test_score"],
):
    print(f"n_components={k_:>2}: mean held-out ELBO {score:9.1f} nats/stamp")

plt.show()
