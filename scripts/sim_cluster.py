"""Cluster mode at scale, by simulation: many machines and streams without a model.

Dry run (default): the controller's own logic (stream.cluster.controller.ClusterState, the
placement it calls, the state file it writes) for --nodes machines and --streams streams:
placement time, balance (most and least loaded node), time to re-place a lost node's streams,
rebalancing onto a machine that joins empty, controller memory and snapshot size.

--ray-nodes N: also the real controller actor on a real Ray cluster of N nodes that declare
segstream_slots, each with a stand-in node service (no model, no HTTP: it runs what it is
told and answers pings), inside a network namespace of its own (unshare -n; root): time until
every stream is placed and acknowledged by its node, time to re-place the streams of a node
that is removed, and the controller actor's resident memory.

    .venv/bin/python scripts/sim_cluster.py --nodes 50 --streams 1000 [--ray-nodes 8]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segstream.stream.cluster.controller import ClusterState, NodeRecord  # noqa: E402
from segstream.stream.cluster.node import fingerprint  # noqa: E402
from segstream.stream.cluster.placement import CostModel  # noqa: E402
from segstream.stream.config import AppConfig, StreamConfig  # noqa: E402
from segstream.stream.store import StreamStore  # noqa: E402

RATES = (1.0, 2.0, 2.0, 5.0)  # a mix of inference rates per camera (infer_fps)


def machines(n: int) -> dict[str, float]:
    """Node id -> slots (cores given to segstream): 70 % 8-core, 30 % 16-core machines."""
    return {f"{i:04d}{'n' * 52}": (16.0 if i % 10 >= 7 else 8.0) for i in range(n)}


def cameras(n: int) -> list[StreamConfig]:
    return [
        StreamConfig(
            id=f"cam{i:04d}",
            source=f"rtsp://10.0.{i // 256}.{i % 256}/live",  # IPs: the policy resolves no name
            infer_fps=RATES[i % len(RATES)],
        )
        for i in range(n)
    ]


def shares(st: ClusterState) -> tuple[float, float]:
    snap = st.snapshot()
    loads = [n.load for n in snap.nodes if n.state == "up"]
    return max(loads), min(loads)


def dry_run(n_nodes: int, n_streams: int) -> dict[str, Any]:
    cfg = AppConfig.model_validate({"streams": [], "sources": {"max_streams": n_streams}})
    out: dict[str, Any] = {"nodes": n_nodes, "streams": n_streams}
    caps = machines(n_nodes)
    cams = cameras(n_streams)
    with tempfile.TemporaryDirectory() as tmp:
        # Memory: the controller's state for every stream and node (traced separately: the
        # tracer slows what it watches).
        tracemalloc.start()
        st = ClusterState(cfg, None)
        for nid, slots in caps.items():
            st.node_up(NodeRecord(nid, slots=slots))
        for cam in cameras(n_streams):  # the configs are the controller's too
            st.streams.add(cam)
        st.place()
        for nid in st.nodes:  # every node reports running its share
            st.report(
                nid, {s: fingerprint(c) for s, c in st.desired_for(nid).items()}, {}, True, None
            )
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["controller_state_mib"] = round(current / 2**20, 2)
        out["controller_state_peak_mib"] = round(peak / 2**20, 2)

        # Streams added one by one, as through the API: the state file written (fsync'd)
        # and placement re-run for each.
        st = ClusterState(cfg, StreamStore(Path(tmp) / "streams.json"))
        for nid, slots in caps.items():
            st.node_up(NodeRecord(nid, slots=slots))
        per_add, per_place = [], []
        for cam in cams:
            t0 = time.perf_counter()
            st.streams.add(cam)
            t1 = time.perf_counter()
            st.place()
            per_add.append(time.perf_counter() - t0)
            per_place.append(time.perf_counter() - t1)
        out["add_one_ms_p50"] = round(statistics.median(per_add) * 1000, 2)
        out["add_one_ms_p99_last100"] = round(sorted(per_add[-100:])[98] * 1000, 2)
        out["place_after_add_ms_p50"] = round(statistics.median(per_place) * 1000, 3)
        out["add_all_one_by_one_s"] = round(sum(per_add), 2)
        for nid in st.nodes:
            st.report(
                nid, {s: fingerprint(c) for s, c in st.desired_for(nid).items()}, {}, True, None
            )

        # The whole set at once (a controller that restarts with nothing running).
        fresh = ClusterState(cfg, StreamStore(Path(tmp) / "streams.json"))
        for nid, slots in caps.items():
            fresh.node_up(NodeRecord(nid, slots=slots))
        t0 = time.perf_counter()
        fresh.place()
        out["place_all_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        hi, lo = shares(fresh)
        out["load_share_most"], out["load_share_least"] = round(hi, 3), round(lo, 3)
        out["unplaced"] = len(fresh.unplaced)
        counts = [n.streams for n in fresh.snapshot().nodes]
        out["streams_per_node_min_max"] = [min(counts), max(counts)]

        t0 = time.perf_counter()
        snap = st.snapshot()
        out["snapshot_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["snapshot_kib"] = round(len(pickle.dumps(snap)) / 1024, 1)  # as Ray sends it
        out["state_file_kib"] = round((Path(tmp) / "streams.json").stat().st_size / 1024, 1)

        # The controller restarts (its head node did): a new one reads the state file and
        # adopts what every node reports running, moving nothing.
        t0 = time.perf_counter()
        again = ClusterState(cfg, StreamStore(Path(tmp) / "streams.json"))
        for nid, rec in st.nodes.items():
            again.node_up(NodeRecord(nid, slots=rec.slots))
            again.report(nid, dict(rec.running), {}, True, None)
        again.place()
        out["restart_adopt_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["restart_moved"] = sum(again.assignment.get(s) != n for s, n in st.assignment.items())

        # A machine is lost: the most loaded one.
        victim = max(
            st.nodes,
            key=lambda n: (
                sum(st.cost(st.desired[s]) for s in st.desired_for(n)) / st.nodes[n].slots
            ),
        )
        t0 = time.perf_counter()
        displaced = st.node_lost(victim)
        st.place()
        out["lost_node_replace_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        out["lost_node_streams"] = len(displaced)
        out["moved_besides_lost"] = len(st.moving) - len(displaced)
        hi, lo = shares(st)
        out["after_loss_most"], out["after_loss_least"] = round(hi, 3), round(lo, 3)

        # A machine joins empty: rebalancing, at most 64 moves per controller tick.
        st.node_up(NodeRecord("join" + "j" * 52, slots=8.0))
        st.moving.clear()
        ticks, t0 = 0, time.perf_counter()
        while True:
            before = dict(st.assignment)
            st.place()
            ticks += 1
            if st.assignment == before or ticks > 100:
                break
        out["join_rebalance_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        out["join_rebalance_ticks"] = ticks - 1
        out["join_moved"] = len(st.desired_for("join" + "j" * 52))
        hi, lo = shares(st)
        out["after_join_most"], out["after_join_least"] = round(hi, 3), round(lo, 3)
    return out


# -- the real controller on a real Ray cluster ----------------------------------------------------
class StandInNode:
    """A node service without a model or HTTP: runs what it is told (async actor)."""

    def __init__(self) -> None:
        import segstream.stream.cluster.node  # noqa: F401  (imported before the first ping)

        self.running: dict[str, str] = {}

    async def start(
        self, cfg_json: str, node_id: str, host: str, secret: str, signing: bytes
    ) -> dict[str, Any]:
        return {"node_id": node_id, "host": host, "port": 1, "metrics_port": 2}

    async def ping(self) -> dict[str, Any]:
        return {"ready": True, "error": None, "running": dict(self.running), "failed": {}}

    async def sync(self, configs: list[str]) -> None:
        from segstream.stream.cluster.node import fingerprint
        from segstream.stream.config import StreamConfig

        cfgs = [StreamConfig.model_validate_json(c) for c in configs]
        self.running = {c.id: fingerprint(c) for c in cfgs}


class Redis:
    """A Redis for the GCS's tables (fault tolerance) on a free loopback port, with its
    append-only file in a folder of its own, so that it can be killed and started again."""

    def __init__(self, folder: str) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.folder = folder
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.folder]
        args += ["--appendonly", "yes", "--save", ""]
        self.proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def ray_run(n_nodes: int, n_streams: int) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    out: dict[str, Any] = {"ray_nodes": n_nodes, "streams": n_streams}
    redis = Redis(tempfile.mkdtemp(prefix="redis"))
    redis.start()
    os.environ["RAY_REDIS_ADDRESS"] = redis.address
    t0 = time.monotonic()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "object_store_memory": 80 * 2**20,
        },
    )
    del os.environ["RAY_REDIS_ADDRESS"]  # the head's alone
    # Enough room for every stream with a third to spare.
    cams = cameras(n_streams)
    slots = round(1.5 * sum(CostModel().cost(c.infer_fps) for c in cams) / n_nodes)
    out["slots_per_node"] = slots
    nodes = [
        c.add_node(
            num_cpus=0, object_store_memory=80 * 2**20, resources={"segstream_slots": float(slots)}
        )
        for _ in range(n_nodes)
    ]
    ray.init(address=c.address, namespace="segstream-sim", log_to_driver=False)
    out["cluster_start_s"] = round(time.monotonic() - t0, 1)
    try:
        out |= controller_run(c, nodes, cams, redis)
    finally:
        ray.shutdown()
        c.shutdown()
        redis.kill()
    return out


def controller_run(
    c: Any, nodes: list[Any], cams: list[StreamConfig], redis: Redis
) -> dict[str, Any]:
    import ray
    from ray._private import ray_constants

    from segstream.stream.cluster.controller import start_controller

    out: dict[str, Any] = {}
    cfg = AppConfig.model_validate(
        {
            "cluster": {"namespace": "segstream-sim"},
            "sources": {"max_streams": len(cams)},
            "streams": [cam.model_dump() for cam in cams],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        ctl = start_controller(cfg, str(Path(tmp) / "streams.json"), b"k" * 32, StandInNode)

        def placed() -> Any:
            return ray.get(ctl.snapshot.remote(), timeout=30)

        def all_placed(avoid: str = "") -> Any:
            snap = placed()
            ok = snap.nodes and all(s.phase == "placed" and s.node != avoid for s in snap.streams)
            return snap if ok else None

        snap = wait(all_placed, 600)
        out["all_placed_and_acknowledged_s"] = round(time.monotonic() - t0, 2)
        loads = [n.load for n in snap.nodes]
        out["load_share_most"], out["load_share_least"] = (
            round(max(loads), 3),
            round(min(loads), 3),
        )
        stats = ray.get(ctl.stats.remote())
        out["controller_rss_mib"] = round(stats["rss_bytes"] / 2**20, 1)
        out["controller_tick_ms"] = round(stats["tick_s"] * 1000, 1)
        t1 = time.perf_counter()
        ray.get(ctl.snapshot.remote())
        out["snapshot_call_ms"] = round((time.perf_counter() - t1) * 1000, 1)

        def where() -> dict[str, str | None]:
            return {s.id: s.node for s in placed().streams}

        def settled() -> dict[str, str | None] | None:
            """The assignment once rebalancing is over (the same twice, 2 s apart)."""
            a = where()
            time.sleep(2.0)
            return a if all_placed() and where() == a else None

        # The head's GCS dies for 10 s and comes back (its tables in Redis).
        before = wait(settled, 120)
        started = ray.get(ctl.info.remote())["started"]
        head = c.head_node

        def outage(name: str, away_s: float, kill: Any, restore: Any) -> None:
            """Something of the head's goes for `away_s`, then the GCS starts again: the
            streams placed meanwhile (the controller answers straight from its worker), how
            soon Ray answers, how many streams moved."""
            t0 = time.monotonic()
            kill()
            meanwhile = []
            while time.monotonic() - t0 < away_s:
                meanwhile.append(sum(s.phase == "placed" for s in placed().streams))
                time.sleep(0.5)
            restore()
            t1 = time.monotonic()
            head.start_gcs_server()
            wait(lambda: sum(n["Alive"] for n in ray.nodes()) == len(nodes) + 1, 60)
            out[f"{name}_away_s"] = round(t1 - t0, 1)
            out[f"{name}_ray_back_after_gcs_restart_s"] = round(time.monotonic() - t1, 2)
            out[f"{name}_placed_meanwhile_min"] = min(meanwhile)
            out[f"{name}_moved"] = sum(where()[k] != v for k, v in before.items())

        outage("gcs", 10.0, head.kill_gcs_server, lambda: None)
        out["gcs_controller_restarted"] = ray.get(ctl.info.remote())["started"] != started

        # Redis dies for 8 s (the GCS exits without it), comes back with its append-only file,
        # and the GCS is started again.
        gcs = head.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process

        def redis_back() -> None:
            out["redis_gcs_exited"] = gcs.poll() is not None
            redis.start()
            head.kill_gcs_server(check_alive=False)

        outage("redis", 8.0, redis.kill, redis_back)

        # The controller dies: Ray restarts it; it reads the state file and adopts what
        # the nodes run.
        before = wait(settled, 120)
        started = ray.get(ctl.info.remote())["started"]
        t0 = time.monotonic()
        ray.kill(ctl, no_restart=False)

        def back() -> bool:
            try:
                again = ray.get(ctl.info.remote(), timeout=5)["started"] != started
            except Exception:
                return False
            return again and bool(all_placed())

        wait(back, 120)
        out["controller_restart_all_placed_s"] = round(time.monotonic() - t0, 2)
        out["controller_restart_moved"] = sum(where()[k] != v for k, v in before.items())

        victim = nodes[0]
        short = victim.node_id[:12]
        n_lost = sum(s.node == short for s in snap.streams)
        t0 = time.monotonic()
        c.remove_node(victim, allow_graceful=False)
        wait(lambda: all_placed(avoid=short), 120)
        out["lost_node_streams"] = n_lost
        out["lost_node_replaced_s"] = round(time.monotonic() - t0, 2)
        ray.kill(ctl, no_restart=True)
    return out


def wait(fn: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise TimeoutError(f"not done after {timeout} s")


def capacity_table() -> list[dict[str, Any]]:
    m = CostModel()
    rows = []
    for cores in (2, 8, 16, 32):
        rows.append(
            {
                "slots": cores,
                **{f"{fps:g}fps": m.streams_per_node(cores, fps) for fps in (1, 2, 5, 0)},
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument(
        "--ray-nodes",
        type=int,
        default=0,
        help="also run the real controller on "
        "a Ray cluster of this many stand-in nodes (network namespace; root)",
    )
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.ray_nodes and os.environ.get("SEGSTREAM_NETNS") != "1":
        # Ray binds the machine's own address: run in a namespace where it is 127.0.0.1.
        with tempfile.TemporaryDirectory(prefix="rays", dir="/tmp") as ray_tmp:
            env = dict(
                os.environ,
                SEGSTREAM_NETNS="1",
                RAY_TMPDIR=ray_tmp,
                RAY_USAGE_STATS_ENABLED="0",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            )
            cmd = [
                "unshare",
                "-n",
                "sh",
                "-c",
                'ip link set lo up && exec "$@"',
                "sh",
                sys.executable,
                *sys.argv,
            ]
            return subprocess.run(cmd, env=env).returncode
    figures: dict[str, Any] = {
        "capacity": capacity_table(),
        "dry_run": dry_run(args.nodes, args.streams),
    }
    print(json.dumps(figures["capacity"]), flush=True)
    print(json.dumps(figures["dry_run"]), flush=True)
    if args.ray_nodes:
        figures["ray"] = ray_run(args.ray_nodes, args.streams)
        print(json.dumps(figures["ray"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
