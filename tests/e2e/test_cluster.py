"""Cluster mode. Placement, service discovery, the gateway's endpoint table and the
controller's logic are checked here without Ray; the real-cluster tests (tests/cluster_suite.py:
a head and two worker nodes, the real model, a real Prometheus) run in a pytest of their own
inside a network namespace of their own (unshare -n, loopback up), where every Ray address is
127.0.0.1 and no Ray port is opened on the machine's own address."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# -- placement (pure) ------------------------------------------------------------------------


# -- the controller's logic without Ray -------------------------------------------------------


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
