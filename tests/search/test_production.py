"""From a sweep to production: Pareto plots logged to the sweep's run, export, then training the
exported config unchanged, in one process and data-parallel on Ray Train (real Ray, real MLflow
server on 127.0.0.1).

Tolerances, stated:
- export then train at the trial's budget and seed reproduces the trial's final validation
  score within 1/128 (one validation example of 256 either way: the trial ran on 1 torch thread,
  the test process may use 2, and the summation order of a matmul may move a borderline logit);
- 2 workers against 1 on a dropout-free tiny BERT: adapter and head weights within 1e-4 and the
  same validation score within 1/128 (only float summation order differs);
- the same on the packaged MiniLM with LoRA r=4, its dropout set to 0 in its config (measured:
  5e-6 after 30 steps); with its dropout (0.1) on, the workers draw other masks than one process
  (each for its own slice), and the weights differ by more than 1e-3 after 6 steps.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from craft.harness.hub import demo_model_path, load_tokenizer, tiny_config
from craft.harness.job import run_job
from craft.harness.runconfig import RunConfig, load_run_config
from search.cli import main
from search.names import TRIAL_ID_TAG
from search.production import train_distributed
from search.spec import load_sweep_spec
from search.sweep import run_sweep
from spaces import preset_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:Fixed parameter:UserWarning"),
]


@pytest.fixture(scope="module")
def ray_address():
    """This module's Ray instance: 2 CPUs, no dashboard."""
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep(ray_address, mlflow_server, tmp_path_factory):
    """The smoke preset, 4 trials run to their budget (FIFO), tracked on the MLflow server."""
    spec = load_sweep_spec(preset_path("smoke.yaml"), ["search.num_samples=4", "search.scheduler=fifo"], name="to-production")
    storage = tmp_path_factory.mktemp("sweeps")
    cache = tmp_path_factory.mktemp("factors")
    return run_sweep(spec, tracking_uri=mlflow_server, storage=str(storage), cache_dir=cache, progress=False)


