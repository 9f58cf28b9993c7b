"""Getting Ray and MLflow up: local multi-node clusters (``up`` / ``down``), what a cluster can
ever hold (running nodes plus what its autoscaler may add: ``capacity``, ``check_capacity``), and
the cloud and KubeRay configs beside this package (``aws.yaml``, ``gcp.yaml``, ``kuberay/``)."""

from .capacity import Capacity, Fit, NodeType, RunningNode, can_hold, capacity, check_capacity, fit, node_types_from_config
from .local import LocalCluster, down, read_state, stop_node, up

__all__ = [
    "LocalCluster",
    "up",
    "down",
    "read_state",
    "stop_node",
    "Capacity",
    "Fit",
    "NodeType",
    "RunningNode",
    "capacity",
    "fit",
    "check_capacity",
    "can_hold",
    "node_types_from_config",
]
