"""Output fan-out: one stream's newest result drawn once and handed to each of its sinks (and
once per variant for viewers with other overlay settings). A sink that raises is counted
(`segstream_sink_errors_total{stream,sink}`) and skipped for that frame; the others still get
it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from segstream.stream.datatypes import Frame, Rendered, Result, Sink
from segstream.stream.lifecycle import RateMeter
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.render.carry import MaskCarry
from segstream.stream.render.overlay import Renderer, class_fractions
from segstream.stream.render.privacy import Redactor

log = logging.getLogger(__name__)
# (stream id, uint8 class-id mask, capture wall time, the frame's annotated JPEG on demand)
MaskHook = Callable[[str, np.ndarray, float, Callable[[], bytes]], None]


def sink_name(sink: Sink) -> str:
    """The sink's `name` (its registry name, "mjpeg", "mosaic"), else its class's name."""
    return str(getattr(sink, "name", "") or type(sink).__name__)


@dataclass
class Variant:
    """The stream drawn with other settings for some viewers (a page's large view): rendered
    at most once per frame, only while its sink wants frames, and shared by every viewer with
    the same settings. `renderer` None: the camera's frame as it is (overlay off)."""

    renderer: Renderer | None
    sink: Sink
    users: int = 0
    raw: bool = False  # an admin's raw view (privacy's admin_raw): the camera's frame unredacted


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
        self._failed_sinks: set[str] = set()  # names of sinks whose failure was logged
        self.privacy: Redactor | None = None  # set_privacy(); None: pictures as they are
        self.model_error: Callable[[], str | None] = lambda: None  # why inference fails
        self.mask_hook: MaskHook | None = None  # set while the stream has zones
        self._last: Rendered | None = None  # the picture in the renderer's buffer now
        # Smooth output: the newest mask carried by motion to each drawn frame; `carry.last`
        # is the mask under the frame drawn last, with its age (render thread only).
        self.carry = MaskCarry()

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
        raw: bool = False,
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
                v = Variant(renderer, sink, raw=raw)
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

    def set_privacy(self, redactor: Redactor | None) -> None:
        """New privacy settings, from the next frame on (no restart)."""
        with self._lock:
            self.privacy = redactor
            self._done_frame = 0

    def close(self) -> None:
        """Closes every sink (ends their clients); the view is not used afterwards."""
        with self._lock, self._variants_lock:
            sinks, self.sinks = self.sinks, ()
            variants, self.variants = self.variants, {}
        for sink in (*sinks, *(v.sink for v in variants.values())):
            sink.close()

    # -- render thread ---------------------------------------------------------------------
    def pending(self) -> bool:
        if self.privacy is not None and self._blank_reason(self.result) is not None:
            frame = self.peek_frame()  # failing closed: blank frames keep coming
            if frame is not None and frame.seq > self._done_frame:
                return True
        if self.output == "smooth":
            frame = self.peek_frame()
            return self.result is not None and frame is not None and frame.seq > self._done_frame
        return self.result is not None and self.result.frame.seq > self._done_result

    def work(self) -> None:
        result = self.result
        fresh = result is not None and result.frame.seq > self._done_result
        if result is not None and fresh:
            self._done_result = result.frame.seq
            self._count_classes(result.mask)
        rendered = self._publish(result)
        hook = self.mask_hook
        if result is not None and fresh and hook is not None:
            self._call_mask_hook(hook, result, rendered)

    def _publish(self, result: Result | None) -> Rendered | None:
        """Draws the frame once for the sinks that want it (redacted or blanked where privacy
        is on); returns that picture."""
        picked = self._pick(result)
        if picked is None or picked[0].seq <= self._done_frame:
            return None
        frame, mask, blank = picked
        self._done_frame = frame.seq
        sinks = [s for s in self.sinks if self._wants(s)]
        variants = [v for v in self.variants.values() if self._wants(v.sink)]
        if not sinks and not variants:
            return None  # render only for a sink that wants frames; snapshots render on demand
        if mask is not None and result is not None and self.output == "smooth":
            mask = self._carried(frame, result)  # the newest mask, moved to this frame
        rendered = None
        with self._lock:
            base = self._base(frame, mask, blank)
            if sinks:
                rendered = self._render(frame, base, mask)
                for sink in sinks:
                    self._put(sink, rendered)
                if rendered.encode_s:
                    self._observer.stage("encode", rendered.encode_s)
            for v in variants:
                self._put(v.sink, self._render_variant(v, frame, base, mask))
        self.out_rate.tick()
        self._observer.frame(self.stream_id, "published")
        return rendered

    def _call_mask_hook(self, hook: MaskHook, result: Result, rendered: Rendered | None) -> None:
        """Zones and events: the segmented frame's mask, its capture wall time, and its
        annotated JPEG on demand (the one the sinks got when it was encoded, else drawn now)."""
        frame = result.frame
        wall = time.time() - (time.monotonic() - frame.capture_ts)

        def snapshot() -> bytes:
            with self._lock:
                # The renderer's buffer still holds `rendered` unless another render came
                # between: then draw this frame again.
                if (
                    rendered is not None
                    and rendered is self._last
                    and rendered.frame_seq == frame.seq
                ):
                    return rendered.jpeg()
                # Drawn again: through the same redaction as every other picture output.
                blank = self._blank_reason(result)
                mask = None if blank is not None else result.mask
                base = self._base(frame, mask, blank, count=False)
                return self._render(frame, base, mask).jpeg()

        try:
            hook(self.stream_id, result.mask, wall, snapshot)
        except Exception:
            log.exception("%s: zone coverage failed", self.stream_id)

    # -- privacy ---------------------------------------------------------------------------
    def _blank_reason(self, result: Result | None) -> str | None:
        """Why the newest frame may not be shown (privacy on): no mask yet, the model
        failing, or (smooth output) the newest mask older than the limit. None: it may."""
        red = self.privacy
        if red is None:
            return None
        if result is None:
            return "waiting for the first mask"
        err = self.model_error()
        if err:
            return "model failing"
        if self.output == "smooth":
            newest = self.peek_frame()
            if newest is not None and newest.seq > result.frame.seq:
                age = newest.capture_ts - result.frame.capture_ts
                # Where a motion-carried mask would cover the frame instead of blanking.
                if age > red.max_age_s:
                    return f"mask older than {red.max_age_s * 1000:.0f} ms"
        return None

    def _pick(self, result: Result | None) -> tuple[Frame, np.ndarray | None, str | None] | None:
        """The frame to publish, the mask to draw on it and why it is blanked (or None)."""
        blank = self._blank_reason(result)
        if blank is not None:
            frame = self.peek_frame() or (result.frame if result is not None else None)
            return None if frame is None else (frame, None, blank)
        if result is None:
            return None
        return self._frame_for(result), result.mask, None

    def _base(
        self, frame: Frame, mask: np.ndarray | None, blank: str | None, count: bool = True
    ) -> np.ndarray:
        """Caller holds self._lock. The picture every output starts from: the camera's frame,
        redacted (privacy on), or blank with a banner. Counts the privacy outcome (of a
        published frame: `count`)."""
        spent = frame.materialize()  # smooth output: a newer frame nobody took yet
        if spent:
            self._observer.stage("convert", spent)
        red = self.privacy
        if red is None:
            return frame.image
        t0 = time.perf_counter()
        if blank is not None:
            img = red.blank(frame.image.shape, blank)
        else:
            img = red.apply(frame.image, mask)
        if count:
            self._observer.stage("redact", time.perf_counter() - t0)
            self._observer.privacy_frame(self.stream_id, "redacted" if blank is None else "blanked")
        return img

    def _carried(self, frame: Frame, result: Result) -> np.ndarray:
        spent = frame.materialize()  # a newer frame nobody took yet
        if spent:
            self._observer.stage("convert", spent)
        return self.carry.mask_for(frame, result).mask

    # Each sink on its own: one that raises is counted and skipped, the others get the frame.
    def _wants(self, sink: Sink) -> bool:
        try:
            return sink.wants_frames()
        except Exception:
            self._sink_failed(sink)
            return False

    def _put(self, sink: Sink, frame: Rendered) -> None:
        try:
            sink.put(frame)
        except Exception:
            self._sink_failed(sink)

    def _sink_failed(self, sink: Sink) -> None:
        name = sink_name(sink)
        self._observer.sink_error(self.stream_id, name)
        if name not in self._failed_sinks:  # logged once: one failing each frame would flood
            self._failed_sinks.add(name)
            log.exception("%s: sink %s failed; the other sinks go on", self.stream_id, name)

    def snapshot(self, raw: bool = False) -> tuple[bytes, Frame] | None:
        """JPEG of the newest annotated frame, rendered now (for /snapshot.jpg with no viewer).
        `raw`: the camera's frame unredacted (the caller checked the admin may see it)."""
        picked = self._pick(self.result)
        if picked is None:
            return None
        frame, mask, blank = picked
        with self._lock:
            if raw:
                frame.materialize()
                rendered = Rendered(
                    self.stream_id, frame.image, frame.seq, frame.capture_ts, self.jpeg_quality
                )
            else:
                rendered = self._render(frame, self._base(frame, mask, blank), mask)
            jpeg = rendered.jpeg()
        return jpeg, frame

    def _frame_for(self, result: Result) -> Frame:
        """The frame to draw the mask on: its own, or in smooth mode the newest one."""
        if self.output == "smooth":
            newest = self.peek_frame()
            if newest is not None and newest.seq > result.frame.seq:
                return newest
        return result.frame

    def _render(self, frame: Frame, base: np.ndarray, mask: np.ndarray | None) -> Rendered:
        """Caller holds self._lock (the renderer's buffers are reused). No mask: `base` as it
        is (a blanked frame carries no overlay)."""
        img = base
        if mask is not None:
            t0 = time.perf_counter()
            img = self.renderer.render(base, mask)
            self._observer.stage("render", time.perf_counter() - t0)
        self._last = Rendered(self.stream_id, img, frame.seq, frame.capture_ts, self.jpeg_quality)
        return self._last

    def _render_variant(
        self, v: Variant, frame: Frame, base: np.ndarray, mask: np.ndarray | None
    ) -> Rendered:
        """Caller holds self._lock. `base` (redacted where privacy is on) as it is when the
        variant has no renderer (overlay off) or no mask; the raw view: the camera's frame.
        Each variant's renderer has buffers of its own."""
        if v.raw:
            img = frame.image
        elif v.renderer is None or mask is None:
            img = base
        else:
            img = v.renderer.render(base, mask)
        return Rendered(self.stream_id, img, frame.seq, frame.capture_ts, self.jpeg_quality)

    def _count_classes(self, mask: np.ndarray) -> None:
        labels = self.renderer.labels
        self.fractions = class_fractions(mask, len(labels))
        self._observer.class_fractions(self.stream_id, labels, self.fractions)
