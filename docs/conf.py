"""Sphinx configuration of the gim_scvi documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` after
``pip install -e ".[docs]"``. The tutorials are rendered from the outputs stored in the
notebooks of ``tutorials/`` (they are not executed here).
"""

import shutil
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent

# the notebooks live in tutorials/ at the repository root; Sphinx reads sources only from
# docs/, so they are copied next to the pages that link to them (docs/tutorials is ignored)
_TUTORIALS = HERE / "tutorials"
shutil.rmtree(_TUTORIALS, ignore_errors=True)
_TUTORIALS.mkdir()
for _notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
    shutil.copy2(_notebook, _TUTORIALS / _notebook.name)

project = "gim_scvi"
author = "gim_scvi developers"
copyright = f"{date.today():%Y}, {author}"
release = _version("gim_scvi")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# MyST and notebooks: render the stored outputs, never execute
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"

# API reference from the numpydoc docstrings; types come from the signatures
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True

html_theme = "sphinx_book_theme"
html_title = "gim_scvi"
html_static_path = ["_static"]
html_theme_options = {"show_toc_level": 2}
