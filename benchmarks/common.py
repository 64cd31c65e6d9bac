"""The harness of the benchmark suite: configurations, timing, lines, output.

Every section module (``bench_*.py``) exposes functions ``(config, device)
-> dict`` whose ``rows`` are made by :func:`row`: a measured figure beside
its reference from the same run, their ratio and the target. This module
times them (:func:`time_alternating`, :func:`peak_memory_bytes`), runs the
sections (:func:`run_suite`), records the machine, writes the JSON, formats
the table, and holds the command line (:func:`main`) that ``run.py`` calls.

The model's settings come from the estimator itself (:data:`ESTIMATOR`,
:func:`make_module`), so that a plain-PyTorch reference builds exactly the
module that :class:`~sk_covvae.CovarianceVAE` builds.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sk_covvae import CovarianceVAE, _estimator
from sk_covvae._allocator import OPT_OUT_VARIABLE, maybe_retain_freed_memory
from sk_covvae._modules import VAEModule
from sk_covvae._show_versions import markdown_table, provenance
from sk_covvae.distributions import constrain_banded_parameters

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "latest.json"

#: ``CovarianceVAE()``'s parameters: the defaults every line uses.
ESTIMATOR = CovarianceVAE().get_params()
#: Bounds of the decoder's log diagonal, as the estimator derives them from
#: ``min_scale`` and ``max_scale``.
LOG_DIAG_BOUNDS = (-math.log(ESTIMATOR["max_scale"]), -math.log(ESTIMATOR["min_scale"]))
#: Images per forward pass of the estimator's inference methods.
INFERENCE_BATCH = _estimator._INFERENCE_BATCH

# Environment variables that change timings a lot on a shared machine.
_RECORDED_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "KMP_BLOCKTIME",
    "MKL_NUM_THREADS",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
)
_TABLE_HEADER = (
    "line",
    "measured",
    "reference",
    "unit",
    "ratio (median)",
    "ratio (best)",
    "target",
    "result",
)


# -------------------------------------------------------------- configurations
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
        Image side, batch and repeats of the optimisation-step timing; the
        batch defaults to the estimator's ``batch_size``.
    fit_n_samples, fit_epochs, fit_repeats, fit_batch : int
        Data size, epochs, repeats and batch (the estimator's ``batch_size``
        by default) of the wrapper-overhead timing.
    infer_size, infer_n_samples, infer_fit_samples, infer_repeats : int
        Stamp side, stamps scored, stamps the model is fitted on, repeats.
    simulator_quick : bool
        Run the simulator's short benchmark (see ``bench_datasets.py``).
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
    train_batch: int = ESTIMATOR["batch_size"]
    train_repeats: int = 15
    fit_n_samples: int = 10_000
    fit_epochs: int = 2
    fit_repeats: int = 2
    fit_batch: int = ESTIMATOR["batch_size"]
    infer_size: int = 21
    infer_n_samples: int = 32_768
    infer_fit_samples: int = 2_048
    infer_repeats: int = 7
    simulator_quick: bool = False
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
        simulator_quick=True,
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
        simulator_quick=True,
        warmup=1,
    )


# ------------------------------------------------------------------- timing
def sync(device):
    """Wait for the device's queued work (CUDA), so that timers see it."""
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
    sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        # Rotate the order so that no function always runs first.
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [
            e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        ]
    except AttributeError:  # kineto_results is private to torch and may move
        return None
    if not events:
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


