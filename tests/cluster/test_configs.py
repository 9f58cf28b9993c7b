"""The deployment configs parse, hold what their tools require, and pin the Ray and Python
versions that pyproject.toml allows (and each other's). Their security settings: test_security.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from cluster_files import CLUSTER, load_config, load_manifest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT_TOML = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYPROJECT = PYPROJECT_TOML["project"]
PACKAGES = PYPROJECT_TOML["tool"]["setuptools"]["packages"]  # what the image's pip install needs
RAY_REQUIREMENT = next(Requirement(d) for d in PYPROJECT["dependencies"] if Requirement(d).name == "ray")
PYTHON = PYPROJECT["requires-python"]
IMAGE_TAG = re.compile(r"(?:rayproject/ray|craft-search):(?:[\w.]+-)?(?:ray)?(\d+\.\d+\.\d+)-py(\d)(\d+)")


def _images(node) -> list[str]:
    """Every container image named anywhere in a parsed YAML."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def _versions(image: str) -> tuple[Version, Version]:
    match = IMAGE_TAG.search(image)
    assert match, f"image {image!r} does not name its Ray and Python versions"
    return Version(match.group(1)), Version(f"{match.group(2)}.{match.group(3)}")


def _check_versions(images: list[str], pins: list[str] = ()) -> Version:
    assert images
    found = {_versions(i) for i in images}
    assert len(found) == 1, f"the images disagree: {sorted(images)}"
    ray, python = found.pop()
    assert RAY_REQUIREMENT.specifier.contains(ray), f"Ray {ray} is outside pyproject's {RAY_REQUIREMENT}"
    assert Requirement(f"python{PYTHON}").specifier.contains(python), f"Python {python} is outside requires-python {PYTHON}"
    for pin in pins:
        assert Version(pin) == ray, f"a command pins Ray {pin} but the image has {ray}"
    return ray


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_configs(name, provider):
    config = load_config(name)
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):  # fmt: skip
        assert key in config, f"{name} lacks {key}"
    assert config["provider"]["type"] == provider and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t, spec in types.items() if t != config["head_node_type"] and _has_gpu(spec["node_config"], provider)]
    assert gpu, f"{name} has no GPU worker type"
    for spec in types.values():
        assert "node_config" in spec and "resources" in spec
    for worker in set(types) - {config["head_node_type"]}:
        assert types[worker]["max_workers"] >= types[worker]["min_workers"] >= 0
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "craft-search" in commands and "ray start --head" in commands and "--num-cpus=0" in commands
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    pins = re.findall(r"ray\[[\w,]+\]==([\d.]+)", commands)
    _check_versions(_images(config), pins)


def _has_gpu(node_config: dict, provider: str) -> bool:
    if provider == "aws":
        return node_config["InstanceType"].split(".")[0][0] in "gp"  # g5, g6, p4d, p5 families
    return any(a["acceleratorCount"] >= 1 for a in node_config.get("guestAccelerators", []))


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["maxReplicas"] >= g["minReplicas"] >= 0 for g in groups)
    for group in groups:
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert "/mnt/shared" in mounts and claims == {"craft-search-shared"}  # the sweeps' shared storage
    ray = _check_versions(_images(spec))
    assert Version(spec["rayVersion"]) == ray, f"rayVersion {spec['rayVersion']} but the images run Ray {ray}"


def test_kuberay_raycluster():
    manifest, _ = load_manifest("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster" and manifest["metadata"]["name"]
    _check_ray_cluster_spec(manifest["spec"])


def test_kuberay_rayjob():
    manifest, _ = load_manifest("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("craft-search sweep ") and "--storage /mnt/shared/" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    _check_versions(_images(manifest))  # the submitter's image too


def test_the_dockerfile_pins_what_the_manifests_name():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    pins = re.findall(r"ray\[[\w,]+\]==([\d.]+)", text)
    ray = _check_versions([base], pins)
    assert Version(load_manifest("kuberay/raycluster.yaml")[0]["spec"]["rayVersion"]) == ray


def test_a_ray_outside_pyproject_is_caught():
    with pytest.raises(AssertionError, match="outside pyproject"):
        _check_versions(["rayproject/ray:2.10.0-py311-gpu"])
    with pytest.raises(AssertionError, match="outside requires-python"):
        _check_versions(["rayproject/ray:2.60.0-py39-gpu"])
    with pytest.raises(AssertionError, match="pins Ray 2.50.0"):
        _check_versions(["rayproject/ray:2.60.0-py311-gpu"], ["2.50.0"])
