"""The service end to end, with real peers: gst-rtsp-server cameras, MJPEG clients, headless
Chromium, a Prometheus server, and signals."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import pytest
from peers import Chromium, Prometheus
from rtsp import RtspServer, encode_clip, gst_rtsp_available
from service_proc import MjpegReader, ServiceProcess, colour_pixels, decode

PERSON_RGB = (192, 128, 128)  # Pascal VOC palette, class 15


@pytest.fixture(scope="module")
def clip(shared_dir: Path) -> Path:
    return encode_clip(shared_dir / "data/video/vtest.avi", size=(640, 480), seconds=6.0)


@pytest.fixture(scope="module")
def cams(clip: Path):
    if (why := gst_rtsp_available()) is not None:
        pytest.fail(why)
    a = RtspServer({"/cam": clip}).start()
    b = RtspServer({"/door": clip}).start()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, segstream_home: Path, shared_dir: Path, cams):
    a, b = cams
    cfg = {
        "model": {
            "name": "mnv2-voc",
            "backend": "tflite",
            "max_batch": 4,
            "max_wait_ms": 20,
            "workers": 2,
            "threads": 1,
        },
        "render": {"legend": True},
        "streams": [
            # alpha 1: labelled pixels carry the exact palette colour, easy to find in a JPEG.
            {"id": "cam", "source": a.url("/cam"), "alpha": 1.0},
            {
                "id": "door",
                "source": b.url("/door"),
                "stall_timeout": 2.0,
                "reconnect_initial": 0.2,
                "reconnect_max": 1.0,
            },
            {"id": "clip", "source": str(shared_dir / "data/video/vtest.avi"), "output": "smooth"},
        ],
    }
    svc = ServiceProcess(tmp_path_factory.mktemp("svc"), cfg).start()
    for sid in ("cam", "door", "clip"):
        svc.wait_state(sid, {"live"}, 20)
    yield svc
    svc.stop()


def test_rtsp_stream_is_segmented_in_mjpeg(service: ServiceProcess) -> None:
    reader = MjpegReader(service.base + "/streams/cam/mjpeg", keep=15)
    try:
        reader.wait_frames(15, timeout=30)
    finally:
        reader.close()
    imgs = [decode(j) for j in reader.jpegs]
    assert all(im.shape == (480, 640, 3) for im in imgs)
    # People walk through every vtest frame; outside the legend corner their colour appears.
    person = [colour_pixels(im[120:, 200:], PERSON_RGB) for im in imgs]
    assert max(person) > 300, person


def test_api_describes_streams(service: ServiceProcess) -> None:
    body = service.json("/api/streams")
    assert body["ready"] is True
    by_id = {s["id"]: s for s in body["streams"]}
    assert set(by_id) == {"cam", "door", "clip"}
    for s in by_id.values():
        for key in (
            "source",
            "state",
            "reason",
            "fps_in",
            "fps_out",
            "inference_fps",
            "latency_ms",
            "dropped",
        ):
            assert key in s, key
    deadline = time.monotonic() + 10  # the rate needs a couple of seconds of frames
    while (fps := service.stream("clip")["fps_in"]) <= 5 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert 5 < fps < 15  # vtest is 10 fps, paced at its own rate
    assert by_id["cam"]["width"] == 640 and by_id["cam"]["height"] == 480
    model = service.json("/api/model")
    assert model["labels"][15] == "person" and len(model["colors"]) == 21
    assert model["workers"] == 2 and model["threads_per_worker"] == 1
    assert model["batch_sizes"] == [1, 2, 3, 4]  # CPU: no padding, every size has its own


def test_snapshot_mask_and_errors(service: ServiceProcess) -> None:
    status, body, headers = service.get("/streams/clip/snapshot.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert decode(body).shape == (576, 768, 3)
    status, body, headers = service.get("/streams/cam/mask.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and b"PLTE" in body
    for path in ("/streams/nope/mjpeg", "/streams/nope/snapshot.jpg", "/api/streams/nope"):
        status, body, headers = service.get(path)
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        assert b"nope" in body
    assert service.get("/streams/cam/mjpeg?fps=abc")[0] == 422  # invalid query (OpenAPI: 422)
    assert service.get("/healthz")[0] == 200


def test_streams_are_batched(service: ServiceProcess) -> None:
    """Three live streams share the model: some batches hold more than one frame."""
    deadline = time.monotonic() + 20
    while (total := service.metric("segstream_inference_batch_size_count")) < 30:
        assert time.monotonic() < deadline, total
        time.sleep(0.5)
    ones = service.metric("segstream_inference_batch_size_bucket", le="1.0")
    assert ones < total


def test_slow_client_skips_and_fps_cap(service: ServiceProcess) -> None:
    capped = MjpegReader(service.base + "/streams/clip/mjpeg?fps=2")
    full = MjpegReader(service.base + "/streams/clip/mjpeg")
    try:
        time.sleep(4)
        assert capped.frames <= 10  # 2 fps for 4 s, plus the first frame
        assert full.frames >= 2 * capped.frames
    finally:
        capped.close()
        full.close()


def test_camera_loss_and_recovery(service: ServiceProcess, cams) -> None:
    _, door = cams
    clip_before = service.stream("clip")["captured"]
    door.kill()
    st = service.wait_state("door", {"reconnecting"}, timeout=10)
    assert st["reason"]
    # The other streams carry on while the camera is down.
    reader = MjpegReader(service.base + "/streams/cam/mjpeg")
    try:
        reader.wait_frames(5, timeout=10)
    finally:
        reader.close()
    assert service.stream("clip")["captured"] > clip_before
    assert service.stream("cam")["state"] == "live"
    door.start()
    t0 = time.monotonic()
    service.wait_state("door", {"live"}, timeout=5)
    assert time.monotonic() - t0 <= 5
    assert service.metric("segstream_source_reconnects_total", stream="door") >= 1


def test_browser_shows_annotated_stream(service: ServiceProcess, tmp_path: Path) -> None:
    chrome = Chromium(tmp_path / "profile")
    try:
        imgs, rect = asyncio.run(
            chrome.screenshot(
                service.base + "/", settle_s=5, selector="#stream-cam canvas", shots=4
            )
        )
    finally:
        chrome.close()
    assert rect is not None and rect["width"] > 100, rect
    x, y, w, h = (int(rect[k]) for k in ("x", "y", "width", "height"))
    views = [img[y : y + h, x : x + w] for img in imgs]
    assert all(v.size and v.std() > 10 for v in views), "stream image is blank"
    assert any((a != b).any() for a, b in itertools.pairwise(views)), "stream is not live"
    # Skip the legend in the frame's top-left corner; people are small in vtest.
    person = [colour_pixels(v[h // 4 :, w // 4 :], PERSON_RGB) for v in views]
    assert max(person) > 40, person


def test_prometheus_scrapes_latency_histogram(service: ServiceProcess, tmp_path: Path) -> None:
    prom = Prometheus(tmp_path, [f"127.0.0.1:{service.port}"])
    reader = MjpegReader(service.base + "/streams/cam/mjpeg")
    try:
        deadline = time.monotonic() + 40
        result: list = []
        while time.monotonic() < deadline:
            result = prom.query(
                'segstream_end_to_end_latency_seconds_bucket{stream="cam",le="+Inf"}'
            )
            if result and float(result[0]["value"][1]) > 0:
                break
            time.sleep(1)
        assert result and float(result[0]["value"][1]) > 0, result
        p95 = prom.query(
            "histogram_quantile(0.95, sum by (le) "
            '(segstream_end_to_end_latency_seconds_bucket{stream="cam"}))'
        )
        assert p95 and float(p95[0]["value"][1]) > 0
    finally:
        reader.close()
        prom.close()


def test_sigterm_with_client_exits_quickly(
    tmp_path: Path, segstream_home: Path, shared_dir: Path
) -> None:
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite"},
        "streams": [{"id": "clip", "source": str(shared_dir / "data/video/vtest.avi")}],
    }
    svc = ServiceProcess(tmp_path, cfg).start()
    reader = MjpegReader(svc.base + "/streams/clip/mjpeg")
    try:
        reader.wait_frames(3, timeout=30)
        t0 = time.monotonic()
        code = svc.stop(signal.SIGTERM, timeout=10)
        took = time.monotonic() - t0
    finally:
        reader.close()
    assert code == 0, svc.log()
    assert took < 3.0, f"exit took {took:.2f}s"


def test_http_mjpeg_source(service: ServiceProcess, tmp_path: Path) -> None:
    """Another segstream reads this one's MJPEG output over HTTP as its camera."""
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "batch_sizes": [1], "max_batch": 1},
        "streams": [{"id": "relay", "source": service.base + "/streams/clip/mjpeg"}],
    }
    relay = ServiceProcess(tmp_path, cfg).start()
    try:
        st = relay.wait_state("relay", {"live"}, 20)
        assert (st["width"], st["height"]) == (768, 576)
        reader = MjpegReader(relay.base + "/streams/relay/mjpeg")
        try:
            reader.wait_frames(3, timeout=20)
        finally:
            reader.close()
    finally:
        relay.stop()


