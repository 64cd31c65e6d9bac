"""Training-stage study: does each decoder learn the stamps' sources?

Fits ``CovarianceVAE`` with several training schedules on simulated stamps
(or Fashion-MNIST, or the real ZTF triplets) and prints, per model, on
held-out images: active latent dimensions, the median KL per latent
dimension, the Spearman correlation between the central flux of the decoder
mean and of the data, and the median and mean ELBO.

Run ``python scripts/study_training.py --help``; ``--table A.json B.json``
prints the Markdown table of saved runs (as in the user guide).
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from sk_covvae import CovarianceVAE


def central_flux(X, image_shape, half=2):
    H, W = image_shape[-2:]
    imgs = X.reshape(len(X), -1, H, W)
    r, c = H // 2, W // 2
    return imgs[:, -1, r - half : r + half + 1, c - half : c + half + 1].sum((1, 2))


def load(name, n, seed):
    if name == "stamps":
        from sk_covvae.datasets import make_difference_stamps

        b = make_difference_stamps(n, random_state=seed)
        return b.data.astype(np.float32), b.image_shape, b.target
    if name == "fashion-mnist":
        from sk_covvae.datasets import load_fashion_mnist

        b = load_fashion_mnist()
        idx = np.random.default_rng(seed).choice(len(b.target), n, replace=False)
        return b.data[idx].astype(np.float32), b.image_shape, b.target[idx]
    if name == "ztf":
        # The difference cutouts of the real ZTF triplets, the central 21x21
        # pixels (as brokers crop them), stamps with a NaN there left out.
        path = Path(__file__).resolve().parents[2] / "shared/data/ztf_triplets"
        d = np.load(path / "ztf_triplets.npz")
        X = d["X"][:, 2, 21:42, 21:42]
        keep = np.isfinite(X).all((1, 2))
        X = X[keep].reshape(keep.sum(), -1)
        order = np.random.default_rng(seed).permutation(len(X))[:n]
        return X[order].astype(np.float32), (21, 21), d["drb"][keep][order]
    raise ValueError(name)


def measure(model, X_test, image_shape):
    Z = model.transform(X_test)
    means = model.inverse_transform(Z)
    rho = spearmanr(central_flux(means, image_shape), central_flux(X_test, image_shape))
    mse = float(np.median(np.mean((means - X_test) ** 2, axis=1)))
    a = X_test - X_test.mean(1, keepdims=True)
    b = means - means.mean(1, keepdims=True)
    r = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-300)
    elbo = model.score_samples(X_test)
    module = model.net_.module_.eval()
    with torch.no_grad():
        Xt = torch.as_tensor(
            (X_test - model.offset_) / model.scale_, dtype=torch.float32
        )
        mu, logvar = (t.numpy().astype(np.float64) for t in module.encode(Xt))
    q25, q75 = np.percentile(mu, [25, 75], axis=0)
    spread = ((q75 - q25) / 1.349) ** 2
    snr = spread / np.median(np.exp(logvar), axis=0)
    return {
        "activity_iqr": [round(float(v), 4) for v in spread],
        "activity_snr": [round(float(v), 4) for v in snr],
        "n_active": int(model.n_active_components_),
        "kl_median": float(np.median(model.kl_per_component_)),
        "kl_total": float(np.sum(model.kl_per_component_)),
        "spearman_centre": float(rho.statistic),
        "median_mse": mse,
        "mean_r": float(np.median(r)),
        "median_elbo": float(np.median(elbo)),
        "mean_elbo": float(np.mean(elbo)),
    }


def table(paths):
    """Markdown table of the runs saved with ``--json``."""
    print(
        "| data | stretch | covariance | schedule | epochs | active | centre flux ρ "
        "| mean r | median MSE | median ELBO | mean ELBO |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        args = saved["args"]
        for r in saved["rows"]:
            print(
                f"| {args['dataset']}"
                f"{' without saturated stars' if args.get('drop_saturated') else ''}"
                f" | {args.get('stretch') or 'default (5)'} "
                f"| {r['covariance']} | {r['schedule']} | {r['epochs']} "
                f"| {r['n_active']} | {r['spearman_centre']:.2f} "
                f"| {r.get('mean_r', float('nan')):.2f} | {r['median_mse']:.3g} "
                f"| {r['median_elbo']:.0f} | {r['mean_elbo']:.4g} |"
            )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--table", nargs="+", metavar="JSON", default=None)
    p.add_argument("--dataset", default="stamps")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--covariance", nargs="+", default=["spherical", "diagonal", "banded"]
    )
    p.add_argument(
        "--schedules", nargs="+", default=["0:joint", "30:joint", "30:frozen"]
    )
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--n-components", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-scale", type=float, default=None)
    p.add_argument("--stretch", default=None, help="a number, or 'none'")
    p.add_argument("--drop-saturated", action="store_true")
    a = p.parse_args()
    if a.table:
        return table(a.table)
    torch.set_num_threads(a.threads)
    X, image_shape, _ = load(a.dataset, a.n + a.n_test, a.seed)
    if a.drop_saturated:
        X = X[np.abs(X).max(1) < 1000]
    extra = {} if a.max_scale is None else {"max_scale": a.max_scale}
    if a.stretch is not None:
        extra["stretch"] = None if a.stretch == "none" else float(a.stretch)
    X_train, X_test = X[: a.n], X[a.n :]
    rows = []
    for cov in a.covariance:
        for sched in a.schedules if cov != "spherical" else ["0:joint"]:
            m, kind = sched.split(":")
            tic = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = CovarianceVAE(
                    a.n_components,
                    covariance=cov,
                    image_shape=tuple(image_shape),
                    max_epochs=a.max_epochs,
                    mean_epochs=int(m),
                    freeze_mean=kind == "frozen",
                    batch_size=a.batch_size,
                    patience=a.patience,
                    random_state=a.seed,
                    **extra,
                ).fit(X_train)
            row = {
                "covariance": cov,
                "schedule": sched,
                "epochs": model.n_epochs_,
                "fit_s": round(time.perf_counter() - tic, 1),
                "collapse_warning": any(
                    w.category.__name__ == "LatentCollapseWarning" for w in caught
                ),
                **measure(model, X_test, image_shape),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
