"""Check the built documentation the way a reader sees it: in a headless Chromium, offline.

Usage (after ``make docs``)::

    python docs/check_site.py [--html docs/_build/html] [--out docs/_build/browser-check]

First, without a browser: every public name of the API contract must be in the API reference
(the build's ``objects.inv``). Then Chromium, driven by Selenium through Debian's
``chromium-driver``, opens each page from disk (``file://``, so nothing can come from a
network) - every top-level page and every rendered notebook - and checks:

* no raw TeX left in the visible text (``\\(``, ``\\[``, ``$$``, ``\\frac{``, ...): MathJax ran;
* every math element was typeset, with no MathJax errors, and the pages that teach the
  geometry and the optimizers do show math;
* every image loaded (``naturalWidth > 0``);
* nothing fetched from a network (scripts, fonts, images all ship with the site);
* no console errors (a missing script, font or image is one);
* every link into the site points to an existing page and, with a ``#fragment``, an existing
  anchor on it;
* the page does not scroll sideways (a table or code cell wider than the page).

It saves a full-page screenshot of each page under ``--out`` (look at them). If Chromium or
its driver is missing it installs Debian's ``chromium`` and ``chromium-driver`` (as root, with
apt-get); where that is not possible it prints one line saying why and exits 0 (skipped).
Exit status: 0 all good or skipped, 1 a check failed, 2 bad usage (no built site).
"""

from __future__ import annotations

import argparse
import html.parser
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# Pages that teach with equations: they must show typeset math, not only be free of raw TeX.
MATH_PAGES = {"geometry.html", "optimizers.html", "transformers.html"}
# Not reading pages: Sphinx's generated index, module index and search page.
SKIP_PAGES = {"genindex.html", "py-modindex.html", "search.html"}
# The public names of the API contract (shared/api-contract.md), as the API reference must
# document them.
CONTRACT_NAMES = [
    *(
        f"spheretorch.sphere.{n}"
        for n in ("normalize", "project", "retract", "expmap", "logmap", "dist", "transport")
    ),
    "spheretorch.sphere.random",
    "spheretorch.geodesic.slerp",
    "spheretorch.geodesic.nlerp",
    "spheretorch.SphereParameter",
    "spheretorch.optim.RiemannianAdam",
    "spheretorch.optim.RenormAdam",
    "spheretorch.optim.RiemannianSGD",
    "spheretorch.models.TransformerConfig",
    "spheretorch.models.GPT",
    "spheretorch.models.NGPT",
    "spheretorch.models.GeoNormGPT",
    "spheretorch.analysis.trajectory",
]
# The command line (documented by sphinx-argparse on the API page): each subcommand's section.
CONTRACT_COMMANDS = ["prepare", "train", "compare", "sample"]

# Visible text that only exists when MathJax did not run: TeX delimiters and common macros.
RAW_TEX = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\$\$"
    r"|\\(?:frac|sqrt|langle|rangle|mathbb|mathbf|mathrm|operatorname|begin|end|left|right"
    r"|cdot|qquad|text|tfrac|exp|log|arccos|arctan|sum|top)\b"
    r"|(?<![\w$])\$[^$\s][^$\n]{0,80}?(?<!\s)\$(?![\w$])"
)

# Run in the page after load: waits for MathJax's typesetting and every image, then reports.
PAGE_REPORT_JS = r"""
const done = arguments[arguments.length - 1];
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const imgs = Array.from(document.images);
  for (const img of imgs) { img.loading = "eager"; }
  await Promise.all(imgs.map(img => img.complete ? null :
    new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); })));
  const main = document.querySelector("article") || document.body;
  const skip = "pre, code, script, style, mjx-container, .highlight, .MathJax, textarea";
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const texts = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(skip) || !el.getClientRects().length) continue;
    if (getComputedStyle(el).visibility === "hidden") continue;
    texts.push(n.textContent);
  }
  const math = Array.from(document.querySelectorAll(".math"));
  done({
    text: texts.join("\n"),
    mathjax: !!(window.MathJax && MathJax.startup),
    math_sources: math.length,
    math_untypeset: math.filter(m => !m.querySelector("mjx-container"))
                        .map(m => m.textContent.slice(0, 80)),
    math_rendered: document.querySelectorAll("mjx-container").length,
    math_errors: Array.from(document.querySelectorAll("mjx-merror"))
                      .map(e => (e.getAttribute("data-mjx-error") || e.textContent).slice(0, 80)),
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0))
                       .map(i => i.getAttribute("src")),
    images: imgs.length,
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    remote: performance.getEntriesByType("resource").map(r => r.name)
                       .filter(u => !u.startsWith("file:") && !u.startsWith("data:")),
    wide_code: Array.from(main.querySelectorAll("pre"))
                    .filter(p => p.scrollWidth > p.clientWidth + 1)
                    .map(p => p.textContent.split("\n")
                               .reduce((a, b) => (b.length > a.length ? b : a), "").trim()
                               .slice(0, 60)),
    scroll_width: document.documentElement.scrollWidth,
    view_width: document.documentElement.clientWidth,
  });
})().catch(e => done({error: String(e)}));
"""


