"""Sphinx configuration: the Markdown pages of docs/ through MyST.

Built by .ci/docs with warnings as errors (sphinx-build -W --keep-going).
"""

project = "apsw_backup"
author = "apsw_backup developers"
copyright = "apsw_backup developers"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Links to a section as [text](page.md#heading-slug) and (#heading-slug).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# The API pages document the installed extension module's docstrings.
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures as written; the types are in the stubs

html_theme = "alabaster"
html_title = "apsw_backup"


def literal_docstring(app, what, name, obj, options, lines):
    """Show a docstring as written (plain text, not reStructuredText)."""
    if lines:
        lines[:] = ["::", "", *("    " + line for line in lines), ""]


def setup(app):
    """A crontab line is highlighted as shell; the tests find it as ```cron."""
    from pygments.lexers.shell import BashLexer

    app.add_lexer("cron", BashLexer)
    app.connect("autodoc-process-docstring", literal_docstring)
