"""The comparison protocol: spherical vs diagonal vs banded decoders.

This module holds what ``covvae compare`` runs, as plain functions so that the
documentation pages, examples and tests can call them too. The estimator knows
nothing of it.

Protocol
--------
1. **Split.** :func:`stratified_split` cuts the data into stratified
   train / validation / test parts of 60 / 25 / 15 % (by class label).
2. **Fit.** :func:`fit_with_early_stopping` trains one :class:`CovarianceVAE`
   per covariance on the *train* and *validation* parts, with identical
   encoder, decoder trunk, latent size and training schedule. The estimator
   holds out as many images as the validation part has, drawn with the run's
   seed (so the three models hold out the same images) and stops each
   training stage when their negative ELBO has not improved for ``patience``
   epochs (20 by default) or after ``max_epochs``, restoring the
   weights of the best validation epoch.
3. **Evaluate on the test part only** (:func:`evaluate_density`): the
   paper's metric ``-E_q(z|x)[log p(x|z)]`` and the negative ELBO in nats per
   image, and, for 8-bit data, bits per dimension on dequantized images.
4. **Features** (:func:`evaluate_features`, labelled data): a
   :class:`~sklearn.ensemble.RandomForestClassifier` fitted on the train
   part's latent means and scored on the test part (ROC AUC, accuracy),
   beside the same forest on raw pixels and on PCA with the same number of
   components (:func:`evaluate_baselines`).
5. **Anomalies** (:func:`evaluate_anomaly`, stamps): one more model per
   covariance, fitted on the *real* stamps of the train part (early stopping
   on the real stamps of the validation part); ``-score_samples`` ranks the
   test part, artefacts (bogus) being the positive class.

Every function returns plain dictionaries of floats, ints, strings and lists,
which :func:`json.dump` writes as they are.
"""

import math
import time

import numpy as np
from joblib import Parallel, delayed
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state

from sk_covvae._estimator import (
    CovarianceVAE,
    _standardized_tensor,
    _stretch_log_det,
)

__all__ = [
    "COVARIANCES",
    "PROTOCOL_DEFAULTS",
    "SPLIT_FRACTIONS",
    "bits_per_dim",
    "central_flux",
    "dequantize",
    "grouped_split",
    "evaluate_anomaly",
    "evaluate_baselines",
    "evaluate_channels",
    "evaluate_density",
    "evaluate_features",
    "evaluate_latents",
    "fit_with_early_stopping",
    "load_dataset",
    "load_ztf",
    "run_comparison",
    "stratified_split",
    "summarize",
]

#: Decoder covariances compared, simplest first.
COVARIANCES = ("spherical", "diagonal", "banded")
#: Train / validation / test shares of the stratified split.
SPLIT_FRACTIONS = (0.6, 0.25, 0.15)
#: What the comparison runs on each data set unless told otherwise: the
#: defaults of :func:`load_dataset`, :func:`run_comparison` and ``covvae
#: compare`` (a few minutes on a 2-core CPU).
PROTOCOL_DEFAULTS = {
    "stamps": {
        "n_samples": 2000,
        "n_components": (10,),
        "max_epochs": 30,
        "batch_size": 32,
    },
    "fashion-mnist": {
        "n_samples": 10000,
        "n_components": (50,),
        "max_epochs": 10,
        "batch_size": 64,
    },
    # Real ZTF triplets (all labelled ones), 21x21 crops.
    "ztf": {
        "n_samples": None,
        "n_components": (10,),
        "max_epochs": 100,
        "batch_size": 32,
    },
}
#: ZTF's deep real/bogus score at and above which a detection counts as
#: real, and the one above which it counts as surely real (the training set
#: of the anomaly models).
ZTF_REAL_DRB = 0.5
ZTF_SURE_DRB = 0.9
#: Channels of a ZTF triplet, in the order of the alert packets.
ZTF_CHANNELS = ("science", "template", "difference")
# Trees of every random forest (features and baselines alike).
_N_TREES = 200
# Points of each ROC curve kept for the figures (the JSON stays small).
_ROC_POINTS = 101


def _silent(message):
    """Default progress callback: print nothing."""


