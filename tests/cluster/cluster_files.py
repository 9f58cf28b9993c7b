"""The deployment configs in cluster/, parsed: what test_configs.py and test_security.py read."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def load_config(name: str) -> dict:
    """A single-document YAML config of cluster/ (a launcher config)."""
    return yaml.safe_load((CLUSTER / name).read_text())


def load_manifest(name: str) -> tuple[dict, list[dict]]:
    """A KubeRay manifest's Ray resource (RayCluster or RayJob) and the NetworkPolicies beside it."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    [ray] = [d for d in docs if d["kind"] in ("RayCluster", "RayJob")]
    return ray, [d for d in docs if d["kind"] == "NetworkPolicy"]
