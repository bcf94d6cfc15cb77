#!/usr/bin/env python
"""segstream benchmark: the model's ceiling, the naive loop and the service, side by side.

In one run on one machine (docs/benchmarks.md explains the method and shows the figures):

1. raw    the model alone on pre-decoded frames at each fixed batch size; the best is the ceiling.
2. naive  the loop tutorials write: for each stream in turn read a frame (OpenCV), infer (batch
          1), overlay, JPEG-encode; synchronous; same model, renderer and encoder as the service.
3. serve  `segstream serve` as a subprocess on N = 1, 2, 4, 8 live 720p H.264 RTSP cameras
          (scripts/rtsp_live.py) and on N 720p H.264 files paced at their own rate, with one
          MJPEG client per stream.
4. target 8 cameras with a fixed per-stream inference rate vs. with `latency_target_ms`.

Latency is read from the picture: every camera frame carries its capture time in a pixel code
(scripts/stamp.py) and the receiving side (the MJPEG client; for the naive loop, its own
output) decodes it from the JPEG it got. File sources cannot carry a send time, so their
latency is the service's own capture-to-write figure (/api/streams, /metrics), labelled so.

Output in --out: results.json, benchmark.png (fps and latency against N, latency over time)
and results.md (a README table and the command). The last stdout line is a JSON summary:
{"raw_fps","service_fps","ratio","naive_fps","p50_ms","p99_ms","naive_p99_ms","streams",...}.

    .venv/bin/python scripts/benchmark.py              # full run, ~12 min on 2 cores
    .venv/bin/python scripts/benchmark.py --quick      # reduced, < 60 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import stamp  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"  # has gi + GstRtspServer (Debian packages)
SEQ_MOD = 1 << stamp.SEQ_BITS
OTHER_MAX = 0.15  # cores used by other jobs during a window above which a run is repeated


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================================
# Measuring processes


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the process's peak resident set size so far."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


class CpuMeter:
    """CPU cores used by named processes (and the whole machine) between start() and stop()."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = {k: psutil.Process(pid) for k, pid in procs.items() if pid}
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self._sys0: Any = None

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return float("nan")

    @staticmethod
    def _busy(t: Any) -> float:
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = {k: self._cpu(p) for k, p in self.procs.items()}
        self._sys0 = psutil.cpu_times()

    def stop(self, children: dict[str, Any] | None = None) -> dict[str, float]:
        """`children`: name -> getrusage(RUSAGE_CHILDREN) taken at start(), for a process
        that has exited and been reaped by now (psutil can no longer see its times)."""
        dt = max(time.monotonic() - self._t0, 1e-6)
        out = {k: round((self._cpu(p) - self._c0[k]) / dt, 3) for k, p in self.procs.items()}
        for k, r0 in (children or {}).items():
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            used = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
            out[k] = round(used / dt, 3)
        busy = (self._busy(psutil.cpu_times()) - self._busy(self._sys0)) / dt
        # Whatever else ran on the machine (other users' jobs) skews every figure: show it.
        out["other"] = round(busy - sum(v for v in out.values() if v == v), 3)
        out["machine"] = round(busy, 3)
        return out


def machine_busy(seconds: float = 2.0) -> float:
    """Cores busy on the whole machine over `seconds`."""
    t0 = psutil.cpu_times()
    time.sleep(seconds)
    t1 = psutil.cpu_times()
    dt = sum(t1) - sum(t0)
    idle = (t1.idle - t0.idle) + (getattr(t1, "iowait", 0.0) - getattr(t0, "iowait", 0.0))
    return (dt - idle) / max(dt, 1e-9) * (os.cpu_count() or 1)


async def wait_idle(max_wait: float, threshold: float = 0.3) -> float:
    """Waits (up to max_wait s) until other work on the machine is below `threshold` cores, so
    a shared machine's other jobs do not end up in the figures; returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = await asyncio.to_thread(machine_busy)
        if busy < threshold or time.monotonic() >= deadline:
            if busy >= threshold:
                log(f"machine still busy ({busy:.2f} cores used by others): measuring anyway")
            return round(busy, 2)
        log(f"machine busy ({busy:.2f} cores used by others): waiting")


# =============================================================================================
# Stamped frames received by a client


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(p: subprocess.Popen | asyncio.subprocess.Process, timeout: float = 6.0) -> None:
    if p.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.terminate()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if isinstance(p, subprocess.Popen) and p.poll() is not None:
            return
        if not isinstance(p, subprocess.Popen) and p.returncode is not None:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        p.kill()


@contextlib.contextmanager
def live_cameras(
    clip: Path, streams: int, fps: float, bitrate: int, encode: str = "pre", cycle_s: float = 64.0
) -> Iterator[tuple[list[str], subprocess.Popen, int, int]]:
    """scripts/rtsp_live.py with `streams` mounts; yields (urls, process, cycle_ms, frames in
    a cycle); both 0 for live-encoding cameras."""
    if not Path(SYSTEM_PYTHON).exists():
        raise SystemExit(f"{SYSTEM_PYTHON} (Debian python3-gi, gst-rtsp-server) is required")
    cmd = [
        SYSTEM_PYTHON,
        str(REPO / "scripts" / "rtsp_live.py"),
        "--clip",
        str(clip),
        "--streams",
        str(streams),
        "--fps",
        str(fps),
        "--bitrate",
        str(bitrate),
        "--port",
        "0",
        "--encode",
        encode,
        "--cycle",
        f"{cycle_s:g}",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    urls: list[str] = []
    cycle_ms = cycle_frames = 0
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("cycle_ms "):  # "cycle_ms 64000 frames 960"
                cycle_ms, cycle_frames = int(line.split()[1]), int(line.split()[3])
            elif line.startswith("listening "):
                urls.append(line.split()[1])
            elif line.strip() == "READY":
                break
        if len(urls) != streams:
            raise SystemExit(f"rtsp_live.py did not start (exit {p.poll()})")
        yield urls, p, cycle_ms, cycle_frames
    finally:
        stop_process(p)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric_sum(m: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lab), v in m.items()
        if n == name and all(dict(lab).get(k) == val for k, val in labels.items())
    )


def hist_quantile(before: dict, after: dict, name: str, q: float) -> float | None:
    """Quantile of a histogram's increase between two scrapes (linear within a bucket)."""
    buckets: dict[float, float] = {}
    for (n, lab), v in after.items():
        if n == f"{name}_bucket":
            le = float(dict(lab)["le"])
            buckets[le] = buckets.get(le, 0.0) + v - before.get((n, lab), 0.0)
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    total, prev_le, prev_c = buckets[edges[-1]], 0.0, 0.0
    for le in edges:
        c = buckets[le]
        if c >= q * total:
            if le == float("inf"):
                return prev_le
            frac = (q * total - prev_c) / max(c - prev_c, 1e-9)
            return prev_le + frac * (le - prev_le)
        prev_le, prev_c = le, c
    return None


