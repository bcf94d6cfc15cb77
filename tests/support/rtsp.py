"""A real RTSP peer for tests: encode a short H.264 clip and serve it with
scripts/rtsp_server.py (gst-rtsp-server) under Debian's system Python.

    from support.rtsp import RtspServer, encode_clip

    clip = encode_clip(SHARED / "data/video/vtest.avi")          # cached across runs
    with RtspServer({"/cam": clip}) as srv:                         # free loopback port
        url = srv.url("/cam")
        srv.kill()       # abrupt death (SIGKILL): clients see the connection drop
        srv.start()      # same port again

    # A server that takes published streams (ANNOUNCE/RECORD) into files, with credentials:
    with RtspServer({}, records={"/in": tmp / "in.h264"}, auth="user:pass") as srv: ...

    # FFmpeg as a one-publisher RTSP server (`-rtsp_flags listen`), frames decoded back:
    with RtspListener(record=tmp / "in.ts") as rx:
        rx.url, rx.frames, rx.received(), rx.kill(), rx.start()

Importable from any test module (pytest puts tests/ on sys.path: `from rtsp import ...`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = REPO / "scripts" / "rtsp_server.py"
# gst-rtsp-server's Python bindings live in Debian's python3-gi, not in the venv.
GST_PYTHON = os.environ.get("SEGSTREAM_GST_PYTHON", "/usr/bin/python3")
CLIP_CACHE = Path(tempfile.gettempdir()) / "segstream-test-clips"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def encode_clip(
    src: Path,
    *,
    size: tuple[int, int] = (640, 480),
    seconds: float = 4.0,
    fps: float | None = None,
    gop: int = 10,
    cache_dir: Path = CLIP_CACHE,
    container: str = "h264",
) -> Path:
    """Re-encode `src` as an H.264 Annex-B stream without B-frames (what the server loops);
    container "mp4": the same video in an MP4 file, which keeps its frame rate (file sources
    are paced at it).

    Cached by source file, size and parameters; written atomically so parallel test
    processes can share the cache."""
    src = Path(src)
    st = src.stat()
    key = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}|{seconds}|{fps}|{gop}"
    if container != "h264":
        key += f"|{container}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = cache_dir / f"{src.stem}-{size[0]}x{size[1]}-{digest}.{container}"
    if out.is_file() and out.stat().st_size > 0:
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    vf = f"scale={size[0]}:{size[1]}" + (f",fps={fps}" if fps else "")
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-y",
        "-loglevel",
        "error",
        "-i",
        str(src),
        "-t",
        str(seconds),
        "-vf",
        vf,
        "-an",
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-tune",
        "zerolatency",
        "-bf",
        "0",
        "-g",
        str(gop),
        "-pix_fmt",
        "yuv420p",
        "-f",
        container,
        str(tmp),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed ({r.returncode}): {r.stderr.strip()}")
    tmp.replace(out)
    return out


def gst_rtsp_available() -> str | None:
    """None if the server can run here, else why not."""
    try:
        r = subprocess.run(
            [
                GST_PYTHON,
                "-c",
                "import gi; gi.require_version('GstRtspServer', '1.0'); "
                "from gi.repository import GstRtspServer",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return f"{GST_PYTHON} not found"
    if r.returncode != 0:
        return (
            f"{GST_PYTHON} cannot import GstRtspServer (run scripts/install_system_deps.sh "
            f"test): {r.stderr.strip().splitlines()[-1:]}"
        )
    return None


class RtspServer:
    """scripts/rtsp_server.py as a child process on a fixed loopback port."""

    def __init__(
        self,
        mounts: dict[str, Path | str],
        port: int | None = None,
        host: str = "127.0.0.1",
        fps: float | None = None,
        records: dict[str, Path | str] | None = None,
        auth: str | None = None,
        auth_method: str = "digest",
    ) -> None:
        self.mounts = {(m if m.startswith("/") else "/" + m): Path(f) for m, f in mounts.items()}
        self.records = {
            (m if m.startswith("/") else "/" + m): Path(f) for m, f in (records or {}).items()
        }
        self.auth = auth
        self.auth_method = auth_method
        self.host = host
        self.port = port or free_port(host)
        self.fps = fps
        self.proc: subprocess.Popen | None = None
        fd, log = tempfile.mkstemp(prefix="rtsp-server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)  # the server's stderr, across restarts

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, mount: str | None = None) -> str:
        mount = mount or next(iter({**self.mounts, **self.records}))
        return f"rtsp://{self.host}:{self.port}{mount if mount.startswith('/') else '/' + mount}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 15.0) -> RtspServer:
        """Start (or start again, on the same port) and wait until it says READY."""
        if self.running:
            return self
        cmd = [GST_PYTHON, str(SERVER_SCRIPT), "--host", self.host, "--port", str(self.port)]
        for m, f in self.mounts.items():
            cmd += ["--mount", f"{m}={f}"]
        for m, f in self.records.items():
            cmd += ["--record", f"{m}={f}"]
        if self.auth:
            cmd += ["--auth", self.auth, "--auth-method", self.auth_method]
        if self.fps:
            cmd += ["--fps", str(self.fps)]
        # The port may still be held for a moment by the previous process (just killed).
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
                )
            if self._wait_ready(deadline):
                return self
            failed = self.proc.poll() is not None
            self.kill()
            if not failed or time.monotonic() > deadline:
                raise RuntimeError(f"RTSP server not READY within {timeout:g} s:\n{self.log()}")
            time.sleep(0.2)

    def _wait_ready(self, deadline: float) -> bool:
        lines: queue.Queue[str | None] = queue.Queue()
        out = self.proc.stdout

        def pump() -> None:  # stdout stays drained for the life of the process
            for line in out:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            if line.strip() == "READY":
                return True
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a TEARDOWN, like a crashed camera."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def listening(port: int, or_serving: bool = False) -> bool:
    """Whether something listens on TCP `port` (read from /proc: connecting to find out would
    be taken for a client by a one-client server). `or_serving`: a connection accepted on it
    counts too (FFmpeg's listen mode closes its listening socket once it has its client, which
    a client retrying every 0.2 s can be before the first look)."""
    states = ("0A", "01") if or_serving else ("0A",)  # LISTEN, ESTABLISHED
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rpartition(":")[2], 16) == port and cols[3] in states:
                    return True
    return False


class RtspListener:
    """FFmpeg as an RTSP server for one publisher (`-rtsp_flags listen`, ANNOUNCE/RECORD):
    decodes what it receives into frames this process reads (PPM over a pipe) and, with
    `record`, copies the H.264 into an MPEG-TS file too. It serves one session: it exits when
    the publisher ends it. `kill()` is an abrupt death; `start()` listens again, same port."""

    def __init__(
        self,
        port: int | None = None,
        path: str = "/live",
        record: Path | None = None,
        keep: int = 30,
    ) -> None:
        self.port = port or free_port()
        self.path = path
        self.record = record
        self.frames = 0  # decoded frames received, across restarts
        self.recent: collections.deque = collections.deque(maxlen=keep)  # newest RGB frames
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.starts = 0

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def start(self, timeout: float = 10.0) -> RtspListener:
        self.starts += 1
        out: list[str] = []
        if self.record is not None:
            rec = self.record.with_name(f"{self.record.stem}-{self.starts}{self.record.suffix}")
            out += ["-map", "0:v", "-c", "copy", "-f", "mpegts", "-y", str(rec)]
        cmd = [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-rtsp_flags",
            "listen",
            "-i",
            self.url,
            *out,
            "-map",
            "0:v",
            "-fps_mode",
            "passthrough",
            "-f",
            "image2pipe",
            "-c:v",
            "ppm",
            "pipe:1",
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not listening(self.port, or_serving=True):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"ffmpeg is not listening on {self.port}")
            time.sleep(0.05)
        return self

    def received(self) -> list:
        """The newest decoded frames (RGB), a copy of the list."""
        with self._lock:
            return list(self.recent)

    def recorded(self, start: int = 1) -> Path:
        """The MPEG-TS file of the `start`-th run."""
        assert self.record is not None
        return self.record.with_name(f"{self.record.stem}-{start}{self.record.suffix}")

    def _read(self, proc: subprocess.Popen) -> None:
        import numpy as np  # the helpers above stay importable without numpy

        pipe = proc.stdout
        while True:
            magic = pipe.readline()
            if magic.strip() != b"P6":
                return
            w, h = (int(x) for x in pipe.readline().split())
            pipe.readline()  # maxval
            data = pipe.read(w * h * 3)
            if len(data) < w * h * 3:
                return
            with self._lock:
                self.frames += 1
                self.recent.append(np.frombuffer(data, np.uint8).reshape(h, w, 3))

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> RtspListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
