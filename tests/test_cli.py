"""The ``covvae`` command line: outputs of ``--quick`` and usage errors."""

import json
import subprocess
import sys

import pytest
import torch

from sk_covvae.cli import main

FIGURES = [
    "reconstructions.png",
    "covariance.png",
    "latent_projection.png",
    "training.png",
    "roc.png",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    status = main(["compare", "--quick", "--out", str(out)])
    return status, out


def test_quick_writes_json_with_the_three_models(quick_run):
    status, out = quick_run
    assert status == 0
    document = json.loads((out / "results.json").read_text())
    assert [r["covariance"] for r in document["runs"]] == [
        "spherical",
        "diagonal",
        "banded",
    ]
    for run in document["runs"]:
        assert run["epochs"] >= 1 and run["fit_time_s"] > 0
        assert run["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
        for key in ("neg_recon_ll", "neg_elbo", "rf_roc_auc", "anomaly_auroc"):
            assert isinstance(run[key], float)
    assert document["config"]["command"] == f"covvae compare --quick --out {out}"
    assert document["wall_time_s"] > 0


def test_quick_writes_the_report(quick_run):
    _, out = quick_run
    report = (out / "report.md").read_text()
    for word in ("spherical", "diagonal", "banded", "raw pixels", "PCA(4)", "AUROC"):
        assert word in report


def test_quick_writes_the_figures(quick_run):
    pytest.importorskip("matplotlib")
    _, out = quick_run
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in (out / "report.md").read_text()


def test_bad_dataset_exits_nonzero_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--dataset", "mnist"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "invalid choice: 'mnist'" in err and "fashion-mnist" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--n-components", "0"], "0 is not a positive integer"),
        (["compare", "--max-epochs", "x"], "'x' is not an integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_options_exit_nonzero(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_device_error_is_reported_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--quick", "--device", "nonsense", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "'nonsense' is not a torch device" in capsys.readouterr().err


def test_a_bug_is_not_turned_into_a_usage_error(monkeypatch, tmp_path):
    # Only user errors get the one-line treatment; a ValueError from inside
    # the run is a bug, and its traceback must reach the user.
    from sk_covvae import experiments

    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(experiments, "run_comparison", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["compare", "--quick", "--out", str(tmp_path)])


def test_options_not_given_are_not_passed(monkeypatch, tmp_path):
    from sk_covvae import experiments

    seen = {}

    def record(data, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any fit

    monkeypatch.setattr(experiments, "run_comparison", record)
    with pytest.raises(KeyboardInterrupt):
        main(["compare", "--n-samples", "40", "--lr", "0.01", "--out", str(tmp_path)])
    assert seen["lr"] == 0.01
    for name in ("batch_size", "min_scale", "max_scale", "patience", "device"):
        assert name not in seen, name


def test_figures_without_a_saved_run_is_a_clear_error(tmp_path, capsys):
    assert main(["figures", str(tmp_path)]) == 2
    assert "run `covvae compare --save-models" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "sk_covvae", "compare", "--dataset", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr


def test_ztf_options_are_checked(capsys):
    assert main(["compare", "--dataset", "ztf"]) == 2
    assert "--dataset ztf needs --data PATH" in capsys.readouterr().err
    assert main(["compare", "--stamp-channels", "difference"]) == 2
    assert "apply to --dataset ztf only" in capsys.readouterr().err
