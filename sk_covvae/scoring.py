"""The scoring job: anomaly scores of alert files, written to one Parquet table.

:func:`score_alerts` reads alert files (ZTF / Rubin Avro, Kafka frames,
Parquet) in batches of bounded memory with
:func:`~sk_covvae.datasets.iter_alerts`, applies a model file (a fitted
:class:`~sklearn.pipeline.Pipeline` or :class:`~sk_covvae.CovarianceVAE` saved
with joblib, or a file of :meth:`~sk_covvae.CovarianceVAE.save`) and writes
one Parquet file: alert ids, the anomaly score and, on request, the latent
features. It runs in this process (``engine='local'``) or on a
dask.distributed cluster (``engine='dask'``); both write the same bytes.
``covvae score`` is its command line.

pyarrow (and pandas, fastavro) come with ``pip install sk_covvae[astro]``,
dask.distributed with ``pip install sk_covvae[dask]``; they are imported
where they are needed.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

__all__ = [
    "ModelFileError",
    "ScoreSummary",
    "load_model",
    "model_channels",
    "model_input_shape",
    "score_alerts",
    "stamps_to_X",
]

#: Name and version of the layout of the files that :func:`score_alerts` writes.
FORMAT_NAME = "sk_covvae.scores"
FORMAT_VERSION = 1
#: Key of the JSON metadata in the Parquet file's key-value metadata.
METADATA_KEY = b"sk_covvae"
#: Rows per Parquet row group: a fixed number, so that the file's bytes do not
#: depend on how the alerts were batched or partitioned.
ROW_GROUP_SIZE = 65536
#: Alerts in the local job's first batch (each next one twice as many, up
#: to ``batch_size``): the model starts after a short read, not a long one.
_FIRST_BATCH = 256

_ZIP_MAGIC = b"PK\x03\x04"
_COVVAE_MANIFEST = "manifest.json"
_ENGINES = ("local", "dask")


class ModelFileError(ValueError):
    """A model file that cannot be used to score alerts.

    Attributes
    ----------
    path : str
        The file.
    reason : str
        What is wrong with it.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # pickles across processes (Dask)
        return type(self), (self.path, self.reason)


@dataclasses.dataclass
class ScoreSummary:
    """What :func:`score_alerts` did.

    Attributes
    ----------
    out : str
        The Parquet file written.
    n_alerts : int
        Alerts read and scored (rows of the table).
    n_files : int
        Input files (after expanding folders).
    skipped : list of (str, str)
        ``(source, reason)`` of every file or alert that could not be read
        (``on_error='skip'``); also in the file's metadata.
    seconds : float
        Wall time of the whole job, reading, scoring and writing.
    engine : str
        ``'local'`` or ``'dask'``.
    """

    out: str
    n_alerts: int
    n_files: int
    skipped: list
    seconds: float
    engine: str

    @property
    def rate(self):
        """Alerts per second (0 when nothing was read)."""
        return self.n_alerts / self.seconds if self.seconds > 0 else 0.0

    def __str__(self):
        text = (
            f"{self.n_alerts} alerts from {self.n_files} file(s) in "
            f"{self.seconds:.1f} s ({self.rate:.0f} alerts/s, {self.engine})"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} skipped: " + "; ".join(
                f"{source}: {reason}" for source, reason in self.skipped
            )
        return text + f" -> {self.out}"


# --------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _final_step(model):
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else model


def _first_step(model):
    steps = getattr(model, "steps", None)
    return steps[0][1] if steps else model


