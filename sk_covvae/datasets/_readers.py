"""Readers of real alert packets: ZTF and Rubin Avro, Kafka frames, Parquet.

The optional engines (fastavro, pyarrow, pandas, lsst-alert-packet) are
imported inside the functions that need them, so that importing
:mod:`sk_covvae.datasets` needs none of them (``pip install sk_covvae[astro]``
installs them all).
"""

import functools
import io
import json
import math
import numbers
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

from sk_covvae._optional import require as _require
from sk_covvae.datasets._alerts import ZTF_CUTOUT_SIZE, _centre
from sk_covvae.datasets._avro import record_decoder
from sk_covvae.datasets._fits import FITSError, _read_cutout

#: Order of the three planes of every stamp in ``images`` and ``variance``.
ALERT_CHANNELS = ("science", "template", "difference")
_CUTOUT_FIELDS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")

#: Suffixes of the files read when a folder is given.
ALERT_FILE_SUFFIXES = (".avro", ".parquet", ".pq")

_ZTF_BANDS = {1: "g", 2: "r", 3: "i"}
_AVRO_MAGIC = b"Obj\x01"
_PARQUET_MAGIC = b"PAR1"
_AVRO_HEADER_SCHEMA = {
    "type": "record",
    "name": "org.apache.avro.file.Header",
    "fields": [
        {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
        {"name": "meta", "type": {"type": "map", "values": "bytes"}},
        {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}},
    ],
}
# The fields of ZTF and Rubin alerts that the readers use. Avro records are
# decoded with a reader schema holding only these (the history, such as
# prv_candidates, is skipped instead of being built as Python objects: about
# half the decoding time), and Parquet tables are read for these columns.
_TOP_FIELDS = frozenset(
    ("objectId", "candid", "candidate", "diaSourceId", "alertId", "diaSource")
    + ("diaObject",)
    + _CUTOUT_FIELDS
)
_SUB_FIELDS = {
    "candidate": frozenset("candid jd fid ra dec rb drb isdiffpos xpos ypos".split()),
    "diaSource": frozenset(
        "diaSourceId diaObjectId midpointMjdTai midPointTai band filterName ra "
        "dec decl reliability is_negative".split()
    ),
    "diaObject": frozenset(["diaObjectId"]),
}
_PARQUET_BATCH = 256
#: Whether Avro records go through the compiled decoder (sk_covvae.datasets
#: ._avro) when numba is installed; the tests turn it off to compare.
_FAST_DECODER = True
#: Avro records decoded by fastavro in this process before the compiled
#: decoder takes over (the tests set 0), and the count so far.
_FAST_AFTER = 2000
_RECORDS_DECODED = [0]


class AlertReadError(ValueError):
    """A file or message that cannot be read as alerts.

    Attributes
    ----------
    source : str
        The file (or ``'<message i>'`` for bytes given in memory).
    reason : str
        What is wrong with it.
    """

    def __init__(self, source, reason):
        self.source = str(source)
        self.reason = str(reason)
        super().__init__(f"{self.source}: {self.reason}")

    def __reduce__(self):  # pickles across processes (Dask, joblib)
        return type(self), (self.source, self.reason)


class AlertReadWarning(UserWarning):
    """Warns of a file or alert skipped by ``on_error='skip'``."""


# --------------------------------------------------------------------------
# optional engines
# --------------------------------------------------------------------------


def _project(schema):
    """A reader schema with only the fields the readers use, or None."""
    if not isinstance(schema, Mapping) or schema.get("type") != "record":
        return None
    # a parsed schema (e.g. from fastavro.schema.load_schema) is re-parsed
    schema = {k: v for k, v in schema.items() if not k.startswith("__")}

    def keep(t, names):
        if isinstance(t, list):
            return [keep(u, names) for u in t]
        if isinstance(t, Mapping) and t.get("type") == "record":
            return {**t, "fields": [f for f in t["fields"] if f["name"] in names]}
        return t

    fields = [
        {**f, "type": keep(f["type"], _SUB_FIELDS[f["name"]])}
        if f["name"] in _SUB_FIELDS
        else f
        for f in schema["fields"]
        if f["name"] in _TOP_FIELDS
    ]
    return {**schema, "fields": fields}


def _fast_turn():
    """Whether the compiled decoder takes the next records (where it can):
    it is on, and the process has decoded :data:`_FAST_AFTER` with fastavro."""
    return _FAST_DECODER and _RECORDS_DECODED[0] >= _FAST_AFTER


