"""A sweep on object storage, for real: the S3 API of a ``moto`` server on 127.0.0.1, reached
through pyarrow's S3 file system as Ray Tune and the sweep reach any bucket.

The driver is a real CLI process killed with SIGKILL mid-sweep; the sweep is resumed from a fresh
working directory that holds nothing of the first run, and then read (``pareto``), exported and
trained from the bucket alone. Every trial's config, adapter and metrics are in the bucket, and
the Optuna study there holds every trial in its true state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from search.names import TRIAL_ID_TAG
from search.storage import SweepStore

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

STORAGE = "s3://craft-test/sweeps"  # the s3 fixture's bucket


@pytest.fixture(scope="module")
def ray_address(s3):
    """This module's Ray instance, started once the S3 settings are in the environment (its
    workers inherit them)."""
    assert STORAGE.startswith(f"s3://{s3}/")
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _base_model(config: dict):
    from craft.harness.hub import load_model
    from craft.harness.runconfig import RunConfig
    from craft.harness.tasks import load_task

    run = RunConfig.from_dict(config)
    task = load_task(run.task, run.data, seed=run.train.seed)
    return load_model(run.model, num_labels=task.spec.num_labels, label_names=task.spec.label_names)


def test_a_sweep_on_s3_resumes_from_a_fresh_directory_and_serves_pareto_export_and_train(
    ray_address, mlflow_server, tmp_path, kill_driver_after, check_study, monkeypatch
):
    name = "on-s3"
    first, second, third = (tmp_path / d for d in ("first", "second", "third"))
    for d in (first, second, third):
        d.mkdir()
    command = [sys.executable, "-m", "search.cli", "sweep", "smoke", "--name", name, "--address", ray_address,
               "--storage", STORAGE, "--tracking-uri", mlflow_server, "--cache-dir", str(first / "factors"),
               "--set", "search.scheduler=fifo", "--set", "search.num_samples=4"]  # fmt: skip
    monkeypatch.chdir(first)
    kill_driver_after(command, finished=2, total=4)
    store = SweepStore(STORAGE, name)
    assert store.exists("sweep.json") and not store.exists("summary.json")  # started, never ended

    # A fresh machine: nothing of the first run but the bucket (and MLflow). No spec file either:
    # the sweep is resumed by its name, with the spec it started with.
    monkeypatch.chdir(second)
    resumed = _cli(["sweep", name, "--resume", "--storage", STORAGE, "--address", ray_address,
                    "--cache-dir", str(second / "factors")], second)  # fmt: skip
    assert "trials: 4 of 4" in resumed.stdout, resumed.stdout[-2000:]
    summary = store.read_json("summary.json")
    ids = [t["trial_id"] for t in summary["trials"]]
    assert len(ids) == 4 == len(set(ids)) and summary["counts"]["failed"] == 0
    client = MlflowClient(mlflow_server)
    children = client.search_runs(
        [client.get_experiment_by_name("craft-smoke").experiment_id], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'"
    )
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in children) == sorted(ids)  # one run per trial, none twice

    # The study in the bucket: every trial in its true state, none RUNNING.
    study_copy = store.download("optuna-study.db", third / "study.db")
    check_study(f"sqlite:///{study_copy}", summary)

    # Every trial's run/ is in the bucket: config, metrics, and an adapter that loads.
    from craft.model import FACTORS_NAME, CraftModel

    loaded = set()
    for trial in summary["trials"]:
        assert trial["path"].startswith(f"{STORAGE}/{name}/run_trial_{trial['trial_id']}_")
        trial_dir = trial["path"].rpartition("/")[2]
        assert store.exists(f"{trial_dir}/run/config.yaml") and store.exists(f"{trial_dir}/run/metrics.json")
        local = store.download(f"{trial_dir}/run", third / trial_dir)
        config = yaml.safe_load((local / "config.yaml").read_text())
        metrics = json.loads((local / "metrics.json").read_text())
        assert config["method"] == trial["config"]["method"] and metrics["adapter_parameters"] == trial["adapter_parameters"]
        if config["method"] in loaded:
            continue
        base = _base_model(config)
        if config["method"] == "craft":
            assert not (local / "adapter" / FACTORS_NAME).exists()  # a trial's adapter leaves the factors to the cache
            model = CraftModel.from_pretrained(base, local / "adapter")
            j = sum(p.numel() for n, p in model.named_parameters() if n.rpartition(".")[2].startswith("j_"))
            assert j == metrics["adapter_parameters"]
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(local / "adapter"))
            lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            assert lora == metrics["adapter_parameters"]
        loaded.add(config["method"])
    assert loaded == {"craft", "lora"}  # both kinds of adapter loaded back

    # pareto, export and train from the bucket alone, in a third empty directory.
    monkeypatch.chdir(third)
    front = _cli(["pareto", name, "--storage", STORAGE], third)
    assert "front" in front.stdout.lower()
    exported = _cli(["export", name, "--storage", STORAGE, "--pick", "best", "--out", str(third / "configs"),
                     "--max-steps", "8"], third)  # fmt: skip
    config_file = next((third / "configs").glob("*.yaml"))
    assert config_file.name in exported.stdout
    _cli(["train", str(config_file)], third)
    trained = json.loads(next((third / "runs" / "production").glob("*/metrics.json")).read_text())
    best = max((t for t in summary["trials"] if t["outcome"] == "complete"), key=lambda t: (t["score"], -t["adapter_parameters"]))
    assert trained["steps"] == 8 and trained["adapter_parameters"] == best["adapter_parameters"]
    assert list((third / "runs" / "production").glob("*/adapter/*.safetensors"))
