"""
====================================================
Scoring real ZTF alerts: read, preprocess, fit, rank
====================================================

A broker receives alert packets, each with three cutouts: science, template
and difference. This example reads real ZTF packets with
:func:`~sk_covvae.datasets.read_alerts`, crops and fills them with
:class:`~sk_covvae.preprocessing.StampPreprocessor` (cutouts at a CCD edge
have missing pixels, and templates mark bad pixels with 3.4e38), fits a
three-channel :class:`~sk_covvae.CovarianceVAE` on some alerts and ranks
alerts it has never seen by their anomaly score.

The packets are the 498 of ``../shared/data/ztf_alert_archive`` (public ZTF
alerts kept by the Fink broker's simulator). Without that folder, the example
runs on simulated triplets from
:func:`~sk_covvae.datasets.make_difference_stamps` instead, so that it always
runs.
"""

# %%
# Read the packets
# ----------------
# ``read_alerts`` returns the cutouts as one array (alerts, 3, 63, 63), NaN
# where a cutout is missing or padded, and a table with one row per alert.
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.pipeline import Pipeline

from sk_covvae import CovarianceVAE
from sk_covvae.preprocessing import StampPreprocessor

try:
    here = Path(__file__).resolve().parent
except NameError:  # sphinx-gallery runs the cells without __file__
    here = Path.cwd()
archive = next(
    (
        p / "shared" / "data" / "ztf_alert_archive"
        for p in (here.parent.parent, here.parent, Path.cwd().parent)
        if (p / "shared" / "data" / "ztf_alert_archive").is_dir()
    ),
    None,
)
try:
    from sk_covvae.datasets import read_alerts

    alerts = None if archive is None else read_alerts(archive)
except ImportError as exc:  # the astro extra (fastavro, astropy) is missing
    print(exc)
    alerts = None

if alerts is not None:
    images = alerts.images
    labels = [f"rb {v:.2f}" for v in alerts.frame["rb"]]
    print(alerts.frame[["alert_id", "object_id", "band", "rb", "padded"]].head())
    print(f"{len(images)} alerts; {alerts.frame['padded'].sum()} padded at an edge")
else:
    from sk_covvae.datasets import make_difference_stamps

    print("ZTF packets not found: simulated triplets instead")
    sim = make_difference_stamps(500, random_state=0)
    images = np.stack([sim.science, sim.template, sim.difference], axis=1)
    labels = list(sim.artefact_type)
n = len(images)
C, H, W = images.shape[1:]
X = images.reshape(n, -1)
print("stamps with missing pixels:", int((~np.isfinite(X)).any(axis=1).sum()))

# %%
# A pipeline from cutouts to scores
# ---------------------------------
# The preprocessor keeps the central 21x21 pixels of the three channels and
# fills missing pixels with 0; the VAE standardizes each channel on its own
# (science and template are in counts above the sky, the difference is not)
# and gives each channel its own banded covariance. The first 400 alerts
# train it; the others are new to it.
pipe = Pipeline(
    [
        ("stamps", StampPreprocessor((C, H, W), crop=(21, 21))),
        (
            "vae",
            CovarianceVAE(
                n_components=8,
                image_shape=(3, 21, 21),
                max_epochs=15,
                batch_size=32,
                random_state=0,
            ),
        ),
    ]
)
train, new = np.arange(400), np.arange(400, n)
pipe.fit(X[train])
vae = pipe.named_steps["vae"]
print("offset_ per channel:", vae.offset_.round(1))
print("scale_ per channel: ", vae.scale_.round(1))
print("active latent dimensions:", vae.n_active_components_)

# %%
# Rank the new alerts
# -------------------
# ``anomaly_score`` is higher for stamps the model finds unusual (here minus
# the ELBO, in nats per stamp). The most typical new alerts come first, the
# most unusual last: these are the ones a scientist would look at.
Xt = pipe.named_steps["stamps"].transform(X[new])
score = vae.anomaly_score(Xt)
order = np.argsort(score)
shown = np.concatenate([order[:4], order[-4:]])
stamps = Xt.reshape(-1, 3, 21, 21)
fig, axes = plt.subplots(3, len(shown), figsize=(1.15 * len(shown), 3.9))
for col, i in enumerate(shown):
    for row, name in enumerate(("science", "template", "difference")):
        image = stamps[i, row]
        lo, hi = np.percentile(image, [1, 99.5])
        axes[row, col].imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
        if col == 0:
            axes[row, col].set_ylabel(name, fontsize=8)
    kind = "typical" if col < 4 else "unusual"
    axes[0, col].set_title(f"{kind}\n{score[i]:.0f}\n{labels[new[i]]}", fontsize=7)
fig.suptitle("New alerts, most typical (left) to most unusual (right)", fontsize=9)
fig.tight_layout()

# %%
# The same numbers come from ``covvae score MODEL ALERTS --out scores.parquet``
# on a broker's files, after ``joblib.dump(pipe, MODEL)``; see the *Scaling
# out* page.
plt.show()
