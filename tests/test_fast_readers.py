"""Tests of the fast paths of the alert readers.

- the compiled Avro walker (``sk_covvae.datasets._avro``) against fastavro's
  decode with the projected reader schema, on every shipped packet and on
  synthetic schemas and records (hand-encoded, so that array and map blocks
  with negative counts occur), and on cut-off and damaged records;
- the switches back to fastavro (``_FAST_DECODER``, no numba, unsupported
  schemas);
- ``_gunzip`` (with its fast path) against the standard library's zlib;
- the FITS header scan against astropy on edge cases;
- ``read_alerts`` / ``iter_alerts`` with ``channels=``;
- ``sk_covvae.scoring.model_channels``.
"""

import functools
import gzip
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sk_covvae.datasets import _avro, _fits, _readers, iter_alerts, read_alerts
from sk_covvae.datasets._fits import FITSError, read_fits_images

fastavro = pytest.importorskip("fastavro")
pd = pytest.importorskip("pandas")
pytest.importorskip("numba")  # the compiled walker (the astro extra)

# Tiny models fitted for model_channels: their latents may collapse.
pytestmark = pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")

CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
CHANNELS = ("science", "template", "difference")
TOP, SUB = _readers._TOP_FIELDS, _readers._SUB_FIELDS


# --------------------------------------------------------------------------
# helpers: Avro encoding, containers, references
# --------------------------------------------------------------------------


def zz(n):
    """Avro's encoding of a long: zig-zag, then a little-endian varint."""
    z = ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def container_blocks(path):
    """``(writer schema JSON, [decompressed block bytes])`` of an Avro file."""
    with open(path, "rb") as f:
        header = fastavro.schemaless_reader(
            f, fastavro.parse_schema(_readers._AVRO_HEADER_SCHEMA)
        )
        rest = f.read()
    meta = header["meta"]
    codec = meta.get("avro.codec", b"null").decode()
    assert codec in ("null", "deflate")
    blocks, pos = [], 0
    while pos < len(rest):
        count, pos = _avro._py_long(rest, pos)
        size, pos = _avro._py_long(rest, pos)
        data = rest[pos : pos + size]
        pos += size + 16
        blocks.append(zlib.decompress(data, -15) if codec == "deflate" else data)
    return json.loads(meta["avro.schema"]), blocks


@functools.cache
def _parsed(schema_json):
    schema = json.loads(schema_json)
    writer = fastavro.parse_schema(schema)
    projected = _readers._project(schema)
    reader = None if projected is None else fastavro.parse_schema(projected)
    return writer, reader


def parsed(schema):
    """fastavro's (writer, projected reader) of a schema (cached)."""
    return _parsed(json.dumps(schema, sort_keys=True))


def reference(schema, buf, pos=0):
    """``(record, end)`` that fastavro decodes with the projected schema."""
    writer, reader = parsed(schema)
    f = io.BytesIO(buf)
    f.seek(pos)
    return fastavro.schemaless_reader(f, writer, reader), f.tell()


@functools.cache
def _decoder(schema_json):
    return _avro.record_decoder(json.loads(schema_json), TOP, SUB)


def decoder(schema):
    return _decoder(json.dumps(schema, sort_keys=True))


