"""Zone coverage: the fraction of each zone's pixels that each class covers.

A pixel belongs to a zone when its centre lies inside the polygon (even-odd rule), so
coverage is exact and independent of how a line-drawing rasteriser rounds edges. Each zone
is rasterised once per mask size (cached); per frame, one histogram of the class ids under
the zone's pixels, over the zone's bounding box only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from segstream.stream.events.config import ZoneConfig

NUM_IDS = 256  # class ids are uint8


@dataclass(frozen=True)
class ZoneRaster:
    """One zone at one mask size: its bounding box and the pixels inside it."""

    rows: slice
    cols: slice
    inside: np.ndarray  # uint8 0/255 over the bounding box (the mask argument of calcHist)
    pixels: int


def rasterise(polygon: Sequence[tuple[float, float]], height: int, width: int) -> ZoneRaster:
    """The pixels of a (height x width) mask whose centres lie inside the polygon."""
    pts = np.asarray(polygon, dtype=np.float64) * (width, height)
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, width), min(y1, height)
    xs = np.arange(x0, x1, dtype=np.float64) + 0.5
    ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    inside = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        if ay == by:
            continue  # a horizontal edge never crosses a horizontal ray
        # Half-open in y, so a vertex on the ray counts once.
        spans = (ys >= min(ay, by)) & (ys < max(ay, by))
        x_cross = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= spans & (xs < x_cross)
    return ZoneRaster(
        rows=slice(y0, y1),
        cols=slice(x0, x1),
        inside=inside.astype(np.uint8) * 255,
        pixels=int(inside.sum()),
    )


class ZoneCoverage:
    """The zones of one stream, with their rasters cached per mask size."""

    def __init__(self, zones: Sequence[ZoneConfig] = ()) -> None:
        self._zones: list[ZoneConfig] = []
        self._cache: dict[tuple[str, int, int], ZoneRaster] = {}
        self.set_zones(zones)

    @property
    def zones(self) -> list[ZoneConfig]:
        return list(self._zones)

    def set_zones(self, zones: Sequence[ZoneConfig]) -> None:
        """Replace the zones; rasters of unchanged polygons are kept."""
        keep = {(z.name, tuple(z.polygon)) for z in zones}
        old = {z.name: tuple(z.polygon) for z in self._zones}
        self._cache = {k: r for k, r in self._cache.items() if (k[0], old.get(k[0])) in keep}
        self._zones = list(zones)

    def raster(self, zone: ZoneConfig, height: int, width: int) -> ZoneRaster:
        key = (zone.name, height, width)
        r = self._cache.get(key)
        if r is None:
            r = self._cache[key] = rasterise(zone.polygon, height, width)
        return r

    def compute(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """{zone name: float32 array of NUM_IDS fractions (index = class id)} for a uint8 HxW
        class-id mask; {} without zones (nothing computed). A zone with no pixel at this size
        (a sliver) covers nothing."""
        if not self._zones:
            return {}
        h, w = mask.shape[:2]
        out: dict[str, np.ndarray] = {}
        for z in self._zones:
            r = self.raster(z, h, w)
            if r.pixels == 0:
                out[z.name] = np.zeros(NUM_IDS, np.float32)
                continue
            hist = cv2.calcHist([mask[r.rows, r.cols]], [0], r.inside, [NUM_IDS], [0, NUM_IDS])
            out[z.name] = hist.ravel() / np.float32(r.pixels)
        return out


def named(
    fractions: np.ndarray, labels: Sequence[str], wanted: Sequence[str] = ()
) -> dict[str, float]:
    """{class name: fraction} for the classes that occur plus those in `wanted` (rule classes)."""
    ids = set(np.flatnonzero(fractions[: len(labels)]).tolist())
    ids.update(labels.index(c) for c in wanted if c in labels)
    return {labels[i]: float(fractions[i]) for i in sorted(ids)}
