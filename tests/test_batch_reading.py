"""Tests of how the readers go through multi-alert files and build batches.

- the compiled walk over an Avro container file's blocks
  (``RecordDecoder.container_records``) against fastavro, on blocks of one
  and of many records, read in chunks that cut blocks and headers anywhere,
  and on files cut off or damaged;
- the stored-image fast path of FITS cutouts against :func:`read_cutout`;
- batches that start small (the scoring job's ``first``) and image arrays
  reused from batch to batch (``_Buffers``), against ``read_alerts``.
"""

import gzip
import io

import numpy as np
import pytest
from conftest import shared

from sk_covvae.datasets import _avro, _fits, _readers, read_alerts
from sk_covvae.datasets._fits import read_cutout

fastavro = pytest.importorskip("fastavro")
pytest.importorskip("pandas")
pytest.importorskip("numba")  # the compiled walker (the astro extra)

CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def packets(folder, n):
    """``(writer schema, records)`` of the first ``n`` packets of a folder."""
    schema, records = None, []
    for path in sorted(shared(folder).glob("*.avro"))[:n]:
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            schema = schema or reader.writer_schema
            records.extend(reader)
    return schema, records


@pytest.fixture(scope="module")
def ztf():
    return packets("ztf_alert_archive", 12)


def container(schema, records, sync_interval=16000, codec="null"):
    buf = io.BytesIO()
    fastavro.writer(buf, schema, records, sync_interval=sync_interval, codec=codec)
    return buf.getvalue()


def fast_records(data):
    """Records of a container file decoded by the fast path, and the error
    that stopped it (None at the end of the file)."""
    f = io.BytesIO(data)
    out = []
    try:
        for record in _readers._avro_container(f, fastavro):
            out.append(record)
    except (ValueError, EOFError) as exc:
        return out, exc
    return out, None


def slow_records(monkeypatch, data):
    with monkeypatch.context() as m:
        m.setattr(_readers, "_FAST_DECODER", False)
        return fast_records(data)


def projected(schema, records):
    """What the readers decode of ``records``: the projected fields."""
    writer = fastavro.parse_schema(schema)
    reader = fastavro.parse_schema(_readers._project(schema))
    out = []
    for record in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        buf.seek(0)
        out.append(fastavro.schemaless_reader(buf, writer, reader))
    return out


def counted(monkeypatch, method):
    """Count the calls of a RecordDecoder method."""
    calls = [0]
    real = getattr(_avro.RecordDecoder, method)

    def spy(self, *args):
        calls[0] += 1
        return real(self, *args)

    monkeypatch.setattr(_avro.RecordDecoder, method, spy)
    return calls


def walked(monkeypatch, chunk):
    """Count the container walks; set the bytes read at once."""
    monkeypatch.setattr(_avro, "_CHUNK", chunk)
    return counted(monkeypatch, "container_records")


# --------------------------------------------------------------------------
# the walk over blocks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sync_interval", [10, 200_000, 10_000_000])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 100_000, 1 << 23])
def test_container_walk_equals_fastavro(monkeypatch, ztf, sync_interval, chunk):
    """One record per block, several, all in one; read in chunks that cut
    headers and blocks anywhere (or all at once)."""
    schema, records = ztf
    records = records * 3  # 36: past the walk's first calls of 8 and 16
    data = container(schema, records, sync_interval)
    calls = walked(monkeypatch, chunk)
    got, error = fast_records(data)
    assert error is None and calls[0] == 1
    assert got == projected(schema, records)


@pytest.mark.parametrize("sync_interval", [10, 10_000_000])
def test_deflate_blocks_are_walked_block_by_block(monkeypatch, ztf, sync_interval):
    """Compressed blocks: one compiled walk per block, as fastavro reads."""
    schema, records = ztf
    data = container(schema, records * 2, sync_interval, codec="deflate")
    calls = counted(monkeypatch, "records")
    got, error = fast_records(data)
    assert error is None and got == projected(schema, records * 2)
    assert calls[0] == (24 if sync_interval == 10 else 1)


