"""Headless Chromium for tests of the HTML pages people read (block page, reports).

One way to drive it: Debian's ``chromium`` with a fresh profile, no network (every name
resolves to nothing, a dead proxy) and its DevTools protocol on loopback. ``Browser.render``
loads a page as a file at a viewport width (media queries see a phone's or a desktop's
screen) and reports what a person would see: the title, ``document.body.innerText`` (CSS-
hidden elements excluded), the first element's text and position, whether the page is
wider than its viewport, how many resources it tried to load (a self-contained page loads
none), and a screenshot. ``check_page`` is what every page gets at 390 and 1280 px.

``.ci/run`` installs chromium; without it these tests are skipped, or fail under CI
(CI=true), where a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


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
    title: str
    text: str  # what the page shows, as the browser laid it out
    first: str  # the first element's text: what is on top
    first_top: float  # px from the top of the viewport to that element
    scroll_width: int
    inner_width: int  # the viewport's width as the page sees it
    resources: int  # resources the page tried to load

    @property
    def overflow(self) -> int:
        """px the page is wider than its viewport (<= 0: nothing scrolls sideways)."""
        return self.scroll_width - self.inner_width


_PROBE = """JSON.stringify({
  title: document.title,
  text: document.body ? document.body.innerText : "",
  first: document.body && document.body.firstElementChild
         ? document.body.firstElementChild.innerText : "",
  first_top: document.body && document.body.firstElementChild
             ? document.body.firstElementChild.getBoundingClientRect().top : 0,
  scroll_width: document.documentElement.scrollWidth,
  inner_width: window.innerWidth,
  resources: performance.getEntriesByType("resource").length
})"""


class Browser:
    """One Chromium process; ``render(path, width)`` loads a file at that viewport width."""

    def __init__(self) -> None:
        self.exe = require_chromium()
        self.profile = Path(tempfile.mkdtemp(prefix="rg-chromium-"))
        self.proc = subprocess.Popen([self.exe, *FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws = None
        self._id = 0
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        deadline = time.monotonic() + 10
        while self.ws is None:
            targets = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{port}/json/list", timeout=5).read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 << 20,
                                  open_timeout=10).__enter__()
            elif time.monotonic() > deadline:
                raise RuntimeError("chromium has no page target")
            else:
                time.sleep(0.05)

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        assert self.ws is not None
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")

    def render(self, page: Path, width: int, height: int = 900,
               screenshot: Path | None = None) -> Rendered:
        """Load the file `page` in a `width` x `height` viewport; what it rendered (and a
        PNG of the viewport in `screenshot`)."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.call("Page.navigate", url=Path(page).resolve().as_uri())
        deadline = time.monotonic() + 30
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{page} did not finish loading")
            time.sleep(0.05)
        got = Rendered(**json.loads(self.evaluate(_PROBE)))
        if screenshot is not None:
            data = self.call("Page.captureScreenshot", format="png")["data"]
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(data))
        return got

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def png_size(png: Path) -> tuple[int, int]:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def check_page(page: str | Path, shots: Path, name: str, expect: list[str]) -> dict[int, Rendered]:
    """The checks every page gets, at phone and desktop width: the expected text is
    rendered, nothing overflows sideways, nothing is loaded, and screenshots are saved."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="rg-page-") as tmp, Browser() as browser:
        if isinstance(page, str):
            (Path(tmp) / "page.html").write_text(page, encoding="utf-8")
            page = Path(tmp) / "page.html"
        for width in (390, 1280):
            png = shots / f"{name}-{width}.png"
            got = browser.render(page, width, screenshot=png)
            assert got.inner_width == width, got
            for text in expect:
                assert text in got.text, f"{name} at {width}px: {text!r} not rendered in\n{got.text}"
            assert got.overflow <= 0, f"{name} at {width}px overflows by {got.overflow}px"
            assert got.resources == 0, f"{name} loads {got.resources} resource(s)"
            assert png_size(png) == (width, 900), png_size(png)
            out[width] = got
    return out
