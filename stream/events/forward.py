"""Cluster mode, on a node: the events feature computes coverage and rules exactly as on one
node (the node has the masks), but keeps no store and runs no alert target. Every change, the
media of its peak frame, the zones of each stream (its claim) and the zones' coverage go to
the cluster's one events hub (stream.cluster.events_hub), which stores, serves and publishes
them; so nothing is published twice, whichever node a stream runs on.

The pipeline never waits on the hub: `HubForwarder` puts work on a bounded queue (when the hub
is away so long that it fills, the oldest changes and media are dropped and counted; claims
are kept) and one thread sends it in order, in batches, retrying with capped backoff. The hub
takes a batch again without harm (it drops what it already has), so a retry after a lost
answer duplicates nothing."""

from __future__ import annotations

import collections
import itertools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segstream.stream.events.config import EventsConfig, ZoneConfig
from segstream.stream.events.feature import EventsFeature
from segstream.stream.events.model import Change
from segstream.stream.events.mqtt import MqttTarget
from segstream.stream.events.observer import EventsObserver
from segstream.stream.events.recorder import MediaFn

log = logging.getLogger(__name__)
RETRY_INITIAL_S, RETRY_MAX_S = 0.2, 5.0
BATCH_ITEMS = 64
COVERAGE_INTERVAL_S = 1.0  # the hub rate-limits the MQTT coverage again (coverage_interval_s)


# -- what travels to the hub (pickled by Ray) ---------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """The stream runs on this node with these zones (JSON, by alias); `release`: it no
    longer runs here (removed, or moved away)."""

    stream: str
    zones: list[dict[str, Any]]
    release: bool = False
    at: float = 0.0  # wall clock of the claim: a stale claim (sent late) loses to a newer one


@dataclass(frozen=True)
class Changes:
    changes: list[Change]


@dataclass
class Media:
    event_id: str
    make: MediaFn | None  # encoded on the forwarder's thread, once
    jpeg: bytes = b""
    png: bytes = b""


@dataclass
class Clip:
    """A finished event clip: the file on the node until it is sent (read then, once), its
    bytes on the way; the node's file goes once the hub has it (or it is dropped)."""

    event_id: str
    path: str
    truncated: bool
    data: bytes = b""


Item = Claim | Changes | Media | Clip


@dataclass(frozen=True)
class Batch:
    node: str  # the node service's instance id (a restarted one is another node)
    items: list[Item]
    coverage: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)


Send = Callable[[Batch], str]  # -> the hub's instance id; raises when it did not take it


@dataclass
class _Flush:
    done: threading.Event


