"""Figures of the comparison (needs matplotlib: ``pip install sk_covvae[plot]``).

Each ``plot_*`` function returns a :class:`matplotlib.figure.Figure`;
:func:`save_figure` writes it with the non-interactive Agg canvas. The
package itself never imports this module, so it works without matplotlib.
"""

import numpy as np
import torch

__all__ = [
    "plot_latent_projection",
    "plot_latent_sweep",
    "plot_precision_covariance",
    "plot_reconstructions",
    "plot_roc",
    "plot_training_curves",
    "save_figure",
]

_COLORS = {"spherical": "tab:blue", "diagonal": "tab:orange", "banded": "tab:green"}


def _figure(figsize):
    # A bare Figure with its own Agg canvas: no pyplot state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, *, dpi=80):
    """Write ``fig`` to ``path`` (PNG by its suffix) with the Agg canvas.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : str or path-like
    dpi : int, default=80
        Small by default, to keep figures in the docs light.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)


def plot_reconstructions(models, X, *, image_shape, n_images=8, random_state=0):
    """Test images, then per model the decoder mean and a sample (Figs. 6-7).

    The sample is ``mean + L^-T eps`` at the posterior mean of each image, so
    it shows the noise each decoder believes in. All panels of a column share
    the colour scale of the data image, clipped to its range.

    Parameters
    ----------
    models : dict of str to CovarianceVAE
        Fitted models by name, e.g. ``{'banded': model}``.
    X : ndarray of shape (n, D)
        Images; the first ``n_images`` are shown.
    image_shape : tuple of int (H, W) or (C, H, W)
        With C channels, each image takes C columns (one per channel) and
        ``n_images // C`` images are shown (at least one).
    n_images : int, default=8
    random_state : int, default=0
        Seed of the sample noise.

    Returns
    -------
    matplotlib.figure.Figure
    """
    shape = tuple(image_shape)
    C, H, W = (1, *shape) if len(shape) == 2 else shape
    X = np.asarray(X, dtype=np.float64)[: max(1, n_images // C)]
    n = len(X)
    rows = [("data", X)]
    generator = torch.Generator().manual_seed(int(random_state))
    for name, model in models.items():
        px = model.decoder_distribution(X)
        eps = torch.randn(px.loc.shape, generator=generator, dtype=torch.float64)
        sample = px.reparameterize(eps.to(px.loc.device)).reshape(n, -1)
        rows.append((f"{name}\nmean", model.to_data_units(px.loc.reshape(n, -1))))
        rows.append((f"{name}\nsample", model.to_data_units(sample)))
    fig = _figure((1.1 * n * C + 0.8, 1.1 * len(rows)))
    axes = fig.subplots(len(rows), n * C, squeeze=False)
    for j in range(n):
        for c in range(C):
            col = j * C + c
            data = X[j].reshape(C, H, W)[c]
            low, high = np.percentile(data, [0.5, 99.5])
            if high <= low:
                low, high = low - 1, high + 1
            for i, (label, images) in enumerate(rows):
                ax = axes[i, col]
                ax.imshow(
                    images[j].reshape(C, H, W)[c], cmap="gray", vmin=low, vmax=high
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(label, fontsize=8)
                if i == 0 and C > 1:
                    ax.set_title(f"channel {c}", fontsize=7)
    return fig


def plot_precision_covariance(models, x, *, image_shape, crop=None, channel=-1):
    """Precision and covariance matrices of p(x|z) for one image (Fig. 5).

    For each model: the precision matrix of the decoder's Gaussian, the
    covariance matrix of p(x|z) in the data's units (both over the first
    ``crop`` pixels) and the correlation of the centre pixel with every other
    pixel, as an image. The covariance is
    :meth:`~sk_covvae.CovarianceVAE.decoder_moments`' (exact also with a
    stretch); the precision is that of the Gaussian in the model's units
    (:meth:`~sk_covvae.CovarianceVAE.decoder_distribution`) over
    ``scale_**2``: the data's precision without a stretch, and with one the
    sparse structure that the decoder models (titled "model units").

    Parameters
    ----------
    models : dict of str to CovarianceVAE
    x : ndarray of shape (D,)
        One image; z is its posterior mean.
    image_shape : tuple of int (H, W) or (C, H, W)
    crop : int or None, default=None
        Pixels shown of the D x D matrices; ``None``: three image rows, so
        the bands are visible.
    channel : int, default=-1
        For (C, H, W) images, the channel shown (its block of the
        block-diagonal matrices); the last by default (a survey triplet's
        difference image).

    Returns
    -------
    matplotlib.figure.Figure
    """
    shape = tuple(image_shape)
    C, H, W = (1, *shape) if len(shape) == 2 else shape
    block = slice((channel % C) * H * W, (channel % C + 1) * H * W)
    crop = 3 * W if crop is None else int(crop)
    fig = _figure((9, 2.8 * len(models)))
    axes = fig.subplots(len(models), 3, squeeze=False)
    centre = (H // 2) * W + W // 2
    for row, (name, model) in zip(axes, models.items()):
        x1 = np.asarray(x)[None]
        cov = model.decoder_moments(x1)[1][0][block, block]
        prec = model.decoder_distribution(x1).precision_matrix[0].cpu().numpy()
        scale = np.atleast_1d(model.scale_)[channel % C if C > 1 else 0]
        prec = prec[block, block] / scale**2
        units = "" if model.stretch_ is None else " (model units)"
        sd = np.sqrt(np.diag(cov))
        corr = (cov[centre] / (sd[centre] * sd)).reshape(H, W)
        for ax, matrix, title, cmap in (
            (row[0], prec[:crop, :crop], f"{name}: precision{units}", "RdBu_r"),
            (row[1], cov[:crop, :crop], f"{name}: covariance", "RdBu_r"),
        ):
            bound = np.abs(matrix).max() or 1.0
            im = ax.imshow(matrix, cmap=cmap, vmin=-bound, vmax=bound)
            ax.set_title(f"{title}\n(first {crop} pixels)", fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
        im = row[2].imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
        row[2].set_title(f"{name}: correlation\nwith centre pixel", fontsize=9)
        fig.colorbar(im, ax=row[2], shrink=0.8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def plot_latent_sweep(summary, *, metric="neg_recon_ll"):
    """Test metric against latent size, one line per model (Fig. 4).

    Parameters
    ----------
    summary : list of dict
        :func:`sk_covvae.experiments.summarize` output.
    metric : str, default='neg_recon_ll'
        Key of the metric; error bars are the std over seeds.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _figure((5, 3.5))
    ax = fig.subplots()
    for name, color in _COLORS.items():
        rows = sorted(
            (r for r in summary if r["method"] == name and r.get(metric)),
            key=lambda r: r["n_components"],
        )
        if not rows:
            continue
        ks = [r["n_components"] for r in rows]
        mean = [r[metric]["mean"] for r in rows]
        std = [r[metric]["std"] for r in rows]
        ax.errorbar(ks, mean, yerr=std, marker="o", color=color, label=name, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("latent size K")
    ax.set_ylabel("test -E[log p(x|z)] (nats/image)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_latent_projection(models, X, y, *, target_names=None, max_points=1500):
    """Latent means projected on their first two principal components.

    Axes span the 1st-99th percentiles of each projection (plus a margin),
    so that a few extreme images do not squash the others.

    Parameters
    ----------
    models : dict of str to CovarianceVAE
    X : ndarray of shape (n, D)
    y : ndarray of shape (n,)
        Class labels, for colour.
    target_names : list of str or None, default=None
    max_points : int, default=1500
        Images shown at most (a fixed random subset).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from sklearn.decomposition import PCA

    X, y = np.asarray(X), np.asarray(y)
    if len(y) > max_points:
        keep = np.random.RandomState(0).choice(len(y), max_points, replace=False)
        X, y = X[keep], y[keep]
    classes = np.unique(y)
    fig = _figure((3.3 * len(models) + 1.5, 3.3))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    cmap = "tab10"
    for ax, (name, model) in zip(axes, models.items()):
        Z = model.transform(X)
        P = PCA(2, random_state=0).fit_transform(Z) if Z.shape[1] > 2 else Z
        if P.shape[1] == 1:
            P = np.column_stack([P[:, 0], np.zeros(len(P))])
        for i, c in enumerate(classes):
            label = target_names[c] if target_names is not None else str(c)
            ax.scatter(*P[y == c].T, s=4, alpha=0.6, color=_cycle(cmap, i), label=label)
        # A few extreme images (saturated stars) must not squash the rest.
        low, high = np.percentile(P, [1, 99], axis=0)
        pad = 0.1 * (high - low) + 1e-12
        ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
        ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(
        loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3
    )
    return fig


def _cycle(cmap, i):
    from matplotlib import colormaps

    colors = colormaps[cmap].colors
    return colors[i % len(colors)]


def plot_roc(runs, baselines=()):
    """ROC curves of the RandomForest real/bogus classifiers and the anomaly scores.

    Parameters
    ----------
    runs : list of dict
        Runs of :func:`sk_covvae.experiments.run_comparison` (one seed, one
        latent size), with ``rf_roc`` and/or ``anomaly_roc``.
    baselines : list of dict, default=()
        Baseline entries with ``rf_roc``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    panels = [key for key in ("rf_roc", "anomaly_roc") if any(key in r for r in runs)]
    fig = _figure((4.2 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    titles = {
        "rf_roc": ("RandomForest, real vs bogus", "rf_roc_auc"),
        "anomaly_roc": ("-score_samples, bogus vs real", "anomaly_auroc"),
    }
    for ax, key in zip(axes, panels):
        title, auc_key = titles[key]
        entries = [(r["covariance"], r) for r in runs if key in r]
        if key == "rf_roc":
            entries += [(b["method"], b) for b in baselines if key in b]
        for name, entry in entries:
            ax.plot(
                entry[key]["fpr"],
                entry[key]["tpr"],
                color=_COLORS.get(name),
                linestyle="-" if name in _COLORS else "--",
                label=f"{name} ({entry[auc_key]:.3f})",
            )
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def _robust_limits(values, *, upper_quantile=0.9, margin=0.15):
    """y-limits that show the bulk of ``values`` and leave rare spikes out."""
    values = np.asarray([v for v in values if np.isfinite(v)])
    low, high = np.min(values), np.quantile(values, upper_quantile)
    pad = margin * max(high - low, 1e-9 * max(abs(low), 1.0))
    return low - pad, high + pad


def plot_training_curves(runs):
    """Validation (solid) and training (dotted) negative ELBO per epoch.

    One colour per model. The epochs of the mean stage (spherical noise
    model, see ``CovarianceVAE``'s ``mean_epochs``) are drawn thin and the
    stage change is marked by a dot. The y-axis shows the bulk of the
    values: a few epochs of a heavy-tailed data set can have losses orders
    of magnitude above the rest (one saturated star in a mini-batch); they
    are drawn as triangles on the upper edge instead of flattening every
    curve.

    Parameters
    ----------
    runs : list of dict
        Runs with ``history`` (see
        :func:`sk_covvae.experiments.fit_with_early_stopping`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _figure((5.5, 3.8))
    ax = fig.subplots()
    everything = [
        h[key] for run in runs for h in run["history"] for key in ("valid_loss",)
    ]
    low, high = _robust_limits(everything)
    for run in runs:
        history = run["history"]
        color = _COLORS.get(run["covariance"])
        epochs = np.arange(1, len(history) + 1)
        stage = np.array([h.get("stage", "joint") for h in history])
        for key, style in (("valid_loss", "-"), ("train_loss", ":")):
            values = np.array([h[key] for h in history])
            shown = np.clip(values, None, high)
            mean_stage = stage == "mean"
            label = f"{run['covariance']}" if key == "valid_loss" else None
            ax.plot(
                epochs,
                np.where(mean_stage, np.nan, shown),
                style,
                color=color,
                label=label,
            )
            if mean_stage.any():
                last = np.flatnonzero(mean_stage)[-1]
                ax.plot(
                    epochs[: last + 2],
                    shown[: last + 2],
                    style,
                    color=color,
                    linewidth=0.6,
                )
                if key == "valid_loss" and last + 1 < len(epochs):
                    ax.plot(
                        epochs[last + 1],
                        shown[last + 1],
                        "o",
                        color=color,
                        markersize=3,
                    )
            over = values > high
            if over.any():
                ax.plot(
                    epochs[over],
                    np.full(over.sum(), high),
                    "^",
                    color=color,
                    markersize=4,
                    clip_on=False,
                )
    ax.set_ylim(low, high)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO (nats/image)")
    ax.set_title(
        "validation (solid), train (dotted); thin: mean stage; \u25b2: off the scale",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig
