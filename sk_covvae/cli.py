"""The ``covvae`` command line: argument parsing and dispatch only.

``covvae compare`` runs :func:`sk_covvae.experiments.run_comparison` and
:func:`sk_covvae.report.write_run` writes ``results.json``, ``report.md`` and
PNG figures to ``--out``. ``covvae figures DIR`` redraws the figures of a run
saved with ``--save-models`` (:func:`sk_covvae.report.redraw`). Run ``covvae
compare --help`` for the options. Options not given fall back on the
protocol's defaults (:data:`sk_covvae.experiments.PROTOCOL_DEFAULTS`) and the
estimator's own.
"""

import argparse
import sys
import time

from sklearn.utils._param_validation import InvalidParameterError

__all__ = ["main"]

#: Settings of ``--quick`` (seconds), over the protocol's defaults.
QUICK = {
    "n_samples": 240,
    "n_components": [4],
    "max_epochs": 2,
    "channels": (4, 8),
    "hidden_units": 32,
    "batch_size": 64,
}
# Options passed to CovarianceVAE when given.
_ESTIMATOR_OPTIONS = (
    "batch_size",
    "lr",
    "mean_epochs",
    "min_scale",
    "max_scale",
    "device",
)


def _integer_at_least(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise argparse.ArgumentTypeError(f"{value} is not a {kind} integer")
    return value


def _positive_int(text):
    return _integer_at_least(text, 1)


def _non_negative_int(text):
    return _integer_at_least(text, 0)


def _device(text):
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here")
    return text


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="covvae",
        description="Structured-covariance VAEs: compare spherical, diagonal and "
        "banded decoders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_compare_parser(sub)
    _add_figures_parser(sub)
    _add_score_parser(sub)
    return parser


def _add_compare_parser(sub):
    """The ``compare`` sub-command: the study's settings, then how to run it."""
    cmp_ = sub.add_parser(
        "compare",
        help="fit the three decoders and write results.json, report.md, figures",
        description="Fit spherical, diagonal and banded CovarianceVAEs with the "
        "same encoder and latent size on a stratified 60/25/15 train/validation/"
        "test split (early stopping on validation) and compare them on the test "
        "part. Options not given take the protocol's defaults per data set "
        "(sk_covvae.experiments.PROTOCOL_DEFAULTS) and CovarianceVAE's own.",
    )
    cmp_.set_defaults(func=_compare)
    _add_study_options(cmp_)
    _add_run_options(cmp_)


def _add_study_options(cmp_):
    """What ``compare`` fits: data, latent sizes, schedule, seeds, estimator."""
    cmp_.add_argument(
        "--dataset",
        choices=("stamps", "fashion-mnist", "ztf"),
        default="stamps",
        help="data set (default: stamps); ztf: real ZTF triplets from --data, "
        "labelled by the survey's drb score and split by object",
    )
    cmp_.add_argument(
        "--data",
        dest="data_path",
        metavar="PATH",
        help="with --dataset ztf: a ztf_triplets.npz file, or alert files or a "
        "folder of them",
    )
    cmp_.add_argument(
        "--stamp-channels",
        choices=("all", "difference"),
        help="with --dataset ztf: science, template and difference (default), "
        "or the difference alone",
    )
    cmp_.add_argument(
        "--crop",
        type=_positive_int,
        metavar="N",
        help="with --dataset ztf: side of the centred crop (default: 21)",
    )
    cmp_.add_argument(
        "--n-components",
        type=_positive_int,
        nargs="+",
        metavar="K",
        help="latent size(s); several give the latent sweep and its figure",
    )
    cmp_.add_argument(
        "--max-epochs",
        type=_positive_int,
        metavar="E",
        help="epoch cap of each fit's last training stage",
    )
    cmp_.add_argument(
        "--mean-epochs",
        type=_non_negative_int,
        metavar="E",
        help="epoch cap of the mean stage of the diagonal and banded models "
        "(CovarianceVAE's mean_epochs; 0: none)",
    )
    cmp_.add_argument(
        "--patience",
        type=_positive_int,
        help="early-stopping patience in epochs (default: the estimator's, 20, "
        "as the paper)",
    )
    cmp_.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        metavar="S",
        help="seed(s) of split and initialisation; several give mean +- std",
    )
    cmp_.add_argument(
        "--n-samples",
        type=_positive_int,
        metavar="N",
        help="stamps to simulate / Fashion-MNIST images to subsample",
    )
    cmp_.add_argument(
        "--batch-size",
        type=_positive_int,
        help="mini-batch size (default: the protocol's per data set)",
    )
    cmp_.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    cmp_.add_argument(
        "--min-scale",
        type=_positive_float,
        help="lower bound on the decoder's per-pixel scale, in units of the "
        "estimator's global data scale scale_",
    )
    cmp_.add_argument(
        "--max-scale",
        type=_positive_float,
        help="upper bound on the decoder's per-pixel scale, in the same units; "
        "raise it for data with extreme pixels (saturated stars)",
    )


