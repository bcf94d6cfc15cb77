"""What the cluster controller tells the gateway: typed, and picklable for Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segstream.stream.datatypes import NodeState, StreamPhase, StreamState
from segstream.stream.schemas import NodeStatus, StreamStatus, ZoneStatus

# The state a stream shows while no node reports on it.
STATE_OF_PHASE = {
    StreamPhase.STARTING: StreamState.STARTING,
    StreamPhase.MOVING: StreamState.MOVING,
    StreamPhase.PENDING: StreamState.PENDING,
    StreamPhase.ERROR: StreamState.ERROR,
    StreamPhase.PLACED: StreamState.UNKNOWN,  # placed, but its node did not answer
}


@dataclass(frozen=True)
class StreamPlacement:
    """One stream of the desired set: its public settings and where it is."""

    id: str
    source: str  # without credentials
    reader: str
    output: str
    infer_fps: float
    node: str | None  # short node id
    phase: StreamPhase
    reason: str | None
    zones: tuple[dict[str, Any], ...] = ()  # as configured (JSON by alias): name, polygon, rules

    @property
    def state(self) -> StreamState:
        return STATE_OF_PHASE[self.phase]

    def idle_status(self, reason: str | None = None) -> StreamStatus:
        """Its status when no node reports on it (yet): its phase is its state, its zones as
        configured (no coverage, nothing active)."""
        st = StreamStatus.idle(
            id=self.id,
            source=self.source,
            reader=self.reader,
            output=self.output,
            infer_fps=self.infer_fps,
            state=self.state,
            reason=reason or self.reason,
            node=self.node,
        )
        zones = [ZoneStatus.model_validate(z | {"coverage": {}, "active": []}) for z in self.zones]
        return st.model_copy(update={"zones": zones})


@dataclass(frozen=True)
class ClusterSnapshot:
    version: int = 0
    streams: list[StreamPlacement] = field(default_factory=list)
    nodes: list[NodeStatus] = field(default_factory=list)

    def stream(self, stream_id: str) -> StreamPlacement | None:
        return next((s for s in self.streams if s.id == stream_id), None)

    def node(self, short_id: str | None) -> NodeStatus | None:
        return next((n for n in self.nodes if n.id == short_id), None)

    def owner(self, entry: StreamPlacement) -> NodeStatus | None:
        """The node that runs the stream, if it is placed on one that is known."""
        return self.node(entry.node) if entry.phase == StreamPhase.PLACED else None

    def ready_nodes(self) -> list[NodeStatus]:
        """Up and with a warm model, least loaded first."""
        ready = [n for n in self.nodes if n.state == NodeState.UP and n.ready]
        return sorted(ready, key=lambda n: (n.load, n.id))

    @property
    def ready(self) -> bool:
        return any(n.ready for n in self.nodes)


@dataclass(frozen=True)
class ChangeResult:
    """The controller's answer to a stream change: the new snapshot, or why not (a
    control.Refused as a dict)."""

    snapshot: ClusterSnapshot | None = None
    refused: dict[str, Any] | None = None
