"""The reader interface: one connection to one source, used from one thread only."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from segstream.stream.config import StreamConfig
from segstream.stream.sanitize import sanitize_url
from segstream.stream.sources.target import SourceError, Target


@dataclass(frozen=True, slots=True)
class Deferred:
    """A decoded frame's conversion to BGR, to run later on any thread (Reader.deferred)."""

    convert: Callable[[], np.ndarray]
    width: int
    height: int


class Reader:
    """open() / grab() / retrieve() / close() over one capture library; raises SourceError.

    grab() reads and decodes the next frame (every frame of a stream has to be decoded, each
    one depends on the last); retrieve() converts the frame grabbed last to a BGR image of
    its own, and is called only for frames somebody will use."""

    fps: float | None = None  # the source's nominal frame rate, if it declares one
    name = ""
    # Keyframe-only decoding (readers that can: PyAV, gst). The source sets `keyframes_only`,
    # asked with the stream's measured keyframe rate; the reader counts what it skipped.
    can_skip_frames = False

    def __init__(self, target: Target, cfg: StreamConfig) -> None:
        self.target, self.cfg = target, cfg
        self.keyframes_only: Callable[[float], bool] | None = None
        self.undecoded = 0  # frames read and not decoded (keyframe-only decoding)
        self.last_data: float | None = None  # monotonic time of the last frame left undecoded

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


def ffmpeg_options(target: Target, cfg: StreamConfig) -> dict[str, str]:
    """Demuxer options: low delay for network sources, none for files and devices."""
    if target.kind != "network":
        return {}
    # nobuffer: don't hand out the packets read while probing (seconds of stale video);
    # a short analyzeduration keeps (re)connects fast, as RTSP's SDP already gives the codec.
    opts = {"fflags": "nobuffer", "max_delay": "100000", "analyzeduration": "1000000"}
    if target.scheme in ("rtsp", "rtsps"):
        opts["rtsp_transport"] = cfg.rtsp_transport
    return opts


def sane_fps(fps: float | None) -> float | None:
    return float(fps) if fps and 0.5 <= fps <= 300 else None


class KeyframeRate:
    """Keyframes per second of stream time, from the widest of the last 3 keyframe intervals
    (0 until two keyframes were seen): a rate the stream is sure to keep."""

    def __init__(self, time_base: float | Fraction | None) -> None:
        self.time_base = float(time_base) if time_base else 0.0
        self.pts: deque[int] = deque(maxlen=4)
        self.fps = 0.0

    def add(self, pts: int | None) -> None:
        if pts is None or not self.time_base:
            return
        if self.pts and pts <= self.pts[-1]:
            self.pts.clear()  # a file looped or the stream restarted
        self.pts.append(pts)
        if len(self.pts) >= 2:
            gaps = [b - a for a, b in zip(self.pts, list(self.pts)[1:], strict=False)]
            self.fps = 1.0 / (max(gaps) * self.time_base)


class KeyframeGate:
    """Which compressed frames go to the decoder under keyframe-only decoding. The source is
    asked at each keyframe (and at every frame while decoding all), with the keyframe rate
    measured so far; a switch back to every frame waits for a keyframe, since a P frame
    needs the ones before it."""

    def __init__(self, time_base: float | Fraction | None) -> None:
        self.keys = KeyframeRate(time_base)
        self.key_only = False  # decoding keyframes only, until the next keyframe at least

    def decode(self, is_key: bool, pts: int | None, ask: Callable[[float], bool]) -> bool:
        if is_key:
            self.keys.add(pts)
            self.key_only = ask(self.keys.fps)
        elif not self.key_only:
            self.key_only = ask(self.keys.fps)
        return is_key or not self.key_only
