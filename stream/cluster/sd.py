"""Prometheus HTTP service discovery (`http_sd_configs`): one target group per node service,
its private metrics listener, labelled with the node it runs on.

Format (https://prometheus.io/docs/prometheus/latest/http_sd/): a JSON list of
`{"targets": ["host:port"], "labels": {...}}`, served as application/json."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def target_groups(nodes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """`nodes`: the controller's node records (id, host, metrics_port, state). Lost nodes are
    left out: Prometheus drops their targets, and their series go stale."""
    out = []
    for n in sorted(nodes, key=lambda n: n["id"]):
        if n.get("state") != "up" or not n.get("metrics_port"):
            continue
        host = n["host"]
        if ":" in host:  # IPv6
            host = f"[{host}]"
        out.append(
            {
                "targets": [f"{host}:{n['metrics_port']}"],
                "labels": {"node": n["id"], "node_ip": n["host"]},
            }
        )
    return out
