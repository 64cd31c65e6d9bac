"""Model files: save a fitted :class:`CovarianceVAE` and load it back.

A model file is a zip archive holding

- ``manifest.json``: the format's name and version, the versions of the
  packages that wrote it, the estimator's parameters (``get_params()``, made
  JSON-safe) and its scalar fitted attributes;
- ``arrays/<name>.npy``: the fitted arrays (``kl_per_component_``,
  ``latent_activity_``);
- ``weights/<key>.npy``: one tensor of the module's ``state_dict`` each.

Every array is in numpy's ``.npy`` format and read with
``allow_pickle=False``: loading a model file runs no code from it, unlike a
pickle. Loading rebuilds the skorch net and module as ``fit`` does, without
training, and copies the weights in, so a loaded model computes what the
saved one computes, bit for bit on the same device.
"""

import contextlib
import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from numbers import Integral, Real

import numpy as np
import sklearn
import skorch
import torch
from sklearn.utils.validation import check_is_fitted

FORMAT_NAME = "sk_covvae.CovarianceVAE"
FORMAT_VERSION = 1

_MANIFEST = "manifest.json"
_WEIGHTS = "weights/"
_ARRAYS = "arrays/"
_ARRAY_ATTRIBUTES = ("kl_per_component_", "latent_activity_")
# A fixed timestamp for every member: saving the same model twice with the
# same package versions writes the same bytes.
_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_RANDOM_STATE_NOTE = (
    "random_state was a numpy RandomState instance, which a model file does "
    "not hold; it is loaded as None."
)


def _json_safe(value, name):
    """``value`` as JSON data: tuples as lists, numpy scalars as Python's."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    if isinstance(value, tuple | list | np.ndarray):
        return [_json_safe(item, name) for item in value]
    raise TypeError(
        f"The parameter {name}={value!r} of type {type(value).__name__} cannot be "
        "written to a model file."
    )


def _params_to_json(params):
    """``get_params()`` as JSON data, and notes on what could not be kept."""
    out, notes = {}, []
    for name, value in params.items():
        if name == "random_state" and isinstance(value, np.random.RandomState):
            out[name] = None
            notes.append(_RANDOM_STATE_NOTE)
        else:
            out[name] = _json_safe(value, name)
    return out, notes


def _params_from_json(params):
    """The inverse of ``_params_to_json`` for the tuple-valued parameters."""
    params = dict(params)
    for name in ("channels", "image_shape"):
        if isinstance(params.get(name), list):
            params[name] = tuple(params[name])
    return params


def _scaling_to_json(value):
    """A fitted offset or scale: a float, or a list of one float per channel."""
    if np.ndim(value) == 0:
        return float(value)
    return [float(v) for v in np.asarray(value)]


def _scaling_from_json(value):
    """The inverse of ``_scaling_to_json``."""
    if isinstance(value, list):
        return np.array([float(v) for v in value], dtype=np.float64)
    return float(value)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _write_member(archive, name, data):
    info = zipfile.ZipInfo(name, date_time=_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def save(estimator, path):
    """Write the fitted ``estimator`` to the model file ``path``.

    See :meth:`sk_covvae.CovarianceVAE.save`. The file is written next to
    ``path`` under a temporary name and then renamed, so that ``path`` is
    either the old file or the complete new one.
    """
    from sk_covvae import __version__

    check_is_fitted(estimator)
    params, notes = _params_to_json(estimator.get_params(deep=False))
    attributes = {
        "image_shape_": [int(s) for s in estimator.image_shape_],
        "n_features_in_": int(estimator.n_features_in_),
        # One value, or one per channel for (C, H, W) images.
        "offset_": _scaling_to_json(estimator.offset_),
        "scale_": _scaling_to_json(estimator.scale_),
        "stretch_": (None if estimator.stretch_ is None else float(estimator.stretch_)),
        "n_epochs_": int(estimator.n_epochs_),
        "n_active_components_": int(estimator.n_active_components_),
        "device_": str(estimator.device_),
    }
    if hasattr(estimator, "feature_names_in_"):
        attributes["feature_names_in_"] = [
            str(name) for name in estimator.feature_names_in_
        ]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "versions": {
            "sk_covvae": __version__,
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "skorch": skorch.__version__,
            "numpy": np.__version__,
        },
        "params": params,
        "notes": notes,
        "attributes": attributes,
    }
    state = estimator.net_.module_.state_dict()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file, zipfile.ZipFile(file, "w") as archive:
            _write_member(
                archive, _MANIFEST, json.dumps(manifest, indent=2, allow_nan=False)
            )
            for name in _ARRAY_ATTRIBUTES:
                _write_member(
                    archive,
                    f"{_ARRAYS}{name}.npy",
                    _npy_bytes(np.asarray(getattr(estimator, name))),
                )
            for key, tensor in state.items():
                _write_member(
                    archive,
                    f"{_WEIGHTS}{key}.npy",
                    _npy_bytes(tensor.detach().cpu().numpy()),
                )
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _bad(path, problem):
    return ValueError(f"Cannot load {path!r} as a CovarianceVAE model file: {problem}")


def _read_npy(archive, member, path):
    try:
        data = archive.read(member)
        return np.load(io.BytesIO(data), allow_pickle=False)
    except KeyError:
        raise _bad(path, f"the member {member!r} is missing.") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _bad(path, f"the member {member!r} is corrupt or truncated ({exc}).")
    except ValueError as exc:
        raise _bad(path, f"the member {member!r} is not a plain .npy array ({exc}).")


def _read_manifest(archive, path):
    try:
        raw = archive.read(_MANIFEST)
    except KeyError:
        raise _bad(path, f"it has no {_MANIFEST}; it is not a model file.") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _bad(path, f"its manifest is corrupt or truncated ({exc}).") from exc
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"its manifest is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _bad(
            path,
            f"its manifest does not declare the format {FORMAT_NAME!r}; it is "
            "not a model file.",
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(path, f"unknown format version {version!r}.")
    if version > FORMAT_VERSION:
        written = manifest.get("versions", {}).get("sk_covvae", "unknown")
        raise _bad(
            path,
            f"it has format version {version}, newer than the version "
            f"{FORMAT_VERSION} this sk_covvae reads (it was written by sk_covvae "
            f"{written}); upgrade sk_covvae to load it.",
        )
    for key in ("params", "attributes"):
        if not isinstance(manifest.get(key), dict):
            raise _bad(path, f"its manifest has no {key!r} mapping.")
    return manifest


def _check_weights(state, expected, path):
    """Raise ValueError unless ``state`` fits the rebuilt module's ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong:
        problems.append("shapes unlike the architecture's: " + "; ".join(wrong))
    if problems:
        raise _bad(
            path,
            "its weights do not fit the architecture of its parameters ("
            + ", ".join(problems)
            + ").",
        )


