"""Reader for the Deep-HiTS chunk format (pickled dicts of flattened stamps)."""

import gzip
import numbers
import os
import pickle
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

_KEYS = {
    "difference": "diff_images",
    "science": "sci_images",
    "template": "temp_images",
    "snr_image": "SNR_images",
}


def _as_path_list(paths, what):
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    try:
        paths = [Path(p) for p in paths]
    except TypeError as exc:
        raise ValueError(
            f"paths must be a path or an iterable of paths to {what}, got {paths!r}."
        ) from exc
    if not paths:
        raise ValueError(f"paths is empty: give at least one {what}.")
    return paths


def _robust_noise_sigma(difference, snr_image):
    """Background noise of each stamp: median of |difference / snr_image|
    (the pipeline's own noise map), else 1.4826 * MAD of the difference."""
    n = difference.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(difference / snr_image)
    ratio[~np.isfinite(ratio) | (ratio <= 0)] = np.nan
    sigma = np.full(n, np.nan)
    ok = np.any(np.isfinite(ratio), axis=1)
    if ok.any():
        sigma[ok] = np.nanmedian(ratio[ok], axis=1)
    bad = ~np.isfinite(sigma) | (sigma <= 0)
    if bad.any():
        d = difference[bad]
        med = np.nanmedian(d, axis=1, keepdims=True)
        sigma[bad] = 1.4826 * np.nanmedian(np.abs(d - med), axis=1)
    sigma[~np.isfinite(sigma) | (sigma <= 0)] = 1.0
    return sigma


def load_hits_chunks(paths, *, stamp_size=21, return_X_y=False):
    """Load real/bogus stamps saved in the Deep-HiTS chunk format.

    Each file is a pickled ``dict`` (optionally gzip-compressed) as written by
    the Deep-HiTS pipeline, holding arrays ``diff_images``, ``sci_images``,
    ``temp_images`` and ``SNR_images`` of shape (N, stamp_size ** 2) (rows
    flattened row-major), ``labels`` (1 real, 0 bogus) and ``SNRs``. Files are
    concatenated in the given order. The output has the same layout as
    :func:`make_difference_stamps`, so simulated and real stamps are
    interchangeable.

    .. warning:: Unpickling runs code stored in the file: load only chunks
       from a source you trust.

    Parameters
    ----------
    paths : str, path-like or iterable of them
        Chunk file(s). Python 2 pickles (the original Deep-HiTS chunks) are
        read with ``encoding='latin1'``.
    stamp_size : int, default=21
        Side of the square stamps; each image row must hold
        ``stamp_size ** 2`` pixels.
    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        data : ndarray of shape (n, stamp_size ** 2), float32
            Difference stamps divided by their background noise standard
            deviation ``noise_sigma`` (the normalisation of
            :func:`make_difference_stamps`).
        target : ndarray of shape (n,), int64
            1 real, 0 bogus.
        template, science, difference, snr_image : ndarray of shape (n, s, s)
            The stamps as stored, reshaped to images, float32.
        snr : ndarray of shape (n,)
            The chunk's ``SNRs``.
        noise_sigma : ndarray of shape (n,)
            Per-stamp median of ``|difference / snr_image|`` over pixels with
            a finite non-zero ratio (the pipeline's noise map), or
            1.4826 times the median absolute deviation of the difference where
            that is unavailable.
        source : ndarray of shape (n,), str
            File each stamp came from.
        target_names : ndarray of str
            ``['bogus', 'real']``.
        image_shape : tuple
            ``(stamp_size, stamp_size)``.

    (data, target) : tuple if ``return_X_y`` is True

    See Also
    --------
    make_difference_stamps : Simulated stamps in the same layout.

    References
    ----------
    .. [1] Cabrera-Vives et al. (2017), "Deep-HiTS: Rotation invariant
       convolutional neural network for transient detection", ApJ 836, 97.

    Examples
    --------
    >>> import pickle, tempfile, numpy as np
    >>> from pathlib import Path
    >>> from sk_covvae.datasets import load_hits_chunks
    >>> rng = np.random.default_rng(0)
    >>> chunk = {key: rng.normal(size=(3, 441)).astype(np.float32) for key in
    ...          ("diff_images", "sci_images", "temp_images", "SNR_images")}
    >>> chunk.update(labels=np.array([1, 0, 1]), SNRs=np.array([8.0, 5.5, 20.0]))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "chunk_0.pkl"
    ...     _ = path.write_bytes(pickle.dumps(chunk))
    ...     stamps = load_hits_chunks(path)
    >>> stamps.data.shape, stamps.difference.shape, stamps.target.tolist()
    ((3, 441), (3, 21, 21), [1, 0, 1])
    """
    paths = _as_path_list(paths, "Deep-HiTS chunk files")
    if (
        isinstance(stamp_size, bool)
        or not isinstance(stamp_size, numbers.Integral)
        or stamp_size < 1
    ):
        raise ValueError(f"stamp_size must be a positive integer, got {stamp_size!r}.")
    n_pix = stamp_size * stamp_size
    parts = {key: [] for key in (*_KEYS, "target", "snr", "source")}
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            chunk = pickle.load(f, encoding="latin1")
        if not isinstance(chunk, dict):
            raise ValueError(
                f"{path} does not hold a Deep-HiTS chunk: expected a pickled dict, "
                f"got {type(chunk).__name__}."
            )
        needed = [*_KEYS.values(), "labels", "SNRs"]
        missing = [k for k in needed if k not in chunk]
        if missing:
            raise ValueError(
                f"{path} is not a Deep-HiTS chunk: keys {missing} are missing "
                f"(expected {needed})."
            )
        labels = np.asarray(chunk["labels"]).astype(np.int64).ravel()
        n = labels.shape[0]
        for key, name in _KEYS.items():
            arr = np.asarray(chunk[name], dtype=np.float32)
            if arr.size != n * n_pix:
                raise ValueError(
                    f"{path}: {name} has shape {arr.shape}, expected ({n}, {n_pix}) "
                    f"for {n} labels and stamp_size={stamp_size}."
                )
            parts[key].append(arr.reshape(n, stamp_size, stamp_size))
        snr = np.asarray(chunk["SNRs"], dtype=np.float64).ravel()
        if snr.shape[0] != n:
            raise ValueError(f"{path}: SNRs has {snr.shape[0]} values for {n} labels.")
        parts["target"].append(labels)
        parts["snr"].append(snr)
        parts["source"].append(np.full(n, str(path)))

    out = {key: np.concatenate(value) for key, value in parts.items()}
    n = out["target"].shape[0]
    sigma = _robust_noise_sigma(
        out["difference"].reshape(n, -1).astype(np.float64),
        out["snr_image"].reshape(n, -1).astype(np.float64),
    )
    data = (out["difference"].reshape(n, -1) / sigma[:, None]).astype(np.float32)
    if return_X_y:
        return data, out["target"]
    return Bunch(
        data=data,
        **out,
        noise_sigma=sigma,
        target_names=np.array(["bogus", "real"]),
        image_shape=(stamp_size, stamp_size),
    )
