"""`segstream serve` under load: live cameras, MJPEG clients, the service's metrics and API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchlib.common import OTHER_MAX, REPO, SYSTEM_PYTHON, log
from benchlib.latency import Recorder, camera_recorder, combine
from benchlib.procs import (
    CpuMeter,
    cpu_by_thread,
    free_port,
    peak_rss_mb,
    stop_process,
    thread_cpu,
    wait_idle,
)


@contextlib.contextmanager
def live_cameras(
    clip: Path,
    streams: int,
    fps: float,
    bitrate: int,
    encode: str = "pre",
    cycle_s: float = 64.0,
    moving_every: int = 1,
) -> Iterator[tuple[list[str], subprocess.Popen, int, int]]:
    """scripts/rtsp_live.py with `streams` mounts; yields (urls, process, cycle_ms, frames in
    a cycle); both 0 for live-encoding cameras. `moving_every` K > 1: only mounts 0, K, 2K,
    ... move (and are stamped); the others show a still frame."""
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
        "--moving-every",
        str(moving_every),
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
    outcomes = ("captured", "undecoded", "unconverted", "dropped", "skipped", "unchanged")
    for outcome in (*outcomes, "inferred", "published"):
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
