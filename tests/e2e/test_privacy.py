"""Privacy redaction end to end, in-process service with the real model on a real clip with
people (vtest): the published pictures hide the model's own person mask for the very frame
(computed here independently), leave the rest alone, hide static zones from the first frame,
fail closed (stale masks, failing inference), and the raw view is for an admin alone."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from support.peers import Chromium
from support.rtsp import RtspListener
from support.stamped import stamped_vtest
from support.waiting import until

from segstream.models.runtime import Segmenter, prepare
from segstream.stream.auth import Authenticator, TokenStore, load_secret
from segstream.stream.config import AppConfig, StreamConfig
from segstream.stream.datatypes import Rendered
from segstream.stream.events.clips import ClipRecorder
from segstream.stream.render.privacy import BLANK_BGR
from segstream.stream.server import make_app
from segstream.stream.service import Service

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import stamp

pytestmark = pytest.mark.e2e

FRAMES = 60  # the stamped clip: vtest's first 6 s at 10 fps, frame k carries number k
FILL_RGB = (255, 0, 255)
DILATE = 8
ZONE = [[0.0, 0.0], [0.25, 0.0], [0.25, 0.2], [0.0, 0.2]]  # top-left, as fractions


@pytest.fixture(scope="module")
def stamped(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("privacy") / "vtest-stamped.mp4"
    stamped_vtest(shared_dir / "data/video/vtest.avi", out, FRAMES)
    return out


def clip_frames(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    """Frames k of the clip, decoded here as the service's OpenCV reader decodes them."""
    cap = cv2.VideoCapture(str(path))
    got = {}
    for k in range(FRAMES):
        ok, img = cap.read()
        assert ok, k
        if k in wanted:
            got[k] = img
    cap.release()
    return got


def person_mask(model: Segmenter, img: np.ndarray) -> np.ndarray:
    """The model's person pixels for this frame at the frame's size (bool)."""
    mask = model.segment(prepare(img, model.input_size, bgr=True)[None])[0]
    person = (mask == model.labels.index("person")).astype(np.uint8)
    h, w = img.shape[:2]
    return cv2.resize(person, (w, h), interpolation=cv2.INTER_NEAREST) > 0


def zone_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(np.array(ZONE) * [w, h]).astype(np.int32)], 255)
    return m > 0


def far_from(hidden: np.ndarray, margin: int) -> np.ndarray:
    """Pixels farther than `margin` from every hidden pixel."""
    dist = cv2.distanceTransform((~hidden).astype(np.uint8), cv2.DIST_L2, 5)
    return dist > margin


