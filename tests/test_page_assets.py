"""The page's assets: light (first load under 300 KB) and offline (no external URL)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[1] / "ftstudio" / "web" / "static"
FIRST_LOAD_LIMIT = 300 * 1024
# Namespace names are identifiers that nothing fetches.
NAMESPACES = {"http://www.w3.org/2000/svg"}
# A vendored library's banner comment names its home; nothing fetches it.
CREDITS = {"https://github.com/leeoniya/uPlot"}
# Vendored as published (npm pack uplot@1.6.32, dist/ and LICENSE), byte for byte: to upgrade, copy the new
# release's files and their sha256 here.
VENDORED = {
    "vendor/uplot/uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "vendor/uplot/uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
    "vendor/uplot/LICENSE": "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd",
}
EXTERNAL = re.compile(r"""(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s"'`)]*""")


def first_load_assets() -> set[Path]:
    """index.html plus everything it pulls in: stylesheets, scripts and their ES module imports."""
    seen: set[Path] = set()
    todo = [STATIC / "index.html"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        text = path.read_text(encoding="utf-8")
        refs = re.findall(r"""(?:href|src)="/static/([^"]+)\"""", text)
        refs += re.findall(r"""\bfrom\s+["']\./([^"']+)["']""", text)
        refs += re.findall(r"""\bimport\s*\(\s*["']\./([^"']+)["']""", text)
        for ref in refs:
            target = (STATIC / ref) if path.name == "index.html" else (path.parent / ref)
            assert target.is_file(), f"{path.name} refers to missing {ref}"
            todo.append(target.resolve())
    return seen


def test_first_load_is_under_300_kb() -> None:
    assets = first_load_assets()
    assert {p.name for p in assets} >= {"index.html", "app.js", "app.css", "chart.js", "stream.js", "uPlot.iife.min.js"}
    total = sum(p.stat().st_size for p in assets)
    assert total < FIRST_LOAD_LIMIT, f"first load is {total} bytes"
    # and everything shipped, lazily loaded or not
    assert sum(p.stat().st_size for p in STATIC.rglob("*") if p.is_file()) < FIRST_LOAD_LIMIT


def test_no_asset_refers_to_an_external_url() -> None:
    for path in STATIC.rglob("*"):
        if not path.is_file() or path.suffix not in {".html", ".js", ".css", ".svg", ".json"}:
            continue
        text = path.read_text(encoding="utf-8")
        found = [m for m in EXTERNAL.findall(text) if m not in NAMESPACES | CREDITS]
        assert not found, f"{path.name} refers to {found}"
        assert "//cdn" not in text.lower(), path.name
        assert "@import url(" not in text, path.name


def test_the_vendored_chart_library_is_the_published_one_with_its_licence() -> None:
    for name, digest in VENDORED.items():
        assert hashlib.sha256((STATIC / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (STATIC / "vendor/uplot/LICENSE").read_text(encoding="utf-8")
