"""Source stage: one reader thread per stream puts decoded BGR frames into a latest-wins slot.

A per-stream watchdog thread (the supervisor) owns the state machine:

    starting -> live <-> reconnecting -> error (max_failures)      any -> stopped

It starts a reader thread per connection attempt and gives up on an attempt when the reader
reports a failure, when opening takes longer than open_timeout (+ grace) or when no frame
arrives for stall_timeout. It never waits on a library timeout alone: a reader stuck in a
blocking call is abandoned (daemon thread) and a fresh one is started. Every reader carries
a generation number and may only publish while it is the current one, so an abandoned
reader can never publish a frame after it has been replaced or the source has stopped.

Readers: OpenCV's FFmpeg backend (default), PyAV, or GStreamer (`gst`, through PyGObject, the
low-delay RTSP path), behind one open/grab/retrieve/close interface. Every frame of the source
is decoded (`grab`), but only a frame somebody will use is converted to BGR (`retrieve`): the
source asks its `wanted` callable (the service passes the scheduler's `due_soon`), so a camera
whose frames are mostly skipped costs its decode and little else. A frame decoded and not
converted is counted as `unconverted`; it never reaches the slot. Readers that can convert on
another thread later (PyAV, GStreamer: `deferred`) store the decoded picture instead, and the
conversion runs when the frame is first used: a stored frame that a newer one overwrites
before the scheduler takes it (an uncapped camera faster than the model) is never converted.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import Frame, SourceState
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.sanitize import sanitize_text, sanitize_url

# OpenCV serialises every FFmpeg open behind one process-wide mutex unless told that FFmpeg
# is thread-safe (it is, since FFmpeg 4). Without this, one stream stuck opening an
# unreachable camera (up to open_timeout) would hold up every other stream's reconnect.
os.environ.setdefault("OPENCV_FFMPEG_IS_THREAD_SAFE", "1")

import cv2  # must come after the environment above

if "OPENCV_LOG_LEVEL" not in os.environ:
    # The thread-safe mode logs a warning on every open; our own reasons say more.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

log = logging.getLogger(__name__)

OPEN_GRACE_S = 1.5  # the watchdog allows the library's open_timeout this much slack
JOIN_S = 0.2  # how long to wait for a retiring reader before abandoning it
FPS_WINDOW_S = 2.0
_LOW_DELAY = 1 << 19  # AV_CODEC_FLAG_LOW_DELAY
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443, "rtmp": 1935}


class SourceError(Exception):
    """A failure of one connection attempt, worded for the operator (becomes `reason`).

    `permanent`: trying again cannot help (a local file that is missing or holds no video),
    so the stream goes to `error` instead of reconnecting."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# ---------------------------------------------------------------------------------------------
# Latest-wins slot


class FrameSlot:
    """Latest frame wins; thread-safe; never a queue.

    Every frame put here ends up counted exactly once: *taken* by the consumer, *skipped*
    (the consumer saw it and chose not to process it: mark_skipped), or *dropped*
    (overwritten before anyone took or skipped it). The newest frame is *pending* until one
    of those happens, so at any moment puts == taken + skipped + dropped + pending.
    Dropped and skipped frames are also reported to the observer. Frames the reader decoded
    but did not convert, because nobody would have taken them, never come here: they are
    counted as *unconverted* (pass_over), so every decoded frame is in exactly one bin:
    puts + unconverted == taken + skipped + dropped + unconverted + pending.
    """

    def __init__(self, stream_id: str = "", observer: Observer = NULL_OBSERVER) -> None:
        self._stream_id = stream_id
        self._observer = observer
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._pending = False  # the current frame is neither taken nor skipped
        self.puts = self.taken = self.skipped = self.dropped = self.unconverted = 0

    def put(self, frame: Frame) -> Frame | None:
        """Store `frame`; return the overwritten frame if nobody took or skipped it (a drop)."""
        with self._lock:
            old = self._frame if self._pending else None
            self._frame, self._pending = frame, True
            self.puts += 1
            if old is not None:
                self.dropped += 1
        if old is not None:
            self._observer.frame(self._stream_id, "dropped")
        return old

    def take(self, after_seq: int = 0) -> Frame | None:
        """The newest frame if it is pending and newer than `after_seq`; marks it taken."""
        with self._lock:
            f = self._frame
            if f is None or not self._pending or f.seq <= after_seq:
                return None
            self._pending = False
            self.taken += 1
            return f

    def peek(self) -> Frame | None:
        return self._frame

    def mark_skipped(self, seq: int) -> bool:
        """The consumer saw frame `seq` and skipped it: count it skipped, not dropped.

        False if that frame is no longer the pending one (already taken, skipped or dropped)."""
        with self._lock:
            f = self._frame
            if f is None or not self._pending or f.seq != seq:
                return False
            self._pending = False
            self.skipped += 1
        self._observer.frame(self._stream_id, "skipped")
        return True

    def pending_age(self, now: float) -> float | None:
        """Seconds since the capture of the frame waiting to be taken; None if none waits."""
        with self._lock:
            f = self._frame
            return None if f is None or not self._pending else now - f.capture_ts

    def pass_over(self) -> None:
        """A frame was decoded and not converted (the consumer would not have taken it): it
        is counted here as unconverted and never stored; the pending frame stays as it is."""
        with self._lock:
            self.unconverted += 1
        self._observer.frame(self._stream_id, "unconverted")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "puts": self.puts,
                "taken": self.taken,
                "skipped": self.skipped,
                "dropped": self.dropped,
                "pending": int(self._pending),
                "unconverted": self.unconverted,
            }


