"""The run's report: machine and settings, the README table, results.md and the chart."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchlib.common import log


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


def write_report(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    chart(res, out / "benchmark.png")
    log(f"wrote {out}/results.json, results.md, benchmark.png")


def raw_best(raw: dict) -> str:
    return raw.get("best", str(raw["best_batch"]))  # results.json files from before layouts


def raw_label(raw: dict) -> str:
    r = raw["batches"][raw_best(raw)]
    if r.get("workers", 1) > 1:
        return f"batch {r['batch']} x {r['workers']} copies of {r['threads']} thread(s)"
    return f"batch {raw['best_batch']}"
