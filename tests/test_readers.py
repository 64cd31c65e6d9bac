"""Tests of the alert readers: read_alerts, iter_alerts and the FITS reader.

Most use the real packets of ``../shared/data`` (skipped when it is absent);
the synthetic ones build packets from scratch with fastavro and astropy.
"""

import functools
import gzip
import io
import json
import pickle
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import fastavro
import lsst.alert.packet as alert_packet
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from conftest import shared

from sk_covvae.datasets import (
    ALERT_CHANNELS,
    AlertReadError,
    AlertReadWarning,
    iter_alerts,
    read_alert_cutouts,
    read_alerts,
)
from sk_covvae.datasets._fits import FITSError, read_cutout, read_fits_images

CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
N_PACKETS = {"ztf_alerts": 15, "ztf_alert_archive": 498, "rubin_alerts": 36}


def raw_packets(folder):
    """``[(path, writer_schema, record)]`` of every packet, read by fastavro."""
    return _raw_packets(shared(folder))


@functools.cache
def _raw_packets(folder):
    out = []
    for path in sorted(folder.glob("*.avro")):
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            out.extend((path, reader.writer_schema, rec) for rec in reader)
    return out


@functools.cache
def _read_folder(folder):
    return read_alerts(folder)


def read_folder(folder):
    """read_alerts of a shipped folder, read once per test session."""
    return _read_folder(shared(folder))


def stamp(cutout):
    return cutout["stampData"] if isinstance(cutout, dict) else cutout


@pytest.fixture(scope="module", params=sorted(N_PACKETS))
def shipped(request):
    """Each shipped folder: its raw packets and what read_alerts makes of it."""
    folder = request.param
    return folder, raw_packets(folder), read_folder(folder)


@pytest.fixture(scope="module")
def ztf():
    return raw_packets("ztf_alerts"), read_folder("ztf_alerts")


@pytest.fixture(scope="module")
def archive():
    return raw_packets("ztf_alert_archive"), read_folder("ztf_alert_archive")


@pytest.fixture(scope="module")
def rubin():
    return raw_packets("rubin_alerts"), read_folder("rubin_alerts")


def frames_equal(a, b, ignore=("source", "record_index")):
    pd.testing.assert_frame_equal(
        a.drop(columns=list(ignore)).reset_index(drop=True),
        b.drop(columns=list(ignore)).reset_index(drop=True),
    )


def bunches_equal(a, b, ignore=("source", "record_index")):
    np.testing.assert_array_equal(a.images, b.images)
    if a.variance is None:
        assert b.variance is None
    else:
        np.testing.assert_array_equal(a.variance, b.variance)
    frames_equal(a.frame, b.frame, ignore)


# --------------------------------------------------------------------------
# the shipped packets
# --------------------------------------------------------------------------


def test_every_shipped_packet_is_read(shipped):
    folder, packets, alerts = shipped
    n = N_PACKETS[folder]
    assert len(packets) == n and len(alerts.frame) == n
    assert alerts.images.dtype == np.float32
    assert alerts.images.shape[:2] == (n, 3)
    assert alerts.image_shape == alerts.images.shape[1:]
    assert alerts.channels == ALERT_CHANNELS == ("science", "template", "difference")
    assert alerts.skipped == []
    frame = alerts.frame
    assert frame.alert_id.dtype == np.int64
    assert frame.source.tolist() == [str(p) for p, _, _ in packets]
    assert (frame.record_index == 0).all()
    assert (frame.n_missing_cutouts == 0).all()
    if folder.startswith("ztf"):
        assert (frame.survey == "ztf").all()
        assert alerts.images.shape[2:] == (63, 63)
        assert alerts.variance is None
        assert ((frame.rb > 0) & (frame.rb < 1)).all()
        assert frame.reliability.isna().all()
    else:
        assert (frame.survey == "rubin").all()
        assert alerts.images.shape[2:] == (30, 30)  # 26 of the 36 are 30x30
        assert alerts.variance.shape == alerts.images.shape
        assert frame.rb.isna().all() and frame.drb.isna().all()
        assert frame.reliability.between(0, 1).all()


