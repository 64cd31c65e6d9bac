"""Benchmark suite of ``sk_covvae``: each figure beside its reference, one run.

Run ``python benchmarks/run.py [--quick] [--device cpu|cuda] [--out FILE.json]``.
It prints a table and writes JSON (default ``benchmarks/results/latest.json``)
with the machine it ran on. Every line of the table shows the measured figure,
its reference measured in the same run, their ratio and the target with
pass/fail; ``benchmarks/README.md`` says what each line measures.

Timings are the median of repeats after warm-up runs (``time.perf_counter``,
with ``torch.cuda.synchronize`` on CUDA). A measurement and its reference are
timed in alternation (A, B, A, B, ...), so that load from other processes
falls on both alike and the ratio stays meaningful on a busy machine.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sk_covvae import CovarianceVAE
from sk_covvae._allocator import OPT_OUT_VARIABLE, maybe_retain_freed_memory
from sk_covvae._modules import VAEModule
from sk_covvae._net import gaussian_kl, negative_elbo
from sk_covvae.distributions import BandedPrecisionNormal, constrain_banded_parameters

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "latest.json"
SECTIONS = ("log_prob", "sampling", "training", "wrapper", "inference", "simulator")

# CovarianceVAE's defaults, repeated here so that the plain-PyTorch references
# build exactly the module that the estimator builds.
_N_COMPONENTS = 50
_CHANNELS = (16, 32)
_HIDDEN_UNITS = 256
_MIN_SCALE, _MAX_SCALE = 1e-3, 10.0
_LOG_DIAG_BOUNDS = (-math.log(_MAX_SCALE), -math.log(_MIN_SCALE))
_RHO = 0.9
_LR = 1e-3
# Set by main(): whether glibc keeps freed blocks (sk_covvae/_allocator.py).
_RETAINED_FREED_MEMORY = False
# FLOPs per pixel of BandedPrecisionNormal.log_prob (see bench_log_prob).
_BANDED_LOG_PROB_FLOPS_PER_PIXEL = 10
# Back-to-back banded calls per timed repeat in the log_prob section.
_LOG_PROB_INNER_CALLS = 20


@dataclasses.dataclass
class Config:
    """Sizes and repeat counts of one benchmark run.

    Parameters
    ----------
    name : str
        'full', 'quick' or 'tiny' (tests).
    logprob_size, logprob_batch : int
        Image side and batch of the log_prob comparison.
    logprob_repeats : int
        Repeats of the log_prob calls.
    construct_repeats : int
        Repeats of the dense construction (a Cholesky per image, slow).
    sampling_batch : int
        Batch of every sampling measurement.
    sampling_dense_sizes, sampling_large_sizes : tuple of int
        Image sides compared with the dense solve, and measured alone.
    sampling_repeats : int
    train_size, train_batch, train_repeats : int
        Image side, batch and repeats of the optimisation-step timing.
    fit_n_samples, fit_epochs, fit_repeats, fit_batch : int
        Data size, epochs, repeats and batch of the wrapper-overhead timing.
    infer_size, infer_n_samples, infer_fit_samples, infer_repeats : int
        Stamp side, stamps scored, stamps the model is fitted on, repeats.
    warmup : int
        Untimed calls before each timing.
    """

    name: str
    logprob_size: int = 28
    logprob_batch: int = 64
    logprob_repeats: int = 31
    construct_repeats: int = 5
    sampling_batch: int = 64
    sampling_dense_sizes: tuple = (21, 28)
    sampling_large_sizes: tuple = (64, 128)
    sampling_repeats: int = 15
    train_size: int = 28
    train_batch: int = 256
    train_repeats: int = 15
    fit_n_samples: int = 10_000
    fit_epochs: int = 2
    fit_repeats: int = 2
    fit_batch: int = 256
    infer_size: int = 21
    infer_n_samples: int = 32_768
    infer_fit_samples: int = 2_048
    infer_repeats: int = 7
    warmup: int = 2


def full_config():
    """Configuration of a full run."""
    return Config(name="full")


def quick_config():
    """Configuration of ``--quick`` (under 2 minutes on 2 CPU cores)."""
    return Config(
        name="quick",
        logprob_repeats=11,
        construct_repeats=1,
        sampling_repeats=5,
        train_repeats=5,
        fit_n_samples=2_048,
        fit_epochs=2,
        fit_repeats=1,
        infer_n_samples=4_096,
        infer_fit_samples=512,
        infer_repeats=3,
        warmup=1,
    )


def tiny_config():
    """A configuration of seconds, for the smoke test (figures meaningless)."""
    return Config(
        name="tiny",
        logprob_size=6,
        logprob_batch=4,
        logprob_repeats=2,
        construct_repeats=1,
        sampling_batch=4,
        sampling_dense_sizes=(5,),
        sampling_large_sizes=(8, 12),
        sampling_repeats=2,
        train_size=8,
        train_batch=16,
        train_repeats=2,
        fit_n_samples=64,
        fit_epochs=1,
        fit_repeats=1,
        fit_batch=16,
        infer_size=8,
        infer_n_samples=256,
        infer_fit_samples=64,
        infer_repeats=1,
        warmup=1,
    )


# ----------------------------------------------------------------- helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns, *, repeats, warmup, device):
    """Median wall time of each callable, timed in alternation.

    Parameters
    ----------
    fns : dict of str to callable
        Functions of no argument.
    repeats, warmup : int
        Timed and untimed calls of each function.
    device : torch.device
        Synchronised around each call when CUDA.

    Returns
    -------
    dict of str to dict
        For each name, ``median_s``, ``min_s``, ``max_s`` and ``n``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        # Rotate the order so that no function always runs first.
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_s": float(np.median(ts)),
            "min_s": float(np.min(ts)),
            "max_s": float(np.max(ts)),
            "n": len(ts),
        }
        for name, ts in times.items()
    }


