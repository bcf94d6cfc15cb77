"""Sinks: the outputs of a stream's annotated frames (see `stream.datatypes.Sink`).

`MjpegSink` keeps the newest encoded frame for the MJPEG, snapshot and future WebSocket
clients on the event loop: a client always gets the newest frame, a slow one skips frames,
nothing queues. The JPEG is encoded once per frame (`Rendered.jpeg`) for every client."""

from __future__ import annotations

import asyncio
import contextlib
import time

from segstream.stream.datatypes import Published, Rendered


class MjpegSink:
    """Newest published frame of one stream; lives on the event loop, fed from render threads."""

    name = "mjpeg"

    def __init__(self, stream_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.stream_id = stream_id
        self._loop = loop
        self._changed = asyncio.Event()  # replaced after each publish: waiters wake once
        self.latest: Published | None = None
        self.clients = 0  # read by the render thread to decide whether to encode
        self.closed = False
        self._seq = 0

    def wants_frames(self) -> bool:
        return self.clients > 0 and not self.closed

    def put(self, frame: Rendered) -> None:
        jpeg = frame.jpeg()
        with contextlib.suppress(RuntimeError):  # the loop has closed: shutting down
            self._loop.call_soon_threadsafe(self._publish, jpeg, frame.frame_seq, frame.capture_ts)

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
        """Wakes every client so their responses end promptly (stream removed, shutdown).
        Safe from any thread."""
        if self._loop.is_closed():
            self.closed = True
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._close()
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        self.closed = True
        self._wake()
