"""A minimal reader of FITS image HDUs held in memory (alert cutouts).

Alert cutouts are tiny FITS files (a 63x63 ZTF cutout is 20 kB; a Rubin
cutout holds three small image HDUs). Opening each with :mod:`astropy.io.fits`
costs about a millisecond, more than the rest of reading an alert; this module
reads the image HDUs directly with :func:`numpy.frombuffer` after parsing the
few header cards that locate and scale the data (``BITPIX``, ``NAXISn``,
``BZERO``, ``BSCALE``, ``BLANK``, ``PCOUNT``, ``GCOUNT``, ``EXTNAME``).

The values follow astropy's conventions exactly (tested bit for bit on every
shipped alert packet): floating-point data are returned as stored; scaled
8/16-bit integers become float32, scaled 32/64-bit integers float64, with
``BLANK`` pixels set to NaN; the unsigned-integer convention (``BSCALE = 1``,
``BZERO = 2**(BITPIX-1)``) gives unsigned integers. Anything else (tile
compressed images, random groups, unknown ``BITPIX``) is handed to astropy.
"""

import functools
import gzip
import io
import math
import re
import zlib

import numpy as np

#: FITS headers and data come in blocks of 2880 bytes of 80-character cards.
BLOCK = 2880
CARD = 80

_BITPIX_DTYPE = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}

#: Extension names that hold something other than the cutout image itself.
VARIANCE_EXTNAMES = ("UNCERT", "VARIANCE")
_AUX_EXTNAMES = frozenset(VARIANCE_EXTNAMES + ("PSFIMAGE", "PSF", "MASK"))

# The cards that locate or scale the data: the key in columns 1-8, "= " in
# columns 9-10, the value after.
_KEYS = frozenset(
    b"SIMPLE XTENSION BITPIX NAXIS BZERO BSCALE BLANK PCOUNT GCOUNT EXTNAME "
    b"GROUPS ZIMAGE".split()
)
_NAXIS_N = re.compile(rb"NAXIS\d{1,3}")
_END = b"END     "
# Parsed headers by their cards: the cutouts of a survey share a few headers
# (every 63x63 ZTF cutout has the same five cards), so most are looked up.
# The dicts are shared: nothing may change them.
_HEADERS = {}
_MAX_HEADERS = 1024
# The HDU lists of one-HDU files by (header cards, file size): see _hdus.
_LAYOUTS = {}
# How to view the image of a one-HDU file, by (header cards, file size):
# see _stored_image.
_STORED = {}
_INT = re.compile(rb"[+-]?\d+")


class FITSError(ValueError):
    """Raised for a FITS byte string that is truncated or malformed."""


class _Unsupported(Exception):
    """A valid FITS feature that the fast path leaves to astropy."""


def _value(raw):
    """Parse the value field (columns 11-80) of a card, as astropy does."""
    raw = raw.lstrip()
    if raw[:1] == b"'":
        # a string: '' is an escaped quote; the closing quote ends it
        out, i = [], 1
        while i < len(raw):
            c = raw[i : i + 1]
            if c == b"'":
                if raw[i + 1 : i + 2] == b"'":
                    out.append(b"'")
                    i += 2
                    continue
                break
            out.append(c)
            i += 1
        return b"".join(out).decode("ascii", "replace").rstrip()
    raw = raw.split(b"/", 1)[0].rstrip()
    if _INT.fullmatch(raw):
        return int(raw)
    if raw in (b"T", b"F"):
        return raw == b"T"
    try:
        return float(raw.replace(b"D", b"E").replace(b"d", b"e"))
    except ValueError:
        raise FITSError(f"unreadable header value {raw[:30]!r}") from None


def _header(buf, start):
    """Cards that locate and scale the data, and the offset where data start."""
    pos, size = start, len(buf)
    while True:
        if pos + BLOCK > size:
            raise FITSError(
                f"truncated header at byte {start} (no END card in the "
                f"{size - start} bytes left)"
            )
        end = buf.find(_END, pos, pos + BLOCK)
        while end != -1 and (end - start) % CARD:
            end = buf.find(_END, end + 1, pos + BLOCK)
        if end != -1:
            break
        pos += BLOCK
    text = bytes(buf[start:end])
    cards = _HEADERS.get(text)
    if cards is None:
        cards = _remember(_HEADERS, text, _parse_cards(text))
    return cards, pos + BLOCK


