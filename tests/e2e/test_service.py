"""The service end to end, with real peers: gst-rtsp-server cameras, MJPEG clients, headless
Chromium, a Prometheus server, and signals."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.peers import Chromium, Prometheus
from support.rtsp import RtspServer, encode_clip, gst_rtsp_available
from support.service_proc import MjpegReader, ServiceProcess, colour_pixels, decode, read_part
from support.stamped import stamped_vtest
from support.waiting import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import stamp

PERSON_RGB = (192, 128, 128)  # Pascal VOC palette, class 15
CAM_LATENCY = 'segstream_end_to_end_latency_seconds_bucket{stream="cam"}'
CAM_LATENCY_SUM = 'segstream_end_to_end_latency_seconds_sum{stream="cam"}'
CAM_LATENCY_COUNT = 'segstream_end_to_end_latency_seconds_count{stream="cam"}'
INFERENCE_SUM = 'segstream_stage_seconds_sum{stage="inference"}'
INFERENCE_COUNT = 'segstream_stage_seconds_count{stage="inference"}'
STAMPED_FRAMES = 300  # the stamped clip: vtest's first 30 s, frame k carries sequence number k


@pytest.fixture(scope="module")
def stamped_clip(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vtest at its size and 10 fps with each frame's number drawn in (scripts/stamp.py), so
    a client can tell which frame it got and how far behind the newest one it is."""
    out = tmp_path_factory.mktemp("stamped") / "vtest-stamped.mp4"
    stamped_vtest(shared_dir / "data/video/vtest.avi", out, STAMPED_FRAMES)
    return out


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
def service(tmp_path_factory, segstream_home: Path, stamped_clip: Path, cams):
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
            {"id": "clip", "source": str(stamped_clip), "output": "smooth"},
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
        reader.wait_frames(15, timeout=60)
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
    for path in ("/streams/clip/snapshot.jpg", "/streams/cam/mask.png"):  # a first inference
        assert wait_for(lambda path=path: service.get(path)[0] == 200, 30), path
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


class StampReader:
    """A raw MJPEG client on a thread that notes when it got which frame (the stamp's number).
    `pause` > 0: a slow client, which waits that long after each frame, with a small receive
    buffer (so the kernel does not hold seconds of frames for it)."""

    def __init__(self, port: int, path: str, pause: float = 0.0) -> None:
        self.got: list[tuple[float, int]] = []  # (monotonic time, frame number)
        self.pause, self.error = pause, None
        self._stop = threading.Event()
        self.sock = socket.socket()
        if pause:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.sock.connect(("127.0.0.1", port))
        # HTTP/1.0: no chunked encoding, the multipart body as it is.
        self.sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self.sock.makefile("rb") as r:
                assert r.readline().split()[1] == b"200"
                while r.readline().strip():  # the response's headers
                    pass
                while not self._stop.is_set():
                    code = stamp.read_jpeg(read_part(r))
                    assert code is not None, "a frame without its stamp"
                    self.got.append((time.monotonic(), code[0]))
                    if self.pause:
                        time.sleep(self.pause)
        except Exception as e:
            if not self._stop.is_set():
                self.error = e

    def within(self, t0: float, t1: float) -> list[tuple[float, int]]:
        return [(t, k) for t, k in self.got if t0 <= t < t1]

    def close(self) -> None:
        self._stop.set()
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()


def behind(newer: int, older: int) -> int:
    """Frames from `older` to `newer` on the looping stamped clip (0 if `older` is newer)."""
    d = (newer - older) % STAMPED_FRAMES
    return 0 if d > STAMPED_FRAMES // 2 else d


