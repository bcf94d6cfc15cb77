"""MQTT alerts against a real Mosquitto broker started here: availability with its last will,
the change feed, active states, coverage, Home Assistant discovery (and its re-send and
removal), and a broker killed for 30 s while events happen: every message arrives, in order per
stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from support.events_helpers import LABELS, RecordingObserver, person_mask, zone
from support.events_peers import Mosquitto
from support.waiting import until

from segstream.stream.events.config import EventsConfig, MqttConfig
from segstream.stream.events.feature import EventsFeature

pytestmark = pytest.mark.e2e  # a real broker
REPO = Path(__file__).resolve().parents[2]
Msg = tuple[str, bytes, bool]  # topic, payload, retained


class Subscriber:
    """Collects every message on `topics`; reconnects (a persistent session keeps what the
    broker queued meanwhile)."""

    def __init__(self, port: int, topics: list[str], name: str, persistent: bool = False):
        self.port, self.topics, self.name, self.persistent = port, topics, name, persistent
        self.msgs: list[Msg] = []
        self.subscribed = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        assert await until(lambda: self.subscribed, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier=self.name,
                    clean_session=not self.persistent,
                ) as c:  # fmt: skip
                    for t in self.topics:
                        await c.subscribe(t, qos=1)
                    self.subscribed = True
                    async for m in c.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        self.msgs.append((str(m.topic), payload, bool(m.retain)))
            except aiomqtt.MqttError:
                self.subscribed = False
                await asyncio.sleep(0.1)

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.msgs if t == topic]

    def live(self, topic: str) -> list[bytes]:
        """Without the retained copies a (re)subscription replays, and without repeats: QoS 1
        is at least once, and a broker killed before it recorded our PUBACK sends a message
        again after its restart (no change or state message ever repeats legitimately)."""
        out: list[bytes] = []
        for t, p, retained in self.msgs:
            if t == topic and not retained and (not out or out[-1] != p):
                out.append(p)
        return out

    def feed(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.live("segstream/events")]


def mqtt(broker: Mosquitto, name: str, **kw: Any) -> MqttConfig:
    return MqttConfig(url=broker.url, client_id=name, coverage_interval_s=0.1,
                      reconnect_max_s=0.3, **kw)  # fmt: skip


@contextlib.asynccontextmanager
async def running(tmp: Path, cfg: MqttConfig, obs: RecordingObserver | None = None
                  ) -> AsyncIterator[EventsFeature]:  # fmt: skip
    f = EventsFeature(EventsConfig(), home=tmp, labels=LABELS, mqtt=cfg, observer=obs)
    await f.start()
    try:
        yield f
    finally:
        await f.close()


async def test_feed_states_coverage_and_home_assistant_discovery(broker, tmp_path):
    obs = RecordingObserver()
    async with running(tmp_path, mqtt(broker, "seg-a", homeassistant=True), obs) as f:
        f.set_stream("cam.1", [zone("floor")])
        assert f.mqtt is not None
        assert await until(lambda: f.mqtt is not None and f.mqtt.connected, 10)
        async with Subscriber(broker.port, ["#"], "sub-a") as sub:
            # availability: retained online
            assert await until(lambda: ("segstream/available", b"online", True) in sub.msgs, 5)
            bs = "homeassistant/binary_sensor/segstream_cam_1_floor_person/config"
            se = "homeassistant/sensor/segstream_cam_1_floor_person_coverage/config"
            assert await until(lambda: sub.on(bs) and sub.on(se), 5)
            b, s = json.loads(sub.on(bs)[-1]), json.loads(sub.on(se)[-1])
            assert b["device_class"] == "occupancy"
            assert b["state_topic"] == "segstream/cam.1/floor/person/active"
            assert (b["payload_on"], b["payload_off"]) == ("ON", "OFF")
            assert b["availability_topic"] == "segstream/available"
            assert b["device"]["identifiers"] == ["segstream_cam_1"]
            assert s["device"] == b["device"]  # one device per stream
            assert (s["unit_of_measurement"], s["state_class"]) == ("%", "measurement")
            assert s["state_topic"] == "segstream/cam.1/floor/person"
            assert b["unique_id"] != s["unique_id"]

            # an event: feed, active ON, coverage
            f.on_mask("cam.1", person_mask(0.3), now=10.0)
            assert await until(lambda: len(sub.feed()) == 1, 5)
            new = sub.feed()[0]
            assert (new["type"], new["before"], new["after"]["stream"]) == ("new", None, "cam.1")
            assert await until(lambda: sub.on("segstream/cam.1/floor/person/active") == [b"ON"], 5)
            assert await until(lambda: b"0.3000" in sub.on("segstream/cam.1/floor/person"), 5)
            assert await until(lambda: b"0.7000" in sub.on("segstream/cam.1/floor/background"), 5)
            f.on_mask("cam.1", person_mask(0.0), now=11.0)
            f.on_mask("cam.1", person_mask(0.0), now=11.6)
            assert await until(lambda: len(sub.feed()) == 2, 5)
            end = sub.feed()[1]
            assert end["type"] == "end" and end["after"]["end_reason"] == "cleared"
            assert end["before"]["id"] == end["after"]["id"] == new["after"]["id"]
            assert await until(
                lambda: sub.on("segstream/cam.1/floor/person/active")[-1:] == [b"OFF"], 5
            )
            assert await until(
                lambda: sub.on("segstream/cam.1/floor/person")[-1:] == [b"0.0000"], 5
            )

            # Home Assistant restarts: the discovery payloads come again
            before = len(sub.on(bs))
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="ha") as ha:
                await ha.publish("homeassistant/status", b"online")
            assert await until(lambda: len(sub.on(bs)) > before, 5)

            # the zone is removed: its entities go (empty retained payloads)
            f.set_stream("cam.1", [])
            assert await until(lambda: sub.on(bs)[-1:] == [b""] and sub.on(se)[-1:] == [b""], 5)
        assert obs.deliveries[("mqtt", "delivered")] == 2
    # a clean shutdown says offline itself
    async with Subscriber(broker.port, ["segstream/available"], "sub-a2") as sub:
        assert await until(lambda: sub.msgs == [("segstream/available", b"offline", True)], 5)


WILLER = """
import asyncio, sys
from pathlib import Path
from segstream.stream.events.config import EventsConfig, MqttConfig
from segstream.stream.events.feature import EventsFeature