def decode(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def is_blank(img: np.ndarray) -> bool:
    """The failing-closed picture: grey everywhere but the banner line."""
    grey = np.all(np.abs(img.astype(np.int16) - BLANK_BGR) <= 12, axis=2)
    return bool(grey.mean() > 0.9)


def config(**extra: Any) -> AppConfig:
    return AppConfig.model_validate(
        {
            "model": {
                "name": "mnv2-voc",
                "backend": "tflite",
                "workers": 1,
                "threads": 1,
                "max_batch": 1,
            },
            "server": {"shutdown_timeout": 2.0},
            "render": {"legend": False, "jpeg_quality": 90},
            **extra,
        }
    )


def privacy(**over: Any) -> dict[str, Any]:
    return {"classes": ["person"], "style": "fill", "color": list(FILL_RGB), "dilate": DILATE,
            **over}  # fmt: skip


class Recorder:
    """A sink that keeps every frame handed to it, before any encoding (exact pixels)."""

    name = "recorder"

    def __init__(self, view: Any = None) -> None:
        self.frames: list[tuple[int, float, float, np.ndarray]] = []  # seq, capture, put, image
        self.lock = threading.Lock()

    def wants_frames(self) -> bool:
        return True

    def put(self, frame: Rendered) -> None:
        with self.lock:
            self.frames.append(
                (frame.frame_seq, frame.capture_ts, time.monotonic(), frame.image.copy())
            )

    def close(self) -> None:
        pass

    def snapshot(self) -> list[tuple[int, float, float, np.ndarray]]:
        with self.lock:
            return list(self.frames)


@asynccontextmanager
async def running(
    model: Segmenter, cfg: AppConfig, auth: Authenticator | None = None
) -> AsyncIterator[tuple[Service, TestServer]]:
    service = Service(cfg, segmenter=model)
    server = TestServer(make_app(service, auth=auth), host="127.0.0.1")
    await server.start_server()
    try:
        assert await until(lambda: service.ready, 60)
        yield service, server
    finally:
        await server.close()


async def mjpeg_frames(http: aiohttp.ClientSession, url: str, n: int, **kw: Any) -> list[bytes]:
    """The first n JPEG parts of an MJPEG response."""
    out: list[bytes] = []
    async with http.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        while len(out) < n:
            line = await r.content.readline()
            if line.lower().startswith(b"content-length:"):
                size = int(line.split(b":")[1])
                await r.content.readline()
                out.append(await r.content.readexactly(size))
    return out


def stamped_of(jpegs: list[bytes]) -> dict[int, np.ndarray]:
    got = {}
    for jpeg in jpegs:
        code = stamp.read_jpeg(jpeg)
        if code is not None:  # a person in front of the stamp hides it
            got[code[0]] = decode(jpeg)
    return got


def check_fill(
    model: Segmenter,
    clip: Path,
    pictures: dict[int, np.ndarray],
    tol: int = 48,
    far_mean: float = 4.0,
    far_p99: float = 40.0,
) -> int:
    """Every picture: the model's person mask of its frame is the fill colour; pixels far from
    the hidden area are the frame's own (within the codec's `tol`erances). Returns how many
    person pixels were checked."""
    originals = clip_frames(clip, set(pictures))
    checked = 0
    for k, pic in pictures.items():
        img = originals[k]
        person = person_mask(model, img)
        h, w = person.shape
        diff = np.abs(pic.astype(np.int16) - np.array(FILL_RGB[::-1])).max(axis=2)
        on_person = diff[person]
        assert (on_person <= tol).mean() >= 0.97, (k, (on_person <= tol).mean())
        zone = zone_mask(h, w)
        assert (diff[zone] <= tol).mean() >= 0.97, k
        far = far_from(person | zone, DILATE + 16)
        dev = np.abs(pic.astype(np.int16) - img).max(axis=2)[far]
        assert dev.mean() < far_mean and np.percentile(dev, 99) < far_p99, (k, dev.mean())
        checked += int(person.sum())
    return checked


async def test_mjpeg_and_snapshot_hide_the_models_person_mask_of_that_frame(
    model: Segmenter, stamped: Path
) -> None:
    stream = {"id": "priv", "source": str(stamped), "alpha": 0, "privacy": privacy(zones=[ZONE])}
    async with running(model, config(streams=[stream])) as (service, server):
        view = service.streams["priv"].view
        assert await until(lambda: view.result is not None, 60)
        async with aiohttp.ClientSession() as http:
            snaps = []
            for _ in range(3):  # rendered on demand (nobody watches)
                r = await http.get(server.make_url("/streams/priv/snapshot.jpg"))
                assert r.status == 200
                snaps.append(await r.read())
            jpegs = await mjpeg_frames(http, str(server.make_url("/streams/priv/mjpeg")), 12)
        pictures = stamped_of(jpegs + snaps)
        assert len(pictures) >= 4, len(pictures)
        assert check_fill(model, stamped, pictures) > 5000
        text = service.metrics.exposition().decode() if service.metrics else ""
        assert 'segstream_privacy_frames_total{outcome="redacted",stream="priv"}' in text
        assert 'segstream_stage_seconds_count{stage="redact"}' in text


async def test_page_tiles_large_view_off_and_mosaic_are_redacted(
    model: Segmenter, stamped: Path
) -> None:
    """The page's WebSocket: tiles (the stream's picture) and the large view drawn "off"
    (the camera's frame, which with privacy on is the redacted frame); and the mosaic."""
    stream = {"id": "priv", "source": str(stamped), "alpha": 0, "privacy": privacy(zones=[ZONE])}
    async with running(model, config(streams=[stream])) as (service, server):
        view = service.streams["priv"].view
        assert await until(lambda: view.result is not None, 60)
        got: dict[int, list[bytes]] = {1: [], 2: []}
        async with aiohttp.ClientSession() as http, http.ws_connect(server.make_url("/ws")) as ws:
            await ws.send_json(
                {"watch": ["priv"], "fps": 10, "focus": "priv", "overlay": {"mode": "off"}}
            )
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    data = msg.data
                    got[data[0]].append(data[6 + data[1] :])
                if min(len(v) for v in got.values()) >= 10:
                    break
            mosaic = await mjpeg_frames(
                http, str(server.make_url("/mosaic/mjpeg?streams=priv&cols=1&width=768")), 3
            )
        # The mosaic's tile (scaled, labelled): the zone's fill is in it.
        fills = [
            int((np.abs(decode(j).astype(np.int16) - FILL_RGB[::-1]).max(axis=2) <= 40).sum())
            for j in mosaic
        ]
        zone_px = 0.25 * 0.2 * 768 * 576
        assert max(fills) > 0.5 * zone_px, (fills, zone_px)
        for kind, jpegs in got.items():
            pictures = stamped_of(jpegs[2:])
            assert len(pictures) >= 3, (kind, len(pictures))
            assert check_fill(model, stamped, pictures) > 3000, kind


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = Chromium(tmp_path_factory.mktemp("chrome"))
    yield c
    c.close()


async def test_page_in_chromium_shows_the_redacted_frame_with_overlay_off(
    model: Segmenter, stamped: Path, chrome: Chromium
) -> None:
    """The page's large view with drawing "off" shows the camera's frame: with privacy on,
    the people are the fill colour there (nothing else in vtest is that colour)."""
    stream = {"id": "priv", "source": str(stamped), "privacy": privacy()}
    async with running(model, config(streams=[stream])) as (service, server):
        view = service.streams["priv"].view
        assert await until(lambda: view.result is not None, 60)
        async with chrome.page() as page:
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            )
            await page.goto(str(server.make_url("/")), 1.0)
            await page.wait_for(
                "+(document.querySelector('[data-stream=priv]').dataset.frames || 0) >= 3", 30
            )
            await page.eval("document.querySelector('[data-stream=priv] .pic').click(), true")
            await page.eval("""(() => {
                const f = document.getElementById('focus-controls');
                f.elements.mode.value = 'off';
                document.getElementById('focus').dataset.overlay = '';
                f.dispatchEvent(new Event('input'));
                return true; })()""")
            await page.wait_for(
                "(() => { const f = document.getElementById('focus'); "
                "return !f.hidden && (f.dataset.overlay || '').includes('\"off\"') && "
                "+(f.dataset.frames || 0) >= 3; })()",
                30,
            )
            r = json.loads(
                await page.eval(
                    "JSON.stringify(document.getElementById('focus-canvas')"
                    ".getBoundingClientRect())"
                )
            )
            shot = await page.screenshot()
    x, y, w, h = (int(r[k]) for k in ("x", "y", "width", "height"))
    pic = shot[y : y + h, x : x + w]  # BGR
    fill = np.abs(pic.astype(np.int16) - np.array(FILL_RGB[::-1])).max(axis=2) <= 40
    assert fill.sum() > 1500, fill.sum()


