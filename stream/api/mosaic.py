"""GET /mosaic/mjpeg: several streams tiled into one MJPEG, each tile labelled with its id and
state (stream.mosaic composes and encodes each layout once for all of its viewers; at a cluster
gateway, stream.cluster.gateway_mosaic composes the nodes' tiles the same way)."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from segstream.stream.api.context import CONFIG, backend
from segstream.stream.api.live import tune_socket
from segstream.stream.api.media import client_fps
from segstream.stream.api.spec import Body, Endpoint, error, read_query
from segstream.stream.encoders import MJPEG_HEADERS, mjpeg_part
from segstream.stream.mosaic import MosaicFull
from segstream.stream.schemas import Error, MosaicQuery
from segstream.stream.service import Service
from segstream.stream.sinks import MjpegSink


async def _stream_ids(request: web.Request, q: MosaicQuery) -> list[str] | None:
    if q.streams is None or not q.streams.strip():
        return None
    ids = list(dict.fromkeys(x.strip() for x in q.streams.split(",") if x.strip()))
    limit = request.app[CONFIG].mosaic.max_streams
    if len(ids) > limit:
        raise error(
            422,
            f"invalid query: streams: at most {limit} streams (mosaic.max_streams)",
            details=[{"loc": "streams", "msg": "too many"}],
        )
    known = set(await backend(request).ids())
    unknown = [x for x in ids if x not in known]
    if unknown:
        raise error(404, f"unknown streams {unknown}")
    return ids


async def mosaic_mjpeg(request: web.Request) -> web.StreamResponse:
    """multipart/x-mixed-replace of the chosen streams in a grid; a slow client skips."""
    cfg = request.app[CONFIG].mosaic
    q = read_query(request, MosaicQuery)
    width = q.width or cfg.width
    if width > cfg.max_width:
        raise error(
            422,
            f"invalid query: width: at most {cfg.max_width} (mosaic.max_width)",
            details=[{"loc": "width", "msg": f"at most {cfg.max_width}"}],
        )
    ids = await _stream_ids(request, q)

    async def work(service: Service) -> web.StreamResponse:
        return await _mosaic(request, service, ids, q, width)

    return await backend(request).mosaic(request, ids, work)


async def _mosaic(
    request: web.Request, service: Service, ids: list[str] | None, q: MosaicQuery, width: int
) -> web.StreamResponse:
    try:
        layout = service.mosaic.acquire(ids, q.cols, width)
    except MosaicFull as e:
        raise error(503, str(e), headers={"Retry-After": "10"}) from None
    try:
        pub = layout.publisher
        assert isinstance(pub, MjpegSink), "the service makes MJPEG publishers"
        fps = client_fps(q.fps or 0.0, service.cfg.server.max_client_fps)
        return await serve_mosaic(request, pub, fps)
    finally:
        service.mosaic.release(layout)


async def serve_mosaic(request: web.Request, pub: MjpegSink, fps: float) -> web.StreamResponse:
    """A layout's JPEGs to one viewer, at most `fps` (0: as composed); the newest part each
    time, so a slow viewer skips (the cluster gateway's mosaic serves its layouts this way)."""
    resp = web.StreamResponse(headers=MJPEG_HEADERS)
    await resp.prepare(request)
    tune_socket(request)  # a slow client skips frames rather than queueing them
    seq, next_at = 0, 0.0
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError, ConnectionError):  # the viewer went away
        while not pub.closed:
            item = await pub.next(seq, timeout=1.0)
            if item is None:
                continue
            await resp.write(mjpeg_part(item.jpeg))
            seq = item.seq
            if fps > 0:
                next_at = max(next_at + 1.0 / fps, loop.time())
                await asyncio.sleep(next_at - loop.time())
    return resp


ENDPOINTS = [
    Endpoint(
        "GET",
        "/mosaic/mjpeg",
        mosaic_mjpeg,
        "Several streams tiled into one MJPEG, each tile labelled with its id and state; "
        "composed and encoded once per layout for all of its viewers",
        tag="media",
        query=MosaicQuery,
        responses={
            200: Body(
                None,
                media="multipart/x-mixed-replace",
                description="An endless stream of JPEG parts.",
            ),
            404: Body(Error, description="Unknown streams."),
            503: Body(
                Error,
                description="Too many distinct layouts watched (cluster: or no node "
                "service is up yet).",
            ),
        },
    ),
]