@dataclass
class PageResult:
    page: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # reads badly, but not a failure
    summary: str = ""

    def add(self, what: str, items: list[str], shown: int = 5) -> None:
        self.problems.extend(f"{what}: {item}" for item in items[:shown])
        if len(items) > shown:
            self.problems.append(f"{what}: {len(items) - shown} more")


class _Ids(html.parser.HTMLParser):
    """Collects the anchors (``id`` and ``<a name>``) of one HTML file."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and (key == "id" or (tag == "a" and key == "name")):
                self.ids.add(value)


class LinkChecker:
    """Resolves ``file://`` links against the built site, caching each page's anchors."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._ids: dict[Path, set[str]] = {}

    def anchors(self, path: Path) -> set[str]:
        if path not in self._ids:
            parser = _Ids()
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
            self._ids[path] = parser.ids
        return self._ids[path]

    def problem(self, url: str) -> str | None:
        """Why ``url`` is a broken internal link, or None (fine, or not internal)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "file":
            return None  # the web: not followed (offline), and not part of the site
        path = Path(urllib.parse.unquote(parts.path))
        try:
            path.resolve().relative_to(self.root)
        except ValueError:
            return f"leaves the site: {url}"
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            return f"missing page {self._rel(path)}"
        fragment = urllib.parse.unquote(parts.fragment)
        if fragment and path.suffix == ".html" and fragment not in self.anchors(path):
            return f"missing anchor {self._rel(path)}#{fragment}"
        return None

    def _rel(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)


def raw_tex(text: str) -> list[str]:
    """The snippets of ``text`` that look like TeX a browser failed to typeset."""
    found = []
    for m in RAW_TEX.finditer(text):
        start, end = max(0, m.start() - 25), min(len(text), m.end() + 25)
        found.append(" ".join(text[start:end].split()))
    return found


def pages_to_check(root: Path) -> list[Path]:
    """Every top-level page of the site and every rendered notebook, index first."""
    top = sorted(p for p in root.glob("*.html") if p.name not in SKIP_PAGES)
    top.sort(key=lambda p: p.name != "index.html")
    return top + sorted((root / "notebooks").glob("*.html"))


def check_inventory(root: Path) -> list[str]:
    """Contract names missing from the API reference (the build's objects.inv)."""
    from sphinx.util.inventory import InventoryFile

    with open(root / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", posixpath_join)
    data = getattr(inv, "data", inv)  # an object from Sphinx 8.2 on, a plain dict before
    documented = {name for entries in data.values() for name in entries}
    missing = [f"API reference lacks {n}" for n in CONTRACT_NAMES if n not in documented]
    api = (root / "api.html").read_text(encoding="utf-8")
    for cmd in CONTRACT_COMMANDS:
        if f'id="spheretorch-{cmd}"' not in api:  # sphinx-argparse's section per subcommand
            missing.append(f"API reference lacks the command line's `spheretorch {cmd}`")
    return missing


def posixpath_join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p)


# ---------------------------------------------------------------------------------------------
# the browser


def find_browser() -> tuple[str, str] | None:
    chrome = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


def install_browser() -> str | None:
    """Install Debian's chromium and its driver; returns why it could not, or None."""
    if not shutil.which("apt-get"):
        return "no chromium/chromedriver and no apt-get to install them"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "no chromium/chromedriver, and installing them needs root (apt-get)"
    print("installing Debian's chromium and chromium-driver ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # fonts-liberation is only a Recommends of chromium: without it a bare machine's
    # screenshots have no readable text.
    packages = ["chromium", "chromium-driver", "fonts-liberation"]
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["?"]
            return f"`{' '.join(cmd)}` failed: {last[0]}"
    return None


def start_browser(chrome: str, chromedriver: str, width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given: Selenium Manager (which would try the network) is never consulted.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


def screenshot(driver, path: Path, max_height: int) -> None:
    """A PNG of the whole page (not only the viewport), at most ``max_height`` pixels tall."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height)}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {**clip, "scale": 1}},
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(driver, page: Path, root: Path, links: LinkChecker, out: Path, max_height: int):
    rel = page.relative_to(root).as_posix()
    result = PageResult(rel)
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(page.as_uri())
    report = driver.execute_async_script(PAGE_REPORT_JS)
    if "error" in report:
        result.problems.append(f"page script failed: {report['error']}")
        return result
    result.add("raw TeX in the visible text", [f"...{t}..." for t in raw_tex(report["text"])])
    if report["math_sources"] and not report["mathjax"]:
        result.problems.append(f"{report['math_sources']} math elements but MathJax not loaded")
    result.add("math not typeset", [repr(src) for src in report["math_untypeset"]])
    result.add("MathJax error", report["math_errors"])
    if page.parent == root and page.name in MATH_PAGES and not report["math_rendered"]:
        result.problems.append("no rendered math on a page that teaches with equations")
    result.add("image did not load", report["broken_images"])
    # Offline means offline: even where a network exists, nothing may come from it.
    result.add("fetched from the network", report["remote"])
    console = driver.get_log("browser")
    result.add("console error", [e["message"][:200] for e in console if e["level"] == "SEVERE"])
    result.add("broken link", sorted({p for p in map(links.problem, report["links"]) if p}))
    if report["scroll_width"] > report["view_width"] + 1:
        result.problems.append(
            f"page scrolls sideways: {report['scroll_width']}px wide in a "
            f"{report['view_width']}px window (a table, image or code cell too wide)"
        )
    result.notes.extend(f"code wider than the column: {line}..." for line in report["wide_code"])
    shot = out / (rel.replace("/", "__").removesuffix(".html") + ".png")
    screenshot(driver, shot, max_height)
    result.summary = (
        f"{report['math_rendered']} math, {report['images']} images, "
        f"{len(report['links'])} links -> {shot.relative_to(out.parent)}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=DOCS / "_build" / "html")
    parser.add_argument(
        "--out", type=Path, default=None, help="screenshots (default: beside --html)"
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--max-height", type=int, default=40000, help="screenshot height cap (px)")
    parser.add_argument("--no-install", action="store_true", help="skip instead of apt-get install")
    args = parser.parse_args(argv)
    root = args.html.resolve()
    if not (root / "index.html").is_file():
        print(f"error: no built site at {root} (run `make docs` first)", file=sys.stderr)
        return 2
    out = (args.out or root.parent / "browser-check").resolve()

    failures = check_inventory(root)
    for line in failures:
        print(f"FAIL api: {line}")

    found = find_browser()
    if found is None:
        why = "no chromium/chromedriver (--no-install)" if args.no_install else install_browser()
        found = find_browser()
        if found is None:
            print(f"browser check SKIPPED: {why or 'chromium still not found after installing'}")
            return 1 if failures else 0
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("browser check SKIPPED: selenium is not installed (pip install -e '.[docs]')")
        return 1 if failures else 0

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    pages = pages_to_check(root)
    links = LinkChecker(root)
    t0 = time.perf_counter()
    driver = start_browser(*found, args.width, args.height)
    try:
        version = driver.capabilities.get("browserVersion", "?")
        print(f"browser check: Chromium {version}, {len(pages)} pages from {root}")
        results = [check_page(driver, p, root, links, out, args.max_height) for p in pages]
    finally:
        driver.quit()
    bad = 0
    for r in results:
        print(f"{'FAIL' if r.problems else 'ok  '} {r.page}: {r.summary}")
        for p in r.problems:
            print(f"     {p}")
        for n in r.notes:
            print(f"     note: {n}")
        bad += bool(r.problems)
    print(
        f"browser check: {len(results) - bad} of {len(results)} pages passed in "
        f"{time.perf_counter() - t0:.1f} s; screenshots in {out}"
    )
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
