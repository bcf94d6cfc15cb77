"""Keyframe-only decoding: a PyAV or GStreamer reader decodes only keyframes while the service
says that suffices (nothing needs every frame, and inference capped at or below the keyframe
rate, or with gate.still_keyframes a still scene), counts the others `undecoded`, and decodes
every frame again when a sink needs them or the scene moves."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from support.rtsp import RtspServer, encode_clip
from support.service_proc import ServiceProcess
from support.waiting import wait_for

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import SourceState
from segstream.stream.metrics import PrometheusObserver
from segstream.stream.service import keyframes_suffice
from segstream.stream.sources import VideoSource

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def clip(shared_dir: Path) -> Path:
    """4 s of vtest.avi (10 fps) in an MP4, a keyframe every 10 frames."""
    return encode_clip(
        shared_dir / "data/video/vtest.avi", size=(320, 240), seconds=4.0, gop=10, container="mp4"
    )


def keyframe_positions(path: Path) -> list[int]:
    with av.open(str(path)) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
    return [i for i, p in enumerate(packets) if p.is_keyframe] + [len(packets)]


def play(clip: Path, sid: str, keyframes_only, reader: str = "pyav") -> dict[str, float]:
    obs = PrometheusObserver()
    obs.stream_added(sid)
    cfg = StreamConfig(id=sid, source=str(clip), reader=reader, loop=False, realtime=False)
    src = VideoSource(cfg, observer=obs, keyframes_only=keyframes_only)
    src.start()
    try:
        assert wait_for(lambda: src.state is SourceState.STOPPED, 30), src.status()
    finally:
        src.stop()

    def n(outcome: str) -> float:
        labels = {"stream": sid, "outcome": outcome}
        return obs.registry.get_sample_value("segstream_frames_total", labels) or 0.0

    return {"captured": n("captured"), "undecoded": n("undecoded")}


@pytest.mark.parametrize("reader", ["pyav", "gst"])
def test_decodes_keyframes_only_while_asked_and_knows_the_keyframe_rate(
    clip: Path, reader: str
) -> None:
    """PyAV skips the packets; GStreamer drops the delta buffers before its decoder."""
    *keys, total = keyframe_positions(clip)
    assert keys[:2] == [0, 10] and total == 40, (keys, total)
    assert play(clip, "kf-all", lambda fps: False, reader) == {"captured": total, "undecoded": 0}
    assert play(clip, "kf-keys", lambda fps: True, reader) == {
        "captured": len(keys),
        "undecoded": total - len(keys),
    }
    # Asked for keyframes only once the rate is known (1 a second, from the second keyframe
    # on): the whole first interval is decoded, then keyframes only.
    rates: list[float] = []

    def once_known(fps: float) -> bool:
        rates.append(fps)
        return fps > 0

    assert play(clip, "kf-rate", once_known, reader) == {
        "captured": 10 + len(keys) - 1,
        "undecoded": total - 10 - (len(keys) - 1),
    }
    assert rates[0] == 0 and rates[-1] == pytest.approx(1.0), rates


def test_the_service_decodes_every_frame_for_smooth_output(
    tmp_path: Path, segstream_home: Path, clip: Path
) -> None:
    """Two streams of the same clip inferred at 1 fps (its keyframe rate): the segmented one
    decodes keyframes only once it knows their rate; the smooth one draws every frame, so it
    decodes them all."""
    *keys, total = keyframe_positions(clip)
    base = {"source": str(clip), "reader": "pyav", "loop": False, "infer_fps": 1}
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 2},
        "streams": [{"id": "keys", **base}, {"id": "smooth", **base, "output": "smooth"}],
    }
    svc = ServiceProcess(tmp_path, cfg).start()
    try:
        for sid in ("keys", "smooth"):
            svc.wait_state(sid, {"stopped"}, 60)
        got = {
            sid: {
                o: svc.metric("segstream_frames_total", stream=sid, outcome=o)
                for o in ("captured", "undecoded")
            }
            for sid in ("keys", "smooth")
        }
    finally:
        svc.stop()
    assert got["smooth"] == {"captured": total, "undecoded": 0}, got
    assert got["keys"] == {"captured": 10 + len(keys) - 1, "undecoded": total - 10 - len(keys) + 1}


def test_keyframes_suffice_only_when_nothing_needs_the_frames_between() -> None:
    assert keyframes_suffice(False, 1.0, 1.0)
    assert keyframes_suffice(False, 0.5, 2.0)
    assert keyframes_suffice(False, 0.5, 0.4996)  # GOP 30 at 15 fps over RTSP
    assert not keyframes_suffice(False, 2.0, 1.0)  # more inferences than keyframes
    assert not keyframes_suffice(False, 0.55, 0.5)
    assert not keyframes_suffice(False, 0.0, 1.0)  # uncapped: every frame
    assert not keyframes_suffice(True, 1.0, 1.0)  # draws or re-streams every frame
    assert not keyframes_suffice(False, 1.0, 0.0)  # keyframe rate not known yet


def test_a_gop_longer_than_the_stall_timeout_is_not_a_stall(shared_dir: Path) -> None:
    """Keyframes 3 s apart, stall and read timeouts of 1 s: between decoded keyframes the
    readers skip frames (and a paced file's pacer waits them out), which the watchdog and the
    GStreamer read timeout count as signs of life. A file through both readers and a live
    RTSP camera through GStreamer, all at once."""
    src = shared_dir / "data/video/vtest.avi"
    long_gop = encode_clip(src, size=(160, 120), seconds=7.0, gop=30, container="mp4")
    *keys, total = keyframe_positions(long_gop)
    assert keys == [0, 30, 60] and total == 70, (keys, total)
    live = encode_clip(src, size=(160, 120), seconds=7.0, gop=30)

    def source(sid: str, url: str, reader: str) -> VideoSource:
        cfg = StreamConfig(
            id=sid, source=url, reader=reader, loop=False, stall_timeout=1.0, read_timeout=1.0
        )
        return VideoSource(cfg, keyframes_only=lambda fps: True)

    with RtspServer({"/gop": live}, fps=10) as server:
        files = {r: source(f"gop-{r}", str(long_gop), r) for r in ("pyav", "gst")}
        camera = source("gop-rtsp", server.url("/gop"), "gst")
        for s in (*files.values(), camera):
            s.start()
        t0 = time.monotonic()
        try:
            for s in files.values():
                assert wait_for(lambda s=s: s.state is SourceState.STOPPED, 30), s.status()
            got = {r: (s.stats().captured, s.stats().reconnects) for r, s in files.items()}
            cam, seconds = camera.stats(), time.monotonic() - t0
        finally:
            for s in (*files.values(), camera):
                s.stop()
    assert got == {"pyav": (3, 0), "gst": (3, 0)}, got
    # ~7 s of a 10 fps camera: every frame decoded would be ~70, keyframes only one in 3 s.
    assert (cam.state, cam.reconnects) == (SourceState.LIVE, 0), cam
    assert 1 <= cam.captured <= seconds / 3 + 2, (cam, seconds)


def still_then_moving(shared_dir: Path, out: Path) -> Path:
    """A 9 s camera loop at 10 fps, a keyframe a second: 45 frames of one picture of vtest.avi
    with sensor noise (sigma 2) and a slow light ramp, then 45 frames of people walking (from
    vtest's frame 40 on: the scene jumps at the cut)."""
    cap = cv2.VideoCapture(str(shared_dir / "data/video/vtest.avi"))
    frames = [cv2.resize(cap.read()[1], (320, 240)) for _ in range(85)]
    cap.release()
    raw = out.with_suffix(".avi")
    w = cv2.VideoWriter(str(raw), cv2.VideoWriter.fourcc(*"MJPG"), 10, (320, 240))
    rng = np.random.default_rng(1)
    for i in range(45):
        noisy = frames[0] + 0.2 * i + rng.normal(0, 2, frames[0].shape)
        w.write(np.clip(noisy, 0, 255).astype(np.uint8))
    for f in frames[40:]:
        w.write(f)
    w.release()
    return encode_clip(raw, size=(320, 240), seconds=9.0, gop=10, cache_dir=out.parent)


def frame_counts(svc: ServiceProcess, sid: str) -> dict[str, float]:
    """segstream_frames_total of one stream by outcome, from one /metrics scrape."""
    _, body, _ = svc.get("/metrics")
    got: dict[str, float] = {}
    for line in body.decode().splitlines():
        m = re.match(r"segstream_frames_total\{(.*)\} (\S+)$", line)
        if m and f'stream="{sid}"' in m.group(1):
            outcome = re.search(r'outcome="(\w+)"', m.group(1))
            assert outcome is not None, line
            got[outcome.group(1)] = float(m.group(2))
    return got


def test_a_still_camera_decodes_keyframes_only_until_it_moves(
    tmp_path: Path, segstream_home: Path, shared_dir: Path
) -> None:
    """gate.still_keyframes on a live RTSP camera (10 fps, a keyframe a second, inferred at
    up to 5 fps, refresh_s 1.5): while its picture is still, only keyframes are decoded and
    it is still inferred at least every refresh_s + one keyframe interval; the motion from
    frame 45 is seen at keyframe 50 (inferred) and every frame is decoded from keyframe 60.
    The frames read (captured + undecoded) are the camera's clock: the loop starts with the
    service's connection."""
    clip = still_then_moving(shared_dir, tmp_path / "still.h264")
    with RtspServer({"/cam": clip}, fps=10) as server:
        cfg = {
            "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 2},
            "streams": [
                {
                    "id": "cam",
                    "source": server.url("/cam"),
                    "reader": "gst",
                    "infer_fps": 5,
                    "gate": {"refresh_s": 1.5, "still_keyframes": True},
                }
            ],
        }
        svc = ServiceProcess(tmp_path, cfg).start()
        samples: list[tuple[float, float, float, float]] = []  # (t, read, undecoded, inferred)

        def looped() -> bool:
            c = frame_counts(svc, "cam")
            read = c.get("captured", 0) + c.get("undecoded", 0)
            samples.append((time.monotonic(), read, c.get("undecoded", 0), c.get("inferred", 0)))
            return read >= 89  # the loop's last frame

        try:
            assert wait_for(looped, 30, step=0.1), samples[-1:]
        finally:
            svc.stop()
    # Undecoded frames are counted at the next decoded one: at a sample that has read frame
    # k, every frame before k is counted captured or undecoded.
    still = [s for s in samples if s[1] <= 45]  # frames 0-44 read: the still picture
    assert still[-1][2] >= 17, samples  # >= 2 keyframe intervals skipped (26 by frame 40)
    # Inferred: frame 0, then on the first keyframe at least refresh_s after the last (20,
    # 40), then keyframe 50 (the motion): never more than refresh_s + 1 s apart.
    events = [next(s[0] for s in samples if s[3] >= k) for k in range(1, int(still[-1][3]) + 2)]
    gaps = [b - a for a, b in itertools.pairwise(events)]
    assert 2 <= still[-1][3] <= 4 and max(gaps) <= 1.5 + 1.0 + 0.8, (gaps, samples)
    # Motion from frame 45: keyframe 50 inferred, then every frame decoded from keyframe 60
    # and inferred at the cap (60, 62, ...): 3 more by frame 70, where a refresh alone
    # would add one.
    moving = [s for s in samples if s[1] >= 61]
    assert next(s[3] for s in moving if s[1] >= 70) >= still[-1][3] + 3, samples
    assert moving[-1][2] == moving[0][2] and moving[-1][1] >= 85, samples
