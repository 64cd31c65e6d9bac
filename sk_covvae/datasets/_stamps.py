"""A HiTS-calibrated simulator of real/bogus difference-image stamps.

Everything is vectorised over stamps with numpy. Images are rendered on a
periodic canvas a few pixels larger than the stamp, convolved in Fourier space
(PSF matching, resampling) and cropped, so the edges of the stamp see noise
and sources from outside it.
"""

import numbers
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy.fft as sfft
from sklearn.utils import Bunch, check_random_state

from sk_covvae.datasets import _calibration as cal

#: ``target`` of a real candidate (an astrophysical transient), as in the
#: Deep-HiTS labels; ``target_names[REAL_LABEL]`` is ``'real'``.
REAL_LABEL = 1

#: ``target`` of a bogus candidate (an artefact); ``target_names[BOGUS_LABEL]``
#: is ``'bogus'``.
BOGUS_LABEL = 0

#: The artefact types of bogus candidates, in the order of ``artefact_weights``.
ARTEFACT_TYPES = (
    "dipole",
    "psf_mismatch",
    "saturated_star",
    "cosmic_ray",
    "bad_column",
    "hot_pixel",
    "noise_peak",
    "negative",
)

#: Default share of each artefact type among bogus stamps.
DEFAULT_ARTEFACT_WEIGHTS = {
    "dipole": 0.11,
    "psf_mismatch": 0.11,
    "saturated_star": 0.04,
    "cosmic_ray": 0.18,
    "bad_column": 0.06,
    "hot_pixel": 0.10,
    "noise_peak": 0.34,
    "negative": 0.06,
}

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
_CHUNK = 256  # small chunks keep temporaries in cache
_DESCR_PATH = Path(__file__).parent / "descr" / "difference_stamps.rst"


def _canvas_size(stamp_size):
    """Smallest 2^a 3^b 5^c FFT length leaving a margin of >= 4 px each side."""
    n = stamp_size + 8
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _gauss1d(center, sigma, grid):
    """Unit-sum sampled Gaussians, one per row: shape (n, len(grid))."""
    d = grid[None, :] - center[:, None]
    g = np.exp(-0.5 * d * d / (sigma[:, None] ** 2))
    g /= g.sum(axis=1, keepdims=True)
    return g


def _periodic_kernel_fft(sigma, shift, size):
    """1-D FFT of a periodic Gaussian (width ``sigma``) then linear-interpolation
    kernel (sub-pixel ``shift`` in [0, 1)), shape (n, size), complex.

    The linear-interpolation kernel ``[1 - shift, shift]`` stands for the
    resampling of the template onto the science pixel grid; it is what makes
    white noise correlated between neighbours even without PSF matching.
    """
    offsets = np.fft.fftfreq(size, 1.0 / size)  # 0, 1, ..., -1 (wrapped)
    s = np.maximum(sigma, 1e-3)[:, None]
    g = np.exp(-0.5 * (offsets[None, :] / s) ** 2)
    g /= g.sum(axis=1, keepdims=True)
    k = np.fft.fftfreq(size)
    lin = (1.0 - shift)[:, None] + shift[:, None] * np.exp(-2j * np.pi * k)[None, :]
    return np.fft.fft(g, axis=1) * lin


def _split_lognormal(rng, n, median, low, high, z_level=1.6448536269514722):
    """Draw from a log-normal with different widths below and above the median,
    matched to the given 5th (``low``) and 95th (``high``) percentiles."""
    z = rng.standard_normal(n)
    s_lo = np.log(median / low) / z_level
    s_hi = np.log(high / median) / z_level
    return median * np.exp(np.where(z < 0, s_lo, s_hi) * z)


def _check_params(
    n_samples, real_fraction, stamp_size, artefact_weights, host_fraction
):
    if (
        not isinstance(n_samples, numbers.Integral)
        or isinstance(n_samples, bool)
        or n_samples < 1
    ):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if not isinstance(real_fraction, numbers.Real) or not 0 <= real_fraction <= 1:
        raise ValueError(
            f"real_fraction must be a number in [0, 1], got {real_fraction!r}."
        )
    if (
        not isinstance(stamp_size, numbers.Integral)
        or isinstance(stamp_size, bool)
        or stamp_size < 9
        or stamp_size % 2 == 0
    ):
        raise ValueError(
            "stamp_size must be an odd integer >= 9 (the candidate sits on the "
            f"central pixel), got {stamp_size!r}."
        )
    if not isinstance(host_fraction, numbers.Real) or not 0 <= host_fraction <= 1:
        raise ValueError(
            f"host_fraction must be a number in [0, 1], got {host_fraction!r}."
        )
    if artefact_weights is None:
        artefact_weights = DEFAULT_ARTEFACT_WEIGHTS
    if not isinstance(artefact_weights, dict):
        raise ValueError(
            "artefact_weights must be None or a dict mapping artefact types "
            f"{ARTEFACT_TYPES} to non-negative weights, got {artefact_weights!r}."
        )
    unknown = set(artefact_weights) - set(ARTEFACT_TYPES)
    if unknown:
        raise ValueError(
            f"Unknown artefact type(s) {sorted(unknown)} in artefact_weights; "
            f"valid types are {ARTEFACT_TYPES}."
        )
    w = np.array([float(artefact_weights.get(t, 0.0)) for t in ARTEFACT_TYPES])
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            "artefact_weights must be finite, non-negative and not all zero, "
            f"got {artefact_weights!r}."
        )
    return w / w.sum()


