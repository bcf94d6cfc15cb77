"""PyAV (FFmpeg's libraries through their Python binding): decodes without OpenCV."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segstream.stream.config import StreamConfig
from segstream.stream.sources.readers.base import (
    Deferred,
    KeyframeGate,
    Reader,
    ffmpeg_options,
    sane_fps,
)
from segstream.stream.sources.target import SourceError, Target, file_reason

log = logging.getLogger(__name__)

_LOW_DELAY = 1 << 19  # AV_CODEC_FLAG_LOW_DELAY


class PyAVReader(Reader):
    """av.open + demux/decode; retrieve() converts the av.VideoFrame (swscale to BGR). PyAV
    ends a dropped RTSP connection as a plain EOF, which is why EOF on a live source counts
    as a failure (see VideoSource)."""

    name = "pyav"
    can_skip_frames = True
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
            raise self._cannot_open(file_reason(t.url))
        kwargs: dict[str, Any] = {
            "options": ffmpeg_options(t, self.cfg),
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
        self.fps = sane_fps(stream.guessed_rate) or sane_fps(stream.average_rate)
        self._frames = self._decode(stream)

    def _decode(self, stream) -> Iterator[tuple[Any, float]]:
        import av

        bad = 0
        gate = KeyframeGate(stream.time_base)
        for packet in self._container.demux(stream):
            ask = self.keyframes_only
            if (
                packet.size
                and ask is not None
                and not gate.decode(packet.is_keyframe, packet.pts, ask)
            ):
                self.undecoded += 1
                self.last_data = time.monotonic()
                continue
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
