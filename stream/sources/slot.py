"""The latest-wins slot between a stream's reader thread and the scheduler."""

from __future__ import annotations

import threading

from segstream.stream.datatypes import Frame
from segstream.stream.observer import NULL_OBSERVER, Observer


class FrameSlot:
    """Latest frame wins; thread-safe; never a queue.

    Every frame put here ends up counted exactly once: *taken* by the consumer, *skipped*
    (the consumer saw it and chose not to process it: mark_skipped), or *dropped*
    (overwritten before anyone took or skipped it). The newest frame is *pending* until one
    of those happens, so at any moment puts == taken + skipped + dropped + pending.
    Dropped and skipped frames are also reported to the observer. Frames the reader decoded
    but did not convert, because nobody would have taken them, never come here: they are
    counted as *unconverted* (pass_over), so every decoded frame is in exactly one bin:
    puts + unconverted == taken + skipped + dropped + unconverted + pending.
    """

    def __init__(self, stream_id: str = "", observer: Observer = NULL_OBSERVER) -> None:
        self._stream_id = stream_id
        self._observer = observer
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._pending = False  # the current frame is neither taken nor skipped
        self.puts = self.taken = self.skipped = self.dropped = self.unconverted = 0

    def put(self, frame: Frame) -> Frame | None:
        """Store `frame`; return the overwritten frame if nobody took or skipped it (a drop)."""
        with self._lock:
            old = self._frame if self._pending else None
            self._frame, self._pending = frame, True
            self.puts += 1
            if old is not None:
                self.dropped += 1
        if old is not None:
            self._observer.frame(self._stream_id, "dropped")
        return old

    def take(self, after_seq: int = 0) -> Frame | None:
        """The newest frame if it is pending and newer than `after_seq`; marks it taken."""
        with self._lock:
            f = self._frame
            if f is None or not self._pending or f.seq <= after_seq:
                return None
            self._pending = False
            self.taken += 1
            return f

    def peek(self) -> Frame | None:
        return self._frame

    def mark_skipped(self, seq: int) -> bool:
        """The consumer saw frame `seq` and skipped it: count it skipped, not dropped.

        False if that frame is no longer the pending one (already taken, skipped or dropped)."""
        with self._lock:
            f = self._frame
            if f is None or not self._pending or f.seq != seq:
                return False
            self._pending = False
            self.skipped += 1
        self._observer.frame(self._stream_id, "skipped")
        return True

    def pending_age(self, now: float) -> float | None:
        """Seconds since the capture of the frame waiting to be taken; None if none waits."""
        with self._lock:
            f = self._frame
            return None if f is None or not self._pending else now - f.capture_ts

    def pass_over(self) -> None:
        """A frame was decoded and not converted (the consumer would not have taken it): it
        is counted here as unconverted and never stored; the pending frame stays as it is."""
        with self._lock:
            self.unconverted += 1
        self._observer.frame(self._stream_id, "unconverted")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "puts": self.puts,
                "taken": self.taken,
                "skipped": self.skipped,
                "dropped": self.dropped,
                "pending": int(self._pending),
                "unconverted": self.unconverted,
            }
