"""Scheduler stage: frame skipping (per-stream inference rate caps) and cross-stream batching.

The model worker calls `next_batch()`, which returns the newest due frame of up to `max_batch`
streams: gate checks first (below), then the lanes that waited the most periods since their
last frame was taken (round-robin among equals), so none starves and, when the model cannot
serve every cap, each lane gets the same fraction of what it asks for. A partial batch waits
at most `max_wait` for other streams' frames. With `latency_target` set, a controller keeps
the p95 end-to-end latency under the target: a frame waits for the batch in flight and then
for its own, so the batch size is the first lever (halved while over target); only at batch
1 are the streams' rate caps cut (AIMD, one shared cap: the model is shared fairly). When
latency is well under the target, rates come back first, then the batch size.

A capped stream takes the first frame that arrives once it is due (a frame seen before then is
skipped), so a reader can ask `due_soon(stream)` right after decoding a frame and convert it
only if the answer is yes: the scheduler would skip it otherwise. A lane counts as due
DUE_EARLY_S before its due time, both for that question and for the scan that follows it
(after the conversion), so the two always agree: a frame converted because it was due is
taken, and the frame the scheduler would have taken is never left unconverted.

Motion gating (a stream's `gate`): a frame taken for a gated stream first goes through a
ChangeDetector (a small grey thumbnail against the last inferred frame's, about 1 ms); when
the scene has not changed and the last inference is younger than `refresh_s`, the frame is
counted `unchanged` and goes no further: the last mask stands, and the lane waits for its next
due time. The check runs outside the scheduler's lock, on the model worker that took the
frame (which would have converted it anyway). Unchanged frames do not count as inferred for
the rate controller, so the model time they free goes to the streams that move. A lane whose
last check saw no change goes before every inference (its next frame is most likely another
1 ms check), so under overload still scenes are still checked at their cap; an unchanged
scene's refresh waits while a lane needing the model is more periods overdue (refresh_s
being its period), so refreshes take their proportional share, not the whole model. How
long a gated stream has been still (`still_since`) lets the service decode its keyframes only
(`gate.still_keyframes`, see service.keyframes_suffice)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from segstream.stream.datatypes import Frame, Job, SourceState
from segstream.stream.motion import ChangeDetector
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.sources import FrameSlot

# A lane is due this long before its due time. Covers the few milliseconds between a reader's
# due_soon() and the scan that sees the converted frame; the long-run rate stays exact, since
# the next due time follows from the last one, not from when the frame was taken.
DUE_EARLY_S = 0.01
# How many frames a second an uncapped lane counts as asking for when lanes are ordered by
# how overdue they are (_Lane.urgency): a camera's usual rate.
UNCAPPED_FPS = 15.0


class Schedulable(Protocol):
    id: str
    slot: FrameSlot

    @property
    def state(self) -> SourceState: ...


@dataclass
class _Lane:
    """Scheduling state of one stream."""

    source: Schedulable
    base_fps: float  # configured cap; 0 = unlimited
    cap_fps: float  # current cap (adaptive); 0 = unlimited
    next_due: float = 0.0
    last_seq: int = 0
    skipped_seq: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    gate: _Gate | None = None  # motion gating; None = every taken frame is inferred
    taken_ts: float = float("-inf")  # when a frame was last taken

    def due(self, now: float) -> bool:
        return self.cap_fps <= 0 or now + DUE_EARLY_S >= self.next_due

    def advance(self, now: float) -> None:
        if self.cap_fps > 0:
            period = 1.0 / self.cap_fps
            # Keep the long-run rate exact despite arrival jitter, without bursting after a pause.
            self.next_due = max(self.next_due + period, now - period)

    def fresh(self) -> Frame | None:
        """The slot's newest frame if this lane has neither taken nor skipped it yet."""
        frame = self.source.slot.peek()
        seen = max(self.last_seq, self.skipped_seq)
        return frame if frame is not None and frame.seq > seen else None

    def urgency(self, now: float) -> float:
        """How many periods the lane has waited since its last frame was taken (inf: none
        yet). Under overload every lane is due; serving the largest first gives each lane the
        same share of what it asks for."""
        return (now - self.taken_ts) * (self.cap_fps if self.cap_fps > 0 else UNCAPPED_FPS)

    def cheap(self) -> bool:
        """Whether its next frame is most likely only a gate check (about 1 ms, no model):
        gated, with a reference, and the last frame checked did not change. Such frames go
        first: behind inferences a still lane would wait for the model like a moving one, and
        under overload it would then never be checked within refresh_s (every check a
        refresh inference, no verdict ever still)."""
        return self.gate is not None and self.gate.detector_seq > 0 and not self.gate.moving