async def test_restream_received_by_ffmpeg_is_redacted(
    model: Segmenter, stamped: Path, tmp_path: Path
) -> None:
    rx = RtspListener(keep=40).start()
    try:
        stream = {
            "id": "priv",
            "source": str(stamped),
            "alpha": 0,
            "privacy": privacy(zones=[ZONE]),
            "restream": {"url": rx.url, "bitrate": 8000},
        }
        async with running(model, config(streams=[stream])):
            assert await until(lambda: rx.frames >= 30, 90), rx.frames
            received = [f[:, :, ::-1].copy() for f in rx.received()]  # RGB -> BGR
    finally:
        rx.kill()
    pictures = {}
    for img in received:
        code = stamp.read_image(img)
        if code is not None and not is_blank(img):
            pictures[code[0]] = img
    assert len(pictures) >= 3, len(pictures)
    assert check_fill(model, stamped, pictures, tol=64, far_mean=8, far_p99=64) > 3000


def hf_energy(img: np.ndarray, where: np.ndarray) -> float:
    lap = cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.CV_32F)
    return float(np.abs(lap)[where].mean())


def hf_correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Correlation of the two pictures' fine detail (minus a 3-pixel blur) over `where`."""

    def detail(img: np.ndarray) -> np.ndarray:
        g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
        return (g - cv2.GaussianBlur(g, (0, 0), 3))[where]

    return float(np.corrcoef(detail(a), detail(b))[0, 1])


