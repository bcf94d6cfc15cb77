"""Bounded waits for conditions that other threads or processes make true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


async def until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """wait_for without blocking the event loop (the service under test runs on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()
