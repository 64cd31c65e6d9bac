"""Output of a comparison run: ``results.json``, ``report.md`` and figures.

:func:`write_run` turns what :func:`sk_covvae.experiments.run_comparison`
returns into the files of ``covvae compare``; :func:`redraw` redraws the
figures and the report of a run saved with its models. The report's first
table describes the typical image (medians over the test images): a few
extreme images (saturated stars on survey stamps) can move a mean by orders of
magnitude, so means come second, labelled as such.
"""

import datetime
import json
import os
from pathlib import Path

import numpy as np

from sk_covvae._show_versions import describe_source, markdown_table, provenance

__all__ = ["FIGURES", "featured_n_components", "redraw", "render_report", "write_run"]

#: Figures of a run, with the caption the report gives each.
FIGURES = {
    "reconstructions.png": "test images, decoder means and samples per model "
    "(paper Figs. 6-7)",
    "covariance.png": "precision and covariance matrices of one test image, and "
    "the correlation of its centre pixel (paper Fig. 5)",
    "latent_sweep.png": "test -E[log p(x|z)] against latent size (paper Fig. 4)",
    "latent_projection.png": "test latent means projected on 2 principal "
    "components, coloured by class",
    "roc.png": "ROC curves: RandomForest real/bogus and anomaly detection",
    "training.png": "negative ELBO per epoch (validation solid, train dotted; "
    "thin: the mean stage)",
}
#: The latent size whose models the figures show, when it was run.
FEATURED_N_COMPONENTS = 50
_MODELS = ("spherical", "diagonal", "banded")


def featured_n_components(ks):
    """The latent size the figures show: 50 (the paper's) if run, else the first."""
    return FEATURED_N_COMPONENTS if FEATURED_N_COMPONENTS in ks else ks[0]


def hardware_record():
    """Where the run was made: the provenance, with the keys the report quotes."""
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
    info["sk_covvae"] = describe_source(prov)
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    info.update({k: v for k, v in prov.items() if k not in info})
    return info


def write_run(
    out,
    config,
    result,
    data,
    *,
    wall_time_s,
    figures=True,
    save_models=False,
    log=print,
):
    """Write ``results.json``, figures and ``report.md`` of one run to ``out``.

    Parameters
    ----------
    out : path-like
        Output folder (created).
    config : dict
        What was run (command, data set, settings), recorded as it is.
    result : dict
        :func:`~sk_covvae.experiments.run_comparison`'s result; its
        ``'models'`` and ``'test_index'`` are removed from it.
    data : dict
        The data set (:func:`~sk_covvae.experiments.load_dataset`).
    wall_time_s : float
    figures : bool, default=True
    save_models : bool, default=False
        Also write ``models.joblib``, for :func:`redraw`.
    log : callable, default=print

    Returns
    -------
    document : dict
        What ``results.json`` holds.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models, test_index = result.pop("models"), result.pop("test_index")
    document = {
        "config": config,
        "hardware": hardware_record(),
        "wall_time_s": wall_time_s,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        **result,
    }
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    log(f"wrote {out / 'results.json'}")
    if save_models:
        import joblib

        joblib.dump({"models": models, "test_index": test_index}, out / "models.joblib")
        log(f"wrote {out / 'models.joblib'}")
    written = (
        write_figures(out, document, data, models, test_index, log) if figures else []
    )
    (out / "report.md").write_text(render_report(document, written))
    log(f"wrote {out / 'report.md'}; total wall time {wall_time_s:.1f}s")
    return document


def redraw(out, *, log=print):
    """Redraw the figures and the report of a run saved with its models.

    Raises
    ------
    FileNotFoundError
        When ``out`` lacks ``results.json`` or ``models.joblib``.
    """
    import joblib

    from sk_covvae import experiments

    out = Path(out)
    document = json.loads((out / "results.json").read_text())
    saved = joblib.load(out / "models.joblib")
    config = document["config"]
    data = experiments.load_dataset(
        config["dataset"],
        n_samples=None if config["dataset"] == "ztf" else config["n_samples"],
        random_state=0,
        **_data_options(config),
    )
    test_index = {int(k): v for k, v in saved["test_index"].items()}
    written = write_figures(out, document, data, saved["models"], test_index, log)
    (out / "report.md").write_text(render_report(document, written))
    log(f"wrote {out / 'report.md'}")


def _data_options(config):
    """``load_dataset``'s options recorded by ``covvae compare`` (all str)."""
    options = dict(config.get("data_options", {}))
    if "crop" in options:
        options["crop"] = int(options["crop"])
    return options