# -------------------------------------------------------------- lines, models
def row(
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


def best_ratio(timings, numerator, denominator):
    """Ratio of the fastest repeats, less sensitive to load than the medians."""
    return timings[numerator]["min_s"] / timings[denominator]["min_s"]


def banded_params(shape, device, seed=0):
    """Constrained random precision parameters and a mean, of ``shape``.

    Returns ``[loc, log_diag, right, down]`` under the estimator's bounds.
    """
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(4, *shape, generator=gen)
    log_diag, right, down = constrain_banded_parameters(
        raw[0], raw[1], raw[2], log_diag_bounds=LOG_DIAG_BOUNDS, rho=_estimator._RHO
    )
    return [t.to(device) for t in (raw[3], log_diag, right, down)]


def make_module(image_shape, covariance, device):
    """The ``VAEModule`` that ``CovarianceVAE()`` builds, on ``device``."""
    return VAEModule(
        image_shape,
        ESTIMATOR["n_components"],
        covariance,
        channels=tuple(ESTIMATOR["channels"]),
        hidden_units=ESTIMATOR["hidden_units"],
        log_diag_bounds=LOG_DIAG_BOUNDS,
        rho=_estimator._RHO,
    ).to(device)


# ---------------------------------------------------------- machine, CPU load
def machine_info(device, retained_freed_memory=False):
    """Where and how the run is made: :func:`provenance` plus the run's own.

    The keys are those of the recorded runs in ``results/``.
    """
    info = provenance()
    return {
        "cpu_model": info["cpu_model"],
        "cpu_count": info["cpu_count"],
        "cpus_available": info["cpus_available"],
        "torch_version": info["torch"],
        "torch_threads": info["torch_threads"],
        "python": info["python"],
        "platform": info["platform"],
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": info["git_revision"],
        "git_modified": info["git_modified"],
        "env": {k: os.environ[k] for k in _RECORDED_ENV if k in os.environ},
        "retain_freed_memory": retained_freed_memory,
        "sk_covvae_version": info["sk_covvae"],
        "sklearn_version": info["sklearn"],
        "skorch_version": info["skorch"],
        "numpy_version": info["numpy"],
    }


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


# ------------------------------------------------------------------- output
def format_number(value):
    """A figure as the table shows it: 3 significant digits, or PASS/FAIL."""
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


def _table_lines(results):
    """One tuple of cells (str) per row of every section, as in the header."""
    lines = []
    for section, res in results["sections"].items():
        for r in res["rows"]:
            ratio = format_number(r["ratio"])
            if r["ratio_kind"] and r["ratio"] is not None:
                ratio = f"{ratio} {r['ratio_kind']}"
            lines.append(
                (
                    f"[{section}] {r['name']}",
                    format_number(r["measured"]),
                    format_number(r["reference"]),
                    r["unit"],
                    ratio,
                    format_number(r.get("ratio_best")),
                    r["target"] or "",
                    "" if r["pass"] is None else format_number(r["pass"]),
                )
            )
    return lines


def format_table(results, markdown=False):
    """The results as a table, one line per row: plain text, or Markdown."""
    lines = _table_lines(results)
    if markdown:
        return markdown_table(
            [dict(zip(_TABLE_HEADER, cells)) for cells in lines],
            [(title, title) for title in _TABLE_HEADER],
        )
    widths = [
        max(len(r[i]) for r in [_TABLE_HEADER, *lines])
        for i in range(len(_TABLE_HEADER))
    ]
    out = [
        " | ".join(c.ljust(w) for c, w in zip(_TABLE_HEADER, widths)),
        "-+-".join("-" * w for w in widths),
    ]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    return "\n".join(out)


# --------------------------------------------------------------- the suite
def run_suite(
    benchmarks,
    config,
    device="cpu",
    sections=None,
    out=None,
    echo=print,
    retained_freed_memory=False,
):
    """Run the benchmarks, optionally write JSON, return the results.

    Parameters
    ----------
    benchmarks : dict of str to callable
        Section name to function ``(config, device) -> dict`` with ``rows``.
    config : Config
    device : str or torch.device, default='cpu'
    sections : sequence of str or None, default=None
        Names of the sections to run, in this order; None runs them all.
    out : path-like or None, default=None
        Where to write the JSON.
    echo : callable or None, default=print
        Called with progress messages.
    retained_freed_memory : bool, default=False
        Whether glibc keeps freed memory in this process (recorded only).

    Returns
    -------
    dict
        ``machine``, ``config``, ``sections`` (each with ``rows``) and
        ``wall_time_s``.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available.")
    start = time.perf_counter()
    load_start = _cpu_counters()
    results = {
        "machine": machine_info(device, retained_freed_memory),
        "config": dataclasses.asdict(config),
        "sections": {},
    }
    for name in benchmarks if sections is None else sections:
        if echo:
            echo(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = benchmarks[name](config, device)
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


def main(benchmarks, argv=None, description=None):
    """The suite's command line: parse ``argv``, run or print a recorded run.

    Parameters
    ----------
    benchmarks : dict of str to callable
        The sections, as for :func:`run_suite`.
    argv : list of str or None, default=None
        Arguments; None reads ``sys.argv``.
    description : str or None, default=None
        First line of ``--help``.

    Returns
    -------
    dict
        The results, or the recorded run with ``--table``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output file")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) first"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds alone (by default the run keeps "
        "freed memory for reuse: sk_covvae/_allocator.py)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=list(benchmarks),
        default=list(benchmarks),
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
    if args.default_malloc:
        # Opting out through the environment also covers anything else in
        # the process that consults it.
        os.environ[OPT_OUT_VARIABLE] = "1"
    retained = maybe_retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = quick_config() if args.quick else full_config()
    results = run_suite(
        benchmarks,
        config,
        args.device,
        args.sections,
        out=args.out,
        retained_freed_memory=retained,
    )
    print("\n" + format_machine(results) + "\n")
    print(format_table(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s; JSON written to {args.out}")
    return results
