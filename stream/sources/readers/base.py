"""The reader interface: one connection to one source, used from one thread only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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
    # Keyframe-only decoding (readers that can: PyAV). The source sets `keyframes_only`,
    # asked with the stream's measured keyframe rate; the reader counts what it skipped.
    can_skip_frames = False

    def __init__(self, target: Target, cfg: StreamConfig) -> None:
        self.target, self.cfg = target, cfg
        self.keyframes_only: Callable[[float], bool] | None = None
        self.undecoded = 0  # frames read and not decoded (keyframe-only decoding)

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