# =============================================================================================
# 3. The service


async def mjpeg_client(url: str, rec: Recorder, stop: asyncio.Event) -> None:
    """Reads multipart/x-mixed-replace parts as they come; hands each JPEG to the recorder."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=20)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        resp.raise_for_status()
        reader = resp.content
        while not stop.is_set():
            line = await reader.readline()
            if not line:
                return
            if not line.startswith(b"--"):
                continue
            length = None
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if length is None:
                raise RuntimeError(f"{url}: MJPEG part without Content-Length")
            jpeg = await reader.readexactly(length)
            rec.add_jpeg(jpeg)


def service_config(
    path: Path,
    args: argparse.Namespace,
    sources: list[str],
    port: int,
    *,
    infer_fps: float = 0.0,
    latency_target_ms: float = 0.0,
    max_batch: int | None = None,
    reader: str | None = None,
) -> None:
    import yaml

    cfg = {
        # No state file: a stream set kept from an earlier run (same config name, same
        # SEGSTREAM_HOME) would replace these streams, cameras of another port included.
        "server": {"host": "127.0.0.1", "port": port, "state_file": "none"},
        "model": {
            "name": args.model,
            "backend": args.backend,
            "workers": args.workers,
            "threads": args.threads,
            "max_batch": max_batch or args.max_batch,
            "max_wait_ms": args.max_wait_ms,
        },
        "scheduler": {"latency_target_ms": latency_target_ms, "min_infer_fps": 1.0},
        "render": {
            "mode": "overlay",
            "alpha": 0.5,
            "legend": True,
            "jpeg_quality": 80,
            "workers": 1,
        },
        "log_level": "warning",
        "streams": [
            {
                "id": f"cam{i}",
                "source": s,
                "infer_fps": infer_fps,
                "loop": True,
                "realtime": True,
                "output": "segmented",
                "reader": reader or args.reader,
            }
            for i, s in enumerate(sources)
        ],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def segstream_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "segstream"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "segstream.stream.cli"]


async def http_json(url: str) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json(content_type=None) if r.status == 200 else None


async def http_text(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


async def wait_for(cond, timeout: float, what: str, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited ({proc.returncode}) while waiting for {what}")
        with contextlib.suppress(Exception):
            if await cond():
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


async def run_service(
    args: argparse.Namespace,
    label: str,
    sources: list[str],
    cam_proc: subprocess.Popen | None,
    *,
    stamped: bool,
    seconds: float,
    infer_fps: float = 0.0,
    latency_target_ms: float = 0.0,
    max_batch: int | None = None,
    reader: str | None = None,
) -> dict[str, Any]:
    """One `segstream serve` run: start, connect a client per stream, warm up, measure, stop."""
    busy_before = await wait_idle(args.idle_wait)
    port = free_port()
    cfg_path = args.out / f"config-{label}.yaml"
    reader = reader or args.reader
    service_config(
        cfg_path,
        args,
        sources,
        port,
        infer_fps=infer_fps,
        latency_target_ms=latency_target_ms,
        max_batch=max_batch,
        reader=reader,
    )
    base = f"http://127.0.0.1:{port}"
    log_file = open(args.out / f"service-{label}.log", "w")  # noqa: SIM115
    launcher = [sys.executable, str(args.launcher)] if args.launcher else segstream_cmd()
    proc = subprocess.Popen(
        [*launcher, "serve", "--config", str(cfg_path)], stdout=log_file, stderr=subprocess.STDOUT
    )
    stop = asyncio.Event()
    recs = [
        camera_recorder(args, i) if stamped else Recorder(f"cam{i}") for i in range(len(sources))
    ]
    tasks: list[asyncio.Task] = []
    try:

        async def ready() -> bool:
            return (await http_json(f"{base}/readyz")) is not None

        await wait_for(ready, 180, "/readyz", proc)
        tasks = [
            asyncio.create_task(mjpeg_client(f"{base}/streams/{r.stream}/mjpeg", r, stop))
            for r in recs
        ]

        async def live() -> bool:
            st = await http_json(f"{base}/api/streams")
            return all(s["state"] == "live" for s in st["streams"])

        try:
            await wait_for(live, 30, "every stream live", proc)
        except RuntimeError:
            if cam_proc is not None and cam_proc.poll() is not None:
                raise RuntimeError(f"the camera process exited ({cam_proc.returncode})") from None
            raise
        await asyncio.sleep(args.warmup)
        for t in tasks:
            if t.done():
                t.result()  # a client that died: raise its error now
        meter = CpuMeter(
            {"service": proc.pid, "sources": cam_proc.pid if cam_proc else 0, "client": os.getpid()}
        )
        m0 = parse_metrics(await http_text(f"{base}/metrics"))
        meter.start()
        t0 = time.monotonic()
        for r in recs:
            r.start(t0)
        threads0 = thread_cpu(proc.pid)
        trace: list[dict[str, Any]] = []
        poller = asyncio.create_task(poll_api(base, t0, trace, stop))
        await asyncio.sleep(seconds)
        poller.cancel()
        for r in recs:
            r.recording = False
        dt = time.monotonic() - t0
        cpu = meter.stop()
        if args.profile:
            cpu["service_threads"] = await asyncio.to_thread(cpu_by_thread, proc.pid, threads0, dt)
        m1 = parse_metrics(await http_text(f"{base}/metrics"))
        api = await http_json(f"{base}/api/streams")
        rss = peak_rss_mb(proc.pid)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_process(proc)
        log_file.close()
    res = (
        combine(recs, dt)
        if stamped
        else {
            "fps_total": round(sum(r.frames for r in recs) / dt, 2),
            "fps_per_stream": [round(r.frames / dt, 2) for r in recs],
            "frames": sum(r.frames for r in recs),
        }
    )
    res.update(service_figures(m0, m1, api, len(sources), dt))
    for q in (0.5, 0.95, 0.99):
        v = hist_quantile(m0, m1, "segstream_end_to_end_latency_seconds", q)
        res[f"service_p{round(q * 100)}_ms"] = None if v is None else round(v * 1e3, 1)
    if not stamped:  # files carry no send time: the service's own capture -> write figure
        lat = [s["latency_ms"] for s in api["streams"]]
        res["p50_ms"] = _mean([x["p50"] for x in lat])
        res["p95_ms"] = _mean([x["p95"] for x in lat])
        p99 = hist_quantile(m0, m1, "segstream_end_to_end_latency_seconds", 0.99)
        res["p99_ms"] = None if p99 is None else round(p99 * 1e3, 1)
        res["latency_source"] = "service (capture to MJPEG write)"
    else:
        res["latency_source"] = "pixels (camera capture to MJPEG client)"
    res.update(
        {
            "label": label,
            "streams": len(sources),
            "seconds": round(dt, 1),
            "reader": reader,
            "busy_before": busy_before,
            "max_batch": max_batch or args.max_batch,
            "cpu_cores": cpu,
            "peak_rss_mb": rss,
            "infer_fps": infer_fps,
            "latency_target_ms": latency_target_ms,
            "timeline": {r.stream: r.timeline for r in recs} if stamped else {},
            "trace": trace,
        }
    )
    return res


async def poll_api(
    base: str, t0: float, trace: list[dict[str, Any]], stop: asyncio.Event, every: float = 2.0
) -> None:
    """Every few seconds: each stream's inference-rate cap and the service's own p95."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            st = (await http_json(f"{base}/api/streams"))["streams"]
            m = parse_metrics(await http_text(f"{base}/metrics"))
            limit = metric_sum(m, "segstream_inference_batch_limit")
            trace.append(
                {
                    "batch_limit": limit or None,
                    "t": round(time.monotonic() - t0, 1),
                    "cap_fps": _mean([s["infer_fps_cap"] for s in st]),
                    "inference_fps": round(sum(s["inference_fps"] for s in st), 2),
                    "service_p95_ms": max((s["latency_ms"]["p95"] or 0) for s in st),
                }
            )
        await asyncio.sleep(every)


