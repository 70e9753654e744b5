"""Sphinx configuration for spheretorch's documentation (built with -W: warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "spheretorch"
author = "spheretorch developers"
copyright = "2026, spheretorch developers"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Notebooks are rendered from their committed outputs; the test suite executes them.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = "spheretorch"