def test_the_sweep_logs_its_front_and_the_cli_redraws_it(sweep, mlflow_server, capsys):
    client = MlflowClient(mlflow_server)
    assert sweep.pareto["front"] and sweep.best(1)[0].trial_id in sweep.pareto["front"]
    assert {a.path for a in client.list_artifacts(sweep.parent_run_id, "pareto")} == {"pareto/pareto.png", "pareto/pareto.html"}
    assert main(["pareto", sweep.path]) == 0
    out = capsys.readouterr().out
    assert "Pareto front on score, params" in out and "hypervolume" in out
    best = sweep.best(1)[0]
    assert best.trial_id in out  # the best-scoring trial is always on the front
    assert os.path.isfile(f"{sweep.path}/pareto/pareto.png") and os.path.isfile(f"{sweep.path}/pareto/pareto.html")
    artifacts = {a.path for a in client.list_artifacts(sweep.parent_run_id, "pareto")}
    assert artifacts == {"pareto/pareto.png", "pareto/pareto.html"}
    parent = client.get_run(sweep.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["hypervolume"] > 0


def test_export_then_train_reproduces_the_trial(sweep, mlflow_server, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", sweep.path, "--pick", "best", "--out", "exported"]) == 0
    [path] = glob.glob("exported/*.yaml")
    source = sweep.best(1)[0]
    config = yaml.safe_load(open(path))
    assert config["provenance"]["trial_id"] == source.trial_id and config["train"]["max_steps"] == 32
    assert config["tracking"]["uri"] == mlflow_server  # the production run sits beside its sweep
    capsys.readouterr()
    assert main(["train", path]) == 0
    out = capsys.readouterr().out
    metrics = yaml.safe_load(open(f"runs/production/to-production-{source.trial_id}/metrics.json"))
    assert abs(metrics["final"]["score"] - source.score) <= 1 / 128, (metrics["final"]["score"], source.score)
    assert os.path.isdir(metrics["adapter_dir"]) and os.path.isfile(f"{metrics['merged_dir']}/config.json")
    client = MlflowClient(mlflow_server)
    run_id = out.split("MLflow: run ")[1].split()[0]
    run = client.get_run(run_id)
    trial_run = client.get_run(run.data.tags["craft.source.run_id"])  # the link to the source trial's MLflow run
    assert trial_run.data.tags[TRIAL_ID_TAG] == source.trial_id
    assert source.trial_id in run.data.tags["mlflow.note.content"]


def _dropout_free_model(path):
    import torch
    from transformers import BertForSequenceClassification

    config = tiny_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.num_labels = 3
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    load_tokenizer("tiny-random").save_pretrained(path)


def test_two_workers_train_what_one_does(ray_address, mlflow_server, tmp_path, capsys):
    _dropout_free_model(tmp_path / "model")
    run = {
        "model": str(tmp_path / "model"),
        "task": "tweets",
        "method": "craft",
        "data": {"max_train_samples": 256, "max_eval_samples": 128},
        "craft": {"rank_layers": 2, "rank_out": 8, "rank_in": 8},
        "train": {"lr": 0.01, "head_lr": 0.01, "batch_size": 16, "max_length": 32, "eval_every": 8, "max_steps": 16, "device": "cpu"},
        "tracking": {"uri": mlflow_server, "experiment": "craft-production"},
        "output_dir": str(tmp_path / "one"),
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    one = run_job(load_run_config(tmp_path / "run.yaml", ["tracking.enabled=false"]), progress=False)
    argv = ["train", str(tmp_path / "run.yaml"), "--workers", "2", "--output-dir", str(tmp_path / "two"), "--save-merged"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "data-parallel: 2 workers (gloo)" in out
    two = yaml.safe_load(open(tmp_path / "two" / "metrics.json"))
    assert abs(two["final"]["score"] - one.train.final.metrics["score"]) <= 1 / 128
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert os.path.isfile(tmp_path / "two" / "merged" / "config.json")
    run_id = out.split("MLflow: run ")[1].split()[0]
    tracked = MlflowClient(mlflow_server).get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.data.tags["craft.workers"] == "2"
    assert tracked.data.metrics["adapter_parameters"] == one.adapter_parameters and "test/accuracy" in tracked.data.metrics


def _demo_model(path, dropout: bool) -> str:
    """The packaged MiniLM as shipped (dropout 0.1), or beside it a config with every dropout at 0."""
    if dropout:
        return "demo"
    source = demo_model_path()
    path.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (path / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.1
    config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = 0.0
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _demo_lora(model: str, out) -> RunConfig:
    return RunConfig.from_dict({
        "model": model, "task": "tweets", "method": "lora", "lora": {"r": 4},
        "data": {"max_train_samples": 96, "max_eval_samples": 64},
        "train": {"lr": 5e-3, "head_lr": 1e-2, "batch_size": 16, "max_length": 32, "max_steps": 6, "eval_every": 6, "device": "cpu"},
        "tracking": {"enabled": False}, "output_dir": str(out),
    })  # fmt: skip


def test_on_the_demo_model_two_workers_equal_one_process_but_for_dropout(ray_address, tmp_path):
    differences, scores = {}, {}
    for dropout in (False, True):
        model = _demo_model(tmp_path / "model", dropout)
        one = run_job(_demo_lora(model, tmp_path / f"one-{dropout}"), progress=False)
        two = train_distributed(_demo_lora(model, tmp_path / f"two-{dropout}"), 2)
        a = load_file(one.adapter_dir / "adapter_model.safetensors")
        b = load_file(tmp_path / f"two-{dropout}" / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and any("lora_B" in k for k in a) and any("classifier" in k for k in a)
        differences[dropout] = max(float((a[k] - b[k]).abs().max()) for k in a)
        scores[dropout] = one.train.final.metrics["score"], two.summary["final"]["score"]
    # No dropout: the same data order, initialisation and averaged gradient; float summation order alone differs.
    assert differences[False] < 1e-4 and abs(scores[False][0] - scores[False][1]) <= 1 / 64, (differences, scores)
    # Dropout: every worker draws masks for its own slice, one process for the whole batch.
    assert differences[True] > 1e-3, (differences, scores)


def test_too_many_workers_is_one_line(ray_address, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({"model": "tiny-random", "method": "head", "data": {"max_train_samples": 64, "max_eval_samples": 32},
                        "train": {"max_steps": 2, "device": "cpu"}, "tracking": {"enabled": False}, "output_dir": str(tmp_path / "o")})
    )  # fmt: skip
    assert main(["train", str(tmp_path / "run.yaml"), "--workers", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--workers 3 with 1 CPU each needs 3 CPUs; the Ray cluster has 2" in err
    assert main(["train", str(tmp_path / "run.yaml"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