# ----------------------------------------------------------------------- data
def load_dataset(name, *, n_samples=None, random_state=0, **options):
    """Load one of the comparison's data sets as a plain dictionary.

    Parameters
    ----------
    name : {'stamps', 'fashion-mnist', 'ztf'}
        ``'stamps'``: simulated 21x21 difference stamps,
        :func:`~sk_covvae.datasets.make_difference_stamps` with half real,
        half bogus, pixels in units of the background noise.
        ``'fashion-mnist'``: the 70,000 Fashion-MNIST images in [0, 1].
        ``'ztf'``: real ZTF alert triplets from ``path`` (see
        :func:`load_ztf`).
    n_samples : int or None, default=None
        Stamps to simulate, or Fashion-MNIST images to draw at random
        without replacement, stratified by class (``None``: the data set's
        entry in :data:`PROTOCOL_DEFAULTS`; all ZTF triplets).
    random_state : int, default=0
        Seed of the simulation or of the subsample.
    **options
        For ``'ztf'``: ``path``, ``channels`` and ``crop`` of
        :func:`load_ztf`.

    Returns
    -------
    data : dict
        ``name``, ``X`` (float32, (n, D)), ``y`` (int labels), ``image_shape``,
        ``target_names``, ``quantized`` (True when the pixels are 8-bit
        levels divided by 255, so bits/dim on dequantized data apply),
        ``artefact_type`` (stamps only, else None) and ``description``;
        real survey data add ``groups`` (object ids: a split keeps an
        object's detections together) and ``normal`` (the images the anomaly
        models are fitted on).
    """
    from sk_covvae import datasets

    if name not in PROTOCOL_DEFAULTS:
        raise ValueError(
            f"Unknown dataset {name!r}; choose one of {sorted(PROTOCOL_DEFAULTS)}."
        )
    if name == "ztf":
        return load_ztf(n_samples=n_samples, random_state=random_state, **options)
    if options:
        raise TypeError(f"Unexpected options for {name!r}: {sorted(options)}.")
    if n_samples is None:
        n_samples = PROTOCOL_DEFAULTS[name]["n_samples"]
    if name == "stamps":
        n = int(n_samples)
        bunch = datasets.make_difference_stamps(n, random_state=random_state)
        return {
            "name": name,
            "X": bunch.data,
            "y": bunch.target,
            "image_shape": tuple(bunch.image_shape),
            "target_names": [str(t) for t in bunch.target_names],
            "quantized": False,
            "artefact_type": np.asarray(bunch.artefact_type),
            "description": (
                f"{n} simulated 21x21 difference stamps "
                f"(make_difference_stamps, random_state={random_state}), "
                "half real, half bogus"
            ),
        }
    if name == "fashion-mnist":
        bunch = datasets.load_fashion_mnist()
        X, y = bunch.data, bunch.target
        if n_samples is not None and n_samples < len(y):
            index, _ = train_test_split(
                np.arange(len(y)),
                train_size=int(n_samples),
                stratify=y,
                random_state=random_state,
            )
            index = np.sort(index)
            X, y = X[index], y[index]
        return {
            "name": name,
            "X": X,
            "y": y,
            "image_shape": tuple(bunch.image_shape),
            "target_names": [str(t) for t in bunch.target_names],
            "quantized": True,
            "artefact_type": None,
            "description": (
                f"{len(y)} Fashion-MNIST images"
                + (
                    f" (stratified random subset, random_state={random_state})"
                    if n_samples is not None and n_samples < 70000
                    else ""
                )
            ),
        }


def load_ztf(path, *, channels="all", crop=21, n_samples=None, random_state=0):
    """Real ZTF alert triplets, labelled by the survey's deep real/bogus score.

    Parameters
    ----------
    path : path-like
        A ``.npz`` file of triplets like the shared data's
        ``ztf_triplets/ztf_triplets.npz`` (``X`` of shape (n, 3, H, W) and
        per-detection ``objectId``, ``drb``, ``rb``), or alert files or a
        folder of them, read by :func:`~sk_covvae.datasets.read_alerts`.
    channels : {'all', 'difference'}, default='all'
        Science, template and difference, or the difference alone.
    crop : int, default=21
        Side of the centred square kept.
    n_samples : int or None, default=None
        Labelled detections to draw at random (``None``: all).
    random_state : int, default=0
        Seed of that draw.

    Returns
    -------
    data : dict
        As :func:`load_dataset`'s. Only detections with a ``drb`` score are
        kept; ``y`` is 1 (real) where ``drb >= 0.5`` and 0 (bogus)
        otherwise, ``y_rb`` the same split of the older ``rb`` score,
        ``normal`` marks ``drb >= 0.9``, ``groups`` holds the object ids and
        ``counts`` the numbers behind the labels. Missing pixels (CCD edges;
        templates' 3.4e38 marks) are filled with 0 by
        :class:`~sk_covvae.preprocessing.StampPreprocessor`, whose counts
        are in ``n_filled``.

    Notes
    -----
    The labels are the survey's own scores, not human vetting: ``drb`` is a
    CNN run on these very stamps (Duev et al. 2019).
    """
    from pathlib import Path

    from sk_covvae.preprocessing import StampPreprocessor

    if channels not in ("all", "difference"):
        raise ValueError(f"channels must be 'all' or 'difference', got {channels!r}.")
    source = Path(path)
    if source.suffix == ".npz":
        with np.load(source) as f:
            images = f["X"]
            drb, rb = f["drb"].astype(np.float64), f["rb"].astype(np.float64)
            objects = f["objectId"].astype(str)
    else:
        from sk_covvae.datasets import read_alerts

        alerts = read_alerts(source)
        images = alerts.images
        frame = alerts.frame
        drb = frame["drb"].to_numpy(np.float64)
        rb = frame["rb"].to_numpy(np.float64)
        objects = frame["object_id"].astype(str).to_numpy()
    n_all = len(images)
    keep = np.flatnonzero(np.isfinite(drb))
    if len(keep) < 10:
        raise ValueError(
            f"{source}: only {len(keep)} of {n_all} detections have a drb score "
            "(ZTF alert schemas before 3.3 carry rb only); the comparison needs "
            "drb labels."
        )
    if n_samples is not None and n_samples < len(keep):
        rng = check_random_state(random_state)
        keep = np.sort(rng.choice(keep, int(n_samples), replace=False))
    images, drb, rb, objects = images[keep], drb[keep], rb[keep], objects[keep]
    n, C, H, W = images.shape
    kept = [0, 1, 2] if channels == "all" else [2]
    pre = StampPreprocessor((C, H, W), crop=(crop, crop), channels=kept)
    flat = images.reshape(n, -1)
    X = pre.fit_transform(flat).astype(np.float32)
    y = (drb >= ZTF_REAL_DRB).astype(int)
    counts = {
        "detections": int(n_all),
        "with_drb": int(len(keep)),
        "real": int(y.sum()),
        "bogus": int((y == 0).sum()),
        "sure_real": int((drb >= ZTF_SURE_DRB).sum()),
        "objects": int(len(np.unique(objects))),
        "rb_real": int((rb >= ZTF_REAL_DRB).sum()),
        "rb_drb_disagree": int(((rb >= ZTF_REAL_DRB) != (y == 1)).sum()),
        "with_filled_pixels": int((pre.n_filled(flat) > 0).sum()),
    }
    names = [ZTF_CHANNELS[c] for c in kept]
    return {
        "name": "ztf",
        "X": X,
        "y": y,
        "y_rb": (rb >= ZTF_REAL_DRB).astype(int),
        "drb": drb,
        "groups": objects,
        "normal": drb >= ZTF_SURE_DRB,
        "image_shape": pre.output_image_shape_,
        "channel_names": names,
        "target_names": ["bogus", "real"],
        "quantized": False,
        "artefact_type": None,
        "counts": counts,
        "description": (
            f"{len(y)} real ZTF detections with a drb score ({counts['real']} "
            f"real at drb >= {ZTF_REAL_DRB}, {counts['bogus']} bogus; "
            f"{counts['objects']} objects), {crop}x{crop} crops of the "
            f"{' + '.join(names)} channel{'s' if len(names) > 1 else ''}"
        ),
    }


