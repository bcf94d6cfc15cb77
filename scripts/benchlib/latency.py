"""Latency read from the picture: recorders of stamped frames and their percentiles."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchlib.common import SEQ_MOD, stamp


@dataclass
class Recorder:
    """Frames one client received: counts, pixel latencies and a timeline, inside the window."""

    stream: str
    cycle_ms: int = 0  # pre-encoded cameras stamp times of cycle 0: ages are taken modulo this
    seq_mod: int = SEQ_MOD  # frame numbers wrap here (a pre-encoded cycle's length)
    recording: bool = False
    t0: float = 0.0
    frames: int = 0
    unstamped: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    seen: set[int] = field(default_factory=set)
    lat_ms: list[float] = field(default_factory=list)
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (t, latency ms)
    total: int = 0

    def add_jpeg(self, jpeg: bytes, now_ms: int | None = None) -> None:
        now_ms = stamp.now_ms() if now_ms is None else now_ms
        self.total += 1
        if not self.recording:
            return
        self.frames += 1
        code = stamp.read_jpeg(jpeg)
        if code is None:
            self.unstamped += 1
            return
        seq, t_ms = code
        lat = float(cycle_age_ms(stamp.age_ms(t_ms, now_ms), self.cycle_ms))
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq = seq
        self.seen.add(seq)
        self.lat_ms.append(lat)
        self.timeline.append((round(time.monotonic() - self.t0, 3), lat))

    def start(self, t0: float) -> None:
        self.t0, self.recording = t0, True

    def summary(self, seconds: float) -> dict[str, Any]:
        sent = None
        if self.first_seq is not None and self.last_seq is not None:
            sent = (self.last_seq - self.first_seq) % self.seq_mod + 1
        return {
            "stream": self.stream,
            "frames": self.frames,
            "fps": round(self.frames / seconds, 2),
            "unstamped": self.unstamped,
            # Camera frames in the window's seq range that this viewer never saw (any cause).
            "not_shown": None if sent is None else sent - len(self.seen),
            "camera_frames": sent,
            **pcts(self.lat_ms),
        }


def camera_recorder(args: argparse.Namespace, i: int) -> Recorder:
    """The recorder for camera i, knowing the cameras' cycle (pre-encoded ones loop one)."""
    return Recorder(f"cam{i}", args.cycle_ms, args.cycle_frames or SEQ_MOD)


def cycle_age_ms(age: int, cycle_ms: int) -> int:
    """A pre-encoded camera's stamp is exact to the millisecond modulo its cycle (rounding can
    put it up to 1 ms in the future)."""
    if not cycle_ms:
        return age
    age %= cycle_ms
    return 0 if age > cycle_ms - 2 else age


def pcts(values: list[float], prefix: str = "") -> dict[str, float | None]:
    if not values:
        return {f"{prefix}p50_ms": None, f"{prefix}p95_ms": None, f"{prefix}p99_ms": None}
    a = np.asarray(values, dtype=np.float64)
    p = np.percentile(a, [50, 95, 99])
    return {
        f"{prefix}p50_ms": round(float(p[0]), 1),
        f"{prefix}p95_ms": round(float(p[1]), 1),
        f"{prefix}p99_ms": round(float(p[2]), 1),
    }


def combine(recs: list[Recorder], seconds: float) -> dict[str, Any]:
    """Totals over streams: fps, latency percentiles over every frame, frames never shown."""
    per = [r.summary(seconds) for r in recs]
    lat = [x for r in recs for x in r.lat_ms]
    not_shown = [p["not_shown"] for p in per if p["not_shown"] is not None]
    return {
        "fps_total": round(sum(r.frames for r in recs) / seconds, 2),
        "fps_per_stream": [p["fps"] for p in per],
        "fps_min_stream": min((p["fps"] for p in per), default=0.0),
        **pcts(lat),
        "frames": sum(r.frames for r in recs),
        "unstamped": sum(r.unstamped for r in recs),
        "not_shown": sum(not_shown) if not_shown else None,
        "camera_frames": sum(p["camera_frames"] or 0 for p in per),
        "per_stream": per,
    }


# =============================================================================================
# 1. Raw model ceiling (subprocess `raw`)