# ---------------------------------------------------------------------------------------------
# What to open


@dataclass(frozen=True, slots=True)
class Deferred:
    """A decoded frame's conversion to BGR, to run later on any thread (Reader.deferred)."""

    convert: Callable[[], np.ndarray]
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "file" | "device" | "network"
    url: str  # what the library opens: a path, a URL or a device path
    scheme: str  # "file", "v4l2", "rtsp", "http", ...
    device: int | None = None

    @property
    def live(self) -> bool:
        """A live source has no natural end: EOF there is a failure, not the end."""
        return self.kind != "file"


def parse_target(source: str, resolve: Callable[[str], str] | None = None) -> Target:
    """Map a configured source to what the readers open. Raises SourceError."""
    if source.startswith("sample:"):
        if resolve is None:
            raise SourceError(f"{source}: no resolver for sample: sources")
        try:
            source = resolve(source)
        except Exception as e:
            raise SourceError(f"cannot resolve {source}: {e}") from None
    if source.isdigit():
        return Target("device", f"/dev/video{source}", "v4l2", int(source))
    m = re.fullmatch(r"/dev/video(\d+)", source)
    if m:
        return Target("device", source, "v4l2", int(m.group(1)))
    if source.startswith("/dev/"):
        return Target("device", source, "v4l2")
    if "://" in source:
        scheme = source.split("://", 1)[0].lower()
        if scheme == "file":
            return Target("file", urlsplit(source).path, "file")
        return Target("network", source, scheme)
    return Target("file", str(Path(source).expanduser()), "file")


def _network_reason(url: str, timeout: float) -> str:
    """OpenCV only says "not opened": find out what a plain TCP connect says about the peer."""
    u = urlsplit(url)
    try:
        port = u.port or _DEFAULT_PORTS.get(u.scheme.lower())
    except ValueError:
        return "invalid port in URL"
    if not u.hostname or not port:
        return "could not open the stream"
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except socket.gaierror:
        return f"cannot resolve host {u.hostname!r}"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return "connection timed out"
    except OSError as e:
        return e.strerror or str(e)
    return "server reachable but no video could be opened (wrong path, auth or format?)"


def _file_reason(path: str) -> str:
    p = Path(path)
    if not p.exists():
        return "no such file"
    if not p.is_file():
        return "not a file"
    if not os.access(p, os.R_OK):
        return "permission denied"
    return "no decodable video stream (unsupported format or codec?)"


def _sane_fps(fps: float | None) -> float | None:
    return float(fps) if fps and 0.5 <= fps <= 300 else None


# ---------------------------------------------------------------------------------------------
# Readers: one connection each, used from one thread only


class Reader:
    """open() / grab() / retrieve() / close() over one capture library; raises SourceError.

    grab() reads and decodes the next frame (every frame of a stream has to be decoded, each
    one depends on the last); retrieve() converts the frame grabbed last to a BGR image of
    its own, and is called only for frames somebody will use."""

    fps: float | None = None  # the source's nominal frame rate, if it declares one
    name = ""

    def __init__(self, target: Target, cfg: StreamConfig) -> None:
        self.target, self.cfg = target, cfg

    def open(self) -> None:
        raise NotImplementedError

    def grab(self) -> float | None:
        """Decode the next frame: the seconds of work that took, or None at the end of the
        stream. Decode seconds are the work of reading and decoding, not the wait for a live
        source's next frame (which would make a 25 fps camera look like 40 ms decodes)."""
        raise NotImplementedError

    def retrieve(self) -> np.ndarray:
        """The frame grabbed last as a BGR uint8 image the caller owns."""
        raise NotImplementedError

    def deferred(self) -> Deferred | None:
        """The frame grabbed last as a converter any thread may call later (and its width and
        height), or None where the conversion has to happen now, on this thread (OpenCV: the
        next grab() overwrites the decoded picture that retrieve() converts)."""
        return None

    def read(self) -> tuple[np.ndarray, float] | None:
        """grab() + retrieve(): (BGR image, seconds of decode + conversion), or None at the end."""
        decode_s = self.grab()
        if decode_s is None:
            return None
        t0 = time.thread_time()
        return self.retrieve(), decode_s + time.thread_time() - t0

    def close(self) -> None:
        raise NotImplementedError

    def _cannot_open(self, why: str) -> SourceError:
        # A local file that is missing or holds no video stays that way: no reconnecting.
        return SourceError(
            f"cannot open {sanitize_url(self.target.url)}: {why}",
            permanent=self.target.kind == "file",
        )


class _CaptureOptionsGate:
    """OpenCV takes its FFmpeg options from one process-wide environment variable, read while
    a capture opens. Opens wanting the same options may overlap; one wanting different
    options waits until the others have finished opening."""

    VAR = "OPENCV_FFMPEG_CAPTURE_OPTIONS"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._current: str | None = None
        self._users = 0

    @contextmanager
    def use(self, options: str) -> Iterator[None]:
        with self._cond:
            while self._users and self._current != options:
                self._cond.wait()
            if self._current != options:
                os.environ[self.VAR] = options
                self._current = options
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()


_CV_OPTIONS = _CaptureOptionsGate()


def _ffmpeg_options(target: Target, cfg: StreamConfig) -> dict[str, str]:
    """Demuxer options: low delay for network sources, none for files and devices."""
    if target.kind != "network":
        return {}
    # nobuffer: don't hand out the packets read while probing (seconds of stale video);
    # a short analyzeduration keeps (re)connects fast, as RTSP's SDP already gives the codec.
    opts = {"fflags": "nobuffer", "max_delay": "100000", "analyzeduration": "1000000"}
    if target.scheme in ("rtsp", "rtsps"):
        opts["rtsp_transport"] = cfg.rtsp_transport
    return opts


