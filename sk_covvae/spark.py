"""Anomaly scores in Apache Spark: a ``pandas_udf`` over alert cutout columns.

Brokers that run Spark keep alerts in Parquet tables whose cutout columns
hold the FITS files of the packets (gzip-compressed for ZTF), as bytes or as
a struct with a ``stampData`` field. :func:`make_score_udf` returns a
``pandas_udf`` that decodes those columns with the readers of
:func:`~sk_covvae.datasets.read_alerts`, builds the rows the model reads
(:func:`~sk_covvae.scoring.stamps_to_X`) and scores them with a model file
loaded once per Python worker process. The scores equal those of
:func:`~sk_covvae.scoring.score_alerts` for the same alerts.

Needs pyspark, pandas and pyarrow (``pip install sk_covvae[spark]``) and a
Java runtime; pyspark is imported when a UDF is made, not with this module.
"""

import os
import threading

import numpy as np

from sk_covvae._optional import require

__all__ = ["make_score_udf"]

_OUTPUTS = ("score", "latents")
# Models loaded in this process, by (path, SHA-256, device): an executor's
# Python worker loads each model file once and reuses it for every batch.
_MODELS = {}
_MODELS_LOCK = threading.Lock()


def _cached_model(path, sha256, device):
    """The model of ``path``, loaded once per process and checked by hash."""
    from sk_covvae.scoring import ModelFileError, load_model

    key = (path, sha256, device)
    with _MODELS_LOCK:
        found = _MODELS.get(key)
        if found is None:
            model, digest = load_model(path, device=device)
            if digest != sha256:
                raise ModelFileError(
                    path,
                    f"the file changed since the UDF was made (SHA-256 {digest}, "
                    f"expected {sha256}).",
                )
            found = _MODELS[key] = model
    return found


def _cells(column):
    """The cells of a cutout column (a struct column arrives as a DataFrame)."""
    if hasattr(column, "columns"):  # pandas.DataFrame of a struct column
        if "stampData" not in column.columns:
            raise ValueError(
                "a struct cutout column needs a 'stampData' field, got "
                f"{list(column.columns)}"
            )
        return list(column["stampData"])
    return list(column)


def _position(value):
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


def stamps_from_cutouts(cutouts, size, positions=None, on_error="raise", channels=None):
    """Stack the FITS cutouts of alerts into stamps as the readers do.

    Parameters
    ----------
    cutouts : sequence of 3 sequences
        Science, template and difference cutouts of n alerts: FITS bytes
        (optionally gzip-compressed), ``{'stampData': bytes}`` or None for a
        missing cutout.
    size : (int, int)
        Height and width of the stamps.
    positions : pair of sequences, optional
        ZTF's 1-based ``candidate.ypos`` and ``candidate.xpos``, which locate
        the candidate in cutouts clipped at the CCD edge; None: the centre.
    on_error : {'raise', 'nan'}, default='raise'
        An undecodable cutout raises, or marks its alert as failed.
    channels : list of str or int, optional
        The cutouts to decode, as in
        :func:`~sk_covvae.datasets.read_alerts` (``'science'``,
        ``'template'``, ``'difference'`` or 0 to 2); the planes of the others
        stay NaN and their bytes are not looked at. Default: all three.

    Returns
    -------
    images : ndarray of shape (n, 3, H, W), float32
    variance : ndarray of shape (n, 3, H, W), float32, or None
    ok : ndarray of shape (n,), bool
        False for alerts whose cutouts could not be decoded.
    """
    from sk_covvae.datasets._fits import FITSError, _read_cutout
    from sk_covvae.datasets._readers import (
        _candidate_index,
        _check_channels,
        _place,
        _stamp_bytes,
    )

    h, w = size
    columns = [list(c) for c in cutouts]
    n = len(columns[0])
    images = np.full((n, 3, h, w), np.nan, dtype=np.float32)
    variance = None
    ok = np.ones(n, dtype=bool)
    ys, xs = positions if positions is not None else ([None] * n, [None] * n)
    decoded = [c for c, wanted in enumerate(_check_channels(channels)) if wanted]
    for i in range(n):
        ypos, xpos = _position(ys[i]), _position(xs[i])
        for c in decoded:
            data = _stamp_bytes(columns[c][i])
            if data is None:
                continue
            try:
                image, var = _read_cutout(data)
            except FITSError as exc:
                if on_error == "raise":
                    raise ValueError(f"alert {i}, cutout {c}: {exc}") from exc
                ok[i] = False
                continue
            cy = _candidate_index(image.shape[0], ypos)
            cx = _candidate_index(image.shape[1], xpos)
            _place(images[i, c], image, cy, cx)
            if var is not None:
                if variance is None:
                    variance = np.full_like(images, np.nan)
                _place(variance[i, c], var, cy, cx)
    return images, variance, ok


