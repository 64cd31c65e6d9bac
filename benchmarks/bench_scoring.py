"""Section ``scoring``: reading alerts and ``score_alerts`` vs the model alone.

Four rates on the same ZTF alerts (the shipped ``ztf_alert_archive``, one
alert per file, and the same packets written into one multi-alert Avro
file): reading only (:func:`~sk_covvae.datasets.iter_alerts`), and the whole
job (:func:`~sk_covvae.scoring.score_alerts`: read, preprocess, score, write
Parquet), each against the model-only rate (the pipeline's
``score_samples`` on the same stamps, already in memory), timed in
alternation in the same run. Target (issue 12): end to end at least half
the model-only rate for alerts in multi-alert files. A last line gives the
model alone on one torch thread: what the job leaves the model on a CPU
while its reader thread reads (``torch_threads='auto'``: all cores but one).
"""

import os
import tempfile
import warnings
from pathlib import Path

import joblib
import numpy as np
import torch

from benchmarks.common import ESTIMATOR, best_ratio, row, time_alternating

#: Where the shipped alert packets are (beside the repository).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: End to end over model-only, for alerts in multi-alert files.
TARGET_END_TO_END_RATIO = 0.5
#: Stamp crop the model reads (the difference plane's centre, ZTF's 63x63).
CROP = 21
#: Per configuration: packets read (None: all), copies of them in the
#: multi-alert file, timed repeats, and whether the model is the default one.
_SIZES = {
    "tiny": dict(n_files=12, copies=1, repeats=1, default_model=False),
    "quick": dict(n_files=None, copies=8, repeats=2, default_model=True),
    "full": dict(n_files=None, copies=16, repeats=5, default_model=True),
}
#: ``torch_threads`` of the end-to-end lines: as ``covvae score`` runs it.
JOB_TORCH_THREADS = "auto"


def archive_files(n_files=None):
    """The shipped one-alert ZTF packets, sorted; [] when they are absent."""
    folder = SHARED_DATA / "ztf_alert_archive"
    files = sorted(folder.glob("*.avro")) if folder.is_dir() else []
    return files[:n_files] if n_files else files


def available():
    """Whether the shipped alert packets are there."""
    return bool(archive_files())


def write_multi_alert_file(files, path, copies=1):
    """One Avro container file holding the alerts of ``files``, ``copies`` times.

    The packets of the archive share one writer schema; the file gets the
    first one's. Returns the number of alerts written.
    """
    import fastavro

    records, schema = [], None
    for f in files:
        with open(f, "rb") as fh:
            reader = fastavro.reader(fh)
            schema = schema or reader.writer_schema
            records.extend(reader)
    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records * copies)
    return len(records) * copies