def test_ids_and_fields_are_exact(shipped):
    folder, packets, alerts = shipped
    frame = alerts.frame
    if folder.startswith("ztf"):
        cand = [rec["candidate"] for _, _, rec in packets]
        ids = [rec["candid"] for _, _, rec in packets]
        assert frame.object_id.tolist() == [rec["objectId"] for _, _, rec in packets]
        np.testing.assert_array_equal(frame.rb, [c["rb"] for c in cand])
        np.testing.assert_array_equal(
            frame.drb, [np.nan if c.get("drb") is None else c["drb"] for c in cand]
        )
        np.testing.assert_array_equal(frame.mjd, [c["jd"] - 2400000.5 for c in cand])
        fid = {1: "g", 2: "r", 3: "i"}
        assert frame.band.tolist() == [fid[c["fid"]] for c in cand]
        assert frame.isdiffpos.tolist() == [c["isdiffpos"] in "t1" for c in cand]
    else:
        src = [rec["diaSource"] for _, _, rec in packets]
        ids = [s["diaSourceId"] for s in src]
        objects = [str(rec["diaObject"]["diaObjectId"]) for _, _, rec in packets]
        assert frame.object_id.tolist() == objects
        np.testing.assert_array_equal(
            frame.reliability, [s["reliability"] for s in src]
        )
        np.testing.assert_array_equal(frame.mjd, [s["midpointMjdTai"] for s in src])
        assert frame.band.tolist() == [s["band"] for s in src]
    # the ids are Python ints from fastavro; int64 keeps every digit (no float)
    assert frame.alert_id.tolist() == ids
    assert max(ids) > 2**53  # float64 could not hold them
    assert frame.alert_id.is_unique


def test_cutout_sizes_and_nan_as_in_the_files(shipped):
    folder, packets, alerts = shipped
    _, h, w = alerts.image_shape
    for i, (_, _, rec) in enumerate(packets):
        shapes = set()
        for c, field in enumerate(CUTOUTS):
            raw, raw_var = read_cutout(stamp(rec[field]))
            shapes.add(raw.shape)
            out = alerts.images[i, c]
            if raw.shape == (h, w):
                np.testing.assert_array_equal(out, raw)
            elif raw.shape[0] >= h and raw.shape[1] >= w:  # Rubin: centre crop
                y0, x0 = raw.shape[0] // 2 - h // 2, raw.shape[1] // 2 - w // 2
                np.testing.assert_array_equal(out, raw[y0 : y0 + h, x0 : x0 + w])
            else:  # ZTF at the CCD edge: the whole cutout, padded with NaN
                assert np.isnan(out).sum() >= h * w - raw.size
                np.testing.assert_array_equal(
                    np.sort(out[np.isfinite(out)]), np.sort(raw[np.isfinite(raw)])
                )
            if raw_var is not None:
                y0, x0 = raw.shape[0] // 2 - h // 2, raw.shape[1] // 2 - w // 2
                np.testing.assert_array_equal(
                    alerts.variance[i, c], raw_var[y0 : y0 + h, x0 : x0 + w]
                )
        (shape,) = shapes  # the three cutouts of an alert share one shape
        row = alerts.frame.iloc[i]
        assert (row.cutout_height, row.cutout_width) == shape
        assert row.padded == (shape[0] < h or shape[1] < w)
    if folder == "ztf_alerts":
        # the clipped cutouts of README: 41x63, 45x63, 63x53
        clipped = alerts.frame.query("padded")
        assert len(clipped) == 3
        assert np.isnan(alerts.images[clipped.index]).any()


def test_fits_fast_path_equals_astropy_bit_for_bit(shipped):
    _, packets, _ = shipped
    n = 0
    for _, _, rec in packets:
        for field in CUTOUTS:
            data = stamp(rec[field])
            fast = read_fits_images(data)
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            with fits.open(io.BytesIO(data), ignore_missing_simple=True) as hdul:
                ref = {
                    ("PRIMARY" if k == 0 else hdu.name): np.array(hdu.data)
                    for k, hdu in enumerate(hdul)
                    if hdu.data is not None
                }
            assert list(fast) == list(ref)
            for name, want in ref.items():
                want = want.astype(want.dtype.newbyteorder("="))
                assert fast[name].dtype == want.dtype
                assert fast[name].shape == want.shape
                assert fast[name].tobytes() == want.tobytes()
                n += 1
    assert n >= len(packets) * 3


