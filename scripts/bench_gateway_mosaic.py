"""Gateway mosaic CPU (`python scripts/bench_gateway_mosaic.py`): stand-in nodes send their
share of the layout (a real vtest.avi picture drawn by the node mosaic's own code) at 5 fps;
the gateway composes; compose_s (thread CPU) per second of wall time, for 4, 16 and 64 tiles
over 2 nodes. Viewers cost next to nothing (they read the layout's newest JPEG)."""

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import cv2
import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer

from segstream.stream.cluster.gateway_mosaic import GatewayMosaic, Where
from segstream.stream.config import MosaicConfig
from segstream.stream.encoders import MJPEG_HEADERS, encode_jpeg, mjpeg_part
from segstream.stream.mosaic import compose, fit, grid, paint_tile, picture_size

SHARED = Path(os.environ.get("SEGSTREAM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
_cap = cv2.VideoCapture(str(SHARED / "data/video/vtest.avi"))
_ok, photo = _cap.read()
assert _ok


def node_pic(ids, cols, width, k):
    c, _, tile = grid(len(ids), cols, width)
    pw, ph = picture_size(tile)
    img = fit(np.roll(photo, k * 7, axis=1), (pw, ph))
    return compose(len(ids), c, tile, lambda i, cell: paint_tile(cell, img, ids[i], "live"))


async def main(n, width, secs=10.0):
    async def mosaic(request):
        q = request.query
        ids = q["streams"].split(",")
        resp = web.StreamResponse(headers=MJPEG_HEADERS)
        await resp.prepare(request)
        jpegs = [
            encode_jpeg(node_pic(ids, int(q["cols"]), int(q["width"]), k), 75) for k in range(5)
        ]
        k = 0
        while True:
            await resp.write(mjpeg_part(jpegs[k % 5]))
            k += 1
            await asyncio.sleep(0.2)

    app = web.Application()
    app.router.add_get("/mosaic/mjpeg", mosaic)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    http = aiohttp.ClientSession()
    ids = tuple(f"s{i}" for i in range(n))
    where = Where(ids, {s: ("A" if i % 2 else "B") for i, s in enumerate(ids)}, {})

    async def w():
        return where

    async def op(node, share):
        return await http.get(srv.make_url("/mosaic/mjpeg"), params=share.query(5))

    m = GatewayMosaic(MosaicConfig(), w, op)
    lay = m.acquire(None, None, width)
    await asyncio.sleep(3)
    c0, s0, t0 = lay.compose_s, lay.seq, time.monotonic()
    await asyncio.sleep(secs)
    dt = time.monotonic() - t0
    print(
        f"{n} tiles over 2 nodes, width {width}: {(lay.seq - s0) / dt:.1f} compositions/s, "
        f"compose+encode CPU {100 * (lay.compose_s - c0) / dt:.1f}% of a core, "
        f"{1000 * (lay.compose_s - c0) / max(1, lay.seq - s0):.1f} ms each, "
        f"jpeg {len(lay.publisher.latest.jpeg)} B"
    )
    m.release(lay)
    await http.close()
    await srv.close()


if __name__ == "__main__":
    for n, width in ((4, 640), (16, 1280), (64, 1920)):
        asyncio.run(main(n, width))
