"""What the cluster's events hub takes: changes per second into its store, and MQTT messages per
second out of its outbox, at 1000 streams.

    python scripts/bench_events_hub.py [--streams 1000] [--nodes 4] [--ticks 10]

Without Ray: the hub's own class (`stream/cluster/events_hub.py`) on this process's loop, as the
actor runs it, with its SQLite store in a temporary folder and a real Mosquitto broker (Debian's
`mosquitto`) on a free loopback port; node features (`ForwardingEventsFeature`, the nodes' own
code) on their forwarder threads send to it as through Ray (minus Ray's transport). Every
stream has one zone and a rule that opens and ends an event at each alternate mask, so each
tick is one change per stream (new or end). Measured: from the first mask to the last change
stored (every node flushed), and from then until the hub's outbox is drained to the broker."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segstream.stream.cluster.events_hub import EventsHub
from segstream.stream.config import AppConfig
from segstream.stream.events.config import EventsConfig, ZoneConfig
from segstream.stream.events.forward import ForwardingEventsFeature

LABELS = ["background", "person"]
ZONE = ZoneConfig.model_validate(
    {
        "name": "floor",
        "polygon": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
        "rules": [{"class": "person", "above": 0.1, "for_s": 0.0, "clear_s": 0.0}],
    }
)
EMPTY, BUSY = np.zeros((33, 33), np.uint8), np.ones((33, 33), np.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker(port: int, folder: Path) -> subprocess.Popen[bytes]:
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    raise RuntimeError("mosquitto did not start")


def delivered_now(counts: object) -> int:
    return int(getattr(counts, "deliveries", {}).get(("mqtt", "delivered"), 0))


async def main(streams: int, nodes: int, ticks: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="bench-events-hub-"))
    port = free_port()
    mqtt = broker(port, folder)
    cfg = AppConfig.model_validate(
        {
            "events": {"database": f"sqlite:///{folder / 'hub.db'}"},
            "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "client_id": "bench-hub"},
            "streams": [],
        }
    )
    hub = EventsHub(cfg.model_dump_json())
    await hub.ready()
    loop = asyncio.get_running_loop()

    def send(batch: object) -> str:
        return str(asyncio.run_coroutine_threadsafe(hub.ingest(batch), loop).result(60))  # type: ignore[arg-type]

    feats = []
    for n in range(nodes):
        f = ForwardingEventsFeature(
            EventsConfig(), labels=LABELS, send=send, node=f"node{n}", clock=lambda: 0.0
        )
        await f.start()
        feats.append(f)
    ids = [f"cam{i:04d}" for i in range(streams)]
    for i, sid in enumerate(ids):
        feats[i % nodes].set_stream(sid, [ZONE])
    for f in feats:
        assert await asyncio.to_thread(f.forwarder.flush, 60)  # the claims

    start = time.time() - ticks  # events of the last seconds (retention keeps them)

    def feed() -> None:
        for t in range(ticks):
            for i, sid in enumerate(ids):
                feats[i % nodes].on_mask(sid, BUSY if t % 2 == 0 else EMPTY, now=start + t)

    t0 = time.monotonic()
    await asyncio.to_thread(feed)
    for f in feats:
        assert await asyncio.to_thread(f.forwarder.flush, 300)
    stored_s = time.monotonic() - t0
    changes = streams * ticks
    counts = hub.feature.observer
    delivered0 = delivered_now(counts)
    t1 = time.monotonic()
    # Each change goes out as its change-feed message and its zone's active state (ON/OFF).
    while delivered_now(counts) < changes and time.monotonic() - t1 < 300:
        await asyncio.sleep(0.05)
    drain_s = time.monotonic() - t1
    delivered = delivered_now(counts)
    for f in feats:
        await f.close()
    await hub.close()
    mqtt.terminate()
    mqtt.wait(10)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "streams": streams,
        "nodes": nodes,
        "changes": changes,
        "stored_s": round(stored_s, 2),
        "changes_stored_per_s": round(changes / stored_s),
        "mqtt_delivered": delivered,
        "mqtt_delivered_while_storing": delivered0,
        "outbox_drain_s": round(drain_s, 2),
        "mqtt_changes_per_s": round(delivered / (stored_s + drain_s)),
        "mqtt_messages_per_s": round(2 * delivered / (stored_s + drain_s)),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--ticks", type=int, default=10)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main(a.streams, a.nodes, a.ticks))))
    sys.exit(0)
