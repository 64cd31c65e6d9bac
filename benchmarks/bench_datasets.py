"""Throughput of the difference-stamp simulator on one core (section ``simulator``).

Run ``python benchmarks/bench_datasets.py`` (add ``--quick`` for a short run,
``--auc`` for the RandomForest difficulty calibration), or as the section
``simulator`` of ``benchmarks/run.py`` (:func:`bench_simulator_section`).
The standalone script needs neither torch nor the rest of the suite.
"""

import argparse
import json
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from sk_covvae.datasets import REAL_LABEL, make_difference_stamps

#: Stamps per second on one core that the simulator must reach (issue 5).
TARGET_STAMPS_PER_S = 10_000


def bench_simulator(quick=False):
    """Measure ``make_difference_stamps`` throughput (21x21 stamps) on one core.

    BLAS/OpenMP pools are limited to one thread with threadpoolctl; the
    simulator itself is single-threaded numpy/scipy code. Each repeat
    generates a full Bunch (template, science, difference, SNR image, data)
    with a different seed; the best and median rates are reported.

    Parameters
    ----------
    quick : bool, default=False
        Fewer and smaller repeats (3 x 5,000 stamps instead of 7 x 20,000).

    Returns
    -------
    result : dict
        ``stamps_per_s`` (wall clock, best repeat), ``stamps_per_s_median``,
        ``stamps_per_cpu_s`` and ``stamps_per_cpu_s_median`` (process CPU
        time, robust to a busy machine), ``n_samples``,
        ``repeats``, ``seconds`` (each repeat), ``stamp_size``, ``threads``,
        ``target_stamps_per_s`` (10,000), ``meets_target`` (wall clock),
        ``meets_target_cpu``, ``numpy``,
        ``machine``.
    """
    n_samples, repeats = (5_000, 3) if quick else (20_000, 7)
    seconds, cpu_seconds = [], []
    with threadpool_limits(limits=1):
        make_difference_stamps(1_000, random_state=0)  # warm-up (imports, caches)
        for seed in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            make_difference_stamps(n_samples, random_state=seed)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - start_cpu)
    rates = n_samples / np.asarray(seconds)
    cpu_rates = n_samples / np.asarray(cpu_seconds)
    return {
        "benchmark": "make_difference_stamps",
        "stamp_size": 21,
        "n_samples": n_samples,
        "repeats": repeats,
        "threads": 1,
        "seconds": [round(s, 4) for s in seconds],
        "stamps_per_s": float(rates.max()),
        "stamps_per_s_median": float(np.median(rates)),
        # CPU time of this process: robust to other processes on a busy machine
        "stamps_per_cpu_s": float(cpu_rates.max()),
        "stamps_per_cpu_s_median": float(np.median(cpu_rates)),
        "target_stamps_per_s": TARGET_STAMPS_PER_S,
        "meets_target": bool(rates.max() >= TARGET_STAMPS_PER_S),
        "meets_target_cpu": bool(cpu_rates.max() >= TARGET_STAMPS_PER_S),
        "numpy": np.__version__,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical cores",
    }


def bench_simulator_section(config, device):
    """The ``simulator`` line of ``benchmarks/run.py``: :func:`bench_simulator`.

    ``config.simulator_quick`` picks the short run; ``device`` is ignored (the
    simulator is numpy code on the CPU). The line is the median rate against
    the target.
    """
    # Imported here: the standalone script needs neither torch nor the path
    # to the benchmarks package that run.py sets up.
    from benchmarks.common import row

    result = bench_simulator(quick=config.simulator_quick)
    median, target = result["stamps_per_s_median"], result["target_stamps_per_s"]
    line = row(
        f"make_difference_stamps {result['stamp_size']}px, "
        f"{result['threads']} thread(s)",
        median,
        float(target),
        "stamps/s",
        median / target,
        "rate/target",
        f">= {target:,}/s",
        median >= target,
        ratio_best=result["stamps_per_s"] / target,
    )
    return {"result": result, "rows": [line]}


def bench_random_forest_auc(n_train=5_000, n_test=5_000, n_estimators=200, seed=0):
    """Difficulty calibration: raw-pixel RandomForest ROC AUC on simulated stamps.

    ``make_difference_stamps(n_train + n_test, random_state=seed)``; the first
    ``n_train`` stamps train ``RandomForestClassifier(n_estimators,
    random_state=0)`` on the raw (noise-normalised) difference pixels, the
    rest are the held-out test set. Also reports the real-class SNR
    percentiles and the AUC of real against each artefact type.

    Returns
    -------
    result : dict
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score

    stamps = make_difference_stamps(n_train + n_test, random_state=seed)
    X, y = stamps.data, stamps.target
    rf = RandomForestClassifier(n_estimators=n_estimators, random_state=0, n_jobs=-1)
    rf.fit(X[:n_train], y[:n_train])
    proba = rf.predict_proba(X[n_train:])[:, 1]
    y_test, kind = y[n_train:], stamps.artefact_type[n_train:]
    per_type = {}
    for name in np.unique(kind):
        if name != "real":
            m = (kind == name) | (kind == "real")
            per_type[name] = round(float(roc_auc_score(y_test[m], proba[m])), 4)
    real = stamps.target == REAL_LABEL
    return {
        "benchmark": "random_forest_auc",
        "n_train": n_train,
        "n_test": n_test,
        "n_estimators": n_estimators,
        "seed": seed,
        "roc_auc": float(roc_auc_score(y_test, proba)),
        "roc_auc_real_vs_type": per_type,
        "real_snr_p5_p50_p95": np.percentile(stamps.snr[real], [5, 50, 95])
        .round(2)
        .tolist(),
        "bogus_snr_p5_p50_p95": np.percentile(stamps.snr[~real], [5, 50, 95])
        .round(2)
        .tolist(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument(
        "--auc", action="store_true", help="also run the RandomForest AUC calibration"
    )
    args = parser.parse_args()
    print(json.dumps(bench_simulator(quick=args.quick), indent=2))
    if args.auc:
        print(json.dumps(bench_random_forest_auc(), indent=2))
