"""One stream's capture: the supervisor (state machine + watchdog) and its reader threads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import Frame, SourceState
from segstream.stream.lifecycle import RateMeter, backoff_delay, note_transition
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.sanitize import sanitize_url
from segstream.stream.sources.readers import Reader, reader_class
from segstream.stream.sources.slot import FrameSlot
from segstream.stream.sources.target import SourceError, Target, parse_target

log = logging.getLogger(__name__)

OPEN_GRACE_S = 1.5  # the watchdog allows the library's open_timeout this much slack
JOIN_S = 0.2  # how long to wait for a retiring reader before abandoning it
FPS_WINDOW_S = 2.0


@dataclass(frozen=True, slots=True)
class SourceStats:
    """A stream's capture, as VideoSource.stats() reads it at one moment."""

    id: str
    source: str  # sanitised: no credentials
    reader: str  # the reader chosen (`auto` until one is)
    state: str
    reason: str | None
    captured: int  # frames decoded
    dropped: int
    skipped: int
    unconverted: int
    reconnects: int
    consecutive_failures: int
    abandoned_readers: int
    fps_in: float  # decoded frames per second, over the last FPS_WINDOW_S
    width: int  # of the last frame converted; 0 before the first
    height: int
    source_fps: float | None  # the rate the source declares, if any
    last_frame_age_s: float | None

    def __getitem__(self, key: str) -> Any:
        """Read by field name too, as the dict it replaces was (scripts print it whole)."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Attempt:
    """One connection attempt: its reader thread reports here; the supervisor watches it."""

    def __init__(self, gen: int) -> None:
        self.gen = gen
        self.started = time.monotonic()
        self.opened: float | None = None
        self.last_frame: float | None = None
        self.frames = 0
        self.cancel = threading.Event()  # the supervisor has given up on this attempt
        self.outcome: tuple[str, str] | None = None  # ("failed" | "error" | "eof", reason)
        self.thread: threading.Thread | None = None
        self.reader: Reader | None = None
        self.paced_until: float | None = None  # a file's pacer holds the next read till then

    def last_seen(self) -> float | None:
        """The last sign of life: a frame, a compressed frame the reader skipped, or the end
        of a deliberate pause (keyframe-only decoding leaves a GOP between decoded frames,
        which a paced file waits out)."""
        data = self.reader.last_data if self.reader is not None else None
        signs = [t for t in (self.last_frame, data, self.paced_until) if t is not None]
        return max(signs) if self.last_frame is not None else None


class _Pacer:
    """Releases reads at a file's own frame rate; catches up by skipping ahead, not bursting."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.due = time.monotonic()

    def wait(self, cancel: threading.Event) -> None:
        now = time.monotonic()
        if self.due - now > 0:
            cancel.wait(self.due - now)
        elif now - self.due > 1.0:  # fell far behind (slow decode, suspend): start afresh
            self.due = now
        self.due += self.period


