"""Tests of sk_covvae.datasets: Fashion-MNIST, the stamp simulator, readers."""

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score

from sk_covvae.datasets import (
    ARTEFACT_TYPES,
    load_fashion_mnist,
    load_hits_chunks,
    make_difference_stamps,
    read_alert_cutouts,
)
from sk_covvae.datasets import _calibration as cal
from sk_covvae.datasets._fashion_mnist import (
    DEFAULT_FASHION_MNIST_HOME,
    FASHION_MNIST_ENV,
)

FMNIST_HOME = Path(DEFAULT_FASHION_MNIST_HOME)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_HOME / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


@pytest.fixture(scope="module")
def stamps():
    return make_difference_stamps(3000, random_state=0)


# --------------------------------------------------------------------------
# simulator
# --------------------------------------------------------------------------


def test_stamps_shapes_and_dtypes(stamps):
    n = 3000
    assert stamps.data.shape == (n, 441)
    assert stamps.data.dtype == np.float32
    for key in ("template", "science", "difference", "snr_image"):
        assert stamps[key].shape == (n, 21, 21)
        assert stamps[key].dtype == np.float32
        assert np.all(np.isfinite(stamps[key]))
    for key in ("snr", "injected_snr", "seeing", "template_seeing", "sky"):
        assert stamps[key].shape == (n,)
    assert set(np.unique(stamps.target)) == {0, 1}
    assert stamps.image_shape == (21, 21)
    assert "HiTS" in stamps.DESCR


def test_stamps_data_is_noise_normalised_difference(stamps):
    np.testing.assert_allclose(
        stamps.data,
        stamps.difference.reshape(len(stamps.data), -1) / stamps.noise_sigma[:, None],
        rtol=1e-5,
        atol=1e-6,
    )


def test_stamps_deterministic():
    a = make_difference_stamps(300, random_state=42)
    b = make_difference_stamps(300, random_state=42)
    c = make_difference_stamps(300, random_state=43)
    for key in ("data", "template", "science", "snr", "artefact_type"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a.data, c.data)
    rs = np.random.RandomState(0)
    X1, _ = make_difference_stamps(50, random_state=rs, return_X_y=True)
    X2, _ = make_difference_stamps(50, random_state=rs, return_X_y=True)
    assert not np.array_equal(X1, X2)  # a RandomState instance is advanced


@pytest.mark.parametrize("real_fraction", [0.0, 0.3, 0.5, 1.0])
def test_stamps_class_balance(real_fraction):
    X, y = make_difference_stamps(
        201, real_fraction=real_fraction, random_state=0, return_X_y=True
    )
    assert X.shape == (201, 441)
    assert y.sum() == round(201 * real_fraction)


def test_every_artefact_type_appears(stamps):
    types, counts = np.unique(stamps.artefact_type, return_counts=True)
    assert set(types) == {"real", *ARTEFACT_TYPES}
    assert np.all(stamps.target == (stamps.artefact_type == "real"))
    # even a small sample gets every type, thanks to exact allocation
    small = make_difference_stamps(40, random_state=1)
    assert set(small.artefact_type) == {"real", *ARTEFACT_TYPES}


def test_artefact_weights_select_types():
    s = make_difference_stamps(
        100, artefact_weights={"cosmic_ray": 1.0}, random_state=0
    )
    assert set(s.artefact_type) == {"real", "cosmic_ray"}


def _neighbour_correlation(images):
    """Pooled lag-1 correlation of background pixels (top five rows)."""
    e = images[:, :5, :].astype(np.float64)
    e = e - e.mean(axis=(1, 2), keepdims=True)
    var = (e**2).mean()
    horiz = (e[:, :, :-1] * e[:, :, 1:]).mean() / var
    vert = (e[:, :-1, :] * e[:, 1:, :]).mean() / var
    return horiz, vert


def test_background_noise_positively_correlated(stamps):
    quiet = (stamps.artefact_type == "real") & ~stamps.has_host
    images = stamps.data[quiet].reshape(-1, 21, 21)
    horiz, vert = _neighbour_correlation(images)
    assert horiz > 0.1 and vert > 0.1
    # the normalisation gives unit background variance
    assert 0.8 < images[:, :5].var() < 1.25
    # white noise of the same size would give ~0: the correlation is the PSF
    # matching and the resampling, not chance
    white = np.random.default_rng(0).standard_normal(images.shape)
    assert abs(_neighbour_correlation(white)[0]) < 0.03


def test_background_noise_matches_hits_sky_sigma(stamps):
    # science background noise ~ observed HiTS sky_sigma (median 5.44 ADU)
    sci = stamps.science[:, :4, :].astype(np.float64)
    sigma = np.median(sci.std(axis=(1, 2)))
    assert 0.9 * cal.SKY_SIGMA_MEDIAN < sigma < 1.1 * cal.SKY_SIGMA_MEDIAN