def grouped_split(y, groups, *, fractions=SPLIT_FRACTIONS, random_state=None):
    """Train / validation / test indices that keep each group in one part.

    Like :func:`stratified_split`, for data whose rows come in groups (the
    detections of one astronomical object): whole groups are drawn, so the
    shares hold for groups, not exactly for rows, and the classes are not
    stratified.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Labels; only their number is used.
    groups : array-like of shape (n_samples,)
    fractions : tuple of float, default=(0.6, 0.25, 0.15)
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    split : dict
        ``'train'``, ``'validation'``, ``'test'``: sorted, disjoint indices.

    Examples
    --------
    >>> import numpy as np
    >>> groups = np.repeat(np.arange(50), 2)
    >>> split = grouped_split(np.zeros(100), groups, random_state=0)
    >>> [len(split[k]) for k in ("train", "validation", "test")]
    [58, 26, 16]
    >>> set(groups[split["train"]]) & set(groups[split["test"]])
    set()
    """
    from sklearn.model_selection import GroupShuffleSplit

    groups = np.asarray(groups)
    if len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} rows, y has {len(y)}.")
    fractions = tuple(float(f) for f in fractions)
    rng = check_random_state(random_state)
    index = np.arange(len(groups))
    first = GroupShuffleSplit(
        1, test_size=fractions[2], random_state=rng.randint(2**31 - 1)
    )
    rest, test = next(first.split(index, groups=groups))
    second = GroupShuffleSplit(
        1,
        test_size=fractions[1] / (fractions[0] + fractions[1]),
        random_state=rng.randint(2**31 - 1),
    )
    train, valid = next(second.split(rest, groups=groups[rest]))
    return {
        "train": np.sort(rest[train]),
        "validation": np.sort(rest[valid]),
        "test": np.sort(test),
    }


def stratified_split(y, *, fractions=SPLIT_FRACTIONS, random_state=None):
    """Stratified train / validation / test indices.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Class labels to stratify on.
    fractions : tuple of float, default=(0.6, 0.25, 0.15)
        Shares of train, validation and test; they must sum to 1.
    random_state : int, RandomState instance or None, default=None
        Seed of the shuffles.

    Returns
    -------
    split : dict
        ``'train'``, ``'validation'`` and ``'test'``: sorted, disjoint index
        arrays covering ``range(n_samples)``.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.repeat([0, 1], [60, 40])
    >>> split = stratified_split(y, random_state=0)
    >>> [len(split[k]) for k in ("train", "validation", "test")]
    [60, 25, 15]
    >>> int(y[split["test"]].sum())
    6
    """
    y = np.asarray(y)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"fractions must be three positive shares summing to 1, got {fractions}."
        )
    rng = check_random_state(random_state)
    n = len(y)
    n_test = int(round(fractions[2] * n))
    n_valid = int(round(fractions[1] * n))
    index = np.arange(n)
    rest, test = train_test_split(
        index, test_size=n_test, stratify=y, random_state=rng.randint(2**31 - 1)
    )
    train, valid = train_test_split(
        rest, test_size=n_valid, stratify=y[rest], random_state=rng.randint(2**31 - 1)
    )
    return {
        "train": np.sort(train),
        "validation": np.sort(valid),
        "test": np.sort(test),
    }


def dequantize(X, *, levels=256, random_state=None):
    """Uniformly dequantize 8-bit images stored as ``level / (levels - 1)``.

    Returns ``(x * (levels - 1) + u) / levels`` with ``u ~ U(0, 1)``
    independently per pixel: a continuous image in [0, 1] whose pixel lies in
    the bin of width ``1 / levels`` of its level.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Images in [0, 1], multiples of ``1 / (levels - 1)``.
    levels : int, default=256
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    ndarray of shape (n_samples, n_features), float64
    """
    rng = check_random_state(random_state)
    q = np.rint(np.asarray(X, dtype=np.float64) * (levels - 1))
    return (q + rng.uniform(size=q.shape)) / levels


def bits_per_dim(log_density, n_features, *, levels=256):
    r"""Bits per dimension of dequantized data from a log-density in nats.

    For an image ``y = (x + u) / levels`` (a bin of volume
    ``levels^-D``), Jensen's inequality gives
    :math:`-\log_2 P(x) \le D \log_2 \mathrm{levels} - \log p(y) / \ln 2`;
    divided by ``D``, this is the usual upper bound in bits per dimension
    (8 bits/dim is a uniform model of 8-bit pixels).

    Parameters
    ----------
    log_density : float or ndarray
        Log-density (or a lower bound such as the ELBO) of dequantized
        images in [0, 1], in nats per image.
    n_features : int
        Pixels per image, ``D``.
    levels : int, default=256

    Returns
    -------
    float or ndarray
    """
    return (n_features * math.log(levels) - np.asarray(log_density)) / (
        n_features * math.log(2.0)
    )


