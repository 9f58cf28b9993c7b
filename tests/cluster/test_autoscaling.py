"""Resource checks on an autoscaling cluster: Ray's real v1 autoscaler with its fake node provider.

The head has no CPUs and the one worker type (1 CPU, ``min_workers: 0``, ``max_workers: 2``)
has no node running at first, as on ``cluster/aws.yaml``: a sweep and ``train --workers 2`` are
not refused, the autoscaler adds the nodes they run on, and what no node type can ever hold is
refused in one line. ``ray start --head --autoscaling-config`` runs in its own session on port
6379 (the fake workers join there) and is stopped by SIGKILL to its process group, which holds
the fake workers too. The capacity arithmetic itself is checked without Ray, by hand.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.capacity import (
    Capacity,
    NodeType,
    RunningNode,
    can_hold,
    check_capacity,
    fit,
    node_types_from_config,
    refusal,
)
from cluster.connect import last_cluster_note
from cluster.processes import descendants, is_running, start_time

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
slow = pytest.mark.slow

PORT = 6379  # the fake provider's workers join the head here
WORKER_TYPE = "ray.worker.cpu"
MAX_WORKERS = 2
HEAD_ENV = {
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
}
DRIVER_ENV = {"RAY_AUTH_MODE": "token"}

# What the tests read of the cluster, from a separate driver: the nodes Ray knows (alive or not)
# with their CPUs, and the autoscaler's own map of the nodes it launched to their node types.
INSPECT = """
import json, sys, ray
from ray.experimental.internal_kv import _internal_kv_get
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
status = json.loads(_internal_kv_get("__autoscaling_status") or "{}")
print(json.dumps({
    "nodes": {n["NodeID"]: {"alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes()},
    "types": (status.get("autoscaler_report") or {}).get("node_type_mapping") or {},
    "monitor": status.get("monitor_pid"),
}))
"""


def _cluster_config() -> dict:
    """A launcher config for the fake provider: a head with no CPUs, 1-CPU workers on demand."""
    return {
        "cluster_name": "craft-autoscaling-test",
        "max_workers": MAX_WORKERS + 1,  # the node type's own limit binds first
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,  # an idle worker goes in ~15 s: the next test starts from none
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },  # fmt: skip
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],  # fmt: skip
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
        },
    }


@dataclass
class Autoscaling:
    """The running test cluster."""

    address: str  # NODE_IP:6379
    head: subprocess.Popen
    log: Path
    head_id: str


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


def _inspect(cluster: Autoscaling | str) -> dict:
    address = cluster if isinstance(cluster, str) else cluster.address
    done = subprocess.run(
        [sys.executable, "-c", INSPECT, address], capture_output=True, text=True, timeout=120, env=_env(DRIVER_ENV)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _alive_workers(state: dict) -> set[str]:
    return {n for n, node in state["nodes"].items() if node["alive"] and node["cpus"] > 0}


def _wait_for_no_workers(cluster: Autoscaling, timeout: float = 120) -> dict:
    """The cluster's state once the autoscaler has removed every idle worker (the head alone)."""
    deadline = time.monotonic() + timeout
    while True:
        state = _inspect(cluster)
        if not _alive_workers(state):
            return state
        assert time.monotonic() < deadline, f"workers still up after {timeout:.0f} s: {state}"
        time.sleep(3)


class _Watcher:
    """Records, while a command runs, every node the autoscaler reports with its node type, and
    every live node's CPUs (an idle worker may be gone again before the command ends)."""

    def __init__(self, cluster: Autoscaling):
        self.cluster, self.types, self.cpus, self._stop = cluster, {}, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(2):
            try:
                self._look()
            except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError):
                pass  # the next look sees it

    def _look(self) -> None:
        state = _inspect(self.cluster)
        self.types.update(state["types"])
        self.cpus.update({n: node["cpus"] for n, node in state["nodes"].items() if node["alive"]})

    def stop(self) -> dict[str, str]:
        """Stop looking (one last look); returns the node types seen, by node."""
        self._stop.set()
        self._thread.join(timeout=180)
        self._look()
        return self.types


def _port_busy(host: str) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, PORT)) == 0