def _add_run_options(cmp_):
    """Where and how ``compare`` runs, and what it writes."""
    cmp_.add_argument(
        "--device", type=_device, help="torch device: auto, cpu, cuda, cuda:N"
    )
    cmp_.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1; these small networks gain little "
        "from more, and oversubscribed threads on a busy CPU are many times "
        "slower)",
    )
    cmp_.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        help="seeds run in parallel, one worker process each (default: one "
        "after the other)",
    )
    cmp_.add_argument(
        "--out", default="covvae-results", metavar="DIR", help="output folder"
    )
    cmp_.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings (seconds): "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    cmp_.add_argument("--no-figures", action="store_true", help="write no PNG figures")
    cmp_.add_argument(
        "--save-models",
        action="store_true",
        help="also write models.joblib, for `covvae figures DIR`",
    )


def _add_figures_parser(sub):
    """The ``figures`` sub-command: redraw the figures of a saved run."""
    fig = sub.add_parser(
        "figures", help="redraw the figures of a run saved with --save-models"
    )
    fig.add_argument("dir", help="output folder of `covvae compare --save-models`")
    fig.set_defaults(func=_figures)


def _add_score_parser(sub):
    """The ``score`` sub-command: anomaly scores of alert files to Parquet."""
    score = sub.add_parser(
        "score",
        help="score alert files with a model file and write a Parquet table",
        description="Read alert files (ZTF / Rubin Avro, Kafka frames, Parquet) "
        "or folders of them in batches, score every alert with MODEL (a fitted "
        "Pipeline or CovarianceVAE saved with joblib, or a CovarianceVAE.save "
        "file) and write alert ids, object ids and scores to one Parquet file "
        "(sk_covvae.scoring.score_alerts).",
    )
    score.add_argument("model", metavar="MODEL", help="model file")
    score.add_argument(
        "inputs", metavar="INPUT", nargs="+", help="alert files or folders"
    )
    score.add_argument(
        "--out", required=True, metavar="OUT.parquet", help="Parquet file to write"
    )
    score.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="alerts read and scored at once (default: 1000)",
    )
    score.add_argument(
        "--method",
        default="elbo",
        metavar="M",
        help="anomaly_score method (default: elbo, i.e. -score_samples)",
    )
    score.add_argument(
        "--latents", action="store_true", help="also write the latent features"
    )
    score.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="stop at an unreadable file, or skip it and list it in the "
        "summary and the file's metadata (default: raise)",
    )
    score.add_argument(
        "--engine",
        choices=("local", "dask"),
        default="local",
        help="this process, or a dask.distributed cluster (default: local)",
    )
    score.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --engine dask: the scheduler's address (default: a "
        "LocalCluster of 2 worker processes on 127.0.0.1)",
    )
    score.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="torch device of a CovarianceVAE.save model (default: cpu)",
    )
    score.add_argument(
        "--torch-threads",
        type=_torch_threads,
        default="auto",
        metavar="N",
        help="threads torch scores with (default: auto, all cores but one "
        "while the reader thread reads, all once it is done)",
    )
    score.set_defaults(func=_score)


def _torch_threads(value):
    """``--torch-threads``: 'auto' or a positive int."""
    return value if value == "auto" else _positive_int(value)


