"""Sphinx configuration of the sk_covvae documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
from the repository root. The build executes every ``examples/plot_*.py``
(sphinx-gallery) and needs no network: intersphinx is not used.
"""

import os
import re
import sys
from pathlib import Path

import numpydoc.xref

import sk_covvae

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# The gallery runs on whatever machine builds the docs: keep it on the CPU's
# default backend and never open a window.
os.environ.setdefault("MPLBACKEND", "Agg")

# -- Project -----------------------------------------------------------------
project = "sk_covvae"
author = "The sk_covvae developers"
copyright = "The sk_covvae developers"
release = sk_covvae.__version__
version = release

# -- General -----------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    # sphinx-gallery writes these next to the generated pages; they are not
    # documents.
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "auto_examples/*.zip",
    "auto_examples/*.md5",
    "auto_examples/*.pickle",
    "auto_examples/*.codeobj.json",
]
# Every Markdown page of docs/ that is not in a toctree (e.g. notes next to
# figures) stays out of the build instead of warning.
exclude_patterns += ["figures/**"]

# A cross-reference that does not resolve (e.g. to sklearn or torch, with
# intersphinx off) is rendered as plain text rather than warned about.
nitpicky = False
default_role = "literal"

# -- autodoc / autosummary / numpydoc -----------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {
    "members": True,
    # Show what CovarianceVAE inherits from scikit-learn (get_params,
    # set_output, fit_transform, ...) but not the torch machinery that the
    # distributions inherit from torch.distributions.Distribution.
    "inherited-members": "Distribution",
    "member-order": "bysource",
    # Distribution.expand's inherited (Google-style) docstring is not valid
    # numpydoc; the method is torch plumbing, not part of our API.
    "exclude-members": "expand",
}
autodoc_typehints = "none"
autoclass_content = "class"

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
# Parameter types link the names numpydoc knows (ndarray, int, ...) and are
# plain text otherwise. numpydoc's default aliases point to the glossaries
# of Python and NumPy through intersphinx, which is off: link them as plain
# (unresolved, silent) object names instead.
numpydoc_xref_param_type = True
numpydoc_xref_ignore = "all"
numpydoc_xref_aliases = {
    name: name
    for name, target in numpydoc.xref.DEFAULT_LINKS.items()
    if target.startswith(":")
}


_SKLEARN_REF = re.compile(r":ref:`([^`<]+?)\s*<[^`>]+>`|:ref:`([^`]+)`")


def _unlink_sklearn_refs(app, what, name, obj, options, lines):
    """Render ``:ref:`` roles in docstrings inherited from scikit-learn as text.

    Methods that CovarianceVAE inherits (``set_output``,
    ``get_metadata_routing``) point to labels of scikit-learn's own user
    guide, which do not exist here (and intersphinx is off).
    """
    module = getattr(obj, "__module__", None) or ""
    if not module.startswith("sklearn"):
        return
    for i, line in enumerate(lines):
        lines[i] = _SKLEARN_REF.sub(lambda m: m.group(1) or m.group(2), line)


# "name_" in reST is a link to a target "name"; in a numpydoc type it is a
# fitted attribute, e.g. "ndarray of shape (n_samples, n_features_in_)".
_PARAM_LINE = re.compile(r"^(\s*[\w*][\w, *]* : )(.*)$")
_TRAILING_UNDERSCORE = re.compile(r"(?<![`\w])(\w+_)(?![`\w])")


def _quote_fitted_attributes_in_types(app, what, name, obj, options, lines):
    """Quote ``name_`` words in the type of parameters, returns, attributes."""
    for i, line in enumerate(lines):
        match = _PARAM_LINE.match(line)
        if match:
            head, kind = match.groups()
            lines[i] = head + _TRAILING_UNDERSCORE.sub(r"``\1``", kind)


def setup(app):
    # Before numpydoc (priority 500) parses the docstring.
    app.connect("autodoc-process-docstring", _unlink_sklearn_refs, priority=400)
    app.connect(
        "autodoc-process-docstring", _quote_fitted_attributes_in_types, priority=400
    )


# -- MyST (Markdown pages) ----------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Pages written as GitHub Markdown start at "#" and may skip a level or link
# to files of the repository outside docs/; neither is an error of the site.
suppress_warnings = ["myst.header", "myst.xref_missing"]

# -- sphinx-gallery -----------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(HERE.parent / "examples"),
    "gallery_dirs": str(HERE / "auto_examples"),
    # Execute every example, on every build, so a broken example fails the
    # build (-W) rather than showing stale output.
    "filename_pattern": r"/plot_",
    "run_stale_examples": True,
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    "plot_gallery": "True",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "doc_module": ("sk_covvae",),
    "backreferences_dir": str(HERE / "generated" / "backreferences"),
    "reference_url": {"sk_covvae": None},
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "show_memory": False,
    "min_reported_time": 1,
}

# -- HTML ---------------------------------------------------------------------
try:
    import pydata_sphinx_theme  # noqa: F401
except ImportError:
    html_theme = "alabaster"
else:
    html_theme = "pydata_sphinx_theme"
    html_theme_options = {
        "navigation_with_keys": False,
        "show_toc_level": 2,
        "secondary_sidebar_items": ["page-toc"],
        "footer_start": ["copyright"],
        "footer_end": ["sphinx-version"],
    }
html_title = f"sk_covvae {release}"
html_show_sourcelink = False
