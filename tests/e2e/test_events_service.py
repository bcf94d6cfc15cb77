"""Zones and coverage events in the running service (`segstream serve` as a real process): a
person walking across a zone of vtest.avi opens and closes an event with its media, visible in
/api/events, on a real Mosquitto broker and in /metrics; zones change live over PATCH; a
kill -9 during an open event leaves it closed with `restart` after the next start."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import signal
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
from support.events_peers import Mosquitto
from support.peers import CdpPage, Chromium
from support.service_proc import ServiceProcess
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

ADMIN = "sst_test-admin-token-0123456789abcdef0123456789"
PERSON = 15  # its class id in the VOC labels of mnv2-voc
MAGENTA = (255, 0, 255)  # the privacy fill (RGB): no colour of vtest.avi
# Measured with the real model on vtest.avi (every 5th frame): in this quarter-by-quarter
# cell a person covers 0.08-0.13 from 1.5 s to 5.5 s, then at most 0.02 from 6 s to 19 s.
DOOR = [[0.75, 0.5], [1.0, 0.5], [1.0, 0.75], [0.75, 0.75]]
WHOLE = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]


def zone(name: str, polygon: list[list[float]], above: float, clear_s: float) -> dict[str, Any]:
    rule = {"class": "person", "above": above, "for_s": 0.3, "clear_s": clear_s}
    return {"name": name, "polygon": polygon, "rules": [rule]}


class Feed:
    """Every message of the service's MQTT change feed and availability (paho, a thread)."""

    def __init__(self, port: int, client_id: str = "evtest") -> None:
        self.msgs: list[tuple[str, bytes]] = []
        self.retained: dict[str, bytes] = {}  # topic -> payload of messages sent retained
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        topics = ["segstream/events", "segstream/available", "homeassistant/#"]
        client.subscribe([(t, 1) for t in topics])
        self.subscribed.set()

    def _on_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        self.msgs.append((m.topic, m.payload))
        if m.retain:
            self.retained[m.topic] = m.payload

    def changes(self, event_id: str) -> list[str]:
        out = [json.loads(p) for t, p in self.msgs if t == "segstream/events"]
        return [c["type"] for c in out if c["after"]["id"] == event_id]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Receiver:
    """A webhook receiver on a free loopback port (a thread): the bodies whose signature
    checks out with SECRET; anything else is counted as forged."""

    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []
        self.forged = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                want = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                if hmac.compare_digest(want, self.headers.get("X-Segstream-Signature", "")):
                    outer.changes.append(json.loads(body))
                else:
                    outer.forged += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self, event_id: str) -> list[str]:
        return [c["type"] for c in self.changes if c["after"]["id"] == event_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SECRET = b"hook-secret"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


def serve(tmp_path: Path, broker: Mosquitto, shared_dir: Path, hook: str) -> ServiceProcess:
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "auth": {"tokens_dir": str(tmp_path / "auth")},
        "events": {"database": f"sqlite:///{tmp_path / 'events.db'}"},
        "mqtt": {
            "url": broker.url,
            "client_id": "segstream-test",
            "reconnect_max_s": 0.5,
            "homeassistant": True,
        },
        "webhooks": [{"url": hook, "secret": SECRET.decode(), "events": ["new", "end"]}],
        "streams": [
            {
                "id": "cam",
                "source": str(shared_dir / "data/video/vtest.avi"),
                "zones": [zone("door", DOOR, 0.03, 1.0)],
                # People hidden in every picture, event snapshots included (no overlay: the
                # fill colour shows as it is).
                "privacy": {"classes": ["person"], "style": "fill", "color": list(MAGENTA)},
                "alpha": 0.0,
                "record_clips": True,  # the page's event view gets a clip player
            }
        ],
    }
    svc = ServiceProcess(
        tmp_path,
        cfg,
        token=ADMIN,
        env={"SEGSTREAM_ADMIN_TOKEN": ADMIN},
        state=tmp_path / "state.json",
        config_path=tmp_path / "service.yaml",
    )
    return svc


def events(svc: ServiceProcess, query: str = "") -> list[dict[str, Any]]:
    return list(svc.json(f"/api/events?stream=cam{query}")["events"])