class OpenCVReader(Reader):
    """cv2.VideoCapture with the FFmpeg backend (V4L2 for devices). grab() decodes, retrieve()
    converts (swscale to BGR) and copies."""

    name = "opencv"

    def __init__(self, target: Target, cfg: StreamConfig) -> None:
        super().__init__(target, cfg)
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        t = self.target
        if t.kind == "file" and not Path(t.url).is_file():
            raise self._cannot_open(_file_reason(t.url))
        t0 = time.monotonic()
        if t.kind == "device":
            cap = cv2.VideoCapture(t.device if t.device is not None else t.url, cv2.CAP_V4L2)
        else:
            opts = _ffmpeg_options(t, self.cfg)
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(self.cfg.open_timeout * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(self.cfg.read_timeout * 1000),
            ]
            if t.live:
                # FFmpeg's frame threading holds back (threads - 1) frames: latency a live
                # stream should not pay; and with many cameras, parallelism comes from the
                # streams themselves. One thread decodes 720p H.264 in ~2 ms.
                params += [cv2.CAP_PROP_N_THREADS, 1]
            with _CV_OPTIONS.use("|".join(f"{k};{v}" for k, v in opts.items())):
                cap = cv2.VideoCapture(t.url, cv2.CAP_FFMPEG, params)
        self._cap = cap
        if not cap.isOpened():
            raise self._cannot_open(self._why_not(time.monotonic() - t0))
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # honoured by V4L2; FFmpeg has no such buffer
        self.fps = _sane_fps(cap.get(cv2.CAP_PROP_FPS))

    def _why_not(self, elapsed: float) -> str:
        t = self.target
        if t.kind == "file":
            return _file_reason(t.url)
        if t.kind == "device":
            return "cannot open the video device (missing, busy or no permission?)"
        if elapsed >= self.cfg.open_timeout * 0.9:
            return f"timed out after {self.cfg.open_timeout:g} s"
        return _network_reason(t.url, min(2.0, self.cfg.open_timeout))

    def grab(self) -> float | None:
        assert self._cap is not None
        t0, cpu0 = time.monotonic(), time.thread_time()
        ok = self._cap.grab()
        dt = time.monotonic() - t0
        if ok:
            # Live sources decode on this one thread (N_THREADS=1), so its CPU time is the
            # decode work without the network wait; files never wait, so wall time is right.
            return (time.thread_time() - cpu0) if self.target.live else dt
        if not self.target.live:
            return None  # end of file (OpenCV does not tell EOF from a broken file)
        if dt >= self.cfg.read_timeout * 0.9:
            raise SourceError(f"read timed out after {self.cfg.read_timeout:g} s")
        raise SourceError("stream ended or connection lost")

    def retrieve(self) -> np.ndarray:
        assert self._cap is not None
        ok, img = self._cap.retrieve()
        if not ok or img is None:
            raise SourceError("could not convert the decoded frame")
        return img

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class PyAVReader(Reader):
    """av.open + demux/decode; retrieve() converts the av.VideoFrame (swscale to BGR). PyAV
    ends a dropped RTSP connection as a plain EOF, which is why EOF on a live source counts
    as a failure (see VideoSource)."""

    name = "pyav"
    MAX_BAD_PACKETS = 100  # consecutive undecodable packets before giving up

    def __init__(self, target: Target, cfg: StreamConfig) -> None:
        super().__init__(target, cfg)
        self._container: Any = None
        self._frames: Iterator[tuple[Any, float]] | None = None
        self._frame: Any = None  # the av.VideoFrame grabbed last

    def open(self) -> None:
        import av  # optional reader: import only when used

        t = self.target
        if t.kind == "file" and not Path(t.url).is_file():
            raise self._cannot_open(_file_reason(t.url))
        kwargs: dict[str, Any] = {
            "options": _ffmpeg_options(t, self.cfg),
            "timeout": (self.cfg.open_timeout, self.cfg.read_timeout),
        }
        if t.kind == "device":
            kwargs["format"] = "v4l2"
        t0 = time.monotonic()
        try:
            self._container = av.open(t.url, **kwargs)
            stream = self._container.streams.video[0]
        except IndexError:
            raise self._cannot_open("no video stream") from None
        except av.error.FFmpegError as e:
            raise self._cannot_open(_av_reason(e, self.cfg.open_timeout, t0)) from None
        stream.thread_type = "SLICE"  # frame threading would add a frame of latency per thread
        if t.live:
            # One decoder thread per camera: with many cameras the streams themselves keep
            # the cores busy, and slice threads only help encoders that write many slices
            # (cameras mostly write one), while each costs a wake-up per frame.
            stream.codec_context.thread_count = 1
            try:
                stream.codec_context.flags |= _LOW_DELAY
            except (TypeError, AttributeError):  # older PyAV: flags are an enum
                log.debug("cannot set the low-delay decoder flag with this PyAV")
        self.fps = _sane_fps(stream.guessed_rate) or _sane_fps(stream.average_rate)
        self._frames = self._decode(stream)

    def _decode(self, stream) -> Iterator[tuple[Any, float]]:
        import av

        bad = 0
        for packet in self._container.demux(stream):
            t0 = time.monotonic()
            try:
                frames = stream.decode(packet)
            except av.error.InvalidDataError:
                bad += 1  # a damaged packet on a live stream is not the end of it
                if bad > self.MAX_BAD_PACKETS:
                    raise SourceError(f"{bad} undecodable packets in a row") from None
                continue
            bad = 0
            for f in frames:
                yield f, time.monotonic() - t0
                t0 = time.monotonic()

    def grab(self) -> float | None:
        import av

        assert self._frames is not None
        t0 = time.monotonic()
        try:
            self._frame, decode_s = next(self._frames)
        except StopIteration:
            return None
        except av.error.FFmpegError as e:
            raise SourceError(_av_reason(e, self.cfg.read_timeout, t0)) from None
        return decode_s

    def retrieve(self) -> np.ndarray:
        assert self._frame is not None
        return self._frame.to_ndarray(format="bgr24")

    def deferred(self) -> Deferred | None:
        # A decoded av.VideoFrame is reference-counted and independent of the decoder's later
        # frames: it converts on any thread.
        frame = self._frame
        assert frame is not None
        return Deferred(
            functools.partial(frame.to_ndarray, format="bgr24"), frame.width, frame.height
        )

    def close(self) -> None:
        self._frame = None
        if self._container is not None:
            self._container.close()
            self._container = None
            self._frames = None


