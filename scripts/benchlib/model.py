"""The model alone (`raw`: the ceiling at each batch size) and the naive loop (`naive`),
each run as a subprocess of benchmark.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchlib.common import BENCHMARK, OTHER_MAX, log
from benchlib.latency import camera_recorder, combine
from benchlib.procs import CpuMeter, machine_busy, peak_rss_mb


def clip_frames(clip: Path, n: int, size: tuple[int, int] = (1280, 720)) -> list[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(clip))
    out = []
    while len(out) < n:
        ok, img = cap.read()
        if not ok:
            if not out:
                raise SystemExit(f"cannot read frames from {clip}")
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        out.append(cv2.resize(img, size, interpolation=cv2.INTER_AREA))
    cap.release()
    return out


def cmd_raw(args: argparse.Namespace) -> int:
    """The ceiling: every batch size, both as one interpreter on all the cores and as the
    service's default of several single-threaded copies side by side; the best one counts."""
    from segstream.models.runtime import load_segmenter, prepare
    from segstream.stream.runner import plan_workers

    sizes = tuple(int(b) for b in args.batches.split(","))
    cores = os.cpu_count() or 1
    layouts = [(1, args.threads or cores)]
    plan = plan_workers("tflite", max(sizes), threads=args.threads)
    if args.backend == "tflite" and plan.workers > 1:
        layouts.append((plan.workers, plan.threads))
    frames = clip_frames(Path(args.clip), max(sizes))
    out: dict[str, Any] = {"model": args.model, "backend": args.backend, "batches": {}}
    for workers, threads in layouts:
        segs = [
            load_segmenter(args.model, args.backend, batch_sizes=sizes, threads=threads)
            for _ in range(workers)
        ]
        for seg in segs:
            seg.warmup()
        x = np.stack([prepare(f, segs[0].input_size, bgr=True) for f in frames])
        out["input"] = list(segs[0].input_size)
        for b in sizes:
            fps, ms = raw_rate(segs, x[:b], args.seconds)
            key = str(b) if workers == 1 else f"{workers}x{b}"
            out["batches"][key] = {
                "fps": round(fps, 2),
                "ms_per_batch": round(ms, 1),
                "workers": workers,
                "threads": threads,
                "batch": b,
            }
        for seg in segs:
            seg.close()
    best = max(out["batches"], key=lambda k: out["batches"][k]["fps"])
    out["best"] = best
    out["best_batch"] = out["batches"][best]["batch"]
    out["fps"] = out["batches"][best]["fps"]
    print(json.dumps(out), flush=True)
    return 0


