"""HTTP layer (aiohttp): the application, its middlewares (JSON errors, authentication,
security headers) and `serve`. The views live in stream/api/, one module per concern, each
declaring its endpoints once (route, role, models) for routing, auth and /openapi.json."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import ipaddress
import logging
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from segstream import __version__
from segstream.models.fetch import home
from segstream.stream.api import events, live, media, mosaic, predict, session, streams, system
from segstream.stream.api.backend import StreamBackend
from segstream.stream.api.context import AUTH, BACKEND, CONFIG, PRINCIPAL, STOP, THROTTLE
from segstream.stream.api.local import LocalBackend
from segstream.stream.api.spec import (
    SESSION_COOKIE,
    ApiError,
    Endpoint,
    add_endpoints,
    endpoint_of,
    error,
    openapi,
)
from segstream.stream.auth import Authenticator, LoginThrottle, Principal
from segstream.stream.config import AppConfig, ConfigError
from segstream.stream.connections import ConnectionGuard, GuardedSite
from segstream.stream.sanitize import sanitize_text
from segstream.stream.service import Service
from segstream.stream.store import StreamStore

log = logging.getLogger(__name__)
SERVICE = web.AppKey("service", Service)  # a node's own pipeline (a gateway has none)
VERSION = __version__  # one version: the package's, also in the OpenAPI document
ENDPOINTS: list[Endpoint] = [
    *system.ENDPOINTS,
    *session.ENDPOINTS,
    *streams.ENDPOINTS,
    *media.ENDPOINTS,
    *live.ENDPOINTS,
    *mosaic.ENDPOINTS,
    *predict.ENDPOINTS,
    *events.ENDPOINTS,
]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- middlewares ------------------------------------------------------------------------------
@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON ({"error": ...}); an unexpected one is logged and answered 500
    without details (nothing internal leaks)."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        text = e.text or ""
        message = text if text and not text.startswith(f"{e.status}:") else e.reason
        keep = {k: v for k, v in e.headers.items() if k in _KEEP_HEADERS}
        return web.json_response({"error": message}, status=e.status, headers=keep)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        log.exception(
            "%s %s failed: %s",
            request.method,
            request.path,
            sanitize_text(f"{type(e).__name__}: {e}"),
        )
        return web.json_response({"error": "internal error"}, status=500)


_KEEP_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    ep = endpoint_of(request)
    if ep is None or ep.role == "public":  # health probes, login: bad credentials are no error
        return await handler(request)
    who = await _principal(request, ep)
    if who is not None:
        request[PRINCIPAL] = who
    if who is None:
        if ep.tag == "page" and request.method == "GET":
            raise web.HTTPFound("/login")
        raise error(
            401,
            "authentication required: send Authorization: Bearer <token> or log in",
            headers={"WWW-Authenticate": 'Bearer realm="segstream"'},
        )
    if not who.allows(ep.role) or (who.stream and who.stream != request.match_info.get("id")):
        raise error(403, f"{who.role} may not {request.method} {request.path}")
    return await handler(request)


async def _principal(request: web.Request, ep: Endpoint | None) -> Principal | None:
    auth = request.app[AUTH]
    if not auth.enabled:
        return Principal("anonymous", "open", "open")
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        who = auth.check_token(token.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            throttle, client = request.app[THROTTLE], request.remote or "unknown"
            await asyncio.sleep(throttle.delay(client))
            throttle.failed(client)
            raise error(401, "invalid bearer token")
        return who
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        who = auth.check_session(cookie)
        if who is not None:
            return who
    q = request.query
    if ep is not None and ep.signed and "sig" in q and "exp" in q:
        return auth.check_signed(request.path, request.match_info.get("id", ""), q["exp"], q["sig"])
    return None


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")  # signed URLs stay put
    if response.content_type == "text/html":
        response.headers.setdefault("X-Frame-Options", "DENY")
        body = response.body if isinstance(response, web.Response) else None
        if isinstance(body, bytes):
            response.headers.setdefault("Content-Security-Policy", content_security_policy(body))


_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S)


@functools.lru_cache(maxsize=16)
def content_security_policy(html: bytes) -> str:
    """A strict policy for one of the service's pages: everything from this origin, no other
    host, no inline script but the page's own (allowed by hash, so an injected one never runs),
    no plugins, no framing. Inline styles stay allowed: the page sets colour swatches by
    style attribute, which cannot run code."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' blob: data:; media-src 'self'; connect-src 'self'; font-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


# -- the application --------------------------------------------------------------------------
def base_app(
    cfg: AppConfig,
    backend: StreamBackend,
    endpoints: list[Endpoint],
    doc: dict[str, Any],
    auth: Authenticator | None = None,
) -> web.Application:
    """What a single node and a cluster gateway share: middlewares (JSON errors, auth),
    credentials, the endpoint table (the handlers of stream/api/ on `backend`, and the
    gateway's own) and the OpenAPI document."""
    app = web.Application(
        client_max_size=cfg.predict.max_bytes + 64 * 1024, middlewares=[json_errors, authenticate]
    )
    app[CONFIG] = cfg
    app[BACKEND] = backend
    app[STOP] = asyncio.Event()
    app[AUTH] = auth or Authenticator.from_home(tokens_dir(cfg), env={})
    app[THROTTLE] = LoginThrottle()
    app[system.OPENAPI] = doc
    app[predict.PREDICT_SLOTS] = asyncio.Semaphore(cfg.predict.max_concurrent)
    app[predict.MAX_IMAGE_SIZE] = predict.image_size_from_env()
    add_endpoints(app, endpoints)
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(_end_viewers)
    return app


