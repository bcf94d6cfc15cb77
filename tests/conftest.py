"""Shared fixtures: the real data in ../shared and a model cache filled from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGSTREAM_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.fail(f"../shared not found at {SHARED}; set SEGSTREAM_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def segstream_home(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A SEGSTREAM_HOME filled by the real `fetch --from ../shared` path (checksums verified)."""
    from models import fetch

    home = Path(os.environ.get("SEGSTREAM_TEST_HOME", tmp_path_factory.mktemp("home")))
    os.environ["SEGSTREAM_HOME"] = str(home)
    fetch.fetch(from_dir=shared_dir, progress=False)
    return home
