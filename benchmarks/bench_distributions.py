"""Sections ``log_prob`` and ``sampling``: the structured distribution.

``BandedPrecisionNormal.log_prob`` and ``rsample`` against torch's dense
``MultivariateNormal`` and triangular solve on the same precision matrix.
"""

import torch

from benchmarks.common import (
    banded_params,
    best_ratio,
    peak_memory_bytes,
    row,
    time_alternating,
)
from sk_covvae.distributions import BandedPrecisionNormal

#: FLOPs per pixel of ``BandedPrecisionNormal.log_prob`` (see bench_log_prob).
BANDED_LOG_PROB_FLOPS_PER_PIXEL = 10
#: Back-to-back banded calls per timed repeat in the log_prob section.
LOG_PROB_INNER_CALLS = 20


def bench_log_prob(config, device):
    """Structured log_prob vs dense MultivariateNormal(precision_matrix=P)."""
    side, batch = config.logprob_size, config.logprob_batch
    loc, log_diag, right, down = banded_params((batch, side, side), device)
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
    inner = LOG_PROB_INNER_CALLS

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
    flop_ceiling = D * D / (BANDED_LOG_PROB_FLOPS_PER_PIXEL * D)
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
            row(
                f"log_prob {tag}, build + log_prob",
                bb * ms,
                db * ms,
                "ms",
                db / bb,
                "speed-up",
                ">= 1000x",
                db / bb >= 1000,
                ratio_best=best_ratio(built, "dense", "banded"),
            ),
            row(
                f"log_prob {tag}, call only",
                b * ms,
                d * ms,
                "ms",
                d / b,
                "speed-up",
                f"ceiling {flop_ceiling:.0f}x (D/10 FLOPs)",
                None,
                ratio_best=best_ratio(call, "dense", "banded"),
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
        loc, log_diag, right, down = banded_params((batch, side, side), device)
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
            row(
                f"rsample {side}x{side} b{batch} vs dense solve_triangular",
                b * 1e3,
                d * 1e3,
                "ms",
                d / b,
                "speed-up",
                ">= 1x (not slower)" if is_target else None,
                (d / b >= 1.0) if is_target else None,
                ratio_best=best_ratio(t, "dense", "banded"),
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
        loc, log_diag, right, down = banded_params((batch, side, side), device)
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
            row(
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
            row(
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
            row(
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
