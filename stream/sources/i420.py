"""GStreamer's planar I420 frames (any row strides and plane offsets) as BGR images."""

from __future__ import annotations

import cv2
import numpy as np


def i420_to_bgr(
    data: bytes,
    width: int,
    height: int,
    strides: tuple[int, int, int],
    offsets: tuple[int, int, int],
) -> np.ndarray:
    """A planar I420 buffer (GStreamer's layout: row strides and plane offsets) as BGR."""
    w, h = width, height
    cw, ch = (w + 1) // 2, (h + 1) // 2
    buf = np.frombuffer(data, np.uint8)
    if (
        (w, h) == (2 * cw, 2 * ch)
        and strides == (w, cw, cw)
        and offsets == (0, w * h, w * h + cw * ch)
    ):
        return cv2.cvtColor(buf[: w * h * 3 // 2].reshape(h * 3 // 2, w), cv2.COLOR_YUV2BGR_I420)
    # Padded rows or odd sizes: repack into the tight even-sized layout OpenCV takes.
    ew, eh = 2 * cw, 2 * ch
    tight = np.empty(ew * eh * 3 // 2, np.uint8)
    y = tight[: ew * eh].reshape(eh, ew)
    y[:h, :w] = buf[offsets[0] : offsets[0] + strides[0] * h].reshape(h, strides[0])[:, :w]
    y[:h, w:] = y[:h, w - 1 : w]
    y[h:] = y[h - 1 : h]
    for i, start in ((1, ew * eh), (2, ew * eh + cw * ch)):
        plane = buf[offsets[i] : offsets[i] + strides[i] * ch].reshape(ch, strides[i])[:, :cw]
        tight[start : start + cw * ch].reshape(ch, cw)[:] = plane
    bgr = cv2.cvtColor(tight.reshape(eh * 3 // 2, ew), cv2.COLOR_YUV2BGR_I420)
    return bgr if (ew, eh) == (w, h) else np.ascontiguousarray(bgr[:h, :w])
