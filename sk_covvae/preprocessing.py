"""Preparation of alert stamps for a model: crop, scale, fill, normalise.

Only numpy and scikit-learn: no torch (see the layout in the design notes).
"""

import numbers
import warnings
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["StampPreprocessor"]

#: Scale of the median absolute deviation that estimates a Gaussian's sigma.
MAD_TO_SIGMA = 1.4826


class _Geometry(NamedTuple):
    """Where the output pixels come from in the input stamps."""

    shape: tuple  # (C, H, W) of the input
    images: tuple  # input channels in the output, in order
    variances: tuple | None  # input channels holding their variance planes
    rows: slice
    cols: slice

    @property
    def output_shape(self):
        return (
            len(self.images),
            self.rows.stop - self.rows.start,
            self.cols.stop - self.cols.start,
        )


def _positive_ints(values, name, *, allow_wildcard=False):
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of integers, got {values!r}.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must hold integers, got {values!r}.")
        if v < 1 and not (allow_wildcard and v == -1):
            raise ValueError(f"{name} must hold positive integers, got {values!r}.")
    return tuple(int(v) for v in values)


def _channel_list(values, name, n_channels):
    if values is None:
        return None
    values = np.asarray(values)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a list of channel indices, got {values!r}.")
    values = tuple(int(v) for v in values)
    for v in values:
        if not 0 <= v < n_channels:
            raise ValueError(
                f"{name}: channel index {v} is out of range for stamps of "
                f"{n_channels} channel(s) (0 to {n_channels - 1})."
            )
    if len(set(values)) != len(values):
        raise ValueError(f"{name} holds a channel twice: {list(values)}.")
    return values


