"""Model files: CovarianceVAE.save and CovarianceVAE.load."""

import io
import json
import pickle
import warnings
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEVICE

from sk_covvae import CovarianceVAE, LatentCollapseWarning
from sk_covvae._persistence import FORMAT_NAME, FORMAT_VERSION

short_fit = pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")

CASES = [
    {"covariance": "banded"},
    {"covariance": "banded", "neighbourhood": "3x3"},
    {"covariance": "diagonal"},
    {"covariance": "spherical"},
]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case.values()))
def fitted(request, data):
    X, _ = data
    vae = CovarianceVAE(
        n_components=3,
        max_epochs=3,
        batch_size=64,
        channels=(4, 8),
        hidden_units=32,
        random_state=0,
        **request.param,
    )
    # Three epochs on a small net: a collapsed latent space is beside the point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatentCollapseWarning)
        return vae.fit(X)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "model.covvae"
    assert fitted.save(path) is fitted
    return path


def test_round_trip_is_bit_identical(fitted, saved, data):
    X, _ = data
    loaded = CovarianceVAE.load(saved, device=DEVICE)
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))
    np.testing.assert_array_equal(loaded.score_samples(X), fitted.score_samples(X))
    Z = fitted.transform(X[:20])
    np.testing.assert_array_equal(
        loaded.inverse_transform(Z), fitted.inverse_transform(Z)
    )
    np.testing.assert_array_equal(
        loaded.sample(5, random_state=1), fitted.sample(5, random_state=1)
    )
    np.testing.assert_array_equal(
        loaded.transform(X.astype(np.float32)), fitted.transform(X.astype(np.float32))
    )


def test_fitted_attributes_and_params(fitted, saved):
    loaded = CovarianceVAE.load(saved)
    params = fitted.get_params()
    params["device"] = "cpu"
    assert loaded.get_params() == params
    for name in ("image_shape_", "n_features_in_", "offset_", "scale_", "stretch_"):
        assert getattr(loaded, name) == getattr(fitted, name)
    assert loaded.n_epochs_ == fitted.n_epochs_
    assert loaded.n_active_components_ == fitted.n_active_components_
    assert loaded.device_ == fitted.device_
    np.testing.assert_array_equal(loaded.kl_per_component_, fitted.kl_per_component_)
    np.testing.assert_array_equal(loaded.latent_activity_, fitted.latent_activity_)
    assert str(loaded.net_.device) == "cpu"
    assert not hasattr(loaded, "feature_names_in_")
    np.testing.assert_array_equal(
        loaded.get_feature_names_out(), fitted.get_feature_names_out()
    )


def test_manifest(fitted, saved):
    with zipfile.ZipFile(saved) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        names = archive.namelist()
    assert manifest["format"] == FORMAT_NAME
    assert manifest["format_version"] == FORMAT_VERSION
    assert set(manifest["versions"]) >= {"sk_covvae", "torch", "sklearn", "skorch"}
    assert manifest["params"]["channels"] == [4, 8]
    assert manifest["attributes"]["image_shape_"] == list(fitted.image_shape_)
    weights = {n for n in names if n.startswith("weights/")}
    assert weights == {f"weights/{key}.npy" for key in fitted.net_.module_.state_dict()}
    # No pickle anywhere: every array loads with allow_pickle=False.
    assert all(n == "manifest.json" or n.endswith(".npy") for n in names)


def test_saving_twice_writes_the_same_bytes(fitted, saved, tmp_path):
    again = tmp_path / "again.zip"
    fitted.save(again)
    assert again.read_bytes() == saved.read_bytes()


def test_load_leaves_global_rng_alone(saved):
    state = torch.get_rng_state()
    CovarianceVAE.load(saved)
    assert torch.equal(torch.get_rng_state(), state)


def test_loaded_model_pickles(fitted, saved, data):
    X, _ = data
    loaded = pickle.loads(pickle.dumps(CovarianceVAE.load(saved)))
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))


