"""The mosaic: several streams tiled into one picture, for one MJPEG that shows a whole site.

    render threads --Rendered--> MosaicTap (one per stream: the newest picture, already
    shrunk to each tile size in use) --> composer thread (one JPEG per layout, at most
    `mosaic.max_fps`, only while the layout has viewers) --> the layout's publisher sink

A tap is an ordinary sink of its stream; it asks for frames no faster than the mosaic's rate
and downscales each one into its tile sizes as it arrives (the full frame is never copied).
A layout (streams, columns, width) is composed and encoded once per tick for all of its
viewers, and only when a tile or a state changed (with one repeat a second, so a viewer of
a site whose cameras are all down still gets pictures). A layout nobody watches is dropped,
and a tap no layout uses is detached, so memory stays bounded by the layouts being watched.

Like the other outputs this module sees only the shared modules; the service hands it the
stream set, the states and the publishers through callables."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from segstream.stream.config import MosaicConfig
from segstream.stream.datatypes import Rendered, Sink, StreamState

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) of a tile
# Label colours (BGR) of each state; anything else (removed, unknown) is grey.
STATE_BGR: dict[str, tuple[int, int, int]] = {
    StreamState.LIVE: (63, 160, 40),
    StreamState.STARTING: (128, 128, 128),
    StreamState.RECONNECTING: (26, 150, 220),
    StreamState.ERROR: (40, 40, 200),
    StreamState.STOPPED: (90, 90, 90),
}
LABEL_BG = (24, 20, 17)


class MosaicFull(Exception):
    """As many distinct layouts as allowed are being watched."""


def grid(n: int, cols: int | None, width: int) -> tuple[int, int, Size]:
    """Columns, rows and tile size of n tiles `width` pixels wide: 16:9 tiles of even size;
    columns default to a square-ish grid."""
    c = cols if cols is not None else max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / c))
    tw = max(16, (width // c) & ~1)
    th = max(10, (tw * 9 // 16) & ~1)
    return c, rows, (tw, th)


def label_height(tile_h: int) -> int:
    return max(12, min(28, tile_h // 8))


def picture_size(tile: Size) -> Size:
    """The part of a tile above its label, where the picture goes."""
    tw, th = tile
    return tw, th - label_height(th)


def fit(image: np.ndarray, size: Size) -> np.ndarray:
    """The image shrunk (or grown) to fit inside size, keeping its aspect ratio."""
    h, w = image.shape[:2]
    tw, th = size
    scale = min(tw / w, th / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (nw, nh), interpolation=interp)


class MosaicTap:
    """A stream's sink for the mosaic: the newest picture per tile size in use."""

    name = "mosaic"

    def __init__(self, stream_id: str, max_fps: float) -> None:
        self.stream_id = stream_id
        self._interval = 0.9 / max_fps  # a little early: frames arrive with jitter
        self._uses: dict[Size, int] = {}  # tile size -> layouts using it
        self._tiles: dict[Size, np.ndarray] = {}
        self.version = 0  # bumped by each put
        self.closed = False
        self._last = 0.0
        self._lock = threading.Lock()

    def wants_frames(self) -> bool:
        return (
            not self.closed and bool(self._uses) and time.monotonic() - self._last >= self._interval
        )

    def put(self, frame: Rendered) -> None:
        """Render thread: one resize per tile size, no copy of the full frame."""
        self._last = time.monotonic()
        with self._lock:
            sizes = list(self._uses)
        shrunk = {size: fit(frame.image, size) for size in sizes}
        with self._lock:
            self._tiles.update(shrunk)
            self.version += 1

    def tile(self, size: Size) -> np.ndarray | None:
        with self._lock:
            return self._tiles.get(size)

    def use(self, size: Size) -> None:
        with self._lock:
            self._uses[size] = self._uses.get(size, 0) + 1

    def unuse(self, size: Size) -> None:
        with self._lock:
            n = self._uses.get(size, 0) - 1
            if n > 0:
                self._uses[size] = n
            else:
                self._uses.pop(size, None)
                self._tiles.pop(size, None)

    @property
    def used(self) -> bool:
        return bool(self._uses)

    def close(self) -> None:
        self.closed = True


