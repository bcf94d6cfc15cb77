#!/usr/bin/env python
"""The pictures of the README and the docs site, made by the project itself.

Starts `segstream serve` (a subprocess, the real model) on the sample clips (four cameras:
people in a hall, one of them with privacy redaction, cars on a road, one with an event zone),
opens the live page in headless Chromium (DevTools protocol) and writes:

  docs/img/page.png        the live page with the four annotated cameras
  docs/img/large-view.png  one camera's large view (click on a tile)
  docs/img/frame.png       one annotated frame up close, as /streams/{id}/snapshot.jpg serves it
  docs/img/mosaic.png      /mosaic/mjpeg: the four cameras tiled into one MJPEG

Each PNG is kept under --max-kb (palette-quantised if needed). Run it again after a UI change:

  SEGSTREAM_SHARED=../shared .venv/bin/python scripts/screenshots.py      # ~1-2 min

It needs the model weights in $SEGSTREAM_HOME (`segstream fetch`, or --fetch-from ../shared)
and Debian's chromium (scripts/install_system_deps.sh test).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the support package: the service and Chromium drivers

from support.peers import CdpPage, Chromium  # noqa: E402
from support.service_proc import ServiceProcess, read_part  # noqa: E402

HALL = [[0.0, 0.55], [0.45, 0.55], [0.45, 1.0], [0.0, 1.0]]
ROAD = [[0.3, 0.6], [0.7, 0.6], [0.95, 1.0], [0.05, 1.0]]


def config(video: Path) -> dict[str, Any]:
    vtest, road = str(video / "vtest.avi"), str(video / "solidWhiteRight.mp4")
    common = {"infer_fps": 2, "output": "segmented", "gate": {"mode": "off"}}
    rule = {"above": 0.02, "for_s": 0.5, "clear_s": 2.0}
    return {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 2, "threads": 1},
        "render": {"alpha": 0.7},
        "streams": [
            {"id": "hall", "source": vtest, **common},
            {
                "id": "hall-private",
                "source": vtest,
                **common,
                "privacy": {"classes": ["person"], "style": "blur", "dilate": 8},
            },
            {"id": "road", "source": road, **common},
            {
                "id": "road-zone",
                "source": road,
                **common,
                "zones": [{"name": "lane", "polygon": ROAD, "rules": [{"class": "car", **rule}]}],
            },
        ],
    }


async def _viewport(page: CdpPage, width: int, height: int) -> None:
    await page.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


async def shoot_page(chrome: Chromium, base: str, ids: list[str], focus: str) -> dict[str, Any]:
    async with chrome.page() as page:
        await _viewport(page, 1400, 900)
        await page.goto(base + "/", 0.2)
        tiles_ready = " && ".join(
            f"+(document.querySelector('[data-stream=\"{s}\"]')?.dataset.frames || 0) >= 3"
            for s in ids
        )
        await page.wait_for(tiles_ready, 120)
        # The page is shorter than the window: keep what it shows.
        bottom = await page.eval(
            "Math.max(...[...document.body.querySelectorAll('*')]"
            ".map(e => e.getBoundingClientRect().bottom))"
        )
        shots = {"page": (await page.screenshot())[: int(bottom) + 12]}
        await page.eval(f"document.querySelector('[data-stream=\"{focus}\"] .pic').click(), true")
        await page.wait_for(
            "!document.getElementById('focus').hidden && "
            "+(document.getElementById('focus').dataset.frames || 0) >= 3",
            60,
        )
        shots["large-view"] = await page.screenshot()
        return shots


def mosaic_frame(svc: ServiceProcess) -> np.ndarray:
    import urllib.request

    req = urllib.request.Request(svc.base + "/mosaic/mjpeg?cols=2&width=1280")
    with urllib.request.urlopen(req, timeout=30) as r:
        for _ in range(60):  # until every tile shows a picture (a stream may not have one yet)
            img = cv2.imdecode(np.frombuffer(read_part(r), np.uint8), cv2.IMREAD_COLOR)
            h, w = img.shape[:2]
            quads = [
                img[y : y + h // 2 - 30, x : x + w // 2] for y in (0, h // 2) for x in (0, w // 2)
            ]
            if min(float(q.mean()) for q in quads) > 40:
                break
    return img


def snapshot(svc: ServiceProcess, sid: str, class_id: int, tries: int = 12) -> np.ndarray:
    """The annotated frame, up close: of `tries` snapshots 0.4 s apart, the one whose mask
    (taken right after it) has the most pixels of class_id."""
    best: tuple[int, bytes] = (-1, b"")
    for _ in range(tries):
        status, jpeg, _ = svc.get(f"/streams/{sid}/snapshot.jpg")
        status2, png, _ = svc.get(f"/streams/{sid}/mask.png")
        if status != 200 or status2 != 200:
            raise RuntimeError(f"snapshot of {sid}: {status}, mask {status2}")
        mask = np.asarray(Image.open(io.BytesIO(png)))
        best = max(best, (int((mask == class_id).sum()), jpeg))
        time.sleep(0.4)
    return cv2.imdecode(np.frombuffer(best[1], np.uint8), cv2.IMREAD_COLOR)


def png_bytes(img: np.ndarray, colours: int | None) -> bytes:
    pic = Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    if colours:
        pic = pic.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    pic.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def write_png(path: Path, img: np.ndarray, max_kb: int) -> int:
    """A PNG under max_kb: full colour, else 256 colours, else scaled down step by step."""
    scale = 1.0
    while True:
        out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        for colours in (None, 256):
            data = png_bytes(out, colours)
            if len(data) <= max_kb * 1024:
                path.write_bytes(data)
                return len(data)
        scale *= 0.85


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    shared = Path(os.environ.get("SEGSTREAM_SHARED", REPO.parent / "shared"))
    ap.add_argument("--video", type=Path, default=shared / "data" / "video")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--max-kb", type=int, default=400)
    ap.add_argument("--fetch-from", type=Path, help="fetch the weights from here")
    args = ap.parse_args()
    if args.fetch_from:
        from segstream.models import fetch

        fetch.fetch(from_dir=args.fetch_from, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config(args.video)
    ids = [s["id"] for s in cfg["streams"]]
    with tempfile.TemporaryDirectory(prefix="segstream-shots-") as tmp:
        work = Path(tmp)
        svc = ServiceProcess(work, cfg).start(ready_timeout=180)
        chrome = Chromium(work / "chrome")
        try:
            for sid in ids:
                svc.wait_state(sid, {"live"}, 60)
            shots = asyncio.run(shoot_page(chrome, svc.base, ids, focus="hall"))
            shots["frame"] = snapshot(svc, "hall", class_id=15)  # VOC person
            shots["mosaic"] = mosaic_frame(svc)
        finally:
            chrome.close()
            svc.stop()
    sizes = {}
    for name, img in shots.items():
        sizes[name] = write_png(args.out / f"{name}.png", img, args.max_kb)
    print(json.dumps({"out": str(args.out), "bytes": sizes, "at": time.strftime("%F %T")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
