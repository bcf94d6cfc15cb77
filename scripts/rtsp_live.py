#!/usr/bin/python3
"""Live stamping cameras for the benchmark: an RTSP server on loopback whose mounts encode
frames the moment they are "captured", each carrying its capture time in the pixels.

Runs with Debian's system Python (python3-gi + gir1.2-gst-rtsp-server-1.0), not the venv:

    /usr/bin/python3 scripts/rtsp_live.py --clip vtest.avi --streams 4 --fps 15 --port 0

Each mount /cam0, /cam1, ... plays a background clip (decoded once by ffmpeg to 1280x720 I420,
looped, each mount at a different offset) as H.264 (x264 zerolatency, ultrafast, no B-frames)
over RTSP, each frame carrying its send time in the pixels (scripts/stamp.py), so the
benchmark's latency runs from "capture" to the viewer, including transport and decode.

--encode pre (default): a real camera encodes on its own chip, not on the server's CPU. So
every mount's frames for one cycle (--cycle seconds) are encoded up front, each stamped with
the time it will be sent: E + k/fps for frame k of the cycle, E being the start of cycle 0.
A pacing thread per mount pushes frame k at E + k/fps (+ whole cycles) through appsrc ->
h264parse -> rtph264pay, so a stamp read n cycles later is n cycles old: a receiver takes the
age modulo the cycle (`cycle_ms`, printed at start). A late tick is pushed late, never skipped
(the stamp then shows the lateness; skipping would break the P-frame chain), and counted.
--encode live: x264enc encodes each frame when pushed and stamps the push time (the camera's
encoder then shares the CPU with the service: ~0.06 cores per 720p camera at 15 fps).

Like a camera, a mount sends every frame whoever watches: a viewer too slow for TCP loses
encoded frames (a leaky queue before the payloader), it never slows the source. Prints
`cycle_ms N frames K` (0 0 when live), `listening rtsp://...` per mount, then `READY`; on
SIGTERM/SIGINT prints one JSON line of per-mount counts and exits.
"""

from __future__ import annotations

import argparse
import json
import re
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
        "ffmpeg",
        "-v",
        "error",
        "-stream_loop",
        "-1",
        "-i",
        path,
        "-vf",
        f"scale={width}:{height},fps={fps}",
        "-frames:v",
        str(frames),
        "-pix_fmt",
        "yuv420p",
        "-f",
        "rawvideo",
        "-",
    ]
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    out = [raw[i : i + size] for i in range(0, len(raw) - size + 1, size)]
    if not out:
        raise SystemExit(f"ffmpeg decoded no frames from {path}")
    return out


