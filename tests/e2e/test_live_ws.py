"""The live page's WebSocket (/ws) promises that test_page.py does not hold: `page.max_clients`
(then 503), the large view (`focus`), the tile and large-view frame rate caps, and a status
message at once when a state or the stream set changes (not only at the next once-a-second
tick). One service process serves two file streams of a 20 fps clip, so the caps (4 and 8 a
second) are what limits the rate."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.rtsp import encode_clip
from support.service_proc import ServiceProcess, decode
from support.waiting import until

pytestmark = pytest.mark.e2e

TILE_CAP, FOCUS_CAP, MAX_CLIENTS = 4.0, 8.0, 3
IDS = ["cam0", "cam1"]


@pytest.fixture(scope="module")
def clip(shared_dir: Path) -> Path:
    return encode_clip(
        shared_dir / "data/video/vtest.avi", size=(320, 240), seconds=4.0, fps=20, container="mp4"
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, segstream_home: Path, clip: Path):
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
        "page": {
            "max_tile_fps": TILE_CAP,
            "max_focus_fps": FOCUS_CAP,
            "max_clients": MAX_CLIENTS,
        },
        "sources": {"allow_local": [str(clip.parent)]},
        "streams": [
            {"id": sid, "source": str(clip), "infer_fps": 0.5, "output": "smooth"} for sid in IDS
        ],
    }
    svc = ServiceProcess(tmp_path_factory.mktemp("live_ws"), cfg).start()
    for sid in IDS:
        svc.wait_state(sid, {"live"}, 30)
    yield svc
    svc.stop()


def ws_url(service: ServiceProcess) -> str:
    return service.base.replace("http", "ws") + "/ws"


class Recorder:
    """Reads one WebSocket on a task of its own: every message with its arrival time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[tuple[float, int, str, int, bytes]] = []  # t, kind, id, seq, jpeg
        self.texts: list[tuple[float, dict[str, Any]]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self.ws:
            now = time.monotonic()
            if msg.type == aiohttp.WSMsgType.BINARY:
                d = msg.data
                n = d[1]
                sid, seq = d[2 : 2 + n].decode(), int.from_bytes(d[2 + n : 6 + n], "big")
                self.frames.append((now, d[0], sid, seq, d[6 + n :]))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self.texts.append((now, json.loads(msg.data)))

    def of(self, kind: int, sid: str, since: float = 0.0) -> list[tuple[float, int]]:
        return [(t, s) for t, k, i, s, _ in self.frames if k == kind and i == sid and t >= since]

    def typed(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.texts if m["type"] == kind]

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()


def rate(frames: list[tuple[float, int]], t0: float, t1: float) -> float:
    return sum(t0 <= t < t1 for t, _ in frames) / (t1 - t0)


async def measure(rec: Recorder, kind: int, sid: str, seconds: float) -> float:
    """Frames a second of one tile or the large view, counted over `seconds` once it flows."""
    assert await until(lambda: len(rec.of(kind, sid)) >= 3, 20), rec.frames[-3:]
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    return rate(rec.of(kind, sid), t0, t0 + seconds)


def test_tile_and_focus_rates_stay_within_their_caps(service: ServiceProcess) -> None:
    """A page that asks for more than the caps gets at most the cap (tile 4/s, large view
    8/s from a 20 fps clip), and not much less; one that asks for 2 tile frames a second gets
    about 2."""

    async def run() -> dict[str, float]:
        async with aiohttp.ClientSession() as http:
            greedy = Recorder(await http.ws_connect(ws_url(service)))
            modest = Recorder(await http.ws_connect(ws_url(service)))
            try:
                await greedy.ws.send_json(
                    {"watch": ["cam0"], "fps": 30, "focus": "cam1", "focus_fps": 60}
                )
                await modest.ws.send_json({"watch": ["cam0"], "fps": 2})
                tile, focus, low = await asyncio.gather(
                    measure(greedy, 1, "cam0", 6.0),
                    measure(greedy, 2, "cam1", 6.0),
                    measure(modest, 1, "cam0", 6.0),
                )
                hello = greedy.typed("hello")[0][1]
                assert (hello["max_tile_fps"], hello["max_focus_fps"]) == (TILE_CAP, FOCUS_CAP)
                assert not greedy.of(2, "cam0") and not modest.of(2, "cam1")
                seqs = [s for _, s in greedy.of(1, "cam0")]
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
                assert decode(greedy.frames[-1][4]).shape == (240, 320, 3)
                return {"tile": tile, "focus": focus, "low": low}
            finally:
                await greedy.close()
                await modest.close()

    got = asyncio.run(run())
    print("frames a second:", {k: round(v, 2) for k, v in got.items()})
    # Pacing: at most one frame per 1/cap, give or take the frames at the window's edges.
    assert TILE_CAP / 2 <= got["tile"] <= TILE_CAP + 2 / 6, got
    assert FOCUS_CAP / 2 <= got["focus"] <= FOCUS_CAP + 2 / 6, got
    assert 1.0 <= got["low"] <= 2.0 + 2 / 6, got


def test_focus_opens_changes_and_closes_the_large_view(service: ServiceProcess) -> None:
    """`focus` names the large view: the server acknowledges with a `focus` message, sends
    kind-2 frames of that stream only, and stops them when it is closed (`null`)."""

    async def acked(rec: Recorder, n: int) -> dict[str, Any]:
        assert await until(lambda: len(rec.typed("focus")) >= n, 10), rec.texts[-3:]
        return rec.typed("focus")[n - 1][1]

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            rec = Recorder(await http.ws_connect(ws_url(service)))
            try:
                await rec.ws.send_json({"focus": "cam0"})
                assert await acked(rec, 1) == {"type": "focus", "id": "cam0", "overlay": None}
                assert await until(lambda: len(rec.of(2, "cam0")) >= 3, 20)
                overlay = {"mode": "mask", "alpha": 0.5, "classes": ["person"]}
                await rec.ws.send_json({"focus": "cam1", "overlay": overlay})
                ack = await acked(rec, 2)
                assert ack == {"type": "focus", "id": "cam1", "overlay": overlay}, ack
                switched = time.monotonic()
                assert await until(lambda: len(rec.of(2, "cam1")) >= 3, 20)
                # At most the one frame already pending when the view changed.
                assert len(rec.of(2, "cam0", since=switched + 0.5)) == 0
                assert not [f for f in rec.frames if f[1] == 1]  # no tile was asked for
                await rec.ws.send_json({"focus": None})
                assert (await acked(rec, 3))["id"] is None
                closed = time.monotonic()
                n_status = len(rec.typed("status"))
                # Two status ticks later (about 2 s) no large-view frame came after the close.
                assert await until(lambda: len(rec.typed("status")) >= n_status + 2, 10)
                assert not [f for f in rec.frames if f[1] == 2 and f[0] > closed + 0.5]
            finally:
                await rec.close()

    asyncio.run(run())


def upgrade_headers() -> dict[str, str]:
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }


def test_max_clients_then_503(service: ServiceProcess) -> None:
    """`page.max_clients` (3) pages at once; the next handshake gets 503 with Retry-After and
    a JSON error naming the setting; once a page goes, a new one gets in."""

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            pages: list[aiohttp.ClientWebSocketResponse] = []

            async def one_more() -> bool:
                try:
                    pages.append(await http.ws_connect(ws_url(service)))
                except aiohttp.WSServerHandshakeError as e:
                    assert e.status == 503, e
                    return False
                return True

            async def connect() -> None:
                """A page as soon as there is room (earlier tests' pages may still be
                leaving)."""
                deadline = time.monotonic() + 10
                while not await one_more():
                    assert time.monotonic() < deadline, "no room for a page"
                    await asyncio.sleep(0.1)
                assert (await pages[-1].receive_json(timeout=10))["type"] == "hello"

            for _ in range(MAX_CLIENTS):
                await connect()
            async with http.get(ws_url(service), headers=upgrade_headers()) as r:
                body = await r.json()
                assert r.status == 503 and r.headers["Retry-After"] == "5", (r.status, body)
                assert "page.max_clients" in body["error"], body
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(ws_url(service))
            assert e.value.status == 503
            await pages.pop().close()
            await connect()  # the slot it freed
            for ws in pages:
                await ws.close()

    asyncio.run(run())


