"""CPU per frame of the event-clip recorder's encoding (the clip thread's work) on vtest.avi
frames: `python scripts/bench_clips.py 768x576` (or 1280x720). The render thread adds one
frame copy per rendered frame."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

from segstream.stream.events.clips import ClipRecorder
from segstream.stream.events.config import ClipsConfig


def main() -> int:
    cv2.setNumThreads(1)
    w, h = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "768x576").split("x"))
    shared = Path(
        os.environ.get("SEGSTREAM_SHARED", Path(__file__).resolve().parents[2] / "shared")
    )
    cap = cv2.VideoCapture(str(shared / "data/video/vtest.avi"))
    frames = []
    while len(frames) < 200:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(img, (w, h)))
    out = Path(tempfile.mkdtemp(prefix="bench-clips-"))
    rec = ClipRecorder(
        "s", ClipsConfig(encoder="libx264"), lambda e: out / f"{e}.mp4", lambda *a: None
    )
    wall0 = time.time()
    rec._encode(frames[0], wall0)  # opens the encoder
    t0 = time.process_time()
    for k, img in enumerate(frames[1:], 1):
        rec._encode(img, wall0 + k / 10)
    cpu = (time.process_time() - t0) / (len(frames) - 1)
    kbit_s = rec.ring.bytes * 8 / 1000 / (rec.ring.frames / 10)
    print(
        f"{w}x{h}: {cpu * 1000:.2f} ms CPU per frame; ring {rec.ring.frames} frames "
        f"{rec.ring.bytes / 1024:.0f} KiB; {kbit_s:.0f} kbit/s at 10 fps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
