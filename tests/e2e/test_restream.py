"""The annotated H.264 re-stream against real RTSP servers on loopback: FFmpeg listening for a
publisher (`-rtsp_flags listen`) and gst-rtsp-server in record mode with credentials. The
received video is decoded and must show the overlay's colours; the receiver dies and comes back
and publishing resumes by itself; a stalled server never blocks the pipeline; a stream's
re-stream leaves nothing behind, and its credentials never show."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import av
import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from support.rtsp import RtspListener, RtspServer, free_port, gst_rtsp_available
from support.service_proc import colour_pixels
from support.waiting import until, wait_for

from segstream.models.runtime import Segmenter
from segstream.stream.config import AppConfig, StreamConfig
from segstream.stream.datatypes import Rendered
from segstream.stream.metrics import PrometheusObserver
from segstream.stream.restream import RestreamSink
from segstream.stream.server import make_app
from segstream.stream.service import Service

pytestmark = pytest.mark.e2e

SECRET = "s3cr%t"  # in URLs percent-encoded: s3cr%25t
PERSON_RGB = (192, 128, 128)  # VOC's person colour; alpha 1.0 leaves it exact before H.264


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


def feed(sink: RestreamSink, frames: list[np.ndarray], fps: float = 15.0) -> list[float]:
    """Puts the frames at `fps` as the render thread would; returns each put's duration."""
    took = []
    for i, img in enumerate(frames):
        t = time.perf_counter()
        sink.put(Rendered("t", img, i + 1, time.monotonic(), 80))
        took.append(time.perf_counter() - t)
        time.sleep(1 / fps)
    return took


