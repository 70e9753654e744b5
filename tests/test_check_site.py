"""The browser check's browser-free parts: raw-TeX detection and link resolution."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "docs" / "check_site.py"
_spec = importlib.util.spec_from_file_location("check_site", _PATH)
check_site = importlib.util.module_from_spec(_spec)
sys.modules["check_site"] = check_site  # dataclasses look their module up there
_spec.loader.exec_module(check_site)


@pytest.mark.parametrize(
    "text",
    [
        r"the unit sphere \(S^{d-1}\) in",
        r"\[\exp_x(u) = \cos(\|u\|)\, x\]",
        "$$x$$",
        r"at a step $t$ the",
        r"a ratio \frac{a}{b} left over",
        r"inner product \langle x, u \rangle",
    ],
)
def test_raw_tex_found(text):
    assert check_site.raw_tex(text)


@pytest.mark.parametrize(
    "text",
    [
        "plain prose about S^63 and the sphere",
        "costs $5 and $6",  # prices, not math
        "C:\\path\\to\\file and a regex \\d+",
        "Norm(x + u) = R_x(u) typeset as text",
    ],
)
def test_raw_tex_not_found(text):
    assert check_site.raw_tex(text) == []


def test_link_checker(tmp_path):
    (tmp_path / "a.html").write_text('<h1 id="top">x</h1><a name="old">y</a>')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "index.html").write_text("<p>z</p>")
    links = check_site.LinkChecker(tmp_path)
    uri = (tmp_path / "a.html").as_uri()
    assert links.problem(uri) is None
    assert links.problem(uri + "#top") is None
    assert links.problem(uri + "#old") is None
    assert links.problem((tmp_path / "sub").as_uri()) is None
    assert links.problem("https://example.org/missing") is None  # the web is not followed
    assert "missing anchor" in links.problem(uri + "#nowhere")
    assert "missing page" in links.problem((tmp_path / "b.html").as_uri())
    assert "leaves the site" in links.problem(tmp_path.parent.as_uri() + "/other.html")


def test_pages_to_check(tmp_path):
    for name in ("api.html", "index.html", "genindex.html", "search.html", "geometry.html"):
        (tmp_path / name).write_text("")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_x.html").write_text("")
    pages = [p.relative_to(tmp_path).as_posix() for p in check_site.pages_to_check(tmp_path)]
    assert pages == ["index.html", "api.html", "geometry.html", "notebooks/01_x.html"]


def test_sources_hold_no_control_characters():
    """No control character (tab included) in the text the docs and API pages are built from:
    an edit that writes a TeX command through a non-raw string turns ``\\beta`` into a
    backspace, ``\\frac`` into a form feed, ``\\theta`` into a tab, which the built pages then
    show as MathJax errors."""
    import re

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "docs").glob("*.rst")]
    for folder in ("spheretorch", "benchmarks", "tests"):
        files += (root / folder).rglob("*.py")
    bad = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")
    found = [
        f"{f.relative_to(root)}:{i}: {line.strip()[:60]!r}"
        for f in files
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if bad.search(line)
    ]
    assert not found, "\n".join(found)
