"""Headless Chromium for tests of the HTML pages people read (block page, reports).

`render(page, width)` loads the page as a file in an iframe of that width (so media
queries see a phone's or a desktop's viewport) and returns what the browser made of it:
the visible text (`innerText`, so hidden elements are not counted), how far the page
overflows its viewport horizontally, and how many resources it tried to load (a
self-contained page loads none). `screenshot(page, png, width)` saves what a person
would see. Chromium runs with no network and a fresh profile each time.

Debian's `chromium` is installed by `.ci/run`; without it these tests are skipped, or
fail under CI (CI=true), where a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--allow-file-access-from-files",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9")
TIMEOUT = 90

_PROBE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">
<iframe id="page" src="page.html" width="{width}" height="{height}" style="border:0"></iframe>
<pre id="probe"></pre><script>
window.addEventListener("load", function () {{
  var f = document.getElementById("page"), d = f.contentDocument, w = f.contentWindow;
  document.getElementById("probe").textContent = JSON.stringify({{
    text: d.body ? d.body.innerText : "",
    title: d.title,
    overflow: d.documentElement.scrollWidth - w.innerWidth,
    viewport: w.innerWidth,
    resources: w.performance.getEntriesByType("resource").length
  }});
}});
</script></body></html>
"""


def require_tool(names: tuple[str, ...], package: str) -> str:
    """The first of `names` on PATH; skip without it, or fail under CI (CI=true), where
    .ci/run installs the Debian `package`."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{names[0]} is not installed (Debian: apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_chromium() -> str:
    return require_tool(("chromium", "chromium-browser", "google-chrome", "chrome"), "chromium")


@dataclass(frozen=True)
class Rendered:
    text: str  # what the page shows, as the browser laid it out
    title: str
    overflow: int  # px the page is wider than its viewport (0: nothing scrolls sideways)
    viewport: int
    resources: int  # resources the page tried to load


class _Pre(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.text = ""

    def handle_starttag(self, tag, attrs) -> None:
        self.inside = tag == "pre" and ("id", "probe") in attrs

    def handle_endtag(self, tag) -> None:
        self.inside = False

    def handle_data(self, data) -> None:
        if self.inside:
            self.text += data


def _run(args: list[str], profile: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, timeout=TIMEOUT, check=False)


def render(page: str | Path, width: int = 1280, height: int = 900) -> Rendered:
    """Load the page (HTML text or a file) at `width` px and return what it rendered."""
    html = Path(page).read_text() if isinstance(page, Path) else page
    with tempfile.TemporaryDirectory(prefix="rg-browser-") as tmp:
        root = Path(tmp)
        (root / "page.html").write_text(html, encoding="utf-8")
        (root / "probe.html").write_text(_PROBE.format(width=width, height=height))
        done = _run(["--window-size=1400,1000", "--virtual-time-budget=3000", "--dump-dom",
                     (root / "probe.html").as_uri()], str(root / "profile"))
    parser = _Pre()
    parser.feed(done.stdout.decode("utf-8", "replace"))
    if not parser.text:
        raise AssertionError(f"chromium rendered nothing: {done.stderr.decode()[-2000:]}")
    data = json.loads(parser.text)
    return Rendered(data["text"], data["title"], int(data["overflow"]), int(data["viewport"]),
                    int(data["resources"]))


def screenshot(page: str | Path, png: Path, width: int, height: int = 900) -> tuple[int, int]:
    """Save a screenshot of the page at `width` px; returns the image's (width, height)."""
    html = Path(page).read_text() if isinstance(page, Path) else page
    with tempfile.TemporaryDirectory(prefix="rg-browser-") as tmp:
        source = Path(tmp) / "page.html"
        source.write_text(html, encoding="utf-8")
        png.parent.mkdir(parents=True, exist_ok=True)
        done = _run([f"--window-size={width},{height}", f"--screenshot={png}",
                     "--hide-scrollbars", source.as_uri()], str(Path(tmp) / "profile"))
    if not png.exists():
        raise AssertionError(f"no screenshot: {done.stderr.decode()[-2000:]}")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def check_page(page: str | Path, shots: Path, name: str, expect: list[str]) -> dict[int, Rendered]:
    """The checks every page gets, at phone and desktop width: the expected text is
    rendered, nothing overflows sideways, nothing is loaded, and screenshots are saved."""
    out = {}
    for width in (390, 1280):
        got = render(page, width)
        assert got.viewport == width, got
        for text in expect:
            assert text in got.text, f"{name} at {width}px: {text!r} not rendered in\n{got.text}"
        assert got.overflow <= 0, f"{name} at {width}px overflows by {got.overflow}px"
        assert got.resources == 0, f"{name} loads {got.resources} resource(s)"
        size = screenshot(page, shots / f"{name}-{width}.png", width)
        assert size == (width, 900), size
        out[width] = got
    return out
