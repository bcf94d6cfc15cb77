"""The control plane in one process with the real model, real sources and a real HTTP server:
the stream API and its persistence, the source policy, auth (tokens, sessions, signed URLs),
the OpenAPI document and the upload limits."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image
from support.rtsp import RtspServer
from support.waiting import until

from segstream.models.runtime import Segmenter
from segstream.stream.api.spec import Endpoint
from segstream.stream.auth import (
    Authenticator,
    Principal,
    TokenStore,
    load_secret,
)
from segstream.stream.config import AppConfig
from segstream.stream.events.model import Change, Event, new_id
from segstream.stream.server import ENDPOINTS, make_app
from segstream.stream.service import Service
from segstream.stream.store import StreamStore

pytestmark = pytest.mark.e2e


class Api:
    """A running service and an HTTP client for it (optionally with a bearer token)."""

    def __init__(
        self,
        service: Service,
        server: TestServer,
        http: aiohttp.ClientSession,
        store: StreamStore,
        tokens: TokenStore,
    ) -> None:
        self.service, self.server, self.http = service, server, http
        self.store, self.tokens = store, tokens

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        async with self.http.request(
            method, self.server.make_url(path), json=body, headers=headers, **kw
        ) as r:
            data = await r.read()
            ctype = r.headers.get("Content-Type", "")
            return r.status, (json.loads(data) if "json" in ctype and data else data)


@pytest.fixture
async def make_api(model: Segmenter, tmp_path: Path, shared_dir: Path):
    made: list[tuple[TestServer, aiohttp.ClientSession]] = []

    async def make(streams: list[dict[str, Any]] | None = None, **cfg: Any) -> Api:
        config = AppConfig.model_validate(
            {
                "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
                "sources": {"allow_local": [str(shared_dir / "data/video")]},
                # Not the session's SEGSTREAM_HOME: other tests check what is written there.
                "events": {"database": f"sqlite:///{tmp_path / 'events.db'}"},
                "streams": streams or [],
                **cfg,
            }
        )
        store = StreamStore(tmp_path / "state.json")
        if not store.exists():
            store.save(config.streams)
        config = config.model_copy(update={"streams": store.load()})
        tokens = TokenStore(tmp_path / "auth/tokens.json")
        auth = Authenticator(tokens, load_secret(tmp_path / "auth/secret.key"))
        service = Service(config, segmenter=model)
        server = TestServer(make_app(service, auth=auth, store=store), host="127.0.0.1")
        await server.start_server()
        http = aiohttp.ClientSession()
        made.append((server, http))
        assert await until(lambda: service.ready, 30), service.error
        return Api(service, server, http, store, tokens)

    yield make
    for server, http in made:
        await http.close()
        await server.close()


@pytest.fixture
async def api(make_api) -> AsyncIterator[Api]:
    yield await make_api()


def stored_ids(api: Api) -> list[str]:
    return [s.id for s in api.store.load()]


# -- the stream API --------------------------------------------------------------------------


async def test_model_info_names_the_mode(api: Api) -> None:
    status, body = await api.call("GET", "/api/model")
    assert status == 200
    assert (body["name"], body["backend"], body["mode"]) == ("mnv2-voc", "tflite", "int8")


async def test_stream_round_trip(api: Api, shared_dir: Path, camera: RtspServer) -> None:
    vtest = str(shared_dir / "data/video/vtest.avi")
    status, body = await api.call("POST", "/api/streams", {"id": "door", "source": vtest})
    assert status == 201 and body["id"] == "door" and body["state"] in ("starting", "live")
    status, body = await api.call("POST", "/api/streams", {"id": "door", "source": vtest})
    assert status == 409 and "exists" in body["error"]
    status, body = await api.call(
        "POST", "/api/streams", {"id": "cam", "source": camera.url("/cam"), "infer_fps": 2}
    )
    assert status == 201
    assert stored_ids(api) == ["door", "cam"]
    assert await until(lambda: api.service.streams["cam"].source.state.value == "live", 15)

    # Live settings: no reconnect, applied at once.
    reader = api.service.streams["door"].source
    t0 = time.perf_counter()
    status, body = await api.call(
        "PATCH", "/api/streams/door", {"alpha": 0.9, "infer_fps": 3, "classes": ["person"]}
    )
    patch_ms = (time.perf_counter() - t0) * 1000
    print(f"PATCH of live settings applied in {patch_ms:.1f} ms")
    assert status == 200 and body["infer_fps_cap"] == 3
    stream = api.service.streams["door"]
    assert stream.source is reader and stream.view.renderer.alpha == 0.9
    assert api.store.load()[0].classes == ["person"]

    # A new source restarts only that reader.
    status, body = await api.call("PATCH", "/api/streams/door", {"source": camera.url("/cam")})
    assert status == 200 and api.service.streams["door"].source is not reader
    assert reader.state.value == "stopped"
    assert api.service.streams["cam"].source.state.value == "live"

    status, _ = await api.call("DELETE", "/api/streams/door")
    assert status == 204 and stored_ids(api) == ["cam"]
    for method, body in (("GET", None), ("PATCH", {"alpha": 1}), ("DELETE", None)):
        status, err = await api.call(method, "/api/streams/door", body)
        assert status == 404 and err == {"error": "unknown stream 'door'"}


@pytest.mark.parametrize(
    ("body", "status", "loc"),
    [
        ({"id": "x", "source": "rtsp://cam/a", "infer_fps": -1}, 422, "infer_fps"),
        ({"id": "x", "source": "rtsp://cam/a", "colour": 1}, 422, "colour"),
        ({"id": "bad id!", "source": "rtsp://cam/a"}, 422, "id"),
        ({"source": "rtsp://cam/a"}, 422, "id"),
        ({"id": "x", "source": "rtsp://127.0.0.1/a", "classes": ["unicorn"]}, 422, "classes"),
        ({"id": "x", "source": "ftp://cam/a"}, 422, "source"),
        ({"id": "x", "source": "/etc/passwd"}, 422, "source"),
        ({"id": "x", "source": "file:///etc/hostname"}, 422, "source"),
        ({"id": "x", "source": "/dev/video0"}, 422, "source"),
        ({"id": "x", "source": "http://169.254.169.254/latest/meta-data"}, 422, "source"),
        ({"id": "x", "source": "rtsp://no-such-host.invalid/a"}, 422, "source"),
    ],
)
async def test_bad_streams_are_refused_naming_the_key(
    api: Api, body: dict[str, Any], status: int, loc: str
) -> None:
    got, err = await api.call("POST", "/api/streams", body)
    assert got == status, err
    assert err["details"][0]["loc"] == loc, err
    assert stored_ids(api) == [] and not api.service.streams


async def test_bad_bodies_are_4xx(api: Api) -> None:
    url = api.server.make_url("/api/streams")
    for data, ctype, want in (
        (b"{", "application/json", 400),
        (b"[]", "application/json", 422),
        (b"id=x", "application/x-www-form-urlencoded", 415),
        (b"x" * 70_000, "application/json", 413),
    ):
        async with api.http.post(url, data=data, headers={"Content-Type": ctype}) as r:
            assert r.status == want, (data[:10], r.status, await r.text())
            assert "error" in await r.json()


async def test_fifty_concurrent_changes_leave_file_and_running_set_identical(
    api: Api, shared_dir: Path
) -> None:
    vtest = str(shared_dir / "data/video/vtest.avi")

    async def change(i: int) -> int:
        sid = f"s{i % 20}"
        if i % 3 == 0:
            status, _ = await api.call("DELETE", f"/api/streams/{sid}")
        elif i % 3 == 1:
            status, _ = await api.call(
                "POST", "/api/streams", {"id": sid, "source": vtest, "realtime": False}
            )
        else:
            status, _ = await api.call("PATCH", f"/api/streams/{sid}", {"infer_fps": i})
        return status

    statuses = await asyncio.gather(*(change(i) for i in range(50)))
    assert set(statuses) <= {200, 201, 204, 404, 409}, statuses
    stored = {s.id: s for s in api.store.load()}
    running = {sid: s.cfg for sid, s in api.service.streams.items()}
    assert stored == running
    assert len(json.loads(api.store.path.read_text())["streams"]) == len(running)
    listed = [s["id"] for s in (await api.call("GET", "/api/streams"))[1]["streams"]]
    assert sorted(listed) == sorted(running)


async def test_stream_set_survives_a_restart(make_api, shared_dir: Path) -> None:
    vtest = str(shared_dir / "data/video/vtest.avi")
    first = await make_api(streams=[{"id": "seed", "source": vtest}])
    assert (await first.call("POST", "/api/streams", {"id": "added", "source": vtest}))[0] == 201
    assert (await first.call("DELETE", "/api/streams/seed"))[0] == 204
    await first.server.close()
    second = await make_api(streams=[{"id": "seed", "source": vtest}])  # the config seeds only
    assert list(second.service.streams) == ["added"]


# -- auth ------------------------------------------------------------------------------------


@dataclass
class Reply:
    """What a client saw: the status, the headers and the body (JSON, bytes, the first JPEG of
    an MJPEG stream, or a WebSocket's first message)."""

    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def ctype(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()


async def first_jpeg(r: aiohttp.ClientResponse) -> bytes:
    """The first part of a multipart/x-mixed-replace response (the stream itself is endless)."""
    head = await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 30)
    sizes = [
        ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")
    ]
    return await asyncio.wait_for(r.content.readexactly(int(sizes[0])), 30)


async def fetch(
    api: Api,
    method: str,
    path: str,
    token: str | None = None,
    *,
    body: Any = None,
    form: Callable[[], aiohttp.FormData] | None = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
    http: aiohttp.ClientSession | None = None,
) -> Reply:
    """One request; an MJPEG answer is read up to its first picture, then closed."""
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    sent.update(headers or {})
    async with (http or api.http).request(
        method,
        api.server.make_url(path),
        json=body,
        data=form() if form else data,
        headers=sent,
        allow_redirects=False,
    ) as r:
        if r.status == 200 and r.content_type == "multipart/x-mixed-replace":
            got: Any = await first_jpeg(r)
            r.close()
        else:
            got = await r.read()
            if "json" in r.content_type and got:
                got = json.loads(got)
        return Reply(r.status, r.headers, got)


async def ws_hello(api: Api, token: str | None, http: aiohttp.ClientSession) -> Reply:
    """/ws: the handshake's status and the first message (the page's hello)."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with http.ws_connect(api.server.make_url("/ws"), headers=auth) as ws:
            msg = await ws.receive(timeout=20)
            return Reply(101, {}, json.loads(msg.data))
    except aiohttp.WSServerHandshakeError as e:
        return Reply(e.status, e.headers or {}, None)


async def poll(probe: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.1) -> bool:
    """`until` for a condition that takes a request to check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await probe():
            return True
        await asyncio.sleep(step)
    return await probe()


async def until_frame(api: Api, sid: str, token: str | None) -> None:
    """Snapshots, masks and MJPEG parts need a segmented frame of the stream."""

    async def has_frame() -> bool:
        return (await fetch(api, "GET", f"/streams/{sid}/snapshot.jpg", token)).status == 200

    assert await poll(has_frame, 30), f"stream {sid} has no frame"


async def forgive(api: Api, token: str) -> None:
    """A successful login clears this client's failed attempts (the throttle is tested apart)."""
    assert (await fetch(api, "POST", "/api/login", body={"token": token})).status == 200


def _upload_form(data: bytes) -> Callable[[], aiohttp.FormData]:
    def form() -> aiohttp.FormData:
        f = aiohttp.FormData()
        f.add_field("image", data, filename="x.jpg", content_type="image/jpeg")
        return f

    return form


Check = Callable[[Reply, str], bool]  # (what came back, the caller's token name)


@dataclass
class Case:
    """What an allowed caller sends to an endpoint and gets back."""

    path: str
    status: int
    check: Check
    body: Any = None
    form: Callable[[], aiohttp.FormData] | None = None


def _html(title: str) -> Check:
    return lambda r, _: r.ctype == "text/html" and f"<title>{title}</title>".encode() in r.body


def _jpeg(ctype: str) -> Check:
    return lambda r, _: r.ctype == ctype and r.body[:2] == b"\xff\xd8"


def _matrix(vtest: str, bird: bytes, event: str = "") -> dict[str, Case]:
    """Every endpoint but DELETE /api/streams/{id}: what an allowed caller gets (the event's
    DELETE comes last)."""
    return {
        "GET /": Case("/", 200, _html("segstream")),
        "GET /login": Case("/login", 200, _html("segstream · log in")),
        "GET /healthz": Case("/healthz", 200, lambda r, _: r.body["status"] == "ok"),
        "GET /readyz": Case("/readyz", 200, lambda r, _: r.body == {"status": "ready"}),
        "GET /metrics": Case(
            "/metrics",
            200,
            lambda r, _: (
                r.ctype == "text/plain" and b'\nsegstream_stream_up{stream="s"} 1.0\n' in r.body
            ),
        ),
        "GET /api/model": Case("/api/model", 200, lambda r, _: r.body["name"] == "mnv2-voc"),
        "GET /openapi.json": Case("/openapi.json", 200, lambda r, _: r.body["openapi"] == "3.1.0"),
        "GET /docs": Case(
            "/docs", 200, lambda r, _: b"/docs/static/swagger-ui-bundle.js" in r.body
        ),
        "GET /docs/openapi-3.0.json": Case(
            "/docs/openapi-3.0.json", 200, lambda r, _: r.body["openapi"] == "3.0.3"
        ),
        "GET /docs/static/docs.js": Case(
            "/docs/static/docs.js",
            200,
            lambda r, _: r.ctype == "application/javascript" and b"SwaggerUIBundle(" in r.body,
        ),
        "GET /docs/static/swagger-ui.css": Case(
            "/docs/static/swagger-ui.css",
            200,
            lambda r, _: r.ctype == "text/css" and b".swagger-ui" in r.body,
        ),
        "GET /docs/static/swagger-ui-bundle.js": Case(
            "/docs/static/swagger-ui-bundle.js",
            200,
            lambda r, _: (
                r.ctype in ("application/javascript", "text/javascript") and len(r.body) > 100_000
            ),
        ),
        "POST /api/login": Case(  # the caller's own token; anonymous callers send a wrong one
            "/api/login",
            200,
            lambda r, name: (
                r.body == {"name": name, "role": ROLE[name], "via": "session"}
                and "HttpOnly" in r.headers["Set-Cookie"]
            ),
        ),
        "POST /api/logout": Case(
            "/api/logout",
            204,
            lambda r, _: r.body == b"" and "segstream_session=" in r.headers["Set-Cookie"],
        ),
        "GET /api/whoami": Case(
            "/api/whoami",
            200,
            lambda r, name: r.body == {"name": name, "role": ROLE[name], "via": "token"},
        ),
        "GET /api/streams": Case(
            "/api/streams", 200, lambda r, _: [s["id"] for s in r.body["streams"]] == ["s"]
        ),
        "POST /api/streams": Case(
            "/api/streams",
            201,
            lambda r, _: r.body["id"] == "n" and r.body["source"] == vtest,
            body={"id": "n", "source": vtest},
        ),
        "GET /api/streams/{id}": Case(
            "/api/streams/s", 200, lambda r, _: r.body["id"] == "s" and r.body["source"] == vtest
        ),
        "PATCH /api/streams/{id}": Case(
            "/api/streams/s",
            200,
            lambda r, _: r.body["id"] == "s" and r.body["infer_fps_cap"] == 3,
            body={"infer_fps": 3},
        ),
        "POST /api/streams/{id}/share": Case(
            "/api/streams/s/share",
            200,
            lambda r, _: r.body["url"].startswith(f"/streams/s/mjpeg?exp={r.body['expires']}&sig="),
            body={"ttl_s": 120},
        ),
        "GET /streams/{id}/mjpeg": Case(
            "/streams/s/mjpeg", 200, _jpeg("multipart/x-mixed-replace")
        ),
        "GET /streams/{id}/snapshot.jpg": Case("/streams/s/snapshot.jpg", 200, _jpeg("image/jpeg")),
        "GET /streams/{id}/mask.png": Case(
            "/streams/s/mask.png",
            200,
            lambda r, _: r.ctype == "image/png" and r.body[:4] == b"\x89PNG",
        ),
        "GET /ws": Case("/ws", 101, lambda r, _: r.body["type"] == "hello"),
        "GET /mosaic/mjpeg": Case(
            "/mosaic/mjpeg?streams=s", 200, _jpeg("multipart/x-mixed-replace")
        ),
        "POST /model/predict": Case(
            "/model/predict",
            200,
            lambda r, _: r.body["status"] == "ok" and len(r.body["seg_map"]) > 0,
            form=_upload_form(bird),
        ),
        "GET /model/labels": Case(
            "/model/labels", 200, lambda r, _: r.body[15] == {"id": 15, "name": "person"}
        ),
        "GET /model/metadata": Case(
            "/model/metadata", 200, lambda r, _: r.body["id"] == "segstream-mnv2-voc"
        ),
        "POST /api/predict": Case(
            "/api/predict",
            200,
            lambda r, _: r.ctype == "image/png" and r.body[:4] == b"\x89PNG",
            form=_upload_form(bird),
        ),
        "GET /api/events": Case(
            "/api/events?stream=s",
            200,
            lambda r, _: [e["id"] for e in r.body["events"]] == [event] and r.body["next"] is None,
        ),
        "GET /api/events/{id}": Case(
            f"/api/events/{event}",
            200,
            lambda r, _: r.body["class"] == "person" and r.body["end_reason"] == "cleared",
        ),
        "GET /api/events/{id}/snapshot.jpg": Case(
            f"/api/events/{event}/snapshot.jpg", 200, _jpeg("image/jpeg")
        ),
        "GET /api/events/{id}/mask.png": Case(
            f"/api/events/{event}/mask.png",
            200,
            lambda r, _: r.ctype == "image/png" and r.body[:4] == b"\x89PNG",
        ),
        "GET /api/events/{id}/clip.mp4": Case(
            f"/api/events/{event}/clip.mp4",
            200,
            lambda r, _: r.ctype == "video/mp4" and r.body == MP4_HEAD,
        ),
        "DELETE /api/events/{id}": Case(f"/api/events/{event}", 204, lambda r, _: r.body == b""),
    }


def _stored_event(api: Api, jpeg: bytes) -> str:
    """A closed event of stream `s` with its media, written to the service's own store."""
    ev = Event(new_id(), "s", "floor", "person", 1.7e9, 0.31, 1.7e9 + 1, 1.7e9 + 4, "cleared")
    assert api.service.events is not None
    store = api.service.events.store
    store.apply([Change("new", None, ev)])
    ok, png = cv2.imencode(".png", np.full((8, 8), 15, np.uint8))
    assert ok and store.save_media(ev.id, jpeg, png.tobytes())
    store.media_path(ev.id, "clip").write_bytes(MP4_HEAD)  # the route serves it as it is
    assert store.save_clip(ev.id, len(MP4_HEAD), truncated=False)
    return ev.id


MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


ROLE = {"alice": "viewer", "root": "admin"}
BAD_TOKEN = "sst_not-a-token"


async def _call(api: Api, key: str, case: Case, token: str | None, http: Any) -> Reply:
    method = key.split()[0]
    if key == "GET /ws":
        return await ws_hello(api, token, http)
    if key == "POST /api/login":  # public: the token travels in the body, not the header
        return await fetch(api, method, case.path, body={"token": token or "sst_nope"}, http=http)
    return await fetch(api, method, case.path, token, body=case.body, form=case.form, http=http)


def _expected(ep: Endpoint, key: str, who: str, case: Case) -> int:
    """The status a caller gets: public endpoints answer everyone (login only to a real
    token), anonymous page requests go to /login, a viewer may not do admin work."""
    if ep.role == "public":
        return 401 if key == "POST /api/login" and who in ("none", "bad") else case.status
    if who == "none":
        return 302 if ep.tag == "page" else 401
    if who == "bad":
        return 401
    if ep.role == "admin" and who == "viewer":
        return 403
    return case.status


def _refused_properly(got: Reply, want: int) -> bool:
    """A refusal is a JSON error (401s from the middleware say how to authenticate); an
    anonymous page request is sent to the login page."""
    if want == 302:
        return got.headers.get("Location") == "/login"
    if got.status == 401 and got.body is None:  # a refused WebSocket handshake has no body
        return True
    return isinstance(got.body, dict) and set(got.body) == {"error"}


async def test_auth_matrix(api: Api, shared_dir: Path, bird: bytes) -> None:
    """Every endpoint x no token, bad token, viewer, admin: the exact status and a property of
    each answer's body (a 500 or a 404 where a 200 is due fails)."""
    vtest = str(shared_dir / "data/video/vtest.avi")
    viewer = api.tokens.add("alice", "viewer")
    admin = api.tokens.add("root", "admin")
    created = await fetch(api, "POST", "/api/streams", admin, body={"id": "s", "source": vtest})
    assert created.status == 201
    await until_frame(api, "s", admin)
    snap = await fetch(api, "GET", "/streams/s/snapshot.jpg", admin)
    cases = _matrix(vtest, bird, _stored_event(api, snap.body))
    endpoints = {f"{ep.method} {ep.path}": ep for ep in ENDPOINTS}
    assert set(cases) == set(endpoints) - {"DELETE /api/streams/{id}"}  # a new endpoint: add it
    callers = (("none", None, ""), ("bad", BAD_TOKEN, ""), ("viewer", viewer, "alice"))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for key, case in cases.items():
            for who, token, name in (*callers, ("admin", admin, "root")):
                got = await _call(api, key, case, token, http)
                if who == "bad":
                    await forgive(api, viewer)
                want = _expected(endpoints[key], key, who, case)
                shown = got.body if isinstance(got.body, dict) else repr(got.body)[:80]
                assert got.status == want, (key, who, got.status, shown)
                if want == case.status:
                    assert case.check(got, name), (key, who, got.ctype, shown)
                else:
                    assert _refused_properly(got, want), (key, who, got.headers, shown)
                if want == 401 and who == "none" and endpoints[key].role != "public":
                    challenge = got.headers.get("WWW-Authenticate")
                    assert challenge == 'Bearer realm="segstream"', (key, got.headers)
    assert (await fetch(api, "GET", "/healthz", BAD_TOKEN)).status == 200  # probes never fail


BAD_REQUESTS = [  # (method, path, caller, body, status, words of the JSON error)
    ("GET", "/api/streams/nope", "viewer", None, 404, "unknown stream 'nope'"),
    ("GET", "/streams/nope/mjpeg", "viewer", None, 404, "unknown stream 'nope'"),
    ("GET", "/streams/nope/snapshot.jpg", "viewer", None, 404, "unknown stream 'nope'"),
    ("GET", "/streams/nope/mask.png", "viewer", None, 404, "unknown stream 'nope'"),
    ("GET", "/mosaic/mjpeg?streams=nope", "viewer", None, 404, "unknown streams ['nope']"),
    ("GET", "/mosaic/mjpeg?width=100", "viewer", None, 422, '"loc": "width"'),
    (
        "POST",
        "/api/streams",
        "admin",
        {"id": "bad id!", "source": "rtsp://cam/a"},
        422,
        '"loc": "id"',
    ),
    ("POST", "/api/streams", "admin", {"id": "s", "source": "rtsp://127.0.0.1/a"}, 409, "exists"),
    ("PATCH", "/api/streams/s", "admin", {"alpha": 2}, 422, '"loc": "alpha"'),
    ("PATCH", "/api/streams/nope", "admin", {"alpha": 1}, 404, "unknown stream 'nope'"),
    ("POST", "/api/streams/s/share", "admin", {"ttl_s": 1}, 422, '"loc": "ttl_s"'),
    ("POST", "/api/streams/s/share", "admin", {"kind": "mask"}, 422, '"loc": "kind"'),
    ("POST", "/api/streams/nope/share", "admin", {}, 404, "unknown stream 'nope'"),
    ("DELETE", "/api/streams/nope", "admin", None, 404, "unknown stream 'nope'"),
    # Without the role, nothing says whether a stream exists.
    ("GET", "/api/streams/nope", "none", None, 401, "authentication required"),
    ("GET", "/streams/nope/mjpeg", "none", None, 401, "authentication required"),
    ("DELETE", "/api/streams/nope", "viewer", None, 403, "viewer may not DELETE"),
]


async def test_bad_requests_of_allowed_callers_are_4xx(api: Api, shared_dir: Path) -> None:
    vtest = str(shared_dir / "data/video/vtest.avi")
    tokens = {"none": None, "viewer": api.tokens.add("v", "viewer")}
    tokens["admin"] = api.tokens.add("a", "admin")
    assert (
        await fetch(api, "POST", "/api/streams", tokens["admin"], body={"id": "s", "source": vtest})
    ).status == 201
    for method, path, who, body, status, words in BAD_REQUESTS:
        got = await fetch(api, method, path, tokens[who], body=body)
        assert (got.status, set(got.body) - {"details"}) == (status, {"error"}), (path, got.body)
        assert words in json.dumps(got.body), (path, got.body)


async def test_delete_needs_an_admin(api: Api, shared_dir: Path) -> None:
    vtest = str(shared_dir / "data/video/vtest.avi")
    viewer = api.tokens.add("alice", "viewer")
    admin = api.tokens.add("root", "admin")
    assert (
        await fetch(api, "POST", "/api/streams", admin, body={"id": "s", "source": vtest})
    ).status == 201
    for token, want in ((None, 401), (BAD_TOKEN, 401), (viewer, 403)):
        got = await fetch(api, "DELETE", "/api/streams/s", token)
        assert got.status == want and set(got.body) == {"error"}, (token, got)
    assert [s["id"] for s in (await fetch(api, "GET", "/api/streams", admin)).body["streams"]] == [
        "s"
    ]
    got = await fetch(api, "DELETE", "/api/streams/s", admin)
    assert got.status == 204 and got.body == b""
    assert (await fetch(api, "GET", "/api/streams", admin)).body["streams"] == []


async def test_login_session_and_revocation(api: Api) -> None:
    admin = api.tokens.add("ops", "admin")
    other = api.tokens.add("other", "viewer")
    t0 = time.monotonic()
    for _ in range(3):
        status, body = await api.call("POST", "/api/login", {"token": "sst_wrong"})
        assert status == 401 and "wrong" not in json.dumps(body)
    assert time.monotonic() - t0 >= 0.25 + 0.5, "failed logins are not slowed down"
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        url = api.server.make_url
        async with browser.post(url("/api/login"), json={"token": admin}) as r:
            assert r.status == 200
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and admin not in cookie
        async with browser.get(url("/api/whoami")) as r:
            assert (await r.json()) == {"name": "ops", "role": "admin", "via": "session"}
        api.tokens.revoke("ops")
        async with browser.get(url("/api/whoami")) as r:
            assert r.status == 401  # revoking the token ends its sessions
    api.tokens.revoke("other")  # the last one: the service stays locked, it does not open
    assert (await api.call("GET", "/api/streams"))[0] == 401
    assert (await api.call("GET", "/api/streams", token=other))[0] == 401


def _query(url: str) -> str:
    return url.split("?", 1)[1]


async def test_signed_urls_open_one_stream_and_one_kind(api: Api, shared_dir: Path) -> None:
    """A share URL opens its own stream's MJPEG (or snapshot) and nothing else; MJPEG and the
    mosaic refuse anonymous clients and bad tokens."""
    vtest = str(shared_dir / "data/video/vtest.avi")
    admin = api.tokens.add("root", "admin")
    viewer = api.tokens.add("alice", "viewer")
    for sid in ("a", "b"):
        got = await fetch(api, "POST", "/api/streams", admin, body={"id": sid, "source": vtest})
        assert got.status == 201
    shares = {}
    for kind in ("mjpeg", "snapshot"):
        got = await fetch(api, "POST", "/api/streams/a/share", admin, body={"kind": kind})
        assert got.status == 200 and admin not in got.body["url"]
        shares[kind] = got.body["url"]
    mjpeg, snap = _query(shares["mjpeg"]), _query(shares["snapshot"])
    assert shares["mjpeg"] == f"/streams/a/mjpeg?{mjpeg}"
    assert shares["snapshot"] == f"/streams/a/snapshot.jpg?{snap}"
    await until_frame(api, "a", viewer)

    got = await fetch(api, "GET", shares["mjpeg"])
    assert got.status == 200 and _jpeg("multipart/x-mixed-replace")(got, "")
    got = await fetch(api, "GET", shares["snapshot"])
    assert got.status == 200 and _jpeg("image/jpeg")(got, "")
    exp, sig = (v.split("=", 1)[1] for v in mjpeg.split("&"))
    refused = [
        "/streams/a/mjpeg",  # anonymous
        "/mosaic/mjpeg",
        f"/streams/b/mjpeg?{mjpeg}",  # another stream
        f"/streams/b/snapshot.jpg?{snap}",
        f"/streams/a/mjpeg?{snap}",  # another kind
        f"/streams/a/snapshot.jpg?{mjpeg}",
        f"/streams/a/mask.png?{mjpeg}",  # an endpoint that takes no signed URL
        f"/mosaic/mjpeg?{mjpeg}",
        f"/api/streams/a?{mjpeg}",
        f"/streams/a/mjpeg?exp={int(exp) + 3600}&sig={sig}",  # a longer life
        f"/streams/a/mjpeg?exp={exp}&sig={sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}",
        f"/streams/a/mjpeg?exp={exp}",
    ]
    for path in refused:
        got = await fetch(api, "GET", path)
        assert got.status == 401 and set(got.body) == {"error"}, (path, got.status, got.body)
    for path in ("/streams/a/mjpeg", "/mosaic/mjpeg"):
        got = await fetch(api, "GET", path, BAD_TOKEN)
        assert got.status == 401 and got.body == {"error": "invalid bearer token"}, path
        got = await fetch(api, "GET", f"{path}?{mjpeg}", BAD_TOKEN)  # a bad token is never ignored
        assert got.status == 401, path
        await forgive(api, viewer)
        got = await fetch(api, "GET", path, viewer)
        assert got.status == 200 and _jpeg("multipart/x-mixed-replace")(got, ""), path


def _expiry(cookie: str) -> int:
    body = cookie.split(".", 1)[0]
    return int(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["e"])


async def _lifetime(check: Callable[[], Awaitable[int]], expires: int, ok: int) -> None:
    """Asks until refused (401): every answer up to `expires` (Unix time) is `ok`, the first
    refusal comes after it, and everything asked after it is refused."""
    answers: list[tuple[float, int, float]] = []  # (sent, status, received)
    while not answers or answers[-1][1] == ok:
        sent = time.time()
        status = await check()
        answers.append((sent, status, time.time()))
        assert status in (ok, 401), answers
        assert sent < expires + 10, f"still accepted 10 s after it expired: {answers}"
        await asyncio.sleep(0.1)
    assert answers[0][1] == ok, answers  # accepted at first
    first_refusal = answers[-1]
    assert first_refusal[2] > expires, f"refused before it expired: {answers}"
    # The service's clock is ours: an accepted request left before the expiry, and a refused
    # one came back after it.
    assert all(sent <= expires for sent, _, _ in answers[:-1]), f"accepted late: {answers}"
    for _ in range(2):
        assert await check() == 401


async def test_signed_urls_and_sessions_expire(api: Api, shared_dir: Path, tmp_path: Path) -> None:
    """A signed URL and a session made with the service's own key for three seconds work until
    they expire, and not after."""
    vtest = str(shared_dir / "data/video/vtest.avi")
    admin = api.tokens.add("root", "admin")
    api.tokens.add("alice", "viewer")
    got = await fetch(api, "POST", "/api/streams", admin, body={"id": "a", "source": vtest})
    assert got.status == 201
    got = await fetch(api, "POST", "/api/streams/a/share", admin, body={"ttl_s": 60})
    assert got.status == 200 and abs(got.body["expires"] - (time.time() + 60)) <= 2
    assert f"exp={got.body['expires']}&" in got.body["url"]
    signer = Authenticator(api.tokens, load_secret(tmp_path / "auth/secret.key"))  # the same key

    expires = int(time.time()) + 3
    path = (
        f"/streams/a/mjpeg?exp={expires}&sig={signer.sign_path('/streams/a/mjpeg', 'a', expires)}"
    )

    async def signed() -> int:
        async with api.http.get(api.server.make_url(path)) as r:
            return r.status  # the MJPEG body is endless: its status is enough

    await _lifetime(signed, expires, 200)

    cookie = signer.make_session(Principal("alice", "viewer", "token"), 3)
    expires = _expiry(cookie)
    assert expires <= time.time() + 3

    async def session() -> int:
        got = await fetch(
            api, "GET", "/api/whoami", headers={"Cookie": f"segstream_session={cookie}"}
        )
        assert got.status == 401 or got.body == {
            "name": "alice",
            "role": "viewer",
            "via": "session",
        }
        return got.status

    await _lifetime(session, expires, 200)


async def test_forged_sessions_are_refused(api: Api, tmp_path: Path) -> None:
    """A session cookie counts only if the service's key signed it, for a token that still
    exists (the same name with a new token is someone else)."""
    api.tokens.add("alice", "viewer")
    api.tokens.add("root", "admin")
    signer = Authenticator(api.tokens, load_secret(tmp_path / "auth/secret.key"))
    stranger = Authenticator(api.tokens, b"k" * 32)
    alice = signer.make_session(Principal("alice", "viewer", "token"), 600)
    root_by_stranger = stranger.make_session(Principal("root", "admin", "token"), 600)
    root = signer.make_session(Principal("root", "admin", "token"), 600).split(".")[0]
    swapped = f"{root}.{alice.split('.')[1]}"  # root's body under alice's signature

    async def whoami(cookie: str) -> Reply:
        return await fetch(
            api, "GET", "/api/whoami", headers={"Cookie": f"segstream_session={cookie}"}
        )

    got = await whoami(alice)
    assert (got.status, got.body["name"]) == (200, "alice")
    for forged in (root_by_stranger, swapped, alice + "x", "e30.AAAA", "nonsense"):
        got = await whoami(forged)
        assert (got.status, set(got.body)) == (401, {"error"}), forged
    api.tokens.revoke("alice")
    api.tokens.add("alice", "viewer")  # a new token under the old name
    assert (await whoami(alice)).status == 401


async def test_bad_bearer_tokens_are_slowed_per_client(api: Api) -> None:
    """Bad bearer tokens wait 0, 0.25, 0.5, 1 s ... per client address; a good token is not
    slowed by them, and a successful login clears them."""
    viewer = api.tokens.add("alice", "viewer")

    async def timed(token: str, http: aiohttp.ClientSession | None = None) -> tuple[int, float]:
        t0 = time.monotonic()
        got = await fetch(api, "GET", "/api/whoami", token, http=http)
        return got.status, time.monotonic() - t0

    tries = [await timed(BAD_TOKEN) for _ in range(4)]
    assert [s for s, _ in tries] == [401] * 4
    waits = [t for _, t in tries]
    assert waits[1] >= 0.25 and waits[2] >= 0.5 and waits[3] >= 1.0, waits
    # The next bad one would wait 2 s: these would take that long if they were slowed too.
    status, took = await timed(viewer)
    assert status == 200 and took < 1.5
    other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=other) as elsewhere:
        status, took = await timed(BAD_TOKEN, elsewhere)
        assert status == 401 and took < 1.5  # another client address has its own count
    await forgive(api, viewer)
    status, took = await timed(BAD_TOKEN)
    assert status == 401 and took < 1.5
    status, took = await timed(BAD_TOKEN)
    assert status == 401 and took >= 0.25  # counting again from the start


