"""The scoring job: ``sk_covvae.scoring.score_alerts`` and ``covvae score``.

Real packets of ``../shared/data`` (skipped when absent), tiny models fitted
once per module; the ids are checked against the packets read by fastavro
alone, the scores against the pipeline run in this process.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from conftest import TINY_MODEL, shared, tiny_pipeline

from sk_covvae import CovarianceVAE
from sk_covvae.cli import main
from sk_covvae.datasets import AlertReadError, AlertReadWarning, read_alerts
from sk_covvae.preprocessing import StampPreprocessor
from sk_covvae.scoring import (
    METADATA_KEY,
    ModelFileError,
    load_model,
    model_input_shape,
    read_metadata,
    score_alerts,
    stamps_to_X,
)

fastavro = pytest.importorskip("fastavro")
pd = pytest.importorskip("pandas")
pq = pytest.importorskip("pyarrow.parquet")

# Two epochs: the tiny models' latent spaces may collapse, which is no matter here.
pytestmark = pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")

N_ZTF = 40  # packets of the ZTF archive used by most tests (of 498)


def packet_ids(paths):
    """ZTF ``candid`` / Rubin ``diaSourceId`` of every packet, by fastavro."""
    ids = []
    for path in paths:
        with open(path, "rb") as f:
            for rec in fastavro.reader(f):
                if "candidate" in rec:
                    ids.append(rec["candid"])
                else:
                    ids.append(rec["diaSource"]["diaSourceId"])
    return ids


@pytest.fixture(scope="module")
def ztf_files(tmp_path_factory):
    """A folder linking the first N_ZTF packets of the ZTF archive."""
    archive = shared("ztf_alert_archive")
    folder = tmp_path_factory.mktemp("ztf")
    for path in sorted(archive.glob("*.avro"))[:N_ZTF]:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def ztf_model(tmp_path_factory, ztf_files):
    """A tiny difference-plane pipeline fitted on the ZTF triplets, joblib file."""
    X = np.load(shared("ztf_triplets", "ztf_triplets.npz"))["X"][:200]
    pipe = tiny_pipeline((3, 63, 63), crop=(15, 15), channels=[2], normalize="l2")
    pipe.fit(X.reshape(len(X), -1))
    path = tmp_path_factory.mktemp("model") / "model.joblib"
    joblib.dump(pipe, path)
    return path, pipe


@pytest.fixture(scope="module")
def ztf_scored(tmp_path_factory, ztf_model, ztf_files):
    out = tmp_path_factory.mktemp("scores") / "scores.parquet"
    summary = score_alerts(ztf_model[0], [ztf_files], out, batch_size=16, latents=True)
    return summary, out


def test_ids_are_the_packets_candids(ztf_scored, ztf_files):
    summary, out = ztf_scored
    table = pd.read_parquet(out)
    files = sorted(ztf_files.glob("*.avro"))
    assert table["alert_id"].dtype == np.int64
    assert table["alert_id"].tolist() == packet_ids(files)
    assert table["source"].tolist() == [str(f) for f in files]
    assert set(table["survey"]) == {"ztf"}
    assert table["object_id"].str.startswith("ZTF").all()
    assert summary.n_alerts == summary.n_files == N_ZTF and not summary.skipped
    assert summary.seconds > 0 and summary.rate > 0


def test_scores_and_latents_equal_the_pipeline_in_process(ztf_scored, ztf_model):
    _, out = ztf_scored
    pipe = ztf_model[1]
    table = pd.read_parquet(out)
    alerts = read_alerts(sorted(table["source"]), size=63)
    X = alerts.images.reshape(len(alerts.images), -1)
    scores = table["score"].to_numpy()
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, -pipe.score_samples(X))
    Z = table[["latent_0", "latent_1"]].to_numpy()
    np.testing.assert_array_equal(Z, pipe.transform(X).astype(np.float64))


def test_metadata_names_model_method_inputs(ztf_scored, ztf_model, ztf_files):
    _, out = ztf_scored
    meta = read_metadata(out)
    model_path = ztf_model[0]
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert meta["model"]["sha256"] == digest
    assert meta["model"]["path"] == str(model_path)
    assert meta["method"] == "elbo" and meta["latents"] is True
    assert meta["inputs"] == [str(ztf_files)]
    assert meta["n_alerts"] == meta["n_files"] == N_ZTF
    assert meta["skipped"] == []
    assert meta["stamp_shape"] == [3, 63, 63]
    raw = pq.read_metadata(out).metadata[METADATA_KEY]
    assert b"time" not in raw.lower() and json.loads(raw) == meta


def test_rerun_and_other_batch_sizes_write_the_same_bytes(
    ztf_scored, ztf_model, ztf_files, tmp_path
):
    _, out = ztf_scored
    again = tmp_path / "again.parquet"
    score_alerts(ztf_model[0], [ztf_files], again, batch_size=7, latents=True)
    assert again.read_bytes() == Path(out).read_bytes()


def test_files_are_sorted_whatever_the_order_given(ztf_model, ztf_files, tmp_path):
    files = sorted(ztf_files.glob("*.avro"))[:5]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    score_alerts(ztf_model[0], files, a)
    score_alerts(ztf_model[0], files[::-1], b)
    assert pd.read_parquet(a)["alert_id"].tolist() == packet_ids(files)
    # the inputs are recorded as given, so only the tables are compared
    assert pd.read_parquet(a).equals(pd.read_parquet(b))


def test_other_methods(ztf_model, ztf_files, tmp_path):
    files = sorted(ztf_files.glob("*.avro"))[:6]
    out = tmp_path / "t.parquet"
    score_alerts(ztf_model[0], files, out, method="typicality")
    pipe = ztf_model[1]
    X = read_alerts(files, size=63).images.reshape(len(files), -1)
    expected = pipe[-1].anomaly_score(pipe[:-1].transform(X), method="typicality")
    np.testing.assert_array_equal(pd.read_parquet(out)["score"], expected)
    assert read_metadata(out)["method"] == "typicality"


@pytest.fixture
def with_corrupt(ztf_files, tmp_path):
    """Five good packets and a truncated copy of a sixth."""
    folder = tmp_path / "in"
    folder.mkdir()
    files = sorted(ztf_files.glob("*.avro"))
    for path in files[:5]:
        (folder / path.name).symlink_to(path)
    bad = folder / "zz_truncated.avro"
    data = files[5].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return folder, files[:5], bad


def test_corrupt_file_is_skipped_and_listed(ztf_model, with_corrupt, tmp_path):
    folder, good, bad = with_corrupt
    out = tmp_path / "s.parquet"
    with pytest.warns(AlertReadWarning, match="zz_truncated"):
        summary = score_alerts(ztf_model[0], [folder], out, on_error="skip")
    assert pd.read_parquet(out)["alert_id"].tolist() == packet_ids(good)
    assert [s for s, _ in summary.skipped] == [str(bad)]
    (entry,) = read_metadata(out)["skipped"]
    assert entry["source"] == str(bad) and "truncated" in entry["reason"]
    assert "zz_truncated" in str(summary)


def test_corrupt_file_raises_naming_it(ztf_model, with_corrupt, tmp_path):
    folder, _, bad = with_corrupt
    out = tmp_path / "r.parquet"
    with pytest.raises(AlertReadError, match="zz_truncated"):
        score_alerts(ztf_model[0], [folder], out, on_error="raise")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_rubin_six_channel_layout(tmp_path):
    """Images then variance planes: the SNR of the difference plane."""
    folder = shared("rubin_alerts")
    alerts = read_alerts(folder, size=30)
    X = np.concatenate([alerts.images, alerts.variance], axis=1)
    X = X.reshape(len(X), -1)
    pipe = tiny_pipeline(
        (6, 30, 30), crop=(15, 15), channels=[2], variance_channels=[5]
    )
    pipe.fit(X)
    model = tmp_path / "rubin.joblib"
    joblib.dump(pipe, model)
    out = tmp_path / "rubin.parquet"
    summary = score_alerts(model, [folder], out)
    table = pd.read_parquet(out)
    assert table["alert_id"].tolist() == packet_ids(sorted(folder.glob("*.avro")))
    assert set(table["survey"]) == {"rubin"} and summary.n_alerts == 36
    np.testing.assert_array_equal(table["score"], -pipe.score_samples(X))
    assert np.isfinite(table["score"]).all()


def test_stamps_to_X_layout():
    images = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    variance = images + 100
    X = stamps_to_X(images, variance, (6, 2, 2))
    assert X.shape == (2, 24)
    np.testing.assert_array_equal(X[1, :12], images[1].ravel())
    np.testing.assert_array_equal(X[1, 12:], variance[1].ravel())
    assert np.isnan(stamps_to_X(images, None, (6, 2, 2))[:, 12:]).all()
    with pytest.raises(ValueError, match=r"\(3, 2, 2\) do not fit.*\(3, 5, 5\)"):
        stamps_to_X(images, None, (3, 5, 5))


def test_covvae_save_files_are_recognised_and_shape_mismatch_named(tmp_path):
    X = np.random.RandomState(0).normal(size=(64, 36))
    path = tmp_path / "m.covvae"
    CovarianceVAE(**TINY_MODEL).fit(X).save(path)
    model, sha = load_model(path)
    assert isinstance(model, CovarianceVAE) and len(sha) == 64
    with pytest.raises(ValueError, match=r"\(1, 6, 6\): 1 channel\(s\)"):
        model_input_shape(model)
    pipe_shape = tiny_pipeline((3, 5, 5))
    pipe_shape[0].fit(np.zeros((1, 75)))
    assert model_input_shape(pipe_shape[0]) == (3, 5, 5)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"not a model at all", "neither a CovarianceVAE.save file nor a joblib"),
    ],
)
def test_bad_model_file_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.joblib"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=match):
        load_model(path)


def test_model_without_anomaly_score_is_refused(tmp_path):
    path = tmp_path / "prep.joblib"
    joblib.dump(StampPreprocessor((3, 5, 5)), path)
    with pytest.raises(ModelFileError, match="no anomaly_score"):
        load_model(path)


@pytest.mark.parametrize(
    "option, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"on_error": "ignore"}, "on_error"),
        ({"engine": "ray"}, "engine"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"torch_threads": "all"}, "torch_threads"),
        ({"torch_threads": True}, "torch_threads"),
    ],
)
def test_bad_options(ztf_model, ztf_files, tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        score_alerts(ztf_model[0], [ztf_files], tmp_path / "x.parquet", **option)


def test_torch_threads_hold_for_the_call_only(
    ztf_scored, ztf_model, ztf_files, tmp_path, monkeypatch
):
    import torch

    from sk_covvae import scoring

    seen, score_last = [], scoring._score_last

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        time.sleep(0.2)  # the reader gets well ahead: it reads 16 alerts
        return score_last(*args, **kwargs)

    monkeypatch.setattr(scoring, "_score_last", spy)
    before = torch.get_num_threads()
    out = tmp_path / "t.parquet"
    score_alerts(
        ztf_model[0], [ztf_files], out, batch_size=16, latents=True, torch_threads=1
    )
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    one_thread = pd.read_parquet(out)
    seen.clear()
    score_alerts(
        ztf_model[0],
        [ztf_files],
        out,
        batch_size=16,
        latents=True,
        torch_threads="auto",
    )
    # all cores but one while the reader reads (it holds the third batch
    # until the first is taken), all once it has read the last (40 alerts)
    cores = os.cpu_count() or 1
    assert len(seen) == 3 and seen[0] == max(1, cores - 1) and seen[-1] == cores
    assert seen == sorted(seen)  # one switch at most
    pd.testing.assert_frame_equal(pd.read_parquet(out), one_thread)  # same bits
    seen.clear()
    score_alerts(ztf_model[0], [ztf_files], out, batch_size=16)
    assert set(seen) == {before}


def test_the_local_job_reads_one_inference_pass_at_a_time(
    ztf_scored, ztf_model, ztf_files, tmp_path, monkeypatch
):
    """Batches of the model's inference pass when ``batch_size`` is larger
    (the model starts on each as soon as it is read); the same file."""
    from sk_covvae import scoring
    from sk_covvae.datasets import _readers

    pipe = ztf_model[1]
    assert scoring._read_size(pipe, 1000) == pipe[-1]._block_rows() == 256
    assert scoring._read_size(pipe, 100) == 100
    assert scoring._read_size(pipe[:-1], 1000) == 1000  # no inference passes
    sizes, iter_alerts = [], _readers._iter_alerts

    def spy(paths, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return iter_alerts(paths, batch_size, *args, **kwargs)

    monkeypatch.setattr(_readers, "_iter_alerts", spy)
    monkeypatch.setattr(type(pipe[-1]), "_block_rows", lambda self: 12)
    out = tmp_path / "passes.parquet"
    score_alerts(ztf_model[0], [ztf_files], out, batch_size=1000, latents=True)
    assert sizes == [12]
    monkeypatch.undo()
    again = tmp_path / "again.parquet"
    score_alerts(ztf_model[0], [ztf_files], again, batch_size=1000, latents=True)
    assert again.read_bytes() == Path(ztf_scored[1]).read_bytes()


def test_the_local_job_preprocesses_in_its_reader_thread(
    ztf_scored, ztf_model, ztf_files, tmp_path, monkeypatch
):
    """The pipeline's steps before the model run beside it, in the reader
    thread; the model's thread only scores. The same file."""
    import threading

    from sk_covvae import scoring

    where, preprocess = [], scoring._preprocess

    def spy(model, X):
        where.append(threading.current_thread().name)
        return preprocess(model, X)

    monkeypatch.setattr(scoring, "_preprocess", spy)
    out = tmp_path / "pre.parquet"
    score_alerts(ztf_model[0], [ztf_files], out, batch_size=16, latents=True)
    assert where == ["sk_covvae-reader"] * 3  # 16 + 16 + 8 alerts
    assert out.read_bytes() == Path(ztf_scored[1]).read_bytes()


