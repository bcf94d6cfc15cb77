"""A small RTSP publishing client on Python sockets (RFC 2326: ANNOUNCE, SETUP, RECORD; TCP
interleaved), answering a server's Basic or Digest challenge with the URL's credentials.

Not FFmpeg's rtsp muxer: the muxer connects and negotiates inside avformat_write_header, which
PyAV calls holding the GIL, so a server that accepts and then stalls froze the whole process
for the full I/O timeout. Python's socket calls release the GIL, their timeouts are ours, and
`abort()` can shut the socket down to wake a thread blocked in one."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import re
import select
import socket
import ssl
import struct
import time
from urllib.parse import unquote, urlsplit

from segstream.stream.restream.rtp import h264_sdp, interleave, rtp_packets

IO_TIMEOUT_S = 5.0  # TCP connect, each RTSP reply, each blocked send


class RtspError(ConnectionError):
    """The RTSP server refused or broke the session."""


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