def test_real_snr_percentiles_like_hits(stamps):
    p5, p50, p95 = np.percentile(stamps.snr[stamps.target == 1], [5, 50, 95])
    assert 6.0 < p5 < 8.0
    assert 10.5 < p50 < 14.0
    assert 36.0 < p95 < 55.0


def test_bogus_snr_signs(stamps):
    snr = stamps.snr
    t = stamps.artefact_type
    assert np.all(snr[t == "noise_peak"] >= 5.0 - 1e-6)
    assert np.median(snr[t == "negative"]) < -5
    assert np.median(snr[t == "real"]) > 10


def test_seeing_drawn_from_hits_distribution(stamps):
    q = np.quantile(stamps.seeing, [0.05, 0.5])
    np.testing.assert_allclose(q, [1.07, 1.36], rtol=0.06)
    top = cal.draw_from_quantiles(cal.SEEING_FWHM_ARCSEC, cal.SEEING_MAX_LEVEL)
    assert stamps.seeing.max() <= top + 1e-9


def test_random_forest_auc_in_calibrated_range():
    """Raw-pixel RandomForest is good but not at ceiling (0.85 < AUC < 0.97).

    Same protocol as docs/datasets_notes.md (5,000 training stamps) with
    fewer trees, to keep the test fast; 200 trees give a slightly higher AUC.
    """
    X, y = make_difference_stamps(7000, random_state=0, return_X_y=True)
    rf = RandomForestClassifier(n_estimators=60, random_state=0, n_jobs=2)
    rf.fit(X[:5000], y[:5000])
    auc = roc_auc_score(y[5000:], rf.predict_proba(X[5000:])[:, 1])
    assert 0.85 < auc < 0.97


@pytest.mark.parametrize("stamp_size", [9, 15, 31])
def test_other_stamp_sizes(stamp_size):
    s = make_difference_stamps(20, stamp_size=stamp_size, random_state=0)
    assert s.data.shape == (20, stamp_size**2)
    assert s.difference.shape == (20, stamp_size, stamp_size)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.5}, "n_samples"),
        ({"real_fraction": 1.5}, "real_fraction"),
        ({"stamp_size": 20}, "stamp_size"),
        ({"stamp_size": 5}, "stamp_size"),
        ({"host_fraction": -0.1}, "host_fraction"),
        ({"artefact_weights": {"ufo": 1.0}}, "ufo"),
        ({"artefact_weights": {"dipole": 0.0}}, "artefact_weights"),
        ({"artefact_weights": [0.5]}, "artefact_weights"),
    ],
)
def test_stamps_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_difference_stamps(**kwargs)


def test_datasets_do_not_import_torch():
    code = (
        "import sys, importlib.util as u, pathlib;"
        "p = pathlib.Path(r'%s');"
        "sys.modules.pop('sk_covvae', None);"
        # import the subpackage without running sk_covvae/__init__ (which
        # imports the torch estimator)
        "import types; pkg = types.ModuleType('sk_covvae');"
        "pkg.__path__ = [str(p)]; sys.modules['sk_covvae'] = pkg;"
        "import sk_covvae.datasets as d;"
        "d.make_difference_stamps(10, random_state=0);"
        "print('torch' in sys.modules)"
    ) % (Path(__file__).resolve().parents[1] / "sk_covvae")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------


@needs_fmnist
def test_load_fashion_mnist_real_files():
    fm = load_fashion_mnist()
    assert fm.data.shape == (70000, 784)
    assert fm.data.dtype == np.float32
    assert fm.data.min() == 0.0 and fm.data.max() == 1.0
    assert fm.images.shape == (70000, 28, 28)
    np.testing.assert_array_equal(np.bincount(fm.target), np.full(10, 7000))
    np.testing.assert_array_equal(
        np.bincount(fm.target[fm.test_index]), np.full(10, 1000)
    )
    assert len(fm.train_index) == 60000 and fm.test_index[0] == 60000
    assert len(fm.target_names) == 10
    assert "Zalando" in fm.DESCR
    X, y = load_fashion_mnist(return_X_y=True)
    np.testing.assert_array_equal(X[:5], fm.data[:5])


def _write_idx(path, array):
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(
        tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28))
    )
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6))
    _write_idx(
        tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (4, 28, 28))
    )
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    return tmp_path


def test_load_fashion_mnist_data_home_and_env(tiny_fmnist, monkeypatch):
    fm = load_fashion_mnist(data_home=tiny_fmnist)
    assert fm.data.shape == (10, 784)
    np.testing.assert_array_equal(fm.test_index, [6, 7, 8, 9])
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tiny_fmnist))
    X, y = load_fashion_mnist(return_X_y=True)
    assert X.shape == (10, 784)
    np.testing.assert_array_equal(y, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3])


def test_load_fashion_mnist_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist()
    msg = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "data_home" in msg and FASHION_MNIST_ENV in msg


def test_load_fashion_mnist_rejects_corrupt_file(tiny_fmnist):
    _write_idx(tiny_fmnist / "train-labels-idx1-ubyte.gz", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="magic number"):
        load_fashion_mnist(data_home=tiny_fmnist)


