"""The annotated H.264 re-stream against real RTSP servers on loopback: FFmpeg listening for a: the
parts that need no model and no peers (the rest: tests/e2e/test_restream.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from support.rtsp import free_port
from support.waiting import wait_for

from segstream.stream.config import ConfigError, StreamConfig, load_config
from segstream.stream.datatypes import Rendered
from segstream.stream.restream import RestreamSink, rtp_packets, split_annexb


def restream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("restream-")]


def vtest_frames(shared_dir: Path, n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(shared_dir / "data/video/vtest.avi"))
    frames = []
    while len(frames) < n:
        ok, img = cap.read()
        assert ok, "vtest.avi ended"
        frames.append(img)
    return frames


def test_rtp_packets_fragment_large_nal_units_and_mark_the_last() -> None:
    stream = b"\x00\x00\x00\x01\x67SPS\x00\x00\x01\x68PP\x00\x00\x01\x65" + bytes(range(256)) * 20
    nals = split_annexb(stream)
    assert [n[0] for n in nals] == [0x67, 0x68, 0x65] and len(nals[2]) == 1 + 5120
    packets, seq = rtp_packets(nals, ts=1234, seq=65534, ssrc=7, size=1400)
    assert seq == 65534 + len(packets) == 65534 + 2 + 4  # SPS, PPS, 4 fragments of the IDR
    markers = [p[1] >> 7 for p in packets]
    assert markers == [0, 0, 0, 0, 0, 1]
    fu = [p[12:] for p in packets[2:]]
    assert all(f[0] == (0x65 & 0xE0) | 28 for f in fu)
    assert [f[1] & 0xC0 for f in fu] == [0x80, 0, 0, 0x40] and {f[1] & 0x1F for f in fu} == {5}
    assert b"".join(f[2:] for f in fu) == nals[2][1:]
    assert [int.from_bytes(p[2:4]) for p in packets] == [65534, 65535, 0, 1, 2, 3]


def test_config_takes_rtsp_urls_only_and_never_quotes_them(tmp_path: Path) -> None:
    ok = StreamConfig(id="a", source="x.mp4", restream="rtsps://u:p@media:8322/a")
    assert ok.restream == "rtsps://u:p@media:8322/a" and ok.restream_encoder == "auto"
    for bad in (
        "http://u:hunter2@media/a",
        "rtsp://u:hunter2@:8554/a",
        "rtsp://u:hunter2@media:99999/a",
        "media/a",
    ):
        p = tmp_path / "c.yaml"
        p.write_text(json.dumps({"streams": [{"id": "a", "source": "x.mp4", "restream": bad}]}))
        with pytest.raises(ConfigError) as e:
            load_config(p, env={})
        assert "streams.0.restream" in str(e.value) and "hunter2" not in str(e.value), e.value


def test_an_encoder_that_cannot_open_is_an_error_not_a_retry(shared_dir: Path) -> None:
    if Path("/dev/nvidiactl").exists():
        pytest.skip("an NVIDIA driver is loaded here: NVENC may open")
    sink = RestreamSink("t", f"rtsp://127.0.0.1:{free_port()}/x", encoder="h264_nvenc")
    sink.start()
    try:
        sink.put(Rendered("t", vtest_frames(shared_dir, 1)[0], 1, 0.0, 80))
        assert wait_for(lambda: sink.state.value == "error", 5), sink.status()
        st = sink.status()
        assert "h264_nvenc" in st["reason"] and st["errors"] == 0, st
        assert not sink.wants_frames()  # nothing is rendered for it any more
        assert wait_for(lambda: not restream_threads(), 2)
    finally:
        sink.close()