def _allocate(n, weights):
    """Integer counts summing to ``n`` proportional to ``weights`` (largest
    remainders), so that every type with a positive weight appears once n is
    large enough."""
    raw = n * weights
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def make_difference_stamps(
    n_samples=1000,
    *,
    real_fraction=0.5,
    stamp_size=21,
    artefact_weights=None,
    host_fraction=0.4,
    random_state=None,
    return_X_y=False,
):
    """Simulate HiTS-like real/bogus candidates: template, science, difference.

    Each stamp is what a difference-imaging pipeline cuts out around one
    candidate detection, at DECam's 0.27"/pixel. Observing conditions are
    drawn from the HiTS 2015 survey (seeing, sky level, gain, read noise and
    saturation of DECam CCDs; see ``sk_covvae.datasets._calibration``). Both
    exposures get Gaussian PSFs, Poisson (Gaussian-approximated) plus read
    noise; the template is resampled onto the science grid (linear
    interpolation at a random sub-pixel offset) and the sharper of the two
    images is convolved with a Gaussian (Alard-Lupton-style) kernel to match
    the other's PSF before subtraction. The difference noise is therefore
    positively correlated between neighbouring pixels, as in real difference
    imaging.

    *Real* candidates are point sources centred within half a pixel of the
    stamp centre, a share ``host_fraction`` of them on a host galaxy, with
    signal-to-noise ratios like HiTS's real candidates (5/50/95th percentiles
    about 7 / 12 / 45). *Bogus* candidates come from one generator per
    artefact type (``artefact_type``):

    - ``'dipole'``: a star or galaxy whose template is misaligned by 0.3-1.5 px;
    - ``'psf_mismatch'``: a bright star subtracted with a kernel of the wrong
      width and flux scale;
    - ``'saturated_star'``: a saturated star with bleed trails;
    - ``'cosmic_ray'``: a sharp 1-5 pixel track in the science image;
    - ``'bad_column'``: a column offset in the science or template image;
    - ``'hot_pixel'``: a single hot pixel in the science or template image;
    - ``'noise_peak'``: pure background noise conditioned on a PSF-filtered
      signal-to-noise of 5-9 at the centre (a fluctuation above threshold);
    - ``'negative'``: a source that faded since the template (SNR < -5).

    Read more in ``docs/datasets_notes.md``.

    Parameters
    ----------
    n_samples : int, default=1000
        Number of stamps.
    real_fraction : float in [0, 1], default=0.5
        Share of real candidates; ``round(n_samples * real_fraction)`` stamps
        are real, the others bogus, in random order.
    stamp_size : int, default=21
        Side of the square stamps, odd, >= 9.
    artefact_weights : dict or None, default=None
        Relative frequency of each artefact type among bogus stamps (types
        missing from the dict get weight 0). ``None`` uses
        ``DEFAULT_ARTEFACT_WEIGHTS``. Counts are allocated exactly (largest
        remainders), not sampled.
    host_fraction : float in [0, 1], default=0.4
        Probability that a real transient sits on a host galaxy.
    random_state : int, RandomState instance or None, default=None
        Seed; the output is a deterministic function of it.
    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes (``n`` stamps of
        ``s = stamp_size`` pixels a side).

        data : ndarray of shape (n, s * s), float32
            Difference stamps flattened row-major and divided by their
            background noise standard deviation (``noise_sigma``): background
            pixels have unit variance, a source's pixels are in units of the
            noise.
        target : ndarray of shape (n,), int
            ``REAL_LABEL`` (1) for real, ``BOGUS_LABEL`` (0) for bogus.
        artefact_type : ndarray of shape (n,), str
            ``'real'`` or one of ``ARTEFACT_TYPES``.
        template, science, difference : ndarray of shape (n, s, s), float32
            Template resampled to the science grid (sky included), science
            image (sky included), and difference image (PSF-matched, sky
            subtracted), in ADU.
        snr_image : ndarray of shape (n, s, s), float32
            Difference divided by its per-pixel noise standard deviation
            (background plus source Poisson noise).
        snr : ndarray of shape (n,)
            Signal-to-noise ratio of the candidate measured on the difference
            image with a PSF-weighted (optimal) aperture at the stamp centre,
            as a pipeline would report it; the noise correlation is ignored,
            as pipelines do.
        injected_snr : ndarray of shape (n,)
            Expected signal-to-noise of the injected transient (real and
            ``'negative'`` stamps; 0 for the others).
        seeing, template_seeing : ndarray of shape (n,)
            PSF FWHM of the science and template images [arcsec].
        sky : ndarray of shape (n,)
            Sky level of the science image [ADU].
        noise_sigma : ndarray of shape (n,)
            Background noise standard deviation of the difference image [ADU].
        has_host : ndarray of shape (n,), bool
            Whether a static galaxy or star is near the candidate.
        target_names : ndarray of str
            ``['bogus', 'real']``, indexed by ``target``.
        artefact_types : tuple of str
            The bogus types, ``ARTEFACT_TYPES``.
        image_shape : tuple
            ``(stamp_size, stamp_size)``.
        DESCR : str
            Description of the simulation.

    (data, target) : tuple if ``return_X_y`` is True
        ``data`` and ``target`` as above.

    See Also
    --------
    load_hits_chunks : Real Deep-HiTS stamps in the same layout.
    read_alert_cutouts : ZTF alert cutouts.

    References
    ----------
    .. [1] Cabrera-Vives et al. (2017), "Deep-HiTS: Rotation invariant
       convolutional neural network for transient detection", ApJ 836, 97.
    .. [2] Alard & Lupton (1998), "A method for optimal image subtraction",
       ApJ 503, 325.
    .. [3] Förster et al. (2016), "The High Cadence Transient Survey (HiTS).
       I.", ApJ 832, 155.

    Examples
    --------
    >>> from sk_covvae.datasets import make_difference_stamps
    >>> stamps = make_difference_stamps(200, random_state=0)
    >>> stamps.data.shape, stamps.data.dtype
    ((200, 441), dtype('float32'))
    >>> int(stamps.target.sum())
    100
    >>> stamps.difference.shape
    (200, 21, 21)
    >>> X, y = make_difference_stamps(10, random_state=0, return_X_y=True)
    >>> X.shape, y.shape
    ((10, 441), (10,))
    """
    weights = _check_params(
        n_samples, real_fraction, stamp_size, artefact_weights, host_fraction
    )
    # a numpy Generator seeded from the sklearn-style random_state: its
    # ziggurat normal sampler is much faster than RandomState's
    seed = check_random_state(random_state).randint(0, 2**31 - 1, size=4)
    rng = np.random.Generator(np.random.SFC64(seed))

    n_real = int(round(n_samples * real_fraction))
    counts = _allocate(n_samples - n_real, weights)
    # kind: -1 real, k >= 0 index into ARTEFACT_TYPES
    kind = np.concatenate(
        [np.full(n_real, -1)] + [np.full(c, k) for k, c in enumerate(counts)]
    )
    kind = kind[rng.permutation(n_samples)]

    image_shape = (n_samples, stamp_size, stamp_size)
    out = {
        key: np.empty(image_shape, dtype=np.float32)
        for key in ("template", "science", "difference", "snr_image", "data")
    }
    for key in ("snr", "injected_snr", "seeing", "template_seeing", "sky"):
        out[key] = np.empty(n_samples)
    out["noise_sigma"] = np.empty(n_samples)
    out["has_host"] = np.empty(n_samples, dtype=bool)
    for start in range(0, n_samples, _CHUNK):
        chunk = slice(start, min(start + _CHUNK, n_samples))
        dest = {key: value[chunk] for key, value in out.items()}
        _simulate(rng, kind[chunk], stamp_size, host_fraction, dest)

    names = np.array(("real",) + ARTEFACT_TYPES)
    artefact_type = names[kind + 1]
    target = np.where(kind == -1, REAL_LABEL, BOGUS_LABEL).astype(np.int64)
    data = out.pop("data").reshape(n_samples, -1)
    if return_X_y:
        return data, target
    return Bunch(
        data=data,
        target=target,
        artefact_type=artefact_type,
        **out,
        # indexed by label: BOGUS_LABEL = 0, REAL_LABEL = 1
        target_names=np.array(["bogus", "real"]),
        artefact_types=ARTEFACT_TYPES,
        image_shape=(stamp_size, stamp_size),
        DESCR=_DESCR_PATH.read_text(encoding="utf-8"),
    )


