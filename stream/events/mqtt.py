"""MQTT alerts: availability, the change feed, coverage and active state per zone and class,
and Home Assistant discovery.

Topics (prefix `segstream` by default):
  <prefix>/available                  online (retained); the last will sets offline
  <prefix>/events                     one JSON change per message, from the outbox (QoS 1)
  <prefix>/<stream>/<zone>/<class>    coverage fraction 0..1 (retained, rate-limited)
  <prefix>/<stream>/<zone>/<class>/active   ON / OFF (retained)
The feed and active states come from the outbox (nothing lost while the broker is down);
coverage and discovery are state, re-published in full after every (re)connect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

from segstream.stream.events.config import MqttConfig, ZoneConfig
from segstream.stream.events.delivery import OutboxTarget
from segstream.stream.events.observer import EventsObserver
from segstream.stream.events.store import EventStore, OutboxRow

log = logging.getLogger(__name__)
PUBLISH_TIMEOUT_S = 10.0


def _ha_id(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(("segstream", *parts)))


def state_topic(prefix: str, stream: str, zone: str, class_name: str) -> str:
    return f"{prefix}/{stream}/{zone}/{class_name}"


def discovery_messages(
    cfg: MqttConfig, stream: str, zones: Sequence[ZoneConfig]
) -> dict[str, dict[str, Any]]:
    """{config topic: payload} of a stream's Home Assistant entities: one device per stream;
    per zone and rule class an occupancy binary_sensor and a coverage sensor in %."""
    device = {
        "identifiers": [_ha_id(stream)],
        "name": f"segstream {stream}",
        "manufacturer": "segstream",
        "model": "segmentation stream",
    }
    out: dict[str, dict[str, Any]] = {}
    for z in zones:
        for r in z.rules:
            base = state_topic(cfg.topic_prefix, stream, z.name, r.class_name)
            uid = _ha_id(stream, z.name, r.class_name)
            common = {"availability_topic": f"{cfg.topic_prefix}/available", "device": device}
            out[f"{cfg.discovery_prefix}/binary_sensor/{uid}/config"] = {
                "name": f"{z.name} {r.class_name}",
                "unique_id": f"{uid}_active",
                "state_topic": f"{base}/active",
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "occupancy",
                **common,
            }
            out[f"{cfg.discovery_prefix}/sensor/{uid}_coverage/config"] = {
                "name": f"{z.name} {r.class_name} coverage",
                "unique_id": f"{uid}_coverage",
                "state_topic": base,
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "value_template": "{{ (value | float * 100) | round(1) }}",
                **common,
            }
    return out


class MqttTarget(OutboxTarget):
    def __init__(self, cfg: MqttConfig, store: EventStore, observer: EventsObserver) -> None:
        super().__init__("mqtt", store, observer)
        self.cfg = cfg
        self.connected = False
        self.available_topic = f"{cfg.topic_prefix}/available"
        self._lock = threading.Lock()  # zones and coverage come from other threads
        self._zones: dict[str, list[ZoneConfig]] = {}
        self._cleared: set[str] = set()  # retained topics to empty (removed zones)
        self._coverage: dict[str, str] = {}  # topic -> newest value
        self._covered: dict[tuple[str, str], set[str]] = {}  # (stream, zone) -> class topics
        self._sent: dict[str, str] = {}  # topic -> value the broker retains
        self._discovery_due = asyncio.Event()

    # -- from the pipeline and the service (any thread, never blocks) -------------------------

    def set_zones(self, stream: str, zones: Sequence[ZoneConfig]) -> None:
        """A stream's zones (empty: the stream is gone): discovery entities follow; those of
        a removed zone or rule are cleared (empty retained payloads)."""
        with self._lock:
            old = discovery_messages(self.cfg, stream, self._zones.get(stream, []))
            new = discovery_messages(self.cfg, stream, zones)
            kept = {z.name for z in zones}
            for (s, zone), topics in list(self._covered.items()):
                if s == stream and zone not in kept:
                    self._cleared |= topics
                    del self._covered[(s, zone)]
                    for t in topics:
                        self._coverage.pop(t, None)
            if self.cfg.homeassistant:
                self._cleared |= old.keys() - new.keys()
            if zones:
                self._zones[stream] = list(zones)
            else:
                self._zones.pop(stream, None)
        self._kick()

    def coverage(self, stream: str, zone: str, values: dict[str, float]) -> None:
        """A zone's coverage per class; a class that stopped occurring reads 0."""
        with self._lock:
            prefix = self.cfg.topic_prefix
            topics = {state_topic(prefix, stream, zone, c): v for c, v in values.items()}
            known = self._covered.setdefault((stream, zone), set())
            for t in known - topics.keys():
                self._coverage[t] = "0"
            known |= topics.keys()
            for t, v in topics.items():
                self._coverage[t] = f"{v:.4f}"

    def _kick(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._discovery_due.set)

    # -- the connection ---------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        u = urlsplit(self.cfg.url)
        tls = ssl.create_default_context() if u.scheme == "mqtts" else None
        v5 = self.cfg.protocol == "5"
        assert u.hostname is not None
        return aiomqtt.Client(
            u.hostname,
            u.port or (8883 if tls else 1883),
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            identifier=self.cfg.client_id or f"segstream-{socket.gethostname()}",
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.available_topic, b"offline", qos=1, retain=True),
            clean_session=None if v5 else True,
            keepalive=self.cfg.keepalive_s,
            tls_context=tls,
            timeout=PUBLISH_TIMEOUT_S,
        )

    async def run(self, retry_max_s: float | None = None) -> None:
        """Connect, publish, reconnect with capped backoff, for ever (cancel to stop: the
        availability goes offline first)."""
        await super().run(self.cfg.reconnect_max_s if retry_max_s is None else retry_max_s)

    async def serve(self) -> None:
        async with self._client() as client:
            await self._session(client)

    def disconnected(self) -> None:
        self.connected = False

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(self.available_topic, b"online", qos=1, retain=True)
        self.connected = True
        self._sent.clear()  # a restarted broker may have lost its retained values
        try:
            if self.cfg.homeassistant:
                await client.subscribe(f"{self.cfg.discovery_prefix}/status", qos=1)
            self._discovery_due.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.pump(lambda row: self._send(client, row)))
                tg.create_task(self._coverage_loop(client))
                tg.create_task(self._discovery_loop(client))
                tg.create_task(self._listen(client))
        except asyncio.CancelledError:
            await asyncio.shield(self._goodbye(client))
            raise

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(self.available_topic, b"offline", qos=1, retain=True, timeout=2)
        self.connected = False

    async def _send(self, client: aiomqtt.Client, row: OutboxRow) -> None:
        try:
            await client.publish(f"{self.cfg.topic_prefix}/events", row.payload.encode(), qos=1)
            if row.type in ("new", "end"):
                ev = json.loads(row.payload)["after"]
                topic = state_topic(self.cfg.topic_prefix, ev["stream"], ev["zone"], ev["class"])
                on = b"ON" if row.type == "new" else b"OFF"
                await client.publish(f"{topic}/active", on, qos=1, retain=True)
        except aiomqtt.MqttError:
            self.observer.delivery(self.name, "failed")
            raise
        self.observer.delivery(self.name, "delivered")

    async def _coverage_loop(self, client: aiomqtt.Client) -> None:
        while True:
            started = time.monotonic()
            with self._lock:
                due = [(t, v) for t, v in self._coverage.items() if self._sent.get(t) != v]
            for topic, value in due:
                await client.publish(topic, value.encode(), qos=0, retain=True)
                self._sent[topic] = value
            spent = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.cfg.coverage_interval_s - spent))

    async def _discovery_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await self._discovery_due.wait()
            self._discovery_due.clear()
            with self._lock:
                cleared, self._cleared = self._cleared, set()
                msgs: dict[str, dict[str, Any]] = {}
                if self.cfg.homeassistant:
                    for stream, zones in self._zones.items():
                        msgs |= discovery_messages(self.cfg, stream, zones)
            try:
                for topic in sorted(cleared):
                    await client.publish(topic, b"", qos=1, retain=True)
                    self._sent.pop(topic, None)
                for topic, payload in msgs.items():
                    await client.publish(topic, json.dumps(payload).encode(), qos=1, retain=True)
            except aiomqtt.MqttError:
                with self._lock:
                    self._cleared |= cleared  # again on the next connection
                raise

    async def _listen(self, client: aiomqtt.Client) -> None:
        """Home Assistant announces `online` on <discovery_prefix>/status when it (re)starts:
        it then needs the discovery payloads again."""
        async for msg in client.messages:
            if msg.payload == b"online":
                self._discovery_due.set()
