"""One API test suite for both backends: the same requests and the same expected answers for
a single node (tests/test_api_backends.py) and for a cluster gateway on a real Ray cluster
(tests/cluster_suite.py). A module imports these tests and defines a `target` fixture (an
`ApiTarget` on its server); every test leaves the stream set as it found it."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from segstream.stream.datatypes import StreamState

# A source the policy lets through (loopback) where nothing listens: cheap to run.
NOWHERE = "rtsp://127.0.0.1:9/none"
LIVE_TIMEOUT = 120.0  # a cluster places, starts and warms up the stream first


@dataclass
class ApiTarget:
    base: str  # http://host:port of the node or gateway
    clip: str  # a local video file the source policy allows
    max_streams: int  # the server's sources.max_streams

    def request(
        self, method: str, path: str, data: bytes | None = None, ctype: str = ""
    ) -> tuple[int, str, bytes]:
        """(status, content type, body)."""
        headers = {"Content-Type": ctype} if ctype else {}
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        status, ctype, raw = self.request(method, path, data, "application/json" if data else "")
        return status, (json.loads(raw) if "json" in ctype and raw else raw)

    def ids(self) -> list[str]:
        status, body = self.call("GET", "/api/streams")
        assert status == 200, body
        return [s["id"] for s in body["streams"]]


def _id() -> str:
    return "t" + uuid.uuid4().hex[:8]


def _wait(pred: Callable[[], Any], timeout: float) -> Any:
    """`pred`'s first truthy value, polled until `timeout` (then its last one)."""
    deadline = time.monotonic() + timeout
    while (value := pred()) is None or value is False:
        if time.monotonic() > deadline:
            return value
        time.sleep(0.25)
    return value


def test_stream_crud_and_its_error_bodies(target: ApiTarget) -> None:
    sid, before = _id(), target.ids()
    status, body = target.call("POST", "/api/streams", {"id": sid, "source": NOWHERE})
    assert status == 201 and body["id"] == sid and body["source"] == NOWHERE, body
    assert StreamState(body["state"]) in StreamState
    try:
        assert target.ids() == [*before, sid]
        status, body = target.call("GET", f"/api/streams/{sid}")
        assert status == 200 and body["id"] == sid and body["reader"] == "auto", body
        status, body = target.call("POST", "/api/streams", {"id": sid, "source": NOWHERE})
        assert (status, body) == (409, {"error": f"stream {sid!r} exists"})
        status, body = target.call("PATCH", f"/api/streams/{sid}", {"infer_fps": 2})
        assert status == 200 and body["id"] == sid, body
        status, body = target.call("PATCH", f"/api/streams/{sid}", {"alpha": 2})
        assert status == 422 and [d["loc"] for d in body["details"]] == ["alpha"], body
        status, body = target.call("PATCH", f"/api/streams/{sid}", {"source": "/etc/passwd"})
        assert status == 422 and body["details"][0]["loc"] == "source", body
    finally:
        status, _ = target.call("DELETE", f"/api/streams/{sid}")
    assert status == 204 and target.ids() == before
    unknown = {"error": f"unknown stream {sid!r}"}
    assert target.call("GET", f"/api/streams/{sid}") == (404, unknown)
    assert target.call("PATCH", f"/api/streams/{sid}", {"alpha": 0.5}) == (404, unknown)
    assert target.call("DELETE", f"/api/streams/{sid}") == (404, unknown)


def test_bad_streams_are_refused_naming_the_key(target: ApiTarget) -> None:
    before = target.ids()
    status, body = target.call("POST", "/api/streams", {"id": "x", "source": "/etc/passwd"})
    msg = body["details"][0]["msg"]
    assert status == 422 and "not allowed" in msg, body
    assert body == {"error": f"source: {msg}", "details": [{"loc": "source", "msg": msg}]}
    status, body = target.call("POST", "/api/streams", {"id": "x", "source": "gopher://10.0.0.1/x"})
    assert status == 422 and body["details"][0]["loc"] == "source", body
    status, body = target.call(
        "POST", "/api/streams", {"id": "x", "source": NOWHERE, "classes": ["unicorn"]}
    )
    msg = body["details"][0]["msg"]
    assert status == 422 and "unicorn" in msg, body
    assert body == {"error": f"classes: {msg}", "details": [{"loc": "classes", "msg": msg}]}
    status, body = target.call("POST", "/api/streams", {"id": "x", "source": NOWHERE, "fps": 1})
    assert status == 422 and body["details"][0]["loc"] == "fps", body  # unknown key
    assert target.ids() == before


