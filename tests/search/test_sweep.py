"""Sweeps end to end on real Ray, real Optuna and a real MLflow server on 127.0.0.1.

One Ray instance serves the module; every sweep runs the smoke preset (a tiny random BERT on
tweets) or a variant of it. A driver killed mid-sweep is a real CLI process joined to this
module's Ray instance with --address, killed with SIGKILL, then resumed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from search.names import ADAPTER_PARAMETERS, FINAL_SCORE, OUTCOME_TAG, PRUNED_TAG, SCORE, TRIAL_ID_TAG
from search.searcher import STUDY_NAME
from search.spec import load_sweep_spec
from search.sweep import STUDY_FILE, SUMMARY_FILE, run_sweep
from spaces import preset_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:Fixed parameter:UserWarning"),
]


@pytest.fixture(scope="module")
def ray_address():
    """This module's Ray instance: 2 CPUs, no dashboard; its GCS address for other drivers."""
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a ray start cluster
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("factor-cache")


def _smoke(name: str, overrides: list[str] | None = None):
    return load_sweep_spec(preset_path("smoke.yaml"), overrides or [], name=name)


@pytest.fixture(scope="module")
def smoke(ray_address, mlflow_server, cache_dir, tmp_path_factory):
    """The smoke preset as shipped (6 trials, 2 at a time, ASHA), tracked on the MLflow server."""
    storage = tmp_path_factory.mktemp("sweeps")
    return run_sweep(_smoke("smoke"), tracking_uri=mlflow_server, storage=str(storage), cache_dir=cache_dir, progress=False)


def test_smoke_sweep_runs_every_trial(smoke):
    assert len(smoke.trials) == 6 and smoke.requested == 6
    assert {t.outcome for t in smoke.trials} <= {"complete", "pruned"} and smoke.count("complete") >= 1
    for t in smoke.trials:
        assert t.adapter_parameters > 0 and t.score is not None and 0 <= t.score <= 1
        assert t.metrics["threads"] == 1  # torch.set_num_threads = the trial's CPUs (resources.cpu: 1)
        if t.outcome == "complete":
            assert t.step == 32 and t.metrics[FINAL_SCORE] == t.score and "test/accuracy" in t.metrics
        else:
            assert t.step < 32 and FINAL_SCORE not in t.metrics
    with open(f"{smoke.path}/{SUMMARY_FILE}") as handle:
        summary = json.load(handle)
    assert summary["counts"] == {
        "complete": smoke.count("complete"),
        "pruned": smoke.count("pruned"),
        "failed": 0,
        "unfinished": 0,
    }