def load_model(path, *, device="cpu"):
    """Read a model file for :func:`score_alerts`, recognised by its content.

    Parameters
    ----------
    path : str or path-like
        A file written by :meth:`sk_covvae.CovarianceVAE.save` (a zip archive
        with a ``manifest.json``), or a fitted estimator or
        :class:`~sklearn.pipeline.Pipeline` ending in one, saved with
        :func:`joblib.dump` (or pickled). A pickle runs code when loaded:
        load only files you trust.
    device : str, default='cpu'
        Torch device of a model read from a :meth:`~sk_covvae.CovarianceVAE.save`
        file; joblib files load onto the device they were saved from.

    Returns
    -------
    model : estimator
        The fitted model; its last step has ``anomaly_score``.
    sha256 : str
        Hexadecimal SHA-256 of the file's bytes.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ModelFileError
        When the file is neither kind, cannot be read, or holds something
        that is not a fitted model with ``anomaly_score``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such model file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ModelFileError(path, "the file is empty.")
    if head == _ZIP_MAGIC and _is_covvae_archive(path):
        from sk_covvae import CovarianceVAE

        try:
            model = CovarianceVAE.load(path, device=device)
        except ValueError as exc:
            raise ModelFileError(path, f"not a readable model file ({exc})") from exc
    else:
        import joblib

        try:
            model = joblib.load(path)
        except Exception as exc:  # unpickling raises many kinds
            raise ModelFileError(
                path,
                "neither a CovarianceVAE.save file nor a joblib/pickle file of "
                f"a fitted model ({type(exc).__name__}: {exc}).",
            ) from exc
    _check_model(model, path)
    return model, _sha256(path)


def _is_covvae_archive(path):
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return _COVVAE_MANIFEST in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _check_model(model, path="the model"):
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    last = _final_step(model)
    if not hasattr(last, "anomaly_score"):
        raise ModelFileError(
            path,
            f"it holds a {type(model).__name__} whose last step "
            f"({type(last).__name__}) has no anomaly_score: expected a "
            "CovarianceVAE or a Pipeline ending in one.",
        )
    try:
        check_is_fitted(model)
    except (NotFittedError, TypeError) as exc:
        raise ModelFileError(path, f"the model is not fitted ({exc})") from exc


# --------------------------------------------------------------------------
# what the model reads
# --------------------------------------------------------------------------


def model_input_shape(model):
    """Shape ``(C, H, W)`` of the stamps a model reads, C = 3 or 6.

    Alert stamps are ``(3, H, W)``: science, template and difference
    (:data:`~sk_covvae.datasets.ALERT_CHANNELS`); a model with six input
    channels reads them followed by their three variance planes. The shape
    comes from the first step's ``image_shape`` (a
    :class:`~sk_covvae.preprocessing.StampPreprocessor`'s parameter or a
    :class:`~sk_covvae.CovarianceVAE`'s fitted ``image_shape_``) and is
    checked against the model's ``n_features_in_``.

    Parameters
    ----------
    model : estimator
        A fitted model, e.g. from :func:`load_model`.

    Returns
    -------
    shape : tuple of int
        ``(C, H, W)``.

    Raises
    ------
    ValueError
        Naming the mismatch when the model's input is not alert stamps of 3
        or 6 channels.

    Examples
    --------
    >>> from sk_covvae.preprocessing import StampPreprocessor
    >>> from sk_covvae.scoring import model_input_shape
    >>> import numpy as np
    >>> pre = StampPreprocessor((3, 21, 21)).fit(np.zeros((1, 3 * 21 * 21)))
    >>> model_input_shape(pre)
    (3, 21, 21)
    """
    first = _first_step(model)
    n_features = getattr(model, "n_features_in_", None)
    if n_features is None:
        n_features = getattr(first, "n_features_in_", None)
    shape = getattr(first, "image_shape_", None)
    if shape is None:
        shape = getattr(first, "get_params", dict)().get("image_shape")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) == 3 and -1 in shape and n_features is not None:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(n_features // known if s == -1 else s for s in shape)
    elif n_features is not None and n_features % 3 == 0:
        side = math.isqrt(n_features // 3)
        if side * side * 3 == n_features:
            shape = (3, side, side)
    what = f"{type(first).__name__} (the model's first step)"
    if shape is None or len(shape) != 3:
        raise ValueError(
            f"Cannot tell the stamp shape {what} reads: it has no image_shape "
            f"and n_features_in_={n_features} is not 3 * H * H. Put a "
            "StampPreprocessor(image_shape=(3, H, W), ...) first in a Pipeline."
        )
    if n_features is not None and math.prod(shape) != n_features:
        raise ValueError(
            f"{what} has image_shape={shape} but n_features_in_={n_features} "
            f"(C * H * W = {math.prod(shape)})."
        )
    if shape[0] not in (3, 6):
        raise ValueError(
            f"{what} reads stamps of shape {shape}: {shape[0]} channel(s), but "
            "alert stamps have 3 (science, template, difference) or 6 (the "
            "three followed by their variance planes), flattened channel "
            "first. Put a StampPreprocessor(image_shape=(3, H, W), "
            "channels=[...]) first in a Pipeline to keep some of them."
        )
    return shape


def model_channels(model, shape):
    """Names of the alert cutouts whose planes a model reads.

    A :class:`~sk_covvae.preprocessing.StampPreprocessor` first in the
    pipeline keeps only its ``channels`` (and ``variance_channels``); the
    other cutouts need not be decoded at all. Any other first step reads
    all three.

    Parameters
    ----------
    model : estimator
        A fitted model, e.g. from :func:`load_model`.
    shape : tuple of int
        ``(C, H, W)`` from :func:`model_input_shape`.

    Returns
    -------
    channels : list of str
        Among :data:`~sk_covvae.datasets.ALERT_CHANNELS`, in that order.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_covvae.preprocessing import StampPreprocessor
    >>> from sk_covvae.scoring import model_channels
    >>> pre = StampPreprocessor((3, 21, 21), channels=[2])
    >>> pre = pre.fit(np.zeros((1, 3 * 21 * 21)))
    >>> model_channels(pre, (3, 21, 21))
    ['difference']
    """
    from sk_covvae.datasets import ALERT_CHANNELS
    from sk_covvae.preprocessing import StampPreprocessor

    first = _first_step(model)
    used = range(shape[0])
    if isinstance(first, StampPreprocessor) and hasattr(first, "n_features_in_"):
        geometry = first._geometry(first.n_features_in_)
        used = set(geometry.images) | set(geometry.variances or ())
    # channels 3 to 5 of a six-channel stamp are the variance planes of the
    # same three cutouts
    planes = {c % 3 for c in used}
    return [name for c, name in enumerate(ALERT_CHANNELS) if c in planes]


def stamps_to_X(images, variance, shape):
    """The rows a model reads from alert stamps.

    Parameters
    ----------
    images : ndarray of shape (n, 3, H, W)
        Science, template and difference cutouts (``Bunch.images`` of
        :func:`~sk_covvae.datasets.read_alerts`).
    variance : ndarray of shape (n, 3, H, W) or None
        Their variance planes (``Bunch.variance``); None gives NaN planes.
    shape : tuple of int
        ``(C, H, W)`` from :func:`model_input_shape`: C = 3 uses the images,
        C = 6 the images followed by the variance planes.

    Returns
    -------
    X : ndarray of shape (n, C * H * W), float32
        Stamps flattened channel first.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_covvae.scoring import stamps_to_X
    >>> images = np.zeros((2, 3, 5, 5), dtype=np.float32)
    >>> stamps_to_X(images, None, (6, 5, 5)).shape
    (2, 150)
    """
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    if images.shape[1:] != (3, *shape[1:]):
        raise ValueError(
            f"stamps of shape {images.shape[1:]} do not fit a model that reads "
            f"{tuple(shape)}."
        )
    if shape[0] == 3:
        return images.reshape(n, -1)
    if variance is None:
        variance = np.full_like(images, np.nan)
    return np.concatenate([images, np.asarray(variance, np.float32)], axis=1).reshape(
        n, -1
    )


def _score_X(model, X, method, latents):
    """Anomaly scores (and latent features) of the rows X, float64."""
    return _score_last(model, _preprocess(model, X), method, latents)


def _preprocess(model, X):
    """The rows that the model's last step reads: ``X`` through the other
    steps of a pipeline (``X`` itself for an estimator)."""
    steps = getattr(model, "steps", None)
    for _, step in (steps or [])[:-1]:
        if step is not None and step != "passthrough":
            X = step.transform(X)
    return X


def _model_rows(model, batch, shape):
    """The rows that the model's last step reads from a batch of alerts."""
    return _preprocess(model, stamps_to_X(batch.images, batch.variance, shape))