@short_fit
def test_feature_names_and_random_state_instance(data, tmp_path):
    X, _ = data
    frame = pd.DataFrame(X, columns=[f"p{i}" for i in range(X.shape[1])])
    vae = CovarianceVAE(
        n_components=2,
        max_epochs=1,
        channels=(2, 2),
        hidden_units=8,
        random_state=np.random.RandomState(0),
    ).fit(frame)
    path = tmp_path / "model.covvae"
    vae.save(path)
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["params"]["random_state"] is None
    assert any("RandomState" in note for note in manifest["notes"])
    loaded = CovarianceVAE.load(path)
    assert loaded.random_state is None
    np.testing.assert_array_equal(loaded.feature_names_in_, vae.feature_names_in_)
    np.testing.assert_array_equal(loaded.transform(frame), vae.transform(frame))


@short_fit
def test_warm_start_after_load(fitted, saved, data):
    X, _ = data
    loaded = CovarianceVAE.load(saved)
    loaded.set_params(warm_start=True, max_epochs=2)
    loaded.fit(X)
    assert 1 <= loaded.n_epochs_ <= 2
    assert np.all(np.isfinite(loaded.score_samples(X)))


def test_unfitted_save_raises(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        CovarianceVAE().save(tmp_path / "model.covvae")
    assert not list(tmp_path.iterdir())


def _rewrite(source, target, change):
    """Copy the zip ``source`` to ``target``, passing each member to ``change``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)


def test_not_a_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.*not a zip archive"):
        CovarianceVAE.load(path)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "x")
    with pytest.raises(ValueError, match=r"other\.zip.*no manifest\.json"):
        CovarianceVAE.load(other)
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("manifest.json", json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a model file"):
        CovarianceVAE.load(other)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(saved, tmp_path, keep):
    data = saved.read_bytes()
    path = tmp_path / "cut.covvae"
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(ValueError, match=r"cut\.covvae.*(truncated|corrupt)"):
        CovarianceVAE.load(path)


def test_newer_format_version(saved, tmp_path):
    path = tmp_path / "newer.covvae"

    def change(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["format_version"] = FORMAT_VERSION + 1
        return json.dumps(manifest)

    _rewrite(saved, path, change)
    with pytest.raises(ValueError, match=r"newer\.covvae.*format version 2.*upgrade"):
        CovarianceVAE.load(path)


def test_weights_of_the_wrong_shape(saved, tmp_path):
    path = tmp_path / "wrong.covvae"

    def change(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["params"]["hidden_units"] += 1
        return json.dumps(manifest)

    _rewrite(saved, path, change)
    with pytest.raises(ValueError, match=r"wrong\.covvae.*shapes unlike"):
        CovarianceVAE.load(path)


def test_missing_tensor(saved, tmp_path):
    path = tmp_path / "missing.covvae"
    with zipfile.ZipFile(saved) as archive:
        first = next(n for n in archive.namelist() if n.startswith("weights/"))
    _rewrite(saved, path, lambda name, data: None if name == first else data)
    with pytest.raises(ValueError, match=r"missing\.covvae.*missing tensors"):
        CovarianceVAE.load(path)


def test_pickled_array_is_refused(saved, tmp_path):
    path = tmp_path / "pickled.covvae"
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)

    def change(name, data):
        return buffer.getvalue() if name.startswith("arrays/kl") else data

    _rewrite(saved, path, change)
    with pytest.raises(ValueError, match=r"pickled\.covvae.*not a plain \.npy"):
        CovarianceVAE.load(path)


def test_fitted_array_of_the_wrong_shape(saved, tmp_path):
    path = tmp_path / "arrays.covvae"

    def change(name, data):
        if not name.startswith("arrays/latent"):
            return data
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(7), allow_pickle=False)
        return buffer.getvalue()

    _rewrite(saved, path, change)
    with pytest.raises(ValueError, match=r"arrays\.covvae.*latent_activity_"):
        CovarianceVAE.load(path)


def test_load_on_auto_device(fitted, saved, data):
    X, _ = data
    loaded = CovarianceVAE.load(saved, device="auto")
    assert loaded.device == "auto"
    assert torch.device(loaded.net_.device).type == DEVICE
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))