def one(svc: ServiceProcess, zone_name: str, pred: Any, timeout: float) -> dict[str, Any]:
    """The first event of the zone that `pred` accepts, waited for."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [e for e in events(svc, f"&zone={zone_name}") if pred(e)]
        return bool(found)

    assert wait_for(check, timeout, 0.2), (zone_name, events(svc))
    return found[0]


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def unclipped(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("clip_url", "clip_truncated")}


def patch_zones(svc: ServiceProcess, zones: list[dict[str, Any]]) -> tuple[int, Any]:
    status, body, _ = svc.request("PATCH", "/api/streams/cam", {"zones": zones})
    return status, json.loads(body)


def test_zone_events_end_to_end(
    tmp_path: Path, segstream_home: Path, broker: Mosquitto, shared_dir: Path
) -> None:
    feed, hook = Feed(broker.port), Receiver()
    assert feed.subscribed.wait(10)
    svc = serve(tmp_path, broker, shared_dir, hook.url).start()
    chrome = Chromium(tmp_path / "chrome")
    try:
        _walk_across_the_door(svc, broker, feed, hook)
        asyncio.run(_page_shows_zones_and_events(svc, chrome))
        kept = _zones_change_live(svc)
        _kill_9_during_an_open_event(svc, kept)
    finally:
        chrome.close()
        svc.stop()
        feed.close()
        hook.close()


def _walk_across_the_door(
    svc: ServiceProcess, broker: Mosquitto, feed: Feed, hook: Receiver
) -> None:
    ev = one(svc, "door", lambda e: e["end"] is not None, 40)
    assert ev["class"] == "person" and ev["end_reason"] == "cleared", ev
    assert 0.03 < ev["peak_coverage"] <= 1.0 and ev["start"] <= ev["peak_at"] <= ev["end"], ev
    assert svc.json(f"/api/events/{ev['id']}") == ev
    status, jpeg, headers = svc.get(ev["snapshot_url"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    status, png, headers = svc.get(ev["mask_url"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    h, w = mask.shape
    in_door = mask[h // 2 : 3 * h // 4, 3 * w // 4 :]
    assert (in_door == PERSON).mean() > 0.03, "the peak frame's mask shows the person"
    # The snapshot is redacted as every picture output is: the person is the fill colour.
    shot = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    sh, sw = shot.shape[:2]
    b, g, r = (shot[sh // 2 : 3 * sh // 4, 3 * sw // 4 :, i].astype(int) for i in range(3))
    hidden = ((r > 200) & (g < 80) & (b > 200)).mean()
    assert hidden >= 0.5 * (in_door == PERSON).mean(), (hidden, (in_door == PERSON).mean())
    assert svc.get("/api/events/0123abcd/snapshot.jpg")[0] == 404
    assert svc.get("/api/events?cursor=nonsense")[0] == 400
    # The change feed on the broker: new, (updates), end, in that order.
    assert wait_for(lambda: "end" in feed.changes(ev["id"]), 10), feed.changes(ev["id"])
    types = feed.changes(ev["id"])
    assert types[0] == "new" and types[-1] == "end" and set(types[1:-1]) <= {"update"}, types
    assert ("segstream/available", b"online") in feed.msgs
    # The signed webhook: the changes it asked for (new, end), once each, signature valid.
    assert wait_for(lambda: hook.types(ev["id"]) == ["new", "end"], 15), hook.types(ev["id"])
    assert hook.forged == 0 and hook.changes[-1]["after"]["end_reason"] == "cleared"
    # Home Assistant discovery, retained (a client subscribing now is sent them): the door's
    # occupancy sensor and its coverage in %.
    uid = "homeassistant/{}/segstream_cam_door_person{}/config"
    topics = [uid.format("sensor", "_coverage"), uid.format("binary_sensor", "")]
    late = Feed(broker.port, "evtest-late")
    try:
        assert wait_for(lambda: all(t in late.retained for t in topics), 10), late.retained
        sensor, occupancy = (json.loads(late.retained[t]) for t in topics)
    finally:
        late.close()
    assert occupancy["device_class"] == "occupancy", occupancy
    assert occupancy["state_topic"] == "segstream/cam/door/person/active", occupancy
    assert (sensor["unit_of_measurement"], sensor["state_class"]) == ("%", "measurement")
    # Metrics.
    assert 0.0 <= svc.metric("segstream_zone_coverage_ratio", **_door()) <= 1.0
    assert svc.metric("segstream_events_total", **_door()) >= 1
    assert svc.metric("segstream_event_deliveries_total", target="mqtt", outcome="delivered") >= 2
    assert svc.metric("segstream_event_outbox_size") >= 0
    health = svc.json("/healthz")
    assert health["events"] == {"status": "ok", "reason": None, "mqtt": "connected"}, health


async def _page_shows_zones_and_events(svc: ServiceProcess, chrome: Chromium) -> None:
    """The tile lists the stream's events and draws its zone; an admin draws a zone on the
    large view (three clicks, a name, save) and it becomes the stream's."""
    async with chrome.page() as page:
        await page.goto(svc.base + "/login", 0.5)
        login = (
            "fetch('/api/login', {method: 'POST', headers: {'Content-Type': 'application/json'},"
            f" body: JSON.stringify({{token: {json.dumps(ADMIN)}}})}}).then(r => r.status)"
        )
        assert await page.eval(login) == 200
        await page.goto(svc.base + "/", 0.5)
        tile = "document.querySelector('[data-stream=cam]')"
        await page.wait_for(
            f"+({tile}.dataset.events || 0) >= 1 && +({tile}.dataset.frames || 0) >= 2", 20
        )
        text = await page.eval(f"{tile}.querySelector('.events').textContent")
        assert "door · person" in text and "cleared" in text, text
        # The zone's top-left corner is marked in the zone's colour (yellow; orange when active).
        pixel = await page.eval(f"""(() => {{ const c = {tile}.querySelector('canvas');
            const d = c.getContext('2d').getImageData(Math.round(0.75 * c.width) - 1,
                Math.round(0.5 * c.height) - 1, 1, 1).data; return [...d].join(','); }})()""")
        r, g, b, _ = (int(v) for v in pixel.split(","))
        assert r > 230 and b < 110 and (g > 190 or 70 < g < 110), pixel
        await _timeline_shows_thumbnails(page)
        await _draw_a_zone(page)
        # Its event opens; the page hears of it over /ws (it does not poll) and lists it.
        await page.eval("document.getElementById('focus-close').click(), true")
        listed = f"{tile}.querySelector('.events').textContent.includes('drawn · person')"
        await page.wait_for(listed, 30)
        # ... and so does the site timeline, live.
        await page.wait_for(f"[...{TIMELINE}.querySelectorAll('.tl')].some(e => "
                            "e.title === 'cam · drawn · person')", 30)  # fmt: skip
        await _event_view_opens(page, svc)
    assert wait_for(lambda: "drawn" in [z["name"] for z in svc.stream("cam")["zones"]], 10)
    drawn = next(z for z in svc.stream("cam")["zones"] if z["name"] == "drawn")
    assert len(drawn["polygon"]) == 3 and drawn["rules"][0]["class"] == "person", drawn
    xs = sorted(round(p[0], 1) for p in drawn["polygon"])
    assert xs == [0.2, 0.2, 0.6], drawn["polygon"]


