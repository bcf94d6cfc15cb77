"""The gateway: the single-node HTTP API, page and auth at one address, for a whole cluster.

It serves the same handlers as a single node (stream/api/) on a `ClusterBackend`, and only
what is truly the cluster's here (/api/nodes, /api/sd, relaying pictures and pages). It holds
no state of its own (a restart loses nothing): stream changes go to the controller, whose
StreamSet validates, persists and places them exactly as a node's does; reads merge the
controller's view (which node runs what, `moving`/`pending` phases) with the live status of
each node service; MJPEG, snapshots and masks are relayed from the owning node (or the viewer
is redirected there with a signed URL, `cluster.direct_viewers`); model facts and predictions
go to the least loaded ready node. Towards the nodes the gateway authenticates with the
cluster secret the controller holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from segstream.stream.api.backend import ServiceWork, StreamWork, refused, unknown
from segstream.stream.api.context import AUTH, BACKEND, STOP, backend
from segstream.stream.api.media import client_fps
from segstream.stream.api.mosaic import serve_mosaic
from segstream.stream.api.spec import ApiError, Body, Endpoint, error, openapi, read_query, reply
from segstream.stream.auth import Authenticator, load_secret
from segstream.stream.cluster import runtime
from segstream.stream.cluster.gateway_live import (
    MAX_UPSTREAM_MESSAGE,
    ClusterView,
    GatewayHub,
    GatewayLiveClient,
)
from segstream.stream.cluster.gateway_mosaic import GatewayMosaic, Share, Where
from segstream.stream.cluster.sd import target_groups
from segstream.stream.cluster.snapshot import ChangeResult, ClusterSnapshot, StreamPlacement
from segstream.stream.config import AppConfig, StreamConfig
from segstream.stream.connections import GuardedSite
from segstream.stream.control import Refused
from segstream.stream.datatypes import NodeState, StreamPhase, StreamState
from segstream.stream.mosaic import MosaicFull
from segstream.stream.schemas import (
    EventOut,
    EventPage,
    EventQuery,
    EventsHealth,
    Health,
    MosaicQuery,
    NodeList,
    NodeStatus,
    SdGroup,
    StreamList,
    StreamStatus,
)
from segstream.stream.server import (
    ENDPOINTS,
    VERSION,
    base_app,
    connection_guard,
    is_loopback,
    main_runner,
    tokens_dir,
)

log = logging.getLogger(__name__)

# Response headers worth passing on from a node.
_PASS_HEADERS = ("Content-Type", "Cache-Control", "Pragma", "X-Accel-Buffering", "Retry-After")


class ClusterClient:
    """The gateway's handle on the controller, with a short-lived cached snapshot."""

    STALE_S = 60.0  # how old a snapshot may be to route viewers while the controller is away

    def __init__(self, handle: Any, secret: str, max_age: float = 0.5) -> None:
        self.handle, self.secret, self.max_age = handle, secret, max_age
        self._snap: ClusterSnapshot | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """A controller method's answer. Calls made while Ray restarts the controller wait
        for it (its tasks are retried); one that does not answer in `timeout`, or a
        controller Ray reports dead or unreachable, is a 503 with Retry-After."""
        try:
            ref = getattr(self.handle, method).remote(*args)
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        except TimeoutError:
            raise error(
                503, "the cluster controller did not answer in time", headers={"Retry-After": "2"}
            ) from None
        except Exception as e:
            if not _unavailable(e):
                raise
            raise error(
                503,
                f"the cluster controller is unavailable ({type(e).__name__})",
                headers={"Retry-After": "2"},
            ) from None

    async def snapshot(self, fresh: bool = False, stale_ok: bool = False) -> ClusterSnapshot:
        """The controller's view, at most max_age old. `stale_ok`: while the controller does
        not answer, the last one (up to STALE_S old) serves, so viewers of running streams
        are still routed to their nodes."""
        async with self._lock:
            if fresh or self._snap is None or time.monotonic() - self._at > self.max_age:
                try:
                    self.remember(await self.call("snapshot", timeout=10.0))
                except ApiError as e:
                    last = self._snap
                    if not stale_ok or last is None or time.monotonic() - self._at > self.STALE_S:
                        raise
                    log.warning("controller away (%s): routing on the last snapshot", e)
                    return last
            assert self._snap is not None
            return self._snap

    async def change(self, method: str, *args: Any) -> ClusterSnapshot:
        """A stream change at the controller's StreamSet; its refusal as a node answers it."""
        r: ChangeResult = await self.call(method, *args)
        if r.snapshot is None:
            assert r.refused is not None
            raise refused(Refused.from_dict(r.refused))
        self.remember(r.snapshot)
        return r.snapshot

    def remember(self, snap: ClusterSnapshot) -> None:
        self._snap, self._at = snap, time.monotonic()

    @property
    def last(self) -> ClusterSnapshot | None:
        return self._snap


