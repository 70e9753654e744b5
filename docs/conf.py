"""Sphinx configuration for spheretorch's documentation.

Built with ``-n -W`` (nitpicky, warnings are errors): every cross-reference must resolve.
The site must read well offline, so MathJax is served from the build itself
(``sphinx-mathjax-offline``), never from a CDN; ``docs/check_site.py`` verifies that in a browser.
"""

import os
import sys

import torch
from sphinx.util.inspect import signature

sys.path.insert(0, os.path.abspath(".."))

project = "spheretorch"
author = "spheretorch developers"
copyright = "2026, spheretorch developers"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # Ships MathJax 3 and points mathjax_path at the copy in _static/mathjax/ (no network).
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
]

# Notebooks are rendered from their committed outputs; the test suite executes them.
nb_execution_mode = "off"
# A loop that prints one line at a time leaves one stream output per line: show them as one.
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# "members" is given per directive in api.rst: a default of True would override an explicit
# ``:members: a, b`` list (Sphinx 9 takes a non-string default over the directive's value).
autodoc_default_options = {"show-inheritance": True}

# Annotations are strings (``from __future__ import annotations``); our option types appear in
# them by their short names. Mapping them to full paths makes those type hints link.
autodoc_type_aliases = {
    "NonfinitePolicy": "spheretorch.optim.NonfinitePolicy",
    "SecondMoment": "spheretorch.optim.riemannian_adam.SecondMoment",
    "Retraction": "spheretorch.optim.riemannian_adam.Retraction",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Nitpicky mode checks every reference. Without network intersphinx cannot fetch the
# inventories of the libraries we build on, so references into them (and only into them)
# render as plain text instead of links. spheretorch's own names are never ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|matplotlib|geoopt)(\..+)?"),
    (r"py:.*", r"(collections\.abc|typing|os|pathlib|enum|contextlib)\..+"),
]
# The same third-party classes where an annotation that cannot be evaluated stays a string
# naming them as imported (``Tensor`` from ``from torch import Tensor``; matplotlib's
# ``Figure`` is imported only for type checking, so those annotations never evaluate).
nitpick_ignore = [("py:class", name) for name in ("Tensor", "nn.Module", "Figure")]

# The command line on the API page: sections titled "spheretorch train", not "train".
sphinxarg_full_subcommand_name = True

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = "spheretorch"
html_static_path = ["_static"]
html_css_files = ["spheretorch.css"]


def _evaluate_init_annotations(app, obj, bound_method):
    """Give ``__init__`` the evaluated signature autodoc computes for functions.

    With ``from __future__ import annotations`` every annotation is a string. autodoc evaluates
    them for functions and methods, but the parameter types it lists under a class come from
    the class itself, where ``__init__``'s strings stay raw: ``kind (Kind)`` instead of
    ``Literal['char', 'byte']``, a reference that cannot resolve.
    """
    if getattr(obj, "__name__", "") != "__init__":
        return
    if not getattr(obj, "__module__", "").startswith("spheretorch"):
        return
    if "__signature__" in getattr(obj, "__dict__", {}):
        return
    if any(isinstance(a, str) for a in getattr(obj, "__annotations__", {}).values()):
        obj.__signature__ = signature(obj, type_aliases=app.config.autodoc_type_aliases)


def _skip_torch_docstrings(app, what, name, obj, skip, options):
    """Leave out overrides of torch's methods that have no docstring of their own.

    autodoc would show torch's docstring for them (``forward``, ``extra_repr``): written for
    torch's class and full of references into torch. Docstrings inherited from spheretorch's
    own base classes are kept.
    """
    if (
        what == "class"
        and getattr(obj, "__doc__", "") is None
        and getattr(obj, "__module__", "").startswith("spheretorch")
        and (hasattr(torch.nn.Module, name) or hasattr(torch.optim.Optimizer, name))
    ):
        return True
    return None


def setup(app):
    app.connect("autodoc-before-process-signature", _evaluate_init_annotations)
    app.connect("autodoc-skip-member", _skip_torch_docstrings)

# Option names such as --out must stay two hyphens in the CLI reference (no en dash).
smartquotes = False
