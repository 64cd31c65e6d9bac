"""The comparison protocol: split, metrics, early stopping, the whole run."""

import json
import math

import numpy as np
import pytest
from conftest import SHARED_DATA

from sk_covvae.experiments import (
    COVARIANCES,
    bits_per_dim,
    dequantize,
    fit_with_early_stopping,
    load_dataset,
    run_comparison,
    stratified_split,
    summarize,
)

TINY = {"channels": (2, 4), "hidden_units": 8, "batch_size": 32, "device": "cpu"}


@pytest.fixture(scope="module")
def stamps():
    return load_dataset("stamps", n_samples=160, random_state=0)


@pytest.fixture(scope="module")
def result(stamps):
    return run_comparison(stamps, n_components=(2,), seeds=(0,), max_epochs=1, **TINY)


@pytest.mark.parametrize("n, n_pos", [(100, 50), (1000, 100), (333, 111)])
def test_split_is_stratified_with_the_right_proportions(n, n_pos):
    y = np.zeros(n, dtype=int)
    y[:n_pos] = 1
    split = stratified_split(y, random_state=0)
    parts = [split[k] for k in ("train", "validation", "test")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    for part, fraction in zip(parts, (0.6, 0.25, 0.15)):
        assert abs(len(part) - fraction * n) <= 1
        assert abs(y[part].mean() - n_pos / n) <= 1.5 / len(part)


def test_split_depends_on_the_seed_only():
    y = np.repeat([0, 1, 2], 40)
    a, b = stratified_split(y, random_state=3), stratified_split(y, random_state=3)
    c = stratified_split(y, random_state=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        stratified_split(np.zeros(10), fractions=(0.5, 0.5, 0.5))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_dequantize_stays_in_the_bin_of_each_level():
    X = np.array([[0.0, 1.0, 128 / 255]])
    Y = dequantize(np.repeat(X, 500, axis=0), random_state=0)
    levels = np.rint(X * 255)
    assert np.all(Y * 256 >= levels) and np.all(Y * 256 < levels + 1)
    assert np.all((Y >= 0) & (Y < 1))


def test_uniform_density_is_eight_bits_per_dim():
    # The uniform density on [0, 1]^D has log p = 0: 8 bits per 8-bit pixel.
    assert bits_per_dim(0.0, 784) == pytest.approx(8.0)
    assert bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(7.0)


@pytest.mark.parametrize("covariance", ["diagonal", "spherical"])
def test_early_stopping_restores_the_best_validation_epoch(stamps, covariance):
    X = stamps["X"]
    model, info = fit_with_early_stopping(
        X[:100],
        X[100:140],
        covariance=covariance,
        n_components=2,
        max_epochs=4,
        patience=1,
        random_state=0,
        mean_epochs=3,
        **TINY,
    )
    history = info["history"]
    stages = [h["stage"] for h in history]
    last = [h["valid_loss"] for h in history if h["stage"] == stages[-1]]
    first = len(history) - len(last)
    assert info["epochs"] == len(history) <= (4 if covariance == "spherical" else 7)
    assert set(stages[:first]) <= {"mean"} and set(stages[first:]) == {"joint"}
    assert info["best_epoch"] == first + int(np.argmin(last)) + 1
    if info["stopped_by"] == "early_stopping":
        assert info["epochs"] == info["best_epoch"] + 1
    # The hold-out has the validation part's share of the pooled images.
    assert model.validation_fraction == pytest.approx(40 / 140)


def test_fitted_models_describe_how_they_were_fitted(stamps):
    X = stamps["X"]
    model, _ = fit_with_early_stopping(
        X[:100],
        X[100:140],
        covariance="banded",
        n_components=2,
        max_epochs=2,
        patience=None,
        random_state=3,
        **TINY,
    )
    params = model.get_params()
    assert params["max_epochs"] == 2 and params["patience"] is None
    assert params["random_state"] == 3 and params["warm_start"] is False
    # Refitting a clone with those parameters gives the same model.
    from sklearn.base import clone

    again = clone(model).fit(X[:140])
    np.testing.assert_array_equal(again.transform(X[140:]), model.transform(X[140:]))


def test_run_comparison_returns_finite_metrics_for_the_three_models(result):
    runs = result["runs"]
    assert [r["covariance"] for r in runs] == list(COVARIANCES)
    for run in runs:
        for key in ("neg_recon_ll", "neg_elbo", "rf_roc_auc", "anomaly_auroc"):
            assert np.isfinite(run[key]), key
        assert 0 <= run["rf_roc_auc"] <= 1 and 0 <= run["rf_accuracy"] <= 1
        # the ELBO subtracts a KL >= 0 from E[log p(x|z)]
        assert run["neg_elbo"] >= run["neg_recon_ll"] - 1e-6 * abs(run["neg_elbo"])
        assert run["bits_per_dim"] is None  # stamps are not quantized
        assert run["device"] == "cpu"
    assert {b["method"] for b in result["baselines"]} == {"raw pixels", "PCA(2)"}
    assert result["split"] == {"train": 96, "validation": 40, "test": 24}


def test_results_serialise_to_json(result):
    plain = {k: v for k, v in result.items() if k not in ("models", "test_index")}
    again = json.loads(json.dumps(plain))
    assert again["runs"][0]["covariance"] == "spherical"


def test_summarize_gives_mean_and_std_over_seeds():
    runs = [
        {"covariance": "banded", "n_components": 5, "neg_elbo": v} for v in (1, 2, 3)
    ]
    (row,) = summarize(runs)
    assert row["neg_elbo"] == {"mean": 2.0, "std": 1.0, "n": 3}


def test_fashion_mnist_gives_bits_per_dim():
    try:
        data = load_dataset("fashion-mnist", n_samples=100, random_state=0)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files are not installed")
    assert data["quantized"] and data["X"].shape == (100, 784)
    assert np.bincount(data["y"]).tolist() == [10] * 10
    out = run_comparison(
        data, covariances=("spherical",), n_components=(2,), max_epochs=1, **TINY
    )
    (run,) = out["runs"]
    assert "rf_roc_auc" not in run and "anomaly_auroc" not in run
    assert 0 < run["bits_per_dim"] < 64


def test_history_is_in_data_units_with_the_stretch(stamps):
    X = stamps["X"][:140]
    model, info = fit_with_early_stopping(
        X[:100],
        X[100:],
        covariance="diagonal",
        n_components=2,
        max_epochs=2,
        patience=None,
        random_state=0,
        **TINY,
    )
    assert model.stretch_ is not None
    _, valid = model.net_.get_split_datasets(X)
    u = (X[np.asarray(valid.indices)].astype(np.float64) - model.offset_) / model.scale_
    log_det = -X.shape[1] * np.log(model.scale_) - 0.5 * np.log1p(
        (u / model.stretch_) ** 2
    ).sum(1)
    shift = info["history"][-1]["valid_loss"] - model.net_.history[-1, "valid_loss"]
    assert shift == pytest.approx(-log_det.mean(), rel=1e-9)


# ------------------------------------------------------------ real ZTF stamps
ZTF_FILE = SHARED_DATA / "ztf_triplets" / "ztf_triplets.npz"


@pytest.fixture(scope="module")
def ztf():
    if not ZTF_FILE.is_file():
        pytest.skip(f"shared data {ZTF_FILE} is absent")
    return load_dataset("ztf", path=ZTF_FILE, channels="all", crop=15)


def test_ztf_labels_come_from_drb_and_are_counted(ztf):
    with np.load(ZTF_FILE) as f:
        drb = f["drb"]
    labelled = np.isfinite(drb)
    assert ztf["X"].shape == (labelled.sum(), 3 * 15 * 15)
    assert np.isfinite(ztf["X"]).all() and ztf["image_shape"] == (3, 15, 15)
    np.testing.assert_array_equal(ztf["y"], drb[labelled] >= 0.5)
    np.testing.assert_array_equal(ztf["normal"], drb[labelled] >= 0.9)
    counts = ztf["counts"]
    assert counts["detections"] == 1673 and counts["with_drb"] == 1182
    assert counts["real"] + counts["bogus"] == 1182 and counts["bogus"] == 116
    assert counts["sure_real"] == 961  # as the data README says
    assert ztf["channel_names"] == ["science", "template", "difference"]
    diff = load_dataset("ztf", path=ZTF_FILE, channels="difference", crop=15)
    np.testing.assert_array_equal(diff["X"], ztf["X"][:, 2 * 225 :])


def test_ztf_needs_drb_and_known_options(tmp_path):
    with pytest.raises(ValueError, match="channels must be"):
        load_dataset("ztf", path=ZTF_FILE, channels="science")
    path = tmp_path / "no_drb.npz"
    np.savez(
        path,
        X=np.zeros((20, 3, 21, 21), np.float32),
        drb=np.full(20, np.nan),
        rb=np.full(20, 0.5),
        objectId=np.array(["a"] * 20),
    )
    with pytest.raises(ValueError, match="0 of 20 detections have a drb score"):
        load_dataset("ztf", path=path)
    with pytest.raises(TypeError, match="Unexpected options"):
        load_dataset("stamps", n_samples=10, path=path)


def test_grouped_split_keeps_objects_together():
    from sk_covvae.experiments import grouped_split

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 1000).astype(str)
    split = grouped_split(np.zeros(1000), groups, random_state=1)
    parts = [set(groups[split[k]]) for k in ("train", "validation", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sorted(np.concatenate(list(split.values()))) == list(range(1000))
    sizes = [len(split[k]) / 1000 for k in ("train", "validation", "test")]
    np.testing.assert_allclose(sizes, [0.6, 0.25, 0.15], atol=0.05)
    again = grouped_split(np.zeros(1000), groups, random_state=1)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_ztf_comparison_is_grouped_and_reports_channels(ztf):
    small = {k: v for k, v in ztf.items()}
    keep = np.arange(0, len(ztf["y"]), 4)
    for key in ("X", "y", "y_rb", "drb", "groups", "normal"):
        small[key] = np.asarray(ztf[key])[keep]
    out = run_comparison(
        small,
        n_components=(2,),
        seeds=(0,),
        covariances=("spherical", "banded"),
        max_epochs=1,
        **TINY,
    )
    groups = np.asarray(small["groups"])
    test = out["test_index"][0]
    train = np.setdiff1d(np.arange(len(groups)), test)
    assert not set(groups[test]) & set(groups[train])
    banded = next(r for r in out["runs"] if r["covariance"] == "banded")
    spherical = next(r for r in out["runs"] if r["covariance"] == "spherical")
    for name in ("science", "template", "difference"):
        assert np.isfinite(banded[f"ch:{name}:nll_per_pixel"])
        assert -1 < banded[f"ch:{name}:learned_corr_x"] < 1
        assert spherical[f"ch:{name}:learned_corr_x"] == 0.0
    assert 0 <= banded["rf_plus_roc_auc"] <= 1
    assert 0 <= banded["anomaly_auroc"] <= 1
    row = next(r for r in out["summary"] if r["method"] == "banded")
    assert row["ch:difference:nll_per_pixel"]["n"] == 1
    json.dumps({k: v for k, v in out.items() if k not in ("models", "test_index")})
