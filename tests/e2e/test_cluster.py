"""Cluster mode. Placement, service discovery, the gateway's endpoint table and the
controller's logic are checked here without Ray; the real-cluster tests (tests/cluster_suite.py:
a head and two worker nodes, the real model, a real Prometheus) run in a pytest of their own
inside a network namespace of their own (unshare -n, loopback up), where every Ray address is
127.0.0.1 and no Ray port is opened on the machine's own address."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from segstream.stream.datatypes import NodeState
from segstream.stream.schemas import NodeStatus

REPO = Path(__file__).resolve().parents[2]


# -- placement (pure) ------------------------------------------------------------------------


# -- the controller's logic without Ray -------------------------------------------------------


def _node(short_id: str, host: str, port: int, state: NodeState = NodeState.UP) -> NodeStatus:
    return NodeStatus(
        id=short_id,
        ray_id=short_id * 3,
        host=host,
        port=port,
        metrics_port=9100,
        slots=1.0,
        load=0.5,
        streams=2,
        state=state,
        ready=True,
        error=None,
    )


# -- the real cluster, in a network namespace of its own ----------------------------------------
def _netns_available() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip not installed"
    r = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True
    )
    return None if r.returncode == 0 else f"unshare -n failed: {r.stderr.strip()}"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_on_a_ray_cluster_in_its_own_network_namespace(shared_dir: Path) -> None:
    pytest.importorskip("ray")
    if (why := _netns_available()) is not None:
        pytest.fail(why)
    with tempfile.TemporaryDirectory(prefix="rayt", dir="/tmp") as ray_tmp:
        env = dict(
            os.environ,
            SEGSTREAM_NETNS="1",
            RAY_TMPDIR=ray_tmp,
            SEGSTREAM_SHARED=str(shared_dir),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            RAY_USAGE_STATS_ENABLED="0",
            # Ray's token authentication, as the README and deploy/ use it.
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
        )
        inner = [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "-o",
            "timeout=300",
            str(REPO / "tests/e2e/cluster_suite.py"),
        ]
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=560)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    print("\n".join(ln for ln in lines if not ln.startswith("(")))  # figures, the summary
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    assert " passed" in lines[-1] and "skipped" not in lines[-1], lines[-1]


# -- the gateway's /ws and /mosaic/mjpeg against fake node services (no Ray) ---------------------


class _FakeNode:
    """A node service's /ws, /api/streams and /mosaic/mjpeg, as the gateway sees them."""

    def __init__(self, name: str, secret: str) -> None:
        self.name, self.secret = name, secret
        self.received: list[dict[str, Any]] = []
        self.open = 0

    def app(self) -> Any:
        from aiohttp import web

        async def ws_handler(request: web.Request) -> web.WebSocketResponse:
            if request.headers.get("Authorization") != f"Bearer {self.secret}":
                raise web.HTTPUnauthorized()
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self.open += 1
            watch: list[str] = []

            async def frames() -> None:
                seq = 0
                while not ws.closed:
                    seq += 1
                    await ws.send_str('{"type": "status", "from": "node"}')
                    for sid in watch:
                        await ws.send_bytes(
                            bytes((1, len(sid)))
                            + sid.encode()
                            + seq.to_bytes(4, "big")
                            + b"\xff\xd8"
                            + b"x" * 64
                        )
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(frames())
            try:
                async for msg in ws:
                    data = json.loads(msg.data)
                    self.received.append(data)
                    watch[:] = data.get("watch", watch)
            finally:
                task.cancel()
                self.open -= 1
            return ws

        async def streams(request: web.Request) -> web.Response:
            return web.json_response({"streams": []})

        async def mosaic(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(
                headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame"}
            )
            await resp.prepare(request)
            await resp.write(
                f"--frame\r\nX-Node: {self.name}\r\n\r\n{request.query_string}\r\n".encode()
            )
            return resp

        app = web.Application()
        app.router.add_get("/ws", ws_handler)
        app.router.add_get("/api/streams", streams)
        app.router.add_get("/mosaic/mjpeg", mosaic)
        return app