# ----------------------------------------------------------------------- fits
def fit_with_early_stopping(
    X_train,
    X_valid,
    *,
    covariance,
    n_components,
    max_epochs,
    patience=20,
    random_state=0,
    log=None,
    tag="",
    **params,
):
    """Fit a :class:`CovarianceVAE` with early stopping on held-out images.

    The estimator is fitted once, on ``X_train`` and ``X_valid`` pooled, with
    its own early stopping: it holds out a share of the pool equal to
    ``X_valid``'s (``validation_fraction``), drawn by ``random_state``, so
    that models fitted with the same seed hold out the same images, and
    restores the weights of the best validation epoch of each training
    stage. The returned model's parameters are those it was fitted with.

    Parameters
    ----------
    X_train, X_valid : ndarray of shape (n, D)
    covariance : {'spherical', 'diagonal', 'banded'}
    n_components : int
    max_epochs : int
        Maximum epochs of the (last) training stage.
    patience : int or None, default=20
        Epochs without a better validation loss before a stage stops;
        ``None`` runs ``max_epochs``.
    random_state : int, default=0
        Seeds initialisation, the hold-out, batch order and training noise.
    log : callable or None, default=None
        Called with one line of progress per stage (e.g. ``print``).
    tag : str, default=''
        Prefix of the progress lines.
    **params
        Other :class:`CovarianceVAE` parameters (``batch_size``, ``lr``,
        ``mean_epochs``, ``device``, ``min_scale``, ...).

    Returns
    -------
    model : CovarianceVAE
        Fitted, holding the best validation epoch's weights.
    info : dict
        ``epochs`` (run, over all stages), ``best_epoch``, ``stopped_by``
        ('early_stopping', 'max_epochs' or 'non_finite_loss'),
        ``fit_time_s``, ``device``, ``n_active_components``,
        ``kl_per_component`` (list) and ``history`` (per epoch: ``stage``,
        ``train_loss`` and ``valid_loss``, mean negative ELBO in nats per
        image in data units (under the spherical noise model in the mean
        stage), and ``dur`` s).
    """
    log = _silent if log is None else log
    X = np.concatenate([X_train, X_valid])
    model = CovarianceVAE(
        n_components,
        covariance=covariance,
        max_epochs=max_epochs,
        patience=patience,
        validation_fraction=len(X_valid) / len(X),
        random_state=random_state,
        **params,
    )
    start = time.perf_counter()
    stopped_by = None
    try:
        model.fit(X)
    except FloatingPointError as exc:
        log(f"{tag} {exc}")
        stopped_by = "non_finite_loss"
    fit_time = time.perf_counter() - start
    history = _history_in_data_units(model, X)
    if not history:
        raise FloatingPointError(f"{tag}: the first epoch already diverged.")
    stopper = dict(model.net_.callbacks_)["early_stopping"]
    if stopped_by is None:
        stopped_by = (
            "early_stopping" if stopper.misses_ >= stopper.patience else "max_epochs"
        )
    log(
        f"{tag} {len(history)} epochs in {fit_time:.1f}s ({stopped_by}); "
        f"{model.n_active_components_} of {n_components} latent dimensions active"
    )
    return model, {
        "epochs": len(history),
        "best_epoch": int(stopper.best_epoch_),
        "stopped_by": stopped_by,
        "fit_time_s": fit_time,
        "device": str(model.device_),
        "n_active_components": int(model.n_active_components_),
        "kl_per_component": [float(v) for v in model.kl_per_component_],
        "history": history,
    }


def _history_in_data_units(model, X):
    """Per-epoch losses of ``model.net_.history`` in nats in data units.

    skorch records mean losses of the standardized, stretched images; each
    image's loss in data units is that minus the log-determinant of the data
    map at the image, so the mean of the training (validation) images' terms
    is added to the training (validation) loss.
    """
    offset, scale = model._feature_scaling()
    log_det = _stretch_log_det(X, offset, scale, model.stretch_)
    train, valid = model.net_.get_split_datasets(X)
    shift = {
        "train_loss": -log_det[np.asarray(train.indices)].mean(),
        "valid_loss": -log_det[np.asarray(valid.indices)].mean(),
    }
    return [
        {
            "stage": row.get("stage", "joint"),
            "train_loss": float(row["train_loss"]) + shift["train_loss"],
            "valid_loss": float(row["valid_loss"]) + shift["valid_loss"],
            "dur": float(row["dur"]),
        }
        for row in model.net_.history
        if "valid_loss" in row
    ]


