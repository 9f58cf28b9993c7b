"""Getting Ray and MLflow up: local multi-node clusters (``up`` / ``down``), and the cloud and
KubeRay configs beside this package (``aws.yaml``, ``gcp.yaml``, ``kuberay/``)."""

from .local import LocalCluster, down, read_state, stop_node, up

__all__ = ["LocalCluster", "up", "down", "read_state", "stop_node"]