# -- the live page's WebSocket -------------------------------------------------------------


async def _focus_frames(ws: aiohttp.ClientWebSocketResponse, n: int) -> tuple[list[str], int]:
    """Errors seen until n frames of the large view (kind 2) arrived."""
    errors, got = [], 0
    while got < n:
        msg = await ws.receive(timeout=20)
        if msg.type == aiohttp.WSMsgType.BINARY:
            got += msg.data[0] == 2
        elif msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "error":
            errors.append(json.loads(msg.data)["loc"])
        else:
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return errors, got


async def test_page_websocket_login_and_shared_overlays(make_api, shared_dir: Path) -> None:
    """/ws takes the page's session cookie (or a token), not a page of another origin; viewers
    with the same overlay settings share one rendering, a third setting past
    page.max_overlays gets the stream's own picture, and the last viewer's leaving drops it."""
    vtest = str(shared_dir / "data/video/vtest.avi")
    api = await make_api(streams=[{"id": "cam", "source": vtest}], page={"max_overlays": 1})
    viewer = api.tokens.add("eve", "viewer")
    url = api.server.make_url("/ws")
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await api.http.ws_connect(url)
    assert e.value.status == 401
    async with api.http.ws_connect(url, headers={"Authorization": f"Bearer {viewer}"}) as ws:
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "hello"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.post(api.server.make_url("/api/login"), json={"token": viewer}) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await browser.ws_connect(url, headers={"Origin": "https://elsewhere.example"})
        assert e.value.status == 403
        view = api.service.streams["cam"].view
        mask = {"focus": "cam", "overlay": {"mode": "mask", "alpha": 0.7}}
        async with (
            browser.ws_connect(url) as a,
            browser.ws_connect(url) as b,
            browser.ws_connect(url) as c,
        ):
            await a.send_json(mask)
            await b.send_json(mask)
            assert await _focus_frames(a, 3) == ([], 3)
            assert await _focus_frames(b, 3) == ([], 3)
            assert list(view.variants) == [("mask", 0.7, None)]
            assert view.variants[("mask", 0.7, None)].users == 2  # rendered once for both
            await c.send_json({"focus": "cam", "overlay": {"mode": "off"}})
            errors, _ = await _focus_frames(c, 2)
            assert errors == ["overlay"]  # over page.max_overlays: the stream's own picture
            assert len(view.variants) == 1
        assert await until(lambda: not view.variants, 5), view.variants
        assert api.service.streams["cam"].mjpeg.clients == 0


