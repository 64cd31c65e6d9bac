"""Smoke test of the benchmark suite: a tiny configuration runs end to end.

No timing is asserted; this only checks that every section of
``benchmarks/run.py`` runs and writes finite numbers to its JSON.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("covvae_bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(obj):
    """All int and float leaves of a JSON-like object (bools excluded)."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in _numbers(v)]
    return []


def test_tiny_run_writes_finite_json(bench, tmp_path):
    out = tmp_path / "bench.json"
    # The simulator line runs benchmarks/bench_datasets.py, which has its own
    # fixed sizes (seconds of work); it is left out to keep this test fast.
    sections = [s for s in bench.SECTIONS if s != "simulator"]
    bench.run_suite(bench.tiny_config(), "cpu", sections=sections, out=out, echo=None)
    results = json.loads(out.read_text())

    assert results["machine"]["torch_threads"] >= 1
    assert list(results["sections"]) == sections
    for name, section in results["sections"].items():
        assert section["rows"], name
        for row in section["rows"]:
            numbers = _numbers(row)
            assert numbers, (name, row["name"])
            assert all(math.isfinite(x) for x in numbers), (name, row)
        assert all(math.isfinite(x) for x in _numbers(section)), name
    assert "log_prob" in bench.format_table(results)
