"""Everything that touches Ray: connecting, the controller and node actors. Ray is imported
here, lazily, so the base install (no `cluster` extra) never needs it (the controller
module starts its own actor, stream.cluster.controller.start_controller)."""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "cluster mode needs Ray: pip install 'segstream[cluster]'"
CONTROLLER_NAME = "segstream-controller"
NODE_PREFIX = "segstream-node-"


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return ray


def connect(address: str, namespace: str) -> None:
    """Joins the Ray cluster at `address` (`auto`: the one `ray start` began on this machine)
    as a driver. Never starts a cluster of its own, and never a dashboard."""
    ray = ray_module()
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        namespace=namespace,
        include_dashboard=False,
        log_to_driver=True,
        logging_level="warning",
        configure_logging=False,
    )


def node_actor(namespace: str, ray_id: str, cls: type | None = None) -> Any:
    """The node service on one Ray node (created, or found after a controller restart)."""
    ray = ray_module()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from segstream.stream.cluster.node import NodeService

    return (
        ray.remote(cls or NodeService)
        .options(
            name=NODE_PREFIX + ray_id,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray_id, soft=False),
        )
        .remote()
    )


def node_ip(ray_id: str) -> str:
    ray = ray_module()
    for n in ray.nodes():
        if n["NodeID"] == ray_id:
            return str(n["NodeManagerAddress"])
    raise LookupError(f"no Ray node {ray_id}")