# --------------------------------------------------------------------------
# Deep-HiTS chunks
# --------------------------------------------------------------------------


def _deep_hits_chunk(n, seed):
    s = make_difference_stamps(n, random_state=seed)
    return {
        "diff_images": s.difference.reshape(n, -1),
        "sci_images": s.science.reshape(n, -1),
        "temp_images": s.template.reshape(n, -1),
        "SNR_images": s.snr_image.reshape(n, -1),
        "labels": s.target,
        "SNRs": s.snr,
    }, s


def test_load_hits_chunks_round_trip(tmp_path):
    c0, s0 = _deep_hits_chunk(30, 0)
    c1, s1 = _deep_hits_chunk(20, 1)
    (tmp_path / "chunk_0.pkl").write_bytes(pickle.dumps(c0, protocol=2))
    with gzip.open(tmp_path / "chunk_1.pkl.gz", "wb") as f:
        pickle.dump(c1, f)
    out = load_hits_chunks([tmp_path / "chunk_0.pkl", tmp_path / "chunk_1.pkl.gz"])
    assert out.data.shape == (50, 441)
    np.testing.assert_array_equal(out.target, np.r_[s0.target, s1.target])
    np.testing.assert_array_equal(out.difference[:30], s0.difference)
    np.testing.assert_allclose(out.snr[30:], s1.snr)
    # the noise estimated from the SNR image is close to the simulator's own
    np.testing.assert_allclose(
        out.noise_sigma, np.r_[s0.noise_sigma, s1.noise_sigma], rtol=0.25
    )
    assert out.source[0].endswith("chunk_0.pkl")
    X, y = load_hits_chunks(str(tmp_path / "chunk_0.pkl"), return_X_y=True)
    assert X.shape == (30, 441) and X.dtype == np.float32


def test_load_hits_chunks_errors(tmp_path):
    chunk, _ = _deep_hits_chunk(5, 0)
    del chunk["SNRs"]
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(chunk))
    with pytest.raises(ValueError, match="SNRs"):
        load_hits_chunks(tmp_path / "bad.pkl")
    chunk, _ = _deep_hits_chunk(5, 0)
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(chunk))
    with pytest.raises(ValueError, match="stamp_size=15"):
        load_hits_chunks(tmp_path / "ok.pkl", stamp_size=15)
    with pytest.raises(ValueError, match="empty"):
        load_hits_chunks([])


# --------------------------------------------------------------------------
# ZTF alerts and HiTS calibration files
# --------------------------------------------------------------------------


def test_read_alert_cutouts_shared_packets():
    folder = shared("ztf_alerts")
    alerts = read_alert_cutouts(folder)
    n = len(sorted(folder.glob("*.avro")))
    assert alerts.data.shape == (n, 441)
    assert alerts.difference.shape == (n, 21, 21)
    assert np.all(np.isfinite(alerts.data))
    assert np.all((alerts.rb > 0) & (alerts.rb < 1))
    assert alerts.candid.dtype == np.int64 and np.all(alerts.candid > 0)
    # the edge-clipped cutouts are recognised
    clipped = np.any(alerts.cutout_shape < 63, axis=1)
    assert clipped.sum() >= 1
    # candidates sit at the centre: the central 3x3 holds a bright pixel
    centre = alerts.data.reshape(n, 21, 21)[:, 9:12, 9:12].max(axis=(1, 2))
    assert np.median(centre) > 3
    skipped = read_alert_cutouts(folder, on_edge="skip")
    assert len(skipped.data) == n - alerts.padded.sum()
    X, rb = read_alert_cutouts(sorted(folder.glob("*.avro"))[:2], return_X_y=True)
    assert X.shape == (2, 441) and rb.shape == (2,)


def test_read_alert_cutouts_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="stamp_size"):
        read_alert_cutouts(tmp_path, stamp_size=20)
    with pytest.raises(ValueError, match="on_edge"):
        read_alert_cutouts(tmp_path, on_edge="crop")
    with pytest.raises(FileNotFoundError):
        read_alert_cutouts(tmp_path / "nope.avro")


def test_calibration_tables_match_shared_hits_files():
    np.testing.assert_allclose(
        cal.draw_from_quantiles(cal.SEEING_FWHM_ARCSEC, [0.05, 0.5, 0.95]),
        [1.07, 1.373, 2.602],
        atol=0.005,
    )
    path = shared("hits", "hits2015_sn_science_stamps.npz")
    with np.load(path) as f:
        present = f["images"].reshape(-1, 441).any(axis=1)
        sky = f["sky_brightness"].ravel()[present]
        sigma = f["sky_sigma"].ravel()[present]
    np.testing.assert_allclose(
        np.quantile(sky, cal.QUANTILE_LEVELS), cal.SKY_ADU, atol=1e-3
    )
    assert np.median(sigma) == pytest.approx(cal.SKY_SIGMA_MEDIAN, abs=1e-3)
