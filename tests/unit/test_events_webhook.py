"""Webhooks against a real aiohttp receiver: signed bodies, retries with backoff, filters,
and the outbox keeping changes across a restart while the receiver is down."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.events_helpers import LABELS, RecordingObserver, person_mask, zone
from support.peers import free_port
from support.waiting import until

from segstream.stream.events.config import EventsConfig, WebhookConfig
from segstream.stream.events.feature import EventsFeature
from segstream.stream.events.webhook import target_name

SECRET = "s3cret"


class Receiver:
    """Answers `statuses` in turn (then 200) and records what it got."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.calls: list[dict[str, Any]] = []
        self.delivered: list[dict[str, Any]] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        good = hmac.compare_digest(request.headers.get("X-Segstream-Signature", ""), want)
        status = self.statuses.pop(0) if self.statuses else 200
        self.calls.append(
            {"good": good, "status": status, "delivery": request.headers["X-Segstream-Delivery"]}
        )
        if status == 200 and good:
            self.delivered.append(json.loads(body))
        return web.Response(status=status if good else 401)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def hook(url: str, **kw: Any) -> WebhookConfig:
    return WebhookConfig(url=url, secret=SECRET, backoff_initial_s=0.05, backoff_max_s=0.2, **kw)


def feature(tmp: Path, hooks: list[WebhookConfig], obs: RecordingObserver) -> EventsFeature:
    return EventsFeature(EventsConfig(), home=tmp, labels=LABELS, webhooks=hooks, observer=obs)


def drive(f: EventsFeature, t0: float = 100.0) -> None:
    """A person covers 50% of the zone from t0 for 1 s, then leaves: new, update, end."""
    f.on_mask("cam", person_mask(0.3), now=t0)
    f.on_mask("cam", person_mask(0.5), now=t0 + 1.0)
    f.on_mask("cam", person_mask(0.0), now=t0 + 1.1)
    f.on_mask("cam", person_mask(0.0), now=t0 + 1.7)


async def test_500_three_times_then_200_is_delivered_once(tmp_path: Path):
    rx = Receiver([500, 500, 500])
    await rx.start()
    obs = RecordingObserver()
    f = feature(tmp_path, [hook(rx.url, events=["new"])], obs)
    await f.start()
    try:
        f.set_stream("cam", [zone()])
        f.on_mask("cam", person_mask(0.3), now=100.0)
        assert await until(lambda: len(rx.delivered) == 1, 10)
        assert [c["status"] for c in rx.calls] == [500, 500, 500, 200]
        assert all(c["good"] for c in rx.calls)
        assert len({c["delivery"] for c in rx.calls}) == 1  # the same delivery id each time
        got = rx.delivered[0]
        assert got["type"] == "new" and got["before"] is None
        assert got["after"]["stream"] == "cam" and got["after"]["class"] == "person"
        assert got["after"]["peak_coverage"] == pytest.approx(0.3)
        name = target_name(hook(rx.url))
        assert obs.deliveries == {(name, "failed"): 3, (name, "delivered"): 1}
        assert obs.opened == {("cam", "floor", "person"): 1}
    finally:
        await f.close()
        await rx.stop()
    assert len(rx.delivered) == 1  # the shutdown's `end` is filtered out (events: [new])


async def test_filters_and_a_refused_change_does_not_block_the_next(tmp_path: Path):
    rx_all, rx_end = Receiver([400]), Receiver()
    await rx_all.start()
    await rx_end.start()
    obs = RecordingObserver()
    f = feature(tmp_path, [hook(rx_all.url), hook(rx_end.url, events=["end"])], obs)
    await f.start()
    try:
        f.set_stream("cam", [zone()])
        drive(f)
        assert await until(lambda: len(rx_all.calls) == 3 and len(rx_end.delivered) == 1, 10)
        # the first (new) was refused with 400: dropped, not retried; the rest followed
        assert [c["status"] for c in rx_all.calls] == [400, 200, 200]
        assert [d["type"] for d in rx_all.delivered] == ["update", "end"]
        assert rx_end.delivered[0]["after"]["end_reason"] == "cleared"
        assert obs.deliveries[(target_name(hook(rx_all.url)), "rejected")] == 1
    finally:
        await f.close()
        await rx_all.stop()
        await rx_end.stop()


async def test_changes_wait_in_the_outbox_across_a_restart(tmp_path: Path):
    rx = Receiver()  # not started yet: connection refused
    obs = RecordingObserver()
    f = feature(tmp_path, [hook(rx.url)], obs)
    await f.start()
    f.set_stream("cam", [zone()])
    drive(f)
    f.on_mask("cam", person_mask(0.4), now=200.0)  # a second event, open at shutdown
    await f.close(drain_s=0.2)
    assert obs.deliveries[(target_name(hook(rx.url)), "failed")] >= 1
    await rx.start()
    f2 = feature(tmp_path, [hook(rx.url)], RecordingObserver())
    await f2.start()
    try:
        assert await until(lambda: len(rx.delivered) == 5, 10)
        types = [(d["type"], d["after"]["end_reason"]) for d in rx.delivered]
        assert types == [
            ("new", None),
            ("update", None),
            ("end", "cleared"),
            ("new", None),
            ("end", "shutdown"),
        ]
    finally:
        await f2.close()
        await rx.stop()
