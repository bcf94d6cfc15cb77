#!/usr/bin/env python
"""Milliseconds per frame of the render stage: Renderer.render and encode_jpeg (q80) on a
1280x720 camera frame with a 513x513 VOC mask, the sizes the service sees.

Prints one JSON line per case: median wall ms and process-CPU ms per frame (CPU includes
OpenCV's own pool threads, which spin on a 2-core machine; compare --cv-threads 1):
  python scripts/bench_render.py --seconds 3 [--cv-threads 1] [--mask people|empty|full]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segstream.models.labels import VOC_LABELS, voc_palette
from segstream.stream.encoders import encode_jpeg
from segstream.stream.render import Renderer

VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "vtest.avi"


def camera_frame(w: int = 1280, h: int = 720) -> np.ndarray:
    """A real frame from the sample video scaled to 720p (noise when the video is missing)."""
    cap = cv2.VideoCapture(str(VIDEO))
    for _ in range(30):  # a frame with pedestrians in it
        ok, img = cap.read()
    cap.release()
    if not ok:
        return np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def scene_mask(kind: str, size: int = 513) -> np.ndarray:
    """People and a car on background (typical street scene), nothing, or all person."""
    mask = np.zeros((size, size), np.uint8)
    if kind == "people":
        for x in (60, 150, 300, 410):
            mask[200:420, x : x + 45] = 15
        mask[380:500, 200:330] = 7
    elif kind == "full":
        mask[:] = 15
    return mask


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
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per timed case")
    ap.add_argument("--cv-threads", type=int, default=None, help="cv2.setNumThreads first")
    ap.add_argument("--mask", choices=["people", "empty", "full"], default="people")
    ap.add_argument("--mode", choices=["overlay", "mask"], default="overlay")
    ap.add_argument("--no-encode", action="store_true", help="time render only")
    args = ap.parse_args()
    if args.cv_threads is not None:
        cv2.setNumThreads(args.cv_threads)
    frame, mask = camera_frame(), scene_mask(args.mask)
    r = Renderer(VOC_LABELS, voc_palette(), mode=args.mode, alpha=0.5, legend=True)
    share = args.seconds / (1 if args.no_encode else 2)
    render_ms, render_cpu = time_it(lambda: r.render(frame, mask), share)
    row = {
        "case": f"{args.mode}/{args.mask}",
        "cv_threads": cv2.getNumThreads(),
        "render_ms": round(render_ms, 3),
        "render_cpu_ms": round(render_cpu, 3),
    }
    if not args.no_encode:
        img = r.render(frame, mask).copy()
        enc_ms, enc_cpu = time_it(lambda: encode_jpeg(img, 80), share)
        row |= {"encode_ms": round(enc_ms, 3), "encode_cpu_ms": round(enc_cpu, 3)}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
