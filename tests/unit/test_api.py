"""The control plane in one process with the real model, real sources and a real HTTP server:: the
parts that need no model and no peers (the rest: tests/e2e/test_api.py)."""

from __future__ import annotations

from segstream.stream.auth import (
    LoginThrottle,
)


def test_throttle_doubles_from_a_quarter_second_to_eight() -> None:
    throttle = LoginThrottle(max_clients=2)
    waits = []
    for _ in range(9):
        waits.append(throttle.delay("a"))
        throttle.failed("a")
    assert waits == [0, 0.25, 0.5, 1, 2, 4, 8, 8, 8]
    assert throttle.delay("b") == 0  # per client
    throttle.succeeded("a")
    assert throttle.delay("a") == 0
    for client in ("a", "b", "c"):  # bounded: the oldest client is forgotten
        throttle.failed(client)
        throttle.failed(client)
    assert [throttle.delay(c) for c in ("a", "b", "c")] == [0, 0.5, 0.5]