def _score_last(model, Xt, method, latents):
    """:func:`_score_X` of rows already through :func:`_preprocess`."""
    last = _final_step(model)
    scores = np.asarray(last.anomaly_score(Xt, method=method), dtype=np.float64)
    Z = np.asarray(last.transform(Xt), dtype=np.float64) if latents else None
    return scores, Z


def _n_latent(model):
    last = _final_step(model)
    n = getattr(last, "_n_features_out", None)
    return int(n if n is not None else last.n_components)


# --------------------------------------------------------------------------
# one batch of files: the unit of work of every engine
# --------------------------------------------------------------------------


def _score_sources(
    model, sources, *, shape, batch_size, method, latents, on_error, channels=None
):
    """Score every alert of ``sources``; return ``(columns, skipped)``.

    ``columns`` is a dict of numpy arrays / lists in table order.
    """
    from sk_covvae.datasets import iter_alerts

    parts, skipped = [], []
    batches = iter_alerts(
        sources,
        batch_size=batch_size,
        size=shape[1:],
        on_error=on_error,
        channels=channels,
    )
    for batch in _Prefetched(batches):
        skipped.extend((str(s), str(r)) for s, r in batch.skipped)
        if len(batch.images) == 0:
            continue
        parts.append(_batch_columns(model, batch, shape, method, latents))
    return _concat(parts, _n_latent(model) if latents else 0), skipped