def same(a, b):
    """Deep equality of decoded values, NaN equal to NaN, types compared."""
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and list(a) == list(b)
            and all(same(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@functools.cache
def _shipped_records(folder):
    """``[(file name, schema, block, start, end)]`` of every record."""
    out = []
    for path in sorted(folder.glob("*.avro")):
        schema, blocks = container_blocks(path)
        for block in blocks:
            pos = 0
            while pos < len(block):
                _, end = reference(schema, block, pos)
                out.append((path.name, schema, block, pos, end))
                pos = end
    return out


def shipped_records(folder):
    return _shipped_records(shared(folder))


FOLDERS = ("ztf_alerts", "ztf_alert_archive", "rubin_alerts")
N_RECORDS = {"ztf_alerts": 15, "ztf_alert_archive": 498, "rubin_alerts": 36}


# --------------------------------------------------------------------------
# the compiled decoder on the shipped packets
# --------------------------------------------------------------------------


@pytest.mark.parametrize("folder", FOLDERS)
def test_fast_decoder_equals_fastavro_on_every_shipped_packet(folder):
    records = shipped_records(folder)
    assert len(records) == N_RECORDS[folder]
    for name, schema, block, start, end in records:
        dec = decoder(schema)
        assert dec is not None, f"{name}: no compiled decoder for its schema"
        got, stop = dec.read(block, start)
        want, want_end = reference(schema, block, start)
        assert stop == want_end == end, name
        assert same(got, want), name
        # what the readers use it for is there
        assert set(got) <= TOP
        assert any(got.get(c) is not None for c in CUTOUTS), name


def test_the_readers_decoder_gives_cutout_bytes_as_views():
    """The readers' decoder (``views``) gives bytes fields as read-only
    memoryviews of the buffer, equal to fastavro's bytes; a buffer that is
    not a bytes object still gives copies."""
    name, schema, block, start, end = shipped_records("ztf_alerts")[0]
    views = _readers._parse_schemas(schema).fast
    got, stop = views.read(block, start)
    want, _ = reference(schema, block, start)
    assert stop == end
    for field in CUTOUTS:
        data = got[field]["stampData"]
        assert isinstance(data, memoryview) and data.readonly
        assert data.obj is block and data == want[field]["stampData"]
        assert _readers._stamp_data(got[field]) is data
    copied, _ = views.read(bytearray(block), start)
    assert same(copied, want)


def test_fast_decoder_on_records_after_other_bytes():
    """``pos`` may point into a buffer; ``next_pos`` is absolute."""
    name, schema, block, start, end = shipped_records("rubin_alerts")[0]
    record = block[start:end]
    buf = b"\x07" * 13 + record + record + b"\xff" * 5
    dec = decoder(schema)
    first, pos = dec.read(buf, 13)
    second, stop = dec.read(buf, pos)
    assert pos == 13 + len(record) and stop == 13 + 2 * len(record)
    want, _ = reference(schema, record)
    assert same(first, want) and same(second, want)


def test_fast_decoder_on_lsst_alert_packet_samples():
    """Every Rubin schema that lsst-alert-packet ships, on its sample alert."""
    packet = pytest.importorskip("lsst.alert.packet")
    root = Path(packet.get_schema_path(*packet.get_latest_schema_version()))
    n = 0
    for version in sorted(root.parent.parent.glob("*/*")):
        if not (version.parent.name.isdigit() and version.name.isdigit()):
            continue
        major, minor = int(version.parent.name), int(version.name)
        avsc = version / f"lsst.v{major}_{minor}.alert.avsc"
        sample = version / "sample_data" / "fakeAlert.avro"
        if not (avsc.is_file() and sample.is_file()):
            continue
        schema = packet.Schema.from_file(str(avsc)).definition
        with open(sample, "rb") as f:
            records = list(fastavro.reader(f))
        dec = decoder(_avro._clean(schema))
        assert dec is not None, (major, minor)
        writer = fastavro.parse_schema(schema)
        for record in records:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, writer, record)
            raw = buf.getvalue()
            got, stop = dec.read(raw, 0)
            want, end = reference(_avro._clean(schema), raw)
            assert stop == end == len(raw), (major, minor)
            assert same(got, want), (major, minor)
            n += 1
    assert n >= 10


# --------------------------------------------------------------------------
# the plain-Python walker agrees with the compiled one
# --------------------------------------------------------------------------


def walk_both(dec, buf, start):
    """(stop, slots, leaf values) of the compiled walker and leaf decoder,
    and of ``_walk`` and ``_leaves`` run as they are."""
    data = np.frombuffer(buf, dtype=np.uint8)
    results = []
    for walk, leaves in (_avro._jitted()[:2], (_avro._walk, _avro._leaves)):
        n = dec.n_slots
        out = np.full((n, 2), -1, dtype=np.int64)
        stop = walk(data, start, len(data), dec.root, *dec.tables, out)
        values = np.zeros(n, np.int64), np.zeros(n), np.zeros(n, np.int64)
        leaves(data, out, dec._kinds, dec._nulls, *values)
        results.append((int(stop), out, values))
    return results


def small_shipped_records():
    """One record of every ZTF schema version and two Rubin ones."""
    seen, out = set(), []
    for name, schema, block, start, end in shipped_records("ztf_alerts"):
        key = json.dumps(schema, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((name, schema, block, start, end))
    return out + shipped_records("rubin_alerts")[:2]


def test_unjitted_walk_agrees_with_jitted_walk_on_real_records():
    for name, schema, block, start, end in small_shipped_records():
        dec = decoder(schema)
        (stop, slots, values), (plain_stop, plain_slots, plain_values) = walk_both(
            dec, block, start
        )
        assert stop == end, name
        assert plain_stop == stop, name
        np.testing.assert_array_equal(plain_slots, slots, err_msg=name)
        assert (dec._kinds > 0).any(), name
        for plain, compiled in zip(plain_values, values):
            np.testing.assert_array_equal(plain, compiled, err_msg=name)


EXTREME_LONGS = [2**62 - 1, 2**62, 2**63 - 1, -(2**62), -(2**62) - 1, -(2**63)]


@pytest.mark.parametrize(
    "value", [0, 1, 63, -1, 150, -8193, 2**31, -(2**40), *EXTREME_LONGS]
)
def test_plain_read_long_decodes_multibyte_varints_of_a_uint8_buffer(value):
    raw = zz(value)
    buf = np.frombuffer(b"\x00" + raw, dtype=np.uint8)
    got, pos = _avro._read_long(buf, 1, len(buf))
    assert (int(got), int(pos)) == (value, 1 + len(raw))


def test_compiled_decoder_reads_longs_of_every_magnitude():
    """Longs whose zig-zag codes fill all 64 bits (magnitudes from 2**62:
    the compiled varint reader shifts logically, not arithmetically)."""
    schema = {
        "type": "record",
        "name": "A",
        "fields": [{"name": "candid", "type": "long"}],
    }
    dec = _avro.record_decoder(schema, TOP, SUB)
    for value in [0, -1, 2**31, *EXTREME_LONGS]:
        got, stop = dec.read(zz(value), 0)
        assert got == {"candid": value} and stop == len(zz(value))


def test_unjitted_walk_on_a_bytes_buffer_agrees_with_jitted_walk():
    """The walker's logic itself, run on ``bytes`` (items are Python ints)."""
    for name, schema, block, start, end in small_shipped_records()[:4]:
        dec = decoder(schema)
        data = np.frombuffer(block, dtype=np.uint8)
        out = np.full((max(dec.n_slots, 1), 2), -1, dtype=np.int64)
        walk = _avro._jitted()[0]
        stop = walk(data, start, len(data), dec.root, *dec.tables, out)
        plain = np.full_like(out, -1)
        plain_stop = _avro._walk(block, start, len(block), dec.root, *dec.tables, plain)
        assert int(plain_stop) == int(stop) == end, name
        np.testing.assert_array_equal(plain, out, err_msg=name)


# --------------------------------------------------------------------------
# cut-off and damaged records
# --------------------------------------------------------------------------


def cut_points(n, stride):
    return sorted(
        set(range(0, min(n, 200)))
        | set(range(0, n, stride))
        | set(range(max(n - 200, 0), n))
    )


def test_every_prefix_of_a_real_record_raises_valueerror():
    picks = [shipped_records("ztf_alerts")[0], shipped_records("rubin_alerts")[0]]
    picks.append(shipped_records("ztf_alert_archive")[0])
    for name, schema, block, start, end in picks:
        record = block[start:end]
        dec = decoder(schema)
        assert dec.read(record, 0)[1] == len(record)
        for k in cut_points(len(record), 37):
            with pytest.raises(ValueError):
                dec.read(record[:k], 0)
        # a read that starts past the end
        with pytest.raises(ValueError):
            dec.read(record, len(record))


def test_random_byte_flips_never_crash():
    rng = np.random.default_rng(0)
    picks = small_shipped_records()[:3] + shipped_records("rubin_alerts")[2:4]
    for name, schema, block, start, end in picks:
        record = bytearray(block[start:end])
        dec = decoder(schema)
        for _ in range(150):
            damaged = bytearray(record)
            for i in rng.integers(0, len(record), rng.integers(1, 4)):
                damaged[i] ^= int(rng.integers(1, 256))
            try:
                got, stop = dec.read(bytes(damaged), 0)
            except ValueError:
                continue
            assert isinstance(got, dict) and 0 < stop <= len(damaged)


ONE_UNION = {
    "type": "record",
    "name": "A",
    "fields": [
        {"name": "skipped", "type": ["null", "long", "string"]},
        {
            "name": "candidate",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "C",
                    "fields": [
                        {"name": "jd", "type": "double"},
                        {"name": "other", "type": ["null", "string"]},
                        {"name": "fid", "type": ["null", "int"]},
                    ],
                },
            ],
        },
        {"name": "objectId", "type": ["null", "string"]},
    ],
}


def test_union_record_decodes_as_fastavro():
    cand = struct.pack("<d", 2.5) + zz(1) + zz(2) + b"ab" + zz(1) + zz(-3)
    for raw in (
        zz(0) + zz(1) + cand + zz(1) + zz(1) + b"Z",
        zz(2) + zz(3) + b"xyz" + zz(0) + zz(0),
        zz(1) + zz(99) + zz(1) + cand + zz(0),
    ):
        got, stop = decoder(ONE_UNION).read(raw, 0)
        want, end = reference(ONE_UNION, raw)
        assert stop == end == len(raw)
        assert same(got, want)


