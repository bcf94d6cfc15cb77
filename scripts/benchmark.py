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
import json
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib/, beside this file
from benchlib.common import REPO, parse_list
from benchlib.latency import cycle_age_ms  # noqa: F401 (tests import it from here)
from benchlib.model import cmd_naive, cmd_raw
from benchlib.orchestrate import check_targets, orchestrate, summary
from benchlib.report import markdown, write_report


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
