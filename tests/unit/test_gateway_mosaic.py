"""The cluster gateway's mosaic (stream.cluster.gateway_mosaic): tiles composed by the nodes, each
of its share, copied into the one grid; fake nodes serve real node mosaics over HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import numpy as np
import simplejpeg
from aiohttp import web
from aiohttp.test_utils import TestServer

from segstream.stream.cluster.gateway_mosaic import (
    GatewayMosaic,
    Share,
    Where,
    compose_from_nodes,
    shares,
)
from segstream.stream.config import MosaicConfig
from segstream.stream.encoders import MJPEG_HEADERS, encode_jpeg, mjpeg_part
from segstream.stream.mosaic import STATE_BGR, cell_of, compose, grid, paint_tile, picture_size

COLOUR = {"a1": (0, 0, 255), "a2": (0, 255, 0), "b1": (255, 0, 0), "b2": (0, 255, 255)}
OWNER = {"a1": "A", "b1": "B", "a2": "A", "b2": "B"}


def node_mosaic(ids: list[str], cols: int | None, width: int) -> np.ndarray:
    """What a node's mosaic draws: each stream's picture shrunk into its tile, labelled live."""
    c, _, tile = grid(len(ids), cols, width)
    pw, ph = picture_size(tile)

    def paint(i: int, cell: np.ndarray) -> None:
        img = np.full((ph, pw, 3), COLOUR[ids[i]], np.uint8)
        paint_tile(cell, img, ids[i], "live")

    return compose(len(ids), c, tile, paint)


def test_the_gateway_grid_is_the_node_grid_from_node_shares() -> None:
    ids, width = ["a1", "b1", "a2", "b2", "c1"], 1000
    cols, _, tile = grid(len(ids), None, width)
    parts = shares(ids, OWNER, cols, tile)
    assert parts == {
        "A": Share(("a1", "a2"), 2, 2 * tile[0]),
        "B": Share(("b1", "b2"), 2, 2 * tile[0]),
    }
    # Each node draws its share at exactly the layout's tile size.
    pictures = {n: node_mosaic(list(sh.ids), sh.cols, sh.width) for n, sh in parts.items()}
    assert all(grid(len(sh.ids), sh.cols, sh.width)[2] == tile for sh in parts.values())
    got = compose_from_nodes(ids, cols, tile, parts, pictures, {"c1": "pending"})

    # The same picture as one node running every owned stream, c1 drawn with its state.
    def paint(i: int, cell: np.ndarray) -> None:
        sid = ids[i]
        img = (
            np.full((*picture_size(tile)[::-1], 3), COLOUR[sid], np.uint8) if sid in OWNER else None
        )
        paint_tile(cell, img, sid, "live" if sid in OWNER else "pending")

    assert np.array_equal(got, compose(len(ids), cols, tile, paint))
    # A node picture of another share (a stale one) is not cut up: its tiles wait, labelled.
    stale = {"A": pictures["A"][:, : tile[0]]}
    got = compose_from_nodes(ids, cols, tile, parts, stale, {"a1": "starting"})
    assert not cell_of(got, 0, cols, tile)[: picture_size(tile)[1]].any()


def test_a_narrow_share_is_widened_with_empty_cells() -> None:
    cols, _, tile = grid(16, 16, 400)  # 24-pixel tiles: one stream's mosaic would be too narrow
    parts = shares(["a1"], OWNER, cols, tile)
    assert parts["A"].cols * tile[0] >= 160 and parts["A"].width == parts["A"].cols * tile[0]
    assert grid(1, parts["A"].cols, parts["A"].width)[2] == tile


class FakeNodes:
    """Node services' /mosaic/mjpeg: a node's mosaic of the asked share, 20 parts a second."""

    def __init__(self) -> None:
        self.open = 0
        self.asked: list[dict[str, str]] = []

    def app(self) -> web.Application:
        async def mosaic(request: web.Request) -> web.StreamResponse:
            q = dict(request.query)
            self.asked.append(q)
            jpeg = encode_jpeg(
                node_mosaic(q["streams"].split(","), int(q["cols"]), int(q["width"])), 95
            )
            resp = web.StreamResponse(headers=MJPEG_HEADERS)
            await resp.prepare(request)
            self.open += 1
            try:
                while True:
                    await resp.write(mjpeg_part(jpeg))
                    await asyncio.sleep(0.05)
            finally:
                self.open -= 1

        app = web.Application()
        app.router.add_get("/mosaic/mjpeg", mosaic)
        return app


async def test_layouts_compose_the_nodes_feeds_and_close_them_with_the_last_viewer() -> None:
    fake = FakeNodes()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    http = aiohttp.ClientSession()
    where = Where(
        ("a1", "b1", "a2", "b2"),
        OWNER,
        {sid: "starting" for sid in OWNER},
    )

    async def where_now() -> Where:
        return where

    async def open_(node: str, share: Share) -> Any:
        return await http.get(server.make_url("/mosaic/mjpeg"), params=share.query(5.0))

    mosaics = GatewayMosaic(MosaicConfig(max_fps=10.0), where_now, open_)
    try:
        one = mosaics.acquire(None, None, 640)
        two = mosaics.acquire(None, None, 640)
        assert one is two and one.users == 2  # one composition for both viewers
        cols, _, (tw, th) = grid(4, None, 640)
        ph = picture_size((tw, th))[1]

        def all_tiles() -> bool:
            if one.publisher.latest is None:
                return False
            img = simplejpeg.decode_jpeg(one.publisher.latest.jpeg, colorspace="BGR")
            for i, sid in enumerate(where.streams):
                r, c = divmod(i, cols)
                centre = img[r * th + ph // 2, c * tw + tw // 2].astype(int)
                if np.abs(centre - COLOUR[sid]).max() > 40:
                    return False
                # The label's state square is the node's (live), not the gateway's fallback.
                bar = max(12, min(28, th // 8))
                mark = img[r * th + th - bar // 2, c * tw + bar // 2].astype(int)
                if np.abs(mark - STATE_BGR["live"]).max() > 40:
                    return False
            return True

        deadline = time.monotonic() + 10
        while not all_tiles():
            assert time.monotonic() < deadline, "the gateway mosaic never showed every tile"
            await asyncio.sleep(0.05)
        assert sorted(q["streams"] for q in fake.asked) == ["a1,a2", "b1,b2"]
        assert fake.open == 2
        mosaics.release(one)
        assert fake.open == 2 and mosaics.layouts  # one viewer left
        mosaics.release(two)
        assert not mosaics.layouts and one.publisher.closed
        deadline = time.monotonic() + 5
        while fake.open:
            assert time.monotonic() < deadline, "the node feeds outlived the last viewer"
            await asyncio.sleep(0.02)
    finally:
        mosaics.close_all()
        await http.close()
        await server.close()
