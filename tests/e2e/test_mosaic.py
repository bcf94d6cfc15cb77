"""The mosaic's rate and size promises that test_page.py does not hold: a layout is composed
at most `mosaic.max_fps` times a second (4 here, from 10 fps clips), `?fps=` lowers one
viewer's rate, an unchanged layout is repeated once a second, and a mosaic has at most
`mosaic.max_streams` tiles (3 here): asked for more, 422 naming `streams`; by default, the
first three. One service process: three file streams and one whose camera never answers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.rtsp import encode_clip
from support.service_proc import MjpegReader, ServiceProcess, decode

from segstream.stream.mosaic import grid

pytestmark = pytest.mark.e2e

MAX_FPS, MAX_STREAMS, WIDTH = 4.0, 3, 640
CAMS = ["cam0", "cam1", "cam2"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, segstream_home: Path, shared_dir: Path):
    clip = encode_clip(
        shared_dir / "data/video/vtest.avi", size=(320, 240), seconds=4.0, fps=10, container="mp4"
    )
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "mosaic": {"max_fps": MAX_FPS, "max_streams": MAX_STREAMS, "width": WIDTH},
        "streams": [
            {"id": sid, "source": str(clip), "infer_fps": 0.5, "output": "smooth"} for sid in CAMS
        ]
        + [
            {
                "id": "dead",  # never a picture, never a change: reconnecting for good
                "source": "rtsp://127.0.0.1:9/none",
                "reconnect_initial": 60,
                "reconnect_max": 60,
            }
        ],
    }
    svc = ServiceProcess(tmp_path_factory.mktemp("mosaic"), cfg).start()
    for sid in CAMS:
        svc.wait_state(sid, {"live"}, 30)
    svc.wait_state("dead", {"reconnecting"}, 30)
    yield svc
    svc.stop()


def frames_per_second(readers: list[MjpegReader], seconds: float) -> list[float]:
    """Parts a second each reader gets, counted over `seconds` once all of them flow."""
    for r in readers:
        r.wait_frames(2, timeout=30)
    before = [r.frames for r in readers]
    t0 = time.monotonic()
    time.sleep(seconds)  # the window counted: the figure asserted is its rate
    elapsed = time.monotonic() - t0
    return [(r.frames - n) / elapsed for r, n in zip(readers, before, strict=True)]


def test_rate_capped_by_max_fps_and_lowered_by_the_fps_query(service: ServiceProcess) -> None:
    """Two viewers of one layout whose tiles change 10 times a second: the one that asks
    nothing gets at most max_fps (4) parts a second, the one with ?fps=1 about one."""
    url = service.base + "/mosaic/mjpeg?streams=cam0,cam1"
    full, low = MjpegReader(url), MjpegReader(url + "&fps=1")
    try:
        rates = frames_per_second([full, low], 6.0)
    finally:
        full.close()
        low.close()
    print("mosaic parts a second, as composed and with ?fps=1:", [round(r, 2) for r in rates])
    assert MAX_FPS / 2 <= rates[0] <= MAX_FPS + 2 / 6, rates
    assert 0.5 <= rates[1] <= 1.0 + 2 / 6, rates


def test_an_unchanged_layout_is_repeated_once_a_second(service: ServiceProcess) -> None:
    """A camera that never answers: no new picture and no state change, so the same JPEG is
    sent again once a second (an MJPEG player keeps showing it) and no more often."""
    reader = MjpegReader(service.base + "/mosaic/mjpeg?streams=dead&width=320", keep=12)
    try:
        (rate,) = frames_per_second([reader], 6.0)
    finally:
        reader.close()
    print(f"unchanged mosaic: {rate:.2f} parts a second")
    assert 0.6 <= rate <= 1.0 + 2 / 6, rate
    assert len(set(reader.jpegs)) == 1, "an unchanged layout was composed again"
    assert decode(reader.jpegs[0]).shape[1] == 320


def test_at_most_max_streams_tiles(service: ServiceProcess) -> None:
    """Four streams asked for, with max_streams 3: 422 and a JSON error naming `streams`. The
    default (every stream) shows the first three: the fourth cell of a 4-column grid stays
    empty, where the fourth stream ('dead', reconnecting) would draw its label."""
    status, body, headers = service.get("/mosaic/mjpeg?streams=cam0,cam1,cam2,dead")
    assert status == 422 and headers["Content-Type"].startswith("application/json"), body
    err = json.loads(body)
    assert "mosaic.max_streams" in err["error"] and err["details"][0]["loc"] == "streams", err
    reader = MjpegReader(service.base + f"/mosaic/mjpeg?cols=4&width={WIDTH}", keep=1)
    try:
        reader.wait_frames(1, timeout=30)
    finally:
        reader.close()
    img = decode(reader.jpegs[0])
    cols, rows, (tw, th) = grid(4, 4, WIDTH)
    assert img.shape == (rows * th, cols * tw, 3), img.shape
    labels = [img[th - th // 8 :, c * tw : (c + 1) * tw] for c in range(4)]
    assert [int(cell.max() > 100) for cell in labels] == [1, 1, 1, 0], [
        int(c.max()) for c in labels
    ]