def test_a_block_with_a_damaged_record(ztf):
    """The records before it are kept, then the error; fast as slow."""
    schema, records = ztf
    decoder = _readers._parse_schemas(schema).fast
    writer = fastavro.parse_schema(schema)
    raw = []
    for record in records[:3]:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        raw.append(buf.getvalue())
    block = raw[0] + raw[1] + raw[2][:100]
    got = decoder.records(block, 3)
    assert [next(got), next(got)] == projected(schema, records[:2])
    with pytest.raises(ValueError, match="does not fit"):
        next(got)


@pytest.mark.parametrize("chunk", [4096, 1 << 23])
def test_container_walk_of_records_that_take_different_union_branches(
    monkeypatch, ztf, chunk
):
    """Records walked in one call whose cutouts and nullable fields are
    present in some and null in others: each field is decoded for the
    records that have it (the records are built field by field)."""
    schema, records = ztf
    mixed = []
    for i, record in enumerate(records * 2):
        record = {**record, "candidate": dict(record["candidate"])}
        if i % 3 == 1:
            record["cutoutTemplate"] = None
        if i % 4 == 2:
            record["cutoutDifference"] = record["cutoutScience"] = None
        if i % 2:
            record["candidate"]["rb"] = record["candidate"]["xpos"] = None
        mixed.append(record)
    monkeypatch.setattr(_avro, "_CHUNK", chunk)
    got, error = fast_records(container(schema, mixed))
    assert error is None and got == projected(schema, mixed)
    assert [r["cutoutTemplate"] is None for r in got] == [
        i % 3 == 1 for i in range(len(mixed))
    ]
    assert [r["candidate"]["rb"] is None for r in got] == [
        i % 2 == 1 for i in range(len(mixed))
    ]


def test_container_walk_of_empty_blocks_and_no_records(monkeypatch, ztf):
    schema, records = ztf
    data = container(schema, [])
    assert fast_records(data) == ([], None)
    # an empty block (count 0, size 0) before and after a real one
    one = container(schema, records[:1])
    sync = one[-16:]  # every file has its own
    header_end = one.index(sync) + 16  # the header ends with it
    empty = b"\x00\x00" + sync
    data, block = one[:header_end], one[header_end:]
    got, error = fast_records(data + empty + block + empty)
    assert error is None and got == projected(schema, records[:1])


def test_container_walk_stops_where_the_slow_path_stops(monkeypatch, ztf):
    """Cut anywhere or damaged: the same records first, the same error."""
    schema, records = ztf
    data = container(schema, records[:4], sync_interval=10)
    monkeypatch.setattr(_avro, "_CHUNK", 5000)
    n = len(data)
    header = data.index(data[-16:]) + 16
    cuts = sorted({*range(header, header + 40), *range(header, n, 997), n - 1})
    for cut in cuts:
        fast, fast_error = fast_records(data[:cut])
        slow, slow_error = slow_records(monkeypatch, data[:cut])
        assert fast == slow, cut
        assert type(fast_error) is type(slow_error), cut
    # a damaged sync marker after the second block
    second = data.index(data[-16:], header) + 16
    third = data.index(data[-16:], second)
    damaged = bytearray(data)
    damaged[third] ^= 0xFF
    fast, error = fast_records(bytes(damaged))
    assert len(fast) == 2 and "sync marker" in str(error)
    assert slow_records(monkeypatch, bytes(damaged))[0] == fast


def test_container_walk_reports_a_record_that_does_not_fit(monkeypatch, ztf):
    schema, records = ztf
    data = bytearray(container(schema, records[:3], sync_interval=10))
    # the second block's count says 2 records: the second runs into the sync
    header = bytes(data).index(bytes(data[-16:])) + 16
    second = bytes(data).index(bytes(data[-16:]), header) + 16
    assert data[second] == 2  # zig-zag 1
    data[second] = 4
    fast, error = fast_records(bytes(data))
    assert len(fast) == 2 and "does not fit" in str(error)


