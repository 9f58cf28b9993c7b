"""The training loop: it learns, it resumes exactly, it fails loudly, it writes no pickle."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch

from craft.config import CraftConfig
from craft.harness.checkpoint import CHECKPOINT_NAME, latest_checkpoint
from craft.harness.data import epoch_order, make_loader, tokenize_task
from craft.harness.methods import apply_method
from craft.harness.runconfig import LoraBlock, RunConfig, TrainBlock
from craft.harness.trainer import evaluate, make_schedule, total_steps, train, warmup_steps


@pytest.fixture(scope="module")
def data(sentiment):
    return tokenize_task(sentiment.task, sentiment.tokenizer, 32)


def run_config(method: str = "craft", **train_kw) -> RunConfig:
    settings = {"lr": 3e-2, "head_lr": 3e-2, "batch_size": 32, "eval_every": 2, "max_steps": 10, "seed": 0, **train_kw}
    return RunConfig(method=method, craft=CraftConfig(2, 16, 16), lora=LoraBlock(r=4, dropout=0.1), train=TrainBlock(**settings))


def fit(sentiment, data, run, **kw):
    adapted = apply_method(sentiment.bert(), run)
    result = train(
        adapted, data, sentiment.spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics, progress=False, **kw
    )
    return adapted, result


def trainable(adapted) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}


def test_craft_learns_the_task(sentiment, data):
    """5 epochs at lr 3e-2: seeds 0-9 all end at >= 0.93 validation accuracy; chance is 0.5."""
    run = run_config(batch_size=16, eval_every=16, max_steps=None, epochs=5, warmup_ratio=0.1)
    _, result = fit(sentiment, data, run)
    first, last = result.history[0], result.final
    assert result.steps == 80 and result.epochs_done == 5 and last.is_final and not result.stopped_early
    assert [e.step for e in result.history] == [16, 32, 48, 64, 80]
    assert last.train_loss < 0.6 * first.train_loss
    assert last.metrics["validation/loss"] < first.metrics["validation/loss"]
    assert last.metrics["score"] == last.metrics["validation/accuracy"] >= 0.85
    assert set(last.learning_rates) == {"adapter", "head"} and last.learning_rates["adapter"] == 0.0


@pytest.mark.parametrize(("method", "stop_at"), [("craft", 4), ("craft", 6), ("lora", 6)])
def test_resume_ends_with_the_same_weights(sentiment, data, tmp_path, method, stop_at):
    """Dropout on, two micro-batches per step, 8 batches per epoch: step 4 ends epoch 0 exactly."""
    run = run_config(method, grad_accum_steps=2)
    assert sentiment.bert().config.hidden_dropout_prob > 0
    whole, reference = fit(sentiment, data, run, checkpoint_dir=tmp_path / "a", resume=True)  # nothing to resume: fresh
    assert reference.steps == 10 and reference.epochs_done == 2.5

    _, stopped = fit(sentiment, data, run, checkpoint_dir=tmp_path / "b", callback=lambda e: e.step == stop_at)
    assert stopped.stopped_early and stopped.stop_reason == "callback" and stopped.steps == stop_at
    assert not stopped.final.is_final

    resumed_model, resumed = fit(sentiment, data, run, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.steps == 10 and resumed.final.is_final and not resumed.stopped_early
    assert [e.step for e in resumed.history] == [e.step for e in reference.history]
    expected, got = trainable(whole), trainable(resumed_model)
    assert expected.keys() == got.keys()
    for name in expected:
        assert float((expected[name] - got[name]).abs().max()) <= 1e-6, name
    assert resumed.final.metrics["score"] == reference.final.metrics["score"]
    assert resumed.final.train_loss == pytest.approx(reference.final.train_loss, abs=1e-6)


def test_evaluate_matches_the_final_evaluation(sentiment, data):
    run = run_config(max_steps=4)
    adapted, result = fit(sentiment, data, run)
    again = evaluate(adapted, data, sentiment.spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics)
    assert again == pytest.approx(result.final.metrics)
    on_train = evaluate(
        adapted, data, sentiment.spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics, splits=("train",)
    )
    assert set(on_train) == {"train/loss", "train/accuracy", "train/score", "score"}
    with pytest.raises(ValueError, match="test"):
        evaluate(adapted, data, sentiment.spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics, splits=("test",))


def test_checkpoint_is_pickle_free_and_only_the_latest(sentiment, data, tmp_path):
    fit(sentiment, data, run_config(max_steps=4), checkpoint_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    files = list(latest_checkpoint(tmp_path).iterdir())
    assert {f.suffix for f in files} == {".safetensors", ".json"}
    for f in files:
        assert not f.read_bytes().startswith(b"\x80")  # the pickle protocol 2+ opcode


def test_resume_of_a_finished_run_returns_its_result(sentiment, data, tmp_path):
    run = run_config(max_steps=4)
    _, first = fit(sentiment, data, run, checkpoint_dir=tmp_path)
    _, again = fit(sentiment, data, run, checkpoint_dir=tmp_path, resume=True)
    assert again.steps == 4 and again.final == first.final and again.history == first.history


def test_resume_with_another_plan_is_refused(sentiment, data, tmp_path):
    fit(sentiment, data, run_config(max_steps=2), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="another plan"):
        fit(sentiment, data, run_config(max_steps=4), checkpoint_dir=tmp_path, resume=True)


def test_nan_loss_raises(sentiment, data):
    run = run_config()
    adapted = apply_method(sentiment.bert(), run)
    with torch.no_grad():
        adapted.model.base_model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        train(adapted, data, sentiment.spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics, progress=False)


def test_schedule_warms_up_then_decays(sentiment, data):
    cfg = TrainBlock(lr=0.1, head_lr=0.3, max_steps=10, warmup_ratio=0.25)
    assert total_steps(cfg, 1000) == 10 and warmup_steps(cfg, 10) == 3  # ceil(2.5)
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    schedule = make_schedule(optimizer, cfg, 10)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [0.1 * s / 3 if s < 3 else 0.1 * (10 - s) / 7 for s in range(11)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[0] == 0 and lrs[3] == pytest.approx(0.1) and lrs[10] == 0

    run = run_config(lr=0.1, head_lr=0.3, max_steps=10, warmup_ratio=0.25, eval_every=1)
    _, result = fit(sentiment, data, run)
    seen = {e.step: e.learning_rates for e in result.history}
    for step in (1, 3, 6, 10):
        assert seen[step]["adapter"] == pytest.approx(expected[step])
        assert seen[step]["head"] == pytest.approx(3 * expected[step])


def test_epochs_give_the_step_count():
    cfg = TrainBlock(epochs=1.5, batch_size=32, grad_accum_steps=2)
    assert total_steps(cfg, 256) == 6  # ceil(1.5 * 8 / 2)
    assert total_steps(dataclasses.replace(cfg, max_steps=3), 256) == 3


def test_data_order_depends_on_seed_and_epoch_only(sentiment, data):
    train_set = data["train"]
    assert epoch_order(256, 3, 1) == epoch_order(256, 3, 1) != epoch_order(256, 3, 2)
    full = [b["input_ids"] for b in make_loader(train_set, sentiment.tokenizer, 32, True, seed=3, epoch=1)]
    rest = [b["input_ids"] for b in make_loader(train_set, sentiment.tokenizer, 32, True, seed=3, epoch=1, start_batch=5)]
    assert len(full) == 8 and len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(full[5:], rest))
    batch = next(iter(make_loader(train_set, sentiment.tokenizer, 4, False)))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["attention_mask"].shape  # padded to the longest in the batch


def test_regression_and_text_pairs(sentiment):
    spec = dataclasses.replace(sentiment.spec, text_fields=("a", "b"), num_labels=1)
    rows = {"a": ["good film", "bad plot"] * 16, "b": ["nice", "awful very sad"] * 16, "label": [0.9, 0.1] * 16}
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)})
    task = dataclasses.replace(sentiment.task, spec=spec, splits=splits)
    tokenized = tokenize_task(task, sentiment.tokenizer, 16)
    assert tokenized["train"].features["labels"].dtype == "float32"
    assert 1 in tokenized["train"][0]["token_type_ids"]  # the second text is segment 1
    run = run_config(max_steps=3, eval_every=3)
    adapted = apply_method(sentiment.bert(num_labels=1), run)
    result = train(adapted, tokenized, spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics, progress=False)
    assert result.final.metrics["score"] == -result.final.metrics["validation/mse"]
    assert result.final.metrics["validation/loss"] == pytest.approx(result.final.metrics["validation/mse"], rel=1e-5)


def test_missing_columns_and_splits_are_clear_errors(sentiment, data):
    bad = dataclasses.replace(sentiment.task, spec=dataclasses.replace(sentiment.spec, text_fields=("sentence",)))
    with pytest.raises(ValueError, match="no column"):
        tokenize_task(bad, sentiment.tokenizer, 16)
    spec = dataclasses.replace(sentiment.spec, eval_splits=("test",))
    run = run_config()
    with pytest.raises(ValueError, match="test"):
        train(apply_method(sentiment.bert(), run), data, spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics)
