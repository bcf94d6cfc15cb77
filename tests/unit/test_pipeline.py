"""Scheduler, render and publish stages with real slots, frames and images."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest

from segstream.models.labels import VOC_LABELS, voc_palette
from segstream.stream.datatypes import Frame, Rendered, Result, SourceState
from segstream.stream.render import Renderer, RenderStage, StreamView, class_fractions
from segstream.stream.runner import plan_workers
from segstream.stream.scheduler import DUE_EARLY_S, Scheduler
from segstream.stream.sinks import MjpegSink
from segstream.stream.sources import FrameSlot


@dataclass
class Src:
    id: str
    slot: FrameSlot = field(default_factory=FrameSlot)
    state: SourceState = SourceState.LIVE
    seq: int = 0

    def push(self) -> None:
        self.seq += 1
        img = np.zeros((4, 4, 3), np.uint8)
        self.slot.put(Frame(img, self.seq, time.monotonic(), 0.0))

    def decode(self, sched: Scheduler) -> None:
        """One decoded frame, as a VideoSource wired to the scheduler handles it: stored (and
        the scheduler woken) only if the stream is due, else counted unconverted."""
        if sched.due_soon(self.id):
            self.push()
            sched.notify()
        else:
            self.seq += 1
            self.slot.pass_over()


def feeder(sched: Scheduler, srcs: list[Src], fps: float, seconds: float) -> threading.Thread:
    """Like reader threads: push a frame, then wake the scheduler."""

    def run() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for s in srcs:
                s.push()
                sched.notify()
            time.sleep(1 / fps)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_round_robin_is_fair_and_batches_across_streams() -> None:
    sched = Scheduler(max_batch=2, max_wait_s=0.01)
    srcs = [Src(f"s{i}") for i in range(3)]
    for s in srcs:
        sched.add(s, 0)
    taken = dict.fromkeys((s.id for s in srcs), 0)
    for _ in range(30):
        for s in srcs:
            s.push()
        jobs = sched.next_batch()
        assert len(jobs) == 2 and len({j.stream_id for j in jobs}) == 2
        for j in jobs:
            taken[j.stream_id] += 1
    assert set(taken.values()) == {20}, taken


def test_newest_frame_wins_and_overwrites_count_as_dropped() -> None:
    sched = Scheduler(max_batch=4, max_wait_s=0.0)
    src = Src("a")
    sched.add(src, 0)
    for _ in range(5):
        src.push()
    (job,) = sched.next_batch()
    assert job.frame.seq == 5
    assert src.slot.dropped == 4


def test_frame_skipping_caps_inference_rate() -> None:
    sched = Scheduler(max_batch=1, max_wait_s=0.0)
    src = Src("a")
    sched.add(src, 5.0)  # 5 inferences per second from a 50 fps source
    feeder(sched, [src], fps=50, seconds=2.0)
    threading.Timer(2.0, sched.stop).start()
    got = 0
    while jobs := sched.next_batch():
        got += len(jobs)
    # 10 at the cap, plus the catch-up a new lane may take at the start (a frame or two) and
    # one more when a due time falls within DUE_EARLY_S of the end of the window.
    assert 8 <= got <= 13, got
    assert src.slot.skipped > 40
    c = src.slot.counts()
    assert c["puts"] == c["taken"] + c["skipped"] + c["dropped"] + c["pending"]


def test_due_soon_follows_the_lane() -> None:
    sched = Scheduler(max_batch=1, max_wait_s=0.0)
    assert sched.due_soon("unknown")  # a stream the scheduler does not know: convert
    capped, free = Src("capped"), Src("free")
    sched.add(capped, 2.0)
    sched.add(free, 0)
    assert sched.due_soon("capped") and sched.due_soon("free")
    free.push()
    (job,) = sched.next_batch()
    assert job.stream_id == "free" and sched.due_soon("free")  # no cap: every frame wanted
    # A lane that starts (or falls behind) may catch up by a frame or two, then keeps its rate.
    for _ in range(3):
        if not sched.due_soon("capped"):
            break
        capped.push()
        (job,) = sched.next_batch()
        assert job.stream_id == "capped"
    assert not sched.due_soon("capped")  # next due in 0.5 s
    assert sched.due_soon("capped", horizon_s=0.6)
    time.sleep(0.5 - DUE_EARLY_S + 0.002)
    assert sched.due_soon("capped")  # within the early margin: the scan takes it too
    capped.push()
    (job,) = sched.next_batch()
    assert job.stream_id == "capped" and capped.slot.skipped == 0
    sched.set_rate("capped", 1.0)  # a new cap is due at once
    assert sched.due_soon("capped")


def test_converting_only_due_frames_keeps_the_rate_and_skips_none() -> None:
    """A reader that converts a frame only when due_soon() says so (the service's wiring):
    the stream is still inferred at its cap, every converted frame is taken (none skipped),
    and every decoded frame is counted exactly once."""
    sched = Scheduler(max_batch=1, max_wait_s=0.0)
    src = Src("a")
    sched.add(src, 5.0)  # 5 inferences per second from a 50 fps source
    decoded = 0
    done = threading.Event()

    def reader() -> None:
        nonlocal decoded
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            decoded += 1
            src.decode(sched)
            time.sleep(0.02)
        done.set()
        sched.stop()

    threading.Thread(target=reader, daemon=True).start()
    taken = []
    while jobs := sched.next_batch():
        taken += [time.monotonic() - j.frame.capture_ts for j in jobs]
    assert done.wait(5)
    c = src.slot.counts()
    assert 8 <= len(taken) <= 13, c  # 10 at the cap, + a new lane's catch-up (see above)
    assert c["skipped"] == 0, c  # the reader and the scan agree
    assert c["puts"] <= len(taken) + 2, c  # converted ~ inferred, not 50 a second
    assert decoded >= 4 * len(taken), c  # the source outran the cap (50 fps: ~100 frames)
    assert c["puts"] + c["unconverted"] == decoded
    assert c["puts"] == c["taken"] + c["skipped"] + c["dropped"] + c["pending"]
    assert max(taken) < 0.25  # each taken at once, not held back


def test_a_model_far_behind_does_not_convert_every_frame() -> None:
    """Capped lanes stay due while the model is behind: the reader converts a new frame only
    once the waiting one is half a period old, not every camera frame (which the next one
    would drop, starving the model further)."""
    sched = Scheduler(max_batch=1, max_wait_s=0.0)
    srcs = [Src(f"s{i}") for i in range(4)]
    for s in srcs:
        sched.add(s, 5.0)  # 4 x 5 fps wanted, from 50 fps sources
    stop = threading.Event()

    def reader(src: Src) -> None:
        while not stop.is_set():
            src.decode(sched)
            time.sleep(0.02)

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in srcs]
    for t in threads:
        t.start()
    end, taken = time.monotonic() + 2.0, 0
    while time.monotonic() < end:  # a model that manages 5 fps in all, not 20
        taken += len(sched.next_batch())
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(2)
    c = [s.slot.counts() for s in srcs]
    puts, decoded = sum(x["puts"] for x in c), sum(x["puts"] + x["unconverted"] for x in c)
    assert 6 <= taken <= 14, (taken, c)
    # Every 0.1 s per lane at most (half a period of 5 fps), not every 20 ms.
    assert puts <= 4 * 2.0 / 0.1 + 8, (puts, decoded, c)
    assert decoded >= 4 * 60, (decoded, c)


def test_partial_batch_does_not_wait_for_a_dead_stream() -> None:
    sched = Scheduler(max_batch=4, max_wait_s=5.0)
    live, dead = Src("live"), Src("dead", state=SourceState.RECONNECTING)
    sched.add(live, 0)
    sched.add(dead, 0)
    live.push()
    t0 = time.monotonic()
    assert [j.stream_id for j in sched.next_batch()] == ["live"]
    assert time.monotonic() - t0 < 2.5  # well under max_wait: nothing else could come


def test_stop_unblocks_the_worker() -> None:
    sched = Scheduler(max_batch=2, max_wait_s=0.01)
    sched.add(Src("a"), 0)
    threading.Timer(0.2, sched.stop).start()
    assert sched.next_batch() == []


def test_latency_controller_shrinks_batches_then_rates_and_restores() -> None:
    sched = Scheduler(max_batch=4, max_wait_s=0.0, latency_target_s=0.2, min_fps=1.0)
    srcs = [Src("a"), Src("b")]
    for s in srcs:
        sched.add(s, 0)

    def round_(latency: float, rate: float) -> None:
        for s in srcs:
            for _ in range(20):
                sched.observe_latency(s.id, latency)
        sched._control({"a": rate, "b": rate})

    round_(0.5, 10.0)  # over target: smaller batches first, rates untouched
    assert sched.batch_cap == 2 and sched.cap("a") == 0
    round_(0.5, 10.0)
    assert sched.batch_cap == 1 and sched.cap("a") == 0
    round_(0.5, 10.0)  # at batch 1: now the shared rate cap falls
    assert sched.cap("a") == pytest.approx(8.0) and sched.cap("b") == pytest.approx(8.0)
    for _ in range(3):
        round_(0.5, sched.cap("a"))
    low = sched.cap("a")
    assert low < 5
    round_(0.05, low)  # well under target: rates come back first
    assert sched.cap("a") > low and sched.batch_cap == 1
    round_(0.15, sched.cap("a"))  # inside the band: hold
    assert sched.batch_cap == 1


def test_capped_streams_come_due_spread_over_a_period() -> None:
    """Once the controller caps rates, the streams' due times are spread, not in phase."""
    sched = Scheduler(max_batch=1, max_wait_s=0.0, latency_target_s=0.1, min_fps=1.0)
    srcs = [Src(f"s{i}") for i in range(4)]
    for s in srcs:
        sched.add(s, 0)
        for _ in range(20):
            sched.observe_latency(s.id, 0.5)
    sched._control(dict.fromkeys((s.id for s in srcs), 2.0))  # over target: caps of 1.6 fps
    dues = sorted(lane.next_due for lane in sched._lanes.values())
    period = 1 / sched.cap("s0")
    gaps = np.diff(dues)
    assert gaps == pytest.approx([period / 4] * 3, rel=0.05)


def test_batch_cap_limits_batches() -> None:
    sched = Scheduler(max_batch=4, max_wait_s=0.0)
    srcs = [Src(f"s{i}") for i in range(4)]
    for s in srcs:
        sched.add(s, 0)
        s.push()
    sched.batch_cap = 2
    assert len(sched.next_batch()) == 2


def _scene() -> tuple[np.ndarray, np.ndarray]:
    frame = np.full((360, 640, 3), 90, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:30] = 15  # person
    mask[45:60, 40:60] = 7  # car
    return frame, mask


def test_overlay_colours_classes_and_keeps_background() -> None:
    frame, mask = _scene()
    r = Renderer(VOC_LABELS, voc_palette(), alpha=1.0, legend=False)
    out = r.render(frame, mask)
    assert out.shape == frame.shape
    assert (out[0, -1] == frame[0, -1]).all()  # background untouched (not dimmed)
    person_bgr = voc_palette()[15][::-1]
    y, x = int(30 / 64 * 360), int(20 / 64 * 640)
    assert (out[y, x] == person_bgr).all()


def test_class_filter_and_mask_mode() -> None:
    frame, mask = _scene()
    r = Renderer(VOC_LABELS, voc_palette(), alpha=1.0, classes=["car"], legend=False)
    out = r.render(frame, mask)
    y, x = int(30 / 64 * 360), int(20 / 64 * 640)
    assert (out[y, x] == frame[y, x]).all()  # person not shown
    m = Renderer(VOC_LABELS, voc_palette(), mode="mask", legend=False).render(frame, mask)
    assert (m[0, 0] == 0).all()  # background is the palette's black
    with pytest.raises(ValueError, match="unknown class"):
        Renderer(VOC_LABELS, voc_palette(), classes=["unicorn"])


def test_cityscapes_road_is_coloured() -> None:
    """Class 0 is road in Cityscapes, not background: it must be drawn."""
    from segstream.models.labels import CITYSCAPES_LABELS, cityscapes_palette

    frame = np.full((64, 64, 3), 90, np.uint8)
    mask = np.zeros((64, 64), np.uint8)  # all road
    out = Renderer(CITYSCAPES_LABELS, cityscapes_palette(), alpha=1.0, legend=False).render(
        frame, mask
    )
    assert (out[10, 10] == cityscapes_palette()[0][::-1]).all()
    only_car = Renderer(
        CITYSCAPES_LABELS, cityscapes_palette(), alpha=1.0, classes=["car"], legend=False
    ).render(frame, mask)
    assert (only_car == frame).all()


def test_legend_is_drawn_and_fractions_add_up() -> None:
    frame, mask = _scene()
    fr = class_fractions(mask, 21)
    assert fr.sum() == pytest.approx(1.0) and fr[15] == pytest.approx(400 / 4096)
    plain = Renderer(VOC_LABELS, voc_palette(), legend=False).render(frame, mask).copy()
    legend = Renderer(VOC_LABELS, voc_palette(), legend=True).render(frame, mask)
    assert (plain[:40, :200] != legend[:40, :200]).any()


async def test_mjpeg_sink_gives_newest_frame_and_closes() -> None:
    loop = asyncio.get_running_loop()
    pub = MjpegSink("a", loop)
    img = np.zeros((8, 8, 3), np.uint8)
    assert await pub.next(0, timeout=0.05) is None
    for i in range(1, 4):  # a slow client misses 1 and 2
        pub.put(Rendered("a", img, i, time.monotonic(), 80))
    await asyncio.sleep(0.01)
    item = await pub.next(0, timeout=1)
    assert item is not None and item.frame_seq == 3
    waiter = asyncio.create_task(pub.next(item.seq, timeout=5))
    await asyncio.sleep(0.01)
    pub.close()
    assert await asyncio.wait_for(waiter, 1) is None


def test_worker_plan_cpu_splits_cores_gpu_runs_one() -> None:
    auto = plan_workers("tflite", cores=2)
    assert (auto.workers, auto.max_batch, auto.threads, auto.batch_sizes) == (2, 1, 1, (1,))
    cpu = plan_workers("tflite", 4, cores=2)
    assert (cpu.workers, cpu.threads, cpu.batch_sizes) == (2, 1, (1, 2, 3, 4))
    big = plan_workers("tflite", 2, cores=16)
    assert (big.workers, big.threads, big.batch_sizes) == (4, 4, (1, 2))
    assert plan_workers("tflite", 4, threads=2, cores=8).workers == 4
    one = plan_workers("tflite", 4, workers=1, cores=2)
    assert (one.workers, one.threads) == (1, 2)
    assert plan_workers("keras").max_batch == 8
    gpu = plan_workers("keras", 6, cores=16)
    assert (gpu.workers, gpu.threads, gpu.batch_sizes) == (1, None, (1, 2, 4, 8))
    assert plan_workers("keras", 4, batch_sizes=[4, 1]).batch_sizes == (1, 4)


async def test_late_result_from_a_parallel_worker_never_replaces_a_newer_one() -> None:
    pub = MjpegSink("a", asyncio.get_running_loop())
    view = StreamView(
        "a",
        Renderer(VOC_LABELS, voc_palette()),
        [pub],
        output="segmented",
        jpeg_quality=80,
        peek_frame=lambda: None,
    )
    stage = RenderStage()
    stage.add(view)
    img, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    for seq in (5, 3, 6, 4):  # two workers finishing out of order
        stage.submit(Result("a", Frame(img, seq, time.monotonic(), 0.0), mask, 0.0, 1))
    assert view.result is not None and view.result.frame.seq == 6


def _reference_render(
    frame: np.ndarray, mask: np.ndarray, palette_rgb: np.ndarray, none: int, alpha: float, mode: str
) -> np.ndarray:
    """The render stage's definition in plain numpy: nearest-neighbour mask at the frame's size
    (cv2.resize INTER_NEAREST fixes which mask pixel each output pixel shows), colour, blend."""
    h, w = frame.shape[:2]
    full = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    colour = palette_rgb[:, ::-1][full].astype(np.float64)
    bg = full == none
    colour[bg] = 0
    if mode == "mask":
        return colour.astype(np.uint8)
    blend = np.rint((1 - alpha) * frame.astype(np.float64) + alpha * colour)
    return np.where(bg[..., None], frame, blend).astype(np.uint8)


def _street_masks(size: int = 513) -> list[np.ndarray]:
    """Model-sized masks like a street scene's: people and cars on background; then one
    person only; then nothing (the renderer's reused buffers must not leak between them)."""
    scene = np.zeros((size, size), np.uint8)
    for x in (30, 140, 290, 460):
        scene[180:420, x : x + 40] = 15  # person
    scene[390:505, 200:340] = 7  # car
    scene[0:60, 0:size] = 15  # touching the top and both sides
    one = np.zeros_like(scene)
    one[250:300, 100:130] = 15
    return [scene, one, np.zeros_like(scene), scene]


@pytest.mark.parametrize("mode", ["overlay", "mask"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_render_equals_reference_on_a_real_frame(shared_dir, mode: str, alpha: float) -> None:
    cap = cv2.VideoCapture(str(shared_dir / "data" / "video" / "vtest.avi"))
    for _ in range(20):
        ok, camera = cap.read()
    cap.release()
    assert ok, "could not read vtest.avi"
    pal = voc_palette()
    for size in [(1280, 720), (768, 576), (320, 240)]:  # upscaled, native, smaller than mask
        frame = cv2.resize(camera, size)
        r = Renderer(VOC_LABELS, pal, mode=mode, alpha=alpha, legend=False)
        for mask in _street_masks():
            out = r.render(frame, mask)
            ref = _reference_render(frame, mask, pal, 0, alpha, mode)
            full = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
            bg = full == 0
            if mode == "overlay":
                assert (out[bg] == frame[bg]).all(), size  # camera pixels, exactly
            else:
                assert (out[bg] == 0).all(), size
            diff = np.abs(out.astype(int) - ref.astype(int))
            assert diff.max() <= 1, (size, diff.max())
            assert (out[~bg] != frame[~bg]).any() or bg.all()


def test_render_equals_reference_with_filter_and_no_background(shared_dir) -> None:
    """Class filter (unselected classes keep the camera's pixels) and a Cityscapes-style mask
    where every pixel is coloured."""
    from segstream.models.labels import CITYSCAPES_LABELS, cityscapes_palette

    cap = cv2.VideoCapture(str(shared_dir / "data" / "video" / "vtest.avi"))
    ok, frame = cap.read()
    cap.release()
    assert ok
    frame = cv2.resize(frame, (1280, 720))
    scene = _street_masks()[0]
    only_car = Renderer(VOC_LABELS, voc_palette(), classes=["car"], legend=False)
    filtered = np.where(scene == 7, 7, 0).astype(np.uint8)
    ref = _reference_render(frame, filtered, voc_palette(), 0, 0.5, "overlay")
    assert np.abs(only_car.render(frame, scene).astype(int) - ref).max() <= 1
    city = np.random.default_rng(0).integers(0, 19, (65, 129), dtype=np.uint8)
    city = cv2.resize(city, (1025, 513), interpolation=cv2.INTER_NEAREST)  # regions, not noise
    r = Renderer(CITYSCAPES_LABELS, cityscapes_palette(), alpha=0.5, legend=False)
    ref = _reference_render(frame, city, cityscapes_palette(), 255, 0.5, "overlay")
    assert np.abs(r.render(frame, city).astype(int) - ref).max() <= 1


def test_render_threads_take_streams_in_turn() -> None:
    stage = RenderStage(workers=3)
    ids = ["cam-a", "cam-b", "cam-c", "door", "yard", "gate"]
    for sid in ids:
        stage.add(
            StreamView(
                sid,
                Renderer(VOC_LABELS, voc_palette()),
                output="segmented",
                jpeg_quality=80,
                peek_frame=lambda: None,
            )
        )
    # Stream i on thread i % workers: a salted hash() would pile several on one thread.
    assert [stage.thread_of(sid) for sid in ids] == [0, 1, 2, 0, 1, 2]
    stage.remove("cam-b")
    stage.add(
        StreamView(
            "new",
            Renderer(VOC_LABELS, voc_palette()),
            output="segmented",
            jpeg_quality=80,
            peek_frame=lambda: None,
        )
    )
    assert stage.thread_of("new") == 1  # the freed place is filled first


def test_rate_meter_trims_under_its_lock() -> None:
    """The render thread ticks while the event loop reads: both trim the same deque."""
    from segstream.stream.render import RateMeter

    meter = RateMeter()
    meter.tick()
    done = threading.Event()
    t = threading.Thread(target=lambda: (meter.rate(), done.set()))
    with meter._lock:  # while the render thread holds it, the reader waits
        t.start()
        assert not done.wait(0.1), "rate() trimmed without the lock"
    assert done.wait(2)
    t.join()


def test_scheduler_remove_and_set_rate() -> None:
    sched = Scheduler(max_batch=2, max_wait_s=0.0)
    a, b = Src("a"), Src("b")
    sched.add(a, 0)
    sched.add(b, 0)
    sched.remove("a")
    a.push()
    b.push()
    assert [j.stream_id for j in sched.next_batch()] == ["b"]
    sched.set_rate("b", 5)
    assert sched.cap("b") == 5 and sched.cap("a") == 0
