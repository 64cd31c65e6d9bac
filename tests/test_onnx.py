"""ONNX export: the graph under onnxruntime gives the estimator's numbers.

Every covariance and neighbourhood, with and without the stretch, one
particle and the importance-weighted bound, on tiny 8x8 models and, for the
banded 'cross' model, on real ZTF difference stamps (``../shared/data``;
simulated stamps when that is absent); dynamic batch sizes; a multi-channel
model when the estimator takes ``image_shape=(C, H, W)``; and the errors.
Each model is fitted and exported once per module (an export takes seconds).
"""

import sys

import numpy as np
import pytest
from conftest import SHARED_DATA, make_images
from sklearn.exceptions import NotFittedError

from sk_covvae import CovarianceVAE
from sk_covvae import _onnx as onnx_export
from sk_covvae._onnx import export_onnx
from sk_covvae.datasets import make_difference_stamps

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


# Measured on the ZTF stamps: scores agree to 1e-7 to 4e-6 relative (the
# most on the most extreme stamps without the stretch; float32 network
# layers, float64 sums on both sides), latents to 3e-7 of their magnitude.
SCORE_RTOL = 1e-5
LATENT_ATOL = 1e-5

# The 8x8 models; the banded model with the 'cross' neighbourhood and the
# stretch is the one fitted on 21x21 stamps below. Exports cost seconds, so
# each model covers several things: the importance-weighted bound
# (n_score_particles > 1) rides on the spherical model, the cheapest.
CONFIGS = {
    "spherical-iwae": dict(covariance="spherical", stretch=None, n_score_particles=2),
    "diagonal-stretch": dict(covariance="diagonal", stretch=5.0),
    "banded-3x3": dict(covariance="banded", neighbourhood="3x3", stretch=None),
}


def _fit(X, **params):
    params = dict(n_components=2, max_epochs=2, device="cpu", random_state=0) | params
    return CovarianceVAE(**params).fit(X)


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, X):
    return session.run(None, {"X": np.ascontiguousarray(X, dtype=np.float32)})[0]


def _assert_scores_close(got, want):
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=SCORE_RTOL, atol=0)


def _assert_latents_close(got, want):
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=LATENT_ATOL * scale)


@pytest.fixture(scope="module")
def images():
    """8x8 images, float32, and a few 30 times wider (the stretch's tails)."""
    X, _ = make_images(120)
    X = X.astype(np.float32)
    wide = (X[:10] - X.mean()) * 30.0 + X.mean()
    return X, np.vstack([X, wide])


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, images, tmp_path_factory):
    X, _ = images
    est = _fit(X, **CONFIGS[request.param])
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    return est, export_onnx(est, path, "score_samples")


def test_score_parity_every_covariance(exported, images):
    est, path = exported
    _, X = images
    _assert_scores_close(_run(_session(path), X), est.score_samples(X))


# --------------------------------------------------------------------------
# 21x21 difference stamps, real where the shared data is present
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stamps():
    """Real ZTF difference cutouts (central 21x21, rows without NaN), float32.

    The shipped ``ztf_triplets`` of ``../shared/data``; where that is absent,
    simulated difference stamps, so that the banded model is always checked
    (:func:`test_real_stamps_present` then says what was skipped).
    """
    path = SHARED_DATA / "ztf_triplets" / "ztf_triplets.npz"
    if not path.is_file():
        return make_difference_stamps(1200, random_state=0).data.astype(np.float32)
    with np.load(path) as f:
        cutouts = f["X"][:, 2, 21:42, 21:42]  # channel 2: the difference
    X = cutouts.reshape(len(cutouts), -1)
    return X[np.isfinite(X).all(1)].astype(np.float32)


def test_real_stamps_present(stamps):
    path = SHARED_DATA / "ztf_triplets" / "ztf_triplets.npz"
    if not path.is_file():
        pytest.skip(f"shared data {path} is absent: parity checked on simulated stamps")
    assert stamps.shape[1] == 441 and len(stamps) > 1000


