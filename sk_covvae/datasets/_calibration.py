"""Observing conditions of the HiTS 2015 survey, reduced to a few quantile tables.

The numbers below were derived once, at development time, from the files in
``../shared/data/hits/`` (public repository ``rodrigcd/HiTS_simulations``, MIT
licence; Förster et al. 2016, ApJ 832, 155; Carrasco-Davis et al. 2019, PASP
131, 108001). Only these summary statistics are kept; the package never needs
the original files. Each table holds the 0, 5, 10, ..., 100th percentiles
(:data:`QUANTILE_LEVELS`) of one quantity, and the simulator draws from it by
inverse-CDF interpolation (:func:`draw_from_quantiles`). Quantities are drawn
independently of each other.

How each table was computed (see also ``docs/datasets_notes.md``):

``SEEING_FWHM_ARCSEC``
    ``numpy.quantile(seeing, QUANTILE_LEVELS)`` over all 1,626 rows of
    ``hits2015_observing_conditions.csv`` (49 Blind15A fields, DECam, mostly
    g band); FWHM in arcsec (5/50/95th percentiles 1.07 / 1.37 / 2.60).
``SKY_ADU``
    quantiles of ``sky_brightness`` [ADU per pixel, sky not subtracted, 86 s
    g-band exposures] over the 2,081 non-empty epochs of
    ``hits2015_sn_science_stamps.npz``.
``GAIN``, ``READ_NOISE``, ``SATURATION``
    quantiles of the ``gain`` [e-/ADU], ``read_noise`` [e-] and ``saturation``
    [ADU] columns over the 47 CCDs of ``decam_ccd_parameters.csv``.
``SKY_SIGMA_MEDIAN``
    median ``sky_sigma`` [ADU] of the same 2,081 stamps, used only to check
    that ``sqrt(sky / gain + (read_noise / gain) ** 2)`` reproduces the
    observed background noise.
``REAL_SNR_PERCENTILES``, ``BOGUS_SNR_PERCENTILES``
    5/50/95th percentiles of the signal-to-noise ratio of the Deep-HiTS test
    set (100,000 candidates), as quoted in ``../shared/data/README.md``.
"""

import numpy as np

#: Pixel scale of DECam [arcsec / pixel].
PIXEL_SCALE = 0.27

#: Probability levels of every quantile table below.
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 21)

SEEING_FWHM_ARCSEC = np.array(
    [0.9814, 1.0699, 1.1448, 1.1846, 1.2177, 1.2312, 1.2501, 1.2771, 1.3014,
     1.3365, 1.3730, 1.4280, 1.5012, 1.5856, 1.7064, 1.8171, 1.9359, 2.0709,
     2.2410, 2.6021, 4.4280]
)  # fmt: skip

SKY_ADU = np.array(
    [91.895, 97.698, 99.246, 102.235, 104.931, 106.565, 108.091, 109.052,
     110.476, 112.486, 113.405, 113.900, 116.070, 117.607, 118.959, 120.578,
     122.846, 124.485, 128.279, 131.833, 133.522]
)  # fmt: skip

GAIN = np.array(
    [3.7430, 3.7506, 3.8026, 3.8363, 3.8522, 3.8735, 3.8914, 3.9114, 3.9364,
     3.9447, 3.9520, 3.9729, 3.9916, 3.9989, 4.0064, 4.0145, 4.0258, 4.0697,
     4.0868, 4.1208, 4.4350]
)  # fmt: skip

READ_NOISE = np.array(
    [5.4648, 5.7345, 5.7556, 5.8241, 5.8421, 5.8859, 5.9182, 5.9321, 5.9422,
     5.9558, 5.9705, 6.0209, 6.0573, 6.1105, 6.1231, 6.1588, 6.2483, 6.6565,
     10.2721, 11.9485, 12.6885]
)  # fmt: skip

SATURATION = np.array(
    [33874.0, 38937.0, 40388.6, 40681.6, 41350.4, 43153.5, 43279.8, 44014.4,
     44277.4, 44903.5, 45246.0, 46075.3, 46386.0, 46439.3, 46647.8, 47000.0,
     47455.8, 48064.9, 49653.0, 50305.4, 51319.0]
)  # fmt: skip

SKY_SIGMA_MEDIAN = 5.444

REAL_SNR_PERCENTILES = (7.0, 12.4, 44.8)
BOGUS_SNR_PERCENTILES = (-19.7, 6.9, 28.6)

#: Seeing draws are restricted to this upper probability level: the worst 5%
#: of nights (FWHM > 2.6", i.e. > 9.6 pixels) give PSFs too wide for a
#: 21-pixel stamp.
SEEING_MAX_LEVEL = 0.95


def draw_from_quantiles(table, u):
    """Inverse-CDF draw: map uniform numbers ``u`` through a quantile table.

    Parameters
    ----------
    table : ndarray of shape (21,)
        Quantiles at :data:`QUANTILE_LEVELS`.
    u : ndarray
        Uniform numbers in [0, 1].

    Returns
    -------
    values : ndarray, same shape as ``u``
        Piecewise-linear interpolation of the quantile function.

    Examples
    --------
    >>> from sk_covvae.datasets._calibration import GAIN, draw_from_quantiles
    >>> float(draw_from_quantiles(GAIN, 0.5))
    3.952
    """
    return np.interp(u, QUANTILE_LEVELS, table)
