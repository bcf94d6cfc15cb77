"""The default state file belongs to one config file, found by its resolved path: the parts that
need no model and no peers (the rest: tests/e2e/test_state_file.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from segstream.stream.cli import build_parser, state_path


def _path_for(*argv: str) -> Path | None:
    args = build_parser().parse_args(["serve", *argv])
    return state_path(args, None)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEGSTREAM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_same_name_in_two_folders_gets_two_state_files(tmp_path: Path, home: Path) -> None:
    a, b = tmp_path / "a" / "config.yaml", tmp_path / "b" / "config.yaml"
    pa, pb = _path_for("--config", str(a)), _path_for("--config", str(b))
    assert pa is not None and pb is not None
    assert pa != pb
    assert pa.parent == pb.parent == home / "state"
    assert pa.name.startswith("config-") and pa.suffix == ".json"


def test_one_config_reached_two_ways_keeps_one_state_file(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "site" / "config.yaml"
    cfg.parent.mkdir()
    monkeypatch.chdir(cfg.parent)
    assert _path_for("--config", "config.yaml") == _path_for("--config", str(cfg))
    link = tmp_path / "alias"
    os.symlink(cfg.parent, link)
    assert _path_for("--config", str(link / "config.yaml")) == _path_for("--config", str(cfg))


def test_explicit_choices_win(tmp_path: Path, home: Path) -> None:
    assert _path_for("--config", "x.yaml", "--state", "none") is None
    assert _path_for("--config", "x.yaml", "--state", str(tmp_path / "s.json")) == (
        tmp_path / "s.json"
    )
    assert _path_for() == home / "state" / "default.json"


def test_old_name_is_taken_over_once(
    tmp_path: Path, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state file of an older version (named after the config's name) is moved to the first
    config of that name that starts; a second config of the same name does not share it."""
    legacy = home / "state" / "config.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"version": 1, "streams": []}))
    with caplog.at_level(logging.WARNING):
        first = _path_for("--config", str(tmp_path / "a" / "config.yaml"))
    assert first is not None and first.is_file() and not legacy.exists()
    assert "moved" in caplog.text
    second = _path_for("--config", str(tmp_path / "b" / "config.yaml"))
    assert second is not None and not second.exists()
