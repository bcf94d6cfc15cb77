"""Re-stream sink: publish a stream's annotated frames as H.264 over RTSP (ANNOUNCE/RECORD, the
publishing MediaMTX and go2rtc accept).

    render thread --put()--> one-slot box (newest wins) --> encoder thread --> RTSP server

`put` copies the frame into the box and returns: it never waits on the encoder or the network,
and a frame the encoder has not taken yet is overwritten (counted as dropped). One thread per
sink does the rest: it encodes each new frame as it comes (the stream's output rate) with PyAV
(NVENC when asked for or when it opens, else libx264: zerolatency, an IDR frame every second,
pts from the wall clock), sends the last frame again after a second without a new one (so
receivers and media servers never time the session out), and publishes over RTSP with TCP
interleaving.

The RTSP client is a small one here, on Python sockets, not FFmpeg's rtsp muxer: the muxer
connects and negotiates inside avformat_write_header, which PyAV calls holding the GIL, so a
server that accepts and then stalls froze the whole process (render threads and the event loop)
for the full I/O timeout. Python's socket calls release the GIL, their timeouts are ours, and
close() can shut the socket down to wake a thread blocked in one.

    starting -> live <-> reconnecting         error (no encoder opens)         any -> stopped

A failed connect or write (server down, restarted, refusing) closes the session and retries
with capped exponential backoff and jitter; a new frame size starts a new session. The URL may
carry credentials: reasons and log lines never contain it unsanitised."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from fractions import Fraction
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import av
import cv2
import numpy as np
from av.video.codeccontext import VideoCodecContext

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import Rendered, SourceState
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.sanitize import sanitize_text

log = logging.getLogger(__name__)

KEYFRAME_S = 1.0  # an IDR frame this often (a receiver joining waits at most this long)
KEEPALIVE_S = 1.0  # no new frame for this long: send the last one again
IO_TIMEOUT_S = 5.0  # TCP connect, each RTSP reply, each blocked send
STABLE_S = 5.0  # a session that lasted this long resets the backoff
CLOSE_TIMEOUT_S = 2.0  # close() waits this long for the thread, then abandons it
TIME_BASE = Fraction(1, 90000)  # RTP's video clock
RTP_PAYLOAD = 1400  # bytes of NAL data per RTP packet (larger NAL units are split, FU-A)
HW_ENCODERS = ("h264_nvenc",)
# Hardware encoders that failed to open in this process: `auto` stops trying them.
_hw_unusable: set[str] = set()
_hw_lock = threading.Lock()


class EncoderUnavailable(RuntimeError):
    """The configured encoder cannot open here (retrying will not help)."""


class RtspError(ConnectionError):
    """The RTSP server refused or broke the session."""


# -- H.264 over RTP (RFC 6184) ----------------------------------------------------------------

_START_CODE = re.compile(b"\x00\x00\x01")


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex-B byte stream (start codes removed)."""
    starts = [m.end() for m in _START_CODE.finditer(data)]
    nals = []
    for i, s in enumerate(starts):
        e = starts[i + 1] - 3 if i + 1 < len(starts) else len(data)
        nal = data[s:e].rstrip(b"\x00") if i + 1 < len(starts) else data[s:e]
        if nal:
            nals.append(nal)
    return nals


