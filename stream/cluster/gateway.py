"""The gateway: the single-node HTTP API, page and auth at one address, for a whole cluster.

It holds no state of its own (a restart loses nothing): stream changes go to the controller,
which validates, persists and places them; reads merge the controller's view (which node runs
what, `moving`/`pending` phases) with the live status of each node service; MJPEG, snapshots
and masks are relayed from the owning node (or the viewer is redirected there with a signed
URL, `cluster.direct_viewers`); predictions go to the least loaded ready node. The same
middlewares as a single node authenticate every request (stream.server.base_app); towards the
nodes the gateway authenticates with the cluster secret the controller holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from segstream.stream.api.context import AUTH, CONFIG, STOP
from segstream.stream.api.live import open_page_socket, run_page_client
from segstream.stream.api.spec import (
    ApiError,
    Body,
    Endpoint,
    error,
    openapi,
    read_json,
    read_query,
    reply,
)
from segstream.stream.auth import Authenticator, load_secret
from segstream.stream.cluster.gateway_live import (
    MAX_UPSTREAM_MESSAGE,
    ClusterView,
    GatewayHub,
    GatewayLiveClient,
)
from segstream.stream.cluster.sd import target_groups
from segstream.stream.config import AppConfig, StreamConfig
from segstream.stream.schemas import (
    Error,
    Health,
    MosaicQuery,
    Ready,
    ShareRequest,
    ShareResponse,
    StreamList,
    StreamPatch,
    StreamStatus,
)
from segstream.stream.server import ENDPOINTS, VERSION, base_app, is_loopback, tokens_dir

log = logging.getLogger(__name__)

# Response headers worth passing on from a node.
_PASS_HEADERS = ("Content-Type", "Cache-Control", "Pragma", "X-Accel-Buffering", "Retry-After")


class ClusterClient:
    """The gateway's handle on the controller, with a short-lived cached snapshot."""

    def __init__(self, handle: Any, secret: str, max_age: float = 0.5) -> None:
        self.handle, self.secret, self.max_age = handle, secret, max_age
        self._snap: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        ref = getattr(self.handle, method).remote(*args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        except TimeoutError:
            raise error(
                503, "the cluster controller did not answer in time", headers={"Retry-After": "2"}
            ) from None

    async def snapshot(self, fresh: bool = False) -> dict[str, Any]:
        async with self._lock:
            if fresh or self._snap is None or time.monotonic() - self._at > self.max_age:
                self.remember(await self.call("snapshot", timeout=10.0))
            assert self._snap is not None
            return self._snap

    def remember(self, snap: dict[str, Any]) -> None:
        self._snap, self._at = snap, time.monotonic()

    @property
    def last(self) -> dict[str, Any] | None:
        return self._snap


CLUSTER = web.AppKey("cluster", ClusterClient)
HTTP = web.AppKey("http", aiohttp.ClientSession)


# -- response models of the gateway's own endpoints ---------------------------------------------
class ClusterNode(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="Short Ray node id, the `node` of streams and metrics.")
    ray_id: str
    host: str
    port: int = Field(description="The node service's HTTP port (private network).")
    metrics_port: int = Field(description="Its unauthenticated /metrics port.")
    slots: float = Field(description="Declared capacity (the slots resource).")
    load: float = Field(description="Placed streams' cost as a share of the capacity.")
    streams: int
    state: str = Field(description="starting | up | lost")
    ready: bool = Field(description="Model warm.")
    error: str | None


class NodeList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nodes: list[ClusterNode]


class SdGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    targets: list[str]
    labels: dict[str, str]


# -- helpers ---------------------------------------------------------------------------------------
def _entry(snap: dict[str, Any], sid: str) -> dict[str, Any]:
    for s in snap["streams"]:
        if s["id"] == sid:
            return s
    raise error(404, f"unknown stream {sid!r}")


def _node(snap: dict[str, Any], short_id: str | None) -> dict[str, Any] | None:
    return next((n for n in snap["nodes"] if n["id"] == short_id), None)


_STATE_OF_PHASE = {
    "starting": "starting",
    "moving": "moving",
    "pending": "pending",
    "error": "error",
    "placed": "unknown",
}


def _placeholder(entry: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    """The status of a stream no node reports on (yet): its phase is its state."""
    return {
        "id": entry["id"],
        "source": entry["source"],
        "reader": entry["reader"],
        "output": entry["output"],
        "state": _STATE_OF_PHASE[entry["phase"]],
        "reason": reason or entry["reason"],
        "width": None,
        "height": None,
        "fps_in": 0.0,
        "fps_out": 0.0,
        "inference_fps": 0.0,
        "infer_fps_cap": float(entry["infer_fps"]),
        "latency_ms": {"p50": None, "p95": None},
        "captured": 0,
        "dropped": 0,
        "reconnects": 0,
        "clients": 0,
        "classes": {},
        "restream": None,
        "node": entry["node"],
    }


def _node_url(node: dict[str, Any], path: str) -> str:
    host = f"[{node['host']}]" if ":" in node["host"] else node["host"]
    return f"http://{host}:{node['port']}{path}"


def _auth_header(app: web.Application) -> dict[str, str]:
    return {"Authorization": f"Bearer {app[CLUSTER].secret}"}


async def _node_json(
    app: web.Application, node: dict[str, Any], path: str, timeout: float = 3.0
) -> tuple[int, Any]:
    async with app[HTTP].get(
        _node_url(node, path),
        headers=_auth_header(app),
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        return r.status, await r.json(content_type=None)


async def _statuses(app: web.Application, snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Live status of every stream from every ready node, in parallel; a node that does not
    answer in time is left out (its streams show as `unknown`)."""
    nodes = [n for n in snap["nodes"] if n["state"] == "up" and n["ready"]]

    async def one(node: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            status, body = await _node_json(app, node, "/api/streams", timeout=2.0)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return []
        return body.get("streams", []) if status == 200 else []

    out: dict[str, dict[str, Any]] = {}
    for node, streams in zip(nodes, await asyncio.gather(*map(one, nodes)), strict=True):
        for st in streams:
            out[st["id"]] = st | {"node": node["id"]}
    return out


def _status(entry: dict[str, Any], live: dict[str, dict[str, Any]]) -> StreamStatus:
    st = live.get(entry["id"])
    if entry["phase"] == "placed" and st is not None and st.get("node") == entry["node"]:
        return StreamStatus.model_validate(st)
    reason = f"node {entry['node']} did not answer" if entry["phase"] == "placed" else None
    return StreamStatus.model_validate(_placeholder(entry, reason))


# -- streams ---------------------------------------------------------------------------------------
async def cluster_streams(app: web.Application) -> tuple[dict[str, Any], StreamList]:
    """The controller's snapshot, and every stream's status with its `node`."""
    snap = await app[CLUSTER].snapshot()
    live = await _statuses(app, snap)
    return snap, StreamList(
        ready=any(n["ready"] for n in snap["nodes"]),
        streams=[_status(e, live) for e in snap["streams"]],
    )


async def list_streams(request: web.Request) -> web.Response:
    return reply((await cluster_streams(request.app))[1])


async def get_stream(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    snap = await request.app[CLUSTER].snapshot()
    entry = _entry(snap, sid)
    node = _node(snap, entry["node"])
    if entry["phase"] == "placed" and node is not None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            status, body = await _node_json(request.app, node, f"/api/streams/{sid}")
            if status == 200:
                return reply(StreamStatus.model_validate(body | {"node": node["id"]}))
    return reply(_status(entry, {}))


def _refused(r: dict[str, Any]) -> ApiError:
    if r["status"] == 422:
        loc = r.get("loc") or ""
        return error(
            422,
            f"{loc}: {r['error']}" if loc else r["error"],
            details=[{"loc": loc or "body", "msg": r["error"]}],
        )
    return error(r["status"], r["error"])


async def _change(request: web.Request, method: str, *args: Any) -> dict[str, Any]:
    client = request.app[CLUSTER]
    r = await client.call(method, *args)
    if not r["ok"]:
        raise _refused(r)
    client.remember(r["snapshot"])
    return dict(r["snapshot"])


async def create_stream(request: web.Request) -> web.Response:
    cfg = await read_json(request, StreamConfig)
    snap = await _change(request, "add", cfg.model_dump_json())
    return reply(_status(_entry(snap, cfg.id), {}), status=201)


async def patch_stream(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    _entry(await request.app[CLUSTER].snapshot(), sid)
    patch = await read_json(request, StreamPatch)
    snap = await _change(request, "patch", sid, patch.model_dump(exclude_unset=True))
    return reply(_status(_entry(snap, sid), {}))


async def delete_stream(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    await _change(request, "delete", sid)
    return web.Response(status=204)


async def share_stream(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    _entry(await request.app[CLUSTER].snapshot(), sid)
    req = await read_json(request, ShareRequest)
    path = f"/streams/{sid}/" + ("mjpeg" if req.kind == "mjpeg" else "snapshot.jpg")
    expires = int(time.time()) + req.ttl_s
    sig = request.app[AUTH].sign_path(path, sid, expires)
    return reply(ShareResponse(url=f"{path}?exp={expires}&sig={sig}", expires=expires))


# -- relays ----------------------------------------------------------------------------------------
def _passed(headers: Any) -> dict[str, str]:
    return {k: headers[k] for k in _PASS_HEADERS if k in headers}


async def relay(request: web.Request, node: dict[str, Any], path: str) -> web.StreamResponse:
    """The node's answer to the same request, streamed through (MJPEG never ends)."""
    url = _node_url(node, path)
    if request.query_string:
        url += "?" + request.query_string
    headers = _auth_header(request.app)
    body = None
    if request.method in ("POST", "PUT", "PATCH"):
        body = await request.read()
        headers["Content-Type"] = request.headers.get("Content-Type", "application/octet-stream")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=30.0)
    try:
        async with request.app[HTTP].request(
            request.method, url, data=body, headers=headers, timeout=timeout
        ) as up:
            ctype = up.headers.get("Content-Type", "")
            if up.status != 200 or not ctype.startswith("multipart/"):
                return web.Response(
                    body=await up.read(), status=up.status, headers=_passed(up.headers)
                )
            resp = web.StreamResponse(status=200, headers=_passed(up.headers))
            await resp.prepare(request)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            return resp  # the node went away: the viewer's stream ends, it reconnects
    except (aiohttp.ClientError, TimeoutError) as e:
        raise error(
            503, f"node {node['id']} unreachable: {type(e).__name__}", headers={"Retry-After": "2"}
        ) from None


async def media(request: web.Request) -> web.StreamResponse:
    sid = request.match_info["id"]
    snap = await request.app[CLUSTER].snapshot()
    entry = _entry(snap, sid)
    node = _node(snap, entry["node"])
    if entry["phase"] != "placed" or node is None:
        raise error(
            503,
            f"stream {sid!r} is not running on a node yet",
            headers={"Retry-After": "2"},
            state=_STATE_OF_PHASE[entry["phase"]],
            reason=entry["reason"],
        )
    if request.app[CONFIG].cluster.direct_viewers and not request.path.endswith("mask.png"):
        raise web.HTTPTemporaryRedirect(_direct_url(request, node, sid))
    return await relay(request, node, request.path)


def _direct_url(request: web.Request, node: dict[str, Any], sid: str) -> str:
    """The same picture on the node itself, signed with the gateway's key for one minute."""
    expires = int(time.time()) + 60
    query = {k: v for k, v in request.query.items() if k not in ("exp", "sig")}
    query |= {"exp": str(expires), "sig": request.app[AUTH].sign_path(request.path, sid, expires)}
    return _node_url(node, request.path) + "?" + urlencode(query)


async def to_any_node(request: web.Request) -> web.StreamResponse:
    """Model facts and predictions: the least loaded ready node, the next if it fails."""
    snap = await request.app[CLUSTER].snapshot()
    nodes = sorted(
        (n for n in snap["nodes"] if n["state"] == "up" and n["ready"]),
        key=lambda n: (n["load"], n["id"]),
    )
    if not nodes:
        raise error(503, "no node service is ready", headers={"Retry-After": "5"})
    last: ApiError | None = None
    for node in nodes[:2]:
        try:
            return await relay(request, node, request.path)
        except ApiError as e:
            last = e
    assert last is not None
    raise last


# -- the live page and the mosaic ----------------------------------------------------------------
async def _cluster_view(app: web.Application) -> ClusterView:
    snap, streams = await cluster_streams(app)
    up = {n["id"] for n in snap["nodes"] if n["state"] == "up"}
    owner = {
        e["id"]: e["node"] for e in snap["streams"] if e["phase"] == "placed" and e["node"] in up
    }
    text = json.dumps(
        {
            "type": "status",
            "ready": streams.ready,
            "streams": [s.model_dump(mode="json") for s in streams.streams],
        }
    )
    return ClusterView(text, owner, frozenset(e["id"] for e in snap["streams"]))


async def _node_ws(app: web.Application, node_id: str) -> aiohttp.ClientWebSocketResponse:
    """The node's own /ws, as the gateway (the cluster secret)."""
    snap = app[CLUSTER].last or await app[CLUSTER].snapshot()
    node = _node(snap, node_id)
    if node is None:
        raise aiohttp.ClientError(f"node {node_id} is gone")
    return await asyncio.wait_for(
        app[HTTP].ws_connect(
            _node_url(node, "/ws"),
            headers=_auth_header(app),
            max_msg_size=MAX_UPSTREAM_MESSAGE,
            heartbeat=30.0,
            autoping=True,
        ),
        5.0,
    )


async def live_ws(request: web.Request) -> web.StreamResponse:
    """The live page's WebSocket, relayed from the nodes that run what the page shows
    (stream.cluster.gateway_live)."""
    app = request.app
    cfg = app[CONFIG].page
    hub = app[LIVE_HUB]
    ws = await open_page_socket(request, cfg, len(hub.clients))

    async def connect(node_id: str) -> aiohttp.ClientWebSocketResponse:
        return await _node_ws(app, node_id)

    await run_page_client(hub, GatewayLiveClient(ws, cfg, connect))
    return ws


async def mosaic(request: web.Request) -> web.StreamResponse:
    """The owning node's mosaic, relayed, when every stream asked for runs on one node; a
    mosaic across nodes is not composed at the gateway (501, naming the nodes)."""
    cfg = request.app[CONFIG].mosaic
    q = read_query(request, MosaicQuery)
    if (q.width or cfg.width) > cfg.max_width:
        raise error(
            422,
            f"invalid query: width: at most {cfg.max_width} (mosaic.max_width)",
            details=[{"loc": "width", "msg": f"at most {cfg.max_width}"}],
        )
    snap = await request.app[CLUSTER].snapshot()
    asked = q.streams is not None and bool(q.streams.strip())
    if asked:
        assert q.streams is not None
        ids = list(dict.fromkeys(x.strip() for x in q.streams.split(",") if x.strip()))
        if len(ids) > cfg.max_streams:
            raise error(
                422,
                f"invalid query: streams: at most {cfg.max_streams} streams (mosaic.max_streams)",
                details=[{"loc": "streams", "msg": "too many"}],
            )
        known = {e["id"] for e in snap["streams"]}
        unknown = [x for x in ids if x not in known]
        if unknown:
            raise error(404, f"unknown streams {unknown}")
        entries = [_entry(snap, sid) for sid in ids]
    else:
        entries = list(snap["streams"])
    placed = [e for e in entries if e["phase"] == "placed" and _node(snap, e["node"])]
    if asked and len(placed) < len(entries):
        waiting = [e["id"] for e in entries if e not in placed]
        raise error(
            503, f"streams {waiting} are not running on a node yet", headers={"Retry-After": "2"}
        )
    by_node: dict[str, list[str]] = {}
    for e in placed:
        by_node.setdefault(e["node"], []).append(e["id"])
    if len(by_node) > 1:
        raise error(
            501,
            "a mosaic of streams on several nodes is not composed by the cluster "
            "gateway: ask for the streams of one node (?streams=...); nodes: "
            + "; ".join(f"{n}: {','.join(ids)}" for n, ids in sorted(by_node.items())),
            nodes=by_node,
        )
    if not by_node:
        raise error(503, "no stream is running on a node yet", headers={"Retry-After": "2"})
    node = _node(snap, next(iter(by_node)))
    assert node is not None
    return await relay(request, node, request.path)


# -- system ------------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[CLUSTER].snapshot()
    except ApiError:
        raise error(503, "the cluster controller does not answer") from None
    return reply(Health(status="ok", uptime_s=round(time.monotonic() - request.app[STARTED], 1)))


async def readyz(request: web.Request) -> web.Response:
    snap = await request.app[CLUSTER].snapshot()
    if not any(n["ready"] for n in snap["nodes"]):
        raise error(503, "no node service is ready yet")
    return reply(Ready(status="ready"))


async def metrics(request: web.Request) -> web.Response:
    with contextlib.suppress(ApiError):
        await request.app[CLUSTER].snapshot()
    return web.Response(
        body=generate_latest(request.app[REGISTRY]),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def nodes(request: web.Request) -> web.Response:
    snap = await request.app[CLUSTER].snapshot()
    return reply(NodeList(nodes=[ClusterNode.model_validate(n) for n in snap["nodes"]]))


async def sd(request: web.Request) -> web.Response:
    """Prometheus http_sd_configs: each node service's metrics listener, labelled `node`."""
    snap = await request.app[CLUSTER].snapshot()
    return web.json_response(target_groups(snap["nodes"]))


class _ClusterCollector:
    """The gateway's own series, from the last snapshot."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.client.last or {"nodes": [], "streams": []}
        nodes = GaugeMetricFamily(
            "segstream_cluster_nodes", "Node services by state.", labels=["state"]
        )
        for state in ("starting", "up", "lost"):
            nodes.add_metric([state], sum(n["state"] == state for n in snap["nodes"]))
        streams = GaugeMetricFamily(
            "segstream_cluster_streams",
            "Streams by placement phase (placed, starting, moving, pending, error).",
            labels=["phase"],
        )
        for phase in ("placed", "starting", "moving", "pending", "error"):
            streams.add_metric([phase], sum(s["phase"] == phase for s in snap["streams"]))
        load = GaugeMetricFamily(
            "segstream_cluster_node_load",
            "Placed cost as a share of the node's capacity.",
            labels=["node"],
        )
        count = GaugeMetricFamily(
            "segstream_cluster_node_streams", "Streams placed on the node.", labels=["node"]
        )
        for n in snap["nodes"]:
            load.add_metric([n["id"]], n["load"])
            count.add_metric([n["id"]], n["streams"])
        yield from (nodes, streams, load, count)


REGISTRY = web.AppKey("registry", CollectorRegistry)
STARTED = web.AppKey("started", float)
LIVE_HUB = web.AppKey("gateway_live_hub", GatewayHub)

_404 = {404: Body(Error, description="Unknown stream.")}
EXTRA_ENDPOINTS = [
    Endpoint(
        "GET",
        "/api/nodes",
        nodes,
        "Cluster: the node services, their load and state",
        tag="cluster",
        responses={200: Body(NodeList)},
    ),
    Endpoint(
        "GET",
        "/api/sd",
        sd,
        "Cluster: Prometheus HTTP service discovery "
        "(http_sd_configs) of the node services' metrics, labelled `node`",
        tag="cluster",
        responses={200: Body(list[SdGroup])},
    ),
]
HANDLERS = {
    ("GET", "/api/streams"): list_streams,
    ("POST", "/api/streams"): create_stream,
    ("GET", "/api/streams/{id}"): get_stream,
    ("PATCH", "/api/streams/{id}"): patch_stream,
    ("DELETE", "/api/streams/{id}"): delete_stream,
    ("POST", "/api/streams/{id}/share"): share_stream,
    ("GET", "/streams/{id}/mjpeg"): media,
    ("GET", "/streams/{id}/snapshot.jpg"): media,
    ("GET", "/streams/{id}/mask.png"): media,
    ("GET", "/ws"): live_ws,
    ("GET", "/mosaic/mjpeg"): mosaic,
    ("GET", "/api/model"): to_any_node,
    ("POST", "/model/predict"): to_any_node,
    ("GET", "/model/labels"): to_any_node,
    ("GET", "/model/metadata"): to_any_node,
    ("POST", "/api/predict"): to_any_node,
    ("GET", "/healthz"): healthz,
    ("GET", "/readyz"): readyz,
    ("GET", "/metrics"): metrics,
}


def gateway_endpoints() -> list[Endpoint]:
    """The single node's endpoints (same paths, roles, documentation) with the gateway's
    handlers, and the cluster's own."""
    return [
        replace(ep, handler=HANDLERS.get((ep.method, ep.path), ep.handler)) for ep in ENDPOINTS
    ] + EXTRA_ENDPOINTS


def make_gateway_app(
    cfg: AppConfig, client: ClusterClient, auth: Authenticator | None = None
) -> web.Application:
    doc = openapi(
        [*ENDPOINTS, *EXTRA_ENDPOINTS], title="segstream (cluster gateway)", version=VERSION
    )
    app = base_app(cfg, gateway_endpoints(), doc, auth)
    app[CLUSTER] = client
    app[STARTED] = time.monotonic()
    registry = app[REGISTRY] = CollectorRegistry(auto_describe=False)
    registry.register(_ClusterCollector(client))
    app[LIVE_HUB] = GatewayHub(cfg.page, lambda: _cluster_view(app))
    app.on_shutdown.append(_end_pages)
    app.cleanup_ctx.append(_http_ctx)
    return app


async def _end_pages(app: web.Application) -> None:
    await app[LIVE_HUB].close_all()


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    app[HTTP] = aiohttp.ClientSession(auto_decompress=False)
    yield
    await app[HTTP].close()


# -- serve --cluster ---------------------------------------------------------------------------
async def serve_cluster(cfg: AppConfig, address: str, state_file: Path | None) -> int:
    """Joins the Ray cluster, finds or starts the controller, serves the gateway until
    SIGINT/SIGTERM. The controller and the node services keep running after it stops."""
    from segstream.stream.cluster import runtime
    from segstream.stream.cluster.controller import start_controller

    auth = Authenticator.from_home(tokens_dir(cfg))
    if not auth.enabled and not is_loopback(cfg.server.host):
        log.error(
            "refusing to serve on %s without authentication: add a token with "
            "`segstream token add admin --role admin`, or listen on 127.0.0.1",
            cfg.server.host,
        )
        return 1
    try:
        runtime.connect(address, cfg.cluster.namespace)  # main thread: Ray's signal handlers
    except (RuntimeError, ConnectionError, ValueError) as e:
        log.error("cannot join the Ray cluster at %s: %s", address, e)
        return 1
    signing = load_secret(tokens_dir(cfg) / "secret.key")
    handle = await asyncio.to_thread(
        start_controller, cfg, str(state_file) if state_file else None, signing
    )
    info = await asyncio.wrap_future(handle.info.remote().future())
    app = make_gateway_app(cfg, ClusterClient(handle, info["secret"]), auth)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=cfg.server.shutdown_timeout
    )
    await runner.setup()
    await web.TCPSite(runner, cfg.server.host, cfg.server.port).start()
    log.info(
        "cluster gateway on http://%s:%d/ (Ray %s, namespace %s)",
        cfg.server.host,
        cfg.server.port,
        address,
        cfg.cluster.namespace,
    )
    stop = app[STOP]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
