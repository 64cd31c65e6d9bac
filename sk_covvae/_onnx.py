r"""ONNX export of a fitted :class:`~sk_covvae.CovarianceVAE`.

The exported graph takes raw stamps, ``X`` of shape (n_samples, n_features)
in float32, and does everything the estimator does to them: the
standardization ``u = (X - offset_) / scale_`` (per channel for
``image_shape=(C, H, W)``), the asinh stretch ``y = a * asinh(u / a)`` with
``a = stretch_``, the encoder and, for ``score_samples``, the decoder and the
exact log-density of the Gaussian with the structured precision factor plus
the Jacobian of the data map:

.. math::

    \log p(x) \gtrsim \mathrm{bound}(y)
        + \sum_i \Bigl[-\log \mathrm{scale}_i
        - \tfrac12 \log\bigl(1 + (u_i / a)^2\bigr)\Bigr],

where ``bound`` is the ELBO (one particle) or the importance-weighted bound
(``n_score_particles > 1``) of :func:`sk_covvae._net.log_likelihood_bound`,
with the estimator's fixed standard normal draws baked into the graph as a
constant. The log-density needs only :math:`L^\top (x - \mu)` (a stencil of
products of shifted images) and the sum of ``log_diag``, no triangular
solve, so every operation has a plain ONNX counterpart.

How: a small :class:`torch.nn.Module` (:class:`_ExportedMethod`) wraps a CPU
copy of the fitted network and calls the very functions the estimator calls
(``VAEModule.encode`` and :func:`~sk_covvae._net.log_likelihood_bound`, which
reach the decoder distributions of :mod:`sk_covvae.distributions`), so the
graph follows the model's code instead of a second implementation of it.
It is exported by ``torch.export`` and the ONNX exporter built on it
(``torch.onnx.export(..., dynamo=True)``, which needs onnxscript). The
legacy TorchScript exporter is never used: it is known to produce wrong
scores for models of this kind. Parts the estimator computes in float64
(the posterior's elementwise maps, the per-image sums, the Jacobian) are
float64 in the graph too; the network layers are float32, as in the
estimator.
"""

import copy
import numbers
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from sk_covvae._net import log_likelihood_bound
from sk_covvae._optional import require

__all__ = ["export_onnx"]

_METHODS = ("score_samples", "transform")
_OUTPUT_NAMES = {"score_samples": "scores", "transform": "latents"}
_INPUT_NAME = "X"
_MIN_TORCH = (2, 6)  # torch.onnx.export(..., dynamo=True, dynamic_shapes=...)
# The exporter writes opsets 18 and up (20 by default with torch 2.13);
# converting down to 17 writes Split nodes with an attribute opset 17 lacks
# (onnx 1.23, onnxscript 0.7), which onnxruntime refuses to load.
_MIN_OPSET = 18
# Rows of the self-check after export (see ``verify``): a few typical and a
# few extreme stamps, drawn with a fixed seed.
_N_VERIFY = 16
# The self-check catches a wrong graph, not rounding: the graph and the
# estimator agree to ~1e-7 relative (float32 network layers).
_VERIFY_RTOL = 1e-4
_VERIFY_ATOL = {"score_samples": 1e-2, "transform": 1e-4}


def _import(name):
    """Import a package of the ONNX extra, or say how to install it."""
    return require(name, "export_onnx", extra="onnx")


def _check_torch_version():
    release = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if release < _MIN_TORCH:
        raise ImportError(
            "export_onnx needs torch >= {}.{} (the ONNX exporter built on "
            "torch.export); this is torch {}.".format(*_MIN_TORCH, torch.__version__)
        )


def _feature_scaling(estimator):
    """``offset_`` and ``scale_`` as one float64 value per feature.

    The estimator's own per-feature scaling (scalars for one channel), laid
    out over the ``n_features_in_`` features.
    """
    D = estimator.n_features_in_
    return tuple(
        np.broadcast_to(np.asarray(v, dtype=np.float64), (D,))
        for v in estimator._feature_scaling()
    )


