"""Provenance of a run (machine, versions, git revision) and Markdown tables.

:func:`provenance` gathers what a result needs beside it to be compared or
reproduced: the CPU, operating system, Python and package versions, the git
revision of the source tree, torch's thread count and the CUDA devices.
:func:`show_versions` prints it, in the manner of :func:`sklearn.show_versions`.
The ``covvae`` command line and the benchmark suite record it with their
results, and both write their tables with :func:`markdown_table`.
"""

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = [
    "describe_source",
    "git_revision",
    "markdown_table",
    "provenance",
    "show_versions",
]

# The directory holding the ``sk_covvae`` package: the root of a checkout.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_PACKAGE = Path(__file__).resolve().parent.name
# Distributions whose versions are recorded, by the name they are known by.
_DEPENDENCIES = {
    "skorch": "skorch",
    "sklearn": "scikit-learn",
    "numpy": "numpy",
    "scipy": "scipy",
}
_GIT_TIMEOUT_S = 10
# Sections of show_versions' output, and the keys of provenance() each holds.
_SECTIONS = {
    "System": (
        "python",
        "executable",
        "platform",
        "machine",
        "cpu_model",
        "cpu_count",
        "cpus_available",
    ),
    "Python dependencies": ("sk_covvae", "torch", *_DEPENDENCIES),
    "Source": ("git_revision", "git_modified"),
    "Torch": ("torch_threads", "cuda_devices"),
}


def _cpu_model():
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args):
    """Output of one git command in the source tree; raises if git fails."""
    # GIT_OPTIONAL_LOCKS=0: `git status` would otherwise refresh the index
    # and take its lock, which can fail a commit made at the same time.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(
        ["git", "-C", str(_SOURCE_ROOT), *args],
        capture_output=True,
        text=True,
        timeout=_GIT_TIMEOUT_S,
        check=True,
        env=env,
    ).stdout.strip()


def git_revision():
    """Git revision of the ``sk_covvae`` sources, if they are a git checkout.

    This is the only place where the package calls git. Each call is limited
    to 10 seconds; any failure (git absent, not a checkout, a repository
    git refuses to read) gives None.

    Returns
    -------
    revision : dict or None
        ``commit`` (short hash of ``HEAD``) and ``modified`` (whether tracked
        files of the package differ from it), or None when the package is not
        tracked by git, e.g. installed in ``site-packages``.
    """
    try:
        # An installed copy may sit inside some other repository (a virtual
        # environment in a checkout): only tracked sources count.
        _git("ls-files", "--error-unmatch", "--", f"{_PACKAGE}/__init__.py")
        commit = _git("rev-parse", "--short", "HEAD")
        changes = _git("status", "--porcelain", "--untracked-files=no", "--", _PACKAGE)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": bool(changes)}


def _version(distribution):
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def provenance():
    """Machine, versions and source revision of the running process.

    Returns
    -------
    info : dict
        ``python`` (version), ``executable``, ``platform`` (operating system,
        from :func:`platform.platform`), ``machine`` (architecture),
        ``processor`` (:func:`platform.processor`, often empty on Linux),
        ``cpu_model``, ``cpu_count`` (logical CPUs), ``cpus_available`` (those
        this process may run on); the versions of ``sk_covvae``, ``torch``,
        ``skorch``, ``sklearn``, ``numpy`` and ``scipy`` (None if not
        installed); ``git_revision`` and ``git_modified`` (see
        :func:`git_revision`; None when not a checkout); ``torch_threads``
        (:func:`torch.get_num_threads`) and ``cuda_devices`` (names, empty
        without CUDA).

    See Also
    --------
    show_versions : Print this.

    Examples
    --------
    >>> from sk_covvae._show_versions import provenance
    >>> info = provenance()
    >>> info["torch_threads"] >= 1
    True
    """
    import torch

    import sk_covvae

    git = git_revision()
    if hasattr(os, "sched_getaffinity"):
        cpus_available = len(os.sched_getaffinity(0))
    else:
        cpus_available = os.cpu_count()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": cpus_available,
        "sk_covvae": sk_covvae.__version__,
        # torch's own string names the build (+cpu, +cu128) as it runs
        "torch": torch.__version__,
        **{name: _version(dist) for name, dist in _DEPENDENCIES.items()},
        "git_revision": None if git is None else git["commit"],
        "git_modified": None if git is None else git["modified"],
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
        if torch.cuda.is_available()
        else [],
    }


def describe_source(info):
    """The package version and, from a checkout, its git revision, as text.

    Parameters
    ----------
    info : dict
        As returned by :func:`provenance`.

    Returns
    -------
    str
        For example ``'0.1.0 (git 0192e29, modified)'``, or ``'0.1.0'``.

    Examples
    --------
    >>> from sk_covvae._show_versions import describe_source
    >>> describe_source({"sk_covvae": "0.1.0", "git_revision": "0192e29",
    ...                  "git_modified": True})
    '0.1.0 (git 0192e29, modified)'
    """
    text = info["sk_covvae"]
    if info.get("git_revision"):
        modified = ", modified" if info.get("git_modified") else ""
        text += f" (git {info['git_revision']}{modified})"
    return text


def show_versions():
    """Print the machine, versions and source revision, for bug reports.

    The same information as :func:`provenance`, grouped as
    :func:`sklearn.show_versions` groups it.

    Examples
    --------
    >>> from sk_covvae._show_versions import show_versions
    >>> show_versions()  # doctest: +ELLIPSIS
    <BLANKLINE>
    System:
    ...
    """
    info = provenance()
    for section, keys in _SECTIONS.items():
        print(f"\n{section}:")
        for key in keys:
            print(f"{key:>16}: {info[key]}")


def _escape(text):
    # A bare "|" would end the cell, and a header whose cell count differs
    # from the delimiter row's is not a table at all.
    return str(text).replace("|", r"\|").replace("\n", " ")


def markdown_table(rows, columns):
    """A GitHub-flavoured Markdown table, one line per row.

    Parameters
    ----------
    rows : iterable of dict
        One dict per line of the table.
    columns : sequence of tuple
        ``(title, key)`` or ``(title, key, format)`` per column: its header,
        the key of its cells in each row, and how to write a value, either a
        format specification (``'.3f'``) or a callable returning a str;
        ``str`` by default. A missing key or None is written ``'–'``. A
        ``'|'`` in a header or a cell is escaped.

    Returns
    -------
    table : str
        The header, the delimiter row and one line per row, without a final
        newline.

    Examples
    --------
    >>> from sk_covvae._show_versions import markdown_table
    >>> print(markdown_table([{"model": "banded", "auc": 0.91234}, {"model": "x|y"}],
    ...                      [("model", "model"), ("ROC AUC", "auc", ".3f")]))
    | model | ROC AUC |
    |---|---|
    | banded | 0.912 |
    | x\\|y | – |
    """
    columns = [(column + (str,))[:3] for column in map(tuple, columns)]
    lines = [
        "| " + " | ".join(_escape(title) for title, _, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("–")
            elif callable(fmt):
                cells.append(_escape(fmt(value)))
            else:
                cells.append(_escape(format(value, fmt)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
