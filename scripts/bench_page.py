#!/usr/bin/env python
"""The live page and the mosaic under load, measured end to end with real clients.

Starts `segstream serve` (a subprocess) with N file streams of a small clip, then:

  page:   1 and 10 headless Chromium viewers of the page (each its own browser, every tile in
          view): frames a second reaching each tile (counted by the page), CPU of the server
          and of the browsers (cores, from /proc), bytes a second per viewer (counted by the
          page, and segstream_page_bytes_total on the server); then 10 plain WebSocket
          clients (no browser), the server's side alone;
  mosaic: M MJPEG viewers (1, 10, 50 by default) of one 16-stream mosaic: server CPU.

Each figure is measured over --seconds after --warm seconds; "idle" rows are the same service
with nobody watching (decoding and segmenting go on), so the viewers' cost is the difference.
Prints one JSON line per run and a Markdown table at the end.

  .venv/bin/python scripts/bench_page.py                     # ~4 min
  .venv/bin/python scripts/bench_page.py --streams 32 --viewers 1 10 --mosaic-viewers 1 10 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the support package

from support.peers import Chromium  # noqa: E402
from support.rtsp import encode_clip  # noqa: E402
from support.service_proc import ServiceProcess, read_part  # noqa: E402

VIDEO = REPO.parent / "shared" / "data" / "video" / "vtest.avi"


def cpu_seconds(procs: list[psutil.Process]) -> tuple[float, float]:
    """User and system CPU seconds of the processes."""
    user = system = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            user, system = user + t.user, system + t.system
        except psutil.Error:
            pass
    return user, system


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def main_thread_seconds(pid: int) -> float:
    """CPU seconds of the process's main thread: segstream's event loop, which writes every
    MJPEG response and WebSocket message."""
    try:
        return next(
            t.user_time + t.system_time for t in psutil.Process(pid).threads() if t.id == pid
        )
    except (psutil.Error, StopIteration):
        return 0.0


class Meter:
    """CPU cores of a process tree (and of its root's event loop) over a window."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Meter:
        self.procs = tree(self.pid)
        self.t0, self.c0 = time.monotonic(), cpu_seconds(self.procs)
        self.loop0 = main_thread_seconds(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs = [p for p in self.procs if p.is_running()] + [
            p for p in tree(self.pid) if p not in self.procs
        ]
        self.wall = time.monotonic() - self.t0
        user, system = cpu_seconds(self.procs)
        self.cores = (user + system - sum(self.c0)) / self.wall
        self.sys_cores = (system - self.c0[1]) / self.wall  # the kernel: sockets, mostly
        self.loop_cores = (main_thread_seconds(self.pid) - self.loop0) / self.wall


STATS_JS = (
    "JSON.stringify({bytes: window.segstream.bytes, vis: document.visibilityState, "
    "tiles: [...document.querySelectorAll('[data-stream]')].map(e => "
    "+(e.dataset.frames || 0)), inview: [...document.querySelectorAll('[data-stream]')]"
    ".filter(e => e.getBoundingClientRect().bottom <= innerHeight + 80).length})"
)


async def page_run(
    svc: ServiceProcess, viewers: int, n: int, warm: float, seconds: float, workdir: Path
) -> dict[str, Any]:
    browsers = [Chromium(workdir / f"profile-{viewers}-{i}") for i in range(viewers)]
    try:
        async with _pages(browsers) as pages:
            for page in pages:
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 1600, "height": 2300, "deviceScaleFactor": 1, "mobile": False},
                )
                await page.goto(svc.base + "/", 0.2)
            for page in pages:
                await page.wait_for(
                    f"document.querySelectorAll('[data-stream][data-frames]').length === {n}", 60
                )
            await asyncio.sleep(warm)
            before = [json.loads(await p.eval(STATS_JS)) for p in pages]
            sent0 = svc.metric("segstream_page_bytes_total")
            assert svc.proc is not None
            with Meter(svc.proc.pid) as server, _Meters([b.proc.pid for b in browsers]) as brw:
                await asyncio.sleep(seconds)
            after = [json.loads(await p.eval(STATS_JS)) for p in pages]
            sent = svc.metric("segstream_page_bytes_total") - sent0
    finally:
        for b in browsers:
            b.close()
    fps = [
        (a - b) / server.wall
        for x, y in zip(before, after, strict=True)
        for b, a in zip(x["tiles"], y["tiles"], strict=True)
    ]
    per_viewer = [
        (y["bytes"] - x["bytes"]) / server.wall for x, y in zip(before, after, strict=True)
    ]
    return {
        "run": "page",
        "streams": n,
        "viewers": viewers,
        "tiles_in_view": min(x["inview"] for x in after),
        "visibility": sorted({x["vis"] for x in after}),
        "tile_fps_mean": round(sum(fps) / len(fps), 2),
        "tile_fps_min": round(min(fps), 2),
        "server_cores": round(server.cores, 3),
        "server_sys_cores": round(server.sys_cores, 3),
        "loop_cores": round(server.loop_cores, 3),
        "browser_cores": round(brw.cores, 3),
        "browser_cores_per_viewer": round(brw.cores / viewers, 3),
        "bytes_per_s_per_viewer": round(sum(per_viewer) / len(per_viewer)),
        "server_bytes_per_s": round(sent / server.wall),
    }


