"""The gateway's mosaic of streams that run on several nodes: composed here from the nodes' tiles.

    node A /mosaic/mjpeg?streams=<A's share>&cols=..&width=..  --> newest JPEG of node A
    node B /mosaic/mjpeg?streams=<B's share>&cols=..&width=..  --> newest JPEG of node B
        --> composer task (at most mosaic.max_fps, only when a node's picture or a placement
            changed, one repeat a second): decode each new node picture once, copy its cells
            into the grid (stream.mosaic.compose), encode once --> the layout's MjpegSink

Each node composes its own share of the layout as a node's mosaic does (taps that shrink each
frame as it is rendered, the state colour and label drawn by the node that knows the state), at
exactly the gateway's tile size: a share of k tiles asks for `cols` columns of `cols * tile
width` pixels, and stream.mosaic.grid gives back the same tile. So the gateway only decodes
small pictures and copies cells. A tile no node pictures (pending, moving, its node's mosaic
failing) is drawn here with its placement state. Viewers read the layout's sink as a node's
mosaic viewers do (newest wins: a slow viewer skips). The placement is read again every second
(a stream moved: the shares change and those node feeds are opened again); when the last
viewer of a layout leaves, its task and its node feeds are closed.

Like gateway_live, this module knows nothing of the controller or of HTTP to the nodes: the
gateway hands it `where()` and `open(node, share)`, so it is tested without Ray."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import simplejpeg

from segstream.stream.config import MosaicConfig
from segstream.stream.datatypes import Rendered
from segstream.stream.mosaic import MosaicFull, Size, cell_of, compose, grid, paint_tile
from segstream.stream.sinks import MjpegSink

log = logging.getLogger(__name__)

PLAN_S = 1.0  # the placement is read again this often
MIN_WIDTH = 160  # a node's mosaic is at least this wide (MosaicQuery.width)
MAX_PART = 16 * 1024 * 1024  # largest JPEG accepted from a node


@dataclass(frozen=True)
class Where:
    """The cluster as a mosaic needs it: every stream in order, the node running each placed
    one, and the state to draw for a stream no node pictures."""

    streams: tuple[str, ...]
    owner: dict[str, str]
    state: dict[str, str]


@dataclass(frozen=True)
class Share:
    """One node's part of a layout: its streams in layout order, as a node mosaic of `cols`
    columns `width` pixels wide (its tiles are the layout's)."""

    ids: tuple[str, ...]
    cols: int
    width: int

    def query(self, fps: float) -> dict[str, str]:
        return {
            "streams": ",".join(self.ids),
            "cols": str(self.cols),
            "width": str(self.width),
            "fps": str(fps),
        }


def shares(ids: Sequence[str], owner: dict[str, str], cols: int, tile: Size) -> dict[str, Share]:
    """Per node, the share of the layout's streams it runs, tiled at exactly `tile`, at most
    as wide as the layout (and at least MIN_WIDTH: empty cells on its right)."""
    by: dict[str, list[str]] = {}
    for sid in ids:
        if (node := owner.get(sid)) is not None:
            by.setdefault(node, []).append(sid)
    tw = tile[0]
    out = {}
    for node, mine in by.items():
        n = max(min(len(mine), cols), -(-MIN_WIDTH // tw))
        out[node] = Share(tuple(mine), n, n * tw)
    return out


def compose_from_nodes(
    ids: Sequence[str],
    cols: int,
    tile: Size,
    parts: dict[str, Share],
    pictures: dict[str, np.ndarray],
    state: dict[str, str],
) -> np.ndarray:
    """The layout's picture: each tile's cell copied from its node's picture, or drawn with
    its state when that node has none (yet, or of another share)."""
    at = {sid: (node, j) for node, sh in parts.items() for j, sid in enumerate(sh.ids)}

    def paint(i: int, cell: np.ndarray) -> None:
        sid = ids[i]
        node, j = at.get(sid, ("", 0))
        img, sh = pictures.get(node), parts.get(node)
        if img is not None and sh is not None and img.shape[:2] == _share_shape(sh, tile):
            cell[:] = cell_of(img, j, sh.cols, tile)
        else:
            paint_tile(cell, None, sid, state.get(sid, "unknown"))

    return compose(len(ids), cols, tile, paint)


def _share_shape(sh: Share, tile: Size) -> tuple[int, int]:
    _, rows, _ = grid(len(sh.ids), sh.cols, sh.width)
    return rows * tile[1], sh.cols * tile[0]


async def read_parts(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The JPEGs of a multipart MJPEG body (each part has its Content-Length)."""
    while True:
        length: int | None = None
        while True:
            line = await content.readline()
            if not line:
                return
            line = line.strip()
            if not line:
                if length is not None:
                    break
                continue
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        if not 0 < length <= MAX_PART:
            raise ValueError(f"a part of {length} bytes")
        yield await content.readexactly(length)


Open = Callable[[str, Share], Awaitable[aiohttp.ClientResponse]]


class NodeFeed:
    """One node's mosaic of its share: the newest JPEG, read as fast as the node sends."""

    def __init__(self, node: str, share: Share, open_: Open, wake: asyncio.Event) -> None:
        self.node, self.share, self._open, self._wake = node, share, open_, wake
        self.jpeg: bytes | None = None
        self.seq = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            resp = await self._open(self.node, self.share)
        except Exception as e:  # opened again at the next plan
            log.info("no mosaic from node %s: %s", self.node, e)
            return
        try:
            if resp.status != 200:
                log.info("node %s answered its mosaic with %d", self.node, resp.status)
                return
            async for jpeg in read_parts(resp.content):
                self.jpeg, self.seq = jpeg, self.seq + 1
                self._wake.set()
        except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError) as e:
            log.info("mosaic of node %s ended: %s", self.node, e)
        finally:
            resp.close()

    def close(self) -> None:
        self.task.cancel()


@dataclass(eq=False)
class GatewayLayout:
    """One distinct mosaic at the gateway (the key as a node's: streams, columns, width),
    its node feeds and its composer task; its sink is shared by all its viewers."""

    key: tuple[tuple[str, ...] | None, int | None, int]
    publisher: MjpegSink
    users: int = 0
    feeds: dict[str, NodeFeed] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    compose_s: float = 0.0  # CPU seconds composing and encoding (the benchmarks read it)
    # The composer's own: decoded picture per node (with the feed's seq), the last frame.
    decoded: dict[str, tuple[NodeFeed, int, np.ndarray]] = field(default_factory=dict)
    last: Rendered | None = None
    seq: int = 0

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for feed in self.feeds.values():
            feed.close()
        self.feeds.clear()
        self.publisher.close()


class GatewayMosaic:
    """The layouts being watched at the gateway."""

    def __init__(self, cfg: MosaicConfig, where: Callable[[], Awaitable[Where]], open_: Open):
        self.cfg, self._where, self._open = cfg, where, open_
        self.layouts: dict[tuple[object, ...], GatewayLayout] = {}

    def acquire(self, streams: Sequence[str] | None, cols: int | None, width: int) -> GatewayLayout:
        """The layout for these settings, shared with its other viewers; raises MosaicFull.
        Pair with release()."""
        key = (tuple(streams) if streams is not None else None, cols, width)
        layout = self.layouts.get(key)
        if layout is None:
            if len(self.layouts) >= self.cfg.max_layouts:
                raise MosaicFull(
                    f"{len(self.layouts)} mosaic layouts are being watched "
                    "(mosaic.max_layouts); watch one of those"
                )
            layout = GatewayLayout(key, MjpegSink("mosaic", asyncio.get_running_loop()))
            layout.task = asyncio.create_task(self._run(layout))
            self.layouts[key] = layout
        layout.users += 1
        return layout

    def release(self, layout: GatewayLayout) -> None:
        layout.users -= 1
        if layout.users <= 0 and self.layouts.get(layout.key) is layout:
            del self.layouts[layout.key]
            layout.close()  # the node feeds end with the last viewer

    def close_all(self) -> None:
        for layout in self.layouts.values():
            layout.close()
        self.layouts.clear()

    async def _run(self, layout: GatewayLayout) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        period = 1.0 / self.cfg.max_fps
        plan: tuple[list[str], dict[str, str]] | None = None
        plan_at = next_at = last_ts = 0.0
        seen: object = None
        while not layout.publisher.closed:
            now = loop.time()
            if now >= plan_at:
                with contextlib.suppress(Exception):  # the controller away: the last plan
                    plan = self._plan(layout, await self._where(), wake)
                plan_at = now + PLAN_S
            if plan is not None:
                ids, state = plan
                # (feed, seq, JPEG) taken together here on the loop, where the feeds write
                feeds = {n: (f, f.seq, f.jpeg) for n, f in layout.feeds.items()}
                key = (tuple(ids), tuple(state.items()), tuple(v[:2] for v in feeds.values()))
                if key != seen or now - last_ts >= 1.0:
                    seen, last_ts = key, now
                    try:
                        await asyncio.to_thread(self._compose, layout, ids, state, feeds)
                    except Exception:
                        log.exception("gateway mosaic composition failed")
            next_at = max(next_at + period, loop.time())
            await asyncio.sleep(next_at - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(PLAN_S, max(0.0, plan_at - loop.time())))
            wake.clear()

    def _plan(
        self, layout: GatewayLayout, where: Where, wake: asyncio.Event
    ) -> tuple[list[str], dict[str, str]]:
        """The layout's streams and their fallback states now; node feeds opened for new or
        changed shares (or ended ones), closed for shares gone."""
        streams, cols, width = layout.key
        ids = list(streams) if streams is not None else list(where.streams[: self.cfg.max_streams])
        c, _, tile = grid(len(ids), cols, width)
        wanted = shares(ids, where.owner, c, tile)
        for node, feed in list(layout.feeds.items()):
            if wanted.get(node) != feed.share or feed.task.done():
                feed.close()
                del layout.feeds[node]
        for node, share in wanted.items():
            if node not in layout.feeds:
                layout.feeds[node] = NodeFeed(node, share, self._open, wake)
        state = {sid: where.state.get(sid, "removed") for sid in ids}
        return ids, state

    def _compose(
        self,
        layout: GatewayLayout,
        ids: list[str],
        state: dict[str, str],
        feeds: dict[str, tuple[NodeFeed, int, bytes | None]],
    ) -> None:
        """Thread: decodes each node picture that is new, composes, encodes once."""
        t0 = time.thread_time()
        _, cols, width = layout.key
        c, _, tile = grid(len(ids), cols, width)
        pictures: dict[str, np.ndarray] = {}
        for node, (feed, seq, jpeg) in feeds.items():
            have = layout.decoded.get(node)
            if have is not None and have[0] is feed and have[1] == seq:
                pictures[node] = have[2]
            elif jpeg is not None:
                with contextlib.suppress(ValueError):
                    img = simplejpeg.decode_jpeg(jpeg, colorspace="BGR")
                    layout.decoded[node] = (feed, seq, img)
                    pictures[node] = img
        for node in set(layout.decoded) - set(feeds):
            del layout.decoded[node]
        parts = {node: v[0].share for node, v in feeds.items()}
        canvas = compose_from_nodes(ids, c, tile, parts, pictures, state)
        layout.seq += 1
        layout.last = Rendered(
            "mosaic", canvas, layout.seq, time.monotonic(), self.cfg.jpeg_quality
        )
        layout.publisher.put(layout.last)  # encoded here, once, for every viewer
        layout.compose_s += time.thread_time() - t0
