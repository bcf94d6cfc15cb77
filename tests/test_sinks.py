"""Sinks as plug-ins: the registry (stream.outputs), the nested per-sink config with the flat
keys of earlier versions still loading, and per-sink failure isolation in a running service: a
registered sink that raises is counted in segstream_sink_errors_total and the others still get
every frame. Also the shared pieces the split left in one place (source references, backoff)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from rtsp import free_port
from waiting import until

from segstream.models.runtime import Segmenter
from segstream.stream import outputs
from segstream.stream.config import (
    DEFAULT_CONFIG,
    AppConfig,
    ConfigError,
    RestreamConfig,
    StreamConfig,
    load_config,
)
from segstream.stream.datatypes import Rendered
from segstream.stream.lifecycle import backoff_delay
from segstream.stream.metrics import PrometheusObserver
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.restream import RestreamSink
from segstream.stream.server import make_app
from segstream.stream.service import LIVE_FIELDS, Service
from segstream.stream.sourceref import parse_source
from segstream.stream.sources import SourceStats, parse_target

SECRET = "hunter2"

# -- config ------------------------------------------------------------------------------------


def _load(tmp_path: Path, stream: dict[str, Any]) -> StreamConfig:
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps({"streams": [{"id": "a", "source": "x.mp4", **stream}]}))
    return load_config(p, env={}).streams[0]


def test_nested_restream_config_and_its_short_form(tmp_path: Path) -> None:
    url = f"rtsp://u:{SECRET}@media:8554/a"
    nested = _load(tmp_path, {"restream": {"url": url, "bitrate": 800, "preset": "veryfast"}})
    assert nested.restream == RestreamConfig(url=url, bitrate=800, preset="veryfast")
    assert nested.restream is not None and nested.restream.encoder == "auto"
    short = _load(tmp_path, {"restream": url})
    assert short.restream == RestreamConfig(url=url)
    # What the state file keeps is the nested form, and it loads back the same.
    dumped = nested.model_dump(mode="json", exclude_defaults=True)
    assert dumped["restream"] == {"url": url, "bitrate": 800, "preset": "veryfast"}
    assert StreamConfig.model_validate(dumped) == nested
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, {"restream": {"url": f"http://u:{SECRET}@media/a"}})
    assert "streams.0.restream.url" in str(e.value) and SECRET not in str(e.value), e.value
    with pytest.raises(ConfigError, match=r"streams\.0\.restream\.bitrat"):
        _load(tmp_path, {"restream": {"url": url, "bitrat": 800}})  # a typo names the key


def test_flat_restream_keys_load_nested_with_a_warning_naming_the_new_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="segstream.stream.config")
    url = "rtsp://media:8554/a"
    with pytest.warns(DeprecationWarning) as warned:
        old = _load(
            tmp_path,
            {"restream": url, "restream_bitrate": 3000, "restream_encoder": "libx264"},
        )
    assert old.restream == RestreamConfig(url=url, bitrate=3000, encoder="libx264")
    said = sorted(str(w.message) for w in warned)
    assert said == [
        "stream 'a': the key restream_bitrate is deprecated; use restream.bitrate",
        "stream 'a': the key restream_encoder is deprecated; use restream.encoder",
    ]
    assert sorted(r.getMessage() for r in caplog.records) == said
    # Where both are given the nested key wins; with the re-stream off the flat ones are moot.
    with pytest.warns(DeprecationWarning):
        both = _load(tmp_path, {"restream": {"url": url, "bitrate": 900}, "restream_bitrate": 1})
    assert both.restream is not None and both.restream.bitrate == 900
    with pytest.warns(DeprecationWarning, match="ignored: restream is off"):
        off = _load(tmp_path, {"restream_preset": "fast"})
    assert off.restream is None


def test_default_yaml_documents_the_nested_restream_keys() -> None:
    text = DEFAULT_CONFIG.read_text()
    for key in RestreamConfig.model_fields:
        assert f"#   {key}: " in text, key


# -- the registry ------------------------------------------------------------------------------


def test_registry_names_the_sinks_and_their_settings_are_live() -> None:
    assert list(outputs.SINKS) == ["restream"]
    assert RestreamSink.name == "restream"
    assert "restream" in LIVE_FIELDS  # a change replaces the sink, never the reader
    scfg = StreamConfig(id="a", source="x.mp4")
    assert outputs.make_sinks(scfg, NULL_OBSERVER) == {}


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


@pytest.mark.parametrize(
    ("source", "kind", "location", "scheme", "device"),
    [
        ("sample:vtest", "sample", "vtest", "sample", None),
        ("2", "device", "/dev/video2", None, 2),
        ("/dev/video1", "device", "/dev/video1", None, 1),
        ("/dev/cam", "device", "/dev/cam", None, None),
        ("file:///tmp/a.mp4", "file", "/tmp/a.mp4", "file", None),
        ("RTSP://h/a", "network", "RTSP://h/a", "rtsp", None),
        ("/tmp/b.mkv", "file", "/tmp/b.mkv", None, None),
    ],
)
def test_one_parser_of_source_references(
    source: str, kind: str, location: str, scheme: str | None, device: int | None
) -> None:
    ref = parse_source(source)
    assert (ref.kind, ref.location, ref.scheme, ref.device) == (kind, location, scheme, device)
    if kind != "sample":
        target = parse_target(source)
        assert (target.kind, target.url, target.device) == (kind, location, device)


def test_sample_targets_resolve_through_the_resolver() -> None:
    target = parse_target("sample:vtest", lambda s: f"/clips/{s.split(':')[1]}.avi")
    assert (target.kind, target.url, target.scheme) == ("file", "/clips/vtest.avi", "file")


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for failures, base in ((1, 0.5), (2, 1.0), (3, 2.0)):
        delays = [backoff_delay(failures, 0.5, 10.0) for _ in range(200)]
        assert base * 0.8 <= min(delays) and max(delays) <= base * 1.2, (failures, delays)
        assert max(delays) - min(delays) > base * 0.1  # jittered, not fixed
    assert all(backoff_delay(30, 0.5, 10.0) <= 10.0 for _ in range(200))
