"""Privacy redaction: hide what the model labels as the chosen classes (and static zones) in
the frame the mask was computed on, before the overlay is drawn and before anything is encoded,
so every picture output carries only the redacted frame.

Failing closed: a frame whose mask is missing or older than `max_age_s` (smooth output between
inferences, a model behind or failing) is blanked whole with a banner saying why. A mask carried
to a newer frame by motion would plug in at `Redactor.apply` (the `age_s` check): cover with
the moved mask and a margin growing with its age instead of blanking.

Work is confined to the bounding box of the hidden pixels; buffers are reused (one redactor per
stream, used under the view's lock)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from segstream.stream.render.overlay import nearest_grid

Style = Literal["blur", "pixelate", "fill", "silhouette"]
Outcome = Literal["redacted", "blanked"]
BLANK_BGR = (40, 40, 40)


class Redactor:
    """One stream's redaction settings, resolved against the model's labels."""

    def __init__(
        self,
        labels: Sequence[str],
        classes: Sequence[str],
        *,
        style: Style = "blur",
        color: Sequence[int] = (0, 0, 0),
        dilate: int = 8,
        zones: Sequence[Sequence[Sequence[float]]] = (),
        max_age_s: float = 0.4,
    ) -> None:
        unknown = sorted(set(classes) - set(labels))
        if unknown:
            raise ValueError(f"unknown class names {unknown}; valid: {list(labels)}")
        self.hide_lut = np.zeros(256, np.uint8)
        for i, name in enumerate(labels):
            if name in classes:
                self.hide_lut[i] = 255
        self.style = style
        self.color_bgr = tuple(int(c) for c in color)[::-1]  # config gives RGB
        self.dilate = int(dilate)
        self.zones = [np.asarray(z, np.float64) for z in zones]
        self.max_age_s = float(max_age_s)
        # A square: separable, 6x cheaper than a disc; grows up to 1.41 x dilate diagonally.
        side = 2 * self.dilate + 1
        self._kernel = np.ones((side, side), np.uint8) if self.dilate > 0 else None
        self._zone_key: tuple[int, int] = (0, 0)
        self._zone_mask: np.ndarray | None = None
        self._out = np.zeros(0, np.uint8)
        self._colour = np.zeros(0, np.uint8)
        self._blank_key: tuple[tuple[int, ...], str] = ((), "")
        self._blank = np.zeros(0, np.uint8)

    # -- the hidden area -------------------------------------------------------------------
    def _zones_at(self, h: int, w: int) -> np.ndarray | None:
        """The static zones rasterised at the frame's size (cached per size); None: no zones."""
        if not self.zones:
            return None
        if self._zone_key != (h, w) or self._zone_mask is None:
            m = np.zeros((h, w), np.uint8)
            scale = np.array([w, h], np.float64)
            polys = [np.round(z * scale).astype(np.int32) for z in self.zones]
            cv2.fillPoly(m, polys, 255)
            self._zone_key, self._zone_mask = (h, w), m
        return self._zone_mask

    def hidden(self, mask: np.ndarray | None, h: int, w: int) -> np.ndarray:
        """uint8 {0, 255} [h, w]: the pixels to hide (classes grown by `dilate`, and zones).
        Only the box around the hidden classes (plus the margin) is expanded and dilated."""
        out = np.zeros((h, w), np.uint8)
        if mask is not None:
            small = cv2.LUT(mask, self.hide_lut)
            x, y, bw, bh = cv2.boundingRect(small)
            if bw and bh:
                rows, cols = nearest_grid(small.shape[:2], (h, w))
                pad = self.dilate + 1
                y0, y1 = np.searchsorted(rows, (y, y + bh))
                x0, x1 = np.searchsorted(cols, (x, x + bw))
                y0, x0 = max(int(y0) - pad, 0), max(int(x0) - pad, 0)
                y1, x1 = min(int(y1) + pad, h), min(int(x1) + pad, w)
                roi = np.take(small, rows[y0:y1], axis=0)
                roi = np.take(roi, cols[x0:x1], axis=1)
                if self._kernel is not None:
                    roi = cv2.dilate(roi, self._kernel)
                out[y0:y1, x0:x1] = roi
        zones = self._zones_at(h, w)
        if zones is not None:
            cv2.bitwise_or(out, zones, dst=out)
        return out

    # -- pictures --------------------------------------------------------------------------
    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        if self._out.size < n:
            self._out = np.empty(n, np.uint8)
        return self._out[:n].reshape(shape)

    def apply(self, frame_bgr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """The frame with the hidden area covered (a reused buffer: copy to keep). `mask`:
        the class mask computed on this very frame (None: zones only)."""
        h, w = frame_bgr.shape[:2]
        out = self._buffer((h, w, 3))
        out[:] = frame_bgr
        hide = self.hidden(mask, h, w)
        x, y, bw, bh = cv2.boundingRect(hide)
        if not bw or not bh:
            return out
        box = (slice(y, y + bh), slice(x, x + bw))
        m = hide[box]
        region = out[box]
        if self.style in ("fill", "silhouette"):
            cv2.copyTo(self._colour_at(out.shape)[box], m, region)
            if self.style == "silhouette":  # the outline keeps people countable
                contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(region, contours, -1, (255, 255, 255), 2)
        else:
            cv2.copyTo(self._cover(frame_bgr[box], h), m, region)
        return out

    def _colour_at(self, shape: tuple[int, ...]) -> np.ndarray:
        """A frame of the fill colour (made once per size)."""
        if self._colour.shape != shape:
            self._colour = np.empty(shape, np.uint8)
            self._colour[:] = self.color_bgr
        return self._colour

    def _cover(self, src: np.ndarray, frame_h: int) -> np.ndarray:
        """Blur: averaged down to cells of 1/24 of the frame's height and interpolated back
        up; pixelate: the same cells kept as blocks. Both remove every detail finer than a
        cell (a face is a few cells at most)."""
        cell = max(frame_h // 24, 4)
        bh, bw = src.shape[:2]
        sw, sh = max(bw // cell, 1), max(bh // cell, 1)
        small = cv2.resize(src, (sw, sh), interpolation=cv2.INTER_AREA)
        if self.style == "pixelate":
            return cv2.resize(small, (bw, bh), interpolation=cv2.INTER_NEAREST)
        return cv2.resize(small, (bw, bh), interpolation=cv2.INTER_LINEAR)

    def blank(self, frame_shape: tuple[int, ...], reason: str) -> np.ndarray:
        """A grey frame of the same size with a banner saying why it is blank (drawn once per
        size and reason; never written to by its users)."""
        h, w = frame_shape[:2]
        if self._blank_key == ((h, w), reason):
            return self._blank
        self._blank_key = ((h, w), reason)
        out = self._blank = np.empty((h, w, 3), np.uint8)
        out[:] = BLANK_BGR
        scale = max(h / 720.0, 0.4)
        cv2.putText(
            out,
            f"privacy: {reason}",
            (int(16 * scale), int(48 * scale)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.9 * scale,
            (255, 255, 255),
            max(int(2 * scale), 1),
            cv2.LINE_AA,
        )
        return out
