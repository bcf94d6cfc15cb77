#!/usr/bin/python3
"""Live stamping cameras for the benchmark: an RTSP server on loopback whose mounts encode
frames the moment they are "captured", each carrying its capture time in the pixels.

Runs with Debian's system Python (python3-gi + gir1.2-gst-rtsp-server-1.0), not the venv:

    /usr/bin/python3 scripts/rtsp_live.py --clip vtest.avi --streams 4 --fps 15 --port 0

Each mount /cam0, /cam1, ... plays a background clip (decoded once by ffmpeg to 1280x720 I420,
looped, each mount at a different offset) through appsrc -> x264enc (zerolatency, ultrafast,
no B-frames) -> rtph264pay. One pacing thread per mount pushes a frame every 1/fps seconds and
stamps it (scripts/stamp.py) with the push time, so the benchmark's latency runs from "capture"
to the viewer, including H.264 encode, RTSP transport and decode. A tick that comes more than a
frame late is skipped, as a real camera would, and counted. Like a camera, a mount encodes every
frame whoever watches: a viewer too slow for TCP loses encoded frames, it never slows the source.
Prints `listening rtsp://...` per mount, then `READY`; on SIGTERM/SIGINT prints one JSON line of
per-mount counts and exits.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stamp  # noqa: E402


def load_clip(path: str, width: int, height: int, fps: float, frames: int) -> list[bytes]:
    """The clip's first `frames` frames as I420 at width x height, resampled to fps."""
    size = width * height * 3 // 2
    cmd = [
        "ffmpeg", "-v", "error", "-stream_loop", "-1", "-i", path,
        "-vf", f"scale={width}:{height},fps={fps}", "-frames:v", str(frames),
        "-pix_fmt", "yuv420p", "-f", "rawvideo", "-",
    ]
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    out = [raw[i:i + size] for i in range(0, len(raw) - size + 1, size)]
    if not out:
        raise SystemExit(f"ffmpeg decoded no frames from {path}")
    return out


class LiveCamera:
    """One mount: a shared media whose appsrc is fed by a pacing thread while it exists."""

    def __init__(self, path: str, clip: list[bytes], offset: int, args: argparse.Namespace):
        self.path = path
        self.clip = clip
        self.offset = offset
        self.width, self.height, self.fps = args.width, args.height, args.fps
        self.bitrate, self.gop = args.bitrate, args.gop
        self.seq = 0
        self.pushed = 0
        self.late = 0
        self._stop: threading.Event | None = None

    def factory(self) -> GstRtspServer.RTSPMediaFactory:
        num, den = Gst.util_double_to_fraction(self.fps)
        caps = (f"video/x-raw,format=I420,width={self.width},height={self.height},"
                f"framerate={num}/{den}")
        launch = (
            f'( appsrc name=src is-live=true format=time do-timestamp=true caps="{caps}" '
            "max-buffers=2 leaky-type=downstream "
            f"! x264enc tune=zerolatency speed-preset=ultrafast bitrate={self.bitrate} "
            f"key-int-max={self.gop} bframes=0 threads=1 "
            # A camera never slows down for a slow viewer: when the client falls behind and
            # TCP backs up, encoded frames are dropped here (oldest first), the encoder runs on.
            "! queue leaky=downstream max-size-buffers=30 max-size-bytes=0 max-size-time=0 "
            "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
        )
        f = GstRtspServer.RTSPMediaFactory()
        f.set_launch(launch)
        f.set_shared(True)
        f.connect("media-configure", self._configure)
        return f

    def _configure(self, _factory: GstRtspServer.RTSPMediaFactory,
                   media: GstRtspServer.RTSPMedia) -> None:
        src = media.get_element().get_by_name("src")
        if self._stop is not None:
            self._stop.set()
        stop = self._stop = threading.Event()
        media.connect("unprepared", lambda *_: stop.set())
        threading.Thread(target=self._pump, args=(src, stop), daemon=True,
                         name=f"pump{self.path}").start()

    def _pump(self, src: Gst.Element, stop: threading.Event) -> None:
        period = 1.0 / self.fps
        next_t = time.monotonic()
        k = self.offset
        while not stop.is_set():
            now = time.monotonic()
            if now < next_t:
                stop.wait(next_t - now)
                continue
            if now - next_t > period:  # fell behind by a frame: skip ticks, stay real-time
                missed = int((now - next_t) / period)
                self.late += missed
                next_t += missed * period
            next_t += period
            frame = bytearray(self.clip[k % len(self.clip)])
            k += 1
            self.seq = (self.seq + 1) % (1 << stamp.SEQ_BITS)
            stamp.stamp_i420(frame, self.width, self.height, self.seq, stamp.now_ms())
            ret = src.emit("push-buffer", Gst.Buffer.new_wrapped(bytes(frame)))
            if ret != Gst.FlowReturn.OK:
                return  # flushing / media torn down
            self.pushed += 1

    def stats(self) -> dict[str, int]:
        return {"pushed": self.pushed, "late": self.late}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8555, help="0 = any free port")
    ap.add_argument("--clip", required=True, help="background video (any format ffmpeg reads)")
    ap.add_argument("--streams", type=int, default=1, help="mounts /cam0 ... /cam{N-1}")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--bitrate", type=int, default=2000, help="kbit/s per camera")
    ap.add_argument("--gop", type=int, default=30, help="frames between keyframes")
    ap.add_argument("--clip-frames", type=int, default=120, help="frames of the clip to loop")
    args = ap.parse_args(argv)
    if args.streams < 1 or args.fps <= 0 or args.width % 16 or args.height % 16:
        ap.error("need --streams >= 1, --fps > 0 and a width/height that are multiples of 16")

    Gst.init(None)
    clip = load_clip(args.clip, args.width, args.height, args.fps, args.clip_frames)
    cams = [LiveCamera(f"/cam{i}", clip, i * len(clip) // args.streams, args)
            for i in range(args.streams)]
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    points = server.get_mount_points()
    for cam in cams:
        points.add_factory(cam.path, cam.factory())
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    port = server.get_bound_port()
    for cam in cams:
        print(f"listening rtsp://{args.host}:{port}{cam.path}", flush=True)
    print("READY", flush=True)
    loop.run()
    print(json.dumps({c.path: c.stats() for c in cams}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