TIMELINE = "document.getElementById('timeline')"


async def _timeline_shows_thumbnails(page: CdpPage) -> None:
    """The site timeline lists the events of every stream with their snapshot thumbnails."""
    await page.wait_for(f"+({TIMELINE}.dataset.count || 0) >= 1 && !{TIMELINE}.hidden", 20)
    loaded = (f"(() => {{ const i = {TIMELINE}.querySelector('.tl img');"
              " return !!i && i.complete && i.naturalWidth > 0; })()")  # fmt: skip
    await page.wait_for(loaded, 20)
    first = await page.eval(f"{TIMELINE}.querySelector('.tl').title")
    assert first.startswith("cam · door · person"), first
    assert await page.eval(f"{TIMELINE}.querySelector('.tl img').loading") == "lazy"


async def _event_view_opens(page: CdpPage, svc: ServiceProcess) -> None:
    """Clicking the ended door event opens it: its snapshot, its mask and its clip."""
    ended = one(svc, "door", lambda e: e["end"] and e["clip_url"], 30)
    await page.wait_for(
        f"!!document.querySelector('#timeline .tl[data-event=\"{ended['id']}\"]')", 20
    )
    await page.eval(
        f"document.querySelector('#timeline .tl[data-event=\"{ended['id']}\"]').click(), true"
    )
    await page.wait_for("!document.getElementById('event-view').hidden", 10)
    await page.wait_for("document.getElementById('event-snapshot').naturalWidth > 0", 10)
    await page.wait_for("document.getElementById('event-mask').width > 1", 10)
    src = await page.eval("document.getElementById('event-clip').src")
    assert src.endswith(ended["clip_url"]), (src, ended)
    # The player reads the clip (the page's CSP lets media in; Chromium decodes H.264).
    await page.wait_for("document.getElementById('event-clip').videoWidth === 768", 20)
    duration = await page.eval("document.getElementById('event-clip').duration")
    span = epoch(ended["end"]) - epoch(ended["start"])
    assert span < duration < span + 3 + 2.5, (duration, span)  # + pre-roll (3 s), keyframe, frames
    assert not await page.eval("document.getElementById('event-clip-box').hidden")
    status, body, _ = svc.request("GET", ended["clip_url"])
    assert status == 200 and body[4:8] == b"ftyp", status
    await page.eval("document.getElementById('event-close').click(), true")