def test_rubin_variance_is_the_uncert_plane(rubin):
    _, alerts = rubin
    # the difference divided by its standard deviation has unit spread
    z = alerts.images[:, 2] / np.sqrt(alerts.variance[:, 2])
    assert 0.8 < np.nanmedian(np.nanstd(z, axis=(1, 2))) < 1.3
    assert np.all(alerts.variance[np.isfinite(alerts.variance)] >= 0)


def test_size_argument(ztf):
    _, alerts = ztf
    small = read_alerts(shared("ztf_alerts"), size=21)
    assert small.images.shape == (15, 3, 21, 21)
    full = alerts.images[~alerts.frame.padded.to_numpy()]
    np.testing.assert_array_equal(
        small.images[~alerts.frame.padded.to_numpy()], full[:, :, 21:42, 21:42]
    )
    wide = read_alerts(shared("ztf_alerts"), size=(65, 71))
    assert wide.images.shape == (15, 3, 65, 71)
    assert wide.frame.padded.all()
    np.testing.assert_array_equal(wide.images[:, :, 1:64, 4:67], alerts.images)


def test_mixed_surveys_in_one_read(ztf, rubin):
    (zp, za), (rp, ra) = ztf, rubin
    files = [zp[0][0], rp[0][0], zp[1][0]]
    mixed = read_alerts(files, size=30)
    assert mixed.frame.survey.tolist() == ["ztf", "rubin", "ztf"]
    assert mixed.variance.shape == (3, 3, 30, 30)
    assert np.isnan(mixed.variance[[0, 2]]).all()
    np.testing.assert_array_equal(mixed.variance[1], ra.variance[0])
    np.testing.assert_array_equal(mixed.images[0], za.images[0, :, 16:46, 16:46])


# --------------------------------------------------------------------------
# synthetic packets: centring, missing cutouts, corrupt data
# --------------------------------------------------------------------------


def fits_bytes(image, *, gz=False, extra=()):
    hdus = [fits.PrimaryHDU(image)]
    hdus += [fits.ImageHDU(data, name=name) for name, data in extra]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    data = buf.getvalue()
    return gzip.compress(data) if gz else data


def write_avro(path, schema, records):
    with open(path, "wb") as f:
        fastavro.writer(f, schema, records)
    return path


def ztf_packet(rec, image, *, xpos, ypos, candid):
    rec = {**rec, "candid": candid}
    rec["candidate"] = {**rec["candidate"], "xpos": xpos, "ypos": ypos}
    for field in CUTOUTS:
        rec[field] = {"fileName": "x.fits.gz", "stampData": fits_bytes(image, gz=True)}
    return rec


@pytest.mark.parametrize(
    "shape, xpos, ypos, centre",
    [
        ((63, 63), 500.0, 500.0, (31, 31)),  # full cutout: its centre
        ((41, 63), 500.0, 10.0, (9, 31)),  # clipped at the low edge in y
        ((63, 50), 20.0, 500.0, (31, 19)),  # clipped at the low edge in x
        ((45, 63), 500.0, 3070.0, (31, 31)),  # clipped at the high edge
    ],
)
def test_candidate_stays_at_the_centre(tmp_path, ztf, shape, xpos, ypos, centre):
    (path, schema, rec), *_ = ztf[0]
    image = np.zeros(shape, np.float32)
    image[centre] = 100.0
    packet = ztf_packet(rec, image, xpos=xpos, ypos=ypos, candid=1)
    alerts = read_alerts(write_avro(tmp_path / "a.avro", schema, [packet]), size=63)
    for c in range(3):
        assert np.unravel_index(np.nanargmax(alerts.images[0, c]), (63, 63)) == (
            31,
            31,
        )
        assert np.isfinite(alerts.images[0, c]).sum() == image.size
    assert alerts.frame.padded[0] == (shape != (63, 63))
    old = read_alert_cutouts(tmp_path / "a.avro", stamp_size=21)
    assert np.nanargmax(old.difference[0]) == 10 * 21 + 10  # the same convention


def test_missing_cutout_gives_nan_plane(tmp_path, rubin):
    packets, _ = rubin
    path, schema, rec = packets[0]
    missing = {**rec, "cutoutTemplate": None}
    file = write_avro(tmp_path / "m.avro", schema, [rec, missing])
    alerts = read_alerts(file)
    assert len(alerts.frame) == 2  # never a dropped alert
    assert alerts.frame.n_missing_cutouts.tolist() == [0, 1]
    assert np.isnan(alerts.images[1, 1]).all() and np.isnan(alerts.variance[1, 1]).all()
    np.testing.assert_array_equal(alerts.images[1, [0, 2]], alerts.images[0, [0, 2]])
    assert alerts.frame.record_index.tolist() == [0, 1]


