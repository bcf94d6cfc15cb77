"""Sinks as plug-ins: the registry (stream.outputs), the nested per-sink config with the flat
keys of earlier versions still loading, and per-sink failure isolation in a running service: a
registered sink that raises is counted in segstream_sink_errors_total and the others still get
every frame. Also the shared pieces the split left in one place (source references, backoff)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from support.rtsp import free_port
from support.waiting import until

from segstream.models.runtime import Segmenter
from segstream.stream import outputs
from segstream.stream.config import (
    AppConfig,
    StreamConfig,
)
from segstream.stream.datatypes import Rendered
from segstream.stream.metrics import PrometheusObserver
from segstream.stream.observer import Observer
from segstream.stream.restream import RestreamSink
from segstream.stream.server import make_app
from segstream.stream.service import Service
from segstream.stream.sources import SourceStats

SECRET = "hunter2"

# -- config ------------------------------------------------------------------------------------


# -- the registry ------------------------------------------------------------------------------


class Broken:
    """A sink that raises on every frame (a bug in a plug-in)."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def wants_frames(self) -> bool:
        return True

    def put(self, frame: Rendered) -> None:
        self.calls += 1
        raise RuntimeError("broken sink")

    def close(self) -> None:
        pass

    def start(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"calls": self.calls}


class Tally:
    """A sink that keeps the sequence numbers of the frames it was given."""

    name = "tally"

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.started = self.closed = False

    def wants_frames(self) -> bool:
        return not self.closed

    def put(self, frame: Rendered) -> None:
        self.seqs.append(frame.frame_seq)

    def close(self) -> None:
        self.closed = True

    def start(self) -> None:
        self.started = True

    def status(self) -> dict[str, Any]:
        return {"frames": len(self.seqs)}


def service_config(shared_dir: Path) -> AppConfig:
    return AppConfig.model_validate(
        {
            "model": {
                "name": "mnv2-voc",
                "backend": "tflite",
                "workers": 1,
                "threads": 1,
                "max_batch": 1,
            },
            "sources": {"allow_local": [str(shared_dir / "data/video")]},
            "server": {"shutdown_timeout": 2.0},
        }
    )


@pytest.fixture
async def running(model: Segmenter, shared_dir: Path) -> AsyncIterator[tuple[Service, TestServer]]:
    service = Service(service_config(shared_dir), segmenter=model)
    server = TestServer(make_app(service), host="127.0.0.1")
    await server.start_server()
    assert await until(lambda: service.ready, 30), service.error
    yield service, server
    await server.close()


@pytest.mark.e2e
async def test_a_raising_sink_is_counted_and_the_others_still_get_every_frame(
    running: tuple[Service, TestServer], shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, server = running
    metrics = service.metrics
    assert isinstance(metrics, PrometheusObserver)
    made: dict[str, Any] = {}

    def register(name: str, cls: type) -> None:
        def make(scfg: StreamConfig, observer: Observer) -> Any:
            made[name] = cls()
            return made[name]

        monkeypatch.setitem(outputs.SINKS, name, outputs.SinkKind(make, frozenset()))

    register("broken", Broken)  # registered before tally: it gets each frame first
    register("tally", Tally)
    vtest = str(shared_dir / "data/video/vtest.avi")
    stream = await asyncio.to_thread(service.add_stream, StreamConfig(id="s", source=vtest))
    broken, tally = made["broken"], made["tally"]
    assert stream.sinks == {"broken": broken, "tally": tally} and tally.started

    def errors() -> float | None:
        labels = {"stream": "s", "sink": "broken"}
        return metrics.registry.get_sample_value("segstream_sink_errors_total", labels)

    assert await until(lambda: len(tally.seqs) >= 10, 30), (broken.calls, tally.seqs)
    # Every frame the broken sink was handed, the next sink got too, and it was counted.
    assert await until(lambda: broken.calls == len(tally.seqs) == errors(), 5), (
        broken.calls,
        len(tally.seqs),
        errors(),
    )
    assert tally.seqs == sorted(set(tally.seqs))  # each frame once, in order
    st = service.stream_status("s")
    assert st["sinks"]["tally"]["frames"] >= 10 and st["restream"] is None
    # The API shows a registered sink's status with no schema of its own.
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/api/streams/s")) as r:
        assert r.status == 200, await r.text()
        shown = await r.json()
    assert shown["sinks"]["broken"]["calls"] >= 10 and shown["sinks"]["tally"]["frames"] >= 10
    stats = stream.source.stats()
    assert isinstance(stats, SourceStats) and (st["width"], st["height"]) == (768, 576)
    assert (stats.width, stats.height) == (768, 576) and stats.captured >= len(tally.seqs)

    await asyncio.to_thread(service.remove_stream, "s")
    assert tally.closed
    assert 'stream="s"' not in metrics.exposition().decode()  # the error series went too


@pytest.mark.e2e
async def test_the_api_takes_the_nested_restream_and_patches_it_live(
    running: tuple[Service, TestServer], shared_dir: Path
) -> None:
    service, server = running
    vtest = str(shared_dir / "data/video/vtest.avi")
    nobody = f"rtsp://u:{SECRET}@127.0.0.1:{free_port()}/x"  # nothing listens: reconnecting
    body = {
        "id": "n",
        "source": vtest,
        "reconnect_initial": 0.1,
        "reconnect_max": 0.2,
        "restream": {"url": nobody, "bitrate": 800},
    }

    def restream_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == "restream-n"]

    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, data: Any = None) -> tuple[int, Any]:
            async with http.request(method, server.make_url(path), json=data) as r:
                return r.status, await r.json() if r.status != 204 else None

        status, st = await call("POST", "/api/streams", body)
        assert status == 201, st
        assert st["restream"]["url"] == f"rtsp://***@127.0.0.1:{nobody.rsplit(':', 1)[1]}"
        stream = service.streams["n"]
        first, source = stream.restream, stream.source
        assert isinstance(first, RestreamSink) and first.bitrate_kbps == 800
        assert first.preset == "ultrafast" and restream_threads() == ["restream-n"]

        change = {"restream": {"url": nobody, "bitrate": 500, "preset": "veryfast"}}
        status, st = await call("PATCH", "/api/streams/n", change)
        assert status == 200, st
        new = stream.restream
        assert isinstance(new, RestreamSink) and new is not first
        assert (new.bitrate_kbps, new.preset) == (500, "veryfast")
        assert stream.source is source, "a restream change must not restart the reader"
        assert first.thread is not None and not first.thread.is_alive()
        assert restream_threads() == ["restream-n"]

        status, st = await call("PATCH", "/api/streams/n", {"restream": {"url": "media/x"}})
        assert status == 422 and "restream" in json.dumps(st), st
        assert stream.restream is new  # refused: nothing changed

        status, st = await call("PATCH", "/api/streams/n", {"restream": None})
        assert status == 200 and st["restream"] is None, st
        assert stream.restream is None and stream.source is source
        assert await until(lambda: not restream_threads(), 5)
        assert SECRET not in json.dumps(st)
        assert (await call("DELETE", "/api/streams/n"))[0] == 204


# -- the shared pieces -------------------------------------------------------------------------