def test_start_up_failure_exits_with_a_reason(
    tmp_path: Path, segstream_home: Path, shared_dir: Path
) -> None:
    """Class names are only checked once the model is known: a typo still stops start-up."""
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "batch_sizes": [1], "max_batch": 1},
        "render": {"classes": ["person", "unicorn"]},
        "streams": [{"id": "clip", "source": str(shared_dir / "data/video/vtest.avi")}],
    }
    svc = ServiceProcess(tmp_path, cfg)
    with pytest.raises(RuntimeError, match="not ready"):
        svc.start(ready_timeout=60)
    assert "render.classes" in svc.log() and "unicorn" in svc.log()


def test_no_credential_leaves_the_process(
    tmp_path: Path, segstream_home: Path, cams, clip: Path
) -> None:
    """Camera URLs with credentials: the API, the page, /metrics and the log never show them."""
    a, _ = cams
    live = a.url("/cam").replace("rtsp://", "rtsp://camuser7:s3cret-pw@")
    dead = "rtsp://operator:p%40ss-w0rd@127.0.0.1:9/cam?token=tok123&fps=5"
    svc = ServiceProcess(
        tmp_path,
        {
            "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
            "streams": [
                {"id": "cam", "source": live},
                {"id": "dead", "source": dead, "reconnect_initial": 0.1, "reconnect_max": 0.3},
            ],
        },
    ).start()
    try:
        svc.wait_state("cam", {"live"}, 20)
        dead_st = svc.wait_state("dead", {"reconnecting"}, 20)
        assert dead_st["source"] == "rtsp://***@127.0.0.1:9/cam?token=***&fps=5"
        assert dead_st["reason"].startswith("cannot open rtsp://***@127.0.0.1:9/cam"), dead_st
        seen = [
            svc.get(p)[1].decode(errors="replace")
            for p in (
                "/api/streams",
                "/api/streams/cam",
                "/api/streams/dead",
                "/",
                "/metrics",
                "/api/streams/nope",
            )
        ]
    finally:
        svc.stop()
    seen.append(svc.log())
    for text in seen:
        for secret in ("s3cret-pw", "camuser7", "operator", "p%40ss", "tok123"):
            assert secret not in text, (secret, text[:2000])
