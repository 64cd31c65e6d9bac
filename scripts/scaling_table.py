"""Throughput of the scoring job: one process vs Dask (2 workers) vs Spark local[2].

Usage::

    OMP_NUM_THREADS=1 python scripts/scaling_table.py [--copies 4] [--no-spark]

Scores the same alerts with the same model file (the pipeline of
``benchmarks/bench_scoring.py``: a 21x21 crop of the difference plane and
``CovarianceVAE()``'s default network) in three ways and prints a Markdown
table for ``docs/scaling.md``:

- ``score_alerts(engine='local', torch_threads='auto')``: this process,
  as ``covvae score`` runs it;
- ``score_alerts(engine='dask')``: a ``LocalCluster`` of 2 worker processes
  (one thread each) on 127.0.0.1, started before the timing;
- Spark ``local[2]``: the UDF of ``sk_covvae.spark.make_score_udf`` over a
  Parquet table of the same alerts (cutout bytes and positions), written to
  Parquet; the session is started and warmed up before the timing.

Inputs: the shipped ZTF packets (``../shared/data/ztf_alert_archive``, one
alert per file) and ``--copies`` Avro files holding all of them each. Each
figure is the best of ``--repeats`` runs after one untimed run (workers
warm: torch imported, model loaded), so start-up costs are left out and
reported separately.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_scoring import (  # noqa: E402
    archive_files,
    make_model,
    write_multi_alert_file,
)


def _best(fn, repeats):
    fn()  # warm-up: imports, model loads, JIT
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _spark_table(files, path, copies):
    """A Parquet table of the alerts as brokers keep them."""
    import fastavro
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for f in files:
        with open(f, "rb") as fh:
            for rec in fastavro.reader(fh):
                row = {
                    "candid": rec["candid"],
                    "ypos": rec["candidate"]["ypos"],
                    "xpos": rec["candidate"]["xpos"],
                }
                for name in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
                    row[name] = rec[name]["stampData"]
                rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows * copies), path, row_group_size=256)
    return len(rows) * copies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--no-spark", action="store_true")
    args = parser.parse_args(argv)

    from sk_covvae import show_versions
    from sk_covvae.scoring import score_alerts

    files = archive_files()
    if not files:
        raise SystemExit("the shipped packets (../shared/data) are absent")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # --copies multi-alert files, each holding every packet once: Dask
        # partitions by files, so it gets one task per file.
        multi = [tmp / f"multi_{i}.avro" for i in range(args.copies)]
        n_multi = sum(write_multi_alert_file(files, path) for path in multi)
        model = tmp / "model.joblib"
        make_model(model)
        inputs = {
            f"{len(files)} one-alert files": (files, len(files)),
            f"{len(multi)} files of {len(files)} alerts": (multi, n_multi),
        }

        def add(engine, name, n, seconds, startup=None):
            rows.append((engine, name, n, seconds, n / seconds, startup))
            print(f"{engine:24s} {name:28s} {n / seconds:8.0f} alerts/s", flush=True)

        for name, (paths, n) in inputs.items():
            out = tmp / "local.parquet"

            def job(paths=paths, out=out):  # as covvae score runs it
                score_alerts(model, paths, out, torch_threads="auto")

            add("one process", name, n, _best(job, args.repeats))

        if not args.no_dask:
            from distributed import Client, LocalCluster

            t0 = time.perf_counter()
            with (
                LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    host="127.0.0.1",
                    dashboard_address=None,
                ) as cluster,
                Client(cluster) as client,
            ):
                startup = time.perf_counter() - t0
                for name, (paths, n) in inputs.items():
                    out = tmp / "dask.parquet"

                    def job(paths=paths, out=out):
                        score_alerts(
                            model,
                            paths,
                            out,
                            engine="dask",
                            scheduler=client,
                            files_per_task=max(1, len(paths) // 8),
                        )

                    add("Dask, 2 workers", name, n, _best(job, args.repeats), startup)

        if not args.no_spark:
            from pyspark.sql import SparkSession

            from sk_covvae.spark import make_score_udf

            table = tmp / "alerts.parquet"
            n_table = _spark_table(files, table, args.copies)
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            t0 = time.perf_counter()
            spark = (
                SparkSession.builder.master("local[2]")
                .config("spark.driver.host", "127.0.0.1")
                .config("spark.driver.bindAddress", "127.0.0.1")
                .config("spark.ui.enabled", "false")
                .config("spark.pyspark.python", sys.executable)
                .config("spark.sql.shuffle.partitions", "2")
                .getOrCreate()
            )
            spark.sparkContext.setLogLevel("ERROR")
            startup = time.perf_counter() - t0
            score = make_score_udf(model)
            df = spark.read.parquet(str(table)).repartition(2)
            cutouts = ("cutoutScience", "cutoutTemplate", "cutoutDifference")

            def spark_job():
                scored = df.select("candid", score(*cutouts, "ypos", "xpos"))
                scored.write.mode("overwrite").parquet(str(tmp / "spark_out"))

            name = f"Parquet table of {n_table} alerts"
            add(
                "Spark local[2]", name, n_table, _best(spark_job, args.repeats), startup
            )
            spark.stop()

    print()
    print("| engine | input | alerts | seconds | alerts/s | start-up (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for engine, name, n, s, rate, startup in rows:
        up = "-" if startup is None else f"{startup:.0f}"
        print(f"| {engine} | {name} | {n} | {s:.2f} | {rate:.0f} | {up} |")
    print()
    print(
        f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python "
        + " ".join(["scripts/scaling_table.py", *(argv or sys.argv[1:])])
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average at the end (1, 5, 15 min): {load}")
    show_versions()


if __name__ == "__main__":
    main()
