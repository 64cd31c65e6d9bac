"""Section ``inference``: ``transform`` and ``score_samples`` throughput.

The public methods on numpy stamps against the bare module on the
standardised tensor, in the estimator's own inference batches, and against
the FLOP ceiling that the machine's matrix-product rate sets.
"""

import numpy as np
import torch

from benchmarks.common import (
    INFERENCE_BATCH,
    best_ratio,
    make_module,
    row,
    time_alternating,
)
from sk_covvae import CovarianceVAE, _estimator
from sk_covvae._net import gaussian_kl

#: Targets of issue 5: stamps per second, and the wrapper's time overhead.
TARGET_STAMPS_PER_S = 10_000
TARGET_TIME_RATIO = 1.10


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


def inference_model(config, device):
    """The stamps and the model that the inference sections time.

    ``config.infer_n_samples`` float32 noise stamps of ``config.infer_size``
    pixels a side, and CovarianceVAE's defaults (banded, stretch 5) fitted
    for one epoch on other noise: speed does not depend on the weights.
    """
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
    return est, X


def bench_inference(config, device):
    """transform and score_samples stamps/s vs the bare module, same batches."""
    batch = INFERENCE_BATCH
    side = config.infer_size
    est, X = inference_model(config, device)
    # The reference: the module CovarianceVAE() builds (speed does not depend
    # on the weights) on the stamps as the estimator's own standardization
    # (offset, scale and stretch) leaves them.
    module = make_module((side, side), est.covariance, device).eval()
    n_latent = module.encoder.n_components
    Xt = _estimator._standardized_tensor(X, est.offset_, est.scale_, est.stretch_)
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
            "Reference: the bare module (the one CovarianceVAE() builds, "
            "common.make_module) on the torch tensor that the estimator's "
            "standardisation (offset, scale, stretch) gives, same "
            "batch size, under torch.inference_mode: module.encode for transform; "
            "encode + decode + log_prob - KL (float32) for score_samples. The "
            "estimator is CovarianceVAE's default (banded), fitted for 1 epoch on "
            "noise; the reference has the same architecture with fresh weights "
            f"(speed does not depend on the weights); torch threads: "
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
            row(
                f"transform {tag}",
                rate["transform"],
                rate["bare_encode"],
                "stamps/s",
                r_tr,
                "time ratio",
                f"<= {TARGET_TIME_RATIO:.2f}",
                r_tr <= TARGET_TIME_RATIO,
                ratio_best=best_ratio(t, "transform", "bare_encode"),
            ),
            row(
                f"score_samples {tag}",
                rate["score_samples"],
                rate["bare_score"],
                "stamps/s",
                r_sc,
                "time ratio",
                f"<= {TARGET_TIME_RATIO:.2f}",
                r_sc <= TARGET_TIME_RATIO,
                ratio_best=best_ratio(t, "score_samples", "bare_score"),
            ),
            row(
                f"transform rate vs {TARGET_STAMPS_PER_S:,} stamps/s",
                rate["transform"],
                float(TARGET_STAMPS_PER_S),
                "stamps/s",
                rate["transform"] / TARGET_STAMPS_PER_S,
                "rate/target",
                f">= {TARGET_STAMPS_PER_S:,}/s",
                rate["transform"] >= TARGET_STAMPS_PER_S,
                ratio_best=n / t["transform"]["min_s"] / TARGET_STAMPS_PER_S,
            ),
            row(
                f"score_samples rate vs {TARGET_STAMPS_PER_S:,} stamps/s",
                rate["score_samples"],
                float(TARGET_STAMPS_PER_S),
                "stamps/s",
                rate["score_samples"] / TARGET_STAMPS_PER_S,
                "rate/target",
                f">= {TARGET_STAMPS_PER_S:,}/s",
                rate["score_samples"] >= TARGET_STAMPS_PER_S,
                ratio_best=n / t["score_samples"]["min_s"] / TARGET_STAMPS_PER_S,
            ),
            row(
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
