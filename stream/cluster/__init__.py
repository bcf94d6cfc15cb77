"""segstream on a Ray cluster (`segstream serve --cluster ADDRESS`, the `cluster` extra).

- placement.py: which node runs which stream (pure; capacity in slots, cost per stream)
- controller.py: the desired stream set, the nodes, placement and failure handling
- node.py: a node service, today's pipeline for the node's share of the streams
- gateway.py: the single-node HTTP API at one address, relaying from the nodes
- sd.py: Prometheus HTTP service discovery of the node services
- runtime.py: the only module that imports Ray (lazily)"""