def test_read_alerts_of_a_long_container_file(monkeypatch, tmp_path, ztf):
    """Through read_alerts: the same batches as one-alert files."""
    schema, records = ztf
    path = tmp_path / "multi.avro"
    path.write_bytes(container(schema, records * 2, sync_interval=50_000))
    calls = walked(monkeypatch, 100_000)
    got = read_alerts(path)
    assert calls[0] == 1
    want = read_alerts(sorted(shared("ztf_alert_archive").glob("*.avro"))[:12] * 2)
    np.testing.assert_array_equal(got.images, want.images)
    assert got.frame.alert_id.tolist() == want.frame.alert_id.tolist()
    assert got.frame.record_index.tolist() == list(range(24))


# --------------------------------------------------------------------------
# cutouts: the stored-image path
# --------------------------------------------------------------------------


def test_stored_image_path_equals_read_cutout_on_shipped_cutouts(ztf):
    _, records = ztf
    _, rubin = packets("rubin_alerts", 3)
    n_fast = 0
    for record in records + rubin:
        for name in CUTOUTS:
            data = _readers._stamp_bytes(record.get(name))
            if data is None:
                continue
            image, variance = _fits._read_cutout(data)
            want_image, want_variance = read_cutout(data)
            np.testing.assert_array_equal(image, want_image)
            assert image.dtype.newbyteorder("=") == want_image.dtype
            if want_variance is None:
                assert variance is None
            else:
                np.testing.assert_array_equal(variance, want_variance)
            n_fast += variance is None and image.base is not None
    assert n_fast >= 3 * len(records)  # every ZTF cutout took the fast path