class StampPreprocessor(TransformerMixin, BaseEstimator):
    """Crop, scale by the noise, fill and normalise multi-channel stamps.

    A stateless transformer to put before
    :class:`~sk_covvae.CovarianceVAE` in a :class:`~sklearn.pipeline.Pipeline`.
    Each row of X is one stamp of ``image_shape = (C, H, W)`` flattened
    channel first (C order: channel, row, column), e.g.
    ``alerts.images.reshape(n, -1)`` from
    :func:`~sk_covvae.datasets.read_alerts`; NaN pixels (masked, padded or
    missing cutouts) are expected. In this order, each stamp is

    1. cropped to the centred ``crop`` window (the pixel at ``H // 2, W // 2``
       becomes the pixel at ``h // 2, w // 2``, the centring of
       :func:`~sk_covvae.datasets.read_alerts`),
    2. reduced to the ``channels`` kept,
    3. divided, plane by plane, by the square root of its variance plane
       (``variance_channels``, e.g. Rubin's ``UNCERT`` planes): the pixels
       become signal-to-noise ratios; a negative or zero variance gives a
       non-finite pixel,
    4. background-subtracted (``background='median'``),
    5. normalised (``normalize``),
    6. filled: every non-finite pixel becomes ``fill_value``.

    Before step 3, pixels (of images and variance planes) whose absolute
    value exceeds ``max_abs`` count as missing, like NaN: ZTF templates
    mark bad pixels with the largest float32, 3.4e38.

    Medians, norms and deviations are computed per stamp and channel over its
    finite pixels. Output rows are the processed stamps of shape
    ``output_image_shape_ = (C_out, h, w)``, flattened channel first: the
    ``image_shape`` of the next step.

    Parameters
    ----------
    image_shape : tuple of int
        ``(C, H, W)`` of the input stamps, or ``(H, W)`` for one channel.
        One entry may be -1, inferred from the number of features as in
        :func:`numpy.reshape`.
    crop : tuple of int (h, w), default=None
        Size of the centred window to keep; None keeps the whole stamp.
    channels : list of int, default=None
        Input channels in the output, in this order. None: every channel
        that is not in ``variance_channels``.
    variance_channels : list of int, default=None
        Input channels that hold the variance planes of the image channels,
        paired in order with them (the i-th image channel is divided by the
        square root of the i-th variance channel). They are not in the
        output.
    fill_value : float, default=0.0
        Value of the pixels that are not finite after the other steps.
    max_abs : float or None, default=1e30
        Pixels whose absolute value is larger are missing values (filled
        and counted by :meth:`n_filled`); None keeps every finite value.
    background : {'none', 'median'}, default='none'
        ``'median'``: subtract each stamp-channel's median (of its finite
        pixels).
    normalize : {'none', 'l2', 'robust'}, default='none'
        ``'l2'``: divide each stamp-channel by its L2 norm, as the ZTF braai
        and BOOM classifiers prepare stamps; ``'robust'``: subtract its median
        and divide by 1.4826 times its median absolute deviation (a Gaussian
        sigma). A zero norm or deviation leaves the stamp-channel as it is.

    Attributes
    ----------
    output_image_shape_ : tuple of int
        ``(C_out, h, w)`` of the output stamps.
    n_features_in_ : int
        Number of features seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sk_covvae.datasets.read_alerts : Read alert stamps into this layout.
    sk_covvae.CovarianceVAE : The model to put after it.

    Notes
    -----
    The transformer learns nothing from the data (:meth:`fit` only records
    the shapes), so it may be used without fitting; ``fit`` checks that
    ``image_shape`` matches the number of features.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_covvae.preprocessing import StampPreprocessor
    >>> X = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, -1)
    >>> X[0, 12] = np.nan  # the centre of the first stamp's science plane
    >>> pre = StampPreprocessor((3, 5, 5), crop=(3, 3), channels=[2, 0])
    >>> Xt = pre.fit_transform(X)
    >>> Xt.shape, Xt.dtype, pre.output_image_shape_
    ((2, 18), dtype('float32'), (2, 3, 3))
    >>> pre.n_filled(X)
    array([1, 0])
    >>> pre.get_feature_names_out()[:3]
    array(['ch2_y1_x1', 'ch2_y1_x2', 'ch2_y1_x3'], dtype=object)
    """

    _parameter_constraints: dict = {
        "image_shape": [tuple, list, np.ndarray],
        "crop": [tuple, list, None],
        "channels": ["array-like", None],
        "variance_channels": ["array-like", None],
        "fill_value": [Interval(numbers.Real, None, None, closed="neither")],
        "max_abs": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "background": [StrOptions({"none", "median"})],
        "normalize": [StrOptions({"none", "l2", "robust"})],
    }

    def __init__(
        self,
        image_shape,
        *,
        crop=None,
        channels=None,
        variance_channels=None,
        fill_value=0.0,
        max_abs=1e30,
        background="none",
        normalize="none",
    ):
        self.image_shape = image_shape
        self.crop = crop
        self.channels = channels
        self.variance_channels = variance_channels
        self.fill_value = fill_value
        self.max_abs = max_abs
        self.background = background
        self.normalize = normalize

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: fit records shapes only
        tags.input_tags.allow_nan = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ------------------------------------------------------------------
    # geometry
    # ------------------------------------------------------------------

    def _geometry(self, n_features):
        """Resolve image_shape, crop and channels for ``n_features`` pixels."""
        shape = _positive_ints(self.image_shape, "image_shape", allow_wildcard=True)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            raise ValueError(
                "image_shape must be (C, H, W) or (H, W), got "
                f"{tuple(self.image_shape)!r}."
            )
        if shape.count(-1) > 1:
            raise ValueError(f"image_shape may hold one -1 only, got {shape!r}.")
        known = int(np.prod([s for s in shape if s != -1]))
        if -1 in shape and n_features % known == 0:
            shape = tuple(n_features // known if s == -1 else s for s in shape)
        if int(np.prod(shape)) != n_features:
            raise ValueError(
                f"image_shape={tuple(self.image_shape)!r} does not fit X with "
                f"{n_features} feature(s) (n_features = {n_features}): "
                "C * H * W must equal the number of features."
            )
        n_channels, height, width = shape

        if self.crop is None:
            h, w = height, width
        else:
            crop = _positive_ints(self.crop, "crop")
            if len(crop) != 2:
                raise ValueError(f"crop must be (h, w), got {self.crop!r}.")
            h, w = crop
            if h > height or w > width:
                raise ValueError(
                    f"crop={crop!r} is larger than the stamps ({height}, {width})."
                )
        y0, x0 = height // 2 - h // 2, width // 2 - w // 2

        channels = _channel_list(self.channels, "channels", n_channels)
        variances = _channel_list(
            self.variance_channels, "variance_channels", n_channels
        )
        if channels is None:
            taken = set(variances or ())
            channels = tuple(c for c in range(n_channels) if c not in taken)
        elif variances is not None and set(channels) & set(variances):
            raise ValueError(
                f"channels {sorted(set(channels) & set(variances))} are also "
                "variance_channels: a variance plane is not an image."
            )
        if not channels:
            raise ValueError(
                "No image channel left: every channel is a variance channel."
            )
        if variances is not None and len(variances) != len(channels):
            raise ValueError(
                f"variance_channels {list(variances)} must pair one to one with "
                f"the image channels {list(channels)}."
            )
        return _Geometry(
            shape, channels, variances, slice(y0, y0 + h), slice(x0, x0 + w)
        )

    # ------------------------------------------------------------------
    # sklearn API
    # ------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Check the parameters against X and record the output shape.

        Parameters
        ----------
        X : array-like of shape (n_samples, C * H * W)
            Stamps flattened channel first; NaN allowed.
        y : None
            Ignored.

        Returns
        -------
        self : object
            The fitted transformer.
        """
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], ensure_all_finite=False
        )
        self.output_image_shape_ = self._geometry(X.shape[1]).output_shape
        return self

    def _prepare(self, X):
        """Steps 1 to 5 (everything but the filling), as (n, C_out, h, w)."""
        check_is_fitted(self)
        if not hasattr(self, "n_features_in_"):
            self._validate_params()  # used without fit (stateless)
        X = validate_data(
            self,
            X,
            dtype=[np.float64, np.float32],
            ensure_all_finite=False,
            reset=False,
        )
        geo = self._geometry(X.shape[1])
        stamps = X.reshape(-1, *geo.shape)[:, :, geo.rows, geo.cols]
        # np.take copies: the steps below work in place without touching X
        Z = _without_sentinels(np.take(stamps, geo.images, axis=1), self.max_abs)
        with np.errstate(divide="ignore", invalid="ignore"):
            if geo.variances is not None:
                V = np.take(stamps, geo.variances, axis=1)
                Z /= np.sqrt(_without_sentinels(V, self.max_abs))
            if self.background == "median":
                Z -= _finite_median(Z)
            if self.normalize == "l2":
                Z_finite = np.where(np.isfinite(Z), Z, 0.0)
                norm = np.sqrt(
                    np.einsum("ncij,ncij->nc", Z_finite, Z_finite, dtype=np.float64)
                )
                norm[norm == 0] = 1.0
                # divided in float64: the norm may exceed the float32 range
                np.divide(Z, norm[:, :, None, None], out=Z, casting="same_kind")
            elif self.normalize == "robust":
                Z -= _finite_median(Z)
                scale = MAD_TO_SIGMA * _finite_median(np.abs(Z))
                scale[~(scale > 0)] = 1.0
                Z /= scale
        return Z

    def transform(self, X):
        """Crop, scale, subtract the background, normalise and fill stamps.

        Parameters
        ----------
        X : array-like of shape (n_samples, C * H * W)
            Stamps flattened channel first; NaN allowed.

        Returns
        -------
        X_out : ndarray of shape (n_samples, C_out * h * w)
            Processed stamps flattened channel first, all finite; float32
            for float32 input, float64 otherwise.
        """
        Z = self._prepare(X)
        Z[~np.isfinite(Z)] = self.fill_value
        return Z.reshape(len(Z), -1)

    def n_filled(self, X):
        """Number of pixels of each output stamp that :meth:`transform` fills.

        The non-finite pixels after cropping, variance scaling, background
        subtraction and normalisation (masked, padded or missing pixels, and
        those with a non-positive variance): a feature or a filter for
        incomplete stamps.

        Parameters
        ----------
        X : array-like of shape (n_samples, C * H * W)
            Stamps flattened channel first; NaN allowed.

        Returns
        -------
        n_filled : ndarray of shape (n_samples,), int64
            Count per stamp, out of ``C_out * h * w``.
        """
        Z = self._prepare(X)
        return (~np.isfinite(Z)).reshape(len(Z), -1).sum(axis=1, dtype=np.int64)

    def get_feature_names_out(self, input_features=None):
        """Names of the output pixels.

        Each output pixel comes from one input pixel: its name is the input
        feature's name when X had feature names (or ``input_features`` is
        given), else ``'ch{c}_y{y}_x{x}'`` with the input channel ``c`` and
        the row ``y`` and column ``x`` in the input stamp (so ``'ch2_y31_x31'``
        is the centre of a 63x63 difference plane, whatever the crop).

        Parameters
        ----------
        input_features : array-like of str, default=None
            Names of the input features; must match ``feature_names_in_``
            when that is defined.

        Returns
        -------
        feature_names_out : ndarray of str objects
            ``C_out * h * w`` names in output order.
        """
        check_is_fitted(self, "n_features_in_")
        names = getattr(self, "feature_names_in_", None)
        if input_features is not None:
            input_features = np.asarray(input_features, dtype=object)
            if names is not None and not np.array_equal(input_features, names):
                raise ValueError("input_features is not equal to feature_names_in_")
            if len(input_features) != self.n_features_in_:
                raise ValueError(
                    f"input_features should have length equal to number of "
                    f"features ({self.n_features_in_}), got {len(input_features)}"
                )
            names = input_features
        geo = self._geometry(self.n_features_in_)
        c, y, x = np.meshgrid(
            geo.images,
            np.arange(geo.rows.start, geo.rows.stop),
            np.arange(geo.cols.start, geo.cols.stop),
            indexing="ij",
        )
        if names is not None:
            flat = np.ravel_multi_index((c, y, x), geo.shape).ravel()
            return np.asarray(names, dtype=object)[flat]
        return np.asarray(
            [f"ch{a}_y{b}_x{d}" for a, b, d in zip(c.ravel(), y.ravel(), x.ravel())],
            dtype=object,
        )


def _without_sentinels(Z, max_abs):
    """``Z`` (a copy, changed in place) with pixels beyond ``max_abs`` as NaN."""
    if max_abs is not None:
        Z[np.abs(Z) > max_abs] = np.nan
    return Z


def _finite_median(Z):
    """Median of the finite pixels of each stamp-channel, shape (n, C, 1, 1)."""
    finite = np.where(np.isfinite(Z), Z, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN stamp-channels
        return np.nanmedian(finite, axis=(2, 3), keepdims=True).astype(Z.dtype)