def test_only_the_cutouts_the_model_reads_are_decoded(
    ztf_model, ztf_files, tmp_path, monkeypatch
):
    from sk_covvae.datasets import _readers

    decoded, read_cutout = [], _readers._read_cutout

    def spy(data):
        decoded.append(data)
        return read_cutout(data)

    monkeypatch.setattr(_readers, "_read_cutout", spy)
    summary = score_alerts(ztf_model[0], [ztf_files], tmp_path / "d.parquet")
    # the pipeline keeps the difference plane (channels=[2]): one per alert
    assert len(decoded) == summary.n_alerts == N_ZTF
    stamps = []
    for path in sorted(ztf_files.iterdir()):
        with open(path, "rb") as f:
            stamps.append(next(fastavro.reader(f))["cutoutDifference"]["stampData"])
    assert decoded == stamps


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def test_cli_score_writes_the_same_file(ztf_scored, ztf_model, ztf_files, tmp_path):
    _, out = ztf_scored
    cli_out = tmp_path / "cli.parquet"
    args = ["score", str(ztf_model[0]), str(ztf_files), "--out", str(cli_out)]
    assert main([*args, "--batch-size", "16", "--latents"]) == 0
    assert cli_out.read_bytes() == Path(out).read_bytes()


def test_cli_score_summary_and_skip(ztf_model, with_corrupt, tmp_path, capsys):
    folder, good, bad = with_corrupt
    out = tmp_path / "s.parquet"
    args = ["score", str(ztf_model[0]), str(folder), "--out", str(out)]
    assert main([*args, "--on-error", "skip"]) == 0
    text = capsys.readouterr().out
    assert f"{len(good)} alerts from {len(good) + 1} file(s)" in text
    assert "1 skipped" in text and str(bad) in text
    assert main([*args, "--on-error", "raise"]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and str(bad) in err


def test_cli_score_bad_model_and_no_input(ztf_model, tmp_path, capsys):
    bad_model = tmp_path / "bad.joblib"
    bad_model.write_bytes(b"garbage")
    empty = tmp_path / "only_bad"
    empty.mkdir()
    (empty / "x.avro").write_bytes(b"Obj\x01broken")
    out = str(tmp_path / "o.parquet")
    assert main(["score", str(bad_model), str(empty), "--out", out]) == 2
    assert "bad model file" in capsys.readouterr().err
    model = str(ztf_model[0])
    assert main(["score", model, str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "nowhere" in capsys.readouterr().err
    status = main(["score", model, str(empty), "--out", out, "--on-error", "skip"])
    assert status == 1
    assert "no readable alert" in capsys.readouterr().err


def test_cli_score_torch_threads(ztf_model, ztf_files, tmp_path, capsys):
    args = ["score", str(ztf_model[0]), str(ztf_files), "--out"]
    assert main([*args, str(tmp_path / "a.parquet"), "--torch-threads", "1"]) == 0
    with pytest.raises(SystemExit) as info:
        main([*args, str(tmp_path / "b.parquet"), "--torch-threads", "0"])
    assert info.value.code == 2
    assert "--torch-threads" in capsys.readouterr().err


def test_cli_score_needs_out(ztf_model, capsys):
    with pytest.raises(SystemExit) as info:
        main(["score", str(ztf_model[0]), os.devnull])
    assert info.value.code == 2
    assert "--out" in capsys.readouterr().err