def _scalar_or_vector(v):
    """A float when every entry of ``v`` is the same (a constant in the
    graph, exactly the estimator's python-float arithmetic), else the vector."""
    v = np.atleast_1d(v)
    return float(v[0]) if np.all(v == v[0]) else v


class _ExportedMethod(torch.nn.Module):
    """``transform`` or ``score_samples`` of a fitted estimator on raw rows.

    Parameters
    ----------
    module : VAEModule
        A CPU copy of the fitted network, in eval mode, without gradients.
    method : {'score_samples', 'transform'}
    offset, scale : ndarray of shape (n_features,), float64
        Per-feature standardization.
    stretch : float or None
        The asinh stretch ``stretch_``, None for no stretch.
    eps : torch.Tensor of shape (k, n_components)
        The estimator's fixed standard normal draws (``_fixed_noise``).
    """

    def __init__(self, module, method, offset, scale, stretch, eps):
        super().__init__()
        self.module = module
        self.method = method
        # Standardization in float32, as the estimator standardizes float32
        # rows: (x - f32(offset)) / f32(scale), each operation exactly
        # rounded. A scalar stays a python float (a float32 constant in the
        # graph), a per-channel value becomes a per-feature buffer.
        self.offset = self._constant("offset", offset, torch.float32)
        self.scale = self._constant("scale", scale, torch.float32)
        self.stretch = (
            None
            if stretch is None
            else self._constant("stretch", stretch, torch.float32)
        )
        if method == "score_samples":
            self.register_buffer("eps", eps.detach().to("cpu", torch.float32).clone())
            # The Jacobian in float64, as ``_stretch_log_det`` computes it:
            # sum_i -log scale_i is a constant; with a stretch, the data
            # dependent part -1/2 sum_i log(1 + (u_i / a_i)^2) with u in float64.
            self.log_det_const = -float(np.sum(np.log(scale)))
            self.offset64 = self._constant("offset64", offset, torch.float64)
            self.scale64 = self._constant("scale64", scale, torch.float64)
            self.stretch64 = (
                None
                if stretch is None
                else self._constant("stretch64", stretch, torch.float64)
            )

    def _constant(self, name, values, dtype):
        value = _scalar_or_vector(np.asarray(values, dtype=np.float64))
        if isinstance(value, float):
            return value
        self.register_buffer(name, torch.as_tensor(value, dtype=dtype))
        return getattr(self, name)

    def forward(self, X):
        """Latents (N, K) float32, or scores (N,) float64, of raw rows X (N, D)."""
        u = (X - self.offset) / self.scale
        # The estimator: torch.asinh(u / a).mul_(a), in float32.
        y = u if self.stretch is None else torch.asinh(u / self.stretch) * self.stretch
        if self.method == "transform":
            return self.module.encode(y)[0]
        # float64 posterior maps and per-image sums, float32 layers: the
        # estimator's log_likelihood_bound(module, x, eps) with its defaults.
        bound = log_likelihood_bound(self.module, y, self.eps)
        log_det = self.log_det_const
        if self.stretch64 is not None:
            u64 = (X.to(torch.float64) - self.offset64) / self.scale64
            log_det = log_det - 0.5 * torch.log1p((u64 / self.stretch64) ** 2).sum(1)
        return bound + log_det