class HubForwarder:
    """The events feature's Recorder on a cluster node (stream.events.recorder.Recorder):
    the same calls, forwarded to the hub."""

    def __init__(
        self,
        send: Send,
        node: str,
        observer: EventsObserver,
        max_items: int = 10_000,
        max_media: int = 200,
    ) -> None:
        self.send, self.node, self.observer = send, node, observer
        self.max_items, self.max_media = max_items, max_media
        self.error: str | None = None
        self.dropped = 0  # changes and media dropped to keep the queue bounded
        self.connected = False
        self.hub: str | None = None  # the hub instance that took our last batch
        self.claims: dict[str, Claim] = {}  # to claim again at a new hub
        self._items: collections.deque[tuple[int, Item | _Flush]] = collections.deque()
        self._media = 0
        self._coverage: dict[tuple[str, str], dict[str, float]] = {}
        self._coverage_at = 0.0
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._sender: threading.Thread | None = None

    def start(self) -> None:
        if self._sender is None:
            self._sender = threading.Thread(target=self._run, name="events-forward", daemon=True)
            self._sender.start()

    # -- the Recorder's calls (any thread, never block) -------------------------------------
    def submit(self, changes: Sequence[Change]) -> None:
        if changes:
            self._add(Changes(list(changes)))
            for ch in changes:
                if ch.type == "new":
                    self.observer.event_opened(ch.after.stream, ch.after.zone, ch.after.class_name)

    def submit_media(self, event_id: str, media: MediaFn) -> None:
        self._add(Media(event_id, media))

    def submit_clip(self, event_id: str, path: Path, nbytes: int, truncated: bool) -> None:
        self._add(Clip(event_id, str(path), truncated))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far has reached the hub."""
        done = threading.Event()
        with self._cond:
            self._items.append((next(self._seq), _Flush(done)))
            self._cond.notify()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._sender is not None:
            self._sender.join(timeout)

    # -- from the feature's MQTT relay -------------------------------------------------------
    def claim(self, stream: str, zones: Sequence[ZoneConfig], release: bool = False) -> None:
        """A stream's zones here (release: it left this node). A stream that never had zones
        here is not claimed: a cluster without zones makes the hub write nothing."""
        dumped = [z.model_dump(mode="json", by_alias=True) for z in zones]
        claim = Claim(stream, dumped, release, time.time())
        with self._cond:
            had = stream in self.claims
            if dumped and not release:
                self.claims[stream] = claim
            else:
                self.claims.pop(stream, None)
                for key in [k for k in self._coverage if k[0] == stream]:
                    del self._coverage[key]
        if dumped or had:
            self._add(claim)

    def coverage(self, stream: str, zone: str, values: dict[str, float]) -> None:
        with self._cond:
            self._coverage[(stream, zone)] = dict(values)

    # -- the queue ---------------------------------------------------------------------------
    def _add(self, item: Item) -> None:
        with self._cond:
            self._items.append((next(self._seq), item))
            if isinstance(item, Media | Clip):
                self._media += 1
            self._bound()
            self._cond.notify()

    def _bound(self) -> None:
        """Drop the oldest changes or media (never a claim) while over a bound."""
        while len(self._items) > self.max_items or self._media > self.max_media:
            only_media = len(self._items) <= self.max_items
            for i, (_, it) in enumerate(self._items):
                if isinstance(it, Media | Clip) or (isinstance(it, Changes) and not only_media):
                    del self._items[i]
                    self._media -= isinstance(it, Media | Clip)
                    if isinstance(it, Clip):
                        Path(it.path).unlink(missing_ok=True)
                    self.dropped += 1
                    self.observer.outbox_dropped(1)  # the node's outbox_dropped_total
                    log.warning("events hub away: oldest %s dropped", type(it).__name__)
                    break
            else:
                return

    def _next(self) -> tuple[int, list[Item], dict[tuple[str, str], dict[str, float]]] | None:
        """Under the lock: (last seq, items, coverage) to send now, or None."""
        while self._items and isinstance(self._items[0][1], _Flush):
            flush = self._items.popleft()[1]
            assert isinstance(flush, _Flush)
            flush.done.set()
        items: list[Item] = []
        last = -1
        clips = 0
        for seq, it in self._items:
            if isinstance(it, _Flush) or len(items) >= BATCH_ITEMS:
                break
            clips += isinstance(it, Clip)
            if clips > 1:
                break  # one clip's bytes (up to max_s of video) in memory at a time
            items.append(it)
            last = seq
        due = self._coverage and time.monotonic() - self._coverage_at >= COVERAGE_INTERVAL_S
        if not items and not due:
            return None
        cov, self._coverage = (self._coverage, {}) if due else ({}, self._coverage)
        return last, items, cov

    def _sent(self, last: int) -> None:
        while self._items and self._items[0][0] <= last:
            _, it = self._items.popleft()
            self._media -= isinstance(it, Media | Clip)
            if isinstance(it, Clip):
                Path(it.path).unlink(missing_ok=True)  # the hub has its copy

    def _run(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            with self._cond:
                work = self._next()
                while work is None and not self._stopping:
                    self._cond.wait(COVERAGE_INTERVAL_S)
                    work = self._next()
                if work is None:
                    return
            last, items, cov = work
            try:
                self._encode(items)
                hub = self.send(Batch(self.node, items, cov))
            except Exception as e:
                self._failed(e, cov, delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_INITIAL_S
            self.error, self.connected = None, True
            with self._cond:
                self._sent(last)
                if cov:
                    self._coverage_at = time.monotonic()
                if self.hub is not None and hub != self.hub:
                    self._claim_again()
                self.hub = hub

    def _failed(
        self, e: Exception, cov: dict[tuple[str, str], dict[str, float]], delay: float
    ) -> None:
        self.error = f"events hub unreachable: {type(e).__name__}: {str(e)[:200]}"
        self.connected = False
        log.warning("%s; retrying in %.1fs", self.error, delay)
        with self._cond:
            for key, values in cov.items():  # newer values win
                self._coverage.setdefault(key, values)
            if not self._stopping:
                self._cond.wait(delay)

    def _claim_again(self) -> None:
        """A new hub instance (it restarted): it knows nothing of our streams' zones."""
        first = self._items[0][0] if self._items else next(self._seq)
        for i, claim in enumerate(reversed(list(self.claims.values()))):
            self._items.appendleft((first - 1 - i, claim))  # seqs still ascend

    @staticmethod
    def _encode(items: list[Item]) -> None:
        for it in items:
            if isinstance(it, Media) and it.make is not None:
                it.jpeg, it.png = it.make()
                it.make = None
            elif isinstance(it, Clip) and not it.data:
                try:
                    it.data = Path(it.path).read_bytes()
                except OSError as e:  # gone (a cleared temp dir): the event keeps no clip
                    log.warning("event %s: clip unreadable, not forwarded: %s", it.event_id, e)