class VideoSource:
    """One stream's capture: reader thread -> FrameSlot, watched by a supervisor thread.

    `wanted()`, asked after each decoded frame: will somebody use this frame? False: the
    frame is not converted to BGR, not stored and counted as unconverted (the service asks
    the scheduler whether the stream is due; a stream that renders every frame always wants
    them). None: every frame is converted. `on_frame(id)` runs after each frame stored.

    `keyframes_only(keyframe_fps)`, asked by readers that can skip decoding (PyAV, gst) for each
    frame read: True decodes keyframes only (the service says so where nothing needs the
    frames between them); each frame not decoded is counted `undecoded` (not `captured`)."""

    def __init__(
        self,
        cfg: StreamConfig,
        *,
        on_frame: Callable[[str], None] | None = None,
        resolve: Callable[[str], str] | None = None,
        observer: Observer = NULL_OBSERVER,
        wanted: Callable[[], bool] | None = None,
        keyframes_only: Callable[[float], bool] | None = None,
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self._observer = observer
        self.slot = FrameSlot(cfg.id, observer)
        self._on_frame = on_frame
        self._wanted = wanted
        self._wanted_failed = False
        self._keyframes_only = keyframes_only
        self._keyframes_failed = False
        self._reader_name: str = cfg.reader  # `auto` until a reader is chosen
        self._resolve = resolve
        self._lock = threading.Lock()
        self._stop = threading.Event()  # this run's stop; set while not running
        self._stop.set()
        self._wake = threading.Event()  # reader -> supervisor: an attempt has ended
        self._supervisor: threading.Thread | None = None
        self._gen = 0  # only the reader of the current generation may publish
        self._seq = 0
        self._state = SourceState.STOPPED
        self._reason: str | None = None
        self._captured = self._reconnects = self._abandoned = self._failures = 0
        self._width = self._height = 0
        self._source_fps: float | None = None
        self._last_ts: float | None = None
        self._fps_in = RateMeter(FPS_WINDOW_S)
        self._on_frame_failed = False

    # -- public ----------------------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        with self._lock:
            return self._state

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self._reason

    def status(self) -> tuple[SourceState, str | None]:
        """State and reason, read together."""
        with self._lock:
            return self._state, self._reason

    def start(self) -> None:
        """Start capturing (no-op while running; restarts a source that stopped or failed)."""
        with self._lock:
            sup = self._supervisor
            if not self._stop.is_set() and sup is not None and sup.is_alive():
                return  # running
            # A fresh event per run: a supervisor that stop() left behind keeps seeing its
            # own run as stopped, even after this start.
            self._stop = threading.Event()
            self._failures = 0
            self._set_state(SourceState.STARTING, None)
            self._supervisor = threading.Thread(
                target=self._supervise,
                args=(self._stop,),
                name=f"src-{self.id}-watchdog",
                daemon=True,
            )
            self._supervisor.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop; returns within `timeout` even if a reader is stuck in a blocking call."""
        with self._lock:
            self._stop.set()
            self._gen += 1  # from now on no reader may publish
            self._set_state(SourceState.STOPPED, None)
        self._wake.set()
        sup = self._supervisor
        if sup is not None and sup is not threading.current_thread():
            sup.join(timeout)
            if sup.is_alive():
                log.warning("%s: supervisor still busy after %.1f s; abandoned", self.id, timeout)

    def stats(self) -> SourceStats:
        now = time.monotonic()
        fps_in = self._fps_in.rate()
        with self._lock:
            age = None if self._last_ts is None else round(now - self._last_ts, 3)
            return SourceStats(
                id=self.id,
                source=sanitize_url(self.cfg.source),
                reader=self._reader_name,
                state=self._state.value,
                reason=self._reason,
                captured=self._captured,
                dropped=self.slot.dropped,
                skipped=self.slot.skipped,
                unconverted=self.slot.unconverted,
                reconnects=self._reconnects,
                consecutive_failures=self._failures,
                abandoned_readers=self._abandoned,
                fps_in=round(fps_in, 2),
                width=self._width,
                height=self._height,
                source_fps=self._source_fps,
                last_frame_age_s=age,
            )

    # -- supervisor ------------------------------------------------------------------------

    def _supervise(self, stopped: threading.Event) -> None:
        try:
            target = parse_target(self.cfg.source, self._resolve)
        except SourceError as e:
            self._finish(SourceState.ERROR, str(e), stopped)
            return
        first = True
        while not stopped.is_set():
            if not first:
                with self._lock:
                    self._reconnects += 1
                self._observer.reconnect(self.id)
            first = False
            attempt = self._launch(target)
            outcome, reason = self._watch(attempt, stopped)
            self._retire(attempt)
            if outcome == "stop":
                return
            if outcome == "error":  # retrying cannot help (a missing local file)
                self._finish(SourceState.ERROR, reason, stopped)
                return
            if outcome == "eof":  # a file without loop
                self._finish(SourceState.STOPPED, reason, stopped)
                return
            if not self._after_failure(attempt, reason, stopped):
                return

    def _launch(self, target: Target) -> _Attempt:
        with self._lock:
            self._gen += 1
            attempt = _Attempt(self._gen)
        attempt.thread = threading.Thread(
            target=self._read_loop,
            args=(attempt, target),
            name=f"src-{self.id}-reader-{attempt.gen}",
            daemon=True,
        )
        attempt.thread.start()
        return attempt

    def _watch(self, a: _Attempt, stopped: threading.Event) -> tuple[str, str]:
        """Wait until the attempt ends, stalls or the source stops."""
        cfg = self.cfg
        while True:
            if stopped.is_set():
                return "stop", ""
            if a.outcome is not None:
                return a.outcome
            if (seen := a.last_seen()) is not None:
                deadline = seen + cfg.stall_timeout
                why = f"no frame for {cfg.stall_timeout:g} s (stalled)"
            elif a.opened is not None:
                deadline = a.opened + cfg.stall_timeout
                why = f"opened but no frame within {cfg.stall_timeout:g} s"
            else:
                deadline = a.started + cfg.open_timeout + OPEN_GRACE_S
                why = f"open did not return within {cfg.open_timeout:g} s"
            left = deadline - time.monotonic()
            if left <= 0:
                return "failed", why
            self._wake.wait(min(left, 1.0))
            self._wake.clear()

    def _retire(self, a: _Attempt) -> None:
        """Invalidate the attempt's generation, then let its reader go (or abandon it)."""
        with self._lock:
            if self._gen == a.gen:
                self._gen += 1
        a.cancel.set()
        if a.thread is not None:
            a.thread.join(JOIN_S)
            if a.thread.is_alive():
                with self._lock:
                    self._abandoned += 1
                log.warning("%s: reader %s is blocked; abandoned it", self.id, a.thread.name)

    def _after_failure(self, a: _Attempt, reason: str, stopped: threading.Event) -> bool:
        """Record the failure and wait out the backoff. False: stop trying."""
        with self._lock:
            self._failures = 0 if a.frames else self._failures + 1
            failures = self._failures
            give_up = 0 < self.cfg.max_failures <= failures
            if not stopped.is_set():
                self._set_state(SourceState.ERROR if give_up else SourceState.RECONNECTING, reason)
        if give_up:
            log.error("%s: giving up after %d failed attempts: %s", self.id, failures, reason)
            return False
        delay = backoff_delay(failures, self.cfg.reconnect_initial, self.cfg.reconnect_max)
        log.warning("%s: %s; reconnecting in %.1f s", self.id, reason, delay)
        return not stopped.wait(delay)

    def _finish(self, state: SourceState, reason: str | None, stopped: threading.Event) -> None:
        with self._lock:
            if not stopped.is_set():
                self._set_state(state, reason)
        if state is SourceState.ERROR:
            log.error("%s: %s", self.id, reason)

    def _set_state(self, state: SourceState, reason: str | None) -> None:
        """Caller holds self._lock."""
        reason = note_transition(log, f"{self.id}:", self._state, state, reason)
        self._state, self._reason = state, reason
        self._observer.state_changed(self.id, state, reason)

    # -- reader thread ---------------------------------------------------------------------

    def _read_loop(self, a: _Attempt, target: Target) -> None:
        reader = reader_class(self.cfg.reader, target)(target, self.cfg)
        if reader.can_skip_frames and self._keyframes_only is not None:
            reader.keyframes_only = self._keys_only
        a.reader = reader
        undecoded = 0
        with self._lock:
            if self._gen == a.gen:
                self._reader_name = reader.name
        try:
            reader.open()
            a.opened = time.monotonic()
            with self._lock:
                if self._gen == a.gen:
                    self._source_fps = reader.fps
            pacer = None
            if target.kind == "file" and self.cfg.realtime:
                pacer = _Pacer(reader.fps or 25.0)
            since_open = 0
            while not a.cancel.is_set():
                if pacer is not None:
                    a.paced_until = pacer.due
                    pacer.wait(a.cancel)
                    if a.cancel.is_set():
                        break
                decode_s = reader.grab()
                if reader.undecoded > undecoded:
                    self._count_undecoded(reader.undecoded - undecoded, pacer)
                    undecoded = reader.undecoded
                if decode_s is None:
                    if target.live:
                        raise SourceError("stream ended (EOF): the server closed it")
                    if not self.cfg.loop:
                        self._report(a, "eof", "end of file")
                        return
                    if since_open == 0:
                        raise SourceError("file has no decodable frames", permanent=True)
                    reader.close()  # loop: reopen rather than seek, which some formats lack
                    reader.open()
                    since_open = 0
                    continue
                since_open += 1
                if not self._publish(a, reader, decode_s):
                    return
        except SourceError as e:
            self._report(a, "error" if e.permanent else "failed", str(e))
        except Exception as e:  # never let a library surprise escape the thread
            log.exception("%s: reader crashed", self.id)
            self._report(a, "failed", f"reader crashed: {type(e).__name__}: {e}")
        finally:
            try:
                reader.close()
            except Exception:
                log.exception("%s: closing the reader failed", self.id)

    def _report(self, a: _Attempt, outcome: str, reason: str) -> None:
        a.outcome = (outcome, reason)
        self._wake.set()

    def _keys_only(self, keyframe_fps: float) -> bool:
        assert self._keyframes_only is not None
        try:
            return bool(self._keyframes_only(keyframe_fps))
        except Exception:  # a broken hook must not cost frames: decode them all
            if not self._keyframes_failed:
                log.exception("%s: keyframes_only() failed; decoding every frame", self.id)
                self._keyframes_failed = True
            return False

    def _count_undecoded(self, n: int, pacer: _Pacer | None) -> None:
        if pacer is not None:
            pacer.due += n * pacer.period  # a file plays at its own rate, decoded or not
        for _ in range(n):
            self._observer.frame(self.id, "undecoded")

    def _wants(self) -> bool:
        if self._wanted is None:
            return True
        try:
            return bool(self._wanted())
        except Exception:  # a broken hook must not cost frames: convert them all
            if not self._wanted_failed:
                log.exception("%s: wanted() failed; converting every frame", self.id)
                self._wanted_failed = True
            return True

    def _publish(self, a: _Attempt, reader: Reader, decode_s: float) -> bool:
        """Count a decoded frame and, if somebody wants it, convert it and put it in the slot,
        provided this reader is still current. False: stop reading."""
        ts = time.monotonic()  # capture time: the frame is decoded (conversion comes after)
        frame: Frame | None = None
        size: tuple[int, int] = (0, 0)
        convert_s = 0.0
        if self._wants():
            t0 = time.thread_time()
            later = reader.deferred()
            if later is not None:
                frame = Frame(None, 0, ts, decode_s, convert=later.convert)
                size = (later.height, later.width)
            else:
                image = reader.retrieve()
                frame, size = Frame(image, 0, ts, decode_s), (image.shape[0], image.shape[1])
            convert_s = time.thread_time() - t0  # deferred: the copy of the decoded bytes
            frame.decode_s += convert_s
        with self._lock:
            if self._gen != a.gen:
                return False
            self._seq += 1  # every decoded frame has its number, converted or not
            a.frames += 1
            a.last_frame = ts
            self._captured += 1
            self._last_ts = ts
            self._fps_in.tick(ts)
            if self._state is not SourceState.LIVE:
                self._failures = 0
                self._set_state(SourceState.LIVE, None)
            # Inside the lock: once stop() or the watchdog has moved the generation on,
            # no frame of this reader can reach the slot.
            if frame is not None:
                self._height, self._width = size
                frame.seq = self._seq
                self.slot.put(frame)
        self._observer.frame(self.id, "captured")
        self._observer.stage("decode", decode_s)
        if frame is None:
            self.slot.pass_over()
            return True
        if frame.converted:  # a deferred conversion is reported by whoever runs it
            self._observer.stage("convert", convert_s)
        if self._on_frame is not None:
            try:
                self._on_frame(self.id)
            except Exception:
                if not self._on_frame_failed:
                    log.exception("%s: on_frame callback failed", self.id)
                    self._on_frame_failed = True
        return True
