"""The deployment configs keep their security settings: Ray token auth from a Secret and a
NetworkPolicy in the KubeRay manifests, no working-tree state or secrets in the image, and the
MLflow server's secrets on the head only and off every command line. Each check also runs against
a weakened copy of the real file and must fail there."""

from __future__ import annotations

import copy
import json
import re

import pytest
import tomllib
from cluster_files import CLUSTER, load_config, load_manifest

ROOT = CLUSTER.parent
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]  # what the image installs


MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
CLIENT_LABELS = {"craft-search/ray-client": "true"}  # pods that may use the dashboard and Ray client ports
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}  # polls a RayJob through the dashboard
CLIENT_PORTS = {8265, 10001}  # dashboard (and job submission), Ray client


def _cluster_spec(ray: dict) -> dict:
    return ray["spec"] if ray["kind"] == "RayCluster" else ray["spec"]["rayClusterSpec"]


def _pod_templates(ray: dict) -> list[dict]:
    spec = _cluster_spec(ray)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _ray_envs(ray: dict) -> list[tuple[str, list[dict]]]:
    """(where, env) of every container that runs Ray or talks to it: head, workers, the autoscaler
    and a RayJob's submitter (``ray job submit`` against the dashboard)."""
    found = [(c["name"], c.get("env", [])) for t in _pod_templates(ray) for c in t["spec"]["containers"]]
    spec = _cluster_spec(ray)
    if spec.get("enableInTreeAutoscaling"):
        found.append(("autoscaler", spec.get("autoscalerOptions", {}).get("env", [])))
    if ray["kind"] == "RayJob" and ray["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
        submitter = ray["spec"].get("submitterPodTemplate")
        assert submitter, "the RayJob's submitter connects to the dashboard: it needs a submitterPodTemplate with the token"
        found.append(("submitter", submitter["spec"]["containers"][0].get("env", [])))
    return found


def _check_token_auth(ray: dict) -> str:
    """Every Ray container runs with RAY_AUTH_MODE=token and the token of one Secret, which
    authOptions names too (the operator's own dashboard calls); returns the Secret's name."""
    secrets = set()
    for where, env in _ray_envs(ray):
        env = {e["name"]: e for e in env}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where} lacks RAY_AUTH_MODE=token"
        token = env.get("RAY_AUTH_TOKEN", {})
        ref = token.get("valueFrom", {}).get("secretKeyRef")
        assert ref and "value" not in token, f"{where}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)"
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, f"the containers take their token from different Secrets: {sorted(secrets)}"
    [(name, key)] = secrets
    auth = _cluster_spec(ray).get("authOptions", {})
    assert key == "auth_token" and auth == {"mode": "token", "secretName": name}, (
        f"authOptions must be {{mode: token, secretName: {name}}} with the token under auth_token, got {auth}, key {key}"
    )
    return name


def _check_network_policy(ray: dict, policies: list[dict]) -> None:
    """A NetworkPolicy selects every Ray pod and admits only the cluster's own pods (any port),
    pods labelled CLIENT_LABELS of this namespace (CLIENT_PORTS) and the KubeRay operator (8265)."""
    own = {"ray.io/cluster": ray["metadata"]["name"]} if ray["kind"] == "RayCluster" else {}  # set by KubeRay
    pods = [{**t.get("metadata", {}).get("labels", {}), **own} for t in _pod_templates(ray)]
    selecting = []
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels") or {}
        if selector and all(selector.items() <= pod.items() for pod in pods):
            selecting.append(policy)
    assert len(selecting) == 1, f"no NetworkPolicy (or several) selects all of {ray['metadata']['name']}'s Ray pods"
    spec = selecting[0]["spec"]
    cluster = spec["podSelector"]["matchLabels"]
    assert "Ingress" in spec.get("policyTypes", ["Ingress"]) and not spec["podSelector"].get("matchExpressions")
    client_ports = set()
    for rule in spec.get("ingress", []):
        assert rule.get("from"), f"an ingress rule without `from` admits every pod and address: {rule}"
        ports = {p.get("port") for p in rule.get("ports", [])}
        for peer in rule["from"]:
            labels = peer.get("podSelector", {}).get("matchLabels")
            if labels == cluster and set(peer) == {"podSelector"}:
                continue  # the cluster's own pods
            allowed = {8265} if labels == OPERATOR_LABELS else CLIENT_PORTS
            assert labels in (CLIENT_LABELS, OPERATOR_LABELS) and "ipBlock" not in peer, f"ingress from {peer}"
            assert ports and ports <= allowed, f"{labels} may reach ports {sorted(allowed)} only, not {sorted(ports) or 'all'}"
            assert labels == OPERATOR_LABELS or "namespaceSelector" not in peer, "clients from this namespace only"
            client_ports |= ports if labels == CLIENT_LABELS else set()
    assert client_ports == CLIENT_PORTS, f"labelled clients reach {sorted(client_ports)}, not the dashboard and client ports"