def make_score_udf(
    model_path, *, method="elbo", output="score", on_error="raise", device="cpu"
):
    """A Spark ``pandas_udf`` that scores alerts from their cutout columns.

    The UDF takes the science, template and difference cutout columns, and
    optionally ZTF's ``candidate.ypos`` and ``candidate.xpos`` (which place
    the candidate in cutouts clipped at the CCD edge, as
    :func:`~sk_covvae.datasets.read_alerts` does), and returns the anomaly
    score of each alert, as :func:`~sk_covvae.scoring.score_alerts` computes
    it. The cutouts are decoded with the package's FITS reader (gzip or not;
    Rubin's ``UNCERT`` planes become the variance planes of six-channel
    models) and centred on stamps of the size the model reads; only the
    cutouts the model reads are decoded
    (:func:`~sk_covvae.scoring.model_channels`), so a corrupt cutout that
    the model does not read fails no alert.

    The model file is read on the driver (to check it and take its hash)
    and in each Python worker once (a per-process cache keyed by path and
    SHA-256), so it must be at the same path on every executor (a shared
    file system, or ``SparkContext.addFile`` and ``SparkFiles.get``).

    Parameters
    ----------
    model_path : str or path-like
        Model file, see :func:`sk_covvae.scoring.load_model`.
    method : str, default='elbo'
        ``method`` of :meth:`~sk_covvae.CovarianceVAE.anomaly_score`.
    output : {'score', 'latents'}, default='score'
        ``'score'``: a ``double`` column; ``'latents'``: the latent features,
        an ``array<double>`` column.
    on_error : {'raise', 'nan'}, default='raise'
        An undecodable cutout fails the task (naming the alert's position in
        the batch), or gives the alert a NaN score (null latents).
    device : str, default='cpu'
        Torch device of a model read from a ``CovarianceVAE.save`` file.

    Returns
    -------
    udf : pyspark UserDefinedFunction
        Call it as ``udf(science, template, difference)`` or
        ``udf(science, template, difference, ypos, xpos)`` with columns.

    Examples
    --------
    >>> from pyspark.sql import SparkSession  # doctest: +SKIP
    >>> from sk_covvae.spark import make_score_udf
    >>> spark = SparkSession.builder.master("local[2]").getOrCreate()  # doctest: +SKIP
    >>> alerts = spark.read.parquet("ztf_alerts.parquet")  # doctest: +SKIP
    >>> score = make_score_udf("model.joblib")  # doctest: +SKIP
    >>> scored = alerts.withColumn("score", score(
    ...     "cutoutScience", "cutoutTemplate", "cutoutDifference",
    ...     "candidate.ypos", "candidate.xpos"))  # doctest: +SKIP
    """
    import pandas as pd

    from sk_covvae.scoring import (
        _score_X,
        load_model,
        model_channels,
        model_input_shape,
        stamps_to_X,
    )

    pandas_udf = require(
        "pyspark.sql.functions", "sk_covvae.spark", "pyspark", extra="spark"
    ).pandas_udf
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}.")
    if on_error not in ("raise", "nan"):
        raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}.")
    path = os.path.abspath(os.fspath(model_path))
    model, sha256 = load_model(path, device=device)
    shape = model_input_shape(model)
    # the cutouts the model reads (score_alerts decodes no other either)
    decoded = model_channels(model, shape)
    _MODELS.setdefault((path, sha256, device), model)
    latents = output == "latents"

    def score(*columns: pd.Series) -> pd.Series:
        if len(columns) not in (3, 5):
            raise TypeError(
                "the score UDF takes the science, template and difference "
                f"cutout columns, then optionally ypos and xpos; got {len(columns)}"
            )
        estimator = _cached_model(path, sha256, device)
        cutouts = [_cells(c) for c in columns[:3]]
        positions = None
        if len(columns) == 5:
            positions = (list(columns[3]), list(columns[4]))
        images, variance, ok = stamps_from_cutouts(
            cutouts, shape[1:], positions, on_error, decoded
        )
        n = len(ok)
        result = [None] * n
        if ok.any():
            var = None if variance is None else variance[ok]
            X = stamps_to_X(images[ok], var, shape)
            scores, Z = _score_X(estimator, X, method, latents)
            values = list(Z) if latents else scores.tolist()
            for i, v in zip(np.flatnonzero(ok), values):
                result[i] = v.tolist() if latents else v
        if latents:
            return pd.Series(result, dtype=object)
        return pd.Series(result, dtype="float64")

    from pyspark.sql.types import ArrayType, DoubleType

    # type objects, not DDL strings: no Spark session is needed to make the UDF
    return pandas_udf(score, ArrayType(DoubleType()) if latents else DoubleType())