def test_every_trial_leaves_its_config_adapter_and_metrics_in_the_storage(smoke):
    """Complete and pruned alike (actors are reused: the run/ of every trial, not only the first
    of each actor), each with the adapter and metrics of its last evaluation."""
    from peft import PeftConfig

    from craft.config import CraftConfig

    for t in smoke.trials:
        run = Path(t.path) / "run"
        config = yaml.safe_load((run / "config.yaml").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        assert config["method"] == t.config["method"] and metrics["adapter_parameters"] == t.adapter_parameters
        if t.outcome == "complete":
            assert metrics["steps"] == 32 and metrics["final"]["score"] == t.score
        else:  # its last evaluation, where the scheduler stopped it
            assert metrics["step"] == t.step and metrics["score"] == t.score
        assert list((run / "adapter").glob("*.safetensors"))
        # One training checkpoint per trial, the one its pointer names: the last evaluation's before
        # the end (32 steps, evaluated every 8), or where the scheduler stopped it.
        pointer = json.loads((Path(t.path) / "checkpoint.json").read_text())
        assert [p.name for p in Path(t.path).glob("checkpoint_*")] == [pointer["dir"]]
        assert pointer["step"] == (24 if t.outcome == "complete" else t.step)
        if t.config["method"] == "craft":
            saved = CraftConfig.load(run / "adapter")
            assert (saved.rank_layers, saved.rank_out, saved.rank_in) == tuple(t.config[f"craft.rank_{a}"] for a in ("layers", "out", "in"))
        else:
            assert PeftConfig.from_pretrained(str(run / "adapter")).r == t.config["lora.r"]
    assert len({t.path for t in smoke.trials}) == 6


def test_early_stopped_trials_reach_optuna_as_pruned(smoke):
    assert smoke.count("pruned") >= 1
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{smoke.path}/{STUDY_FILE}")
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") == smoke.count("pruned") and states.count("COMPLETE") == smoke.count("complete")
    assert "RUNNING" not in states
    told = sorted(tuple(t.values) for t in study.trials if t.state.name == "COMPLETE")
    ours = sorted((t.score, float(t.adapter_parameters)) for t in smoke.trials if t.outcome == "complete")
    assert told == ours  # the final score and the size, never a half-trained score


def test_trials_run_two_at_a_time(smoke):
    spans = sorted((t.metrics["started_at"], t.metrics["timestamp"]) for t in smoke.trials)
    overlaps = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert overlaps >= 1


def test_mlflow_holds_a_parent_and_a_child_per_trial(smoke, mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("craft-smoke")
    parent = client.get_run(smoke.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["craft.sweep"] == "smoke"
    tags = parent.data.tags
    assert tags["craft.decompositions"] == "1" and tags["craft.trials"] == "6"
    assert tags["craft.pruned"] == str(smoke.count("pruned")) and tags["craft.best_trial"] == smoke.best(1)[0].trial_id
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{smoke.parent_run_id}'")
    by_trial = {r.data.tags[TRIAL_ID_TAG]: r for r in children}
    assert len(children) == 6 and set(by_trial) == {t.trial_id for t in smoke.trials}
    for t in smoke.trials:
        run = by_trial[t.trial_id]
        assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == t.outcome
        assert run.data.tags[PRUNED_TAG] == str(t.outcome == "pruned").lower()
        assert run.data.metrics[ADAPTER_PARAMETERS] == t.adapter_parameters
        assert run.data.params["method"] == t.config["method"] and float(run.data.params["train.lr"]) == t.config["train.lr"]
        history = client.get_metric_history(run.info.run_id, SCORE)
        assert len(history) == t.step // 8 and max(m.step for m in history) == t.step  # one point per evaluation


def test_a_second_sweep_on_the_same_model_decomposes_nothing(smoke, mlflow_server, cache_dir, tmp_path):
    again = run_sweep(
        _smoke("smoke-again", ["search.num_samples=2", "search.max_budget=8", "method=craft"]),
        tracking_uri=mlflow_server, storage=str(tmp_path), cache_dir=cache_dir, progress=False,
    )  # fmt: skip
    assert again.cache["decompositions"] == 0 and again.cache["disk_loads"] == 1
    assert sum(again.cache["fetches"].values()) == 2  # each CRAFT trial read the factors from the object store
    assert MlflowClient(mlflow_server).get_run(again.parent_run_id).data.tags["craft.decompositions"] == "0"


def test_a_diverging_trial_fails_alone(ray_address, cache_dir, tmp_path):
    nan = {"method": "craft", "train.lr": 1.0e30, "train.head_lr": 1.0e-3, "craft.rank_layers": 2}
    spec = _smoke("nan", ["search.num_samples=3", "search.scheduler=fifo", "search.max_budget=8", "search.max_failures=1"])
    spec.search.points_to_evaluate = [nan]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the embedded store
    result = run_sweep(spec, tracking_uri=uri, storage=str(tmp_path / "runs"), cache_dir=cache_dir, progress=False)
    failed = [t for t in result.trials if t.outcome == "failed"]
    assert len(result.trials) == 3 and len(failed) == 1 and result.count("complete") == 2
    assert failed[0].config["train.lr"] == 1.0e30 and "FloatingPointError" in failed[0].error
    # max_failures=1: Ray retried it once, and the retry failed at once, without training (its error says so)
    assert "not trained again on retry" in failed[0].error, failed[0].error
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("craft-smoke").experiment_id], f"tags.`{TRIAL_ID_TAG}` = '{failed[0].trial_id}'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FAILED" and runs[0].data.tags[OUTCOME_TAG] == "failed"
    assert runs[0].data.tags["craft.retries"] == "1"  # one retry, recorded when Ray recovered the trial
    assert "not trained again on retry" in runs[0].data.tags["craft.error"]
    assert client.get_run(result.parent_run_id).data.tags["craft.failed"] == "1"


def test_a_killed_driver_resumes_without_lost_or_duplicated_trials(
    ray_address, mlflow_server, cache_dir, tmp_path, kill_driver_after, check_study
):
    command = [
        sys.executable, "-m", "search.cli", "sweep", "smoke", "--name", "killed", "--address", ray_address,
        "--storage", str(tmp_path), "--tracking-uri", mlflow_server, "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    kill_driver_after(command, finished=2, total=6)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "best trials of killed" in resumed.stdout and "trials: 6 of 6" in resumed.stdout
    summary = json.loads((tmp_path / "killed" / SUMMARY_FILE).read_text())
    ids = [t["trial_id"] for t in summary["trials"]]
    assert len(ids) == 6 == len(set(ids)) and summary["counts"]["failed"] == 0
    client = MlflowClient(mlflow_server)
    parent_id = summary["parent_run_id"]
    children = client.search_runs(
        [client.get_experiment_by_name("craft-smoke").experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in children) == sorted(ids)  # one run per trial, none twice
    assert all(r.info.status == "FINISHED" for r in children) and client.get_run(parent_id).info.status == "FINISHED"
    check_study(f"sqlite:///{tmp_path / 'killed' / STUDY_FILE}", summary)  # every trial told once, in its true state


def test_cli_smoke_test_runs_a_few_short_trials(ray_address, cache_dir, tmp_path, capsys):
    from search.cli import main

    code = main(
        ["sweep", "smoke", "--smoke-test", "--num-samples", "3", "--storage", str(tmp_path),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--cache-dir", str(cache_dir)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "sweep smoke-smoke: 3 trials of 12 steps" in out and "trials: 3 of 3" in out
    summary = json.loads((tmp_path / "smoke-smoke" / SUMMARY_FILE).read_text())
    assert all(t["step"] <= 12 for t in summary["trials"]) and summary["counts"]["complete"] >= 1


def test_ctrl_c_stops_the_sweep_cleanly_and_resume_finishes_it(ray_address, cache_dir, tmp_path, check_study):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "search.cli", "sweep", "smoke", "--name", "interrupted", "--address", ray_address,
        "--storage", str(tmp_path), "--tracking-uri", uri, "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in driver.stdout:
        lines.append(line)
        if line.startswith("[1/6]"):
            driver.send_signal(signal.SIGINT)  # as Ctrl-C does
    assert driver.wait(timeout=120) in (0, 1), "".join(lines)
    output = "".join(lines)
    assert "interrupted: run the same command with --resume" in output and "Traceback" not in output
    client = MlflowClient(uri)
    parent_id = json.loads((tmp_path / "interrupted" / "sweep.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    study_url = f"sqlite:///{tmp_path / 'interrupted' / STUDY_FILE}"
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_url)  # in the database since its first trial
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) >= 1
    # Resumed with a changed spec: the sweep says so and goes on with the spec it started with.
    resumed = subprocess.run(command + ["--resume", "--set", "search.num_samples=8"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "trials: 6 of 6" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "the spec differs from the one sweep interrupted started with (search.num_samples)" in resumed.stdout
    assert client.get_run(parent_id).info.status == "FINISHED"
    check_study(study_url, json.loads((tmp_path / "interrupted" / SUMMARY_FILE).read_text()))


def _rung_scores(result, step: int) -> list[float]:
    """Each trial's score in its report at ``step`` (Ray's result.json in the trial's directory)."""
    scores = []
    for t in result.trials:
        with open(f"{t.path}/result.json") as handle:
            rows = [json.loads(line) for line in handle]
        scores.append(next(r[SCORE] for r in rows if r["step"] == step))
    return scores


def _front_spec(name: str, scheduler: str):
    """Three trials one at a time, in this order, stopped or not at one rung (step 8 of 16)."""
    lora = {"method": "lora", "lora.r": 8}
    spec = _smoke(name, ["search.num_samples=3", "search.max_concurrent_trials=1", "search.max_budget=16",
                         "search.grace_period=8", "search.reduction_factor=2", f"search.scheduler={scheduler}"])  # fmt: skip
    spec.search.points_to_evaluate = [
        {**lora, "train.lr": 3.0e-3, "train.head_lr": 3.0e-2},  # big
        {**lora, "train.lr": 1.0e-2, "train.head_lr": 1.0e-2},  # as big, and worse at the rung
        {"method": "craft", "craft.rank_layers": 1, "craft.rank_out": 1, "craft.rank_in": 1,
         "craft.init_scale": 0.0, "train.lr": 1.0e-2, "train.head_lr": 1.0},  # 6 parameters, a head too fast for step 8
    ]  # fmt: skip
    return spec


def test_moasha_lets_on_a_small_trial_that_asha_stops(ray_address, cache_dir, tmp_path):
    runs = {}
    for scheduler in ("asha", "moasha"):
        runs[scheduler] = run_sweep(_front_spec(f"front-{scheduler}", scheduler), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                    storage=str(tmp_path / "runs"), cache_dir=cache_dir, progress=False)  # fmt: skip
    for result in runs.values():  # the same three trials in the same order: the same rung scores (CPU training is deterministic)
        assert [t.config["method"] for t in result.trials] == ["lora", "lora", "craft"]
        assert [t.adapter_parameters for t in result.trials] == [8 * 8 * 64, 8 * 8 * 64, 2 * 3]  # tiny-random: 8 modules 32x32
    rung = _rung_scores(runs["asha"], 8)
    assert rung == _rung_scores(runs["moasha"], 8)
    big, bigger_worse, small = rung
    # ASHA (reduction factor 2) stops the third trial: its score is below the median of the two before it.
    # MO-ASHA keeps 2 of 3: the first front is {big, small} (the second LoRA is as big and worse than the first).
    assert bigger_worse < big and small < (big + bigger_worse) / 2, rung
    outcomes = {k: [t.outcome for t in r.trials] for k, r in runs.items()}
    assert outcomes["asha"][2] == "pruned" and outcomes["moasha"][2] == "complete", outcomes
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{runs['moasha'].path}/{STUDY_FILE}")
    assert study.trials[2].state.name == "COMPLETE" and study.trials[2].values[1] == 6.0


def test_a_warm_start_seeds_the_study_with_an_earlier_sweeps_complete_trials(smoke, mlflow_server, cache_dir, tmp_path):
    spec = _smoke("warm", ["search.num_samples=2", f"search.warm_start={smoke.path}"])
    result = run_sweep(spec, tracking_uri=mlflow_server, storage=str(tmp_path), cache_dir=cache_dir, progress=False)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{result.path}/{STUDY_FILE}")
    seeded = [t for t in study.trials if t.user_attrs.get("warm_start") == "smoke"]
    complete = {t.trial_id: t for t in smoke.trials if t.outcome == "complete"}
    assert sorted(t.user_attrs["source_trial"] for t in seeded) == sorted(complete)
    for t in seeded:
        source = complete[t.user_attrs["source_trial"]]
        assert t.state.name == "COMPLETE" and t.values == [source.score, float(source.adapter_parameters)]
        assert t.params == {k: v for k, v in source.config.items()}  # the same space: every sampled value
    assert len(study.trials) == len(seeded) + 2 and len(result.trials) == 2  # and the sweep's own two trials


def test_a_compute_budget_ends_the_sweep_finished(ray_address, cache_dir, tmp_path):
    spec = _smoke("budget", ["search.num_samples=6", "search.scheduler=fifo", "search.max_budget=8", "search.max_total_steps=16"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(spec, tracking_uri=uri, storage=str(tmp_path / "runs"), cache_dir=cache_dir, progress=False)
    steps = sum(t.step or 0 for t in result.trials)
    # two trials of 8 steps at once spend the 16; a trial started meanwhile is stopped (pruned)
    assert result.count("complete") >= 2 and len(result.trials) < 6 and 16 <= steps <= 16 + 8
    assert {t.outcome for t in result.trials} <= {"complete", "pruned"}
    assert MlflowClient(uri).get_run(result.parent_run_id).info.status == "FINISHED"
