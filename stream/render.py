"""Render stage: colour a class mask over its frame (or alone), draw a legend, and count class
pixels. Buffers are preallocated per stream and reused, so steady state allocates nothing big."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from stream import metrics
from stream.metrics import RateMeter
from stream.publish import Publisher, encode_jpeg
from stream.runner import Result
from stream.sources import Frame

log = logging.getLogger(__name__)


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of the mask's pixels in each class id [0, num_classes)."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
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
    """Draws one stream's annotated frames. Not thread-safe: one renderer per stream."""

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
        # applyColorMap wants a 256x1 BGR table; uncoloured pixels are black in mask mode.
        self._lut = np.ascontiguousarray(palette_rgb[:, ::-1].reshape(256, 1, 3).astype(np.uint8))
        self._lut[self._none] = 0
        self._palette_bgr = palette_rgb[:, ::-1]
        self._bufs: dict[str, np.ndarray] = {}

    def _buf(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        b = self._bufs.get(name)
        if b is None or b.shape != shape:
            b = self._bufs[name] = np.empty(shape, np.uint8)
        return b

    def render(self, frame_bgr: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Returns the annotated BGR image at the frame's size (a reused buffer: copy to keep)."""
        h, w = frame_bgr.shape[:2]
        if self._keep is not None:
            mask = cv2.LUT(mask, self._keep)
        colour_small = cv2.applyColorMap(mask, self._lut)
        colour = self._buf("colour", (h, w, 3))
        cv2.resize(colour_small, (w, h), dst=colour, interpolation=cv2.INTER_NEAREST)
        if self.mode == "mask":
            out = colour
        else:
            out = self._buf("out", (h, w, 3))
            cv2.addWeighted(frame_bgr, 1.0 - self.alpha, colour, self.alpha, 0.0, dst=out)
            # Uncoloured pixels keep the camera's own values instead of being dimmed.
            full_mask = self._buf("mask", (h, w))
            cv2.resize(mask, (w, h), dst=full_mask, interpolation=cv2.INTER_NEAREST)
            bg = self._buf("bg", (h, w))
            cv2.compare(full_mask, self._none, cv2.CMP_EQ, dst=bg)
            cv2.copyTo(frame_bgr, bg, out)
        if self.legend:
            self._draw_legend(out, mask)
        return out

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
            cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), 3,
                        cv2.LINE_AA)
            cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (255, 255, 255),
                        1, cv2.LINE_AA)


# --------------------------------------------------------------------------------------------
# The render stage: threads that turn results (or, in smooth mode, every captured frame) into
# published JPEGs. Work per stream is serialised on one thread, so buffers need no locks.