# ---------------------------------------------------------------- evaluation
def evaluate_density(model, X_test, *, quantized=False, random_state=0):
    """Test-set density metrics of a fitted model, in nats per image.

    Parameters
    ----------
    model : CovarianceVAE
    X_test : ndarray of shape (n, D)
    quantized : bool, default=False
        True for 8-bit images in [0, 1]: then also bits/dim on dequantized
        images (:func:`dequantize`, :func:`bits_per_dim`), else ``None``.
    random_state : int, default=0
        Seed of the dequantization noise.

    Returns
    -------
    metrics : dict
        ``neg_recon_ll`` (mean of ``-E_q[log p(x|z)]``, the metric of the
        seed thesis's Fashion-MNIST table; lower is better),
        ``neg_recon_ll_median``, ``neg_recon_ll_std`` (its spread over
        images), ``neg_recon_ll_per_pixel``, ``neg_elbo`` (mean negative ELBO,
        an upper bound on ``-log p(x)``), ``neg_elbo_median`` (robust to the
        few extreme images of heavy-tailed data), ``bits_per_dim`` (negative
        ELBO of dequantized images, in bits per pixel), ``mse`` (squared
        error of the decoder mean, per pixel) and ``mse_median`` (its median
        over images).
    """
    recon = -model.reconstruction_log_likelihood(X_test)
    elbo = model.score_samples(X_test)
    D = X_test.shape[1]
    mean = model.inverse_transform(model.transform(X_test))
    squared = np.mean((np.asarray(mean, np.float64) - X_test) ** 2, axis=1)
    out = {
        "neg_recon_ll": float(np.mean(recon)),
        "neg_recon_ll_median": float(np.median(recon)),
        "neg_recon_ll_std": float(np.std(recon)),
        "neg_recon_ll_per_pixel": float(np.mean(recon) / D),
        "neg_elbo": float(-np.mean(elbo)),
        "neg_elbo_median": float(-np.median(elbo)),
        "mse": float(np.mean(squared)),
        "mse_median": float(np.median(squared)),
        "bits_per_dim": None,
    }
    if quantized:
        Y = dequantize(X_test, random_state=random_state)
        out["bits_per_dim"] = float(np.mean(bits_per_dim(model.score_samples(Y), D)))
    return out


def central_flux(X, image_shape, *, half_width=2):
    """Sum of the central ``(2 * half_width + 1)`` square pixels of each image.

    On stamps centred on a candidate, the flux of the source. For images
    of several channels, (C, H, W), that of the last channel (the difference
    image of a survey triplet).
    """
    H, W = image_shape[-2:]
    images = np.asarray(X, dtype=np.float64).reshape(len(X), -1, H, W)[:, -1]
    r, c = H // 2, W // 2
    h = half_width
    return images[:, max(r - h, 0) : r + h + 1, max(c - h, 0) : c + h + 1].sum((1, 2))


def evaluate_latents(model, X_test, image_shape):
    """Whether the model learned the images: the latent space and its means.

    A model whose latent space collapsed has a decoder mean that is the same
    for every image, so its mean does not follow the data however good its
    density is.

    Parameters
    ----------
    model : CovarianceVAE
    X_test : ndarray of shape (n, D)
    image_shape : tuple of int (H, W) or (C, H, W)

    Returns
    -------
    metrics : dict
        ``n_active`` (:attr:`CovarianceVAE.n_active_components_`),
        ``kl_total`` (sum over dimensions of ``kl_per_component_``, nats),
        ``mean_correlation`` (median over test images of the Pearson
        correlation between the decoder mean and the image, pixel by pixel)
        and ``centre_flux_spearman`` (Spearman correlation over test images
        between the central 5x5 flux of the decoder mean and of the image).
    """
    X = np.asarray(X_test, dtype=np.float64)
    mean = np.asarray(model.inverse_transform(model.transform(X_test)), np.float64)
    a = X - X.mean(1, keepdims=True)
    b = mean - mean.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    flux = spearmanr(central_flux(mean, image_shape), central_flux(X, image_shape))
    return {
        "n_active": int(model.n_active_components_),
        "kl_total": float(np.sum(model.kl_per_component_)),
        "mean_correlation": float(np.nanmedian(r)) if np.isfinite(r).any() else 0.0,
        "centre_flux_spearman": float(np.nan_to_num(flux.statistic)),
    }


def _roc(y_true, score):
    fpr, tpr, _ = roc_curve(y_true, score)
    grid = np.linspace(0.0, 1.0, _ROC_POINTS)
    return {
        "fpr": grid.round(4).tolist(),
        "tpr": np.interp(grid, fpr, tpr).round(4).tolist(),
    }


def _forest_scores(F_train, y_train, F_test, y_test, random_state):
    forest = RandomForestClassifier(
        n_estimators=_N_TREES, n_jobs=-1, random_state=random_state
    ).fit(F_train, y_train)
    proba = forest.predict_proba(F_test)
    out = {"rf_accuracy": float(accuracy_score(y_test, forest.predict(F_test)))}
    if proba.shape[1] == 2:
        out["rf_roc_auc"] = float(roc_auc_score(y_test, proba[:, 1]))
        out["rf_roc"] = _roc(y_test, proba[:, 1])
    else:
        out["rf_roc_auc"] = float(
            roc_auc_score(y_test, proba, multi_class="ovr", labels=forest.classes_)
        )
    return out


def evaluate_features(model, X_train, y_train, X_test, y_test, *, random_state=0):
    """RandomForest on the model's latent means: fit on train, score on test.

    Returns
    -------
    metrics : dict
        ``rf_accuracy``, ``rf_roc_auc`` (one-vs-rest macro average for more
        than two classes) and, for two classes, ``rf_roc`` (``fpr``/``tpr``
        on a grid).
    """
    return _forest_scores(
        model.transform(X_train), y_train, model.transform(X_test), y_test, random_state
    )


def evaluate_features_with_summaries(
    model, X_train, y_train, X_test, y_test, *, random_state=0
):
    """RandomForest on the latent means plus two per-image summaries.

    The summaries come free with the model: the ELBO
    (:meth:`~CovarianceVAE.score_samples`) and the mean squared error of
    the decoder mean, both per image.

    Returns
    -------
    metrics : dict
        ``rf_plus_roc_auc`` and ``rf_plus_accuracy``.
    """

    def features(X):
        mean = model.inverse_transform(model.transform(X))
        mse = np.mean((np.asarray(mean, np.float64) - X) ** 2, axis=1)
        return np.column_stack(
            [model.transform(X), model.score_samples(X), np.log(mse + 1e-300)]
        )

    got = _forest_scores(
        features(X_train), y_train, features(X_test), y_test, random_state
    )
    return {
        "rf_plus_roc_auc": got["rf_roc_auc"],
        "rf_plus_accuracy": got["rf_accuracy"],
    }