def test_slow_client_skips_and_fps_cap(service: ServiceProcess) -> None:
    """A client that reads a frame a second gets the newest frame each time (it skips,
    nothing queues for it); a client asking ?fps=2 gets 2 a second; a fast client beside them
    gets every frame the stream publishes."""
    path, pause = "/streams/clip/mjpeg", 1.0
    fast = StampReader(service.port, path)
    slow = StampReader(service.port, path, pause=pause)
    capped = StampReader(service.port, path + "?fps=2")
    readers = (fast, slow, capped)
    published = {"stream": "clip", "outcome": "published"}
    try:
        assert wait_for(lambda: all(len(r.got) >= 3 for r in readers), 30), [
            (len(r.got), r.error) for r in readers
        ]
        t0, p0 = time.monotonic(), service.metric("segstream_frames_total", **published)
        assert wait_for(lambda: len(slow.within(t0, 1e9)) >= 10, 40), slow.got
        t1, p1 = time.monotonic(), service.metric("segstream_frames_total", **published)
        # Every frame published in the window reaches the fast client (the last ones may
        # still be on their way at t1).
        sent = p1 - p0
        assert wait_for(lambda: len(fast.within(t0, 1e9)) >= sent, 10), (len(fast.got), sent)
    finally:
        for r in readers:
            r.close()
    assert not any(r.error for r in readers), [r.error for r in readers]
    span = t1 - t0
    rate = sent / span  # the clip's 10 fps (smooth output), less on a busy machine
    f, sl, cp = fast.within(t0, t1), slow.within(t0, t1), capped.within(t0, t1)
    print(f"{span:.1f} s: published {sent:.0f}, fast {len(f)}, slow {len(sl)}, capped {len(cp)}")
    assert rate > 3 / pause, rate  # else nothing would be left to skip
    assert len(f) <= sent + 3, (len(f), sent)  # (+ those on their way at t0)
    # The slow one: one frame per pause, each the newest when it was written (what waits in
    # the socket buffers is a frame or two, written up to a pause before it is read), never a
    # backlog that grows with time (a queue grows by rate x pause - 1 frames per pause).
    assert len(sl) <= span / pause + 1, len(sl)
    lags = [behind([kk for tt, kk in fast.got if tt <= t][-1], k) for t, k in sl]
    print("slow client's lag behind the fast one, in frames:", lags)
    # A few pauses' worth at most (a loaded machine stalls writer and reader alike); a queue
    # would grow by about rate x pause every read, past this within the 10 reads.
    assert max(lags) <= 6 * rate * pause + 4, lags
    assert max(lags[-3:]) <= max(lags[:3]) + rate * pause, lags
    gaps = [behind(b[1], a[1]) for a, b in itertools.pairwise(sl)]
    assert sorted(gaps)[len(gaps) // 2] >= rate * pause / 2, gaps  # skipped, not slowed down
    # ?fps=2: two frames a second, also the newest ones.
    assert 1.5 * span - 2 <= len(cp) <= 2 * span + 2, (len(cp), span)
    assert sorted(behind(b[1], a[1]) for a, b in itertools.pairwise(cp))[len(cp) // 2] >= 3


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
    """Chromium draws the cam tile from the live page's WebSocket: a real picture that changes
    from one drawn frame to the next, with people in the person colour."""
    card = "document.querySelector('[data-stream=cam]')"
    drawn = f"+({card}?.dataset.frames || 0)"

    async def run() -> tuple[list[np.ndarray], list[int]]:
        async with chrome.page() as page:
            await page.goto(service.base + "/", settle_s=0.0)
            await page.wait_for(f"{drawn} >= 3", 30)
            rect = json.loads(
                await page.eval(
                    f"JSON.stringify({card}.querySelector('canvas').getBoundingClientRect())"
                )
            )
            assert rect["width"] > 100, rect
            x, y, w, h = (int(rect[k]) for k in ("x", "y", "width", "height"))
            views: list[np.ndarray] = []
            person: list[int] = []
            deadline = time.monotonic() + 40
            # Shots of newly drawn frames until one shows a person (people are small in vtest
            # and walk in and out), at least 4 of them.
            while len(views) < 4 or max(person) <= 40:
                assert time.monotonic() < deadline, person
                n = await page.eval(drawn)
                await page.wait_for(f"{drawn} > {n}", 10)
                view = (await page.screenshot())[y : y + h, x : x + w]
                views.append(view)
                # Skip the legend in the frame's top-left corner.
                person.append(colour_pixels(view[h // 4 :, w // 4 :], PERSON_RGB))
            return views, person

    chrome = Chromium(tmp_path / "profile")
    try:
        views, person = asyncio.run(run())
    finally:
        chrome.close()
    assert all(v.size and v.std() > 10 for v in views), "stream image is blank"
    assert any((a != b).any() for a, b in itertools.pairwise(views)), "stream is not live"
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
        q = {
            name: prom.query(expr)
            for name, expr in (
                ("p50", "histogram_quantile(0.5, sum by (le) (" + CAM_LATENCY + "))"),
                ("p95", "histogram_quantile(0.95, sum by (le) (" + CAM_LATENCY + "))"),
                ("mean", CAM_LATENCY_SUM + " / " + CAM_LATENCY_COUNT),
                ("inference", INFERENCE_SUM + " / " + INFERENCE_COUNT),
            )
        }
    finally:
        reader.close()
        prom.close()
    p50, p95, mean, infer = (
        float(q[k][0]["value"][1]) for k in ("p50", "p95", "mean", "inference")
    )
    print(
        f"cam capture -> MJPEG write: p50 {p50:.3f} s, p95 {p95:.3f} s, mean {mean:.3f} s; "
        f"inference {infer:.3f} s a batch"
    )
    assert 0 < p50 <= p95, q
    # In seconds, like the inference stage each of these frames went through (a machine's
    # load stretches both alike): a latency kept in ms would be a thousand times too large.
    assert 0.5 * infer <= mean < 50 * infer, q


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