# -- OpenAPI -----------------------------------------------------------------------------------


async def test_openapi_documents_every_route(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    for ep in ENDPOINTS:
        op = doc["paths"][ep.path][ep.method.lower()]
        assert op["responses"], ep.path
        assert ("security" in op) == (ep.role != "public"), ep.path
    assert {"bearer", "session"} <= set(doc["components"]["securitySchemes"])
    assert "StreamConfig" in doc["components"]["schemas"]
    mjpeg = doc["paths"]["/streams/{id}/mjpeg"]["get"]["responses"]["200"]["content"]
    assert "multipart/x-mixed-replace" in mjpeg
    status, old = await api.call("GET", "/docs/openapi-3.0.json")
    assert old["openapi"] == "3.0.3" and "anyOf" not in json.dumps(old).replace(
        '"anyOf": [{"$ref"', ""
    )
    status, html = await api.call("GET", "/docs")
    assert status == 200 and b"/docs/static/swagger-ui-bundle.js" in html
    status, js = await api.call("GET", "/docs/static/swagger-ui-bundle.js")
    assert status == 200 and len(js) > 100_000  # served from the installed package, no CDN


# -- uploads -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bird(shared_dir: Path) -> bytes:
    """The Coral bird sample as a JPEG, as a client would upload it."""
    buf = io.BytesIO()
    Image.open(shared_dir / "data/coral_segmentation_samples/bird_segmentation.bmp").convert(
        "RGB"
    ).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


async def _upload(
    api: Api, path: str, data: bytes | None, field: str = "image", ctype: str = "image/jpeg"
) -> tuple[int, Any]:
    form = aiohttp.FormData(default_to_multipart=True)
    if data is not None:
        form.add_field(field, data, filename="x.jpg", content_type=ctype)
    else:
        form.add_field("other", "1")
    return await api.call("POST", path, data=form)


async def test_bad_uploads_are_4xx_never_5xx(api: Api, bird: bytes) -> None:
    jpeg = bird
    big = _png(16000, 16000)
    assert len(big) < 1_000_000  # a tiny file with 256 megapixels behind it
    cases = [
        (b"", "image", 400),
        (jpeg[: len(jpeg) // 3], "image", 400),
        (b"not an image at all", "image", 400),
        (jpeg, "file", 400),
        (None, "image", 400),
        (big, "image", 413),
    ]
    for path in ("/model/predict", "/api/predict"):
        for data, field, want in cases:
            status, body = await _upload(api, path, data, field)
            assert status == want, (path, field, data[:8] if data else data, status, body)
            assert "error" in body
        status, body = await api.call(
            "POST", path, data=b"abc", headers={"Content-Type": "text/plain"}
        )
        assert status == 415 and "error" in body
        status, body = await api.call(
            "POST",
            path,
            data=b"x" * (33 * 2**20),
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert status == 413 and "error" in body


async def test_predictions_beyond_the_limit_are_refused(
    make_api, bird: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With predict.max_concurrent predictions held in the model, the next one is refused at
    once (503, Retry-After, a JSON error) without reaching the model; once they finish, a new
    one is served."""
    api = await make_api(predict={"max_concurrent": 2})
    gate, entered = threading.Event(), []
    segment = api.service.segment_batch

    def held(rgb: np.ndarray) -> np.ndarray:  # the real model, once the test lets it run
        entered.append(rgb.shape)
        gate.wait(60)
        return segment(rgb)

    monkeypatch.setattr(api.service, "segment_batch", held)
    try:
        running = [
            asyncio.create_task(fetch(api, "POST", path, form=_upload_form(bird)))
            for path in ("/model/predict", "/api/predict")
        ]
        assert await until(lambda: len(entered) == 2, 30), entered
        for path in ("/model/predict", "/api/predict"):
            got = await asyncio.wait_for(fetch(api, "POST", path, form=_upload_form(bird)), 15)
            assert (got.status, got.headers.get("Retry-After"), got.ctype) == (
                503,
                "1",
                "application/json",
            )
            assert got.body == {"error": "busy: too many predictions at once; retry shortly"}
    finally:
        gate.set()
    done = await asyncio.gather(*running)
    assert [r.status for r in done] == [200, 200]
    assert done[0].body["status"] == "ok" and done[1].body[:4] == b"\x89PNG"
    again = await fetch(api, "POST", "/model/predict", form=_upload_form(bird))
    assert again.status == 200 and again.body["status"] == "ok"
    assert len(entered) == 3  # the refused ones never reached the model


# A hand-made multipart body: the field "image" between these two.
_PART_HEAD = (
    b'--B\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)
_PART_TAIL = b"\r\n--B--\r\n"
_PART_TYPE = "multipart/form-data; boundary=B"


async def test_upload_limits_are_exact(make_api) -> None:
    """predict.max_pixels and predict.max_bytes to the pixel and byte; a body declared too
    large is refused before it is sent, one sent without a length is cut off at the limit."""
    limit = 64 * 1024
    api = await make_api(predict={"max_bytes": limit, "max_pixels": 200_000})
    for size, want in (((500, 400), 200), ((501, 400), 413), ((400, 501), 413)):
        form = _upload_form(_png(*size))
        got = await fetch(api, "POST", "/api/predict", form=form)
        assert got.status == want, (size, got.body)
        if want == 413:
            w, h = size
            assert got.body == {"error": f"image is {w}x{h} = {w * h} pixels; the limit is 200000"}

    async def chunked(n: int) -> Reply:  # no Content-Length: the service counts as it reads
        async def body() -> AsyncIterator[bytes]:
            yield _PART_HEAD
            for i in range(0, n, 8192):
                yield b"\0" * min(8192, n - i)
            yield _PART_TAIL

        headers = {"Content-Type": _PART_TYPE}
        return await fetch(api, "POST", "/api/predict", headers=headers, data=body())

    got = await chunked(limit)  # at the limit: read whole, then found not to be an image
    assert got.status == 400 and "not an image" in got.body["error"], got.body
    got = await chunked(limit + 1)
    assert (got.status, got.body) == (413, {"error": f"upload larger than {limit} bytes"})

    # Declared larger than the limit: refused from the headers, nothing of the body sent.
    reader, writer = await asyncio.open_connection(api.server.host, api.server.port)
    writer.write(
        f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {_PART_TYPE}\r\n"
        f"Content-Length: {10 * limit}\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        status_line = await asyncio.wait_for(reader.readline(), 15)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 413 "), status_line


async def test_native_predict_png_and_json(api: Api, bird: bytes) -> None:
    w, h = Image.open(io.BytesIO(bird)).size
    status, png = await _upload(api, "/api/predict", bird)
    assert status == 200 and png[:4] == b"\x89PNG"
    mask = np.asarray(Image.open(io.BytesIO(png)))
    assert mask.shape == (h, w) and 3 in np.unique(mask)  # the bird
    form = aiohttp.FormData()
    form.add_field("image", bird, filename="b.jpg")
    status, body = await api.call("POST", "/api/predict?format=json", data=form)
    assert status == 200 and (body["width"], body["height"]) == (w, h)
    assert np.array_equal(np.asarray(body["mask"], np.uint8), mask)
    assert body["classes"]["bird"] > 0.05


# -- IBM MAX compatibility ---------------------------------------------------------------------


def _max_reference(model: Segmenter, img: Image.Image, longer: int) -> np.ndarray:
    """MAX's semantics written out: longer side to `longer` (each side rounded down,
    antialiased), padded with the mean value to the model's input, padding cut off."""
    w, h = img.size
    r = longer / max(w, h)
    small = np.asarray(
        img.convert("RGB").resize((int(r * w), int(r * h)), Image.Resampling.LANCZOS)
    )
    x = np.full((1, *model.input_size, 3), 128, np.uint8)
    x[0, : small.shape[0], : small.shape[1]] = small
    return model.segment(x)[0][: small.shape[0], : small.shape[1]]


@pytest.mark.parametrize("size", [(480, 360), (300, 500), (1024, 180), (33, 17)])
async def test_max_predict_semantics(
    api: Api, model: Segmenter, shared_dir: Path, size: tuple[int, int]
) -> None:
    src = next(iter(sorted((shared_dir / "data/camvid_segnet_test/images").iterdir())))
    img = Image.open(src).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    status, body = await _upload(api, "/model/predict", buf.getvalue(), ctype="image/png")
    assert status == 200 and body["status"] == "ok"
    w, h = size
    r = 513 / max(w, h)
    assert body["image_size"] == [int(r * w), int(r * h)]
    seg = np.asarray(body["seg_map"])
    assert seg.shape == (int(r * h), int(r * w))
    assert np.array_equal(seg, _max_reference(model, img, 513))


async def test_max_labels_and_metadata(api: Api) -> None:
    status, labels = await api.call("GET", "/model/labels")
    assert status == 200 and labels[0] == {"id": 0, "name": "background"}
    assert labels[15] == {"id": 15, "name": "person"} and len(labels) == 21
    status, meta = await api.call("GET", "/model/metadata")
    assert status == 200 and set(meta) == {"id", "name", "description", "type", "license", "source"}
    assert "segstream" in meta["id"] and "IBM" not in json.dumps(meta)


async def test_max_image_size_from_the_environment(
    make_api, monkeypatch: pytest.MonkeyPatch, bird: bytes
) -> None:
    from segstream.stream.api.predict import image_size_from_env

    assert image_size_from_env({"IMAGE_SIZE": "16"}) == 16
    assert image_size_from_env({"IMAGE_SIZE": "1024"}) == 1024
    with pytest.warns(UserWarning, match="not in 16..1024"):
        assert image_size_from_env({"IMAGE_SIZE": "2000"}) == 513
    with pytest.warns(UserWarning):
        assert image_size_from_env({"IMAGE_SIZE": "big"}) == 513
    monkeypatch.setenv("IMAGE_SIZE", "1024")  # larger than the model's 513 input
    api = await make_api()
    w, h = Image.open(io.BytesIO(bird)).size
    status, body = await _upload(api, "/model/predict", bird)
    r = 1024 / max(w, h)
    assert status == 200 and body["image_size"] == [int(r * w), int(r * h)]
    seg = np.asarray(body["seg_map"])
    assert seg.shape == (int(r * h), int(r * w)) and 3 in np.unique(seg)  # the bird
