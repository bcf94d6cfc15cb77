"""Re-stream promises that test_restream.py does not hold, checked on a running service through
its HTTP API and the documented config keys (`restream`, `restream_encoder`): turned on and off
with PATCH, `auto` settling on libx264 where no hardware encoder opens, Basic credentials,
`rtsps://` verifying the server's certificate (one signed by a CA the process trusts, through
OpenSSL's SSL_CERT_FILE, is taken; a self-signed one is refused), the last picture repeated
once a second while no new frame comes, and frames the encoder could not take counted as
`dropped`. Receivers: FFmpeg listening (tests/rtsp.py RtspListener), gst-rtsp-server in
record mode with Basic auth, and a TLS front of our own before FFmpeg."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import cv2
import pytest
from support.rtsp import RtspListener, RtspServer, encode_clip, gst_rtsp_available
from support.service_proc import ServiceProcess
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

SECRET = "s3cr%t"  # percent-encoded in URLs: s3cr%25t


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA; a server certificate for 127.0.0.1 that it signed, and one for another name
    (same key); a self-signed one for 127.0.0.1."""
    d = tmp_path_factory.mktemp("certs")
    key = ["-newkey", "rsa:2048", "-nodes", "-days", "2"]
    openssl("req", "-x509", *key, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-subj", "/CN=t")
    openssl("req", *key[:3], "-keyout", f"{d}/ok.key", "-out", f"{d}/ok.csr", "-subj", "/CN=ok")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", f"{d}/ok.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{d}/san.ext", "-out", f"{d}/ok.pem",
    )  # fmt: skip
    (d / "other.ext").write_text("subjectAltName=DNS:media.example\n")
    openssl(
        "x509", "-req", "-in", f"{d}/ok.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{d}/other.ext", "-out", f"{d}/other.pem",
    )  # fmt: skip
    openssl(
        "req", "-x509", *key, "-keyout", f"{d}/self.key", "-out", f"{d}/self.pem",
        "-subj", "/CN=self", "-addext", "subjectAltName=IP:127.0.0.1",
    )  # fmt: skip
    names = ("ca.pem", "ok.pem", "ok.key", "other.pem", "self.pem", "self.key")
    return {name: d / name for name in names}


@pytest.fixture(scope="module")
def clip(shared_dir: Path) -> Path:
    return encode_clip(
        shared_dir / "data/video/vtest.avi", size=(320, 240), seconds=4.0, fps=10, container="mp4"
    )


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    segstream_home: Path,
    certs: dict[str, Path],
    clip: Path,
) -> Iterator[ServiceProcess]:
    """No streams to begin with; the process trusts the test CA (and only it)."""
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "render": {"alpha": 1.0},
        "sources": {"allow_local": [str(clip.parent)]},
        "streams": [],
    }
    svc = ServiceProcess(
        tmp_path_factory.mktemp("restream"), cfg, env={"SSL_CERT_FILE": str(certs["ca.pem"])}
    ).start()
    yield svc
    svc.stop()


def restream(service: ServiceProcess, sid: str) -> dict[str, Any] | None:
    return service.stream(sid)["restream"]


@contextlib.contextmanager
def stream(service: ServiceProcess, body: dict[str, Any]) -> Iterator[str]:
    status, raw, _ = service.request("POST", "/api/streams", body)
    assert status == 201, raw
    try:
        yield body["id"]
    finally:
        status, raw, _ = service.request("DELETE", f"/api/streams/{body['id']}")
        assert status == 204, raw


def expected_encoder() -> str:
    """What `auto` must pick here: NVENC where an NVIDIA driver is loaded and it opens, else
    libx264 (this machine: no driver)."""
    if not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()):
        return "libx264"
    ctx = av.CodecContext.create("h264_nvenc", "w")
    ctx.width, ctx.height, ctx.pix_fmt = 320, 240, "yuv420p"
    try:
        ctx.open()
    except Exception:
        return "libx264"
    return "h264_nvenc"


