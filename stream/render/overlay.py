"""Overlay drawing: colour a class mask over its frame (or alone), draw a legend, and count
class pixels. Buffers are preallocated per renderer and reused, so steady state allocates
nothing big."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of the mask's pixels in each class id [0, num_classes)."""
    if mask.dtype == np.uint8 and 0 < mask.size < 1 << 24 and num_classes <= 256:
        # cv2's histogram is ~3x faster than bincount; float32 counts are exact below 2**24.
        hist = cv2.calcHist([np.ascontiguousarray(mask)], [0], None, [256], [0, 256])
        counts = hist.ravel()[:num_classes].astype(np.float64)
    else:
        counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    return counts / max(mask.size, 1)


BACKGROUND_NAMES = ("background", "unlabeled", "unlabelled", "void")


def none_id(labels: Sequence[str]) -> int:
    """The id left uncoloured: the model's background class (VOC's 0), else 255, an id no
    model here predicts (Cityscapes' 0 is road, which must be coloured)."""
    return 0 if labels and labels[0].lower() in BACKGROUND_NAMES else 255


def keep_lut(labels: Sequence[str], classes: Sequence[str] | None) -> np.ndarray | None:
    """A 256-entry LUT mapping unselected classes to the uncoloured id; None when all show."""
    if not classes:
        return None
    unknown = sorted(set(classes) - set(labels))
    if unknown:
        raise ValueError(f"unknown class names {unknown}; valid: {list(labels)}")
    lut = np.full(256, none_id(labels), np.uint8)
    for i, name in enumerate(labels):
        if name in classes:
            lut[i] = i
    return lut


