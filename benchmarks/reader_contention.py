"""How much a reader thread slows the model that scores beside it.

The scoring job (``covvae score``, :func:`sk_covvae.scoring.score_alerts`)
reads the next alerts in a thread while the model scores, torch on all
cores but one. The two threads share the interpreter's lock (GIL): the
reader's Python (Avro records, rows, batches) holds it, gunzip and the
compiled Avro walk let it go, and the model needs it between its torch
operations. This script measures the model (the benchmark's pipeline, on
one torch thread) in three settings, for a few seconds each:

- alone;
- beside a thread that reads a multi-alert file over and over as the job
  does (:func:`~sk_covvae.datasets.iter_alerts` machinery, the difference
  cutouts only, image arrays reused);
- beside a thread that only gunzips the same difference cutouts and copies
  their images (little Python between GIL-free calls).

It prints (and :func:`main` returns) the model's rate, the share of the wall
time its thread spent on a CPU (the rest it waited, mostly for the GIL), and
the reader's rate::

    python benchmarks/reader_contention.py [--seconds 6]

Needs the shipped ZTF packets (``../shared/data/ztf_alert_archive``) and the
``astro`` extra. Run as a script, it first raises glibc's malloc thresholds,
as the benchmark does; :func:`main` sets torch to one thread for its run.
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import joblib
import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: import the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_scoring import (  # noqa: E402
    archive_files,
    make_model,
    write_multi_alert_file,
)


def model_rate(pipe, X, seconds):
    """Stamps/s of ``pipe.score_samples`` and the CPU share of this thread."""
    n, wall, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall < seconds:
        pipe.score_samples(X)
        n += len(X)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return n / wall, cpu / wall


def job_reader(path, stop, count):
    """Read ``path`` as the scoring job does, over and over."""
    from sk_covvae.datasets._readers import _iter_alerts

    while not stop.is_set():
        batches, buffers = _iter_alerts(
            [path],
            256,
            (63, 63),
            "raise",
            None,
            ["difference"],
            reuse=True,
            frame=False,
        )
        for batch in batches:
            count[0] += len(batch.images)
            buffers.give(batch.images)
            if stop.is_set():
                return


def gunzip_reader(cutouts, stop, count):
    """Only gunzip the cutouts and copy their images into an array."""
    from sk_covvae.datasets._fits import _read_cutout

    out = np.empty((256, 63, 63), dtype=np.float32)
    while not stop.is_set():
        for i, data in enumerate(cutouts):
            image, _ = _read_cutout(data)
            h, w = image.shape
            out[i % 256, :h, :w] = image
            count[0] += 1
            if stop.is_set():
                return


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--copies", type=int, default=4)
    args = parser.parse_args(argv)
    files = archive_files()
    if not files:
        sys.exit("the shipped ZTF packets (../shared/data) are missing")
    from sk_covvae.datasets import _readers

    threads, fast_after = torch.get_num_threads(), _readers._FAST_AFTER
    torch.set_num_threads(1)
    _readers._FAST_AFTER = 0  # the compiled decoder from the first record
    try:
        return _measure(files, args)
    finally:
        torch.set_num_threads(threads)
        _readers._FAST_AFTER = fast_after


def _measure(files, args):
    import fastavro

    from sk_covvae.datasets import iter_alerts

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "multi.avro"
        write_multi_alert_file(files, path, copies=args.copies)
        make_model(Path(tmp) / "model.joblib")
        pipe = joblib.load(Path(tmp) / "model.joblib")  # as the job loads it
        stamps = next(iter_alerts(files, batch_size=len(files), size=63)).images
        X = np.tile(stamps.reshape(len(stamps), -1), (2, 1))
        cutouts = []
        for f in files:
            with open(f, "rb") as fh:
                for record in fastavro.reader(fh):
                    cutouts.append(bytes(record["cutoutDifference"]["stampData"]))
        model_rate(pipe, X, min(args.seconds, 1.0))  # warm up
        print(f"torch {torch.__version__}, one torch thread; {len(X)} stamps a call")
        print(f"{'setting':<34} {'model/s':>8} {'cpu/wall':>9} {'reader/s':>9}")
        rate, share = model_rate(pipe, X, args.seconds)
        rows = [("model alone", rate, share, None)]
        print(f"{'model alone':<34} {rate:8.0f} {share:9.2f} {'':>9}")
        for label, target, arg in [
            ("beside the job's reader", job_reader, path),
            ("beside gunzip and copy only", gunzip_reader, cutouts),
        ]:
            stop, count = threading.Event(), [0]
            thread = threading.Thread(target=target, args=(arg, stop, count))
            thread.start()
            time.sleep(min(args.seconds, 1.0))  # past the reader's start-up
            start, t0 = count[0], time.perf_counter()
            rate, share = model_rate(pipe, X, args.seconds)
            read = (count[0] - start) / (time.perf_counter() - t0)
            stop.set()
            thread.join()
            rows.append((label, rate, share, read))
            print(f"{label:<34} {rate:8.0f} {share:9.2f} {read:9.0f}")
    return rows


if __name__ == "__main__":
    from sk_covvae._allocator import maybe_retain_freed_memory

    maybe_retain_freed_memory()  # as the benchmark and the command line do
    main()