async def _draw_a_zone(page: CdpPage) -> None:
    await page.eval("document.querySelector('[data-stream=cam] .pic').click(), true")
    await page.wait_for("+(document.getElementById('focus').dataset.frames || 0) >= 1", 15)
    await page.eval("document.getElementById('zone-draw').click(), true")
    click = """(([x, y]) => { const c = document.getElementById('focus-canvas');
        const r = c.getBoundingClientRect(), s = Math.min(r.width / c.width, r.height / c.height);
        const w = c.width * s, h = c.height * s;
        c.dispatchEvent(new MouseEvent('click', {bubbles: true,
            clientX: r.left + (r.width - w) / 2 + x * w,
            clientY: r.top + (r.height - h) / 2 + y * h}));
        return true; })"""
    for point in ([0.2, 0.2], [0.6, 0.2], [0.2, 0.6]):
        await page.eval(f"{click}({json.dumps(point)})")
    await page.eval("document.getElementById('zone-name').value = 'drawn', true")
    await page.eval("document.getElementById('zone-above').value = '0.5', true")
    await page.eval("document.getElementById('zone-save').click(), true")
    await page.wait_for("document.getElementById('zone-draft').hidden", 10)


def _door() -> dict[str, str]:
    return {"stream": "cam", "zone": "door", "class_name": "person"}


def _zones_change_live(svc: ServiceProcess) -> list[dict[str, Any]]:
    """Add a zone (its event opens), edit one, remove it (its event ends: zone_removed)."""
    status, body = patch_zones(svc, [zone("door", DOOR, 0.03, 1.0), zone("hall", WHOLE, 0.005, 60)])
    assert status == 200, body
    assert [z["name"] for z in body["zones"]] == ["door", "hall"], body["zones"]
    hall = one(svc, "hall", lambda e: e["end"] is None, 20)
    zones = svc.stream("cam")["zones"]
    assert zones[1]["active"] == ["person"] and zones[1]["coverage"]["person"] > 0.005, zones
    # Edit: the door gets smaller; the hall's open event goes on.
    small = [[0.75, 0.5], [1.0, 0.5], [1.0, 0.6]]
    status, body = patch_zones(
        svc, [zone("door", small, 0.03, 1.0), zone("hall", WHOLE, 0.005, 60)]
    )
    assert status == 200, body
    assert svc.json(f"/api/events/{hall['id']}")["end"] is None
    # Bad zones: 422 naming the key path; nothing changes.
    for bad, loc in (
        ([zone("door", [[0, 0], [1.5, 0], [1, 1]], 0.1, 1)], "zones.0.polygon"),
        ([{**zone("x", WHOLE, 0.1, 1), "rules": [{"class": "unicorn", "above": 0.1}]}], None),
    ):
        status, body = patch_zones(svc, bad)
        want = loc or "zones.0.rules.0.class"
        assert status == 422 and body["details"][0]["loc"] == want, body
    # Remove the hall: its event ends with zone_removed, its coverage series goes.
    assert patch_zones(svc, [zone("door", small, 0.03, 1.0)])[0] == 200
    ended = one(svc, "hall", lambda e: e["id"] == hall["id"] and e["end"] is not None, 10)
    assert ended["end_reason"] == "zone_removed", ended  # written by the store's thread
    with pytest.raises(KeyError):
        svc.metric("segstream_zone_coverage_ratio", stream="cam", zone="hall", class_name="person")
    return [e for e in events(svc, "&limit=1000") if e["end"] is not None]


def _kill_9_during_an_open_event(svc: ServiceProcess, kept: list[dict[str, Any]]) -> None:
    status, body = patch_zones(svc, [zone("lobby", WHOLE, 0.005, 60)])
    assert status == 200, body
    lobby = one(svc, "lobby", lambda e: e["end"] is None, 20)
    assert svc.stop(signal.SIGKILL) == -signal.SIGKILL
    svc.start()
    closed = svc.json(f"/api/events/{lobby['id']}")
    assert closed["end_reason"] == "restart" and closed["end"] is not None, closed
    assert closed["start"] == lobby["start"] and closed["peak_coverage"] >= lobby["peak_coverage"]
    after = {e["id"]: e for e in events(svc, "&limit=1000")}
    # (A clip may have been finished since `kept` was read: it only adds clip_url.)
    assert all(unclipped(after[e["id"]]) == unclipped(e) for e in kept), "intact after the kill"
    assert all(after[e["id"]]["clip_url"] for e in kept if e["clip_url"])
    # The zones came back from the state file (`class` round-trips) and work again.
    assert [z["name"] for z in svc.stream("cam")["zones"]] == ["lobby"]
    again = one(svc, "lobby", lambda e: e["id"] != lobby["id"] and e["end"] is None, 20)
    # A clean stop ends it with `shutdown`.
    assert svc.stop() == 0
    svc.start()
    assert svc.json(f"/api/events/{again['id']}")["end_reason"] == "shutdown"


