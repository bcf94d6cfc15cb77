"""A stream's pictures: MJPEG, the newest annotated frame, the newest class mask."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from segstream.models.tools.data import encode_palette_png
from segstream.stream.api.context import backend
from segstream.stream.api.live import tune_socket
from segstream.stream.api.spec import Body, Endpoint, error, read_query
from segstream.stream.encoders import MJPEG_HEADERS, mjpeg_part
from segstream.stream.schemas import Error
from segstream.stream.service import Service, Stream


class MjpegQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")  # exp/sig of a signed URL ride along
    fps: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Most frames per second this "
        "client wants (0 or absent: every frame, up to the server cap).",
    )


async def mjpeg(request: web.Request) -> web.StreamResponse:
    """multipart/x-mixed-replace: each write sends the newest frame; a slow client skips."""
    q = read_query(request, MjpegQuery)

    async def work(service: Service, s: Stream) -> web.StreamResponse:
        return await _mjpeg(request, service, s, q)

    return await backend(request).media(request, request.match_info["id"], work)


async def _mjpeg(
    request: web.Request, service: Service, s: Stream, q: MjpegQuery
) -> web.StreamResponse:
    fps = client_fps(q.fps or 0.0, service.cfg.server.max_client_fps)
    resp = web.StreamResponse(headers=MJPEG_HEADERS)
    await resp.prepare(request)
    tune_socket(request)  # else the kernel queues seconds of frames for a slow client
    pub = s.mjpeg
    pub.clients += 1
    service.observer.clients(s.cfg.id, pub.clients)
    seq = 0
    next_at = 0.0
    try:
        while not pub.closed:
            item = await pub.next(seq, timeout=1.0)
            if item is None:
                continue
            await resp.write(mjpeg_part(item.jpeg))
            service.record_latency(s.cfg.id, time.monotonic() - item.capture_ts)
            seq = item.seq
            if fps > 0:
                next_at = max(next_at + 1.0 / fps, time.monotonic())
                await asyncio.sleep(next_at - time.monotonic())
    except (ConnectionResetError, ConnectionError):
        pass  # the viewer went away
    finally:
        pub.clients -= 1
        service.observer.clients(s.cfg.id, pub.clients)
    return resp


def client_fps(fps: float, server_cap: float) -> float:
    if server_cap > 0:
        return min(fps, server_cap) if fps > 0 else server_cap
    return fps


async def snapshot(request: web.Request) -> web.StreamResponse:
    return await backend(request).media(request, request.match_info["id"], _snapshot)


async def _snapshot(service: Service, s: Stream) -> web.Response:
    latest = s.mjpeg.latest
    if latest is not None and time.monotonic() - latest.published_ts < 1.0:
        jpeg = latest.jpeg  # someone is watching: reuse the frame already encoded
    else:
        snap = await asyncio.to_thread(s.view.snapshot)
        if snap is None:
            state, reason = s.source.status()
            raise error(
                503,
                f"stream {s.cfg.id!r} has no segmented frame yet",
                state=state.value,
                reason=reason,
            )
        jpeg = snap[0]
    return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})


async def mask_png(request: web.Request) -> web.StreamResponse:
    return await backend(request).media(request, request.match_info["id"], _mask_png)


async def _mask_png(service: Service, s: Stream) -> web.Response:
    result = s.view.result
    seg = service.segmenter
    if result is None or seg is None:
        state, reason = s.source.status()
        raise error(503, f"stream {s.cfg.id!r} has no mask yet", state=state.value, reason=reason)
    png = await asyncio.to_thread(encode_palette_png, result.mask, seg.palette)
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})


_NOT_YET = {
    404: Body(Error, description="Unknown stream."),
    503: Body(Error, description="No segmented frame yet (state and reason say why)."),
}

ENDPOINTS = [
    Endpoint(
        "GET",
        "/streams/{id}/mjpeg",
        mjpeg,
        "Annotated MJPEG (multipart/x-mixed-replace); a slow client skips frames",
        tag="media",
        query=MjpegQuery,
        signed=True,
        responses={
            200: Body(
                None,
                media="multipart/x-mixed-replace",
                description="An endless stream of JPEG parts.",
            ),
            404: Body(Error, description="Unknown stream."),
            503: Body(Error, description="Cluster: not running on a node yet (state, reason)."),
        },
    ),
    Endpoint(
        "GET",
        "/streams/{id}/snapshot.jpg",
        snapshot,
        "The newest annotated frame",
        tag="media",
        signed=True,
        responses={200: Body(None, media="image/jpeg"), **_NOT_YET},
    ),
    Endpoint(
        "GET",
        "/streams/{id}/mask.png",
        mask_png,
        "The newest class mask: 8-bit palette PNG, pixel value = class id",
        tag="media",
        responses={200: Body(None, media="image/png"), **_NOT_YET},
    ),
]
