#!/usr/bin/env python
"""Milliseconds per frame of zone coverage: 4 zones (quadrant-sized quadrilaterals, one
concave) on a 513x513 VOC class-id mask, the model's output size; plus the same with no zones
(the cost a stream without zones pays), the whole per-frame call of the events feature
(coverage, class names, rules; no store), and the one-off rasterisation per zone and size.

Prints one JSON line per case (median and p99 over --frames calls, after a warm-up):
  python scripts/bench_zones.py [--frames 2000] [--size 513] [--zones 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segstream.models.labels import VOC_LABELS
from segstream.stream.events.config import EventsConfig, ZoneConfig
from segstream.stream.events.feature import EventsFeature
from segstream.stream.events.zones import ZoneCoverage, rasterise

POLYGONS = [
    [(0.02, 0.05), (0.48, 0.02), (0.45, 0.47), (0.05, 0.49)],
    [(0.52, 0.03), (0.97, 0.05), (0.96, 0.48), (0.55, 0.45)],
    [(0.03, 0.52), (0.47, 0.55), (0.30, 0.70), (0.46, 0.97), (0.02, 0.95)],  # concave
    [(0.55, 0.53), (0.98, 0.51), (0.97, 0.98), (0.51, 0.96)],
]


def mask(size: int) -> np.ndarray:
    """Blobs of a few classes over background, like a segmented street scene."""
    rng = np.random.default_rng(0)
    m = np.zeros((size, size), np.uint8)
    for _ in range(40):
        y, x = rng.integers(0, size, 2)
        h, w = rng.integers(size // 20, size // 4, 2)
        m[y : y + h, x : x + w] = rng.choice([2, 6, 7, 15])
    return m


def timed(fn, frames: int) -> dict[str, float]:
    for _ in range(min(100, frames)):
        fn()
    ms = []
    for _ in range(frames):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    return {
        "median_ms": round(statistics.median(ms), 4),
        "p99_ms": round(ms[int(0.99 * len(ms))], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--size", type=int, default=513)
    p.add_argument("--zones", type=int, default=4, choices=range(1, 5))
    a = p.parse_args()
    m = mask(a.size)
    zones = [ZoneConfig(name=f"z{i}", polygon=POLYGONS[i]) for i in range(a.zones)]
    cov, empty = ZoneCoverage(zones), ZoneCoverage()
    ruled = [
        ZoneConfig.model_validate({**z.model_dump(), "rules": [{"class": "person", "above": 0.05}]})
        for z in zones
    ]
    feature = EventsFeature(EventsConfig(), home=Path("/nonexistent"), labels=VOC_LABELS)
    feature.set_stream("cam", ruled)
    cases = {
        f"coverage_{a.zones}_zones": lambda: cov.compute(m),
        "coverage_no_zones": lambda: empty.compute(m),
        f"feature_on_mask_{a.zones}_zones": lambda: feature.on_mask("cam", m, now=1.0),
    }
    for name, fn in cases.items():
        print(json.dumps({"case": name, "mask": f"{a.size}x{a.size}", **timed(fn, a.frames)}))
    t = time.perf_counter()
    for z in zones:
        rasterise(z.polygon, a.size, a.size)
    once = (time.perf_counter() - t) * 1e3 / len(zones)
    print(json.dumps({"case": "rasterise_once_per_zone", "ms": round(once, 3)}))


if __name__ == "__main__":
    main()
