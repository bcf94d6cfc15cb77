"""A single node's StreamBackend: its own Service, changed through a StreamSet."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from segstream.stream.api import local_events
from segstream.stream.api.backend import ServiceWork, StreamWork, refused, unknown
from segstream.stream.api.live import LiveClient, LiveHub, run_page_client
from segstream.stream.api.spec import error
from segstream.stream.config import StreamConfig
from segstream.stream.control import Refused, ServiceTarget, StreamSet
from segstream.stream.schemas import (
    EventOut,
    EventPage,
    EventQuery,
    EventsHealth,
    Health,
    StreamList,
    StreamStatus,
)
from segstream.stream.service import Service
from segstream.stream.store import StreamStore

T = TypeVar("T")


class LocalBackend:
    def __init__(self, service: Service, store: StreamStore | None) -> None:
        self.service = service
        self.cfg = service.cfg
        self.stream_set = StreamSet(ServiceTarget(service), store, service.cfg.sources)
        self.hub = LiveHub(service)
        # Changes wait here, not in a thread each: the StreamSet runs one at a time anyway.
        self._lock = asyncio.Lock()

    # -- the stream set ------------------------------------------------------------------------
    async def ids(self) -> list[str]:
        return list(self.service.streams)

    async def list_streams(self) -> StreamList:
        out = []
        for sid in list(self.service.streams):
            with contextlib.suppress(KeyError):  # removed meanwhile
                out.append(self._status(sid))
        return StreamList(ready=self.service.ready, streams=out)

    async def status(self, stream_id: str) -> StreamStatus:
        try:
            return self._status(stream_id)
        except KeyError:
            raise unknown(stream_id) from None

    def _status(self, stream_id: str) -> StreamStatus:
        return StreamStatus.model_validate(self.service.stream_status(stream_id))

    async def _change(self, work: Any, *args: Any) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(work, *args)
            except Refused as e:
                raise refused(e) from None

    async def add(self, cfg: StreamConfig) -> StreamStatus:
        await self._change(self.stream_set.add, cfg)
        return await self.status(cfg.id)

    async def change(self, stream_id: str, changes: dict[str, Any]) -> StreamStatus:
        await self._change(self.stream_set.change, stream_id, changes)
        return await self.status(stream_id)

    async def remove(self, stream_id: str) -> None:
        await self._change(self.stream_set.remove, stream_id)

    # -- pictures and the model ----------------------------------------------------------------
    async def media(
        self, request: web.Request, stream_id: str, work: StreamWork
    ) -> web.StreamResponse:
        s = self.service.streams.get(stream_id)
        if s is None:
            raise unknown(stream_id)
        return await work(self.service, s)

    async def mosaic(
        self, request: web.Request, ids: list[str] | None, work: ServiceWork
    ) -> web.StreamResponse:
        return await work(self.service)

    async def model(self, request: web.Request, work: ServiceWork) -> web.StreamResponse:
        return await work(self.service)

    # -- events --------------------------------------------------------------------------------
    async def list_events(self, q: EventQuery) -> EventPage:
        return await self._events(local_events.list_events, q)

    async def get_event(self, event_id: str) -> EventOut:
        return await self._events(local_events.get_event, event_id)

    async def event_media(self, event_id: str, kind: str) -> bytes:
        return await self._events(local_events.event_media, event_id, kind)

    async def delete_event(self, event_id: str) -> None:
        await self._events(local_events.delete_event, event_id)

    async def _events(self, work: Callable[..., T], *args: Any) -> T:
        """`work(store, *args)` off the event loop; 503 while events are off."""
        events = self.service.events
        if events is None:
            raise error(503, "events are not started yet (the model is loading)")
        return await asyncio.to_thread(local_events.guarded, events, work, *args)

    # -- the live page -----------------------------------------------------------------------
    def page_clients(self) -> int:
        return len(self.hub.clients)

    async def run_page(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        client = LiveClient(ws, self.service, self.cfg.page, request.transport)
        await run_page_client(self.hub, client)

    # -- system --------------------------------------------------------------------------------
    async def health(self) -> Health:
        problem = self.service.health()
        if problem:
            raise error(503, problem)
        events = self.service.events
        return Health(
            status="ok",
            uptime_s=round(time.monotonic() - self.service.started_ts, 1),
            events=EventsHealth.model_validate(events.health()) if events is not None else None,
        )

    async def ready(self) -> None:
        if not self.service.ready:
            raise error(503, self.service.error or "model warming up")

    async def metrics(self) -> bytes:
        registry = self.service.metrics
        if registry is None:
            raise error(404, "this service reports metrics to another observer")
        return bytes(registry.exposition())

    async def close(self) -> None:
        await self.hub.close_all()
        await asyncio.to_thread(self.service.mosaic.stop)