class _Schemas:
    """How to decode the records written with one Avro schema.

    fastavro decodes the first :data:`_FAST_AFTER` records of the process;
    then the compiled decoder (:mod:`sk_covvae.datasets._avro`) is built and
    takes over, when numba is installed and the schema suits it. Its
    start-up (about 1.5 s: numba's import and the loading of its cached
    machine code, once per process) pays off only on longer reads.
    """

    __slots__ = ("schema", "writer", "reader", "_fast")

    def __init__(self, schema, writer, reader):
        self.schema = schema
        #: fastavro's parsed writer schema.
        self.writer = writer
        #: The projection on the fields the readers use (None: everything).
        self.reader = reader
        self._fast = None if reader is not None else False

    @property
    def fast(self):
        """The compiled decoder, or None (built on first use)."""
        if self._fast is None:
            self._fast = (
                record_decoder(self.schema, _TOP_FIELDS, _SUB_FIELDS, views=True)
                or False
            )
        return self._fast or None

    def read(self, buf, pos, fastavro):
        """``(record, next position)`` of the record of ``buf`` at ``pos``."""
        if _fast_turn():
            if self.fast is not None:
                return self.fast.read(buf, pos)
        else:
            _RECORDS_DECODED[0] += 1
        f = io.BytesIO(buf)
        f.seek(pos)
        return fastavro.schemaless_reader(f, self.writer, self.reader), f.tell()

    def fast_now(self):
        """The compiled decoder when it takes the next records, else None."""
        return self.fast if _fast_turn() else None

    def records(self, buf, count, fastavro):
        """The ``count`` records of ``buf`` (a block of a container file)."""
        fast = self.fast_now()
        if fast is not None:
            return fast.records(buf, count)
        return self._read_each(buf, count, fastavro)

    def _read_each(self, buf, count, fastavro):
        pos = 0
        for _ in range(count):
            record, pos = self.read(buf, pos, fastavro)
            yield record


def _parse_schemas(schema):
    """The :class:`_Schemas` of a writer schema."""
    fastavro = _require("fastavro", "Reading Avro alerts")
    writer = fastavro.parse_schema(schema)
    projected = _project(schema)
    try:
        reader = None if projected is None else fastavro.parse_schema(projected)
    except Exception:  # e.g. a kept field refers to a type defined in a dropped one
        reader = None
    return _Schemas(schema, writer, reader)


@functools.lru_cache(maxsize=64)
def _parsed_writer_schema(schema_json):
    """Parse an Avro schema once per distinct schema text (a cheap dict look-up
    for every later file written with the same schema)."""
    return _parse_schemas(json.loads(schema_json))


@functools.lru_cache(maxsize=1)
def _parsed_header_schema():
    fastavro = _require("fastavro", "Reading Avro alerts")
    return fastavro.parse_schema(_AVRO_HEADER_SCHEMA)


@functools.lru_cache(maxsize=256)
def _rubin_schema(schema_id):
    """The Rubin alert schema that lsst-alert-packet ships for a schema id.

    The package numbers its schemas ``major * 100 + minor`` (its
    ``Schema.get_schema_id``; e.g. 701 for v7.1) and ships the ``.avsc``
    files, so no schema registry is contacted.
    """
    packet = _require(
        "lsst.alert.packet", "Decoding Rubin Kafka messages", "lsst-alert-packet"
    )
    major, minor = divmod(int(schema_id), 100)
    path = Path(packet.get_schema_path(major, minor))
    path = path / f"lsst.v{major}_{minor}.alert.avsc"
    if not path.is_file():
        return None
    return _parse_schemas(packet.Schema.from_file(str(path)).definition)


def _schema_resolver(schema):
    """A function from a Confluent schema id to parsed (writer, reader) schemas."""
    if schema is None:
        return _rubin_schema
    fastavro = _require("fastavro", "Reading Avro alerts")

    def parse(s):
        if isinstance(s, str | os.PathLike):
            s = fastavro.schema.load_schema(str(s))
        return _parse_schemas(s)

    by_id = isinstance(schema, Mapping) and all(
        isinstance(k, numbers.Integral) for k in schema
    )
    if isinstance(schema, Mapping) and not by_id:
        one = parse(schema)  # a single Avro schema, used for every id
        return lambda schema_id: one
    if isinstance(schema, Mapping):
        cache = {}

        registry = {int(k): v for k, v in schema.items()}

        def lookup(schema_id):
            if schema_id not in cache:
                found = registry.get(schema_id)
                cache[schema_id] = None if found is None else parse(found)
            return cache[schema_id]

        return lookup
    if isinstance(schema, str | os.PathLike | list):
        one = parse(schema)
        return lambda schema_id: one
    raise TypeError(
        "schema must be None, an Avro schema (dict or .avsc path) or a mapping "
        f"from Confluent schema id to schema, got {type(schema).__name__}."
    )


# --------------------------------------------------------------------------
# containers: Avro files, Confluent frames, Parquet
# --------------------------------------------------------------------------


