"""Measuring processes: CPU cores by process and by thread, peak memory, an idle machine,
and starting/stopping the peers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benchlib.common import log

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
