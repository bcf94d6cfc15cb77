"""The events feature as the service uses it: one object per service that owns the zones and
rules of every stream, the store with its writer and pruner threads, and the alert targets.

The pipeline calls `on_mask` for each segmented frame (cheap; never blocks: writes and
deliveries happen on other threads and tasks); the service calls `set_stream` /
`remove_stream` when a stream's zones change or it goes, `health()` for /healthz, and
`close()` at shutdown. A store that cannot be opened leaves the feature in an error state
(coverage still computed, no events kept) while the streams keep playing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import sqlalchemy as sa

from segstream.stream.events.clips import ClipSet
from segstream.stream.events.config import EventsConfig, MqttConfig, WebhookConfig, ZoneConfig
from segstream.stream.events.delivery import OutboxTarget
from segstream.stream.events.model import Change, EndReason
from segstream.stream.events.mqtt import MqttTarget
from segstream.stream.events.observer import EventsObserver, NullEventsObserver
from segstream.stream.events.recorder import EventRecorder, Pruner, Recorder
from segstream.stream.events.rules import StreamRules
from segstream.stream.events.store import (
    EventStore,
    EventStoreError,
    default_media_dir,
    default_url,
    reason,
)
from segstream.stream.events.webhook import WebhookTarget
from segstream.stream.events.zones import ZoneCoverage, named

log = logging.getLogger(__name__)
Coverage = dict[str, dict[str, float]]  # zone -> class name -> fraction


class _Stream:
    def __init__(self, stream: str, update_interval_s: float) -> None:
        self.zones: list[ZoneConfig] = []
        self.coverage = ZoneCoverage()
        self.rules = StreamRules(stream, update_interval_s)
        self.last: Coverage = {}
        self.media_at: dict[str, float] = {}  # event id -> when its media was last taken
        self.lock = threading.Lock()


class EventsFeature:
    def __init__(
        self,
        cfg: EventsConfig,
        *,
        home: Path,
        labels: Sequence[str],
        mqtt: MqttConfig | None = None,
        webhooks: Sequence[WebhookConfig] = (),
        observer: EventsObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.labels = list(labels)
        self.observer = observer or NullEventsObserver()
        self.clock = clock
        url = cfg.database or default_url(home)
        media = Path(cfg.media_dir) if cfg.media_dir else default_media_dir(url, home)
        self.store = EventStore(url, media, cfg.outbox_max)
        self.error: str | None = None
        self.mqtt = MqttTarget(mqtt, self.store, self.observer) if mqtt else None
        self.targets: list[OutboxTarget] = [
            WebhookTarget(w, self.store, self.observer) for w in webhooks
        ]
        if self.mqtt is not None:
            self.targets.insert(0, self.mqtt)
        self.recorder: Recorder | None = None
        self.pruner: Pruner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: dict[str, _Stream] = {}
        # Event clips (record_clips): the service hands each such stream's sinks to it.
        self.clips = ClipSet(cfg.clips, lambda eid: self.store.media_path(eid, "clip"),
                             self._clip_done)  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (closing the events a crash left open), then start the writer, the
        pruner and the delivery targets. Never raises for a bad store: see health()."""
        try:
            await asyncio.to_thread(self.store.open, self.clock())
        except EventStoreError as e:
            self.error = str(e)
            log.error("%s; events are off, streams keep playing", e)
            return
        self.recorder = EventRecorder(self.store, self.observer, self._wake_targets)
        self.pruner = Pruner(
            self.store,
            self.observer,
            self.cfg.retain_days,
            self.cfg.max_bytes,
            self.cfg.prune_interval_s,
            self.clock,
        )
        try:
            for t in self.targets:
                await t.start()
        except sa.exc.SQLAlchemyError as e:
            self.error = f"event store: {reason(e)}"
            log.error("%s; alerts are off", self.error)
            return
        for t in self.targets:
            self._tasks.append(asyncio.create_task(t.run(), name=f"events-{t.name}"))

    async def close(self, drain_s: float = 2.0) -> None:
        """Close every open event (`shutdown`), write it, give the targets up to drain_s to
        deliver, then stop everything."""
        now = self.clock()
        for sid in list(self._streams):
            st = self._streams[sid]
            with st.lock:
                self._submit(st.rules.close_all(now, "shutdown"))
        await asyncio.to_thread(self.clips.close)  # their clips finished before the flush
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.flush, 5.0)
            await self._drain(drain_s)
            await asyncio.to_thread(self.recorder.close, 5.0)
        if self.pruner is not None:
            await asyncio.to_thread(self.pruner.close)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.store.close()

    async def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t in self.targets:
                if await asyncio.to_thread(self.store.outbox_after, t.cursor, 1):
                    break
            else:
                return
            await asyncio.sleep(0.05)

    def health(self) -> dict[str, Any]:
        """For /healthz: `error` with the reason when the store is unusable."""
        err = self.error or (self.recorder.error if self.recorder else None)
        out: dict[str, Any] = {"status": "error" if err else "ok"}
        if err:
            out["reason"] = err
        if self.mqtt is not None:
            out["mqtt"] = "connected" if self.mqtt.connected else "disconnected"
        return out

    def _wake_targets(self) -> None:
        for t in self.targets:
            t.wake()

    # -- streams -----------------------------------------------------------------------------

    def set_stream(self, stream: str, zones: Sequence[ZoneConfig]) -> None:
        """A stream's zones, applied live (events of removed zones end with zone_removed).
        Raises ValueError for a rule class that the model does not know."""
        unknown = sorted({r.class_name for z in zones for r in z.rules} - set(self.labels))
        if unknown:
            raise ValueError(f"unknown class in rules: {', '.join(unknown)}")
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _Stream(stream, self.cfg.update_interval_s)
        with st.lock:
            st.zones = list(zones)
            st.coverage.set_zones(zones)
            st.last = {z: c for z, c in st.last.items() if z in {zz.name for zz in zones}}
            self._submit(st.rules.set_zones(zones, self.clock()))
            if self.mqtt is not None:  # under the lock: no coverage of a removed zone after
                self.mqtt.set_zones(stream, zones)

    def remove_stream(self, stream: str, reason: EndReason = "stream_removed") -> None:
        self.clips.record(stream, None, ())  # its open clips finish with what they have
        st = self._streams.pop(stream, None)
        if st is None:
            return
        with st.lock:
            self._submit(st.rules.close_all(self.clock(), reason))
            if self.mqtt is not None:
                self.mqtt.set_zones(stream, [])

    def zones(self, stream: str) -> list[dict[str, Any]]:
        """The API's view: [{name, coverage: {class: ratio}, active: [class, ...]}]."""
        st = self._streams.get(stream)
        if st is None:
            return []
        with st.lock:
            active: dict[str, list[str]] = {}
            for ev in st.rules.open_events():
                active.setdefault(ev.zone, []).append(ev.class_name)
            return [
                {
                    "name": z.name,
                    "coverage": dict(st.last.get(z.name, {})),
                    "active": sorted(active.get(z.name, [])),
                }
                for z in st.zones
            ]

    # -- the pipeline's call -----------------------------------------------------------------

    def on_mask(
        self,
        stream: str,
        mask: np.ndarray,
        now: float | None = None,
        snapshot: Callable[[], bytes] | None = None,
    ) -> Coverage:
        """One segmented frame (uint8 HxW class ids): coverage per zone (classes that occur
        plus rule classes), rules, and the events' media. `snapshot` returns the frame's
        annotated JPEG; it is called only when an event takes media (new, or a peak, at most
        once per update_interval_s). Returns {} at once for a stream without zones."""
        st = self._streams.get(stream)
        if st is None or not st.zones:
            return {}
        now = self.clock() if now is None else now
        with st.lock:
            fractions = st.coverage.compute(mask)
            cov = {
                z.name: named(fractions[z.name], self.labels, [r.class_name for r in z.rules])
                for z in st.zones
            }
            st.last = cov
            changes = st.rules.update(cov, now)
            self._submit(changes)
            self._take_media(st, changes, mask, now, snapshot)
            for zone, values in cov.items():
                self.observer.zone_coverage(stream, zone, values)
                if self.mqtt is not None:
                    self.mqtt.coverage(stream, zone, values)
        return cov

    def _submit(self, changes: list[Change]) -> None:
        if changes and self.recorder is not None:
            self.recorder.submit(changes)
        self.clips.changes(changes)

    def _clip_done(self, event_id: str, path: Path, nbytes: int, truncated: bool) -> None:
        if self.recorder is not None:
            self.recorder.submit_clip(event_id, path, nbytes, truncated)
        else:
            path.unlink(missing_ok=True)

    def _take_media(
        self,
        st: _Stream,
        changes: list[Change],
        mask: np.ndarray,
        now: float,
        snapshot: Callable[[], bytes] | None,
    ) -> None:
        for ch in changes:
            if ch.type == "end":
                st.media_at.pop(ch.after.id, None)
        if snapshot is None or self.recorder is None:
            return
        due = [ch.after.id for ch in changes if ch.type == "new"]
        for ev in st.rules.open_events():
            last = st.media_at.get(ev.id)
            if last is not None and ev.peak_at == now and now - last >= self.cfg.update_interval_s:
                due.append(ev.id)
        if not due:
            return
        media = functools.partial(_media, snapshot(), mask.copy())
        for eid in dict.fromkeys(due):
            st.media_at[eid] = now
            self.recorder.submit_media(eid, media)


def _media(jpeg: bytes, mask: np.ndarray) -> tuple[bytes, bytes]:
    """The JPEG, and the class-id mask as a greyscale PNG (pixel value = class id); runs on
    the writer thread."""
    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise ValueError("PNG encoding failed")
    return jpeg, buf.tobytes()