def _lag1(r, axis):
    """Pearson correlation of neighbours along ``axis`` (-1: x, -2: y), pooled."""
    a = np.moveaxis(r, axis, -1)
    left, right = a[..., :-1].ravel(), a[..., 1:].ravel()
    return float(np.corrcoef(left, right)[0, 1])


def evaluate_channels(model, X_test, *, n_covariance=8, channel_names=None):
    """Per-channel density and neighbour correlation, learned and measured.

    At the posterior mean of each test image, in the model's units
    (standardized and stretched, :meth:`~CovarianceVAE.decoder_distribution`):

    * ``ch:<name>:nll_per_pixel``: minus the channel's log-density per
      pixel, in data units (the channel's share of the Jacobian included),
      mean over images;
    * ``ch:<name>:measured_corr_x`` / ``_y``: lag-1 correlation of the
      residual ``y - mean`` between horizontal / vertical neighbours, pooled
      over images and pixels;
    * ``ch:<name>:learned_corr_x`` / ``_y``: the same correlation under the
      decoder's covariance, median over neighbour pairs of the first
      ``n_covariance`` images (0 for the spherical and diagonal decoders,
      by construction).

    Parameters
    ----------
    model : CovarianceVAE
    X_test : ndarray of shape (n, D)
    n_covariance : int, default=8
    channel_names : list of str or None, default=None

    Returns
    -------
    metrics : dict of str to float
    """
    import torch

    shape = tuple(model.image_shape_)
    C, H, W = (1, *shape) if len(shape) == 2 else shape
    names = channel_names or [str(c) for c in range(C)]
    X = np.asarray(X_test)
    px = model.decoder_distribution(X)
    base = getattr(px, "base", px)
    loc = base.loc.reshape(len(X), C, H, W)
    # The stamps as the model sees them, and the Jacobian of that map channel
    # by channel (each channel's own offset and scale).
    offset, scale = model._feature_scaling()
    y = _standardized_tensor(X, offset, scale, model.stretch_, device=loc.device)
    y = y.to(loc.dtype).reshape(loc.shape)
    with torch.no_grad():
        log_p = base.log_prob(y.reshape(base.loc.shape), sum_dtype=torch.float64)
    log_p = log_p.reshape(len(X), C).cpu().numpy()
    offset, scale = (np.broadcast_to(v, (C * H * W,)) for v in (offset, scale))
    jac = np.column_stack(
        [
            _stretch_log_det(
                X[:, c * H * W : (c + 1) * H * W],
                offset[c * H * W],
                scale[c * H * W],
                model.stretch_,
            )
            for c in range(C)
        ]
    )
    nll = -(log_p + jac) / (H * W)
    residual = (y - loc).cpu().numpy()
    out = {}
    m = min(n_covariance, len(X))
    cov = base.covariance_matrix[:m].reshape(m, C, H * W, H * W).cpu().numpy()
    sd = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    idx = np.arange(H * W).reshape(H, W)
    pairs = {
        "x": (idx[:, :-1].ravel(), idx[:, 1:].ravel()),
        "y": (idx[:-1, :].ravel(), idx[1:, :].ravel()),
    }
    for c, name in enumerate(names):
        out[f"ch:{name}:nll_per_pixel"] = float(np.mean(nll[:, c]))
        out[f"ch:{name}:measured_corr_x"] = _lag1(residual[:, c], -1)
        out[f"ch:{name}:measured_corr_y"] = _lag1(residual[:, c], -2)
        for axis, (i, j) in pairs.items():
            corr = cov[:, c, i, j] / (sd[:, c, i] * sd[:, c, j])
            out[f"ch:{name}:learned_corr_{axis}"] = float(np.median(corr))
    return out


