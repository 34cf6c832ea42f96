"""Headless Debian Chromium driven over the Chrome DevTools Protocol, stdlib only, for page checks and screenshots.

The protocol runs over ``--remote-debugging-pipe`` (NUL-separated JSON on file descriptors 3 and 4), so no websocket
client and no browser download are needed. Chromium runs with a fresh profile and without first-run, background,
component-update, sync or QUIC traffic, so it talks only to the page it is pointed at.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["CHROMIUM", "Browser", "BrowserError"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
]


def _high(fds: tuple[int, int]) -> tuple[int, int]:
    """The same pipe on descriptors >= 10, so that moving its ends to 3 and 4 in the child cannot clobber them."""
    out = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return out


class BrowserError(RuntimeError):
    """A DevTools command failed or a page condition was not met in time."""


class Browser:
    """One headless Chromium page. Use as a context manager; every method blocks until Chromium answers."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout: float = 30.0):
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed (Debian package 'chromium')")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_r, self._to_browser = _high(os.pipe())
        self._from_browser, from_browser_w = _high(os.pipe())
        # Chromium reads commands from fd 3 and writes answers to fd 4. A bare Python process moves the pipe ends
        # there and execs Chromium (preexec_fn would be unsafe here: this process has threads serving the app).
        trampoline = (
            f"import os, sys; os.dup2({to_browser_r}, 3); os.dup2({from_browser_w}, 4); "
            f"os.close({to_browser_r}); os.close({from_browser_w}); os.execv(sys.argv[1], sys.argv[1:])"
        )
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-S",
                "-E",
                "-c",
                trampoline,
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_browser, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    message = json.loads(raw)
                    if "id" in message:
                        with self._cond:
                            self._answers[message["id"]] = message
                            self._cond.notify_all()

    def _call(self, method: str, session: Optional[str] = None, **params: Any) -> dict:
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or self._proc.poll() is not None:
                    raise BrowserError(f"no answer to {method} (chromium exit code {self._proc.poll()})")
                self._cond.wait(min(left, 0.5))
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def call(self, method: str, **params: Any) -> dict:
        """A DevTools command on the page, e.g. ``call("Page.navigate", url=...)``."""
        return self._call(method, self._session, **params)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"JavaScript error in {expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: Optional[float] = None, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {what or expression}")
            time.sleep(0.2)

    def open(self, url: str, ready: str = "document.querySelector('.gradio-container') !== null") -> None:
        """Navigate and wait until `ready` holds."""
        self.call("Page.navigate", url=url)
        self.wait_for(ready, what=f"{url} to load")

    def idle(self, settle: float = 0.5, timeout: Optional[float] = None) -> None:
        """Wait until Gradio shows no pending or generating component, plus `settle` seconds for transitions."""
        busy = "document.querySelectorAll('.pending, .generating, .eta-bar, .progress-bar').length"
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.evaluate(busy):
            if time.monotonic() > deadline:
                raise BrowserError("the page stayed busy")
            time.sleep(0.2)
        time.sleep(settle)

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def html(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """Write a PNG of the page (the whole scrollable page when `full_page`)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self._call("Browser.close")
        except BrowserError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_browser)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
