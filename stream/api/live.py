"""The live page's WebSocket, /ws: one connection per page carries the frames of the tiles in
view, the large view, and every stream's figures.

Client -> server, JSON text, every key optional (only the keys sent change):

    {"watch": ["cam", "door"], "fps": 10,              tiles in view, frames a second each
     "focus": "cam", "focus_fps": 25,                  the large view (null closes it)
     "overlay": {"mode": "mask", "alpha": 0.6, "classes": ["person"]}}   its own drawing

Server -> client:
  - binary: one frame = kind (1 tile, 2 large view), length of the id, the id (ASCII), the
    frame's sequence number (uint32, big-endian), then the JPEG;
  - text: {"type": "hello", limits...} once, {"type": "status", "ready", "streams": [...]}
    every second and at once when a state or the stream set changes (the same objects as
    /api/streams), {"type": "events", "stream"} at once when an event of the stream opens or
    closes (the page reads /api/events), {"type": "focus", "id", "overlay"} when the large
    view changes, and
    {"type": "error", "error", "loc"} for a message that was not understood.

Frames are paced per client and per tile: each tile holds one pending frame; a newer one
replaces it (a skip), and the writer sends the pending frames as fast as the socket drains,
so a slow client skips frames and never queues them. The JPEG bytes are the ones the render
thread encoded once for every viewer (MJPEG clients included)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from segstream.stream.api.context import CONFIG, backend
from segstream.stream.api.spec import Body, Endpoint, error, field_errors
from segstream.stream.config import PageConfig
from segstream.stream.datatypes import Published
from segstream.stream.render import VariantLimit
from segstream.stream.schemas import Error, LiveRequest, OverlayRequest
from segstream.stream.service import OverlayKey, Picture, Service
from segstream.stream.sinks import MjpegSink

log = logging.getLogger(__name__)

TILE, FOCUS = 1, 2
MAX_MESSAGE = 16 * 1024  # a watch list of 64 ids fits several times over
MESSAGES_PER_S, MESSAGE_BURST = 10.0, 30.0
# Unsent bytes the server lets pile up for one client: aiohttp's buffer, then the kernel's
# (TCP_NOTSENT_LOWAT leaves in-flight data to the congestion window, so fast links stay fast).
WRITE_BUFFER = 32 * 1024
NOTSENT_LOWAT = 16 * 1024


def frame_message(kind: int, stream_id: str, pub: Published) -> bytes:
    sid = stream_id.encode("ascii")
    return (
        bytes((kind, len(sid))) + sid + (pub.frame_seq & 0xFFFFFFFF).to_bytes(4, "big") + pub.jpeg
    )


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.ts = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.ts) * self.rate)
        self.ts = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


class PageSocket:
    """What every live-page connection has, on a node and at a cluster's gateway: pending
    texts (the newest per slot, sent before frames), error replies, and reading the page's
    JSON messages under a rate limit. Subclasses handle a valid LiveRequest and write."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.texts: dict[str, str] = {}
        self._errors = 0
        self.wake = asyncio.Event()
        self.closed = False

    def push_text(self, slot: str, text: str) -> None:
        self.texts.pop(slot, None)  # re-inserted last: status and errors keep their order
        self.texts[slot] = text
        self.wake.set()

    def send_error(self, message: str, loc: str = "body") -> None:
        self._errors += 1
        self.push_text(
            f"error{self._errors % 8}", json.dumps({"type": "error", "error": message, "loc": loc})
        )

    async def read(self) -> None:
        bucket = TokenBucket(MESSAGES_PER_S, MESSAGE_BURST)
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                if not bucket.take():
                    await self.ws.close(code=1008, message=b"too many messages")
                    break
                req = self.parse(msg.data)
                if req is not None:
                    self.handle(req)
            elif msg.type == WSMsgType.BINARY:
                self.send_error("send JSON text messages")
            elif msg.type == WSMsgType.ERROR:
                break

    def parse(self, text: str) -> LiveRequest | None:
        """The page's message, or None after replying with what is wrong in it."""
        try:
            data = json.loads(text)
        except ValueError as e:
            self.send_error(f"not JSON: {e}")
            return None
        try:
            return LiveRequest.model_validate(data)
        except ValidationError as e:
            first = field_errors(e)[0]
            self.send_error(f"{first['loc']}: {first['msg']}", first["loc"])
            return None

    def handle(self, req: LiveRequest) -> None:
        raise NotImplementedError

    async def writer(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PageHub(Protocol):
    def add(self, client: Any) -> None: ...
    def remove(self, client: Any) -> None: ...


async def open_page_socket(
    request: web.Request, cfg: PageConfig, connected: int
) -> web.WebSocketResponse:
    """The checks and the handshake of a live-page WebSocket (same origin, an Upgrade, room
    for another page), its limits, and the socket's small send buffers."""
    if not _same_origin(request):
        raise error(403, "WebSocket from another origin")
    ws = web.WebSocketResponse(
        compress=False, max_msg_size=MAX_MESSAGE, heartbeat=30.0, writer_limit=16 * 1024
    )
    if not ws.can_prepare(request).ok:
        raise error(400, "this endpoint speaks WebSocket only (Upgrade: websocket)")
    if connected >= cfg.max_clients:
        raise error(
            503, f"{connected} pages connected (page.max_clients)", headers={"Retry-After": "5"}
        )
    await ws.prepare(request)
    tune_socket(request)
    return ws


async def run_page_client(hub: PageHub, client: PageSocket) -> None:
    """Serves one page until it goes: reads its messages, writes beside, leaves nothing."""
    hub.add(client)
    writer = asyncio.create_task(client.writer())
    try:
        await client.read()
    finally:
        hub.remove(client)
        client.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


class LiveClient(PageSocket):
    """One page's connection: its watch list, its large view, and its pending messages."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        service: Service,
        cfg: PageConfig,
        transport: asyncio.BaseTransport | None = None,
    ) -> None:
        super().__init__(ws)
        self.transport = transport if isinstance(transport, asyncio.WriteTransport) else None
        self.service = service
        self.cfg = cfg
        self.tile_fps = cfg.max_tile_fps
        self.focus_fps = cfg.max_focus_fps
        self.watch: list[str] = []
        self.tiles: dict[str, asyncio.Task[None]] = {}
        self.focus_id: str | None = None
        self.overlay: OverlayRequest | None = None
        self._focus: tuple[Picture, asyncio.Task[None]] | None = None
        # Newest pending frame per (kind, stream), and newest text per slot: nothing queues.
        self.frames: dict[tuple[int, str], tuple[bytes, float]] = {}
        self.sent = self.skipped = self.bytes = 0

    # -- what goes out ---------------------------------------------------------------------
    async def writer(self) -> None:
        """Sends texts first, then the pending frames round-robin, each as soon as the socket
        takes it (send_bytes waits while the client does not read)."""
        loop = asyncio.get_running_loop()
        try:
            while not self.ws.closed:
                await self.wake.wait()
                self.wake.clear()
                while not self.ws.closed:
                    if self.texts:
                        slot = next(iter(self.texts))
                        await self.ws.send_str(self.texts.pop(slot))
                    elif self.frames:
                        key = next(iter(self.frames))
                        msg, capture_ts = self.frames.pop(key)
                        await self.ws.send_bytes(msg)
                        self.sent += 1
                        self.bytes += len(msg)
                        self.service.record_latency(key[1], loop.time() - capture_ts)
                    else:
                        break
        except (ConnectionError, RuntimeError):
            pass  # the client went away; the reader notices too

    async def _feed(self, kind: int, stream_id: str, sink: MjpegSink) -> None:
        """Moves the sink's newest frame into this client's pending slot, at most at the
        client's rate for that kind. The slot holds one frame: a newer one replaces it."""
        loop = asyncio.get_running_loop()
        shared = self._shared(stream_id, sink)
        sink.clients += 1
        if shared:
            self.service.observer.clients(stream_id, sink.clients)
        key = (kind, stream_id)
        seq, next_at = 0, 0.0
        try:
            while not sink.closed and not self.closed:
                pub = await sink.next(seq, timeout=1.0)
                if pub is None:
                    continue
                seq = pub.seq
                if key in self.frames:
                    self.skipped += 1
                self.frames[key] = (frame_message(kind, stream_id, pub), pub.capture_ts)
                self.wake.set()
                fps = self.tile_fps if kind == TILE else self.focus_fps
                now = loop.time()
                next_at = max(next_at + 1.0 / fps, now)
                await asyncio.sleep(next_at - now)
        finally:
            sink.clients -= 1
            if shared:
                self.service.observer.clients(stream_id, sink.clients)

    def _shared(self, stream_id: str, sink: MjpegSink) -> bool:
        s = self.service.streams.get(stream_id)
        return s is not None and s.mjpeg is sink

    # -- what comes in ---------------------------------------------------------------------
    def handle(self, req: LiveRequest) -> None:
        given = req.model_fields_set
        if req.fps is not None:
            self.tile_fps = min(req.fps, self.cfg.max_tile_fps)
        if req.focus_fps is not None:
            self.focus_fps = min(req.focus_fps, self.cfg.max_focus_fps)
        if "watch" in given:
            self.set_watch(req.watch or [])
        if "focus" in given or "overlay" in given:
            self.set_focus(
                req.focus if "focus" in given else self.focus_id,
                req.overlay if "overlay" in given else self.overlay,
            )

    def set_watch(self, ids: list[str]) -> None:
        ids = list(dict.fromkeys(ids))
        if len(ids) > self.cfg.max_watch:
            self.send_error(f"watch at most {self.cfg.max_watch} streams (page.max_watch)", "watch")
            return
        self.watch = ids
        self.sync()

    def sync(self) -> None:
        """Feeds for the watched streams that exist: new ones start, unwatched ones stop, and a
        stream removed and added again gets a new feed."""
        streams = self.service.streams
        for sid in list(self.tiles):
            if sid not in self.watch or sid not in streams or self.tiles[sid].done():
                self.tiles.pop(sid).cancel()
                self.frames.pop((TILE, sid), None)
        for sid in self.watch:
            s = streams.get(sid)
            if s is not None and sid not in self.tiles:
                self.tiles[sid] = asyncio.create_task(self._feed(TILE, sid, s.mjpeg))
        if self._focus is not None and self._focus[1].done() and self.focus_id in streams:
            self.set_focus(self.focus_id, self.overlay)  # its stream came back

    def set_focus(self, stream_id: str | None, overlay: OverlayRequest | None) -> None:
        key: OverlayKey | None = None
        if stream_id is not None:
            s = self.service.streams.get(stream_id)
            if s is None:
                self.send_error(f"unknown stream {stream_id!r}", "focus")
                return
            if overlay is not None:
                labels = self.service.segmenter.labels if self.service.segmenter else []
                unknown = sorted(set(overlay.classes or ()) - set(labels))
                if unknown:
                    self.send_error(f"unknown class names {unknown}", "overlay.classes")
                    return
                classes = tuple(sorted(set(overlay.classes))) if overlay.classes else None
                key = (overlay.mode, round(overlay.alpha, 2), classes)
        self._drop_focus()
        self.focus_id, self.overlay = stream_id, overlay
        if stream_id is not None:
            try:
                picture = self.service.acquire_picture(stream_id, key)
            except VariantLimit as e:
                self.send_error(f"{e}: showing the stream's own picture", "overlay")
                self.overlay = None
                picture = self.service.acquire_picture(stream_id, None)
            task = asyncio.create_task(self._feed(FOCUS, stream_id, picture.sink))
            self._focus = (picture, task)
        self.push_text(
            "focus",
            json.dumps(
                {
                    "type": "focus",
                    "id": stream_id,
                    "overlay": self.overlay.model_dump() if self.overlay is not None else None,
                }
            ),
        )

    def _drop_focus(self) -> None:
        if self._focus is not None:
            picture, task = self._focus
            self._focus = None
            task.cancel()
            picture.release()
            if self.focus_id is not None:
                self.frames.pop((FOCUS, self.focus_id), None)

    def buffered(self) -> int:
        """Bytes this client holds unsent: pending frames and the socket's write buffer."""
        n = sum(len(msg) for msg, _ in list(self.frames.values()))
        transport = self.transport
        if transport is None or transport.is_closing():
            return n
        return n + transport.get_write_buffer_size()

    def counts(self) -> tuple[int, int, int]:
        """Frames sent, frames skipped and bytes sent since the last call."""
        out = (self.sent, self.skipped, self.bytes)
        self.sent = self.skipped = self.bytes = 0
        return out

    def close(self) -> None:
        self.closed = True
        for task in self.tiles.values():
            task.cancel()
        self.tiles.clear()
        self._drop_focus()
        self.wake.set()


class LiveHub:
    """Every page's connection, and the figures they all get: the status of every stream is
    serialised once a second (and at once on a state or stream-set change) for all of them."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.clients: set[LiveClient] = set()
        self._task: asyncio.Task[None] | None = None
        self._text: str | None = None
        self._active: dict[str, Any] = {}  # stream -> its zones' open event classes

    def add(self, client: LiveClient) -> None:
        self.clients.add(client)
        client.push_text(
            "hello",
            json.dumps(
                {
                    "type": "hello",
                    "max_tile_fps": client.cfg.max_tile_fps,
                    "max_focus_fps": client.cfg.max_focus_fps,
                    "max_watch": client.cfg.max_watch,
                }
            ),
        )
        client.push_text("status", self._text or self.status_text())
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def remove(self, client: LiveClient) -> None:
        self.clients.discard(client)
        self._report(client)

    def _report(self, *gone: LiveClient) -> None:
        """Figures for /metrics: connections, unsent bytes, frames sent and skipped."""
        sent = skipped = nbytes = 0
        for c in (*self.clients, *gone):
            s, k, b = c.counts()
            sent, skipped, nbytes = sent + s, skipped + k, nbytes + b
        obs = self.service.observer
        obs.page_frames(sent, skipped, nbytes)
        obs.page_viewers(len(self.clients), sum(c.buffered() for c in self.clients))

    def status_text(self) -> str:
        service = self.service
        streams = []
        for sid in list(service.streams):
            with contextlib.suppress(KeyError):  # removed meanwhile
                streams.append(service.stream_status(sid))
        return json.dumps({"type": "status", "ready": service.ready, "streams": streams})

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last: tuple[Any, ...] | None = None
        members: tuple[Any, ...] = ()
        sent_at = 0.0
        while self.clients:
            service = self.service
            # list() copies in one step: a removal on another thread cannot break the loop
            now_members = tuple((sid, id(s)) for sid, s in list(service.streams.items()))
            sig = (
                now_members,
                service.ready,
                tuple(service.state_of(sid) for sid, _ in now_members),
            )
            self._report()
            changed = self._events_changed([sid for sid, _ in now_members])
            for sid in changed:
                text = json.dumps({"type": "events", "stream": sid})
                for c in list(self.clients):
                    c.push_text(f"events:{sid}", text)
            if changed or sig != last or loop.time() - sent_at >= 1.0:
                try:
                    self._text = self.status_text()
                except Exception:
                    log.exception("stream status failed")
                else:
                    for c in list(self.clients):
                        if now_members != members:
                            c.sync()
                        c.push_text("status", self._text)
                last, members, sent_at = sig, now_members, loop.time()
            await asyncio.sleep(0.25)

    def _events_changed(self, ids: list[str]) -> list[str]:
        """Streams whose zones' open events changed since the last look."""
        events = self.service.events
        if events is None:
            return []
        now = {sid: [z["active"] for z in events.zones(sid)] for sid in ids}
        changed = [sid for sid, a in now.items() if self._active.get(sid, a) != a]
        self._active = now
        return changed

    async def close_all(self) -> None:
        """Server shutdown: every page is told the server is going away (1001)."""
        for c in list(self.clients):
            c.close()
            with contextlib.suppress(Exception):
                await c.ws.close(code=1001, message=b"server shutting down")
        if self._task is not None:
            self._task.cancel()


def _same_origin(request: web.Request) -> bool:
    """A browser always sends Origin on a WebSocket handshake: a page of another site may not
    ride on this site's session cookie (clients that are not browsers send none)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


def tune_socket(request: web.Request) -> None:
    """Bounds what a slow client can have waiting unsent (aiohttp's buffer, then the
    kernel's), so the next write waits and the client gets the newest frame then."""
    transport = request.transport
    if transport is None:
        return
    with contextlib.suppress(Exception):
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
    sock = transport.get_extra_info("socket")
    lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is not None and lowat is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, lowat, NOTSENT_LOWAT)


async def live(request: web.Request) -> web.StreamResponse:
    """WebSocket of the live page (see the module's doc for the protocol)."""
    b = backend(request)
    ws = await open_page_socket(request, request.app[CONFIG].page, b.page_clients())
    await b.run_page(request, ws)
    return ws


ENDPOINTS = [
    Endpoint(
        "GET",
        "/ws",
        live,
        "The live page's WebSocket: frames of the tiles in view and of a large view with "
        "its own overlay, and every stream's figures (protocol: docs, Viewing: the live page)",
        tag="media",
        responses={
            101: Body(None, media="", description="Switching to WebSocket."),
            400: Body(Error, description="Not a WebSocket handshake."),
            503: Body(Error, description="Too many pages connected."),
        },
    ),
]
