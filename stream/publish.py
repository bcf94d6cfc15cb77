"""Publish stage: each annotated frame is JPEG-encoded once and its bytes fanned out to every
MJPEG client. A client always gets the newest frame: a slow one skips frames, nothing queues."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import simplejpeg

BOUNDARY = "segstreamframe"


@dataclass(frozen=True, slots=True)
class Published:
    jpeg: bytes
    seq: int  # per-stream publish sequence
    frame_seq: int  # the source frame it shows
    capture_ts: float  # time.monotonic() of the frame's capture
    published_ts: float


def encode_jpeg(image_bgr: np.ndarray, quality: int) -> bytes:
    # 4:2:0 costs half of 4:4:4 and looks the same on camera footage.
    return simplejpeg.encode_jpeg(
        image_bgr, quality=quality, colorspace="BGR", colorsubsampling="420", fastdct=True
    )


def mjpeg_part(jpeg: bytes) -> bytes:
    head = (
        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
    ).encode()
    return head + jpeg + b"\r\n"


class Publisher:
    """Newest published frame of one stream; lives on the event loop, fed from render threads."""

    def __init__(self, stream_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.stream_id = stream_id
        self._loop = loop
        self._changed = asyncio.Event()  # replaced after each publish: waiters wake once
        self.latest: Published | None = None
        self.clients = 0  # read by the render thread to decide whether to encode
        self.closed = False
        self._seq = 0

    @property
    def watched(self) -> bool:
        return self.clients > 0

    def publish_threadsafe(self, jpeg: bytes, frame_seq: int, capture_ts: float) -> None:
        self._loop.call_soon_threadsafe(self._publish, jpeg, frame_seq, capture_ts)

    def _publish(self, jpeg: bytes, frame_seq: int, capture_ts: float) -> None:
        self._seq += 1
        self.latest = Published(jpeg, self._seq, frame_seq, capture_ts, time.monotonic())
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def next(self, after_seq: int, timeout: float | None = None) -> Published | None:
        """The newest frame with seq > after_seq; None on timeout or when closed."""
        deadline = None if timeout is None else self._loop.time() + timeout
        while not self.closed:
            if self.latest is not None and self.latest.seq > after_seq:
                return self.latest
            left = None if deadline is None else deadline - self._loop.time()
            if left is not None and left <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return None
        return None

    def close(self) -> None:
        """Wakes every client so long responses end promptly on shutdown."""
        self.closed = True
        self._wake()