def test_streams_past_max_streams_are_refused(target: ApiTarget) -> None:
    before = target.ids()
    fillers = [_id() for _ in range(target.max_streams - len(before))]
    try:
        for sid in fillers:
            status, body = target.call("POST", "/api/streams", {"id": sid, "source": NOWHERE})
            assert status == 201, body
        status, body = target.call("POST", "/api/streams", {"id": _id(), "source": NOWHERE})
        limit = target.max_streams
        assert (status, body) == (409, {"error": f"at most {limit} streams (sources.max_streams)"})
    finally:
        for sid in fillers:
            target.call("DELETE", f"/api/streams/{sid}")
    assert target.ids() == before


def test_pictures_and_a_share_url(target: ApiTarget) -> None:
    sid = _id()
    status, body = target.call("POST", "/api/streams", {"id": sid, "source": target.clip})
    assert status == 201, body
    try:

        def snapshot() -> bytes | None:
            status, ctype, raw = target.request("GET", f"/streams/{sid}/snapshot.jpg")
            return raw if status == 200 and ctype == "image/jpeg" else None

        jpeg = _wait(snapshot, LIVE_TIMEOUT)
        assert jpeg is not None and jpeg[:2] == b"\xff\xd8", target.call(
            "GET", f"/api/streams/{sid}"
        )
        width = target.call("GET", f"/api/streams/{sid}")[1]["width"]
        assert Image.open(io.BytesIO(jpeg)).width == width
        status, ctype, png = target.request("GET", f"/streams/{sid}/mask.png")
        assert (status, ctype) == (200, "image/png") and Image.open(io.BytesIO(png)).mode == "P"

        status, share = target.call(
            "POST", f"/api/streams/{sid}/share", {"kind": "snapshot", "ttl_s": 120}
        )
        assert status == 200 and share["url"].startswith(f"/streams/{sid}/snapshot.jpg?exp="), share
        assert "&sig=" in share["url"] and share["expires"] > time.time() + 100
        status, ctype, raw = target.request("GET", share["url"])
        assert (status, ctype, raw[:2]) == (200, "image/jpeg", b"\xff\xd8")
        status, body = target.call("POST", f"/api/streams/{sid}/share", {"ttl_s": 1})
        assert status == 422 and body["details"][0]["loc"] == "ttl_s", body
    finally:
        target.call("DELETE", f"/api/streams/{sid}")
    unknown = {"error": f"unknown stream {sid!r}"}
    assert target.call("GET", f"/streams/{sid}/snapshot.jpg") == (404, unknown)
    assert target.call("GET", f"/streams/{sid}/mask.png") == (404, unknown)
    assert target.call("POST", f"/api/streams/{sid}/share", {}) == (404, unknown)


def _multipart(image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_predict_and_model_facts(target: ApiTarget) -> None:
    # A gateway answers once a node has its model warm.
    status, model = _wait(lambda: (r := target.call("GET", "/api/model"))[0] == 200 and r, 120)
    assert status == 200 and model["name"] == "mnv2-voc" and model["labels"][15] == "person"
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 0, 0)).save(buf, "PNG")
    data, ctype = _multipart(buf.getvalue())
    status, rtype, raw = target.request("POST", "/api/predict?format=json", data, ctype)
    assert status == 200 and rtype.startswith("application/json"), (status, rtype, raw[:200])
    body = json.loads(raw)
    assert (body["width"], body["height"], body["labels"]) == (64, 48, model["labels"])
    assert len(body["mask"]) == 48 and {len(row) for row in body["mask"]} == {64}
    status, rtype, raw = target.request("POST", "/api/predict", data, ctype)
    assert (status, rtype) == (200, "image/png") and Image.open(io.BytesIO(raw)).size == (64, 48)
    status, body = target.call("POST", "/api/predict", {"image": "nope"})
    assert status == 415 and "multipart" in body["error"], body
    status, labels = target.call("GET", "/model/labels")
    assert status == 200 and labels[15] == {"id": 15, "name": "person"}


def test_openapi_shows_the_states(target: ApiTarget) -> None:
    status, doc = target.call("GET", "/openapi.json")
    assert status == 200
    schemas = doc["components"]["schemas"]
    assert schemas["StreamState"]["enum"] == [s.value for s in StreamState]
    state = schemas["StreamStatus"]["properties"]["state"]
    assert state["$ref"] == "#/components/schemas/StreamState"