@pytest.mark.parametrize("index", [3, 4, -1, -2, 2**40])
@pytest.mark.parametrize("where", ["skipped", "candidate", "objectId", "fid"])
def test_bad_union_index_raises_valueerror(where, index):
    dec = decoder(ONE_UNION)
    parts = {
        "skipped": zz(0),
        "candidate": zz(1),
        "cand": struct.pack("<d", 2.5) + zz(0),
        "fid": zz(0),
        "objectId": zz(0),
    }
    parts[where] = zz(index)
    raw = b"".join(parts.values())
    if where == "fid":  # after the union's branch index comes nothing
        raw += b"\x00" * 8
    with pytest.raises(ValueError):
        dec.read(raw, 0)


ENUM_FIELD = {
    "type": "record",
    "name": "E",
    "fields": [
        {
            "name": "objectId",
            "type": {"type": "enum", "name": "K", "symbols": ["a", "b"]},
        },
        {"name": "candid", "type": "long"},
    ],
}


def test_enum_index_out_of_range_in_a_wanted_field_raises_valueerror():
    dec = decoder(ENUM_FIELD)
    assert same(dec.read(zz(1) + zz(5), 0), ({"objectId": "b", "candid": 5}, 2))
    with pytest.raises(ValueError):
        dec.read(zz(2) + zz(5), 0)


LINKED = {
    "type": "record",
    "name": "L",
    "fields": [
        {"name": "candid", "type": "long"},
        {
            "name": "history",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Node",
                    "fields": [
                        {"name": "v", "type": "long"},
                        {"name": "next", "type": ["null", "Node"]},
                    ],
                },
            ],
        },
        {"name": "objectId", "type": "string"},
    ],
}


def linked_list(n):
    return b"".join(zz(1) + zz(i) for i in range(n)) + zz(0)


@pytest.mark.parametrize("length", [0, 1, 10, 60, 100, 300])
def test_recursive_type_outside_the_wanted_fields(length):
    raw = zz(42) + linked_list(length) + zz(2) + b"ok"
    got, stop = decoder(LINKED).read(raw, 0)
    want, end = reference(LINKED, raw)
    assert stop == end == len(raw)
    assert same(got, want) and got == {"candid": 42, "objectId": "ok"}


BLOCKS = {
    "type": "record",
    "name": "B",
    "fields": [
        {"name": "prv", "type": {"type": "array", "items": ["null", "string"]}},
        {"name": "objectId", "type": {"type": "map", "values": "long"}},
        {"name": "candid", "type": {"type": "array", "items": "long"}},
        {
            "name": "meta",
            "type": {"type": "map", "values": {"type": "array", "items": "int"}},
        },
    ],
}


def block(items, negative):
    """One array or map block of encoded ``items``."""
    body = b"".join(items)
    if negative:
        return zz(-len(items)) + zz(len(body)) + body
    return zz(len(items)) + body


def test_negative_block_counts_in_wanted_and_skipped_fields():
    s = zz(1) + zz(2) + b"hi"
    prv = block([s, zz(0)], True) + block([s], False) + block([zz(0)], True) + zz(0)
    entry = zz(1) + b"a" + zz(-7)
    objectid = block([entry, zz(1) + b"b" + zz(300)], True) + block([entry], False)
    candid = block([zz(5)], False) + block([zz(-6), zz(2**40)], True) + zz(0)
    inner = block([zz(1), zz(2)], True) + zz(0)
    meta = block([zz(1) + b"m" + inner], True) + zz(0)
    raw = prv + objectid + zz(0) + candid + meta
    got, stop = decoder(BLOCKS).read(raw, 0)
    want, end = reference(BLOCKS, raw)
    assert stop == end == len(raw)
    assert got == want == {"objectId": {"a": -7, "b": 300}, "candid": [5, -6, 2**40]}


def test_negative_block_with_a_size_past_the_end_raises_valueerror():
    raw = zz(-2) + zz(1000) + zz(1) + zz(2) + zz(0)
    schema = {**BLOCKS, "fields": BLOCKS["fields"][:1]}
    with pytest.raises(ValueError):
        decoder(schema).read(raw, 0)


SHARED_TYPE = {
    "type": "record",
    "name": "A",
    "fields": [
        {
            "name": "diaObject",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Obj",
                    "fields": [
                        {"name": "diaObjectId", "type": "long"},
                        {"name": "extra", "type": "long"},
                    ],
                },
            ],
        },
        {"name": "objectId", "type": ["null", "Obj"]},
    ],
}


def test_named_record_projected_in_one_field_and_decoded_whole_in_another():
    """``Obj`` keeps only ``diaObjectId`` under ``diaObject``; fastavro's
    projected reader schema redefines ``Obj`` so, for ``objectId`` too. The
    compiler refuses the schema, so fastavro decodes it on both paths."""
    from sk_covvae.datasets._readers import _SUB_FIELDS, _TOP_FIELDS

    assert _avro.record_decoder(SHARED_TYPE, _TOP_FIELDS, _SUB_FIELDS) is None
    raw = zz(1) + zz(5) + zz(6) + zz(1) + zz(7) + zz(8)
    want, end = reference(SHARED_TYPE, raw)
    assert end == len(raw)
    assert want["objectId"] == {"diaObjectId": 7}


# --------------------------------------------------------------------------
# synthetic schemas and records (hypothesis)
# --------------------------------------------------------------------------

PRIMITIVE_TYPES = (
    "null",
    "boolean",
    "int",
    "long",
    "float",
    "double",
    "bytes",
    "string",
)


