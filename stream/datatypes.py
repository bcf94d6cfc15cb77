"""The pipeline's data types and the sink seam, in one small module every stage imports.

    sources --Frame--> scheduler --Job--> model runner --Result--> render --Rendered--> sinks

Nothing here imports a stage, so every stage can import this without a cycle."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

from stream.encoders import encode_jpeg


class SourceState(StrEnum):
    STARTING = "starting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    ERROR = "error"
    STOPPED = "stopped"


@dataclass(slots=True)
class Frame:
    """One decoded camera frame."""

    image: np.ndarray  # BGR uint8 [H,W,3], owned by the frame (never reused by the reader)
    seq: int  # per-stream, strictly increasing from 1 (across reconnects too)
    capture_ts: float  # time.monotonic() right after the frame was decoded
    decode_s: float  # seconds spent reading+decoding it


@dataclass(slots=True)
class Job:
    """A frame the scheduler handed to a model worker."""

    stream_id: str
    frame: Frame
    taken_ts: float


@dataclass(slots=True)
class Result:
    """A class mask, attached to the frame it was computed from."""

    stream_id: str
    frame: Frame
    mask: np.ndarray  # uint8 [h, w] class ids at the model's input size
    inferred_ts: float
    batch_size: int


@dataclass(eq=False)
class Rendered:
    """One annotated frame on its way to the sinks.

    `image` is the render stage's reused buffer: valid only during `Sink.put`, so a sink that
    keeps pixels copies them. `jpeg()` encodes at most once, however many sinks ask."""

    stream_id: str
    image: np.ndarray  # BGR uint8 [H, W, 3]
    frame_seq: int
    capture_ts: float  # time.monotonic() of the frame's capture
    jpeg_quality: int
    _jpeg: bytes | None = field(default=None, repr=False)
    encode_s: float = 0.0  # seconds spent encoding (0 until jpeg() runs)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def jpeg(self) -> bytes:
        with self._lock:
            if self._jpeg is None:
                t0 = time.perf_counter()
                self._jpeg = encode_jpeg(self.image, self.jpeg_quality)
                self.encode_s = time.perf_counter() - t0
            return self._jpeg


@dataclass(frozen=True, slots=True)
class Published:
    """An encoded frame as MJPEG clients receive it."""

    jpeg: bytes
    seq: int  # per-stream publish sequence
    frame_seq: int  # the source frame it shows
    capture_ts: float  # time.monotonic() of the frame's capture
    published_ts: float


class Sink(Protocol):
    """An output of one stream's annotated frames (MJPEG, a mosaic, a re-stream...).

    Called from the render thread: `wants_frames` decides whether the frame is rendered at
    all, and `put` must return at once (newest frame wins; never block, never queue)."""

    def wants_frames(self) -> bool: ...

    def put(self, frame: Rendered) -> None: ...

    def close(self) -> None: ...