class _HubRelay(MqttTarget):
    """Stands where the feature keeps its MQTT target: zones (claims) and coverage go to the
    hub, which publishes them (no MQTT connection on a node)."""

    def __init__(self, forwarder: HubForwarder, runs: Callable[[str], bool]) -> None:
        self.forwarder, self.runs = forwarder, runs
        self.connected = False

    def set_zones(self, stream: str, zones: Sequence[ZoneConfig]) -> None:
        # The feature calls this with no zones when the stream goes (it is then no longer
        # among its streams): a release, so that a move does not clear what the new node
        # claimed.
        self.forwarder.claim(stream, zones, release=not zones and not self.runs(stream))

    def coverage(self, stream: str, zone: str, values: dict[str, float]) -> None:
        self.forwarder.coverage(stream, zone, values)


class ForwardingEventsFeature(EventsFeature):
    """EventsFeature on a cluster node: coverage, rules and media here; store, API and alerts
    at the hub."""

    def __init__(
        self,
        cfg: EventsConfig,
        *,
        labels: Sequence[str],
        send: Send,
        node: str,
        observer: EventsObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # No store is ever opened here: the feature's store object stays closed. Clips are
        # recorded in a private folder and leave it for the hub (Clip).
        self.clip_dir = Path(tempfile.mkdtemp(prefix="segstream-node-clips-"))
        local = cfg.model_copy(update={"database": None, "media_dir": str(self.clip_dir)})
        super().__init__(
            local,
            home=self.clip_dir,
            labels=labels,
            mqtt=None,
            observer=observer,
            clock=clock,
        )
        self.forwarder = HubForwarder(
            send, node, self.observer, max_items=cfg.outbox_max, max_media=200
        )
        self.mqtt = _HubRelay(self.forwarder, lambda s: s in self._streams)

    async def start(self) -> None:
        self.forwarder.start()
        self.recorder = self.forwarder

    async def close(self, drain_s: float = 2.0) -> None:
        await super().close(drain_s)  # clips finished and forwarded (the flush) first
        shutil.rmtree(self.clip_dir, ignore_errors=True)

    def health(self) -> dict[str, Any]:
        err = self.forwarder.error
        return {"status": "error", "reason": err} if err else {"status": "ok"}
