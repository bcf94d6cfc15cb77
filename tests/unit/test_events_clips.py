"""Event clips without a service: the pre-roll ring's bounds, and a recorder fed synthetic
frames (each frame's grey level says which it is) writes MP4s that start a pre-roll before
the event, end at its end, stop at the cap, and are finished when the recorder closes."""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
import pytest
from support.waiting import wait_for

from segstream.stream.datatypes import Rendered
from segstream.stream.events.clips import ClipRecorder, ClipSet, Packet, PacketRing
from segstream.stream.events.config import ClipsConfig, RuleConfig, ZoneConfig

FPS = 10


def packet(seq: int, wall: float, key: bool, size: int = 100, session: int = 1) -> Packet:
    return Packet(seq, wall, seq, key, bytes(size), session, (64, 48))


def test_ring_keeps_whole_groups_within_frames_bytes_and_age() -> None:
    ring = PacketRing(max_frames=25, max_bytes=10**9, max_age_s=1.5)
    for i in range(100):  # a keyframe every 10 frames (1 s at 10 fps)
        ring.push(packet(i, i / FPS, key=i % 10 == 0))
        kept = list(ring.after(0))
        assert kept[0].key and kept[-1].seq == i
        assert ring.frames == len(kept) <= 25
        # at least max_age_s reaches back once there was that much, never two groups more
        assert kept[-1].wall - kept[0].wall >= min(1.5, i / FPS) - 1e-9
        assert kept[-1].wall - kept[0].wall < 1.5 + 1.0
    assert ring.start_seq(9.05) == 90 and ring.start_seq(8.95) == 80
    assert ring.start_seq(0.0) == ring.after(0).__next__().seq  # the oldest kept

    by_bytes = PacketRing(max_frames=1000, max_bytes=2500, max_age_s=100)
    dropped = []
    for i in range(60):
        dropped += by_bytes.push(packet(i, i / FPS, key=i % 10 == 0))
        assert by_bytes.bytes <= 2500 and by_bytes.bytes == 100 * by_bytes.frames
    assert [p.seq for p in dropped] == list(range(40))  # whole groups, oldest first
    # A group larger than the bounds is not kept at all (a clip could not start in it).
    tiny = PacketRing(max_frames=5, max_bytes=10**9, max_age_s=100)
    for i in range(20):
        tiny.push(packet(i, i / FPS, key=i % 10 == 0))
    assert tiny.frames == 0 and tiny.start_seq(1.0) is None
    assert tiny.push(packet(20, 2.0, key=False)) == [packet(20, 2.0, key=False)]


def grey(k: int) -> int:
    return 16 + 2 * k


class Feeder:
    """Frames k = 0, 1, ... at FPS, captured in the past (no waiting), handed over one by one."""

    def __init__(self, rec: ClipRecorder, frames: int) -> None:
        self.rec = rec
        self.t0 = time.monotonic() - frames / FPS - 5
        self.wall0 = time.time() - (time.monotonic() - self.t0)

    def wall(self, k: float) -> float:
        return self.wall0 + k / FPS

    def put(self, ks: range) -> None:
        for k in ks:
            img = np.full((96, 128, 3), grey(k), np.uint8)
            self.rec.put(Rendered("s", img, k, self.t0 + k / FPS, 80))
            assert wait_for(lambda: self.rec._box is None, 10, 0.002)


def frames_of(path: Path) -> tuple[list[int], float]:
    """The frame numbers of a clip (from their grey level) and its duration in seconds."""
    with av.open(str(path)) as f:
        s = f.streams.video[0]
        ks = [round((float(fr.to_ndarray(format="bgr24").mean()) - 16) / 2)
              for fr in f.decode(s)]  # fmt: skip
    with av.open(str(path)) as f:
        dur = float(f.duration or 0) / av.time_base
    return ks, dur


def near(ks: list[int], want: range) -> bool:
    """The frames wanted (identified by grey level, which the codec shifts by at most 1)."""
    return len(ks) == len(want) and all(abs(k - w) <= 1 for k, w in zip(ks, want, strict=True))


@pytest.fixture
def done() -> list[tuple[str, Path, int, bool]]:
    return []