def _simulate(rng, kind, stamp_size, host_fraction, dest):
    """Simulate one chunk of stamps into the arrays of ``dest``.

    ``kind`` holds -1 (real) or an index into ``ARTEFACT_TYPES``. Each stage
    below draws from ``rng`` in a fixed order, so that the output is a
    deterministic function of the seed; reordering the stages changes it.
    """
    n = kind.shape[0]
    size = _canvas_size(stamp_size)
    lo = (size - stamp_size) // 2
    c0 = float(lo + stamp_size // 2)  # canvas coordinate of the stamp centre
    grid = np.arange(size, dtype=np.float64)
    is_ = {name: kind == k for k, name in enumerate(ARTEFACT_TYPES)}
    crop = (slice(None), slice(lo, lo + stamp_size), slice(lo, lo + stamp_size))

    obs = _observing_conditions(rng, n)
    match = _psf_matching(rng, obs, is_["psf_mismatch"], size)
    scene = _scene(rng, kind == -1, is_, obs, match, host_fraction, c0)
    sci, tmp = _render(rng, scene, obs, match, is_["saturated_star"], grid)
    sci_var, tmp_var = _add_noise(rng, sci, tmp, obs)
    _add_detector_artefacts(rng, sci, tmp, is_, np.sqrt(obs.var_s), int(c0), grid)
    diff, h_s, h_t = _subtract(sci, tmp, match)

    # per-pixel variance of the difference: local approximation of the
    # convolved variance maps (background plus source Poisson noise)
    var_map = (
        sci_var[crop] * match.ss_s.astype(np.float32)[:, None, None]
        + tmp_var[crop] * match.ss_t.astype(np.float32)[:, None, None]
    )
    snr, weight = _centre_snr(diff[crop], var_map, match.sig_eff)
    _condition_noise_peaks(
        rng, np.flatnonzero(is_["noise_peak"]), diff, snr, weight, obs, h_s, h_t, crop
    )
    _write_chunk(dest, diff[crop], sci, tmp, var_map, snr, lo, obs, match, scene)


def _observing_conditions(rng, n):
    """Draw the observing conditions of both exposures (HiTS 2015 / DECam).

    Returns a namespace of arrays of shape (n,): seeing FWHM [arcsec] and PSF
    sigma [px] of the science (``_s``) and template (``_t``) images, their sky
    levels, gain, read noise [ADU], saturation level, and background
    variances ``var_s``, ``var_t`` [ADU^2] (sky Poisson noise plus read noise).
    """
    u_max = cal.SEEING_MAX_LEVEL
    fwhm_s = cal.draw_from_quantiles(cal.SEEING_FWHM_ARCSEC, u_max * rng.random(n))
    fwhm_t = cal.draw_from_quantiles(cal.SEEING_FWHM_ARCSEC, u_max * rng.random(n))
    sky_s = cal.draw_from_quantiles(cal.SKY_ADU, rng.random(n))
    sky_t = cal.draw_from_quantiles(cal.SKY_ADU, rng.random(n))
    gain = cal.draw_from_quantiles(cal.GAIN, rng.random(n))
    rn_adu = cal.draw_from_quantiles(cal.READ_NOISE, rng.random(n)) / gain
    sat = cal.draw_from_quantiles(cal.SATURATION, rng.random(n))
    return SimpleNamespace(
        fwhm_s=fwhm_s,
        fwhm_t=fwhm_t,
        sig_s=fwhm_s / cal.PIXEL_SCALE * _FWHM_TO_SIGMA,
        sig_t=fwhm_t / cal.PIXEL_SCALE * _FWHM_TO_SIGMA,
        sky_s=sky_s,
        sky_t=sky_t,
        gain=gain,
        rn_adu=rn_adu,
        sat=sat,
        var_s=sky_s / gain + rn_adu**2,
        var_t=sky_t / gain + rn_adu**2,
    )


def _kernel_sum_of_squares(hy, hx, size):
    """Sum of squares of a separable 2-D kernel from its 1-D FFTs (Parseval)."""
    return (np.abs(hy) ** 2).sum(1) * (np.abs(hx) ** 2).sum(1) / size**2


def _psf_matching(rng, obs, mismatch, size):
    """Kernels that convolve the sharper image to the blurrier one's PSF.

    The template's kernels also resample it by a random sub-pixel shift.
    ``'psf_mismatch'`` stamps (``mismatch``) get a kernel of the wrong width
    and flux scale. Returns a namespace: the 1-D FFTs ``hs_y``, ``hs_x``
    (science) and ``ht_y``, ``ht_x`` (template), the shifts, the effective
    PSF sigma ``sig_eff``, the kernels' sums of squares ``ss_s``, ``ss_t``,
    the difference's background noise ``sigma_d`` and ``flux_per_snr``, the
    flux of a centred point source per unit of expected PSF-filtered SNR.
    """
    n = obs.sig_s.shape[0]
    conv_sci = obs.sig_s < obs.sig_t
    sig_eff = np.maximum(obs.sig_s, obs.sig_t)
    k2 = np.abs(obs.sig_s**2 - obs.sig_t**2)
    flux_scale = np.ones(n)
    m = mismatch.sum()
    if m:
        err = rng.uniform(0.12, 0.4, m) * rng.choice([-1.0, 1.0], m)
        k2[mismatch] = np.maximum(k2[mismatch] + err * sig_eff[mismatch] ** 2, 0.0)
        flux_scale[mismatch] = 1.0 + rng.uniform(0.03, 0.1, m) * rng.choice([-1, 1], m)
    sig_k = np.sqrt(k2)
    shift_y, shift_x = rng.random(n), rng.random(n)
    zero = np.zeros(n)
    sk_s = np.where(conv_sci, sig_k, 0.0)
    sk_t = np.where(conv_sci, 0.0, sig_k)
    hs_y = _periodic_kernel_fft(sk_s, zero, size) * flux_scale[:, None]
    hs_x = _periodic_kernel_fft(sk_s, zero, size)
    ht_y = _periodic_kernel_fft(sk_t, shift_y, size)
    ht_x = _periodic_kernel_fft(sk_t, shift_x, size)
    ss_s = _kernel_sum_of_squares(hs_y, hs_x, size)
    ss_t = _kernel_sum_of_squares(ht_y, ht_x, size)
    sigma_d = np.sqrt(obs.var_s * ss_s + obs.var_t * ss_t)
    return SimpleNamespace(
        size=size,
        hs_y=hs_y,
        hs_x=hs_x,
        ht_y=ht_y,
        ht_x=ht_x,
        shift_y=shift_y,
        shift_x=shift_x,
        sig_eff=sig_eff,
        ss_s=ss_s,
        ss_t=ss_t,
        sigma_d=sigma_d,
        flux_per_snr=sigma_d * np.sqrt(4.0 * np.pi) * sig_eff,
    )


def _scene(rng, real, is_, obs, match, host_fraction, c0):
    """Place a static source (both images) and a transient for every stamp.

    Positions are in science-image canvas coordinates; the template's static
    source is offset by the misalignment ``mis_y``, ``mis_x``. Returns a
    namespace of arrays of shape (n,) that :func:`_render` draws. Each type's
    helper fills in only the stamps of that type.
    """
    n = real.shape[0]
    # drawn one after the other, in this order, for every stamp
    st_y = c0 + rng.uniform(-0.5, 0.5, n)
    st_x = c0 + rng.uniform(-0.5, 0.5, n)
    tr_y = c0 + rng.uniform(-0.5, 0.5, n)
    tr_x = c0 + rng.uniform(-0.5, 0.5, n)
    scene = SimpleNamespace(
        st_flux=np.zeros(n),
        st_y=st_y,
        st_x=st_x,
        gal_sy=np.zeros(n),
        gal_sx=np.zeros(n),
        mis_y=np.zeros(n),
        mis_x=np.zeros(n),
        tr_flux_s=np.zeros(n),
        tr_flux_t=np.zeros(n),
        tr_y=tr_y,
        tr_x=tr_x,
        injected=np.zeros(n),
    )
    fps = match.flux_per_snr
    scene.host = _place_real(rng, scene, real, fps, host_fraction, c0)
    _place_dipoles(rng, scene, is_["dipole"], fps, match.sig_eff)
    _place_bright_stars(rng, scene, is_["psf_mismatch"], fps)
    _place_saturated_stars(rng, scene, is_["saturated_star"], obs, c0)
    _place_negatives(rng, scene, is_["negative"], fps)
    return scene


def _place_real(rng, scene, real, flux_per_snr, host_fraction, c0):
    """Real candidates: a point source, a share ``host_fraction`` on a galaxy.

    Returns the boolean mask of the stamps given a host.
    """
    n = real.shape[0]
    snr_real = _split_lognormal(rng, real.sum(), 12.4, 8.2, 50.0)
    scene.injected[real] = snr_real
    scene.tr_flux_s[real] = snr_real * flux_per_snr[real]
    host = real & (rng.random(n) < host_fraction)
    nh = host.sum()
    if nh:
        r = rng.uniform(0.0, 4.0, nh)
        a = rng.uniform(0, 2 * np.pi, nh)
        scene.st_y[host] = c0 + r * np.sin(a)
        scene.st_x[host] = c0 + r * np.cos(a)
        scene.gal_sy[host] = rng.uniform(0.8, 3.0, nh)
        scene.gal_sx[host] = rng.uniform(0.8, 3.0, nh)
        scene.st_flux[host] = rng.uniform(10, 150, nh) * flux_per_snr[host]
        # imperfect registration leaves a faint residual of the host
        r = rng.uniform(0.0, 0.3, nh)
        a = rng.uniform(0, 2 * np.pi, nh)
        scene.mis_y[host] = r * np.sin(a)
        scene.mis_x[host] = r * np.cos(a)
    return host


def _place_dipoles(rng, scene, d, flux_per_snr, sig_eff):
    """Dipoles: a star or galaxy whose template is misaligned by 0.3-1.5 px."""
    nd = d.sum()
    if not nd:
        return
    scene.st_flux[d] = (
        np.exp(rng.uniform(np.log(15), np.log(300), nd)) * flux_per_snr[d]
    )
    ext = rng.random(nd) < 0.4
    scene.gal_sy[d] = np.where(ext, rng.uniform(0.6, 2.0, nd), 0.0)
    scene.gal_sx[d] = np.where(ext, rng.uniform(0.6, 2.0, nd), 0.0)
    r = rng.uniform(0.3, 1.5, nd)
    a = rng.uniform(0, 2 * np.pi, nd)
    scene.mis_y[d] = r * np.sin(a)
    scene.mis_x[d] = r * np.cos(a)
    # the candidate is the positive lobe, about one PSF sigma from the star
    # on the side opposite to the template's offset
    scene.st_y[d] += sig_eff[d] * np.sin(a)
    scene.st_x[d] += sig_eff[d] * np.cos(a)


def _place_bright_stars(rng, scene, m, flux_per_snr):
    """PSF mismatches: a bright star (subtracted with the wrong kernel)."""
    nm = m.sum()
    if nm:
        flux = np.exp(rng.uniform(np.log(40), np.log(600), nm))
        scene.st_flux[m] = flux * flux_per_snr[m]


def _place_saturated_stars(rng, scene, sat_m, obs, c0):
    """Saturated stars: a peak of 1.5-8 x saturation in the science image."""
    nsat = sat_m.sum()
    if not nsat:
        return
    scene.st_y[sat_m] = c0 + rng.uniform(-2, 2, nsat)
    scene.st_x[sat_m] = c0 + rng.uniform(-2, 2, nsat)
    peak = np.exp(rng.uniform(np.log(1.5), np.log(8), nsat)) * obs.sat[sat_m]
    scene.st_flux[sat_m] = peak * 2 * np.pi * obs.sig_s[sat_m] ** 2


def _place_negatives(rng, scene, neg, flux_per_snr):
    """Negatives: a source in the template that has faded (SNR < -5)."""
    nn = neg.sum()
    if nn:
        snr_neg = _split_lognormal(rng, nn, 10.0, 5.5, 40.0)
        scene.injected[neg] = -snr_neg
        scene.tr_flux_t[neg] = snr_neg * flux_per_snr[neg]


def _outer(fy, gy, gx):
    """Images ``fy * gy[:, :, None] * gx[:, None, :]`` in float32, shape (n, a, b)."""
    gy = (fy[:, None] * gy).astype(np.float32)
    return gy[:, :, None] * gx.astype(np.float32)[:, None, :]


def _render(rng, scene, obs, match, sat_m, grid):
    """Noise-free science and template canvases, sky subtracted [ADU].

    The template is rendered shifted by ``-shift - misalignment`` so that
    resampling (in :func:`_psf_matching`'s kernels) brings it back onto the
    science grid. Saturated stars also get bleed trails.
    """
    s, shift_y, shift_x = scene, match.shift_y, match.shift_x

    def gauss(cy, cx, sy, sx):
        return _gauss1d(cy, sy, grid), _gauss1d(cx, sx, grid)

    sy_, sx_ = gauss(
        s.st_y,
        s.st_x,
        np.sqrt(s.gal_sy**2 + obs.sig_s**2),
        np.sqrt(s.gal_sx**2 + obs.sig_s**2),
    )
    ty_, tx_ = gauss(
        s.st_y + s.mis_y - shift_y,
        s.st_x + s.mis_x - shift_x,
        np.sqrt(s.gal_sy**2 + obs.sig_t**2),
        np.sqrt(s.gal_sx**2 + obs.sig_t**2),
    )
    py_s, px_s = gauss(s.tr_y, s.tr_x, obs.sig_s, obs.sig_s)
    py_t, px_t = gauss(s.tr_y - shift_y, s.tr_x - shift_x, obs.sig_t, obs.sig_t)
    sci = _outer(s.st_flux, sy_, sx_) + _outer(s.tr_flux_s, py_s, px_s)
    tmp = _outer(s.st_flux, ty_, tx_) + _outer(s.tr_flux_t, py_t, px_t)
    if sat_m.any():
        _add_bleed_trails(rng, sci, tmp, np.flatnonzero(sat_m), scene, obs, match)
    return sci, tmp


def _add_bleed_trails(rng, sci, tmp, idx, scene, obs, match):
    """Bleed trails along the columns through the saturated stars ``idx``."""
    size = match.size
    grid = np.arange(size, dtype=np.float64)
    st_y, st_x = scene.st_y[idx], scene.st_x[idx]
    for img, cy, cx, frac in (
        (sci, st_y, st_x, 1.0),
        (tmp, st_y - match.shift_y[idx], st_x - match.shift_x[idx], 0.6),
    ):
        half = frac * rng.uniform(2, size / 2, idx.size)
        rows = np.abs(grid[None, :] - cy[:, None]) <= half[:, None]
        col = np.rint(cx).astype(int) % size
        trail = rows * (1.2 * obs.sat[idx])[:, None]
        img[idx, :, col] += trail
        col2 = (col + rng.choice([-1, 1], idx.size)) % size
        img[idx, :, col2] += trail * rng.uniform(0, 0.8, idx.size)[:, None]


def _add_noise(rng, sci, tmp, obs):
    """Add Poisson (Gaussian approximation) and read noise, then saturate.

    Modifies ``sci`` and ``tmp`` in place and returns their variance maps
    [ADU^2]; sources are >= 0, so the variance needs no clipping.
    """
    inv_gain = (1.0 / obs.gain).astype(np.float32)[:, None, None]
    bg_s = (obs.sky_s / obs.gain + obs.rn_adu**2).astype(np.float32)[:, None, None]
    bg_t = (obs.sky_t / obs.gain + obs.rn_adu**2).astype(np.float32)[:, None, None]
    sci_var = sci * inv_gain + bg_s
    tmp_var = tmp * inv_gain + bg_t
    sci += np.sqrt(sci_var) * rng.standard_normal(sci.shape, dtype=np.float32)
    tmp += np.sqrt(tmp_var) * rng.standard_normal(tmp.shape, dtype=np.float32)
    np.minimum(sci, (obs.sat - obs.sky_s)[:, None, None], out=sci)
    np.minimum(tmp, (obs.sat - obs.sky_t)[:, None, None], out=tmp)
    return sci_var, tmp_var


def _add_detector_artefacts(rng, sci, tmp, is_, amp_unit, ic, grid):
    """Cosmic rays, hot pixels and bad columns, added after the noise.

    ``amp_unit`` (the science background noise) scales their amplitudes;
    ``ic`` is the canvas index of the stamp's central pixel.
    """
    cr = np.flatnonzero(is_["cosmic_ray"])
    if cr.size:
        length = rng.uniform(0, 4, cr.size)
        ang = rng.uniform(0, np.pi, cr.size)
        amp = np.exp(rng.uniform(np.log(5), np.log(100), cr.size)) * amp_unit[cr]
        t = np.linspace(-0.5, 0.5, 6)[None, :] * length[:, None]
        yy = np.rint(ic + t * np.sin(ang)[:, None]).astype(int)
        xx = np.rint(ic + t * np.cos(ang)[:, None]).astype(int)
        prof = rng.uniform(0.5, 1.0, yy.shape) * amp[:, None]
        # a pixel hit twice by the track keeps one deposit, not two
        for j in range(yy.shape[1]):
            sci[cr, yy[:, j], xx[:, j]] = np.maximum(
                sci[cr, yy[:, j], xx[:, j]], prof[:, j]
            )
    hp = np.flatnonzero(is_["hot_pixel"])
    if hp.size:
        in_sci = rng.random(hp.size) < 0.8
        amp = np.exp(rng.uniform(np.log(6), np.log(200), hp.size)) * amp_unit[hp]
        sci[hp[in_sci], ic, ic] += amp[in_sci]
        tmp[hp[~in_sci], ic, ic] -= amp[~in_sci]  # a dead template pixel looks positive
    bc = np.flatnonzero(is_["bad_column"])
    if bc.size:
        in_sci = rng.random(bc.size) < 0.7
        col = ic + rng.integers(-1, 2, bc.size)
        amp = rng.uniform(2.0, 15.0, bc.size) * amp_unit[bc]
        start = rng.integers(0, grid.size // 2, bc.size)
        prof = (grid[None, :] >= start[:, None]) * amp[:, None]
        sci[bc[in_sci], :, col[in_sci]] += prof[in_sci]
        tmp[bc[~in_sci], :, col[~in_sci]] -= prof[~in_sci]


def _subtract(sci, tmp, match):
    """Resample the template, match PSFs and subtract, in Fourier space.

    Returns the difference canvas and the 2-D half-spectrum kernels ``h_s``,
    ``h_t`` (complex64) applied to the science image and the template.
    """
    size = match.size
    nr = size // 2 + 1
    c64 = np.complex64
    h_s = match.hs_y.astype(c64)[:, :, None] * match.hs_x[:, None, :nr].astype(c64)
    h_t = match.ht_y.astype(c64)[:, :, None] * match.ht_x[:, None, :nr].astype(c64)
    diff = sfft.irfft2(sfft.rfft2(sci) * h_s - sfft.rfft2(tmp) * h_t, s=(size, size))
    return diff, h_s, h_t


def _centre_snr(diff, var_map, sig_eff):
    """PSF-weighted (optimal-aperture) SNR at the stamp centre, and its weights.

    Pipelines ignore the noise correlation in this measure, so it does too.
    ``diff`` and ``var_map`` are cropped stamps of shape (n, s, s).
    """
    n, stamp_size = diff.shape[0], diff.shape[1]
    sgrid = np.arange(stamp_size, dtype=np.float64)
    centre = np.full(n, float(stamp_size // 2))
    g = _gauss1d(centre, sig_eff, sgrid)
    psf = _outer(np.ones(n), g, g)
    norm = np.sqrt((var_map * psf**2).sum(axis=(1, 2), dtype=np.float64))
    weight = psf * (1.0 / norm).astype(np.float32)[:, None, None]
    snr = (diff * weight).sum(axis=(1, 2), dtype=np.float64)
    return snr, weight


def _condition_noise_peaks(rng, npk, diff, snr, weight, obs, h_s, h_t, crop):
    """Condition the background noise of stamps ``npk`` on an SNR of 5-9.

    Adds to ``diff`` (canvas) the conditional mean shift of a Gaussian field
    given its PSF-filtered value, using the field's power spectrum; updates
    ``snr`` in place.
    """
    if not npk.size:
        return
    size = diff.shape[-1]
    target = 5.0 + rng.exponential(2.5, npk.size)
    w = np.zeros((npk.size, size, size))
    w[crop] = weight[npk]
    power = obs.var_s[npk, None, None] * np.abs(h_s[npk]) ** 2
    power += obs.var_t[npk, None, None] * np.abs(h_t[npk]) ** 2
    cw = sfft.irfft2(sfft.rfft2(w) * power, s=(size, size))
    wcw = (w * cw).sum(axis=(1, 2))
    diff[npk] += ((target - snr[npk]) / wcw)[:, None, None] * cw
    snr[npk] = target


def _write_chunk(dest, diff, sci, tmp, var_map, snr, lo, obs, match, scene):
    """Write a chunk's stamps and per-stamp values into the arrays of ``dest``.

    ``diff`` and ``var_map`` are cropped; ``var_map`` is overwritten.
    """
    stamp_size = diff.shape[-1]
    dest["difference"][...] = diff
    # resampled template (linear interpolation, as in the kernels of
    # _periodic_kernel_fft), in real space on the crop only: cheaper than
    # another inverse FFT
    wy = match.shift_y.astype(np.float32)[:, None, None]
    wx = match.shift_x.astype(np.float32)[:, None, None]
    rows, rows_up = slice(lo, lo + stamp_size), slice(lo - 1, lo + stamp_size - 1)
    cols, cols_left = rows, rows_up
    tmp_rs = (1 - wy) * ((1 - wx) * tmp[:, rows, cols] + wx * tmp[:, rows, cols_left])
    tmp_rs += wy * ((1 - wx) * tmp[:, rows_up, cols] + wx * tmp[:, rows_up, cols_left])
    sky_t, sky_s = obs.sky_t.astype(np.float32), obs.sky_s.astype(np.float32)
    np.add(tmp_rs, sky_t[:, None, None], out=dest["template"])
    np.add(sci[:, rows, cols], sky_s[:, None, None], out=dest["science"])
    np.sqrt(var_map, out=var_map)
    np.divide(diff, var_map, out=dest["snr_image"])
    inv_sigma = (1.0 / match.sigma_d).astype(np.float32)
    np.multiply(diff, inv_sigma[:, None, None], out=dest["data"])
    dest["snr"][...] = snr
    dest["injected_snr"][...] = scene.injected
    dest["seeing"][...] = obs.fwhm_s
    dest["template_seeing"][...] = obs.fwhm_t
    dest["sky"][...] = obs.sky_s
    dest["noise_sigma"][...] = match.sigma_d
    dest["has_host"][...] = scene.host | (scene.st_flux > 0)
