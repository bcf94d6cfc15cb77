"""What the pipeline's long-running parts share: retry backoff with jitter, logged state
transitions, and event-rate meters. Readers, the re-stream and the render stage use these
one copy each, so a retry or a rate means the same thing everywhere."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque

from segstream.stream.datatypes import SourceState
from segstream.stream.sanitize import sanitize_text


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after `failures` failures in a row: `initial` doubling per failure,
    capped at `maximum`, with +-20 % jitter (many streams failing together spread out)."""
    delay = min(initial * 2 ** max(failures - 1, 0), maximum)
    return min(delay * random.uniform(0.8, 1.2), maximum)


def note_transition(
    log: logging.Logger,
    who: str,
    old: SourceState,
    new: SourceState,
    reason: str | None,
) -> str | None:
    """Logs a change of state (`who`: "cam" or "cam: restream") and returns the reason
    sanitised (it may quote a URL with credentials), as it is to be stored and reported."""
    reason = None if reason is None else sanitize_text(reason)
    if new is not old:
        log.info("%s %s -> %s%s", who, old.value, new.value, f" ({reason})" if reason else "")
    return reason


class RateMeter:
    """Events per second over a sliding window; cheap enough to call per frame, from any
    thread (a stage thread ticks, the event loop reads)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self._window = window_s
        self._events: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        """One event, at `now` (time.monotonic(); default: the present)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append(now)
            self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if len(self._events) < 2:
                return 0.0
            return (len(self._events) - 1) / max(now - self._events[0], 1e-6)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0] > self._window:
            self._events.popleft()
