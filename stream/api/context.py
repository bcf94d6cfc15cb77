"""What the views share: the application keys and small lookups."""

from __future__ import annotations

import asyncio

from aiohttp import web

from segstream.stream.api.backend import StreamBackend, unknown
from segstream.stream.auth import Authenticator, LoginThrottle, Principal
from segstream.stream.config import AppConfig

CONFIG = web.AppKey("config", AppConfig)  # the settings (a node's and a gateway's)
BACKEND = web.AppKey("backend", StreamBackend)  # a node's Service or a cluster (api.backend)
AUTH = web.AppKey("auth", Authenticator)
THROTTLE = web.AppKey("throttle", LoginThrottle)
STOP = web.AppKey("stop", asyncio.Event)  # set to shut the server down
PRINCIPAL = web.RequestKey("principal", Principal)  # who is asking


def backend(request: web.Request) -> StreamBackend:
    return request.app[BACKEND]


async def known_stream(request: web.Request) -> str:
    """The stream id of the path, 404 unless it is in the set."""
    sid = request.match_info["id"]
    if sid not in await backend(request).ids():
        raise unknown(sid)
    return sid


def principal(request: web.Request) -> Principal | None:
    return request.get(PRINCIPAL)