def recorder(tmp_path: Path, done: list, **cfg: object) -> ClipRecorder:
    c = ClipsConfig(encoder="libx264", **cfg)  # type: ignore[arg-type]
    rec = ClipRecorder("s", c, lambda eid: tmp_path / f"{eid}.mp4",
                       lambda *a: done.append(a), window_s=1.0)  # fmt: skip
    rec.start()
    return rec


def test_clip_spans_pre_roll_to_end_and_lags_by_clear_s(tmp_path: Path, done: list) -> None:
    rec = recorder(tmp_path, done, pre_roll_s=3.0)
    feed = Feeder(rec, 100)
    try:
        feed.put(range(0, 50))
        rec.open("ev1", feed.wall(40.1), hold_s=1.0)  # reported at 50: started at 40 (for_s 1)
        feed.put(range(50, 80))
        rec.end("ev1", feed.wall(70.1))  # the end is clear_s (1 s) before it is known
        feed.put(range(80, 90))
        assert wait_for(lambda: len(done) == 1, 10), done
    finally:
        rec.close()
    eid, path, nbytes, truncated = done[0]
    assert (eid, truncated, nbytes) == ("ev1", False, path.stat().st_size)
    data = path.read_bytes()  # a plain MP4, index first (browsers get duration and seeking)
    assert b"moof" not in data and data.index(b"moov") < data.index(b"mdat")
    ks, dur = frames_of(path)
    # From the keyframe at or before start - pre_roll (frame 10) to the end (frame 70).
    assert len(ks) == 61 and near(ks, range(10, 71)), ks
    assert dur == pytest.approx(6.1, abs=0.15)


def test_cap_truncates_and_close_finishes_open_clips(tmp_path: Path, done: list) -> None:
    rec = recorder(tmp_path, done, pre_roll_s=1.0, max_s=2.0)
    feed = Feeder(rec, 80)
    try:
        feed.put(range(0, 25))
        rec.open("long", feed.wall(20.1), hold_s=0.0)
        rec.open("open", feed.wall(30.1), hold_s=0.5)
        feed.put(range(25, 38))
        assert wait_for(lambda: len(done) == 1, 10), done
    finally:
        rec.close()  # "open" never ended: closing finishes it with what there is
    assert [d[0] for d in done] == ["long", "open"]
    long_ks, long_dur = frames_of(done[0][1])
    assert done[0][3] is True and near(long_ks, range(10, 30)), long_ks
    assert long_dur == pytest.approx(2.0, abs=0.15)
    open_ks, _ = frames_of(done[1][1])
    assert done[1][3] is False and near(open_ks, range(20, 38)), open_ks
    assert not rec.wants_frames() and rec.ring.frames == 0


class Host:
    """A stream's sink list (as render.StreamView keeps it)."""

    def __init__(self) -> None:
        self.sinks: list[object] = []

    def add_sink(self, sink: object) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink: object) -> None:
        self.sinks.remove(sink)


def test_clip_set_follows_the_streams(tmp_path: Path, done: list) -> None:
    clips = ClipSet(ClipsConfig(encoder="libx264"), lambda e: tmp_path / f"{e}.mp4",
                    lambda *a: done.append(a))  # fmt: skip
    rule = RuleConfig(class_name="person", above=0.1, for_s=2.0, clear_s=0.5)
    zones = [ZoneConfig(name="z", polygon=[(0, 0), (1, 0), (1, 1)], rules=[rule])]
    a, b = Host(), Host()
    clips.record("s", a, zones)
    rec = a.sinks[0]
    assert isinstance(rec, ClipRecorder) and rec.ring.max_age_s == 3.0 + 2.0 + 1.0 + 1.0
    clips.record("s", a, zones)  # the same stream's zones again: the same recorder
    assert a.sinks == [rec] and rec.wants_frames()
    clips.record("s", b, zones)  # a new stream of that id: a new recorder, the old one stops
    assert a.sinks == [] and not rec.wants_frames() and len(b.sinks) == 1
    clips.record("s", None, ())
    assert b.sinks == []
    clips.close()
