"""The source stage against real peers: files, a gst-rtsp-server RTSP server, and small TCP/HTTP:
the parts that need no model and no peers (the rest: tests/e2e/test_sources.py)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.rtsp import RtspServer, encode_clip, gst_rtsp_available
from support.waiting import wait_for

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import Frame, SourceState
from segstream.stream.metrics import PrometheusObserver
from segstream.stream.sources import (
    FrameSlot,
    GstReader,
    OpenCVReader,
    VideoSource,
    gst_unavailable,
    parse_target,
    reader_class,
)


def frame(seq: int) -> Frame:
    return Frame(
        image=np.zeros((2, 2, 3), np.uint8), seq=seq, capture_ts=time.monotonic(), decode_s=0.0
    )


OBS = PrometheusObserver()


def sample(stream_id: str, outcome: str) -> float:
    v = OBS.registry.get_sample_value(
        "segstream_frames_total", {"stream": stream_id, "outcome": outcome}
    )
    return v or 0.0


def observed_slot(stream_id: str) -> FrameSlot:
    OBS.stream_added(stream_id)
    return FrameSlot(stream_id, OBS)


@pytest.fixture(scope="module")
def vtest(shared_dir: Path) -> Path:
    return shared_dir / "data" / "video" / "vtest.avi"


@pytest.fixture(scope="module")
def clip(vtest: Path) -> Path:
    return encode_clip(vtest, size=(640, 480), seconds=4, gop=10)


@pytest.fixture(scope="module")
def rtsp_ok() -> None:
    why = gst_rtsp_available()
    if why:
        pytest.fail(why)


@pytest.fixture
def rtsp(clip: Path, rtsp_ok: None) -> Iterator[RtspServer]:
    """A server of the test's own, free to kill and restart."""
    with RtspServer({"/cam": clip}) as srv:
        yield srv


def test_slot_latest_wins_and_counts_drops() -> None:
    slot = observed_slot("slot-a")
    assert slot.take() is None and slot.peek() is None
    assert slot.put(frame(1)) is None
    assert slot.put(frame(2)).seq == 1  # 1 was never taken: dropped
    assert slot.put(frame(3)).seq == 2
    got = slot.take()
    assert got.seq == 3
    assert slot.take() is None  # already taken
    assert slot.peek().seq == 3
    assert slot.put(frame(4)) is None  # 3 was taken: not a drop
    assert slot.take(after_seq=4) is None
    assert slot.take(after_seq=3).seq == 4
    assert slot.counts() == {
        "puts": 4,
        "taken": 2,
        "skipped": 0,
        "dropped": 2,
        "pending": 0,
        "unconverted": 0,
    }
    assert sample("slot-a", "dropped") == 2


def test_slot_skipped_frames_are_not_drops() -> None:
    slot = observed_slot("slot-b")
    slot.put(frame(1))
    assert slot.mark_skipped(1)
    assert not slot.mark_skipped(1)  # counted once
    assert slot.put(frame(2)) is None  # a skipped frame is not dropped when overwritten
    assert not slot.mark_skipped(1)  # no longer in the slot
    assert slot.take() is not None
    assert not slot.mark_skipped(2)  # taken frames cannot also be skipped
    slot.put(frame(3))
    slot.put(frame(4))
    assert slot.counts() == {
        "puts": 4,
        "taken": 1,
        "skipped": 1,
        "dropped": 1,
        "pending": 1,
        "unconverted": 0,
    }
    assert sample("slot-b", "skipped") == 1 and sample("slot-b", "dropped") == 1
    unnamed = FrameSlot()  # no observer: counts only, no metrics
    unnamed.put(frame(1))
    unnamed.put(frame(2))
    assert unnamed.dropped == 1


def test_slot_pass_over_counts_unconverted_frames_only() -> None:
    slot = observed_slot("slot-c")
    slot.put(frame(1))
    slot.pass_over()  # frames 2 and 3: decoded, never converted
    slot.pass_over()
    assert slot.peek().seq == 1 and slot.take().seq == 1  # the pending frame is untouched
    assert slot.counts() == {
        "puts": 1,
        "taken": 1,
        "skipped": 0,
        "dropped": 0,
        "pending": 0,
        "unconverted": 2,
    }
    assert sample("slot-c", "unconverted") == 2 and sample("slot-c", "dropped") == 0


def test_slot_threads_every_frame_counted_once() -> None:
    """A fast producer and a consumer that takes or skips: each seq ends in exactly one bin."""
    slot, n = FrameSlot(), 20000
    dropped: list[int] = []
    taken: list[int] = []
    skipped: list[int] = []
    done = threading.Event()

    def produce() -> None:
        for seq in range(1, n + 1):
            old = slot.put(frame(seq))
            if old is not None:
                dropped.append(old.seq)
        done.set()

    def consume() -> None:
        rng, last = random.Random(1), 0
        while not done.is_set() or slot.counts()["pending"]:
            f = slot.peek()
            if f is not None and f.seq > last and rng.random() < 0.3:
                if slot.mark_skipped(f.seq):
                    skipped.append(f.seq)
                    last = f.seq
                continue
            got = slot.take(after_seq=last)
            if got is not None:
                assert got.seq > last
                taken.append(got.seq)
                last = got.seq

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert taken == sorted(taken) and len(set(taken)) == len(taken)
    assert sorted(dropped + taken + skipped) == list(range(1, n + 1))
    c = slot.counts()
    assert (c["taken"], c["skipped"], c["dropped"]) == (len(taken), len(skipped), len(dropped))
    assert c["pending"] == 0 and c["puts"] == n


def test_a_deferred_frame_converts_once_for_all_its_users() -> None:
    calls: list[int] = []

    def convert() -> np.ndarray:
        calls.append(1)
        time.sleep(0.05)  # long enough for the other threads to ask meanwhile
        return np.full((2, 2, 3), 7, np.uint8)

    f = Frame(None, 1, time.monotonic(), 0.0, convert=convert)
    assert not f.converted
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(f.image)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and f.converted and all(g is got[0] for g in got)
    assert f.materialize() == 0.0  # already done: nothing spent
    with pytest.raises(ValueError):
        Frame(np.zeros((2, 2, 3), np.uint8), 1, 0.0, 0.0, convert=convert)


def test_auto_reader_picks_gst_for_rtsp_only() -> None:
    rtsp, file = parse_target("rtsp://cam.local/s1"), parse_target("/tmp/x.mp4")
    assert reader_class("auto", file) is OpenCVReader
    assert reader_class("auto", rtsp) is (GstReader if gst_unavailable() is None else OpenCVReader)
    assert reader_class("opencv", rtsp) is OpenCVReader


def test_sample_source_the_resolver_refuses() -> None:
    def resolve(name: str) -> str:
        raise KeyError(name)

    src = VideoSource(StreamConfig(id="refused-sample", source="sample:nope"), resolve=resolve)
    src.start()
    try:
        assert wait_for(lambda: src.state is SourceState.ERROR, 2)
        assert src.reason == "cannot resolve sample:nope: 'sample:nope'"
    finally:
        src.stop()
