"""What the views share: the application keys and small lookups."""

from __future__ import annotations

import asyncio

from aiohttp import web

from segstream.stream.api.spec import error
from segstream.stream.auth import Authenticator, LoginThrottle, Principal
from segstream.stream.config import AppConfig
from segstream.stream.control import StreamControl
from segstream.stream.service import Service, Stream

CONFIG = web.AppKey("config", AppConfig)  # the settings (a gateway has no Service)
SERVICE = web.AppKey("service", Service)
CONTROL = web.AppKey("control", StreamControl)
AUTH = web.AppKey("auth", Authenticator)
THROTTLE = web.AppKey("throttle", LoginThrottle)
STOP = web.AppKey("stop", asyncio.Event)  # set to shut the server down
PRINCIPAL = web.RequestKey("principal", Principal)  # who is asking


def stream_or_404(request: web.Request) -> Stream:
    service = request.app[SERVICE]
    sid = request.match_info["id"]
    s = service.streams.get(sid)
    if s is None:
        raise error(404, f"unknown stream {sid!r}")
    return s


def principal(request: web.Request) -> Principal | None:
    return request.get(PRINCIPAL)
