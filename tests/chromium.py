"""A real headless Chromium, driven over the DevTools protocol, to look at the report page as a
person's browser shows it: the DOM after layout, every image decoded with its size, every request
the page made (none may leave the machine) and a screenshot.

Chromium runs with no network features that could call out by themselves (background networking,
component updates, sync), its own fresh profile, and host resolution mapped to nowhere (a request
that slipped through would still be seen in the log, and could not reach anything).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
ENV_BINARY = "COMPAT_CHROMIUM"  # a Chromium binary to use instead of the first found on PATH
INTERNAL_SCHEMES = ("data:", "chrome:", "about:", "blob:")  # never a request to anywhere
ENV_UNAVAILABLE = "COMPAT_CHROMIUM_UNAVAILABLE"  # set by .ci/run when it could not install Chromium: why
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
# The page's facts, read from its DOM after every image has been decoded.
PAGE_FACTS_JS = """
(async () => {
  const images = [...document.querySelectorAll('img')];
  const decoded = await Promise.all(images.map(img => img.decode().then(() => true, () => false)));
  const box = el => { const r = el.getBoundingClientRect(); return {width: r.width, height: r.height}; };
  return {
    title: document.title,
    exit_line: (document.querySelector('#exit-line') || {}).innerText || null,
    problem: (document.querySelector('.problem') || {}).innerText || null,
    causes: [...document.querySelectorAll('.cause')].map(c => c.innerText),
    rows: [...document.querySelectorAll('tr.row')].map(tr => ({
      id: tr.dataset.row, verdict: tr.dataset.verdict,
      badge: tr.querySelector('.badge').innerText.trim(),
      badge_label: tr.querySelector('.badge').getAttribute('aria-label'),
      finding: tr.querySelector('td.finding').firstChild.textContent.trim(),
      checks: tr.querySelectorAll('table.checks tr.check').length,
      ...box(tr)})),
    images: images.map((img, i) => ({
      figure: (img.closest('figure') || {}).id || null,
      row: (img.closest('figure') || {dataset: {}}).dataset.row || null,
      caption: ((img.closest('figure') || document).querySelector('figcaption') || {}).innerText || null,
      complete: img.complete, decoded: decoded[i],
      natural_width: img.naturalWidth, natural_height: img.naturalHeight,
      scheme: img.src.split(':')[0], ...box(img)})),
    scripts: document.scripts.length,
    external: [...document.querySelectorAll('link[href], iframe, object, embed, video, audio, source')].length,
    page_height: document.documentElement.scrollHeight,
  };
})()
"""


def find_chromium() -> str | None:
    """The Chromium binary: $COMPAT_CHROMIUM, else the first of CANDIDATES on PATH."""
    if os.environ.get(ENV_BINARY):
        return os.environ[ENV_BINARY]
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


def unavailable_reason() -> str:
    """Why no Chromium is here, for a skip message."""
    why = os.environ.get(ENV_UNAVAILABLE)
    return (
        f"Chromium is not installed ({why})"
        if why
        else "Chromium is not installed here: `apt-get install chromium` (.ci/run installs it when it can)"
    )


@dataclass
class PageVisit:
    """What the browser saw of one page."""

    url: str
    facts: dict
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, itself included
    refused: list[str] = field(default_factory=list)  # console messages of loads the page's CSP refused
    errors: list[str] = field(default_factory=list)  # script exceptions and console errors

    def left_the_machine(self) -> list[str]:
        """Requests other than the page's own file, inline data and the browser's own resources
        (chrome://, about:), and loads the page's CSP refused."""
        leaving = [u for u in self.requests if u != self.url and not u.startswith(INTERNAL_SCHEMES)]
        return leaving + self.refused


class Chromium:
    """One headless Chromium with a fresh profile; use as a context manager.

    Args:
        binary: the Chromium executable.
        width, height: the viewport in CSS pixels.
    """

    def __init__(self, binary: str, width: int = 1400, height: int = 1000):
        self.binary = binary
        self.width = width
        self.height = height
        self.profile = None
        self.process = None
        self.socket = None
        self.next_id = 0
        self.events: list[dict] = []

    def __enter__(self) -> "Chromium":
        import websocket  # websocket-client (the test extras)

        self.profile = tempfile.mkdtemp(prefix="compat-chromium-")
        self.process = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = self._port()
        page = self._page_target(port)
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.socket is not None:
            self.socket.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)

    def _port(self, timeout: float = 60.0) -> int:
        """The DevTools port Chromium chose (it writes it to DevToolsActivePort in its profile)."""
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.process.returncode} before it listened")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"{self.binary} did not open its DevTools port within {timeout:.0f} s")

    @staticmethod
    def _page_target(port: int) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            targets = json.loads(answer.read())
        return next(t for t in targets if t.get("type") == "page")

    def call(self, method: str, timeout: float = 120.0, **params):
        """Sends one DevTools command and returns its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        own = self.next_id
        self.socket.send(json.dumps({"id": own, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("id") == own:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
        raise TimeoutError(f"{method}: no answer within {timeout:.0f} s")

    def _wait_for(self, event: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout:.0f} s")
            message = json.loads(self.socket.recv())
            if "method" in message:
                self.events.append(message)

    def _wait_until_loaded(self, url: str, timeout: float = 120.0) -> None:
        """Until the page at `url` is the document and has loaded: a load event seen above may be
        the previous document's (about:blank's, right after start)."""
        check = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        deadline = time.monotonic() + timeout
        while not self.call("Runtime.evaluate", expression=check, returnByValue=True)["result"].get("value"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading within {timeout:.0f} s")
            time.sleep(0.05)

    def visit(self, path: Path, screenshot: Path | None = None) -> PageVisit:
        """Opens `path`, waits for it to load, reads its facts and (optionally) writes a screenshot
        of the whole page.

        Args:
            path: an HTML file.
            screenshot: where to write a PNG of the whole page, if anywhere.
        """
        self.events = []
        url = Path(path).resolve().as_uri()
        self.call("Page.navigate", url=url)
        self._wait_for("Page.loadEventFired")
        self._wait_until_loaded(url)
        facts = self.call("Runtime.evaluate", expression=PAGE_FACTS_JS, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in facts:
            raise RuntimeError(f"reading the page failed: {facts['exceptionDetails']}")
        visit = PageVisit(url, facts["result"]["value"])
        for e in self.events:
            params = e.get("params", {})
            if e["method"] == "Network.requestWillBeSent":
                url = params["request"]["url"]
                visit.requests.append(url[:120] if url.startswith("data:") else url)
            elif e["method"] == "Log.entryAdded":
                entry = params.get("entry", {})
                text = entry.get("text", "")
                if "Content Security Policy" in text or text.startswith("Refused to"):
                    visit.refused.append(text)
                elif entry.get("level") == "error":
                    visit.errors.append(text)
            elif e["method"] == "Runtime.exceptionThrown":
                visit.errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif e["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                visit.errors.append(json.dumps(params.get("args", []))[:500])
        if screenshot is not None:
            self.screenshot(screenshot)
        return visit

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page (the viewport's width, the page's full height)."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = int(min(max(size["height"], self.height), 16000))
        self.call(
            "Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1, mobile=False
        )
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