def _check_exposure(ray: dict, policies: list[dict]) -> None:
    """Ray on 0.0.0.0 (the pod's IP) only with token auth and a NetworkPolicy."""
    if "0.0.0.0" in json.dumps(ray):
        try:
            _check_token_auth(ray)
            _check_network_policy(ray, policies)
        except AssertionError as err:
            raise AssertionError(f"Ray listens on 0.0.0.0 without token auth and a NetworkPolicy: {err}") from None


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_runs_with_token_auth_from_a_secret(name):
    ray, _ = load_manifest(name)
    secret = _check_token_auth(ray)
    text = (CLUSTER / name).read_text()
    assert f"kubectl create secret generic {secret} --from-literal=auth_token=" in text, "say how to create the Secret"
    assert "kind: Secret" not in text, "the token stays out of git"


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_pods_are_closed_by_a_network_policy(name):
    ray, policies = load_manifest(name)
    _check_network_policy(ray, policies)
    _check_exposure(ray, policies)
    if ray["kind"] == "RayJob":  # the submitter must get through to the dashboard
        assert CLIENT_LABELS.items() <= ray["spec"]["submitterPodTemplate"]["metadata"]["labels"].items()


DOCKERIGNORED = [".git/config", ".venv/bin/python", "runs/sweeps/s/trials.json", "runs/cluster/mlflow.db", "mlflow.db",
                 "mlartifacts/1/model.safetensors", "mlflow.env", "cluster/mlflow.env", "prod.env", "spaces/.env",
                 "craft/__pycache__/tucker.cpython-311.pyc", ".pytest_cache/v", "model/adapter.safetensors", "outputs/a"]  # fmt: skip


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Go's filepath.Match, plus ** for any depth)."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "[":
            j = pattern.index("]", i) + 1
            regex, i = regex + pattern[i:j], j
        else:
            regex, i = regex + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
    return re.compile(regex)


def _dockerignored(path: str, dockerignore: str) -> bool:
    """Whether docker leaves ``path`` out of the build context: the last matching pattern decides,
    and a pattern that matches a directory leaves out what is below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in dockerignore.splitlines():
        pattern = line.strip()
        if pattern and not pattern.startswith("#"):
            regex = _docker_pattern(pattern.lstrip("!").strip("/"))
            if any(regex.fullmatch(p) for p in prefixes):
                ignored = not pattern.startswith("!")
    return ignored


def _check_dockerignore(text: str) -> None:
    leaked = [p for p in DOCKERIGNORED if not _dockerignored(p, text)]
    assert not leaked, f".dockerignore lets these into the image: {leaked}"
    needed = ["pyproject.toml", "README.md"] + [
        str(f.relative_to(ROOT)) for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py") if "__pycache__" not in f.parts
    ]
    dropped = [p for p in needed if _dockerignored(p, text)]
    assert not dropped, f".dockerignore leaves out what pip install needs: {dropped}"


def test_the_image_leaves_out_the_working_trees_state_and_secrets():
    _check_dockerignore((ROOT / ".dockerignore").read_text())


def _commands(config: dict) -> tuple[list[str], list[str]]:
    """Every shell command of a launcher config, and those that run on workers."""
    common = config.get("initialization_commands", []) + config.get("setup_commands", [])
    workers = common + config.get("worker_setup_commands", []) + config.get("worker_start_ray_commands", [])
    for spec in config["available_node_types"].values():
        workers = workers + spec.get("initialization_commands", []) + spec.get("worker_setup_commands", [])
    head = config.get("head_setup_commands", []) + config.get("head_start_ray_commands", [])
    return workers + head, workers


SECRET_ON_A_COMMAND_LINE = re.compile(r"--backend-store-uri|\$\{?MLFLOW_BACKEND|postgresql://|mysql://|\w+://[^/\s@]+:[^/\s@]+@")


def _check_launcher_secrets(config: dict) -> None:
    """mlflow.env reaches the head only (file_mounts go to every node) and no command line carries
    the database URI; the head's MLflow server reads it from the env file."""
    mounted = [f"{k}: {v}" for k, v in config.get("file_mounts", {}).items()] + list(config.get("cluster_synced_files", []))
    assert not [m for m in mounted if "mlflow.env" in m], "file_mounts reach every node: mlflow.env goes to the head only"
    every, workers = _commands(config)
    assert not [c for c in workers if "mlflow.env" in c], "a worker command reads mlflow.env"
    leaks = [c for c in every if SECRET_ON_A_COMMAND_LINE.search(c)]
    assert not leaks, f"the database URI on a command line (ps shows it to every user): {leaks}"
    assert not [c for c in every if "0.0.0.0" in c], "no token auth on the launcher's clusters: nothing on 0.0.0.0"
    server = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert server and all(
        "mlflow.env" in c and "chmod 600" in c and "set -a" in c and "mlflow server --host 127.0.0.1 --port 5000)" in c
        for c in server
    ), f"the head's MLflow server reads a chmod-600 env file and listens on 127.0.0.1: {server}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_secrets_stay_on_the_head_and_off_command_lines(name):
    _check_launcher_secrets(load_config(name))
    text = (CLUSTER / name).read_text()
    rsync = re.search(rf"ray rsync-up cluster/{name} ~/\.craft-search/mlflow\.env (\S+)(.*)", text)
    assert rsync and "--all-nodes" not in rsync.group(2), "say how mlflow.env reaches the head, and the head only"
    assert rsync.group(1) == "/home/ray/.craft-search/mlflow.env"  # where the start command reads it


