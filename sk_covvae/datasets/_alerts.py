"""Reader for ZTF-style Avro alert packets (optional extra ``astro``)."""

import numbers

import numpy as np
from sklearn.utils import Bunch

from sk_covvae._optional import require
from sk_covvae.datasets._fits import read_cutout
from sk_covvae.datasets._hits import _as_path_list

#: Side of a full ZTF cutout; cutouts at the CCD edge are clipped below it.
ZTF_CUTOUT_SIZE = 63

_CUTOUTS = {
    "difference": "cutoutDifference",
    "science": "cutoutScience",
    "template": "cutoutTemplate",
}


def _decode_cutout(cutout):
    # the built-in FITS reader: the values astropy gives, a few times faster
    return read_cutout(cutout["stampData"])[0].astype(np.float32)


def _centre(length, pos0, nominal=ZTF_CUTOUT_SIZE):
    """Index of the candidate along one axis of a possibly clipped cutout.

    A full cutout is centred (index ``nominal // 2``). A cutout clipped at the
    low CCD edge starts at CCD pixel 0, so the candidate sits at its own
    0-based CCD coordinate; one clipped at the high edge keeps the centre.
    """
    if length >= nominal or pos0 is None or pos0 >= nominal // 2:
        return nominal // 2 if length >= nominal // 2 + 1 else length // 2
    return int(np.clip(np.rint(pos0), 0, length - 1))


def _crop(image, cy, cx, size):
    """Crop a ``size`` square centred at (cy, cx), padding with NaN outside."""
    half = size // 2
    out = np.full((size, size), np.nan, dtype=np.float32)
    y0, x0 = cy - half, cx - half
    ys = slice(max(y0, 0), min(y0 + size, image.shape[0]))
    xs = slice(max(x0, 0), min(x0 + size, image.shape[1]))
    out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = image[ys, xs]
    return out


