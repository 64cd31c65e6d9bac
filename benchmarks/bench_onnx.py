"""Section ``onnx``: ``score_samples`` exported to ONNX, under onnxruntime.

The graph of :func:`sk_covvae._onnx.export_onnx` (raw stamps in,
standardization, stretch, encoder, decoder and log-density inside) run by
onnxruntime, against the estimator's own ``score_samples`` on the same
stamps, timed in alternation in the same run. Needs the ``onnx`` extra
(onnx, onnxruntime, onnxscript); the section is left out of a run where
those cannot be imported (see :func:`available`).

Run alone with ``python benchmarks/run.py --sections onnx [--quick]``.
"""

import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_inference import inference_model
from benchmarks.common import row, time_alternating
from sk_covvae._onnx import export_onnx

_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def available():
    """Whether the packages the section needs can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in _PACKAGES)


def bench_onnx(config, device):
    """onnxruntime's score rate vs the estimator's score_samples, same stamps."""
    import onnxruntime

    # The model of the ``inference`` section. The ONNX graph runs on the CPU
    # whatever the device: onnxruntime's CPU provider is what a broker's
    # workers run.
    est, X = inference_model(config, device)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        path = export_onnx(est, Path(folder) / "score.onnx")
        export_s = time.perf_counter() - t0
        options = onnxruntime.SessionOptions()
        # As many threads as torch uses, so the two engines get the same CPUs.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def ort_score():
        return session.run(None, {"X": X})[0]

    t = time_alternating(
        {"onnxruntime": ort_score, "score_samples": lambda: est.score_samples(X)},
        repeats=config.infer_repeats,
        warmup=config.warmup,
        device=device,
    )
    got, want = ort_score(), est.score_samples(X)
    max_rel = float(np.max(np.abs(got - want) / np.abs(want)))
    n = config.infer_n_samples
    rate = {k: n / v["median_s"] for k, v in t.items()}
    ratio = rate["onnxruntime"] / rate["score_samples"]
    side = config.infer_size
    tag = f"{side}x{side}, {n} stamps"
    return {
        "note": (
            "Measured: onnxruntime (CPU provider, intra-op threads = torch's "
            f"{threads}) running the graph export_onnx writes for score_samples, "
            "one run() call on all stamps (raw float32 in; standardization, "
            "stretch, encoder, decoder, log-density and Jacobian inside). "
            "Reference: CovarianceVAE.score_samples on the same numpy float32 "
            "array (validation, standardization, 256-row blocks included), "
            f"device {device}. The model: CovarianceVAE's defaults (banded, "
            "stretch 5), 1 epoch on noise. max_rel_diff: largest relative "
            "difference of the two engines' scores."
        ),
        "timings": t,
        "export_s": export_s,
        "max_rel_diff": max_rel,
        "rows": [
            row(
                f"onnxruntime score {tag} vs score_samples",
                rate["onnxruntime"],
                rate["score_samples"],
                "stamps/s",
                ratio,
                "rate ratio",
                ratio_best=t["score_samples"]["min_s"] / t["onnxruntime"]["min_s"],
                max_rel_diff=max_rel,
            ),
        ],
    }