class _Gate:
    """One lane's change detector and when it last let a frame through. Its own lock: two
    model workers may check frames of the same lane at once."""

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.detector = ChangeDetector()
        self.last_inferred = float("-inf")
        self.detector_seq = 0  # the reference frame's
        self.changed_ts: float | None = None  # capture time of the last frame judged changed
        self.still = False  # the last frame checked was unchanged
        self.moving = False  # the last frame checked changed against a reference
        self.lock = threading.Lock()

    def admit(self, job: Job, defer: Callable[[float], bool] = lambda _: False) -> bool:
        """Whether the job's frame goes to the model (then it becomes the reference). Time is
        the frames' capture time: refresh_s holds in the camera's time, whatever the delays.
        A refresh is checked too (about 1 ms, once per refresh_s): the verdict says whether
        the scene is still (Scheduler.still_since). An unchanged scene's refresh is skipped
        while `defer(periods overdue)` says other lanes need the model more."""
        now = job.frame.capture_ts
        thumb = self.detector.thumbnail(job.frame.image)
        with self.lock:
            if job.frame.seq <= self.detector_seq:
                return True  # an older frame than the reference (another worker's): no gate
            changed = self.detector.check(thumb).changed
            self.still = not changed
            self.moving = changed and self.detector_seq > 0
            if changed:
                self.changed_ts = now
            stale = now - self.last_inferred >= self.refresh_s
            if not changed and (not stale or defer((now - self.last_inferred) / self.refresh_s)):
                return False
            self.detector.reference, self.detector_seq = thumb, job.frame.seq
            self.last_inferred = now
            return True


