"""Motion gating in the scheduler and masks carried by motion in smooth output, with real
slots, frames, change detectors and optical flow (synthetic camera pictures, no model)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest

from segstream.models import registry
from segstream.models.labels import VOC_LABELS, voc_palette
from segstream.models.runtime import Segmenter
from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import Frame, Rendered, Result, SourceState
from segstream.stream.observer import NullObserver, Outcome
from segstream.stream.render import Renderer, StreamView
from segstream.stream.runner import ModelWorker
from segstream.stream.scheduler import Scheduler
from segstream.stream.service import keyframes_suffice, needs_every_frame
from segstream.stream.sources import FrameSlot

H, W = 180, 320
RNG = np.random.default_rng(7)
SCENE = cv2.GaussianBlur(RNG.integers(40, 200, (H, W, 3), dtype=np.uint8), (5, 5), 0)


def picture(i: int, box_x: int | None = None, gain: float = 0.0) -> np.ndarray:
    """The scene with sensor noise (sigma 3), a brightness offset and optionally a dark 40x40
    box at x = box_x (the moving object)."""
    img = SCENE.astype(np.float32) + gain + np.random.default_rng(i).normal(0, 3, SCENE.shape)
    if box_x is not None:
        img[70:110, box_x : box_x + 40] = 20.0
    return np.clip(img, 0, 255).astype(np.uint8)


class Outcomes(NullObserver):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def frame(self, stream_id: str, outcome: Outcome) -> None:
        self.counts[f"{stream_id}:{outcome}"] += 1


@dataclass
class Cam:
    id: str
    slot: FrameSlot = field(default_factory=FrameSlot)
    state: SourceState = SourceState.LIVE
    seq: int = 0

    def show(self, img: np.ndarray, ts: float) -> None:
        self.seq += 1
        self.slot.put(Frame(img, self.seq, ts, 0.0))


def inferred(sched: Scheduler) -> list[tuple[str, int]]:
    """The frames the next batch sends to the model ([] if every due frame was unchanged)."""
    return [(j.stream_id, j.frame.seq) for j in sched.next_batch(timeout_s=0.05)]


def test_static_stream_stops_inferring_and_resumes_on_the_first_moving_frame() -> None:
    obs = Outcomes()
    sched = Scheduler(max_batch=1, max_wait_s=0.0, observer=obs)
    cam = Cam("cam")
    sched.add(cam, 0.0, gate_s=60.0)
    got = []
    # 20 still frames with noise and a slow light ramp (+0.3 grey levels a frame), then a box
    # enters and moves 6 px a frame.
    for i in range(30):
        box = None if i < 20 else 10 + 6 * (i - 20)
        cam.show(picture(i, box, gain=0.3 * i), ts=i / 15)
        got.append(inferred(sched))
    assert got[0] == [("cam", 1)]  # no reference yet: inferred
    assert got[1:20] == [[]] * 19  # still: the last mask stands
    assert got[20:] == [[("cam", i + 1)] for i in range(20, 30)]  # every moving frame
    assert obs.counts["cam:unchanged"] == 19
    assert cam.slot.counts()["taken"] == 30  # unchanged frames are taken, not dropped


def test_refresh_s_holds_on_a_still_scene() -> None:
    sched = Scheduler(max_batch=1, max_wait_s=0.0)
    cam = Cam("cam")
    sched.add(cam, 0.0, gate_s=1.0)
    seqs = []
    for i in range(46):  # 3 s at 15 fps
        cam.show(picture(i), ts=i / 15)
        seqs += [s for _, s in inferred(sched)]
    # The first, then the first frame at least 1 s (15 frames) of camera time after each.
    assert seqs == [1, 16, 31, 46]


def test_gate_off_infers_every_frame_and_a_still_lane_leaves_the_model_to_a_moving_one() -> None:
    obs = Outcomes()
    sched = Scheduler(max_batch=2, max_wait_s=0.0, observer=obs)
    still, moving, ungated = Cam("still"), Cam("moving"), Cam("ungated")
    sched.add(still, 0.0, gate_s=60.0)
    sched.add(moving, 0.0, gate_s=60.0)
    sched.add(ungated, 0.0)
    sched.set_max_batch(3)
    batches = []
    for i in range(10):
        still.show(picture(i), ts=i / 15)
        moving.show(picture(i, 10 + 8 * i), ts=i / 15)
        ungated.show(picture(i), ts=i / 15)
        batches.append(sorted(sid for sid, _ in inferred(sched)))
    assert batches[0] == ["moving", "still", "ungated"]
    assert batches[1:] == [["moving", "ungated"]] * 9
    assert obs.counts["still:unchanged"] == 9 and obs.counts["moving:unchanged"] == 0
    sched.set_gate("still", None)  # live: off
    still.show(picture(10), ts=10 / 15)
    assert inferred(sched) == [("still", 11)]


class SlowSegmenter(Segmenter):
    """A stand-in model that takes `seconds` a frame (class 0 everywhere)."""

    backend = "test"

    def __init__(self, seconds: float) -> None:
        super().__init__(registry.get_spec("mnv2-voc"), (8, 8), (1,))
        self.seconds = seconds

    def _run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return np.zeros(batch.shape[:3], np.uint8)


class Events(NullObserver):
    """When each stream's frames were inferred or judged unchanged (time.monotonic())."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, Outcome]] = []

    def frame(self, stream_id: str, outcome: Outcome) -> None:
        self.events.append((time.monotonic(), stream_id, outcome))

    def inferred_once(self, ids: list[str]) -> bool:
        return {s for _, s, o in list(self.events) if o == "inferred"} >= set(ids)