def test_turned_on_and_off_with_patch(service: ServiceProcess, clip: Path) -> None:
    """PATCH `restream` on a live stream: publishing starts (`auto` picks the encoder that
    opens here), the reader keeps running; PATCH null: the session is torn down and the
    status says null."""
    rx = RtspListener().start()
    try:
        body = {"id": "onoff", "source": str(clip), "infer_fps": 0.5, "output": "smooth"}
        with stream(service, body) as sid:
            service.wait_state(sid, {"live"}, 30)
            assert restream(service, sid) is None
            before = service.stream(sid)
            status, raw, _ = service.request(
                "PATCH", f"/api/streams/{sid}", {"restream": {"url": rx.url, "encoder": "auto"}}
            )
            assert status == 200, raw
            assert wait_for(lambda: rx.frames >= 10, 30), (rx.frames, restream(service, sid))
            st = restream(service, sid)
            assert st is not None and st["state"] == "live" and st["frames"] >= 10, st
            assert st["encoder"] == expected_encoder() and st["url"] == rx.url, st
            after = service.stream(sid)
            assert after["state"] == "live" and after["reconnects"] == before["reconnects"]

            status, raw, _ = service.request("PATCH", f"/api/streams/{sid}", {"restream": None})
            assert status == 200 and json.loads(raw)["restream"] is None, raw
            assert restream(service, sid) is None
            # TEARDOWN ends FFmpeg's one session: it exits, and no frame comes after.
            assert wait_for(lambda: rx.proc is not None and rx.proc.poll() is not None, 10)
            assert service.stream(sid)["state"] == "live"
    finally:
        rx.kill()


def test_basic_credentials(service: ServiceProcess, clip: Path, tmp_path: Path) -> None:
    """A server that asks for Basic credentials gets the URL's; a wrong password is a 401 in
    the reason, and the password shows nowhere."""
    if (why := gst_rtsp_available()) is not None:
        pytest.fail(why)
    rec = tmp_path / "in.h264"
    with RtspServer({}, records={"/in": rec}, auth=f"alice:{SECRET}", auth_method="basic") as srv:
        url = srv.url("/in").replace("rtsp://", "rtsp://alice:s3cr%25t@")
        body = {"id": "basic", "source": str(clip), "output": "smooth", "restream": url}
        with stream(service, body | {"reconnect_initial": 0.2, "reconnect_max": 0.5}) as sid:
            assert wait_for(lambda: (restream(service, sid) or {})["frames"] >= 15, 30), restream(
                service, sid
            )
            st = restream(service, sid)
            assert st["state"] == "live" and st["errors"] == 0, st
            assert st["url"] == f"rtsp://***@127.0.0.1:{srv.port}/in", st
            status, raw, _ = service.request(
                "PATCH", f"/api/streams/{sid}", {"restream": url.replace("s3cr%25t", "hunter2")}
            )
            assert status == 200, raw
            assert wait_for(lambda: (restream(service, sid) or {})["errors"] >= 1, 15)
            st = restream(service, sid)
            assert st["state"] == "reconnecting" and "401" in st["reason"], st
            _, page, _ = service.get("/api/streams")
    cap = cv2.VideoCapture(str(rec))
    got = 0
    while cap.read()[0]:
        got += 1
    assert got >= 10, got  # what the server recorded decodes
    for text in (page.decode(), service.log()):
        assert SECRET not in text and "s3cr%25t" not in text and "hunter2" not in text