def _read_long(f):
    """One zig-zag varint (Avro ``long``); None at the end of the file."""
    byte = f.read(1)
    if not byte:
        return None
    b = byte[0]
    n, shift = b & 0x7F, 7
    while b & 0x80:
        byte = f.read(1)
        if not byte:
            raise EOFError("file ends inside a block header")
        b = byte[0]
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1)


def _avro_container(f, fastavro):
    """Records of an Avro object container file, one block in memory at once.

    The writer schema is parsed once per distinct schema text (not once per
    file, as ``fastavro.reader`` does); codecs other than null and deflate go
    through ``fastavro.reader``.
    """
    header = fastavro.schemaless_reader(f, _parsed_header_schema())
    meta = header["meta"]
    codec = meta.get("avro.codec", b"null").decode()
    if codec not in ("null", "deflate"):
        f.seek(0)
        yield from fastavro.reader(f)
        return
    schemas = _parsed_writer_schema(meta["avro.schema"].decode())
    sync = header["sync"]
    fast = schemas.fast_now() if codec == "null" else None
    if fast is not None:
        yield from fast.container_records(f, sync)
        return
    while (count := _read_long(f)) is not None:
        size = _read_long(f)
        if size is None or count < 0 or size < 0:
            raise ValueError("corrupt block header")
        data = f.read(size)
        if len(data) < size:
            raise EOFError(f"block of {size} bytes, {len(data)} present")
        if codec == "deflate":
            data = zlib.decompress(data, -15)
        yield from schemas.records(data, count, fastavro)
        if f.read(16) != sync:
            raise ValueError("expected sync marker not found")


def _confluent_frames(f, resolve, fastavro):
    """Records of one or more Confluent wire-format messages in a row.

    Each is a magic byte 0, a 4-byte big-endian schema id and an Avro body
    without schema, decoded with the schema ``resolve(schema_id)``. The
    whole file is read at once (a file of messages is a Kafka batch).
    """
    buf, pos = f.read(), 0
    while head := buf[pos : pos + 5]:
        if len(head) < 5 or head[0] != 0:
            raise ValueError(f"bad Confluent wire-format header {head!r}")
        schema_id = int.from_bytes(head[1:], "big")
        schemas = resolve(schema_id)
        if schemas is None:
            raise LookupError(
                f"no Avro schema for Confluent schema id {schema_id}: pass "
                "schema= (lsst-alert-packet ships Rubin's, numbered "
                "major * 100 + minor)"
            )
        record, pos = schemas.read(buf, pos + 5, fastavro)
        yield record


def _unflatten(row):
    """Nest ``{'a.b': v}`` columns of a flattened table as ``{'a': {'b': v}}``."""
    if not any("." in k for k in row):
        return row
    out = {}
    for key, value in row.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node.setdefault(leaf, value)
    return out


def _parquet_rows(source):
    pq = _require("pyarrow.parquet", "Reading Parquet alert tables", "pyarrow")
    pa = _require("pyarrow", "Reading Parquet alert tables")
    handle = pa.BufferReader(source) if isinstance(source, bytes) else str(source)
    pf = pq.ParquetFile(handle)
    columns = [n for n in pf.schema_arrow.names if n.split(".")[0] in _TOP_FIELDS]
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
        for row in batch.to_pylist():
            yield _unflatten(row)