async def run_service_clean(args: argparse.Namespace, *a: Any, **kw: Any) -> dict[str, Any]:
    """run_service, repeated (up to --retries) when other jobs took CPU during the window."""
    for attempt in range(args.retries + 1):
        res = await run_service(args, *a, **kw)
        other = res["cpu_cores"].get("other", 0.0)
        if other <= OTHER_MAX or attempt == args.retries:
            res["attempts"] = attempt + 1
            return res
        log(f"other jobs used {other:.2f} cores during the window: measuring again")
    raise AssertionError("unreachable")


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return round(float(np.mean(v)), 1) if v else None


def service_figures(m0: dict, m1: dict, api: dict, n: int, dt: float) -> dict[str, Any]:
    """Counters and stage times from the service's /metrics over the window."""

    def d(name: str, **lab: str) -> float:
        return metric_sum(m1, name, **lab) - metric_sum(m0, name, **lab)

    out: dict[str, Any] = {}
    for outcome in ("captured", "unconverted", "dropped", "skipped", "inferred", "published"):
        out[outcome] = int(d("segstream_frames_total", outcome=outcome))
    out["inferred_fps"] = round(out["inferred"] / dt, 2)
    stages = {}
    for st in ("decode", "convert", "queue_wait", "preprocess", "inference", "render", "encode"):
        c = d("segstream_stage_seconds_count", stage=st)
        if c > 0:
            stages[st] = round(d("segstream_stage_seconds_sum", stage=st) / c * 1e3, 2)
    out["stage_ms"] = stages  # per frame; inference per batch
    bc = d("segstream_inference_batch_size_count")
    out["mean_batch"] = round(d("segstream_inference_batch_size_sum") / bc, 2) if bc else None
    out["batch_ms"] = stages.get("inference")
    out["model_busy"] = round(d("segstream_stage_seconds_sum", stage="inference") / dt, 3)
    out["service_latency_ms"] = {s["id"]: s["latency_ms"] for s in api["streams"]}
    out["caps"] = {s["id"]: s.get("infer_fps_cap") for s in api["streams"]}
    return out


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of every thread of a process, by native thread id."""
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id (py-spy dump); native-only threads are absent."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        out = subprocess.run(
            [exe, "dump", "--pid", str(pid), "--json", "--nonblocking"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        t["os_thread_id"]: t.get("thread_name") or "?"
        for t in json.loads(out)
        if t.get("os_thread_id")
    }


def cpu_by_thread(pid: int, before: dict[int, float], seconds: float) -> dict[str, float]:
    """Cores used per thread group over the window: where the service's CPU went."""
    after = thread_cpu(pid)
    names = thread_names(pid)
    groups: dict[str, float] = {}
    for tid, c in after.items():
        name = names.get(tid, "native (XNNPACK/FFmpeg workers)")
        for prefix, group in (
            ("src-", "readers (decode)"),
            ("render", "render+encode"),
            ("model-worker", "model worker"),
            ("MainThread", "event loop"),
            ("asyncio", "event loop"),
        ):
            if name.startswith(prefix) or prefix in name:
                name = group
                break
        groups[name] = groups.get(name, 0.0) + (c - before.get(tid, 0.0)) / seconds
    return {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


# =============================================================================================
# Orchestration


async def run_naive(
    args: argparse.Namespace, urls: list[str], cam_proc: subprocess.Popen, seconds: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
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
        __file__,
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


def checkpoint(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Save what is measured so far, so a later failure loses nothing."""
    (args.out / "results.partial.json").write_text(json.dumps(results, indent=1))


def make_file_clip(args: argparse.Namespace) -> Path:
    """The clip as a 720p H.264 file (no B-frames) at the cameras' rate, for file sources."""
    dst = args.out / f"clip-720p-{args.fps:g}fps.mp4"
    if not dst.exists():
        cmd = [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-i",
            str(args.clip),
            "-vf",
            f"scale=1280:720,fps={args.fps}",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-bf",
            "0",
            "-g",
            str(int(2 * args.fps)),
            "-b:v",
            f"{args.bitrate}k",
            "-pix_fmt",
            "yuv420p",
            str(dst),
        ]
        subprocess.run(cmd, check=True)
    return dst


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": args.command_line,
        "started": time.strftime("%F %T"),
        "machine": machine_info(),
        "settings": settings(args),
    }
    quick = args.quick
    log("raw model ceiling")
    await wait_idle(args.idle_wait)
    results["raw"] = raw = run_raw(args, 1.5 if quick else 6.0)
    log(f"raw: {raw['fps']} fps ({raw_label(raw)})")
    nmax = max(args.streams + ([args.target_streams] if args.target_streams else []), default=0)
    if not nmax:  # the raw ceiling only
        results["naive"], results["service"], results["files"] = [], [], []
        results["summary"] = {"raw_fps": raw["fps"], "raw_batch": raw["best_batch"]}
        return results
    results["naive"], results["service"], results["files"], results["target"] = [], [], [], []
    log(f"{nmax} cameras ({args.camera_encode} encoding)")
    with live_cameras(args.clip, nmax, args.fps, args.bitrate, args.camera_encode) as (
        urls,
        cam,
        args.cycle_ms,
        args.cycle_frames,
    ):
        for n in args.naive_streams:
            log(f"naive loop, {n} camera(s)")
            await wait_idle(args.idle_wait)
            for attempt in range(args.retries + 1):
                r = await run_naive(args, urls[:n], cam, args.seconds)
                if r["cpu_cores"].get("other", 0.0) <= OTHER_MAX:
                    break
                if attempt < args.retries:
                    log("other jobs took CPU during the window: measuring again")
                    await wait_idle(args.idle_wait)
            results["naive"].append(r)
            checkpoint(args, results)
            log(f"naive {n}: {r['fps_total']} fps, p50 {r['p50_ms']} p99 {r['p99_ms']} ms")
        for n in args.streams:
            log(f"service, {n} RTSP camera(s)")
            r = await run_service_clean(
                args, f"rtsp-{n}", urls[:n], cam, stamped=True, seconds=args.seconds
            )
            results["service"].append(r)
            checkpoint(args, results)
            log(
                f"service {n}: {r['fps_total']} fps, p50 {r['p50_ms']} p99 {r['p99_ms']} ms, "
                f"batch {r['mean_batch']} x {r['batch_ms']} ms"
            )
        results["variant"] = []
        for n in [n for n in args.streams if n > 1] if args.variant_max_batch else []:
            b = args.variant_max_batch
            log(f"service, {n} RTSP camera(s), max_batch {b}")
            r = await run_service_clean(
                args,
                f"rtsp-{n}-mb{b}",
                urls[:n],
                cam,
                stamped=True,
                seconds=args.seconds,
                max_batch=b,
            )
            results["variant"].append(r)
            checkpoint(args, results)
            log(
                f"service {n} (max_batch {b}): {r['fps_total']} fps, p50 {r['p50_ms']} "
                f"p99 {r['p99_ms']} ms, batch {r['mean_batch']} x {r['batch_ms']} ms"
            )
        results["readers"] = []
        for reader in args.compare_readers:
            for n in args.streams:
                log(f"service, {n} RTSP camera(s), reader {reader}")
                r = await run_service_clean(
                    args,
                    f"rtsp-{n}-{reader}",
                    urls[:n],
                    cam,
                    stamped=True,
                    seconds=args.seconds,
                    reader=reader,
                )
                results["readers"].append(r)
                checkpoint(args, results)
                log(
                    f"service {n} ({reader}): {r['fps_total']} fps, p50 {r['p50_ms']} "
                    f"p99 {r['p99_ms']} ms"
                )
        if args.target_streams:
            n = args.target_streams
            fixed = args.fixed_fps or round(raw["fps"] / 4.0, 1)
            for label in (f"fixed-{n}", f"target-{n}"):
                kw: dict[str, float] = {"infer_fps": fixed}
                if label.startswith("target"):
                    kw = {
                        "latency_target_ms": args.latency_target_ms
                        or auto_target(results["target"][0])
                    }
                log(f"latency target experiment: {label} {kw}")
                r = await run_service_clean(
                    args, label, urls[:n], cam, stamped=True, seconds=args.target_seconds, **kw
                )
                results["target"].append(r)
                checkpoint(args, results)
                log(
                    f"{label}: {r['fps_total']} fps, p50 {r['p50_ms']} p95 {r['p95_ms']} "
                    f"p99 {r['p99_ms']} ms"
                )
        if args.drift_minutes:
            log(f"drift: {args.drift_minutes} min with {args.drift_streams} cameras")
            r = await run_service(
                args,
                f"drift-{args.drift_streams}",
                urls[: args.drift_streams],
                cam,
                stamped=True,
                seconds=args.drift_minutes * 60.0,
            )
            r["drift"] = drift(r["timeline"])
            results["drift"] = r
            log(f"drift: {r['drift']}")
    if args.file_streams:
        clip = make_file_clip(args)
        for n in args.file_streams:
            log(f"service, {n} file(s) paced at {args.fps:g} fps")
            r = await run_service_clean(
                args, f"file-{n}", [str(clip)] * n, None, stamped=False, seconds=args.seconds
            )
            results["files"].append(r)
            checkpoint(args, results)
            log(f"files {n}: {r['fps_total']} fps, p50 {r['p50_ms']} ms (service-measured)")
    results["targets"] = check_targets(results, args.target_n)
    results["summary"] = summary(results, args.target_n)
    return results


def api_p95(run: dict) -> float | None:
    """The service's own p95 (capture to MJPEG write) of its worst stream, from /api/streams
    at the end of the window (exact over each stream's last 300 frames; the histogram's
    buckets are too coarse for a p95 between 300 and 500 ms)."""
    v = [s["p95"] for s in run.get("service_latency_ms", {}).values() if s.get("p95")]
    return max(v) if v else None


def auto_target(fixed: dict) -> float:
    """A target the fixed-rate run misses: 3/4 of its service-side p95 (10 ms steps)."""
    p95 = api_p95(fixed)
    return float(round(0.75 * p95 / 10.0) * 10) if p95 else 300.0


def drift(timeline: dict[str, list[tuple[float, float]]], bucket_s: float = 60.0) -> dict:
    """p50/p99 per minute and the slope of a line fitted to the per-minute p50."""
    pts = sorted(p for tl in timeline.values() for p in tl)
    if not pts:
        return {}
    t = np.array([p[0] for p in pts])
    lat = np.array([p[1] for p in pts])
    k = (t // bucket_s).astype(int)
    rows = []
    for b in range(k.max() + 1):
        sel = lat[k == b]
        if sel.size:
            rows.append(
                {
                    "minute": b,
                    "p50_ms": round(float(np.percentile(sel, 50)), 1),
                    "p99_ms": round(float(np.percentile(sel, 99)), 1),
                }
            )
    slope = 0.0
    if len(rows) >= 2:
        slope = float(np.polyfit([r["minute"] for r in rows], [r["p50_ms"] for r in rows], 1)[0])
    return {"per_minute": rows, "p50_slope_ms_per_min": round(slope, 2)}


def _find(rows: list[dict], n: int) -> dict | None:
    return next((r for r in rows if r["streams"] == n), None)


def raw_best(raw: dict) -> str:
    return raw.get("best", str(raw["best_batch"]))  # results.json files from before layouts


def raw_label(raw: dict) -> str:
    r = raw["batches"][raw_best(raw)]
    if r.get("workers", 1) > 1:
        return f"batch {r['batch']} x {r['workers']} copies of {r['threads']} thread(s)"
    return f"batch {raw['best_batch']}"


def check_targets(res: dict, n: int) -> dict[str, Any]:
    raw, svc, naive = res["raw"], _find(res["service"], n), _find(res["naive"], n)
    if svc is None:
        return {}
    t: dict[str, Any] = {"streams": n}
    t["fps_ratio"] = round(svc["fps_total"] / raw["fps"], 3)
    t["fps_ratio_ok"] = t["fps_ratio"] >= 0.85
    bm = svc.get("batch_ms")
    if bm and svc["p50_ms"] is not None:
        t["batch_ms"] = bm
        t["p50_over_batch"] = round(svc["p50_ms"] / bm, 2)
        t["p99_over_batch"] = round(svc["p99_ms"] / bm, 2)
        t["p50_ok"], t["p99_ok"] = t["p50_over_batch"] <= 2.0, t["p99_over_batch"] <= 4.0
    if naive is not None and naive["fps_total"] > 0:
        t["vs_naive_fps"] = round(svc["fps_total"] / naive["fps_total"], 2)
        t["vs_naive_fps_ok"] = t["vs_naive_fps"] >= 1.2
        if naive["p99_ms"] and svc["p99_ms"]:
            t["vs_naive_p99"] = round(svc["p99_ms"] / naive["p99_ms"], 3)
            t["vs_naive_p99_ok"] = t["vs_naive_p99"] <= 0.2
    if len(res.get("target", [])) == 2:
        fixed, tgt = res["target"]
        t["latency_target_ms"] = tgt["latency_target_ms"]
        t["target_p95_ms"], t["fixed_p95_ms"] = tgt["p95_ms"], fixed["p95_ms"]
        # The window's own histogram (exact window, 100 ms-wide buckets around 300 ms), and the
        # API's figure (exact values, but the last 300 frames: at 1 fps that reaches back
        # before the window).
        t["target_service_p95_ms"] = tgt["service_p95_ms"]
        t["fixed_service_p95_ms"] = fixed["service_p95_ms"]
        t["target_api_p95_ms"], t["fixed_api_p95_ms"] = api_p95(tgt), api_p95(fixed)
        t["target_fps"], t["fixed_fps"] = tgt["fps_total"], fixed["fps_total"]
        # The scheduler sees capture-to-write latency (it cannot see the camera or network).
        t["target_holds"] = (
            t["target_service_p95_ms"] is not None
            and t["target_service_p95_ms"] <= tgt["latency_target_ms"]
        )
    if "drift" in res:
        t["drift_p50_slope_ms_per_min"] = res["drift"]["drift"].get("p50_slope_ms_per_min")
    return t


def summary(res: dict, n: int) -> dict[str, Any]:
    svc = _find(res["service"], n) or (res["service"][-1] if res["service"] else {})
    naive = _find(res["naive"], n) or (res["naive"][-1] if res["naive"] else {})
    raw_fps = res["raw"]["fps"]
    return {
        "raw_fps": raw_fps,
        "raw_batch": res["raw"]["best_batch"],
        "service_fps": svc.get("fps_total"),
        "ratio": round(svc["fps_total"] / raw_fps, 3) if svc else None,
        "naive_fps": naive.get("fps_total"),
        "p50_ms": svc.get("p50_ms"),
        "p95_ms": svc.get("p95_ms"),
        "p99_ms": svc.get("p99_ms"),
        "naive_p50_ms": naive.get("p50_ms"),
        "naive_p99_ms": naive.get("p99_ms"),
        "batch_ms": svc.get("batch_ms"),
        "streams": svc.get("streams", n),
        "camera_fps": res["settings"]["camera_fps"],
    }


def machine_info() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "backend": args.backend,
        "threads": args.threads,
        "camera_fps": args.fps,
        "camera_size": "1280x720",
        "camera_bitrate_kbps": args.bitrate,
        "camera_encode": args.camera_encode,
        "reader": args.reader,
        "clip": args.clip.name,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "warmup_s": args.warmup,
        "window_s": args.seconds,
        "jpeg_quality": 80,
        "render": "overlay alpha 0.5 + legend",
    }


# =============================================================================================
# Report: table, chart


def fmt(x: Any, nd: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table(res: dict) -> str:
    head = (
        "| run | streams | fps total | fps / stream | p50 ms | p95 ms | p99 ms | dropped "
        "| skipped | not shown | CPU (cores) | sources CPU | others' CPU | peak RSS MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    raw = res["raw"]
    rows = [
        f"| raw model, {raw_label(raw)} | - | {raw['fps']:.1f} | - | "
        f"{raw['batches'][raw_best(raw)]['ms_per_batch']:.0f} (batch) | - | - | - "
        f"| - | - | {os.cpu_count()} (all) | - | - | - |"
    ]
    for r in res["naive"]:
        cpu = r["cpu_cores"]
        rows.append(
            f"| naive loop | {r['streams']} | {r['fps_total']:.1f} | {r['fps_min_stream']:.1f}"
            f" | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | - | 0 | "
            f"{fmt(r['not_shown'])} | {cpu.get('naive', 0):.2f} | {cpu.get('sources', 0):.2f} | "
            f"{cpu.get('other', 0):.2f} | {fmt(r['peak_rss_mb'])} |"
        )
    main_reader = res["settings"].get("reader", "opencv")
    for kind, items in (
        ("segstream, RTSP", res["service"]),
        ("segstream, files", res["files"]),
        ("segstream, RTSP", res.get("variant", [])),
        ("segstream, RTSP", res.get("readers", [])),
        ("segstream, RTSP", res.get("target", [])),
    ):
        for r in items:
            name = kind
            if r.get("reader", "opencv") != main_reader:
                name += f", reader {r['reader']}"
            if r.get("max_batch") != res["settings"]["max_batch"]:
                name += f", max_batch={r['max_batch']}"
            if r["latency_target_ms"]:
                name += f", latency_target_ms={r['latency_target_ms']:g}"
            elif r["infer_fps"]:
                name += f", fixed infer_fps={r['infer_fps']:g}"
            if r["latency_source"].startswith("service"):
                name += " (latency: service-side)"
            cpu = r["cpu_cores"]
            rows.append(
                f"| {name} | {r['streams']} | {r['fps_total']:.1f} | "
                f"{min(r['fps_per_stream']):.1f} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | "
                f"{fmt(r['p99_ms'])} | {r['dropped']} | {r['skipped']} | "
                f"{fmt(r.get('not_shown'))} | {cpu.get('service', 0):.2f} | "
                f"{cpu.get('sources', 0):.2f} | {cpu.get('other', 0):.2f} | "
                f"{fmt(r['peak_rss_mb'])} |"
            )
    return head + "\n".join(rows) + "\n"


def markdown(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    lines = [
        f"Measured {res['started']} on {m['cpus']} cores ({m['cpu']}), {s['model']} "
        f"({s['backend']}, {res['raw']['input'][0]}x{res['raw']['input'][1]}); cameras "
        f"{s['camera_size']} H.264 at {s['camera_fps']:g} fps, {s['camera_bitrate_kbps']} kbit/s;"
        f" {s['window_s']:g} s windows after {s['warmup_s']:g} s warm-up; reader "
        f"{s.get('reader', 'auto')}; load average at start "
        f"{', '.join(str(x) for x in m.get('load_at_start', []))}.",
        "",
        "```",
        res["command"],
        "```",
        "",
        table(res),
        "fps: segmented frames per second delivered to the MJPEG clients (naive: produced). "
        "Latency: camera capture to the JPEG in the client's hands, read from the pixel stamp. "
        "dropped: frames a reader overwrote before the scheduler looked; skipped: frame "
        "skipping; not shown: camera frames in the window that no viewer saw. CPU in cores "
        "(of 2) over the window; sources = the RTSP camera process; others = the rest of the "
        "machine (the benchmark client, other jobs).",
        "",
    ]
    d = res.get("drift")
    if d:
        rows = ", ".join(f"{r['p50_ms']:.0f}/{r['p99_ms']:.0f}" for r in d["drift"]["per_minute"])
        lines.append(
            f"Drift, {d['streams']} cameras for {d['seconds'] / 60:.0f} min: p50/p99 ms "
            f"per minute {rows}; p50 slope {d['drift']['p50_slope_ms_per_min']} ms/min; "
            f"{d['fps_total']:.1f} fps; peak RSS {d['peak_rss_mb']} MB; others' CPU "
            f"{d['cpu_cores'].get('other', 0):.2f}."
        )
        lines.append("")
    t = res.get("targets") or {}
    if t:
        rest = json.dumps({k: v for k, v in t.items() if k != "streams"})
        lines.append(f"Targets ({t['streams']} streams): {rest}")
    return "\n".join(lines) + "\n"


def chart(res: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    axes = axes.ravel()
    ax = axes[0]
    ax.axhline(res["raw"]["fps"], color="k", ls="--", label="raw model (ceiling)")
    ax.axhline(0.85 * res["raw"]["fps"], color="grey", ls=":", label="0.85 x raw")
    vb = res["variant"][0]["max_batch"] if res.get("variant") else None
    main_reader = res["settings"].get("reader", "opencv")
    by_reader: dict[str, list[dict]] = {}
    for r in res.get("readers", []):
        by_reader.setdefault(r["reader"], []).append(r)
    others = [(rows, f"segstream, reader {name} (RTSP)", "^-") for name, rows in by_reader.items()]
    for rows, name, st in (
        (res["service"], f"segstream, reader {main_reader} (RTSP)", "o-"),
        *others,
        (res["files"], "segstream (files)", "s-"),
        (res.get("variant", []), f"segstream max_batch={vb} (RTSP)", "d-"),
        (res["naive"], "naive loop (RTSP)", "x-"),
    ):
        if rows:
            ax.plot([r["streams"] for r in rows], [r["fps_total"] for r in rows], st, label=name)
    ax.set(
        xlabel="streams",
        ylabel="segmented fps (total)",
        title="Throughput",
        xscale="log",
        ylim=(0, None),
    )
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.legend(fontsize=8)
    ax = axes[1]
    for rows, name, c in (
        (res["service"], f"segstream ({main_reader})", "C0"),
        (res["naive"], "naive", "C2"),
        (res.get("variant", []), f"segstream max_batch={vb}", "C3"),
        *(
            (rows, f"segstream ({nm})", f"C{4 + k}")
            for k, (nm, rows) in enumerate(by_reader.items())
        ),
    ):
        ok = [r for r in rows if r["p50_ms"] is not None]
        if ok:
            ns = [r["streams"] for r in ok]
            ax.plot(ns, [r["p50_ms"] for r in ok], "o-", color=c, label=f"{name} p50")
            ax.plot(ns, [r["p99_ms"] for r in ok], "o--", color=c, label=f"{name} p99")
    ax.set(
        xlabel="streams",
        ylabel="glass-to-glass latency (ms)",
        title="Latency (pixel stamp)",
        xscale="log",
        yscale="log",
    )
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.legend(fontsize=8)
    targets = res.get("target", [])
    n = targets[0]["streams"] if targets else ""
    for r in targets:
        name = (
            f"latency_target_ms={r['latency_target_ms']:g}"
            if r["latency_target_ms"]
            else f"fixed infer_fps={r['infer_fps']:g}"
        )
        t, p95 = rolling_p95(r["timeline"])
        (line,) = axes[2].plot(t, p95, label=f"{name}: pixel p95 ({r['fps_total']:.1f} fps)")
        tr = r.get("trace", [])
        axes[2].plot(
            [x["t"] for x in tr],
            [x["service_p95_ms"] for x in tr],
            ":",
            color=line.get_color(),
            label=f"{name}: service-side p95 (/api/streams, last 300 frames)",
        )
        if r["latency_target_ms"]:
            axes[2].axhline(r["latency_target_ms"], color="r", lw=0.8, label="target")
        ft, fv = rolling_fps(r["timeline"])
        axes[3].plot(ft, fv, color=line.get_color(), label=f"{name}: segmented fps delivered")
        if any(x.get("batch_limit") for x in tr):
            axes[3].plot(
                [x["t"] for x in tr],
                [x.get("batch_limit") or float("nan") for x in tr],
                ":",
                color=line.get_color(),
                label=f"{name}: batch limit",
            )
        axes[3].plot(
            [x["t"] for x in tr],
            [x["cap_fps"] * len(r["fps_per_stream"]) if x["cap_fps"] else float("nan") for x in tr],
            "--",
            color=line.get_color(),
            label=f"{name}: sum of caps",
        )
    for ax in axes[:2]:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].set(
        xlabel="seconds",
        ylabel="p95 latency (ms)",
        ylim=(0, None),
        title=f"{n} streams: latency, fixed rate vs latency target",
    )
    axes[3].set(
        xlabel="seconds",
        ylabel="frames/s (all streams)",
        ylim=(0, None),
        title=f"{n} streams: delivered fps, the rate caps and batch limit",
    )
    for ax in axes[2:]:
        if targets:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rolling_fps(timeline: dict[str, list], window: float = 5.0, step: float = 1.0):
    """Frames delivered per second over all streams, in a sliding window."""
    t = np.sort(np.array([p[0] for tl in timeline.values() for p in tl]))
    xs = list(np.arange(window, (t[-1] if t.size else 0) + 1e-9, step))
    return xs, [float(np.sum((t > x - window) & (t <= x)) / window) for x in xs]


def rolling_p95(timeline: dict[str, list], window: float = 5.0, step: float = 1.0):
    pts = sorted(p for tl in timeline.values() for p in tl)
    if not pts:
        return [], []
    t = np.array([p[0] for p in pts])
    lat = np.array([p[1] for p in pts])
    xs, ys = [], []
    x = window
    while x <= t[-1] + 1e-9:
        sel = lat[(t > x - window) & (t <= x)]
        if sel.size:
            xs.append(x)
            ys.append(float(np.percentile(sel, 95)))
        x += step
    return xs, ys


# =============================================================================================
# CLI


def parse_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()] if s else []


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    ap.add_argument("--quick", action="store_true", help="reduced run (< 60 s)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results")
    ap.add_argument("--model", default="mnv2-voc")
    ap.add_argument("--backend", default="tflite", choices=["auto", "tflite", "keras"])
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="inference threads per model worker (default: the service's plan)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="the service's model workers (default: its plan, runner.plan_workers)",
    )
    ap.add_argument("--clip", type=Path, default=None, help="background video (sample vtest)")
    ap.add_argument("--fps", type=float, default=15.0, help="camera frame rate")
    ap.add_argument("--bitrate", type=int, default=2000, help="camera kbit/s")
    ap.add_argument(
        "--camera-encode",
        choices=["pre", "live"],
        default="pre",
        help="pre: cameras encoded up front, as by a camera's own chip (default); "
        "live: x264 on this machine, sharing the CPU with the service",
    )
    ap.add_argument("--streams", type=parse_list, default=[1, 2, 4, 8])
    ap.add_argument(
        "--reader",
        default="auto",
        choices=["opencv", "pyav", "gst", "auto"],
        help="the service's reader for every run",
    )
    ap.add_argument(
        "--compare-readers",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="also run the RTSP sweep with these readers, e.g. opencv",
    )
    ap.add_argument("--naive-streams", type=parse_list, default=None, help="default: --streams")
    ap.add_argument("--file-streams", type=parse_list, default=None, help="default: --streams")
    ap.add_argument("--target-n", type=int, default=4, help="streams the targets are judged at")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="the service's max_batch (default: its plan, runner.plan_workers)",
    )
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument(
        "--variant-max-batch",
        type=int,
        default=0,
        help="also run the RTSP sweep (N > 1) with this max_batch, e.g. 1",
    )
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window per run")
    ap.add_argument("--target-streams", type=int, default=8, help="0 = skip the latency target")
    ap.add_argument(
        "--latency-target-ms",
        type=float,
        default=0.0,
        help="target of the latency-target run (service-side p95); 0 = 3/4 of the "
        "fixed-rate run's service-side p95",
    )
    ap.add_argument(
        "--fixed-fps",
        type=float,
        default=None,
        help="per-stream infer_fps of the fixed-rate run (default raw fps / 4)",
    )
    ap.add_argument("--target-seconds", type=float, default=60.0)
    ap.add_argument("--drift-minutes", type=float, default=0.0)
    ap.add_argument("--drift-streams", type=int, default=4)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="split the service's CPU by thread (names via py-spy, bench extra)",
    )
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="only rebuild results.md and the chart from a saved results.json",
    )
    ap.add_argument(
        "--launcher",
        type=Path,
        default=None,
        help="a Python file to run instead of `segstream` (to try a variant)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=4,
        help="repeat a run this many times when other jobs took CPU meanwhile",
    )
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=300.0,
        help="before each run, wait up to this long for other jobs to finish",
    )

    raw = sub.add_parser("raw", help="(internal) raw model throughput")
    raw.add_argument("--model", default="mnv2-voc")
    raw.add_argument("--backend", default="tflite")
    raw.add_argument("--threads", type=int, default=None)
    raw.add_argument("--clip", required=True)
    raw.add_argument("--seconds", type=float, default=6.0)
    raw.add_argument("--batches", default="1,2,4,8")
    nv = sub.add_parser("naive", help="(internal) the naive loop")
    nv.add_argument("--model", default="mnv2-voc")
    nv.add_argument("--backend", default="tflite")
    nv.add_argument("--threads", type=int, default=None)
    nv.add_argument("--warmup", type=float, default=8.0)
    nv.add_argument("--seconds", type=float, default=30.0)
    nv.add_argument("--cycle-ms", type=int, default=0)
    nv.add_argument("--cycle-frames", type=int, default=0)
    nv.add_argument("--urls", nargs="+", required=True)
    return ap


