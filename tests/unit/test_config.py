"""Typed config: YAML < env < CLI, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from segstream.stream.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_default_config_has_demo_stream() -> None:
    cfg = load_config(env={})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    assert [s.id for s in cfg.streams] == ["demo"]
    assert cfg.streams[0].source == "sample:vtest"


def test_default_yaml_documents_every_option() -> None:
    """Every field of every section appears in configs/default.yaml."""
    from segstream.stream.config import DEFAULT_CONFIG, AppConfig, StreamConfig

    text = DEFAULT_CONFIG.read_text()
    for name, field in AppConfig.model_fields.items():
        assert f"{name}:" in text, name
        sub = getattr(field.annotation, "model_fields", {})
        for key in sub:
            assert f"{key}:" in text, f"{name}.{key}"
    for key in StreamConfig.model_fields:
        assert f"{key}:" in text, f"streams[].{key}"


def test_sources_alone_serve_exactly_those(monkeypatch: pytest.MonkeyPatch) -> None:
    """`segstream serve --source URL` without --config: no demo stream beside the camera."""
    monkeypatch.delenv("SEGSTREAM_CONFIG", raising=False)
    cfg = load_config(env={}, extra_sources=["rtsp://cam.local/stream1"])
    assert [(s.id, s.source) for s in cfg.streams] == [("cam1", "rtsp://cam.local/stream1")]
    assert cfg.server.port == 8080  # the rest of the defaults still apply


def test_default_config_is_package_data() -> None:
    from importlib import resources

    from segstream.stream.config import DEFAULT_CONFIG

    shipped = resources.files("segstream.stream").joinpath("default.yaml").read_text()
    repo = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    assert shipped == repo.read_text() == DEFAULT_CONFIG.read_text()


def test_env_overrides_yaml_and_cli_overrides_env(tmp_path: Path) -> None:
    p = write(tmp_path, "server: {port: 9000}\nstreams: []\n")
    env = {"SEGSTREAM_SERVER__PORT": "9100", "SEGSTREAM_MODEL__BACKEND": "tflite"}
    cfg = load_config(p, env=env)
    assert cfg.server.port == 9100 and cfg.model.backend == "tflite"
    cfg = load_config(p, env=env, overrides={"server": {"port": 9200}})
    assert cfg.server.port == 9200


def test_sources_add_streams(tmp_path: Path) -> None:
    p = write(tmp_path, "streams: [{id: cam1, source: a.mp4}]\n")
    cfg = load_config(p, env={}, extra_sources=["rtsp://h/x?a=b", "door=rtsp://h/door", "0"])
    assert [(s.id, s.source) for s in cfg.streams] == [
        ("cam1", "a.mp4"),
        ("cam2", "rtsp://h/x?a=b"),
        ("door", "rtsp://h/door"),
        ("cam3", "0"),
    ]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("server: {prot: 1}\n", "server.prot: unknown key"),
        ("streams: [{id: a, source: 'ftp://x/y'}]\n", "streams.0.source"),
        ("streams: [{id: a, source: x.mp4, infer_fps: -1}]\n", "streams.0.infer_fps"),
        ("render: {alpha: 2}\n", "render.alpha"),
        ("streams: [{id: a, source: x}, {id: a, source: y}]\n", "duplicate stream ids"),
        ("model: {max_batch: 16, batch_sizes: [1, 2, 4, 8]}\n", "max_batch"),
        ("streams: [{id: 'bad id', source: x}]\n", "streams.0.id"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), env={})
    assert key in str(e.value)


def test_bad_env_value_names_the_key(tmp_path: Path) -> None:
    p = write(tmp_path, "streams: []\n")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(p, env={"SEGSTREAM_SERVER__PORT": "-5"})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "server: [\n"), env={})
