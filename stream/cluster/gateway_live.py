"""The gateway's /ws: the live page's one WebSocket, relayed from the node services.

The page speaks the single node's protocol (stream.api.live) to the gateway. The gateway opens
one upstream WebSocket per node that owns a watched or focused stream (authenticated with the
cluster secret), sends each node the page's request restricted to that node's streams (only
the keys that changed), and passes the nodes' binary frames through unchanged. The nodes pace
the frames (per tile, newest wins); the gateway reads every upstream as fast as it comes and
keeps at most one pending frame per tile for the page, so a slow page skips frames and nothing
queues. The status of every stream in the cluster (with its `node`) comes from the gateway
itself, once a second, serialised once for every page; the nodes' own status messages are
dropped. An upstream the page no longer needs is closed; one that fails is opened again at the
next status tick (placement changes, a node restarted).

This module knows nothing of the controller or of HTTP to the nodes: the gateway hands it a
`connect(node)` and a `status()` callable, so its logic is tested without Ray."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from segstream.stream.api.live import FOCUS, TILE, PageSocket
from segstream.stream.config import PageConfig
from segstream.stream.schemas import LiveRequest

log = logging.getLogger(__name__)

# Largest message accepted from a node: one JPEG frame with its header.
MAX_UPSTREAM_MESSAGE = 16 * 1024 * 1024
RETRY_S = 1.0  # an upstream that failed is not opened again sooner

Connect = Callable[[str], Awaitable[aiohttp.ClientWebSocketResponse]]


@dataclass(frozen=True)
class ClusterView:
    """What the hub learns once a second: the status message, which node runs each placed
    stream, and every stream id the cluster knows (placed or not)."""

    text: str
    owner: dict[str, str]
    known: frozenset[str]


def frame_header(msg: bytes) -> tuple[int, str, int] | None:
    """(kind, stream id, frame seq) of a binary frame `kind · len · id · seq(uint32) · JPEG`;
    None if it is not one."""
    if len(msg) < 6:
        return None
    kind, n = msg[0], msg[1]
    if kind not in (TILE, FOCUS) or len(msg) < 6 + n:
        return None
    try:
        sid = msg[2 : 2 + n].decode("ascii")
    except UnicodeDecodeError:
        return None
    return kind, sid, int.from_bytes(msg[2 + n : 6 + n], "big")


@dataclass
class Wanted:
    """The page's request, as the single node would hold it."""

    watch: list[str] = field(default_factory=list)
    fps: float = 0.0
    focus: str | None = None
    focus_fps: float = 0.0
    overlay: dict[str, Any] | None = None


# What a fresh node connection holds before it is told anything (stream.api.live.LiveClient).
_NODE_DEFAULTS: dict[str, Any] = {"watch": [], "focus": None, "overlay": None}


