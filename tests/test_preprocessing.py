"""Tests of sk_covvae.preprocessing.StampPreprocessor."""

import numpy as np
import pytest
from conftest import shared
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from sk_covvae.preprocessing import StampPreprocessor


# The common checks use a handful of features (1, 2, 3, 10, ...): a -1 in
# image_shape lets each configuration take any number of them.
@parametrize_with_checks(
    [
        StampPreprocessor((1, 1, -1)),
        StampPreprocessor((-1, 1, 1), background="median", normalize="robust"),
        StampPreprocessor((1, -1, 1), crop=(1, 1), normalize="l2", fill_value=-1.0),
        StampPreprocessor((-1, 1, 1), channels=[0], normalize="l2"),
    ]
)
def test_sklearn_compatible_transformer(estimator, check):
    check(estimator)


@pytest.fixture
def stamps():
    """Four stamps of 3 channels of 6x5 pixels, with a few NaN and inf."""
    rng = np.random.default_rng(0)
    images = rng.normal(10.0, 3.0, (4, 3, 6, 5))
    images[0, 0, 2, 2] = np.nan
    images[1, 2, 0, 0] = np.inf
    images[2, 1] = np.nan  # a missing cutout
    return images


def flat(images):
    return images.reshape(len(images), -1)


def test_default_is_identity_but_fill(stamps):
    pre = StampPreprocessor((3, 6, 5)).fit(flat(stamps))
    out = pre.transform(flat(stamps))
    want = np.where(np.isfinite(stamps), stamps, 0.0)
    np.testing.assert_array_equal(out, flat(want))
    assert pre.output_image_shape_ == (3, 6, 5)
    np.testing.assert_array_equal(pre.n_filled(flat(stamps)), [1, 1, 30, 0])


def test_sentinel_values_count_as_missing(stamps):
    stamps = stamps.copy()
    stamps[3, 1, 4, 4] = np.finfo(np.float32).max  # ZTF's bad-pixel mark
    stamps[3, 0, 1, 1] = -1e31
    pre = StampPreprocessor((3, 6, 5), background="median")
    out = pre.fit_transform(flat(stamps)).reshape(stamps.shape)
    np.testing.assert_array_equal(pre.n_filled(flat(stamps)), [1, 1, 30, 2])
    assert out[3, 1, 4, 4] == 0.0 and out[3, 0, 1, 1] == 0.0
    # the median of the other pixels, not of the sentinels
    kept = np.delete(stamps[3, 1].ravel(), 4 * 5 + 4)
    assert out[3, 1, 0, 0] == pytest.approx(stamps[3, 1, 0, 0] - np.median(kept))
    everything = StampPreprocessor((3, 6, 5), max_abs=None)
    np.testing.assert_array_equal(everything.n_filled(flat(stamps)), [1, 1, 30, 0])
    variance = np.abs(stamps[:, :1]).copy()
    variance[0, 0, 3, 3] = 3e38
    with_var = np.concatenate([stamps[:, :1], variance], axis=1)
    pre = StampPreprocessor((2, 6, 5), variance_channels=[1])
    assert pre.n_filled(flat(with_var))[0] == 2


def test_crop_channels_and_shapes(stamps):
    pre = StampPreprocessor((3, 6, 5), crop=(3, 2), channels=[2, 0])
    out = pre.fit_transform(flat(stamps))
    # centre (6 // 2, 5 // 2) = (3, 2) becomes (3 // 2, 2 // 2) = (1, 1)
    want = stamps[:, [2, 0], 2:5, 1:3]
    np.testing.assert_array_equal(out, flat(np.nan_to_num(want, posinf=0.0)))
    assert pre.output_image_shape_ == (2, 3, 2)
    assert out.shape == (4, 12)


@pytest.mark.parametrize(
    "image_shape", [(6, 5), (1, 6, 5), (-1, 6, 5), (1, -1, 5), (6, -1)]
)
def test_one_channel_and_inferred_shapes(image_shape, stamps):
    X = flat(stamps[:, 0])
    pre = StampPreprocessor(image_shape, crop=(2, 2)).fit(X)
    assert pre.output_image_shape_ == (1, 2, 2)
    np.testing.assert_array_equal(
        pre.transform(X), flat(np.nan_to_num(stamps[:, 0, 2:4, 1:3]))
    )


