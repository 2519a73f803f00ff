"""Sphinx configuration: `make docs` builds the site into docs/_build/html with warnings as errors."""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
# This folder's own Sphinx extensions, and the repository root for `benchmarks.tables` (the results tables).
sys.path[:0] = [str(DOCS / "_ext"), str(DOCS.parent)]

import optax_lamb16  # noqa: E402

project = "optax_lamb16"
author = "The optax_lamb16 authors"
copyright = "2026, the optax_lamb16 authors"
release = optax_lamb16.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "api_coverage",
  "results_tables",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_ext", "results/*.md", "README.md"]
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False


html_theme = "furo"
html_title = "optax_lamb16"
nitpicky = False
