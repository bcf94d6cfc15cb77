"""The default state file belongs to one config file, found by its resolved path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.service_proc import ServiceProcess


@pytest.mark.e2e
def test_two_services_with_same_config_name_serve_their_own_streams(
    tmp_path: Path, segstream_home: Path, shared_dir: Path
) -> None:
    """Start one service from a/config.yaml, stop it, start another from b/config.yaml: the
    second serves b's stream, not the first one's (it did before, sharing one state file)."""
    clip = str(shared_dir / "data/video/vtest.avi")
    env = {"SEGSTREAM_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    os.symlink(segstream_home / "models", tmp_path / "home" / "models")
    ids = {}
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        cfg = {"streams": [{"id": f"cam-{name}", "source": clip, "infer_fps": 1}]}
        svc = ServiceProcess(folder, cfg, env=env, config_path=folder / "config.yaml").start()
        try:
            status, body, _ = svc.get("/api/streams")
            assert status == 200
            ids[name] = [s["id"] for s in json.loads(body)["streams"]]
            assert "stream set kept in" in svc.log()
        finally:
            svc.stop()
    assert ids == {"a": ["cam-a"], "b": ["cam-b"]}
    assert len(list((tmp_path / "home" / "state").glob("config-*.json"))) == 2