def make_app(
    service: Service,
    *,
    auth: Authenticator | None = None,
    store: StreamStore | None = None,
) -> web.Application:
    cfg = service.cfg
    doc = openapi(ENDPOINTS, title="segstream", version=VERSION)
    app = base_app(cfg, LocalBackend(service, store), ENDPOINTS, doc, auth)
    app[SERVICE] = service
    app.cleanup_ctx.append(_service_ctx)
    return app


async def _end_viewers(app: web.Application) -> None:
    """Before the server waits for its handlers: pages (WebSocket) and mosaic viewers end."""
    await app[BACKEND].close()


def tokens_dir(cfg: AppConfig) -> Path:
    return Path(cfg.auth.tokens_dir) if cfg.auth.tokens_dir else home() / "auth"


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the pipeline in the background (so /healthz answers during warm-up); stop it on
    shutdown, closing the MJPEG responses first."""
    service = app[SERVICE]

    async def start() -> None:
        try:
            await service.start()
        except Exception as e:
            service.error = f"start-up failed: {sanitize_text(str(e))}"
            log.error("%s", service.error)
            app[STOP].set()  # a service that cannot start must not pretend to run

    task = asyncio.create_task(start())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # a model load in progress finishes and is closed, not left running
    await service.stop()


def metrics_app(service: Service) -> web.Application:
    """Only /metrics, for a private listener Prometheus scrapes without credentials."""
    app = web.Application(middlewares=[json_errors])
    app[BACKEND] = LocalBackend(service, None)
    app.router.add_get("/metrics", system.metrics)
    return app


# -- serve ------------------------------------------------------------------------------------
def main_runner(app: web.Application, cfg: AppConfig) -> web.AppRunner:
    return web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=cfg.server.shutdown_timeout,
        access_log=None,
        keepalive_timeout=cfg.server.keepalive_timeout_s,
    )


def connection_guard(cfg: AppConfig, registry: CollectorRegistry | None) -> ConnectionGuard:
    """One guard for every listener of a process: the per-client cap counts them together."""
    return ConnectionGuard(
        cfg.server.header_timeout_s, cfg.server.max_connections_per_client, registry
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def initial_streams(cfg: AppConfig, store: StreamStore | None) -> AppConfig:
    """The state file, once it exists, owns the stream set; the config seeds it the first
    time (and is the set when no state is kept)."""
    if store is None:
        return cfg
    if store.exists():
        kept = store.load()
        if cfg.streams and cfg.streams != kept:
            log.warning(
                "the config's streams: list differs from the state file %s, which owns "
                "the stream set (%d streams, API changes included); delete that file "
                "to start again from the config",
                store.path,
                len(kept),
            )
        return cfg.model_copy(update={"streams": kept})
    store.save(list(cfg.streams))
    return cfg


async def serve(cfg: AppConfig, state_file: Path | None = None) -> int:
    """Runs until SIGINT/SIGTERM; returns the exit code (1 when start-up failed)."""
    auth = Authenticator.from_home(tokens_dir(cfg))
    if not auth.enabled and not is_loopback(cfg.server.host):
        log.error(
            "refusing to serve on %s without authentication: add a token with "
            "`segstream token add admin --role admin` (or set SEGSTREAM_ADMIN_TOKEN), "
            "or listen on 127.0.0.1",
            cfg.server.host,
        )
        return 1
    store = StreamStore(state_file) if state_file else None
    try:
        cfg = initial_streams(cfg, store)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    service = Service(cfg)
    app = make_app(service, auth=auth, store=store)
    stop = app[STOP]
    guard = connection_guard(cfg, service.metrics.registry if service.metrics else None)
    runners = [main_runner(app, cfg)]
    sites = [(runners[0], cfg.server.host, cfg.server.port)]
    if cfg.metrics.listen:
        m_host, _, m_port = cfg.metrics.listen.rpartition(":")
        runners.append(web.AppRunner(metrics_app(service), access_log=None))
        sites.append((runners[-1], m_host.strip("[]"), int(m_port)))
    for r in runners:
        await r.setup()
    for r, host, port in sites:
        await GuardedSite(r, host, port, guard).start()
        log.info("listening on http://%s:%d/", host, port)
    log.info("authentication: %s", "tokens" if auth.enabled else "none (loopback only)")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    for s in service.streams.values():
        s.view.close()  # ends every MJPEG response so the server can close at once
    for r in reversed(runners):
        await r.cleanup()
    return 1 if service.error else 0