class Renderer:
    """Draws one stream's annotated frames. Not thread-safe: one renderer per stream.

    Only the box of output pixels whose class is coloured is computed: the mask is coloured at
    its own size, expanded to the frame's size by gathering columns then rows with the exact
    source indices cv2.resize(INTER_NEAREST) uses, and blended; the rest is the camera's frame.
    """

    def __init__(
        self,
        labels: Sequence[str],
        palette_rgb: np.ndarray,
        *,
        mode: str = "overlay",
        alpha: float = 0.5,
        classes: Sequence[str] | None = None,
        legend: bool = True,
    ) -> None:
        self.labels = list(labels)
        self.mode = mode
        self.alpha = float(alpha)
        self.legend = legend
        self._keep = keep_lut(self.labels, classes)
        self._none = none_id(self.labels)
        # One uint32 per class: B, G, R and a 4th byte that is 255 for the uncoloured id, so a
        # single gather carries both the colour and the copy-back mask. Uncoloured is black.
        bgra = np.zeros((256, 4), np.uint8)
        bgra[:, :3] = palette_rgb[:, ::-1]
        bgra[self._none] = (0, 0, 0, 255)
        self._bgra32 = bgra.view(np.uint32).ravel()
        self._palette_bgr = palette_rgb[:, ::-1]
        self._bufs: dict[str, np.ndarray] = {}
        self._rows = self._cols = np.zeros(0, np.intp)

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
        """A contiguous array of `shape` over a reused buffer that only ever grows."""
        n = int(np.prod(shape))
        b = self._bufs.get(name)
        if b is None or b.size < n or b.dtype != dtype:
            b = self._bufs[name] = np.empty(n, dtype)
        return b[:n].reshape(shape)

    def _grid(self, small: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        self._rows, self._cols = nearest_grid(small, size)
        return self._rows, self._cols

    def _box(
        self, mask: np.ndarray, rows: np.ndarray, cols: np.ndarray
    ) -> tuple[tuple[int, int, int, int], bool]:
        """Output rows [y0, y1) and columns [x0, x1) bounding every coloured pixel, and whether
        any pixel of the mask is uncoloured (Cityscapes models colour every one)."""
        # cv2 takes a scalar operand; its stubs only list arrays.
        coloured = cv2.compare(mask, self._none, cv2.CMP_NE)  # type: ignore[call-overload]
        x, y, bw, bh = cv2.boundingRect(coloured)
        y0, y1 = np.searchsorted(rows, (y, y + bh))
        x0, x1 = np.searchsorted(cols, (x, x + bw))
        if y0 >= y1 or x0 >= x1:
            return (0, 0, 0, 0), True
        return (int(y0), int(y1), int(x0), int(x1)), cv2.countNonZero(coloured) < mask.size

    def _expand(
        self, mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, with_bg: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Colour (BGR) and uncoloured mask (255; None unless with_bg) of the output pixels at
        rows x cols: columns first, then split channels, then rows, a plain row copy."""
        sy0, sx0 = int(rows[0]), int(cols[0])
        # Every output column: a horizontal resize of whole mask rows picks the same columns.
        full_width = len(cols) == len(self._cols)
        x_end = mask.shape[1] if full_width else int(cols[-1]) + 1
        small = mask[sy0 : int(rows[-1]) + 1, 0 if full_width else sx0 : x_end]
        bgra = self._scratch("small", small.shape, np.uint32)
        np.take(self._bgra32, small, out=bgra, mode="clip")
        wide = self._scratch("wide", (len(small), len(cols), 4))
        if full_width:  # faster than a gather
            src = bgra.view(np.uint8).reshape(*small.shape, 4)
            cv2.resize(src, (len(cols), len(small)), dst=wide, interpolation=cv2.INTER_NEAREST)
        else:
            wide32 = wide.view(np.uint32).reshape(wide.shape[:2])
            np.take(bgra, cols - sx0, axis=1, out=wide32, mode="clip")
        colour_w = self._scratch("cw", (*wide.shape[:2], 3))
        cv2.cvtColor(wide, cv2.COLOR_BGRA2BGR, dst=colour_w)
        picks = rows - sy0
        colour = self._scratch("colour", (len(rows), len(cols), 3))
        np.take(colour_w, picks, axis=0, out=colour, mode="clip")
        if not with_bg:
            return colour, None
        bg_w = self._scratch("bw", wide.shape[:2])
        cv2.extractChannel(wide, 3, dst=bg_w)
        bg = self._scratch("bg", (len(rows), len(cols)))
        np.take(bg_w, picks, axis=0, out=bg, mode="clip")
        return colour, bg

    def render(self, frame_bgr: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Returns the annotated BGR image at the frame's size (a reused buffer: copy to keep)."""
        h, w = frame_bgr.shape[:2]
        if self._keep is not None:
            mask = cv2.LUT(mask, self._keep)
        rows, cols = self._grid(mask.shape[:2], (h, w))
        box, any_bg = self._box(mask, rows, cols)
        y0, y1, x0, x1 = box
        out = self._scratch("out", (h, w, 3))
        if self.mode == "mask":
            out[:] = 0
            if y1 > y0:
                out[y0:y1, x0:x1] = self._expand(mask, rows[y0:y1], cols[x0:x1], False)[0]
        else:
            self._overlay(frame_bgr, mask, out, rows, cols, box, any_bg)
        if self.legend:
            self._draw_legend(out, mask)
        return out

    def _overlay(
        self,
        frame: np.ndarray,
        mask: np.ndarray,
        out: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray,
        box: tuple[int, int, int, int],
        any_bg: bool,
    ) -> None:
        """Blends the colours into the box; everything uncoloured keeps the camera's pixels."""
        y0, y1, x0, x1 = box
        out[:y0] = frame[:y0]
        out[y1:] = frame[y1:]
        out[y0:y1, :x0] = frame[y0:y1, :x0]
        out[y0:y1, x1:] = frame[y0:y1, x1:]
        if y1 == y0:
            return
        colour, bg = self._expand(mask, rows[y0:y1], cols[x0:x1], any_bg)
        f, o = frame[y0:y1, x0:x1], out[y0:y1, x0:x1]
        cv2.addWeighted(f, 1.0 - self.alpha, colour, self.alpha, 0.0, dst=o)
        if bg is not None:
            cv2.copyTo(f, bg, o)

    def _draw_legend(self, img: np.ndarray, mask: np.ndarray, top: int = 6) -> None:
        """Names and colours of the classes present (largest first), top-left."""
        fr = class_fractions(mask, len(self.labels))
        present = [i for i in np.argsort(fr)[::-1][:top] if i != self._none and fr[i] > 0.001]
        scale = max(img.shape[0] / 720.0, 0.5)
        row = int(22 * scale)
        for k, cls in enumerate(present):
            y = 8 + k * row
            c = tuple(int(v) for v in self._palette_bgr[cls])
            cv2.rectangle(img, (8, y), (8 + row - 4, y + row - 4), c, -1)
            pct = 100 * fr[cls]
            text = f"{self.labels[cls]} {pct:.0f}%" if pct >= 1 else f"{self.labels[cls]} <1%"
            org = (8 + row + 2, y + row - 8)
            cv2.putText(
                img, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), 3, cv2.LINE_AA
            )
            cv2.putText(
                img,
                text,
                org,
                cv2.FONT_HERSHEY_SIMPLEX,
                0.5 * scale,
                (255, 255, 255),
                1,
                cv2.LINE_AA,
            )


@functools.lru_cache(maxsize=16)
def nearest_grid(small: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source row of each output row and source column of each output column, taken from
    cv2.resize itself so indexing with them matches a full INTER_NEAREST resize pixel for
    pixel. Cached per size pair (read-only arrays: they are shared)."""
    (mh, mw), (h, w) = small, size
    ramp_y = np.arange(mh, dtype=np.float32).reshape(mh, 1)
    ramp_x = np.arange(mw, dtype=np.float32).reshape(1, mw)
    rows = cv2.resize(ramp_y, (1, h), interpolation=cv2.INTER_NEAREST).ravel().astype(np.intp)
    cols = cv2.resize(ramp_x, (w, 1), interpolation=cv2.INTER_NEAREST).ravel().astype(np.intp)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols
