"""``craft-search train``: a tiny model on a CSV task end to end, MLflow tracking, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import sentiment_rows, write_csv
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from craft import CraftModel
from search.cli import main


@pytest.fixture
def run_setup(tiny_model_dir, tmp_path):
    data = tmp_path / "reviews.csv"
    write_csv(data, sentiment_rows(240, seed=1))
    config = {
        "model": str(tiny_model_dir),
        "task": f"csv:{data}",
        "data": {"text_columns": ["text"], "label_column": "label"},
        "method": "craft",
        "craft": {"rank_layers": 2, "rank_out": 8, "rank_in": 8},
        "train": {"max_steps": 6, "eval_every": 3, "batch_size": 16, "lr": 0.01, "head_lr": 0.01, "max_length": 16},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "cli-test"},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config, tmp_path


def test_train_end_to_end_with_tracking(run_setup, tiny_model_dir, capsys):
    path, config, tmp = run_setup
    assert main(["train", str(path), "--save-merged"]) == 0
    out = capsys.readouterr().out
    assert "craft on csv:" in out and "6 steps" in out and "adapter parameters 2 x" not in out
    assert f"adapter parameters {2 * (4 + 64 + 64):,}" in out
    summary = json.loads((tmp / "run" / "metrics.json").read_text())
    assert summary["steps"] == 6 and summary["adapter_parameters"] == 264
    assert set(summary["test"]) >= {"test/accuracy", "test/score", "test/loss"}
    # MLflow: one run with the config as params, a metric point per evaluation, the adapter
    client = MlflowClient(config["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "craft" and run.data.params["craft.rank_out"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [3, 6]
    assert run.data.metrics["score"] == pytest.approx(summary["final"]["score"])
    assert run.data.metrics["test/accuracy"] == pytest.approx(summary["test"]["test/accuracy"])
    assert run.data.metrics["adapter_parameters"] == 264
    assert {f.path for f in client.list_artifacts(run.info.run_id, "adapter")} >= {"adapter/adapter_model.safetensors", "adapter/craft_factors.safetensors"}
    # the saved adapter restores onto a fresh base model; the merged model gives the same logits
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    restored = CraftModel.from_pretrained(base, tmp / "run" / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp / "run" / "merged").eval()
    ids = torch.tensor([[2, 5, 6, 11, 3]])
    with torch.no_grad():
        assert torch.allclose(restored(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_bf16_autocast_trains_on_cpu(run_setup):
    """train.bf16: true with train.device: cpu runs under CPU bf16 autocast: it trains, the adapter
    stays float32, and its losses differ from the float32 run's by bf16 rounding only."""
    path, config, tmp = run_setup
    losses = {}
    for bf16 in (False, True):
        run = {**config, "train": {**config["train"], "bf16": bf16, "device": "cpu"}, "output_dir": str(tmp / f"bf16-{bf16}")}
        run["tracking"] = {"enabled": False}
        path.write_text(yaml.safe_dump(run))
        assert main(["train", str(path)]) == 0
        summary = json.loads((tmp / f"bf16-{bf16}" / "metrics.json").read_text())
        losses[bf16] = summary["final"]["validation/loss"]
        saved = load_file(str(tmp / f"bf16-{bf16}" / "adapter" / "adapter_model.safetensors"))
        assert all(v.dtype == torch.float32 for k, v in saved.items() if ".j_" in k)
    assert losses[True] != losses[False]  # autocast did run
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_mlflow_run_and_ends_as_an_uninterrupted_one(run_setup):
    """``craft-search train`` killed (SIGKILL) after its first checkpoint and before its end, then run
    again with --resume: one MLflow run, FINISHED, one score per evaluation, and the adapter an
    uninterrupted run of the same config trains (the resume is exact)."""
    path, config, tmp = run_setup
    steps = 60
    config["train"] |= {"max_steps": steps, "eval_every": 3}
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp / "run"
    command = [sys.executable, "-c", "import sys; from search.cli import main; sys.exit(main(sys.argv[1:]))", "train", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run_dir / "checkpoint" / "trainer_state.json"  # written at the first evaluation
    deadline = time.monotonic() + 300
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {err.decode()[-500:]}"
    assert not (run_dir / "metrics.json").exists()  # it was interrupted for real
    client = MlflowClient(config["tracking"]["uri"])
    (killed,) = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert killed.info.status == "RUNNING"

    assert main(["train", str(path), "--resume"]) == 0
    (run,) = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
    assert sorted(history) == list(range(3, steps + 1, 3))  # every evaluation once, before and after the kill
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == steps

    config |= {"output_dir": str(tmp / "straight"), "tracking": {"enabled": False}}
    straight = tmp / "straight.yaml"
    straight.write_text(yaml.safe_dump(config))
    assert main(["train", str(straight)]) == 0
    resumed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp / "straight" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_flags_override_the_config(run_setup, capsys):
    path, _, tmp = run_setup
    args = ["train", str(path), "--method", "lora", "--no-tracking", "--set", "lora.r=2", "--output-dir", str(tmp / "lora")]
    assert main(args) == 0
    assert "lora on csv:" in capsys.readouterr().out
    assert json.loads((tmp / "lora" / "metrics.json").read_text())["method"] == "lora"
    assert not (tmp / "mlflow.db").exists()


@pytest.mark.slow
def test_train_logs_to_a_tracking_server(run_setup, mlflow_server):
    path, _, _ = run_setup
    assert main(["train", str(path), "--tracking-uri", mlflow_server, "--max-steps", "3"]) == 0
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert run.data.metrics["adapter_parameters"] == 264
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"adapter", "config.yaml", "metrics.json"}


def _bad(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, words",
    [
        ("unknown_task", "task"),
        ("unknown_method", "unknown method 'foo'"),
        ("missing_column", "nope"),
        ("empty_split", "empty"),
        ("label_outside", "'maybe'"),
        ("unknown_key", "unknown key(s) ['colour']"),
        ("malformed_yaml", "not valid YAML"),
        ("unreachable_server", "unreachable"),
        ("bad_adapter_dtype", "adapter_dtype must be one of auto, model"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(case, words, run_setup, capsys):
    path, config, tmp = run_setup
    args = ["train", str(path)]
    if case == "unknown_task":
        args += ["--task", "nope"]
    elif case == "unknown_method":
        args += ["--method", "foo"]
    elif case == "missing_column":
        args += ["--set", "data.label_column=nope"]
    elif case == "empty_split":
        write_csv(tmp / "empty.csv", [])
        args += ["--task", f"csv:{tmp / 'empty.csv'}"]
    elif case == "label_outside":
        (tmp / "split").mkdir()
        write_csv(tmp / "split" / "train.csv", sentiment_rows(40, seed=2))
        write_csv(tmp / "split" / "validation.csv", [("good movie", "maybe")])
        args += ["--task", f"csv:{tmp / 'split'}"]
    elif case == "unknown_key":
        args += ["--set", "colour=blue"]
    elif case == "malformed_yaml":
        args = ["train", str(_bad(tmp, "bad.yaml", "model: [unclosed\n"))]
    elif case == "unreachable_server":
        args += ["--tracking-uri", "http://127.0.0.1:9"]
    elif case == "bad_adapter_dtype":
        args += ["--set", "craft.adapter_dtype=fp8"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("craft-search: error:"), err
    assert words in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp / "run").exists(), "bad input wrote an output directory"