def make_model(path, default_model=True, seed=0):
    """A pipeline (difference-plane crop, CovarianceVAE) saved with joblib.

    ``CovarianceVAE()``'s defaults (speed does not depend on the weights:
    one epoch), or a tiny network for the smoke test.
    """
    from sklearn.pipeline import Pipeline

    from sk_covvae import CovarianceVAE
    from sk_covvae.preprocessing import StampPreprocessor

    rng = np.random.RandomState(seed)
    X = rng.normal(size=(256, 3 * 63 * 63)).astype(np.float32)
    params = dict(max_epochs=1, validation_fraction=None, patience=None)
    if not default_model:
        params.update(n_components=2, channels=(4, 8), hidden_units=16)
    pipe = Pipeline(
        [
            (
                "prep",
                StampPreprocessor(
                    (3, 63, 63), crop=(CROP, CROP), channels=[2], normalize="l2"
                ),
            ),
            ("vae", CovarianceVAE(device="cpu", random_state=seed, **params)),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one epoch on noise: collapse warnings
        pipe.fit(X)
    joblib.dump(pipe, path)
    return pipe


def bench_scoring(config, device):
    """Read-only and end-to-end alerts/s vs the model-only rate, same stamps."""
    from sk_covvae.datasets import iter_alerts
    from sk_covvae.scoring import score_alerts

    sizes = _SIZES.get(config.name, _SIZES["quick"])
    files = archive_files(sizes["n_files"])
    if not files:
        raise FileNotFoundError(
            f"The scoring benchmark reads the shipped packets of {SHARED_DATA}"
            "/ztf_alert_archive, which are absent."
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        multi = tmp / "multi.avro"
        n_multi = write_multi_alert_file(files, multi, sizes["copies"])
        model_path = tmp / "model.joblib"
        pipe = make_model(model_path, sizes["default_model"])
        X = next(iter_alerts(files, batch_size=len(files), size=63)).images
        # the model scores batches of up to 1000 in the job: the same here
        X = np.tile(X.reshape(len(X), -1), (max(1, 1000 // len(X)), 1))
        n_one = len(files)

        def read(paths, channels=None):
            batches = iter_alerts(paths, size=63, channels=channels)
            return sum(len(b.images) for b in batches)

        def job(paths, name, threads=JOB_TORCH_THREADS):
            score_alerts(
                model_path, paths, tmp / f"{name}.parquet", torch_threads=threads
            )

        def model_one_thread():  # the model on the core the job leaves it
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                pipe.score_samples(X)
            finally:
                torch.set_num_threads(before)

        t = time_alternating(
            {
                "read_one": lambda: read(files),
                "read_multi": lambda: read([multi]),
                "read_multi_diff": lambda: read([multi], ["difference"]),
                "job_one": lambda: job(files, "one"),
                "job_multi": lambda: job([multi], "multi"),
                "job_multi_default": lambda: job([multi], "multi", None),
                "model": lambda: pipe.score_samples(X),
                "model_one_thread": model_one_thread,
            },
            repeats=sizes["repeats"],
            warmup=config.warmup,
            device=device,
        )
    n = {"read_one": n_one, "job_one": n_one, "model": len(X)}
    n["model_one_thread"] = len(X)
    n.update(
        read_multi=n_multi,
        read_multi_diff=n_multi,
        job_multi=n_multi,
        job_multi_default=n_multi,
    )
    rate = {k: n[k] / v["median_s"] for k, v in t.items()}

    def best(name):  # rate ratio of the fastest repeats, per alert
        return (n[name] / n["model"]) * best_ratio(t, "model", name)

    def rate_row(label, name, *target):  # alerts/s of ``name`` vs the model's
        ratio = rate[name] / rate["model"]
        return row(
            label,
            rate[name],
            rate["model"],
            "alerts/s",
            ratio,
            "rate ratio",
            *target,
            ratio_best=best(name),
        )

    vae = ESTIMATOR if sizes["default_model"] else {"n_components": 2}
    tag = f"{n_one} ZTF alerts"
    ratio_multi = rate["job_multi"] / rate["model"]
    return {
        "note": (
            "Measured on the shipped ZTF packets (ztf_alert_archive, "
            f"{n_one} one-alert Avro files) and on one Avro file holding them "
            f"{sizes['copies']} time(s) ({n_multi} alerts). read: iter_alerts "
            "(batches of 1000, 63x63 stamps: Avro decode, gunzip, FITS parse, "
            "stacking), all three cutouts or the difference only. job: "
            "score_alerts with a joblib pipeline "
            f"(StampPreprocessor crop {CROP}x{CROP} of the difference plane, "
            f"l2 norm; CovarianceVAE n_components={vae['n_components']}"
            + (", the estimator's defaults" if sizes["default_model"] else "")
            + "), model file read, reading (the difference cutouts only: "
            "the model reads no other), scoring and Parquet writing "
            f"included, torch_threads={JOB_TORCH_THREADS!r} as covvae score "
            "runs it (torch leaves one core to the reader thread), and once "
            "with torch's threads as they are. Reference: the same "
            f"pipeline's score_samples on {len(X)} stamps in memory (the "
            f"{n_one} tiled), torch threads as set; the last line is the "
            "same on one torch thread, what the job leaves the model while "
            "its reader thread reads. One process; CPUs: "
            f"{os.cpu_count()}."
        ),
        "timings": t,
        "rows": [
            rate_row(f"read one-alert files, {tag}", "read_one"),
            rate_row(f"read one multi-alert file, {n_multi} alerts", "read_multi"),
            rate_row(
                f"read the difference cutouts only, {n_multi} alerts",
                "read_multi_diff",
            ),
            rate_row(f"score_alerts one-alert files, {tag}", "job_one"),
            rate_row(
                f"score_alerts one multi-alert file, {n_multi} alerts",
                "job_multi",
                f">= {TARGET_END_TO_END_RATIO:.2f}",
                ratio_multi >= TARGET_END_TO_END_RATIO,
            ),
            rate_row(
                f"score_alerts, torch threads left as they are, {n_multi} alerts",
                "job_multi_default",
            ),
            rate_row(
                f"model alone on one torch thread, {len(X)} stamps",
                "model_one_thread",
            ),
        ],
    }