def encode_cycle(
    clip: list[bytes],
    offset: int,
    frames: int,
    epoch_ms: int,
    args: argparse.Namespace,
    still: bool = False,
) -> list[bytes]:
    """`frames` stamped frames of the clip (from `offset`) as H.264 access units (x264 via
    ffmpeg, the same settings as the live encoder; an AUD starts each unit). `still`: frame
    `offset` every time and no stamp (a camera on a scene where nothing moves)."""
    cmd = [
        "ffmpeg",
        "-v",
        "error",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-s",
        f"{args.width}x{args.height}",
        "-r",
        str(args.fps),
        "-i",
        "-",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-bf",
        "0",
        "-g",
        str(args.gop),
        "-keyint_min",
        str(args.gop),
        "-sc_threshold",
        "0",
        "-b:v",
        f"{args.bitrate}k",
        "-maxrate",
        f"{args.bitrate}k",
        "-bufsize",
        f"{args.bitrate // 2}k",
        "-x264-params",
        "aud=1:sliced-threads=0",
        "-f",
        "h264",
        "-",
    ]
    enc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def feed() -> None:
        assert enc.stdin is not None
        for k in range(frames):
            if still:
                enc.stdin.write(clip[offset % len(clip)])
                continue
            frame = bytearray(clip[(offset + k) % len(clip)])
            t_ms = (epoch_ms + round(k * 1000 / args.fps)) % (1 << stamp.TIME_BITS)
            stamp.stamp_i420(frame, args.width, args.height, k + 1, t_ms)
            enc.stdin.write(frame)
        enc.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    assert enc.stdout is not None
    stream = enc.stdout.read()
    feeder.join()
    if enc.wait() != 0:
        raise SystemExit("ffmpeg could not encode the camera cycle")
    # One slice per frame (no sliced threads), as the live encoder: the payloader repeats
    # SPS/PPS before every IDR slice (config-interval=-1), and FFmpeg's RTSP client took SPS
    # between two slices for the start of a new frame, outputting half keyframes. Split at the
    # AUDs, then drop them; SPS/PPS come once, in unit 0.
    aud = b"\x00\x00\x00\x01\x09"
    units = [u[1:] for u in stream.split(aud)[1:]]  # u[0]: the AUD's one payload byte
    if not all(u.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")) for u in units):
        raise SystemExit("unexpected H.264 from ffmpeg: no start code after an AUD")
    if len(units) != frames:
        raise SystemExit(f"encoded {len(units)} access units for {frames} frames")
    return units


def parameter_sets(unit: bytes) -> bytes:
    """The SPS and PPS NAL units (with start codes) of an access unit."""
    nals = re.split(b"\x00\x00\x01", unit)[1:]
    return b"".join(
        b"\x00\x00\x00\x01" + n.rstrip(b"\x00") for n in nals if n and n[0] & 0x1F in (7, 8)
    )


class LiveCamera:
    """One mount: a shared media whose appsrc is fed by a pacing thread while it exists."""

    def __init__(
        self,
        path: str,
        clip: list[bytes],
        offset: int,
        args: argparse.Namespace,
        units: list[bytes] | None = None,
        epoch: float = 0.0,
    ):
        self.path = path
        self.clip = clip
        self.offset = offset
        self.units = units  # pre-encoded cycle (--encode pre), else None
        self.headers = parameter_sets(units[0]) if units else b""
        self.epoch = epoch  # monotonic seconds at which frame 0 of cycle 0 is sent
        self.width, self.height, self.fps = args.width, args.height, args.fps
        self.bitrate, self.gop = args.bitrate, args.gop
        self.seq = 0
        self.pushed = 0
        self.late = 0
        self._stop: threading.Event | None = None

    def factory(self) -> GstRtspServer.RTSPMediaFactory:
        num, den = Gst.util_double_to_fraction(self.fps)
        caps = (
            f"video/x-raw,format=I420,width={self.width},height={self.height},framerate={num}/{den}"
        )
        if self.units is None:
            encode = (
                f"! x264enc tune=zerolatency speed-preset=ultrafast bitrate={self.bitrate} "
                f"key-int-max={self.gop} bframes=0 threads=1 "
            )
        else:
            caps = (
                f"video/x-h264,stream-format=byte-stream,alignment=au,width={self.width},"
                f"height={self.height},framerate={num}/{den}"
            )
            encode = "! h264parse "
        # The GOP a new media gets at once must fit in appsrc's queue while the media is
        # starting, or its keyframe is dropped first.
        queue = 2 if self.units is None else 2 * self.gop
        launch = (
            f'( appsrc name=src is-live=true format=time do-timestamp=true caps="{caps}" '
            f"max-buffers={queue} leaky-type=downstream {encode}"
            # A camera never slows down for a slow viewer: when the client falls behind and
            # TCP backs up, encoded frames are dropped here (oldest first), the source runs on.
            "! queue leaky=downstream max-size-buffers=30 max-size-bytes=0 max-size-time=0 "
            "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
        )
        f = GstRtspServer.RTSPMediaFactory()
        f.set_launch(launch)
        f.set_shared(True)
        f.connect("media-configure", self._configure)
        return f

    def _configure(
        self, _factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia
    ) -> None:
        src = media.get_element().get_by_name("src")
        if self._stop is not None:
            self._stop.set()
        stop = self._stop = threading.Event()
        media.connect("unprepared", lambda *_: stop.set())
        pump = self._pump if self.units is None else self._pump_encoded
        threading.Thread(
            target=pump, args=(src, stop), daemon=True, name=f"pump{self.path}"
        ).start()

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

    def _pump_encoded(self, src: Gst.Element, stop: threading.Event) -> None:
        """Frame k of the cycle at epoch + (c * K + k) / fps. A new media first gets the
        current GOP at once, from its keyframe on (a media server's GOP cache), so a viewer
        starts at once instead of up to a GOP later; its first unit carries the SPS/PPS."""
        assert self.units is not None
        period, k_all = 1.0 / self.fps, len(self.units)
        n = int((time.monotonic() - self.epoch) / period)
        n -= n % self.gop
        first = True
        while not stop.is_set():
            due = self.epoch + n * period
            now = time.monotonic()
            if now < due:
                stop.wait(due - now)
                continue
            if now - due > period and self.pushed:
                self.late += 1  # pushed late, not skipped: its stamp shows the delay
            unit = self.units[n % k_all]
            if first and n % k_all:
                unit = self.headers + unit
            first = False
            ret = src.emit("push-buffer", Gst.Buffer.new_wrapped(unit))
            if ret != Gst.FlowReturn.OK:
                return
            self.pushed += 1
            n += 1

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
    ap.add_argument(
        "--encode",
        choices=["pre", "live"],
        default="pre",
        help="pre: encoded up front, as by the camera's own chip; live: x264 here",
    )
    ap.add_argument(
        "--cycle",
        type=float,
        default=64.0,
        help="seconds of pre-encoded video per mount, looped (> any latency)",
    )
    ap.add_argument(
        "--moving-every",
        type=int,
        default=1,
        help="--encode pre: mounts 0, K, 2K, ... play the clip; the others show one still "
        "frame, unstamped (a site where most cameras watch a scene where nothing moves)",
    )
    args = ap.parse_args(argv)
    if args.streams < 1 or args.fps <= 0 or args.width % 16 or args.height % 16:
        ap.error("need --streams >= 1, --fps > 0 and a width/height that are multiples of 16")

    Gst.init(None)
    clip = load_clip(args.clip, args.width, args.height, args.fps, args.clip_frames)
    offsets = [i * len(clip) // args.streams for i in range(args.streams)]
    cycle_ms, frames, units, epoch = 0, 0, [None] * args.streams, 0.0
    if args.encode == "pre":
        frames = args.gop * max(1, round(args.cycle * args.fps / args.gop))
        cycle_ms = frames * 1000 / args.fps
        if cycle_ms != int(cycle_ms):
            ap.error("--encode pre needs a cycle of a whole number of milliseconds")
        cycle_ms = int(cycle_ms)
        epoch = int(time.monotonic() * 1000) / 1000  # on the stamp clock's millisecond grid
        epoch_ms = round(epoch * 1000) % (1 << stamp.TIME_BITS)
        units = [
            encode_cycle(clip, off, frames, epoch_ms, args, i % args.moving_every != 0)
            for i, off in enumerate(offsets)
        ]
    cams = [
        LiveCamera(f"/cam{i}", clip, offsets[i], args, units[i], epoch) for i in range(args.streams)
    ]
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
    print(f"cycle_ms {cycle_ms} frames {frames}", flush=True)
    for cam in cams:
        print(f"listening rtsp://{args.host}:{port}{cam.path}", flush=True)
    print("READY", flush=True)
    loop.run()
    print(json.dumps({c.path: c.stats() for c in cams}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
