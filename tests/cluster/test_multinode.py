"""Sweeps on a real multi-node Ray cluster on 127.0.0.1: a head that only coordinates and two
worker nodes of 1 CPU, each a separate ``ray start`` process, plus an MLflow server, all started
by ``craft-search cluster up`` and stopped by ``down``. Every sweep is a real CLI driver joined
with ``--address``. Node loss is a worker node's process group killed with SIGKILL mid-sweep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.local import read_state, stop_node
from cluster.processes import is_running, start_time
from search.names import OUTCOME_TAG, TRIAL_ID_TAG

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# Ray notices a lost node within seconds instead of the default ~30 s.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                 "RAY_health_check_failure_threshold": "3"}  # fmt: skip


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``craft-search cluster up --local --workers 2``; afterwards ``down``, and a check that every
    process it started, and every process below them, is gone."""
    from cluster import local

    state_dir = tmp_path_factory.mktemp("cluster")
    started = local.up(2, state_dir=state_dir, env=HEALTH_CHECKS)  # what the CLI runs, with faster health checks
    status = _cli("cluster", "status", "--state-dir", str(state_dir), timeout=60)
    assert status.returncode == 0 and started.ray_address in status.stdout, status.stdout + status.stderr
    yield started
    alive = {p.pid for p in read_state(state_dir).running()}  # a test may have stopped a node already
    down = _cli("cluster", "down", "--state-dir", str(state_dir), timeout=120)
    assert down.returncode == 0, down.stderr
    stopped = [int(p) for p in down.stdout.split("(pids ")[1].rstrip(")\n").split(", ")]
    assert "head" in {p.role for p in started.processes if p.pid in alive} and alive <= set(stopped)
    assert not [p.role for p in started.processes if is_running(p.pid, p.started)]
    time.sleep(1)
    assert [pid for pid in stopped if start_time(pid) is not None] == []  # exited (zombies count as gone)
    port = started.ray_address.rsplit(":", 1)[1]
    leftovers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and start_time(int(entry.name)) is not None:
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f":{port}" in cmdline and "pytest" not in cmdline:
                leftovers.append(cmdline[:200])
    assert leftovers == []  # no Ray process of this cluster survives
    assert read_state(state_dir) is None


def _sweep_args(cluster, storage: Path, name: str, *overrides: str) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return ["sweep", "smoke", "--name", name, "--address", cluster.ray_address, "--storage", str(storage),
            "--tracking-uri", cluster.mlflow_uri, "--cache-dir", str(storage / "factors"), *sets]  # fmt: skip


def _children(cluster, summary: dict) -> list:
    client = MlflowClient(cluster.mlflow_uri)
    experiment = client.get_experiment_by_name("craft-smoke")
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")


def _check_complete(cluster, storage: Path, name: str, trials: int) -> dict:
    """Every requested trial has one result and one MLflow run, finished; returns the summary."""
    summary = json.loads((storage / name / "summary.json").read_text())
    ids = [t["trial_id"] for t in summary["trials"]]
    assert len(ids) == trials == len(set(ids)) and summary["counts"]["failed"] == 0, summary["counts"]
    children = _children(cluster, summary)
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in children) == sorted(ids)  # none lost, none twice
    assert all(r.info.status == "FINISHED" and r.data.tags[OUTCOME_TAG] in ("complete", "pruned") for r in children)
    parent = MlflowClient(cluster.mlflow_uri).get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["craft.decompositions"] in ("0", "1")
    return summary


def _check_outputs(cluster, storage: Path, summary: dict, alive: tuple[str, ...] = ("worker-1", "worker-2")) -> None:
    """Every trial's run/ (config, metrics, adapter) is in the storage, though each node wrote it
    in a scratch directory of its own; no live node keeps scratch files of the sweep."""
    for trial in summary["trials"]:
        run = Path(trial["path"]) / "run"
        assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file(), trial["trial_id"]
        assert list((run / "adapter").glob("*.safetensors")), trial["trial_id"]
        saved = json.loads((run / "metrics.json").read_text())
        assert saved["adapter_parameters"] == trial["adapter_parameters"]
    nodes = Path(cluster.state_dir) / "nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["worker-1", "worker-2"]
    assert [p for role in alive for p in nodes.glob(f"{role}/craft-search/{summary['name']}-*")] == []


