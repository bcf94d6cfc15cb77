"""Real peers for the end-to-end tests: headless Chromium (driven over the DevTools protocol) and
a Prometheus server. Both are Debian packages started and stopped by PID."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, ok=lambda r: r.status == 200, alive=lambda: True) -> None:
    """Polls url until ok; gives up early once the server process has died (alive() False)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r):
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


class Chromium:
    """Headless Chromium; screenshots over the DevTools protocol (the page never finishes
    loading while an MJPEG <img> streams, so --screenshot would not do)."""

    def __init__(self, profile: Path) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise RuntimeError("chromium not installed (scripts/install_system_deps.sh test)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--remote-debugging-port={self.port}",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"http://127.0.0.1:{self.port}/json/version", 30)

    async def screenshot(
        self,
        url: str,
        ready: str = "document.readyState !== 'loading'",
        timeout: float = 30.0,
        selector: str | None = None,
        shots: int = 1,
    ) -> tuple[list[np.ndarray], dict[str, float] | None]:
        """Loads url and waits until the JavaScript condition `ready` holds (at most
        `timeout` s); returns the page as BGR images (`shots` of them, 1 s apart) and, if
        asked, the bounding box (CSS pixels) of the first element matching selector."""
        async with self.page() as page:
            await page.goto(url, settle_s=0.0)
            await page.wait_for(ready, timeout)
            rect = None
            if selector:
                js = (
                    f"JSON.stringify(document.querySelector({json.dumps(selector)})"
                    "?.getBoundingClientRect() ?? null)"
                )
                rect = json.loads(await page.eval(js))
            images = []
            for k in range(shots):  # a live page: several moments, 1 s apart
                if k:
                    await asyncio.sleep(1.0)
                images.append(await page.screenshot())
        return images, rect

    @contextlib.asynccontextmanager
    async def page(self) -> AsyncIterator[CdpPage]:
        """A new tab to drive: navigate, run JavaScript, wait for conditions, screenshot."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT"
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            ws_url = json.load(r)["webSocketDebuggerUrl"]
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(ws_url, max_msg_size=64 * 2**20) as ws,
        ):
            page = CdpPage(ws)
            await page.call("Page.enable")
            yield page

    def close(self) -> None:
        stop_process(self.proc)


class CdpPage:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = iter(range(1000, 10**9))

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await _cdp(self.ws, next(self._ids), method, params)

    async def goto(self, url: str, settle_s: float = 1.0) -> None:
        await self.call("Page.navigate", {"url": url})
        await asyncio.sleep(settle_s)

    async def eval(self, js: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        res = await self.call(
            "Runtime.evaluate", {"expression": js, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"{js[:80]}: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    async def wait_for(self, js: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                value = await self.eval(js)
                if value:
                    return value
            await asyncio.sleep(0.2)
        raise TimeoutError(f"not true after {timeout}s: {js}")

    async def screenshot(self) -> np.ndarray:
        shot = await self.call("Page.captureScreenshot", {"format": "png"})
        png = base64.b64decode(shot["data"])
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


async def _cdp(
    ws: aiohttp.ClientWebSocketResponse,
    msg_id: int,
    method: str,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    await ws.send_json({"id": msg_id, "method": method, "params": params or {}})
    while True:
        msg = await ws.receive_json(timeout=30)
        if msg.get("id") == msg_id:
            if "error" in msg:
                raise RuntimeError(f"{method}: {msg['error']}")
            return msg.get("result", {})


class Prometheus:
    """A real Prometheus server scraping the given targets every second."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus not installed (scripts/install_system_deps.sh test)")
        self.port = free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: segstream\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"http://127.0.0.1:{self.port}/-/ready", 30)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def close(self) -> None:
        stop_process(self.proc)
