"""Getting Ray and MLflow up: local multi-node clusters, cloud and KubeRay configs."""

__all__: list[str] = []
