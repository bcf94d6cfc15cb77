"""Outbox consumers: each delivery target reads the outbox in order from its own cursor and
moves the cursor only after a row is handled, so a target that is down (or a restart) loses
nothing and the order per stream (indeed the global order) is kept. At least once: a row
handled just before a crash, before its cursor was saved, is sent again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from segstream.stream.events.observer import EventsObserver
from segstream.stream.events.store import EventStore, OutboxRow

POLL_S = 1.0  # a missed wake-up costs at most this
RETRY_INITIAL_S = 0.5
log = logging.getLogger(__name__)


class OutboxTarget:
    def __init__(self, name: str, store: EventStore, observer: EventsObserver) -> None:
        self.name = name
        self.store = store
        self.observer = observer
        self.cursor = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind to the running loop and load the saved cursor (call before run)."""
        self._loop = asyncio.get_running_loop()
        self.cursor = await asyncio.to_thread(self.store.register_target, self.name)

    def wake(self) -> None:
        """New rows were written; callable from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing
                self._loop.call_soon_threadsafe(self._wake.set)

    async def serve(self) -> None:
        """One session of the target (a connection); returns or raises when it ends."""
        raise NotImplementedError

    def disconnected(self) -> None:
        """serve() ended (state for health)."""

    async def run(self, retry_max_s: float = 10.0) -> None:
        """serve() for ever, again after any failure (the target away, the store away) with
        capped backoff; cancel to stop."""
        delay = RETRY_INITIAL_S
        while True:
            started = time.monotonic()
            try:
                await self.serve()
            except Exception as e:
                self.disconnected()
                if time.monotonic() - started > 10 * delay:
                    delay = RETRY_INITIAL_S  # it ran a good while: not a fast failure loop
                log.warning("%s: %s; retrying in %.1fs", self.name, _first(e), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max_s)

    async def pump(self, send: Callable[[OutboxRow], Awaitable[None]]) -> None:
        """Hand every row after the cursor to `send`, in order, forever. `send` returns when
        the row is handled (delivered, filtered or rejected) and raises to stop the pump."""
        while True:
            self._wake.clear()  # before reading: a row written meanwhile wakes the next wait
            rows = await asyncio.to_thread(self.store.outbox_after, self.cursor)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                continue
            for row in rows:
                await send(row)
                await asyncio.to_thread(self.store.ack, self.name, row.seq)
                self.cursor = row.seq


def _first(e: BaseException) -> BaseException:
    """The first leaf of an exception group (a TaskGroup's), for a one-line log."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e