def test_variance_planes_divide_and_are_dropped(stamps):
    variance = np.abs(stamps) + 1.0
    variance[3, 0, 1, 1] = -4.0  # negative: NaN, then filled
    variance[3, 0, 1, 2] = 0.0  # zero: infinite, then filled
    X = flat(np.concatenate([stamps, variance], axis=1))
    pre = StampPreprocessor((6, 6, 5), variance_channels=[3, 4, 5], fill_value=-9)
    out = pre.fit_transform(X).reshape(4, 3, 6, 5)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = stamps / np.sqrt(variance)
    want[~np.isfinite(want)] = -9.0
    np.testing.assert_allclose(out, want, rtol=1e-15)
    assert out[3, 0, 1, 1] == -9.0 and out[3, 0, 1, 2] == -9.0
    assert pre.output_image_shape_ == (3, 6, 5)
    np.testing.assert_array_equal(pre.n_filled(X), [1, 1, 30, 2])
    # channels pick image planes; variance_channels pair with them in order
    pre = StampPreprocessor((6, 6, 5), channels=[2, 0], variance_channels=[5, 3])
    out = pre.fit_transform(X).reshape(4, 2, 6, 5)
    np.testing.assert_allclose(
        out[0, 0], stamps[0, 2] / np.sqrt(variance[0, 2]), rtol=1e-15
    )
    np.testing.assert_allclose(
        out[1, 1], stamps[1, 0] / np.sqrt(variance[1, 0]), rtol=1e-15
    )


def test_background_median(stamps):
    pre = StampPreprocessor((3, 6, 5), background="median", fill_value=7.0)
    out = pre.fit_transform(flat(stamps)).reshape(stamps.shape)
    for i in range(4):
        for c in range(3):
            plane = stamps[i, c]
            finite = plane[np.isfinite(plane)]
            if not finite.size:
                assert np.all(out[i, c] == 7.0)
                continue
            want = np.where(np.isfinite(plane), plane - np.median(finite), 7.0)
            np.testing.assert_allclose(out[i, c], want, rtol=1e-12)


def test_l2_normalisation(stamps):
    X = stamps.copy()
    X[3, 1] = 0.0  # zero norm: left as it is
    pre = StampPreprocessor((3, 6, 5), normalize="l2")
    out = pre.fit_transform(flat(X)).reshape(X.shape)
    for i in range(4):
        for c in range(3):
            plane = np.where(np.isfinite(X[i, c]), X[i, c], 0.0)
            norm = np.sqrt((plane**2).sum())
            want = plane / norm if norm else plane
            np.testing.assert_allclose(out[i, c], want, rtol=1e-12)
            if norm:
                assert np.linalg.norm(out[i, c]) == pytest.approx(1.0)
    assert np.all(out[3, 1] == 0.0)


def test_robust_normalisation(stamps):
    X = stamps.copy()
    X[3, 2] = 5.0  # zero deviation: only the median is subtracted
    pre = StampPreprocessor((3, 6, 5), normalize="robust")
    out = pre.fit_transform(flat(X)).reshape(X.shape)
    for i in range(4):
        for c in range(3):
            plane = X[i, c]
            finite = plane[np.isfinite(plane)]
            if not finite.size:
                continue
            med = np.median(finite)
            mad = 1.4826 * np.median(np.abs(finite - med))
            want = (plane - med) / (mad if mad > 0 else 1.0)
            want[~np.isfinite(want)] = 0.0
            np.testing.assert_allclose(out[i, c], want, rtol=1e-12)
    assert np.all(out[3, 2] == 0.0)


