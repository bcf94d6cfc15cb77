#!/usr/bin/python3
"""A real RTSP server on loopback for tests and benchmarks (gst-rtsp-server).

Runs with Debian's system Python (python3-gi + gir1.2-gst-rtsp-server-1.0), not the venv:

    /usr/bin/python3 scripts/rtsp_server.py --port 8554 --mount /cam=clip.h264 [--mount ...]

Each `--mount /NAME=FILE` serves FILE, an H.264 Annex-B elementary stream without B-frames
(`ffmpeg -i IN -c:v libx264 -bf 0 -g 10 -f h264 FILE`), looped forever and paced in real time
at the clip's own frame rate (from the SPS, or `--fps`). Clients of one mount share one
pipeline. Prints one `listening rtsp://...` line per mount, then `READY`, on stdout; exits
cleanly on SIGTERM/SIGINT.

Each `--record /NAME=FILE` takes published H.264 instead (RTSP ANNOUNCE/RECORD, as MediaMTX
does) and appends what it receives to FILE as an Annex-B stream. `--auth USER:PASS` asks every
client for these credentials (`--auth-method digest` or `basic`).

New mount kinds (e.g. a live appsrc -> x264enc source that stamps the send time into each
frame) plug in as another `Mount` subclass and another command-line option; see MOUNT_KINDS.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
gi.require_version("GstRtsp", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


class Mount:
    """One mount point: a path and a media factory that builds its pipeline."""

    def __init__(self, path: str) -> None:
        if not path.startswith("/") or len(path) < 2:
            raise ValueError(f"mount path must look like /name, got {path!r}")
        self.path = path

    def factory(self) -> GstRtspServer.RTSPMediaFactory:
        raise NotImplementedError


class FileMount(Mount):
    """Loops an H.264 Annex-B file; h264parse times it at the clip's rate, the sinks pace it."""

    def __init__(self, path: str, file: Path, fps: float | None) -> None:
        super().__init__(path)
        if not file.is_file():
            raise ValueError(f"{file}: no such file")
        self.file = file.resolve()
        self.fps = fps

    def launch(self) -> str:
        caps = "video/x-h264,stream-format=byte-stream"
        if self.fps:
            num, den = Gst.util_double_to_fraction(self.fps)
            caps += f",framerate={num}/{den}"
        location = str(self.file).replace("\\", "\\\\").replace('"', '\\"')
        # config-interval=-1: SPS/PPS before every IDR, so clients that join a shared
        # pipeline mid-stream can start decoding at the next keyframe.
        return (
            f'( multifilesrc location="{location}" loop=true caps="{caps}" '
            "! h264parse name=parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
        )

    def factory(self) -> GstRtspServer.RTSPMediaFactory:
        f = GstRtspServer.RTSPMediaFactory()
        f.set_launch(self.launch())
        f.set_shared(True)
        f.connect("media-configure", self._configure)
        return f

    @staticmethod
    def _configure(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia):
        parse = media.get_element().get_by_name("parse")
        parse.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, _pts_from_dts)


class RecordMount(Mount):
    """Takes a published H.264 stream (RECORD) and appends it to a file, SPS/PPS in-band."""

    def __init__(self, path: str, file: Path) -> None:
        super().__init__(path)
        self.file = file.resolve()

    def factory(self) -> GstRtspServer.RTSPMediaFactory:
        location = str(self.file).replace("\\", "\\\\").replace('"', '\\"')
        f = GstRtspServer.RTSPMediaFactory()
        f.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        f.set_launch(
            "( rtph264depay name=depay0 ! h264parse config-interval=-1 "
            "! video/x-h264,stream-format=byte-stream,alignment=au "
            f'! filesink location="{location}" append=true sync=false async=false )'
        )
        return f


def _pts_from_dts(_pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
    """Annex-B carries no timestamps and h264parse only interpolates DTS; without B-frames
    PTS == DTS, and the payloader and the clock-synced sinks need a PTS."""
    buf = info.get_buffer()
    if buf is not None and buf.pts == Gst.CLOCK_TIME_NONE:
        buf.pts = buf.dts
    return Gst.PadProbeReturn.OK


def _parse_file_mount(spec: str, fps: float | None) -> Mount:
    path, sep, file = spec.partition("=")
    if not sep or not file:
        raise ValueError(f"--mount wants /NAME=FILE, got {spec!r}")
    return FileMount(path, Path(file), fps)


def _parse_record_mount(spec: str) -> Mount:
    path, sep, file = spec.partition("=")
    if not sep or not file:
        raise ValueError(f"--record wants /NAME=FILE, got {spec!r}")
    return RecordMount(path, Path(file))


# option name -> (help, parser(spec, args) -> Mount). A new kind adds a line here.
MOUNT_KINDS = {
    "mount": (
        "/NAME=FILE.h264: loop an H.264 Annex-B file (repeatable)",
        lambda spec, args: _parse_file_mount(spec, args.fps),
    ),
    "record": (
        "/NAME=FILE.h264: take a published H.264 stream, append it to FILE (repeatable)",
        lambda spec, args: _parse_record_mount(spec),
    ),
}
ROLE = "user"


def build_server(
    host: str, port: int, mounts: list[Mount], auth: str | None = None, method: str = "digest"
) -> GstRtspServer.RTSPServer:
    server = GstRtspServer.RTSPServer()
    server.set_address(host)
    server.set_service(str(port))
    if auth is not None:
        user, _, password = auth.partition(":")
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", ROLE)
        a = GstRtspServer.RTSPAuth()
        if method == "digest":
            a.add_digest(user, password, token)
            a.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        else:
            a.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
            a.set_supported_methods(GstRtsp.RTSPAuthMethod.BASIC)
        server.set_auth(a)
    points = server.get_mount_points()
    for m in mounts:
        f = m.factory()
        if auth is not None:
            f.add_role_from_structure(
                Gst.Structure.new_from_string(
                    f"{ROLE}, media.factory.access=(boolean)true, "
                    "media.factory.construct=(boolean)true"
                )
            )
        points.add_factory(m.path, f)
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8554, help="0 = any free port")
    ap.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frame rate of file mounts if their SPS carries none",
    )
    for kind, (help_, _) in MOUNT_KINDS.items():
        ap.add_argument(f"--{kind}", action="append", default=[], metavar="SPEC", help=help_)
    ap.add_argument("--auth", metavar="USER:PASS", help="require these credentials")
    ap.add_argument("--auth-method", choices=("digest", "basic"), default="digest")
    args = ap.parse_args(argv)

    Gst.init(None)
    try:
        mounts = [MOUNT_KINDS[k][1](spec, args) for k in MOUNT_KINDS for spec in getattr(args, k)]
    except ValueError as e:
        ap.error(str(e))
    if not mounts:
        ap.error("give at least one mount")

    server = build_server(args.host, args.port, mounts, args.auth, args.auth_method)
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    port = server.get_bound_port()
    for m in mounts:
        print(f"listening rtsp://{args.host}:{port}{m.path}", flush=True)
    print("READY", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
