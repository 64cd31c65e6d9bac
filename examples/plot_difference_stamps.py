"""
=====================================================
Simulated real/bogus difference stamps and real data
=====================================================

:func:`sk_covvae.datasets.make_difference_stamps` simulates what a HiTS-like
difference-imaging pipeline cuts out around each candidate: a template, a
science image and their PSF-matched difference, 21x21 pixels at 0.27"/pixel.
Real candidates are point-source transients; bogus ones come from one
generator per artefact type. This example shows a few stamps of each kind,
the correlated noise of the difference images, and, when the shared data
folder ``../shared/data`` is present, real HiTS supernova science stamps and
ZTF alert cutouts for comparison.
"""

# %%
# Simulate stamps
# ---------------
# One call returns a :class:`~sklearn.utils.Bunch` holding the images, the
# labels, the artefact type of every bogus stamp and the simulation
# parameters (seeing, sky, signal-to-noise).
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from sk_covvae.datasets import ARTEFACT_TYPES, make_difference_stamps

stamps = make_difference_stamps(2000, random_state=0)
print(stamps.data.shape, "real fraction:", stamps.target.mean())
for name in ("real", *ARTEFACT_TYPES):
    mask = stamps.artefact_type == name
    median_snr = np.median(stamps.snr[mask])
    print(f"{name:>15}: {mask.sum():4d} stamps, median SNR {median_snr:7.1f}")

# %%
# Template, science and difference of each kind of candidate
# ----------------------------------------------------------
# Rows: real candidates, then one row per artefact type. Columns: template
# (resampled to the science grid), science, difference, and the difference
# divided by its noise (the ``data`` the classifiers see).
kinds = ("real", *ARTEFACT_TYPES)
fig, axes = plt.subplots(len(kinds), 4, figsize=(6.4, 1.55 * len(kinds)))
for row, name in enumerate(kinds):
    i = np.flatnonzero(stamps.artefact_type == name)[0]
    images = (
        stamps.template[i],
        stamps.science[i],
        stamps.difference[i],
        stamps.data[i].reshape(stamps.image_shape),
    )
    for col, image in enumerate(images):
        ax = axes[row, col]
        lo, hi = np.percentile(image, [1, 99.5])
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
for col, title in enumerate(("template", "science", "difference", "data")):
    axes[0, col].set_title(title, fontsize=9)
fig.tight_layout()

# %%
# Several stamps per artefact type
# --------------------------------
n_show = 6
fig, axes = plt.subplots(len(kinds), n_show, figsize=(1.1 * n_show, 1.1 * len(kinds)))
for row, name in enumerate(kinds):
    idx = np.flatnonzero(stamps.artefact_type == name)[:n_show]
    for col, i in enumerate(idx):
        ax = axes[row, col]
        ax.imshow(
            stamps.data[i].reshape(stamps.image_shape),
            cmap="RdBu_r",
            vmin=-8,
            vmax=8,
            origin="lower",
        )
        ax.set_xticks([])
        ax.set_yticks([])
    axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
fig.suptitle("difference / noise sigma (colour range +-8)", fontsize=9)
fig.tight_layout()

# %%
# Correlated noise in the difference images
# -----------------------------------------
# PSF matching convolves the sharper image with a kernel and the template is
# resampled to the science grid, so neighbouring background pixels of the
# difference image are positively correlated: this is the structure a
# banded-precision decoder can model and a white-noise decoder cannot.
quiet = (stamps.artefact_type == "real") & ~stamps.has_host
background = stamps.data[quiet].reshape(-1, *stamps.image_shape)[:, :5, :]
background = background - background.mean(axis=(1, 2), keepdims=True)
lags = np.arange(5)
corr = [
    (background[:, :, : 21 - k] * background[:, :, k:]).mean() / background.var()
    for k in lags
]
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot(lags, corr, "o-")
ax.axhline(0, color="0.7", lw=0.8)
ax.set_xlabel("horizontal lag [pixels]")
ax.set_ylabel("noise autocorrelation")
ax.set_title("background of simulated difference stamps", fontsize=9)
fig.tight_layout()

# %%
# Real stamps, when the shared data folder is present
# ---------------------------------------------------
# HiTS supernova science stamps (science frames, not differences) and ZTF
# alert cutouts. Nothing here is needed by the package: this cell is skipped
# when ``../shared/data`` is absent (or when fastavro/astropy are missing for
# the ZTF packets).
try:
    here = Path(__file__).resolve().parent
except NameError:  # sphinx-gallery runs the cells without __file__
    here = Path.cwd()
shared = next(
    (
        p / "shared" / "data"
        for p in (here.parent.parent, here.parent, Path.cwd().parent)
        if (p / "shared" / "data").is_dir()
    ),
    None,
)
hits_file = (
    None if shared is None else shared / "hits" / "hits2015_sn_science_stamps.npz"
)
if hits_file is not None and hits_file.is_file():
    with np.load(hits_file) as f:
        sn = f["images"][:8, 12]  # epoch 12 of the first 8 supernovae
        ids = f["ids"][:8]
    fig, axes = plt.subplots(1, 8, figsize=(9, 1.5))
    for ax, image, name in zip(axes, sn, ids):
        lo, hi = np.percentile(image, [1, 99.5])
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.set_title(name, fontsize=7)
        ax.set_axis_off()
    fig.suptitle("HiTS 2015 supernovae (science frames)", fontsize=9)
    fig.tight_layout()
else:
    print("HiTS stamps not found: showing simulated stamps only")

if shared is not None and (shared / "ztf_alerts").is_dir():
    try:
        from sk_covvae.datasets import read_alert_cutouts

        alerts = read_alert_cutouts(shared / "ztf_alerts")
    except ImportError as exc:
        print(exc)
    else:
        n = min(8, len(alerts.data))
        fig, axes = plt.subplots(2, n, figsize=(9, 2.6))
        for j in range(n):
            for row, image in enumerate((alerts.science[j], alerts.difference[j])):
                ax = axes[row, j]
                lo, hi = np.nanpercentile(image, [1, 99.5])
                ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
                ax.set_axis_off()
            axes[0, j].set_title(f"rb={alerts.rb[j]:.2f}", fontsize=7)
        fig.suptitle(
            "ZTF alert cutouts: science (top), difference (bottom)", fontsize=9
        )
        fig.tight_layout()
else:
    print("ZTF alert packets not found: showing simulated stamps only")

plt.show()