def _summary(exc):
    """The gist of an exporter error: its own summary section, else line one."""
    text = str(exc)
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _check_rows(estimator, n_rows, rng):
    """Raw float32 rows for the export's example and its self-check.

    Standard normal pixels in the units of the data, the last quarter of
    the rows 30 times wider (well into the asinh's logarithmic range).
    """
    offset, scale = _feature_scaling(estimator)
    U = rng.standard_normal((n_rows, estimator.n_features_in_))
    U[-(n_rows // 4) :] *= 30.0
    return (offset + scale * U).astype(np.float32)


def _verify(estimator, path, method, onnxruntime):
    """Run the saved graph under onnxruntime against the estimator; raise if off."""
    X = _check_rows(estimator, _N_VERIFY, np.random.default_rng(0))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        got = session.run(None, {_INPUT_NAME: X})[0]
    except Exception as exc:  # onnxruntime's own exception classes
        raise RuntimeError(
            f"onnxruntime {onnxruntime.__version__} cannot run the exported "
            f"graph of {method} ({type(exc).__name__}: {exc}). The file was "
            "removed."
        ) from exc
    want = getattr(estimator, method)(X)
    if got.shape != want.shape or not np.allclose(
        got, want, rtol=_VERIFY_RTOL, atol=_VERIFY_ATOL[method]
    ):
        err = np.max(np.abs(got - want)) if got.shape == want.shape else np.nan
        raise RuntimeError(
            f"The exported ONNX graph does not reproduce {method} under "
            f"onnxruntime (largest difference {err:.3g} on {len(X)} test rows; "
            f"shapes {got.shape} and {want.shape}). The file was removed. "
            "Please report this with your torch, onnx and onnxscript versions."
        )


def export_onnx(estimator, path, method="score_samples", *, opset=None, verify=True):
    r"""Write ``transform`` or ``score_samples`` as an ONNX graph.

    The graph takes raw stamps, as :meth:`score_samples` and
    :meth:`transform` do, and does everything inside: the standardization
    ``(X - offset_) / scale_`` (per channel for ``image_shape=(C, H, W)``),
    the asinh stretch ``a * asinh(u / a)`` with ``a = stretch_`` (when not
    None), the encoder and, for ``'score_samples'``, the decoder and the
    exact log-density of its structured Gaussian (the product
    :math:`L^\top (x - \mu)` and the sum of the log diagonal; no solve) with
    the Jacobian of the stretch, and the importance-weighted bound when
    ``n_score_particles > 1``. The estimator's fixed standard normal draws
    are stored in the graph, so the scores are the estimator's, not new
    draws. The batch axis is dynamic. Run it with onnxruntime, without
    torch, e.g. in a broker's workers::

        import onnxruntime as ort
        session = ort.InferenceSession("model.onnx")
        scores = session.run(None, {"X": X.astype("float32")})[0]

    Made with ``torch.onnx.export(..., dynamo=True)`` (``torch.export``;
    never the legacy TorchScript exporter, which gets models like this one
    wrong), then, with ``verify=True``, checked: onnxruntime runs the saved
    graph on a few rows and its results must agree with the estimator's.
    Needs torch >= 2.6 and the ONNX extra (``pip install
    'sk_covvae[onnx]'``: onnx, onnxscript, and onnxruntime for the check).

    Parameters
    ----------
    path : str or path-like
        File to write (conventionally ``*.onnx``); overwritten if present.
    method : {'score_samples', 'transform'}, default='score_samples'
        What the graph computes:

        - ``'score_samples'``: input ``"X"`` (n_samples, n_features)
          float32, output ``"scores"`` (n_samples,) float64, the values of
          :meth:`score_samples` (higher = more typical).
        - ``'transform'``: input ``"X"``, output ``"latents"`` (n_samples,
          n_components) float32, the posterior means of :meth:`transform`.

    opset : int >= 18 or None, default=None
        ONNX opset of the graph; None: the exporter's default (20 with
        torch 2.13). Lower opsets are refused: the exporter's conversion
        to them writes invalid graphs.
    verify : bool, default=True
        Run the written graph under onnxruntime on 16 rows (typical and
        extreme values, drawn with a fixed seed) and compare with the
        estimator: relative 1e-4 (absolute 1e-2 nats for scores, 1e-4 for
        latents); the graph agrees to float32 rounding, ~1e-7 relative.
        On a mismatch the file is removed and RuntimeError raised.

    Returns
    -------
    path : pathlib.Path
        The file written. Its metadata (``onnx.load(path).metadata_props``)
        records the method, the input and output names, ``n_features``,
        ``image_shape``, ``covariance``, ``neighbourhood``,
        ``n_components``, ``n_score_particles``, ``stretch`` and the
        package version.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the estimator is not fitted.
    ValueError
        If ``method`` is not one of the two above, or ``opset`` is below 18.
    ImportError
        If torch is older than 2.6, or onnx or onnxscript (or, with
        ``verify=True``, onnxruntime) cannot be imported.
    RuntimeError
        If the exporter fails, or the check finds that onnxruntime cannot
        run the graph or that its results differ from the estimator's.

    See Also
    --------
    score_samples, transform : The estimator's methods the graph computes.

    Notes
    -----
    The input is float32: cast float64 stamps first (``X.astype("float32")``);
    the estimator's own results for float32 rows are the reference. The
    graph does not check its input: a NaN or inf in a stamp gives a NaN
    score, where the estimator raises ValueError. Measured
    on CPU, scores agree with :meth:`score_samples` to a few 1e-7 relative
    and latents with :meth:`transform` to ~1e-6 (see ``docs/scaling.md``).

    Examples
    --------
    >>> from sk_covvae import CovarianceVAE
    >>> from sk_covvae.datasets import make_difference_stamps
    >>> X = make_difference_stamps(500, random_state=0).data
    >>> est = CovarianceVAE(n_components=4, max_epochs=2).fit(X)  # doctest: +SKIP
    >>> est.export_onnx("stamps.onnx")  # doctest: +SKIP
    PosixPath('stamps.onnx')
    """
    if method not in _METHODS:
        raise ValueError(
            f"method must be one of {list(_METHODS)} (the estimator methods the "
            f"ONNX graph can compute), got {method!r}."
        )
    check_is_fitted(estimator)
    if opset is not None and not (
        isinstance(opset, numbers.Integral)
        and not isinstance(opset, bool)
        and opset >= _MIN_OPSET
    ):
        raise ValueError(
            f"opset must be an int >= {_MIN_OPSET} (the lowest the exporter "
            f"writes correctly) or None, got {opset!r}."
        )
    _check_torch_version()
    onnx = _import("onnx")
    _import("onnxscript")  # the exporter's translator; fail here, plainly
    onnxruntime = _import("onnxruntime") if verify else None

    path = Path(path)
    offset, scale = _feature_scaling(estimator)
    stretch = estimator.stretch_
    eps = estimator._fixed_noise(estimator.n_score_particles)

    # A CPU copy: the estimator's own network (maybe on a GPU, maybe in use
    # by another thread) is left as it is.
    module = copy.deepcopy(estimator.net_.module_).to("cpu").eval()
    module.requires_grad_(False)
    wrapper = _ExportedMethod(module, method, offset, scale, stretch, eps).eval()
    example = torch.from_numpy(_check_rows(estimator, 4, np.random.default_rng(1)))
    n_samples = torch.export.Dim("n_samples")
    output_name = _OUTPUT_NAMES[method]
    try:
        # torch.export's internals emit Future/DeprecationWarnings about
        # themselves; they say nothing about the user's model.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                wrapper,
                (example,),
                None,
                dynamo=True,
                input_names=[_INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes={"X": {0: n_samples}},
                opset_version=None if opset is None else int(opset),
                optimize=True,
                verbose=False,
            )
            model = program.model_proto
    except Exception as exc:  # the exporter raises many kinds of errors
        raise RuntimeError(
            f"torch.onnx.export could not export {method} of this "
            f"{type(estimator).__name__}: {_summary(exc)} (full report in the "
            "exception's __cause__)."
        ) from exc

    from sk_covvae import __version__

    onnx.helper.set_model_props(
        model,
        {
            "sk_covvae.version": str(__version__),
            "method": method,
            "input": _INPUT_NAME,
            "output": output_name,
            "n_features": str(estimator.n_features_in_),
            "image_shape": ",".join(map(str, estimator.image_shape_)),
            "covariance": str(estimator.covariance),
            "neighbourhood": str(getattr(estimator, "neighbourhood", "cross")),
            "n_components": str(estimator._n_latent),
            "n_score_particles": str(estimator.n_score_particles),
            "stretch": "none" if stretch is None else repr(float(stretch)),
        },
    )
    n_features = estimator.n_features_in_
    model.doc_string = (
        f"sk_covvae CovarianceVAE.{method} on raw stamps X (n_samples, "
        f"{n_features}) float32"
    )
    onnx.save_model(model, str(path))
    if verify:
        try:
            _verify(estimator, path, method, onnxruntime)
        except Exception:
            path.unlink(missing_ok=True)
            raise
    return path
