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
    # The onnx section has a test of its own (test_onnx_section).
    sections = [s for s in sections if s != "onnx"]
    # So has the scoring section (test_scoring_section).
    sections = [s for s in sections if s != "scoring"]
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


def test_defaults_come_from_the_estimator(bench):
    from sk_covvae import CovarianceVAE

    config = bench.full_config()
    assert config.train_batch == config.fit_batch == CovarianceVAE().batch_size


def test_table_of_recorded_run(bench, capsys):
    path = sorted((RUN_PY.parent / "results").glob("*.json"))[0]
    recorded = bench.main(["--table", str(path)])
    lines = capsys.readouterr().out.splitlines()
    n_rows = sum(len(s["rows"]) for s in recorded["sections"].values())
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| line | measured | reference |")
    assert len(table) == n_rows + 2  # header, delimiter row, one line per row


def test_simulator_line(bench, monkeypatch):
    from benchmarks import bench_datasets

    result = {
        "stamps_per_s": 12_000.0,
        "stamps_per_s_median": 11_000.0,
        "target_stamps_per_s": 10_000,
        "stamp_size": 21,
        "threads": 1,
    }
    monkeypatch.setattr(bench_datasets, "bench_simulator", lambda quick: result)
    section = bench_datasets.bench_simulator_section(bench.tiny_config(), "cpu")
    (row,) = section["rows"]
    assert row["pass"] and row["ratio"] == 1.1 and row["ratio_best"] == 1.2
    table = bench.format_table({"sections": {"simulator": section}}, markdown=True)
    assert "| [simulator] make_difference_stamps 21px, 1 thread(s) | 11,000 |" in table


def test_onnx_section(bench, tmp_path):
    """The onnx line, tiny: both engines' rates, and the same scores."""
    from benchmarks import bench_onnx

    if not bench_onnx.available():
        pytest.skip("the onnx extra (onnx, onnxruntime, onnxscript) is missing")
    assert "onnx" in bench.SECTIONS
    out = tmp_path / "bench.json"
    bench.run_suite(bench.tiny_config(), "cpu", sections=["onnx"], out=out, echo=None)
    section = json.loads(out.read_text())["sections"]["onnx"]
    (row,) = section["rows"]
    assert row["unit"] == "stamps/s" and row["ratio_kind"] == "rate ratio"
    assert all(math.isfinite(x) for x in _numbers(section))
    assert row["measured"] > 0 and row["reference"] > 0
    assert section["max_rel_diff"] < 1e-5


def test_scoring_section(bench, tmp_path):
    """The scoring lines, tiny: read and end-to-end rates beside the model's."""
    from benchmarks import bench_scoring

    if not bench_scoring.available():
        pytest.skip("the shipped alert packets (../shared/data) are absent")
    assert "scoring" in bench.SECTIONS
    out = tmp_path / "bench.json"
    config = bench.tiny_config()
    bench.run_suite(config, "cpu", sections=["scoring"], out=out, echo=None)
    section = json.loads(out.read_text())["sections"]["scoring"]
    names = [r["name"] for r in section["rows"]]
    assert [n.split(",")[0] for n in names] == [
        "read one-alert files",
        "read one multi-alert file",
        "read the difference cutouts only",
        "score_alerts one-alert files",
        "score_alerts one multi-alert file",
        "score_alerts",
        "model alone on one torch thread",
    ]
    for r in section["rows"]:
        assert r["unit"] == "alerts/s" and r["ratio_kind"] == "rate ratio"
        assert r["measured"] > 0 and r["reference"] > 0
    assert all(math.isfinite(x) for x in _numbers(section))
    targets = {r["name"].split(",")[0]: r["target"] for r in section["rows"]}
    assert targets["score_alerts one multi-alert file"] == ">= 0.50"


def test_reader_contention_script():
    """The diagnostic of the model beside a reader thread, very short."""
    from benchmarks import bench_scoring, reader_contention

    if not bench_scoring.available():
        pytest.skip("the shipped alert packets (../shared/data) are absent")
    pytest.importorskip("numba")
    import torch

    from sk_covvae.datasets import _readers

    threads, fast_after = torch.get_num_threads(), _readers._FAST_AFTER
    rows = reader_contention.main(["--seconds", "0.3", "--copies", "1"])
    assert torch.get_num_threads() == threads  # restored
    assert _readers._FAST_AFTER == fast_after
    assert [r[0] for r in rows] == [
        "model alone",
        "beside the job's reader",
        "beside gunzip and copy only",
    ]
    for _, rate, share, read in rows:
        assert rate > 0 and 0 < share <= 1.1
        assert read is None or read > 0