def evaluate_baselines(
    X_train, y_train, X_test, y_test, *, n_components, raw=True, random_state=0
):
    """The same RandomForest on raw pixels and on PCA(``n_components``) scores.

    Parameters
    ----------
    X_train, y_train, X_test, y_test : ndarray
    n_components : int
        Components of the PCA baseline.
    raw : bool, default=True
        Include the raw-pixel baseline.
    random_state : int, default=0

    Returns
    -------
    baselines : dict
        ``'raw pixels'`` (if ``raw``) and ``'PCA(K)'``, each a dict as from
        :func:`evaluate_features` plus ``fit_time_s``.
    """
    out = {}
    if raw:
        tic = time.perf_counter()
        out["raw pixels"] = _forest_scores(
            X_train, y_train, X_test, y_test, random_state
        )
        out["raw pixels"]["fit_time_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    pca = PCA(n_components, random_state=random_state).fit(X_train)
    name = f"PCA({n_components})"
    out[name] = _forest_scores(
        pca.transform(X_train), y_train, pca.transform(X_test), y_test, random_state
    )
    out[name]["fit_time_s"] = time.perf_counter() - tic
    return out


def evaluate_anomaly(model, X_test, is_anomaly, *, groups=None):
    """AUROC of ``-score_samples`` for telling anomalies from normal images.

    Parameters
    ----------
    model : CovarianceVAE
        Fitted on normal images only.
    X_test : ndarray of shape (n, D)
    is_anomaly : ndarray of bool of shape (n,)
    groups : ndarray of str of shape (n,) or None
        Anomaly type of each image; adds one AUROC per type (that type
        against all normal images).

    Returns
    -------
    metrics : dict
        ``anomaly_auroc``, ``anomaly_roc`` and, with ``groups``,
        ``anomaly_auroc_by_type``.
    """
    score = -model.score_samples(X_test)
    is_anomaly = np.asarray(is_anomaly, dtype=bool)
    out = {
        "anomaly_auroc": float(roc_auc_score(is_anomaly, score)),
        "anomaly_roc": _roc(is_anomaly, score),
    }
    if groups is not None:
        groups = np.asarray(groups)
        by_type = {}
        for kind in sorted(set(groups[is_anomaly])):
            keep = ~is_anomaly | (groups == kind)
            by_type[str(kind)] = float(roc_auc_score(is_anomaly[keep], score[keep]))
        out["anomaly_auroc_by_type"] = by_type
    return out


# ------------------------------------------------------------------ protocol
def run_comparison(
    data,
    *,
    n_components=None,
    seeds=(0,),
    covariances=COVARIANCES,
    max_epochs=None,
    patience=None,
    features=None,
    anomaly=None,
    n_jobs=None,
    log=None,
    **params,
):
    """Run the whole protocol: every covariance x latent size x seed.

    Parameters
    ----------
    data : dict
        As returned by :func:`load_dataset`.
    n_components : sequence of int or None, default=None
        Latent sizes; several give the latent sweep. ``None``: the data
        set's entry in :data:`PROTOCOL_DEFAULTS`.
    seeds : sequence of int, default=(0,)
        Each seed draws its own split and initialisation; several give the
        spread (mean +- std) in :func:`summarize`.
    covariances : sequence of str, default=COVARIANCES
    max_epochs : int or None, default=None
        ``None``: the data set's entry in :data:`PROTOCOL_DEFAULTS`.
    patience : int or None, default=None
        ``None``: the estimator's default.
    features : bool or None, default=None
        RandomForest on latent features and the baselines; ``None``: when
        the data have labels with two classes (stamps).
    anomaly : bool or None, default=None
        Anomaly detection with models fitted on real stamps (on
        ``data['normal']`` when given); ``None``: when
        ``data['artefact_type']`` or ``data['normal']`` is given.
    n_jobs : int or None, default=None
        Seeds run in parallel by :class:`joblib.Parallel` (each seed's fits
        in one worker process, whose threads joblib limits so that the
        workers share the cores); ``None`` runs them one after the other.
    log : callable or None, default=None
        Progress callback, e.g. ``print``.
    **params
        Passed to :class:`CovarianceVAE` (``batch_size``, ``device``,
        ``min_scale``, ...); ``batch_size`` defaults to the data set's entry
        in :data:`PROTOCOL_DEFAULTS`.

    Returns
    -------
    result : dict
        ``'runs'``: one dict per (covariance, n_components, seed) with the
        fit information of :func:`fit_with_early_stopping`, the metrics of
        :func:`evaluate_density`, :func:`evaluate_latents`,
        :func:`evaluate_features` and :func:`evaluate_anomaly` (the last
        under ``anomaly_*`` keys, with ``anomaly_fit_time_s``,
        ``anomaly_epochs`` and ``anomaly_n_active``);
        ``'baselines'``: one dict per (method, n_components, seed);
        ``'summary'``: :func:`summarize` of both; ``'split'``: sizes;
        ``'models'``: ``{(covariance, n_components, seed): model}`` (not
        JSON; remove it before :func:`json.dump`); ``'test_index'``:
        ``{seed: test indices}`` (not JSON either).
    """
    log = _silent if log is None else log
    defaults = PROTOCOL_DEFAULTS.get(data.get("name"), {})
    n_components = tuple(n_components or defaults.get("n_components", (10,)))
    max_epochs = max_epochs or defaults.get("max_epochs", 20)
    if patience is None:
        patience = CovarianceVAE().patience
    params.setdefault("batch_size", defaults.get("batch_size", 32))
    params.setdefault("image_shape", tuple(data["image_shape"]))
    y = np.asarray(data["y"])
    if features is None:
        features = len(np.unique(y)) == 2
    if anomaly is None:
        anomaly = data.get("artefact_type") is not None or "normal" in data
    fit = dict(max_epochs=max_epochs, patience=patience, log=log, **params)
    jobs = (
        delayed(_run_seed)(
            data, seed, n_components, covariances, features, anomaly, fit
        )
        for seed in seeds
    )
    runs, baselines, models, test_index, sizes = [], [], {}, {}, {}
    for seed, out in zip(seeds, Parallel(n_jobs=n_jobs)(jobs)):
        runs += out["runs"]
        baselines += out["baselines"]
        models.update(out["models"])
        test_index[seed] = out["test_index"]
        sizes = out["sizes"]
    return {
        "runs": runs,
        "baselines": baselines,
        "summary": summarize(runs, baselines),
        "split": sizes,
        "models": models,
        "test_index": test_index,
    }


def _run_seed(data, seed, n_components, covariances, features, anomaly, fit):
    """Everything :func:`run_comparison` does for one seed."""
    X, y = np.asarray(data["X"]), np.asarray(data["y"])
    log = fit["log"]
    if data.get("groups") is not None:
        split = grouped_split(y, data["groups"], random_state=seed)
    else:
        split = stratified_split(y, random_state=seed)
    runs, baselines, models = [], [], {}
    for k in n_components:
        if features:
            baselines += _baselines(X, y, split, k, k == n_components[0], seed, log)
        for cov in covariances:
            model, run = _fit_and_evaluate(
                data, split, cov, k, seed, features=features, **fit
            )
            if anomaly:
                run.update(_anomaly_run(data, split, cov, k, seed, **fit))
            models[(cov, k, seed)] = model
            runs.append(run)
            log(_run_line(f"[{cov} K={k} seed={seed}]", run))
    return {
        "runs": runs,
        "baselines": baselines,
        "models": models,
        "test_index": split["test"],
        "sizes": {name: int(len(v)) for name, v in split.items()},
    }


def _baselines(X, y, split, k, raw, seed, log):
    """Rows of the raw-pixel and PCA(k) baselines for one split."""
    tr, te = split["train"], split["test"]
    rows = []
    for name, metrics in evaluate_baselines(
        X[tr], y[tr], X[te], y[te], n_components=k, raw=raw, random_state=seed
    ).items():
        n = None if name == "raw pixels" else k
        rows.append({"method": name, "n_components": n, "seed": seed, **metrics})
        log(
            f"[{name} seed={seed}] RandomForest ROC AUC "
            f"{metrics['rf_roc_auc']:.4f}, accuracy {metrics['rf_accuracy']:.4f}"
        )
    return rows


def _fit_and_evaluate(data, split, cov, k, seed, *, features, **fit):
    """Fit one model on train + validation; its metrics on the test part."""
    X, y = np.asarray(data["X"]), np.asarray(data["y"])
    tr, va, te = (split[name] for name in ("train", "validation", "test"))
    model, info = fit_with_early_stopping(
        X[tr],
        X[va],
        covariance=cov,
        n_components=k,
        random_state=seed,
        tag=f"[{cov} K={k} seed={seed}]",
        **fit,
    )
    run = {"covariance": cov, "n_components": k, "seed": seed, **info}
    run.update(
        evaluate_density(model, X[te], quantized=data["quantized"], random_state=seed)
    )
    run.update(evaluate_latents(model, X[te], tuple(data["image_shape"])))
    if data.get("channel_names") is not None:
        run.update(evaluate_channels(model, X[te], channel_names=data["channel_names"]))
    if features:
        run.update(
            evaluate_features(model, X[tr], y[tr], X[te], y[te], random_state=seed)
        )
        if data.get("groups") is not None:  # real survey data
            run.update(
                evaluate_features_with_summaries(
                    model, X[tr], y[tr], X[te], y[te], random_state=seed
                )
            )
    return model, run


def _anomaly_run(data, split, cov, k, seed, **fit):
    """A model fitted on the real images only; its anomaly AUROC on test."""
    from sk_covvae.datasets import REAL_LABEL

    X, y = np.asarray(data["X"]), np.asarray(data["y"])
    real = y == REAL_LABEL
    # What the model learns as normal: the real images, or a surer subset
    # of them (ZTF: drb >= 0.9); anomalies are the bogus test images.
    normal = np.asarray(data["normal"]) if "normal" in data else real
    tr, va, te = (split[name] for name in ("train", "validation", "test"))
    model, info = fit_with_early_stopping(
        X[tr[normal[tr]]],
        X[va[normal[va]]],
        covariance=cov,
        n_components=k,
        random_state=seed,
        tag=f"[{cov} K={k} seed={seed}][normal-only]",
        **fit,
    )
    types = data.get("artefact_type")
    groups = None if types is None else np.asarray(types)[te]
    return {
        "anomaly_epochs": info["epochs"],
        "anomaly_fit_time_s": info["fit_time_s"],
        "anomaly_n_active": info["n_active_components"],
        **evaluate_anomaly(model, X[te], ~real[te], groups=groups),
    }


def _run_line(tag, run):
    parts = [
        f"{tag} done in {run['fit_time_s']:.1f}s ({run['epochs']} epochs, best "
        f"{run['best_epoch']}): -E[log p(x|z)] {run['neg_recon_ll']:.1f}",
        f"-ELBO {run['neg_elbo']:.1f}",
    ]
    if run.get("bits_per_dim") is not None:
        parts.append(f"bits/dim {run['bits_per_dim']:.3f}")
    if "rf_roc_auc" in run:
        parts.append(f"RF AUC {run['rf_roc_auc']:.4f}")
    if "anomaly_auroc" in run:
        parts.append(f"anomaly AUROC {run['anomaly_auroc']:.4f}")
    return ", ".join(parts)


_SUMMARY_KEYS = (
    "neg_recon_ll",
    "neg_recon_ll_median",
    "neg_elbo",
    "neg_elbo_median",
    "bits_per_dim",
    "mse",
    "mse_median",
    "n_active",
    "kl_total",
    "mean_correlation",
    "centre_flux_spearman",
    "anomaly_n_active",
    "rf_roc_auc",
    "rf_accuracy",
    "rf_plus_roc_auc",
    "rf_plus_accuracy",
    "anomaly_auroc",
    "epochs",
    "best_epoch",
    "fit_time_s",
    "anomaly_fit_time_s",
)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize(runs, baselines=()):
    """Mean and standard deviation (ddof=1) over seeds of every metric.

    Parameters
    ----------
    runs : list of dict
        The ``'runs'`` of :func:`run_comparison`.
    baselines : list of dict, default=()

    Returns
    -------
    summary : list of dict
        One per (method, n_components): ``method``, ``n_components`` and,
        per metric, ``{'mean', 'std', 'n'}`` (``std`` is 0 for one seed).
    """
    rows = []
    groups = {}
    for run in runs:
        groups.setdefault((run["covariance"], run["n_components"]), []).append(run)
    for run in baselines:
        groups.setdefault((run["method"], run["n_components"]), []).append(run)
    for (method, k), members in groups.items():
        row = {"method": method, "n_components": k}
        channel_keys = sorted({k for m in members for k in m if k.startswith("ch:")})
        for key in (*_SUMMARY_KEYS, *channel_keys):
            if any(key in m for m in members):
                row[key] = _mean_std([m.get(key) for m in members])
        if any("anomaly_auroc_by_type" in m for m in members):
            types = members[0]["anomaly_auroc_by_type"]
            row["anomaly_auroc_by_type"] = {
                t: _mean_std([m["anomaly_auroc_by_type"].get(t) for m in members])
                for t in types
            }
        rows.append(row)
    return rows