def apply_quick(args: argparse.Namespace) -> None:
    args.streams, args.naive_streams, args.file_streams = [4], [4], []
    args.warmup, args.seconds = 3.0, 8.0
    args.target_streams, args.drift_minutes, args.variant_max_batch = 0, 0.0, 0
    args.idle_wait, args.retries = min(args.idle_wait, 5.0), 0


def write_report(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    chart(res, out / "benchmark.png")
    log(f"wrote {out}/results.json, results.md, benchmark.png")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.report:  # re-derive targets, table and chart from a saved run
        res = json.loads(args.report.read_text())
        res["targets"] = check_targets(res, args.target_n)
        res["summary"] = summary(res, args.target_n)
        write_report(res, args.report.parent)
        print(markdown(res), file=sys.stderr)
        print(json.dumps(res["summary"]), flush=True)
        return 0
    if args.cmd == "raw":
        return cmd_raw(args)
    if args.cmd == "naive":
        return cmd_naive(args)
    if args.quick:
        apply_quick(args)
    args.naive_streams = args.streams if args.naive_streams is None else args.naive_streams
    args.file_streams = args.streams if args.file_streams is None else args.file_streams
    args.command_line = "python scripts/benchmark.py " + shlex.join(argv)
    args.cycle_ms = args.cycle_frames = 0  # set by the cameras (pre-encoded ones loop a cycle)
    if args.clip is None:
        from segstream.models.fetch import NotFetchedError, sample_path

        try:
            args.clip = sample_path("vtest")
        except NotFetchedError as e:
            print(f"benchmark: {e}", file=sys.stderr)
            return 2
    if shutil.which("ffmpeg") is None:
        print("benchmark: ffmpeg is required (apt-get install ffmpeg)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    res = asyncio.run(orchestrate(args))
    write_report(res, args.out)
    print(markdown(res), file=sys.stderr)
    print(json.dumps(res["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
