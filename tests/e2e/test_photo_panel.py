"""The page's "Try a photo" panel in real Chromium, as a viewer, under a strict
Content-Security-Policy: a photo of people through the file input is drawn with the overlay
(person pixels changed, background untouched), its classes listed with the shares of
`/api/predict`'s mask; a text file and a 16000x16000 PNG are refused in words, and the panel
works again after them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from support.peers import CdpPage, Chromium, free_port
from support.service_proc import ServiceProcess
from support.waiting import until

from segstream.stream.auth import TokenStore

pytestmark = pytest.mark.e2e

PERSON = 15  # Pascal VOC
NODE_SECRET = "cluster-" + uuid.uuid4().hex
MAX_BYTES = 1_000_000  # the people PNG is ~0.3 MB, the noise one ~1.7 MB
PANEL = "document.querySelector('[data-predict]')"
CANVAS = "document.querySelector('[data-predict-result]')"


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    auth = tmp_path_factory.mktemp("auth")
    return auth, TokenStore(auth / "tokens.json").add("watcher", "viewer")


@pytest.fixture(scope="module")
def service(tmp_path_factory, segstream_home: Path, viewer: tuple[Path, str]):
    auth, token = viewer
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "auth": {"tokens_dir": str(auth)},
        "predict": {"max_bytes": MAX_BYTES},
        "streams": [],
    }
    env = {"SEGSTREAM_ADMIN_TOKEN": NODE_SECRET}  # how a gateway's requests get in
    svc = ServiceProcess(tmp_path_factory.mktemp("photo"), cfg, token=token, env=env).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def gateway(service: ServiceProcess, viewer: tuple[Path, str]) -> Iterator[str]:
    """The cluster gateway (in a thread of this process) in front of the service as its one
    node, the controller's snapshot fixed (as in test_cluster.py): the page and /api/predict as
    the gateway serves and relays them."""
    from aiohttp import web

    from segstream.stream.auth import Authenticator
    from segstream.stream.cluster.gateway import ClusterClient, make_gateway_app
    from segstream.stream.cluster.snapshot import ClusterSnapshot
    from segstream.stream.config import AppConfig
    from segstream.stream.datatypes import NodeState
    from segstream.stream.schemas import NodeStatus

    node = NodeStatus(
        id="node1",
        ray_id="r1",
        host="127.0.0.1",
        port=service.port,
        metrics_port=1,
        slots=1.0,
        load=0.0,
        streams=0,
        state=NodeState.UP,
        ready=True,
        error=None,
    )
    snap = ClusterSnapshot(version=1, nodes=[node], streams=[])

    class Fixed(ClusterClient):
        async def snapshot(self, fresh: bool = False, stale_ok: bool = False) -> ClusterSnapshot:
            return snap

    cfg = AppConfig.model_validate(
        {"model": {"name": "mnv2-voc"}, "predict": {"max_bytes": MAX_BYTES}, "streams": []}
    )
    auth = Authenticator.from_home(viewer[0], env={})
    port, loop = free_port(), asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(make_gateway_app(cfg, Fixed(None, NODE_SECRET), auth))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    c = Chromium(tmp_path_factory.mktemp("chrome"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_dir: Path) -> dict[str, Path]:
    """People walking (a crop of a vtest.avi frame, 7 % person; PNG: lossless, so the
    browser's pixels are the file's), the same
    frame as a JPEG stored turned with an EXIF orientation, a text file, a PNG of 16000x16000
    pixels (31 kB) and one of more bytes than the service takes."""
    d = tmp_path_factory.mktemp("photos")
    cap = cv2.VideoCapture(str(shared_dir / "data/video/vtest.avi"))
    for _ in range(601):
        ok, frame = cap.read()
        assert ok
    cap.release()
    frame = np.ascontiguousarray(frame[216:576, 288:768])
    cv2.imwrite(str(d / "people.png"), frame)
    # Orientation 6: the camera was turned; the viewer turns the stored pixels 90 deg clockwise.
    stored = Image.fromarray(frame[..., ::-1]).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(d / "turned.jpg", quality=95, exif=exif)
    (d / "notes.txt").write_text("not a photo at all\n")
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), np.uint8)
    cv2.imwrite(str(d / "noise.png"), noise)
    assert (d / "noise.png").stat().st_size > MAX_BYTES
    Image.new("L", (16000, 16000)).save(d / "huge.png", optimize=True)
    return {p.stem: p for p in d.iterdir()}


def predict_mask(service: ServiceProcess, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The class ids and the RGB palette of /api/predict's palette PNG for the file."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"'
            "\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        service.base + "/api/predict?format=png",
        data=body,
        headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Authorization": f"Bearer {service.token}",
        },
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        png = Image.open(io.BytesIO(r.read()))
    palette = png.getpalette()
    assert png.mode == "P" and palette is not None
    return np.asarray(png), np.array(palette, np.float64).reshape(-1, 3)


async def open_under_csp(page: CdpPage, url: str) -> None:
    """Navigates to url (the service sends its strict Content-Security-Policy with the page),
    recording every violation the browser reports."""
    await page.call(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": "window.cspViolations = []; document.addEventListener("
            "'securitypolicyviolation', e => window.cspViolations.push("
            "e.violatedDirective + ' ' + e.blockedURI));"
        },
    )
    with urllib.request.urlopen(url, timeout=10) as r:  # the page, or /login before it
        assert "'unsafe-inline'" not in r.headers["Content-Security-Policy"].split("style-src")[0]
    await page.goto(url, settle_s=0)


async def login(page: CdpPage, base: str, token: str | None) -> None:
    """A viewer's session, as the login page makes it: the token for a cookie."""
    await page.goto(base + "/login", 0.2)
    await page.wait_for("document.readyState === 'complete'")
    status = await page.eval(
        "fetch('/api/login', {method: 'POST', headers: {'Content-Type': 'application/json'}, "
        f"body: JSON.stringify({{token: {json.dumps(token)}}})}}).then(r => r.status)"
    )
    assert status == 200, status


