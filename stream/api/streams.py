"""The stream API: list, read, add, change, remove, and signed share URLs."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from segstream.stream.api.context import AUTH, backend, known_stream
from segstream.stream.api.spec import Body, Endpoint, read_json, reply
from segstream.stream.config import StreamConfig
from segstream.stream.schemas import (
    Error,
    ShareRequest,
    ShareResponse,
    StreamList,
    StreamPatch,
    StreamStatus,
)


async def list_streams(request: web.Request) -> web.Response:
    return reply(await backend(request).list_streams())


async def get_stream(request: web.Request) -> web.Response:
    return reply(await backend(request).status(request.match_info["id"]))


async def create_stream(request: web.Request) -> web.Response:
    cfg = await read_json(request, StreamConfig)
    return reply(await backend(request).add(cfg), status=201)


async def patch_stream(request: web.Request) -> web.Response:
    sid = await known_stream(request)
    patch = await read_json(request, StreamPatch)
    changes: dict[str, Any] = patch.model_dump(exclude_unset=True)
    return reply(await backend(request).change(sid, changes))


async def delete_stream(request: web.Request) -> web.Response:
    await backend(request).remove(request.match_info["id"])
    return web.Response(status=204)


async def share_stream(request: web.Request) -> web.Response:
    """A signed, expiring URL of one stream's MJPEG or snapshot, for embedding elsewhere."""
    sid = await known_stream(request)
    req = await read_json(request, ShareRequest)
    path = f"/streams/{sid}/" + ("mjpeg" if req.kind == "mjpeg" else "snapshot.jpg")
    expires = int(time.time()) + req.ttl_s
    sig = request.app[AUTH].sign_path(path, sid, expires)
    return reply(ShareResponse(url=f"{path}?exp={expires}&sig={sig}", expires=expires))


_404 = {404: Body(Error, description="Unknown stream.")}
_CHANGE = {
    **_404,
    409: Body(Error, description="A stream with that id exists, or sources.max_streams do."),
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
