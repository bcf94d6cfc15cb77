#!/usr/bin/env python
"""Encode CPU of the RTSP re-stream: one 1280x720 stream fed at 15 fps into a RestreamSink
publishing to FFmpeg listening on loopback (`-rtsp_flags listen`, copying to null).
With --latency: glass-to-glass latency through the re-stream (see `latency`).

The figure is the CPU time of the sink's own thread (time.thread_time: BGR->I420, libx264 with
one thread, RTP packetising, socket writes) per second of video; put() is the render thread's
cost (one copy). Prints one JSON line per preset:
  python scripts/bench_restream.py --seconds 20 [--presets ultrafast veryfast] [--fps 15]

--latency: one stamped live camera (scripts/rtsp_live.py, pre-encoded 720p15 H.264 stamped
with its send time, scripts/stamp.py) -> `segstream serve --state none` (overlay alpha 0.5 +
legend, as scripts/benchmark.py: the stamp cells stay readable) with `restream:` pointing at
FFmpeg listening on loopback (`-fflags nobuffer -flags low_delay`), decoding to raw luma on a
pipe. Each frame's age at arrival (CLOCK_MONOTONIC now - stamp, same machine) is recorded,
and, from the same run, that of each part of GET /streams/cam0/mjpeg. Prints one JSON line:
  python scripts/bench_restream.py --latency --seconds 20 [--preset ultrafast]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import stamp

from segstream.stream.datatypes import Rendered
from segstream.stream.restream import RestreamSink

SHARED = Path(os.environ.get("SEGSTREAM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VIDEO = SHARED / "data" / "video" / "vtest.avi"


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


def run(
    preset: str, clip: list[np.ndarray], seconds: float, fps: float, bitrate: int
) -> dict[str, object]:
    port = free_port()
    url = f"rtsp://127.0.0.1:{port}/bench"
    rx = subprocess.Popen(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-rtsp_flags",
            "listen",
            "-i",
            url,
            "-c",
            "copy",
            "-f",
            "null",
            "-",
        ],
        stdin=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # the sink retries anyway if FFmpeg listens late
    sink = RestreamSink(
        "bench",
        url,
        encoder="libx264",
        preset=preset,
        bitrate_kbps=bitrate,
        reconnect_initial=0.2,
        reconnect_max=0.5,
    )
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


def listener(url: str, width: int, height: int) -> subprocess.Popen:
    """FFmpeg as the RTSP server the sink publishes to, decoding with no buffering and no frame
    threading (low_delay) to raw 8-bit luma on stdout, one frame per width*height bytes.
    (Its "non monotonically increasing dts" messages: passthrough timestamps rounded to the
    muxer's time base; the frame is still written.)"""
    return subprocess.Popen(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-fflags",
            "nobuffer",
            "-flags",
            "low_delay",
            "-max_delay",
            "0",
            "-rtsp_flags",
            "listen",
            "-i",
            url,
            "-an",
            "-fps_mode",
            "passthrough",
            "-s",
            f"{width}x{height}",
            "-pix_fmt",
            "gray",
            "-f",
            "rawvideo",
            "-flush_packets",
            "1",
            "-",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        bufsize=0,
    )


def read_raw(rx: subprocess.Popen, rec: benchlib.Recorder, width: int, height: int) -> None:
    """Reads each decoded frame as it arrives; takes the time before decoding the stamp."""
    assert rx.stdout is not None
    size = width * height
    while True:
        buf = bytearray()
        while len(buf) < size:
            chunk = rx.stdout.read(size - len(buf))
            if not chunk:
                return
            buf += chunk
        now = stamp.now_ms()
        rec.total += 1
        if not rec.recording:
            continue
        rec.frames += 1
        code = stamp.read_gray(
            np.frombuffer(bytes(buf), np.uint8).reshape(height, width), width, height
        )
        if code is None:
            rec.unstamped += 1
            continue
        seq, t_ms = code
        lat = float(benchlib.cycle_age_ms(stamp.age_ms(t_ms, now), rec.cycle_ms))
        if rec.first_seq is None:
            rec.first_seq = seq
        rec.last_seq = seq
        rec.seen.add(seq)
        rec.lat_ms.append(lat)


async def latency(args: argparse.Namespace) -> dict[str, object]:
    """One camera -> service -> re-stream -> FFmpeg; the MJPEG client of the same run beside."""
    width, height = 1280, 720
    port, rx_port = free_port(), free_port()
    rx_url = f"rtsp://127.0.0.1:{rx_port}/annotated"
    base = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-restream-"))
    with benchlib.live_cameras(VIDEO, 1, args.fps, args.cam_bitrate) as (urls, _, cyc, frames):
        ns = argparse.Namespace(
            model=args.model,
            backend=args.backend,
            workers=None,
            threads=None,
            max_batch=None,
            max_wait_ms=5.0,
        )
        cfg = tmp / "config.yaml"
        benchlib.service_config(cfg, ns, urls, port)
        import yaml

        conf = yaml.safe_load(cfg.read_text())
        conf["streams"][0]["restream"] = {
            "url": rx_url,
            "encoder": "libx264",
            "bitrate": args.bitrate,
            "preset": args.preset,
        }
        cfg.write_text(yaml.safe_dump(conf, sort_keys=False))
        rx = listener(rx_url, width, height)
        log = open(tmp / "service.log", "w")  # noqa: SIM115
        svc = subprocess.Popen(
            [*benchlib.segstream_cmd(), "serve", "--config", str(cfg), "--state", "none"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        h264 = benchlib.Recorder("restream", cyc, frames or benchlib.SEQ_MOD)
        mjpeg = benchlib.Recorder("mjpeg", cyc, frames or benchlib.SEQ_MOD)
        reader = threading.Thread(target=read_raw, args=(rx, h264, width, height), daemon=True)
        reader.start()
        stop = asyncio.Event()
        client: asyncio.Task | None = None
        try:

            async def ready() -> bool:
                return (await benchlib.http_json(f"{base}/readyz")) is not None

            await benchlib.wait_for(ready, 180, "/readyz", svc)
            client = asyncio.create_task(
                benchlib.mjpeg_client(f"{base}/streams/cam0/mjpeg", mjpeg, stop)
            )

            async def live() -> bool:
                st = await benchlib.http_json(f"{base}/api/streams/cam0")
                return st["state"] == "live" and st["restream"]["state"] == "live"

            await benchlib.wait_for(live, 60, "stream and re-stream live", svc)
            await asyncio.sleep(args.warmup)
            load0 = os.getloadavg()
            t0 = time.monotonic()
            h264.start(t0)
            mjpeg.start(t0)
            await asyncio.sleep(args.seconds)
            h264.recording = mjpeg.recording = False
            dt = time.monotonic() - t0
            if client.done():
                client.result()
            st = await benchlib.http_json(f"{base}/api/streams/cam0")
        finally:
            stop.set()
            if client is not None:
                client.cancel()
                await asyncio.gather(client, return_exceptions=True)
            benchlib.stop_process(svc)
            log.close()
            rx.kill()
            rx.wait()
            reader.join(2)
    out: dict[str, object] = {
        "seconds": round(dt, 1),
        "preset": args.preset,
        "bitrate_kbps": args.bitrate,
        "camera": f"{width}x{height}@{args.fps:g}",
    }
    for name, rec in (("restream", h264), ("mjpeg", mjpeg)):
        summ = rec.summary(dt)
        out[name] = {
            k: summ[k]
            for k in (
                "fps",
                "frames",
                "unstamped",
                "not_shown",
                "camera_frames",
                "p50_ms",
                "p95_ms",
                "p99_ms",
            )
        }
    rs = st["restream"] if st else {}
    out["sink"] = {
        k: rs.get(k) for k in ("encoder", "frames", "dropped", "errors", "sessions", "fps_in")
    }
    out["loadavg_start"] = [round(x, 2) for x in load0]
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--bitrate", type=int, default=2000, help="kbit/s")
    ap.add_argument("--presets", nargs="+", default=["ultrafast", "veryfast"])
    ap.add_argument(
        "--latency",
        action="store_true",
        help="glass-to-glass through camera -> service -> re-stream (one camera)",
    )
    ap.add_argument("--preset", default="ultrafast", help="--latency: the re-stream's preset")
    ap.add_argument("--cam-bitrate", type=int, default=2000, help="--latency: camera kbit/s")
    ap.add_argument("--warmup", type=float, default=8.0, help="--latency: seconds before")
    ap.add_argument("--model", default="mnv2-voc")
    ap.add_argument("--backend", default="tflite")
    args = ap.parse_args()
    if args.latency:
        print(json.dumps(asyncio.run(latency(args))), flush=True)
        return
    cv2.setNumThreads(1)  # as in the service
    clip = frames(150)
    for preset in args.presets:
        print(json.dumps(run(preset, clip, args.seconds, args.fps, args.bitrate)), flush=True)


if __name__ == "__main__":
    main()