# The manifests share one env list through a YAML alias: each weakening replaces a container's list.
def _without_worker_token(ray):
    ray = copy.deepcopy(ray)
    container = _cluster_spec(ray)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "RAY_AUTH_TOKEN"]
    return ray


def _literal_token(ray):
    ray = copy.deepcopy(ray)
    container = _cluster_spec(ray)["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "RAY_AUTH_TOKEN"] + [{"name": "RAY_AUTH_TOKEN", "value": "x"}]
    return ray


def _open_policy(policies, rule):
    policies = copy.deepcopy(policies)
    policies[0]["spec"]["ingress"].append(rule)
    return policies


@pytest.mark.parametrize(
    "check, match",
    [
        (lambda r, p: _check_token_auth(_without_worker_token(r)), "ray-worker: RAY_AUTH_TOKEN must come from a Secret"),
        (lambda r, p: _check_token_auth(_literal_token(r)), "ray-head: RAY_AUTH_TOKEN must come from a Secret"),
        (lambda r, p: _check_token_auth({**r, "spec": {k: v for k, v in r["spec"].items() if k != "submitterPodTemplate"}}),
         "needs a submitterPodTemplate"),
        (lambda r, p: _check_network_policy(r, []), "no NetworkPolicy"),
        (lambda r, p: _check_network_policy(r, _open_policy(p, {"from": [{"podSelector": {}}]})), "ingress from"),
        (lambda r, p: _check_network_policy(r, _open_policy(p, {})), "without `from` admits every pod"),
        (lambda r, p: _check_network_policy(r, _open_policy(p, {"from": [{"podSelector": {"matchLabels": CLIENT_LABELS}}]})),
         "may reach ports"),
        (lambda r, p: _check_exposure(_without_worker_token(r), p), "on 0.0.0.0 without token auth"),
        (lambda r, p: _check_exposure(r, []), "on 0.0.0.0 without token auth and a NetworkPolicy"),
    ],
)  # fmt: skip
def test_each_kuberay_check_catches_its_weakening(check, match):
    with pytest.raises(AssertionError, match=match):
        check(*load_manifest("kuberay/rayjob.yaml"))


def test_each_image_and_launcher_check_catches_its_weakening():
    text = (ROOT / ".dockerignore").read_text()
    with pytest.raises(AssertionError, match=r"\.git/config"):
        _check_dockerignore(text.replace("\n.git\n", "\n"))
    with pytest.raises(AssertionError, match="cluster/mlflow.env"):
        _check_dockerignore(text.replace("**/mlflow.env", "mlflow.env").replace("**/*.env", "*.env"))
    with pytest.raises(AssertionError, match="pip install needs"):
        _check_dockerignore(text + "\nsearch\n")
    config = load_config("aws.yaml")
    with pytest.raises(AssertionError, match="mlflow.env goes to the head only"):
        _check_launcher_secrets({**config, "file_mounts": {**config["file_mounts"], "/home/ray/mlflow.env": "~/mlflow.env"}})
    argv = 'set -a && . ~/mlflow.env && mlflow server --host 127.0.0.1 --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"'
    with pytest.raises(AssertionError, match="on a command line"):
        _check_launcher_secrets({**config, "head_start_ray_commands": [*config["head_start_ray_commands"], argv]})
