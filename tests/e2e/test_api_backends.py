"""The shared API suite (tests/api_suite.py) against a single node: its real app, Service and
model on a loopback port. tests/cluster_suite.py runs the same tests against a cluster
gateway on a real Ray cluster."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.api_suite import (  # noqa: F401  (the shared tests, collected here)
    ApiTarget,
    test_bad_streams_are_refused_naming_the_key,
    test_openapi_shows_the_states,
    test_pictures_and_a_share_url,
    test_predict_and_model_facts,
    test_stream_crud_and_its_error_bodies,
    test_streams_past_max_streams_are_refused,
)
from support.peers import free_port
from support.waiting import wait_for

from segstream.models.runtime import Segmenter
from segstream.stream.config import AppConfig
from segstream.stream.server import make_app
from segstream.stream.service import Service

pytestmark = pytest.mark.e2e
MAX_STREAMS = 3


@pytest.fixture(scope="module")
def target(model: Segmenter, shared_dir: Path) -> Iterator[ApiTarget]:
    """A node as `segstream serve` runs it (no tokens: loopback), served from a thread."""
    cfg = AppConfig.model_validate(
        {
            "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1},
            "sources": {
                "allow_local": [str(shared_dir / "data/video")],
                "max_streams": MAX_STREAMS,
            },
            "streams": [],
        }
    )
    service = Service(cfg, segmenter=model)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def up() -> web.AppRunner:
        runner = web.AppRunner(make_app(service), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = run(up())
    try:
        assert wait_for(lambda: service.ready, 60), service.error
        yield ApiTarget(
            f"http://127.0.0.1:{port}",
            str(shared_dir / "data/video/vtest.avi"),
            MAX_STREAMS,
        )
    finally:
        run(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