def raw_rate(segs: list[Any], x: np.ndarray, seconds: float) -> tuple[float, float]:
    """Frames/s of all `segs` running `x` back to back in parallel threads, and ms per batch."""
    for seg in segs:
        seg.segment(x)
    counts = [0] * len(segs)
    t0 = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - t0 < seconds or counts[i] < 2:
            segs[i].segment(x)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(segs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    n = sum(counts)
    return n * len(x) / dt, dt * len(segs) / n * 1e3


# =============================================================================================
# 2. The naive loop (subprocess `naive`)


def cmd_naive(args: argparse.Namespace) -> int:
    """for each stream in turn: read, infer, overlay, encode. Prints WINDOW marks, then JSON."""
    os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
    import cv2

    from segstream.models.runtime import load_segmenter, prepare
    from segstream.stream.encoders import encode_jpeg
    from segstream.stream.render import Renderer

    seg = load_segmenter(args.model, args.backend, batch_sizes=(1,), threads=args.threads)
    seg.warmup()
    caps = [cv2.VideoCapture(u, cv2.CAP_FFMPEG) for u in args.urls]
    if not all(c.isOpened() for c in caps):
        raise SystemExit("naive: cannot open every source")
    renderers = [
        Renderer(seg.labels, seg.palette, mode="overlay", alpha=0.5, legend=True) for _ in caps
    ]
    recs = [camera_recorder(args, i) for i in range(len(caps))]
    start = time.monotonic()
    window_at, end_at = start + args.warmup, start + args.warmup + args.seconds
    cpu0 = None
    read_errors = 0
    stage = {"read": 0.0, "infer": 0.0, "render": 0.0, "encode": 0.0}
    while True:
        now = time.monotonic()
        if cpu0 is None and now >= window_at:
            cpu0 = time.process_time()
            print("WINDOW_START", flush=True)
            for r in recs:
                r.start(now)
            stage = dict.fromkeys(stage, 0.0)
        if now >= end_at:
            break
        for cap, ren, rec in zip(caps, renderers, recs, strict=True):
            t0 = time.perf_counter()
            ok, frame = cap.read()
            if not ok:  # e.g. undecodable after the camera dropped frames: try the next one
                read_errors += 1
                if read_errors > 300:
                    raise SystemExit(f"naive: {rec.stream} stopped delivering frames")
                continue
            t1 = time.perf_counter()
            mask = seg.segment(prepare(frame, seg.input_size, bgr=True)[None])[0]
            t2 = time.perf_counter()
            out = ren.render(frame, mask)
            t3 = time.perf_counter()
            jpeg = encode_jpeg(out, 80)
            t4 = time.perf_counter()
            rec.add_jpeg(jpeg)  # the receiving side: this JPEG, decoded at once
            for k, dt in zip(stage, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stage[k] += dt
    seconds = time.monotonic() - window_at
    cpu = (time.process_time() - (cpu0 or 0.0)) / seconds
    print("WINDOW_END", flush=True)
    res = combine(recs, seconds)
    n = max(res["frames"], 1)
    res.update(
        {
            "seconds": round(seconds, 1),
            "cpu_cores": round(cpu, 3),
            "read_errors": read_errors,
            "peak_rss_mb": peak_rss_mb(os.getpid()),
            "stage_ms": {k: round(v / n * 1e3, 2) for k, v in stage.items()},
            "timeline": {r.stream: r.timeline for r in recs},
        }
    )
    print(json.dumps(res), flush=True)
    return 0


# =============================================================================================
# Helpers: processes, ports, metrics


async def run_naive(
    args: argparse.Namespace, urls: list[str], cam_proc: subprocess.Popen, seconds: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(BENCHMARK),
        "naive",
        "--model",
        args.model,
        "--backend",
        args.backend,
        "--warmup",
        str(args.warmup),
        "--seconds",
        str(seconds),
        *common_flags(args),
        "--cycle-ms",
        str(args.cycle_ms),
        "--cycle-frames",
        str(args.cycle_frames),
        "--urls",
        *urls,
    ]
    p = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    assert p.stdout is not None
    meter = CpuMeter({"naive": p.pid, "sources": cam_proc.pid})
    cpu: dict[str, float] = {}
    result = None
    async for raw in p.stdout:
        line = raw.decode().strip()
        if line == "WINDOW_START":
            meter.start()
        elif line == "WINDOW_END":
            cpu = meter.stop()
        elif line.startswith("{"):
            result = json.loads(line)
    if await p.wait() != 0 or result is None:
        raise RuntimeError(f"naive loop failed (exit {p.returncode})")
    result["cpu_cores"] = cpu
    result["streams"] = len(urls)
    result["label"] = f"naive-{len(urls)}"
    return result


def common_flags(args: argparse.Namespace) -> list[str]:
    return ["--threads", str(args.threads)] if args.threads else []


def run_raw(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """The raw ceiling, repeated (up to --retries) when other jobs took CPU meanwhile: it is
    the yardstick of every ratio."""
    cmd = [
        sys.executable,
        str(BENCHMARK),
        "raw",
        "--model",
        args.model,
        "--backend",
        args.backend,
        "--clip",
        str(args.clip),
        "--seconds",
        str(seconds),
        "--batches",
        "1,2,4,8",
        *common_flags(args),
    ]
    for attempt in range(args.retries + 1):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        meter = CpuMeter({})  # the machine; the raw run's own CPU once it has been reaped
        meter.start()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out, _ = p.communicate()
        cpu = meter.stop(children={"raw": before})
        if p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, cmd)
        res = json.loads(out.strip().splitlines()[-1])
        res["cpu_cores"], res["attempts"] = cpu, attempt + 1
        if cpu.get("other", 0.0) <= OTHER_MAX or attempt == args.retries:
            return res
        log(f"other jobs used {cpu['other']:.2f} cores during the raw run: measuring again")
        machine_busy(5.0)
    raise AssertionError("unreachable")