class SchemaMaker:
    """Random Avro schemas; named types get fresh names and are reused."""

    def __init__(self, draw):
        self.draw = draw
        self.n = 0
        self.named = {}  # full name -> definition (for encoding)
        self.building = set()  # records whose fields are being made
        self.no_ref = set()  # types not to refer to (projected records)

    def fresh(self, prefix, namespace):
        self.n += 1
        if self.draw(st.booleans()):  # a full name with its own namespace
            name = f"ns{self.n}.{prefix}{self.n}"
            return name, name, name.rsplit(".", 1)[0]
        name = f"{prefix}{self.n}"
        full = f"{namespace}.{name}" if namespace else name
        return name, full, namespace

    def type(self, depth, namespace, allow_union=True, allow_null=True):
        kinds = list(PRIMITIVE_TYPES if allow_null else PRIMITIVE_TYPES[1:])
        refs = [
            full
            for full in sorted(self.named)
            if full not in self.building | self.no_ref
            and ("." in full or not namespace)  # a null namespace is out of reach
        ]
        kinds += ["enum", "fixed"] + ["ref"] * bool(refs)
        if depth > 0:
            kinds += ["array", "map", "record", "record"] + ["union"] * allow_union
        kind = self.draw(st.sampled_from(kinds))
        if kind in PRIMITIVE_TYPES:
            return kind if self.draw(st.booleans()) else {"type": kind}
        if kind == "ref":
            full = self.draw(st.sampled_from(refs))
            space, _, short = full.rpartition(".")
            if space == namespace and self.draw(st.booleans()):
                return short  # by its name within its namespace
            return full
        if kind == "enum":
            name, full, _ = self.fresh("E", namespace)
            k = self.draw(st.integers(1, 4))
            schema = {"type": "enum", "name": name, "symbols": list("ABCD"[:k])}
            self.named[full] = schema
            return schema
        if kind == "fixed":
            name, full, _ = self.fresh("F", namespace)
            schema = {
                "type": "fixed",
                "name": name,
                "size": self.draw(st.integers(0, 5)),
            }
            self.named[full] = schema
            return schema
        if kind == "array":
            return {"type": "array", "items": self.type(depth - 1, namespace)}
        if kind == "map":
            return {"type": "map", "values": self.type(depth - 1, namespace)}
        if kind == "record":
            return self.record(depth - 1, namespace, [f"f{i}" for i in range(3)])[0]
        # a union of distinct branches, made in their order (a type is
        # defined before any reference to it)
        order = ["null", "other"] + ["record"] * self.draw(st.booleans())
        branches = []
        for branch in self.draw(st.permutations(order)):
            if branch == "null":
                branches.append("null")
            elif branch == "other":
                branches.append(
                    self.type(depth - 1, namespace, allow_union=False, allow_null=False)
                )
            else:
                branches.append(self.record(depth - 1, namespace, ["x", "y"])[0])
        return branches

    def record(self, depth, namespace, names, wanted=None, namespace_key=False):
        """A record of some of ``names`` (all of ``wanted``), in random order."""
        name, full, inner = self.fresh("R", namespace)
        schema = {"type": "record", "name": name, "fields": []}
        if namespace_key and "." not in name:
            schema["namespace"] = inner = f"space{self.n}"
            full = f"{inner}.{name}"
        self.named[full] = schema
        self.building.add(full)
        names = list(names)
        chosen = self.draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
        chosen = self.draw(st.permutations(sorted(set(chosen) | set(wanted or ()))))
        for field in chosen:
            schema["fields"].append({"name": field, "type": self.type(depth, inner)})
        self.building.discard(full)
        return schema, full


@st.composite
def alert_schemas(draw):
    """A top-level record with wanted fields (decoded whole or in part) among
    others, nested records, unions, arrays, maps, enums, fixed, references
    and a recursive type outside the wanted fields."""
    m = SchemaMaker(draw)
    fields = []
    extra = ["prv", "meta", "x1", "x2", "history"]
    order = draw(
        st.permutations(
            extra
            + ["objectId", "candid", "candidate", "diaObject", "cutoutScience"]
            + ["cutoutTemplate"]
        )
    )
    cutout = None
    candidate_type = None
    for name in order:
        if name == "history":
            node, full, ns = m.fresh("Node", None)
            rec = {"type": "record", "name": node, "fields": []}
            m.named[full] = rec
            m.no_ref.add(full)  # recursive: only here
            rec["fields"] = [
                {"name": "v", "type": m.type(1, ns)},
                {"name": "next", "type": ["null", full]},
            ]
            fields.append({"name": name, "type": ["null", rec]})
        elif name in extra:
            if draw(st.booleans()):
                fields.append({"name": name, "type": m.type(2, None)})
        elif name in ("candidate", "diaObject"):
            sub = sorted(SUB[name])[:4] + ["other", "more"]
            rec, full = m.record(1, None, sub, namespace_key=draw(st.booleans()))
            # fastavro's projection redefines the type with the wanted fields
            # only, for every reference to it: refer to it where unwanted only
            m.no_ref.add(full)
            if name == "candidate":
                candidate_type = full
            shape = draw(st.sampled_from(["record", "null-first", "null-last", "3"]))
            if shape == "record":
                fields.append({"name": name, "type": rec})
            elif shape == "null-first":
                fields.append({"name": name, "type": ["null", rec]})
            elif shape == "null-last":
                fields.append({"name": name, "type": [rec, "null"]})
            else:
                fields.append({"name": name, "type": ["null", "string", rec]})
        elif name in ("cutoutScience", "cutoutTemplate"):
            if cutout is None:
                cutout = {
                    "type": "record",
                    "name": "Cutout",
                    "fields": [
                        {"name": "fileName", "type": "string"},
                        {"name": "stampData", "type": "bytes"},
                    ],
                }
                fields.append({"name": name, "type": ["null", cutout]})
                m.named["Cutout"] = cutout
            else:
                fields.append({"name": name, "type": ["null", "Cutout"]})
        else:  # objectId, candid: decoded whole, of any type
            fields.append({"name": name, "type": m.type(2, None)})
    # the candidate's named type reused by a later field (as ZTF's schemas
    # do not, but could)
    if candidate_type is not None and draw(st.booleans()):
        fields.append(
            {"name": "reused", "type": {"type": "array", "items": candidate_type}}
        )
    schema = {"type": "record", "name": "Alert", "fields": fields}
    return schema, m.named


full_name = _avro._full_name


class Encoder:
    """Draws a value of a schema and returns its Avro bytes, hand-encoded:
    array and map blocks may have negative counts followed by their size."""

    def __init__(self, draw, named):
        self.draw, self.named = draw, named

    def __call__(self, schema, namespace=None, depth=0):
        draw = self.draw
        if isinstance(schema, str) and schema not in PRIMITIVE_TYPES:
            full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
            schema = self.named[full]
            namespace = full.rpartition(".")[0] or None
        if isinstance(schema, list):
            indices = list(range(len(schema)))
            if depth > 6 and "null" in schema:
                indices = [schema.index("null")]
            i = draw(st.sampled_from(indices))
            return zz(i) + self(schema[i], namespace, depth + 1)
        kind = schema if isinstance(schema, str) else schema["type"]
        if kind == "null":
            return b""
        if kind == "boolean":
            return bytes([draw(st.integers(0, 1))])
        if kind == "int":
            return zz(draw(st.integers(-(2**31), 2**31 - 1)))
        if kind == "long":
            return zz(draw(st.integers(-(2**63), 2**63 - 1)))
        if kind == "float":
            return struct.pack("<f", draw(st.floats(width=32)))
        if kind == "double":
            return struct.pack("<d", draw(st.floats()))
        if kind == "bytes":
            data = draw(st.binary(max_size=6))
            return zz(len(data)) + data
        if kind == "string":
            data = draw(st.text(max_size=4)).encode()
            return zz(len(data)) + data
        if kind == "enum":
            return zz(draw(st.integers(0, len(schema["symbols"]) - 1)))
        if kind == "fixed":
            return draw(st.binary(min_size=schema["size"], max_size=schema["size"]))
        if kind in ("record", "error"):
            _, inner = full_name(schema, namespace)
            return b"".join(self(f["type"], inner, depth + 1) for f in schema["fields"])
        if kind in ("array", "map"):
            out = b""
            n_blocks = draw(st.integers(0, 2)) if depth < 5 else 0
            for _ in range(n_blocks):
                n = draw(st.integers(1, 3))
                body = b""
                for _ in range(n):
                    if kind == "map":
                        key = draw(st.sampled_from(["k", "l", "mm"])).encode()
                        body += zz(len(key)) + key
                    item = schema["values" if kind == "map" else "items"]
                    body += self(item, namespace, depth + 1)
                if draw(st.booleans()):
                    out += zz(-n) + zz(len(body)) + body
                else:
                    out += zz(n) + body
            return out + zz(0)
        raise AssertionError(kind)