def _batch_columns(model, batch, shape, method, latents, threads=None, Xt=None):
    """The table columns of one batch of alerts.

    ``threads``, when given, is called before each block of rows the model
    scores and returns how many threads torch uses for it (see
    :class:`_ThreadsWhileReading`). ``Xt``: the batch's rows already
    through :func:`_preprocess` (the local job prepares them in its reader
    thread).
    """
    if Xt is None:
        Xt = _model_rows(model, batch, shape)
    if threads is None:
        scores, Z = _score_last(model, Xt, method, latents)
    else:
        scores, Z = _score_blocks(model, Xt, method, latents, threads)
    table = _table(batch)
    columns = {
        "alert_id": np.asarray(table["alert_id"], dtype=np.int64),
        "object_id": [None if v is None else str(v) for v in table["object_id"]],
        "survey": [str(v) for v in table["survey"]],
        "source": [str(v) for v in table["source"]],
        "record_index": np.asarray(table["record_index"], dtype=np.int64),
        "score": scores,
    }
    if Z is not None:
        for k in range(Z.shape[1]):
            columns[f"latent_{k}"] = Z[:, k]
    return columns


def _table(batch):
    """The columns of a batch of alerts: its frame, or its ``columns`` when
    it was read without one (the local job)."""
    return batch.frame if batch.frame is not None else batch.columns


def _pass_rows(model, default):
    """Rows of one inference pass of the (fitted) model's last step, its
    ``_block_rows``, or ``default`` for an estimator without them."""
    rows = getattr(_final_step(model), "_block_rows", None)
    return default if rows is None else max(int(rows()), 1)


def _read_size(model, batch_size):
    """Alerts per batch read by the local job: ``batch_size``, or one
    inference pass of the model when that is smaller. The model then starts
    on each pass as soon as it is read, instead of waiting for a large
    batch to fill (the table does not depend on it: see
    :class:`_ParquetSink`)."""
    return min(batch_size, _pass_rows(model, batch_size))


def _score_blocks(model, Xt, method, latents, threads):
    """:func:`_score_last` block by block, torch's threads set before each.

    The blocks are the estimator's inference passes (``_block_rows``, every
    pass the same size), so the scores are those of one call.
    """
    import torch

    rows = _pass_rows(model, max(len(Xt), 1))
    parts = []
    for i in range(0, len(Xt), rows):
        torch.set_num_threads(threads())
        parts.append(_score_last(model, Xt[i : i + rows], method, latents))
    scores = np.concatenate([s for s, _ in parts]) if parts else np.empty(0)
    Z = np.concatenate([z for _, z in parts]) if latents and parts else None
    return scores, Z


