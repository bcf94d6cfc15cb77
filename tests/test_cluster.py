"""Cluster mode. Placement, service discovery, the gateway's endpoint table and the
controller's logic are checked here without Ray; the real-cluster tests (tests/cluster_suite.py:
a head and two worker nodes, the real model, a real Prometheus) run in a pytest of their own
inside a network namespace of their own (unshare -n, loopback up), where every Ray address is
127.0.0.1 and no Ray port is opened on the machine's own address."""

from __future__ import annotations

import inspect
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stream.cluster.placement import CostModel, balance, place
from stream.cluster.sd import target_groups
from stream.config import AppConfig, StreamConfig

REPO = Path(__file__).resolve().parents[1]


# -- placement (pure) ------------------------------------------------------------------------
def test_new_streams_go_to_the_least_loaded_node() -> None:
    p = place({f"s{i}": 1.0 for i in range(6)}, {"a": 4.0, "b": 4.0, "c": 2.0})
    load = p.load({f"s{i}": 1.0 for i in range(6)})
    # Shares of capacity 0.75, 0.5, 0.5 (2, 2, 2 would load the small node to 1.0).
    assert load == {"a": 3.0, "b": 2.0, "c": 1.0} and not p.unplaced and not p.moved


def test_placement_respects_capacity_and_reports_what_does_not_fit() -> None:
    p = place({"big": 3.0, "x": 1.0, "y": 1.0}, {"a": 2.0, "b": 2.0})
    assert p.unplaced == ["big"] and set(p.assignment) == {"x", "y"}


def test_running_streams_stay_put_below_the_threshold() -> None:
    costs = {f"s{i}": 1.0 for i in range(7)}
    current = {f"s{i}": "a" if i < 4 else "b" for i in range(7)}
    p = place(costs, {"a": 8.0, "b": 8.0}, current, threshold=0.25)
    assert p.assignment == current and not p.moved  # 0.5 vs 0.375: within the threshold


def test_a_node_that_joins_empty_takes_streams_over_the_threshold() -> None:
    costs = {f"s{i}": 1.0 for i in range(8)}
    current = dict.fromkeys(costs, "a")
    p = place(costs, {"a": 8.0, "b": 8.0}, current, threshold=0.25)
    load = p.load(costs)
    assert abs(load["a"] - load["b"]) <= 2.0 and len(p.moved) >= 3
    assert max(balance(p, costs, {"a": 8.0, "b": 8.0})) - min(
        balance(p, costs, {"a": 8.0, "b": 8.0})) <= 0.25


def test_a_lost_node_streams_are_spread_over_the_survivors() -> None:
    costs = {f"s{i}": 1.0 for i in range(9)}
    first = place(costs, {"a": 4.0, "b": 4.0, "c": 4.0})
    lost = {s for s, n in first.assignment.items() if n == "a"}
    survivors = {s: n for s, n in first.assignment.items() if n != "a"}
    p = place(costs, {"b": 5.0, "c": 5.0}, survivors)
    assert not p.unplaced and all(p.assignment[s] == n for s, n in survivors.items())
    assert {p.assignment[s] for s in lost} == {"b", "c"}


def test_placement_is_deterministic() -> None:
    costs = {f"s{i}": 0.1 + (i % 3) * 0.2 for i in range(50)}
    caps = {f"n{i}": 3.0 for i in range(5)}
    assert place(costs, caps).assignment == place(dict(reversed(costs.items())), caps).assignment


def test_cost_model() -> None:
    m = CostModel(stream_cost=0.075, inference_cost=0.058, uncapped_fps=15)
    assert m.cost(0) == pytest.approx(0.945) and m.cost(2) == pytest.approx(0.191)
    assert m.streams_per_node(8, 2) == 41 and m.streams_per_node(0, 2) == 0


# -- the controller's logic without Ray -------------------------------------------------------
def test_cluster_state_moves_a_lost_node_streams_and_adopts_running_ones(
        tmp_path: Path) -> None:
    from stream.cluster.controller import ClusterState, NodeRecord
    from stream.cluster.node import fingerprint
    from stream.store import StreamStore

    cfg = AppConfig.model_validate({"model": {"name": "mnv2-voc"}, "streams": []})
    store = StreamStore(tmp_path / "s.json")
    st = ClusterState(cfg, store)
    assert not store.exists() and st.seed([]) and store.load() == []
    for i in range(4):
        st.add(StreamConfig(id=f"s{i}", source="rtsp://cam/x", infer_fps=1))
    st.node_up(NodeRecord("a" * 20, slots=1.0))
    st.node_up(NodeRecord("b" * 20, slots=1.0))
    st.place()
    on_a = set(st.desired_for("a" * 20))
    assert len(on_a) == 2 and st.phase("s0")[1] == "starting"
    st.report("a" * 20, {s: fingerprint(st.desired[s]) for s in on_a}, {}, True, None)
    assert all(st.phase(s) == ("a" * 12, "placed", None) for s in on_a)
    assert st.node_lost("a" * 20) == sorted(on_a) or set(st.moving) == on_a
    assert all(st.phase(s)[1] == "moving" for s in on_a)
    st.place()
    assert set(st.desired_for("b" * 20)) == set(st.desired)
    assert all(st.phase(s)[1] == "moving" for s in on_a)  # until the survivor runs them
    st.report("b" * 20, {s: fingerprint(c) for s, c in st.desired.items()}, {}, True, None)
    assert all(st.phase(s)[1] == "placed" for s in st.desired)

    # A restarted controller: the stream set from the file, the assignment from the nodes.
    again = ClusterState(cfg, store)
    assert list(again.desired) == ["s0", "s1", "s2", "s3"]
    assert not again.seed([StreamConfig(id="demo", source="sample:vtest")])  # the file owns it
    again.node_up(NodeRecord("b" * 20, slots=1.0))
    again.report("b" * 20, {s: fingerprint(c) for s, c in again.desired.items()}, {}, True,
                 None)
    again.place()
    assert not again.moving and set(again.desired_for("b" * 20)) == set(again.desired)
    # A node joins empty: 0.53 of b's capacity against 0 is past the threshold (0.25).
    again.node_up(NodeRecord("c" * 20, slots=1.0))
    again.place()
    assert len(again.moving) == 2 and len(again.desired_for("c" * 20)) == 2


