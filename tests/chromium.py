"""Open a page in a real headless Chromium over the DevTools protocol (``--remote-debugging-pipe``).

The protocol runs over two pipes (the browser reads commands on fd 3 and writes replies and events
on fd 4, each message JSON ending in a NUL byte), so no websocket library is needed. Used by the
report's tests; ``python -m tests.chromium PAGE.html OUT.png`` takes a full-page screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# the chart check: every chart figure and whether its image decoded (a broken data URI has no width)
CHARTS_JS = """JSON.stringify([...document.querySelectorAll('figure.chart')].map(f => {
  const img = f.querySelector('img');
  return {chart: f.dataset.chart, loaded: !!img && img.complete && img.naturalWidth > 0,
          width: img ? img.naturalWidth : 0};
}))"""


def find_chromium() -> str | None:
    """The Chromium binary on PATH (Debian's package installs ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    """What a page load showed: console errors and uncaught exceptions, the charts, a screenshot."""

    errors: list[str] = field(default_factory=list)
    charts: list[dict] = field(default_factory=list)
    title: str = ""
    screenshot: bytes | None = None


class Browser:
    """A headless Chromium driven through the DevTools protocol on a pipe."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="evomerge-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire():  # in the child: the protocol pipes on fds 3 and 4, where Chromium expects them
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", f"--user-data-dir={self.profile}",
             "about:blank"],
            preexec_fn=wire, pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self.events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        q = self._replies.get(msg["id"])
                    if q is not None:
                        q.put(msg)
                else:
                    self.events.put(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        """One protocol command; returns its result or raises with the browser's error."""
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            q = self._replies[mid] = queue.Queue()
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        reply = q.get(timeout=timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str, *, screenshot: bool = False, timeout: float = 30) -> PageResult:
        """Load ``url`` in a new tab; collect console errors and exceptions until load, then check the charts."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        result = PageResult()
        deadline = time.monotonic() + timeout
        loaded = False
        while not loaded:
            event = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event.get("sessionId") != session:
                continue
            loaded = _note(event, result)
        time.sleep(0.3)  # anything logged right after the load event
        while not self.events.empty():
            _note(self.events.get(), result)
        value = self.send("Runtime.evaluate", {"expression": CHARTS_JS, "returnByValue": True}, session=session)
        result.charts = json.loads(value["result"]["value"])
        result.title = self.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                                 session=session)["result"]["value"]
        if screenshot:
            size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = self.send("Page.captureScreenshot",
                             {"format": "png", "captureBeyondViewport": True,
                              "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}},
                             session=session, timeout=60)
            result.screenshot = base64.b64decode(shot["data"])
        self.send("Target.closeTarget", {"targetId": target})
        return result

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _note(event: dict, result: PageResult) -> bool:
    """Record an error event in ``result``; True for the page's load event."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        result.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                     for a in params.get("args", [])))
    elif method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        result.errors.append(f"exception: {details.get('text', '')} "
                             + (details.get("exception") or {}).get("description", ""))
    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
        result.errors.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
    return method == "Page.loadEventFired"


if __name__ == "__main__":
    page, png = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    binary = find_chromium()
    if binary is None:
        sys.exit("no chromium on PATH (Debian: apt-get install -y chromium)")
    with Browser(binary) as browser:
        res = browser.open(page.as_uri(), screenshot=True)
    png.write_bytes(res.screenshot)
    print(json.dumps({"errors": res.errors, "charts": res.charts, "title": res.title}, indent=1))