def test_under_overload_still_lanes_stay_checked_and_moving_lanes_share_the_model() -> None:
    """16 moving and 48 still gated cameras at 15 fps, each capped at 2 inferences a second,
    refresh_s 1: 80 inferences a second asked of a model that serves 25. A still lane's
    check needs no model, so each is checked within refresh_s all along; refreshes and moving
    lanes get the same fraction of what they ask (moving 2/s, a refresh 1/s), evenly across
    the moving lanes, and frames are skipped, never queued. (Round-robin over 64 lanes took
    2.6 s, more than refresh_s: each check of a still lane became a refresh inference, no
    frame was ever unchanged, and moving lanes got a quarter of the model.)"""
    obs, latencies = Events(), list[float]()

    def on_result(r: Result) -> None:  # glass to mask, moving lanes
        if r.stream_id.startswith("m"):
            latencies.append(r.inferred_ts - r.frame.capture_ts)

    sched = Scheduler(max_batch=1, max_wait_s=0.0, observer=obs)
    moving = [Cam(f"m{i}") for i in range(16)]
    still = [Cam(f"s{i}") for i in range(48)]
    for cam in moving + still:
        sched.add(cam, 2.0, gate_s=1.0)
    worker = ModelWorker(SlowSegmenter(0.04), sched, on_result, 1, observer=obs)
    still_pictures = [picture(i) for i in range(4)]  # sensor noise only
    box_pictures = [picture(i, 10 + 8 * i) for i in range(34)]
    worker.start()
    window: list[float] = []
    k = 0
    while len(window) < 2:  # the first frames (64 inferences), then a 4 s window
        now = time.monotonic()
        if not window and obs.inferred_once([c.id for c in moving + still]):
            window = [now]
        elif window and now >= window[0] + 4.0:
            window.append(now)
        for j, cam in enumerate(moving):
            cam.show(box_pictures[(k + j) % len(box_pictures)], now)
        for j, cam in enumerate(still):
            cam.show(still_pictures[(k + j) % len(still_pictures)], now)
        sched.notify()
        k += 1
        time.sleep(1 / 15)
    worker.stop()
    t0, t1 = window
    seen = [(t, s, o) for t, s, o in obs.events if t0 <= t <= t1]
    for cam in still:
        checks = [t0, *(t for t, s, _ in seen if s == cam.id), t1]
        gaps = np.diff(checks)
        assert gaps.max() <= 1.5, (cam.id, gaps)
        assert sched.still_since(cam.id) is not None  # still: may decode keyframes only
    inferred = Counter(s for _, s, o in seen if o == "inferred")
    on_moving = [inferred[c.id] for c in moving]
    total = sum(inferred.values())
    assert total >= 60, inferred  # ~100 at 25 a second
    # Proportional shares: moving lanes ask 32 of the 80 a second.
    assert sum(on_moving) >= 0.33 * total, (on_moving, total)
    assert max(on_moving) - min(on_moving) <= 2, on_moving
    assert max(latencies) < 0.5, max(latencies)