async def test_cluster_gateway_without_its_events_hub_answers_503(tmp_path: Path) -> None:
    """The gateway serves the events of the cluster's events hub (tests/e2e/cluster_suite.py);
    without it (here: no Ray connection, the gateway app over a fixed snapshot) every event
    endpoint answers 503 with the reason as JSON, never a 5xx of another kind."""
    from aiohttp.test_utils import TestClient, TestServer

    from segstream.stream.auth import Authenticator, TokenStore
    from segstream.stream.cluster.gateway import ClusterClient, make_gateway_app
    from segstream.stream.cluster.snapshot import ClusterSnapshot
    from segstream.stream.config import AppConfig

    class Fixed(ClusterClient):
        async def snapshot(self, fresh: bool = False, stale_ok: bool = False) -> ClusterSnapshot:
            return ClusterSnapshot(version=1, nodes=[], streams=[])

    cfg = AppConfig.model_validate({"model": {"name": "mnv2-voc"}, "streams": []})
    auth = Authenticator(TokenStore(tmp_path / "t.json"), b"k" * 32)
    gw = TestClient(TestServer(make_gateway_app(cfg, Fixed(None, "s"), auth)))
    await gw.start_server()
    try:
        for method, path in (
            ("GET", "/api/events?stream=cam"),
            ("GET", "/api/events/0123abcd"),
            ("GET", "/api/events/0123abcd/snapshot.jpg"),
            ("DELETE", "/api/events/0123abcd"),
        ):
            r = await gw.request(method, path)
            body = await r.json()
            assert r.status == 503 and "not connected to a Ray cluster" in body["error"], body
    finally:
        await gw.close()


def test_a_corrupt_store_turns_events_off_and_streams_keep_playing(
    tmp_path: Path, segstream_home: Path, shared_dir: Path
) -> None:
    db = tmp_path / "events.db"
    db.write_bytes(b"this is not an SQLite database\n" * 200)
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "events": {"database": f"sqlite:///{db}"},
        "streams": [
            {
                "id": "cam",
                "source": str(shared_dir / "data/video/vtest.avi"),
                "zones": [zone("door", DOOR, 0.03, 1.0)],
                # People hidden in every picture, event snapshots included (no overlay: the
                # fill colour shows as it is).
                "privacy": {"classes": ["person"], "style": "fill", "color": list(MAGENTA)},
                "alpha": 0.0,
            }
        ],
    }
    svc = ServiceProcess(tmp_path, cfg).start()
    try:
        health = svc.json("/healthz")
        assert health["status"] == "ok" and health["events"]["status"] == "error", health
        assert str(db) in health["events"]["reason"], health
        svc.wait_state("cam", {"live"}, 20)
        # Coverage is still measured and shown; the event API says why it has nothing.
        assert wait_for(lambda: "person" in svc.stream("cam")["zones"][0]["coverage"], 20)
        status, body, _ = svc.get("/api/events")
        assert status == 503 and "events are off" in json.loads(body)["error"], body
    finally:
        svc.stop()


def test_the_store_opens_with_the_first_zone(
    tmp_path: Path, segstream_home: Path, shared_dir: Path
) -> None:
    """No zone, no alert target: no file in SEGSTREAM_HOME, an empty event list. A stream
    added over the API with a zone opens the default store there, and its events come."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(segstream_home / "models")  # the model cache, read only
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "sources": {"allow_local": [str(shared_dir / "data/video")]},
    }
    svc = ServiceProcess(tmp_path, cfg, env={"SEGSTREAM_HOME": str(home)}, state=Path("none"))
    svc.start()
    try:
        assert svc.json("/api/events") == {"events": [], "next": None}
        assert svc.get("/api/events/0123abcd")[0] == 404
        assert {p.name for p in home.iterdir()} & {"events.db", "events-media"} == set()
        body = {
            "id": "cam",
            "source": str(shared_dir / "data/video/vtest.avi"),
            "zones": [zone("door", DOOR, 0.03, 1.0)],
        }
        assert svc.request("POST", "/api/streams", body)[0] == 201
        assert (home / "events.db").exists()
        one(svc, "door", lambda e: e["class"] == "person", 30)
    finally:
        svc.stop()
