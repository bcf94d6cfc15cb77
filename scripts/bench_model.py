#!/usr/bin/env python
"""Frames per second of each model runtime, per input size and fixed batch size.

Prints one JSON line per measurement:
  {"runtime", "model", "input", "batch", "fps", "ms_per_batch", ...}
and with --gil, one line per runtime saying how much a pure-Python thread still runs while
segment() loops in another thread (1.0: the runtime releases the GIL while it computes).

  python scripts/bench_model.py --models mnv2-voc --runtimes tflite keras --seconds 5
  python scripts/bench_model.py --runtimes keras --keras-modes float faithful --inputs 513 \
      --batches 1 8 --interleave   # the int8-faithful mode's cost over the float one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segstream.models.runtime import Segmenter, load_segmenter, prepare


def _frames(n: int, size: int) -> np.ndarray:
    """Real frames from the sample video when fetched (content changes little), else noise."""
    import cv2

    from segstream.models.fetch import NotFetchedError, sample_path

    try:
        cap = cv2.VideoCapture(str(sample_path("vtest")))
        raw = [cap.read()[1] for _ in range(n)]
        cap.release()
        if all(f is not None for f in raw):
            return np.stack([prepare(f, size, bgr=True) for f in raw])
    except NotFetchedError:
        pass
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _time(seg: Segmenter, frames: np.ndarray, seconds: float) -> tuple[float, int]:
    seg.segment(frames)  # compile/allocate outside the timing
    n, start = 0, time.perf_counter()
    while True:
        seg.segment(frames)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return elapsed / n, n


def _spin(seconds: float) -> int:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n


def gil_ratio(seg: Segmenter, frames: np.ndarray, seconds: float) -> dict[str, float]:
    """Pure-Python progress while segment() loops in a thread, relative to running alone."""
    alone = _spin(seconds)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            seg.segment(frames)

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.5)
    busy = _spin(seconds)
    stop.set()
    t.join()
    return {"spin_ratio": round(busy / alone, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mnv2-voc"])
    p.add_argument(
        "--runtimes", nargs="+", default=["tflite", "keras"], choices=["tflite", "keras"]
    )
    p.add_argument("--inputs", nargs="+", type=int, default=[513, 257])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    p.add_argument("--threads", type=int, default=None, help="TFLite threads (default: all)")
    p.add_argument(
        "--keras-modes",
        nargs="+",
        default=["default"],
        choices=["default", "faithful", "float"],
        help="Keras port modes (default: the model's own, faithful for uint8 files)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time the modes call by call in alternation and report each one's "
        "median call (steadier on a shared machine than one run after another)",
    )
    p.add_argument("--gil", action="store_true", help="also measure GIL release (batch 1)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    args = p.parse_args(argv)

    sink = open(args.out, "a") if args.out else None  # noqa: SIM115 - closed below
    try:
        for model in args.models:
            for runtime in args.runtimes:
                for size in args.inputs:
                    modes = args.keras_modes if runtime == "keras" else ["default"]
                    _bench_modes(args, model, runtime, size, modes, sink)
    finally:
        if sink:
            sink.close()
    return 0


def _emit(rec: dict, sink) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if sink:
        sink.write(line + "\n")


def _bench_modes(
    args: argparse.Namespace, model: str, runtime: str, size: int, modes: list[str], sink
) -> None:
    """One segmenter per mode; timed one after another, or call by call (--interleave)."""
    segs = {}
    for mode in modes:
        t0 = time.perf_counter()
        seg = load_segmenter(
            model,
            runtime,
            batch_sizes=tuple(args.batches),
            threads=args.threads,
            input_size=size,
            keras_mode=None if mode == "default" else mode,
        )
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        seg.warmup()
        segs[mode] = (seg, load_s, time.perf_counter() - t0)
    frames = _frames(max(args.batches), size)
    for b in args.batches:
        timed = (
            _interleaved(segs, frames[:b], args.seconds)
            if args.interleave
            else {mode: _time(seg, frames[:b], args.seconds) for mode, (seg, _, _) in segs.items()}
        )
        for mode, (seg, load_s, warm_s) in segs.items():
            per_batch, n = timed[mode]
            rec = {"runtime": runtime, "model": model, "input": size}
            if runtime == "keras":
                rec["keras_backend"] = getattr(seg, "keras_backend", "?")
            rec["mode"] = seg.mode
            _emit(
                {
                    **rec,
                    "batch": b,
                    "fps": round(b / per_batch, 2),
                    "ms_per_batch": round(per_batch * 1e3, 2),
                    "iters": n,
                    "interleaved": args.interleave,
                    "load_s": round(load_s, 2),
                    "warmup_s": round(warm_s, 2),
                    "cpus": os.cpu_count(),
                },
                sink,
            )
    for seg, _, _ in segs.values():
        if args.gil:
            _emit(
                {
                    "runtime": runtime,
                    "model": model,
                    "input": size,
                    "mode": seg.mode,
                    "batch": 1,
                    "gil": gil_ratio(seg, frames[:1], args.seconds),
                },
                sink,
            )
        seg.close()


def _interleaved(segs: dict, frames: np.ndarray, seconds: float) -> dict[str, tuple[float, int]]:
    """Median seconds per call of each segmenter, calling them in turn for ~seconds each."""
    calls: dict[str, list[float]] = {mode: [] for mode in segs}
    for seg, _, _ in segs.values():
        seg.segment(frames)  # compile/allocate outside the timing
    start = time.perf_counter()
    while True:
        for mode, (seg, _, _) in segs.items():
            t0 = time.perf_counter()
            seg.segment(frames)
            calls[mode].append(time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds * len(segs) and len(calls[mode]) >= 5:
            return {m: (float(np.median(c)), len(c)) for m, c in calls.items()}


if __name__ == "__main__":
    raise SystemExit(main())