@dataclass(eq=False)
class Layout:
    """One distinct mosaic: the streams (None: every stream, following the stream set), the
    columns (None: automatic) and the width. Its publisher is shared by all its viewers."""

    key: tuple[tuple[str, ...] | None, int | None, int]
    publisher: Sink
    users: int = 0
    # Composer thread only:
    placed: dict[str, tuple[MosaicTap, Size]] = field(default_factory=dict)
    seen: tuple[object, ...] = ()
    last: Rendered | None = None
    last_ts: float = 0.0
    seq: int = 0

    @property
    def streams(self) -> tuple[str, ...] | None:
        return self.key[0]

    @property
    def cols(self) -> int | None:
        return self.key[1]

    @property
    def width(self) -> int:
        return self.key[2]

    def publisher_closed(self) -> bool:
        return bool(getattr(self.publisher, "closed", False))


class Mosaic:
    """Layouts being watched, the taps they use, and the composer thread."""

    def __init__(
        self,
        cfg: MosaicConfig,
        *,
        stream_ids: Callable[[], Sequence[str]],
        state_of: Callable[[str], str | None],
        attach: Callable[[str, Sink], bool],
        detach: Callable[[str, Sink], None],
        publisher: Callable[[], Sink],
    ) -> None:
        """`stream_ids`: the streams now; `state_of`: a stream's state (None once removed);
        `attach`/`detach`: add a sink to a stream's view (False: no such stream) and take it
        off again; `publisher`: a new sink that serves a layout's JPEGs to its viewers."""
        self.cfg = cfg
        self._stream_ids = stream_ids
        self._state_of = state_of
        self._attach = attach
        self._detach = detach
        self._publisher = publisher
        self._layouts: dict[tuple[object, ...], Layout] = {}
        self._taps: dict[str, MosaicTap] = {}  # composer thread only
        self._placed: dict[Layout, None] = {}  # layouts holding tap sizes; composer only
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.compose_s = 0.0  # CPU seconds spent composing and encoding, for the benchmarks

    # -- viewers (event loop) --------------------------------------------------------------
    def acquire(self, streams: Sequence[str] | None, cols: int | None, width: int) -> Layout:
        """The layout for these settings, shared with its other viewers; raises MosaicFull.
        Pair with release()."""
        key = (tuple(streams) if streams is not None else None, cols, width)
        if self._stopped.is_set():
            raise MosaicFull("the service is stopping")
        with self._lock:
            layout = self._layouts.get(key)
            if layout is None:
                if len(self._layouts) >= self.cfg.max_layouts:
                    raise MosaicFull(
                        f"{len(self._layouts)} mosaic layouts are being watched "
                        "(mosaic.max_layouts); watch one of those"
                    )
                layout = self._layouts[key] = Layout(key, self._publisher())
            layout.users += 1
        self._wake.set()
        return layout

    def release(self, layout: Layout) -> None:
        with self._lock:
            layout.users -= 1
            if layout.users > 0:
                return
            self._layouts.pop(layout.key, None)
        layout.publisher.close()
        self._wake.set()  # the composer lets go of its taps

    def layouts(self) -> int:
        return len(self._layouts)

    # -- the composer thread ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mosaic", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            layouts, self._layouts = list(self._layouts.values()), {}
        for layout in layouts:
            layout.publisher.close()

    def _run(self) -> None:
        period = 1.0 / self.cfg.max_fps
        next_at = time.monotonic()
        while not self._stopped.is_set():
            with self._lock:
                layouts = list(self._layouts.values())
            if not layouts:
                self._release_all()
                self._wake.wait(1.0)
                self._wake.clear()
                next_at = time.monotonic()
                continue
            t0 = time.thread_time()
            try:
                self.tick(layouts)
            except Exception:
                log.exception("mosaic composition failed")
            self.compose_s += time.thread_time() - t0
            next_at = max(next_at + period, time.monotonic())
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            self._wake.clear()

    def tick(self, layouts: list[Layout]) -> None:
        """Composes each layout whose tiles changed; lets go of the tiles of layouts no
        longer watched, and of taps no layout uses."""
        for layout in layouts:
            if not layout.publisher_closed():
                self._compose(layout)
        with self._lock:
            gone = [lay for lay in self._placed if self._layouts.get(lay.key) is not lay]
        for layout in gone:
            self._unplace(layout)
        self._drop_unused_taps()

    def _release_all(self) -> None:
        for layout in list(self._placed):
            self._unplace(layout)
        self._drop_unused_taps()

    def _tap(self, sid: str) -> MosaicTap | None:
        tap = self._taps.get(sid)
        if tap is not None and not tap.closed:
            return tap
        tap = MosaicTap(sid, self.cfg.max_fps)  # a stream removed and added again: a new tap
        if not self._attach(sid, tap):
            self._taps.pop(sid, None)
            return None
        self._taps[sid] = tap
        return tap

    def _place(self, layout: Layout, ids: Sequence[str], size: Size) -> None:
        """Registers the layout's tile size with the tap of each of its streams."""
        want: dict[str, tuple[MosaicTap, Size]] = {}
        for sid in ids:
            tap = self._tap(sid)
            if tap is not None:
                want[sid] = (tap, size)
        for sid, (tap, sz) in layout.placed.items():
            if want.get(sid) != (tap, sz):
                tap.unuse(sz)
        for sid, (tap, sz) in want.items():
            if layout.placed.get(sid) != (tap, sz):
                tap.use(sz)
        layout.placed = want
        self._placed[layout] = None

    def _unplace(self, layout: Layout) -> None:
        for tap, sz in layout.placed.values():
            tap.unuse(sz)
        layout.placed = {}
        self._placed.pop(layout, None)

    def _drop_unused_taps(self) -> None:
        for sid, tap in list(self._taps.items()):
            if not tap.used or tap.closed:
                del self._taps[sid]
                if not tap.closed:
                    self._detach(sid, tap)

    def _compose(self, layout: Layout) -> None:
        if layout.streams is not None:
            ids = list(layout.streams)  # at most max_streams: the endpoint checks
        else:  # every stream, as many as a mosaic may tile
            ids = list(self._stream_ids())[: self.cfg.max_streams]
        cols, _, (tw, th) = grid(len(ids), layout.cols, layout.width)
        size = picture_size((tw, th))
        self._place(layout, ids, size)
        states = [self._state_of(sid) for sid in ids]
        seen = (
            tuple(ids),
            cols,
            tuple(states),
            tuple(layout.placed[s][0].version if s in layout.placed else -1 for s in ids),
        )
        now = time.monotonic()
        if seen == layout.seen and layout.last is not None:
            if now - layout.last_ts >= 1.0:  # nothing new: repeat the last picture once a second
                layout.last_ts = now
                layout.publisher.put(layout.last)
            return
        tiles = [layout.placed[s][0].tile(size) if s in layout.placed else None for s in ids]

        def paint(i: int, cell: np.ndarray) -> None:
            paint_tile(cell, tiles[i], ids[i], states[i] or "removed")

        canvas = compose(len(ids), cols, (tw, th), paint)
        layout.seq += 1
        layout.last = Rendered("mosaic", canvas, layout.seq, now, self.cfg.jpeg_quality)
        layout.seen, layout.last_ts = seen, now
        layout.publisher.put(layout.last)  # encoded here, once, for every viewer