async def upload(page: CdpPage, path: Path) -> dict[str, Any]:
    """Puts the file into the panel's file input; the panel's state and texts once it has
    answered."""
    await page.eval(f"{PANEL}.dataset.state = 'test', true")
    found = await page.call(
        "Runtime.evaluate", {"expression": f"{PANEL}.querySelector('input[type=file]')"}
    )
    await page.call(
        "DOM.setFileInputFiles", {"files": [str(path)], "objectId": found["result"]["objectId"]}
    )
    return await answered(page)


async def answered(page: CdpPage) -> dict[str, Any]:
    state = await page.wait_for(
        f"['done', 'error'].includes({PANEL}.dataset.state) && {PANEL}.dataset.state", 60
    )
    texts = await page.eval(
        f"JSON.stringify({{status: {PANEL}.querySelector('[data-predict-status]').textContent, "
        f"classes: document.querySelector('[data-predict-classes]').textContent, "
        f"shown: !{PANEL}.querySelector('.photo-out').hidden, "
        f"size: [{CANVAS}.width, {CANVAS}.height]}})"
    )
    return {"state": state, **json.loads(texts)}


async def drop(page: CdpPage, path: Path) -> dict[str, Any]:
    """A person drags the file from their desktop onto the page's legend (not the panel)."""
    await page.eval(f"{PANEL}.dataset.state = 'test', true")
    x, y = json.loads(
        await page.eval(
            "(() => { const r = document.getElementById('legend').getBoundingClientRect();"
            "return JSON.stringify([r.x + 10, r.y + 5]); })()"
        )
    )
    data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        await page.call("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
    return await answered(page)


async def paste(page: CdpPage) -> dict[str, Any]:
    """A paste of a picture from the clipboard: a copy of the canvas as drawn (PNG, no name)."""
    await page.eval(f"{PANEL}.dataset.state = 'test', true")
    await page.eval(f"""new Promise(done => {CANVAS}.toBlob(blob => {{
        const dt = new DataTransfer();
        dt.items.add(new File([blob], '', {{type: 'image/png'}}));
        document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: dt, bubbles: true}}));
        done(true); }}, 'image/png'))""")
    return await answered(page)


async def canvas_pixels(page: CdpPage) -> np.ndarray:
    url = await page.eval(f"{CANVAS}.toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


async def draw_as(page: CdpPage, mode: str, classes: list[str]) -> np.ndarray:
    """The canvas after a person sets the drawing and ticks these classes in the list."""
    await page.eval(f"""(() => {{
        const f = {PANEL}.querySelector('.photo-controls');
        f.elements.mode.value = {json.dumps(mode)};
        f.dispatchEvent(new Event('input'));
        for (const row of document.querySelectorAll('[data-predict-classes] label')) {{
            const box = row.querySelector('input');
            if (box.checked !== {json.dumps(classes)}.includes(row.dataset.class)) box.click();
        }}
        return true; }})()""")
    return await canvas_pixels(page)


def share(classes_text: str, name: str) -> float:
    m = re.search(rf"{name} (\d+\.\d) %", classes_text)
    assert m, classes_text
    return float(m.group(1))


def check_overlay(
    shot: np.ndarray, photo: np.ndarray, ids: np.ndarray, coloured: set[int], palette: np.ndarray
) -> None:
    """Alpha 0.5: pixels of a coloured class are half its colour, half the photo (all of them
    changed); every other pixel is exactly the photo's."""
    assert shot.shape == photo.shape, (shot.shape, photo.shape)
    plain = ~np.isin(ids, list(coloured))
    assert (shot[plain] == photo[plain]).all(), int((shot[plain] != photo[plain]).any(axis=1).sum())
    for c in coloured:
        where = ids == c
        assert where.any(), c
        changed = (shot[where] != photo[where]).any(axis=1).mean()
        assert changed > 0.99, (c, changed)
        want = 0.5 * photo[where].astype(np.float64) + 0.5 * palette[c][::-1]
        assert np.abs(shot[where] - want).max() <= 2, (c, np.abs(shot[where] - want).max())


def test_try_a_photo(
    service: ServiceProcess, chrome: Chromium, photos: dict[str, Path], tmp_path: Path
) -> None:
    photo = cv2.imread(str(photos["people"]), cv2.IMREAD_COLOR)
    ids, palette = predict_mask(service, photos["people"])
    assert ids.shape == photo.shape[:2]
    found = {int(c) for c in np.unique(ids)} - {0}
    assert PERSON in found and len(found) >= 2, found  # people and something else
    person_pct = 100 * float((ids == PERSON).mean())
    assert person_pct > 5, person_pct
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    async def run() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with chrome.page() as page:
            await login(page, service.base, service.token)
            await open_under_csp(page, service.base + "/")
            await page.wait_for("document.getElementById('who').textContent.includes('viewer')")
            await page.wait_for("window.segstream.opened === 1")  # the live WebSocket too
            # The policy holds: an inline script without its hash does not run.
            seen["probe"] = await page.eval(
                "(() => { const s = document.createElement('script');"
                "s.textContent = 'window.probe = 1'; document.head.append(s);"
                "return window.probe === undefined; })()"
            )
            await page.wait_for("window.cspViolations.length === 1")
            await page.eval("window.cspViolations.length = 0")
            await page.eval(f"{PANEL}.querySelector('summary').click(), true")
            seen["open"] = await page.eval(f"{PANEL}.open")
            seen["first"] = await upload(page, photos["people"])
            seen["overlay"] = await canvas_pixels(page)
            # The downloads, as a person gets them: a click on each link.
            await page.call(
                "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
            )
            for link in ("photo-mask", "photo-annotated"):
                await page.eval(f"{PANEL}.querySelector('.{link}').click(), true")
            names = {"people-mask.png", "people-segmented.png"}
            assert await until(lambda: names <= {p.name for p in downloads.iterdir()}, 20)
            seen["person only"] = await draw_as(page, "overlay", ["person"])
            seen["mask"] = await draw_as(page, "mask", [])
            seen["off"] = await draw_as(page, "off", [])
            await draw_as(page, "overlay", [])
            seen["text"] = await upload(page, photos["notes"])
            seen["huge"] = await upload(page, photos["huge"])
            seen["bulky"] = await upload(page, photos["noise"])
            seen["refused"] = await page.screenshot()
            seen["again"] = await upload(page, photos["people"])
            seen["again_pixels"] = await canvas_pixels(page)
            await page.eval(f"{PANEL}.scrollIntoView(), true")
            seen["screenshot"] = await page.screenshot()
            seen["turned"] = await upload(page, photos["turned"])
            seen["dropped"] = await drop(page, photos["people"])
            await draw_as(page, "off", [])  # the canvas holds the photo itself: copied, pasted
            seen["pasted"] = await paste(page)
            seen["violations"] = await page.eval("window.cspViolations")
            seen["who"] = await page.eval("document.body.classList.contains('admin')")
        return seen

    seen = asyncio.run(run())
    for name in ("screenshot", "refused"):  # for a person to look at
        cv2.imwrite(str(tmp_path / f"photo-panel-{name}.png"), seen[name])
    print("screenshots in", tmp_path)
    print({k: v for k, v in seen.items() if isinstance(v, dict)})
    assert seen["probe"] is True and seen["violations"] == [], seen["violations"]
    assert seen["who"] is False and seen["open"] is True  # a viewer, not an admin

    first = seen["first"]
    assert first["state"] == "done" and first["shown"], first
    assert first["size"] == [photo.shape[1], photo.shape[0]], first
    assert abs(share(first["classes"], "person") - person_pct) <= 0.5, (first, person_pct)
    check_overlay(seen["overlay"], photo, ids, found, palette)
    check_overlay(seen["person only"], photo, ids, {PERSON}, palette)
    assert (seen["off"] == photo).all()  # drawing off: the photo itself
    mask_only = np.where(ids[..., None] == 0, 0, palette[ids][..., ::-1])
    assert (seen["mask"] == mask_only).all()  # mask only: the colours on black
    linked = Image.open(downloads / "people-mask.png")
    assert linked.mode == "P" and (np.asarray(linked) == ids).all()  # the class mask
    annotated = cv2.imread(str(downloads / "people-segmented.png"), cv2.IMREAD_COLOR)
    assert (annotated == seen["overlay"]).all()  # the picture as drawn

    text, huge = seen["text"], seen["huge"]
    assert text["state"] == "error" and not text["shown"], text
    assert text["status"].startswith("notes.txt is not a picture the service can read."), text
    assert huge["state"] == "error" and not huge["shown"], huge
    assert huge["status"].startswith("huge.png has too many pixels to segment here"), huge
    assert "pixels" in huge["status"], huge
    bulky = seen["bulky"]
    assert bulky["state"] == "error" and not bulky["shown"], bulky
    assert bulky["status"].startswith("noise.png (4.3 MB) is too large to segment"), bulky
    assert f"larger than {MAX_BYTES} bytes" in bulky["status"], bulky

    again = seen["again"]
    assert again["state"] == "done" and again["shown"], again
    assert abs(share(again["classes"], "person") - person_pct) <= 0.5, again
    check_overlay(seen["again_pixels"], photo, ids, found, palette)

    for how in ("dropped", "pasted"):
        got = seen[how]
        assert got["state"] == "done" and got["size"] == [photo.shape[1], photo.shape[0]], got
        assert abs(share(got["classes"], "person") - person_pct) <= 0.5, (got, person_pct)
    assert seen["pasted"]["status"].startswith("the pasted picture: 480×360"), seen["pasted"]

    turned = seen["turned"]  # sent upright: the picture as its camera meant it
    assert turned["state"] == "done" and turned["size"] == [photo.shape[1], photo.shape[0]], turned
    assert abs(share(turned["classes"], "person") - person_pct) <= 1.5, (turned, person_pct)


def test_try_a_photo_through_the_cluster_gateway(
    service: ServiceProcess, gateway: str, chrome: Chromium, photos: dict[str, Path]
) -> None:
    """The gateway serves the same page and relays /api/predict to a ready node."""
    ids, _ = predict_mask(service, photos["people"])
    person_pct = 100 * float((ids == PERSON).mean())

    async def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with chrome.page() as page:
            await login(page, gateway, service.token)
            await page.goto(gateway + "/", 0.2)
            await page.wait_for("document.getElementById('who').textContent.includes('viewer')")
            return (
                await upload(page, photos["people"]),
                await upload(page, photos["noise"]),
                await upload(page, photos["notes"]),
            )

    good, bulky, text = asyncio.run(run())
    assert good["state"] == "done" and good["shown"], good
    assert abs(share(good["classes"], "person") - person_pct) <= 0.5, (good, person_pct)
    assert bulky["state"] == "error" and bulky["status"].startswith(
        "noise.png (4.3 MB) is too large to segment"
    )
    assert text["state"] == "error", text
    assert text["status"].startswith("notes.txt is not a picture the service can read."), text
