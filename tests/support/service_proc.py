"""Run `segstream serve` as a real subprocess and talk to it over HTTP (tests helper)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from support.peers import free_port, wait_http

REPO = Path(__file__).resolve().parents[2]
SEGSTREAM = Path(sys.executable).with_name("segstream")


class ServiceProcess:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        token: str | None = None,
        state: Path | None = None,
        env: dict[str, str] | None = None,
        config_path: Path | None = None,
    ) -> None:
        """`state=None` with `config_path` given: no --state flag, the default state file."""
        self.port = free_port()
        config = {**config, "server": {**config.get("server", {}), "port": self.port}}
        self.config_path = config_path or workdir / f"service-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"service-{self.port}.log"
        self.state = state if state or config_path else workdir / f"state-{self.port}.json"
        self.token = token  # sent as a bearer token with every request
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 90.0) -> ServiceProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(SEGSTREAM),
                    "serve",
                    "--config",
                    str(self.config_path),
                    *(["--state", str(self.state)] if self.state else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        try:
            wait_http(self.base + "/readyz", ready_timeout, alive=lambda: self.proc.poll() is None)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"service not ready:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
        return self.request("GET", path, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 10,
        token: str | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def json(self, path: str) -> Any:
        status, body, _ = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def stream(self, sid: str) -> dict[str, Any]:
        return self.json(f"/api/streams/{sid}")

    def wait_state(self, sid: str, states: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.stream(sid)
            if st["state"] in states:
                return st
            time.sleep(0.1)
        raise AssertionError(f"{sid} not in {states} after {timeout}s: {st}")

    def metric(self, name: str, **labels: str) -> float:
        _, body, _ = self.get("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in body.decode().splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            series_labels = head[len(name) :].strip("{}")
            if ",".join(sorted(series_labels.split(","))) == want:
                return float(value)
        raise KeyError(f"{name}{{{want}}} not in /metrics")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code


class MjpegReader:
    """A real MJPEG client on a thread: parses multipart parts by Content-Length."""

    def __init__(self, url: str, keep: int = 0) -> None:
        self.url = url
        self.frames = 0
        self.jpegs: list[bytes] = []
        self.keep = keep
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=30) as r:
                ctype = r.headers["Content-Type"]
                assert ctype.startswith("multipart/x-mixed-replace"), ctype
                while not self._stop.is_set():
                    jpeg = read_part(r)
                    self.frames += 1
                    if len(self.jpegs) < self.keep:
                        self.jpegs.append(jpeg)
        except Exception as e:
            if not self._stop.is_set():
                self.error = e

    def wait_frames(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.frames < n and time.monotonic() < deadline and self.error is None:
            time.sleep(0.05)
        assert self.frames >= n, f"{self.url}: {self.frames} frames ({self.error})"

    def close(self) -> None:
        self._stop.set()


def read_part(r) -> bytes:
    """One multipart part: boundary line, headers, Content-Length bytes."""
    headers: dict[str, str] = {}
    while True:
        line = r.readline()
        if not line:
            raise EOFError("MJPEG stream ended")
        line = line.strip()
        if not line:
            if headers:
                break
            continue
        if line.startswith(b"--"):
            continue
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    assert headers.get("content-type") == "image/jpeg", headers
    data = r.read(int(headers["content-length"]))
    r.readline()
    return data


def decode(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "JPEG did not decode"
    return img


def colour_pixels(img_bgr: np.ndarray, rgb: tuple[int, int, int], tol: int = 28) -> int:
    target = np.array(rgb[::-1], np.int16)
    return int((np.abs(img_bgr.astype(np.int16) - target).max(axis=2) <= tol).sum())
