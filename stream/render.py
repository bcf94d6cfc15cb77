"""Render stage: colour a class mask over its frame (or alone), draw a legend, and count class
pixels. Buffers are preallocated per stream and reused, so steady state allocates nothing big."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from segstream.stream.datatypes import Frame, Rendered, Result, Sink
from segstream.stream.observer import NULL_OBSERVER, Observer

log = logging.getLogger(__name__)


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
        self._grid_key: tuple[int, ...] = ()
        self._rows = self._cols = np.zeros(0, np.intp)

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
        """A contiguous array of `shape` over a reused buffer that only ever grows."""
        n = int(np.prod(shape))
        b = self._bufs.get(name)
        if b is None or b.size < n or b.dtype != dtype:
            b = self._bufs[name] = np.empty(n, dtype)
        return b[:n].reshape(shape)

    def _grid(self, small: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Source row of each output row and source column of each output column, taken from
        cv2.resize itself so the output matches a full INTER_NEAREST resize pixel for pixel."""
        key = (*small, *size)
        if key != self._grid_key:
            (mh, mw), (h, w) = small, size
            ramp_y = np.arange(mh, dtype=np.float32).reshape(mh, 1)
            ramp_x = np.arange(mw, dtype=np.float32).reshape(1, mw)
            rows = cv2.resize(ramp_y, (1, h), interpolation=cv2.INTER_NEAREST)
            cols = cv2.resize(ramp_x, (w, 1), interpolation=cv2.INTER_NEAREST)
            self._rows = rows.ravel().astype(np.intp)
            self._cols = cols.ravel().astype(np.intp)
            self._grid_key = key
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


# --------------------------------------------------------------------------------------------
# The render stage: threads that turn results (or, in smooth mode, every captured frame) into
# annotated frames for each stream's sinks. Work per stream is serialised on one thread, so
# buffers need no locks.