def hand_projection(schema, record):
    """The projection of a fully decoded record on the wanted fields."""
    out = {}
    for f in schema["fields"]:
        name = f["name"]
        if name not in TOP:
            continue
        value = record[name]
        if name in SUB and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in SUB[name]}
        out[name] = value
    return out


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fast_decoder_equals_fastavro_on_synthetic_records(data):
    schema, named = data.draw(alert_schemas())
    raw = Encoder(data.draw, named)(schema)
    writer = fastavro.parse_schema(json.loads(json.dumps(schema)))
    f = io.BytesIO(raw)
    full = fastavro.schemaless_reader(f, writer, None)
    assert f.tell() == len(raw)  # the encoding is what fastavro reads
    dec = _avro.record_decoder(schema, TOP, SUB)
    assert dec is not None
    lead = data.draw(st.binary(max_size=3))
    got, stop = dec.read(lead + raw + b"\x01\x02", len(lead))
    assert stop == len(lead) + len(raw)
    assert same(got, hand_projection(schema, full))
    try:
        reader = fastavro.parse_schema(_readers._project(schema))
    except Exception:  # a kept field refers to a type defined in a dropped one
        reader = None
    if reader is not None:
        want = fastavro.schemaless_reader(io.BytesIO(raw), writer, reader)
        assert same(got, want)
    # decoded many at a time (records built field by field, each union
    # branch from the records that take it), after other records
    more = [
        Encoder(data.draw, named)(schema) for _ in range(data.draw(st.integers(0, 4)))
    ]
    block = b"".join([raw, *more])
    decoded = dec.records(block, 1 + len(more))
    assert same(next(decoded), got)
    for r in more:
        want = fastavro.schemaless_reader(io.BytesIO(r), writer, None)
        assert same(next(decoded), hand_projection(schema, want))
    assert decoded.stop == len(block)
    # every proper prefix is cut off
    for k in range(0, len(raw), max(1, len(raw) // 40)):
        with pytest.raises(ValueError):
            dec.read(raw[:k], 0)


# --------------------------------------------------------------------------
# back to fastavro
# --------------------------------------------------------------------------


def with_candidate_field(field):
    return {
        "type": "record",
        "name": "Alert",
        "fields": [
            {"name": "candid", "type": "long"},
            {
                "name": "candidate",
                "type": {
                    "type": "record",
                    "name": "Candidate",
                    "fields": [{"name": "fid", "type": "int"}, field],
                },
            },
        ],
    }


UNSUPPORTED = [
    with_candidate_field(
        {"name": "jd", "type": {"type": "long", "logicalType": "timestamp-millis"}}
    ),
    with_candidate_field(
        {
            "name": "jd",
            "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}],
        }
    ),
    {
        "type": "record",
        "name": "A",
        "fields": [{"name": "candid", "type": {"type": "int", "logicalType": "date"}}],
    },
    {  # a union of two records on the way to a wanted sub-field
        "type": "record",
        "name": "A",
        "fields": [
            {
                "name": "candidate",
                "type": [
                    "null",
                    {
                        "type": "record",
                        "name": "P",
                        "fields": [{"name": "jd", "type": "double"}],
                    },
                    {
                        "type": "record",
                        "name": "Q",
                        "fields": [{"name": "fid", "type": "int"}],
                    },
                ],
            }
        ],
    },
]
UNSUPPORTED_RECORDS = [
    {"candid": 7, "candidate": {"fid": 2, "jd": 1234}},
    {"candid": 7, "candidate": {"fid": 2, "jd": 1234}},
    {"candid": 19000},
    {"candidate": ("Q", {"fid": 3})},
]


@pytest.mark.parametrize(
    "schema,record",
    list(zip(UNSUPPORTED, UNSUPPORTED_RECORDS, strict=True)),
    ids=["logical-sub-field", "logical-in-union", "logical-top-field", "two-records"],
)
def test_unsupported_schemas_get_no_decoder_and_fastavro_reads(schema, record):
    assert _avro.record_decoder(schema, TOP, SUB) is None
    schemas = _readers._parse_schemas(schema)
    assert schemas.fast is None and schemas.reader is not None
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    raw = buf.getvalue()
    got, stop = schemas.read(raw, 0, fastavro)
    assert stop == len(raw)
    assert got == reference(schema, raw)[0]


def test_logical_types_outside_the_wanted_fields_keep_the_decoder():
    schema = with_candidate_field(
        {"name": "other", "type": {"type": "long", "logicalType": "timestamp-millis"}}
    )
    schema["fields"].append(
        {"name": "when", "type": {"type": "int", "logicalType": "date"}}
    )
    dec = _avro.record_decoder(schema, TOP, SUB)
    assert dec is not None
    raw = zz(5) + zz(2) + zz(10**12) + zz(19000)
    got, stop = dec.read(raw, 0)
    assert stop == len(raw)
    assert got == reference(schema, raw)[0] == {"candid": 5, "candidate": {"fid": 2}}


@pytest.fixture
def cleared_caches():
    """Clear the readers' schema caches before and after the test."""
    _readers._parsed_writer_schema.cache_clear()
    _readers._rubin_schema.cache_clear()
    yield
    _readers._parsed_writer_schema.cache_clear()
    _readers._rubin_schema.cache_clear()


def assert_bunches_equal(a, b):
    np.testing.assert_array_equal(a.images, b.images)
    if a.variance is None:
        assert b.variance is None
    else:
        np.testing.assert_array_equal(a.variance, b.variance)
    pd.testing.assert_frame_equal(a.frame, b.frame)


def shipped_files(folder, n=None):
    files = sorted(shared(folder).glob("*.avro"))
    return files[:n]


def confluent_messages(folder):
    """The packets of ``folder`` as Confluent frames, and the id registry."""
    ids, messages = {}, []
    for path in shipped_files(folder):
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            schema = reader.writer_schema
            for rec in reader:
                key = json.dumps(schema, sort_keys=True)
                ids.setdefault(key, 100 + len(ids))
                buf = io.BytesIO()
                buf.write(b"\0" + ids[key].to_bytes(4, "big"))
                fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), rec)
                messages.append(buf.getvalue())
    return messages, {v: json.loads(k) for k, v in ids.items()}


def count_fast_reads(monkeypatch):
    """Make the compiled decoder take every record; count the records it
    decodes (one by one, by block or by container file)."""
    monkeypatch.setattr(_readers, "_FAST_AFTER", 0, raising=False)
    calls = [0]
    for method in ("records", "container_records"):
        real = getattr(_avro.RecordDecoder, method)

        def spy(self, *args, real=real):
            for record in real(self, *args):
                calls[0] += 1
                yield record

        monkeypatch.setattr(_avro.RecordDecoder, method, spy)
    read = _avro.RecordDecoder.read

    def read_spy(self, buf, pos=0):
        calls[0] += 1
        return read(self, buf, pos)

    monkeypatch.setattr(_avro.RecordDecoder, "read", read_spy)
    return calls


