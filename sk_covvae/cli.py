"""The ``covvae`` command line: argument parsing and output files only.

``covvae compare`` runs :func:`sk_covvae.experiments.run_comparison` and writes
``results.json``, ``report.md`` and PNG figures to ``--out``. ``covvae figures
DIR`` redraws the figures of a run saved with ``--save-models``. Run
``covvae compare --help`` for the options.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

#: Settings of a plain ``covvae compare`` (simulated stamps, a few minutes on
#: a 2-core CPU) and of ``--quick`` (seconds).
DEFAULTS = {
    "stamps": {"n_samples": 2000, "n_components": [10], "max_epochs": 30},
    "fashion-mnist": {"n_samples": 10000, "n_components": [50], "max_epochs": 10},
}
QUICK = {
    "n_samples": 240,
    "n_components": [4],
    "max_epochs": 2,
    "channels": (4, 8),
    "hidden_units": 32,
    "batch_size": 64,
}

_FIGURES = {
    "reconstructions.png": "test images, decoder means and samples per model "
    "(paper Figs. 6-7)",
    "covariance.png": "precision and covariance matrices of one test image, and "
    "the correlation of its centre pixel (paper Fig. 5)",
    "latent_sweep.png": "test -E[log p(x|z)] against latent size (paper Fig. 4)",
    "latent_projection.png": "test latent means projected on 2 principal "
    "components, coloured by class",
    "roc.png": "ROC curves: RandomForest real/bogus and anomaly detection",
    "training.png": "validation negative ELBO per epoch",
}


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


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
    cmp_ = sub.add_parser(
        "compare",
        help="fit the three decoders and write results.json, report.md, figures",
        description="Fit spherical, diagonal and banded CovarianceVAEs with the "
        "same encoder and latent size on a stratified 60/25/15 train/validation/"
        "test split (early stopping on validation) and compare them on the test "
        "part. Defaults: simulated stamps, "
        + ", ".join(f"{k}={v}" for k, v in DEFAULTS["stamps"].items())
        + "; fashion-mnist: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULTS["fashion-mnist"].items())
        + ".",
    )
    cmp_.add_argument(
        "--dataset",
        choices=("stamps", "fashion-mnist"),
        default="stamps",
        help="data set (default: stamps)",
    )
    cmp_.add_argument(
        "--n-components",
        type=_positive_int,
        nargs="+",
        metavar="K",
        help="latent size(s); several give the latent sweep and its figure",
    )
    cmp_.add_argument(
        "--max-epochs", type=_positive_int, metavar="E", help="epoch cap per fit"
    )
    cmp_.add_argument(
        "--patience",
        type=_positive_int,
        default=20,
        help="early-stopping patience in epochs (default: 20, as the paper)",
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
        help="mini-batch size (default: 32 for stamps, 64 for fashion-mnist)",
    )
    cmp_.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="Adam learning rate"
    )
    cmp_.add_argument(
        "--min-scale",
        type=_positive_float,
        default=1e-3,
        help="lower bound on the decoder's per-pixel scale, in units of the "
        "estimator's global data scale scale_ (default: 1e-3)",
    )
    cmp_.add_argument(
        "--max-scale",
        type=_positive_float,
        default=10.0,
        help="upper bound on the decoder's per-pixel scale, in the same units "
        "(default: 10); raise it for data with extreme pixels (saturated stars)",
    )
    cmp_.add_argument(
        "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N"
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
    fig = sub.add_parser(
        "figures", help="redraw the figures of a run saved with --save-models"
    )
    fig.add_argument("dir", help="output folder of `covvae compare --save-models`")
    return parser


def _settings(args):
    """Resolve defaults: explicit options > --quick > per-dataset defaults."""
    base = dict(DEFAULTS[args.dataset])
    extra = {"batch_size": 32 if args.dataset == "stamps" else 64}
    if args.quick:
        base.update({k: QUICK[k] for k in ("n_samples", "n_components", "max_epochs")})
        extra.update({k: QUICK[k] for k in ("channels", "hidden_units", "batch_size")})
    if args.n_samples is not None:
        base["n_samples"] = args.n_samples
    if args.n_components is not None:
        base["n_components"] = list(dict.fromkeys(args.n_components))
    if args.max_epochs is not None:
        base["max_epochs"] = args.max_epochs
    if args.batch_size is not None:
        extra["batch_size"] = args.batch_size
    extra.update(
        lr=args.lr,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        device=args.device,
    )
    return base, extra


def _hardware():
    """Where the run was made: :func:`sk_covvae._show_versions.provenance`.

    The first keys are the ones the report quotes; the rest of the
    provenance follows them.
    """
    from sk_covvae._show_versions import provenance

    prov = provenance()
    info = {
        "platform": prov["platform"],
        "processor": prov["processor"] or prov["machine"],
        "cpu_count": prov["cpu_count"],
        "torch_threads": prov["torch_threads"],
        "torch": prov["torch"],
        "python": prov["python"],
    }
    if prov["cuda_devices"]:
        info["gpu"] = prov["cuda_devices"][0]
    info["sk_covvae"] = _source_version(prov)
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    info.update({k: v for k, v in prov.items() if k not in info})
    return info


def _source_version(info):
    """Package version, plus the git commit when run from a checkout."""
    from sk_covvae._show_versions import describe_source

    return describe_source(info)


def _log(message):
    print(message, flush=True)


def _compare(args):
    from sk_covvae import experiments

    settings, params = _settings(args)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["covvae", *args.argv])
    _log(f"covvae compare: dataset={args.dataset} {settings} {params} -> {out}/")
    start = time.perf_counter()
    data = experiments.load_dataset(
        args.dataset, n_samples=settings["n_samples"], random_state=0
    )
    result = experiments.run_comparison(
        data,
        n_components=settings["n_components"],
        seeds=args.seed,
        max_epochs=settings["max_epochs"],
        patience=args.patience,
        log=_log,
        **params,
    )
    wall = time.perf_counter() - start
    models, test_index = result.pop("models"), result.pop("test_index")
    config = {
        "command": command,
        "dataset": args.dataset,
        "description": data["description"],
        "n_samples": int(len(data["y"])),
        "n_components": settings["n_components"],
        "seeds": args.seed,
        "max_epochs": settings["max_epochs"],
        "patience": args.patience,
        "quick": args.quick,
        "estimator_params": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()
        },
        "split_fractions": list(experiments.SPLIT_FRACTIONS),
        "split_sizes": result["split"],
    }
    document = {
        "config": config,
        "hardware": _hardware(),
        "wall_time_s": wall,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        **result,
    }
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    _log(f"wrote {out / 'results.json'}")
    if args.save_models:
        import joblib

        joblib.dump({"models": models, "test_index": test_index}, out / "models.joblib")
        _log(f"wrote {out / 'models.joblib'}")
    figures = []
    if not args.no_figures:
        figures = _write_figures(out, document, data, models, test_index)
    (out / "report.md").write_text(_report(document, figures))
    _log(f"wrote {out / 'report.md'}; total wall time {wall:.1f}s")
    return 0


def _figures(args):
    import joblib

    from sk_covvae import experiments

    out = Path(args.dir)
    try:
        document = json.loads((out / "results.json").read_text())
        saved = joblib.load(out / "models.joblib")
    except FileNotFoundError as exc:
        print(
            f"covvae figures: {exc.filename} not found; run `covvae compare "
            "--save-models --out DIR` first.",
            file=sys.stderr,
        )
        return 2
    config = document["config"]
    data = experiments.load_dataset(
        config["dataset"], n_samples=config["n_samples"], random_state=0
    )
    test_index = {int(k): v for k, v in saved["test_index"].items()}
    figures = _write_figures(out, document, data, saved["models"], test_index)
    (out / "report.md").write_text(_report(document, figures))
    _log(f"wrote {out / 'report.md'}")
    return 0


def _write_figures(out, document, data, models, test_index):
    """Draw every figure that applies; a failing figure is reported, not fatal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from sk_covvae import plotting
    except ImportError:
        _log("matplotlib is not installed: no figures (pip install matplotlib).")
        return []
    config = document["config"]
    ks = config["n_components"]
    k = 50 if 50 in ks else ks[0]
    seed = config["seeds"][0]
    X, y = np.asarray(data["X"]), np.asarray(data["y"])
    test = test_index[seed]
    chosen = {cov: m for (cov, kk, s), m in models.items() if kk == k and s == seed}
    shape = tuple(data["image_shape"])
    runs = document["runs"]
    jobs = {
        "reconstructions.png": lambda: plotting.plot_reconstructions(
            chosen, X[test], image_shape=shape, random_state=seed
        ),
        "covariance.png": lambda: plotting.plot_precision_covariance(
            chosen, X[test][0], image_shape=shape
        ),
        "latent_projection.png": lambda: plotting.plot_latent_projection(
            chosen, X[test], y[test], target_names=data["target_names"]
        ),
        "training.png": lambda: plotting.plot_training_curves(
            [r for r in runs if r["n_components"] == k and r["seed"] == seed]
        ),
    }
    if len(ks) > 1:
        jobs["latent_sweep.png"] = lambda: plotting.plot_latent_sweep(
            document["summary"]
        )
    if any("rf_roc" in r or "anomaly_roc" in r for r in runs):
        jobs["roc.png"] = lambda: plotting.plot_roc(
            [r for r in runs if r["n_components"] == k and r["seed"] == seed],
            [
                b
                for b in document["baselines"]
                if b["n_components"] in (k, None) and b["seed"] == seed
            ],
        )
    written = []
    for name, draw in jobs.items():
        try:
            plotting.save_figure(draw(), out / name)
        except Exception as exc:  # a figure must not lose a long run's results
            _log(f"figure {name} failed: {type(exc).__name__}: {exc}")
            continue
        written.append(name)
        _log(f"wrote {out / name}")
    return written


