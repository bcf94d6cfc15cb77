"""The cluster's one events hub: the event store, its outbox and the alert targets (MQTT with
Home Assistant discovery, webhooks) of the whole cluster, configured from the cluster
config's `events`, `mqtt` and `webhooks`.

Nodes compute coverage and rules and forward what they find (stream.events.forward); the hub
keeps one history and publishes it once. It runs as a detached Ray actor pinned to the head
node (beside the controller, restarted by Ray), so the gateway stays stateless and several
gateways serve the same events. The gateway asks it the event API's queries.

One history, however streams move:
- a batch is taken again without harm (a node retries after a lost answer): a `new` for an
  event it has, an `update` that changes nothing, an `end` of an ended event are dropped;
- a stream is owned by the node that claimed it last (by the claim's time: a claim that a
  node could only send late, after the stream moved on, does not take it back); another
  node's `new` (a node that was silenced and came back before it was killed) is dropped,
  and so are its coverage and its release (a move must not clear the new node's Home
  Assistant entities);
- when a node claims a stream, the stream's events still open from another node (a node that
  died, or whose own `end` has not arrived yet) end with `restart` at their last known active
  moment (their peak), as after a crash on one node; the old node's late `end` is dropped.
A stream moved gracefully thus ends its open event on the old node (`stream_removed`) or, if
the new node claims it first, with `restart`; either way once, and the new node opens a new
event if the class still covers the zone."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from segstream.models.fetch import home
from segstream.stream.api import local_events
from segstream.stream.api.spec import ApiError
from segstream.stream.cluster import runtime
from segstream.stream.config import AppConfig
from segstream.stream.events.config import ZoneConfig
from segstream.stream.events.feature import EventsFeature
from segstream.stream.events.forward import Batch, Changes, Claim, Clip, Media
from segstream.stream.events.model import Change, Event, new_id
from segstream.stream.events.observer import DeliveryOutcome
from segstream.stream.events.recorder import Recorder
from segstream.stream.events.schema import events
from segstream.stream.events.store import default_url

log = logging.getLogger(__name__)
FLUSH_TIMEOUT_S = 20.0
QUERIES: dict[str, Callable[..., Any]] = {
    "list_events": local_events.list_events,
    "get_event": local_events.get_event,
    "event_media": local_events.event_media,
    "delete_event": local_events.delete_event,
}


class HubCounts:
    """The hub's EventsObserver: delivery and outbox figures, which the gateway exposes on
    its /metrics (the hub actor has no listener of its own). Coverage and events_total are
    counted on the nodes."""

    def __init__(self) -> None:
        self.deliveries: dict[tuple[str, str], int] = {}
        self.outbox = 0
        self.dropped = 0

    def zone_coverage(self, stream: str, zone: str, coverage: Mapping[str, float]) -> None:
        pass

    def event_opened(self, stream: str, zone: str, class_name: str) -> None:
        pass

    def delivery(self, target: str, outcome: DeliveryOutcome) -> None:
        key = (target, outcome)
        self.deliveries[key] = self.deliveries.get(key, 0) + 1

    def outbox_size(self, size: int) -> None:
        self.outbox = size

    def outbox_dropped(self, count: int) -> None:
        self.dropped += count


class HubError(RuntimeError):
    """The hub did not take a batch (the node keeps it and sends it again)."""


class EventsHub:
    """Plain class; start_events_hub wraps it with ray.remote (an async actor)."""

    def __init__(self, cfg_json: str) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        cfg = AppConfig.model_validate_json(cfg_json)
        self.cfg = cfg
        self.instance = new_id()  # nodes claim their streams again when this changes
        self.counts = HubCounts()
        self.feature = EventsFeature(
            cfg.events,
            home=home(),
            labels=[],
            mqtt=cfg.mqtt,
            webhooks=cfg.webhooks,
            observer=self.counts,
        )
        self.owner: dict[str, str] = {}  # stream -> node instance that claimed it last
        self.claimed_at: dict[str, float] = {}  # stream -> when (node's clock) it was claimed
        self.opened_by: dict[str, str] = {}  # event id -> node instance (this run)
        self.pending: dict[str, Event] = {}  # taken, not yet known to be written
        self.batches = 0
        self._open_lock: asyncio.Lock | None = None
        self._lock: asyncio.Lock | None = None
        self._opened = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def _open(self) -> None:
        """The store and targets, at the first batch (or at start when anything may use them:
        as on one node, a cluster without zones writes no file)."""
        if self._open_lock is None:
            self._open_lock, self._lock = asyncio.Lock(), asyncio.Lock()
        async with self._open_lock:
            if not self._opened:
                self._opened = True
                await self.feature.start()
                log.info("events hub %s: store %s", self.instance[:8], self.feature.store._where())

    async def ready(self) -> str:
        """Opens the store when the config uses it (targets, a database) or a store of an
        earlier run exists; returns the instance id. Every call of the gateway comes here
        first: an actor that Ray restarted opens again at the first one (or the first batch)."""
        c = self.cfg
        used = c.mqtt or c.webhooks or c.events.database or c.events.media_dir
        if used or _default_store_exists():
            await self._open()
        return self.instance

    async def close(self) -> None:
        if self._opened:
            await self.feature.close()

    # -- from the nodes ----------------------------------------------------------------------
    async def ingest(self, batch: Batch) -> str:
        """Takes a node's batch in order (one batch at a time: one writer); returns the hub's
        instance id. Raises HubError when the store cannot take it now."""
        await self._open()
        assert self._lock is not None
        async with self._lock:
            await asyncio.to_thread(self._ingest, batch)
        self.batches += 1
        return self.instance

    def _recorder(self) -> Recorder:
        rec = self.feature.recorder
        if rec is None:
            raise HubError(f"events are off at the hub: {self.feature.error}")
        return rec

    def _ingest(self, batch: Batch) -> None:
        rec = self._recorder()
        node = batch.node
        for item in batch.items:
            if isinstance(item, Claim):
                self._claim(rec, node, item)
            elif isinstance(item, Changes):
                rec.submit([ch for ch in item.changes if self._take(node, ch)])
            elif isinstance(item, Clip):
                self._clip(rec, node, item)
            elif self._media_ok(node, item):
                rec.submit_media(item.event_id, functools.partial(_pair, item.jpeg, item.png))
        mqtt = self.feature.mqtt
        if mqtt is not None:
            for (stream, zone), values in batch.coverage.items():
                if self.owner.get(stream) == node:
                    mqtt.coverage(stream, zone, values)
        if not rec.flush(FLUSH_TIMEOUT_S) or rec.error:
            raise HubError(rec.error or "the event store is not keeping up")
        self.pending.clear()

    def _claim(self, rec: Recorder, node: str, claim: Claim) -> None:
        mqtt = self.feature.mqtt
        if claim.release:
            if self.owner.get(claim.stream) == node:
                del self.owner[claim.stream]
                if mqtt is not None:
                    mqtt.set_zones(claim.stream, [])
            return
        if claim.at < self.claimed_at.get(claim.stream, 0.0):
            log.info(
                "stream %s: a stale claim (sent late by a node that lost it) ignored", claim.stream
            )
            return
        self.owner[claim.stream] = node
        self.claimed_at[claim.stream] = claim.at
        orphans = [
            ev for ev in self._open_events(claim.stream) if self.opened_by.get(ev.id) != node
        ]
        ends = [
            Change("end", ev, ev.replace(end=ev.peak_at, end_reason="restart")) for ev in orphans
        ]
        if ends:
            log.info(
                "stream %s claimed by another node: %d open event(s) end", claim.stream, len(ends)
            )
            for ch in ends:
                self.pending[ch.after.id] = ch.after
            rec.submit(ends)
        if mqtt is not None:
            mqtt.set_zones(claim.stream, [ZoneConfig.model_validate(z) for z in claim.zones])

    def _clip(self, rec: Recorder, node: str, clip: Clip) -> None:
        """A finished clip of an event this node opened: into the hub's media folder (written
        whole, then renamed), then named in the store after the event's own rows."""
        if not clip.data or self.opened_by.get(clip.event_id, node) != node:
            return
        path = self.feature.store.media_path(clip.event_id, "clip")
        tmp = path.with_suffix(".part")
        tmp.write_bytes(clip.data)
        tmp.replace(path)
        rec.submit_clip(clip.event_id, path, len(clip.data), clip.truncated)

    def _open_events(self, stream: str) -> list[Event]:
        """The stream's open events: in the store, and taken but maybe not written yet."""
        store = self.feature.store
        q = sa.select(events.c.id).where(events.c.stream == stream, events.c.end.is_(None))
        with store.engine.connect() as conn:
            ids = list(conn.execute(q).scalars())
        found = {ev.id: ev for ev in map(store.get, ids) if ev is not None}
        found |= self.pending
        return [ev for ev in found.values() if ev.stream == stream and ev.end is None]

    def _known(self, event_id: str) -> Event | None:
        return self.pending.get(event_id) or self.feature.store.get(event_id)

    def _take(self, node: str, ch: Change) -> bool:
        """Whether the change is new to the history (see the module's doc)."""
        ev = ch.after
        known = self._known(ev.id)
        if ch.type == "new":
            owner = self.owner.setdefault(ev.stream, node)  # a hub restarted: claims follow
            if known is not None or owner != node:
                return False
            self.opened_by[ev.id] = node
        elif known is None or known.end is not None or _same(ch, known):
            return False
        self.pending[ev.id] = ev
        if ch.type == "end":
            self.opened_by.pop(ev.id, None)
        return True

    def _media_ok(self, node: str, item: object) -> bool:
        """Media of an event that this node opened (or of one opened before a hub restart)."""
        return (
            isinstance(item, Media)
            and bool(item.jpeg)
            and self.opened_by.get(item.event_id, node) == node
        )

    # -- for the gateway ---------------------------------------------------------------------
    async def query(self, name: str, *args: Any) -> tuple[Any, ...]:
        """An event API query, answered as a node answers it: ("ok", result) or ("error",
        status, message)."""
        await self.ready()
        try:
            return ("ok", await asyncio.to_thread(self._answer, name, *args))
        except ApiError as e:
            return ("error", e.status, str(e.body.get("error")))

    def _answer(self, name: str, *args: Any) -> Any:
        return local_events.guarded(self.feature, QUERIES[name], *args)

    async def health(self) -> dict[str, Any]:
        await self.ready()
        return self.feature.health()

    async def stats(self) -> dict[str, Any]:
        """For the gateway's /metrics."""
        await self.ready()
        c = self.counts
        return {
            "deliveries": [[t, o, n] for (t, o), n in sorted(c.deliveries.items())],
            "outbox_size": c.outbox,
            "outbox_dropped": c.dropped,
            "batches": self.batches,
        }


def _same(ch: Change, known: Event) -> bool:
    """An update that the history already has (a batch sent again)."""
    a = ch.after
    return ch.type == "update" and (known.peak_coverage, known.peak_at) == (
        a.peak_coverage,
        a.peak_at,
    )


def _pair(jpeg: bytes, png: bytes) -> tuple[bytes, bytes]:
    return jpeg, png


def _default_store_exists() -> bool:
    return Path(default_url(home()).removeprefix("sqlite:///")).exists()


def start_events_hub(cfg: AppConfig) -> Any:
    """The hub actor: found by name if it runs, else created (detached, restarted by Ray
    whenever it dies, pinned to the head node, where its SQLite store lives)."""
    ray = runtime.ray_module()
    small = cfg.model_copy(update={"streams": []})
    actor = ray.remote(EventsHub).options(
        name=runtime.EVENTS_HUB_NAME,
        namespace=cfg.cluster.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=64,
        num_cpus=0,
        resources={"node:__internal_head__": 0.001},
    )
    handle = actor.remote(small.model_dump_json())
    ray.get(handle.ready.remote(), timeout=120)
    return handle
