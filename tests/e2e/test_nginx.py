"""The documented TLS reverse proxy (deploy/nginx/segstream.conf), run as written by Debian's
nginx on a free loopback port with a self-signed certificate, in front of a running service
with a token: the login page and the page, the API with a bearer token (and without one), an
MJPEG stream and the page's WebSocket all pass through HTTPS."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.peers import free_port, stop_process
from support.rtsp import encode_clip
from support.service_proc import ServiceProcess
from support.waiting import wait_for

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "nginx" / "segstream.conf"
ADMIN = "sst_nginx-admin-token-0123456789abcdef0123456789"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def self_signed(workdir: Path) -> tuple[Path, Path]:
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def nginx_conf(workdir: Path, upstream_port: int, port: int, cert: Path, key: Path) -> Path:
    """The example as an operator installs it, with this test's port, certificate and
    upstream put in, inside a minimal nginx.conf that runs unprivileged in workdir."""
    site = EXAMPLE.read_text()
    site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
    site = site.replace("listen 443 ssl", f"listen 127.0.0.1:{port} ssl")
    site = site.replace("/etc/ssl/segstream/fullchain.pem", str(cert))
    site = site.replace("/etc/ssl/segstream/privkey.pem", str(key))
    site = re.sub(r"listen 80;", f"listen 127.0.0.1:{free_port()};", site)
    assert str(cert) in site and f":{upstream_port};" in site and f":{port} ssl" in site
    conf = workdir / "nginx.conf"
    tmp = workdir / "tmp"
    tmp.mkdir()
    conf.write_text(
        f"""daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{site}
}}
"""
    )
    return conf


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, segstream_home: Path, shared_dir: Path) -> Iterator[dict[str, Any]]:
    if not Path(NGINX).exists():
        pytest.fail("nginx not installed (scripts/install_system_deps.sh test)")
    work = tmp_path_factory.mktemp("nginx")
    clip = encode_clip(
        shared_dir / "data/video/vtest.avi", size=(320, 240), seconds=4.0, fps=5, container="mp4"
    )
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "auth": {"tokens_dir": str(work / "auth"), "cookie_secure": True},
        "streams": [{"id": "cam", "source": str(clip), "infer_fps": 1}],
    }
    svc = ServiceProcess(work, cfg, token=ADMIN, env={"SEGSTREAM_ADMIN_TOKEN": ADMIN}).start()
    cert, key = self_signed(work)
    port = free_port()
    conf = nginx_conf(work, svc.port, port, cert, key)
    proc = subprocess.Popen([NGINX, "-p", str(work), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        svc.wait_state("cam", {"live"}, 60)
        up = wait_for(lambda: _listening(port) or proc.poll() is not None, 20)
        assert up and proc.poll() is None, (work / "error.log").read_text(errors="replace")
        ctx = ssl.create_default_context(cafile=str(cert))
        yield {"base": f"https://127.0.0.1:{port}", "ssl": ctx, "svc": svc}
    finally:
        stop_process(proc)
        svc.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


BEARER = {"Authorization": f"Bearer {ADMIN}"}


def test_page_and_api_through_nginx(proxied: dict[str, Any]) -> None:
    base, ctx = proxied["base"], proxied["ssl"]

    async def run() -> None:
        jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of an IP-address host
        connector = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as http:
            # No credentials: the API refuses, the page sends the browser to the login page.
            async with http.get(base + "/api/streams") as r:
                assert r.status == 401
            async with http.get(base + "/", allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/login"
            async with http.get(base + "/api/streams", headers=BEARER) as r:
                assert r.status == 200
                assert [s["id"] for s in (await r.json())["streams"]] == ["cam"]
            # A browser login over TLS: a Secure, HttpOnly cookie, then the page itself.
            async with http.post(base + "/api/login", json={"token": ADMIN}) as r:
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
                assert "Secure" in cookie and "HttpOnly" in cookie
            async with http.get(base + "/") as r:
                assert r.status == 200
                assert "data-predict" in await r.text()

    asyncio.run(run())


def test_mjpeg_streams_through_nginx(proxied: dict[str, Any]) -> None:
    """Three JPEG parts of the live MJPEG arrive one by one (proxy_buffering off: nginx
    passes each part on as it comes, the response never ends)."""
    base, ctx = proxied["base"], proxied["ssl"]

    async def run() -> list[bytes]:
        timeout = aiohttp.ClientTimeout(total=60)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout) as http,
            http.get(base + "/streams/cam/mjpeg", headers=BEARER) as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            parts: list[bytes] = []
            buf = b""
            while len(parts) < 3:
                buf += await r.content.readany()
                while (start := buf.find(b"\xff\xd8")) >= 0 and (
                    end := buf.find(b"\xff\xd9", start)
                ) >= 0:
                    parts.append(buf[start : end + 2])
                    buf = buf[end + 2 :]
            return parts

    parts = asyncio.run(run())
    assert len(parts) >= 3 and all(len(p) > 1000 for p in parts)


def test_websocket_through_nginx(proxied: dict[str, Any]) -> None:
    """The page's WebSocket: the Upgrade passes, the same-origin check sees the proxied
    Host, and a tile frame of the watched stream comes back."""
    base, ctx = proxied["base"], proxied["ssl"]

    async def run() -> tuple[dict[str, Any], tuple[int, str]]:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http,
            http.ws_connect(
                base.replace("https", "wss") + "/ws", headers={**BEARER, "Origin": base}
            ) as ws,
        ):
            await ws.send_json({"watch": ["cam"], "fps": 5})
            hello: dict[str, Any] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=30)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    hello = data if data.get("type") == "hello" else hello
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    kind, n = struct.unpack_from("BB", msg.data)
                    return hello, (kind, msg.data[2 : 2 + n].decode())
                else:
                    raise AssertionError(f"WebSocket ended: {msg}")
            raise AssertionError("no frame in 60 s")

    hello, frame = asyncio.run(run())
    assert hello.get("type") == "hello"
    assert frame == (1, "cam")