def node_requests(want: Wanted, owner: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per node that runs a watched or the focused stream: the full request it should hold
    (watch restricted to its streams; focus and overlay only on the focused stream's node)."""
    out: dict[str, dict[str, Any]] = {}

    def of(node: str) -> dict[str, Any]:
        return out.setdefault(
            node,
            {
                "watch": [],
                "fps": want.fps,
                "focus": None,
                "focus_fps": want.focus_fps,
                "overlay": None,
            },
        )

    for sid in want.watch:
        if (node := owner.get(sid)) is not None:
            of(node)["watch"].append(sid)
    if want.focus is not None and (node := owner.get(want.focus)) is not None:
        of(node).update(focus=want.focus, overlay=want.overlay)
    return out


def changed_keys(held: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """The message that brings a node from `held` to `wanted`: only the keys that differ."""
    return {k: v for k, v in wanted.items() if held.get(k, _NODE_DEFAULTS.get(k)) != v}


class Upstream:
    """One node's WebSocket for one page: sends the request's changes, hands frames back."""

    def __init__(self, node: str, client: GatewayLiveClient) -> None:
        self.node, self.client = node, client
        self.want: dict[str, Any] = {}
        self.held: dict[str, Any] = {}
        self.changed = asyncio.Event()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.task = asyncio.create_task(self._run())

    def request(self, want: dict[str, Any]) -> None:
        self.want = want
        self.changed.set()

    async def _run(self) -> None:
        try:
            self.ws = await self.client.connect(self.node)
        except Exception as e:  # retried at the next status tick (RETRY_S)
            log.info("no WebSocket to node %s: %s", self.node, e)
            return
        sender = asyncio.create_task(self._send())
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    self.client.on_frame(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self.client.on_text(self.node, msg.data)
                else:
                    break
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def _send(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            while not self.ws.closed:
                await self.changed.wait()
                self.changed.clear()
                diff = changed_keys(self.held, self.want)
                if diff:
                    await self.ws.send_str(json.dumps(diff))
                    self.held |= diff

    def close(self) -> None:
        self.task.cancel()


class GatewayLiveClient(PageSocket):
    """One page's connection at the gateway."""

    def __init__(self, ws: web.WebSocketResponse, cfg: PageConfig, connect: Connect) -> None:
        super().__init__(ws)
        self.cfg, self.connect = cfg, connect
        self.want = Wanted(fps=cfg.max_tile_fps, focus_fps=cfg.max_focus_fps)
        self.owner: dict[str, str] = {}
        self.known: frozenset[str] | None = None  # None: no view of the cluster yet
        self.upstreams: dict[str, Upstream] = {}
        self._failed_at: dict[str, float] = {}
        self.frames: dict[tuple[int, str], bytes] = {}  # newest pending frame per tile
        self.sent = self.skipped = 0

    # -- towards the page --------------------------------------------------------------------
    def on_frame(self, msg: bytes) -> None:
        """A node's frame: kept if the page still wants that tile, replacing a pending one."""
        head = frame_header(msg)
        if head is None:
            return
        kind, sid, _ = head
        if (kind == TILE and sid not in self.want.watch) or (
            kind == FOCUS and sid != self.want.focus
        ):
            return
        key = (kind, sid)
        if key in self.frames:
            self.skipped += 1
        self.frames[key] = msg
        self.wake.set()

    def on_text(self, node: str, text: str) -> None:
        """A node's text: its focus answer and its errors go on; its status does not (the
        gateway sends the cluster's)."""
        try:
            data = json.loads(text)
        except ValueError:
            return
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "focus" and data.get("id") == self.want.focus:
            self.push_text("focus", text)
        elif kind == "error":
            self._errors += 1
            self.push_text(f"error{self._errors % 8}", text)

    async def writer(self) -> None:
        try:
            while not self.ws.closed:
                await self.wake.wait()
                self.wake.clear()
                while not self.ws.closed:
                    if self.texts:
                        await self.ws.send_str(self.texts.pop(next(iter(self.texts))))
                    elif self.frames:
                        await self.ws.send_bytes(self.frames.pop(next(iter(self.frames))))
                        self.sent += 1
                    else:
                        break
        except (ConnectionError, RuntimeError):
            pass

    # -- from the page -------------------------------------------------------------------------
    def handle(self, req: LiveRequest) -> None:
        given, want = req.model_fields_set, self.want
        if req.fps is not None:
            want.fps = min(req.fps, self.cfg.max_tile_fps)
        if req.focus_fps is not None:
            want.focus_fps = min(req.focus_fps, self.cfg.max_focus_fps)
        if "watch" in given:
            ids = list(dict.fromkeys(req.watch or []))
            if len(ids) > self.cfg.max_watch:
                self.send_error(
                    f"watch at most {self.cfg.max_watch} streams (page.max_watch)", "watch"
                )
            else:
                want.watch = ids
        if "focus" in given:
            if req.focus is not None and self.known is not None and req.focus not in self.known:
                self.send_error(f"unknown stream {req.focus!r}", "focus")
                self.sync()
                return
            want.focus = req.focus
            if req.focus is None:
                self.push_text("focus", json.dumps({"type": "focus", "id": None, "overlay": None}))
        if "overlay" in given:
            want.overlay = req.overlay.model_dump() if req.overlay is not None else None
        self.sync()

    # -- upstreams -----------------------------------------------------------------------------
    def placement(self, view: ClusterView) -> None:
        self.owner, self.known = view.owner, view.known
        self.sync()

    def sync(self) -> None:
        """Opens the upstreams the page needs, closes the others, and tells each its share;
        drops pending frames of tiles no longer wanted."""
        if self.closed:
            return
        wanted = node_requests(self.want, self.owner)
        now = time.monotonic()
        for node, up in list(self.upstreams.items()):
            if node not in wanted or up.task.done():
                if up.task.done() and node in wanted:
                    self._failed_at[node] = now
                up.close()
                del self.upstreams[node]
        for node, request in wanted.items():
            if node not in self.upstreams:
                if now - self._failed_at.get(node, -RETRY_S) < RETRY_S:
                    continue
                self.upstreams[node] = Upstream(node, self)
            self.upstreams[node].request(request)
        for kind, sid in list(self.frames):
            if (kind == TILE and sid not in self.want.watch) or (
                kind == FOCUS and sid != self.want.focus
            ):
                self.frames.pop((kind, sid), None)

    def counts(self) -> tuple[int, int]:
        out = (self.sent, self.skipped)
        self.sent = self.skipped = 0
        return out

    def close(self) -> None:
        self.closed = True
        for up in self.upstreams.values():
            up.close()
        self.upstreams.clear()
        self.frames.clear()
        self.wake.set()


class GatewayHub:
    """Every page at the gateway, and the cluster's status for all of them, once a second."""

    def __init__(self, cfg: PageConfig, status: Callable[[], Awaitable[ClusterView]]) -> None:
        self.cfg, self.status = cfg, status
        self.clients: set[GatewayLiveClient] = set()
        self.view: ClusterView | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, client: GatewayLiveClient) -> None:
        self.clients.add(client)
        client.push_text(
            "hello",
            json.dumps(
                {
                    "type": "hello",
                    "max_tile_fps": self.cfg.max_tile_fps,
                    "max_focus_fps": self.cfg.max_focus_fps,
                    "max_watch": self.cfg.max_watch,
                }
            ),
        )
        if self.view is not None:
            client.push_text("status", self.view.text)
            client.placement(self.view)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def remove(self, client: GatewayLiveClient) -> None:
        self.clients.discard(client)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.clients:
            t0 = loop.time()
            try:
                self.view = await self.status()
            except Exception as e:  # the controller did not answer: try again next second
                log.info("cluster status for the live page failed: %s", e)
            else:
                for c in list(self.clients):
                    c.push_text("status", self.view.text)
                    c.placement(self.view)
            await asyncio.sleep(max(0.1, 1.0 - (loop.time() - t0)))

    async def close_all(self) -> None:
        for c in list(self.clients):
            c.close()
            with contextlib.suppress(Exception):
                await c.ws.close(code=1001, message=b"server shutting down")
        if self._task is not None:
            self._task.cancel()