@pytest.mark.parametrize("style", ["blur", "pixelate"])
async def test_blur_and_pixelate_remove_detail_and_patch_applies_live(
    model: Segmenter, stamped: Path, style: str
) -> None:
    stream = {"id": "priv", "source": str(stamped), "alpha": 0, "privacy": privacy()}
    async with running(model, config(streams=[stream])) as (service, server):
        async with aiohttp.ClientSession() as http:
            url = server.make_url("/api/streams/priv")
            bad = await http.patch(url, json={"privacy": {"style": "smudge"}})
            assert bad.status == 422, await bad.text()
            assert "privacy" in (await bad.text()) and "style" in (await bad.text())
            bad = await http.patch(url, json={"privacy": {"classes": ["unicorn"]}})
            body = await bad.json()
            assert bad.status == 422 and "unicorn" in json.dumps(body), body
            assert "privacy.classes" in json.dumps(body), body
            r = await http.patch(url, json={"privacy": privacy(style=style)})
            assert r.status == 200, await r.text()
            view = service.streams["priv"].view
            assert view.privacy is not None and view.privacy.style == style
            jpegs = await mjpeg_frames(http, str(server.make_url("/streams/priv/mjpeg")), 14)
        pictures = dict(list(stamped_of(jpegs[4:]).items())[:4])  # after the change took hold
        assert len(pictures) >= 3
        originals = clip_frames(stamped, set(pictures))
        for k, pic in pictures.items():
            person = person_mask(model, originals[k])
            assert person.sum() > 1000, k
            # Detail inside: none of the camera's is left (pixelate adds block edges of its
            # own, which match nothing in the camera's picture); outside (far): the same.
            corr = hf_correlation(pic, originals[k], person)
            assert corr < 0.25, (k, corr)
            if style == "blur":
                inner = hf_energy(pic, person)
                assert inner < 0.3 * hf_energy(originals[k], person), (k, inner)
            assert hf_correlation(pic, originals[k], far_from(person, DILATE + 16)) > 0.8
            far = far_from(person, DILATE + 16)
            assert abs(hf_energy(pic, far) - hf_energy(originals[k], far)) < 0.25 * hf_energy(
                originals[k], far
            )


async def test_zones_are_hidden_from_the_first_frame(model: Segmenter, stamped: Path) -> None:
    async with running(model, config()) as (service, _):
        rec = Recorder()
        scfg = StreamConfig.model_validate(
            {"id": "z", "source": str(stamped), "alpha": 0, "privacy": privacy(zones=[ZONE])}
        )
        stream = service.add_stream(scfg)
        stream.view.add_sink(rec)  # before the reader's first frame is decoded
        assert await until(lambda: len(rec.snapshot()) >= 8, 60)
        frames = rec.snapshot()
        assert frames[0][0] <= 2, frames[0][0]  # it saw the stream's first pictures
        assert is_blank(frames[0][3])  # before the first mask: blank
        redacted = [f for f in frames if not is_blank(f[3])]
        assert redacted
        zone = zone_mask(*frames[0][3].shape[:2])
        for _, _, _, img in redacted:
            assert np.all(img[zone] == FILL_RGB[::-1])