def _progress_bar():
    """A progress callback and its closer: tqdm on a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None:

        def line(n_alerts, done, total):
            print(
                f"\r{done}/{total} files, {n_alerts} alerts",
                end="",
                file=sys.stderr,
                flush=True,
            )

        return line, lambda: print(file=sys.stderr)
    bar = tqdm(total=None, unit="file", file=sys.stderr, dynamic_ncols=True)

    def update(n_alerts, done, total):
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix_str(f"{n_alerts} alerts", refresh=False)

    return update, bar.close


def _score(args):
    import warnings

    from sk_covvae import scoring
    from sk_covvae._allocator import maybe_retain_freed_memory
    from sk_covvae.datasets import AlertReadError, AlertReadWarning

    maybe_retain_freed_memory()
    if args.scheduler is not None and args.engine != "dask":
        raise _UsageError("--scheduler needs --engine dask")
    progress, close = _progress_bar()
    try:
        with warnings.catch_warnings():
            # the summary lists every skipped file with its reason
            warnings.simplefilter("ignore", AlertReadWarning)
            try:
                summary = scoring.score_alerts(
                    args.model,
                    args.inputs,
                    args.out,
                    batch_size=args.batch_size,
                    method=args.method,
                    latents=args.latents,
                    on_error=args.on_error,
                    engine=args.engine,
                    scheduler=args.scheduler,
                    device=args.device,
                    torch_threads=args.torch_threads,
                    progress=progress,
                )
            finally:
                close()  # the bar ends before the summary or the error
    except scoring.ModelFileError as exc:
        raise _UsageError(f"bad model file {exc}") from exc
    except AlertReadError as exc:
        print(
            f"covvae score: error: cannot read {exc} (--on-error skip skips "
            "unreadable files)",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:
        raise _UsageError(str(exc)) from exc
    _log(f"covvae score: {summary}")
    if summary.n_alerts == 0:
        print(
            "covvae score: error: no readable alert in " + " ".join(args.inputs),
            file=sys.stderr,
        )
        return 1
    return 0


def _settings(args):
    """What to run: explicit options over ``--quick`` over the defaults.

    Returns the keyword arguments of ``load_dataset`` (``n_samples``), of
    ``run_comparison`` (``n_components``, ``max_epochs``, ``patience``) and
    the estimator's parameters that were set; everything else is left to
    the protocol's and the estimator's defaults.
    """
    quick = QUICK if args.quick else {}
    given = {k: v for k, v in vars(args).items() if v is not None}
    pick = {**quick, **given}
    data = {"n_samples": pick.get("n_samples")}
    run = {k: pick[k] for k in ("n_components", "max_epochs", "patience") if k in pick}
    if "n_components" in run:
        run["n_components"] = list(dict.fromkeys(run["n_components"]))
    params = {k: pick[k] for k in _ESTIMATOR_OPTIONS if k in pick}
    params.update({k: quick[k] for k in ("channels", "hidden_units") if k in quick})
    return data, run, params


def _compare(args):
    import torch

    from sk_covvae import experiments, report
    from sk_covvae._allocator import maybe_retain_freed_memory

    # A program may set process-wide state: one thread (these small networks
    # gain little from more, and oversubscribed threads on a busy CPU are
    # many times slower) and glibc keeping freed memory for reuse.
    torch.set_num_threads(args.threads)
    maybe_retain_freed_memory()
    data_kw, run_kw, params = _settings(args)
    data_options = _data_options(args)
    start = time.perf_counter()
    data = experiments.load_dataset(
        args.dataset, random_state=0, **data_kw, **data_options
    )
    defaults = experiments.PROTOCOL_DEFAULTS[args.dataset]
    run_kw = {**{k: defaults[k] for k in ("n_components", "max_epochs")}, **run_kw}
    _log(
        f"covvae compare: {data['description']}; seeds {args.seed}; "
        + ", ".join(f"{k}={v}" for k, v in {**run_kw, **params}.items())
        + f"; other settings: the defaults -> {args.out}/"
    )
    result = experiments.run_comparison(
        data, seeds=args.seed, n_jobs=args.jobs, log=_log, **run_kw, **params
    )
    config = {
        "command": " ".join(["covvae", *args.argv]),
        "dataset": args.dataset,
        "description": data["description"],
        "n_samples": int(len(data["y"])),
        "data_options": {k: str(v) for k, v in data_options.items()},
        "data_counts": data.get("counts"),
        "n_components": list(run_kw["n_components"]),
        "seeds": args.seed,
        "max_epochs": run_kw["max_epochs"],
        "patience": run_kw.get("patience", _estimator_default("patience")),
        "quick": args.quick,
        "estimator_params": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()
        },
        "split_fractions": list(experiments.SPLIT_FRACTIONS),
        "split_sizes": result["split"],
    }
    report.write_run(
        args.out,
        config,
        result,
        data,
        wall_time_s=time.perf_counter() - start,
        figures=not args.no_figures,
        save_models=args.save_models,
        log=_log,
    )
    return 0


def _data_options(args):
    """``load_dataset``'s options for real data (``--data`` and friends)."""
    given = {
        "path": args.data_path,
        "channels": args.stamp_channels,
        "crop": args.crop,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.dataset != "ztf":
        if given:
            raise _UsageError(
                "--data, --stamp-channels and --crop apply to --dataset ztf only"
            )
        return {}
    if "path" not in given:
        raise _UsageError(
            "--dataset ztf needs --data PATH (a ztf_triplets.npz file, or alert "
            "files or a folder of them)"
        )
    return given


def _estimator_default(name):
    from sk_covvae import CovarianceVAE

    return CovarianceVAE().get_params()[name]


def _figures(args):
    from sk_covvae import report

    try:
        report.redraw(args.dir, log=_log)
    except FileNotFoundError as exc:
        raise _UsageError(
            f"{exc.filename} not found; run `covvae compare --save-models "
            "--out DIR` first."
        ) from exc
    return 0


def _log(message):
    print(message, flush=True)


class _UsageError(Exception):
    """An error in what the user asked for: reported in one line, exit 2."""


def main(argv=None):
    """Entry point of the ``covvae`` console script.

    Parameters
    ----------
    argv : list of str or None, default=None
        Arguments without the program name; ``None`` reads ``sys.argv``.
        No arguments at all run ``covvae compare`` with its defaults.

    Returns
    -------
    int
        Exit status: 0 on success, 2 on a usage error (a bad option value, a
        missing data set or folder). Other errors are bugs and propagate
        with their traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["compare"]
    args = _build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (_UsageError, InvalidParameterError, FileNotFoundError) as exc:
        print(f"covvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
