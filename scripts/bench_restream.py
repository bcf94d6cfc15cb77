#!/usr/bin/env python
"""Encode CPU of the RTSP re-stream: one 1280x720 stream fed at 15 fps into a RestreamSink
publishing to FFmpeg listening on loopback (`-rtsp_flags listen`, copying to null).

The figure is the CPU time of the sink's own thread (time.thread_time: BGR->I420, libx264 with
one thread, RTP packetising, socket writes) per second of video; put() is the render thread's
cost (one copy). Prints one JSON line per preset:
  python scripts/bench_restream.py --seconds 20 [--presets ultrafast veryfast] [--fps 15]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.datatypes import Rendered
from stream.restream import RestreamSink

VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "vtest.avi"


def frames(n: int, w: int = 1280, h: int = 720) -> list[np.ndarray]:
    """Real frames of the sample video scaled to 720p (noise when the video is missing)."""
    cap = cv2.VideoCapture(str(VIDEO))
    out = []
    while len(out) < n:
        ok, img = cap.read()
        if not ok:
            break
        out.append(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
    if not out:
        rng = np.random.default_rng(0)
        out = [rng.integers(0, 256, (h, w, 3), np.uint8) for _ in range(n)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(preset: str, clip: list[np.ndarray], seconds: float, fps: float,
        bitrate: int) -> dict[str, object]:
    port = free_port()
    url = f"rtsp://127.0.0.1:{port}/bench"
    rx = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-rtsp_flags", "listen", "-i", url,
         "-c", "copy", "-f", "null", "-"], stdin=subprocess.DEVNULL)
    time.sleep(0.5)  # the sink retries anyway if FFmpeg listens late
    sink = RestreamSink("bench", url, encoder="libx264", preset=preset, bitrate_kbps=bitrate,
                        reconnect_initial=0.2, reconnect_max=0.5)
    sink.start()
    puts = []
    try:
        t0 = time.monotonic()
        i = 0
        while sink.status()["state"] != "live" and time.monotonic() - t0 < 10:
            sink.put(Rendered("bench", clip[0], 0, 0.0, 80))  # connect first, then measure
            time.sleep(1 / fps)
        cpu0, frames0, bytes0 = (sink.status()[k] for k in ("cpu_s", "frames", "bytes"))
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            t = time.perf_counter()
            sink.put(Rendered("bench", clip[i % len(clip)], i, now, 80))
            puts.append(time.perf_counter() - t)
            i += 1
            time.sleep(max(0.0, start + i / fps - time.monotonic()))
        time.sleep(0.2)
        st = sink.status()
        video_s = time.monotonic() - start
    finally:
        sink.close()
        rx.kill()
        rx.wait()
    cpu = float(st["cpu_s"]) - float(cpu0)
    sent = int(st["frames"]) - int(frames0)
    return {
        "preset": preset,
        "size": f"{clip[0].shape[1]}x{clip[0].shape[0]}",
        "fps": fps,
        "frames_sent": sent,
        "dropped": st["dropped"],
        "cpu_s_per_video_s": round(cpu / video_s, 3),
        "cpu_ms_per_frame": round(cpu / max(sent, 1) * 1000, 2),
        "kbit_s": round((int(st["bytes"]) - int(bytes0)) * 8 / video_s / 1000),
        "put_median_ms": round(statistics.median(puts) * 1000, 3),
        "errors": st["errors"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--bitrate", type=int, default=2000, help="kbit/s")
    ap.add_argument("--presets", nargs="+", default=["ultrafast", "veryfast"])
    args = ap.parse_args()
    cv2.setNumThreads(1)  # as in the service
    clip = frames(150)
    for preset in args.presets:
        print(json.dumps(run(preset, clip, args.seconds, args.fps, args.bitrate)), flush=True)


if __name__ == "__main__":
    main()
