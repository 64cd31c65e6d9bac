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

This file is the entry point only: the harness is ``common.py``, and each
section lives in a ``bench_*.py`` module of the ``benchmarks`` package.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, or loaded from its path as the tests do: make the
    # ``benchmarks`` package importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_datasets import bench_simulator_section  # noqa: E402
from benchmarks.bench_distributions import bench_log_prob, bench_sampling  # noqa: E402
from benchmarks.bench_fit import bench_training, bench_wrapper  # noqa: E402
from benchmarks.bench_inference import bench_inference  # noqa: E402
from benchmarks.bench_onnx import available as onnx_available  # noqa: E402
from benchmarks.bench_onnx import bench_onnx  # noqa: E402
from benchmarks.bench_scoring import available as scoring_available  # noqa: E402
from benchmarks.bench_scoring import bench_scoring  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT,
    Config,
    format_machine,
    format_table,
    full_config,
    quick_config,
    tiny_config,
)
from benchmarks.common import main as _main  # noqa: E402
from benchmarks.common import run_suite as _run_suite  # noqa: E402

__all__ = [
    "BENCHMARKS",
    "DEFAULT_OUT",
    "SECTIONS",
    "Config",
    "format_machine",
    "format_table",
    "full_config",
    "main",
    "quick_config",
    "run_suite",
    "tiny_config",
]

#: The sections, in the order they run and appear in the table.
BENCHMARKS = {
    "log_prob": bench_log_prob,
    "sampling": bench_sampling,
    "training": bench_training,
    "wrapper": bench_wrapper,
    "inference": bench_inference,
    "simulator": bench_simulator_section,
}
if onnx_available():  # the onnx extra: onnx, onnxruntime, onnxscript
    BENCHMARKS["onnx"] = bench_onnx
if scoring_available():  # the shipped alert packets, beside the repository
    BENCHMARKS["scoring"] = bench_scoring
SECTIONS = tuple(BENCHMARKS)


def run_suite(config, device="cpu", sections=SECTIONS, out=None, echo=print):
    """Run the sections named in ``sections``; see :func:`common.run_suite`."""
    return _run_suite(BENCHMARKS, config, device, sections, out=out, echo=echo)


def main(argv=None):
    """Command-line entry point; see :func:`common.main`."""
    return _main(BENCHMARKS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
