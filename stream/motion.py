"""Motion for the frames between inferences: a change detector that gates the model, and the
newest class mask carried to later frames by optical flow (with its age), plus a margin that
grows with that age for a redaction that must fail closed.

Standalone on purpose: the scheduler and the renderer call it (see ``ChangeDetector`` and
``MaskCarrier``); nothing here imports a stage.

Coordinates: masks are the model's output (class ids at its input size, the whole frame
stretched to it). The carrier computes flow on grey thumbnails of every frame at
``mask size * scale`` (also the whole frame), so a flow field scales to the mask by a plain
resize and no aspect ratio enters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# --- shared ---


def grey_thumbnail(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 grey ``size`` = (h, w) of a BGR or grey frame (a decoder's Y plane can be passed
    as it is). Grey first, then a bilinear resize to twice the size and an exact 2:1 area
    average: close to a full area resize (no aliasing of fine texture into false motion) at a
    third of its cost for a 720p frame."""
    h, w = size
    g = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    if g.shape[:2] == (h, w):
        return g.copy() if g is image else g  # kept: never the caller's buffer
    if g.shape[0] >= 2 * h and g.shape[1] >= 2 * w:
        g = cv2.resize(g, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR)


# --- motion gating ---


@dataclass(frozen=True, slots=True)
class Change:
    """One frame against the reference: pixels past the threshold and the verdict."""

    changed: bool
    pixels: int  # thumbnail pixels whose difference passed the threshold
    threshold: float  # grey levels: max(k * noise, floor)
    noise: float  # robust sigma of the difference (grey levels)


class ChangeDetector:
    """Did the scene change since the last inferred frame?

    A small, blurred grey thumbnail of each frame is matched in brightness and contrast to the
    reference (the last inferred frame's thumbnail: a slow light change is a gain and an
    offset); pixels whose difference passes ``k`` times a robust noise estimate (median
    absolute deviation of the difference, so a moving object does not raise it) and at least
    ``floor`` grey levels count as changed; ``min_pixels`` of them mean the scene changed.
    Downscaling by area already averages most sensor noise away.

    Use: ``t = d.thumbnail(frame)``; ``d.check(t).changed`` -> infer, then ``d.reference = t``.
    """

    def __init__(
        self,
        width: int = 128,
        *,
        k: float = 5.0,
        floor: float = 6.0,
        min_pixels: int = 6,
    ) -> None:
        self.width = width
        self.k, self.floor, self.min_pixels = k, floor, min_pixels
        self.reference: np.ndarray | None = None

    def thumbnail(self, image: np.ndarray) -> np.ndarray:
        """float32 grey thumbnail, ``width`` wide with the frame's aspect, 3x3 blurred."""
        h, w = image.shape[:2]
        tw = min(self.width, w)
        th = max(1, round(h * tw / w))
        t = grey_thumbnail(image, (th, tw)).astype(np.float32)
        return cv2.GaussianBlur(t, (3, 3), 0)

    def check(self, thumb: np.ndarray) -> Change:
        """Changed against the reference (always changed without one or on a size change)."""
        ref = self.reference
        if ref is None or ref.shape != thumb.shape:
            return Change(True, thumb.size, 0.0, 0.0)
        # Pixels saturated in either frame follow no gain: left out of the fit and the count.
        bright = cv2.dilate(cv2.max(thumb, ref), _K3)  # a clipped highlight's surroundings
        valid = (bright < SATURATED).view(np.uint8)
        if cv2.countNonZero(valid) < thumb.size // 4:
            valid = np.ones_like(valid)
        diff = _match_brightness(thumb, ref, valid) - ref
        d = diff[valid != 0]
        med = float(np.median(d))
        noise = 1.4826 * float(np.median(np.abs(d - med)))
        threshold = max(self.k * noise, self.floor)
        pixels = int(np.count_nonzero(np.abs(d - med) > threshold))
        return Change(pixels >= self.min_pixels, pixels, threshold, noise)

    def changed(self, image: np.ndarray) -> bool:
        """One call for a frame: its thumbnail against the reference."""
        return self.check(self.thumbnail(image)).changed


SATURATED = 200  # thumbnail grey level near which highlights may be clipped