def peak_memory_bytes(fn, device):
    """Peak bytes allocated by ``fn()`` above what was allocated before it.

    On CUDA from ``torch.cuda.max_memory_allocated``; on CPU by replaying the
    allocation and free events that ``torch.profiler`` records with
    ``profile_memory=True`` in time order (no tracemalloc: torch's CPU
    allocations bypass it). Returns None if the profiler gives no events.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [
            e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        ]
    except AttributeError:
        return None
    if not events:
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def _row(
    name,
    measured,
    reference,
    unit,
    ratio,
    ratio_kind,
    target=None,
    passed=None,
    **extra,
):
    """One line of the table; ``extra`` is kept in the JSON only."""
    return {
        "name": name,
        "measured": measured,
        "reference": reference,
        "unit": unit,
        "ratio": ratio,
        "ratio_kind": ratio_kind,
        "target": target,
        "pass": passed,
        **extra,
    }


def _best(timings, numerator, denominator):
    """Ratio of the fastest repeats, less sensitive to load than the medians."""
    return timings[numerator]["min_s"] / timings[denominator]["min_s"]


def _banded_params(shape, device, seed=0):
    """Constrained random precision parameters and a mean, of ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(4, *shape, generator=gen)
    log_diag, right, down = constrain_banded_parameters(
        raw[0], raw[1], raw[2], log_diag_bounds=_LOG_DIAG_BOUNDS, rho=_RHO
    )
    return [t.to(device) for t in (raw[3], log_diag, right, down)]


def _module(image_shape, covariance, device):
    return VAEModule(
        image_shape,
        _N_COMPONENTS,
        covariance,
        channels=_CHANNELS,
        hidden_units=_HIDDEN_UNITS,
        log_diag_bounds=_LOG_DIAG_BOUNDS,
        rho=_RHO,
    ).to(device)