def load(cls, path, device="cpu"):
    """Read the model file ``path`` into a fitted ``cls`` on ``device``.

    See :meth:`sk_covvae.CovarianceVAE.load`.
    """
    from sk_covvae._estimator import _forked_rng, _resolve_device

    shown = os.fspath(path)
    try:
        archive = zipfile.ZipFile(shown)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise _bad(
            shown, f"it is not a zip archive, or it is truncated ({exc})."
        ) from exc
    with archive:
        manifest = _read_manifest(archive, shown)
        arrays = {
            name: _read_npy(archive, f"{_ARRAYS}{name}.npy", shown)
            for name in _ARRAY_ATTRIBUTES
        }
        state = {
            member[len(_WEIGHTS) : -len(".npy")]: _read_npy(archive, member, shown)
            for member in archive.namelist()
            if member.startswith(_WEIGHTS) and member.endswith(".npy")
        }

    params = _params_from_json(manifest["params"])
    params["device"] = device
    try:
        estimator = cls()
        unknown = sorted(set(params) - set(estimator.get_params(deep=False)))
        if unknown:
            raise ValueError(f"unknown parameters {unknown}")
        estimator.set_params(**params)
        estimator._validate_params()
    except (TypeError, ValueError) as exc:
        raise _bad(shown, f"its parameters are not valid ({exc}).") from exc
    attributes = manifest["attributes"]
    try:
        image_shape = tuple(int(s) for s in attributes["image_shape_"])
        offset = _scaling_from_json(attributes["offset_"])
        scale = _scaling_from_json(attributes["scale_"])
        stretch = attributes["stretch_"]
        stretch = None if stretch is None else float(stretch)
        n_features_in = int(attributes["n_features_in_"])
        n_epochs = int(attributes["n_epochs_"])
        n_active = int(attributes["n_active_components_"])
        fitted_device = str(attributes["device_"])
        names = attributes.get("feature_names_in_")
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(shown, f"its fitted attributes are incomplete ({exc!r}).") from exc
    n_scales = image_shape[0] if len(image_shape) == 3 else None
    if (
        len(image_shape) not in (2, 3)
        or math.prod(image_shape) != n_features_in
        or np.shape(offset) != np.shape(scale)
        or np.shape(scale) != (() if n_scales is None else (n_scales,))
    ):
        raise _bad(
            shown,
            f"image_shape_={image_shape} does not match n_features_in_="
            f"{n_features_in} and one offset_/scale_ per channel "
            f"(offset_={offset!r}, scale_={scale!r}).",
        )

    for name, value in arrays.items():
        if value.shape != (estimator.n_components,) or value.dtype.kind != "f":
            raise _bad(
                shown,
                f"{name} has shape {value.shape} and dtype {value.dtype}, not "
                f"({estimator.n_components},) floats.",
            )
    if names is not None and len(names) != n_features_in:
        raise _bad(shown, f"it names {len(names)} features but has {n_features_in}.")

    device = _resolve_device(device)
    # The seed fit would use for the validation split (with an integer
    # random_state): a warm start from the loaded model splits as the
    # original fit did.
    random_state = estimator.random_state
    seed = 0
    if isinstance(random_state, Integral):
        rng = np.random.RandomState(random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
    net = estimator._build_net(image_shape, device, seed)
    # Initialise with forked generators: loading leaves torch's global ones
    # as they were. The random initial weights are replaced below.
    with _forked_rng(device, seed):
        net.initialize()
    expected = net.module_.state_dict()
    _check_weights(state, expected, shown)
    tensors = {key: torch.from_numpy(value) for key, value in state.items()}
    for key, tensor in tensors.items():
        if tensor.dtype != expected[key].dtype:
            raise _bad(
                shown,
                f"the tensor {key!r} has dtype {tensor.dtype}, the model "
                f"{expected[key].dtype}.",
            )
    net.module_.load_state_dict(tensors)
    stopper = dict(net.callbacks_).get("early_stopping")
    if stopper is not None and not hasattr(stopper, "best_epoch_"):
        stopper.best_epoch_ = None  # no history: a warm start counts from 0

    estimator._set_fitted(net, image_shape, offset, scale, stretch, fitted_device)
    estimator.n_epochs_ = n_epochs
    estimator.n_features_in_ = n_features_in
    for name, value in arrays.items():
        setattr(estimator, name, value)
    if names is not None:
        estimator.feature_names_in_ = np.asarray(names, dtype=object)
    estimator.n_active_components_ = n_active
    return estimator
