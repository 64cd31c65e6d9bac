"""Imports of optional dependencies, with the extra that installs them."""

import importlib


def require(module, what, package=None, extra="astro"):
    """Import ``module`` for ``what``, or say which extra installs it.

    Parameters
    ----------
    module : str
        Module to import, e.g. ``'pyarrow.parquet'``.
    what : str
        What needs it, the start of the error message.
    package : str or None, default=None
        The package to name when it is not ``module``.
    extra : str, default='astro'
        The extra of ``sk_covvae`` that installs it.

    Returns
    -------
    module

    Raises
    ------
    ImportError
        ``"<what> needs the optional dependency <package>: pip install
        sk_covvae[<extra>]"``, chained to the original error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{what} needs the optional dependency {package or module}: "
            f"pip install sk_covvae[{extra}]"
        ) from exc
