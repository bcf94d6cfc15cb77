"""The benchmark's parts (scripts/benchmark.py is the command line over them): measuring
processes (`procs`), latency from the picture (`latency`), the model alone and the naive loop
(`model`), the service under load (`service`), one full run (`orchestrate`) and its report
(`report`). The other bench_*.py scripts import these helpers as `benchlib` too."""

from __future__ import annotations

from benchlib.common import OTHER_MAX, REPO, SEQ_MOD, log, parse_list
from benchlib.latency import Recorder, camera_recorder, combine, cycle_age_ms, pcts
from benchlib.procs import (
    CpuMeter,
    cpu_by_thread,
    free_port,
    machine_busy,
    peak_rss_mb,
    stop_process,
    thread_cpu,
    thread_names,
    wait_idle,
)
from benchlib.report import fmt, machine_info
from benchlib.service import (
    http_json,
    http_text,
    live_cameras,
    mjpeg_client,
    parse_metrics,
    segstream_cmd,
    service_config,
    service_figures,
    wait_for,
)

__all__ = [
    "OTHER_MAX",
    "REPO",
    "SEQ_MOD",
    "CpuMeter",
    "Recorder",
    "camera_recorder",
    "combine",
    "cpu_by_thread",
    "cycle_age_ms",
    "fmt",
    "free_port",
    "http_json",
    "http_text",
    "live_cameras",
    "log",
    "machine_busy",
    "machine_info",
    "mjpeg_client",
    "parse_list",
    "parse_metrics",
    "pcts",
    "peak_rss_mb",
    "segstream_cmd",
    "service_config",
    "service_figures",
    "stop_process",
    "thread_cpu",
    "thread_names",
    "wait_for",
    "wait_idle",
]
