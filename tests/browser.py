"""A headless Chromium driven over the DevTools protocol, for the viewer's browser tests.

The system's Chromium (Debian's `chromium` package) is used, never a downloaded one. Software
WebGL (SwiftShader) stands in for a GPU. The protocol goes over the `websockets` package that
viser already depends on, so no driver needs installing."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--mute-audio", "--no-default-browser-check",
    # WebGL without a GPU: ANGLE over SwiftShader (Chromium refuses it unless told it is wanted).
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    # A hidden page must keep drawing frames and running timers at full speed.
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page open at `url`."""

    def __init__(self, url: str, width: int = 800, height: int = 600, timeout: float = 30.0):
        from websockets.sync.client import connect

        exe = find_chromium()
        if exe is None:
            raise RuntimeError("chromium not found (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="sd-chromium-")
        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
             "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._devtools_port(timeout)
            page = self._page_target(port, timeout)
            self._ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=timeout)
        except BaseException:
            self.close()
            raise
        self._next_id = 0

    def _devtools_port(self, timeout: float) -> int:
        # Chromium writes the port it picked into the profile once the endpoint is listening.
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.proc.returncode}")
            if marker.exists():
                text = marker.read_text().split()
                if text:
                    return int(text[0])
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools endpoint")

    def _page_target(self, port: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                pages = [t for t in json.load(resp) if t.get("type") == "page"]
            if pages:
                return pages[0]
            time.sleep(0.1)
        raise RuntimeError("chromium opened no page")

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        ident = self._next_id
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == ident:  # events in between are not needed here
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def screenshot(self) -> tuple[bytes, np.ndarray]:
        """The page as PNG bytes and as an [H, W, 3] uint8 array."""
        import imageio.v3 as iio

        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        image = iio.imread(io.BytesIO(png), extension=".png")
        return png, np.asarray(image)[..., :3]

    def wait_for(self, predicate, timeout: float, interval: float = 1.0) -> tuple[bytes, np.ndarray]:
        """Screenshots until predicate(image) holds; returns the last one either way."""
        deadline = time.monotonic() + timeout
        while True:
            png, image = self.screenshot()
            if predicate(image) or time.monotonic() > deadline:
                return png, image
            time.sleep(interval)

    def click_button(self, label: str) -> bool:
        """Clicks the first <button> whose text is `label` (viser's GUI buttons)."""
        return bool(self.evaluate(
            "(() => { const b = [...document.querySelectorAll('button')]"
            f".find(e => e.textContent.trim() === {json.dumps(label)}); if (b) b.click(); return !!b; }})()"))

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            with contextlib.suppress(Exception):  # the browser may already be gone
                ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def red_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that are strongly red (red high, green and blue well below it)."""
    r, g, b = (image[..., i].astype(np.int32) for i in range(3))
    return (r > 150) & (r - g > 80) & (r - b > 80)


def red_fraction(image: np.ndarray) -> float:
    """Share of pixels that are strongly red."""
    return float(red_mask(image).mean())