def _match_brightness(cur: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``cur`` with the reference's mean and spread over ``valid`` (removes a global gain and
    offset: a slow light change, an exposure step)."""
    cm, cs = cv2.meanStdDev(cur, mask=valid)
    rm, rs = cv2.meanStdDev(ref, mask=valid)
    gain = float(rs[0, 0]) / max(float(cs[0, 0]), 1e-3)
    return (cur - float(cm[0, 0])) * gain + float(rm[0, 0])


# --- flow ---

# OpenCV's convention: fn(a, b) -> float32 [h, w, 2], for each pixel x of grey image a the
# offset (dx, dy) to where it is in b: a(x) ~ b(x + flow(x)).
# DIS also takes an initial flow (init=), from which it refines.
FlowFn = Callable[..., np.ndarray]

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def dis_flow(preset: str = "ultrafast", finest_scale: int | None = None) -> FlowFn:
    """OpenCV DIS (one instance per stream: it keeps buffers). ``finest_scale`` overrides the
    preset's (ultrafast: 2, i.e. the flow is solved at a quarter of the thumbnail's size)."""
    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])  # type: ignore[attr-defined]
    if finest_scale is not None:
        dis.setFinestScale(finest_scale)

    def flow(a: np.ndarray, b: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        return dis.calc(a, b, None if init is None else init.copy())

    return flow


def farneback_flow() -> FlowFn:
    def flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 2, 5, 1.1, 0)

    return flow


def flow_method(name: str) -> FlowFn:
    """``dis-ultrafast``, ``dis-fast``, ``dis-medium``, ``dis-ultrafast-s1`` (finest scale 1),
    ``farneback``."""
    if name == "farneback":
        return farneback_flow()
    parts = name.split("-")
    if parts[0] != "dis" or len(parts) not in (2, 3) or parts[1] not in DIS_PRESETS:
        raise ValueError(f"unknown flow method {name!r}")
    scale = int(parts[2][1:]) if len(parts) == 3 else None
    return dis_flow(parts[1], scale)


def motion_vector_flow(
    vectors: np.ndarray | None, frame_size: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Backward flow at ``size`` (h, w) from a decoder's motion vectors (PyAV
    ``frame.side_data.get("MOTION_VECTORS").to_ndarray()`` with ``flags2=+export_mvs``) of a
    frame of ``frame_size`` (h, w). Blocks predicted from the previous frame give their vector;
    intra blocks, future references and keyframes (``None``) give no motion."""
    fh, fw = frame_size
    h, w = size
    out = np.zeros((h, w, 2), np.float32)
    if vectors is None or len(vectors) == 0:
        return out
    v = vectors[vectors["source"] < 0]
    cell = 4  # H.264's smallest partition; rasterise on a grid of 4x4 frame pixels
    gh, gw = -(-fh // cell), -(-fw // cell)
    grid = np.zeros((gh, gw, 2), np.float32)
    scale = np.maximum(v["motion_scale"].astype(np.float32), 1.0)
    dx = v["motion_x"] / scale
    dy = v["motion_y"] / scale
    bw = np.maximum(v["w"].astype(np.int64) // cell, 1)
    bh = np.maximum(v["h"].astype(np.int64) // cell, 1)
    x0 = (v["dst_x"].astype(np.int64) - v["w"] // 2) // cell
    y0 = (v["dst_y"].astype(np.int64) - v["h"] // 2) // cell
    n = bw * bh
    idx = np.repeat(np.arange(len(v)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    ys = np.clip(y0[idx] + k // bw[idx], 0, gh - 1)
    xs = np.clip(x0[idx] + k % bw[idx], 0, gw - 1)
    grid[ys, xs, 0] = dx[idx]
    grid[ys, xs, 1] = dy[idx]
    out = np.asarray(cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR), np.float32)
    out[..., 0] *= w / fw
    out[..., 1] *= h / fh
    return out


# --- carried masks ---

_EDGE = cv2.BORDER_REPLICATE  # a pixel entering at the border takes the nearest one's path


@dataclass(frozen=True, slots=True)
class Carried:
    """The mask to show on frame ``seq``: computed on frame ``source_seq``, warped to ``seq``."""

    mask: np.ndarray  # uint8 class ids at the model's size
    seq: int
    source_seq: int
    age_frames: int
    age_s: float


class _Anchor:
    """A frame sent to the model: its thumbnail and, chained, the map composed since it."""

    __slots__ = ("map", "moved", "seq", "thumb", "ts")

    def __init__(self, seq: int, ts: float, thumb: np.ndarray | None, ident: np.ndarray) -> None:
        self.seq, self.ts, self.thumb = seq, ts, thumb
        self.map = ident
        self.moved = False  # no flow composed yet: the map is the identity


@dataclass(slots=True)
class _Past:
    """A recently pushed frame: its thumbnail and (chained) the flow that led to it."""

    seq: int
    ts: float
    thumb: np.ndarray | None
    flow: np.ndarray | None  # float16, in the direction the chain composes


class MaskCarrier:
    """Carries the newest mask to the newest frame by dense optical flow.

    Every frame that may be shown is ``push``ed in order (its grey thumbnail at ``mask size *
    scale``, and chained, the flow from the previous one, are kept for the last ``history``
    frames); ``set_mask`` takes the model's answer for frame ``seq`` (any of those frames: the
    motion since it is composed then); ``carried()`` moves that mask once to the newest frame.
    ``anchor()`` on the newest frame when it goes to the model is optional: the map since it
    is then composed frame by frame instead of all at once when the answer comes.
    ``flow=None`` keeps the mask where it was (stale).

    ``splat=True``: the mask's foreground pixels are pushed forward to where the flow takes
    them (the background stays background, so a moving object leaves no trail). ``False``:
    every pixel of the new frame pulls its class from where the backward flow says it came
    from; a pixel just uncovered behind a moving object then inherits the object's class.

    ``refine`` (chained, pulling): a flow that takes an initial estimate (DIS); the map
    composed since the anchor starts it, and it refines it against the anchor's thumbnail
    directly when ``carried()`` asks: chaining finds large motion, the direct pair removes the
    error that chaining sub-pixel steps adds up.

    ``grow_px``: a moved mask is grown by that many pixels (the model's own masks of the
    later frames reach a little further than a moved one: see DEFAULT_GROW_PX).

    ``chain=False`` (direct): the flow between the anchor's thumbnail and the newest one,
    computed when ``carried()`` asks (once per frame), so frames never shown cost only a
    thumbnail. ``chain=True``: the flow between consecutive frames at every push (or given:
    the decoder's motion vectors, backward, so pull only), composed into each anchor's map (a
    small remap per anchor and frame; the mask itself is resampled once). Chaining adds up
    each step's error, and sub-pixel steps are what the fast flows underestimate most.
    scripts/bench_motion.py measures the combinations.
    """

    def __init__(
        self,
        mask_size: tuple[int, int],
        *,
        scale: float = 0.5,
        flow: FlowFn | None = None,
        chain: bool = False,
        splat: bool = True,
        background: int = 0,
        refine: FlowFn | None = None,
        grow_px: int = 0,
        max_anchors: int = 8,
        history: int = 16,
    ) -> None:
        self.mask_size = mask_size
        self.refine = refine
        self.grow_px = grow_px
        mh, mw = mask_size
        self.size = (max(8, round(mh * scale)), max(8, round(mw * scale)))
        self.flow, self.chain, self.splat = flow, chain, splat
        self.background = background
        self.max_anchors = max_anchors
        h, w = self.size
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        self._ident = np.dstack([gx, gy])
        self._anchors: dict[int, _Anchor] = {}
        self._past: deque[_Past] = deque(maxlen=history)
        self._thumb: np.ndarray | None = None  # the newest pushed frame's
        self._mask: np.ndarray | None = None
        self._mask_anchor: _Anchor | None = None
        self._shown: Carried | None = None  # carried() for the newest frame, once computed
        self.seq, self.ts = 0, 0.0
        self._scale = np.array([mw / w, mh / h], np.float32)  # thumbnail -> mask pixels

    def push(
        self,
        seq: int,
        image: np.ndarray | None = None,
        ts: float = 0.0,
        *,
        flow: np.ndarray | None = None,
    ) -> None:
        """The next frame (BGR or grey, any size). Chained and pulling, its backward ``flow``
        (to the previous frame, at ``self.size``) may come from elsewhere instead."""
        prev = self._thumb
        if image is not None and self.flow is not None:
            self._thumb = grey_thumbnail(image, self.size)
        if self.chain:
            if flow is None and prev is not None and self._thumb is not prev:
                assert self.flow is not None and self._thumb is not None
                flow = self.flow(prev, self._thumb) if self.splat else self.flow(self._thumb, prev)
            if flow is not None:
                live = list(self._anchors.values())
                if self._mask_anchor is not None and self._mask_anchor.seq not in self._anchors:
                    live.append(self._mask_anchor)
                for a in live:
                    self._step(a, flow)
        kept = None if flow is None or not self.chain else flow.astype(np.float16)
        self._past.append(_Past(seq, ts, self._thumb, kept))
        self.seq, self.ts, self._shown = seq, ts, None

    def _step(self, a: _Anchor, flow: np.ndarray) -> None:
        """Pull: map(x) <- map(x + back(x)); splat: pos(p) <- pos(p) + fwd(pos(p))."""
        flow = flow.astype(np.float32, copy=False)
        if self.splat:
            a.map = a.map + cv2.remap(flow, a.map, None, cv2.INTER_LINEAR, borderMode=_EDGE)
        else:
            a.map = cv2.remap(a.map, self._ident + flow, None, cv2.INTER_LINEAR, borderMode=_EDGE)
        a.moved = True

    def _from_history(self, seq: int) -> _Anchor | None:
        """An anchor on pushed frame ``seq`` (or the oldest kept, if it is older), with the
        motion since composed; None before any push."""
        past = list(self._past)
        i = next((k for k, p in enumerate(past) if p.seq >= seq), None)
        if i is None:
            return None
        a = _Anchor(past[i].seq, past[i].ts, past[i].thumb, self._ident)
        for p in past[i + 1 :]:
            if p.flow is not None:
                self._step(a, p.flow)
        return a

    def anchor(self, seq: int | None = None) -> None:
        """Pushed frame ``seq`` (default: the newest) went to the model."""
        seq = self.seq if seq is None else seq
        a = self._from_history(seq) if seq != self.seq else None
        if seq != self.seq and (a is None or a.seq != seq):
            raise ValueError(f"anchor({seq}): not among the last {len(self._past)} frames")
        self._anchors[seq] = a or _Anchor(seq, self.ts, self._thumb, self._ident)
        while len(self._anchors) > self.max_anchors:  # answers that never came
            del self._anchors[min(self._anchors)]

    def set_mask(self, seq: int, mask: np.ndarray) -> None:
        """The model's mask for pushed frame ``seq``. For a frame older than the history, the
        motion since the oldest kept one is applied (a frame never pushed: none)."""
        if mask.shape != self.mask_size:
            raise ValueError(f"mask shape {mask.shape} != {self.mask_size}")
        if self._mask_anchor is not None and seq < self._mask_anchor.seq:
            return  # an older answer than the one shown
        a = self._anchors.get(seq) or self._from_history(seq)
        if a is None:  # nothing pushed yet
            a = _Anchor(self.seq, self.ts, self._thumb, self._ident)
        for s in [s for s in self._anchors if s <= seq]:
            del self._anchors[s]
        self._mask, self._mask_anchor, self._shown = mask, a, None

    def carried(self) -> Carried | None:
        """The newest mask moved to the newest pushed frame (None before any mask)."""
        a, mask = self._mask_anchor, self._mask
        if a is None or mask is None:
            return None
        if self._shown is None:
            self._shown = Carried(
                self._carry(a, mask), self.seq, a.seq, self.seq - a.seq, max(0.0, self.ts - a.ts)
            )
        return self._shown

    def _carry(self, a: _Anchor, mask: np.ndarray) -> np.ndarray:
        tmap: np.ndarray | None
        if self.chain and self.refine is not None and a.moved and not self.splat:
            tmap = self._refined(a)
        elif self.chain:
            tmap = a.map if a.moved else None
        elif self.flow is None or a.thumb is None or self._thumb is None or a.seq == self.seq:
            tmap = None
        elif self.splat:
            tmap = self._ident + self.flow(a.thumb, self._thumb)
        else:
            tmap = self._ident + self.flow(self._thumb, a.thumb)
        if tmap is None:
            return mask
        moved = self._splat(mask, tmap) if self.splat else self._pull(mask, tmap)
        return grow_mask(moved, self.grow_px, self.background)

    def _refined(self, a: _Anchor) -> np.ndarray:
        """The chained map refined against the anchor directly, unless that explains the
        newest frame worse (a refinement that lost a fast object)."""
        anchor, newest = a.thumb, self._thumb
        assert self.refine is not None and anchor is not None and newest is not None
        refined = self._ident + self.refine(newest, anchor, a.map - self._ident)

        def error(tmap: np.ndarray) -> float:
            warped = cv2.remap(anchor, tmap, None, cv2.INTER_LINEAR, borderMode=_EDGE)
            return float(cv2.norm(warped, newest, cv2.NORM_L1))

        return refined if error(refined) <= error(a.map) else a.map

    def _to_mask(self, tmap: np.ndarray) -> np.ndarray:
        """A thumbnail-sized map of thumbnail positions -> mask-sized, of mask positions (the
        scaling is linear, so it is done on the small map before the resize)."""
        mh, mw = self.mask_size
        small = (tmap + 0.5) * self._scale - 0.5
        return cv2.resize(small, (mw, mh), interpolation=cv2.INTER_LINEAR)

    def _pull(self, mask: np.ndarray, tmap: np.ndarray) -> np.ndarray:
        return cv2.remap(mask, self._to_mask(tmap), None, cv2.INTER_NEAREST, borderMode=_EDGE)

    def _splat(self, mask: np.ndarray, tmap: np.ndarray) -> np.ndarray:
        """Each foreground pixel written where it moved to; 1-px cracks (where the object
        stretched) closed."""
        mh, mw = self.mask_size
        ys, xs = np.nonzero(mask != self.background)
        out = np.full_like(mask, self.background)
        if len(ys) == 0:
            return out
        pos = self._to_mask(tmap)[ys, xs]
        dx = np.rint(pos[:, 0]).astype(np.intp)
        dy = np.rint(pos[:, 1]).astype(np.intp)
        inside = (dx >= 0) & (dx < mw) & (dy >= 0) & (dy < mh)
        out[dy[inside], dx[inside]] = mask[ys[inside], xs[inside]]
        return _close_cracks(out, self.background)


def _close_cracks(mask: np.ndarray, background: int) -> np.ndarray:
    """Background pixels with foreground on both sides (left-right or up-down) take the
    larger neighbouring class: a 3x3 morphological closing of the foreground."""
    fg = (mask != background).view(np.uint8)
    closed = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, _K3)
    holes = (closed != 0) & (fg == 0)
    if holes.any():
        ids = np.where(fg != 0, mask.astype(np.int16) + 1, 0).astype(np.uint16)
        grown = cv2.dilate(ids, _K3)
        mask[holes] = (grown[holes] - 1).astype(mask.dtype)
    return mask


_K3 = np.ones((3, 3), np.uint8)


# --- margins for a redaction that fails closed ---


def age_margin(
    age_frames: int, *, base_px: float = 8.0, px_per_frame: float = 2.0, max_px: float = 48.0
) -> int:
    """Mask pixels to grow a carried mask by: the older it is, the further an object may have
    moved from where the flow put it."""
    return round(min(max_px, base_px + px_per_frame * max(0, age_frames)))


def grow_mask(mask: np.ndarray, px: int, background: int = 0) -> np.ndarray:
    """Every non-``background`` region grown by ``px`` pixels (a disc); a background pixel
    taken over gets the largest neighbouring class id. ``px <= 0`` returns the mask."""
    if px <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    fg = cv2.compare(mask, background, cv2.CMP_NE)  # type: ignore[call-overload]
    if background == 0:  # the smallest id: a plain max filter grows the others into it
        grown = cv2.dilate(mask, kernel)
    else:  # shift the ids so that background is the smallest
        shifted = np.where(fg != 0, mask.astype(np.uint16) + 1, 0).astype(np.uint16)
        grown16 = cv2.dilate(shifted, kernel)
        grown = np.where(grown16 > 0, grown16.astype(np.int16) - 1, background).astype(mask.dtype)
    cv2.copyTo(mask, fg, grown)  # the mask's own classes stay where they are
    return grown


# --- the service's choice ---
# scripts/bench_motion.py (docs/bench_motion.json), vtest.avi, N = 5: chained DIS ultrafast on
# 256x256 thumbnails, pulling, agrees with a fresh inference on 71.7 % of foreground pixels
# (stale: 57.7 %) and covers 94.1 % of it grown by 8 px (stale 81.4 %) for 3.0 CPU ms a 720p
# frame; refining (``refine=``) adds 0.6 points for 1.4 ms more, 513x513 thumbnails 1.5 points
# for 6.4 ms more, the decoder's motion vectors lose 6 points there (MPEG-4) and tie on H.264;
# splatting and direct flow lose at N = 10 (direct: 84.8 % covered against 90.7 %).

CARRY_MODES = ("none", "flow")
DEFAULT_FLOW = "dis-ultrafast"
DEFAULT_SCALE = 0.5  # flow on 256x256 thumbnails for the 513x513 model
DEFAULT_CHAIN = True
DEFAULT_SPLAT = False
# Grown by 1 px, the moved mask matches 77.8 % of the fresh foreground instead of 71.7 % (N =
# 5; N = 10: 71.2 % instead of 65.1 %) at the same intersection over union (55.4 % / 55.7 %).
DEFAULT_GROW_PX = 1


def new_carrier(mask_size: tuple[int, int], carry: str = "flow") -> MaskCarrier:
    """The carrier the service and ``segstream predict --every`` use: ``flow`` carries the
    mask by the default flow, ``none`` keeps it where it was computed (stale)."""
    if carry not in CARRY_MODES:
        raise ValueError(f"carry must be one of {CARRY_MODES}, got {carry!r}")
    flow = flow_method(DEFAULT_FLOW) if carry == "flow" else None
    return MaskCarrier(
        mask_size,
        scale=DEFAULT_SCALE,
        flow=flow,
        chain=DEFAULT_CHAIN,
        splat=DEFAULT_SPLAT,
        grow_px=DEFAULT_GROW_PX if flow is not None else 0,
    )
