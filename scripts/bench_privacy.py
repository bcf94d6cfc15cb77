#!/usr/bin/env python
"""The cost of privacy redaction.

1. Milliseconds per 1280x720 frame of `Redactor.apply` for each style, with the real model's
   mask of a real vtest frame with people (dilate 8 and one static zone), wall and CPU.
2. The service's output fps on 4 streams (vtest, real time, the real model, in-process), each
   with a sink that takes and encodes every frame, without privacy and with it (blur).

Prints one JSON line per case:
  python scripts/bench_privacy.py [--seconds 3] [--service-seconds 20] [--skip-service]
3. With --recall DIR (a CamVid-style folder: images/, masks/ with Pedestrian = 9): how much of
   what people the labels mark the redaction hides (the model's person mask, and the hidden
   area with dilate 8), by pixel and by person (a connected Pedestrian region of >= 200 px
   counts as hidden when >= 50 % of it is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segstream.models.runtime import load_segmenter, prepare
from segstream.stream.config import AppConfig
from segstream.stream.datatypes import Rendered
from segstream.stream.render.privacy import Redactor
from segstream.stream.service import Service

SHARED = Path(os.environ.get("SEGSTREAM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VIDEO = SHARED / "data" / "video" / "vtest.avi"
STYLES = ("blur", "pixelate", "fill", "silhouette")
ZONE = [[0.75, 0.0], [1.0, 0.0], [1.0, 0.2], [0.75, 0.2]]


def camera_frame(w: int = 1280, h: int = 720) -> np.ndarray:
    cap = cv2.VideoCapture(str(VIDEO))
    for _ in range(30):  # a frame with pedestrians in it
        ok, img = cap.read()
    cap.release()
    assert ok, VIDEO
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def time_it(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Median wall and process-CPU ms per call over about `seconds`."""
    for _ in range(5):
        fn()
    wall: list[float] = []
    cpu: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1000, statistics.median(cpu) * 1000


def bench_styles(seconds: float) -> None:
    cv2.setNumThreads(1)  # as the service runs
    seg = load_segmenter("mnv2-voc", "tflite", batch_sizes=(1,), threads=1)
    frame = camera_frame()
    mask = seg.segment(prepare(frame, seg.input_size, bgr=True)[None])[0]
    person = float((mask == seg.labels.index("person")).mean())
    for style in STYLES:
        red = Redactor(seg.labels, ["person"], style=style, dilate=8, zones=[ZONE])  # type: ignore[arg-type]
        wall, cpu = time_it(lambda r=red: r.apply(frame, mask), seconds)
        print(
            json.dumps(
                {
                    "case": "redact_720p",
                    "style": style,
                    "wall_ms": round(wall, 3),
                    "cpu_ms": round(cpu, 3),
                    "person_fraction": round(person, 4),
                    "mask": list(mask.shape),
                }
            ),
            flush=True,
        )
    red = Redactor(seg.labels, ["person"])
    wall, cpu = time_it(lambda: red.blank(frame.shape, "model failing"), seconds)
    print(json.dumps({"case": "blank_720p", "wall_ms": round(wall, 3), "cpu_ms": round(cpu, 3)}))
    seg.close()


class Counter:
    """A sink that takes every frame and encodes it, as the MJPEG sink does."""

    name = "counter"

    def __init__(self) -> None:
        self.frames = 0

    def wants_frames(self) -> bool:
        return True

    def put(self, frame: Rendered) -> None:
        frame.jpeg()
        self.frames += 1

    def close(self) -> None:
        pass


async def service_fps(private: bool, seconds: float) -> dict[str, Any]:
    streams = [
        {"id": f"s{i}", "source": str(VIDEO), **({"privacy": {"style": "blur"}} if private else {})}
        for i in range(4)
    ]
    cfg = AppConfig.model_validate(
        {"model": {"name": "mnv2-voc", "backend": "tflite"}, "streams": streams}
    )
    service = Service(cfg)
    await service.start()
    try:
        counters = {}
        for sid, s in service.streams.items():
            counters[sid] = c = Counter()
            s.view.add_sink(c)
        await asyncio.sleep(3)  # warm: first masks, pacing settled
        before = {sid: c.frames for sid, c in counters.items()}
        c0 = time.process_time()
        await asyncio.sleep(seconds)
        cpu = time.process_time() - c0
        fps = {sid: (c.frames - before[sid]) / seconds for sid, c in counters.items()}
    finally:
        await service.stop()
    text = service.metrics.exposition().decode() if service.metrics else ""
    redact = [ln for ln in text.splitlines() if ln.startswith("segstream_stage_seconds_")]
    sums = {ln.split("{")[0].rsplit("_", 1)[1]: float(ln.split()[-1]) for ln in redact
            if 'stage="redact"' in ln and ("_sum" in ln or "_count" in ln)}  # fmt: skip
    out: dict[str, Any] = {
        "case": "service_4_streams",
        "privacy": "blur" if private else "off",
        "fps_out_total": round(sum(fps.values()), 2),
        "fps_out": {k: round(v, 2) for k, v in fps.items()},
        "cpu_s_per_s": round(cpu / seconds, 3),
    }
    if sums.get("count"):
        out["redact_ms_mean"] = round(1000 * sums["sum"] / sums["count"], 3)
    return out


def person_recall(folder: Path, dilate: int = 8) -> dict[str, Any]:
    seg = load_segmenter("mnv2-voc", "tflite", batch_sizes=(1,), threads=1)
    red = Redactor(seg.labels, ["person"], dilate=dilate)
    pix = hid = model_hit = 0
    people = people_hidden = 0
    for path in sorted((folder / "images").glob("*.png")):
        img = cv2.imread(str(path))
        truth = cv2.imread(str(folder / "masks" / path.name), cv2.IMREAD_GRAYSCALE) == 9
        if not truth.any():
            continue
        mask = seg.segment(prepare(img, seg.input_size, bgr=True)[None])[0]
        h, w = truth.shape
        raw = Redactor(seg.labels, ["person"], dilate=0).hidden(mask, h, w) > 0
        hidden = red.hidden(mask, h, w) > 0
        pix += int(truth.sum())
        model_hit += int((truth & raw).sum())
        hid += int((truth & hidden).sum())
        n, comp = cv2.connectedComponents(truth.astype(np.uint8))
        for i in range(1, n):
            region = comp == i
            if region.sum() >= 200:
                people += 1
                people_hidden += int(hidden[region].mean() >= 0.5)
    seg.close()
    return {
        "case": "person_recall",
        "data": folder.name,
        "pedestrian_pixels": pix,
        "model_pixel_recall": round(model_hit / max(pix, 1), 3),
        f"hidden_pixel_recall_dilate{dilate}": round(hid / max(pix, 1), 3),
        "people": people,
        "people_hidden": round(people_hidden / max(people, 1), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--service-seconds", type=float, default=20.0)
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--recall", type=Path, help="a CamVid-style folder (images/, masks/)")
    args = ap.parse_args()
    if args.recall:
        print(json.dumps(person_recall(args.recall)), flush=True)
        return
    bench_styles(args.seconds)
    if not args.skip_service:
        for private in (False, True):
            print(json.dumps(asyncio.run(service_fps(private, args.service_seconds))), flush=True)


if __name__ == "__main__":
    main()