def test_multi_alert_container_and_iter_alerts_are_lazy(tmp_path, archive):
    packets, whole = archive
    schema = packets[0][1]
    assert all(s == schema for _, s, _ in packets)  # one schema: one container
    big = write_avro(tmp_path / "all.avro", schema, [rec for _, _, rec in packets])
    one = read_alerts(big)
    bunches_equal(one, whole)
    assert one.frame.record_index.tolist() == list(range(498))
    # a garbage file after the container: batches come before the error
    bad = tmp_path / "zz.avro"
    bad.write_bytes(b"not an alert")
    batches = iter_alerts([big, bad], batch_size=64)
    first = next(batches)
    assert len(first.frame) == 64
    bunches_equal(first, _head(one, 64))
    with pytest.raises(AlertReadError, match="zz.avro"):
        list(batches)


def _head(bunch, n):
    from sklearn.utils import Bunch

    return Bunch(
        images=bunch.images[:n],
        variance=None if bunch.variance is None else bunch.variance[:n],
        frame=bunch.frame.iloc[:n],
    )


@pytest.mark.parametrize("batch_size", [1, 100, 498, 1000])
def test_iter_alerts_batches_concatenate_to_read_alerts(archive, batch_size):
    packets, whole = archive
    n = 30 if batch_size == 1 else len(packets)
    if n < len(packets):
        whole = read_alerts([p for p, _, _ in packets[:n]])
    paths = shared("ztf_alert_archive") if n == len(packets) else whole.frame.source
    batches = list(iter_alerts(paths, batch_size=batch_size))
    sizes = [len(b.frame) for b in batches]
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    assert sum(sizes) == n
    np.testing.assert_array_equal(
        np.concatenate([b.images for b in batches]), whole.images
    )
    frames_equal(
        pd.concat([b.frame for b in batches], ignore_index=True),
        whole.frame,
        ignore=(),
    )


def test_iter_alerts_rubin_sizes_follow_size_argument():
    folder = shared("rubin_alerts")
    whole = read_alerts(folder, size=40)
    batches = list(iter_alerts(folder, batch_size=5, size=40))
    np.testing.assert_array_equal(
        np.concatenate([b.variance for b in batches]), whole.variance
    )
    # without size, the first batch's commonest shape holds for all batches
    shapes = {b.images.shape[2:] for b in iter_alerts(folder, batch_size=7)}
    assert len(shapes) == 1


# --------------------------------------------------------------------------
# Parquet (as brokers keep alerts)
# --------------------------------------------------------------------------


def write_parquet(path, records, *, flatten=False, row_group_size=None):
    table = pa.Table.from_pylist(records)
    if flatten:
        table = table.flatten()  # candidate.jd, cutoutScience.stampData, ...
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def by_schema(packets):
    groups = defaultdict(list)
    for _, schema, rec in packets:
        groups[json.dumps(schema, sort_keys=True)].append(rec)
    return list(groups.values())


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("folder", ["ztf_alerts", "rubin_alerts"])
def test_parquet_reads_back_equal_to_avro(tmp_path, folder, flatten):
    packets = raw_packets(folder)
    files = [
        write_parquet(tmp_path / f"part-{k}.parquet", group, flatten=flatten)
        for k, group in enumerate(by_schema(packets))
    ]
    avro = read_alerts([p for group in by_schema_paths(packets) for p in group])
    table = read_alerts(tmp_path)  # a folder of Parquet files
    assert sorted(table.frame.source.unique()) == [str(f) for f in files]
    assert len(table.frame) == N_PACKETS[folder]
    bunches_equal(table, avro)


def by_schema_paths(packets):
    groups = defaultdict(list)
    for path, schema, _ in packets:
        groups[json.dumps(schema, sort_keys=True)].append(path)
    return list(groups.values())