# -------------------------------------------------------------------- report
def _fmt(cell, spec):
    if cell is None:
        return "–"
    if cell["n"] > 1:
        return f"{cell['mean']:{spec}} ± {cell['std']:{spec}}"
    return f"{cell['mean']:{spec}}"


def _table(rows, columns):
    from sk_covvae._show_versions import markdown_table

    def cell(spec):
        # summary cells are {mean, std, n}; the rest (names, sizes) as they are
        def write(value):
            return _fmt(value, spec) if isinstance(value, dict) else str(value)

        return write

    return markdown_table(
        rows, [(title, key, cell(spec)) for title, key, spec in columns]
    )


def _report(document, figures):
    config, hw = document["config"], document["hardware"]
    summary = document["summary"]
    runs = document["runs"]
    seeds = config["seeds"]
    spread = " (mean ± std over seeds " + ", ".join(map(str, seeds)) + ")"
    lines = [
        f"# covvae compare: {config['dataset']}",
        "",
        f"Command: `{config['command']}`",
        "",
        f"Data: {config['description']}; stratified split "
        f"{config['split_sizes']} (fractions {config['split_fractions']}). Models "
        f"fitted on train, early stopping on validation (patience "
        f"{config['patience']}, at most {config['max_epochs']} epochs), "
        "metrics on test.",
        "",
        f"sk_covvae {hw.get('sk_covvae', '?')}. "
        f"Hardware: {hw['processor']}, {hw['cpu_count']} CPUs, torch "
        f"{hw['torch']} with {hw['torch_threads']} threads"
        + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
        + f"; device {runs[0]['device'] if runs else '?'}. Wall time "
        f"{document['wall_time_s']:.0f} s"
        + (
            f" (load average at the end {hw['load_average']})"
            if "load_average" in hw
            else ""
        )
        + ".",
        "",
        f"Estimator parameters: `{config['estimator_params']}`.",
        "",
        "## Density on the test split" + (spread if len(seeds) > 1 else ""),
        "",
        "-E[log p(x|z)] is the metric of Dorta et al. (2018), nats per image, "
        "lower is better; -ELBO bounds -log p(x) from above. "
        + (
            "Bits/dim: negative ELBO of dequantized images (x*255 + u)/256, "
            "u ~ U(0, 1), in bits per pixel (8 = uniform)."
            if config["dataset"] == "fashion-mnist"
            else "Bits/dim is not reported: stamps are continuous (noise units), "
            "not quantized levels."
        ),
        "",
    ]
    model_rows = [
        r for r in summary if r["method"] in ("spherical", "diagonal", "banded")
    ]
    lines.append(
        _table(
            model_rows,
            [
                ("model", "method", ".0f"),
                ("K", "n_components", ".0f"),
                ("-E[log p(x|z)]", "neg_recon_ll", ".1f"),
                ("-ELBO", "neg_elbo", ".1f"),
                ("median -ELBO", "neg_elbo_median", ".1f"),
                ("bits/dim", "bits_per_dim", ".3f"),
                ("MSE/pixel", "mse", ".3g"),
                ("epochs", "epochs", ".0f"),
                ("best epoch", "best_epoch", ".0f"),
                ("fit time (s)", "fit_time_s", ".0f"),
            ],
        )
    )
    if any("rf_roc_auc" in r for r in summary):
        lines += [
            "",
            "## Real/bogus RandomForest on features"
            + (spread if len(seeds) > 1 else ""),
            "",
            "RandomForestClassifier (200 trees) fitted on the train split's "
            "features, scored on the test split.",
            "",
            _table(
                [r for r in summary if "rf_roc_auc" in r],
                [
                    ("features", "method", ".0f"),
                    ("K", "n_components", ".0f"),
                    ("ROC AUC", "rf_roc_auc", ".4f"),
                    ("accuracy", "rf_accuracy", ".4f"),
                ],
            ),
        ]
    if any("anomaly_auroc" in r for r in summary):
        rows = [r for r in summary if "anomaly_auroc" in r]
        types = sorted(rows[0].get("anomaly_auroc_by_type", {}))
        table_rows = []
        for r in rows:
            row = dict(r)
            row.update(r.get("anomaly_auroc_by_type", {}))
            table_rows.append(row)
        lines += [
            "",
            "## Anomaly detection" + (spread if len(seeds) > 1 else ""),
            "",
            "A second model per covariance is fitted on the real stamps of the "
            "train split only (early stopping on the real stamps of validation); "
            "-score_samples ranks the test split, bogus = positive. AUROC overall "
            "and per artefact type (that type against the test reals).",
            "",
            _table(
                table_rows,
                [("model", "method", ".0f"), ("K", "n_components", ".0f")]
                + [("all bogus", "anomaly_auroc", ".3f")]
                + [(t, t, ".3f") for t in types],
            ),
        ]
    if figures:
        lines += ["", "## Figures", ""]
        for name in figures:
            lines += [f"![{name}]({name})", "", f"*{name}*: {_FIGURES[name]}.", ""]
    return "\n".join(lines).rstrip() + "\n"


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
        Exit status: 0 on success, 2 on a usage error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["compare"]
    args = _build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command == "compare":
            return _compare(args)
        return _figures(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"covvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
