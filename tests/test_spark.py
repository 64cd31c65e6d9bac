"""Spark: the score UDF of ``sk_covvae.spark`` in a ``local[2]`` session.

The table is made here from the shipped ZTF packets (cutouts as the gzipped
FITS bytes of the packets, as brokers keep them); the scores are compared
with the pipeline run in this process on ``read_alerts`` of the same files.
One Spark session (one JVM) for the module, bound to 127.0.0.1.
"""

import os
import shutil
import sys

import numpy as np
import pytest
from conftest import shared

from sk_covvae.datasets import read_alerts
from sk_covvae.scoring import score_alerts

if shutil.which("java") is None:
    pytest.skip("pyspark needs a Java runtime", allow_module_level=True)
pyspark = pytest.importorskip("pyspark")
fastavro = pytest.importorskip("fastavro")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

from sk_covvae.spark import make_score_udf  # noqa: E402

# Two epochs: the tiny models' latent spaces may collapse, which is no matter here.
# pyspark warns (FutureWarning) that it does not fully support pandas 3; the
# tests check what the UDF needs.
pytestmark = [
    pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning"),
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas"),
]

N_PACKETS = 40
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    # the JVM binds to the loopback interface only
    saved = os.environ.get("SPARK_LOCAL_IP")
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = (
        SparkSession.builder.master("local[2]")
        .appName("sk_covvae-tests")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "16")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if saved is None:
        os.environ.pop("SPARK_LOCAL_IP", None)
    else:
        os.environ["SPARK_LOCAL_IP"] = saved


@pytest.fixture(scope="module")
def packets():
    return sorted(shared("ztf_alert_archive").glob("*.avro"))[:N_PACKETS]


@pytest.fixture(scope="module")
def table(tmp_path_factory, packets):
    """A Parquet table of the packets: ids, positions, cutouts as bytes and
    as ``{fileName, stampData}`` structs, as brokers keep them."""
    rows = []
    for path in packets:
        with open(path, "rb") as f:
            for rec in fastavro.reader(f):
                row = {
                    "candid": rec["candid"],
                    "objectId": rec["objectId"],
                    "ypos": rec["candidate"]["ypos"],
                    "xpos": rec["candidate"]["xpos"],
                }
                for name in CUTOUTS:
                    row[name] = rec[name]["stampData"]
                    row[f"{name}_struct"] = rec[name]
                rows.append(row)
    path = tmp_path_factory.mktemp("spark") / "alerts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def model(ztf_pipeline_file):
    path, pipe, _ = ztf_pipeline_file
    return path, pipe


@pytest.fixture(scope="module")
def expected(model, packets):
    alerts = read_alerts(packets, size=63)
    X = alerts.images.reshape(len(alerts.images), -1)
    return alerts.frame["alert_id"].to_numpy(), -model[1].score_samples(X), X


def test_udf_scores_equal_the_in_process_scores(spark, table, model, expected):
    score = make_score_udf(model[0])
    df = spark.read.parquet(str(table))
    rows = df.select(
        "candid",
        score(*CUTOUTS, "ypos", "xpos").alias("score"),
        score(*(f"{c}_struct" for c in CUTOUTS), "ypos", "xpos").alias("struct"),
    ).collect()
    ids, scores, _ = expected
    np.testing.assert_array_equal([r.candid for r in rows], ids)
    got = np.array([r.score for r in rows])
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, scores)
    np.testing.assert_array_equal([r.struct for r in rows], scores)


def test_udf_scores_equal_the_score_job(spark, table, model, packets, tmp_path):
    out = tmp_path / "job.parquet"
    score_alerts(model[0], packets, out)
    job = pd.read_parquet(out)
    score = make_score_udf(model[0])
    df = spark.read.parquet(str(table))
    rows = df.select("candid", score(*CUTOUTS, "ypos", "xpos").alias("s")).collect()
    np.testing.assert_array_equal([r.candid for r in rows], job["alert_id"])
    np.testing.assert_array_equal([r.s for r in rows], job["score"])


def test_udf_latents(spark, table, model, expected):
    latents = make_score_udf(model[0], output="latents")
    df = spark.read.parquet(str(table))
    rows = df.select("candid", latents(*CUTOUTS, "ypos", "xpos").alias("z")).collect()
    ids, _, X = expected
    np.testing.assert_array_equal([r.candid for r in rows], ids)
    Z = np.array([r.z for r in rows])
    np.testing.assert_array_equal(Z, model[1].transform(X).astype(np.float64))


def test_bad_options_and_model(tmp_path, model):
    with pytest.raises(ValueError, match="output"):
        make_score_udf(model[0], output="both")
    with pytest.raises(ValueError, match="on_error"):
        make_score_udf(model[0], on_error="skip")
    bad = tmp_path / "bad.joblib"
    bad.write_bytes(b"garbage")
    from sk_covvae.scoring import ModelFileError

    with pytest.raises(ModelFileError, match="bad.joblib"):
        make_score_udf(bad)
