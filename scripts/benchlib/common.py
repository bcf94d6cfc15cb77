"""Shared by the benchmark's modules: paths, the pixel stamp and the log line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "scripts" / "benchmark.py"  # its subcommands run the model-only parts
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import stamp  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"  # has gi + GstRtspServer (Debian packages)
SEQ_MOD = 1 << stamp.SEQ_BITS
OTHER_MAX = 0.15  # cores used by other jobs during a window above which a run is repeated


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()] if s else []