def test_parquet_streaming_in_small_row_groups(tmp_path, archive):
    packets, _ = archive
    path = write_parquet(
        tmp_path / "a.parquet", [r for _, _, r in packets[:120]], row_group_size=7
    )
    batches = list(iter_alerts(path, batch_size=50))
    assert [len(b.frame) for b in batches] == [50, 50, 20]
    whole = read_alerts([p for p, _, _ in packets[:120]])
    np.testing.assert_array_equal(
        np.concatenate([b.images for b in batches]), whole.images
    )
    frame = pd.concat([b.frame for b in batches], ignore_index=True)
    assert frame.record_index.tolist() == list(range(120))
    frames_equal(frame, whole.frame)


# --------------------------------------------------------------------------
# Kafka messages in the Confluent wire format
# --------------------------------------------------------------------------


def confluent(schema_id, schema, record):
    buf = io.BytesIO()
    buf.write(b"\0" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


@pytest.mark.parametrize("folder", ["ztf_alerts", "rubin_alerts"])
def test_confluent_frames_read_back_equal(tmp_path, folder):
    packets = raw_packets(folder)
    ids = {}
    for _, schema, _ in packets:
        ids.setdefault(json.dumps(schema, sort_keys=True), 100 + len(ids))
    registry = {i: json.loads(s) for s, i in ids.items()}
    messages = [
        confluent(ids[json.dumps(s, sort_keys=True)], s, r) for _, s, r in packets
    ]
    avro = read_alerts([p for p, _, _ in packets])
    # one message per file
    files = []
    for k, msg in enumerate(messages):
        files.append(tmp_path / f"{k:03d}.bin")
        files[-1].write_bytes(msg)
    bunches_equal(read_alerts(files, schema=registry), avro)
    # messages given in memory, as a Kafka consumer holds them
    in_memory = read_alerts(messages, schema=registry)
    bunches_equal(in_memory, avro)
    assert in_memory.frame.source[0] == "<message 0>"
    # several messages back to back in one file
    (tmp_path / "all.bin").write_bytes(b"".join(messages))
    together = read_alerts(tmp_path / "all.bin", schema=registry)
    bunches_equal(together, avro)
    assert together.frame.record_index.tolist() == list(range(len(messages)))
    # a single schema for every message
    if len(registry) == 1:
        bunches_equal(read_alerts(messages, schema=registry[100]), avro)


def test_confluent_schema_from_avsc_file(tmp_path, ztf):
    packets, alerts = ztf
    _, schema, rec = packets[0]
    avsc = tmp_path / "alert.avsc"
    avsc.write_text(json.dumps(schema))
    got = read_alerts([confluent(7, schema, rec)], schema=avsc)
    bunches_equal(got, _head(alerts, 1))


def test_confluent_rubin_schemas_shipped_by_lsst_alert_packet(rubin):
    packets, alerts = rubin
    major, minor = alert_packet.get_latest_schema_version()
    schema = alert_packet.Schema.from_file().definition
    sample = Path(alert_packet.get_schema_path(major, minor)) / "sample_data"
    with open(sample / "fakeAlert.avro", "rb") as f:
        (record,) = list(fastavro.reader(f))
    schema_id = major * 100 + minor
    plain = confluent(schema_id, schema, record)  # the sample has no cutouts
    _, _, shipped = packets[0]
    with_cutouts = {**record, **{k: shipped[k] for k in CUTOUTS}}
    got = read_alerts([plain, confluent(schema_id, schema, with_cutouts)])
    assert got.frame.alert_id.tolist() == [record["diaSource"]["diaSourceId"]] * 2
    assert got.frame.n_missing_cutouts.tolist() == [3, 0]
    assert np.isnan(got.images[0]).all() and np.isnan(got.variance[0]).all()
    np.testing.assert_array_equal(got.images[1], alerts.images[0])
    np.testing.assert_array_equal(got.variance[1], alerts.variance[0])
    with pytest.raises(AlertReadError, match="schema id 4242"):
        read_alerts([b"\0" + (4242).to_bytes(4, "big") + b"\0\0"])


# --------------------------------------------------------------------------
# corrupt, truncated and foreign files
# --------------------------------------------------------------------------


@pytest.fixture
def damaged(tmp_path, ztf):
    packets, _ = ztf
    good = [p for p, _, _ in packets[:3]]
    data = good[0].read_bytes()
    truncated = tmp_path / "truncated.avro"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.avro"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    empty = tmp_path / "empty.avro"
    empty.write_bytes(b"")
    _, schema, rec = packets[0]
    bad = {**rec, "cutoutScience": {"fileName": "x", "stampData": b"SIMPLE  =  T"}}
    bad_fits = write_avro(tmp_path / "badfits.avro", schema, [rec, bad, rec])
    return good, {
        "truncated": (truncated, "truncated"),
        "garbage": (garbage, "not an Avro container"),
        "empty": (empty, "empty"),
        "badfits": (bad_fits, "alert 1: cutoutScience: truncated header"),
    }


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "badfits"])
def test_damaged_file_raises_a_named_error(damaged, kind):
    good, cases = damaged
    path, reason = cases[kind]
    with pytest.raises(AlertReadError) as info:
        read_alerts([*good, path])
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and reason in str(info.value)
    assert info.value.source == str(path) and reason in info.value.reason
    copy = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries
    assert (copy.source, copy.reason, str(copy)) == (
        info.value.source,
        info.value.reason,
        str(info.value),
    )


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "badfits"])
def test_damaged_file_skipped_with_a_warning(damaged, kind):
    good, cases = damaged
    path, reason = cases[kind]
    with pytest.warns(AlertReadWarning, match=reason):
        alerts = read_alerts([good[0], path, *good[1:]], on_error="skip")
    ((source, why),) = alerts.skipped
    assert source == str(path) and reason in why
    kept = 3 + (2 if kind == "badfits" else 0)  # only the bad alert is skipped
    assert len(alerts.frame) == kept
    reference = read_alerts(good)
    np.testing.assert_array_equal(alerts.images[[0, -2, -1]], reference.images)


