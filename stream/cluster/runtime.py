"""Everything that touches Ray: connecting, the controller and node actors, a node's way to
the events hub. Ray is imported here, lazily, so the base install (no `cluster` extra) never
needs it (the controller and the events hub modules start their own actors:
stream.cluster.controller.start_controller, stream.cluster.events_hub.start_events_hub)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segstream.stream.events.forward import Batch, Send

INSTALL_HINT = "cluster mode needs Ray: pip install 'segstream[cluster]'"
CONTROLLER_NAME = "segstream-controller"
NODE_PREFIX = "segstream-node-"
EVENTS_HUB_NAME = "segstream-events"


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


def node_actor(namespace: str, ray_id: str, cls: type) -> Any:
    """The node service (`cls`) on one Ray node (created, or found after a controller
    restart)."""
    ray = ray_module()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return (
        ray.remote(cls)
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


def hub_sender(namespace: str, timeout_s: float = 30.0) -> Send:
    """A node's `Send` (stream.events.forward): a batch to the cluster's events hub
    (stream.cluster.events_hub), found by name; raises when the hub did not take it (the
    node's forwarder keeps the batch and tries again)."""
    ray = ray_module()
    handle: Any = None

    def send(batch: Batch) -> str:
        nonlocal handle
        if handle is None:
            handle = ray.get_actor(EVENTS_HUB_NAME, namespace=namespace)
        try:
            return str(ray.get(handle.ingest.remote(batch), timeout=timeout_s))
        except Exception:
            handle = None  # looked up again: a restarted hub may be another actor
            raise

    return send