@pytest.fixture(scope="module")
def stamp_model(stamps, tmp_path_factory):
    """The banded ('cross', stretch 5) model of 21x21 stamps, both graphs."""
    est = _fit(stamps[:400], covariance="banded", neighbourhood="cross", stretch=5.0)
    folder = tmp_path_factory.mktemp("stamps")
    # The public method, which calls export_onnx.
    score = est.export_onnx(folder / "score.onnx")
    latent = est.export_onnx(folder / "latent.onnx", method="transform")
    return est, _session(score), _session(latent), score


def test_banded_stamps_score_and_transform_parity(stamp_model, stamps):
    est, scores, latents, _ = stamp_model
    got = _run(scores, stamps)
    _assert_scores_close(got, est.score_samples(stamps))
    _assert_latents_close(_run(latents, stamps), est.transform(stamps))
    # The scores depend on the image: not a constant, and two different
    # stamps score differently.
    assert not np.array_equal(stamps[0], stamps[1])
    assert got[0] != got[1]
    assert np.ptp(got) > 10.0


@pytest.mark.parametrize("n", [1, 7, 300])
def test_dynamic_batch(stamp_model, stamps, n):
    est, scores, latents, _ = stamp_model
    X = stamps[100 : 100 + n]
    _assert_scores_close(_run(scores, X), est.score_samples(X))
    _assert_latents_close(_run(latents, X), est.transform(X))


def test_metadata(stamp_model):
    est, _, _, path = stamp_model
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    # Standard ONNX operators only (no torch or onnxscript functions): any
    # ONNX runtime can run it, not only onnxruntime's Python package.
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert not model.functions
    props = {p.key: p.value for p in model.metadata_props}
    assert props["method"] == "score_samples"
    assert props["input"] == "X" and props["output"] == "scores"
    assert props["n_features"] == "441" and props["image_shape"] == "21,21"
    assert props["covariance"] == "banded" and props["stretch"] == "5.0"


# --------------------------------------------------------------------------
# multi-channel stamps
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multichannel(images):
    X, _ = images
    # Two channels of different offset and spread (per-channel scaling).
    X2 = np.hstack([X, 3.0 * X[::-1] + 2.0]).astype(np.float32)
    est = _fit(X2, image_shape=(2, 8, 8), covariance="banded")
    return est, X2


def test_multichannel_parity(multichannel, tmp_path):
    est, X = multichannel
    assert est.offset_.shape == (2,)
    path = export_onnx(est, tmp_path / "m.onnx")
    got = _run(_session(path), X)
    _assert_scores_close(got, est.score_samples(X))


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(images):
    X, _ = images
    return _fit(X, covariance="diagonal", max_epochs=1)


def test_unfitted(tmp_path):
    with pytest.raises(NotFittedError):
        export_onnx(CovarianceVAE(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("method", ["predict", "inverse_transform", None])
def test_bad_method(small_model, tmp_path, method):
    with pytest.raises(ValueError, match="method must be one of"):
        export_onnx(small_model, tmp_path / "m.onnx", method)


@pytest.mark.parametrize("opset", ["18", 17, 18.0, True])
def test_bad_opset(small_model, tmp_path, opset):
    with pytest.raises(ValueError, match="opset must be an int >= 18"):
        export_onnx(small_model, tmp_path / "m.onnx", opset=opset)


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_package(small_model, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import now fails
    with pytest.raises(ImportError, match=rf"{package}.*sk_covvae\[onnx\]"):
        export_onnx(small_model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_self_check_catches_a_wrong_graph(exported, small_model):
    # The graph of another model of the same image size is not this one's.
    _, path = exported
    with pytest.raises(RuntimeError, match="does not reproduce score_samples"):
        onnx_export._verify(small_model, path, "score_samples", ort)


def test_self_check_reports_a_graph_onnxruntime_cannot_run(small_model, tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx graph")
    with pytest.raises(RuntimeError, match="onnxruntime .* cannot run"):
        onnx_export._verify(small_model, path, "score_samples", ort)