def test_truncated_container_keeps_the_alerts_before_the_break(tmp_path, ztf):
    packets, alerts = ztf
    _, schema, rec = packets[0]
    path = write_avro(tmp_path / "two.avro", schema, [rec, rec])
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.warns(AlertReadWarning, match="after 1 alert"):
        got = read_alerts(path, on_error="skip")
    assert len(got.frame) == 1 and len(got.skipped) == 1
    np.testing.assert_array_equal(got.images[0], alerts.images[0])


def test_truncated_parquet(tmp_path, ztf):
    packets, _ = ztf
    path = write_parquet(tmp_path / "a.parquet", [r for _, _, r in packets[:3]])
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(AlertReadError, match="a.parquet"):
        read_alerts(path)


def test_skipped_files_reach_iter_alerts_batches(damaged):
    good, cases = damaged
    garbage, empty = cases["garbage"][0], cases["empty"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlertReadWarning)
        batches = list(
            iter_alerts(
                [good[0], garbage, *good[1:], empty], batch_size=2, on_error="skip"
            )
        )
        assert [len(b.frame) for b in batches] == [2, 1]
        assert [[s for s, _ in b.skipped] for b in batches] == [
            [str(garbage)],
            [str(empty)],
        ]
        # files skipped after the last alert come in a batch of their own
        batches = list(iter_alerts([*good[:2], garbage], batch_size=2, on_error="skip"))
        assert [len(b.frame) for b in batches] == [2, 0]
        assert [len(b.skipped) for b in batches] == [0, 1]
        assert batches[1].images.shape == (0, 3, 63, 63)


