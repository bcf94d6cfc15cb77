"""Prometheus HTTP service discovery (`http_sd_configs`): one target group per node service,
its private metrics listener, labelled with the node it runs on.

Format (https://prometheus.io/docs/prometheus/latest/http_sd/): a JSON list of
`{"targets": ["host:port"], "labels": {...}}`, served as application/json."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from segstream.stream.datatypes import NodeState
from segstream.stream.schemas import NodeStatus


def target_groups(nodes: Iterable[NodeStatus]) -> list[dict[str, Any]]:
    """`nodes`: the controller's node records. Lost nodes are left out: Prometheus drops
    their targets, and their series go stale."""
    out = []
    for n in sorted(nodes, key=lambda n: n.id):
        if n.state != NodeState.UP or not n.metrics_port:
            continue
        host = f"[{n.host}]" if ":" in n.host else n.host  # IPv6
        out.append(
            {"targets": [f"{host}:{n.metrics_port}"], "labels": {"node": n.id, "node_ip": n.host}}
        )
    return out