def write_figures(out, document, data, models, test_index, log=print):
    """Draw every figure that applies; a failing figure is reported, not fatal."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("matplotlib is not installed: no figures (pip install matplotlib).")
        return []
    from sk_covvae import plotting

    config = document["config"]
    ks = config["n_components"]
    k = featured_n_components(ks)
    seed = config["seeds"][0]
    X, y = np.asarray(data["X"]), np.asarray(data["y"])
    test = test_index[seed]
    chosen = {cov: m for (cov, kk, s), m in models.items() if kk == k and s == seed}
    shape = tuple(data["image_shape"])
    runs = [r for r in document["runs"] if r["n_components"] == k and r["seed"] == seed]
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
        "training.png": lambda: plotting.plot_training_curves(runs),
    }
    if len(ks) > 1:
        jobs["latent_sweep.png"] = lambda: plotting.plot_latent_sweep(
            document["summary"]
        )
    if any("rf_roc" in r or "anomaly_roc" in r for r in runs):
        jobs["roc.png"] = lambda: plotting.plot_roc(
            runs,
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
            log(f"figure {name} failed: {type(exc).__name__}: {exc}")
            continue
        written.append(name)
        log(f"wrote {out / name}")
    return written


# -------------------------------------------------------------------- report
def _cell(spec):
    """Writer of one summary cell ({mean, std, n}); other values as they are."""

    def write(value):
        if value is None:
            return "–"
        if not isinstance(value, dict):
            return str(value)
        if value["n"] > 1:
            return f"{value['mean']:{spec}} ± {value['std']:{spec}}"
        return f"{value['mean']:{spec}}"

    return write


def _table(rows, columns):
    return markdown_table(
        rows, [(title, key, _cell(spec)) for title, key, spec in columns]
    )


def _header(document):
    config, hw, runs = document["config"], document["hardware"], document["runs"]
    kind = "grouped by object" if config["dataset"] == "ztf" else "stratified"
    return [
        f"# covvae compare: {config['dataset']}",
        "",
        f"Command: `{config['command']}`",
        "",
        f"Data: {config['description']}; {kind} split "
        f"{config['split_sizes']} (fractions {config['split_fractions']}). Models "
        "fitted on train + validation, with early stopping on a hold-out of the "
        f"validation part's size (patience {config['patience']}, at most "
        f"{config['max_epochs']} epochs per training stage); metrics on test.",
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
    ]


def _density_section(document, spread):
    summary, config = document["summary"], document["config"]
    rows = [r for r in summary if r["method"] in _MODELS]
    quantized = config["dataset"] == "fashion-mnist"
    return [
        "",
        "## Typical test images" + spread,
        "",
        "Medians over the test images, in nats per image (lower is better): "
        "-E[log p(x|z)] is the metric of the seed thesis's Fashion-MNIST table "
        "(Rojas Herrera; see docs/reproduction.md) and -ELBO bounds "
        "-log p(x) from above. Did the model learn the images? *Active*: "
        "latent dimensions whose posterior mean varies between typical "
        "validation images (activity > 0.01, Burda et al. 2016); *mean r*: "
        "median correlation between an image and its decoder mean; *centre "
        "flux ρ*: Spearman correlation of the central 5x5 flux of the two. A "
        "collapsed model has no active dimension and a mean that ignores the "
        "image.",
        "",
        _table(
            rows,
            [
                ("model", "method", ".0f"),
                ("K", "n_components", ".0f"),
                ("median -E[log p(x|z)]", "neg_recon_ll_median", ".1f"),
                ("median -ELBO", "neg_elbo_median", ".1f"),
                ("median MSE/pixel", "mse_median", ".3g"),
                ("active", "n_active", ".1f"),
                ("mean r", "mean_correlation", ".3f"),
                ("centre flux ρ", "centre_flux_spearman", ".3f"),
            ],
        ),
        "",
        "## Means over the test images" + spread,
        "",
        "The same metrics as means, which the few extreme images dominate on "
        "heavy-tailed data. "
        + (
            "Bits/dim: negative ELBO of dequantized images (x*255 + u)/256, "
            "u ~ U(0, 1), in bits per pixel (8 = uniform)."
            if quantized
            else "Bits/dim is not reported: stamps are continuous (noise units), "
            "not quantized levels."
        ),
        "",
        _table(
            rows,
            [
                ("model", "method", ".0f"),
                ("K", "n_components", ".0f"),
                ("-E[log p(x|z)]", "neg_recon_ll", ".4g"),
                ("-ELBO", "neg_elbo", ".4g"),
                ("bits/dim", "bits_per_dim", ".3f"),
                ("MSE/pixel", "mse", ".3g"),
                ("epochs", "epochs", ".0f"),
                ("best epoch", "best_epoch", ".0f"),
                ("fit time (s)", "fit_time_s", ".0f"),
            ],
        ),
    ]


def _features_section(summary, spread):
    columns = [
        ("features", "method", ".0f"),
        ("K", "n_components", ".0f"),
        ("ROC AUC", "rf_roc_auc", ".4f"),
        ("accuracy", "rf_accuracy", ".4f"),
    ]
    extra = []
    if any("rf_plus_roc_auc" in r for r in summary):
        columns.append(("ROC AUC, latents + ELBO + MSE", "rf_plus_roc_auc", ".4f"))
        extra = [
            "",
            "*Latents + ELBO + MSE*: the same forest on the latent means and "
            "two per-stamp summaries the model gives for free, its ELBO and the "
            "log mean squared error of its decoder mean.",
        ]
    return [
        "",
        "## Real/bogus RandomForest on features" + spread,
        "",
        "RandomForestClassifier (200 trees) fitted on the train split's "
        "features, scored on the test split.",
        *extra,
        "",
        _table([r for r in summary if "rf_roc_auc" in r], columns),
    ]


def _channel_rows(summary):
    """One row per (model, channel) of the summary's ``ch:<name>:<metric>`` keys.

    Each row holds ``method``, ``channel`` and the metrics by their short
    names (``nll_per_pixel``, ``measured_corr_x``, ...).
    """
    rows = [r for r in summary if any(k.startswith("ch:") for k in r)]
    names = list(
        dict.fromkeys(k.split(":")[1] for r in rows for k in r if k.startswith("ch:"))
    )
    table_rows = []
    for r in rows:
        for name in names:
            row = {"method": r["method"], "channel": name}
            for key, value in r.items():
                if key.startswith(f"ch:{name}:"):
                    row[key.split(":")[2]] = value
            table_rows.append(row)
    return table_rows


def _channels_section(summary, spread):
    """Per-channel density and neighbour correlation (multi-channel data)."""
    return [
        "",
        "## Channels" + spread,
        "",
        "Per channel, at each test stamp's posterior mean: minus the log-density "
        "per pixel in data units (nats; lower is better), and the correlation "
        "of horizontal (x) and vertical (y) neighbours: *measured*, of the "
        "residual stamp minus decoder mean (model units, pooled over stamps), "
        "and *learned*, under the decoder's covariance (median over neighbour "
        "pairs of 8 stamps; 0 for the diagonal and spherical decoders by "
        "construction).",
        "",
        _table(
            _channel_rows(summary),
            [
                ("model", "method", ".0f"),
                ("channel", "channel", ".0f"),
                ("-log p / pixel", "nll_per_pixel", ".3f"),
                ("measured x", "measured_corr_x", ".3f"),
                ("learned x", "learned_corr_x", ".3f"),
                ("measured y", "measured_corr_y", ".3f"),
                ("learned y", "learned_corr_y", ".3f"),
            ],
        ),
    ]


def _anomaly_section(summary, spread, dataset=None):
    rows = [r for r in summary if "anomaly_auroc" in r]
    types = sorted(rows[0].get("anomaly_auroc_by_type", {}))
    table_rows = [{**r, **r.get("anomaly_auroc_by_type", {})} for r in rows]
    normal = (
        "the surely real stamps (drb >= 0.9)" if dataset == "ztf" else "the real stamps"
    )
    return [
        "",
        "## Anomaly detection" + spread,
        "",
        f"A second model per covariance is fitted on {normal} of the "
        "train and validation splits only; -score_samples ranks the test split, "
        "bogus = positive. AUROC overall and per artefact type (that type "
        "against the test reals); *active*: the active latent dimensions of "
        "that model.",
        "",
        _table(
            table_rows,
            [("model", "method", ".0f"), ("K", "n_components", ".0f")]
            + [("active", "anomaly_n_active", ".1f")]
            + [("all bogus", "anomaly_auroc", ".3f")]
            + [(t, t, ".3f") for t in types],
        ),
    ]


def render_report(document, figures):
    """The Markdown report of a run.

    Parameters
    ----------
    document : dict
        What ``results.json`` holds (see :func:`write_run`).
    figures : list of str
        File names of the figures written beside it.

    Returns
    -------
    str
    """
    seeds = document["config"]["seeds"]
    summary = document["summary"]
    spread = (
        " (mean ± std over seeds " + ", ".join(map(str, seeds)) + ")"
        if len(seeds) > 1
        else ""
    )
    lines = _header(document) + _density_section(document, spread)
    if any("rf_roc_auc" in r for r in summary):
        lines += _features_section(summary, spread)
    if any(k.startswith("ch:") for r in summary for k in r):
        lines += _channels_section(summary, spread)
    if any("anomaly_auroc" in r for r in summary):
        lines += _anomaly_section(summary, spread, document["config"]["dataset"])
    if figures:
        lines += ["", "## Figures", ""]
        for name in figures:
            lines += [f"![{name}]({name})", "", f"*{name}*: {FIGURES[name]}.", ""]
    return "\n".join(lines).rstrip() + "\n"