class TlsFront:
    """A TLS server on loopback that passes each connection on to a plain RTSP server,
    rewriting the request URIs (rtsps://host:front -> rtsp://host:back) so FFmpeg takes them
    as its own. `handshakes` counts the TLS handshakes that succeeded."""

    def __init__(self, cert: Path, key: Path, back_port: int) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.back_port = back_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = self.failed = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"rtsps://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            self.failed += 1
            raw.close()
            return
        self.handshakes += 1
        old = f"rtsps://127.0.0.1:{self.port}".encode()
        new = f"rtsp://127.0.0.1:{self.back_port}".encode()
        with conn, socket.create_connection(("127.0.0.1", self.back_port), timeout=5) as back:
            conn.settimeout(None)
            back.settimeout(None)
            while not self.closed:
                ready = [conn] if conn.pending() else select.select([conn, back], [], [], 1)[0]
                for s in ready:
                    try:
                        data = s.recv(65536)
                    except (OSError, ssl.SSLError):
                        return
                    if not data:
                        return
                    if s is conn:
                        back.sendall(data.replace(old, new))
                    else:
                        conn.sendall(data)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def test_rtsps_verifies_the_server_certificate(
    service: ServiceProcess, clip: Path, certs: dict[str, Path]
) -> None:
    """rtsps:// to a server whose certificate the trusted CA signed: published. To one with a
    self-signed certificate, or one the CA signed for another name: refused during the
    handshake, reconnecting, saying why."""
    rx = RtspListener().start()
    good = TlsFront(certs["ok.pem"], certs["ok.key"], rx.port)
    bad = TlsFront(certs["self.pem"], certs["self.key"], rx.port)
    other = TlsFront(certs["other.pem"], certs["ok.key"], rx.port)
    base = {"source": str(clip), "output": "smooth", "reconnect_initial": 0.2}
    try:
        with stream(service, base | {"id": "tls", "restream": good.url("/live")}) as sid:
            assert wait_for(lambda: rx.frames >= 10, 30), (rx.frames, restream(service, sid))
            st = restream(service, sid)
            assert st["state"] == "live" and good.handshakes >= 1, st
        for front, why in ((bad, "self-signed certificate"), (other, "IP address mismatch")):
            with stream(service, base | {"id": "refused", "restream": front.url("/live")}) as sid:
                assert wait_for(lambda: (restream(service, sid) or {})["errors"] >= 2, 20)
                st = restream(service, sid)
                assert st["state"] == "reconnecting" and st["frames"] == 0, st
                assert "certificate verify failed" in st["reason"] and why in st["reason"], st
                assert front.handshakes == 0 and front.failed >= 2
    finally:
        for front in (good, bad, other):
            front.close()
        rx.kill()


def test_the_last_picture_is_repeated_once_a_second(service: ServiceProcess, clip: Path) -> None:
    """A stream that publishes a frame every 5 s (segmented output, infer_fps 0.2): the
    re-stream sends the last picture again after each second without a new one, so about one
    frame a second goes out (not 0.2, and not more)."""
    rx = RtspListener().start()
    body = {"id": "idle", "source": str(clip), "infer_fps": 0.2, "restream": rx.url}
    try:
        with stream(service, body) as sid:
            assert wait_for(lambda: (restream(service, sid) or {})["frames"] >= 3, 30)
            n0, t0 = restream(service, sid)["frames"], time.monotonic()
            time.sleep(6.0)  # the window counted
            whole = service.stream(sid)
            st = whole["restream"]
            rate = (st["frames"] - n0) / (time.monotonic() - t0)
            print(f"idle re-stream: {rate:.2f} frames a second out, {whole['fps_out']} in")
            assert whole["fps_out"] <= 0.5, whole  # new pictures are rare...
            assert 0.6 <= rate <= 1.0 + 0.2 + 2 / 6, (rate, st)  # ...one a second goes out
            assert st["state"] == "live", st
            # What went out decodes at the receiver (FFmpeg probes a while before its first).
            assert wait_for(lambda: rx.frames >= 5, 20), (rx.frames, st)
    finally:
        rx.kill()


def test_frames_the_encoder_could_not_take_are_counted_as_dropped(
    service: ServiceProcess, clip: Path
) -> None:
    """A server that accepts and never answers: the encoder thread waits on it, and every
    frame rendered meanwhile replaces the one before in the box, counted as dropped (at the
    stream's rate); none is sent."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(
        target=lambda: [held.append(srv.accept()[0]) for _ in range(4)], daemon=True
    ).start()
    url = f"rtsp://127.0.0.1:{srv.getsockname()[1]}/x"
    body = {"id": "stall", "source": str(clip), "output": "smooth", "restream": url}
    try:
        with stream(service, body) as sid:
            assert wait_for(lambda: (restream(service, sid) or {})["dropped"] >= 5, 30)
            d0, t0 = restream(service, sid)["dropped"], time.monotonic()
            time.sleep(3.0)  # the window counted
            st = restream(service, sid)
            rate = (st["dropped"] - d0) / (time.monotonic() - t0)
            print(f"stalled re-stream: {rate:.1f} dropped a second, {st['fps_in']} in")
            assert st["frames"] == 0 and st["state"] in ("starting", "reconnecting"), st
            assert 0.6 * st["fps_in"] <= rate <= 1.2 * st["fps_in"] + 1, (rate, st)
            assert st["fps_in"] >= 5, st  # the 10 fps clip, every frame rendered
    finally:
        srv.close()
        for c in held:
            c.close()