class _Meters:
    def __init__(self, pids: list[int]) -> None:
        self.meters = [Meter(p) for p in pids]

    def __enter__(self) -> _Meters:
        for m in self.meters:
            m.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.meters:
            m.__exit__()
        self.cores = sum(m.cores for m in self.meters)


class _pages:
    """One page in each browser, entered together."""

    def __init__(self, browsers: list[Chromium]) -> None:
        self.browsers = browsers
        self._cms: list[Any] = []

    async def __aenter__(self) -> list[Any]:
        pages = []
        for b in self.browsers:
            cm = b.page()
            pages.append(await cm.__aenter__())
            self._cms.append(cm)
        return pages

    async def __aexit__(self, *exc: object) -> None:
        for cm in reversed(self._cms):
            await cm.__aexit__(None, None, None)


def idle_run(svc: ServiceProcess, seconds: float, n: int) -> dict[str, Any]:
    assert svc.proc is not None
    with Meter(svc.proc.pid) as server:
        time.sleep(seconds)
    return {
        "run": "idle",
        "streams": n,
        "viewers": 0,
        "server_cores": round(server.cores, 3),
        "server_sys_cores": round(server.sys_cores, 3),
        "loop_cores": round(server.loop_cores, 3),
    }


def ws_run(
    svc: ServiceProcess, viewers: int, ids: list[str], warm: float, seconds: float
) -> dict[str, Any]:
    """Viewers that are plain WebSocket clients (aiohttp, here): the server's side of the page
    without browsers competing for the CPU."""
    import aiohttp

    frames = [0] * viewers
    nbytes = [0] * viewers

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(svc.base.replace("http", "ws") + "/ws") as ws:
            await ws.send_json({"watch": ids, "fps": 10})
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    frames[i] += 1
                    nbytes[i] += len(msg.data)

    async def run() -> tuple[Meter, int, int]:
        async with aiohttp.ClientSession() as http:
            tasks = [asyncio.create_task(client(i, http)) for i in range(viewers)]
            await asyncio.sleep(warm)
            f0, b0 = sum(frames), sum(nbytes)
            assert svc.proc is not None
            with Meter(svc.proc.pid) as server:
                await asyncio.sleep(seconds)
            got = sum(frames) - f0, sum(nbytes) - b0
            for t in tasks:
                t.cancel()
            return server, *got

    server, n_frames, n_bytes = asyncio.run(run())
    return {
        "run": "page-ws",
        "streams": len(ids),
        "viewers": viewers,
        "tile_fps_mean": round(n_frames / server.wall / viewers / len(ids), 2),
        "server_cores": round(server.cores, 3),
        "server_sys_cores": round(server.sys_cores, 3),
        "loop_cores": round(server.loop_cores, 3),
        "bytes_per_s_per_viewer": round(n_bytes / server.wall / viewers),
    }


