"""A sweep through an MLflow outage: a real ``mlflow server`` stopped while the sweep runs.

The server comes back: the sweep finishes with every trial's run and every evaluation, nothing
twice. The server stays down: the sweep ends in one line, keeps the writes it could not send in
its storage, and a resume once the server is back writes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from search.names import OUTCOME_TAG, SCORE, TRIAL_ID_TAG
from search.spec import load_sweep_spec
from search.sweep import SUMMARY_FILE, run_sweep
from search.tracking.queue import PENDING_FILE
from spaces import preset_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:Fixed parameter:UserWarning"),
]

EVAL_EVERY = 8  # the smoke preset's train.eval_every


@pytest.fixture(scope="module")
def ray_address():
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def _first_evaluation(storage: Path, name: str, timeout: float = 300) -> None:
    """Wait until a trial of sweep ``name`` has copied an evaluation to the storage (no MLflow involved)."""
    deadline = time.monotonic() + timeout
    while not list((storage / name).glob("*/run/metrics.json")):
        assert time.monotonic() < deadline, "no trial evaluated"
        time.sleep(0.2)


def _check_runs(uri: str, summary: dict) -> None:
    """Every trial has exactly one FINISHED run with its outcome and one score per evaluation
    (steps 8, 16, ... up to the step it reached, from the spec), under a FINISHED parent."""
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial: dict[str, list] = {}
    for run in children:
        by_trial.setdefault(run.data.tags[TRIAL_ID_TAG], []).append(run)
    assert sorted(by_trial) == sorted(t["trial_id"] for t in summary["trials"])
    for trial in summary["trials"]:
        (run,) = by_trial[trial["trial_id"]]  # one run, never two
        assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == trial["outcome"]
        history = client.get_metric_history(run.info.run_id, SCORE)
        assert sorted(m.step for m in history) == list(range(EVAL_EVERY, trial["step"] + 1, EVAL_EVERY))
        assert run.data.params["method"] == trial["config"]["method"]


def test_a_sweep_goes_on_through_an_outage_and_writes_everything_once(ray_address, restartable_mlflow, tmp_path_factory):
    server = restartable_mlflow
    storage = tmp_path_factory.mktemp("sweeps")
    cache = tmp_path_factory.mktemp("factors")
    outage: dict[str, float] = {}

    def stop_then_start() -> None:
        _first_evaluation(storage, "outage")
        server.stop()
        outage["down"] = time.monotonic()
        time.sleep(8)  # trials report, end and start while nobody answers
        server.start()
        outage["up"] = time.monotonic()

    spec = load_sweep_spec(preset_path("smoke.yaml"), ["search.num_samples=4", "search.scheduler=fifo", "search.max_budget=16"], name="outage")
    switch = threading.Thread(target=stop_then_start)
    switch.start()
    try:
        result = run_sweep(spec, tracking_uri=server.uri, storage=str(storage), cache_dir=cache, progress=False)
        ended = time.monotonic()
        switch.join()
        assert outage["down"] < outage["up"] < ended  # the server was away during the sweep, and back before its end
        assert len(result.trials) == 4 and result.count("complete") == 4
        assert result.tracking["retries"] >= 1 and result.tracking["longest_outage_s"] >= 5
        assert result.tracking["dropped"] == 0
        _check_runs(server.uri, result.to_dict())
    finally:
        switch.join()


def test_a_server_that_stays_down_ends_the_sweep_in_one_line_and_resume_writes_the_rest(
    ray_address, restartable_mlflow, tmp_path_factory
):
    server = restartable_mlflow
    storage = tmp_path_factory.mktemp("sweeps")
    cache = tmp_path_factory.mktemp("factors")
    command = [
        sys.executable, "-m", "search.cli", "sweep", "smoke", "--name", "down", "--address", ray_address,
        "--storage", str(storage), "--tracking-uri", server.uri, "--cache-dir", str(cache),
        "--set", "search.num_samples=2", "--set", "search.max_budget=16", "--set", "search.tracking_wait_s=4",
    ]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _first_evaluation(storage, "down")
        server.stop()  # and it stays down until the sweep has given up
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 3, err[-3000:]
        assert "Traceback" not in out + err
        line = err.strip().splitlines()[-1]
        assert line.startswith("craft-search: MLflow at " + server.uri + " has not answered for 4 s")
        assert "craft-search sweep down --resume" in line
        pending = json.loads((storage / "down" / PENDING_FILE).read_text())
        assert pending and {w["op"] for w in pending} <= {"open", "log", "end"}
        summary = json.loads((storage / "down" / SUMMARY_FILE).read_text())
        assert len(summary["trials"]) == 2  # the trials are done and kept; only MLflow waits

        server.start()
        resumed = subprocess.run(
            [*command[:4], "down", "--resume", "--storage", str(storage), "--address", ray_address, "--cache-dir", str(cache)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert not (storage / "down" / PENDING_FILE).exists()
        _check_runs(server.uri, json.loads((storage / "down" / SUMMARY_FILE).read_text()))
    finally:
        if driver.poll() is None:
            driver.kill()
