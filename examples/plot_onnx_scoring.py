"""
==========================================
Scoring alerts with onnxruntime, no torch
==========================================

A broker's workers (Fink's anomaly module, a Rust consumer, a Kafka client
on a small machine) rarely have PyTorch. :meth:`CovarianceVAE.export_onnx
<sk_covvae.CovarianceVAE.export_onnx>` writes a fitted model's
:meth:`~sk_covvae.CovarianceVAE.score_samples` (or
:meth:`~sk_covvae.CovarianceVAE.transform`) as one ONNX graph that takes the
raw stamps: the standardization, the asinh stretch, the encoder, the decoder
and the exact log-density of its banded Gaussian are all inside, so the
worker needs only ``onnxruntime`` and ``numpy`` (plus ``fastavro`` and
``astropy`` to open alert packets).

Here a small model is fitted on the difference cutouts of the shipped ZTF
triplets (``../shared/data``), exported, and the shipped ZTF alert packets
are scored by code that imports no torch. Without the shared data folder the
model is fitted on simulated stamps and scores simulated stamps instead.
"""

# %%
# Fit and export (the torch side)
# -------------------------------
# Difference cutouts, the central 21x21 pixels, in the survey's units.
# The training is tiny (a few epochs) to keep the example fast.
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from sk_covvae import CovarianceVAE
from sk_covvae.datasets import make_difference_stamps

torch.set_num_threads(1)  # tiny networks: one thread is fastest

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
triplets = None if shared is None else shared / "ztf_triplets" / "ztf_triplets.npz"
alert_folder = None if shared is None else shared / "ztf_alerts"
real_data = triplets is not None and triplets.is_file() and alert_folder.is_dir()

if real_data:
    with np.load(triplets) as f:
        cutouts = f["X"][:, 2, 21:42, 21:42]  # channel 2: the difference
    X_train = cutouts.reshape(len(cutouts), -1)
    X_train = X_train[np.isfinite(X_train).all(1)]
else:
    print("shared data not found: fitting and scoring simulated stamps")
    X_train = make_difference_stamps(1500, random_state=0).data
print("training stamps:", X_train.shape)

vae = CovarianceVAE(
    n_components=4,
    covariance="banded",
    max_epochs=3,
    channels=(8, 16),
    hidden_units=64,
    device="cpu",
    random_state=0,
).fit(X_train)

workdir = tempfile.TemporaryDirectory()  # removed at the end
folder = Path(workdir.name)
model_path = vae.export_onnx(folder / "covvae_score.onnx")
print(f"wrote {model_path.name}: {model_path.stat().st_size / 1e3:.0f} kB")

# %%
# Score alert packets with onnxruntime alone
# ------------------------------------------
# Nothing in this cell uses torch or sk_covvae: it is what a worker runs.
# Each packet carries a gzip-compressed FITS difference cutout, normally
# 63x63 pixels centred on the candidate; the graph takes the central 21x21,
# flattened row-major, in float32. Cutouts clipped at the CCD edge are left
# out here (``sk_covvae.datasets.read_alert_cutouts`` recovers the centre
# from the candidate's position), and masked pixels are set to 0, the
# difference image's background.
import gzip  # noqa: E402
import io  # noqa: E402
import warnings  # noqa: E402

import onnxruntime  # noqa: E402


def read_difference_stamps(files, size=21):
    """Central ``size`` x ``size`` difference stamps of ZTF alert packets."""
    import fastavro
    from astropy.io import fits

    ids, stamps, skipped = [], [], 0
    for file in files:
        with open(file, "rb") as fh:
            for alert in fastavro.reader(fh):
                data = gzip.decompress(alert["cutoutDifference"]["stampData"])
                with warnings.catch_warnings():  # ZTF's FITS headers are loose
                    warnings.simplefilter("ignore", fits.verify.VerifyWarning)
                    with fits.open(io.BytesIO(data)) as hdus:
                        image = np.asarray(hdus[0].data, dtype=np.float32)
                if image.shape != (63, 63):
                    skipped += 1
                    continue
                lo = (63 - size) // 2
                stamp = np.nan_to_num(image[lo : lo + size, lo : lo + size], nan=0.0)
                ids.append(f"{alert['objectId']} {alert['candid']}")
                stamps.append(stamp.ravel())
    return ids, np.array(stamps, dtype=np.float32), skipped


session = onnxruntime.InferenceSession(
    str(model_path), providers=["CPUExecutionProvider"]
)
if real_data:
    ids, stamps, skipped = read_difference_stamps(sorted(alert_folder.glob("*.avro")))
    print(f"{len(stamps)} alerts scored, {skipped} clipped at the CCD edge left out")
else:
    stamps = make_difference_stamps(12, random_state=1).data
    ids = [f"simulated {i}" for i in range(len(stamps))]
scores = session.run(None, {"X": stamps})[0]  # log p(x), nats; higher = typical
for name, score in sorted(zip(ids, scores), key=lambda t: t[1]):
    print(f"{name:>32}  {score:10.1f}")

# %%
# The same numbers as the estimator
# ---------------------------------
# Up to float32 rounding of the network's layers.
reference = vae.score_samples(stamps)
print(
    "largest relative difference:",
    np.max(np.abs(scores - reference) / np.abs(reference)),
)

# %%
# And in a process that never imports torch
# -----------------------------------------
# The stamps go to a fresh interpreter that loads only numpy and
# onnxruntime, scores them and confirms that torch was not loaded.
np.save(folder / "stamps.npy", stamps)
worker = """
import sys, numpy, onnxruntime
model, stamps = sys.argv[1:]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
scores = session.run(None, {"X": numpy.load(stamps)})[0]
numpy.save(stamps + ".scores.npy", scores)
print("torch loaded:", "torch" in sys.modules)
"""
done = subprocess.run(
    [sys.executable, "-c", worker, str(model_path), str(folder / "stamps.npy")],
    capture_output=True,
    text=True,
    check=True,
)
print(done.stdout.strip())
same = np.allclose(np.load(folder / "stamps.npy.scores.npy"), scores, rtol=1e-7)
print("same scores:", same)

# %%
# The most and least typical stamps
# ---------------------------------
order = np.argsort(scores)
show = np.concatenate([order[:4], order[-4:]])
fig, axes = plt.subplots(1, len(show), figsize=(1.3 * len(show), 1.8))
for ax, i in zip(axes, show):
    image = stamps[i].reshape(21, 21)
    lo, hi = np.percentile(image, [1, 99.5])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
    ax.set_title(f"{scores[i]:.0f}", fontsize=8)
    ax.set_axis_off()
fig.suptitle("ONNX log p(x) [nats]: least typical (left) to most typical", fontsize=9)
fig.tight_layout()
plt.show()
workdir.cleanup()
