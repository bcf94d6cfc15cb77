"""A node service: today's single-node pipeline (Service + its HTTP app) for the streams the
controller gives this Ray node. Decode, scheduling, model, render and JPEG stay here; only
JPEGs (relayed by the gateway), status and metrics leave the node.

It runs as a Ray async actor (one per node, pinned to it, detached so a controller restart
does not take the streams down). Its HTTP listener binds the node's own address and trusts
only the gateway: every request needs `Authorization: Bearer <cluster secret>` (or a URL
signed with the gateway's key, for viewers sent straight here). /metrics is served without
credentials on a second port of the private network, for Prometheus.

This module imports Ray nowhere at module level, so it is importable without the extra."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from segstream.stream.auth import Authenticator, TokenStore
from segstream.stream.cluster.runtime import hub_sender
from segstream.stream.config import AppConfig, ConfigError, StreamConfig
from segstream.stream.connections import ConnectionGuard, GuardedSite
from segstream.stream.events.forward import ForwardingEventsFeature
from segstream.stream.events.model import new_id
from segstream.stream.events.observer import EventsObserver
from segstream.stream.server import main_runner, make_app, metrics_app
from segstream.stream.service import Service

log = logging.getLogger(__name__)


def fingerprint(cfg: StreamConfig) -> str:
    """Identifies a stream's settings: the controller compares what a node runs with what it
    should run by these."""
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


class NodeService:
    """Plain class; stream.cluster.runtime wraps it with ray.remote."""

    def __init__(self) -> None:
        self.service: Service | None = None
        self.info: dict[str, Any] | None = None
        self.desired: dict[str, StreamConfig] = {}
        self.applied: dict[str, str] = {}  # stream id -> fingerprint of what runs (or failed)
        self.failed: dict[str, str] = {}  # stream id -> why it could not start
        self._wake = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def start(
        self, cfg_json: str, node_id: str, host: str, cluster_secret: str, signing_secret: bytes
    ) -> dict[str, Any]:
        """Starts the HTTP listeners and, in the background, the model; returns where the
        node listens. Idempotent (a restarted controller calls it again)."""
        if self.info is not None:
            return self.info
        # Alerts go out from the events hub only: a node has no MQTT or webhook of its own.
        cfg = AppConfig.model_validate_json(cfg_json).model_copy(
            update={"streams": [], "mqtt": None, "webhooks": []}
        )
        cfg.server.host, cfg.server.port = host, cfg.cluster.node_port
        send, instance = hub_sender(cfg.cluster.namespace), new_id()

        def events(labels: list[str], observer: EventsObserver) -> ForwardingEventsFeature:
            # One store, one outbox, one publisher for the cluster: this node's events go to
            # the events hub (stream.cluster.events_hub); `instance` tells this node service
            # from a restarted one there.
            return ForwardingEventsFeature(
                cfg.events, labels=labels, send=send, node=instance, observer=observer
            )

        service = self.service = Service(cfg, events=events)
        # Nobody holds a token here: the gateway's secret (as the env admin token) and URLs
        # signed with the gateway's key are the only ways in.
        self._tmp = tempfile.TemporaryDirectory(prefix="segstream-node-")
        auth = Authenticator(
            TokenStore(Path(self._tmp.name) / "tokens.json"),
            signing_secret,
            env_token=cluster_secret,
        )
        app = make_app(service, auth=auth, store=None)
        runner = main_runner(app, cfg)
        mrunner = web.AppRunner(metrics_app(service), access_log=None)
        # Header timeout, but no per-client cap: the gateway is one client for all its viewers.
        registry = service.metrics.registry if service.metrics else None
        guard = ConnectionGuard(cfg.server.header_timeout_s, 0, registry)
        ports = []
        for r, port in ((runner, cfg.cluster.node_port), (mrunner, cfg.cluster.metrics_port)):
            await r.setup()
            site = GuardedSite(r, host, port, guard)
            await site.start()
            self._runners.append(r)
            ports.append(r.addresses[0][1])
        self.info = {"node_id": node_id, "host": host, "port": ports[0], "metrics_port": ports[1]}
        self._tasks.append(asyncio.create_task(self._apply_loop()))
        log.info(
            "node service %s on http://%s:%d/ (metrics :%d)", node_id[:12], host, ports[0], ports[1]
        )
        return self.info

    async def ping(self) -> dict[str, Any]:
        s = self.service
        return {
            "ready": bool(s and s.ready),
            "error": s.health() if s else None,
            "running": dict(self.applied),
            "failed": dict(self.failed),
        }

    async def sync(self, configs: list[str]) -> None:
        """The full set this node should run (JSON StreamConfigs); applied in the background
        once the model is warm."""
        self.desired = {c.id: c for c in map(StreamConfig.model_validate_json, configs)}
        self._wake.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            s = self.service
            if s is None:
                continue
            while not s.ready and not s.error:
                await asyncio.sleep(0.1)
            if s.error:
                return
            try:
                await self._apply(s)
            except Exception:
                log.exception("applying the stream set failed")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _apply(self, s: Service) -> None:
        desired = self.desired
        for sid in [i for i in self.applied if i not in desired]:
            self.applied.pop(sid, None)
            self.failed.pop(sid, None)
            if sid in s.streams:
                await asyncio.to_thread(s.remove_stream, sid)
        for sid, cfg in desired.items():
            fp = fingerprint(cfg)
            if self.applied.get(sid) == fp:
                continue
            try:
                if sid in s.streams:
                    await asyncio.to_thread(s.replace_stream, cfg)
                else:
                    await asyncio.to_thread(s.add_stream, cfg)
                self.failed.pop(sid, None)
            except (ConfigError, ValueError, OSError) as e:
                # Counted as applied: retrying each second would not make it start.
                self.failed[sid] = str(e)
                log.warning("stream %s cannot start here: %s", sid, e)
            self.applied[sid] = fp

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for r in reversed(self._runners):
            with contextlib.suppress(Exception):
                await r.cleanup()  # stops the service (make_app's cleanup context)
        self._runners = []
        if self._tmp is not None:
            self._tmp.cleanup()