def _av_reason(e: Exception, timeout: float, since: float) -> str:
    """FFmpeg's error, or a timeout: PyAV's timeout interrupts FFmpeg, which then reports
    whatever the interrupted step makes of it (often "invalid data")."""
    import av

    timed_out = time.monotonic() - since >= timeout * 0.9
    if timed_out or isinstance(e, (av.error.ExitError, av.error.TimeoutError)):
        return f"timed out after {timeout:g} s"
    return (getattr(e, "strerror", None) or str(e)).lower()


# ---------------------------------------------------------------------------------------------
# GStreamer (PyGObject): the low-delay RTSP reader

GST_HOWTO = (
    "install GStreamer and PyGObject: scripts/install_system_deps.sh gst, then "
    "pip install 'segstream[gst]'"
)
_GST_ELEMENTS = ("rtspsrc", "decodebin", "uridecodebin", "videoconvert", "appsink", "avdec_h264")
_gst_lock = threading.Lock()
_gst: dict[str, Any] = {}  # "Gst": the initialised module, or "why": why it is unavailable


def _load_gst() -> Any:
    """The Gst module, initialised once; None when GStreamer or PyGObject is missing."""
    with _gst_lock:
        if not _gst:
            try:
                import gi

                gi.require_version("Gst", "1.0")
                gi.require_version("GstApp", "1.0")  # appsink's pull API
                gi.require_version("GstVideo", "1.0")  # frame layouts
                from gi.repository import Gst, GstApp, GstVideo  # noqa: F401

                Gst.init(None)
            except (ImportError, ValueError) as e:
                _gst["why"] = f"{type(e).__name__}: {e}; {GST_HOWTO}"
                return None
            missing = [e for e in _GST_ELEMENTS if Gst.ElementFactory.find(e) is None]
            if missing:
                _gst["why"] = f"GStreamer elements missing: {', '.join(missing)}; {GST_HOWTO}"
            else:
                _gst["Gst"] = Gst
        return _gst.get("Gst")


def gst_unavailable() -> str | None:
    """None when the gst reader can run here, else why not."""
    _load_gst()
    return _gst.get("why")