def decoded(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            return out
        out.append(img)


# -- pieces ------------------------------------------------------------------------------------


# -- the sink against real servers -------------------------------------------------------------


def test_gst_record_server_with_digest_auth_gets_every_frame(
    shared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gst-rtsp-server in record mode, Digest credentials: every frame arrives and decodes; a
    wrong password is a 401 in the reason, never the password; a new frame size starts a new
    session."""
    if (why := gst_rtsp_available()) is not None:
        pytest.fail(why)
    caplog.set_level(logging.INFO)
    rec = tmp_path / "in.h264"
    frames = vtest_frames(shared_dir, 30)
    with RtspServer({}, records={"/in": rec}, auth=f"alice:{SECRET}") as srv:
        url = srv.url("/in").replace("rtsp://", "rtsp://alice:s3cr%25t@")
        sink = RestreamSink("t", url, reconnect_initial=0.2, reconnect_max=1.0)
        sink.start()
        try:
            took = feed(sink, frames)
            assert wait_for(lambda: sink.status()["frames"] >= len(frames), 5), sink.status()
            st = sink.status()
            assert st["state"] == "live" and st["encoder"] == "libx264", st
            assert st["url"] == f"rtsp://***@127.0.0.1:{srv.port}/in"
            print(
                f"put: median {np.median(took) * 1e3:.2f} ms, max {max(took) * 1e3:.2f} ms; "
                f"{st['bytes']} bytes for {st['frames']} frames"
            )
            # A new size: the session starts again (new SPS) without an error.
            small = [cv2.resize(f, (384, 288)) for f in frames[:15]]
            feed(sink, small)
            assert wait_for(lambda: sink.status()["sessions"] == 2, 5), sink.status()
            assert wait_for(lambda: sink.status()["state"] == "live", 5), sink.status()
            assert sink.status()["errors"] == 0
        finally:
            sink.close()
        assert sink.state.value == "stopped" and not restream_threads()
        got = decoded(rec)
        assert [g.shape for g in got[:30]] == [(576, 768, 3)] * 30, [g.shape for g in got]
        with av.open(str(rec)) as c:  # OpenCV scales every frame to the first one's size
            sizes = [(f.width, f.height) for f in c.decode(video=0)]
        assert sizes[:30] == [(768, 576)] * 30 and (384, 288) in sizes[30:], sizes
        # The picture made it: the decoded frame matches the one sent (H.264 at 2 Mbit/s).
        diff = np.abs(got[10].astype(np.int16) - frames[10].astype(np.int16)).mean()
        assert diff < 6, diff

        wrong = RestreamSink(
            "t", url.replace("s3cr%25t", "hunter2"), reconnect_initial=0.2, reconnect_max=0.5
        )
        wrong.start()
        try:
            feed(wrong, frames[:5])
            assert wait_for(lambda: wrong.status()["errors"] >= 1, 10), wrong.status()
            st = wrong.status()
            assert st["state"] == "reconnecting" and "401" in st["reason"], st
        finally:
            wrong.close()
    text = caplog.text + json.dumps(st)
    assert SECRET not in text and "s3cr%25t" not in text and "hunter2" not in text


IO_TIMEOUT = 2.0


def test_a_stalled_server_never_blocks_the_pipeline(shared_dir: Path) -> None:
    """A server that accepts and then says nothing: put() stays a copy, the rest of the
    process keeps running (no GIL held while waiting), the timeout turns into reconnecting,
    and close() returns at once."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    threading.Thread(
        target=lambda: [held.append(srv.accept()[0]) for _ in range(8)], daemon=True
    ).start()
    frame = vtest_frames(shared_dir, 1)[0]
    sink = RestreamSink(
        "t",
        f"rtsp://u:{SECRET}@127.0.0.1:{port}/x",
        io_timeout=IO_TIMEOUT,
        reconnect_initial=0.2,
        reconnect_max=0.3,
    )
    sink.start()
    try:
        gaps, puts = [], []
        last = time.perf_counter()
        end = last + 4 * IO_TIMEOUT
        # The render thread's view, 100 puts a second, until two waits have timed out.
        while sink.status()["errors"] < 2 and time.perf_counter() < end:
            t = time.perf_counter()
            sink.put(Rendered("t", frame, 1, 0.0, 80))
            puts.append(time.perf_counter() - t)
            time.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        assert wait_for(lambda: sink.status()["state"] == "reconnecting", 2)
        st = sink.status()
        print(
            f"put p50 {np.median(puts) * 1e3:.2f} ms, max {max(puts) * 1e3:.1f} ms; "
            f"longest gap {max(gaps) * 1e3:.0f} ms; {st}"
        )
        assert st["errors"] >= 2 and "no reply" in st["reason"], st
        # A wait that held the GIL would stop this loop for a whole io_timeout; a busy machine
        # delays it by far less than half of one (the loop's speed is bench_restream's job).
        assert max(gaps) < IO_TIMEOUT / 2, "the process stalled while the restream waited"
        assert np.median(puts) < 0.002
        assert SECRET not in json.dumps(st)
        t = time.perf_counter()
    finally:
        sink.close()
    assert time.perf_counter() - t < 0.5 and not restream_threads()
    srv.close()
    for c in held:
        c.close()


# -- in a running service ----------------------------------------------------------------------


def config() -> AppConfig:
    return AppConfig.model_validate(
        {
            "model": {
                "name": "mnv2-voc",
                "backend": "tflite",
                "workers": 1,
                "threads": 1,
                "max_batch": 1,
            },
            "render": {"legend": False},  # the legend's swatches carry the colours too
            "server": {"shutdown_timeout": 2.0},
        }
    )


@pytest.fixture
async def running(model: Segmenter) -> AsyncIterator[tuple[Service, TestServer]]:
    service = Service(config(), segmenter=model)
    server = TestServer(make_app(service), host="127.0.0.1")
    await server.start_server()
    assert await until(lambda: service.ready, 30), service.error
    yield service, server
    await server.close()


async def test_service_restream_shows_the_overlay_and_resumes_after_the_receiver_restarts(
    running: tuple[Service, TestServer],
    shared_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    service, server = running
    rx = RtspListener(record=tmp_path / "rx.ts").start()
    try:
        url = rx.url.replace("rtsp://", "rtsp://viewer:s3cr%25t@")
        service.add_stream(
            StreamConfig(
                id="cam",
                source=str(shared_dir / "data/video/vtest.avi"),
                alpha=1.0,
                restream=url,
                reconnect_initial=0.2,
                reconnect_max=1.0,
            )
        )
        async with aiohttp.ClientSession() as http:

            async def status() -> dict:
                r = await http.get(server.make_url("/api/streams/cam"))
                return (await r.json())["restream"]

            assert await until(lambda: rx.frames >= 20, 40), (
                rx.frames,
                service.streams["cam"].restream.status(),
            )
            st = await status()
            assert st["state"] == "live" and st["frames"] >= 20 and st["bytes"] > 0, st
            assert st["url"] == f"rtsp://***@127.0.0.1:{rx.port}/live"
            # The overlay's colour in what the receiver decoded (live, over the pipe).
            seen = max(colour_pixels(f[:, :, ::-1], PERSON_RGB, tol=20) for f in rx.received())
            assert seen > 300, seen
            metrics = await (await http.get(server.make_url("/metrics"))).text()
            assert 'segstream_restream_up{stream="cam"} 1.0' in metrics

            # The receiver dies: the restream reconnects, saying why, without the password.
            rx.kill()
            assert await until(
                lambda: service.streams["cam"].restream.status()["state"] == "reconnecting", 10
            )
            st = await status()
            assert st["errors"] >= 1 and st["reason"], st
            # ...and it comes back on the same port: publishing resumes by itself.
            before = rx.frames
            rx.start()
            assert await until(lambda: rx.frames >= before + 15, 30), (
                rx.frames,
                service.streams["cam"].restream.status(),
            )
            st = await status()
            assert st["state"] == "live" and st["sessions"] >= 2, st
            metrics = await (await http.get(server.make_url("/metrics"))).text()
            page = json.dumps(await (await http.get(server.make_url("/api/streams"))).json())
        for name in ("frames", "bytes", "errors"):
            line = next(
                ln
                for ln in metrics.splitlines()
                if ln.startswith(f'segstream_restream_{name}_total{{stream="cam"}}')
            )
            assert float(line.split()[1]) >= 1, line
        for text in (metrics, page, caplog.text):
            assert SECRET not in text and "s3cr%25t" not in text
        await asyncio.to_thread(service.remove_stream, "cam")
        assert not restream_threads()
    finally:
        rx.kill()
    # The first receiver's recording, read with OpenCV: it decodes and shows the overlay.
    got = decoded(rx.recorded(1))
    assert len(got) >= 10, len(got)
    best = max(colour_pixels(f, PERSON_RGB, tol=20) for f in got)
    assert best > 300, best


async def test_restream_on_off_and_remove_leave_nothing_behind(
    running: tuple[Service, TestServer], shared_dir: Path
) -> None:
    service, _ = running
    metrics = service.metrics
    assert isinstance(metrics, PrometheusObserver)
    vtest = str(shared_dir / "data/video/vtest.avi")
    nobody = f"rtsp://u:{SECRET}@127.0.0.1:{free_port()}/x"  # nothing listens: reconnecting
    cfg = {"id": "r", "source": vtest, "reconnect_initial": 0.1, "reconnect_max": 0.2}

    def restream_series() -> list[str]:
        return [
            ln
            for ln in metrics.exposition().decode().splitlines()
            if ln.startswith("segstream_restream_") and 'stream="r"' in ln and "_created{" not in ln
        ]

    stream = service.add_stream(StreamConfig(**cfg))
    source = stream.source
    assert stream.restream is None and service.stream_status("r")["restream"] is None
    assert not restream_series()

    service.replace_stream(StreamConfig(**cfg, restream=nobody))
    assert stream.restream is not None and restream_threads() == ["restream-r"]
    assert await until(lambda: stream.restream.status()["errors"] >= 1, 20)
    st = service.stream_status("r")["restream"]
    assert st["state"] == "reconnecting" and "Connection refused" in st["reason"], st
    assert SECRET not in json.dumps(service.stream_status("r"))
    assert len(restream_series()) == 4, restream_series()

    service.replace_stream(StreamConfig(**cfg))  # off again
    assert stream.source is source, "a restream change must not restart the reader"
    assert stream.restream is None and not restream_threads()
    assert not restream_series()

    service.replace_stream(StreamConfig(**cfg, restream=nobody))
    assert restream_threads() == ["restream-r"] and len(restream_series()) == 4
    await asyncio.to_thread(service.remove_stream, "r")
    assert not restream_threads()
    assert 'stream="r"' not in metrics.exposition().decode()
