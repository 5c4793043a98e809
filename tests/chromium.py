"""Headless Chromium for tests that look at a page as a person would.

Starts Debian's ``chromium`` (``.ci/run`` installs it when missing) with a fresh profile and
no network features, drives it over the DevTools protocol on loopback, and reports what was
rendered at a given viewport width: the title, ``document.body.innerText`` (the text a person
sees: CSS-hidden elements excluded), whether the page is wider than the viewport, and
whatever else an expression asks. No network access is needed or used: pages are files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--hide-scrollbars", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0"]


def chromium_or_skip() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs it as root)")
    return exe


class Browser:
    """One Chromium process; ``render(path, width)`` loads a file at that viewport width."""

    def __init__(self) -> None:
        self.exe = chromium_or_skip()
        self.profile = Path(tempfile.mkdtemp(prefix="rg-chromium-"))
        self.proc = subprocess.Popen([self.exe, *FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        self.ws = None
        self._id = 0
        deadline = time.monotonic() + 10
        while self.ws is None:
            targets = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/json/list", timeout=5).read())
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
               screenshot: Path | None = None) -> dict[str, Any]:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.call("Page.navigate", url=Path(page).resolve().as_uri())
        deadline = time.monotonic() + 30
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{page} did not finish loading")
            time.sleep(0.05)
        out = {
            "title": self.evaluate("document.title"),
            "text": self.evaluate("document.body.innerText"),
            "first": self.evaluate("document.body.firstElementChild.innerText"),
            "first_top": self.evaluate(
                "document.body.firstElementChild.getBoundingClientRect().top"),
            "scroll_width": self.evaluate("document.documentElement.scrollWidth"),
            "inner_width": self.evaluate("window.innerWidth"),
        }
        if screenshot is not None:
            import base64

            data = self.call("Page.captureScreenshot", format="png")["data"]
            screenshot.write_bytes(base64.b64decode(data))
        return out

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
