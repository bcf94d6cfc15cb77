"""The stream API: list, read, add, change, remove, and signed share URLs."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from aiohttp import web

from segstream.stream.api.context import AUTH, CONTROL, SERVICE, stream_or_404
from segstream.stream.api.spec import ApiError, Body, Endpoint, error, read_json, reply
from segstream.stream.config import StreamConfig
from segstream.stream.control import Refused
from segstream.stream.schemas import (
    Error,
    ShareRequest,
    ShareResponse,
    StreamList,
    StreamPatch,
    StreamStatus,
)


def _status(request: web.Request, stream_id: str) -> StreamStatus:
    return StreamStatus.model_validate(request.app[SERVICE].stream_status(stream_id))


async def list_streams(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    out = []
    for sid in list(service.streams):
        with contextlib.suppress(KeyError):  # removed meanwhile
            out.append(_status(request, sid))
    return reply(StreamList(ready=service.ready, streams=out))


async def get_stream(request: web.Request) -> web.Response:
    sid = stream_or_404(request).cfg.id
    try:
        return reply(_status(request, sid))
    except KeyError:  # removed meanwhile
        raise error(404, f"unknown stream {sid!r}") from None


def _refused(e: Refused) -> ApiError:
    if e.status == 422:
        return error(
            422,
            f"{e.loc}: {e}" if e.loc else str(e),
            details=[{"loc": e.loc or "body", "msg": str(e)}],
        )
    return error(e.status, str(e))


async def create_stream(request: web.Request) -> web.Response:
    cfg = await read_json(request, StreamConfig)
    try:
        await request.app[CONTROL].add(cfg)
    except Refused as e:
        raise _refused(e) from None
    return reply(_status(request, cfg.id), status=201)


async def patch_stream(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    stream_or_404(request)
    patch = await read_json(request, StreamPatch)
    changes: dict[str, Any] = patch.model_dump(exclude_unset=True)
    try:
        await request.app[CONTROL].patch(sid, changes)
    except Refused as e:
        raise _refused(e) from None
    return reply(_status(request, sid))


async def delete_stream(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    stream_or_404(request)
    try:
        await request.app[CONTROL].delete(sid)
    except Refused as e:
        raise _refused(e) from None
    return web.Response(status=204)


async def share_stream(request: web.Request) -> web.Response:
    """A signed, expiring URL of one stream's MJPEG or snapshot, for embedding elsewhere."""
    s = stream_or_404(request)
    req = await read_json(request, ShareRequest)
    path = f"/streams/{s.cfg.id}/" + ("mjpeg" if req.kind == "mjpeg" else "snapshot.jpg")
    expires = int(time.time()) + req.ttl_s
    sig = request.app[AUTH].sign_path(path, s.cfg.id, expires)
    return reply(ShareResponse(url=f"{path}?exp={expires}&sig={sig}", expires=expires))


_404 = {404: Body(Error, description="Unknown stream.")}
_CHANGE = {
    **_404,
    409: Body(Error, description="A stream with that id exists."),
    413: Body(Error),
    415: Body(Error),
    422: Body(Error, description="Invalid settings (the key path is named)."),
}

ENDPOINTS = [
    Endpoint(
        "GET",
        "/api/streams",
        list_streams,
        "Every stream with its state and figures",
        responses={200: Body(StreamList)},
    ),
    Endpoint(
        "POST",
        "/api/streams",
        create_stream,
        "Add a stream (kept across restarts)",
        role="admin",
        body=Body(StreamConfig),
        responses={201: Body(StreamStatus), **_CHANGE},
    ),
    Endpoint(
        "GET",
        "/api/streams/{id}",
        get_stream,
        "One stream's state and figures",
        responses={200: Body(StreamStatus), **_404},
    ),
    Endpoint(
        "PATCH",
        "/api/streams/{id}",
        patch_stream,
        "Change a stream: overlay, rate and output apply live; a new source or reader "
        "restarts only its reader",
        role="admin",
        body=Body(StreamPatch),
        responses={200: Body(StreamStatus), **_CHANGE},
    ),
    Endpoint(
        "DELETE",
        "/api/streams/{id}",
        delete_stream,
        "Remove a stream: its viewers' responses end and its metric series go",
        role="admin",
        responses={204: Body(None, media=""), **_404},
    ),
    Endpoint(
        "POST",
        "/api/streams/{id}/share",
        share_stream,
        "A signed, expiring URL of the stream's MJPEG or snapshot (no token in it)",
        role="admin",
        body=Body(ShareRequest),
        responses={200: Body(ShareResponse), **_404, 413: Body(Error), 415: Body(Error)},
    ),
]