# ---------------------------------------------------------------- sections
def bench_log_prob(config, device):
    """Structured log_prob vs dense MultivariateNormal(precision_matrix=P)."""
    side, batch = config.logprob_size, config.logprob_batch
    loc, log_diag, right, down = _banded_params((batch, side, side), device)
    x = torch.randn(batch, side, side, generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    banded = BandedPrecisionNormal(loc, log_diag, right, down)
    precision = banded.precision_matrix  # outside every timed region
    loc_flat, x_flat = loc.flatten(-2), x.flatten(-2)
    dense = torch.distributions.MultivariateNormal(loc_flat, precision_matrix=precision)
    max_abs_diff = float((banded.log_prob(x) - dense.log_prob(x_flat)).abs().max())

    # The banded call is ~100x shorter than the dense one: time it as a run
    # of `inner` back-to-back calls (a decoder's steady state) and divide, so
    # that the timer's resolution and the cold caches left by the dense call
    # do not dominate it.
    inner = _LOG_PROB_INNER_CALLS

    def banded_calls():
        for _ in range(inner):
            banded.log_prob(x)

    params = (loc, log_diag, right, down)

    def banded_builds():
        for _ in range(inner):
            BandedPrecisionNormal(*params).log_prob(x)

    call = time_alternating(
        {
            "banded": banded_calls,
            "dense": lambda: dense.log_prob(x_flat),
        },
        repeats=config.logprob_repeats,
        warmup=config.warmup,
        device=device,
    )
    built = time_alternating(
        {
            "banded": banded_builds,
            "dense": lambda: torch.distributions.MultivariateNormal(
                loc_flat, precision_matrix=precision
            ).log_prob(x_flat),
        },
        repeats=config.construct_repeats,
        warmup=1,
        device=device,
    )
    ms = 1e3
    tag = f"{side}x{side} b{batch}"
    for timings in (call, built):
        timings["banded"] = {
            k: v / inner if k.endswith("_s") else v
            for k, v in timings["banded"].items()
        }
        timings["banded"]["inner_calls"] = inner
    b, d = call["banded"]["median_s"], call["dense"]["median_s"]
    bb, db = built["banded"]["median_s"], built["dense"]["median_s"]
    # FLOPs of one call on a batch: the dense log_prob solves a D x D
    # triangular system per image (D^2 multiply-adds = D^2 FLOPs); the
    # banded one does about 10 FLOPs per pixel (subtract, exp, multiply, two
    # multiply-adds, square, two sums). At equal FLOP rates the call-only
    # ratio could reach D / 10 and no more.
    D = side * side
    flop_ceiling = D * D / (_BANDED_LOG_PROB_FLOPS_PER_PIXEL * D)
    return {
        "note": (
            "Dense reference: torch.distributions.MultivariateNormal(loc.flatten(-2),"
            " precision_matrix=P) with P = BandedPrecisionNormal.precision_matrix "
            "computed outside every timed region; both with torch's default "
            "argument validation. 'build + log_prob' builds the distribution "
            "and evaluates it, as a decoder does for every batch (for the dense "
            "one, a Cholesky factorisation per image); 'call only' times "
            "log_prob with both built beforehand, whose ratio is bounded by the "
            "FLOP ratio D^2 / (10 D) = D / 10."
        ),
        "max_abs_diff_nats": max_abs_diff,
        "timings": {"call": call, "construction": built},
        "rows": [
            _row(
                f"log_prob {tag}, build + log_prob",
                bb * ms,
                db * ms,
                "ms",
                db / bb,
                "speed-up",
                ">= 1000x",
                db / bb >= 1000,
                ratio_best=_best(built, "dense", "banded"),
            ),
            _row(
                f"log_prob {tag}, call only",
                b * ms,
                d * ms,
                "ms",
                d / b,
                "speed-up",
                f"ceiling {flop_ceiling:.0f}x (D/10 FLOPs)",
                None,
                ratio_best=_best(call, "dense", "banded"),
                flop_ratio_ceiling=flop_ceiling,
            ),
        ],
    }


def _dense_solve_fits(side, batch, device):
    """Whether a CUDA device has room for a dense solve (factor, copy, work)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return 4 * batch * (side * side) ** 2 * 4 < 0.5 * free


def bench_sampling(config, device):
    """Structured rsample vs dense triangular solve; structured alone when large."""
    batch = config.sampling_batch
    rows, details = [], {}
    # On a GPU with room for it, the dense solve is also timed at the large
    # sizes, to show where the structured solver overtakes it there.
    extra = tuple(
        side
        for side in config.sampling_large_sizes
        if _dense_solve_fits(side, batch, device)
    )
    for side in config.sampling_dense_sizes + extra:
        D = side * side
        loc, log_diag, right, down = _banded_params((batch, side, side), device)
        dist = BandedPrecisionNormal(loc, log_diag, right, down)
        upper = dist.precision_factor.mT.contiguous()  # L^T, outside the timing
        loc_flat = loc.reshape(batch, D, 1)

        def dense_sample(upper=upper, loc_flat=loc_flat, D=D):
            eps = torch.randn(batch, D, 1, device=device)
            return loc_flat + torch.linalg.solve_triangular(upper, eps, upper=True)

        t = time_alternating(
            {"banded": dist.rsample, "dense": dense_sample},
            repeats=config.sampling_repeats,
            warmup=config.warmup,
            device=device,
        )
        mem_b = peak_memory_bytes(dist.rsample, device)
        mem_d = peak_memory_bytes(dense_sample, device)
        b, d = t["banded"]["median_s"], t["dense"]["median_s"]
        is_target = side == 28
        rows.append(
            _row(
                f"rsample {side}x{side} b{batch} vs dense solve_triangular",
                b * 1e3,
                d * 1e3,
                "ms",
                d / b,
                "speed-up",
                ">= 1x (not slower)" if is_target else None,
                (d / b >= 1.0) if is_target else None,
                ratio_best=_best(t, "dense", "banded"),
            )
        )
        details[f"{side}x{side}"] = {
            "timings": t,
            "peak_bytes_banded": mem_b,
            "peak_bytes_dense_solve": mem_d,
            "bytes_dense_factor": batch * D * D * 4,
        }
    per_pixel = {}
    for side in config.sampling_large_sizes:
        loc, log_diag, right, down = _banded_params((batch, side, side), device)
        dist = BandedPrecisionNormal(loc, log_diag, right, down)
        t = time_alternating(
            {"banded": dist.rsample},
            repeats=config.sampling_repeats,
            warmup=config.warmup,
            device=device,
        )
        mem = peak_memory_bytes(dist.rsample, device)
        pixels = batch * side * side
        per_pixel[side] = None if mem is None else mem / pixels
        details.setdefault(f"{side}x{side}", {}).update(
            {"timings_alone": t, "peak_bytes_banded": mem}
        )
        dense_bytes = batch * (side * side) ** 2 * 4
        rows.append(
            _row(
                f"rsample {side}x{side} b{batch}, time (dense factor alone: "
                f"{dense_bytes / 2**30:.1f} GiB)",
                t["banded"]["median_s"] * 1e3,
                None,
                "ms",
                None,
                "",
                ns_per_pixel=t["banded"]["median_s"] / pixels * 1e9,
            )
        )
        rows.append(
            _row(
                f"rsample {side}x{side} b{batch}, peak memory",
                None if mem is None else mem / 2**20,
                None,
                "MiB",
                per_pixel[side],
                "bytes/pixel",
            )
        )
    small, large = config.sampling_large_sizes[0], config.sampling_large_sizes[-1]
    if per_pixel.get(small) and per_pixel.get(large) is not None:
        growth = per_pixel[large] / per_pixel[small]
        rows.append(
            _row(
                f"memory per pixel {large}x{large} / {small}x{small}",
                per_pixel[large],
                per_pixel[small],
                "B/pixel",
                growth,
                "ratio",
                "<= 1.25 (linear)",
                growth <= 1.25,
            )
        )
    return {
        "note": (
            "Structured: BandedPrecisionNormal.rsample() (noise drawn inside, "
            "anti-diagonal back substitution). Dense: loc + "
            "torch.linalg.solve_triangular(L^T, eps, upper=True) with L^T built "
            "outside the timing. Peak memory: bytes allocated during one call above "
            "the state before it (CPU: torch.profiler memory events; CUDA: "
            "max_memory_allocated)."
        ),
        "details": details,
        "rows": rows,
    }


def _train_step_fn(module, x):
    optimizer = torch.optim.Adam(module.parameters(), lr=_LR)
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
        cov: _train_step_fn(_module((side, side), cov, device), x)
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
            f"VAEModule (channels {_CHANNELS}, hidden {_HIDDEN_UNITS}, "
            f"n_components {_N_COMPONENTS}); measured and reference are images/s."
        ),
        "timings": t,
        "rows": [
            _row(
                f"train step {tag}: banded vs diagonal",
                rate["banded"],
                rate["diagonal"],
                "img/s",
                ratio_bd,
                "time ratio",
                "<= 1.10",
                ratio_bd <= 1.10,
                ratio_best=_best(t, "banded", "diagonal"),
            ),
            _row(
                f"train step {tag}: spherical vs diagonal",
                rate["spherical"],
                rate["diagonal"],
                "img/s",
                ratio_sd,
                "time ratio",
                ratio_best=_best(t, "spherical", "diagonal"),
            ),
        ],
    }


def _plain_fit(X, image_shape, epochs, batch, device, valid=None, seed=0):
    """Reference training loop: manual batching over a tensor, Adam, same module.

    Logs the epoch loss (``loss.item()`` per batch) as a typical loop does;
    with ``valid`` also computes the validation loss after every epoch.
    """
    torch.manual_seed(seed)
    module = _module(image_shape, "banded", device)
    optimizer = torch.optim.Adam(module.parameters(), lr=_LR)
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
    n_valid = math.ceil(0.1 * n)
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
            "Second line: CovarianceVAE defaults (validation_fraction=0.1, "
            "patience=20, never triggered in so few epochs) vs the plain loop on the "
            "same 90/10 split with a validation pass per epoch."
        ),
        "timings": t,
        "skorch_history_epoch_s": skorch_epoch,
        "rows": [
            _row(
                f"fit epoch {tag}, no validation",
                per["fit_no_validation"],
                per["plain_no_validation"],
                "s/epoch",
                r_none,
                "time ratio",
                "<= 1.05",
                r_none <= 1.05,
                ratio_best=_best(t, "fit_no_validation", "plain_no_validation"),
            ),
            _row(
                f"fit epoch {tag}, defaults (10% validation)",
                per["fit_default"],
                per["plain_with_validation"],
                "s/epoch",
                r_def,
                "time ratio",
                "<= 1.05",
                r_def <= 1.05,
                ratio_best=_best(t, "fit_default", "plain_with_validation"),
            ),
        ],
    }


def _matmul_gflops(device, size=1024, repeats=5):
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    t = time_alternating(
        {"mm": lambda: a @ b}, repeats=repeats, warmup=2, device=device
    )["mm"]["median_s"]
    return 2 * size**3 / t / 1e9


def _flops_per_stamp(fn, n):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / n


def bench_inference(config, device):
    """transform and score_samples stamps/s vs the bare module, same batches."""
    from sk_covvae import _estimator

    batch = getattr(_estimator, "_INFERENCE_BATCH", 1024)
    side = config.infer_size
    rng = np.random.RandomState(0)
    X_fit = rng.normal(size=(config.infer_fit_samples, side * side))
    X = rng.normal(size=(config.infer_n_samples, side * side)).astype(np.float32)
    est = CovarianceVAE(
        max_epochs=1,
        validation_fraction=None,
        patience=None,
        device=str(device),
        random_state=0,
    ).fit(X_fit.astype(np.float32))
    module = est.net_.module_.eval()
    n_latent = module.encoder.n_components
    Xt = torch.from_numpy((X - est.offset_) / est.scale_).to(torch.float32)
    Xt = Xt.to(device)
    eps = torch.randn(n_latent, generator=torch.Generator().manual_seed(0))
    eps = eps.to(device)

    def bare_encode():
        with torch.inference_mode():
            return [module.encode(xb)[0].cpu() for xb in Xt.split(batch)]

    def bare_score(xs=Xt):
        out = []
        with torch.inference_mode():
            for xb in xs.split(batch):
                mu, logvar = module.encode(xb)
                px = module.decode(mu + torch.exp(0.5 * logvar) * eps)
                lp = px.log_prob(module.images(xb)) - gaussian_kl(mu, logvar)
                out.append(lp.cpu())
        return out

    t = time_alternating(
        {
            "transform": lambda: est.transform(X),
            "bare_encode": bare_encode,
            "score_samples": lambda: est.score_samples(X),
            "bare_score": bare_score,
        },
        repeats=config.infer_repeats,
        warmup=config.warmup,
        device=device,
    )
    n = config.infer_n_samples
    rate = {k: n / v["median_s"] for k, v in t.items()}
    r_tr = t["transform"]["median_s"] / t["bare_encode"]["median_s"]
    r_sc = t["score_samples"]["median_s"] / t["bare_score"]["median_s"]
    sub = Xt[:batch]
    with torch.inference_mode():
        flops_encode = _flops_per_stamp(lambda: module.encode(sub), sub.shape[0])
        flops_score = _flops_per_stamp(lambda: bare_score(sub), sub.shape[0])
    gflops = _matmul_gflops(device)
    tag = f"{side}x{side}, {n} stamps, batch {batch}"
    return {
        "note": (
            "Measured: the public CovarianceVAE methods on a numpy float32 array "
            "(validation, standardisation, batching, conversion back included). "
            "Reference: the bare module on the standardised torch tensor, same "
            "batch size, under torch.inference_mode: module.encode for transform; "
            "encode + decode + log_prob - KL (float32) for score_samples. The model "
            "is CovarianceVAE's default architecture (banded), fitted for 1 epoch "
            f"on noise (speed does not depend on the weights); torch threads: "
            f"{torch.get_num_threads()}. Ceiling = matmul rate / FLOPs per stamp."
        ),
        "timings": t,
        "flops_per_stamp": {"encode": flops_encode, "score": flops_score},
        "matmul_gflops": gflops,
        "ceiling_stamps_per_s": {
            "encode": gflops * 1e9 / flops_encode,
            "score": gflops * 1e9 / flops_score,
        },
        "rows": [
            _row(
                f"transform {tag}",
                rate["transform"],
                rate["bare_encode"],
                "stamps/s",
                r_tr,
                "time ratio",
                "<= 1.10",
                r_tr <= 1.10,
                ratio_best=_best(t, "transform", "bare_encode"),
            ),
            _row(
                f"score_samples {tag}",
                rate["score_samples"],
                rate["bare_score"],
                "stamps/s",
                r_sc,
                "time ratio",
                "<= 1.10",
                r_sc <= 1.10,
                ratio_best=_best(t, "score_samples", "bare_score"),
            ),
            _row(
                "transform rate vs 10,000 stamps/s",
                rate["transform"],
                10_000.0,
                "stamps/s",
                rate["transform"] / 10_000,
                "rate/target",
                ">= 10,000/s",
                rate["transform"] >= 10_000,
                ratio_best=n / t["transform"]["min_s"] / 10_000,
            ),
            _row(
                "score_samples rate vs 10,000 stamps/s",
                rate["score_samples"],
                10_000.0,
                "stamps/s",
                rate["score_samples"] / 10_000,
                "rate/target",
                ">= 10,000/s",
                rate["score_samples"] >= 10_000,
                ratio_best=n / t["score_samples"]["min_s"] / 10_000,
            ),
            _row(
                f"score FLOP ceiling ({gflops:.0f} GFLOP/s matmul, "
                f"{flops_score / 1e6:.2f} MFLOP/stamp)",
                rate["bare_score"],
                gflops * 1e9 / flops_score,
                "stamps/s",
                rate["bare_score"] * flops_score / (gflops * 1e9),
                "of ceiling",
            ),
        ],
    }


def bench_simulator(config, device):
    """The stamp simulator's benchmark from ``benchmarks/bench_datasets.py``."""
    import importlib
    import inspect

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    try:
        func = importlib.import_module("bench_datasets").bench_simulator
    except Exception as exc:  # missing, or broken while being written
        return {"skipped": f"simulator benchmark not available ({exc!r})", "rows": []}
    kwargs = {"quick": config.name != "full", "device": str(device), "config": config}
    params = inspect.signature(func).parameters
    result = func(**{k: v for k, v in kwargs.items() if k in params})
    if isinstance(result, dict) and "rows" in result:
        return result
    if isinstance(result, dict) and "stamps_per_s" in result:
        median = result.get("stamps_per_s_median", result["stamps_per_s"])
        target = result.get("target_stamps_per_s", 10_000)
        row = _row(
            f"make_difference_stamps {result.get('stamp_size', 21)}px, "
            f"{result.get('threads', 1)} thread(s)",
            median,
            float(target),
            "stamps/s",
            median / target,
            "rate/target",
            f">= {target:,}/s",
            median >= target,
            ratio_best=result["stamps_per_s"] / target,
        )
        return {"result": result, "rows": [row]}
    rows = result if isinstance(result, list) else [result]
    return {"rows": [r if isinstance(r, dict) else {"result": r} for r in rows]}


BENCHMARKS = {
    "log_prob": bench_log_prob,
    "sampling": bench_sampling,
    "training": bench_training,
    "wrapper": bench_wrapper,
    "inference": bench_inference,
    "simulator": bench_simulator,
}


# ------------------------------------------------------------ machine, output
def machine_info(device):
    """CPU, cores, torch build and threads, GPU, date and command line."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit,
        # Thread-pool settings change timings a lot on a shared machine.
        "env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "OMP_WAIT_POLICY",
                "KMP_BLOCKTIME",
                "MKL_NUM_THREADS",
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
            )
            if k in os.environ
        },
        "retain_freed_memory": _RETAINED_FREED_MEMORY,
    }
    try:
        import sklearn
        import skorch

        info["sklearn_version"] = sklearn.__version__
        info["skorch_version"] = skorch.__version__
    except ImportError:
        pass
    return info


def _cpu_counters():
    """(busy seconds of all CPUs, CPU seconds of this process, wall time)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        jiffies = [int(f) for f in fields]
        busy = (sum(jiffies[:8]) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = None
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def _other_load(start, end):
    """Mean share of the CPUs busy with other processes during the run."""
    if start[0] is None or end[0] is None:
        return None
    other = (end[0] - start[0]) - (end[1] - start[1])
    cpus = os.cpu_count() or 1
    return max(0.0, other / ((end[2] - start[2]) * cpus))


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if not isinstance(value, int | float) or not math.isfinite(value):
        return str(value)
    if value == 0 or 0.01 <= abs(value) < 1e5:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.3g}"


def format_machine(results):
    """Two lines on where and how a run was made."""
    m = results["machine"]
    return (
        f"{m['cpu_model']}, {m['cpus_available']} cores, torch {m['torch_version']}"
        f" ({m['torch_threads']} threads), device {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else "")
        + f", {m['date']}, freed memory retained: {m.get('retain_freed_memory')}"
        + f", wall time {results.get('wall_time_s', float('nan')):.0f} s"
        + f"\ncommand: {m['command']}"
    )


def format_table(results, markdown=False):
    """The results as a table, one line per row: plain text, or Markdown."""
    header = (
        "line",
        "measured",
        "reference",
        "unit",
        "ratio (median)",
        "ratio (best)",
        "target",
        "result",
    )
    lines = []
    for section, res in results["sections"].items():
        if "skipped" in res:
            lines.append((f"[{section}] skipped: {res['skipped']}",) + ("",) * 7)
            continue
        if "error" in res:
            lines.append((f"[{section}] error: {res['error']}",) + ("",) * 7)
            continue
        for row in res["rows"]:
            ratio = _fmt(row.get("ratio"))
            if row.get("ratio_kind") and row.get("ratio") is not None:
                ratio = f"{ratio} {row['ratio_kind']}"
            lines.append(
                (
                    f"[{section}] {row.get('name', '')}",
                    _fmt(row.get("measured")),
                    _fmt(row.get("reference")),
                    str(row.get("unit", "")),
                    ratio,
                    _fmt(row.get("ratio_best")),
                    str(row.get("target") or ""),
                    _fmt(row.get("pass")) if row.get("pass") is not None else "",
                )
            )
    if markdown:
        out = [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for r in lines:
            out.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = [
        " | ".join(c.ljust(w) for c, w in zip(header, widths)),
        "-+-".join("-" * w for w in widths),
    ]
    for r in lines:
        if r[1:] == ("",) * 7:
            out.append(r[0])
        else:
            out.append(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def run_suite(config, device="cpu", sections=SECTIONS, out=None, echo=print):
    """Run the benchmarks, optionally write JSON, return the results.

    Parameters
    ----------
    config : Config
    device : str or torch.device, default='cpu'
    sections : sequence of str, default=SECTIONS
    out : path-like or None, default=None
        Where to write the JSON.
    echo : callable or None, default=print
        Called with progress messages.

    Returns
    -------
    dict
        ``machine``, ``config``, ``sections`` (each with ``rows``, or
        ``skipped`` / ``error``) and ``wall_time_s``.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available.")
    start = time.perf_counter()
    load_start = _cpu_counters()
    results = {
        "machine": machine_info(device),
        "config": dataclasses.asdict(config),
        "sections": {},
    }
    for name in sections:
        if echo:
            echo(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if name == "simulator":
            res = bench_simulator(config, device)
            if "skipped" in res and echo:
                echo("skipped: simulator benchmark not available", flush=True)
        else:
            res = BENCHMARKS[name](config, device)
        res["section_wall_s"] = time.perf_counter() - t0
        results["sections"][name] = res
    results["wall_time_s"] = time.perf_counter() - start
    results["machine"]["other_processes_cpu_share"] = _other_load(
        load_start, _cpu_counters()
    )
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output file")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) first"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds alone (by default the run, like "
        "CovarianceVAE, keeps freed memory for reuse: sk_covvae/_allocator.py)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run only these sections",
    )
    parser.add_argument(
        "--table",
        metavar="FILE.json",
        help="print the Markdown table of a recorded run and its machine; run nothing",
    )
    args = parser.parse_args(argv)
    if args.table:
        recorded = json.loads(Path(args.table).read_text())
        print(format_machine(recorded) + "\n")
        print(format_table(recorded, markdown=True))
        return recorded
    global _RETAINED_FREED_MEMORY
    if args.default_malloc:
        # CovarianceVAE would otherwise apply the setting at its first fit.
        os.environ[OPT_OUT_VARIABLE] = "1"
    _RETAINED_FREED_MEMORY = maybe_retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = quick_config() if args.quick else full_config()
    results = run_suite(config, args.device, args.sections, out=args.out)
    print("\n" + format_machine(results) + "\n")
    print(format_table(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s; JSON written to {args.out}")
    return results


if __name__ == "__main__":
    main()