def fits(bitpix, shape, extra=(), data=None):
    cards = ["SIMPLE  =                    T", f"BITPIX  = {bitpix:>20}"]
    cards.append(f"NAXIS   = {len(shape):>20}")
    cards += [f"NAXIS{k + 1:<3}= {n:>20}" for k, n in enumerate(shape[::-1])]
    cards += [*extra, "END"]
    header = "".join(c.ljust(80) for c in cards).encode()
    header = header.ljust(-(-len(header) // 2880) * 2880, b" ")
    if data is None:
        dtype = _fits._BITPIX_DTYPE[bitpix]
        data = (np.arange(int(np.prod(shape))) % 50).astype(dtype).reshape(shape)
    body = data.tobytes()
    return header + body.ljust(-(-len(body) // 2880) * 2880, b"\0")


@pytest.mark.parametrize(
    "bitpix,shape,extra,fast",
    [
        (-32, (4, 5), (), True),
        (-64, (1, 4, 5), (), True),  # squeezed to 2-D
        (16, (4, 5), (), True),
        (16, (4, 5), ("BZERO   =                32768",), False),
        (16, (4, 5), ("BSCALE  =                  2.0",), False),
        (16, (4, 5), ("BLANK   =                    7",), False),
        (-32, (4, 5), ("BLANK   =                    7",), True),  # ignored
        (8, (4, 5), ("BZERO   =                 -128",), False),
        (-32, (2, 4, 5), (), False),  # not an image of one plane
    ],
)
def test_stored_image_path_only_for_plain_images(bitpix, shape, extra, fast):
    buf = fits(bitpix, shape, extra)
    assert (_fits._stored_image(buf) is not None) == fast
    if len(shape) == 3 and shape[0] != 1:
        with pytest.raises(_fits.FITSError, match="not 2-D"):
            _fits._read_cutout(buf)
        return
    image, variance = _fits._read_cutout(buf)
    want, _ = read_cutout(buf)
    assert variance is None and image.shape == want.shape
    np.testing.assert_array_equal(image, want)


def test_stored_image_path_of_a_cut_off_file():
    buf = fits(-32, (40, 50))
    assert _fits._stored_image(buf[:-3000]) is None
    with pytest.raises(_fits.FITSError, match="truncated"):
        _fits._read_cutout(buf[:-3000])


# --------------------------------------------------------------------------
# batches: small first ones, arrays reused
# --------------------------------------------------------------------------


def _reading(
    paths, batch_size, channels=None, first=None, reuse=False, size=63, frame=True
):
    return _readers._iter_alerts(
        paths,
        batch_size,
        size,
        "raise",
        None,
        channels,
        first=first,
        reuse=reuse,
        frame=frame,
    )


def test_batches_that_start_small():
    files = sorted(shared("ztf_alert_archive").glob("*.avro"))[:40]
    batches = list(_reading(files, 16, first=3))
    assert [len(b.frame) for b in batches] == [3, 6, 12, 16, 3]
    whole = read_alerts(files, size=63)
    np.testing.assert_array_equal(
        np.concatenate([b.images for b in batches]), whole.images
    )


@pytest.fixture(scope="module")
def edge_file(tmp_path_factory, ztf):
    """ZTF alerts with a missing difference, a missing science cutout and
    a difference smaller than the stamps (placed with NaN padding)."""
    schema, records = ztf
    records = [dict(r) for r in records]
    records[2]["cutoutDifference"] = None
    records[5]["cutoutScience"] = None
    small = gzip.compress(fits(-32, (40, 63)))  # as at the edge of a CCD
    records[4]["cutoutDifference"] = {"fileName": "small", "stampData": small}
    path = tmp_path_factory.mktemp("edge") / "edge.avro"
    path.write_bytes(container(schema, records * 3))
    return path


@pytest.mark.parametrize("channels", [None, ["difference"], [0, 2]])
@pytest.mark.parametrize("size", [63, 70])
def test_reused_arrays_give_the_batches_of_new_ones(edge_file, channels, size):
    fresh = list(_reading([edge_file], 5, channels, size=size))
    batches, buffers = _reading(
        [edge_file], 5, channels, first=2, reuse=True, size=size
    )
    got, arrays = [], set()
    for batch in batches:
        got.append(batch.images.copy())
        arrays.add(id(batch.images.base))
        buffers.give(batch.images)
    assert len(arrays) < len(got)  # arrays were reused
    want = np.concatenate([b.images for b in fresh])
    np.testing.assert_array_equal(np.concatenate(got), want)
    # the cases the reuse must fill: a missing cutout, padding
    assert np.isnan(want[2, 2]).all() and not np.isnan(want[0, 2, 31, 31])
    assert np.isnan(want[0, 2, 0]).all() == (size == 70)
    assert np.isnan(want[4, 2]).any() and not np.isnan(want[4, 2]).all()


def test_reused_arrays_not_given_back_are_not_reused(edge_file):
    batches, buffers = _reading([edge_file], 5, reuse=True)
    images = [b.images for b in batches]
    assert len({id(a) for a in images}) == len(images)
    want = np.concatenate([b.images for b in _reading([edge_file], 5)])
    np.testing.assert_array_equal(np.concatenate(images), want)


@pytest.mark.parametrize("channels", [None, ["difference"]])
def test_batches_without_a_frame_hold_its_columns(edge_file, channels):
    """The scoring job's batches (``frame=False``): the columns of the frame
    that iter_alerts gives, as arrays and lists; the same images."""
    pd = pytest.importorskip("pandas")
    framed = list(_reading([edge_file], 5, channels))
    bare = list(_reading([edge_file], 5, channels, frame=False))
    assert len(bare) == len(framed) == 8
    for a, b in zip(bare, framed, strict=True):
        assert a.frame is None and list(a.columns) == list(b.frame.columns)
        pd.testing.assert_frame_equal(_readers._frame(a.columns), b.frame)
        np.testing.assert_array_equal(a.images, b.images)
        assert a.columns["object_id"] == b.frame["object_id"].tolist()
        assert a.columns["isdiffpos"] == b.frame["isdiffpos"].tolist()
    padded = np.concatenate([a.columns["padded"] for a in bare])
    assert padded.dtype == bool and padded[4] and not padded[0]