def rtp_packets(
    nals: list[bytes], ts: int, seq: int, ssrc: int, pt: int = 96, size: int = RTP_PAYLOAD
) -> tuple[list[bytes], int]:
    """One access unit as RTP packets (single NAL units, or FU-A fragments of large ones);
    the marker bit is on the AU's last packet. Returns the packets and the next sequence."""
    out: list[bytes] = []
    payloads: list[bytes] = []
    for nal in nals:
        if len(nal) <= size:
            payloads.append(nal)
            continue
        indicator = (nal[0] & 0xE0) | 28
        kind = nal[0] & 0x1F
        body = memoryview(nal)[1:]
        for off in range(0, len(body), size):
            head = kind | (0x80 if off == 0 else 0) | (0x40 if off + size >= len(body) else 0)
            payloads.append(bytes((indicator, head)) + body[off : off + size])
    for i, payload in enumerate(payloads):
        marker = 0x80 if i == len(payloads) - 1 else 0
        header = struct.pack("!BBHII", 0x80, marker | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
        out.append(header + payload)
        seq += 1
    return out, seq


def interleave(packets: list[bytes], channel: int = 0) -> bytes:
    """RTP packets framed for RTSP over TCP ($, channel, length)."""
    return b"".join(struct.pack("!cBH", b"$", channel, len(p)) + p for p in packets)


def h264_sdp(sps: bytes, pps: bytes, host: str) -> str:
    sets = ",".join(base64.b64encode(x).decode() for x in (sps, pps))
    return (
        "v=0\r\n"
        f"o=- 0 0 IN IP4 {host}\r\n"
        "s=segstream\r\n"
        "c=IN IP4 0.0.0.0\r\n"
        "t=0 0\r\n"
        "m=video 0 RTP/AVP 96\r\n"
        "a=rtpmap:96 H264/90000\r\n"
        f"a=fmtp:96 packetization-mode=1; sprop-parameter-sets={sets}; "
        f"profile-level-id={sps[1:4].hex().upper()}\r\n"
        "a=control:streamid=0\r\n"
    )


# -- RTSP publishing (RFC 2326: ANNOUNCE, SETUP, RECORD; TCP interleaved) ----------------------


class RtspPublisher:
    """One RTSP publishing session of one H.264 track. Used by one thread; `abort` may be
    called from any other to wake it from a blocked call."""

    def __init__(self, url: str, timeout: float = IO_TIMEOUT_S) -> None:
        u = urlsplit(url)
        self.scheme = u.scheme.lower()
        if self.scheme not in ("rtsp", "rtsps") or not u.hostname:
            raise ValueError("not an rtsp:// or rtsps:// URL with a host")
        self.host = u.hostname
        self.port = u.port or (322 if self.scheme == "rtsps" else 554)
        self.user = unquote(u.username) if u.username is not None else None
        self.password = unquote(u.password or "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        # Request URIs carry no credentials (they go in Authorization), but the port always.
        self.uri = f"{self.scheme}://{host}:{self.port}{u.path or '/'}"
        if u.query:
            self.uri += f"?{u.query}"
        self.where = f"{host}:{self.port}"  # for messages: no path, no query, no credentials
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.aborted = False
        self._buf = bytearray()
        self._cseq = 0
        self._auth: tuple[str, dict[str, str]] | None = None  # scheme and challenge
        self._session: str | None = None
        self._session_timeout: float | None = None
        self._last_request = 0.0
        self._seq = random.randrange(1 << 16)
        self._ssrc = random.randrange(1 << 32)
        self._ts0 = random.randrange(1 << 32)

    # -- session ---------------------------------------------------------------------------
    def connect(self, sps: bytes, pps: bytes) -> None:
        """Connect and negotiate; afterwards `send` takes access units. Raises OSError."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise RtspError(f"cannot connect to {self.where}: {e.strerror or e}") from None
        if self.aborted:  # closed while connecting
            sock.close()
            raise RtspError("aborted")
        if self.scheme == "rtsps":
            ctx = ssl.create_default_context()
            try:
                sock = ctx.wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise RtspError(f"TLS with {self.where} failed: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.request("OPTIONS", self.uri)
        sdp = h264_sdp(sps, pps, self.host).encode()
        self.request("ANNOUNCE", self.uri, {"Content-Type": "application/sdp"}, sdp)
        _, headers = self.request(
            "SETUP",
            f"{self.uri.rstrip('/')}/streamid=0",
            {"Transport": "RTP/AVP/TCP;unicast;interleaved=0-1;mode=record"},
        )
        session = headers.get("session", "")
        self._session = session.split(";")[0].strip() or None
        m = re.search(r"timeout=(\d+)", session)
        self._session_timeout = float(m.group(1)) if m else None
        self.request("RECORD", self.uri, {"Range": "npt=0.000-"})

    def send(self, nals: list[bytes], pts: int) -> None:
        """One access unit (pts in 1/90000 s). Raises OSError when the server is gone."""
        assert self.sock is not None
        packets, self._seq = rtp_packets(nals, self._ts0 + pts, self._seq, self._ssrc)
        self.sock.sendall(interleave(packets))
        self._drain()
        if (
            self._session_timeout
            and time.monotonic() - self._last_request > self._session_timeout / 2
        ):
            self._send_request("GET_PARAMETER", self.uri)  # keep-alive; the reply is drained

    def close(self) -> None:
        """TEARDOWN (not waiting for the reply) and close; never raises."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            if self._session is not None:
                sock.settimeout(min(self.timeout, 1.0))
                self.sock = sock
                self._send_request("TEARDOWN", self.uri)
                self.sock = None
        with contextlib.suppress(OSError):
            sock.close()

    def abort(self) -> None:
        """From another thread: wake the owner from a blocked socket call."""
        self.aborted = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- RTSP messages ---------------------------------------------------------------------
    def request(
        self, method: str, uri: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, dict[str, str]]:
        """Sends a request and reads its reply; answers one 401 with the URL's credentials.
        Raises RtspError unless the reply is 2xx."""
        for attempt in range(2):
            cseq = self._send_request(method, uri, headers, body)
            status, reason, reply = self._read_reply(cseq)
            if status == 401 and attempt == 0 and self.user is not None:
                self._auth = _challenge(reply.get("www-authenticate", ""))
                if self._auth is not None:
                    continue
            if not 200 <= status < 300:
                raise RtspError(f"{method} refused by {self.where}: {status} {reason}")
            return status, reply
        raise AssertionError("unreachable")

    def _send_request(
        self, method: str, uri: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> int:
        assert self.sock is not None
        self._cseq += 1
        lines = [f"{method} {uri} RTSP/1.0", f"CSeq: {self._cseq}", "User-Agent: segstream"]
        if self._session is not None:
            lines.append(f"Session: {self._session}")
        if self._auth is not None:
            lines.append(f"Authorization: {self._authorization(method, uri)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self._last_request = time.monotonic()
        return self._cseq

    def _read_reply(self, cseq: int) -> tuple[int, str, dict[str, str]]:
        """The reply to request `cseq` (interleaved data and other replies are skipped)."""
        deadline = time.monotonic() + self.timeout
        while True:
            if self._buf[:1] == b"$":
                if len(self._buf) >= 4:
                    n = 4 + struct.unpack("!H", self._buf[2:4])[0]
                    if len(self._buf) >= n:
                        del self._buf[:n]
                        continue
            else:
                end = self._buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = self._buf[:end].decode("latin-1").split("\r\n")
                    headers: dict[str, str] = {}
                    for line in head[1:]:
                        k, _, v = line.partition(":")
                        k = k.strip().lower()
                        v = v.strip()
                        # Digest before Basic when a server offers both.
                        if k in headers and not (
                            k == "www-authenticate" and v.lower().startswith("digest")
                        ):
                            continue
                        headers[k] = v
                    length = int(headers.get("content-length", "0") or 0)
                    if len(self._buf) >= end + 4 + length:
                        del self._buf[: end + 4 + length]
                        parts = head[0].split(" ", 2)
                        if len(parts) < 2 or not parts[0].startswith("RTSP/"):
                            raise RtspError(f"{self.where} sent no RTSP reply")
                        if headers.get("cseq", str(cseq)) == str(cseq):
                            return int(parts[1]), parts[2] if len(parts) > 2 else "", headers
                        continue
            self._recv(deadline)

    def _recv(self, deadline: float) -> None:
        assert self.sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise RtspError(f"no reply from {self.where} within {self.timeout:g} s")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise RtspError(f"no reply from {self.where} within {self.timeout:g} s") from None
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            raise RtspError(f"{self.where} closed the connection")
        self._buf += data

    def _drain(self) -> None:
        """Reads and drops what the server sent (RTCP reports, replies to keep-alives), so
        its buffers never fill; raises when it has closed the connection."""
        assert self.sock is not None
        while select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(65536)
            if not data:
                raise RtspError(f"{self.where} closed the connection")
            if len(data) < 65536:
                return

    def _authorization(self, method: str, uri: str) -> str:
        assert self._auth is not None and self.user is not None
        scheme, ch = self._auth
        if scheme == "basic":
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            return f"Basic {token}"

        def md5(x: str) -> str:
            return hashlib.md5(x.encode()).hexdigest()

        realm, nonce = ch.get("realm", ""), ch.get("nonce", "")
        ha1, ha2 = md5(f"{self.user}:{realm}:{self.password}"), md5(f"{method}:{uri}")
        fields = {"username": self.user, "realm": realm, "nonce": nonce, "uri": uri}
        if "auth" in ch.get("qop", "").split(","):
            cnonce = os.urandom(8).hex()
            nc = f"{self._cseq:08x}"
            fields |= {"qop": "auth", "nc": nc, "cnonce": cnonce}
            fields["response"] = md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        else:
            fields["response"] = md5(f"{ha1}:{nonce}:{ha2}")
        if "opaque" in ch:
            fields["opaque"] = ch["opaque"]
        return "Digest " + ", ".join(
            f"{k}={v}" if k in ("qop", "nc") else f'{k}="{v}"' for k, v in fields.items()
        )


def _challenge(header: str) -> tuple[str, dict[str, str]] | None:
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "digest"):
        return None
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="?([^",]*)"?', rest)}
    return scheme, params


# -- the encoder -------------------------------------------------------------------------------


def _encoder_options(name: str, preset: str, bitrate_kbps: int) -> dict[str, str]:
    rate = str(bitrate_kbps * 1000)
    # No B-frames; IDR frames are forced by time (KEYFRAME_S), g is only a ceiling. Without a
    # global header both encoders repeat SPS/PPS in-band before every IDR.
    common = {"bf": "0", "g": "600", "forced-idr": "1", "maxrate": rate, "bufsize": rate}
    if name == "h264_nvenc":
        return {**common, "preset": "p1", "tune": "ull", "zerolatency": "1", "rc": "cbr"}
    return {**common, "preset": preset, "tune": "zerolatency"}


def _nvidia_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _candidates(choice: str) -> list[str]:
    """Encoders to try in order. `auto` tries NVENC only where an NVIDIA driver is loaded:
    PyAV opens a codec holding the GIL, and NVENC's open starts CUDA."""
    if choice != "auto":
        return [choice]
    with _hw_lock:
        hw = [e for e in HW_ENCODERS if e in av.codecs_available and e not in _hw_unusable]
    return [*hw, "libx264"] if hw and _nvidia_present() else ["libx264"]


def open_encoder(
    choice: str, width: int, height: int, fps: float, bitrate_kbps: int, preset: str
) -> VideoCodecContext:
    """The first H.264 encoder that opens: under `auto` a hardware one, then libx264."""
    errors = []
    for name in _candidates(choice):
        ctx = cast(VideoCodecContext, av.CodecContext.create(name, "w"))
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base = TIME_BASE
        ctx.framerate = Fraction(round(max(fps, 1.0) * 1000), 1000)  # rate control's guess
        ctx.bit_rate = bitrate_kbps * 1000
        ctx.thread_count = 1  # one core per stream at most; all its CPU in the sink's thread
        ctx.color_range = 1  # limited ("tv"): what cv2's BGR->I420 (BT.601) produces
        ctx.colorspace = 6  # SMPTE 170M (BT.601)
        ctx.options = _encoder_options(name, preset, bitrate_kbps)
        try:
            ctx.open()
        except Exception as e:
            errors.append(f"{name}: {e}")
            if name in HW_ENCODERS and choice == "auto":
                log.info("%s does not open here (%s); using libx264", name, e)
                with _hw_lock:
                    _hw_unusable.add(name)
            continue
        return ctx
    raise EncoderUnavailable("no H.264 encoder opens: " + "; ".join(errors))


# -- the sink ----------------------------------------------------------------------------------


class RestreamSink:
    """One stream's RTSP publisher (a `stream.datatypes.Sink`)."""

    def __init__(
        self,
        stream_id: str,
        url: str,
        *,
        encoder: str = "auto",
        bitrate_kbps: int = 2000,
        preset: str = "ultrafast",
        reconnect_initial: float = 0.5,
        reconnect_max: float = 10.0,
        io_timeout: float = IO_TIMEOUT_S,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.stream_id = stream_id
        self.url = url
        self.safe_url = sanitize_text(url)
        self.encoder_choice = encoder
        self.bitrate_kbps = bitrate_kbps
        self.preset = preset
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.io_timeout = io_timeout
        self._observer = observer
        self._cond = threading.Condition()
        self._box: np.ndarray | None = None  # newest frame, not taken yet
        self._spare: np.ndarray | None = None  # a buffer nobody uses (put fills it)
        self._work: np.ndarray | None = None  # the frame the encoder thread holds
        self._arrivals: deque[float] = deque(maxlen=32)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pub: RtspPublisher | None = None  # the live session (close() aborts it)
        self._closed = False
        self._lock = threading.Lock()  # state and counters (read by the API)
        self._state = SourceState.STOPPED
        self._reason: str | None = None
        self._encoder: str | None = None  # the one that opened
        self._frames = self._bytes = self._errors = self._dropped = self._sessions = 0
        self._cpu_s = 0.0

    @classmethod
    def from_config(cls, scfg: StreamConfig, observer: Observer = NULL_OBSERVER) -> RestreamSink:
        assert scfg.restream is not None
        return cls(
            scfg.id,
            scfg.restream,
            encoder=scfg.restream_encoder,
            bitrate_kbps=scfg.restream_bitrate,
            preset=scfg.restream_preset,
            reconnect_initial=scfg.reconnect_initial,
            reconnect_max=scfg.reconnect_max,
            observer=observer,
        )

    # -- Sink (render thread) --------------------------------------------------------------
    def wants_frames(self) -> bool:
        return not self._closed and self._state is not SourceState.ERROR

    def put(self, frame: Rendered) -> None:
        """Copies the frame into the box (the render buffer is reused) and wakes the encoder.
        Holds the lock only for the copy; the encoder thread takes it only to swap buffers."""
        img = frame.image
        with self._cond:
            if self._closed:
                return
            self._arrivals.append(time.monotonic())
            buf: np.ndarray | None
            if self._box is not None:
                buf = self._box  # unseen: overwrite it, newest wins
                with self._lock:
                    self._dropped += 1
            else:
                buf, self._spare = self._spare, None
            if buf is None or buf.shape != img.shape:
                buf = np.empty(img.shape, np.uint8)
            np.copyto(buf, img)
            self._box = buf
            self._cond.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stops the thread (it tears the session down) and removes the metric series. A
        thread still connecting (DNS, TCP connect) is abandoned; it ends within io_timeout."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
            pub = self._pub
        if pub is not None:
            pub.abort()  # wakes the thread from a blocked send or reply
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.warning(
                    "%s: restream thread is still connecting; abandoned it (it ends within %.0f s)",
                    self.stream_id,
                    self.io_timeout,
                )
        with self._lock:
            self._set_state(SourceState.STOPPED, None)
        self._observer.restream_removed(self.stream_id)

    # -- control and state (any thread) ----------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._observer.restream_added(self.stream_id)
        with self._lock:
            self._set_state(SourceState.STARTING, "waiting for the first frame")
        self._thread = threading.Thread(
            target=self._run, name=f"restream-{self.stream_id}", daemon=True
        )
        self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def state(self) -> SourceState:
        with self._lock:
            return self._state

    def status(self) -> dict[str, Any]:
        """For the API: the URL sanitised, state, reason and counters."""
        with self._lock:
            return {
                "url": self.safe_url,
                "state": self._state.value,
                "reason": self._reason,
                "encoder": self._encoder,
                "frames": self._frames,
                "bytes": self._bytes,
                "errors": self._errors,
                "dropped": self._dropped,
                "sessions": self._sessions,
                "fps_in": round(self._rate(), 2),
                "cpu_s": round(self._cpu_s, 3),
            }

    def _rate(self) -> float:
        t = list(self._arrivals)
        if len(t) < 2 or t[-1] - t[0] <= 0:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    def _set_state(self, state: SourceState, reason: str | None) -> None:
        """Caller holds self._lock. Once closed, only `stopped` is accepted."""
        if self._closed and state is not SourceState.STOPPED:
            return
        reason = None if reason is None else sanitize_text(reason)
        if state is not self._state:
            log.info(
                "%s: restream %s -> %s%s",
                self.stream_id,
                self._state.value,
                state.value,
                f" ({reason})" if reason else "",
            )
        self._state, self._reason = state, reason
        self._observer.restream_state(self.stream_id, state, reason)

    # -- encoder thread --------------------------------------------------------------------
    def _take(self, timeout: float | None) -> np.ndarray | None:
        """The newest frame (None: none within timeout, or stopping). The previous frame's
        buffer goes back to the box's spare."""
        with self._cond:
            if self._box is None and not self._stop.is_set():
                self._cond.wait(timeout)
            if self._stop.is_set() or self._box is None:
                return None
            img, self._box = self._box, None
            if self._work is not None and self._spare is None:
                self._spare = self._work
            self._work = img
            return img

    def _run(self) -> None:
        failures = 0
        img: np.ndarray | None = None
        try:
            while not self._stop.is_set():
                img = img if img is not None else self._take(None)
                if img is None:
                    continue  # woken without a frame: stopping, or spurious
                began = time.monotonic()
                try:
                    img = self._session(img)  # a frame of a new size, or None when stopping
                    failures = 0
                    continue
                except EncoderUnavailable as e:
                    with self._lock:
                        self._set_state(SourceState.ERROR, str(e))
                    log.error("%s: restream: %s", self.stream_id, sanitize_text(str(e)))
                    return
                except Exception as e:
                    if self._stop.is_set():
                        return
                    failures = 1 if time.monotonic() - began >= STABLE_S else failures + 1
                    if not self._backoff(f"{type(e).__name__}: {e}", failures):
                        return
                # Start again from the newest frame; without one, from the last one again.
                img = self._take(0)
                if img is None:
                    with self._cond:
                        img = self._work
        finally:
            with self._cond:
                self._work = None
            self._cpu_tick()

    def _backoff(self, reason: str, failures: int) -> bool:
        """Counts the failure and waits out the backoff. False: stopping."""
        delay = min(self.reconnect_initial * 2 ** (failures - 1), self.reconnect_max)
        delay = min(delay * random.uniform(0.8, 1.2), self.reconnect_max)
        reason = sanitize_text(reason)
        self._cpu_tick()
        with self._lock:
            self._errors += 1
            self._set_state(SourceState.RECONNECTING, f"{reason}; retrying in {delay:.1f} s")
        self._observer.restream_error(self.stream_id)
        log.warning(
            "%s: restream to %s failed (%s); retrying in %.1f s",
            self.stream_id,
            self.safe_url,
            reason,
            delay,
        )
        return not self._stop.wait(delay)

    def _cpu_tick(self) -> None:
        cpu = time.thread_time()
        with self._lock:
            self._cpu_s = cpu

    def _session(self, img: np.ndarray) -> np.ndarray | None:
        """One RTSP session: encode the first frame, connect with its SPS/PPS, then send each
        new frame. Returns the first frame of a new size (the caller starts a new session),
        or None when stopping; raises on a connect or write failure."""
        h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2  # 4:2:0 needs even sizes
        if h == 0 or w == 0:
            raise ValueError(f"frame too small to encode: {img.shape}")
        with self._lock:
            self._set_state(SourceState.STARTING, f"connecting to {self.safe_url}")
        enc = open_encoder(
            self.encoder_choice, w, h, self._rate() or 15.0, self.bitrate_kbps, self.preset
        )
        with self._lock:
            self._encoder = enc.name
        pub = RtspPublisher(self.url, self.io_timeout)
        with self._cond:
            self._pub = pub
        try:
            yuv = np.empty((h * 3 // 2, w), np.uint8)
            t0 = time.monotonic()
            last_pts, last_key = -1, -KEYFRAME_S
            while True:
                cv2.cvtColor(img[:h, :w], cv2.COLOR_BGR2YUV_I420, dst=yuv)
                while True:  # the same picture again while no new frame comes (keep-alive)
                    now = time.monotonic()
                    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                    frame.pts = last_pts = max(round((now - t0) / TIME_BASE), last_pts + 1)
                    frame.time_base = TIME_BASE
                    if now - last_key >= KEYFRAME_S:
                        frame.pict_type = av.video.frame.PictureType.I
                        last_key = now
                    self._send(pub, enc.encode(frame))
                    nxt = self._take(KEEPALIVE_S)
                    if self._stop.is_set():
                        return None
                    if nxt is not None:
                        break
                if nxt.shape != img.shape:
                    log.info(
                        "%s: restream frame size %dx%d -> %dx%d; new session",
                        self.stream_id,
                        img.shape[1],
                        img.shape[0],
                        nxt.shape[1],
                        nxt.shape[0],
                    )
                    return nxt
                img = nxt
        finally:
            with self._cond:
                self._pub = None
            pub.close()

    def _send(self, pub: RtspPublisher, packets: list[av.Packet]) -> None:
        for p in packets:
            nals = split_annexb(bytes(p))
            if pub.sock is None:  # the first access unit: connect with its parameter sets
                sps = next((n for n in nals if n[0] & 0x1F == 7), None)
                pps = next((n for n in nals if n[0] & 0x1F == 8), None)
                if sps is None or pps is None:
                    raise RtspError("the encoder's first frame carries no SPS/PPS")
                pub.connect(sps, pps)
            pub.send(nals, int(p.pts or 0))
            with self._lock:
                if self._state is not SourceState.LIVE:
                    self._sessions += 1
                    self._set_state(SourceState.LIVE, None)
                self._frames += 1
                self._bytes += p.size
            self._observer.restream_frames(self.stream_id, 1, p.size)
        self._cpu_tick()