def compose(n: int, cols: int, tile: Size, paint: Callable[[int, np.ndarray], None]) -> np.ndarray:
    """A black canvas of n tiles `cols` wide, each cell painted by paint(i, cell) in place
    (the node's mosaic and the cluster gateway's share this layout)."""
    tw, th = tile
    rows = max(1, math.ceil(n / cols))
    canvas = np.zeros((rows * th, cols * tw, 3), np.uint8)
    for i in range(n):
        paint(i, cell_of(canvas, i, cols, tile))
    return canvas


def cell_of(canvas: np.ndarray, i: int, cols: int, tile: Size) -> np.ndarray:
    """The i-th tile of a canvas (a view: writing it writes the canvas)."""
    tw, th = tile
    r, c = divmod(i, cols)
    return canvas[r * th : (r + 1) * th, c * tw : (c + 1) * tw]


def paint_tile(cell: np.ndarray, img: np.ndarray | None, stream_id: str, state: str) -> None:
    """A tile: its picture centred above the label (none yet: black), then the label."""
    if img is not None:
        pw, ph = picture_size((cell.shape[1], cell.shape[0]))
        h, w = img.shape[:2]
        y, x = (ph - h) // 2, (pw - w) // 2
        cell[y : y + h, x : x + w] = img
    draw_label(cell, stream_id, state)


def draw_label(cell: np.ndarray, stream_id: str, state: str) -> None:
    """A strip along the tile's bottom: a square in the state's colour, the id and the state."""
    th, tw = cell.shape[:2]
    bar = label_height(th)
    scale = bar / 36.0
    y0 = th - bar
    cv2.rectangle(cell, (0, y0), (tw - 1, th - 1), LABEL_BG, -1)
    pad = max(2, bar // 6)
    cv2.rectangle(
        cell, (pad, y0 + pad), (bar - pad, th - 1 - pad), STATE_BGR.get(state, (110, 110, 110)), -1
    )
    text = f"{stream_id}  {state}"
    with contextlib.suppress(cv2.error):
        cv2.putText(
            cell,
            text,
            (bar + pad, th - bar // 4 - 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (235, 235, 235),
            1,
            cv2.LINE_AA,
        )