def _records(source, resolve, fastavro):
    """``(index, record)`` for every alert of one file or in-memory message."""
    if isinstance(source, bytes):
        f = io.BytesIO(source)
    else:
        f = open(source, "rb")  # noqa: SIM115 - closed below, also on errors
    with f:
        head = f.read(4)
        f.seek(0)
        if head == _AVRO_MAGIC:
            records = _avro_container(f, fastavro)
        elif head == _PARQUET_MAGIC:
            records = _parquet_rows(source)
        elif head[:1] == b"\0":
            records = _confluent_frames(f, resolve, fastavro)
        elif not head:
            raise ValueError("empty file")
        else:
            raise ValueError(
                "not an Avro container file, a Parquet file or a Confluent "
                f"wire-format message (it starts with {head!r})"
            )
        index = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except ImportError:
                raise
            except LookupError as exc:  # no schema for a Confluent message
                raise ValueError(str(exc)) from exc
            except Exception as exc:  # fastavro/pyarrow raise many kinds
                raise ValueError(
                    f"corrupt or truncated data after {index} alert(s) "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            yield index, record
            index += 1


# --------------------------------------------------------------------------
# one alert
# --------------------------------------------------------------------------


def _stamp_data(cutout):
    """The FITS data of a cutout field (bytes-like, not copied), or None."""
    if type(cutout) is dict or isinstance(cutout, Mapping):  # ZTF: a record
        cutout = cutout.get("stampData")
    return cutout


def _stamp_bytes(cutout):
    """The FITS bytes of a cutout field, or None when it is missing."""
    data = _stamp_data(cutout)
    return None if data is None else bytes(data)


def _float(value):
    return math.nan if value is None else float(value)


def _ztf_fields(rec):
    cand = rec.get("candidate") or {}
    candid = rec.get("candid", cand.get("candid"))
    jd = cand.get("jd")
    isdiffpos = cand.get("isdiffpos")
    return {
        "survey": "ztf",
        "alert_id": candid,
        "object_id": rec.get("objectId"),
        "mjd": math.nan if jd is None else float(jd) - 2400000.5,
        "band": _ZTF_BANDS.get(cand.get("fid"), None),
        "ra": _float(cand.get("ra")),
        "dec": _float(cand.get("dec")),
        "rb": _float(cand.get("rb")),
        "drb": _float(cand.get("drb")),
        "reliability": math.nan,
        "isdiffpos": (
            None if isdiffpos is None else str(isdiffpos).lower() in ("t", "1", "true")
        ),
    }, (cand.get("ypos"), cand.get("xpos"))


def _rubin_fields(rec):
    src = rec.get("diaSource") or {}
    alert_id = src.get("diaSourceId")
    if alert_id is None:
        alert_id = rec.get("diaSourceId", rec.get("alertId"))
    obj = (rec.get("diaObject") or {}).get("diaObjectId")
    if obj is None:
        obj = src.get("diaObjectId")
    mjd = src.get("midpointMjdTai", src.get("midPointTai"))
    negative = src.get("is_negative")
    return {
        "survey": "rubin",
        "alert_id": alert_id,
        "object_id": None if obj is None else str(int(obj)),
        "mjd": _float(mjd),
        "band": src.get("band", src.get("filterName")),
        "ra": _float(src.get("ra")),
        "dec": _float(src.get("dec", src.get("decl"))),
        "rb": math.nan,
        "drb": math.nan,
        "reliability": _float(src.get("reliability")),
        "isdiffpos": None if negative is None else not negative,
    }, (None, None)


def _alert_row(rec, decode=(True, True, True)):
    """Fields, cutout planes and candidate positions of one alert record.

    ``decode[c]`` says whether cutout ``c`` is decoded; a cutout that is not
    decoded is a None plane (counted as missing only when absent).
    """
    if "candidate" in rec:
        fields, (ypos, xpos) = _ztf_fields(rec)
    elif "diaSource" in rec:
        fields, (ypos, xpos) = _rubin_fields(rec)
    else:
        raise ValueError(
            "neither a ZTF alert (no 'candidate') nor a Rubin alert (no "
            f"'diaSource'); fields: {sorted(rec)[:12]}"
        )
    if fields["alert_id"] is None:
        raise ValueError("the alert has no candid / diaSourceId")
    fields["alert_id"] = int(fields["alert_id"])
    planes, variances, centres, n_missing = [], [], [], 0
    for name, wanted in zip(_CUTOUT_FIELDS, decode, strict=True):
        data = _stamp_data(rec.get(name))
        n_missing += data is None
        data = bytes(data) if wanted and data is not None else None
        if data is None:
            planes.append(None)
            variances.append(None)
            centres.append(None)
            continue
        try:
            image, variance = _read_cutout(data)
        except FITSError as exc:
            raise FITSError(f"{name}: {exc}") from exc
        planes.append(image)
        variances.append(variance)
        h, w = image.shape
        centres.append((_candidate_index(h, ypos), _candidate_index(w, xpos)))
    fields.update(
        planes=planes, variances=variances, centres=centres, n_missing=n_missing
    )
    return fields


def _candidate_index(length, pos):
    """Index of the candidate along one axis of a cutout.

    Cutouts are centred on the candidate, except ZTF cutouts clipped at the
    low edge of the CCD, which start at CCD pixel 0: ``pos`` (ZTF's 1-based
    ``xpos`` / ``ypos``) then gives the candidate's index, as in
    :func:`read_alert_cutouts`.
    """
    if pos is None or length >= ZTF_CUTOUT_SIZE:
        return length // 2
    return _centre(length, pos - 1.0)


def _place(out, image, cy, cx, fill=False):
    """Copy ``image`` into ``out`` with pixel (cy, cx) at the centre of
    ``out``; return whether part of ``out`` lies outside ``image`` (left NaN:
    with ``fill``, made NaN first)."""
    h, w = out.shape
    y0, x0 = cy - h // 2, cx - w // 2
    if y0 == 0 and x0 == 0 and image.shape == out.shape:  # most cutouts
        out[...] = image
        return False
    if fill:
        out.fill(np.nan)
    ys = slice(max(y0, 0), min(y0 + h, image.shape[0]))
    xs = slice(max(x0, 0), min(x0 + w, image.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = image[ys, xs]
    return not (ys.stop - ys.start == h and xs.stop - xs.start == w)


# --------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------


def _common_shape(rows):
    """The most frequent cutout shape; ties go to the larger one."""
    counts = Counter(p.shape for r in rows for p in r["planes"] if p is not None)
    if not counts:
        return (0, 0)
    return max(counts, key=lambda s: (counts[s], s[0] * s[1], s))


_FRAME_COLUMNS = (
    "survey",
    "alert_id",
    "object_id",
    "mjd",
    "band",
    "ra",
    "dec",
    "rb",
    "drb",
    "reliability",
    "isdiffpos",
    "padded",
    "n_missing_cutouts",
    "cutout_height",
    "cutout_width",
    "source",
    "record_index",
)


class _Buffers:
    """Image arrays reused from batch to batch of one reading.

    For a consumer that gives each batch's ``images`` back once done with
    them (the scoring job): an array is made once, NaN, and then written
    again only where a batch puts a decoded cutout (``decode``: the flags of
    :func:`_check_channels`, the same for every batch), so the planes of the
    other cutouts stay NaN without being written. Saves making and filling
    a large array per batch. Arrays not given back are simply not reused.
    """

    def __init__(self, decode):
        self.decode = decode
        self.free = []

    def take(self, n, shape):
        """``(images, reused)``: NaN images for ``n`` alerts, or a reused
        array whose decoded planes the caller must write in full."""
        while self.free:
            array = self.free.pop()
            if array.shape[0] >= n and array.shape[2:] == shape:
                return array[:n], True
        return np.full((n, 3, *shape), np.nan, dtype=np.float32), False

    def give(self, images):
        """Reuse the array of a batch's ``images`` (its own or its base)."""
        base = images if images.base is None else images.base
        if isinstance(base, np.ndarray) and base.ndim == 4:
            self.free.append(base)


def _bunch(rows, shape, skipped, buffers=None, frame=True):
    """Stack rows into the Bunch that read_alerts and iter_alerts return.

    Without ``frame`` (the scoring job), the Bunch holds ``columns``, the
    frame's columns as arrays and lists, and ``frame`` is None: a pandas
    DataFrame per batch is not built.
    """
    n, (h, w) = len(rows), shape
    if buffers is None:
        images, reused = np.full((n, 3, h, w), np.nan, dtype=np.float32), False
    else:
        images, reused = buffers.take(n, (h, w))
    # the planes a reused array must have NaN where a cutout is missing
    refill = buffers.decode if reused else (False, False, False)
    has_variance = any(v is not None for r in rows for v in r["variances"])
    variance = np.full_like(images, np.nan) if has_variance else None
    padded, cutout_shape = [], []
    for i, row in enumerate(rows):
        planes, pad, last = row["planes"], False, (0, 0)
        for c, image in enumerate(planes):
            if image is None:
                if refill[c]:
                    images[i, c] = np.nan  # a missing cutout
                continue
            cy, cx = row["centres"][c]
            pad |= _place(images[i, c], image, cy, cx, fill=reused)
            if variance is not None and row["variances"][c] is not None:
                _place(variance[i, c], row["variances"][c], cy, cx)
            last = image.shape
        padded.append(pad)
        cutout_shape.append(last)
    cutout_shape = np.array(cutout_shape, dtype=np.int64).reshape(n, 2)
    columns = {
        "survey": [r["survey"] for r in rows],
        "alert_id": np.array([r["alert_id"] for r in rows], dtype=np.int64),
        "object_id": [r["object_id"] for r in rows],
        "mjd": np.array([r["mjd"] for r in rows], dtype=np.float64),
        "band": [r["band"] for r in rows],
        "ra": np.array([r["ra"] for r in rows], dtype=np.float64),
        "dec": np.array([r["dec"] for r in rows], dtype=np.float64),
        "rb": np.array([r["rb"] for r in rows], dtype=np.float64),
        "drb": np.array([r["drb"] for r in rows], dtype=np.float64),
        "reliability": np.array([r["reliability"] for r in rows], np.float64),
        "isdiffpos": [r["isdiffpos"] for r in rows],
        "padded": np.array(padded, dtype=bool),
        "n_missing_cutouts": np.array([r["n_missing"] for r in rows], np.int64),
        "cutout_height": cutout_shape[:, 0],
        "cutout_width": cutout_shape[:, 1],
        "source": [r["source"] for r in rows],
        "record_index": np.array([r["record_index"] for r in rows], np.int64),
    }
    out = Bunch(
        images=images,
        variance=variance,
        frame=_frame(columns) if frame else None,
        skipped=list(skipped),
        image_shape=(3, h, w),
        channels=ALERT_CHANNELS,
    )
    if not frame:
        out.columns = columns
    return out


def _frame(columns):
    """The DataFrame of a batch's ``columns`` (see :func:`_bunch`)."""
    pd = _require("pandas", "read_alerts")
    data = dict(columns)
    for name in ("survey", "object_id", "band", "source"):
        data[name] = pd.Series(columns[name], dtype=object)
    data["isdiffpos"] = pd.array(columns["isdiffpos"], dtype="boolean")
    return pd.DataFrame(data, columns=list(_FRAME_COLUMNS))


# --------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------


def _sources(paths):
    """Files and in-memory messages to read, in order."""
    if isinstance(paths, bytes | bytearray | memoryview | str | os.PathLike):
        paths = [paths]
    try:
        items = list(paths)
    except TypeError as exc:
        raise TypeError(
            "paths must be a file, a folder, bytes of one message, or an "
            f"iterable of them, got {type(paths).__name__}."
        ) from exc
    if not items:
        raise ValueError("paths is empty: give at least one file or folder.")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, bytes | bytearray | memoryview):
            out.append((f"<message {i}>", bytes(item)))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in ALERT_FILE_SUFFIXES
                and p.is_file()
                and not p.name.startswith((".", "_"))
            )
            if not files:
                raise ValueError(
                    f"No alert files ({', '.join(ALERT_FILE_SUFFIXES)}) in {path}"
                )
            out.extend((str(p), p) for p in files)
        elif path.is_file():
            out.append((str(path), path))
        else:
            raise FileNotFoundError(f"No such alert file or folder: {path}")
    return out


def _check_size(size):
    if size is None:
        return None
    try:
        pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(
        isinstance(s, int | np.integer) and not isinstance(s, bool) and s > 0
        for s in pair
    ):
        raise ValueError(
            f"size must be None, a positive int or a pair (h, w) of them, got {size!r}."
        )
    return int(pair[0]), int(pair[1])


def _check_on_error(on_error):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")


def _check_channels(channels):
    """``decode`` flags of the three cutouts for ``channels``."""
    if channels is None:
        return (True, True, True)
    if isinstance(channels, str | int | np.integer):
        channels = [channels]
    try:
        channels = list(channels)
    except TypeError:
        raise ValueError(
            f"channels must be a list of cutout names {ALERT_CHANNELS} or "
            f"indices 0 to 2, got {channels!r}."
        ) from None
    wanted = set()
    for c in channels:
        if isinstance(c, str) and c in ALERT_CHANNELS:
            wanted.add(ALERT_CHANNELS.index(c))
        elif isinstance(c, int | np.integer) and not isinstance(c, bool) and 0 <= c < 3:
            wanted.add(int(c))
        else:
            raise ValueError(
                f"channels must name cutouts among {ALERT_CHANNELS} (or their "
                f"indices 0 to 2), got {c!r}."
            )
    if not wanted:
        raise ValueError("channels is empty: give at least one cutout to decode.")
    return tuple(c in wanted for c in range(3))


def _rows(sources, resolve, on_error, skipped, decode=(True, True, True)):
    """Every readable alert of ``sources``; failures raise or go to ``skipped``."""
    fastavro = _require("fastavro", "Reading alerts")

    def fail(name, reason, exc):
        if on_error == "raise":
            raise AlertReadError(name, reason) from exc
        warnings.warn(f"Skipped {name}: {reason}", AlertReadWarning, stacklevel=5)
        skipped.append((name, reason))

    for name, source in sources:
        try:
            for index, record in _records(source, resolve, fastavro):
                try:
                    row = _alert_row(record, decode)
                except (ValueError, TypeError, KeyError) as exc:
                    fail(name, f"alert {index}: {exc}", exc)
                    continue
                row["source"], row["record_index"] = name, index
                yield row
        except AlertReadError:
            raise
        except (OSError, ValueError) as exc:
            fail(name, str(exc), exc)


def _batches(rows, batch_size, shape, skipped, first=None, buffers=None, frame=True):
    """Bunches of ``batch_size`` rows; with ``first``, the first holds that
    many and each next one twice as many, up to ``batch_size``. With
    ``buffers`` (a :class:`_Buffers`), their images reuse its arrays;
    ``frame``: see :func:`_bunch`."""
    batch, size = [], min(first or batch_size, batch_size)
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            shape = shape or _common_shape(batch)
            yield _bunch(batch, shape, skipped, buffers, frame)
            skipped.clear()
            batch, size = [], min(2 * size, batch_size)
    if batch or skipped:
        yield _bunch(batch, shape or _common_shape(batch), skipped, buffers, frame)


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------


def read_alerts(paths, *, size=None, on_error="raise", schema=None, channels=None):
    """Read cutouts and key fields of ZTF and Rubin alert packets.

    Reads, in order, every alert of the given files (or of every
    ``*.avro`` / ``*.parquet`` / ``*.pq`` file under a folder, sorted,
    recursively). The format is recognised from the content:

    - **Avro object container files**, one or many alerts each: ZTF packets
      (schemas 2.0 to 3.5; gzip-compressed FITS cutouts) and Rubin packets
      (FITS cutouts with HDUs ``PRIMARY``, ``UNCERT`` (the variance) and
      ``PSFIMAGE``), including those re-written by a broker.
    - **Kafka messages in the Confluent wire format**: a zero byte, a
      4-byte big-endian schema id, then an Avro body without schema, decoded
      with ``schema`` (several messages may follow each other in a file, and
      bytes may be given in memory instead of files).
    - **Parquet tables** with the alerts' fields as columns, as brokers keep
      them (cutout columns hold the FITS bytes, also as a struct with a
      ``stampData`` field or a flattened ``cutoutScience.stampData`` column).

    The cutouts are brought to one size, ``size`` or else the most frequent
    cutout shape: larger ones are cropped and smaller ones padded with NaN
    around the candidate (cutouts are centred on it, except ZTF cutouts
    clipped at the low CCD edge, where ``candidate.xpos``/``ypos`` locate it).
    A missing cutout gives a NaN plane, never a dropped alert. FITS cutouts
    are decoded by a small built-in reader (astropy for unusual ones).
    Needs fastavro and pandas (and pyarrow for Parquet, lsst-alert-packet for
    Rubin messages without ``schema``): ``pip install sk_covvae[astro]``.
    That extra also installs numba and zlib-ng: past the first 2,000 Avro
    records of a process, a compiled decoder of the fields used takes over
    from fastavro (the same values, several times faster; its start-up,
    about 1.5 s, pays off only on longer reads), and zlib-ng gunzips the
    cutouts.

    Parameters
    ----------
    paths : str, path-like, bytes, or iterable of them
        Files, folders, or bytes objects each holding one file's content
        (e.g. the values of Kafka messages).
    size : int or (int, int), optional
        Height and width of the returned stamps. Default: the most frequent
        cutout shape among the alerts read (ties go to the larger shape).
    on_error : {'raise', 'skip'}, default='raise'
        What to do with a file or alert that cannot be read: raise
        :class:`AlertReadError`, or warn (:class:`AlertReadWarning`) and list
        it in ``skipped``. A file that breaks off midway keeps the alerts
        read before the break.
    schema : dict, str, path-like or mapping, optional
        Avro schema of Confluent-framed messages: a schema (dict or ``.avsc``
        file) for every message, or a mapping ``{schema_id: schema}``.
        Default: the Rubin alert schemas that lsst-alert-packet ships, looked
        up by schema id (``major * 100 + minor``). Files with their own
        schema (Avro containers, Parquet) ignore it.
    channels : list of str or int, optional
        The cutouts to decode, by name (``'science'``, ``'template'``,
        ``'difference'``) or index; the planes of the others are NaN, and
        their bytes are not even decompressed (e.g. ``['difference']`` for a
        model that reads the difference only: about three times less
        decoding). ``padded``, ``cutout_height`` and ``cutout_width`` then
        describe the decoded cutouts; ``n_missing_cutouts`` still counts
        every cutout absent from the alert. Default: all three.

    Returns
    -------
    alerts : :class:`~sklearn.utils.Bunch`
        With ``n`` alerts and stamps of height ``h`` and width ``w``:

        images : ndarray of shape (n, 3, h, w), float32
            Science, template and difference cutouts (``channels``) in the
            survey's units, NaN where masked, padded or missing. Flatten with
            ``images.reshape(n, -1)`` for ``image_shape=(3, h, w)``. Values
            are as stored: some ZTF template cutouts hold the float32 maximum
            (3.4e38) where the reference image has no data.
        variance : ndarray of shape (n, 3, h, w), float32, or None
            The variance planes of the three cutouts (Rubin's ``UNCERT``
            HDUs), NaN where absent; None when no alert has any.
        frame : pandas.DataFrame
            One row per alert: ``survey`` ('ztf' or 'rubin'), ``alert_id``
            (int64: ZTF ``candid``, Rubin ``diaSourceId``), ``object_id``
            (str: ZTF ``objectId``, Rubin ``diaObjectId`` in decimal; None
            when absent), ``mjd`` (ZTF ``candidate.jd - 2400000.5``, start of
            exposure; Rubin ``midpointMjdTai``, exposure midpoint in TAI),
            ``band``, ``ra``, ``dec``, the real/bogus scores ``rb`` and
            ``drb`` (ZTF) and ``reliability`` (Rubin), NaN when absent,
            ``isdiffpos`` (difference positive; nullable boolean),
            ``padded`` (part of a stamp lies outside its cutout),
            ``n_missing_cutouts``, ``cutout_height`` and ``cutout_width``
            (as stored), ``source`` (file) and ``record_index`` (position
            in it).
        skipped : list of (str, str)
            ``(source, reason)`` of everything skipped (``on_error='skip'``).
        image_shape : tuple
            ``(3, h, w)``.
        channels : tuple of str
            ``('science', 'template', 'difference')``.

    Raises
    ------
    AlertReadError
        With ``on_error='raise'``, for a file that is not an alert file,
        is corrupt or truncated, or holds an unreadable alert; the message
        names the file and the cause. A ValueError.
    FileNotFoundError
        When a path does not exist.
    ImportError
        When an optional dependency that the files need is missing.

    See Also
    --------
    iter_alerts : The same, in batches of bounded memory.
    sk_covvae.preprocessing.StampPreprocessor : Crop, fill and normalise.

    Examples
    --------
    >>> from sk_covvae.datasets import read_alerts
    >>> alerts = read_alerts("ztf_alerts/")  # doctest: +SKIP
    >>> alerts.images.shape, alerts.frame.alert_id.dtype  # doctest: +SKIP
    ((15, 3, 63, 63), dtype('int64'))
    >>> X = alerts.images.reshape(len(alerts.images), -1)  # doctest: +SKIP
    """
    shape = _check_size(size)
    _check_on_error(on_error)
    decode = _check_channels(channels)
    sources, resolve, skipped = _sources(paths), _schema_resolver(schema), []
    rows = list(_rows(sources, resolve, on_error, skipped, decode))
    return _bunch(rows, shape or _common_shape(rows), skipped)


def iter_alerts(
    paths, *, batch_size=1000, size=None, on_error="raise", schema=None, channels=None
):
    """Read alert packets in batches, holding one batch in memory.

    The streaming form of :func:`read_alerts` (same formats, arguments and
    Bunch), for archives too large to hold at once: files, multi-alert Avro
    containers and Parquet tables are read alert by alert.

    Parameters
    ----------
    paths : str, path-like, bytes, or iterable of them
        As in :func:`read_alerts`.
    batch_size : int, default=1000
        Most alerts per batch; every batch but the last holds exactly
        ``batch_size``.
    size : int or (int, int), optional
        Height and width of the stamps. Default: the most frequent cutout
        shape of the first batch, kept for all later batches (pass ``size``
        for the same stamps whatever the order of the files).
    on_error : {'raise', 'skip'}, default='raise'
        As in :func:`read_alerts`. Each batch's ``skipped`` lists what was
        skipped while it was read; a final batch with no alerts is yielded
        when only skipped files remain.
    schema : dict, str, path-like or mapping, optional
        As in :func:`read_alerts`.
    channels : list of str or int, optional
        As in :func:`read_alerts`: the cutouts to decode.

    Yields
    ------
    batch : :class:`~sklearn.utils.Bunch`
        As returned by :func:`read_alerts`, for at most ``batch_size``
        alerts. Concatenating the batches' ``images`` and ``frame`` gives
        what :func:`read_alerts` returns with the same ``size``.

    Raises
    ------
    AlertReadError, FileNotFoundError, ImportError
        As in :func:`read_alerts`.

    Examples
    --------
    >>> from sk_covvae.datasets import iter_alerts
    >>> for batch in iter_alerts("ztf_public_20260101/", batch_size=512,
    ...                          size=63):  # doctest: +SKIP
    ...     X = batch.images.reshape(len(batch.images), -1)
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    return _iter_alerts(paths, int(batch_size), size, on_error, schema, channels)


def _iter_alerts(
    paths,
    batch_size,
    size,
    on_error,
    schema,
    channels,
    first=None,
    reuse=False,
    frame=True,
):
    """:func:`iter_alerts` after its check of ``batch_size``.

    ``first``: see :func:`_batches` (the scoring job starts small, so that
    the model does not wait long for its first batch). ``reuse``: the
    batches' images reuse the arrays given back to the returned iterator's
    ``buffers`` (see :class:`_Buffers`). Without ``frame``, the batches hold
    ``columns`` instead of a DataFrame (see :func:`_bunch`).
    """
    shape = _check_size(size)
    _check_on_error(on_error)
    decode = _check_channels(channels)
    sources, resolve, skipped = _sources(paths), _schema_resolver(schema), []
    rows = _rows(sources, resolve, on_error, skipped, decode)
    buffers = _Buffers(decode) if reuse else None
    batches = _batches(rows, batch_size, shape, skipped, first, buffers, frame)
    return (batches, buffers) if reuse else batches