async def change(
    service: ServiceProcess, rec: Recorder, method: str, path: str, payload: Any, shows: Any
) -> float:
    """Makes a change right after a status message; seconds from that message to the first
    status that shows the change."""
    n = len(rec.typed("status"))
    assert await until(lambda: len(rec.typed("status")) > n, 5)
    n = len(rec.typed("status"))
    t_before = rec.typed("status")[-1][0]
    status, raw, _ = await asyncio.to_thread(service.request, method, path, payload)
    assert status == {"POST": 201, "DELETE": 204, "PATCH": 200}[method], raw
    assert await until(lambda: any(shows(m) for t, m in rec.typed("status")[n:]), 10)
    return next(t for t, m in rec.typed("status")[n:] if shows(m)) - t_before


def test_status_is_sent_at_once_when_the_stream_set_changes(service: ServiceProcess) -> None:
    """Status goes out once a second, and at once (the hub looks every 0.25 s) when a stream
    is added or removed. Right after a periodic status, add or remove a stream: the status
    that shows it must come well before the next periodic one (1 s after the last). The
    machine may be loaded: of three tries each, one in time suffices; a service that only
    sends once a second fails all of them."""
    body = {"id": "extra", "source": "rtsp://127.0.0.1:9/none", "reconnect_initial": 5}

    def has_extra(m: dict[str, Any]) -> bool:
        return "extra" in {s["id"] for s in m["streams"]}

    async def run() -> dict[str, list[float]]:
        delays: dict[str, list[float]] = {"added": [], "removed": []}
        async with aiohttp.ClientSession() as http:
            rec = Recorder(await http.ws_connect(ws_url(service)))
            try:
                for _ in range(3):
                    delays["added"].append(
                        await change(service, rec, "POST", "/api/streams", body, has_extra)
                    )
                    delays["removed"].append(
                        await change(
                            service,
                            rec,
                            "DELETE",
                            "/api/streams/extra",
                            None,
                            lambda m: not has_extra(m),
                        )
                    )
                    if max(min(d) for d in delays.values()) < 0.6:
                        break
            finally:
                await rec.close()
                service.request("DELETE", "/api/streams/extra")
        return delays

    delays = asyncio.run(run())
    print("status after a change, seconds after the one before:", delays)
    assert min(delays["added"]) < 0.6 and min(delays["removed"]) < 0.6, delays


def test_status_is_sent_at_once_when_a_state_changes(service: ServiceProcess, clip: Path) -> None:
    """A live stream whose source is switched to a camera that never answers leaves `live`
    (same stream, a new reader): right after a periodic status, the status showing the new
    state comes well before the next periodic one. Three tries as above."""
    dead = {"source": "rtsp://127.0.0.1:9/none", "reconnect_initial": 5}

    def state(m: dict[str, Any]) -> str | None:
        return next((s["state"] for s in m["streams"] if s["id"] == "flip"), None)

    async def run() -> list[float]:
        delays: list[float] = []
        status, raw, _ = service.request(
            "POST", "/api/streams", {"id": "flip", "source": str(clip)}
        )
        assert status == 201, raw
        async with aiohttp.ClientSession() as http:
            rec = Recorder(await http.ws_connect(ws_url(service)))
            try:
                for _ in range(3):
                    await asyncio.to_thread(service.wait_state, "flip", {"live"}, 30)
                    delays.append(
                        await change(
                            service,
                            rec,
                            "PATCH",
                            "/api/streams/flip",
                            dead,
                            lambda m: state(m) not in ("live", None),
                        )
                    )
                    if min(delays) < 0.6:
                        break
                    status, raw, _ = service.request(
                        "PATCH", "/api/streams/flip", {"source": str(clip)}
                    )
                    assert status == 200, raw
            finally:
                await rec.close()
                service.request("DELETE", "/api/streams/flip")
        return delays

    delays = asyncio.run(run())
    print("status after a state change, seconds after the one before:", delays)
    assert min(delays) < 0.6, delays