def test_not_an_alert(tmp_path):
    schema = {"type": "record", "name": "x", "fields": [{"name": "a", "type": "int"}]}
    path = write_avro(tmp_path / "x.avro", schema, [{"a": 1}])
    with pytest.raises(AlertReadError, match="neither a ZTF alert"):
        read_alerts(path)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"size": 0}, ValueError, "size"),
        ({"size": (3, 4, 5)}, ValueError, "size"),
        ({"size": 2.5}, ValueError, "size"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"schema": 3}, TypeError, "schema"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    (tmp_path / "a.avro").write_bytes(b"")
    with pytest.raises(error, match=match):
        read_alerts(tmp_path / "a.avro", **kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_alerts(tmp_path / "nope.avro")
    with pytest.raises(ValueError, match="No alert files"):
        read_alerts(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        read_alerts([])
    with pytest.raises(ValueError, match="batch_size"):
        iter_alerts(tmp_path, batch_size=0)


# --------------------------------------------------------------------------
# the FITS reader on its own
# --------------------------------------------------------------------------


def _scaled_int_hdu(bitpix, bzero, bscale, blank=None):
    dtype = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}[bitpix]
    info = np.iinfo(dtype)
    raw = np.random.default_rng(bitpix).integers(
        info.min, info.max, (7, 5), dtype=dtype, endpoint=True
    )
    if blank is not None:
        raw[0, :2] = blank
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BZERO"], hdu.header["BSCALE"] = bzero, bscale
    if blank is not None:
        hdu.header["BLANK"] = blank
    buf = io.BytesIO()
    fits.HDUList([hdu]).writeto(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "bitpix, bzero, bscale, blank",
    [
        (16, 0, 1, None),
        (16, 100.5, 0.25, -32768),
        (16, 32768, 1, None),  # unsigned 16-bit convention
        (32, 0, 1, None),
        (32, -3.0, 1e-3, 7),
        (32, 2147483648, 1, None),
        (8, 0, 1, None),
        (8, -128, 1, None),  # signed-byte convention
        (8, 1.5, 2.0, 255),
        (64, 0, 1, None),
        (64, 10.0, 0.5, None),
    ],
)
def test_fits_integer_scaling_like_astropy(bitpix, bzero, bscale, blank):
    data = _scaled_int_hdu(bitpix, bzero, bscale, blank)
    with fits.open(io.BytesIO(data)) as hdul:
        want = np.array(hdul[0].data)
    got = read_fits_images(data)["PRIMARY"]
    want = want.astype(want.dtype.newbyteorder("="))
    assert got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()


def test_fits_extensions_by_name_and_float_scaling():
    image = np.arange(12, dtype=np.float64).reshape(3, 4)
    var = np.full((3, 4), 2.0, np.float32)
    data = fits_bytes(image, extra=[("UNCERT", var), ("PSFIMAGE", np.eye(5))])
    got = read_fits_images(data)
    assert list(got) == ["PRIMARY", "UNCERT", "PSFIMAGE"]
    np.testing.assert_array_equal(got["PRIMARY"], image)
    assert read_fits_images(data, names=["uncert"]).keys() == {"UNCERT"}
    img, v = read_cutout(data)
    np.testing.assert_array_equal(v, var)
    hdu = fits.PrimaryHDU(np.ones((2, 2), np.float32))
    hdu.header["BSCALE"], hdu.header["BZERO"] = 3.0, 1.0
    buf = io.BytesIO()
    hdu.writeto(buf)
    np.testing.assert_array_equal(read_fits_images(buf.getvalue())["PRIMARY"], 4.0)


def test_fits_compressed_image_goes_through_astropy():
    image = np.random.default_rng(0).normal(size=(30, 30)).astype(np.float32)
    hdul = fits.HDUList(
        [fits.PrimaryHDU(), fits.CompImageHDU(image, compression_type="GZIP_1")]
    )
    buf = io.BytesIO()
    hdul.writeto(buf)
    img, var = read_cutout(buf.getvalue())
    with fits.open(io.BytesIO(buf.getvalue())) as ref:
        np.testing.assert_array_equal(img, ref[1].data)
    assert var is None


@pytest.mark.parametrize(
    "cut, match",
    [(100, "truncated header"), (2880 + 100, "truncated data"), (0, "no image")],
)
def test_fits_errors(cut, match):
    data = fits_bytes(np.ones((63, 63), np.float32))
    if cut == 0:
        data = fits_bytes(np.ones((0,), np.float32))[:2880]
    else:
        data = data[:cut]
    with pytest.raises(FITSError, match=match):
        read_cutout(data)


# --------------------------------------------------------------------------
# optional engines
# --------------------------------------------------------------------------


def test_importing_datasets_loads_no_optional_engine():
    code = (
        "import sys, types, pathlib;"
        # import the subpackage without sk_covvae/__init__ (the torch estimator)
        "pkg = types.ModuleType('sk_covvae');"
        f"pkg.__path__ = [{str(Path(__file__).resolve().parents[1] / 'sk_covvae')!r}];"
        "sys.modules['sk_covvae'] = pkg;"
        "import sk_covvae.datasets;"
        # (pandas and pyarrow are not checked: scikit-learn imports them)
        "print(sorted(m for m in ('fastavro', 'astropy', 'lsst', 'torch') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_missing_engine_names_the_extra(tmp_path, ztf, monkeypatch):
    packets, _ = ztf
    path = write_parquet(tmp_path / "a.parquet", [packets[0][2]])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pyarrow: pip install sk_covvae\[astro\]"):
        read_alerts(path)