def _group(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies count as gone)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    """``ray start --head --num-cpus=0 --autoscaling-config`` with the fake provider; afterwards
    SIGKILL to its process group and a check that no process of it is left."""
    import ray._private.services

    from cluster.local import _ensure_token

    ip = ray._private.services.get_node_ip_address()
    if _port_busy(ip) or _port_busy("127.0.0.1"):
        pytest.fail(f"port {PORT} is in use: a Ray cluster already runs on this machine (only one fake-provider cluster fits)")
    root = tmp_path_factory.mktemp("autoscaling")
    config = root / "cluster.yaml"
    config.write_text(yaml.safe_dump(_cluster_config()))
    log = root / "head.log"
    _ensure_token(HEAD_ENV, root / "token.log")
    note = last_cluster_note()
    previous_note = note.read_text() if note.is_file() else None  # ray start writes its own there
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={PORT}", "--num-cpus=0",
               f"--autoscaling-config={config}", "--include-dashboard=false", "--disable-usage-stats",
               f"--object-store-memory={256 * 1024 * 1024}"]  # fmt: skip
    with open(log, "wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=_env(HEAD_ENV))  # fmt: skip
    try:
        cluster = Autoscaling(f"{ip}:{PORT}", head, log, "")
        deadline = time.monotonic() + 180
        while True:  # the head answers and its autoscaler has reported once
            assert head.poll() is None, f"the head exited: {log.read_text()[-3000:]}"
            if _port_busy(ip):
                state = _inspect(cluster)
                if state["monitor"] and state["types"]:
                    break
            assert time.monotonic() < deadline, f"the autoscaler did not report in 180 s: {log.read_text()[-3000:]}"
            time.sleep(1)
        assert list(state["types"].values()) == ["ray.head.default"] and not _alive_workers(state)
        cluster.head_id = next(iter(state["types"]))
        yield cluster
    finally:
        tree = {head.pid: start_time(head.pid), **descendants([head.pid])}
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        deadline = time.monotonic() + 30
        while (_group(head.pid) or [p for p, t in tree.items() if t and is_running(p, t)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        if note.is_file() and note.read_text().strip().endswith(f":{PORT}"):
            note.write_text(previous_note) if previous_note is not None else note.unlink()
        assert _group(head.pid) == [], "processes of the cluster's group survived SIGKILL"
        assert [p for p, t in tree.items() if t and is_running(p, t)] == []
        assert not _port_busy(ip)


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(DRIVER_ENV))  # fmt: skip


def _sweep_args(cluster: Autoscaling, root: Path, name: str, *overrides: str) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return ["sweep", "smoke", "--name", name, "--address", cluster.address, "--storage", str(root / "storage"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--cache-dir", str(root / "factors"), *sets]  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("craft-search: error")]


@slow
def test_a_sweep_on_a_head_without_cpus_starts_and_the_autoscaler_adds_its_nodes(autoscaling, tmp_path):
    before = _wait_for_no_workers(autoscaling)
    sets = ("search.num_samples=3", "search.scheduler=fifo", "search.max_budget=8", "search.grace_period=4",
            "train.eval_every=4")  # fmt: skip
    watcher = _Watcher(autoscaling)
    try:
        done = _cli(*_sweep_args(autoscaling, tmp_path, "scaled", *sets))
    finally:
        types = watcher.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the autoscaler will add nodes (up to ray.worker.cpu x 2)" in done.stderr  # not refused: it scales up
    summary = json.loads((tmp_path / "storage" / "scaled" / "summary.json").read_text())
    counts = summary["counts"]
    assert len(summary["trials"]) == 3 and counts["failed"] == 0 and counts["complete"] + counts["pruned"] == 3, counts
    used = {t["node_id"] for t in summary["trials"]}
    assert used and not used & set(before["nodes"])  # on nodes that did not exist when it started
    assert {types.get(n) for n in used} == {WORKER_TYPE}  # nodes the autoscaler launched as the worker type
    assert 1 <= len({n for n, t in types.items() if t == WORKER_TYPE}) <= MAX_WORKERS
    assert {watcher.cpus.get(n) for n in used} == {1}  # the worker type's 1 CPU


@slow
def test_b_train_workers_2_trains_on_nodes_the_autoscaler_adds(autoscaling, tmp_path):
    before = _wait_for_no_workers(autoscaling)  # the sweep's workers have gone: these two must be added
    run = {
        "model": "tiny-random",
        "task": "tweets",
        "method": "lora",
        "data": {"max_train_samples": 64, "max_eval_samples": 32},
        "train": {"batch_size": 8, "max_length": 32, "max_steps": 4, "eval_every": 2, "device": "auto"},
        "tracking": {"enabled": False},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    watcher = _Watcher(autoscaling)
    try:
        done = _cli("train", str(tmp_path / "run.yaml"), "--workers", "2", "--address", autoscaling.address, "--no-progress")
    finally:
        types = watcher.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "data-parallel: 2 workers (gloo)" in done.stdout  # device auto: no node type has a GPU
    assert "--workers 2 with 1 CPU each needs 2 x 1 CPU, the running nodes hold 0" in done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 <= metrics["final"]["score"] <= 1  # it trained, to the end
    added = {n for n, t in types.items() if t == WORKER_TYPE} - set(before["nodes"])
    assert len(added) == 2  # one node per worker (1 CPU each), launched for this job


@slow
def test_c_what_no_node_type_can_ever_hold_is_refused_in_one_line(autoscaling, tmp_path):
    done = _cli(*_sweep_args(autoscaling, tmp_path, "too-big", "resources.cpu=4"), timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert _error_lines(done.stderr) == [
        "craft-search: error: a trial needs 4 CPUs on one node, but no node of the Ray cluster can ever hold that: "
        "the largest, node type ray.worker.cpu, has 1 CPU (the autoscaler may add ray.worker.cpu x 2); lower resources.cpu"
    ], done.stderr[-3000:]
    storage = tmp_path / "storage"
    assert not storage.exists() or list(storage.rglob("*")) == []  # refused before anything was written

    run = {"model": "tiny-random", "method": "head", "data": {"max_train_samples": 64, "max_eval_samples": 32},
           "train": {"max_steps": 2, "device": "cpu"}, "tracking": {"enabled": False}, "output_dir": str(tmp_path / "o")}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    done = _cli("train", str(tmp_path / "run.yaml"), "--workers", "3", "--address", autoscaling.address, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert _error_lines(done.stderr) == [
        "craft-search: error: --workers 3 with 1 CPU each needs 3 CPUs; the Ray cluster has 2 CPUs at most, room for 2 of "
        "the 3 (the autoscaler may add ray.worker.cpu x 2); use fewer workers or a larger cluster (--address)"
    ], done.stderr[-3000:]
    assert not (tmp_path / "o").exists()


# The arithmetic, by hand: no Ray.

HEAD = RunningNode("h", "10.0.0.1", {"memory": 8e9})  # a head with no CPUs
GPU_TYPE = NodeType("gpu_worker", {"CPU": 8, "GPU": 1}, 6)
CPU_TYPE = NodeType("cpu_worker", {"CPU": 16}, 2)


def _cloud(*running: RunningNode, mapping: dict[str, str] | None = None) -> Capacity:
    """A cluster like cluster/aws.yaml: a head with no CPUs, GPU and CPU workers on demand."""
    return Capacity([HEAD, *running], [GPU_TYPE, CPU_TYPE], 8, {"h": "head", **(mapping or {})}, autoscales=True)


def test_a_bundle_a_running_node_holds_fits_now():
    cap = Capacity([HEAD, RunningNode("w", "10.0.0.2", {"CPU": 4})])
    result = fit(cap, {"CPU": 2, "GPU": 0}, 2)
    assert (result.now, result.ever, result.ok, result.scales_up) == (2, 2, True, False)  # 4 CPUs: two 2-CPU bundles
    assert not fit(cap, {"CPU": 2}, 3).ok  # one node of 4 CPUs, no autoscaler
    assert fit(cap, {"CPU": 3}, 1).now == 1 and fit(cap, {"CPU": 5}, 1).ever == 0


def test_a_bundle_only_a_node_type_holds_passes_and_says_the_cluster_scales_up(capsys):
    cap = _cloud()
    result = check_capacity({"CPU": 1, "GPU": 0.25}, 1, "a trial", "lower resources.cpu", cap=cap)
    assert (result.now, result.ever, result.scales_up) == (0, 24, True)  # 6 GPU nodes x 4 quarter-GPU trials
    assert capsys.readouterr().err.strip() == (
        "craft-search: a trial needs 1 x 1 CPU and 0.25 GPUs, the running nodes hold 0; "
        "the autoscaler will add nodes (up to gpu_worker x 6, cpu_worker x 2)"
    )
    assert fit(cap, {"CPU": 4}, 1).ever == 2 * 4 + 6 * 2  # the CPU type's nodes first, within max_workers 8
    assert can_hold({"CPU": 2, "GPU": 1}, 6, cap) and not can_hold({"CPU": 2, "GPU": 1}, 7, cap)


def test_a_bundle_no_node_type_holds_is_refused_with_the_largest_offer():
    cap = _cloud()
    with pytest.raises(ValueError) as err:
        check_capacity({"CPU": 32}, 1, "a trial", "lower resources.cpu", cap=cap)
    assert str(err.value) == (
        "a trial needs 32 CPUs on one node, but no node of the Ray cluster can ever hold that: the largest, node type "
        "cpu_worker, has 16 CPUs (the autoscaler may add gpu_worker x 6, cpu_worker x 2); lower resources.cpu"
    )
    fixed = Capacity([HEAD, RunningNode("w", "10.0.0.2", {"CPU": 2})])
    assert refusal(fit(fixed, {"CPU": 1, "GPU": 1}, 1), "a trial", "set resources.gpu: 0") == (
        "a trial needs 1 CPU and 1 GPU on one node, but no node of the Ray cluster can ever hold that: the largest, "
        "a running node, has 2 CPUs and 0 GPUs (the cluster does not autoscale); set resources.gpu: 0"
    )


def test_a_count_of_bundles_beyond_max_workers_is_refused():
    cap = Capacity([HEAD], [NodeType("w", {"CPU": 2}, 3)], 2, autoscales=True)  # the global cap binds: 2 nodes
    assert fit(cap, {"CPU": 1}, 4).ok
    result = fit(cap, {"CPU": 1}, 5)
    assert (result.ever, result.ok) == (4, False)
    assert refusal(result, "--workers 5 with 1 CPU each", "use fewer workers") == (
        "--workers 5 with 1 CPU each needs 5 CPUs; the Ray cluster has 4 CPUs at most, room for 4 of the 5 "
        "(the autoscaler may add w x 3); use fewer workers"
    )
    mixed = Capacity([HEAD], [NodeType("small", {"CPU": 1}, 5), NodeType("big", {"CPU": 4}, 1)], 2, autoscales=True)
    assert fit(mixed, {"CPU": 1}, 1).ever == 4 + 1  # the big node first, then one small one


def test_running_workers_of_a_type_count_once_and_nodes_joined_by_hand_on_top():
    worker = RunningNode("w1", "10.0.0.3", {"CPU": 16})
    assert fit(_cloud(worker, mapping={"w1": "cpu_worker"}), {"CPU": 16}, 1).ever == 2  # cpu_worker x 2, not 3
    assert fit(_cloud(worker, mapping={"10.0.0.3": "cpu_worker"}), {"CPU": 16}, 1).ever == 2  # mapped by IP (cloud)
    assert fit(_cloud(worker), {"CPU": 16}, 1).ever == 3  # no type claims it: a node joined by hand
    assert fit(_cloud(worker, mapping={"w1": "cpu_worker"}), {"CPU": 16}, 1).now == 1
    assert fit(_cloud(worker), {"CPU": 32}, 1).largest == "node type cpu_worker"  # a tie names the type


def test_unknown_node_types_refuse_nothing_and_use_no_gpu_they_cannot_see():
    cap = Capacity([HEAD], None, autoscales=True)
    result = fit(cap, {"CPU": 64}, 1)
    assert result.ever is None and result.ok and not result.scales_up
    assert not can_hold({"CPU": 1, "GPU": 1}, 2, cap)  # GPU training only on GPUs it can see


def test_node_types_from_the_launcher_configs():
    aws = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster" / "aws.yaml").read_text())
    types, top = node_types_from_config(aws)
    assert top == 8 and [(t.name, t.resources, t.max_workers) for t in types] == [
        ("gpu_worker", {}, 6),
        ("cpu_worker", {}, 2),
    ]  # the head's type is no worker; ray up fills in the empty resources on AWS
    filled = Capacity([HEAD, RunningNode("g", "10.0.0.4", {"CPU": 8, "GPU": 1})], types, top, {"10.0.0.4": "gpu_worker"})
    assert fit(filled, {"CPU": 1, "GPU": 1}, 6).ok and not fit(filled, {"CPU": 1, "GPU": 1}, 7).ok  # read off a running one
    fake, top = node_types_from_config(_cluster_config() | {"available_node_types": {"w": {"resources": {"CPU": 1}}}})
    assert top == MAX_WORKERS + 1 and fake == [NodeType("w", {"CPU": 1.0}, MAX_WORKERS + 1)]  # Ray's default: the global cap
    with pytest.raises(ValueError, match="needs available_node_types"):
        node_types_from_config({"max_workers": 2})
