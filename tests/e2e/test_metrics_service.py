"""/metrics against what really happened, on `segstream serve` as a real process: the frame
identity of a file played to its end, the stage labels, the inference limits, and the live
page's connections and bytes (counted by a real WebSocket client)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import cv2
import pytest
from support.rtsp import RtspServer, encode_clip
from support.service_proc import MjpegReader, ServiceProcess
from support.waiting import until, wait_for

pytestmark = pytest.mark.e2e
STAGES = {
    "decode",
    "convert",
    "queue_wait",
    "preprocess",
    "inference",
    "redact",
    "render",
    "encode",
}


@pytest.fixture(scope="module")
def short_clip(shared_dir: Path) -> Path:
    return encode_clip(
        shared_dir / "data/video/vtest.avi", size=(320, 240), seconds=3.0, container="mp4"
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory, segstream_home: Path, camera: RtspServer, short_clip: Path):
    cfg = {
        "model": {
            "name": "mnv2-voc",
            "backend": "tflite",
            "workers": 1,
            "threads": 1,
            "max_batch": 2,
            "max_wait_ms": 20,
        },
        "streams": [
            # privacy on: its `redact` stage is among the stage labels
            {"id": "cam", "source": camera.url("/cam"), "infer_fps": 2, "privacy": {}},
            # Played once at its own rate, inferred at 4 of its 10 fps: every outcome occurs.
            {"id": "short", "source": str(short_clip), "loop": False, "infer_fps": 4},
        ],
    }
    svc = ServiceProcess(tmp_path_factory.mktemp("metrics"), cfg).start()
    svc.wait_state("cam", {"live"}, 20)
    yield svc
    svc.stop()


def frame_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def outcomes(svc: ServiceProcess, sid: str) -> dict[str, float]:
    names = ("captured", "unconverted", "skipped", "dropped", "unchanged", "inferred", "published")
    return {o: svc.metric("segstream_frames_total", stream=sid, outcome=o) for o in names}


def test_every_captured_frame_has_exactly_one_outcome(
    service: ServiceProcess, short_clip: Path
) -> None:
    """captured = unconverted + skipped + dropped + unchanged + inferred (+ the one frame still
    pending), exactly, once the file has ended and nothing moves any more."""
    service.wait_state("short", {"stopped"}, 30)
    frames = frame_count(short_clip)
    c: dict[str, float] = {}

    def pending(c: dict[str, float]) -> float:
        used = c["unchanged"] + c["inferred"]
        return c["captured"] - (c["unconverted"] + c["skipped"] + c["dropped"] + used)

    def settled() -> bool:
        """Two reads 0.5 s apart agree and every frame is accounted for. A batch still
        running (seconds on a loaded machine) holds taken frames that are not inferred yet;
        a frame lost on the way never lets this become true."""
        nonlocal c
        before, c = c, outcomes(service, "short")
        return before == c and pending(c) in (0, 1)

    assert wait_for(settled, 60, step=0.5), c
    assert c["captured"] == frames, (c, frames)  # every frame of the file, each once
    assert service.stream("short")["captured"] == frames
    # 4 of 10 fps inferred: frames are skipped at the reader (never converted), some inferred
    # (how many of each depends on how busy the model is).
    assert c["inferred"] > 0 and c["unconverted"] > 0, c
    assert c["published"] <= c["inferred"], c  # output "segmented": one per inference seen


def test_stage_seconds_has_every_stage_label(service: ServiceProcess) -> None:
    reader = MjpegReader(service.base + "/streams/cam/mjpeg")  # encode runs for viewers only
    try:
        reader.wait_frames(3, timeout=30)
    finally:
        reader.close()
    _, body, _ = service.get("/metrics")
    counts = {}
    for line in body.decode().splitlines():
        if line.startswith("segstream_stage_seconds_count{"):
            labels, value = line.split(" ")
            counts[labels.split('stage="')[1].split('"')[0]] = float(value)
    assert set(counts) == STAGES, counts
    assert all(n > 0 for n in counts.values()), counts
    batches = service.metric("segstream_inference_batch_size_count")
    assert counts["inference"] >= batches > 0  # one observation per batch (read later)


def test_inference_limits_follow_config_and_patch(service: ServiceProcess) -> None:
    assert service.metric("segstream_inference_batch_limit") == 2  # model.max_batch
    assert service.metric("segstream_stream_infer_fps_limit", stream="cam") == 2
    assert service.metric("segstream_stream_infer_fps_limit", stream="short") == 4
    try:
        status, body, _ = service.request("PATCH", "/api/streams/cam", {"infer_fps": 3.5})
        assert status == 200, body
        assert json.loads(body)["infer_fps_cap"] == 3.5
        assert service.metric("segstream_stream_infer_fps_limit", stream="cam") == 3.5
        assert service.request("PATCH", "/api/streams/cam", {"infer_fps": 0})[0] == 200
        assert service.metric("segstream_stream_infer_fps_limit", stream="cam") == 0
    finally:
        service.request("PATCH", "/api/streams/cam", {"infer_fps": 2})
    assert service.metric("segstream_stream_infer_fps_limit", stream="cam") == 2


class PageClient:
    """A live page's WebSocket that counts the frames and bytes it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames = self.bytes = 0
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.frames += 1
                self.bytes += len(msg.data)