def test_the_gate_says_since_when_a_stream_is_still() -> None:
    """still_since: the capture time of the last change (the first frame: no reference), while
    the last frame checked was unchanged; None right after a change, refreshes included; -inf
    (still since ever) before the gate has compared a frame with a reference."""
    sched = Scheduler(max_batch=2, max_wait_s=0.0)
    cam, ungated = Cam("cam"), Cam("ungated")
    sched.add(cam, 0.0, gate_s=1.0)
    sched.add(ungated, 0.0)
    assert sched.still_since("cam") == float("-inf")  # nothing checked yet
    since = []
    for i in range(40):  # 15 fps: still, a box in frame 20 only, then still (and a refresh)
        box = 100 if i == 20 else None
        cam.show(picture(i, box), ts=i / 15)
        ungated.show(picture(i, box), ts=i / 15)
        sched.next_batch(timeout_s=0.0)
        since.append(sched.still_since("cam"))
    assert since[0] == float("-inf")  # the first frame: nothing to compare it with
    assert since[1:20] == [0.0] * 19  # the refresh at frame 15 was unchanged
    assert since[20:22] == [None, None]  # the box came, then left: changes
    assert since[22:] == [pytest.approx(21 / 15)] * 18  # still since the box left
    assert sched.still_since("ungated") is None  # no gate: never still


def test_a_still_stream_that_opted_in_decodes_keyframes_only() -> None:
    """The decision: keyframes only when nothing needs every frame, the stream opted in
    (gate.still_keyframes) and its gate has seen no change for a keyframe interval, although
    the scheduler would take more frames than there are keyframes (1.1 a second here)."""
    kf = 0.5  # GOP 30 at 15 fps: a keyframe every 2 s
    assert keyframes_suffice(False, 1.1, kf, still_keyframes=True, still_s=2.0)
    assert keyframes_suffice(False, 0.0, kf, still_keyframes=True, still_s=5.0)  # uncapped
    # No change seen yet (still_since -inf): a stream starts with keyframes only.
    assert keyframes_suffice(False, 1.1, kf, still_keyframes=True, still_s=float("inf"))
    assert not keyframes_suffice(True, 1.1, kf, still_keyframes=True, still_s=2.0)
    assert not keyframes_suffice(False, 1.1, kf, still_keyframes=False, still_s=2.0)
    assert not keyframes_suffice(False, 1.1, kf, still_keyframes=True, still_s=None)  # moving
    assert not keyframes_suffice(False, 1.1, kf, still_keyframes=True, still_s=1.9)  # not yet
    assert not keyframes_suffice(False, 1.1, 0.0, still_keyframes=True, still_s=9.0)  # no rate
    assert not keyframes_suffice(False, 1.1, kf)  # the cap rule alone: more frames than keys
    # What needs every frame: drawn (smooth, privacy failing closed) or re-streamed.
    base = {"id": "cam", "source": "rtsp://cam/1"}
    assert not needs_every_frame(StreamConfig(**base))
    assert needs_every_frame(StreamConfig(**base, output="smooth"))
    assert needs_every_frame(StreamConfig(**base, privacy={"classes": ["person"]}))
    assert needs_every_frame(StreamConfig(**base, restream="rtsp://127.0.0.1:8554/out"))


