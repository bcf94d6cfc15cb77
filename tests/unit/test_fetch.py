"""fetch: copy from a folder or download over HTTP, always sha256-verified; clear errors: the parts
that need no model and no peers (the rest: tests/e2e/test_fetch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from segstream.models import fetch


def test_home_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SEGSTREAM_HOME", raising=False)
    assert fetch.home() == Path.home() / ".cache" / "segstream"
    monkeypatch.setenv("SEGSTREAM_HOME", str(tmp_path))
    assert fetch.home() == tmp_path