def test_trials_run_on_both_nodes_and_the_factors_are_decomposed_once(cluster, tmp_path):
    name = "both-nodes"
    sets = ("search.num_samples=4", "search.scheduler=fifo", "method=craft", "search.points_to_evaluate=null")
    done = _cli(*_sweep_args(cluster, tmp_path, name, *sets), timeout=600)  # CRAFT only: every trial fetches
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = _check_complete(cluster, tmp_path, name, 4)
    _check_outputs(cluster, tmp_path, summary)
    workers = {cluster.nodes["worker-1"], cluster.nodes["worker-2"]}
    assert {t["node_id"] for t in summary["trials"]} == workers  # trials ran on both worker nodes, never the head
    parent = MlflowClient(cluster.mlflow_uri).get_run(summary["parent_run_id"])
    assert parent.data.tags["craft.decompositions"] == "1" and summary["cache"]["decompositions"] == 1
    assert set(summary["cache"]["fetches"]) == workers  # each node fetched the factors from the object store
    by_trial = {r.data.tags[TRIAL_ID_TAG]: r.data.tags["craft.node_id"] for r in _children(cluster, summary)}
    assert by_trial == {t["trial_id"]: t["node_id"] for t in summary["trials"]}  # node ids recorded per trial


def test_a_killed_driver_resumes(cluster, tmp_path, kill_driver_after):
    name = "driver-killed"
    args = _sweep_args(cluster, tmp_path, name, "search.scheduler=fifo")
    kill_driver_after([sys.executable, "-m", "search.cli", *args], finished=2, total=6)
    resumed = _cli(*args, "--resume", timeout=600)
    assert resumed.returncode == 0 and "trials: 6 of 6" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    _check_outputs(cluster, tmp_path, _check_complete(cluster, tmp_path, name, 6))


def test_losing_a_worker_node_mid_sweep_loses_no_trial(cluster, tmp_path):
    """Worker-2 is killed while a trial runs on it: that trial is retried from its checkpoint on
    worker-1 and the sweep ends with every trial's result and MLflow run, once each."""
    name = "node-lost"
    args = _sweep_args(cluster, tmp_path, name, "search.scheduler=fifo", "search.max_budget=160", "train.eval_every=16")
    driver = subprocess.Popen([sys.executable, "-m", "search.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    client = MlflowClient(cluster.mlflow_uri)
    victim = cluster.nodes["worker-2"]
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and driver.poll() is None:
        experiment = client.get_experiment_by_name("craft-smoke")
        running = client.search_runs(
            [experiment.experiment_id],
            f"tags.`craft.sweep` = '{name}' and tags.`craft.node_id` = '{victim}' and attributes.status = 'RUNNING'",
        ) if experiment else []  # fmt: skip
        if any(r.data.metrics.get("step", 0) >= 16 for r in running):  # it has a checkpoint to resume from
            stop_node(cluster, "worker-2")
            killed = True
            break
        time.sleep(0.5)
    output, _ = driver.communicate(timeout=900)
    assert killed, output[-3000:]
    assert driver.returncode == 0 and "trials: 6 of 6" in output, output[-3000:]
    summary = _check_complete(cluster, tmp_path, name, 6)
    _check_outputs(cluster, tmp_path, summary, alive=("worker-1",))  # worker-2's disk went with it
    retried = [r for r in _children(cluster, summary) if r.data.tags.get("craft.retries")]
    assert retried, "no trial was retried after the node loss"
    assert all(t["node_id"] == cluster.nodes["worker-1"] for t in summary["trials"] if t["trial_id"] in
               {r.data.tags[TRIAL_ID_TAG] for r in retried})  # fmt: skip