class Collect:
    name = "collect"

    def __init__(self) -> None:
        self.frames: list[Rendered] = []

    def wants_frames(self) -> bool:
        return True

    def put(self, frame: Rendered) -> None:
        self.frames.append(frame)

    def close(self) -> None:
        pass


def test_smooth_output_draws_the_mask_carried_to_a_moving_object() -> None:
    """A box moves 4 px a frame; the model's answer (the box's true mask) comes for frame 1
    only. The frames drawn after it carry the mask along with the box; the stale mask would
    be 4 px further behind each frame."""
    size = (96, 96)  # the model's mask size
    sink = Collect()
    frames: list[Frame] = []
    view = StreamView(
        "cam",
        Renderer(VOC_LABELS, voc_palette(), mode="mask", alpha=1.0),
        [sink],
        output="smooth",
        jpeg_quality=80,
        peek_frame=lambda: frames[-1] if frames else None,
    )

    def box_x(seq: int) -> int:
        return 40 + 4 * (seq - 1)

    def true_mask(seq: int) -> np.ndarray:
        m = np.zeros((H, W), np.uint8)
        m[70:110, box_x(seq) : box_x(seq) + 40] = 15  # person
        return cv2.resize(m, size[::-1], interpolation=cv2.INTER_NEAREST)

    for seq in range(1, 11):
        frames.append(Frame(picture(seq, box_x(seq)), seq, seq / 15, 0.0))
        if seq == 1:
            view.result = Result("cam", frames[0], true_mask(1), 0.0, 1)
        view.work()
        c = view.carry.last
        assert c is not None and (c.seq, c.source_seq, c.age_frames) == (seq, 1, seq - 1)
    assert [f.frame_seq for f in sink.frames] == list(range(1, 11))

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a > 0) & (b > 0)).sum() / ((a > 0) | (b > 0)).sum())

    last = view.carry.last
    assert last is not None
    carried, stale = iou(last.mask, true_mask(10)), iou(true_mask(1), true_mask(10))
    assert stale < 0.3, stale  # the box moved 36 px of its 40: the stale mask misses it
    assert carried > 0.7, (carried, stale)


class Limits(NullObserver):
    def __init__(self) -> None:
        self.caps: dict[str, float] = {}

    def infer_fps_limit(self, stream_id: str, fps: float) -> None:
        self.caps[stream_id] = fps


def test_unchanged_frames_do_not_count_as_inferred_for_the_rate_controller() -> None:
    """Over its latency target at batch 1, the controller cuts the caps to 0.8 x the measured
    inference rate. A still stream whose frames are all unchanged used no model time: its
    measured rate is 0 (then the floor, min_fps), not the ~20 frames a second it was shown."""
    obs = Limits()
    sched = Scheduler(
        max_batch=1, max_wait_s=0.0, latency_target_s=1.0, control_period_s=0.3, observer=obs
    )
    cam = Cam("still")
    sched.add(cam, 0.0, gate_s=60.0)
    obs.caps.clear()  # the cap reported on adding (0: unlimited)
    cam.show(picture(0), ts=0.0)
    assert inferred(sched) == [("still", 1)]  # the reference frame
    time.sleep(0.35)  # the next control period starts after that inference
    cam.show(picture(1), ts=1 / 15)
    assert inferred(sched) == []
    assert obs.caps == {}  # too few latency samples then: no action
    for _ in range(10):
        sched.observe_latency("still", 5.0)  # far over the target
    shown, deadline = 1, time.monotonic() + 0.5
    while "still" not in obs.caps and time.monotonic() < deadline:
        shown += 1
        cam.show(picture(shown), ts=shown / 15)
        assert inferred(sched) == []
    assert shown >= 2, shown  # any unchanged frame counted would lift the cap above 1
    assert obs.caps == {"still": 1.0}  # min_fps: counting unchanged frames gives ~16
