#!/usr/bin/env python
"""Cameras per machine: what one live camera costs the service, and how many it carries.

Live 1280x720 H.264 RTSP cameras at 15 fps from scripts/rtsp_live.py (pre-encoded, stamped;
the same cameras, meters and pixel stamps as scripts/benchmark.py), `segstream serve` as a
subprocess:

cost   N cameras (--cost-streams) inferred at a low rate (--cost-fps per camera), no viewers,
       once per reader (--readers) and, with --before DIR, once per reader on another source
       tree too (e.g. the commit before, unpacked with `git archive`). The service's CPU over
       the window, split by thread (py-spy names the Python threads; native ones by their
       /proc name): reader threads and GStreamer's streaming threads ("sources"), the model
       workers, render, the rest. Per camera: (service - model workers - render) / N, i.e.
       everything a camera costs except the inference and rendering of its inferred frames.
transport  one camera read by a bare VideoSource per reader (--transport-readers), nothing
       else running in this process: the age of each frame (its pixel stamp) the moment the
       reader has decoded and converted it. The latency floor that no scheduling can remove.
count  N cameras (--counts) at --count-fps inferences per camera, an MJPEG viewer per camera
       reading the stamps: the run holds when every stream gets >= --min-fps segmented fps and
       the p99 glass-to-glass latency is <= --p99-ms. With --search, N grows by --step while it
       holds: the largest N that holds. With --moving-every K only cameras 0, K, 2K, ... move
       (and have a viewer); the others show a still frame: the run also needs every still
       camera inferred at least every refresh_s (motion gating, 5 s) during the window.
       With --still-keyframes the count runs' streams set `gate.still_keyframes` (a still
       camera decodes its keyframes only): a still camera then needs an inference at least
       every refresh_s + one keyframe interval (GOP 30 at --fps: 2 s at 15 fps).

Output in --out: results.json and results.md (the tables); the last stdout line is a JSON
summary. Before each run the harness waits for the machine to be idle and repeats a run in
which other jobs took more than 0.15 cores (scripts/benchmark.py's rules).

    .venv/bin/python scripts/bench_cameras.py --before /tmp/before --search     # ~20 min
    .venv/bin/python scripts/bench_cameras.py --quick                           # ~2 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import benchlib as bm  # noqa: E402
from benchlib.service import metric_sum  # noqa: E402

log = bm.log
GATE_REFRESH_S = 5.0  # the default gate.refresh_s: a still camera is inferred this often
CAMERA_GOP = 30  # scripts/rtsp_live.py's default --gop: frames between keyframes


def thread_groups(pid: int, before: dict[int, float], seconds: float) -> dict[str, float]:
    """Cores per thread group over the window (Python names from py-spy, native threads by
    their /proc comm)."""
    after = bm.thread_cpu(pid)
    names = bm.thread_names(pid)
    groups: dict[str, float] = {}
    for tid, c in after.items():
        name = names.get(tid)
        if name is None:
            with contextlib.suppress(OSError):
                name = "native:" + Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        name = name or "native:?"
        if name.startswith("src-") and "-reader-" in name:
            group = "reader threads"
        elif name.startswith("src-"):
            group = "watchdogs"
        elif name.startswith("model-worker"):
            group = "model workers"
        elif name.startswith("render"):
            group = "render"
        elif (
            name.startswith(("native:python", "native:segstream"))
            or name in ("MainThread", "asyncio_0")
            or name.startswith("asyncio")
        ):
            group = "event loop + other Python"
        elif name.startswith("native:"):
            # GStreamer's streaming threads (the gst reader decodes there) and library pools.
            group = "native threads"
        else:
            group = "other Python threads"
        groups[group] = groups.get(group, 0.0) + (c - before.get(tid, 0.0)) / seconds
    return {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


async def run(
    args: argparse.Namespace,
    label: str,
    tree: Path,
    urls: list[str],
    cam: subprocess.Popen,
    *,
    reader: str,
    infer_fps: float,
    viewers: bool,
    seconds: float,
    still_keyframes: bool = False,
) -> dict[str, Any]:
    """One `python -m stream.cli serve` run from `tree`."""
    busy_before = await bm.wait_idle(args.idle_wait)
    port = bm.free_port()
    cfg_path = args.out / f"config-{label}.yaml"
    bm.service_config(cfg_path, args, urls, port, infer_fps=infer_fps, reader=reader)
    if still_keyframes:
        set_still_keyframes(cfg_path)
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log_file = open(args.out / f"service-{label}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "segstream.stream.cli", "serve", "--config", str(cfg_path)],
        cwd=tree,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    stop = asyncio.Event()
    moving = [i for i in range(len(urls)) if i % args.moving_every == 0]
    recs = [bm.camera_recorder(args, i) for i in moving] if viewers else []
    tasks: list[asyncio.Task] = []
    try:

        async def ready() -> bool:
            return (await bm.http_json(f"{base}/readyz")) is not None

        await bm.wait_for(ready, 180, "/readyz", proc)
        tasks = [
            asyncio.create_task(bm.mjpeg_client(f"{base}/streams/{r.stream}/mjpeg", r, stop))
            for r in recs
        ]

        async def live() -> bool:
            st = await bm.http_json(f"{base}/api/streams")
            return all(s["state"] == "live" for s in st["streams"])

        await bm.wait_for(live, 60, "every stream live", proc)
        await asyncio.sleep(args.warmup)
        for t in tasks:
            if t.done():
                t.result()
        meter = bm.CpuMeter({"service": proc.pid, "sources": cam.pid, "client": os.getpid()})
        m0 = bm.parse_metrics(await bm.http_text(f"{base}/metrics"))
        threads0 = bm.thread_cpu(proc.pid)
        meter.start()
        t0 = time.monotonic()
        for r in recs:
            r.start(t0)
        await asyncio.sleep(seconds)
        for r in recs:
            r.recording = False
        dt = time.monotonic() - t0
        cpu = meter.stop()
        groups = await asyncio.to_thread(thread_groups, proc.pid, threads0, dt)
        m1 = bm.parse_metrics(await bm.http_text(f"{base}/metrics"))
        api = await bm.http_json(f"{base}/api/streams")
        rss = bm.peak_rss_mb(proc.pid)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bm.stop_process(proc)
        log_file.close()
    n = len(urls)
    res: dict[str, Any] = bm.combine(recs, dt) if viewers else {}
    res.update(bm.service_figures(m0, m1, api, n, dt))
    still = [f"cam{i}" for i in range(n) if i % args.moving_every]
    res["still_streams"] = len(still)
    res["still_inferred_min"] = min(
        (
            metric_sum(m1, "segstream_frames_total", stream=s, outcome="inferred")
            - metric_sum(m0, "segstream_frames_total", stream=s, outcome="inferred")
            for s in still
        ),
        default=None,
    )
    excl = groups.get("model workers", 0.0) + groups.get("render", 0.0)
    sources = groups.get("reader threads", 0.0) + groups.get("native threads", 0.0)
    res.update(
        {
            "label": label,
            "tree": str(tree),
            "reader": reader,
            "streams": n,
            "infer_fps": infer_fps,
            "seconds": round(dt, 1),
            "still_keyframes": still_keyframes,
            "busy_before": busy_before,
            "cpu_cores": cpu,
            "threads": groups,
            "peak_rss_mb": rss,
            "per_camera_cores": round((cpu["service"] - excl) / n, 4),
            "sources_per_camera_cores": round(sources / n, 4),
            "captured_fps_per_camera": round(res["captured"] / dt / n, 2),
            "converted_share": round(1 - res["unconverted"] / max(res["captured"], 1), 3),
            # keyframe-only decoding: frames read and never decoded
            "undecoded_share": round(
                res["undecoded"] / max(res["captured"] + res["undecoded"], 1), 3
            ),
        }
    )
    return res


def set_still_keyframes(cfg_path: Path) -> None:
    """Every stream of the service's config: motion gating (the default refresh_s) with
    keyframe-only decoding while its scene is still."""
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    gate = {"mode": "motion", "refresh_s": GATE_REFRESH_S, "still_keyframes": True}
    for s in cfg["streams"]:
        s["gate"] = gate
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def still_period_s(args: argparse.Namespace, still_keyframes: bool) -> float:
    """The longest a still camera may go without an inference: refresh_s, then the first
    frame the scheduler takes (one period of the cap) or, decoding keyframes only, the next
    keyframe (one keyframe interval)."""
    wait = CAMERA_GOP / args.fps if still_keyframes else 1 / args.count_fps
    return GATE_REFRESH_S + wait


def transport(args: argparse.Namespace, url: str, reader: str) -> dict[str, Any]:
    """Ages of the frames a bare reader hands over (every frame converted)."""
    import stamp

    from segstream.stream.config import StreamConfig
    from segstream.stream.sources import VideoSource

    ages: list[float] = []
    src: VideoSource

    def on_frame(_id: str) -> None:
        now = stamp.now_ms()
        f = src.slot.take()
        code = stamp.read_image(f.image) if f is not None else None
        if code is not None and recording:
            ages.append(float(bm.cycle_age_ms(stamp.age_ms(code[1], now), args.cycle_ms)))

    recording = False
    src = VideoSource(
        StreamConfig(id=f"transport-{reader}", source=url, reader=reader), on_frame=on_frame
    )
    src.start()
    try:
        deadline = time.monotonic() + 30
        while src.state.value != "live" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(args.warmup)
        recording = True
        time.sleep(args.transport_seconds)
        recording = False
        st = src.stats()
    finally:
        src.stop()
    return {
        "reader": st["reader"],
        "frames": len(ages),
        **bm.pcts(ages),
        "min_ms": round(min(ages), 1) if ages else None,
    }


async def run_clean(args: argparse.Namespace, *a: Any, **kw: Any) -> dict[str, Any]:
    """run(), repeated (up to --retries) while other jobs took CPU during the window."""
    for attempt in range(args.retries + 1):
        res = await run(args, *a, **kw)
        other = res["cpu_cores"].get("other", 0.0)
        if other <= bm.OTHER_MAX or attempt == args.retries:
            res["attempts"] = attempt + 1
            return res
        log(f"other jobs used {other:.2f} cores during the window: measuring again")
    raise AssertionError("unreachable")


def holds(args: argparse.Namespace, r: dict[str, Any]) -> bool:
    # A still camera is inferred on the first due frame (keyframe) after each refresh_s:
    # that many whole periods of still_period_s in the window.
    refreshes = int(r["seconds"] // still_period_s(args, r.get("still_keyframes", False)))
    still_ok = r["still_inferred_min"] is None or r["still_inferred_min"] >= refreshes
    return (
        still_ok
        and r["fps_min_stream"] >= args.min_fps
        and r["p99_ms"] is not None
        and r["p99_ms"] <= args.p99_ms
        and not r["unstamped"] > 0.05 * max(r["frames"], 1)
    )


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {
        "command": args.command_line,
        "started": time.strftime("%F %T"),
        "machine": bm.machine_info(),
        "settings": settings(args),
        "cost": [],
        "count": [],
    }
    need = max(
        [
            args.cost_streams if args.readers else 1,
            *args.counts,
            args.max_count if args.search else 0,
        ]
    )
    log(f"{need} cameras (pre-encoded, {args.cycle:g} s cycle)")
    with bm.live_cameras(
        args.clip, need, args.fps, args.bitrate, "pre", args.cycle, args.moving_every
    ) as (
        urls,
        cam,
        args.cycle_ms,
        args.cycle_frames,
    ):
        trees = [("after", REPO)] + ([("before", args.before)] if args.before else [])
        for reader in args.readers:
            for code, tree in trees:
                if code == "before" and reader not in args.before_readers:
                    continue
                label = f"cost-{code}-{reader}-{args.cost_streams}"
                log(f"cost: {args.cost_streams} cameras, {reader}, {code} ({tree})")
                r = await run_clean(
                    args,
                    label,
                    tree,
                    urls[: args.cost_streams],
                    cam,
                    reader=reader,
                    infer_fps=args.cost_fps,
                    viewers=False,
                    seconds=args.seconds,
                )
                r["code"] = code
                res["cost"].append(r)
                checkpoint(args, res)
                log(
                    f"{label}: service {r['cpu_cores']['service']:.3f} cores, per camera "
                    f"{r['per_camera_cores']:.4f} (sources {r['sources_per_camera_cores']:.4f})"
                    f", converted {r['converted_share']:.0%}, undecoded "
                    f"{r['undecoded_share']:.0%}; threads {r['threads']}"
                )
        res["transport"] = []
        for reader in args.transport_readers:
            await bm.wait_idle(args.idle_wait)
            meter = bm.CpuMeter({"sources": cam.pid, "harness": os.getpid()})
            meter.start()
            r = await asyncio.to_thread(transport, args, urls[0], reader)
            r["cpu_cores"] = meter.stop()
            res["transport"].append(r)
            checkpoint(args, res)
            log(
                f"transport {reader}: p50 {r['p50_ms']} p95 {r['p95_ms']} ms over "
                f"{r['frames']} frames (others' CPU {r['cpu_cores']['other']:.2f})"
            )
        queue = list(args.counts)
        while queue:
            n = queue.pop(0)
            label = f"count-{args.count_reader}-{n}" + (
                "-stillkeys" if args.still_keyframes else ""
            )
            log(f"count: {n} cameras at {args.count_fps:g} fps each, {args.count_reader}")
            r = await run_clean(
                args,
                label,
                REPO,
                urls[:n],
                cam,
                reader=args.count_reader,
                infer_fps=args.count_fps,
                viewers=True,
                seconds=args.count_seconds,
                still_keyframes=args.still_keyframes,
            )
            r["holds"] = holds(args, r)
            res["count"].append(r)
            checkpoint(args, res)
            log(
                f"{label}: min {r['fps_min_stream']} fps/stream, p50 {r['p50_ms']} p99 "
                f"{r['p99_ms']} ms, still cameras {r['still_streams']} (fewest inferences "
                f"{r['still_inferred_min']}, unchanged {r['unchanged']}), "
                f"undecoded {r['undecoded_share']:.0%}, "
                f"service {r['cpu_cores']['service']:.2f} cores, "
                f"machine {r['cpu_cores']['machine']:.2f}: "
                f"{'holds' if r['holds'] else 'does not hold'}"
            )
            if args.search and not queue and r["holds"] and n + args.step <= args.max_count:
                queue.append(n + args.step)
    ok = [r["streams"] for r in res["count"] if r["holds"]]
    res["largest_count"] = max(ok) if ok else None
    res["summary"] = summary(res)
    return res


def checkpoint(args: argparse.Namespace, res: dict[str, Any]) -> None:
    (args.out / "results.partial.json").write_text(json.dumps(res, indent=1))


def summary(res: dict[str, Any]) -> dict[str, Any]:
    cost = {f"{r['code']}-{r['reader']}": r["per_camera_cores"] for r in res["cost"]}
    return {
        "per_camera_cores": cost,
        "largest_count": res.get("largest_count"),
        "counts": {
            str(r["streams"]): {
                "holds": r["holds"],
                "p99_ms": r["p99_ms"],
                "fps_min_stream": r["fps_min_stream"],
            }
            for r in res["count"]
        },
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "backend": args.backend,
        "camera_fps": args.fps,
        "camera_size": "1280x720",
        "camera_bitrate_kbps": args.bitrate,
        "cost_streams": args.cost_streams,
        "cost_fps": args.cost_fps,
        "count_fps": args.count_fps,
        "count_reader": args.count_reader,
        "moving_every": args.moving_every,
        "still_keyframes": args.still_keyframes,
        "still_period_s": round(still_period_s(args, args.still_keyframes), 2),
        "min_fps": args.min_fps,
        "p99_ms": args.p99_ms,
        "warmup_s": args.warmup,
        "window_s": args.seconds,
        "count_window_s": args.count_seconds,
        "before": str(args.before) if args.before else None,
    }


def still_note(s: dict[str, Any]) -> str:
    """What the count runs asked of the still cameras (settings(), --moving-every > 1)."""
    if s["moving_every"] <= 1:
        return ""
    how = " (gate.still_keyframes: keyframes only while still)" if s["still_keyframes"] else ""
    return (
        f" 1 camera in {s['moving_every']} moves; each still one is inferred at least every "
        f"{s['still_period_s']:g} s{how}."
    )


def fmt(x: Any, nd: int = 0) -> str:
    return bm.fmt(x, nd)


def markdown(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    out = [
        f"Measured {res['started']} on {m['cpus']} cores ({m['cpu']}), load average at "
        f"start {', '.join(str(x) for x in m['load_at_start'])}; {s['model']} "
        f"({s['backend']}); cameras {s['camera_size']} H.264 at {s['camera_fps']:g} fps, "
        f"{s['camera_bitrate_kbps']} kbit/s, pre-encoded.",
        "",
        "```",
        res["command"],
        "```",
        "",
    ]
    if res["cost"]:
        out += [
            f"Cost: {s['cost_streams']} cameras, each inferred at {s['cost_fps']:g} fps, no "
            f"viewers; {s['window_s']:g} s windows. Cores of the service process; per "
            "camera = (service - model workers - render) / cameras.",
            "",
            "| code | reader | cameras | service cores | model workers | reader threads "
            "| native threads | per camera | decode ms | convert ms | converted | "
            "others' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["cost"]:
            th, st = r["threads"], r["stage_ms"]
            out.append(
                f"| {r['code']} | {r['reader']} | {r['streams']} | "
                f"{r['cpu_cores']['service']:.3f} | {th.get('model workers', 0):.3f} | "
                f"{th.get('reader threads', 0):.3f} | {th.get('native threads', 0):.3f} | "
                f"**{r['per_camera_cores']:.4f}** | {fmt(st.get('decode'), 2)} | "
                f"{fmt(st.get('convert'), 2)} | {r['converted_share']:.0%} | "
                f"{r['cpu_cores'].get('other', 0):.2f} |"
            )
        out.append("")
    if res.get("transport"):
        out += [
            "Transport: one camera, a bare reader in the harness process, every frame "
            "converted; age of each frame (pixel stamp) when the reader hands it over.",
            "",
            "| reader | frames | p50 ms | p95 ms | p99 ms | min ms | harness CPU | others' CPU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["transport"]:
            out.append(
                f"| {r['reader']} | {r['frames']} | {fmt(r['p50_ms'])} | "
                f"{fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['min_ms'])} | "
                f"{r['cpu_cores'].get('harness', 0):.2f} | "
                f"{r['cpu_cores'].get('other', 0):.2f} |"
            )
        out.append("")
    if res["count"]:
        out += [
            f"Count: cameras at {s['count_fps']:g} inferences/s each, reader "
            f"{s['count_reader']}, an MJPEG viewer per camera; holds when every stream "
            f">= {s['min_fps']:g} segmented fps and p99 <= {s['p99_ms']:g} ms (glass to "
            f"glass); {s['count_window_s']:g} s windows.{still_note(s)}",
            "",
            "| cameras | fps total | min fps / stream | p50 ms | p95 ms | p99 ms | service "
            "cores | machine cores | others' CPU | undecoded | fewest still inferences "
            "| peak RSS MB | holds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["count"]:
            c = r["cpu_cores"]
            out.append(
                f"| {r['streams']} | {r['fps_total']:.1f} | {r['fps_min_stream']:.2f} | "
                f"{fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | "
                f"{c['service']:.2f} | {c['machine']:.2f} | {c.get('other', 0):.2f} | "
                f"{r['undecoded_share']:.0%} | {fmt(r['still_inferred_min'])} | "
                f"{fmt(r['peak_rss_mb'])} | {'yes' if r['holds'] else 'no'} |"
            )
        out += ["", f"Largest count that holds: {fmt(res.get('largest_count'))}."]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (~2 min)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "cameras")
    ap.add_argument("--model", default="mnv2-voc")
    ap.add_argument("--backend", default="tflite")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--clip", type=Path, default=None)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--bitrate", type=int, default=2000)
    ap.add_argument(
        "--cycle",
        type=float,
        default=20.0,
        help="seconds of pre-encoded video per camera (> any latency)",
    )
    ap.add_argument("--readers", type=_names, default=["opencv", "pyav", "gst"])
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another source tree to measure the cost on (e.g. the commit before)",
    )
    ap.add_argument("--before-readers", type=_names, default=["opencv", "pyav"])
    ap.add_argument("--cost-streams", type=int, default=8)
    ap.add_argument("--cost-fps", type=float, default=0.5)
    ap.add_argument("--transport-readers", type=_names, default=["opencv", "pyav", "gst"])
    ap.add_argument("--transport-seconds", type=float, default=15.0)
    ap.add_argument("--counts", type=bm.parse_list, default=[16])
    ap.add_argument("--count-fps", type=float, default=1.1)
    ap.add_argument("--count-reader", default="gst")
    ap.add_argument(
        "--moving-every",
        type=int,
        default=1,
        help="cameras 0, K, 2K, ... move; the others show a still frame (4: 3 of 4 still)",
    )
    ap.add_argument(
        "--still-keyframes",
        action="store_true",
        help="count runs: streams set gate.still_keyframes (a still camera decodes keyframes "
        "only); a still camera then needs an inference every refresh_s + one keyframe interval",
    )
    ap.add_argument("--search", action="store_true", help="grow the count while it holds")
    ap.add_argument("--step", type=int, default=4)
    ap.add_argument("--max-count", type=int, default=40)
    ap.add_argument("--min-fps", type=float, default=1.0)
    ap.add_argument("--p99-ms", type=float, default=1500.0)
    ap.add_argument("--warmup", type=float, default=6.0)
    ap.add_argument("--seconds", type=float, default=20.0, help="cost window")
    ap.add_argument("--count-seconds", type=float, default=30.0, help="count window")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--idle-wait", type=float, default=120.0)
    return ap


def _names(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.quick:
        args.cost_streams, args.readers, args.counts, args.search = 2, ["opencv"], [2], False
        args.transport_readers, args.transport_seconds = ["opencv"], 3.0
        args.warmup, args.seconds, args.count_seconds, args.cycle = 2.0, 5.0, 6.0, 10.0
        args.idle_wait, args.retries = min(args.idle_wait, 5.0), 0
    args.command_line = "python scripts/bench_cameras.py " + shlex.join(argv)
    args.reader = args.count_reader  # service_config's default
    args.cycle_ms = args.cycle_frames = 0
    if args.clip is None:
        from segstream.models.fetch import NotFetchedError, sample_path

        try:
            args.clip = sample_path("vtest")
        except NotFetchedError as e:
            print(f"bench_cameras: {e}", file=sys.stderr)
            return 2
    args.out = args.out.resolve()  # the service may run from another tree
    args.out.mkdir(parents=True, exist_ok=True)
    res = asyncio.run(orchestrate(args))
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    (args.out / "results.md").write_text(markdown(res))
    print(markdown(res), file=sys.stderr)
    print(json.dumps(res["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