async def test_page_connections_and_bytes_match_what_pages_received(
    service: ServiceProcess,
) -> None:
    def metric(name: str, **labels: str) -> float:
        return service.metric(name, **labels)

    sent0 = metric("segstream_page_frames_total", outcome="sent")
    bytes0 = metric("segstream_page_bytes_total")
    assert metric("segstream_page_connections") == 0
    async with aiohttp.ClientSession() as http:
        pages = []
        for k in (1, 2):
            ws = await http.ws_connect(service.base + "/ws")
            pages.append(PageClient(ws))
            await ws.send_str(json.dumps({"watch": ["cam"], "fps": 5}))
            assert await until(lambda k=k: metric("segstream_page_connections") == k, 10)
        assert await until(lambda: min(p.frames for p in pages) >= 3, 30), pages
        for p in pages:
            await p.ws.send_str(json.dumps({"watch": []}))

        def all_counted() -> bool:  # every frame sent is one the pages got, byte for byte
            sent = metric("segstream_page_frames_total", outcome="sent") - sent0
            nbytes = metric("segstream_page_bytes_total") - bytes0
            return (sent, nbytes) == (
                sum(p.frames for p in pages),
                sum(p.bytes for p in pages),
            )

        assert await until(all_counted, 10), [(p.frames, p.bytes) for p in pages]
        for p in pages:
            await p.ws.close()
            await p.task
    assert await until(lambda: metric("segstream_page_connections") == 0, 10)
    assert metric("segstream_page_bytes_total") - bytes0 == sum(p.bytes for p in pages)


def test_limits_follow_a_latency_target(
    tmp_path: Path, segstream_home: Path, camera: RtspServer
) -> None:
    """Under a latency target nothing can meet (1 ms), the scheduler halves the batch, then
    cuts the stream's inference rate down to scheduler.min_infer_fps: the gauges show each
    step's result, the same figures as the API."""
    cfg = {
        "model": {
            "name": "mnv2-voc",
            "backend": "tflite",
            "workers": 1,
            "threads": 1,
            "max_batch": 2,
        },
        "scheduler": {"latency_target_ms": 1, "min_infer_fps": 1.5},
        "streams": [{"id": "cam", "source": camera.url("/cam"), "infer_fps": 8}],
    }
    svc = ServiceProcess(tmp_path, cfg).start()
    assert svc.metric("segstream_inference_batch_limit") == 2
    assert svc.metric("segstream_stream_infer_fps_limit", stream="cam") == 8
    reader = MjpegReader(svc.base + "/streams/cam/mjpeg")  # latencies come from viewers
    try:
        assert wait_for(lambda: svc.metric("segstream_inference_batch_limit") == 1, 60)
        assert wait_for(
            lambda: svc.metric("segstream_stream_infer_fps_limit", stream="cam") == 1.5, 60
        ), svc.stream("cam")
        assert svc.stream("cam")["infer_fps_cap"] == 1.5
        assert svc.metric("segstream_inference_batch_limit") == 1
    finally:
        reader.close()
        svc.stop()
