"""The controller: owns the desired stream set (the stream API's state file), knows the node
services, places streams on them and keeps each node running exactly its share.

`ClusterState` is the logic, free of Ray (the simulation drives it directly); `Controller` is
the Ray actor around it: a detached, restartable actor pinned to the head node (where the
state file lives), with one background thread that discovers nodes, pings them, declares a
silent one lost, re-places and pushes each node its set. Everything it does to nodes is
asynchronous with timeouts, so one slow node (or camera) holds up no other.

Restarted, it reads the state file again and adopts what the node services already run, so
no stream moves because the controller restarted."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segstream.models.registry import get_spec
from segstream.stream.cluster import runtime
from segstream.stream.cluster.events_hub import start_events_hub
from segstream.stream.cluster.node import NodeService, fingerprint
from segstream.stream.cluster.placement import CostModel, Placement, place
from segstream.stream.cluster.runtime import CONTROLLER_NAME
from segstream.stream.cluster.snapshot import ChangeResult, ClusterSnapshot, StreamPlacement
from segstream.stream.config import AppConfig, ClusterConfig, StreamConfig
from segstream.stream.control import Refused, StreamSet
from segstream.stream.datatypes import NodeState, StreamPhase
from segstream.stream.render import Renderer
from segstream.stream.sanitize import sanitize_url
from segstream.stream.schemas import NodeStatus
from segstream.stream.store import StreamStore

log = logging.getLogger(__name__)


def short(node_id: str) -> str:
    """The node id as the API and the metrics show it."""
    return node_id[:12]


@dataclass
class NodeRecord:
    ray_id: str
    host: str = ""
    port: int = 0
    metrics_port: int = 0
    slots: float = 0.0
    state: NodeState = NodeState.STARTING
    ready: bool = False
    error: str | None = None
    last_seen: float = 0.0
    reported: bool = False  # has answered a ping since it came up
    running: dict[str, str] = field(default_factory=dict)  # id -> fingerprint
    failed: dict[str, str] = field(default_factory=dict)

    def public(self, load: float, streams: int) -> NodeStatus:
        return NodeStatus(
            id=short(self.ray_id),
            ray_id=self.ray_id,
            host=self.host,
            port=self.port,
            metrics_port=self.metrics_port,
            slots=self.slots,
            load=round(load, 4),
            streams=streams,
            state=self.state,
            ready=self.ready,
            error=self.error,
        )


class ClusterState:
    """Desired streams, nodes and the assignment. The stream API changes the desired set
    through `streams` (the StreamSet a single node uses too: validated, persisted, then
    applied here); `lock` guards the state (the actor's threads share it)."""

    def __init__(self, cfg: AppConfig, store: StreamStore | None) -> None:
        self.lock = threading.RLock()
        self.cfg = cfg
        c: ClusterConfig = cfg.cluster
        self.costs_model = CostModel(c.stream_cost, c.inference_cost, c.uncapped_fps)
        self.threshold = c.rebalance_threshold
        # A node silent this long shows its streams as moving (it is lost at lost_after_s).
        self.suspect_after = min(1.5, c.lost_after_s / 2)
        self.store = store
        self.streams = StreamSet(self, store, cfg.sources)
        self.desired: dict[str, StreamConfig] = {}
        self.assignment: dict[str, str] = {}  # stream id -> ray node id
        self.nodes: dict[str, NodeRecord] = {}
        self.moving: set[str] = set()  # displaced streams not yet running on their new node
        self.unplaced: list[str] = []
        self.version = 0
        if store is not None and store.exists():
            self.desired = {s.id: s for s in store.load()}
        elif cfg.streams:
            self.seed(cfg.streams)

    def seed(self, streams: list[StreamConfig]) -> bool:
        """The config's streams seed a new state file; once the file exists it owns the set
        (as on a single node). Returns whether they were taken."""
        if self.store is not None and self.store.exists():
            return False
        self._persist(list(streams))
        self.desired = {s.id: s for s in streams}
        self.changed()
        return True

    # -- the StreamSet's target (stream.control.StreamTarget) ----------------------------------
    def configs(self) -> dict[str, StreamConfig]:
        with self.lock:
            return dict(self.desired)

    def check(self, cfg: StreamConfig) -> None:
        """The class names, against the model's labels (the source policy is the StreamSet's)."""
        spec = get_spec(self.cfg.model.name)
        rc = self.cfg.render
        try:
            Renderer(
                spec.labels,
                spec.palette_array(),
                mode=rc.mode,
                alpha=rc.alpha,
                classes=cfg.classes if cfg.classes is not None else rc.classes,
                legend=rc.legend,
            )
        except ValueError as e:
            raise Refused(422, str(e), "classes") from None

    def apply_add(self, cfg: StreamConfig) -> None:
        with self.lock:
            self.desired[cfg.id] = cfg
            self.changed()
            self.place()

    def apply_replace(self, cfg: StreamConfig) -> None:
        with self.lock:
            self.desired[cfg.id] = cfg
            self.changed()

    def apply_remove(self, stream_id: str) -> None:
        with self.lock:
            del self.desired[stream_id]
            self.assignment.pop(stream_id, None)
            self.moving.discard(stream_id)
            self.changed()

    def _persist(self, streams: list[StreamConfig]) -> None:
        if self.store is not None:
            self.store.save(streams)

    def changed(self) -> None:
        self.version += 1

    # -- nodes ------------------------------------------------------------------------------
    def node_up(self, rec: NodeRecord) -> None:
        rec.state = NodeState.UP
        rec.last_seen = time.monotonic()
        self.nodes[rec.ray_id] = rec
        self.changed()

    def node_lost(self, ray_id: str) -> list[str]:
        """Forgets the node; its streams are marked moving. Returns them."""
        rec = self.nodes.pop(ray_id, None)
        if rec is None:
            return []
        displaced = [s for s, n in self.assignment.items() if n == ray_id]
        for sid in displaced:
            del self.assignment[sid]
            self.moving.add(sid)
        self.changed()
        return displaced

    def report(
        self,
        ray_id: str,
        running: dict[str, str],
        failed: dict[str, str],
        ready: bool,
        error: str | None,
    ) -> None:
        """A node's answer to a ping. Streams it runs that belong nowhere are adopted (a
        restarted controller learns the assignment from the nodes)."""
        rec = self.nodes.get(ray_id)
        if rec is None:
            return
        rec.running, rec.failed, rec.ready, rec.error = running, failed, ready, error
        rec.last_seen = time.monotonic()
        rec.reported = True
        for sid in running:
            if sid in self.desired and sid not in self.assignment:
                self.assignment[sid] = ray_id
                self.changed()
        for sid in running:
            if sid in self.moving and self.assignment.get(sid) == ray_id:
                self.moving.discard(sid)

    # -- placement ---------------------------------------------------------------------------
    def cost(self, cfg: StreamConfig) -> float:
        return self.costs_model.cost(cfg.infer_fps)

    def place(self) -> Placement:
        costs = {sid: self.cost(c) for sid, c in self.desired.items()}
        caps = {
            n: r.slots for n, r in self.nodes.items() if r.state == NodeState.UP and not r.error
        }
        p = place(costs, caps, self.assignment, threshold=self.threshold)
        for sid in p.moved:
            self.moving.add(sid)
        for sid in p.unplaced:
            if self.assignment.pop(sid, None) is not None:
                self.moving.add(sid)
        self.assignment = dict(p.assignment)
        self.unplaced = p.unplaced
        return p

    def desired_for(self, ray_id: str) -> dict[str, StreamConfig]:
        return {sid: self.desired[sid] for sid, n in self.assignment.items() if n == ray_id}

    def in_sync(self, ray_id: str) -> bool:
        rec = self.nodes[ray_id]
        want = {sid: fingerprint(c) for sid, c in self.desired_for(ray_id).items()}
        return want == rec.running

    # -- what the gateway shows ----------------------------------------------------------------
    def phase(self, sid: str) -> tuple[str | None, StreamPhase, str | None]:
        """(node, phase, reason): placed (runs there), starting (placed, not running yet),
        moving (its node is silent or lost, or it is being rebalanced), pending (no room),
        error."""
        node = self.assignment.get(sid)
        if node is None:
            if sid in self.moving:
                return None, StreamPhase.MOVING, "its node was lost; waiting for room on another"
            return None, StreamPhase.PENDING, "no node has room for it"
        rec = self.nodes[node]
        silent = time.monotonic() - rec.last_seen
        if silent > self.suspect_after:  # being declared lost: the move has begun
            return short(node), StreamPhase.MOVING, f"node {short(node)} silent for {silent:.1f} s"
        if sid in rec.failed:
            return short(node), StreamPhase.ERROR, rec.failed[sid]
        if sid in rec.running:  # a change of settings in progress keeps it placed
            return short(node), StreamPhase.PLACED, None
        if sid in self.moving:
            return short(node), StreamPhase.MOVING, "starting on its new node"
        return short(node), StreamPhase.STARTING, None

    def snapshot(self) -> ClusterSnapshot:
        loads: dict[str, float] = {}
        counts: dict[str, int] = {}
        for sid, n in self.assignment.items():
            loads[n] = loads.get(n, 0.0) + self.cost(self.desired[sid])
            counts[n] = counts.get(n, 0) + 1
        streams = []
        for sid, cfg in self.desired.items():
            node, phase, reason = self.phase(sid)
            streams.append(
                StreamPlacement(
                    id=sid,
                    source=sanitize_url(cfg.source),
                    reader=cfg.reader,
                    output=cfg.output,
                    infer_fps=cfg.infer_fps,
                    node=node,
                    phase=phase,
                    reason=reason,
                    zones=tuple(z.model_dump(mode="json", by_alias=True) for z in cfg.zones),
                )
            )
        nodes = [
            r.public(loads.get(n, 0.0) / r.slots if r.slots else 0.0, counts.get(n, 0))
            for n, r in sorted(self.nodes.items())
        ]
        return ClusterSnapshot(self.version, streams, nodes)


# -- the Ray actor ------------------------------------------------------------------------------


class Controller:
    """Plain class; stream.cluster.runtime wraps it with ray.remote (threaded actor)."""

    TICK_S = 0.5

    def __init__(
        self,
        cfg_json: str,
        state_file: str | None,
        cluster_secret: str,
        signing_secret: bytes,
        node_class: type | None = None,
    ) -> None:
        """`node_class`: the node service (None: stream.cluster.node.NodeService; the
        simulation gives a stand-in without a model)."""
        ray = runtime.ray_module()
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        self._ray = ray
        self.cfg = AppConfig.model_validate_json(cfg_json)
        # What nodes get: the settings without the stream list (they are told their share).
        self.cfg_json = self.cfg.model_copy(update={"streams": []}).model_dump_json()
        self.secret = cluster_secret
        self.signing_secret = signing_secret
        store = StreamStore(Path(state_file)) if state_file else None
        self.state = ClusterState(self.cfg, store)
        self.lock = self.state.lock
        self.started = time.monotonic()
        self.node_class = node_class
        self.tick_s = 0.0  # how long the last tick took
        self.handles: dict[str, Any] = {}  # ray node id -> node actor
        self.starting: dict[str, Any] = {}  # ray node id -> ObjectRef of start()
        self.pings: dict[str, tuple[Any, float]] = {}  # ray node id -> (ref, sent at)
        self.syncs: dict[str, Any] = {}  # ray node id -> ObjectRef of sync()
        self.lost: dict[str, float] = {}  # ray node id -> when it was declared lost
        self.slots: dict[str, float] = {}  # ray node id -> its slots, as discovered
        self.settled = False  # placed at least once (after existing nodes reported)
        self.ticked = self.awake = time.monotonic()  # the last tick; since when awake
        self._stop = threading.Event()
        for target, name in ((self._run, "controller"), (self._run_discovery, "discovery")):
            threading.Thread(target=target, name=name, daemon=True).start()
        log.info("controller up: %d stream(s) in the state file", len(self.state.desired))

    # -- called by the gateway -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "secret": self.secret,
            "namespace": self.cfg.cluster.namespace,
            "started": self.started,
        }

    def snapshot(self) -> ClusterSnapshot:
        with self.lock:
            return self.state.snapshot()

    def seed(self, configs: list[str]) -> bool:
        """The starting gateway's configured streams, taken only when no state file exists."""
        with self.lock:
            taken = self.state.seed([StreamConfig.model_validate_json(c) for c in configs])
        if taken:
            log.info("state file seeded with %d stream(s) from the config", len(configs))
        return taken

    def stats(self) -> dict[str, Any]:
        """The controller's own cost: resident memory and the last tick's duration."""
        rss = 0
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        with self.lock:
            return {
                "rss_bytes": rss,
                "tick_s": self.tick_s,
                "streams": len(self.state.desired),
                "nodes": len(self.state.nodes),
            }

    def add(self, cfg_json: str) -> ChangeResult:
        cfg = StreamConfig.model_validate_json(cfg_json)
        return self._change(lambda: self.state.streams.add(cfg))

    def patch(self, stream_id: str, changes: dict[str, Any]) -> ChangeResult:
        return self._change(lambda: self.state.streams.change(stream_id, changes))

    def delete(self, stream_id: str) -> ChangeResult:
        return self._change(lambda: self.state.streams.remove(stream_id))

    def _change(self, run: Callable[[], object]) -> ChangeResult:
        """Through the StreamSet (outside the state lock: it may resolve a host name)."""
        try:
            run()
        except Refused as e:
            return ChangeResult(refused=e.to_dict())
        self._push()
        with self.lock:
            return ChangeResult(snapshot=self.state.snapshot())

    # -- the loops ------------------------------------------------------------------------------
    # Two threads, so that nothing the nodes need waits on Ray's GCS: discovery (listing the
    # Ray nodes, creating node services) asks the GCS and blocks while the head's GCS is away
    # (restarting, with its state in Redis); pings, placement and pushes go straight to the
    # node services' workers, so nodes keep being seen and nothing moves meanwhile.
    def _run(self) -> None:
        self._loop(self._tick, "tick")

    def _run_discovery(self) -> None:
        self._loop(self._discover, "discovery")

    def _loop(self, step: Callable[[], None], name: str) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                step()
            except Exception:
                log.exception("controller %s failed", name)
            self._stop.wait(max(0.0, self.TICK_S - (time.monotonic() - t0)))

    def _tick(self) -> None:
        now = time.monotonic()
        try:
            self._tick_once(now)
        finally:
            self.tick_s = time.monotonic() - now

    def _tick_once(self, now: float) -> None:
        if now - self.ticked > self.cfg.cluster.lost_after_s / 2:
            # This loop itself stalled (a pause, a starved CPU): the nodes' silence meanwhile
            # is the controller's, not theirs.
            self.awake = now
        self.ticked = now
        self._collect_starts()
        self._ping()
        self._expire()
        with self.lock:
            if not self.settled:
                waiting = self.starting or [n for n in self.state.nodes.values() if not n.reported]
                if waiting and time.monotonic() - self.started < 3 * self.cfg.cluster.lost_after_s:
                    return  # existing nodes tell what they run before anything is placed
                self.settled = True
            self.state.place()
        self._push()

    def _alive_nodes(self) -> dict[str, tuple[float, str]]:
        """Ray id -> (slots, address) of every live Ray node: asks the GCS."""
        res = self.cfg.cluster.slots_resource
        return {
            n["NodeID"]: (float(n.get("Resources", {}).get(res, 0.0)), str(n["NodeManagerAddress"]))
            for n in self._ray.nodes()
            if n.get("Alive")
        }

    def _discover(self) -> None:
        alive = self._alive_nodes()
        now = time.monotonic()
        with self.lock:
            gone = [n for n in self.state.nodes if n not in alive]
            for ray_id in [n for n in self.starting if n not in alive]:
                self.starting.pop(ray_id, None)
                self.handles.pop(ray_id, None)
            new = {
                ray_id: slots_host
                for ray_id, slots_host in alive.items()
                if slots_host[0] > 0
                and ray_id not in self.state.nodes
                and ray_id not in self.starting
                # declared lost a moment ago while Ray still lists it
                and now - self.lost.get(ray_id, -1e9) >= 30.0
            }
        for ray_id in gone:
            self._lose(ray_id, "its Ray node is gone")
        for ray_id, (slots, host) in new.items():
            cls = self.node_class or NodeService
            handle = runtime.node_actor(self.cfg.cluster.namespace, ray_id, cls)
            ref = handle.start.remote(self.cfg_json, ray_id, host, self.secret, self.signing_secret)
            with self.lock:
                self.handles[ray_id] = handle
                self.starting[ray_id] = ref
                self.slots[ray_id] = slots
            log.info("starting the node service on %s (%s slots)", short(ray_id), slots)

    def _collect_starts(self) -> None:
        with self.lock:
            starting = dict(self.starting)
        if not starting:
            return
        refs = list(starting.values())
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        for ray_id, ref in starting.items():
            if ref not in ready:
                continue
            with self.lock:
                if self.starting.get(ray_id) is not ref:
                    continue  # its Ray node went away meanwhile
                del self.starting[ray_id]
            try:
                info = self._ray.get(ref)
            except Exception as e:
                log.warning("node service on %s did not start: %s", short(ray_id), e)
                self._kill(ray_id)
                self.lost[ray_id] = time.monotonic()
                continue
            rec = NodeRecord(
                ray_id, info["host"], info["port"], info["metrics_port"], self.slots[ray_id]
            )
            with self.lock:
                self.state.node_up(rec)
            log.info("node %s up at %s:%d", short(ray_id), rec.host, rec.port)

    def _ping(self) -> None:
        now = time.monotonic()
        for ray_id in list(self.state.nodes):
            handle = self.handles.get(ray_id)
            if ray_id not in self.pings and handle is not None:
                self.pings[ray_id] = (handle.ping.remote(), now)
        if not self.pings:
            return
        refs = [r for r, _ in self.pings.values()]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0.2)
        for ray_id, (ref, _sent) in list(self.pings.items()):
            if ref not in ready:
                continue
            self.pings.pop(ray_id, None)  # (or gone already: lost by the discovery thread)
            try:
                r = self._ray.get(ref)
            except Exception as e:  # the actor died: a new one is started on that node
                self._lose(ray_id, f"its service died: {type(e).__name__}", retry_after=1.0)
                continue
            with self.lock:
                self.state.report(ray_id, r["running"], r["failed"], r["ready"], r["error"])

    def _expire(self) -> None:
        now = time.monotonic()
        limit = self.cfg.cluster.lost_after_s
        for ray_id, rec in list(self.state.nodes.items()):
            seen = max(rec.last_seen, self.awake)
            if now - seen > limit:
                self._lose(ray_id, f"silent for {now - seen:.1f} s")

    def _lose(self, ray_id: str, why: str, retry_after: float = 30.0) -> None:
        with self.lock:
            displaced = self.state.node_lost(ray_id)
        log.warning("node %s lost (%s): %d stream(s) move", short(ray_id), why, len(displaced))
        self.lost[ray_id] = time.monotonic() - 30.0 + retry_after
        self.pings.pop(ray_id, None)
        self.syncs.pop(ray_id, None)
        self._kill(ray_id)  # it must not come back running what now runs elsewhere

    def _kill(self, ray_id: str) -> None:
        handle = self.handles.pop(ray_id, None)
        if handle is not None:
            try:
                self._ray.kill(handle, no_restart=True)
            except Exception as e:
                log.debug("killing the node service on %s: %s", short(ray_id), e)

    def _push(self) -> None:
        """Sends each node whose running set differs from its share the full share."""
        with self.lock:
            todo = {
                n: [c.model_dump_json() for c in self.state.desired_for(n).values()]
                for n in self.state.nodes
                if not self.state.in_sync(n)
            }
        for ray_id, configs in todo.items():
            ref = self.syncs.get(ray_id)
            if ref is not None:
                done, _ = self._ray.wait([ref], timeout=0)
                if not done:
                    continue  # the node is still busy with the last one
            handle = self.handles.get(ray_id)
            if handle is not None:
                self.syncs[ray_id] = handle.sync.remote(configs)


def start_controller(
    cfg: AppConfig, state_file: str | None, signing_secret: bytes, node_class: type | None = None
) -> Any:
    """The controller actor: found by name if it runs, else created (detached, restarted by
    Ray whenever it dies, pinned to the head node where the state file lives). The arguments
    are kept by Ray and given again to each restart; the configured streams seed a new state
    file."""
    ray = runtime.ray_module()
    ns = cfg.cluster.namespace
    # Ray keeps a restartable actor's arguments for its restarts, but only those small enough
    # to travel inline (under 100 KiB); larger ones live in the object store and go with the
    # process that created them. So the stream list, which can be long, is sent apart (seed).
    small = cfg.model_copy(update={"streams": []})
    actor = ray.remote(Controller).options(
        name=CONTROLLER_NAME,
        namespace=ns,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=16,
        num_cpus=0,
        resources={"node:__internal_head__": 0.001},
    )
    # The events hub first: node services forward their events to it from the start.
    start_events_hub(cfg)
    handle = actor.remote(
        small.model_dump_json(), state_file, secrets.token_urlsafe(32), signing_secret, node_class
    )
    ray.get(handle.seed.remote([c.model_dump_json() for c in cfg.streams]))
    return handle
