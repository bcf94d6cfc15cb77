"""GStreamer through PyGObject: the low-delay RTSP reader."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from segstream.stream.config import StreamConfig
from segstream.stream.sanitize import sanitize_text
from segstream.stream.sources.gstreamer import gst_unavailable, load_gst
from segstream.stream.sources.i420 import i420_to_bgr
from segstream.stream.sources.readers.base import Deferred, KeyframeGate, Reader, sane_fps
from segstream.stream.sources.target import SourceError, Target, file_reason, network_reason


def _thread_cpu_s(tid: int | None) -> float | None:
    """CPU seconds of one thread of this process (Linux), or None."""
    if tid is None:
        return None
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


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
    can_skip_frames = True  # a probe before the decoder drops delta frames (keyframes only)

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
        self._keys = KeyframeGate(1e-9)  # buffer timestamps are nanoseconds

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
        pipe.connect("deep-element-added", self._element_added)
        sink = pipe.get_by_name("sink")
        sink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._note_thread)
        return pipe

    def _note_thread(self, _pad: Any, _info: Any) -> Any:
        from gi.repository import Gst

        self._tid = threading.get_native_id()
        return Gst.PadProbeReturn.REMOVE

    def open(self) -> None:
        Gst = load_gst()
        if Gst is None:
            raise SourceError(f"reader gst unavailable: {gst_unavailable()}", permanent=True)
        t = self.target
        if t.kind == "file" and not Path(t.url).is_file():
            raise self._cannot_open(file_reason(t.url))
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
        self.fps = sane_fps(num / den) if ok and den else None

    def _why_not(self, t0: float, err: str) -> str:
        t = self.target
        if t.kind == "file":
            why = file_reason(t.url)
            return err.lower().rstrip(".") if why.startswith("no decodable") else why
        if t.kind != "network":
            return err.lower().rstrip(".")
        if time.monotonic() - t0 >= self.cfg.open_timeout * 0.9:
            return f"timed out after {self.cfg.open_timeout:g} s"
        probe = network_reason(t.url, min(2.0, self.cfg.open_timeout))
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
            if time.monotonic() - max(t0, self.last_data or t0) >= self.cfg.read_timeout:
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

    def _element_added(self, _bin: Any, _sub: Any, element: Any) -> None:
        """Settings of elements decodebin picks. One decoder thread per stream: with many
        cameras the streams keep the cores busy, and frame threads would hold back a frame
        each. An MJPEG stream's multipart demuxer announces its one stream at once (else
        decodebin holds the frames back until its queue overflows). Before a video decoder,
        the keyframe-only probe."""
        from gi.repository import Gst

        factory = element.get_factory()
        name = factory.get_name() if factory is not None else ""
        if name.startswith("avdec_"):
            element.set_property("max-threads", 1)
            pad = element.get_static_pad("sink")
            if pad is not None and self.keyframes_only is not None:
                pad.add_probe(Gst.PadProbeType.BUFFER, self._keyframe_probe)
        elif name == "multipartdemux":
            element.set_property("single-stream", True)

    def _keyframe_probe(self, _pad: Any, info: Any) -> Any:
        """On the streaming thread: delta frames are dropped before the decoder while the
        source says keyframes suffice (parsers hand the decoder whole frames)."""
        from gi.repository import Gst

        buf, ask = info.get_buffer(), self.keyframes_only
        if buf is None or ask is None or not buf.get_size():
            return Gst.PadProbeReturn.OK
        is_key = not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)
        pts = None if buf.pts == Gst.CLOCK_TIME_NONE else buf.pts
        if self._keys.decode(is_key, pts, ask):
            return Gst.PadProbeReturn.OK
        self.undecoded += 1
        self.last_data = time.monotonic()  # alive: grab()'s timeout and the watchdog see it
        return Gst.PadProbeReturn.DROP


def _video_only(_src: Any, _num: int, caps: Any) -> bool:
    """rtspsrc: set up the video stream only (a camera's audio would go unread)."""
    return caps.get_structure(0).get_string("media") == "video"
