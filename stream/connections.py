"""Limits on HTTP connections before aiohttp sees a request.

aiohttp keeps a connection that sends half a request line for as long as its keep-alive
timeout, and any client may open as many as it likes: a slow-headers client holds file
descriptors for free. The guard wraps each connection's protocol: a client whose first
request's headers are not complete within `header_timeout_s` gets 408 and is closed (as
nginx's client_header_timeout); a client address past `max_per_client` open connections
gets 503 and is closed at once. Later requests on a kept-alive connection are bounded by
aiohttp's keep-alive timeout (`server.keepalive_timeout_s`), which closes a connection whose
next request is not complete by then. Both closes are counted."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

_END_OF_HEADERS = b"\r\n\r\n"


def _reply(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGuard:
    def __init__(
        self,
        header_timeout_s: float,
        max_per_client: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_per_client = max_per_client  # 0: no limit
        self.open: Tally[str] = Tally()
        r = registry or CollectorRegistry()
        self._open_gauge = Gauge("segstream_http_connections", "Open HTTP connections.", registry=r)
        self._closed = Counter(
            "segstream_http_connections_closed_total",
            "HTTP connections the service closed before a request: reason=header_timeout "
            "(request headers incomplete in time), per_client_limit (too many from one address).",
            ["reason"],
            registry=r,
        )
        for reason in ("header_timeout", "per_client_limit"):
            self._closed.labels(reason)  # both series exist from the start

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, factory())

    def admit(self, client: str) -> bool:
        if self.max_per_client and self.open[client] >= self.max_per_client:
            self._closed.labels("per_client_limit").inc()
            return False
        self.open[client] += 1
        self._open_gauge.inc()
        return True

    def release(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]
        self._open_gauge.dec()

    def timed_out(self) -> None:
        self._closed.labels("header_timeout").inc()


class _Guarded(asyncio.Protocol):
    """Forwards every callback to aiohttp's protocol, after the guard's checks."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.client: str | None = None  # set once admitted
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes seen, to find the end of headers across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else "unix"
        if not self.guard.admit(client):
            log.warning(
                "refused a connection from %s: too many open (server.max_connections_per_client)",
                client,
            )
            transport.write(
                _reply("503 Service Unavailable", "too many connections from this address")
            )
            transport.close()
            return
        self.client = client
        if self.guard.header_timeout_s > 0:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.guard.header_timeout_s, self._too_slow)
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self.timer = None
        self.guard.timed_out()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_reply("408 Request Timeout", "request headers not sent in time"))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.client is None:
            return
        if self.timer is not None:
            seen = self.tail + data
            if _END_OF_HEADERS in seen:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.client is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.client is None:
            return
        self.guard.release(self.client)
        self.client = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.TCPSite):
    """web.TCPSite whose connections go through a ConnectionGuard."""

    __slots__ = ("_guard",)

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, **kw: Any
    ) -> None:
        super().__init__(runner, host, port, **kw)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
