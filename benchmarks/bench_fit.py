"""Sections ``training`` and ``wrapper``: the cost of fitting.

``training`` times one optimisation step of each covariance structure;
``wrapper`` times ``CovarianceVAE.fit`` against a plain PyTorch loop that
does the same work on the same module.
"""

import math

import numpy as np
import torch

from benchmarks.common import (
    ESTIMATOR,
    best_ratio,
    make_module,
    row,
    time_alternating,
)
from sk_covvae import CovarianceVAE
from sk_covvae._net import negative_elbo


def _train_step_fn(module, x):
    optimizer = torch.optim.Adam(module.parameters(), lr=ESTIMATOR["lr"])
    images = module.images(x)

    def step():
        optimizer.zero_grad()
        mu, logvar, px = module(x)
        loss = negative_elbo(mu, logvar, px, images).mean()
        loss.backward()
        optimizer.step()
        return loss

    return step


def bench_training(config, device):
    """Images/s of one optimisation step for the three covariance structures."""
    side, batch = config.train_size, config.train_batch
    torch.manual_seed(0)
    x = torch.randn(batch, side * side, device=device)
    steps = {
        cov: _train_step_fn(make_module((side, side), cov, device), x)
        for cov in ("banded", "diagonal", "spherical")
    }
    t = time_alternating(
        steps, repeats=config.train_repeats, warmup=config.warmup, device=device
    )
    rate = {cov: batch / t[cov]["median_s"] for cov in steps}
    ratio_bd = t["banded"]["median_s"] / t["diagonal"]["median_s"]
    ratio_sd = t["spherical"]["median_s"] / t["diagonal"]["median_s"]
    tag = f"{side}x{side} b{batch}"
    return {
        "note": (
            "One step = forward + negative ELBO + backward + Adam step, same "
            f"VAEModule (channels {tuple(ESTIMATOR['channels'])}, hidden "
            f"{ESTIMATOR['hidden_units']}, n_components {ESTIMATOR['n_components']});"
            " measured and reference are images/s."
        ),
        "timings": t,
        "rows": [
            row(
                f"train step {tag}: banded vs diagonal",
                rate["banded"],
                rate["diagonal"],
                "img/s",
                ratio_bd,
                "time ratio",
                "<= 1.10",
                ratio_bd <= 1.10,
                ratio_best=best_ratio(t, "banded", "diagonal"),
            ),
            row(
                f"train step {tag}: spherical vs diagonal",
                rate["spherical"],
                rate["diagonal"],
                "img/s",
                ratio_sd,
                "time ratio",
                ratio_best=best_ratio(t, "spherical", "diagonal"),
            ),
        ],
    }


def _plain_fit(X, image_shape, epochs, batch, device, valid=None, seed=0):
    """Reference training loop: manual batching over a tensor, Adam, same module.

    Logs the epoch loss (``loss.item()`` per batch) as a typical loop does;
    with ``valid`` also computes the validation loss after every epoch.
    """
    torch.manual_seed(seed)
    module = make_module(image_shape, "banded", device)
    optimizer = torch.optim.Adam(module.parameters(), lr=ESTIMATOR["lr"])
    X = X.to(device)
    n = X.shape[0]
    for _ in range(epochs):
        module.train()
        perm = torch.randperm(n, device=device)
        total = 0.0
        for start in range(0, n, batch):
            xb = X[perm[start : start + batch]]
            optimizer.zero_grad()
            mu, logvar, px = module(xb)
            loss = negative_elbo(mu, logvar, px, module.images(xb)).mean()
            loss.backward()
            optimizer.step()
            total += loss.item() * xb.shape[0]
        if valid is not None:
            module.eval()
            with torch.no_grad():
                for start in range(0, valid.shape[0], batch):
                    vb = valid[start : start + batch].to(device)
                    mu, logvar, px = module(vb)
                    total += negative_elbo(mu, logvar, px, module.images(vb)).sum()
    return module


def bench_wrapper(config, device):
    """CovarianceVAE.fit per epoch vs a plain PyTorch loop doing the same work."""
    n, epochs, batch = config.fit_n_samples, config.fit_epochs, config.fit_batch
    side = config.train_size
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n, side * side)).astype(np.float32)
    Xt = torch.from_numpy((X - X.mean()) / X.std())
    validation = ESTIMATOR["validation_fraction"]
    # skorch's ValidSplit rounds the validation share up, as ShuffleSplit does
    n_valid = math.ceil(validation * n)
    train_t, valid_t = Xt[n_valid:], Xt[:n_valid]
    dev = str(device)

    fitted = []

    def fit_none():
        fitted.append(
            CovarianceVAE(
                max_epochs=epochs,
                batch_size=batch,
                validation_fraction=None,
                patience=None,
                device=dev,
                random_state=0,
            ).fit(X)
        )

    def fit_default():
        CovarianceVAE(
            max_epochs=epochs, batch_size=batch, device=dev, random_state=0
        ).fit(X)

    fns = {
        "fit_no_validation": fit_none,
        "plain_no_validation": lambda: _plain_fit(
            Xt, (side, side), epochs, batch, device
        ),
        "fit_default": fit_default,
        "plain_with_validation": lambda: _plain_fit(
            train_t, (side, side), epochs, batch, device, valid=valid_t
        ),
    }
    # One-time costs (lazy imports, first allocations) on a tiny fit of each kind.
    CovarianceVAE(
        max_epochs=1,
        batch_size=batch,
        validation_fraction=None,
        patience=None,
        device=dev,
    ).fit(X[: 2 * batch])
    _plain_fit(Xt[: 2 * batch], (side, side), 1, batch, device)
    t = time_alternating(fns, repeats=config.fit_repeats, warmup=0, device=device)
    # skorch's own per-epoch durations (set-up excluded).
    est = fitted[-1]
    skorch_epoch = float(np.median(est.net_.history[:, "dur"]))
    per = {k: v["median_s"] / epochs for k, v in t.items()}
    r_none = per["fit_no_validation"] / per["plain_no_validation"]
    r_def = per["fit_default"] / per["plain_with_validation"]
    tag = f"n={n} {side}x{side} b{batch}"
    return {
        "note": (
            "Per-epoch time = wall time of the whole fit / max_epochs (set-up "
            "included on both sides). Main line: CovarianceVAE(validation_fraction="
            "None, patience=None) vs a plain loop (randperm + tensor indexing, Adam, "
            "same VAEModule, data, batch size and epochs, loss.item() per batch). "
            f"Second line: CovarianceVAE defaults (validation_fraction={validation}"
            f", patience={ESTIMATOR['patience']}, never triggered in so few epochs) "
            f"vs the plain loop on the same {100 - 100 * validation:.0f}/"
            f"{100 * validation:.0f} split with a validation pass per epoch."
        ),
        "timings": t,
        "skorch_history_epoch_s": skorch_epoch,
        "rows": [
            row(
                f"fit epoch {tag}, no validation",
                per["fit_no_validation"],
                per["plain_no_validation"],
                "s/epoch",
                r_none,
                "time ratio",
                "<= 1.05",
                r_none <= 1.05,
                ratio_best=best_ratio(t, "fit_no_validation", "plain_no_validation"),
            ),
            row(
                f"fit epoch {tag}, defaults ({validation:.0%} validation)",
                per["fit_default"],
                per["plain_with_validation"],
                "s/epoch",
                r_def,
                "time ratio",
                "<= 1.05",
                r_def <= 1.05,
                ratio_best=best_ratio(t, "fit_default", "plain_with_validation"),
            ),
        ],
    }
