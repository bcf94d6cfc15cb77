"""The pipeline's data types and the sink seam, in one small module every stage imports.

    sources --Frame--> scheduler --Job--> model runner --Result--> render --Rendered--> sinks

Nothing here imports a stage, so every stage can import this without a cycle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

from segstream.stream.encoders import encode_jpeg


class SourceState(StrEnum):
    STARTING = "starting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    ERROR = "error"
    STOPPED = "stopped"


class StreamState(StrEnum):
    """A stream's state as the API shows it: its reader's (SourceState) on a node; in a
    cluster also where it is in placement."""

    STARTING = "starting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    ERROR = "error"
    STOPPED = "stopped"
    MOVING = "moving"  # its node is lost or silent, or it is being rebalanced
    PENDING = "pending"  # no node has room for it
    UNKNOWN = "unknown"  # its node does not answer


class StreamPhase(StrEnum):
    """Where the cluster controller has a stream."""

    PLACED = "placed"  # runs on its node
    STARTING = "starting"  # placed, not running there yet
    MOVING = "moving"
    PENDING = "pending"
    ERROR = "error"  # its node could not start it


class NodeState(StrEnum):
    STARTING = "starting"
    UP = "up"
    LOST = "lost"


class Frame:
    """One decoded camera frame.

    Its BGR image is either given or converted on first use: a reader that can convert in
    another thread later (PyAV, GStreamer) hands over the decoded picture with a converter,
    so a frame overwritten in the slot before anyone takes it is never converted. The first
    user (the model worker, a smooth render) pays the conversion, once, under a lock."""

    __slots__ = ("_convert", "_image", "_lock", "capture_ts", "convert_s", "decode_s", "seq")

    def __init__(
        self,
        image: np.ndarray | None = None,
        seq: int = 0,
        capture_ts: float = 0.0,
        decode_s: float = 0.0,
        *,
        convert: Callable[[], np.ndarray] | None = None,
    ) -> None:
        if (image is None) == (convert is None):
            raise ValueError("a Frame takes an image or a converter, not both")
        self.seq = seq  # per-stream, strictly increasing from 1 (across reconnects too)
        self.capture_ts = capture_ts  # time.monotonic() right after the frame was decoded
        self.decode_s = decode_s  # seconds spent reading+decoding it
        self.convert_s = 0.0  # seconds the deferred conversion took (0 until it ran)
        self._image = image  # BGR uint8 [H,W,3], owned by the frame (never reused)
        self._convert = convert
        self._lock = threading.Lock() if convert is not None else None

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            self.materialize()
        assert self._image is not None
        return self._image

    @property
    def converted(self) -> bool:
        return self._image is not None

    def materialize(self) -> float:
        """Converts a deferred frame now; returns the seconds spent here (0: already done)."""
        if self._image is not None or self._lock is None:
            return 0.0
        with self._lock:
            if self._image is not None:
                return 0.0
            assert self._convert is not None
            t0 = time.thread_time()
            self._image, self._convert = self._convert(), None
            self.convert_s = time.thread_time() - t0
            return self.convert_s

    def __repr__(self) -> str:
        return (
            f"Frame(seq={self.seq}, capture_ts={self.capture_ts:.3f}, converted={self.converted})"
        )


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