def _concat(parts, n_latent):
    names = ["alert_id", "object_id", "survey", "source", "record_index", "score"]
    names += [f"latent_{k}" for k in range(n_latent)]
    out = {}
    for name in names:
        values = [p[name] for p in parts]
        if name in ("object_id", "survey", "source"):
            out[name] = [v for part in values for v in part]
        else:
            dtype = np.int64 if name in ("alert_id", "record_index") else np.float64
            out[name] = (
                np.concatenate(values) if values else np.zeros(0, dtype=dtype)
            ).astype(dtype, copy=False)
    return out


def _dask_task(model, sources, options):
    """One Dask task: a batch of files (runs on a worker)."""
    return _score_sources(model, sources, **options)


# --------------------------------------------------------------------------
# the Parquet file
# --------------------------------------------------------------------------


def _arrow_schema(n_latent):
    import pyarrow as pa

    fields = [
        pa.field("alert_id", pa.int64(), nullable=False),
        pa.field("object_id", pa.string()),
        pa.field("survey", pa.string()),
        pa.field("source", pa.string()),
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
    ]
    fields += [
        pa.field(f"latent_{k}", pa.float64(), nullable=False) for k in range(n_latent)
    ]
    return pa.schema(fields)


class _ParquetSink:
    """Writes the rows given in order as row groups of ``ROW_GROUP_SIZE``.

    The row groups depend only on the rows, not on how they arrive, so every
    engine writes the same bytes. The file is written beside ``out`` and
    moved there on success.
    """

    def __init__(self, out, n_latent):
        import pyarrow.parquet as pq

        self.out = os.fspath(out)
        self.schema = _arrow_schema(n_latent)
        self.tmp = f"{self.out}.partial"
        self.writer = pq.ParquetWriter(
            self.tmp, self.schema, compression="zstd", write_statistics=True
        )
        self.pending = []
        self.n_pending = 0
        self.n_rows = 0

    def add(self, columns):
        import pyarrow as pa

        n = len(columns["alert_id"])
        if not n:
            return
        self.pending.append(pa.table(columns, schema=self.schema))
        self.n_pending += n
        self.n_rows += n
        while self.n_pending >= ROW_GROUP_SIZE:
            self._flush(ROW_GROUP_SIZE)

    def _flush(self, n):
        import pyarrow as pa

        table = pa.concat_tables(self.pending)
        self.writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.n_pending = rest.num_rows

    def close(self, metadata):
        if self.n_pending:
            self._flush(self.n_pending)
        self.writer.add_key_value_metadata(
            {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        )
        self.writer.close()
        os.replace(self.tmp, self.out)

    def abort(self):
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


def read_metadata(path):
    """The JSON metadata that :func:`score_alerts` wrote into a Parquet file.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`score_alerts`.

    Returns
    -------
    metadata : dict
        ``format``, ``format_version``, ``sk_covvae_version``, ``model``
        (``path``, ``sha256``), ``method``, ``latents``, ``stamp_shape``,
        ``inputs`` (the paths given), ``n_files``, ``n_alerts`` and
        ``skipped`` (a list of ``{'source', 'reason'}``).
    """
    import pyarrow.parquet as pq

    raw = pq.read_metadata(os.fspath(path)).metadata or {}
    if METADATA_KEY not in raw:
        raise ValueError(f"{path}: not a file written by sk_covvae's score_alerts")
    return json.loads(raw[METADATA_KEY])


# --------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------


def _check_torch_threads(n):
    """``torch_threads`` as a number of threads, or None."""
    if n is None:
        return None
    if isinstance(n, str) and n == "auto":
        return max(1, (os.cpu_count() or 1) - 1)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(
            f"torch_threads must be None, 'auto' or a positive int, got {n!r}."
        )
    return int(n)


def _reader_threads(torch_threads):
    """``(reading, after)`` torch threads of ``torch_threads='auto'``: all
    cores but one while the reader thread reads, all once it has read all.
    (Switching at every pause of the reader costs more than it gains.)"""
    if not (isinstance(torch_threads, str) and torch_threads == "auto"):
        return None
    reading = _check_torch_threads("auto")
    return reading, max(reading, os.cpu_count() or 1)


@contextlib.contextmanager
def _torch_threads(n):
    """Run the block with torch using ``n`` threads (None: as it is), then
    restore the previous setting."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_options(batch_size, on_error, engine, method):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if engine not in _ENGINES:
        raise ValueError(f"engine must be one of {_ENGINES}, got {engine!r}.")
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {method!r}.")


def _files(inputs):
    """Sorted input files, each once (folders expanded as iter_alerts does)."""
    from sk_covvae.datasets._readers import _sources

    names = [name for name, _ in _sources(inputs)]
    return sorted(dict.fromkeys(names))


def score_alerts(
    model,
    inputs,
    out,
    *,
    batch_size=1000,
    method="elbo",
    latents=False,
    on_error="raise",
    engine="local",
    scheduler=None,
    files_per_task=None,
    device="cpu",
    torch_threads=None,
    progress=None,
):
    """Score alert files with a model and write one Parquet table.

    Reads every alert of ``inputs`` in batches of at most ``batch_size``
    (:func:`~sk_covvae.datasets.iter_alerts`; stamps of the size the model
    reads, centred on the candidate), builds the rows the model reads
    (:func:`stamps_to_X`: science, template and difference flattened channel
    first, then the variance planes for a six-channel model), computes the
    anomaly score (for a Pipeline: every step's ``transform`` but the last's,
    then the last step's ``anomaly_score(Xt, method=method)``) and, with
    ``latents``, the latent features (its ``transform``), and writes them to
    ``out``. Only the cutouts the model reads are decoded
    (:func:`model_channels`); the planes of the others are NaN.

    The table has one row per alert, in the order of the sorted input files
    and of the alerts in them: ``alert_id`` (int64: ZTF ``candid``, Rubin
    ``diaSourceId``), ``object_id``, ``survey``, ``source`` (file),
    ``record_index`` (position in it), ``score`` (float64, higher = more
    unusual) and ``latent_0`` ... ``latent_{k-1}`` with ``latents``. The
    file's key-value metadata holds, under ``'sk_covvae'``, a JSON document
    (:func:`read_metadata`): the model file's SHA-256, the method, the
    package version, the inputs and every skipped file with its reason. The
    file holds no time stamps: the same inputs, model and options give the
    same bytes, with either engine.

    Parameters
    ----------
    model : str or path-like
        Model file, see :func:`load_model`.
    inputs : str, path-like or list of them
        Alert files (Avro, Kafka frames, Parquet) or folders of them.
    out : str or path-like
        The Parquet file to write (replaced; written beside it first and
        moved there at the end, so a failed run leaves no partial table).
    batch_size : int, default=1000
        Alerts read and scored at once: the memory bound of a reader.
    method : str, default='elbo'
        ``method`` of :meth:`~sk_covvae.CovarianceVAE.anomaly_score`;
        ``'elbo'`` is ``-score_samples``.
    latents : bool, default=False
        Also write the latent features (posterior means).
    on_error : {'raise', 'skip'}, default='raise'
        A file or alert that cannot be read raises
        :class:`~sk_covvae.datasets.AlertReadError` naming it, or is skipped,
        warned of and listed in the summary and in the file's metadata.
    engine : {'local', 'dask'}, default='local'
        ``'local'``: in this process. ``'dask'``: one task per batch of files
        on a dask.distributed cluster, the model sent to every worker once,
        the results written in input order.
    scheduler : str or distributed.Client, optional
        With ``engine='dask'``: the scheduler's address, or a client. None
        starts a ``LocalCluster`` on 127.0.0.1 (2 worker processes, one
        thread each) for this call.
    files_per_task : int, optional
        With ``engine='dask'``: input files per task. Default: the files
        split into about four tasks per worker, at most ``batch_size`` each.
    device : str, default='cpu'
        Torch device of a model read from a ``CovarianceVAE.save`` file.
    torch_threads : int or 'auto', optional
        With ``engine='local'``: the threads torch uses while this call
        scores (``torch.set_num_threads``, restored when it returns; a
        process-wide setting, hence opt-in). The alerts of the next batch
        are read in a thread while the model scores the current one, and on
        a CPU the two overlap only when torch leaves the reader a core:
        ``'auto'`` uses ``os.cpu_count() - 1`` threads (at least one) while
        the reader reads and all cores once it has read the last alert (the
        scores do not depend on it), which ``covvae score`` passes. None
        (the default) leaves torch's setting alone. Irrelevant to a model on
        a GPU.
    progress : callable, optional
        Called as ``progress(n_alerts, n_files_done, n_files)`` after each
        batch (local) or task (dask); nothing is printed otherwise.

    Returns
    -------
    summary : ScoreSummary
        Alerts read, files, skipped ones with reasons, seconds and rate.

    Raises
    ------
    FileNotFoundError
        When the model file or an input does not exist.
    ModelFileError
        When the model file cannot be used.
    ValueError
        When an option is invalid, or the model's input is not alert stamps
        (the message names the mismatch).
    AlertReadError
        With ``on_error='raise'``, naming the unreadable file.

    See Also
    --------
    sk_covvae.datasets.iter_alerts : The reader.
    sk_covvae.spark.make_score_udf : The same scores in Spark.

    Examples
    --------
    >>> from sk_covvae.scoring import score_alerts, read_metadata
    >>> summary = score_alerts("model.joblib", ["ztf_alert_archive/"],
    ...                        "scores.parquet", on_error="skip")  # doctest: +SKIP
    >>> print(summary)  # doctest: +SKIP
    498 alerts from 498 file(s) in 1.9 s (259 alerts/s, local) -> scores.parquet
    >>> import pandas as pd  # doctest: +SKIP
    >>> pd.read_parquet("scores.parquet").head()  # doctest: +SKIP
    """
    start = time.perf_counter()
    _check_options(batch_size, on_error, engine, method)
    threads = _reader_threads(torch_threads)
    torch_threads = _check_torch_threads(torch_threads)
    model_path = os.fspath(model)
    estimator, sha256 = load_model(model_path, device=device)
    shape = model_input_shape(estimator)
    inputs = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not inputs:
        raise ValueError("inputs is empty: give at least one alert file or folder.")
    inputs = [os.fspath(p) for p in inputs]
    files = _files(inputs)
    n_latent = _n_latent(estimator) if latents else 0
    options = dict(
        shape=shape,
        channels=model_channels(estimator, shape),
        batch_size=int(batch_size),
        method=method,
        latents=bool(latents),
        on_error=on_error,
    )
    out = os.fspath(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sink = _ParquetSink(out, n_latent)
    try:
        if engine == "local":
            with _torch_threads(torch_threads):
                skipped = _run_local(estimator, files, options, sink, progress, threads)
        else:
            skipped = _run_dask(
                estimator, files, options, sink, progress, scheduler, files_per_task
            )
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "sk_covvae_version": _version(),
            "model": {"path": model_path, "sha256": sha256},
            "method": method,
            "latents": bool(latents),
            "stamp_shape": list(shape),
            "inputs": inputs,
            "n_files": len(files),
            "n_alerts": sink.n_rows,
            "skipped": [{"source": s, "reason": r} for s, r in skipped],
        }
        sink.close(metadata)
    except BaseException:
        sink.abort()
        raise
    return ScoreSummary(
        out=out,
        n_alerts=sink.n_rows,
        n_files=len(files),
        skipped=skipped,
        seconds=time.perf_counter() - start,
        engine=engine,
    )


def _version():
    from sk_covvae import __version__

    return __version__


class _Prefetched:
    """The items of ``iterable``, each produced while the previous is used.

    A reader thread runs one item ahead: gunzip, Avro decoding and torch
    release the GIL, so reading overlaps scoring on two cores. Order and
    exceptions are kept; at most two items are in memory at once besides
    the one being read. :attr:`done` is set once the reader has read the
    last item (or failed).
    """

    def __init__(self, iterable):
        self.iterable = iterable
        self.done = threading.Event()

    def __iter__(self):
        items = queue.Queue(maxsize=1)
        stop = threading.Event()
        end = object()

        def put(entry):
            while not stop.is_set():
                try:
                    items.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for item in self.iterable:
                    if not put((item, None)):
                        return
            except BaseException as exc:  # re-raised in the consuming thread
                self.done.set()
                put((end, exc))
                return
            self.done.set()
            put((end, None))

        thread = threading.Thread(target=produce, name="sk_covvae-reader", daemon=True)
        thread.start()
        try:
            while True:
                item, exc = items.get()
                if item is end:
                    if exc is not None:
                        raise exc
                    return
                yield item
        finally:
            stop.set()
            thread.join()


class _ThreadsWhileReading:
    """Torch's threads for the next block of rows: ``reading`` while the
    reader thread reads (it needs a core), ``after`` once it has read all."""

    def __init__(self, reader, reading, after):
        self.reader, self.reading, self.after = reader, reading, after

    def __call__(self):
        return self.after if self.reader.done.is_set() else self.reading


def _run_local(model, files, options, sink, progress, threads=None):
    """Score ``files`` in this process, reading the next batch in a thread;
    ``threads``: ``(reading, after)`` torch threads while the reader reads
    and once it is done (see :class:`_ThreadsWhileReading`), or None."""
    from sk_covvae.datasets._readers import _iter_alerts

    position = {name: i for i, name in enumerate(files)}
    skipped = []
    shape = options["shape"]
    batches, buffers = _iter_alerts(
        files,
        _read_size(model, options["batch_size"]),
        shape[1:],
        options["on_error"],
        None,
        options["channels"],
        first=_FIRST_BATCH,
        reuse=True,
        frame=False,
    )

    def prepared():  # in the reader thread: the model's thread only scores
        for batch in batches:  # (a batch of only skipped files has no rows)
            yield batch, _model_rows(model, batch, shape) if len(batch.images) else None

    reader = _Prefetched(prepared())
    policy = None if threads is None else _ThreadsWhileReading(reader, *threads)
    for batch, Xt in reader:
        skipped.extend((str(s), str(r)) for s, r in batch.skipped)
        if len(batch.images):
            sink.add(
                _batch_columns(
                    model,
                    batch,
                    shape,
                    options["method"],
                    options["latents"],
                    policy,
                    Xt,
                )
            )
        buffers.give(batch.images)  # the model is done with them
        if progress is not None:
            done = [position.get(str(s), -1) for s, _ in batch.skipped]
            if len(batch.images):
                done.append(position.get(str(batch.columns["source"][-1]), -1))
            progress(sink.n_rows, max(done, default=-1) + 1, len(files))
    if progress is not None:
        progress(sink.n_rows, len(files), len(files))
    return skipped


@contextlib.contextmanager
def _dask_client(scheduler):
    """A client of ``scheduler``: an address, a Client, or a LocalCluster."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "engine='dask' needs dask.distributed: pip install sk_covvae[dask]"
        ) from exc
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _run_dask(model, files, options, sink, progress, scheduler, files_per_task):
    from distributed import as_completed

    with _dask_client(scheduler) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        if files_per_task is None:
            files_per_task = math.ceil(len(files) / (4 * n_workers))
            files_per_task = max(1, min(files_per_task, options["batch_size"]))
        elif isinstance(files_per_task, bool) or int(files_per_task) < 1:
            raise ValueError(
                f"files_per_task must be a positive int, got {files_per_task!r}."
            )
        groups = [
            files[i : i + int(files_per_task)]
            for i in range(0, len(files), int(files_per_task))
        ]
        remote_model = client.scatter(model, broadcast=True)
        futures = [
            client.submit(_dask_task, remote_model, group, options, pure=False)
            for group in groups
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        ready, next_index, skipped, n_files_done = {}, 0, [], 0
        try:
            for future in as_completed(futures):
                ready[index[future.key]] = future.result()
                future.release()
                # write in input order: the finished tasks wait for earlier ones
                while next_index in ready:
                    columns, group_skipped = ready.pop(next_index)
                    sink.add(columns)
                    skipped.extend(group_skipped)
                    n_files_done += len(groups[next_index])
                    next_index += 1
                    if progress is not None:
                        progress(sink.n_rows, n_files_done, len(files))
        except BaseException:
            client.cancel(futures)
            raise
    return skipped
