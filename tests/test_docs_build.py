"""The documentation site builds with `mkdocs build --strict`, offline, and documents every public name."""

from __future__ import annotations

import html
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROOMS = ["functx", "functx.nn", "functx.implicit", "functx.solvers", "functx.autograd_functional", "functx.curvature"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        command = ["unshare", "-n", *command]  # no network at all: the build must not fetch anything
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_site_builds_strictly_offline(site):
    assert (site / "index.html").exists()


def _api_page(site, room: str) -> pathlib.Path:
    return site / "api" / (room.removeprefix("functx.") if room != "functx" else "functx") / "index.html"


def _canonical_room(room: str, name: str) -> str:
    """The room whose API page documents ``room.name``: where the object is defined, among the
    rooms that export it (``functx.custom_root`` is ``functx.implicit.custom_root``)."""
    obj = getattr(importlib.import_module(room), name)
    exporters = [r for r in ROOMS if getattr(importlib.import_module(r), name, None) is obj]
    defined = getattr(obj, "__module__", "") or ""
    owners = [r for r in exporters if defined.startswith(f"functx._{r.removeprefix('functx.')}")]
    if owners:
        return owners[0]
    return "functx" if "functx" in exporters else room  # defined at the top (functx._errors)


@pytest.mark.parametrize("room", ROOMS)
def test_api_reference_documents_every_public_name_on_one_page(site, room):
    # Each public name has an entry on the API page of its canonical room, and only there; a room
    # that re-exports it links to that entry instead.
    module = importlib.import_module(room)
    text = _api_page(site, room).read_text()
    ids = set(re.findall(r'id="([^"]+)"', text))
    missing, twice, unlinked = [], [], []
    for name in (n for n in module.__all__ if not _is_module(getattr(module, n))):
        home = _canonical_room(room, name)
        if home == room:
            if f"{room}.{name}" not in ids:
                missing.append(name)
        elif f"{room}.{name}" in ids:
            twice.append(f"{room}.{name} (documented as {home}.{name})")
        elif f"#{home}.{name}" not in text:
            unlinked.append(f"{room}.{name} -> {home}.{name}")
    assert not missing, f"{room}: public names without an API entry (a docstring is needed): {missing}"
    assert not twice, f"{room}: objects documented on two pages: {twice}"
    assert not unlinked, f"{room}: re-exports that do not link to their entry: {unlinked}"


def _visible_text(page: pathlib.Path) -> str:
    """The page's text as a reader sees it: no scripts, styles, code blocks or rendered maths."""
    body = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", page.read_text(), flags=re.S)
    body = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', " ", body, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


@pytest.mark.parametrize("room", ROOMS)
def test_api_reference_reads_as_markdown(site, room):
    text = _visible_text(_api_page(site, room))
    residue = [text[max(0, m.start() - 60) : m.end() + 20] for m in re.finditer(r"::(?![\w:])", text)]
    assert not residue, f"reST literal-block markers left on the {room} page: {residue}"
    private = sorted(set(re.findall(r"(?<![\w.])_[A-Z][A-Za-z]+", text)))
    assert not private, f"private classes named on the {room} page: {private}"


def test_grad_shows_one_signature_before_its_description(site):
    page = _api_page(site, "functx").read_text()
    start = page.index('id="functx.grad"')
    section = page[start : page.index('id="functx.value_and_grad"')]
    assert "Literal" not in section, "grad's typing overloads are shown"
    assert section.index("Return a function computing the gradient") > 0


def test_no_raw_maths_reaches_the_html(site):
    # pymdownx.arithmatex wraps every formula in .arithmatex for KaTeX; a $...$ or a LaTeX
    # environment outside one is maths the reader would see raw.
    raw = {}
    for page in sorted(site.rglob("*.html")):
        text = _visible_text(page)
        hits = re.findall(r"\$[^$\s][^$]{0,80}?\$|\\begin\{\w+\*?\}|\\\(|\\\[", text)
        if hits:
            raw[str(page.relative_to(site))] = hits[:3]
    assert not raw, f"raw maths in the built site: {raw}"


def test_maths_renders_with_the_bundled_katex(site):
    page = (site / "curvature" / "index.html").read_text()
    assert page.count('class="arithmatex"') > 20
    for asset in ("assets/katex/katex.min.js", "assets/katex/contrib/auto-render.min.js", "assets/katex/katex.min.css"):
        assert asset in page and (site / asset).stat().st_size > 1000, asset
    fonts = re.findall(r"url\((fonts/[^)]+\.woff2)\)", (site / "assets/katex/katex.min.css").read_text())
    assert fonts and all((site / "assets/katex" / font).exists() for font in fonts)
    external = {
        str(p.relative_to(site)): hits
        for p in site.rglob("*.html")
        if (hits := re.findall(r'<(?:script|link)\b[^>]*(?:src|href)="(https?://[^"]+)"', p.read_text()))
    }
    assert not external, f"pages load scripts or styles from the network: {external}"


def test_every_formula_parses_with_katex(site):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the formulas are not parsed")
    formulas = []
    for page in sorted(site.rglob("*.html")):
        for body in re.findall(r'<(?:span|div) class="arithmatex">(.*?)</(?:span|div)>', page.read_text(), flags=re.S):
            formulas.append(html.unescape(body).strip()[2:-2])
    assert formulas
    script = (
        "const katex = require(process.argv[1]); const bad = [];"
        "for (const f of JSON.parse(require('fs').readFileSync(0, 'utf8'))) {"
        "  try { katex.renderToString(f, {throwOnError: true}); } catch (e) { bad.push(f + ': ' + e.message); } }"
        "console.log(JSON.stringify(bad));"
    )
    katex = str(ROOT / "docs" / "assets" / "katex" / "katex.min.js")
    result = subprocess.run(
        [node, "-e", script, katex], input=json.dumps(formulas), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    bad = json.loads(result.stdout)
    assert not bad, f"formulas KaTeX cannot render: {bad}"


def _is_module(obj: object) -> bool:
    return type(obj).__name__ == "module"


def test_readme_links_point_to_files():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_docs_code_lines_fit_88_columns():
    # Read at 1280 px without a horizontal scroll bar: a code line in README.md or docs/ (any
    # fenced block, and the scripts the cookbook pages include) is at most 88 columns; a shape
    # comment goes on its own line. examples/ruff.toml formats the examples at 88 columns.
    long = []
    for page in DOC_PAGES:
        fenced = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced and (included := re.fullmatch(r'--8<-- "([^"]+\.py)"', line.strip())):
                for number_in, line_in in enumerate((ROOT / included.group(1)).read_text().splitlines(), 1):
                    if len(line_in) > 88:  # a script shown on a cookbook page
                        long.append(f"{included.group(1)}:{number_in} ({len(line_in)} columns)")
            elif fenced and len(line) > 88:
                long.append(f"{page.relative_to(ROOT)}:{number} ({len(line)} columns)")
    assert not long, f"code lines over 88 columns: {long}"


def test_version_agrees_everywhere():
    import functx

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert functx.__version__ == declared
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## \[([^\]]+)\](.*)$", changelog, re.M)
    assert declared in first.group(0), f"the CHANGELOG's first section is {first.group(0)!r}, the version {declared}"
    tags = subprocess.run(["git", "tag"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for page in DOC_PAGES:
        for tag in re.findall(r"@v(\d+\.\d+\.\d+)", page.read_text()):
            assert f"v{tag}" in tags, f"{page.relative_to(ROOT)} points at the tag v{tag}, which does not exist"


def test_commands_have_no_placeholders():
    for page in DOC_PAGES:
        assert "<repository URL>" not in page.read_text(), f"{page.relative_to(ROOT)}: a placeholder in a command"