class SwitchableSegmenter:
    """The real model, made to fail on demand (as a broken accelerator would)."""

    def __init__(self, real: Segmenter) -> None:
        self._real = real
        self.fail = False
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def segment(self, frames: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS (injected)")
        return self._real.segment(frames)


async def test_failing_inference_blanks_every_frame(model: Segmenter, stamped: Path) -> None:
    seg = SwitchableSegmenter(model)
    stream = {"id": "f", "source": str(stamped), "privacy": privacy()}
    service = Service(config(streams=[stream]), segmenter=seg)  # type: ignore[arg-type]
    server = TestServer(make_app(service), host="127.0.0.1")
    await server.start_server()
    try:
        assert await until(lambda: service.ready, 60)
        view = service.streams["f"].view
        rec = Recorder()
        view.add_sink(rec)
        assert await until(lambda: any(not is_blank(f[3]) for f in rec.snapshot()), 60)
        seg.fail = True
        assert await until(lambda: service.health() is not None, 30)
        failed_at = time.monotonic()
        assert await until(lambda: sum(f[2] > failed_at for f in rec.snapshot()) >= 6, 30)
        after = [f for f in rec.snapshot() if f[2] > failed_at]
        assert all(is_blank(f[3]) for f in after), [is_blank(f[3]) for f in after]
        text = service.metrics.exposition().decode() if service.metrics else ""
        line = [ln for ln in text.splitlines() if 'outcome="blanked",stream="f"' in ln]
        assert line and float(line[0].split()[-1]) >= 6, line
    finally:
        await server.close()


async def test_smooth_output_never_shows_a_mask_older_than_the_limit(
    model: Segmenter, stamped: Path
) -> None:
    """One inference a second, 10 frames a second shown: frames more than 300 ms after their
    mask's frame are blanked, the others redacted (checked against every mask the render
    stage was handed, and when)."""
    stream = {
        "id": "s",
        "source": str(stamped),
        "output": "smooth",
        "infer_fps": 1,
        "privacy": privacy(max_mask_age_ms=300),
    }
    async with running(model, config(streams=[stream])) as (service, _):
        view = service.streams["s"].view
        masks: list[tuple[float, float]] = []  # (mask's frame capture time, when it arrived)
        submit = service.render.submit

        def noting(result: Any) -> None:  # observes, then the real stage takes it
            masks.append((result.frame.capture_ts, time.monotonic()))
            submit(result)

        service.render.submit = noting  # type: ignore[method-assign]
        rec = Recorder()
        view.add_sink(rec)
        blank: dict[int, bool] = {}  # frame index in rec -> blanked

        def enough() -> bool:
            """Both kinds seen: >= 3 frames shown and >= 10 blanked after the first shown (the
            model may lag the limit for a while on a loaded machine: then all are blank)."""
            frames = rec.snapshot()
            for i in range(len(blank), len(frames)):
                blank[i] = is_blank(frames[i][3])
            shown = [i for i, b in blank.items() if not b]
            return len(shown) >= 3 and sum(b for i, b in blank.items() if i > shown[0]) >= 10

        assert await until(enough, 120, step=0.2), (len(blank), sum(blank.values()))
        frames = rec.snapshot()
        shown = [f for i, f in enumerate(frames) if i in blank and not blank[i]]
        for _, capture, put, _ in shown:
            # The freshest mask that existed when the frame was handed out, no newer than it:
            # the one used was at best this fresh.
            known = [c for c, at in masks if at <= put and c <= capture]
            assert known, "a frame shown before any mask"
            assert capture - max(known) <= 0.3 + 1e-3, capture - max(known)


async def test_raw_view_is_for_an_admin_with_admin_raw_alone(
    model: Segmenter, stamped: Path, tmp_path: Path, segstream_home: Path
) -> None:
    tokens = TokenStore(tmp_path / "auth/tokens.json")
    admin, viewer = tokens.add("alice", "admin"), tokens.add("bob", "viewer")
    auth = Authenticator(tokens, load_secret(tmp_path / "auth/secret.key"))
    streams = [
        {"id": "open", "source": str(stamped), "alpha": 0, "privacy": privacy(admin_raw=True)},
        {"id": "shut", "source": str(stamped), "alpha": 0, "privacy": privacy()},
    ]
    audit = segstream_home / "privacy-audit.jsonl"
    before = audit.read_text().count("\n") if audit.exists() else 0
    async with running(model, config(streams=streams), auth) as (service, server):
        for sid in ("open", "shut"):
            view = service.streams[sid].view
            assert await until(lambda v=view: v.result is not None, 60)  # type: ignore[misc]
        as_admin = {"Authorization": f"Bearer {admin}"}
        as_viewer = {"Authorization": f"Bearer {viewer}"}
        exp = int(time.time()) + 300
        async with aiohttp.ClientSession() as http:

            async def get(path: str, headers: dict[str, str] | None = None) -> int:
                async with http.get(server.make_url(path), headers=headers) as r:
                    return r.status

            for path in ("/streams/{}/snapshot.jpg?raw=1", "/streams/{}/mjpeg?raw=1"):
                assert await get(path.format("shut"), as_admin) == 403
                assert await get(path.format("open"), as_viewer) == 403
                plain = path.format("open").split("?")[0]
                sig = auth.sign_path(plain, "open", exp)
                assert await get(f"{plain}?raw=1&exp={exp}&sig={sig}") == 403
                assert await get(f"{plain}?exp={exp}&sig={sig}&fps=1") == 200  # redacted is fine
            r = await http.get(
                server.make_url("/streams/open/snapshot.jpg?raw=1"), headers=as_admin
            )
            assert r.status == 200
            raw_snap = decode(await r.read())
            raw_mjpeg = await mjpeg_frames(
                http, str(server.make_url("/streams/open/mjpeg?raw=1")), 3, headers=as_admin
            )
        # Raw: the people are there (no fill colour on the person mask of that frame).
        for pic in [raw_snap, *map(decode, raw_mjpeg)]:
            code = stamp.read_image(pic)
            assert code is not None  # nothing covers the stamp in a raw picture
            person = person_mask(model, clip_frames(stamped, {code[0]})[code[0]])
            fill = np.abs(pic.astype(np.int16) - np.array(FILL_RGB[::-1])).max(axis=2) <= 48
            assert person.sum() > 1000 and fill[person].mean() < 0.05
        text = service.metrics.exposition().decode() if service.metrics else ""
        assert 'segstream_privacy_raw_views_total{stream="open"} 2.0' in text, text[-2000:]
    assert await until(lambda: audit.exists() and audit.read_text().count("\n") >= before + 4, 10)
    lines = [json.loads(ln) for ln in audit.read_text().splitlines()[before:]]
    assert {(e["who"], e["stream"], e["kind"], e["event"]) for e in lines} == {
        ("alice", "open", k, ev) for k in ("snapshot", "mjpeg") for ev in ("start", "end")
    }
    assert all(e["seconds"] >= 0 for e in lines if e["event"] == "end")


DOOR = [[0.75, 0.5], [1.0, 0.5], [1.0, 0.75], [0.75, 0.75]]  # a person: ~1.5-5.5 s of each loop
WHOLE = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]  # people all the time