class StreamView:
    """Render-side state of one stream: newest result, its renderer and its publisher."""

    def __init__(
        self,
        stream_id: str,
        renderer: Renderer,
        publisher: Publisher,
        *,
        output: str,
        jpeg_quality: int,
        peek_frame: Callable[[], Frame | None],
        on_published: Callable[[str, float], None] | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.renderer = renderer
        self.publisher = publisher
        self.output = output
        self.jpeg_quality = jpeg_quality
        self.peek_frame = peek_frame
        self.on_published = on_published
        self.result: Result | None = None  # newest result from the model worker
        self.fractions: np.ndarray | None = None
        self.out_rate = RateMeter()
        self.latencies: deque[float] = deque(maxlen=300)  # recent end-to-end, for the API
        self.infer_rate = RateMeter()
        self._done_result = 0  # frame seq of the last result rendered
        self._done_frame = 0  # frame seq of the last frame published
        self._lock = threading.Lock()  # render() from the stage thread vs. on-demand snapshots

    def pending(self) -> bool:
        if self.output == "smooth":
            frame = self.peek_frame()
            return self.result is not None and frame is not None and frame.seq > self._done_frame
        return self.result is not None and self.result.frame.seq > self._done_result

    def work(self) -> None:
        result = self.result
        if result is None:
            return
        if result.frame.seq > self._done_result:
            self._done_result = result.frame.seq
            self._count_classes(result.mask)
        frame = result.frame
        if self.output == "smooth":
            newest = self.peek_frame()
            if newest is not None and newest.seq > frame.seq:
                frame = newest
        if frame.seq <= self._done_frame:
            return
        self._done_frame = frame.seq
        if not self.publisher.watched:
            return  # encode only while someone watches; snapshots render on demand
        jpeg = self._render_jpeg(frame, result.mask)
        self.publisher.publish_threadsafe(jpeg, frame.seq, frame.capture_ts)
        self.out_rate.tick()
        metrics.FRAMES.labels(stream=self.stream_id, outcome="published").inc()

    def snapshot(self) -> tuple[bytes, Frame] | None:
        """JPEG of the newest annotated frame, rendered now (for /snapshot.jpg with no viewer)."""
        result = self.result
        if result is None:
            return None
        frame = result.frame
        if self.output == "smooth":
            newest = self.peek_frame()
            frame = newest if newest is not None and newest.seq > frame.seq else frame
        return self._render_jpeg(frame, result.mask), frame

    def _render_jpeg(self, frame: Frame, mask: np.ndarray) -> bytes:
        with self._lock:
            t0 = time.perf_counter()
            img = self.renderer.render(frame.image, mask)
            t1 = time.perf_counter()
            jpeg = encode_jpeg(img, self.jpeg_quality)
            t2 = time.perf_counter()
        metrics.STAGE_SECONDS.labels(stage="render").observe(t1 - t0)
        metrics.STAGE_SECONDS.labels(stage="encode").observe(t2 - t1)
        return jpeg

    def _count_classes(self, mask: np.ndarray) -> None:
        labels = self.renderer.labels
        self.fractions = class_fractions(mask, len(labels))
        for name, f in zip(labels, self.fractions, strict=True):
            metrics.CLASS_FRACTION.labels(stream=self.stream_id, class_name=name).set(f)


class RenderStage:
    """`workers` threads; stream i is always rendered by thread i % workers."""

    def __init__(self, workers: int = 1) -> None:
        self._views: dict[str, StreamView] = {}
        self._conds = [threading.Condition() for _ in range(max(1, workers))]
        self._dirty = [False] * len(self._conds)
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def add(self, view: StreamView) -> None:
        self._views[view.stream_id] = view

    def remove(self, stream_id: str) -> None:
        self._views.pop(stream_id, None)

    def view(self, stream_id: str) -> StreamView | None:
        return self._views.get(stream_id)

    def _index(self, stream_id: str) -> int:
        return hash(stream_id) % len(self._conds)

    def submit(self, result: Result) -> None:
        """From a model worker: newest result wins (workers in parallel may finish out of order)."""
        view = self._views.get(result.stream_id)
        if view is None:
            return
        with self._conds[self._index(result.stream_id)]:
            if view.result is not None and view.result.frame.seq >= result.frame.seq:
                return
            view.result = result
        view.infer_rate.tick()
        self.wake(result.stream_id)

    def wake(self, stream_id: str) -> None:
        i = self._index(stream_id)
        with self._conds[i]:
            self._dirty[i] = True
            self._conds[i].notify()

    def start(self) -> None:
        for i in range(len(self._conds)):
            t = threading.Thread(target=self._run, args=(i,), name=f"render-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 1.0) -> None:
        self._stopped = True
        for cond in self._conds:
            with cond:
                cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _run(self, i: int) -> None:
        cond = self._conds[i]
        while not self._stopped:
            with cond:
                while not self._dirty[i] and not self._stopped:
                    cond.wait(0.5)
                self._dirty[i] = False
            for view in list(self._views.values()):
                if self._index(view.stream_id) != i or not view.pending():
                    continue
                try:
                    view.work()
                except Exception:
                    log.exception("render failed for stream %s", view.stream_id)