def _remember(cache, key, value):
    """Store ``value`` under ``key`` in a look-up table of at most
    :data:`_MAX_HEADERS` entries (emptied when full); return ``value``."""
    if len(cache) >= _MAX_HEADERS:
        cache.clear()
    cache[key] = value
    return value


def _parse_cards(text):
    """The cards of :data:`_KEYS` (and NAXISn) among the header cards ``text``."""
    cards = {}
    for i in range(0, len(text), CARD):
        key = text[i : i + 8].rstrip(b" ").upper()  # astropy ignores the case
        if key in _KEYS or (key[:5] == b"NAXIS" and _NAXIS_N.fullmatch(key)):
            if text[i + 8 : i + 10] == b"= ":
                # the last of repeated keywords wins, as astropy reads the data
                cards[key] = _value(text[i + 10 : i + CARD])
    return cards


def _iter_hdus(buf):
    """Yield ``(index, name, cards, data_offset, data_nbytes)`` for each HDU."""
    pos, index = 0, 0
    while pos < len(buf):
        if index > 0 and not bytes(buf[pos : pos + BLOCK]).strip(b"\0 "):
            return  # zero or blank padding after the last HDU
        cards, data_start = _header(buf, pos)
        if index == 0 and b"XTENSION" in cards:
            raise FITSError("the first HDU is an extension (XTENSION card)")
        if index > 0 and b"XTENSION" not in cards:
            raise FITSError(f"HDU {index} has no XTENSION card")
        bitpix = cards.get(b"BITPIX")
        if bitpix not in _BITPIX_DTYPE:
            raise FITSError(f"HDU {index}: BITPIX = {bitpix!r} is not valid")
        naxis = cards.get(b"NAXIS")
        if not isinstance(naxis, int) or not 0 <= naxis <= 999:
            raise FITSError(f"HDU {index}: NAXIS = {naxis!r} is not valid")
        axes = [cards.get(b"NAXIS%d" % (k + 1)) for k in range(naxis)]
        if not all(isinstance(a, int) and a >= 0 for a in axes):
            raise FITSError(f"HDU {index}: NAXISn = {axes!r} are not valid")
        if index == 0 and naxis and axes[0] == 0 and cards.get(b"GROUPS"):
            raise _Unsupported("random groups")
        nelem = math.prod(axes) if naxis else 0
        pcount, gcount = cards.get(b"PCOUNT", 0), cards.get(b"GCOUNT", 1)
        nbytes = abs(bitpix) // 8 * gcount * (pcount + nelem) if naxis else 0
        default = "PRIMARY" if index == 0 else ""
        name = str(cards.get(b"EXTNAME", default)).strip().upper()
        yield index, name, cards, data_start, nbytes
        if data_start + nbytes > len(buf):
            return  # reported by _hdu_data when the data are wanted
        pos = data_start + -(-nbytes // BLOCK) * BLOCK
        index += 1


def _hdu_data(buf, index, cards, start, nbytes):
    """The image array of one HDU, scaled as astropy scales it."""
    if index > 0 and cards.get(b"XTENSION") != "IMAGE":
        raise _Unsupported(f"extension type {cards.get(b'XTENSION')!r}")
    if start + nbytes > len(buf):
        raise FITSError(
            f"truncated data in HDU {index}: {nbytes} bytes expected, "
            f"{max(len(buf) - start, 0)} present"
        )
    bitpix = cards[b"BITPIX"]
    shape = tuple(cards[b"NAXIS%d" % k] for k in range(cards[b"NAXIS"], 0, -1))
    raw = np.frombuffer(buf, _BITPIX_DTYPE[bitpix], math.prod(shape), start)
    raw = raw.reshape(shape)
    bzero, bscale = cards.get(b"BZERO", 0), cards.get(b"BSCALE", 1)
    blank = cards.get(b"BLANK") if bitpix > 0 else None
    if bzero == 0 and bscale == 1 and blank is None:
        return raw.astype(raw.dtype.newbyteorder("="))
    if bitpix > 0 and bscale == 1 and bzero == 1 << (bitpix - 1) and bitpix > 8:
        unsigned = np.dtype(f"uint{bitpix}")
        return raw.astype(unsigned) - unsigned.type(1 << (bitpix - 1))
    if bitpix == 8 and bscale == 1 and bzero == -128:
        return raw.astype(np.int8) + np.int8(-128)  # astropy's signed bytes
    if bitpix > 16:
        data = raw.astype(np.float64)
    elif bitpix > 0:
        data = raw.astype(np.float32)
    else:
        data = raw.astype(raw.dtype.newbyteorder("="))
    if bscale != 1:
        np.multiply(data, bscale, data)
    if bzero != 0:
        data += bzero
    if blank:  # astropy ignores BLANK = 0
        data[raw == blank] = np.nan
    return data


def _layout_key(buf):
    """``(first header's cards, file size)``, what the layout of a one-HDU
    file depends on; None when the first header does not end in its first
    block."""
    end = buf.find(_END, 0, BLOCK)
    if end == -1 or end % CARD:
        return None
    return bytes(buf[:end]), len(buf)


def _hdus(buf):
    """The HDUs of ``_iter_hdus(buf)`` as a list, looked up for a file of one
    HDU whose header and size were seen before (the HDUs depend on nothing
    else when the data end the file)."""
    key = _layout_key(buf)
    if key is None:
        return list(_iter_hdus(buf))
    hdus = _LAYOUTS.get(key)
    if hdus is None:
        hdus = list(_iter_hdus(buf))
        if len(hdus) == 1:
            _, _, _, start, nbytes = hdus[0]
            if start + -(-nbytes // BLOCK) * BLOCK == len(buf):
                _remember(_LAYOUTS, key, hdus)
    return hdus


def _fast_images(buf, names):
    out = {}
    for index, name, cards, start, nbytes in _hdus(buf):
        if cards.get(b"ZIMAGE"):
            raise _Unsupported("tile-compressed image")
        if index > 0 and cards.get(b"XTENSION") != "IMAGE":
            continue  # tables are not images (astropy's is_image)
        if nbytes == 0 or (names is not None and name not in names):
            continue
        name = name or f"HDU{index}"
        if name not in out:
            out[name] = _hdu_data(buf, index, cards, start, nbytes)
    return out


def _astropy_images(data, names):
    try:
        from astropy.io import fits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "This FITS cutout needs astropy (it uses a feature the built-in "
            "reader leaves to astropy): pip install sk_covvae[astro]"
        ) from exc
    out = {}
    try:
        with fits.open(
            io.BytesIO(bytes(data)), ignore_missing_simple=True, memmap=False
        ) as hdul:
            for index, hdu in enumerate(hdul):
                name = "PRIMARY" if index == 0 else hdu.name.strip().upper()
                if not hdu.is_image:
                    continue
                if names is not None and name not in names:
                    continue
                if hdu.data is not None:
                    out.setdefault(name or f"HDU{index}", np.array(hdu.data))
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise FITSError(f"astropy cannot read it ({exc})") from exc
    return out


@functools.lru_cache(maxsize=1)
def _zlib():
    """zlib-ng's drop-in ``zlib`` module when it is installed (in the
    ``astro`` extra; a third faster on cutouts, and it lets other threads
    run while it works), else the standard library's."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return zlib
    return zlib_ng


def _gunzip(data):
    """Decompress gzip data (ZTF cutouts); other data are returned as they are."""
    if data[:2] != b"\x1f\x8b":
        return data
    z = _zlib()
    try:
        # one zlib call: gzip.decompress is slower for these small members
        inflate = z.decompressobj(16 + z.MAX_WBITS)
        out = inflate.decompress(data)
        if not inflate.eof:
            raise EOFError("compressed data end before the end-of-stream marker")
        if inflate.unused_data:  # several gzip members
            out = gzip.decompress(data)
    except (OSError, EOFError, zlib.error, z.error) as exc:
        raise FITSError(f"corrupt gzip stream ({exc})") from exc
    return out


def read_fits_images(data, names=None):
    """Image HDUs of a FITS file held in memory.

    Parameters
    ----------
    data : bytes-like
        The FITS file, optionally gzip-compressed.
    names : collection of str, optional
        Upper-case extension names to return (the primary HDU is
        ``'PRIMARY'``); all image HDUs with data when None.

    Returns
    -------
    images : dict
        ``{EXTNAME: ndarray}`` in file order, native byte order, with the
        dtype and values that :mod:`astropy.io.fits` gives. Unnamed
        extensions are called ``'HDU<index>'``.

    Raises
    ------
    FITSError
        When the bytes are not a readable FITS file (truncated, malformed).

    Examples
    --------
    >>> import numpy as np
    >>> from sk_covvae.datasets._fits import read_fits_images
    >>> cards = ["SIMPLE  =                    T", "BITPIX  =                  -32",
    ...          "NAXIS   =                    2", "NAXIS1  =                    3",
    ...          "NAXIS2  =                    2", "END"]
    >>> header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    >>> body = np.arange(6, dtype=">f4").tobytes().ljust(2880, b"\\0")
    >>> read_fits_images(header + body)["PRIMARY"]
    array([[0., 1., 2.],
           [3., 4., 5.]], dtype=float32)
    """
    data = _gunzip(bytes(data))
    names = None if names is None else frozenset(n.upper() for n in names)
    try:
        return _fast_images(data, names)
    except _Unsupported:
        return _astropy_images(data, names)


def _stored_image(buf):
    """``(dtype, shape, offset)`` of the image of a FITS file of one 2-D HDU
    stored as it reads (no BZERO, BSCALE or BLANK): the image is a view of
    ``buf``. None for any other file. Looked up by the header and the size,
    as :func:`_hdus` does (every ZTF cutout has the same)."""
    key = _layout_key(buf)
    if key is None:
        return None
    try:
        return _STORED[key]
    except KeyError:
        pass
    try:
        hdus = _hdus(buf)
    except (FITSError, _Unsupported):
        hdus = []
    recipe = None
    if len(hdus) == 1 and hdus[0][0] == 0:
        _, name, cards, start, nbytes = hdus[0]
        bitpix = cards[b"BITPIX"]
        shape = [cards[b"NAXIS%d" % k] for k in range(cards[b"NAXIS"], 0, -1)]
        while len(shape) > 2 and shape[0] == 1:
            shape.pop(0)
        if (
            nbytes
            and len(shape) == 2
            and name not in _AUX_EXTNAMES
            and not cards.get(b"ZIMAGE")
            and cards.get(b"BZERO", 0) == 0
            and cards.get(b"BSCALE", 1) == 1
            and (bitpix < 0 or cards.get(b"BLANK") is None)
            and start + nbytes <= len(buf)
        ):
            recipe = (_BITPIX_DTYPE[bitpix], tuple(shape), start)
    return _remember(_STORED, key, recipe)


def _read_cutout(data):
    """:func:`read_cutout`, its image possibly a read-only, big-endian view
    of the decompressed bytes (for copying into a batch: one copy less)."""
    buf = _gunzip(bytes(data))
    recipe = _stored_image(buf)
    if recipe is None:
        return read_cutout(buf)
    dtype, shape, start = recipe
    return np.frombuffer(buf, dtype, shape[0] * shape[1], start).reshape(shape), None


def read_cutout(data):
    """The image and, when present, the variance plane of one cutout.

    The image is the first HDU with data that is not a variance, PSF or mask
    extension (the primary HDU for ZTF and Rubin cutouts); the variance plane
    is the extension named ``UNCERT`` (Rubin) or ``VARIANCE``.

    Parameters
    ----------
    data : bytes-like
        The FITS file, optionally gzip-compressed.

    Returns
    -------
    image : ndarray of shape (H, W)
    variance : ndarray of shape (H, W) or None

    Raises
    ------
    FITSError
        When the cutout cannot be read or holds no 2-D image.
    """
    hdus = read_fits_images(data)
    image = next((a for n, a in hdus.items() if n not in _AUX_EXTNAMES), None)
    variance = next((hdus[n] for n in VARIANCE_EXTNAMES if n in hdus), None)
    if image is None:
        raise FITSError("no image HDU with data")
    image = _as_2d(image, "image")
    if variance is not None:
        variance = _as_2d(variance, "variance plane")
        if variance.shape != image.shape:
            raise FITSError(
                f"variance plane of shape {variance.shape} does not match the "
                f"image of shape {image.shape}"
            )
    return image, variance


def _as_2d(array, what):
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise FITSError(f"the {what} has shape {array.shape}, not 2-D")
    return array