class RateMeter:
    """Events per second over a sliding window; cheap enough to call per frame, from any
    thread (the render thread ticks, the event loop reads)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self._window = window_s
        self._events: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append(now)
            self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if len(self._events) < 2:
                return 0.0
            return (len(self._events) - 1) / max(now - self._events[0], 1e-6)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0] > self._window:
            self._events.popleft()


@dataclass
class Variant:
    """The stream drawn with other settings for some viewers (a page's large view): rendered
    at most once per frame, only while its sink wants frames, and shared by every viewer with
    the same settings. `renderer` None: the camera's frame as it is (overlay off)."""

    renderer: Renderer | None
    sink: Sink
    users: int = 0


class VariantLimit(Exception):
    """The stream already renders as many distinct variants as it may."""


class StreamView:
    """Render-side state of one stream: newest result, its renderer and its sinks."""

    def __init__(
        self,
        stream_id: str,
        renderer: Renderer,
        sinks: Sequence[Sink] = (),
        *,
        output: str,
        jpeg_quality: int,
        peek_frame: Callable[[], Frame | None],
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.stream_id = stream_id
        self.renderer = renderer
        self.sinks: tuple[Sink, ...] = tuple(sinks)  # replaced whole, never mutated
        self.variants: dict[Hashable, Variant] = {}  # replaced whole, never mutated
        self._variants_lock = threading.Lock()  # acquire/release (event loop) only
        self.output = output
        self.jpeg_quality = jpeg_quality
        self.peek_frame = peek_frame
        self._observer = observer
        self.result: Result | None = None  # newest result from the model worker
        self.fractions: np.ndarray | None = None
        self.out_rate = RateMeter()
        self.latencies: deque[float] = deque(maxlen=300)  # recent end-to-end, for the API
        self.infer_rate = RateMeter()
        self._done_result = 0  # frame seq of the last result rendered
        self._done_frame = 0  # frame seq of the last frame published
        self._lock = threading.Lock()  # render() from the stage thread vs. on-demand snapshots

    # -- sinks and settings (any thread) ---------------------------------------------------
    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self.sinks = (*self.sinks, sink)

    def remove_sink(self, sink: Sink) -> None:
        with self._lock:
            self.sinks = tuple(s for s in self.sinks if s is not sink)

    def acquire_variant(
        self,
        key: Hashable,
        make: Callable[[], tuple[Renderer | None, Sink]],
        limit: int,
    ) -> Sink:
        """The sink of the variant drawn with settings `key`, made by `make` if no viewer has
        it yet; raises VariantLimit past `limit` distinct variants. Pair with release_variant."""
        with self._variants_lock:
            v = self.variants.get(key)
            if v is None:
                if len(self.variants) >= limit:
                    raise VariantLimit(
                        f"stream {self.stream_id!r} already renders {limit} other overlay settings"
                    )
                renderer, sink = make()
                v = Variant(renderer, sink)
                self.variants = {**self.variants, key: v}
                self._done_frame = 0  # the next pass renders the newest frame for it
            v.users += 1
            return v.sink

    def release_variant(self, key: Hashable) -> None:
        """One viewer fewer; the last one closes the variant's sink and forgets it."""
        with self._variants_lock:
            v = self.variants.get(key)
            if v is None:
                return
            v.users -= 1
            if v.users > 0:
                return
            self.variants = {k: x for k, x in self.variants.items() if k != key}
        v.sink.close()

    def set_renderer(self, renderer: Renderer) -> None:
        """New overlay settings, from the next frame on (no restart)."""
        with self._lock:
            self.renderer = renderer
            self._done_frame = 0  # show the change even on a still picture

    def close(self) -> None:
        """Closes every sink (ends their clients); the view is not used afterwards."""
        with self._lock, self._variants_lock:
            sinks, self.sinks = self.sinks, ()
            variants, self.variants = self.variants, {}
        for sink in (*sinks, *(v.sink for v in variants.values())):
            sink.close()

    # -- render thread ---------------------------------------------------------------------
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
        frame = self._frame_for(result)
        if frame.seq <= self._done_frame:
            return
        self._done_frame = frame.seq
        sinks = [s for s in self.sinks if s.wants_frames()]
        variants = [v for v in self.variants.values() if v.sink.wants_frames()]
        if not sinks and not variants:
            return  # render only for a sink that wants frames; snapshots render on demand
        with self._lock:
            if sinks:
                rendered = self._render(frame, result.mask)
                for sink in sinks:
                    sink.put(rendered)
                if rendered.encode_s:
                    self._observer.stage("encode", rendered.encode_s)
            for v in variants:
                v.sink.put(self._render_variant(v.renderer, frame, result.mask))
        self.out_rate.tick()
        self._observer.frame(self.stream_id, "published")

    def snapshot(self) -> tuple[bytes, Frame] | None:
        """JPEG of the newest annotated frame, rendered now (for /snapshot.jpg with no viewer)."""
        result = self.result
        if result is None:
            return None
        frame = self._frame_for(result)
        with self._lock:
            jpeg = self._render(frame, result.mask).jpeg()
        return jpeg, frame

    def _frame_for(self, result: Result) -> Frame:
        """The frame to draw the mask on: its own, or in smooth mode the newest one."""
        if self.output == "smooth":
            newest = self.peek_frame()
            if newest is not None and newest.seq > result.frame.seq:
                return newest
        return result.frame

    def _render(self, frame: Frame, mask: np.ndarray) -> Rendered:
        """Caller holds self._lock (the renderer's buffers are reused)."""
        spent = frame.materialize()  # smooth output: a newer frame nobody took yet
        if spent:
            self._observer.stage("convert", spent)
        t0 = time.perf_counter()
        img = self.renderer.render(frame.image, mask)
        self._observer.stage("render", time.perf_counter() - t0)
        return Rendered(self.stream_id, img, frame.seq, frame.capture_ts, self.jpeg_quality)

    def _render_variant(
        self, renderer: Renderer | None, frame: Frame, mask: np.ndarray
    ) -> Rendered:
        """Caller holds self._lock. The camera's own frame (never reused) when renderer is
        None; each variant's renderer has buffers of its own."""
        img = frame.image if renderer is None else renderer.render(frame.image, mask)
        return Rendered(self.stream_id, img, frame.seq, frame.capture_ts, self.jpeg_quality)

    def _count_classes(self, mask: np.ndarray) -> None:
        labels = self.renderer.labels
        self.fractions = class_fractions(mask, len(labels))
        self._observer.class_fractions(self.stream_id, labels, self.fractions)


class RenderStage:
    """`workers` threads; each new stream goes to the thread with the fewest streams (ties:
    the lowest index), so with no removals the i-th stream added is on thread i % workers."""

    def __init__(self, workers: int = 1) -> None:
        self._views: dict[str, StreamView] = {}
        self._thread_of: dict[str, int] = {}
        self._conds = [threading.Condition() for _ in range(max(1, workers))]
        self._dirty = [False] * len(self._conds)
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._lock = threading.Lock()

    def add(self, view: StreamView) -> None:
        with self._lock:
            load = [0] * len(self._conds)
            for i in self._thread_of.values():
                load[i] += 1
            self._thread_of[view.stream_id] = load.index(min(load))
            self._views[view.stream_id] = view

    def remove(self, stream_id: str) -> StreamView | None:
        """Stops rendering the stream; a frame being rendered right now still finishes."""
        with self._lock:
            self._thread_of.pop(stream_id, None)
            return self._views.pop(stream_id, None)

    def view(self, stream_id: str) -> StreamView | None:
        return self._views.get(stream_id)

    def thread_of(self, stream_id: str) -> int | None:
        return self._thread_of.get(stream_id)

    def submit(self, result: Result) -> None:
        """From a model worker: newest result wins (workers in parallel may finish out of order)."""
        view = self._views.get(result.stream_id)
        i = self._thread_of.get(result.stream_id)
        if view is None or i is None:
            return  # removed meanwhile
        with self._conds[i]:
            if view.result is not None and view.result.frame.seq >= result.frame.seq:
                return
            view.result = result
            self._dirty[i] = True
            self._conds[i].notify()
        view.infer_rate.tick()

    def wake(self, stream_id: str) -> None:
        i = self._thread_of.get(stream_id)
        if i is None:
            return
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
            with self._lock:
                mine = [v for sid, v in self._views.items() if self._thread_of.get(sid) == i]
            for view in mine:
                if not view.pending():
                    continue
                try:
                    view.work()
                except Exception:
                    log.exception("render failed for stream %s", view.stream_id)