def mosaic_run(
    svc: ServiceProcess, viewers: int, ids: list[str], warm: float, seconds: float, width: int
) -> dict[str, Any]:
    import urllib.request

    url = f"{svc.base}/mosaic/mjpeg?streams={','.join(ids)}&width={width}"
    stop = threading.Event()
    frames = [0] * viewers
    nbytes = [0] * viewers

    def reader(i: int) -> None:
        with urllib.request.urlopen(url, timeout=30) as r:
            while not stop.is_set():
                jpeg = read_part(r)
                frames[i] += 1
                nbytes[i] += len(jpeg)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(viewers)]
    for t in threads:
        t.start()
    time.sleep(warm)
    f0, b0 = sum(frames), sum(nbytes)
    assert svc.proc is not None
    with Meter(svc.proc.pid) as server:
        time.sleep(seconds)
    f1, b1 = sum(frames), sum(nbytes)
    stop.set()
    return {
        "run": "mosaic",
        "streams": len(ids),
        "viewers": viewers,
        "width": width,
        "fps_per_viewer": round((f1 - f0) / server.wall / viewers, 2),
        "bytes_per_s_per_viewer": round((b1 - b0) / server.wall / viewers),
        "server_cores": round(server.cores, 3),
        "server_sys_cores": round(server.sys_cores, 3),
        "loop_cores": round(server.loop_cores, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument(
        "--viewers",
        type=int,
        nargs="*",
        default=[1, 10],
        help="Chromium viewers of the page (each its own browser)",
    )
    ap.add_argument(
        "--ws-viewers",
        type=int,
        nargs="*",
        default=[10],
        help="plain WebSocket viewers (no browser)",
    )
    ap.add_argument("--mosaic-streams", type=int, default=16)
    ap.add_argument("--mosaic-viewers", type=int, nargs="*", default=[1, 10, 50])
    ap.add_argument("--mosaic-width", type=int, default=1280)
    ap.add_argument("--size", default="320x240", help="clip size, WxH")
    ap.add_argument("--fps", type=float, default=5.0, help="clip frame rate")
    ap.add_argument("--infer-fps", type=float, default=0.3, help="per stream")
    ap.add_argument("--warm", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()

    w, h = (int(x) for x in args.size.split("x"))
    clip = encode_clip(VIDEO, size=(w, h), seconds=6.0, fps=args.fps, container="mp4")
    ids = [f"cam{i:02d}" for i in range(args.streams)]
    cfg = {
        "model": {
            "name": "mnv2-voc",
            "backend": "tflite",
            "workers": 2,
            "threads": 1,
            "max_batch": 1,
        },
        "streams": [
            {"id": sid, "source": str(clip), "infer_fps": args.infer_fps, "output": "smooth"}
            for sid in ids
        ],
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp:
        svc = ServiceProcess(Path(tmp), cfg).start()
        try:
            for sid in ids:
                svc.wait_state(sid, {"live"}, 60)
            time.sleep(args.warm)

            def idle() -> dict[str, Any]:
                return idle_run(svc, args.seconds, args.streams)

            for run in (
                [idle]
                + [
                    (
                        lambda v=v: asyncio.run(
                            page_run(svc, v, args.streams, args.warm, args.seconds, Path(tmp))
                        )
                    )
                    for v in args.viewers
                ]
                + [
                    (lambda v=v: ws_run(svc, v, ids, args.warm, args.seconds))
                    for v in args.ws_viewers
                ]
                + [idle]
                + [
                    (
                        lambda v=v: mosaic_run(
                            svc,
                            v,
                            ids[: args.mosaic_streams],
                            args.warm,
                            args.seconds,
                            args.mosaic_width,
                        )
                    )
                    for v in args.mosaic_viewers
                ]
                + [idle]
            ):
                row = run()
                row["load_avg_1m"] = round(os.getloadavg()[0], 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
                time.sleep(2.0)
        finally:
            svc.stop()
    print()
    print(
        "| run | viewers | frames/s per tile or viewer (mean / min) | server cores (of which "
        "event loop) | browser cores | bytes/s per viewer | load 1m |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fps = (
            f"{r['tile_fps_mean']} / {r['tile_fps_min']}"
            if r["run"] == "page"
            else f"{r['tile_fps_mean']}"
            if r["run"] == "page-ws"
            else f"{r['fps_per_viewer']}"
            if r["run"] == "mosaic"
            else ""
        )
        print(
            f"| {r['run']} ({r['streams']} streams) | {r['viewers']} | {fps} | "
            f"{r['server_cores']} ({r['loop_cores']}) | {r.get('browser_cores', '')} | "
            f"{r.get('bytes_per_s_per_viewer', '')} | {r['load_avg_1m']} |"
        )


if __name__ == "__main__":
    main()
