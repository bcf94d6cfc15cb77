"""vtest.avi with each frame's number drawn in (scripts/stamp.py): a client or a test can tell
which frame a picture is and how far behind the newest one it is."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import stamp


def stamped_vtest(vtest: Path, out: Path, frames: int) -> Path:
    """The first `frames` frames of vtest at its size and 10 fps, H.264, frame k stamped k."""
    cap = cv2.VideoCapture(str(vtest))
    with av.open(str(out), "w") as f:
        s = f.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 768, 576, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "18", "bf": "0"}
        for k in range(frames):
            ok, img = cap.read()
            assert ok, k
            stamp.stamp_bgr(img, k, 0)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                f.mux(packet)
        for packet in s.encode():
            f.mux(packet)
    cap.release()
    return out