class Scheduler:
    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_s: float,
        latency_target_s: float = 0.0,
        min_fps: float = 1.0,
        control_period_s: float = 1.0,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self._observer = observer
        self.max_batch = max_batch
        self.batch_cap = max_batch  # adaptive under a latency target
        self.max_wait_s = max_wait_s
        self.latency_target_s = latency_target_s
        self.min_fps = min_fps
        self.control_period_s = control_period_s
        self._lanes: dict[str, _Lane] = {}
        self._order: list[str] = []
        self._rr = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._next_control = time.monotonic() + control_period_s
        self._inferred: dict[str, int] = {}

    def set_max_batch(self, max_batch: int) -> None:
        """Known once the model's runtime is (see runner.plan_workers)."""
        with self._cond:
            self.max_batch = self.batch_cap = max(1, max_batch)
            self._observer.batch_limit(self.batch_cap)

    # -- streams ---------------------------------------------------------------------------
    def add(self, source: Schedulable, infer_fps: float, gate_s: float | None = None) -> None:
        """`gate_s`: motion gating with that refresh period (seconds); None = off."""
        with self._cond:
            gate = _Gate(gate_s) if gate_s is not None else None
            self._lanes[source.id] = _Lane(source, infer_fps, infer_fps, gate=gate)
            self._order.append(source.id)
            self._inferred[source.id] = 0
            self._observer.infer_fps_limit(source.id, infer_fps)
            self._cond.notify()

    def remove(self, stream_id: str) -> None:
        """Drops the stream's lane; a batch already taken still completes."""
        with self._cond:
            self._lanes.pop(stream_id, None)
            if stream_id in self._order:
                self._order.remove(stream_id)
            self._inferred.pop(stream_id, None)
            self._rr = self._rr % len(self._order) if self._order else 0

    def set_rate(self, stream_id: str, infer_fps: float) -> None:
        """A new configured cap for one stream, applied at once."""
        with self._cond:
            lane = self._lanes.get(stream_id)
            if lane is None:
                return
            lane.base_fps = lane.cap_fps = infer_fps
            lane.next_due = 0.0
            self._observer.infer_fps_limit(stream_id, infer_fps)
            self._cond.notify()

    def set_gate(self, stream_id: str, gate_s: float | None) -> None:
        """Motion gating on (refresh period `gate_s`) or off (None), applied at once."""
        with self._cond:
            lane = self._lanes.get(stream_id)
            if lane is not None:
                lane.gate = _Gate(gate_s) if gate_s is not None else None

    def still_since(self, stream_id: str) -> float | None:
        """Since when (capture time, time.monotonic()) the stream's motion gate has seen no
        change: the last frame it checked was unchanged, the last change (or the first frame)
        was then. -inf while it has compared no frame with a reference yet (none seen, or
        only the first): a stream starts as still, so a still_keyframes stream decodes its
        keyframes only until its gate sees a change (48 cameras decoding every frame until
        each was inferred twice left the model no CPU: none was). None: no gate, or the last
        frame checked changed. Not under the scheduler's lock (readers ask, once per frame at
        most)."""
        lane = self._lanes.get(stream_id)
        gate = lane.gate if lane is not None else None
        if gate is None:
            return None
        with gate.lock:
            if gate.still:
                return gate.changed_ts
            return None if gate.moving else float("-inf")

    def cap(self, stream_id: str) -> float:
        lane = self._lanes.get(stream_id)
        return lane.cap_fps if lane else 0.0

    def due_soon(self, stream_id: str, horizon_s: float = 0.0) -> bool:
        """Whether a frame of this stream arriving within `horizon_s` would be taken rather
        than skipped: a reader converts a decoded frame only then. True for a stream without
        a cap and for one the scheduler does not know (yet). Lock-free on the scheduler: it
        reads two floats, and a stale read costs at most one extra or one later conversion."""
        lane = self._lanes.get(stream_id)
        if lane is None:
            return True
        now = time.monotonic()
        if not lane.due(now + horizon_s):
            return False
        if lane.cap_fps <= 0:
            return True  # uncapped: the newest frame always (latency first)
        # A capped lane that is due while an earlier converted frame still waits: the model
        # is behind. Converting each new frame would only replace the waiting one (one
        # conversion per camera frame, all but one dropped, which starves the model
        # further); a new one is converted once the waiting one is half a period old.
        age = lane.source.slot.pending_age(now)
        return age is None or age >= 0.5 / lane.cap_fps

    # -- wake-ups --------------------------------------------------------------------------
    def notify(self) -> None:
        """Called by a reader thread after each new frame."""
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- batching --------------------------------------------------------------------------
    def next_batch(self, timeout_s: float | None = None) -> list[Job]:
        """Blocks until a batch is ready; returns [] once stopped (or after `timeout_s`
        without one). Frames of gated lanes whose scene has not changed are left out (counted
        unchanged)."""
        until = None if timeout_s is None else time.monotonic() + timeout_s
        while jobs := self._next_taken(until):
            jobs = [j for j in jobs if self._admit(j)]
            if jobs:
                return jobs
        return []

    def _admit(self, job: Job) -> bool:
        lane = self._lanes.get(job.stream_id)
        gate = lane.gate if lane is not None else None
        if gate is None or gate.admit(job, lambda periods: self._busier(job.stream_id, periods)):
            return True
        with self._cond:  # no model time used: the rate controller must not count it
            if job.stream_id in self._inferred:
                self._inferred[job.stream_id] -= 1
        self._observer.frame(job.stream_id, "unchanged")
        return False

    def _busier(self, stream_id: str, periods: float) -> bool:
        """Whether another lane needing the model has a due frame waiting and more periods
        overdue (_Lane.urgency) than a still lane's refresh: then the refresh waits (the mask
        of an unchanged scene stands), so refreshes get the same share of what they ask for
        as moving lanes, not the whole model (48 still cameras refreshed every 5 s ask 9.6
        inferences a second)."""
        now = time.monotonic()
        with self._cond:
            for sid, lane in self._lanes.items():
                if sid == stream_id or lane.cheap() or not lane.due(now):
                    continue
                if lane.fresh() is not None and lane.urgency(now) > periods:
                    return True
        return False

    def _next_taken(self, until: float | None) -> list[Job]:
        deadline: float | None = None
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                self._maybe_control(now)
                due, waiting = self._scan(now)
                if due:
                    deadline = deadline or now + self.max_wait_s
                    # Nothing more can arrive in time, or the batch is full: go.
                    if len(due) >= self.batch_cap or now >= deadline or not waiting:
                        jobs = self._take(due[: self.batch_cap], now)
                        if jobs:
                            return jobs
                        deadline = None
                if until is not None and now >= until:
                    break  # after a scan: a frame already waiting is always taken
                wait = self._timeout(now, deadline)
                self._cond.wait(wait if until is None else min(wait, max(until - now, 0.0)))
        return []

    def _scan(self, now: float) -> tuple[list[_Lane], bool]:
        """Lanes with a fresh due frame (round-robin order) and whether others may join soon."""
        due: list[_Lane] = []
        waiting = False
        n = len(self._order)
        horizon = now + self.max_wait_s
        for k in range(n):
            lane = self._lanes[self._order[(self._rr + k) % n]]
            # A frame passed over once stays skipped; the next one gets its chance.
            frame = lane.fresh()
            if frame is not None and lane.due(now):
                due.append(lane)
            elif frame is not None:
                lane.skipped_seq = frame.seq
                lane.source.slot.mark_skipped(frame.seq)  # counts it in metrics
            elif lane.source.state == SourceState.LIVE and (
                lane.cap_fps <= 0 or lane.next_due <= horizon
            ):
                waiting = True
        # Gate checks first, then the lanes that waited longest for their share (stable:
        # round-robin order among equals).
        due.sort(key=lambda ln: (not ln.cheap(), -ln.urgency(now)))
        return due, waiting

    def _take(self, lanes: list[_Lane], now: float) -> list[Job]:
        jobs = []
        for lane in lanes:
            frame = lane.source.slot.take(lane.last_seq)
            if frame is None:
                continue
            lane.last_seq = frame.seq
            lane.taken_ts = now
            lane.advance(now)
            self._inferred[lane.source.id] += 1
            jobs.append(Job(lane.source.id, frame, now))
        if self._order:
            self._rr = (self._rr + len(lanes)) % len(self._order)
        return jobs

    def _timeout(self, now: float, deadline: float | None) -> float:
        t = 0.25  # re-check states and the controller periodically
        if deadline is not None:
            t = min(t, max(deadline - now, 0.0))
        for lane in self._lanes.values():
            if lane.cap_fps > 0 and not lane.due(now):
                t = min(t, lane.next_due - DUE_EARLY_S - now)
        return max(t, 0.0005)

    # -- latency target --------------------------------------------------------------------
    def observe_latency(self, stream_id: str, seconds: float) -> None:
        lane = self._lanes.get(stream_id)
        if lane is not None:
            lane.latencies.append(seconds)

    def _maybe_control(self, now: float) -> None:
        if now < self._next_control:
            return
        elapsed = now - self._next_control + self.control_period_s
        self._next_control = now + self.control_period_s
        counts, self._inferred = self._inferred, dict.fromkeys(self._inferred, 0)
        if self.latency_target_s <= 0 or not self._lanes:
            return
        self._control({k: c / elapsed for k, c in counts.items()})

    def _control(self, rates: dict[str, float]) -> None:
        p95s = [
            float(np.percentile(ln.latencies, 95))
            for ln in self._lanes.values()
            if len(ln.latencies) >= 5
        ]
        if not p95s:
            return
        worst = max(p95s)
        for lane in self._lanes.values():
            lane.latencies.clear()
        measured = max(rates.values(), default=0.0) or self.min_fps
        if worst > self.latency_target_s:
            if self.batch_cap > 1:
                self.batch_cap = max(1, self.batch_cap // 2)
            else:
                self._set_caps(lambda cap: 0.8 * min(cap, measured))
        elif worst < 0.75 * self.latency_target_s:
            if any(
                ln.cap_fps > 0 and (ln.base_fps <= 0 or ln.cap_fps < ln.base_fps)
                for ln in self._lanes.values()
            ):
                # Never run far ahead of what is inferred, so a later cut bites at once.
                self._set_caps(lambda cap: min(cap + max(0.25, 0.05 * cap), 1.5 * measured + 1))
            elif self.batch_cap < self.max_batch:
                self.batch_cap = min(self.max_batch, self.batch_cap * 2)
        self._observer.batch_limit(self.batch_cap)

    def _set_caps(self, update: Callable[[float], float]) -> None:
        now = time.monotonic()
        lanes = list(self._lanes.values())
        for i, lane in enumerate(lanes):
            cap = update(lane.cap_fps or self.min_fps * 1000)
            if lane.base_fps > 0:
                cap = min(cap, lane.base_fps)
            lane.cap_fps = max(cap, self.min_fps)
            # Spread the streams' due times over one period: in phase, they all come due at
            # once and the last waits for every other one's inference (8 cameras, caps at
            # 1 fps: service-side p95 132 ms against 75 ms for one camera).
            lane.next_due = now + (i / len(lanes)) / lane.cap_fps
            self._observer.infer_fps_limit(lane.source.id, lane.cap_fps)
