"""The store's writer and pruner threads: the pipeline hands changes over and never waits.

`submit` and `submit_media` put work on a bounded queue (dropped and logged when the store is
stuck so long that it fills: the pipeline must not block); one writer thread applies it in
order, each batch of changes with its outbox rows in one transaction, then wakes the delivery
targets. The pruner enforces retention on its own thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from segstream.stream.events.model import Change
from segstream.stream.events.observer import EventsObserver
from segstream.stream.events.store import EventStore, reason

log = logging.getLogger(__name__)
RETRY_INITIAL_S, RETRY_MAX_S = 0.1, 5.0
MediaFn = Callable[[], tuple[bytes, bytes]]  # -> (annotated JPEG, class-mask PNG)
_Job = tuple[str, object]


class Recorder(Protocol):
    """Where the events feature hands its changes, media and finished clips, from any thread
    and without waiting: the store's writer (EventRecorder) on a single node, the forwarder
    to the cluster's events hub (stream.events.forward.HubForwarder) on a cluster node."""

    error: str | None  # the last failure, for /healthz
    dropped: int  # work dropped to stay bounded

    def submit(self, changes: Sequence[Change]) -> None: ...

    def submit_media(self, event_id: str, media: MediaFn) -> None: ...

    def submit_clip(self, event_id: str, path: Path, nbytes: int, truncated: bool) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool: ...

    def close(self, timeout: float = 10.0) -> None: ...


class EventRecorder:
    """The Recorder that writes to the store: one writer thread, a bounded queue."""

    def __init__(
        self,
        store: EventStore,
        observer: EventsObserver,
        on_written: Callable[[], None] = lambda: None,
        max_pending: int = 10_000,
    ) -> None:
        self.store = store
        self.observer = observer
        self.on_written = on_written  # thread-safe wake-up of the delivery targets
        self.error: str | None = None  # the last write failure, for /healthz
        self.dropped = 0
        self._q: queue.Queue[_Job | None] = queue.Queue(max_pending)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events-writer", daemon=True)
        self._thread.start()

    def submit(self, changes: Sequence[Change]) -> None:
        if changes:
            self._put(("changes", list(changes)))
            for ch in changes:
                if ch.type == "new":
                    self.observer.event_opened(ch.after.stream, ch.after.zone, ch.after.class_name)

    def submit_media(self, event_id: str, media: MediaFn) -> None:
        """`media` runs on the writer thread (encoding off the pipeline's thread)."""
        self._put(("media", (event_id, media)))

    def submit_clip(self, event_id: str, path: Path, nbytes: int, truncated: bool) -> None:
        """An event's clip is finished, at `path` in the store's media folder (named in the
        store after the event's own rows: same queue)."""
        self._put(("clip", (event_id, nbytes, truncated)))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (tests, shutdown)."""
        done = threading.Event()
        self._put(("flush", done))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (a job failing for want of a database is abandoned)."""
        self._q.put(None)
        self._thread.join(timeout)
        self._closing.set()
        self._thread.join(1.0)

    def _put(self, job: _Job) -> None:
        try:
            self._q.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            log.error("event store is not keeping up: %s dropped", job[0])

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            delay = RETRY_INITIAL_S
            while True:
                try:
                    self._do(*job)
                    self.error = None
                    break
                except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
                    # The database is away (server down, locked, disk full): keep this job
                    # and retry; what comes meanwhile waits in the bounded queue.
                    self.error = f"event store unavailable: {reason(e)}"
                    log.warning("%s; retrying in %.1fs", self.error, delay)
                    if self._closing.wait(delay):
                        break
                    delay = min(delay * 2, RETRY_MAX_S)
                except Exception as e:
                    self.error = f"event store write failed: {reason(e)}"
                    log.exception("event store write failed")
                    break

    def _do(self, kind: str, arg: object) -> None:
        if kind == "changes":
            assert isinstance(arg, list)
            size, dropped = self.store.apply(arg)
            self.observer.outbox_size(size)
            if dropped:
                self.observer.outbox_dropped(dropped)
                log.warning("event outbox full: %d oldest changes dropped", dropped)
            self.on_written()
        elif kind == "media":
            assert isinstance(arg, tuple)
            event_id, media = arg
            self.store.save_media(event_id, *media())
        elif kind == "clip":
            assert isinstance(arg, tuple)
            self.store.save_clip(*arg)
        elif kind == "flush":
            assert isinstance(arg, threading.Event)
            arg.set()


class Pruner:
    """Runs store.prune every interval_s on its own thread (and trims delivered outbox rows)."""

    def __init__(
        self,
        store: EventStore,
        observer: EventsObserver,
        retain_days: float,
        max_bytes: int,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.observer, self.clock = store, observer, clock
        self.retain_days, self.max_bytes, self.interval_s = retain_days, max_bytes, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events-pruner", daemon=True)
        self._thread.start()

    def run_once(self) -> int:
        n = self.store.prune(self.clock(), self.retain_days, self.max_bytes)
        self.observer.outbox_size(self.store.trim_delivered())
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if n := self.run_once():
                    log.info("event retention: %d events pruned", n)
            except Exception:
                log.exception("event pruning failed")