def _thread_cpu_s(tid: int | None) -> float | None:
    """CPU seconds of one thread of this process (Linux), or None."""
    if tid is None:
        return None
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def i420_to_bgr(
    data: bytes,
    width: int,
    height: int,
    strides: tuple[int, int, int],
    offsets: tuple[int, int, int],
) -> np.ndarray:
    """A planar I420 buffer (GStreamer's layout: row strides and plane offsets) as BGR."""
    w, h = width, height
    cw, ch = (w + 1) // 2, (h + 1) // 2
    buf = np.frombuffer(data, np.uint8)
    if (
        (w, h) == (2 * cw, 2 * ch)
        and strides == (w, cw, cw)
        and offsets == (0, w * h, w * h + cw * ch)
    ):
        return cv2.cvtColor(buf[: w * h * 3 // 2].reshape(h * 3 // 2, w), cv2.COLOR_YUV2BGR_I420)
    # Padded rows or odd sizes: repack into the tight even-sized layout OpenCV takes.
    ew, eh = 2 * cw, 2 * ch
    tight = np.empty(ew * eh * 3 // 2, np.uint8)
    y = tight[: ew * eh].reshape(eh, ew)
    y[:h, :w] = buf[offsets[0] : offsets[0] + strides[0] * h].reshape(h, strides[0])[:, :w]
    y[:h, w:] = y[:h, w - 1 : w]
    y[h:] = y[h - 1 : h]
    for i, start in ((1, ew * eh), (2, ew * eh + cw * ch)):
        plane = buf[offsets[i] : offsets[i] + strides[i] * ch].reshape(ch, strides[i])[:, :cw]
        tight[start : start + cw * ch].reshape(ch, cw)[:] = plane
    bgr = cv2.cvtColor(tight.reshape(eh * 3 // 2, ew), cv2.COLOR_YUV2BGR_I420)
    return bgr if (ew, eh) == (w, h) else np.ascontiguousarray(bgr[:h, :w])


class GstReader(Reader):
    """GStreamer through PyGObject, decoding on GStreamer's own streaming thread.

    RTSP: rtspsrc (latency=0, drop-on-latency) -> decodebin (RTP depayloader, parser,
    avdec with one thread) -> appsink. The depayloader ends a frame at the RTP marker bit of
    its last packet, so the frame is decoded as soon as it has arrived; FFmpeg's RTSP path
    (the opencv and pyav readers) hands it over only when the next frame starts, one frame
    period later. Only the video stream is set up. Files, HTTP (MJPEG) and other URLs go
    through decodebin/uridecodebin, devices through v4l2src.

    Frames arrive as I420; retrieve() converts with OpenCV. The appsink holds at most two
    frames and never drops one: newest-wins happens in the FrameSlot, where every frame is
    counted. When this thread falls behind, the pipeline waits (TCP backs up), as with the
    other readers. Timeouts: open_timeout for the first frame, read_timeout between frames
    (polled, 0.1 s steps), rtspsrc's TCP timeout set to read_timeout."""

    name = "gst"
    POLL_S = 0.1

    def __init__(self, target: Target, cfg: StreamConfig) -> None:
        super().__init__(target, cfg)
        self._pipe: Any = None
        self._sink: Any = None
        self._bus: Any = None
        self._sample: Any = None  # the sample grabbed last
        self._first: Any = None  # pulled by open(), handed out by the first grab()
        self._tid: int | None = None  # the streaming thread that decodes into the appsink
        self._cpu = 0.0
        self._layout: tuple[str, tuple[int, int, tuple[int, int, int], tuple[int, int, int]]] | None
        self._layout = None

    # -- pipeline --------------------------------------------------------------------------
    def _build(self, Gst: Any) -> Any:
        t, cfg = self.target, self.cfg
        tail = (
            "videoconvert ! video/x-raw,format=I420 ! appsink name=sink max-buffers=2 "
            "drop=false sync=false enable-last-sample=false"
        )
        if t.scheme in ("rtsp", "rtsps"):
            us = int(cfg.read_timeout * 1e6)
            head = (
                f"rtspsrc name=src latency=0 drop-on-latency=true "
                f"protocols={cfg.rtsp_transport} tcp-timeout={us} timeout={us} ! decodebin"
            )
        elif t.kind == "device":
            head = "v4l2src name=src ! decodebin"
        elif t.kind == "file":
            head = "filesrc name=src ! decodebin"
        elif t.scheme in ("http", "https"):
            head = "souphttpsrc name=src is-live=true ! decodebin"
        else:
            head = "uridecodebin name=src"
        pipe = Gst.parse_launch(f"{head} ! {tail}")
        src = pipe.get_by_name("src")
        # Locations are set as properties, never spliced into the description.
        if t.scheme in ("rtsp", "rtsps"):
            src.set_property("location", t.url)
            src.connect("select-stream", _video_only)
        elif t.kind in ("device", "file"):
            src.set_property("device" if t.kind == "device" else "location", t.url)
        elif t.scheme in ("http", "https"):
            src.set_property("location", t.url)
            src.set_property("timeout", max(1, round(cfg.read_timeout)))
        else:
            src.set_property("uri", t.url)
        pipe.connect("deep-element-added", _element_added)
        sink = pipe.get_by_name("sink")
        sink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._note_thread)
        return pipe

    def _note_thread(self, _pad: Any, _info: Any) -> Any:
        from gi.repository import Gst

        self._tid = threading.get_native_id()
        return Gst.PadProbeReturn.REMOVE

    def open(self) -> None:
        Gst = _load_gst()
        if Gst is None:
            raise SourceError(f"reader gst unavailable: {_gst.get('why')}", permanent=True)
        t = self.target
        if t.kind == "file" and not Path(t.url).is_file():
            raise self._cannot_open(_file_reason(t.url))
        t0 = time.monotonic()
        try:
            self._pipe = self._build(Gst)
        except Exception as e:  # GLib.Error from parse_launch, TypeError from a property
            raise SourceError(f"cannot build the GStreamer pipeline: {e}", permanent=True) from None
        self._sink = self._pipe.get_by_name("sink")
        self._bus = self._pipe.get_bus()
        if self._pipe.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            raise self._cannot_open(self._why_not(t0, self._bus_error() or "could not start"))
        deadline = t0 + self.cfg.open_timeout
        while True:
            left = deadline - time.monotonic()
            sample = self._sink.try_pull_sample(int(max(min(self.POLL_S, left), 0.001) * 1e9))
            if sample is not None:
                break
            err = self._bus_error()
            if err is not None:
                raise self._cannot_open(self._why_not(t0, err))
            if self._sink.is_eos():
                raise self._cannot_open("no decodable video stream (ended before a frame)")
            if time.monotonic() >= deadline:
                raise self._cannot_open(f"timed out after {self.cfg.open_timeout:g} s")
        self._first = sample
        s = sample.get_caps().get_structure(0)
        ok, num, den = s.get_fraction("framerate")
        self.fps = _sane_fps(num / den) if ok and den else None

    def _why_not(self, t0: float, err: str) -> str:
        t = self.target
        if t.kind == "file":
            why = _file_reason(t.url)
            return err.lower().rstrip(".") if why.startswith("no decodable") else why
        if t.kind != "network":
            return err.lower().rstrip(".")
        if time.monotonic() - t0 >= self.cfg.open_timeout * 0.9:
            return f"timed out after {self.cfg.open_timeout:g} s"
        probe = _network_reason(t.url, min(2.0, self.cfg.open_timeout))
        # The TCP probe names refused/unresolvable peers; otherwise GStreamer says more.
        return err.lower().rstrip(".") if probe.startswith("server reachable") else probe

    def _bus_error(self) -> str | None:
        """The first error on the bus, if any; every other message is discarded (nobody
        else drains this bus, and it would grow)."""
        from gi.repository import Gst

        while True:
            msg = self._bus.pop()
            if msg is None:
                return None
            if msg.type == Gst.MessageType.ERROR:
                err, _debug = msg.parse_error()
                return sanitize_text(str(err.message))

    # -- frames ----------------------------------------------------------------------------
    def grab(self) -> float | None:
        sample, self._first = self._first, None
        t0 = time.monotonic()
        while sample is None:
            sample = self._sink.try_pull_sample(int(self.POLL_S * 1e9))
            if sample is not None:
                break
            err = self._bus_error()
            if err is not None:
                raise SourceError(err)
            if self._sink.is_eos():
                return None
            if time.monotonic() - t0 >= self.cfg.read_timeout:
                raise SourceError(f"read timed out after {self.cfg.read_timeout:g} s")
        self._sample = sample
        # The decode ran on the streaming thread: its CPU time since the last frame.
        cpu = _thread_cpu_s(self._tid)
        if cpu is None:
            return 0.0
        spent, self._cpu = (cpu - self._cpu if self._cpu else 0.0), cpu
        return max(spent, 0.0)

    def _frame_layout(self) -> tuple[int, int, tuple[int, int, int], tuple[int, int, int]]:
        """Width, height, plane strides and offsets of the sample grabbed last."""
        from gi.repository import GstVideo

        assert self._sample is not None
        caps = self._sample.get_caps()
        key = caps.to_string()
        if self._layout is None or self._layout[0] != key:
            info = GstVideo.VideoInfo.new_from_caps(caps)
            self._layout = (
                key,
                (info.width, info.height, tuple(info.stride[:3]), tuple(info.offset[:3])),
            )
        return self._layout[1]

    def retrieve(self) -> np.ndarray:
        assert self._sample is not None
        w, h, strides, offsets = self._frame_layout()
        buf = self._sample.get_buffer()
        return i420_to_bgr(buf.extract_dup(0, buf.get_size()), w, h, strides, offsets)

    def deferred(self) -> Deferred | None:
        # The I420 bytes are copied now (0.1 ms for 720p: the pipeline's buffer goes back to
        # its pool), the colour conversion (~1 ms) waits until somebody takes the frame.
        assert self._sample is not None
        w, h, strides, offsets = self._frame_layout()
        buf = self._sample.get_buffer()
        data = buf.extract_dup(0, buf.get_size())
        return Deferred(functools.partial(i420_to_bgr, data, w, h, strides, offsets), w, h)

    def close(self) -> None:
        self._sample = self._first = None
        if self._pipe is not None:
            from gi.repository import Gst

            self._pipe.set_state(Gst.State.NULL)
            self._pipe = self._sink = self._bus = None


def _video_only(_src: Any, _num: int, caps: Any) -> bool:
    """rtspsrc: set up the video stream only (a camera's audio would go unread)."""
    return caps.get_structure(0).get_string("media") == "video"


def _element_added(_bin: Any, _sub: Any, element: Any) -> None:
    """Settings of elements decodebin picks. One decoder thread per stream: with many cameras
    the streams keep the cores busy, and frame threads would hold back a frame each. An MJPEG
    stream's multipart demuxer announces its one stream at once (else decodebin holds the
    frames back until its queue overflows)."""
    factory = element.get_factory()
    name = factory.get_name() if factory is not None else ""
    if name.startswith("avdec_"):
        element.set_property("max-threads", 1)
    elif name == "multipartdemux":
        element.set_property("single-stream", True)


READERS: dict[str, type[Reader]] = {"opencv": OpenCVReader, "pyav": PyAVReader, "gst": GstReader}


def reader_class(name: str, target: Target) -> type[Reader]:
    """The reader a stream's `reader` setting means for this target. `auto`: gst for RTSP
    when GStreamer and PyGObject are installed (the low-delay path), else opencv."""
    if name == "auto":
        rtsp = target.scheme in ("rtsp", "rtsps")
        return GstReader if rtsp and gst_unavailable() is None else OpenCVReader
    return READERS[name]


# ---------------------------------------------------------------------------------------------
# One stream: supervisor (state machine + watchdog) and reader threads


class _Attempt:
    """One connection attempt: its reader thread reports here; the supervisor watches it."""

    def __init__(self, gen: int) -> None:
        self.gen = gen
        self.started = time.monotonic()
        self.opened: float | None = None
        self.last_frame: float | None = None
        self.frames = 0
        self.cancel = threading.Event()  # the supervisor has given up on this attempt
        self.outcome: tuple[str, str] | None = None  # ("failed" | "error" | "eof", reason)
        self.thread: threading.Thread | None = None


class _Pacer:
    """Releases reads at a file's own frame rate; catches up by skipping ahead, not bursting."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.due = time.monotonic()

    def wait(self, cancel: threading.Event) -> None:
        now = time.monotonic()
        if self.due - now > 0:
            cancel.wait(self.due - now)
        elif now - self.due > 1.0:  # fell far behind (slow decode, suspend): start afresh
            self.due = now
        self.due += self.period


class VideoSource:
    """One stream's capture: reader thread -> FrameSlot, watched by a supervisor thread.

    `wanted()`, asked after each decoded frame: will somebody use this frame? False: the
    frame is not converted to BGR, not stored and counted as unconverted (the service asks
    the scheduler whether the stream is due; a stream that renders every frame always wants
    them). None: every frame is converted. `on_frame(id)` runs after each frame stored."""

    def __init__(
        self,
        cfg: StreamConfig,
        *,
        on_frame: Callable[[str], None] | None = None,
        resolve: Callable[[str], str] | None = None,
        observer: Observer = NULL_OBSERVER,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self._observer = observer
        self.slot = FrameSlot(cfg.id, observer)
        self._on_frame = on_frame
        self._wanted = wanted
        self._wanted_failed = False
        self._reader_name: str = cfg.reader  # `auto` until a reader is chosen
        self._resolve = resolve
        self._lock = threading.Lock()
        self._stop = threading.Event()  # this run's stop; set while not running
        self._stop.set()
        self._wake = threading.Event()  # reader -> supervisor: an attempt has ended
        self._supervisor: threading.Thread | None = None
        self._gen = 0  # only the reader of the current generation may publish
        self._seq = 0
        self._state = SourceState.STOPPED
        self._reason: str | None = None
        self._captured = self._reconnects = self._abandoned = self._failures = 0
        self._width = self._height = 0
        self._source_fps: float | None = None
        self._last_ts: float | None = None
        self._recent: deque[float] = deque(maxlen=512)
        self._on_frame_failed = False

    # -- public ----------------------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        with self._lock:
            return self._state

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self._reason

    def status(self) -> tuple[SourceState, str | None]:
        """State and reason, read together."""
        with self._lock:
            return self._state, self._reason

    def start(self) -> None:
        """Start capturing (no-op while running; restarts a source that stopped or failed)."""
        with self._lock:
            sup = self._supervisor
            if not self._stop.is_set() and sup is not None and sup.is_alive():
                return  # running
            # A fresh event per run: a supervisor that stop() left behind keeps seeing its
            # own run as stopped, even after this start.
            self._stop = threading.Event()
            self._failures = 0
            self._set_state(SourceState.STARTING, None)
            self._supervisor = threading.Thread(
                target=self._supervise,
                args=(self._stop,),
                name=f"src-{self.id}-watchdog",
                daemon=True,
            )
            self._supervisor.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop; returns within `timeout` even if a reader is stuck in a blocking call."""
        with self._lock:
            self._stop.set()
            self._gen += 1  # from now on no reader may publish
            self._set_state(SourceState.STOPPED, None)
        self._wake.set()
        sup = self._supervisor
        if sup is not None and sup is not threading.current_thread():
            sup.join(timeout)
            if sup.is_alive():
                log.warning("%s: supervisor still busy after %.1f s; abandoned", self.id, timeout)

    def stats(self) -> dict:
        now = time.monotonic()
        with self._lock:
            age = None if self._last_ts is None else round(now - self._last_ts, 3)
            recent = [t for t in self._recent if now - t <= FPS_WINDOW_S]
            fps_in = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 else 0.0
            return {
                "id": self.id,
                "source": sanitize_url(self.cfg.source),
                "reader": self._reader_name,
                "state": self._state.value,
                "reason": self._reason,
                "captured": self._captured,
                "dropped": self.slot.dropped,
                "skipped": self.slot.skipped,
                "unconverted": self.slot.unconverted,
                "reconnects": self._reconnects,
                "consecutive_failures": self._failures,
                "abandoned_readers": self._abandoned,
                "fps_in": round(fps_in, 2),
                "width": self._width,
                "height": self._height,
                "source_fps": self._source_fps,
                "last_frame_age_s": age,
            }

    # -- supervisor ------------------------------------------------------------------------

    def _supervise(self, stopped: threading.Event) -> None:
        try:
            target = parse_target(self.cfg.source, self._resolve)
        except SourceError as e:
            self._finish(SourceState.ERROR, str(e), stopped)
            return
        first = True
        while not stopped.is_set():
            if not first:
                with self._lock:
                    self._reconnects += 1
                self._observer.reconnect(self.id)
            first = False
            attempt = self._launch(target)
            outcome, reason = self._watch(attempt, stopped)
            self._retire(attempt)
            if outcome == "stop":
                return
            if outcome == "error":  # retrying cannot help (a missing local file)
                self._finish(SourceState.ERROR, reason, stopped)
                return
            if outcome == "eof":  # a file without loop
                self._finish(SourceState.STOPPED, reason, stopped)
                return
            if not self._after_failure(attempt, reason, stopped):
                return

    def _launch(self, target: Target) -> _Attempt:
        with self._lock:
            self._gen += 1
            attempt = _Attempt(self._gen)
        attempt.thread = threading.Thread(
            target=self._read_loop,
            args=(attempt, target),
            name=f"src-{self.id}-reader-{attempt.gen}",
            daemon=True,
        )
        attempt.thread.start()
        return attempt

    def _watch(self, a: _Attempt, stopped: threading.Event) -> tuple[str, str]:
        """Wait until the attempt ends, stalls or the source stops."""
        cfg = self.cfg
        while True:
            if stopped.is_set():
                return "stop", ""
            if a.outcome is not None:
                return a.outcome
            if a.last_frame is not None:
                deadline = a.last_frame + cfg.stall_timeout
                why = f"no frame for {cfg.stall_timeout:g} s (stalled)"
            elif a.opened is not None:
                deadline = a.opened + cfg.stall_timeout
                why = f"opened but no frame within {cfg.stall_timeout:g} s"
            else:
                deadline = a.started + cfg.open_timeout + OPEN_GRACE_S
                why = f"open did not return within {cfg.open_timeout:g} s"
            left = deadline - time.monotonic()
            if left <= 0:
                return "failed", why
            self._wake.wait(min(left, 1.0))
            self._wake.clear()

    def _retire(self, a: _Attempt) -> None:
        """Invalidate the attempt's generation, then let its reader go (or abandon it)."""
        with self._lock:
            if self._gen == a.gen:
                self._gen += 1
        a.cancel.set()
        if a.thread is not None:
            a.thread.join(JOIN_S)
            if a.thread.is_alive():
                with self._lock:
                    self._abandoned += 1
                log.warning("%s: reader %s is blocked; abandoned it", self.id, a.thread.name)

    def _after_failure(self, a: _Attempt, reason: str, stopped: threading.Event) -> bool:
        """Record the failure and wait out the backoff. False: stop trying."""
        with self._lock:
            self._failures = 0 if a.frames else self._failures + 1
            failures = self._failures
            give_up = 0 < self.cfg.max_failures <= failures
            if not stopped.is_set():
                self._set_state(SourceState.ERROR if give_up else SourceState.RECONNECTING, reason)
        if give_up:
            log.error("%s: giving up after %d failed attempts: %s", self.id, failures, reason)
            return False
        delay = min(self.cfg.reconnect_initial * 2 ** max(failures - 1, 0), self.cfg.reconnect_max)
        delay = min(delay * random.uniform(0.8, 1.2), self.cfg.reconnect_max)
        log.warning("%s: %s; reconnecting in %.1f s", self.id, reason, delay)
        return not stopped.wait(delay)

    def _finish(self, state: SourceState, reason: str | None, stopped: threading.Event) -> None:
        with self._lock:
            if not stopped.is_set():
                self._set_state(state, reason)
        if state is SourceState.ERROR:
            log.error("%s: %s", self.id, reason)

    def _set_state(self, state: SourceState, reason: str | None) -> None:
        """Caller holds self._lock."""
        reason = None if reason is None else sanitize_text(reason)
        if state is not self._state:
            log.info(
                "%s: %s -> %s%s",
                self.id,
                self._state.value,
                state.value,
                f" ({reason})" if reason else "",
            )
        self._state, self._reason = state, reason
        self._observer.state_changed(self.id, state, reason)

    # -- reader thread ---------------------------------------------------------------------

    def _read_loop(self, a: _Attempt, target: Target) -> None:
        reader = reader_class(self.cfg.reader, target)(target, self.cfg)
        with self._lock:
            if self._gen == a.gen:
                self._reader_name = reader.name
        try:
            reader.open()
            a.opened = time.monotonic()
            with self._lock:
                if self._gen == a.gen:
                    self._source_fps = reader.fps
            pacer = None
            if target.kind == "file" and self.cfg.realtime:
                pacer = _Pacer(reader.fps or 25.0)
            since_open = 0
            while not a.cancel.is_set():
                if pacer is not None:
                    pacer.wait(a.cancel)
                    if a.cancel.is_set():
                        break
                decode_s = reader.grab()
                if decode_s is None:
                    if target.live:
                        raise SourceError("stream ended (EOF): the server closed it")
                    if not self.cfg.loop:
                        self._report(a, "eof", "end of file")
                        return
                    if since_open == 0:
                        raise SourceError("file has no decodable frames", permanent=True)
                    reader.close()  # loop: reopen rather than seek, which some formats lack
                    reader.open()
                    since_open = 0
                    continue
                since_open += 1
                if not self._publish(a, reader, decode_s):
                    return
        except SourceError as e:
            self._report(a, "error" if e.permanent else "failed", str(e))
        except Exception as e:  # never let a library surprise escape the thread
            log.exception("%s: reader crashed", self.id)
            self._report(a, "failed", f"reader crashed: {type(e).__name__}: {e}")
        finally:
            try:
                reader.close()
            except Exception:
                log.exception("%s: closing the reader failed", self.id)

    def _report(self, a: _Attempt, outcome: str, reason: str) -> None:
        a.outcome = (outcome, reason)
        self._wake.set()

    def _wants(self) -> bool:
        if self._wanted is None:
            return True
        try:
            return bool(self._wanted())
        except Exception:  # a broken hook must not cost frames: convert them all
            if not self._wanted_failed:
                log.exception("%s: wanted() failed; converting every frame", self.id)
                self._wanted_failed = True
            return True

    def _publish(self, a: _Attempt, reader: Reader, decode_s: float) -> bool:
        """Count a decoded frame and, if somebody wants it, convert it and put it in the slot,
        provided this reader is still current. False: stop reading."""
        ts = time.monotonic()  # capture time: the frame is decoded (conversion comes after)
        frame: Frame | None = None
        size: tuple[int, int] = (0, 0)
        convert_s = 0.0
        if self._wants():
            t0 = time.thread_time()
            later = reader.deferred()
            if later is not None:
                frame = Frame(None, 0, ts, decode_s, convert=later.convert)
                size = (later.height, later.width)
            else:
                image = reader.retrieve()
                frame, size = Frame(image, 0, ts, decode_s), (image.shape[0], image.shape[1])
            convert_s = time.thread_time() - t0  # deferred: the copy of the decoded bytes
            frame.decode_s += convert_s
        with self._lock:
            if self._gen != a.gen:
                return False
            self._seq += 1  # every decoded frame has its number, converted or not
            a.frames += 1
            a.last_frame = ts
            self._captured += 1
            self._last_ts = ts
            self._recent.append(ts)
            if self._state is not SourceState.LIVE:
                self._failures = 0
                self._set_state(SourceState.LIVE, None)
            # Inside the lock: once stop() or the watchdog has moved the generation on,
            # no frame of this reader can reach the slot.
            if frame is not None:
                self._height, self._width = size
                frame.seq = self._seq
                self.slot.put(frame)
        self._observer.frame(self.id, "captured")
        self._observer.stage("decode", decode_s)
        if frame is None:
            self.slot.pass_over()
            return True
        if frame.converted:  # a deferred conversion is reported by whoever runs it
            self._observer.stage("convert", convert_s)
        if self._on_frame is not None:
            try:
                self._on_frame(self.id)
            except Exception:
                if not self._on_frame_failed:
                    log.exception("%s: on_frame callback failed", self.id)
                    self._on_frame_failed = True
        return True
