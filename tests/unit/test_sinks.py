"""Sinks as plug-ins: the registry (stream.outputs), the nested per-sink config with the flat: the
parts that need no model and no peers (the rest: tests/e2e/test_sinks.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from segstream.stream import outputs
from segstream.stream.config import (
    DEFAULT_CONFIG,
    ConfigError,
    RestreamConfig,
    StreamConfig,
    load_config,
)
from segstream.stream.lifecycle import backoff_delay
from segstream.stream.observer import NULL_OBSERVER
from segstream.stream.restream import RestreamSink
from segstream.stream.service import LIVE_FIELDS
from segstream.stream.sourceref import parse_source
from segstream.stream.sources import parse_target

SECRET = "hunter2"


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


def test_registry_names_the_sinks_and_their_settings_are_live() -> None:
    assert list(outputs.SINKS) == ["restream"]
    assert RestreamSink.name == "restream"
    assert "restream" in LIVE_FIELDS  # a change replaces the sink, never the reader
    scfg = StreamConfig(id="a", source="x.mp4")
    assert outputs.make_sinks(scfg, NULL_OBSERVER) == {}


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


class _Held:
    """A StreamTarget that only keeps the configs it is given."""

    def __init__(self) -> None:
        self.cfgs: dict[str, StreamConfig] = {}

    def configs(self) -> dict[str, StreamConfig]:
        return self.cfgs

    def check(self, cfg: StreamConfig) -> None:
        pass

    def apply_add(self, cfg: StreamConfig) -> None:
        self.cfgs[cfg.id] = cfg

    def apply_replace(self, cfg: StreamConfig) -> None:
        self.cfgs[cfg.id] = cfg

    def apply_remove(self, stream_id: str) -> None:
        del self.cfgs[stream_id]


def test_a_patch_with_the_flat_keys_of_earlier_versions_still_applies() -> None:
    """API clients written for the flat `restream_*` keys keep working: the PATCH body takes
    them and they land in `restream`, as in YAML (with the same deprecation warning)."""
    from segstream.stream.config import SourcesConfig
    from segstream.stream.control import StreamSet
    from segstream.stream.schemas import StreamPatch

    held = _Held()
    streams = StreamSet(held, None, SourcesConfig())
    streams.add(StreamConfig(id="a", source="sample:vtest", restream="rtsp://127.0.0.1:8554/a"))
    body = StreamPatch.model_validate({"restream_encoder": "libx264", "restream_bitrate": 900})
    with pytest.warns(DeprecationWarning, match="restream_encoder is deprecated"):
        cfg = streams.change("a", body.model_dump(exclude_unset=True))
    assert cfg.restream is not None
    assert (cfg.restream.url, cfg.restream.encoder, cfg.restream.bitrate) == (
        "rtsp://127.0.0.1:8554/a",
        "libx264",
        900,
    )
    assert held.cfgs["a"] == cfg