@pytest.mark.parametrize(
    "folder,n",
    [("ztf_alerts", None), ("rubin_alerts", None), ("ztf_alert_archive", 40)],
)
def test_fast_decoder_off_reads_the_same(monkeypatch, cleared_caches, folder, n):
    files = shipped_files(folder, n)
    calls = count_fast_reads(monkeypatch)
    fast = read_alerts(files)
    assert calls[0] == len(fast.frame) == len(files)
    monkeypatch.setattr(_readers, "_FAST_DECODER", False)
    _readers._parsed_writer_schema.cache_clear()
    slow = read_alerts(files)
    assert calls[0] == len(files)  # fastavro read them all
    assert_bunches_equal(fast, slow)


@pytest.mark.parametrize("folder", ["ztf_alerts", "rubin_alerts"])
def test_confluent_frames_in_one_buffer_fast_and_slow(monkeypatch, folder):
    messages, registry = confluent_messages(folder)
    together = b"".join(messages)
    calls = count_fast_reads(monkeypatch)
    fast = read_alerts([together], schema=registry)
    assert calls[0] == len(fast.frame) == N_RECORDS[folder]
    monkeypatch.setattr(_readers, "_FAST_DECODER", False)
    slow = read_alerts([together], schema=registry)
    assert calls[0] == N_RECORDS[folder]
    assert_bunches_equal(fast, slow)


def test_without_numba_the_readers_use_fastavro(monkeypatch, cleared_caches):
    files = shipped_files("ztf_alerts") + shipped_files("rubin_alerts", 5)
    calls = count_fast_reads(monkeypatch)
    fast = read_alerts(files)
    assert calls[0] == len(files)
    schema = container_blocks(files[0])[0]
    assert _avro.record_decoder(schema, TOP, SUB) is not None
    monkeypatch.setattr(_avro, "_jitted", lambda: None)
    _readers._parsed_writer_schema.cache_clear()
    assert _avro.record_decoder(schema, TOP, SUB) is None
    assert _readers._parse_schemas(schema).fast is None
    assert_bunches_equal(fast, read_alerts(files))
    assert calls[0] == len(files)


# --------------------------------------------------------------------------
# gzip: the fast path and zlib
# --------------------------------------------------------------------------


def gunzip_result(data):
    try:
        return _fits._gunzip(data)
    except FITSError:
        return FITSError


def zlib_reference(data):
    """What the standard library's zlib path gives: the bytes of every gzip
    member (zero padding after them allowed), or FITSError."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflate.decompress(data)
        if not inflate.eof:
            return FITSError
        if inflate.unused_data:
            out = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return FITSError
    return out


def test_gunzip_equals_zlib_on_every_shipped_cutout():
    n = 0
    for folder in ("ztf_alerts", "ztf_alert_archive"):
        for _, schema, block, start, end in shipped_records(folder):
            record = reference(schema, block, start)[0]
            for field in CUTOUTS:
                data = (record.get(field) or {}).get("stampData")
                if data is None:
                    continue
                assert data[:2] == b"\x1f\x8b"
                got = _fits._gunzip(data)
                assert isinstance(got, bytes)
                assert got == zlib_reference(data) == gzip.decompress(data)
                n += 1
    assert n >= 3 * 500


GZ_A = gzip.compress(bytes(range(256)) * 20, mtime=0)
GZ_B = gzip.compress(b"another member" * 50, mtime=0)
GZ_A2 = gzip.compress(bytes(range(255, -1, -1)) * 20, mtime=0)  # same size as A


def flipped(data, i):
    out = bytearray(data)
    out[i] ^= 0x55
    return bytes(out)


GZIP_CASES = {
    "one-member": GZ_A,
    "two-members": GZ_A + GZ_B,
    "two-members-same-size": GZ_A + GZ_A2,
    "trailing-zeros": GZ_A + b"\0" * 16,
    "trailing-garbage": GZ_A + b"garbage!",
    "trailing-garbage-ending-in-the-size": GZ_A + b"junk" + GZ_A[-4:],
    "truncated-body": GZ_A[: len(GZ_A) // 2],
    "truncated-trailer": GZ_A[:-3],
    "header-only": GZ_A[:18],
    "corrupt-body": flipped(GZ_A, 40),
    "corrupt-crc": flipped(GZ_A, len(GZ_A) - 6),
    "corrupt-size": flipped(GZ_A, len(GZ_A) - 2),
    "empty-member": gzip.compress(b"", mtime=0),
    "not-gzip": b"SIMPLE  =  T",
}


@pytest.mark.parametrize("case", sorted(GZIP_CASES))
def test_gunzip_agrees_with_the_zlib_path(case):
    """Whatever fast path ``_gunzip`` takes (libdeflate, zlib-ng), it gives
    what the standard library's zlib gives: the same bytes or FITSError."""
    data = GZIP_CASES[case]
    want = zlib_reference(data)
    got = gunzip_result(data)
    assert got == want
    if want is not FITSError:
        assert isinstance(got, bytes)


def test_gunzip_known_results():
    """The answers themselves: every member, in order (also when two members
    have the same size, which a check of the trailer's size alone misses);
    zero padding ignored; anything else after the member is an error."""
    a, b, a2 = (gzip.decompress(g) for g in (GZ_A, GZ_B, GZ_A2))
    assert len(a) == len(a2) and a != a2
    assert _fits._gunzip(GZIP_CASES["one-member"]) == a
    assert _fits._gunzip(GZIP_CASES["two-members"]) == a + b
    assert _fits._gunzip(GZIP_CASES["two-members-same-size"]) == a + a2
    assert _fits._gunzip(GZIP_CASES["trailing-zeros"]) == a
    assert _fits._gunzip(GZIP_CASES["empty-member"]) == b""
    for case in (
        "truncated-body",
        "truncated-trailer",
        "corrupt-body",
        "corrupt-crc",
        "trailing-garbage",
        "trailing-garbage-ending-in-the-size",
    ):
        with pytest.raises(FITSError):
            _fits._gunzip(GZIP_CASES[case])


# --------------------------------------------------------------------------
# the FITS header scan against astropy
# --------------------------------------------------------------------------


def card(key, value):
    return f"{key:<8}= {value:>20}"


