"""The comparison protocol: spherical vs diagonal vs banded decoders.

This module holds what ``covvae compare`` runs, as plain functions so that the
documentation pages, examples and tests can call them too. The estimator knows
nothing of it.

Protocol
--------
1. **Split.** :func:`stratified_split` cuts the data into stratified
   train / validation / test parts of 60 / 25 / 15 % (by class label).
2. **Fit.** :func:`fit_with_early_stopping` trains one :class:`CovarianceVAE`
   per covariance on the *train* part only, with identical encoder, decoder
   trunk and latent size. After every epoch it computes the negative ELBO of
   the *validation* part; training stops when that has not improved for
   ``patience`` epochs (20, as Dorta et al., 2018) or after ``max_epochs``,
   and the weights of the best validation epoch are restored. The
   estimator's own internal hold-out is switched off
   (``validation_fraction=None``) so that the validation part is exactly the
   stratified split, the same images for the three models.
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

import copy
import math
import time

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state

from sk_covvae._estimator import CovarianceVAE

__all__ = [
    "COVARIANCES",
    "SPLIT_FRACTIONS",
    "bits_per_dim",
    "dequantize",
    "evaluate_anomaly",
    "evaluate_baselines",
    "evaluate_density",
    "evaluate_features",
    "fit_with_early_stopping",
    "load_dataset",
    "run_comparison",
    "stratified_split",
    "summarize",
]

#: Decoder covariances compared, simplest first.
COVARIANCES = ("spherical", "diagonal", "banded")
#: Train / validation / test shares of the stratified split.
SPLIT_FRACTIONS = (0.6, 0.25, 0.15)
# Trees of every random forest (features and baselines alike).
_N_TREES = 200
# Points of each ROC curve kept for the figures (the JSON stays small).
_ROC_POINTS = 101


def _silent(message):
    """Default progress callback: print nothing."""


# ----------------------------------------------------------------------- data
def load_dataset(name, *, n_samples=None, random_state=0):
    """Load one of the comparison's data sets as a plain dictionary.

    Parameters
    ----------
    name : {'stamps', 'fashion-mnist'}
        ``'stamps'``: simulated 21x21 difference stamps,
        :func:`~sk_covvae.datasets.make_difference_stamps` with half real,
        half bogus, pixels in units of the background noise.
        ``'fashion-mnist'``: the 70,000 Fashion-MNIST images in [0, 1].
    n_samples : int or None, default=None
        Stamps to simulate (``None``: 3000), or Fashion-MNIST images to draw
        at random without replacement, stratified by class (``None``: all).
    random_state : int, default=0
        Seed of the simulation or of the subsample.

    Returns
    -------
    data : dict
        ``X`` (float32, (n, D)), ``y`` (int labels), ``image_shape``,
        ``target_names``, ``quantized`` (True when the pixels are 8-bit
        levels divided by 255, so bits/dim on dequantized data apply),
        ``artefact_type`` (stamps only, else None) and ``description``.
    """
    from sk_covvae import datasets

    if name == "stamps":
        n = 3000 if n_samples is None else int(n_samples)
        bunch = datasets.make_difference_stamps(n, random_state=random_state)
        return {
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
    raise ValueError(f"Unknown dataset {name!r}; choose 'stamps' or 'fashion-mnist'.")


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
    """Fit a :class:`CovarianceVAE`, stopping early on a given validation set.

    The estimator is trained one epoch at a time (``warm_start=True``, the
    optimizer state carried over) on ``X_train`` alone; after each epoch the
    negative ELBO of ``X_valid`` (:meth:`CovarianceVAE.score`, fixed noise,
    so epochs compare fairly) decides early stopping, and the weights of the
    best epoch are restored at the end.

    Parameters
    ----------
    X_train, X_valid : ndarray of shape (n, D)
    covariance : {'spherical', 'diagonal', 'banded'}
    n_components : int
    max_epochs : int
    patience : int or None, default=20
        Epochs without a better validation loss before stopping; ``None``
        runs ``max_epochs``.
    random_state : int, default=0
        Seeds initialisation, batch order and training noise.
    log : callable or None, default=None
        Called with one line of progress per epoch (e.g. ``print``).
    tag : str, default=''
        Prefix of the progress lines.
    **params
        Other :class:`CovarianceVAE` parameters (``batch_size``, ``lr``,
        ``device``, ``min_scale``, ...).

    Returns
    -------
    model : CovarianceVAE
        Fitted, holding the best validation epoch's weights.
    info : dict
        ``epochs`` (run), ``best_epoch``, ``stopped_by`` ('early_stopping',
        'max_epochs' or 'non_finite_loss'), ``fit_time_s``, ``device``,
        ``history`` (per epoch: ``train_loss`` and ``valid_loss``, mean
        negative ELBO in nats per image in data units, and ``dur`` s).
    """
    log = _silent if log is None else log
    # A RandomState instance advances at every warm fit, so each epoch gets
    # fresh batch order and noise, yet the run is a function of random_state.
    model = CovarianceVAE(
        n_components,
        covariance=covariance,
        max_epochs=1,
        patience=None,
        validation_fraction=None,
        warm_start=True,
        random_state=np.random.RandomState(random_state),
        **params,
    )
    history = []
    best, best_epoch, best_state, misses = math.inf, 0, None, 0
    stopped_by = "max_epochs"
    start = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        tic = time.perf_counter()
        try:
            model.fit(X_train)
        except FloatingPointError as exc:
            log(f"{tag} epoch {epoch}: {exc}")
            stopped_by = "non_finite_loss"
            break
        # skorch's train loss is in the model's standardized units.
        jacobian = X_train.shape[1] * math.log(model.scale_)
        train_loss = float(model.net_.history[-1, "train_loss"]) + jacobian
        valid_loss = -model.score(X_valid)
        dur = time.perf_counter() - tic
        history.append({"train_loss": train_loss, "valid_loss": valid_loss, "dur": dur})
        improved = valid_loss < best
        if improved:
            best, best_epoch, misses = valid_loss, epoch, 0
            best_state = copy.deepcopy(model.net_.module_.state_dict())
        else:
            misses += 1
        log(
            f"{tag} epoch {epoch:>3}/{max_epochs}  train {train_loss:11.2f}  "
            f"valid {valid_loss:11.2f}{'  *' if improved else '   '}  {dur:5.1f}s"
        )
        if patience is not None and misses >= patience:
            stopped_by = "early_stopping"
            break
    if best_state is not None:
        model.net_.module_.load_state_dict(best_state)
    elif not history:
        raise FloatingPointError(f"{tag}: the first epoch already diverged.")
    return model, {
        "epochs": len(history),
        "best_epoch": best_epoch,
        "stopped_by": stopped_by,
        "fit_time_s": time.perf_counter() - start,
        "device": str(model.device_),
        "history": history,
    }


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
        ``neg_recon_ll`` (mean of ``-E_q[log p(x|z)]``, the metric of Dorta
        et al., 2018; lower is better), ``neg_recon_ll_std`` (its spread over
        images), ``neg_elbo`` (mean negative ELBO, an upper bound on
        ``-log p(x)``), ``neg_elbo_median`` (robust to the few extreme
        images of heavy-tailed data), ``neg_recon_ll_per_pixel``, ``bits_per_dim``
        (negative ELBO of dequantized images, in bits per pixel) and
        ``mse`` (squared error of the decoder mean, per pixel).
    """
    recon = -model.reconstruction_log_likelihood(X_test)
    elbo = model.score_samples(X_test)
    D = X_test.shape[1]
    mean = model.inverse_transform(model.transform(X_test))
    out = {
        "neg_recon_ll": float(np.mean(recon)),
        "neg_recon_ll_std": float(np.std(recon)),
        "neg_recon_ll_per_pixel": float(np.mean(recon) / D),
        "neg_elbo": float(-np.mean(elbo)),
        "neg_elbo_median": float(-np.median(elbo)),
        "mse": float(np.mean((np.asarray(mean, np.float64) - X_test) ** 2)),
        "bits_per_dim": None,
    }
    if quantized:
        Y = dequantize(X_test, random_state=random_state)
        out["bits_per_dim"] = float(np.mean(bits_per_dim(model.score_samples(Y), D)))
    return out


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
    n_components=(10,),
    seeds=(0,),
    covariances=COVARIANCES,
    max_epochs=20,
    patience=20,
    features=None,
    anomaly=None,
    log=None,
    **params,
):
    """Run the whole protocol: every covariance x latent size x seed.

    Parameters
    ----------
    data : dict
        As returned by :func:`load_dataset`.
    n_components : sequence of int, default=(10,)
        Latent sizes; several give the latent sweep.
    seeds : sequence of int, default=(0,)
        Each seed draws its own split and initialisation; several give the
        spread (mean +- std) in :func:`summarize`.
    covariances : sequence of str, default=COVARIANCES
    max_epochs : int, default=20
    patience : int or None, default=20
    features : bool or None, default=None
        RandomForest on latent features and the baselines; ``None``: when
        the data have labels with two classes (stamps).
    anomaly : bool or None, default=None
        Anomaly detection with models fitted on real stamps; ``None``: when
        ``data['artefact_type']`` is given (stamps).
    log : callable or None, default=None
        Progress callback, e.g. ``print``.
    **params
        Passed to :class:`CovarianceVAE` (``batch_size``, ``device``,
        ``min_scale``, ...).

    Returns
    -------
    result : dict
        ``'runs'``: one dict per (covariance, n_components, seed) with the
        fit information of :func:`fit_with_early_stopping`, the metrics of
        :func:`evaluate_density`, :func:`evaluate_features` and
        :func:`evaluate_anomaly` (the last under ``anomaly_*`` keys, with
        ``anomaly_fit_time_s`` and ``anomaly_epochs``);
        ``'baselines'``: one dict per (method, n_components, seed);
        ``'summary'``: :func:`summarize` of both; ``'split'``: sizes;
        ``'models'``: ``{(covariance, n_components, seed): model}`` (not
        JSON; remove it before :func:`json.dump`); ``'test_index'``:
        ``{seed: test indices}`` (not JSON either).
    """
    log = _silent if log is None else log
    X, y = np.asarray(data["X"]), np.asarray(data["y"])
    if features is None:
        features = len(np.unique(y)) == 2
    if anomaly is None:
        anomaly = data.get("artefact_type") is not None
    params.setdefault("image_shape", tuple(data["image_shape"]))
    runs, baselines, models, test_index, sizes = [], [], {}, {}, {}
    for seed in seeds:
        split = stratified_split(y, random_state=seed)
        test_index[seed] = split["test"]
        sizes = {k: int(len(v)) for k, v in split.items()}
        tr, va, te = (X[split[k]] for k in ("train", "validation", "test"))
        y_tr, y_te = y[split["train"]], y[split["test"]]
        for k in n_components:
            if features:
                for name, metrics in evaluate_baselines(
                    tr,
                    y_tr,
                    te,
                    y_te,
                    n_components=k,
                    raw=k == n_components[0],  # raw pixels do not depend on K
                    random_state=seed,
                ).items():
                    baselines.append(
                        {
                            "method": name,
                            "n_components": None if name == "raw pixels" else k,
                            "seed": seed,
                            **metrics,
                        }
                    )
                    log(
                        f"[{name} seed={seed}] RandomForest ROC AUC "
                        f"{metrics['rf_roc_auc']:.4f}, accuracy "
                        f"{metrics['rf_accuracy']:.4f}"
                    )
            for cov in covariances:
                tag = f"[{cov} K={k} seed={seed}]"
                model, info = fit_with_early_stopping(
                    tr,
                    va,
                    covariance=cov,
                    n_components=k,
                    max_epochs=max_epochs,
                    patience=patience,
                    random_state=seed,
                    log=log,
                    tag=tag,
                    **params,
                )
                run = {"covariance": cov, "n_components": k, "seed": seed, **info}
                run.update(
                    evaluate_density(
                        model, te, quantized=data["quantized"], random_state=seed
                    )
                )
                if features:
                    run.update(
                        evaluate_features(model, tr, y_tr, te, y_te, random_state=seed)
                    )
                if anomaly:
                    normal = y == 1
                    a_model, a_info = fit_with_early_stopping(
                        X[split["train"][normal[split["train"]]]],
                        X[split["validation"][normal[split["validation"]]]],
                        covariance=cov,
                        n_components=k,
                        max_epochs=max_epochs,
                        patience=patience,
                        random_state=seed,
                        log=log,
                        tag=f"{tag}[real-only]",
                        **params,
                    )
                    run["anomaly_epochs"] = a_info["epochs"]
                    run["anomaly_fit_time_s"] = a_info["fit_time_s"]
                    groups = np.asarray(data["artefact_type"])[split["test"]]
                    run.update(evaluate_anomaly(a_model, te, y_te == 0, groups=groups))
                models[(cov, k, seed)] = model
                runs.append(run)
                log(_run_line(tag, run))
    return {
        "runs": runs,
        "baselines": baselines,
        "summary": summarize(runs, baselines),
        "split": sizes,
        "models": models,
        "test_index": test_index,
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
    "neg_elbo",
    "neg_elbo_median",
    "bits_per_dim",
    "mse",
    "rf_roc_auc",
    "rf_accuracy",
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
        for key in _SUMMARY_KEYS:
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