def read_alert_cutouts(paths, stamp_size=21, *, on_edge="pad", return_X_y=False):
    """Read centred cutouts from ZTF-style Avro alert packets.

    Every alert holds gzip-compressed FITS cutouts (``cutoutScience``,
    ``cutoutTemplate``, ``cutoutDifference``, normally 63x63 pixels centred on
    the candidate) and the candidate record. This reader returns the central
    ``stamp_size`` square of each cutout, the candidate id, and the packet's
    own real-bogus score ``candidate.rb``. Needs the optional dependency
    fastavro (``pip install sk_covvae[astro]``). :func:`read_alerts` reads
    whole cutouts of ZTF and Rubin alerts in more formats.

    Near the CCD edge ZTF clips the cutout (e.g. 41x63). The candidate's
    position in the clipped cutout is recovered from ``candidate.xpos`` /
    ``candidate.ypos`` (1-based CCD pixels): clipping at the low edge means the
    cutout starts at CCD pixel 0. When the ``stamp_size`` square around the
    candidate leaves the cutout, ``on_edge`` decides.

    Parameters
    ----------
    paths : str, path-like or iterable of them
        Avro files, or folders whose ``*.avro`` files are read in sorted
        order. A file may hold several alerts.
    stamp_size : int, default=21
        Side of the returned square stamps (odd, <= 63).
    on_edge : {'pad', 'skip'}, default='pad'
        ``'pad'``: pixels outside the cutout are NaN in ``template``,
        ``science`` and ``difference`` and 0 in ``data``, and ``padded`` is True
        for the alert. ``'skip'``: such alerts are left out.
    return_X_y : bool, default=False
        If True, return ``(data, rb)`` instead of a Bunch (there are no human
        labels; ``rb`` is ZTF's own score).

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes (``n`` alerts).

        data : ndarray of shape (n, stamp_size ** 2), float32
            Difference stamps divided by ``noise_sigma``; NaN (masked or padded)
            pixels set to 0.
        template, science, difference : ndarray of shape (n, s, s), float32
            Centred crops of the cutouts as stored (ADU, NaN where masked or
            padded). ZTF stores the difference with the candidate positive:
            for negative detections (``isdiffpos`` False) it is
            reference minus science.
        noise_sigma : ndarray of shape (n,)
            1.4826 times the median absolute deviation of the full
            difference cutout (a robust background noise estimate).
        candid : ndarray of shape (n,), int64
            Candidate id.
        object_id : ndarray of shape (n,), str
            ZTF object name (empty when the packet has none).
        rb : ndarray of shape (n,)
            The packet's real-bogus score ``candidate.rb`` (NaN if absent).
        isdiffpos : ndarray of shape (n,), bool
            Whether the candidate is a positive detection (science brighter).
        padded : ndarray of shape (n,), bool
            Whether the stamp needed padding (only with ``on_edge='pad'``).
        cutout_shape : ndarray of shape (n, 2), int
            Shape of the stored difference cutout.
        source : ndarray of shape (n,), str
            File of each alert.
        image_shape : tuple
            ``(stamp_size, stamp_size)``.

    (data, rb) : tuple if ``return_X_y`` is True

    Raises
    ------
    ImportError
        When fastavro is missing.

    Examples
    --------
    >>> from sk_covvae.datasets import read_alert_cutouts
    >>> alerts = read_alert_cutouts("path/to/ztf_alerts/")  # doctest: +SKIP
    >>> alerts.data.shape  # doctest: +SKIP
    (15, 441)
    """
    if (
        isinstance(stamp_size, bool)
        or not isinstance(stamp_size, numbers.Integral)
        or not 1 <= stamp_size <= ZTF_CUTOUT_SIZE
        or stamp_size % 2 == 0
    ):
        raise ValueError(
            f"stamp_size must be an odd integer between 1 and {ZTF_CUTOUT_SIZE}, "
            f"got {stamp_size!r}."
        )
    if on_edge not in ("pad", "skip"):
        raise ValueError(f"on_edge must be 'pad' or 'skip', got {on_edge!r}.")
    files = []
    for path in _as_path_list(paths, "Avro alert files"):
        if path.is_dir():
            files.extend(sorted(path.glob("*.avro")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No such Avro file or folder: {path}")
    fastavro = require("fastavro", "read_alert_cutouts")

    rows = []
    for path in files:
        with open(path, "rb") as f:
            for packet in fastavro.reader(f):
                rows.append(_read_packet(packet, path, stamp_size))
    if on_edge == "skip":
        rows = [r for r in rows if not r["padded"]]

    n = len(rows)
    shape = (n, stamp_size, stamp_size)
    out = {
        key: np.stack([r[key] for r in rows]) if n else np.empty(shape, np.float32)
        for key in _CUTOUTS
    }
    sigma = np.array([r["noise_sigma"] for r in rows], dtype=np.float64)
    data = np.nan_to_num(out["difference"].reshape(n, -1) / sigma[:, None], nan=0.0)
    data = data.astype(np.float32)
    rb = np.array([r["rb"] for r in rows], dtype=np.float64)
    if return_X_y:
        return data, rb
    return Bunch(
        data=data,
        **out,
        noise_sigma=sigma,
        candid=np.array([r["candid"] for r in rows], dtype=np.int64),
        object_id=np.array([r["object_id"] for r in rows], dtype=str),
        rb=rb,
        isdiffpos=np.array([r["isdiffpos"] for r in rows], dtype=bool),
        padded=np.array([r["padded"] for r in rows], dtype=bool),
        cutout_shape=np.array([r["cutout_shape"] for r in rows], dtype=int).reshape(
            n, 2
        ),
        source=np.array([str(r["source"]) for r in rows], dtype=str),
        image_shape=(stamp_size, stamp_size),
    )


def _read_packet(packet, path, stamp_size):
    cand = packet.get("candidate") or {}
    xpos, ypos = cand.get("xpos"), cand.get("ypos")
    row = {"padded": False}
    for key, field in _CUTOUTS.items():
        image = _decode_cutout(packet[field])
        cy = _centre(image.shape[0], None if ypos is None else ypos - 1.0)
        cx = _centre(image.shape[1], None if xpos is None else xpos - 1.0)
        half = stamp_size // 2
        if (
            cy - half < 0
            or cx - half < 0
            or cy + half >= image.shape[0]
            or cx + half >= image.shape[1]
        ):
            row["padded"] = True
        row[key] = _crop(image, cy, cx, stamp_size)
        if key == "difference":
            diff = image[np.isfinite(image)]
            med = np.median(diff) if diff.size else 0.0
            mad = 1.4826 * np.median(np.abs(diff - med)) if diff.size else 0.0
            row["noise_sigma"] = mad if mad > 0 else 1.0
            row["cutout_shape"] = image.shape
    rb = cand.get("rb")
    isdiffpos = str(cand.get("isdiffpos", "t")).lower() in ("t", "1", "true")
    candid = packet.get("candid", cand.get("candid"))
    row.update(
        candid=-1 if candid is None else int(candid),
        object_id=packet.get("objectId") or "",
        rb=np.nan if rb is None else float(rb),
        isdiffpos=isdiffpos,
        source=path,
    )
    return row