def test_background_then_normalise_then_fill(stamps):
    pre = StampPreprocessor(
        (3, 6, 5), crop=(4, 4), background="median", normalize="l2", fill_value=3.0
    )
    out = pre.fit_transform(flat(stamps)).reshape(4, 3, 4, 4)
    plane = stamps[0, 0, 1:5, 0:4]
    z = plane - np.nanmedian(plane)
    z = z / np.sqrt(np.nansum(z**2))
    np.testing.assert_allclose(out[0, 0], np.where(np.isnan(z), 3.0, z), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_dtypes(dtype, stamps):
    X = flat(np.nan_to_num(stamps, posinf=0.0)).astype(dtype)
    out = StampPreprocessor((3, 6, 5), normalize="robust").fit_transform(X)
    assert out.dtype == (np.float32 if dtype == np.float32 else np.float64)
    assert np.isfinite(out).all()


def test_stateless_transform_without_fit(stamps):
    pre = StampPreprocessor((3, 6, 5), crop=(2, 2), normalize="l2")
    np.testing.assert_array_equal(
        pre.transform(flat(stamps)),
        clone(pre).fit(flat(stamps)).transform(flat(stamps)),
    )
    assert pre.__sklearn_tags__().requires_fit is False
    assert pre.__sklearn_tags__().input_tags.allow_nan is True
    with pytest.raises(ValueError, match="crop"):
        StampPreprocessor((3, 6, 5), crop=(9, 9)).transform(flat(stamps))


def test_does_not_modify_input(stamps):
    X = flat(stamps).copy()
    X.setflags(write=False)
    StampPreprocessor((3, 6, 5), background="median", normalize="robust").fit_transform(
        X
    )
    np.testing.assert_array_equal(X, flat(stamps))


def test_feature_names(stamps):
    pre = StampPreprocessor((3, 6, 5), crop=(2, 3), channels=[2]).fit(flat(stamps))
    names = pre.get_feature_names_out()
    assert names.tolist() == [f"ch2_y{y}_x{x}" for y in (2, 3) for x in (1, 2, 3)]
    pd = pytest.importorskip("pandas")
    columns = [f"p{k}" for k in range(90)]
    df = pd.DataFrame(flat(stamps), columns=columns)
    pre = StampPreprocessor((3, 6, 5), crop=(1, 1)).fit(df)
    # the centre pixel (3, 2) of each channel: 30 * c + 5 * 3 + 2
    assert pre.get_feature_names_out().tolist() == ["p17", "p47", "p77"]
    with pytest.raises(ValueError, match="feature_names_in_"):
        pre.get_feature_names_out([f"q{k}" for k in range(90)])


def test_set_output_pandas(stamps):
    pd = pytest.importorskip("pandas")
    pre = StampPreprocessor((3, 6, 5), crop=(2, 2)).set_output(transform="pandas")
    out = pre.fit_transform(flat(stamps))
    assert isinstance(out, pd.DataFrame)
    assert out.shape == (4, 12)
    assert out.columns.tolist() == pre.get_feature_names_out().tolist()
    assert out.columns[0] == "ch0_y2_x1"


@pytest.mark.parametrize(
    "params, n_features, match",
    [
        ({"image_shape": (3, 63, 63)}, 441, r"does not fit X with 441 feature"),
        ({"image_shape": (-1, 4, 4)}, 90, "does not fit X"),
        ({"image_shape": (-1, -1, 5)}, 90, "one -1"),
        ({"image_shape": (2, 3, 3, 5)}, 90, r"\(C, H, W\) or \(H, W\)"),
        ({"image_shape": (3, 0, 30)}, 90, "positive"),
        ({"image_shape": (3, 6.0, 5)}, 90, "integers"),
        ({"crop": (7, 5)}, 90, r"crop=\(7, 5\) is larger than the stamps \(6, 5\)"),
        ({"crop": (3, 3, 3)}, 90, r"crop must be \(h, w\)"),
        ({"channels": [0, 3]}, 90, "channel index 3 is out of range"),
        ({"channels": [-1]}, 90, "out of range"),
        ({"channels": [1, 1]}, 90, "twice"),
        ({"channels": [[0]]}, 90, "list of channel indices"),
        ({"variance_channels": [5]}, 90, "out of range"),
        ({"channels": [0, 1], "variance_channels": [1, 2]}, 90, "also variance"),
        ({"variance_channels": [1, 2]}, 90, "pair one to one"),
        ({"variance_channels": [0, 1, 2]}, 90, "No image channel"),
    ],
)
def test_bad_parameters(params, n_features, match):
    params = {"image_shape": (3, 6, 5), **params}
    X = np.zeros((2, n_features))
    with pytest.raises(ValueError, match=match):
        StampPreprocessor(**params).fit(X)


def test_invalid_parameter_types():
    from sklearn.utils._param_validation import InvalidParameterError

    X = np.zeros((2, 90))
    for params in ({"normalize": "max"}, {"background": "mean"}, {"fill_value": "0"}):
        with pytest.raises(InvalidParameterError):
            StampPreprocessor((3, 6, 5), **params).fit(X)


def test_wrong_number_of_features_after_fit(stamps):
    pre = StampPreprocessor((3, 6, 5)).fit(flat(stamps))
    with pytest.raises(ValueError, match="expecting 90 features"):
        pre.transform(np.zeros((2, 60)))


# --------------------------------------------------------------------------
# real stamps
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ztf_triplets():
    with np.load(shared("ztf_triplets", "ztf_triplets.npz")) as f:
        return f["X"]


def test_pipeline_on_real_ztf_triplets(ztf_triplets):
    X = ztf_triplets.reshape(len(ztf_triplets), -1)
    assert X.shape == (1673, 3 * 63 * 63) and X.dtype == np.float32
    full = StampPreprocessor((3, 63, 63))
    assert (full.n_filled(X) > 0).sum() == 212  # as the data README says
    # 8 templates mark bad pixels with 3.4e38 (in stamps that have NaN too)
    sentinels = np.abs(np.nan_to_num(X)) > 1e30
    assert sentinels.any(1).sum() == 8
    kept = StampPreprocessor((3, 63, 63), max_abs=None).n_filled(X)
    np.testing.assert_array_equal(full.n_filled(X) - kept, sentinels.sum(1))
    pipe = Pipeline(
        [
            ("stamps", StampPreprocessor((3, 63, 63), crop=(21, 21), normalize="l2")),
            ("pca", PCA(n_components=5, random_state=0)),
        ]
    )
    Z = pipe.fit_transform(X)
    assert Z.shape == (1673, 5) and np.isfinite(Z).all()
    Xt = pipe[0].transform(X)
    assert Xt.shape == (1673, 3 * 21 * 21) and Xt.dtype == np.float32
    assert np.isfinite(Xt).all()
    assert pipe[0].output_image_shape_ == (3, 21, 21)
    norms = np.linalg.norm(Xt.reshape(-1, 3, 441), axis=2)
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5)
    np.testing.assert_array_equal(
        Xt.reshape(-1, 3, 21, 21)[:, :, 10, 10] > 0,
        (np.nan_to_num(ztf_triplets[:, :, 31, 31]) > 0),
    )


def test_rubin_stamps_with_variance_planes():
    pytest.importorskip("fastavro")
    pytest.importorskip("pandas")
    from sk_covvae.datasets import read_alerts

    alerts = read_alerts(shared("rubin_alerts"))
    n = len(alerts.frame)
    X = np.concatenate([alerts.images, alerts.variance], axis=1).reshape(n, -1)
    pre = StampPreprocessor((6, 30, 30), variance_channels=[3, 4, 5], crop=(21, 21))
    out = pre.fit_transform(X)
    assert pre.output_image_shape_ == (3, 21, 21) and out.dtype == np.float32
    assert np.isfinite(out).all()
    snr = alerts.images / np.sqrt(alerts.variance)
    np.testing.assert_allclose(
        out.reshape(n, 3, 21, 21), np.nan_to_num(snr[:, :, 5:26, 5:26]), rtol=1e-6
    )
    # the difference in units of its noise: unit spread on the background
    spread = np.median(np.std(out.reshape(n, 3, 21, 21)[:, 2], axis=(1, 2)))
    assert 0.8 < spread < 1.6
