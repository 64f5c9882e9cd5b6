"""Griffe extension for the API reference: read functx's docstrings as written.

The docstrings follow the Google style with three habits from Sphinx that griffe does not read
by itself: an ``Example:`` section (griffe knows only ``Examples:``, and would render the
doctest prompts ``>>>`` as Markdown block quotes), cross-reference roles such as
``:func:`grad``` (rendered as inline code here) and the literal-block marker ``text::``
(rendered as ``text:``; the indented block after it is a Markdown code block already).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$|^[ \t]*::[ \t]*$", re.MULTILINE)


def rewrite(text: str) -> str:
    """The docstring with ``Example:`` read as ``Examples:``, Sphinx roles as code, ``::`` as ``:``."""
    text = _LITERAL.sub(lambda m: f"{m.group(1)}:" if m.group(1) else "", text)
    return _ROLE.sub(r"`\1`", _EXAMPLE.sub(r"\1Examples:", text))


class SphinxHabits(griffe.Extension):
    """Rewrite each docstring once, when griffe has loaded the object that holds it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
