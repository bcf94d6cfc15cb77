"""Shared fixtures: the real data in ../shared and a model cache filled from it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGSTREAM_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.fail(f"../shared not found at {SHARED}; set SEGSTREAM_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def model(segstream_home: Path):
    """The default model on the CPU runtime, single-threaded, batch 1 (shared by the tests
    that run a service in-process; a Service never closes a model it was given)."""
    from segstream.models.runtime import load_segmenter

    return load_segmenter("mnv2-voc", "tflite", batch_sizes=(1,), threads=1)


@pytest.fixture(scope="session")
def camera(shared_dir: Path):
    """A live RTSP camera on loopback: gst-rtsp-server looping a 320x240 clip at /cam."""
    from support.rtsp import RtspServer, encode_clip, gst_rtsp_available

    if (why := gst_rtsp_available()) is not None:
        pytest.fail(why)
    clip = encode_clip(shared_dir / "data/video/vtest.avi", size=(320, 240), seconds=4.0, gop=10)
    with RtspServer({"/cam": clip}) as srv:
        yield srv


@pytest.fixture(scope="session")
def segstream_home(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A SEGSTREAM_HOME filled by the real `fetch --from ../shared` path (checksums verified)."""
    from segstream.models import fetch

    home = Path(os.environ.get("SEGSTREAM_TEST_HOME", tmp_path_factory.mktemp("home")))
    os.environ["SEGSTREAM_HOME"] = str(home)
    fetch.fetch(from_dir=shared_dir, progress=False)
    return home


# tests/unit: no model, no peers, under a minute (`make test-fast`); tests/e2e: the real
# weights, clips and peers (RTSP server, FFmpeg, Chromium, Prometheus, Mosquitto, PostgreSQL,
# Ray). Every test under tests/e2e is marked e2e, so `-m "not e2e"` also selects the unit set.
E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Mosquitto broker for the test module (support.events_peers.Mosquitto)."""
    from support.events_peers import Mosquitto

    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()