def _unavailable(e: Exception) -> bool:
    """Ray's word that an actor is dead, restarting or unreachable (not an error it raised)."""
    try:
        exc = runtime.ray_module().exceptions
    except RuntimeError:  # no Ray installed: nothing of Ray's could have raised it
        return False
    return isinstance(e, exc.RayActorError | exc.RaySystemError | exc.GetTimeoutError)


def _node_url(node: NodeStatus, path: str) -> str:
    host = f"[{node.host}]" if ":" in node.host else node.host
    return f"http://{host}:{node.port}{path}"


def _passed(headers: Any) -> dict[str, str]:
    return {k: headers[k] for k in _PASS_HEADERS if k in headers}


class ClusterBackend:
    """The StreamBackend of a gateway: the controller's stream set, the nodes' pictures."""

    def __init__(self, cfg: AppConfig, client: ClusterClient) -> None:
        self.cfg, self.client = cfg, client
        self.hub = GatewayHub(cfg.page, self.view)
        self.mosaics = GatewayMosaic(cfg.mosaic, self._mosaic_where, self._node_mosaic)
        self.started = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)  # the gateway's own series
        self.registry.register(_ClusterCollector(client))
        self.hub_stats: dict[str, Any] | None = None  # the events hub's, at the last scrape
        self.registry.register(_HubCollector(self))
        self._http: aiohttp.ClientSession | None = None
        self._events_hub: Any = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(auto_decompress=False)
        return self._http

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.client.secret}"}

    async def _entry(
        self, stream_id: str, stale_ok: bool = False
    ) -> tuple[ClusterSnapshot, StreamPlacement]:
        snap = await self.client.snapshot(stale_ok=stale_ok)
        entry = snap.stream(stream_id)
        if entry is None:
            raise unknown(stream_id)
        return snap, entry

    # -- the stream set --------------------------------------------------------------------
    async def ids(self) -> list[str]:
        return [s.id for s in (await self.client.snapshot()).streams]

    async def list_streams(self) -> StreamList:
        snap = await self.client.snapshot()
        live = await self._statuses(snap)
        return StreamList(ready=snap.ready, streams=[_status(e, live) for e in snap.streams])

    async def status(self, stream_id: str) -> StreamStatus:
        snap, entry = await self._entry(stream_id)
        node = snap.owner(entry)
        if node is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                status, body = await self._node_json(node, f"/api/streams/{stream_id}")
                if status == 200:
                    return StreamStatus.model_validate(body | {"node": node.id})
        return _status(entry, {})

    async def add(self, cfg: StreamConfig) -> StreamStatus:
        snap = await self.client.change("add", cfg.model_dump_json())
        return _status(_known(snap, cfg.id), {})

    async def change(self, stream_id: str, changes: dict[str, Any]) -> StreamStatus:
        snap = await self.client.change("patch", stream_id, changes)
        return _status(_known(snap, stream_id), {})

    async def remove(self, stream_id: str) -> None:
        await self.client.change("delete", stream_id)

    async def _node_json(
        self, node: NodeStatus, path: str, timeout: float = 3.0
    ) -> tuple[int, Any]:
        async with self.http.get(
            _node_url(node, path),
            headers=self._auth(),
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            return r.status, await r.json(content_type=None)

    async def _statuses(self, snap: ClusterSnapshot) -> dict[str, dict[str, Any]]:
        """Live status of every stream from every ready node, in parallel; a node that does
        not answer in time is left out (its streams show as `unknown`)."""
        nodes = [n for n in snap.nodes if n.state == NodeState.UP and n.ready]

        async def one(node: NodeStatus) -> list[dict[str, Any]]:
            try:
                status, body = await self._node_json(node, "/api/streams", timeout=2.0)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return []
            return list(body.get("streams", [])) if status == 200 else []

        out: dict[str, dict[str, Any]] = {}
        for node, streams in zip(nodes, await asyncio.gather(*map(one, nodes)), strict=True):
            for st in streams:
                out[st["id"]] = st | {"node": node.id}
        return out

    # -- pictures and the model: relayed ---------------------------------------------------------
    async def media(
        self, request: web.Request, stream_id: str, work: StreamWork
    ) -> web.StreamResponse:
        snap, entry = await self._entry(stream_id, stale_ok=True)
        node = snap.owner(entry)
        if node is None:
            raise error(
                503,
                f"stream {stream_id!r} is not running on a node yet",
                headers={"Retry-After": "2"},
                state=entry.state.value,
                reason=entry.reason,
            )
        if self.cfg.cluster.direct_viewers and not request.path.endswith("mask.png"):
            raise web.HTTPTemporaryRedirect(_direct_url(request, node, stream_id))
        return await self.relay(request, node)

    async def mosaic(
        self, request: web.Request, ids: list[str] | None, work: ServiceWork
    ) -> web.StreamResponse:
        """Streams asked for by id that all run on one node: that node's mosaic, relayed (no
        decoding here). Anything else (every stream, following the set; streams on several
        nodes, or not placed yet) is composed here from each node's shrunk tiles
        (stream.cluster.gateway_mosaic), once per layout for all of its viewers."""
        snap = await self.client.snapshot()
        if ids is not None:
            owners = [snap.owner(_known(snap, sid)) for sid in ids]
            node = owners[0] if owners else None
            if node is not None and all(o is not None and o.id == node.id for o in owners):
                return await self.relay(request, node)
        q = read_query(request, MosaicQuery)
        try:
            layout = self.mosaics.acquire(ids, q.cols, q.width or self.cfg.mosaic.width)
        except MosaicFull as e:
            raise error(503, str(e), headers={"Retry-After": "10"}) from None
        try:
            fps = client_fps(q.fps or 0.0, self.cfg.server.max_client_fps)
            return await serve_mosaic(request, layout.publisher, fps)
        finally:
            self.mosaics.release(layout)

    async def _mosaic_where(self) -> Where:
        snap = await self.client.snapshot(stale_ok=True)
        up = {n.id for n in snap.nodes if n.state == NodeState.UP}
        owner = {
            e.id: e.node
            for e in snap.streams
            if e.phase == StreamPhase.PLACED and e.node is not None and e.node in up
        }
        state = {
            e.id: StreamState.STARTING.value if e.id in owner else e.state.value
            for e in snap.streams
        }
        return Where(tuple(e.id for e in snap.streams), owner, state)

    async def _node_mosaic(self, node_id: str, share: Share) -> aiohttp.ClientResponse:
        """A node's mosaic of its share, as the gateway (the cluster secret)."""
        snap = self.client.last or await self.client.snapshot()
        node = snap.node(node_id)
        if node is None:
            raise aiohttp.ClientError(f"node {node_id} is gone")
        return await self.http.get(
            _node_url(node, "/mosaic/mjpeg"),
            params=share.query(self.cfg.mosaic.max_fps),
            headers=self._auth(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=30.0),
        )

    async def model(self, request: web.Request, work: ServiceWork) -> web.StreamResponse:
        """The least loaded ready node, the next if it fails."""
        nodes = (await self.client.snapshot()).ready_nodes()
        if not nodes:
            raise error(503, "no node service is ready", headers={"Retry-After": "5"})
        last: ApiError | None = None
        for node in nodes[:2]:
            try:
                return await self.relay(request, node)
            except ApiError as e:
                last = e
        assert last is not None
        raise last

    async def relay(self, request: web.Request, node: NodeStatus) -> web.StreamResponse:
        """The node's answer to the same request, streamed through (MJPEG never ends)."""
        url = _node_url(node, request.path)
        if request.query_string:
            url += "?" + request.query_string
        headers = self._auth()
        body = None
        if request.method in ("POST", "PUT", "PATCH"):
            body = await request.read()  # kept by aiohttp: a retry on another node sends it
            headers["Content-Type"] = request.headers.get(
                "Content-Type", "application/octet-stream"
            )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=30.0)
        try:
            async with self.http.request(
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
                503,
                f"node {node.id} unreachable: {type(e).__name__}",
                headers={"Retry-After": "2"},
            ) from None

    # -- the live page ---------------------------------------------------------------------------
    def page_clients(self) -> int:
        return len(self.hub.clients)

    async def run_page(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        """Relayed from the nodes that run what the page shows (stream.cluster.gateway_live)."""
        from segstream.stream.api.live import run_page_client

        await run_page_client(self.hub, GatewayLiveClient(ws, self.cfg.page, self._node_ws))

    async def view(self) -> ClusterView:
        snap = await self.client.snapshot()
        streams = await self.list_streams()
        up = {n.id for n in snap.nodes if n.state == NodeState.UP}
        owner = {
            e.id: e.node
            for e in snap.streams
            if e.phase == StreamPhase.PLACED and e.node is not None and e.node in up
        }
        text = json.dumps(
            {
                "type": "status",
                "ready": streams.ready,
                "streams": [s.model_dump(mode="json") for s in streams.streams],
            }
        )
        return ClusterView(text, owner, frozenset(e.id for e in snap.streams))

    async def _node_ws(self, node_id: str) -> aiohttp.ClientWebSocketResponse:
        """The node's own /ws, as the gateway (the cluster secret)."""
        snap = self.client.last or await self.client.snapshot()
        node = snap.node(node_id)
        if node is None:
            raise aiohttp.ClientError(f"node {node_id} is gone")
        return await asyncio.wait_for(
            self.http.ws_connect(
                _node_url(node, "/ws"),
                headers=self._auth(),
                max_msg_size=MAX_UPSTREAM_MESSAGE,
                heartbeat=30.0,
                autoping=True,
            ),
            5.0,
        )

    # -- events: the cluster's events hub keeps and serves them ---------------------------
    async def _hub(self) -> Any:
        if self._events_hub is None:
            from segstream.stream.cluster.runtime import EVENTS_HUB_NAME

            ray = runtime.ray_module()
            ns = self.cfg.cluster.namespace
            if not ray.is_initialized():  # never start a Ray of our own to ask
                raise error(503, "the gateway is not connected to a Ray cluster")
            try:
                self._events_hub = await asyncio.to_thread(
                    ray.get_actor, EVENTS_HUB_NAME, namespace=ns
                )
            except ValueError:
                raise error(
                    503, "the cluster's events hub is not running", headers={"Retry-After": "5"}
                ) from None
        return self._events_hub

    async def _events(self, name: str, *args: Any) -> Any:
        """An event query at the hub, answered as a node answers it (same errors)."""
        hub = await self._hub()
        try:
            ref = hub.query.remote(name, *args)
            answer = await asyncio.wait_for(asyncio.wrap_future(ref.future()), 30.0)
        except TimeoutError:
            raise error(
                503, "the cluster's events hub did not answer in time", headers={"Retry-After": "2"}
            ) from None
        except Exception as e:  # the hub died (Ray restarts it): found again next time
            self._events_hub = None
            raise error(
                503,
                f"the cluster's events hub is away: {type(e).__name__}",
                headers={"Retry-After": "2"},
            ) from None
        if answer[0] == "error":
            raise error(answer[1], answer[2])
        return answer[1]

    async def list_events(self, q: EventQuery) -> EventPage:
        page: EventPage = await self._events("list_events", q)
        return page

    async def get_event(self, event_id: str) -> EventOut:
        ev: EventOut = await self._events("get_event", event_id)
        return ev

    async def event_media(self, event_id: str, kind: str) -> bytes:
        return bytes(await self._events("event_media", event_id, kind))

    async def delete_event(self, event_id: str) -> None:
        await self._events("delete_event", event_id)

    async def _events_health(self) -> EventsHealth | None:
        """The hub's events health, if it answers at once (health stays fast)."""
        with contextlib.suppress(Exception):
            hub = await self._hub()
            ref = hub.health.remote()
            got = await asyncio.wait_for(asyncio.wrap_future(ref.future()), 2.0)
            return EventsHealth.model_validate(got)
        return None

    # -- system ------------------------------------------------------------------------------
    async def health(self) -> Health:
        try:
            await self.client.snapshot()
        except ApiError:
            raise error(503, "the cluster controller does not answer") from None
        return Health(
            status="ok",
            uptime_s=round(time.monotonic() - self.started, 1),
            events=await self._events_health(),
        )

    async def ready(self) -> None:
        if not (await self.client.snapshot()).ready:
            raise error(503, "no node service is ready yet")

    async def metrics(self) -> bytes:
        with contextlib.suppress(ApiError):
            await self.client.snapshot()
        self.hub_stats = await self._hub_stats()
        return bytes(generate_latest(self.registry))

    async def _hub_stats(self) -> dict[str, Any] | None:
        """The events hub's delivery figures, if it answers at once."""
        if self._events_hub is None and not self.cfg.mqtt and not self.cfg.webhooks:
            return None  # nothing is delivered: do not look for a hub on every scrape
        with contextlib.suppress(Exception):
            hub = await self._hub()
            ref = hub.stats.remote()
            got: dict[str, Any] = await asyncio.wait_for(asyncio.wrap_future(ref.future()), 2.0)
            return got
        return None

    async def close(self) -> None:
        await self.hub.close_all()
        self.mosaics.close_all()

    async def close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _known(snap: ClusterSnapshot, stream_id: str) -> StreamPlacement:
    entry = snap.stream(stream_id)
    if entry is None:
        raise unknown(stream_id)
    return entry


def _status(entry: StreamPlacement, live: dict[str, dict[str, Any]]) -> StreamStatus:
    st = live.get(entry.id)
    if entry.phase == StreamPhase.PLACED and st is not None and st.get("node") == entry.node:
        return StreamStatus.model_validate(st)
    reason = f"node {entry.node} did not answer" if entry.phase == StreamPhase.PLACED else None
    return entry.idle_status(reason)


def _direct_url(request: web.Request, node: NodeStatus, sid: str) -> str:
    """The same picture on the node itself, signed with the gateway's key for one minute."""
    expires = int(time.time()) + 60
    query = {k: v for k, v in request.query.items() if k not in ("exp", "sig")}
    query |= {"exp": str(expires), "sig": request.app[AUTH].sign_path(request.path, sid, expires)}
    return _node_url(node, request.path) + "?" + urlencode(query)


# -- what only a cluster has ----------------------------------------------------------------------
def _cluster(request: web.Request) -> ClusterClient:
    b = backend(request)
    assert isinstance(b, ClusterBackend), "a cluster endpoint on a single node"
    return b.client


async def nodes(request: web.Request) -> web.Response:
    return reply(NodeList(nodes=(await _cluster(request).snapshot()).nodes))


async def sd(request: web.Request) -> web.Response:
    """Prometheus http_sd_configs: each node service's metrics listener, labelled `node`."""
    snap = await _cluster(request).snapshot()
    return web.json_response(target_groups(snap.nodes))


class _ClusterCollector:
    """The gateway's own series, from the last snapshot."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.client.last or ClusterSnapshot()
        nodes = GaugeMetricFamily(
            "segstream_cluster_nodes", "Node services by state.", labels=["state"]
        )
        for state in NodeState:
            nodes.add_metric([state.value], sum(n.state == state for n in snap.nodes))
        streams = GaugeMetricFamily(
            "segstream_cluster_streams",
            "Streams by placement phase (placed, starting, moving, pending, error).",
            labels=["phase"],
        )
        for phase in StreamPhase:
            streams.add_metric([phase.value], sum(s.phase == phase for s in snap.streams))
        load = GaugeMetricFamily(
            "segstream_cluster_node_load",
            "Placed cost as a share of the node's capacity.",
            labels=["node"],
        )
        count = GaugeMetricFamily(
            "segstream_cluster_node_streams", "Streams placed on the node.", labels=["node"]
        )
        for n in snap.nodes:
            load.add_metric([n.id], n.load)
            count.add_metric([n.id], n.streams)
        yield from (nodes, streams, load, count)


class _HubCollector:
    """The events hub's delivery series (the same names as a single node's), as of the last
    scrape; none while the hub does not answer."""

    def __init__(self, backend: ClusterBackend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self.backend.hub_stats
        if st is None:
            return
        sent = CounterMetricFamily(
            "segstream_event_deliveries",
            "Event changes sent to an alert target: delivered, failed (retried), rejected.",
            labels=["target", "outcome"],
        )
        for target, outcome, n in st["deliveries"]:
            sent.add_metric([target, outcome], n)
        size = GaugeMetricFamily("segstream_event_outbox_size", "Event changes not yet delivered.")
        size.add_metric([], st["outbox_size"])
        dropped = CounterMetricFamily(
            "segstream_event_outbox_dropped",
            "Undelivered event changes dropped to keep the outbox bounded.",
        )
        dropped.add_metric([], st["outbox_dropped"])
        yield from (sent, size, dropped)


CLUSTER_ENDPOINTS = [
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


def gateway_endpoints() -> list[Endpoint]:
    """The single node's endpoints, the very same (handlers on the ClusterBackend), and the
    cluster's own."""
    return [*ENDPOINTS, *CLUSTER_ENDPOINTS]


def make_gateway_app(
    cfg: AppConfig, client: ClusterClient, auth: Authenticator | None = None
) -> web.Application:
    endpoints = gateway_endpoints()
    doc = openapi(endpoints, title="segstream (cluster gateway)", version=VERSION)
    app = base_app(cfg, ClusterBackend(cfg, client), endpoints, doc, auth)
    app.cleanup_ctx.append(_http_ctx)
    return app


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    b = app[BACKEND]
    assert isinstance(b, ClusterBackend)
    yield
    await b.close_http()


# -- serve --cluster ---------------------------------------------------------------------------
async def serve_cluster(cfg: AppConfig, address: str, state_file: Path | None) -> int:
    """Joins the Ray cluster, finds or starts the controller, serves the gateway until
    SIGINT/SIGTERM. The controller and the node services keep running after it stops."""
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
    runner = main_runner(app, cfg)
    await runner.setup()
    gateway = app[BACKEND]
    assert isinstance(gateway, ClusterBackend)
    guard = connection_guard(cfg, gateway.registry)
    await GuardedSite(runner, cfg.server.host, cfg.server.port, guard).start()
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