def test_service_discovery_lists_nodes_that_are_up() -> None:
    groups = target_groups([
        {"id": "n2", "host": "10.0.0.2", "metrics_port": 9100, "state": "up"},
        {"id": "n1", "host": "fd00::1", "metrics_port": 9100, "state": "up"},
        {"id": "n3", "host": "10.0.0.3", "metrics_port": 9100, "state": "lost"},
    ])
    assert groups == [
        {"targets": ["[fd00::1]:9100"], "labels": {"node": "n1", "node_ip": "fd00::1"}},
        {"targets": ["10.0.0.2:9100"], "labels": {"node": "n2", "node_ip": "10.0.0.2"}},
    ]


def test_gateway_serves_every_single_node_endpoint_without_a_local_service() -> None:
    """Same paths and roles as a single node; no handler that needs a local Service."""
    from stream.cluster import gateway
    from stream.server import ENDPOINTS

    eps = gateway.gateway_endpoints()
    single = {(e.method, e.path, e.role) for e in ENDPOINTS}
    assert single <= {(e.method, e.path, e.role) for e in eps}
    for ep in eps:
        module = inspect.getmodule(ep.handler)
        assert module is gateway or "SERVICE]" not in inspect.getsource(ep.handler), ep.path


def test_deployment_files() -> None:
    """deploy/: KubeRay RayCluster with Ray token auth and no dashboard, the gateway's Service,
    the single-node Deployment, the Prometheus config and the Grafana dashboard."""
    import json

    import yaml

    docs = {p.name: list(yaml.safe_load_all(p.read_text()))
            for p in (REPO / "deploy").glob("*.y*ml")}
    rc = next(d for d in docs["kuberay-raycluster.yaml"] if d["kind"] == "RayCluster")
    assert rc["spec"]["authOptions"] == {"mode": "token"}
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["include-dashboard"] == "false"
    assert "segstream serve --cluster auto" in head["template"]["spec"]["containers"][0]["args"][0]
    assert all("segstream_slots" in g["rayStartParams"]["resources"]
               for g in rc["spec"]["workerGroupSpecs"])
    svc = docs["gateway-service.yaml"][0]
    assert svc["spec"]["selector"] == {"ray.io/cluster": "segstream", "ray.io/node-type": "head"}
    assert any(d["kind"] == "Deployment" for d in docs["single-node.yaml"])
    sd = docs["prometheus-cluster.yml"][0]["scrape_configs"][0]["http_sd_configs"][0]
    assert sd["url"].endswith("/api/sd")
    dash = json.loads((REPO / "deploy/grafana-cluster.json").read_text())
    assert all(p["targets"][0]["expr"] for p in dash["panels"])


# -- the real cluster, in a network namespace of its own ----------------------------------------
def _netns_available() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip not installed"
    r = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"unshare -n failed: {r.stderr.strip()}"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_on_a_ray_cluster_in_its_own_network_namespace(shared_dir: Path) -> None:
    pytest.importorskip("ray")
    if (why := _netns_available()) is not None:
        pytest.fail(why)
    with tempfile.TemporaryDirectory(prefix="rayt", dir="/tmp") as ray_tmp:
        env = dict(os.environ, SEGSTREAM_NETNS="1", RAY_TMPDIR=ray_tmp,
                   SEGSTREAM_SHARED=str(shared_dir),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")])),
                   RAY_USAGE_STATS_ENABLED="0",
                   # Ray's token authentication, as the README and deploy/ use it.
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        inner = [sys.executable, "-m", "pytest", "-x", "-q", "-s", "-p", "no:cacheprovider",
                 "-o", "timeout=300", str(REPO / "tests/cluster_suite.py")]
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=560)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    print("\n".join(ln for ln in lines if not ln.startswith("(")))  # figures, the summary
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    assert " passed" in lines[-1] and "skipped" not in lines[-1], lines[-1]