def clip_pictures(mp4: bytes, tmp: Path) -> tuple[dict[int, np.ndarray], float, int, float]:
    """A clip's frames by their stamped number (BGR), its duration, frame count and the time
    of its last frame."""
    path = tmp / "clip.mp4"
    path.write_bytes(mp4)
    got: dict[int, np.ndarray] = {}
    count, last = 0, 0.0
    with av.open(str(path)) as f:
        duration = float(f.duration or 0) / av.time_base
        for fr in f.decode(f.streams.video[0]):
            count += 1
            last = float(fr.time or 0.0)
            img = fr.to_ndarray(format="bgr24")
            code = stamp.read_image(img)
            if code is not None and not is_blank(img):
                got[code[0]] = img
    return got, duration, count, last


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_event_clips_are_redacted_and_span_pre_roll_to_end_within_the_cap(
    model: Segmenter, stamped: Path, tmp_path: Path
) -> None:
    rule = {"class": "person", "for_s": 0.3}
    stream = {
        "id": "priv",
        "source": str(stamped),
        "alpha": 0,
        "privacy": privacy(zones=[ZONE]),
        "record_clips": True,
        "zones": [
            {"name": "door", "polygon": DOOR, "rules": [{**rule, "above": 0.03, "clear_s": 1}]},
            {"name": "all", "polygon": WHOLE, "rules": [{**rule, "above": 0.002, "clear_s": 30}]},
        ],
    }
    cfg = config(
        streams=[stream],
        events={
            "database": f"sqlite:///{tmp_path / 'events.db'}",
            "clips": {"pre_roll_s": 1.0, "max_s": 8.0},
        },
    )
    async with running(model, cfg) as (service, server), aiohttp.ClientSession() as http:

        async def get(path: str) -> tuple[int, Any]:
            async with http.get(server.make_url(path)) as r:
                body = await r.read()
                return r.status, (json.loads(body) if r.content_type.endswith("json") else body)

        async def event(zone: str, pred: Any) -> dict[str, Any]:
            found: list[dict[str, Any]] = []

            async def check() -> bool:
                _, page = await get(f"/api/events?stream=priv&zone={zone}")
                found[:] = [e for e in page["events"] if pred(e)]
                return bool(found)

            deadline = time.monotonic() + 90
            while not await check() and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            assert found, zone
            return found[0]

        # A door event (ended, its clip finished): pre-roll + the event, redacted.
        door = await event("door", lambda e: e["end"] and e["clip_url"])
        status, mp4 = await get(door["clip_url"])
        assert status == 200 and mp4[4:8] == b"ftyp", status
        pictures, duration, count, _ = clip_pictures(mp4, tmp_path)
        span = epoch(door["end"]) - epoch(door["start"]) + 1.0
        # It starts at the keyframe (one a second) at or before start - pre_roll and ends at
        # the frame at or before the end: within a frame (at the stream's output rate).
        step = duration / count
        assert span - step - 0.1 <= duration <= span + 1.0 + 2 * step, (duration, span, door)
        assert count >= 10 and door["clip_truncated"] is False
        assert len(pictures) >= 3, len(pictures)
        some = dict(sorted(pictures.items())[:: max(1, len(pictures) // 8)])  # 8 or so suffice
        assert check_fill(model, stamped, some, tol=64, far_mean=8, far_p99=64) > 3000

        # Players ask for byte ranges.
        url = server.make_url(door["clip_url"])
        async with http.get(url, headers={"Range": "bytes=4-11"}) as r:
            assert r.status == 206 and await r.read() == mp4[4:12]
            assert r.headers["Content-Range"] == f"bytes 4-11/{len(mp4)}"
        async with http.get(url, headers={"Range": f"bytes={len(mp4)}-"}) as r:
            assert r.status == 416 and "error" in await r.json()

        # People are in the whole picture all the time: that event's clip stops at the cap.
        whole = await event("all", lambda e: e["clip_url"])
        assert whole["end"] is None and whole["clip_truncated"] is True
        status, mp4 = await get(whole["clip_url"])
        _, _, _, last = clip_pictures(mp4, tmp_path)
        assert 8.0 - 1.0 <= last < 8.0, last  # the last frame shown starts within the cap

        # No clip: 404 with a JSON error; deleting the event deletes its clip file.
        status, body = await get(f"/api/events/{'0' * 32}/clip.mp4")
        assert status == 404 and "error" in body, body
        clip_file = service.events.store.media_path(door["id"], "clip")  # type: ignore[union-attr]
        assert clip_file.stat().st_size > 1000
        async with http.delete(server.make_url(f"/api/events/{door['id']}")) as r:
            assert r.status == 204
        assert not clip_file.exists()
        status, body = await get(door["clip_url"])
        assert status == 404 and "error" in body
        # record_clips changes live: the recorder leaves the stream's sinks, the reader stays.
        view, reader = service.streams["priv"].view, service.streams["priv"].source
        assert sum(isinstance(x, ClipRecorder) for x in view.sinks) == 1
        async with http.patch(
            server.make_url("/api/streams/priv"), json={"record_clips": False}
        ) as r:
            assert r.status == 200, await r.text()
        assert not any(isinstance(x, ClipRecorder) for x in view.sinks)
        assert service.streams["priv"].source is reader
        _, spec = await get("/openapi.json")
        assert (
            "video/mp4"
            in spec["paths"]["/api/events/{id}/clip.mp4"]["get"]["responses"]["200"]["content"]
        )
