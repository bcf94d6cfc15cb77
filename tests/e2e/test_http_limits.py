"""Connections are limited before a request (header timeout, per-client cap) and the pages
carry a strict Content-Security-Policy that the real browser enforces without breaking them."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import time
from pathlib import Path

import pytest
from support.peers import Chromium
from support.service_proc import ServiceProcess
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 1.5
KEEPALIVE = 3.0
PER_CLIENT = 4


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, segstream_home: Path, shared_dir: Path):
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "server": {
            "header_timeout_s": HEADER_TIMEOUT,
            "keepalive_timeout_s": KEEPALIVE,
            "max_connections_per_client": PER_CLIENT,
        },
        "streams": [
            {"id": "cam", "source": str(shared_dir / "data/video/vtest.avi"), "infer_fps": 1}
        ],
    }
    svc = ServiceProcess(tmp_path_factory.mktemp("limits"), cfg).start()
    svc.wait_state("cam", {"live"}, 30)
    yield svc
    svc.stop()


def _connect(svc: ServiceProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=15)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (bounded by the socket timeout)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _closed(svc: ServiceProcess, reason: str) -> float:
    _, body, _ = svc.get("/metrics")
    m = re.search(
        rf'^segstream_http_connections_closed_total\{{reason="{reason}"\}} (\S+)$',
        body.decode(),
        re.M,
    )
    assert m, f"no series for {reason}"
    return float(m.group(1))


def test_half_sent_headers_get_408_and_are_closed(service: ServiceProcess) -> None:
    before = _closed(service, "header_timeout")
    s = _connect(service)
    s.sendall(b"GET /api/streams HTTP/1.1\r\nHost: x\r\nX-Slow: 1")  # never ends the headers
    t0 = time.monotonic()
    reply = _read_all(s)
    waited = time.monotonic() - t0
    s.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:80]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1]) == {
        "error": "request headers not sent in time"
    }
    assert waited >= HEADER_TIMEOUT * 0.9  # not before the timeout...
    assert waited < 12  # ...and not kept for aiohttp's keep-alive time either
    assert _closed(service, "header_timeout") == before + 1


def test_headers_sent_in_pieces_within_the_timeout_are_served(service: ServiceProcess) -> None:
    s = _connect(service)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r")
    time.sleep(0.3)
    s.sendall(b"\nConnection: close\r\n\r\n")  # the end of headers split across reads
    reply = _read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]


def test_kept_alive_connection_idles_then_is_closed_at_keepalive(
    service: ServiceProcess,
) -> None:
    """The header clock covers the first request; a kept-alive connection may idle past it
    (aiohttp's keep-alive timeout bounds that), then serve a second request."""
    s = _connect(service)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    time.sleep(HEADER_TIMEOUT + 0.5)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a next request, never finished
    t0 = time.monotonic()
    rest = _read_all(s)
    s.close()
    assert rest == b""  # closed without an answer
    assert time.monotonic() - t0 < KEEPALIVE + 5


def test_one_address_holds_at_most_the_cap(service: ServiceProcess) -> None:
    before = _closed(service, "per_client_limit")
    held = []
    try:
        for _ in range(PER_CLIENT):  # long-lived responses: MJPEG viewers
            s = _connect(service)
            s.sendall(b"GET /streams/cam/mjpeg HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            held.append(s)
        extra = _connect(service)
        reply = _read_all(extra)
        extra.close()
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:80]
        assert b"too many connections" in reply
    finally:
        for s in held:
            s.close()
    # Closed viewers free their places (the server notices on its next write).
    assert wait_for(lambda: service.get("/healthz")[0] == 200, 15)
    assert _closed(service, "per_client_limit") == before + 1
    _, body, _ = service.get("/metrics")
    assert re.search(r"^segstream_http_connections \d", body.decode(), re.M)


def _script_hashes(html: bytes) -> set[str]:
    return {
        "'sha256-" + base64.b64encode(hashlib.sha256(m).digest()).decode() + "'"
        for m in re.findall(rb"<script>(.*?)</script>", html, re.S)
    }


@pytest.mark.parametrize("path", ["/", "/login", "/docs"])
def test_pages_send_a_strict_csp(service: ServiceProcess, path: str) -> None:
    status, body, headers = service.get(path)
    assert status == 200
    csp = headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert "'unsafe-inline'" not in directives["script-src"]
    assert "'unsafe-eval'" not in directives["script-src"]
    assert directives["connect-src"] == "'self'"
    assert directives["media-src"] == "'self'"  # the event view's clip player
    assert directives["frame-ancestors"] == "'none'"
    assert _script_hashes(body) <= set(directives["script-src"].split())
    assert "http" not in csp  # no other host


CATCH = """window.__csp = [];
document.addEventListener('securitypolicyviolation',
  e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"""


async def test_page_works_in_chromium_under_the_policy(
    service: ServiceProcess, tmp_path: Path
) -> None:
    chrome = Chromium(tmp_path / "chrome")
    try:
        async with chrome.page() as page:
            await page.call("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH})
            await page.goto(service.base + "/", settle_s=0)
            # The page's own script ran: it connected and drew the stream's tile.
            await page.wait_for("document.querySelectorAll('[data-stream]').length === 1", 30)
            await page.wait_for(
                "(() => { const c = document.querySelector('[data-stream] canvas');"
                " if (!c) return false; const d = c.getContext('2d')"
                ".getImageData(0, 0, c.width, c.height).data;"
                " return d.some(v => v !== 0); })()",
                30,
            )
            assert await page.eval("window.__csp") == []
            # An injected inline script is refused by the browser.
            await page.eval(
                "(() => { const s = document.createElement('script');"
                " s.textContent = 'window.__injected = 1'; document.body.appendChild(s); })()"
            )
            await page.wait_for("window.__csp.length > 0", 10)
            assert await page.eval("window.__injected") is None
            assert any("script-src" in v for v in await page.eval("window.__csp"))
            # Swagger UI still renders under its own policy.
            await page.goto(service.base + "/docs", settle_s=0)
            await page.wait_for("!!document.querySelector('.swagger-ui .info')", 30)
            assert await page.eval("window.__csp") == []
    finally:
        chrome.close()
