"""Browser sessions: a token is exchanged once for an HttpOnly, SameSite=Strict cookie, so the
page's <img> and WebSocket streams work without a token in any URL."""

from __future__ import annotations

import asyncio

from aiohttp import web

from segstream.stream.api.context import AUTH, CONFIG, THROTTLE, principal
from segstream.stream.api.spec import SESSION_COOKIE, Body, Endpoint, error, read_json, reply
from segstream.stream.schemas import Error, LoginRequest, Whoami


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


async def login(request: web.Request) -> web.Response:
    auth, throttle = request.app[AUTH], request.app[THROTTLE]
    body = await read_json(request, LoginRequest, limit=4096)
    client = client_address(request)
    who = auth.check_token(body.token)
    if who is None:
        await asyncio.sleep(throttle.delay(client))  # each failure makes the next wait longer
        throttle.failed(client)
        raise error(401, "unknown token")
    throttle.succeeded(client)
    cfg = request.app[CONFIG].auth
    resp = reply(Whoami(name=who.name, role=who.role, via="session"))
    resp.set_cookie(
        SESSION_COOKIE,
        auth.make_session(who, cfg.session_ttl_s),
        max_age=cfg.session_ttl_s,
        httponly=True,
        samesite="Strict",
        secure=cfg.cookie_secure,
        path="/",
    )
    return resp


async def logout(request: web.Request) -> web.Response:
    resp = web.Response(status=204)
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


async def whoami(request: web.Request) -> web.Response:
    who = principal(request)
    if who is None:
        raise error(401, "not logged in")
    return reply(Whoami(name=who.name, role=who.role, via=who.via))


ENDPOINTS = [
    Endpoint(
        "POST",
        "/api/login",
        login,
        "Exchange a token for a session cookie",
        role="public",
        tag="auth",
        body=Body(LoginRequest),
        responses={
            200: Body(Whoami),
            401: Body(Error, description="Unknown token."),
            400: Body(Error),
            413: Body(Error),
            415: Body(Error),
        },
    ),
    Endpoint(
        "POST",
        "/api/logout",
        logout,
        "End the browser session",
        role="public",
        tag="auth",
        responses={204: Body(None, media="")},
    ),
    Endpoint(
        "GET",
        "/api/whoami",
        whoami,
        "Who the request is from, and its role",
        tag="auth",
        responses={200: Body(Whoami)},
    ),
]
