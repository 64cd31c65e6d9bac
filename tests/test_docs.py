"""The documentation builds without a single warning, examples included.

Slow (it runs every example of the gallery, about two minutes on two CPU
cores); skipped when the documentation tools (the ``docs`` extra) are not
installed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("sphinx", "sphinx_gallery", "numpydoc", "myst_parser", "matplotlib"):
    pytest.importorskip(module, reason=f"{module} is needed to build the docs")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.skipif(not (DOCS / "conf.py").is_file(), reason="no docs/conf.py")
def test_docs_build_without_warnings(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"sphinx-build failed (exit {result.returncode}):\n"
        f"{result.stderr[-6000:]}\n{result.stdout[-3000:]}"
    )
    html = tmp_path / "html"
    for page in ("index", "user_guide", "api", "auto_examples/index"):
        assert (html / f"{page}.html").is_file(), page
    for example in sorted((ROOT / "examples").glob("plot_*.py")):
        page = html / "auto_examples" / f"{example.stem}.html"
        assert page.is_file(), example.name
