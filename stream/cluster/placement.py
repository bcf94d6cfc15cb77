"""Which node runs which stream: a pure function of the desired streams, the nodes' capacities
and the current assignment (no Ray here, so it is unit-tested and simulated on its own).

Capacity and cost are in the same unit, a *slot*: by default one CPU core given to segstream
(the `segstream_slots` resource a node declares). A stream costs what it was measured to take:
`stream_cost` cores for decoding, rendering and JPEG, plus `inference_cost` core-seconds for
each inference it asks for (see `CostModel`).

Rules, in order:
1. Sticky: a stream stays where it runs while its node is alive and not over capacity.
2. New and displaced streams go, largest first, to the least loaded node (as a share of its
   capacity) that has room for them; a stream that fits nowhere stays unplaced (`pending`).
3. Rebalance: only when the most and the least loaded node differ by more than `threshold`
   (a share of capacity, e.g. a node that joined empty), streams move from the most to the
   least loaded node, each move narrowing the gap, at most `max_moves` at a time."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CostModel:
    """Cores one stream takes: `stream_cost` + `inference_cost` x its inference rate (a stream
    with no cap, infer_fps 0, is counted at `uncapped_fps`)."""

    stream_cost: float = 0.075
    inference_cost: float = 0.058
    uncapped_fps: float = 15.0

    def cost(self, infer_fps: float) -> float:
        fps = infer_fps if infer_fps > 0 else self.uncapped_fps
        return self.stream_cost + self.inference_cost * fps

    def streams_per_node(self, slots: float, infer_fps: float) -> int:
        """How many streams at `infer_fps` a node of `slots` carries."""
        return int(slots // self.cost(infer_fps) + 1e-9) if slots > 0 else 0


@dataclass
class Placement:
    assignment: dict[str, str]  # stream id -> node id
    unplaced: list[str] = field(default_factory=list)  # fit nowhere (no node has room)
    moved: list[str] = field(default_factory=list)  # streams whose node changed

    def load(self, costs: Mapping[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for sid, node in self.assignment.items():
            out[node] = out.get(node, 0.0) + costs[sid]
        return out


def place(
    costs: Mapping[str, float],
    capacities: Mapping[str, float],
    current: Mapping[str, str] | None = None,
    *,
    threshold: float = 0.25,
    max_moves: int = 64,
) -> Placement:
    """`costs`: stream id -> cost; `capacities`: node id -> slots (nodes without room are left
    out by the caller or given 0); `current`: where streams run now. Deterministic."""
    current = current or {}
    nodes = {n: c for n, c in capacities.items() if c > 0}
    load = dict.fromkeys(nodes, 0.0)
    assignment: dict[str, str] = {}

    # 1. Sticky: keep what runs on a live node, evicting (smallest first) only what overflows.
    kept: dict[str, list[str]] = {n: [] for n in nodes}
    for sid in sorted(costs):
        node = current.get(sid)
        if node in nodes:
            kept[node].append(sid)
    homeless = [s for s in costs if current.get(s) not in nodes]
    for node, sids in kept.items():
        sids.sort(key=lambda s: (-costs[s], s))
        for sid in sids:
            if load[node] + costs[sid] <= nodes[node] + 1e-9:
                assignment[sid] = node
                load[node] += costs[sid]
            else:
                homeless.append(sid)

    # 2. Least loaded first; a heap on the load share.
    unplaced: list[str] = []
    heap = [(load[n] / nodes[n], n) for n in nodes]
    heapq.heapify(heap)
    for sid in sorted(homeless, key=lambda s: (-costs[s], s)):
        c = costs[sid]
        skipped = []
        chosen = None
        while heap:
            share, node = heapq.heappop(heap)
            if load[node] + c <= nodes[node] + 1e-9:
                chosen = node
                break
            skipped.append((share, node))  # full for this stream; may take a smaller one
        for item in skipped:
            heapq.heappush(heap, item)
        if chosen is None:
            unplaced.append(sid)
            continue
        assignment[sid] = chosen
        load[chosen] += c
        heapq.heappush(heap, (load[chosen] / nodes[chosen], chosen))

    # 3. Rebalance only past the threshold.
    if len(nodes) > 1:
        _rebalance(assignment, costs, nodes, load, threshold, max_moves)

    moved = sorted(s for s, n in assignment.items() if s in current and current[s] != n)
    return Placement(assignment, sorted(unplaced), moved)


def _rebalance(
    assignment: dict[str, str],
    costs: Mapping[str, float],
    nodes: Mapping[str, float],
    load: dict[str, float],
    threshold: float,
    max_moves: int,
) -> None:
    by_node: dict[str, list[str]] = {n: [] for n in nodes}
    for sid, n in assignment.items():
        by_node[n].append(sid)
    for _ in range(max_moves):
        share = {n: load[n] / nodes[n] for n in nodes}
        hi = max(nodes, key=lambda n: (share[n], n))
        lo = min(nodes, key=lambda n: (share[n], n))
        gap = share[hi] - share[lo]
        if gap <= threshold:
            return
        # The stream whose move narrows the gap most, and that fits on `lo`.
        candidates = [
            (abs((load[hi] - costs[s]) / nodes[hi] - (load[lo] + costs[s]) / nodes[lo]), s)
            for s in by_node[hi]
            if load[lo] + costs[s] <= nodes[lo] + 1e-9
        ]
        best_gap, best = min(candidates, default=(gap, None))
        if best_gap >= gap - 1e-9:
            best = None
        if best is None:
            return
        by_node[hi].remove(best)
        by_node[lo].append(best)
        assignment[best] = lo
        load[hi] -= costs[best]
        load[lo] += costs[best]


def balance(
    placement: Placement, costs: Mapping[str, float], capacities: Mapping[str, float]
) -> tuple[float, float]:
    """(most, least) loaded node as a share of its capacity."""
    load = placement.load(costs)
    shares = [load.get(n, 0.0) / c for n, c in capacities.items() if c > 0]
    return (max(shares), min(shares)) if shares else (0.0, 0.0)