async def main():
    f = EventsFeature(EventsConfig(), home=Path(sys.argv[2]), labels=["background"],
                      mqtt=MqttConfig(url=sys.argv[1], client_id="seg-will"))
    await f.start()
    while not f.mqtt.connected:
        await asyncio.sleep(0.05)
    print("connected", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_last_will_marks_a_killed_service_offline(broker, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WILLER), broker.url, str(tmp_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line == b"connected\n"
        async with Subscriber(broker.port, ["segstream/available"], "sub-w") as sub:
            assert await until(lambda: sub.on("segstream/available") == [b"online"], 5)
            proc.send_signal(signal.SIGKILL)
            assert await until(lambda: sub.on("segstream/available") == [b"online", b"offline"], 10)
    finally:
        proc.kill()
        proc.wait(10)
    # and it is retained
    async with Subscriber(broker.port, ["segstream/available"], "sub-w2") as sub:
        assert await until(lambda: sub.msgs == [("segstream/available", b"offline", True)], 5)


async def test_broker_killed_while_events_happen_loses_nothing(tmp_path):
    b = Mosquitto(tmp_path / "broker")
    b.start()
    topics = ["segstream/events", "segstream/+/+/+/active"]
    try:
        async with (
            running(tmp_path, mqtt(b, "seg-o")) as f,
            Subscriber(b.port, topics, "sub-o", persistent=True) as sub,
        ):
            assert f.mqtt is not None
            f.set_stream("cam1", [zone("floor")])
            f.set_stream("cam2", [zone("door")])
            f.on_mask("cam1", person_mask(0.3), now=1.0)  # cam1: new, before the outage
            assert await until(lambda: len(sub.feed()) == 1, 5)
            b.kill()
            assert await until(lambda: not f.mqtt.connected, 5)
            # The broker stays down 30 s (the outage) while both streams open, grow
            # and close events: half of the changes at its start, half 15 s into it.
            t, down_at = 2.0, time.monotonic()
            for k, frac in enumerate((0.6, 0.0, 0.0, 0.5, 0.9, 0.0, 0.0)):
                if k == 3:
                    await asyncio.sleep(15.0)
                f.on_mask("cam1", person_mask(frac), now=t)
                f.on_mask("cam2", person_mask(0.9 - frac), now=t)
                t += 1.0
            assert f.recorder is not None and f.recorder.flush()
            await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - down_at)))
            assert not f.mqtt.connected
            b.start()
            rows = await asyncio.to_thread(f.store.outbox_after, 0, 1000)
            want: dict[str, list[tuple[str, str]]] = {}
            for r in rows:
                ch = json.loads(r.payload)
                want.setdefault(r.stream, []).append((ch["type"], ch["after"]["id"]))
            assert [k for k, _ in want["cam1"]] == ["new", "update", "end"] * 2
            assert [k for k, _ in want["cam2"]] == ["new", "update"]
            assert await until(lambda: len(sub.feed()) == len(rows), 20), (sub.feed(), rows)
            got: dict[str, list[tuple[str, str]]] = {}
            for ch in sub.feed():
                got.setdefault(ch["after"]["stream"], []).append((ch["type"], ch["after"]["id"]))
            assert got == want
            # the active states follow the events of each stream, in order
            for stream, changes in want.items():
                states = [b"ON" if k == "new" else b"OFF" for k, _ in changes if k != "update"]
                topic = (
                    f"segstream/{stream}/{'floor' if stream == 'cam1' else 'door'}/person/active"
                )
                assert await until(lambda t=topic, s=states: sub.live(t) == s, 5), sub.live(topic)
    finally:
        b.stop()


async def test_mqtt_5_delivers_the_feed(broker, tmp_path):
    async with running(tmp_path, mqtt(broker, "seg-5", protocol="5")) as f:
        f.set_stream("cam", [zone()])
        async with Subscriber(broker.port, ["segstream/events"], "sub-5") as sub:
            assert await until(lambda: f.mqtt is not None and f.mqtt.connected, 10)
            f.on_mask("cam", person_mask(0.5), now=1.0)
            assert await until(lambda: [c["type"] for c in sub.feed()] == ["new"], 5)