def fits_file(*hdus):
    """FITS bytes of ``(cards, data)`` HDUs (cards without END)."""
    out = b""
    for cards, data in hdus:
        header = "".join(c.ljust(80) for c in [*cards, "END"]).encode()
        out += header.ljust(-(-len(header) // 2880) * 2880, b" ")
        body = b"" if data is None else data.tobytes()
        out += body.ljust(-(-len(body) // 2880) * 2880, b"\0")
    return out


def primary(bitpix=16, shape=(2, 3), extra=(), naxis=None):
    cards = [card("SIMPLE", "T"), card("BITPIX", bitpix)]
    cards.append(card("NAXIS", len(shape) if naxis is None else naxis))
    cards += [card(f"NAXIS{k + 1}", n) for k, n in enumerate(shape[::-1])]
    return cards + list(extra)


def image(bitpix, shape):
    dtype = _fits._BITPIX_DTYPE[bitpix]
    return (np.arange(int(np.prod(shape))) % 50).astype(dtype).reshape(shape)


def astropy_images(buf):
    from astropy.io import fits

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(io.BytesIO(buf), memmap=False) as hdul:
            for index, hdu in enumerate(hdul):
                if hdu.is_image and hdu.data is not None:
                    name = "PRIMARY" if index == 0 else hdu.name.strip().upper()
                    out.setdefault(name or f"HDU{index}", np.array(hdu.data))
    return out


def assert_as_astropy(buf, monkeypatch):
    def no_fallback(*args):
        raise AssertionError("the fast path handed this file to astropy")

    monkeypatch.setattr(_fits, "_astropy_images", no_fallback)
    got = read_fits_images(buf)
    want = astropy_images(buf)
    assert list(got) == list(want)
    for name, w in want.items():
        w = w.astype(w.dtype.newbyteorder("="))
        assert got[name].dtype == w.dtype, name
        assert got[name].shape == w.shape, name
        assert got[name].tobytes() == w.tobytes(), name


COMMENTS = [f"COMMENT filler card number {i}" for i in range(40)]

HEADER_CASES = {
    # a keyword written inside other cards (comments, string values)
    "keyword-in-comment": (
        primary(
            extra=[
                "COMMENT BZERO   =                   5",
                "HISTORY NAXIS1  =                   7",
                "OBJECT  = 'x BSCALE  = 2'          / BLANK   =                    3",
                "BZEROX  =                    9",
            ]
        ),
        image(16, (2, 3)),
    ),
    # '= ' not in columns 9-10: not a value card
    "equals-in-column-8": (
        primary(extra=["BZERO  =                    5"]),
        image(16, (2, 3)),
    ),
    "equals-in-column-10": (
        primary(extra=["BZERO    =                    5"]),
        image(16, (2, 3)),
    ),
    "equals-without-space": (primary(extra=["BZERO   =5"]), image(16, (2, 3))),
    # NAXISn up to NAXIS; a NAXISn beyond NAXIS is not an axis
    "three-axes": (primary(shape=(1, 2, 3)), image(16, (1, 2, 3))),
    "naxis-beyond": (
        primary(shape=(2, 3), extra=[card("NAXIS3", 5), card("NAXIS10", 4)]),
        image(16, (2, 3)),
    ),
    "ten-axes": (primary(shape=(1,) * 8 + (2, 3)), image(16, (1,) * 8 + (2, 3))),
    # headers of two blocks; END as the last card of the first block
    "two-blocks": (primary(extra=COMMENTS), image(16, (2, 3))),
    "end-last-card-of-block": (primary(extra=COMMENTS[:30]), image(16, (2, 3))),
    "end-first-card-of-block-2": (primary(extra=COMMENTS[:31]), image(16, (2, 3))),
    "scaled-two-blocks": (
        primary(extra=COMMENTS + [card("BZERO", 3.5), card("BSCALE", 0.5)]),
        image(16, (2, 3)),
    ),
    # the keyword END written in a comment, not at a card's start
    "end-in-comment": (
        primary(extra=["COMMENT END     of something"]),
        image(16, (2, 3)),
    ),
    # a keyword in lower case (astropy reads it as the upper-case one)
    "lowercase-keyword": (
        primary(extra=["bzero   =                    5"]),
        image(16, (2, 3)),
    ),
    # repeated keywords: astropy scales and shapes the data with the last
    "repeated-bzero": (
        primary(extra=[card("BZERO", 10), card("BZERO", 20)]),
        image(16, (2, 3)),
    ),
    "repeated-bscale": (
        primary(extra=[card("BSCALE", 2), card("BSCALE", 3)]),
        image(16, (2, 3)),
    ),
    "repeated-bitpix": (
        primary(extra=[card("BITPIX", 8)]),
        image(16, (2, 3)),
    ),
    "repeated-naxis1": (
        primary(shape=(2, 3), extra=[card("NAXIS1", 2)]),
        image(16, (2, 3)),
    ),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_scan_equals_astropy(monkeypatch, case):
    cards, data = HEADER_CASES[case]
    assert_as_astropy(fits_file((cards, data)), monkeypatch)


def test_header_scan_extensions_spanning_blocks(monkeypatch):
    ext = [card("XTENSION", "'IMAGE   '"), card("BITPIX", -32), card("NAXIS", 2)]
    ext += [card("NAXIS1", 3), card("NAXIS2", 2), card("PCOUNT", 0), card("GCOUNT", 1)]
    buf = fits_file(
        (primary(shape=(), extra=COMMENTS), None),
        (ext + COMMENTS + [card("EXTNAME", "'UNCERT  '")], image(-32, (2, 3))),
        (ext[:1] + [card("BITPIX", 32)] + ext[2:] + COMMENTS[:29], image(32, (2, 3))),
    )
    assert_as_astropy(buf, monkeypatch)
    assert list(read_fits_images(buf)) == ["UNCERT", "HDU2"]


def test_header_without_end_is_a_fitserror():
    header = "".join(c.ljust(80) for c in primary()).encode().ljust(2880 * 2, b" ")
    with pytest.raises(FITSError, match="no END card"):
        read_fits_images(header)


# --------------------------------------------------------------------------
# read_alerts / iter_alerts with channels=
# --------------------------------------------------------------------------


@functools.cache
def _full_read(folder, size):
    return read_alerts(shared(folder), size=size)


SIZES = {"ztf_alerts": 63, "rubin_alerts": 30}
FRAME_SAME = [
    c
    for c in _readers._FRAME_COLUMNS
    if c not in ("padded", "cutout_height", "cutout_width")
]


def assert_channels_read(part, full, keep):
    for c in range(3):
        if c in keep:
            np.testing.assert_array_equal(part.images[:, c], full.images[:, c])
        else:
            assert np.isnan(part.images[:, c]).all()
        if full.variance is not None:
            if c in keep:
                np.testing.assert_array_equal(part.variance[:, c], full.variance[:, c])
            else:
                assert np.isnan(part.variance[:, c]).all()
    if full.variance is None:
        assert part.variance is None
    pd.testing.assert_frame_equal(part.frame[FRAME_SAME], full.frame[FRAME_SAME])
    assert part.channels == full.channels and part.image_shape == full.image_shape


CHANNEL_ARGS = [
    (["difference"], {2}),
    ([0, 2], {0, 2}),
    ("template", {1}),
    (("science",), {0}),
    (np.int64(1), {1}),
    ([np.int64(2), "difference", 2], {2}),
    (["science", "template", "difference"], {0, 1, 2}),
]


@pytest.mark.parametrize("folder", ["ztf_alerts", "rubin_alerts"])
@pytest.mark.parametrize("channels,keep", CHANNEL_ARGS)
def test_channels_decode_only_the_named_cutouts(folder, channels, keep):
    full = _full_read(folder, SIZES[folder])
    part = read_alerts(shared(folder), size=SIZES[folder], channels=channels)
    assert_channels_read(part, full, keep)


def test_channels_bytes_of_other_cutouts_are_not_decoded(monkeypatch):
    seen = []
    real = _readers._read_cutout

    def spy(data):
        seen.append(bytes(data[:2]))
        return real(data)

    monkeypatch.setattr(_readers, "_read_cutout", spy)
    alerts = read_alerts(shared("ztf_alerts"), channels=["difference"])
    assert len(seen) == len(alerts.frame) == N_RECORDS["ztf_alerts"]


def test_channels_iter_alerts_concatenates_to_read_alerts():
    folder = shared("rubin_alerts")
    whole = read_alerts(folder, size=30, channels=[2, 0])
    batches = list(iter_alerts(folder, batch_size=7, size=30, channels=[2, 0]))
    assert [len(b.frame) for b in batches] == [7] * 5 + [1]
    np.testing.assert_array_equal(
        np.concatenate([b.images for b in batches]), whole.images
    )
    np.testing.assert_array_equal(
        np.concatenate([b.variance for b in batches]), whole.variance
    )
    frame = pd.concat([b.frame for b in batches], ignore_index=True)
    pd.testing.assert_frame_equal(frame, whole.frame)
    assert_channels_read(whole, _full_read("rubin_alerts", 30), {0, 2})


def test_channels_count_every_missing_cutout(tmp_path):
    path = shipped_files("rubin_alerts")[0]
    with open(path, "rb") as f:
        reader = fastavro.reader(f)
        schema, (rec,) = reader.writer_schema, list(reader)
    no_template = {**rec, "cutoutTemplate": None}
    none = {**rec, **{c: None for c in CUTOUTS}}
    file = tmp_path / "missing.avro"
    with open(file, "wb") as f:
        fastavro.writer(f, schema, [rec, no_template, none])
    full = read_alerts(file, size=30)
    assert full.frame.n_missing_cutouts.tolist() == [0, 1, 3]
    for channels, keep in (
        (["difference"], {2}),
        (["template"], {1}),
        ([1, 2], {1, 2}),
    ):
        part = read_alerts(file, size=30, channels=channels)
        assert_channels_read(part, full, keep)
    part = read_alerts(file, size=30, channels="template")
    assert np.isnan(part.images[1:]).all()
    assert not np.isnan(part.images[0, 1]).all()


BAD_CHANNELS = [
    ("foo", "'foo'"),
    (["science", "foo"], "'foo'"),
    (3, "got 3"),
    (-1, "got -1"),
    (True, "got True"),
    ([False], "got False"),
    ("Science", "'Science'"),
    ([], "channels is empty"),
    ((), "channels is empty"),
]


def test_channels_of_a_wrong_type_are_named():
    """A float is neither a cutout name nor an index: the error says so
    (not a TypeError from deep inside about iterating a float)."""
    folder = shared("ztf_alerts")
    with pytest.raises((ValueError, TypeError), match="channels"):
        read_alerts(folder, channels=2.0)
    with pytest.raises(ValueError, match="got 2.0"):
        read_alerts(folder, channels=[2.0])


@pytest.mark.parametrize("channels,match", BAD_CHANNELS)
def test_bad_channels_are_named(channels, match):
    folder = shared("ztf_alerts")
    with pytest.raises(ValueError, match=match) as info:
        read_alerts(folder, channels=channels)
    assert "channels" in str(info.value)
    with pytest.raises(ValueError, match=match):
        next(iter(iter_alerts(folder, channels=channels)))


# --------------------------------------------------------------------------
# model_channels
# --------------------------------------------------------------------------


def fitted_prep(shape, **kw):
    from sk_covvae.preprocessing import StampPreprocessor

    return StampPreprocessor(shape, **kw).fit(np.zeros((2, int(np.prod(shape)))))


def in_pipeline(first):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    return Pipeline([("first", first), ("then", FunctionTransformer())])


MODEL_CASES = [
    ((3, 9, 9), dict(channels=[2]), ["difference"]),
    ((3, 9, 9), dict(channels=[0, 2]), ["science", "difference"]),
    ((3, 9, 9), dict(channels=[2, 0], crop=(5, 5)), ["science", "difference"]),
    ((3, 9, 9), dict(channels=[1]), ["template"]),
    ((3, 9, 9), {}, list(CHANNELS)),
    ((6, 9, 9), dict(channels=[2], variance_channels=[5]), ["difference"]),
    ((6, 9, 9), dict(channels=[0], variance_channels=[5]), ["science", "difference"]),
    (
        (6, 9, 9),
        dict(channels=[0, 1], variance_channels=[3, 4]),
        ["science", "template"],
    ),
    ((6, 9, 9), dict(channels=[1]), ["template"]),
    ((6, 9, 9), dict(variance_channels=[3, 4, 5]), list(CHANNELS)),
]


@pytest.mark.parametrize("shape,kw,want", MODEL_CASES)
def test_model_channels_of_a_stamp_preprocessor(shape, kw, want):
    from sk_covvae.scoring import model_channels

    prep = fitted_prep(shape, **kw)
    assert model_channels(prep, shape) == want
    assert model_channels(in_pipeline(prep), shape) == want


def test_model_channels_of_other_first_steps():
    from sklearn.preprocessing import StandardScaler

    from sk_covvae import CovarianceVAE
    from sk_covvae.preprocessing import StampPreprocessor
    from sk_covvae.scoring import model_channels

    X = np.random.default_rng(0).normal(size=(64, 3 * 5 * 5))
    vae = CovarianceVAE(**{**TINY_MODEL, "max_epochs": 1}).fit(X)
    assert model_channels(vae, (3, 5, 5)) == list(CHANNELS)
    scaler = StandardScaler().fit(X)
    assert model_channels(in_pipeline(scaler), (3, 5, 5)) == list(CHANNELS)
    # a StampPreprocessor that is not fitted, or not first
    unfitted = StampPreprocessor((3, 5, 5), channels=[2])
    assert model_channels(in_pipeline(unfitted), (3, 5, 5)) == list(CHANNELS)
    later = in_pipeline(scaler)
    later.steps.append(("prep", fitted_prep((3, 5, 5), channels=[2])))
    assert model_channels(later, (3, 5, 5)) == list(CHANNELS)


def test_model_channels_of_a_fitted_tiny_pipeline():
    from conftest import tiny_pipeline

    from sk_covvae.scoring import model_channels, model_input_shape

    X = np.random.default_rng(1).normal(size=(64, 3 * 7 * 7))
    pipe = tiny_pipeline((3, 7, 7), channels=[2], crop=(5, 5)).fit(X)
    assert model_channels(pipe, model_input_shape(pipe)) == ["difference"]
