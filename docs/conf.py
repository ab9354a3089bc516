"""Sphinx configuration for the collage_optax documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import collage_optax  # noqa: E402

project = "collage_optax"
author = "collage_optax authors"
copyright = "2024, collage_optax authors"  # pylint: disable=redefined-builtin
release = collage_optax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    # MathJax from the site itself, not a CDN: the formulas render offline.
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "sphinx_book_theme"
html_title = "collage_optax"
html_theme_options = {
    "repository_url": "https://github.com/collage-optax/collage_optax",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "home_page_in_toc": True,
}
