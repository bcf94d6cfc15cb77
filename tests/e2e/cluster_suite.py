"""Cluster mode on a real Ray cluster: a head and two worker nodes (one CPU each, a small object
store) from ray.cluster_utils, the real model on each node, file sources at 320x240 and one
inference a second, the gateway in this process, a real Prometheus server.

Run through tests/test_cluster.py, which starts pytest on this file inside a network
namespace of its own (unshare -n, lo up): Ray binds to the machine's own address otherwise,
and there every Ray address is 127.0.0.1. The tests run in order on one cluster; near the
end one node is removed, another joins, and a node service is silenced. Stream s1 has a zone
with a person rule from the second test on: its events are stored and served at the
gateway and published once on a real Mosquitto broker, through all those moves."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
import paho.mqtt.client as paho
import pytest
from PIL import Image
from support.api_suite import (  # noqa: F401  (the shared API tests, against the gateway here)
    ApiTarget,
    test_bad_streams_are_refused_naming_the_key,
    test_openapi_shows_the_states,
    test_pictures_and_a_share_url,
    test_predict_and_model_facts,
    test_stream_crud_and_its_error_bodies,
    test_streams_past_max_streams_are_refused,
)
from support.events_peers import Mosquitto
from support.peers import free_port, stop_process, wait_http
from support.service_proc import colour_pixels, decode, read_part

pytestmark = pytest.mark.skipif(
    os.environ.get("SEGSTREAM_NETNS") != "1",
    reason="run by tests/test_cluster.py in its own network namespace",
)

ray = pytest.importorskip("ray")

from aiohttp import web  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from segstream.stream.auth import Authenticator, TokenStore  # noqa: E402
from segstream.stream.cluster.controller import start_controller  # noqa: E402
from segstream.stream.cluster.gateway import ClusterClient, make_gateway_app  # noqa: E402
from segstream.stream.cluster.runtime import CONTROLLER_NAME, EVENTS_HUB_NAME  # noqa: E402
from segstream.stream.config import AppConfig  # noqa: E402
from segstream.stream.mosaic import STATE_BGR, grid, picture_size  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "segstream-test"
PERSON_RGB = (192, 128, 128)  # Pascal VOC palette, class 15
SLOTS = 1.0  # one core per worker node
MiB = 2**20
MAX_STREAMS = 6
SIGNING_KEY = b"k" * 32  # the gateway's key for sessions and signed URLs (nodes share it)


@pytest.fixture(scope="module")
def clip(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clips") / "vtest-320x240.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-y",
            "-loglevel",
            "error",
            "-i",
            str(shared_dir / "data/video/vtest.avi"),
            "-t",
            "6",
            "-vf",
            "scale=320:240",
            "-an",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-g",
            "10",
            "-pix_fmt",
            "yuv420p",
            str(out),
        ],
        check=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Ray's GCS fault tolerance: the head's GCS keeps its tables in this Redis (Ray's
    documented set-up: RAY_REDIS_ADDRESS when the head starts), so a restarted GCS finds
    the cluster as it was."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)),
            *("--save", "", "--appendonly", "yes", "--protected-mode", "yes"),
        ],
        stdout=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    wait_until(lambda: _redis_pong(port), 10, step=0.1)
    assert _redis_pong(port), "redis-server did not start"
    yield address
    stop_process(proc)


def _redis_pong(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


@pytest.fixture(scope="module")
def cluster(segstream_home: Path, redis: str) -> Iterator[Cluster]:
    # The nodes' processes inherit this environment: SEGSTREAM_HOME (the model) included.
    t0 = time.monotonic()
    os.environ["RAY_REDIS_ADDRESS"] = redis  # read by the head only, when it starts
    try:
        c = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "object_store_memory": 80 * MiB,
            },
        )
    finally:
        del os.environ["RAY_REDIS_ADDRESS"]
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=80 * MiB, resources={"segstream_slots": SLOTS})
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    print(f"Ray cluster (head + 2 workers, GCS state in Redis) up in {time.monotonic() - t0:.1f} s")
    yield c
    with_controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    ray.kill(with_controller, no_restart=True)
    ray.shutdown()
    c.shutdown()


class Gateway:
    """The gateway app on a loopback port, served from a thread of its own."""

    def __init__(self, cfg: AppConfig, state_file: Path, auth: Authenticator | None = None) -> None:
        self.cfg, self.state_file, self.auth = cfg, state_file, auth
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self) -> None:
        handle = start_controller(self.cfg, str(self.state_file), SIGNING_KEY)
        info = ray.get(handle.info.remote(), timeout=60)
        app = make_gateway_app(self.cfg, ClusterClient(handle, info["secret"]), self.auth)

        async def up() -> web.AppRunner:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self.runner = self._run(up())

    def stop(self) -> None:
        if self.runner is not None:
            self._run(self.runner.cleanup())
            self.runner = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url(path), data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype and raw else raw)

    def streams(self) -> dict[str, dict[str, Any]]:
        status, body = self.call("GET", "/api/streams")
        assert status == 200, body
        return {s["id"]: s for s in body["streams"]}


class Feed:
    """Every message under segstream/# and homeassistant/# (paho, a thread of its own)."""

    def __init__(self, port: int, name: str) -> None:
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.msgs.append(
            (m.topic, m.payload, bool(m.retain))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe([("segstream/#", 1), ("homeassistant/#", 1)])
        self.subscribed.set()

    def changes(self, stream: str) -> list[dict[str, Any]]:
        out = [json.loads(p) for t, p, _ in list(self.msgs) if t == "segstream/events"]
        return [c for c in out if c["after"]["stream"] == stream]

    def last(self, topic: str) -> bytes | None:
        got = [p for t, p, _ in list(self.msgs) if t == topic]
        return got[-1] if got else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Hooks:
    """A webhook receiver (http.server, a thread of its own): every POST, signature checked."""

    SECRET = "cluster-hook-secret"

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                want = "sha256=" + hmac.new(hooks.SECRET.encode(), body, "sha256").hexdigest()
                ok = hmac.compare_digest(self.headers["X-Segstream-Signature"], want)
                if ok:
                    hooks.got.append(
                        json.loads(body) | {"seq": self.headers["X-Segstream-Delivery"]}
                    )
                self.send_response(200 if ok else 401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def changes(self, stream: str) -> list[dict[str, Any]]:
        return [c for c in list(self.got) if c["after"]["stream"] == stream]


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.server.shutdown()


@pytest.fixture(scope="module")
def feed(broker: Mosquitto) -> Iterator[Feed]:
    """Subscribed before the cluster publishes anything: it sees every message."""
    f = Feed(broker.port, "cluster-feed")
    yield f
    f.close()


@pytest.fixture(scope="module")
def gateway(
    cluster: Cluster,
    clip: Path,
    tmp_path_factory: pytest.TempPathFactory,
    broker: Mosquitto,
    feed: Feed,
    hooks: Hooks,
) -> Iterator[Gateway]:
    events_db = tmp_path_factory.mktemp("events") / "events.db"
    cfg = AppConfig.model_validate(
        {
            "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
            "sources": {"allow_local": [str(clip.parent)], "max_streams": MAX_STREAMS},
            "render": {"alpha": 1.0, "classes": ["person"]},
            "cluster": {"namespace": NAMESPACE, "lost_after_s": 3.0},
            # The cluster's one event store and publisher (the events hub on the head).
            "events": {"database": f"sqlite:///{events_db}"},
            "mqtt": {
                "url": broker.url,
                "client_id": "segstream-cluster",
                "homeassistant": True,
                "reconnect_max_s": 0.5,
            },
            "webhooks": [{"url": hooks.url, "secret": Hooks.SECRET}],
            "streams": [],
        }
    )
    gw = Gateway(cfg, tmp_path_factory.mktemp("state") / "streams.json")
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def target(gateway: Gateway, clip: Path) -> ApiTarget:
    """The shared API suite's view of the gateway."""
    return ApiTarget(f"http://127.0.0.1:{gateway.port}", str(clip), MAX_STREAMS)


def wait_until(pred: Any, timeout: float, step: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def worker_ids(cluster: Cluster) -> set[str]:
    return {n.node_id[:12] for n in cluster.worker_nodes}


STREAMS = ["s1", "s2", "s3", "s4"]


def test_streams_spread_over_both_worker_nodes(
    cluster: Cluster, gateway: Gateway, clip: Path, wrong_token_driver: Any
) -> None:
    t0 = time.monotonic()

    def nodes_ready() -> bool:  # on a loaded machine one node service may start much later
        status, body = gateway.call("GET", "/api/nodes")
        ready = {n["id"] for n in body["nodes"] if n["state"] == "up" and n["ready"]}
        return status == 200 and ready == worker_ids(cluster)

    assert wait_until(nodes_ready, 90), gateway.call("GET", "/api/nodes")
    for sid in STREAMS:
        status, body = gateway.call(
            "POST", "/api/streams", {"id": sid, "source": str(clip), "infer_fps": 1}
        )
        assert status == 201, body
        assert body["state"] in ("starting", "pending"), body
    status, body = gateway.call("POST", "/api/streams", {"id": "s1", "source": str(clip)})
    assert status == 409 and "exists" in body["error"]
    status, body = gateway.call("POST", "/api/streams", {"id": "x", "source": "/etc/passwd"})
    assert status == 422 and body["details"][0]["loc"] == "source", body
    status, body = gateway.call(
        "POST", "/api/streams", {"id": "x", "source": str(clip), "classes": ["unicorn"]}
    )
    assert status == 422 and body["details"][0]["loc"] == "classes", body

    def all_live() -> bool:
        s = gateway.streams()
        return set(s) == set(STREAMS) and all(v["state"] == "live" for v in s.values())

    assert wait_until(all_live, 90), gateway.streams()
    print(
        f"4 streams live through the gateway {time.monotonic() - t0:.1f} s after the first "
        "POST (node services start and load the model meanwhile)"
    )
    streams = gateway.streams()
    nodes = [s["node"] for s in streams.values()]
    assert set(nodes) == worker_ids(cluster), nodes
    assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2], nodes
    status, body = gateway.call("GET", "/api/nodes")
    assert status == 200 and {n["id"] for n in body["nodes"]} == worker_ids(cluster)
    assert all(n["state"] == "up" and n["ready"] and n["streams"] == 2 for n in body["nodes"])
    status, one = gateway.call("GET", "/api/streams/s1")
    assert status == 200 and one["node"] == streams["s1"]["node"] and one["width"] == 320


def test_mjpeg_of_a_stream_on_another_node_shows_the_overlay(gateway: Gateway) -> None:
    """The gateway runs on the head node; every stream runs on a worker node."""
    with urllib.request.urlopen(gateway.url("/streams/s3/mjpeg"), timeout=30) as r:
        assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        frames = [decode(read_part(r)) for _ in range(6)]
    assert all(f.shape == (240, 320, 3) for f in frames)
    person = [colour_pixels(f, PERSON_RGB) for f in frames]
    assert max(person) > 40, person
    status, jpeg = gateway.call("GET", "/streams/s3/snapshot.jpg")
    assert status == 200 and decode(jpeg).shape == (240, 320, 3)
    status, png = gateway.call("GET", "/streams/s3/mask.png")
    mask = Image.open(io.BytesIO(png))
    assert status == 200 and mask.mode == "P" and 15 in np.asarray(mask)
    status, model = gateway.call("GET", "/api/model")
    assert status == 200 and model["labels"][15] == "person"
    status, _ = gateway.call("GET", "/streams/nope/mjpeg")
    assert status == 404


# A zone over the whole picture, a person rule that opens at once and stays open while people
# walk through the looped clip (they always do), so that each move meets an open event.
ZONE = {
    "name": "floor",
    "polygon": [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]],
    "rules": [{"class": "person", "above": 0.005, "for_s": 0.0, "clear_s": 60.0}],
}
HA_CONFIG = "homeassistant/binary_sensor/segstream_s1_floor_person/config"


def gateway_events(gateway: Gateway, stream: str) -> list[dict[str, Any]]:
    status, body = gateway.call("GET", f"/api/events?stream={stream}&limit=1000")
    assert status == 200, body
    return list(body["events"])


def test_events_of_a_zone_are_stored_served_and_published_once_at_the_gateway(
    gateway: Gateway, feed: Feed
) -> None:
    """s1 gets a zone: its node computes coverage and rules and forwards the event to the
    cluster's events hub, which the gateway's /api/events serves (media included) and which
    publishes it once on MQTT, with Home Assistant discovery; the zone's coverage shows in
    the stream's status at the gateway."""
    t0 = time.monotonic()
    patch = {"zones": [ZONE], "record_clips": True}  # clips: recorded on the node, kept at the hub
    status, body = gateway.call("PATCH", "/api/streams/s1", patch)
    assert status == 200 and body["zones"][0]["name"] == "floor", body
    found = wait_until(lambda: gateway_events(gateway, "s1"), 60)
    print(f"an event of s1 at the gateway {time.monotonic() - t0:.1f} s after the PATCH")
    assert len(found) == 1 and found[0]["end"] is None, found
    ev = found[0]
    assert (ev["zone"], ev["class"]) == ("floor", "person") and ev["peak_coverage"] > 0.005, ev
    status, one = gateway.call("GET", f"/api/events/{ev['id']}")
    assert status == 200 and one["id"] == ev["id"] and one["stream"] == "s1", one
    jpeg = wait_until(lambda: (r := gateway.call("GET", ev["snapshot_url"]))[0] == 200 and r, 20)
    assert jpeg and decode(jpeg[1]).shape == (240, 320, 3), jpeg
    status, png = gateway.call("GET", ev["mask_url"])
    assert status == 200 and 15 in np.asarray(Image.open(io.BytesIO(png))), status
    status, body = gateway.call("GET", "/api/events/0123abcd")
    assert status == 404 and "unknown event" in body["error"], body
    status, body = gateway.call("GET", "/api/events?cursor=nonsense")
    assert status == 400, body

    def published() -> list[dict[str, Any]]:
        return [c for c in feed.changes("s1") if c["after"]["id"] == ev["id"]]

    assert wait_until(published, 20), feed.msgs[-20:]
    assert [c["type"] for c in published()] == ["new"], published()
    assert wait_until(lambda: feed.last(HA_CONFIG), 20), [t for t, _, _ in feed.msgs]
    assert json.loads(feed.last(HA_CONFIG) or b"{}")["device_class"] == "occupancy"
    active = "segstream/s1/floor/person/active"
    assert wait_until(lambda: feed.last(active) == b"ON", 10), feed.last(active)
    assert wait_until(lambda: feed.last("segstream/s1/floor/person"), 20)

    zone = wait_until(lambda: gateway.streams()["s1"]["zones"][0]["coverage"], 20)
    # Every class that occurs (background included) plus the rule's: shares summing to 1.
    assert zone and "person" in zone and abs(sum(zone.values()) - 1) < 0.01, zone
    status, one = gateway.call("GET", "/api/streams/s1")
    assert status == 200 and one["zones"][0]["active"] == ["person"], one["zones"]

    def delivered() -> float:
        status, text = gateway.call("GET", "/metrics")
        assert status == 200, text
        key = 'segstream_event_deliveries_total{outcome="delivered",target="mqtt"} '
        line = next((ln for ln in text.decode().splitlines() if ln.startswith(key)), "x 0")
        return float(line.rpartition(" ")[2])

    assert wait_until(lambda: delivered() >= 1, 10), delivered()
    status, health = gateway.call("GET", "/healthz")
    events_health = (health["events"]["status"], health["events"]["mqtt"])
    assert status == 200 and events_health == ("ok", "connected"), health


def test_a_restarted_events_hub_ends_the_open_event_once_and_serves_again(
    gateway: Gateway, feed: Feed
) -> None:
    """The events hub dies (Ray restarts it): like a restarted node it ends the open event
    with `restart`, published once; the node notices the new hub and claims s1 again (Home
    Assistant discovery sent again); the gateway serves the events again."""
    hub = ray.get_actor(EVENTS_HUB_NAME, namespace=NAMESPACE)
    old = ray.get(hub.ready.remote(), timeout=30)
    (ev,) = [e for e in gateway_events(gateway, "s1") if e["end"] is None]
    configs = len([p for t, p, _ in list(feed.msgs) if t == HA_CONFIG and p])
    t0 = time.monotonic()
    ray.kill(hub, no_restart=False)

    def restarted() -> bool:
        try:
            return bool(ray.get(hub.ready.remote(), timeout=5) != old)
        except Exception:
            return False

    assert wait_until(restarted, 60)

    def served() -> dict[str, Any] | None:  # 503 while the gateway finds the hub again
        status, body = gateway.call("GET", f"/api/events/{ev['id']}")
        return body if status == 200 else None

    ended = wait_until(served, 30)
    print(f"events hub restarted and serving again in {time.monotonic() - t0:.1f} s")
    assert ended["end_reason"] == "restart" and ended["end"] == ended["peak_at"], ended

    def changes() -> list[str]:
        return [c["type"] for c in feed.changes("s1") if c["after"]["id"] == ev["id"]]

    assert wait_until(lambda: changes()[-1:] == ["end"], 20), changes()
    assert changes().count("end") == 1 and changes()[0] == "new", changes()

    def claimed_again() -> bool:
        return len([p for t, p, _ in list(feed.msgs) if t == HA_CONFIG and p]) > configs

    assert wait_until(claimed_again, 20), [t for t, _, _ in feed.msgs[-20:]]

    # The node's rule still holds the event that the hub ended: the zone removed and added
    # again starts it afresh (and a new event opens), so that the moves below meet one.
    status, _ = gateway.call("PATCH", "/api/streams/s1", {"zones": []})
    assert status == 200 and wait_until(lambda: gateway.streams()["s1"]["zones"] == [], 20)
    # That ended the node's clip of the event: recorded on the node, kept and served at the
    # gateway (the hub's media folder), H.264 that decodes.
    with_clip = wait_until(lambda: (served() or {}).get("clip_url"), 30)
    status, mp4 = gateway.call("GET", with_clip)
    assert status == 200 and mp4[4:8] == b"ftyp", mp4[:16]
    with av.open(io.BytesIO(mp4)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    # A clip, not a still: its length follows the event's (one frame per inference, fewer
    # on a loaded machine: 4 seen in a run beside another job's tests).
    assert frames >= 2, frames
    status, _ = gateway.call("PATCH", "/api/streams/s1", {"zones": [ZONE]})
    assert status == 200
    fresh = wait_until(lambda: [e for e in gateway_events(gateway, "s1") if e["end"] is None], 30)
    assert fresh and fresh[0]["id"] != ev["id"], fresh


def test_a_stream_that_fits_nowhere_is_pending(gateway: Gateway, clip: Path) -> None:
    """An uncapped stream costs 0.945 of a core: no node (0.38 of its one slot used) has room.
    It waits as `pending` and moves nothing; removed, it is gone."""
    before = {sid: s["node"] for sid, s in gateway.streams().items()}
    status, body = gateway.call(
        "POST", "/api/streams", {"id": "big", "source": str(clip), "infer_fps": 0}
    )
    assert status == 201 and body["state"] == "pending", body
    try:
        big = gateway.streams()["big"]
        assert (big["state"], big["node"]) == ("pending", None), big
        assert big["reason"] == "no node has room for it", big
        status, text = gateway.call("GET", "/metrics")
        assert b'segstream_cluster_streams{phase="pending"} 1.0' in text, text
        assert {sid: s["node"] for sid, s in gateway.streams().items() if sid != "big"} == before
    finally:
        status, _ = gateway.call("DELETE", "/api/streams/big")
    assert status == 204 and set(gateway.streams()) == set(STREAMS)


@pytest.fixture(scope="module")
def wrong_token_driver(cluster: Cluster) -> Iterator[tuple[subprocess.Popen[str], float]]:
    """A driver with another token, started with the first test: Ray's driver tries for
    about 20 s before it gives up, time the tests in between use."""
    code = f"import ray; ray.init(address={cluster.address!r}); print('connected')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=dict(os.environ, RAY_AUTH_TOKEN="0" * 64),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc, time.monotonic()
    proc.kill()
    proc.wait()


def test_a_wrong_ray_token_is_refused(
    wrong_token_driver: tuple[subprocess.Popen[str], float],
) -> None:
    """Nothing drives the cluster without its token: a driver with another one is refused
    with Ray's authentication error (this process, with the token, is a driver)."""
    proc, t0 = wrong_token_driver
    out, _ = proc.communicate(timeout=120)
    why = next((ln for ln in reversed(out.splitlines()) if "uthenticat" in ln), "")
    print(f"a driver with a wrong Ray token refused in {time.monotonic() - t0:.1f} s: {why[:160]}")
    assert proc.returncode != 0 and "connected" not in out.splitlines(), out[-3000:]
    assert "AuthenticationError" in why and "token" in why, out[-3000:]


def test_live_page_websocket_and_mosaic_through_the_gateway(gateway: Gateway) -> None:
    """The page's /ws at the gateway: frames of a stream on a worker node (relayed from that
    node's own /ws) decode as JPEG, and the status lists the streams of both nodes. The mosaic
    of one node's streams is relayed; across nodes the gateway composes the nodes' tiles."""
    import aiohttp

    streams = gateway.streams()
    node = streams["s3"]["node"]

    async def watch() -> tuple[list[bytes], dict[str, Any]]:
        frames: list[bytes] = []
        status: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url("/ws")) as ws:
            await ws.send_str(json.dumps({"watch": ["s3"], "fps": 5}))
            deadline = time.monotonic() + 30
            while (len(frames) < 3 or not status) and time.monotonic() < deadline:
                msg = await ws.receive(timeout=10)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    kind, n = msg.data[0], msg.data[1]
                    assert (kind, msg.data[2 : 2 + n]) == (1, b"s3")
                    frames.append(msg.data[6 + n :])
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data["type"] == "status":
                        status = data
                else:
                    raise AssertionError(msg)
        return frames, status

    t0 = time.monotonic()
    frames, status = asyncio.run(watch())
    print(
        f"/ws at the gateway: {len(frames)} frames of s3 (node {node}) in "
        f"{time.monotonic() - t0:.1f} s"
    )
    assert len(frames) >= 3 and all(decode(f).shape == (240, 320, 3) for f in frames)
    assert {s["id"]: s["node"] for s in status["streams"]} == {
        sid: s["node"] for sid, s in streams.items()
    }
    assert len({s["node"] for s in status["streams"]}) == 2

    same = ",".join(sid for sid, s in streams.items() if s["node"] == node)
    with urllib.request.urlopen(gateway.url(f"/mosaic/mjpeg?streams={same}"), timeout=30) as r:
        assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        assert decode(read_part(r)).ndim == 3
    mosaic_across_nodes(gateway, sorted(streams))


def mosaic_across_nodes(gateway: Gateway, ids: list[str]) -> None:
    """Four streams on two nodes in one MJPEG composed at the gateway: every tile shows video
    (the placeholder's picture is black) and the node's green `live` square on its label."""
    assert len(ids) == 4 and len({gateway.streams()[s]["node"] for s in ids}) == 2
    cols, rows, (tw, th) = grid(len(ids), None, 640)
    ph = picture_size((tw, th))[1]
    bar = th - ph

    def tiles(img: np.ndarray) -> list[tuple[float, bool]]:
        out = []
        for i in range(len(ids)):
            r, c = divmod(i, cols)
            pic = img[r * th : r * th + ph, c * tw : (c + 1) * tw]
            mark = img[r * th + th - bar // 2, c * tw + bar // 2].astype(int)
            live = int(np.abs(mark - STATE_BGR["live"]).max()) <= 40
            out.append((float(pic.std()), live))
        return out

    t0 = time.monotonic()
    url = gateway.url(f"/mosaic/mjpeg?streams={','.join(ids)}&width=640")
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        parts = 0
        while True:
            img = decode(read_part(r))
            parts += 1
            assert img.shape == (rows * th, cols * tw, 3)
            seen = tiles(img)
            if all(std > 10 and live for std, live in seen):
                break
            assert time.monotonic() - t0 < 60, f"tiles (picture std, live label): {seen}"
    print(
        f"mosaic of {ids} over two nodes at the gateway: every tile live after {parts} parts, "
        f"{time.monotonic() - t0:.1f} s"
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None


def test_auth_and_viewers_sent_straight_to_the_node(gateway: Gateway, tmp_path: Path) -> None:
    """A second gateway with tokens and `direct_viewers`: the single node's auth at the
    gateway; a viewer is redirected to the owning node with a signed URL that the node takes,
    and the node refuses anything else."""
    tokens = TokenStore(tmp_path / "tokens.json")
    viewer = tokens.add("cam-viewer", "viewer")
    cfg = gateway.cfg.model_copy(
        update={"cluster": gateway.cfg.cluster.model_copy(update={"direct_viewers": True})}
    )
    gw = Gateway(cfg, gateway.state_file, Authenticator(tokens, SIGNING_KEY))
    gw.start()
    try:
        status, body = gw.call("GET", "/api/streams")
        assert status == 401, body
        status, body = gw.call(
            "POST", "/api/streams", {"id": "x", "source": "rtsp://a/b"}, token=viewer
        )
        assert status == 403, body
        status, body = gw.call("GET", "/api/streams/s3", token=viewer)
        assert status == 200 and body["state"] == "live"
        req = urllib.request.Request(
            gw.url("/streams/s3/snapshot.jpg"), headers={"Authorization": f"Bearer {viewer}"}
        )
        try:
            urllib.request.build_opener(_NoRedirect).open(req, timeout=10)
            raise AssertionError("no redirect")
        except urllib.error.HTTPError as e:
            assert e.code == 307, e.read()
            location = e.headers["Location"]
        node = urllib.parse.urlsplit(location)
        assert node.port != gw.port and "sig=" in location
        with urllib.request.urlopen(location, timeout=10) as r:  # no token: the signature
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
        for bad in (location.replace("sig=", "sig=x"), f"http://{node.netloc}/api/streams"):
            try:
                urllib.request.urlopen(bad, timeout=10)
                raise AssertionError(f"{bad} answered")
            except urllib.error.HTTPError as e:
                assert e.code == 401, (bad, e.code)
    finally:
        gw.stop()


def test_prometheus_discovers_and_scrapes_both_nodes(
    gateway: Gateway, cluster: Cluster, tmp_path: Path
) -> None:
    status, groups = gateway.call("GET", "/api/sd")
    assert status == 200 and {g["labels"]["node"] for g in groups} == worker_ids(cluster)
    exe = "prometheus"
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: segstream-nodes\n"
        "    http_sd_configs:\n"
        f"      - url: {gateway.url('/api/sd')}\n"
        "        refresh_interval: 1s\n"
        "  - job_name: segstream-gateway\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{gateway.port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 30)

        def query(q: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)["data"]["result"]

        def per_node() -> dict[str, float] | None:
            got = {
                r["metric"].get("node"): float(r["value"][1])
                for r in query('sum by (node) (segstream_stream_up{job="segstream-nodes"})')
            }
            return got if set(got) == worker_ids(cluster) else None

        got = wait_until(per_node, 30, step=0.5)
        assert got and all(v == 2 for v in got.values()), query("up")
        cover = 'segstream_zone_coverage_ratio{stream="s1",zone="floor",class_name="person"}'
        assert wait_until(lambda: query(cover), 30, step=0.5), query(cover)
        up = query('up{job="segstream-nodes"}')
        assert {r["metric"]["node"] for r in up if r["value"][1] == "1"} == worker_ids(cluster)

        # The Grafana dashboard's queries are valid and see the cluster.
        dash = json.loads((REPO / "deploy/grafana-cluster.json").read_text())
        exprs = {
            p["title"]: p["targets"][0]["expr"].replace("$nodes_job", "segstream-nodes")
            for p in dash["panels"]
        }
        quiet = {"Reconnects (top 10 streams, 15 min)"}  # no reconnect happens here

        def empty() -> list[str]:  # rates answer once two samples are in
            return [t for t, e in exprs.items() if t not in quiet and not query(e)]

        assert wait_until(lambda: not empty(), 30, step=0.5), empty()
    finally:
        stop_process(proc)
    status, text = gateway.call("GET", "/metrics")
    assert status == 200 and b'segstream_cluster_nodes{state="up"} 2.0' in text, text
    per_node = {
        line.split('node="')[1].split('"')[0]: float(line.rpartition(" ")[2])
        for line in text.decode().splitlines()
        if line.startswith("segstream_cluster_node_streams{")
    }
    assert per_node == dict.fromkeys(worker_ids(cluster), 2.0), per_node


def test_stream_set_survives_controller_and_gateway_restarts(gateway: Gateway) -> None:
    before = {sid: s["node"] for sid, s in gateway.streams().items()}
    stored = json.loads(gateway.state_file.read_text())
    assert [s["id"] for s in stored["streams"]] == STREAMS
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    started = ray.get(controller.info.remote())["started"]
    t0 = time.monotonic()
    ray.kill(controller, no_restart=False)  # Ray restarts it: its state comes from the file
    # A change sent meanwhile waits for the restarted controller (Ray retries its task).
    status, body = gateway.call("PATCH", "/api/streams/s2", {"alpha": 0.8})
    patch_s = time.monotonic() - t0
    assert status == 200, body
    assert json.loads(gateway.state_file.read_text())["streams"][1]["alpha"] == 0.8

    def restarted() -> bool:
        try:
            return bool(ray.get(controller.info.remote(), timeout=5)["started"] != started)
        except Exception:
            return False

    assert wait_until(restarted, 60)
    after = wait_until(
        lambda: (s := gateway.streams()) and all(v["state"] == "live" for v in s.values()) and s, 30
    )
    print(
        f"controller restarted and serving again in {time.monotonic() - t0:.1f} s; a PATCH "
        f"sent as it died answered (200) after {patch_s:.1f} s"
    )
    assert {sid: s["node"] for sid, s in after.items()} == before  # nothing moved

    gateway.stop()  # a gateway restart: it keeps nothing, so nothing is lost
    gateway.start()
    assert {sid: s["node"] for sid, s in gateway.streams().items()} == before
    status, _ = gateway.call("DELETE", "/api/streams/nope")
    assert status == 404


def inferred(nodes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each stream's inferred-frames counter, read from its node's own /metrics."""
    out: dict[str, float] = {}
    for n in nodes.values():
        url = f"http://{n['host']}:{n['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("segstream_frames_total{") and 'outcome="inferred"' in line:
                    out[line.split('stream="')[1].split('"')[0]] = float(line.rpartition(" ")[2])
    return out


class Sampler:
    """The streams' inferred-frame counters every 0.25 s, in a thread of its own."""

    def __init__(self, nodes: dict[str, dict[str, Any]]) -> None:
        self.nodes = nodes
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.samples.append((time.monotonic(), inferred(self.nodes)))
            except OSError as e:
                self.errors.append(repr(e))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def largest_gap(self, sid: str, start: float, end: float) -> float:
        """The longest time in [start, end] without the stream's counter rising."""
        rises = [start]
        last = None
        for t, counts in self.samples:
            if last is not None and counts.get(sid, 0.0) > last and start <= t <= end:
                rises.append(t)
            last = counts.get(sid, 0.0)
        rises.append(end)
        return max(b - a for a, b in itertools.pairwise(rises))


GCS_AWAY_S = 8.0


def test_head_gcs_killed_and_restarted_moves_nothing(cluster: Cluster, gateway: Gateway) -> None:
    """The head's GCS dies and comes back (its state in Redis): the workers, their node
    services and their streams never stop, the controller goes on without a restart, nothing
    moves, and API changes and viewers are served at the gateway meanwhile."""
    before = {sid: s["node"] for sid, s in gateway.streams().items()}
    nodes = node_ids(gateway)
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    started = ray.get(controller.info.remote())["started"]
    head = cluster.head_node
    assert head is not None
    sampler = Sampler(nodes)
    time.sleep(1.0)
    t_kill = time.monotonic()
    head.kill_gcs_server()
    try:
        t = time.monotonic()
        status, body = gateway.call("PATCH", "/api/streams/s3", {"alpha": 0.7})
        patch_s = time.monotonic() - t
        assert status == 200, body
        with urllib.request.urlopen(gateway.url("/streams/s1/mjpeg"), timeout=10) as r:
            assert all(decode(read_part(r)).shape == (240, 320, 3) for _ in range(3))
        while time.monotonic() - t_kill < GCS_AWAY_S:
            seen = gateway.streams()
            assert {sid: s["node"] for sid, s in seen.items()} == before, seen
            assert all(s["state"] == "live" for s in seen.values()), seen
            time.sleep(0.5)
    finally:
        t_restart = time.monotonic()
        head.start_gcs_server()
    alive = wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 3, 30, step=0.2)
    t_back = time.monotonic()
    time.sleep(3.0)  # the counters after the GCS is back, and a controller tick or six
    sampler.stop()
    assert alive, ray.nodes()
    gaps = {sid: round(sampler.largest_gap(sid, t_kill, t_back), 1) for sid in before}
    print(
        f"head GCS away {t_restart - t_kill:.1f} s, Ray answering again {t_back - t_restart:.1f} s "
        f"after its restart; PATCH meanwhile answered in {patch_s * 1000:.0f} ms; longest "
        f"pause of each stream's inferences meanwhile: {gaps}"
    )
    assert not sampler.errors, sampler.errors
    # One inference a second each (pauses of 1.1-3.1 s seen, the longer on a loaded
    # machine); a stream that stopped would pause for the whole outage (> GCS_AWAY_S).
    assert all(g < GCS_AWAY_S - 2 for g in gaps.values()), gaps
    assert ray.get(controller.info.remote(), timeout=10)["started"] == started  # no restart
    assert node_ids(gateway).keys() == nodes.keys()
    after = gateway.streams()
    assert {sid: s["node"] for sid, s in after.items()} == before  # nothing moved
    assert all(s["state"] == "live" for s in after.values()), after
    status, body = gateway.call("PATCH", "/api/streams/s3", {"alpha": 1.0})
    assert status == 200, body


def test_lost_node_streams_live_on_the_survivor_within_15s(
    cluster: Cluster, gateway: Gateway
) -> None:
    before = gateway.streams()
    victim = next(n for n in cluster.worker_nodes if n.node_id[:12] == before["s1"]["node"])
    survivor = (worker_ids(cluster) - {victim.node_id[:12]}).pop()
    displaced = {sid for sid, s in before.items() if s["node"] == victim.node_id[:12]}
    seen: dict[str, set[str]] = {sid: set() for sid in before}
    t0 = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)

    def all_back() -> bool:
        s = gateway.streams()
        for sid, v in s.items():
            seen[sid].add(v["state"])
        return all(v["state"] == "live" and v["node"] == survivor for v in s.values())

    ok = wait_until(all_back, 20, step=0.2)
    elapsed = time.monotonic() - t0
    print(
        f"node lost: {len(displaced)} stream(s) live again on the survivor after "
        f"{elapsed:.1f} s; states seen meanwhile: { {k: sorted(v) for k, v in seen.items()} }"
    )
    assert ok, gateway.streams()
    assert elapsed < 15, elapsed
    # The displaced ones show `moving` (or `unknown`, the node gone) on the way unless the
    # move beat the gateway's 0.5 s snapshot cache and this 0.2 s poll (seen once in 13 runs):
    # no other state, and the others never leave `live`.
    assert all(seen[sid] <= {"live", "moving", "unknown"} for sid in displaced), seen
    assert all(seen[sid] == {"live"} for sid in set(before) - displaced), seen


def node_ids(gateway: Gateway) -> dict[str, dict[str, Any]]:
    status, body = gateway.call("GET", "/api/nodes")
    assert status == 200, body
    return {n["id"]: n for n in body["nodes"]}


def test_a_node_that_joins_takes_streams(cluster: Cluster, gateway: Gateway) -> None:
    """After the loss, the survivor runs all four streams (0.76 of its slot); an empty node
    joins: a node service starts there and streams move to it until the two are within the
    rebalance threshold (two moves: 0.38 each)."""
    t0 = time.monotonic()
    new = cluster.add_node(
        num_cpus=1, object_store_memory=80 * MiB, resources={"segstream_slots": SLOTS}
    )
    nid = new.node_id[:12]

    def balanced() -> bool:
        s = gateway.streams()
        on_new = [v for v in s.values() if v["node"] == nid]
        return len(on_new) == 2 and all(v["state"] == "live" for v in s.values())

    ok = wait_until(balanced, 90, step=0.5)
    print(f"a node joined: 2 streams live on it {time.monotonic() - t0:.1f} s after it was added")
    assert ok, (gateway.streams(), node_ids(gateway))
    node = node_ids(gateway)[nid]
    assert node["state"] == "up" and node["ready"] and node["streams"] == 2, node
    assert len({s["node"] for s in gateway.streams().values()}) == 2


def _listener_pid(port: int) -> int:
    """The process that listens on a loopback port (a node service: a Ray worker process)."""
    out = subprocess.run(
        ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split("pid=")[1].split(",")[0])


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_silent_node_service_is_killed_and_does_not_come_back(
    cluster: Cluster, gateway: Gateway
) -> None:
    """A node service that stops answering (SIGSTOP: its Ray node stays up) is declared lost
    after lost_after_s (3 s): its streams go to the other node and the controller kills it, so
    once it could run again there is nothing left to run what now runs elsewhere."""
    before = gateway.streams()
    victim = before["s1"]["node"]
    other = ({s["node"] for s in before.values()} - {victim}).pop()
    displaced = {sid for sid, s in before.items() if s["node"] == victim}
    pid = _listener_pid(node_ids(gateway)[victim]["port"])
    seen: dict[str, set[str]] = {sid: set() for sid in before}

    def moved() -> bool:
        s = gateway.streams()
        for sid, v in s.items():
            seen[sid].add(v["state"])
        return all(v["state"] == "live" and v["node"] == other for v in s.values())

    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        ok = wait_until(moved, 30, step=0.2)
        print(
            f"node service silenced: {len(displaced)} stream(s) live on the other node after "
            f"{time.monotonic() - t0:.1f} s"
        )
        assert ok, gateway.streams()
        assert all("moving" in seen[sid] for sid in displaced), seen
        assert wait_until(lambda: _gone(pid), 15), f"the silent node service {pid} still runs"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert victim not in {n for n, v in node_ids(gateway).items() if v["state"] == "up"}
    assert all(s["node"] == other for s in gateway.streams().values())


def test_events_kept_one_history_through_the_moves(
    gateway: Gateway, feed: Feed, hooks: Hooks
) -> None:
    """s1 lost its node, maybe moved to the node that joined, and lost a silenced one: its
    events form one history. Each event is published once (one `new`, at most one `end`,
    last), the gateway serves exactly the published ones, they never overlap, only the
    newest is open, and those open when their node died ended with `restart`. Home
    Assistant's entity survived the moves; the webhook received the very same changes, once
    each (signed); DELETE removes an event and its media."""

    def settled() -> list[dict[str, Any]] | None:
        got = gateway_events(gateway, "s1")
        changes = feed.changes("s1")
        ids = {c["after"]["id"] for c in changes}
        ended = {c["after"]["id"] for c in changes if c["type"] == "end"}
        done = {e["id"] for e in got if e["end"] is not None}
        open_now = [e for e in got if e["end"] is None]
        ok = got and open_now and ids == {e["id"] for e in got} and ended == done
        return got if ok else None

    got = wait_until(settled, 30)
    changes = feed.changes("s1")
    assert got, (gateway_events(gateway, "s1"), changes)
    for ev in got:
        mine = [c for c in changes if c["after"]["id"] == ev["id"]]
        types = [c["type"] for c in mine]
        assert types.count("new") == 1 and types[0] == "new", types
        assert types.count("end") == (ev["end"] is not None) and "end" not in types[:-1], types
        updates = [json.dumps(c["after"], sort_keys=True) for c in mine if c["type"] == "update"]
        assert len(updates) == len(set(updates)), updates
        if ev["end"] is not None:
            assert mine[-1]["after"]["end_reason"] == ev["end_reason"], (mine[-1], ev)
    ordered = sorted(got, key=lambda e: e["start"])
    assert [e["end"] is None for e in ordered] == [False] * (len(got) - 1) + [True], ordered
    for a, b in itertools.pairwise(ordered):
        assert a["end"] <= b["start"], (a, b)
    reasons = [e["end_reason"] for e in ordered[:-1]]
    print(f"s1's events through the moves: {len(got)}; end reasons {reasons}")
    # The hub restarted, and s1's node was removed while its event was open: two `restart`s.
    # Whether the node that joined took s1 (stream_removed or restart), and whether s1's node
    # had forwarded an event before it was silenced a moment later, depends on timing.
    assert reasons.count("restart") >= 2, reasons
    assert set(reasons) <= {"restart", "stream_removed"}, reasons
    assert json.loads(feed.last(HA_CONFIG) or b"{}").get("device_class") == "occupancy"

    def same_on_the_webhook() -> bool:
        return [{k: c[k] for k in ("type", "after")} for c in hooks.changes("s1")] == [
            {k: c[k] for k in ("type", "after")} for c in feed.changes("s1")
        ]

    assert wait_until(same_on_the_webhook, 20), (hooks.changes("s1"), feed.changes("s1"))
    seqs = [c["seq"] for c in hooks.got]
    assert len(seqs) == len(set(seqs)), seqs

    gone = ordered[0]
    status, _ = gateway.call("DELETE", f"/api/events/{gone['id']}")
    assert status == 204
    status, body = gateway.call("GET", f"/api/events/{gone['id']}")
    assert status == 404, body
    status, _ = gateway.call("GET", gone["snapshot_url"])
    assert status == 404
