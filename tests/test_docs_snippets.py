"""Every ```python block of README.md and docs/ runs, as a reader would run it.

The blocks of one page share a namespace and run in order, so a page may build its example
data once and use it in later blocks. A block that is not meant to run (a signature list, a
sketch with placeholders) is marked by the HTML comment ``<!-- snippet: skip -->`` on the line
before its opening fence (a reason may follow: ``<!-- snippet: skip: signatures -->``):
invisible on the site and on GitHub, explicit here. The cookbook pages include whole scripts
from examples/ that way; tests/test_examples.py runs those.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = re.compile(r"^<!-- snippet: skip(:.*)? -->$")
_FENCE = re.compile(r"^```python\s*$")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(first line number, code, skipped)`` for each ```python block of a Markdown text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            start, previous = i + 1, next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", bool(SKIP.match(previous))))
            i = end
        i += 1
    return blocks


def test_block_parser_finds_blocks_and_skip_markers():
    text = "x\n```python\na = 1\n```\n\n<!-- snippet: skip -->\n```python\nf(...)\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n", False), (8, "f(...)\n", True)]
    text = "<!-- snippet: skip: a signature -->\n```python\ndef f(x, /, *, y=None) -> Tree\n```\n"
    assert python_blocks(text) == [(3, "def f(x, /, *, y=None) -> Tree\n", True)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)  # a block that writes a file writes it here
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "__snippet__"}
    for line, code, skipped in blocks:
        if not skipped:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)


# A doctest that expects a float's last digits passes on one CPU and fails on another (a
# different summation order or thread count moves the last bits): `1.0000...` expected where
# another machine prints `1.0`. Print rounded values or booleans instead.
_FLOAT_DIGITS = re.compile(r"\d\.\d{5,}|\d\.\d*\.\.\.")


def test_no_doctest_expects_a_floats_last_digits():
    import ast
    import doctest
    import inspect

    parser, offenders = doctest.DocTestParser(), []
    for path in sorted((ROOT / "functx").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = [
            ast.get_docstring(node, clean=False)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        examples = [e for doc in docstrings if doc for e in parser.get_examples(inspect.cleandoc(doc))]
        for example in examples:
            if _FLOAT_DIGITS.search(example.want) and "round(" not in example.source:  # rounded: stable
                offenders.append(f"{path.relative_to(ROOT)}: {example.source.strip()} -> {example.want.strip()}")
    assert not offenders, f"doctests that expect a float's last digits: {offenders}"


def test_the_float_digits_check_catches_what_it_is_for():
    assert _FLOAT_DIGITS.search("1.0000...\n") and _FLOAT_DIGITS.search("0.123456\n")
    assert not _FLOAT_DIGITS.search("tensor([0.2500, 1.5000])\n") and not _FLOAT_DIGITS.search("1.0\n")
