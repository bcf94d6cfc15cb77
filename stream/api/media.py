"""A stream's pictures: MJPEG, the newest annotated frame, the newest class mask."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from segstream.models.fetch import home
from segstream.models.tools.data import encode_palette_png
from segstream.stream.api.context import backend, principal
from segstream.stream.api.live import tune_socket
from segstream.stream.api.local import LocalBackend
from segstream.stream.api.spec import Body, Endpoint, error, read_query
from segstream.stream.encoders import MJPEG_HEADERS, mjpeg_part
from segstream.stream.schemas import Error
from segstream.stream.service import Service, Stream
from segstream.stream.sinks import MjpegSink


class MjpegQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")  # exp/sig of a signed URL ride along
    fps: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Most frames per second this "
        "client wants (0 or absent: every frame, up to the server cap).",
    )
    raw: bool = Field(
        False,
        description="Privacy on: the unredacted picture, for an admin (token or session) of a "
        "stream with privacy.admin_raw; audited. Anyone else: 403.",
    )


class SnapshotQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    raw: bool = Field(False, description="As for the MJPEG stream.")


AUDIT_FILE = "privacy-audit.jsonl"
_audit_lock = threading.Lock()


def audit_path() -> Path:
    """The raw-view audit log: JSON lines under $SEGSTREAM_HOME."""
    return home() / AUDIT_FILE


def _audit(record: dict[str, object]) -> None:
    path = audit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _audit_lock, path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _raw_allowed(request: web.Request, service: Service, s: Stream) -> str | None:
    """The name of who may see this stream raw now (else raises 403). None: privacy is off,
    so the picture is not redacted anyway."""
    p = s.cfg.privacy
    if p is None:
        return None
    who = principal(request)
    if not p.admin_raw:
        raise error(403, f"stream {s.cfg.id!r}: raw pictures are off (privacy.admin_raw)")
    if who is None or who.via == "signed-url" or not who.allows("admin"):
        raise error(403, "the raw view is for an admin's token or session only")
    return who.name


@asynccontextmanager
async def _raw_view(service: Service, s: Stream, who: str, kind: str) -> AsyncIterator[None]:
    """Counts and audits one raw view: a line when it starts and one with its length."""
    service.observer.privacy_raw_view(s.cfg.id)
    start = time.time()
    base = {"who": who, "stream": s.cfg.id, "kind": kind, "ts": round(start, 3)}
    await asyncio.to_thread(_audit, {**base, "event": "start"})
    try:
        yield
    finally:
        seconds = round(time.time() - start, 3)
        await asyncio.to_thread(_audit, {**base, "event": "end", "seconds": seconds})


def _local_raw(request: web.Request, raw: bool) -> None:
    """A raw view is served by the service that runs the stream, never relayed by a gateway
    (the node would see the gateway, not the person asking)."""
    if raw and not isinstance(backend(request), LocalBackend):
        raise error(403, "the raw view is not served through the cluster gateway")


async def mjpeg(request: web.Request) -> web.StreamResponse:
    """multipart/x-mixed-replace: each write sends the newest frame; a slow client skips."""
    q = read_query(request, MjpegQuery)
    _local_raw(request, q.raw)

    async def work(service: Service, s: Stream) -> web.StreamResponse:
        return await _mjpeg(request, service, s, q)

    return await backend(request).media(request, request.match_info["id"], work)


async def _mjpeg(
    request: web.Request, service: Service, s: Stream, q: MjpegQuery
) -> web.StreamResponse:
    who = _raw_allowed(request, service, s) if q.raw else None
    if who is None:
        return await _mjpeg_from(request, service, s, q, s.mjpeg)
    picture = service.acquire_raw(s.cfg.id)  # encoded only while a raw viewer is connected
    try:
        async with _raw_view(service, s, who, "mjpeg"):
            return await _mjpeg_from(request, service, s, q, picture.sink)
    finally:
        picture.release()


async def _mjpeg_from(
    request: web.Request, service: Service, s: Stream, q: MjpegQuery, pub: MjpegSink
) -> web.StreamResponse:
    fps = client_fps(q.fps or 0.0, service.cfg.server.max_client_fps)
    resp = web.StreamResponse(headers=MJPEG_HEADERS)
    await resp.prepare(request)
    tune_socket(request)  # else the kernel queues seconds of frames for a slow client
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
    q = read_query(request, SnapshotQuery)
    _local_raw(request, q.raw)

    async def work(service: Service, s: Stream) -> web.Response:
        who = _raw_allowed(request, service, s) if q.raw else None
        if who is None:
            return await _snapshot(service, s)
        async with _raw_view(service, s, who, "snapshot"):
            return await _snapshot(service, s, raw=True)

    return await backend(request).media(request, request.match_info["id"], work)


async def _snapshot(service: Service, s: Stream, raw: bool = False) -> web.Response:
    latest = s.mjpeg.latest
    if not raw and latest is not None and time.monotonic() - latest.published_ts < 1.0:
        jpeg = latest.jpeg  # someone is watching: reuse the frame already encoded
    else:
        snap = await asyncio.to_thread(s.view.snapshot, raw)
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
            403: Body(Error, description="?raw=1 refused (privacy: not an admin, or off)."),
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
        query=SnapshotQuery,
        responses={
            200: Body(None, media="image/jpeg"),
            403: Body(Error, description="?raw=1 refused (privacy: not an admin, or off)."),
            **_NOT_YET,
        },
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
