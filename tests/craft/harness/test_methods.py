"""CRAFT and its baselines in one harness: build, count, group, train, save, merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from craft.config import CraftConfig
from craft.harness.data import tokenize_task
from craft.harness.methods import HEAD_WEIGHTS_NAME, apply_method, merged_model, parameter_groups, save_adapter
from craft.harness.runconfig import LoraBlock, PissaBlock, RunConfig, TrainBlock, VeraBlock
from craft.harness.trainer import train

RANKS = (2, 16, 16)
HIDDEN, LAYERS, TARGETS = 32, 2, 2  # the sentiment BERT: query and value of 2 layers
HEAD = HIDDEN * 2 + 2  # classifier Linear(32, 2)
EXPECTED_ADAPTER = {
    "craft": TARGETS * sum(r * r for r in RANKS),  # n_p (r_L^2 + r_out^2 + r_in^2)
    "lora": LAYERS * TARGETS * 4 * (HIDDEN + HIDDEN),  # r (d_in + d_out) per module
    "pissa": LAYERS * TARGETS * 4 * (HIDDEN + HIDDEN),
    "vera": LAYERS * TARGETS * (16 + HIDDEN),  # lambda_d (r) and lambda_b (d_out) per module
    "head": 0,
}
METHODS = sorted(EXPECTED_ADAPTER)


def run_config(method: str, **train) -> RunConfig:
    return RunConfig(
        method=method,
        craft=CraftConfig(*RANKS),
        lora=LoraBlock(r=4, alpha=8),
        pissa=PissaBlock(r=4, alpha=4),
        vera=VeraBlock(r=16),
        train=TrainBlock(**{"lr": 1e-2, "head_lr": 1e-2, "batch_size": 16, "eval_every": 3, "max_steps": 3, **train}),
    )


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_counts_groups_and_a_few_steps(method, sentiment):
    run = run_config(method)
    adapted = apply_method(sentiment.bert(), run)
    assert adapted.method == method
    assert adapted.adapter_parameters == EXPECTED_ADAPTER[method]
    assert adapted.head_parameters == HEAD
    assert sum(p.numel() for p in adapted.model.parameters() if p.requires_grad) == EXPECTED_ADAPTER[method] + HEAD

    groups = parameter_groups(adapted, lr=1e-3, head_lr=5e-3, weight_decay=0.01)
    assert [g["name"] for g in groups] == (["head"] if method == "head" else ["adapter", "head"])
    names = {id(p): n for n, p in adapted.model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert by_group["head"] == set(adapted.head_parameter_names)
    assert sum(p.numel() for g in groups if g["name"] == "head" for p in g["params"]) == HEAD
    assert {g["name"]: g["lr"] for g in groups} == ({"head": 5e-3} if method == "head" else {"adapter": 1e-3, "head": 5e-3})
    assert all(g["weight_decay"] == 0.01 for g in groups)

    before = trainable(adapted.model)
    data = tokenize_task(sentiment.task, sentiment.tokenizer, 32)
    result = train(adapted, data, sentiment.spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics, progress=False)
    assert result.steps == 3 and result.final.is_final
    after = trainable(adapted.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert set(adapted.head_parameter_names) <= changed  # the head really trains
    assert changed == set(before)  # and so does every adapter parameter


def test_head_only_is_the_whole_group_and_frozen_rest(sentiment):
    adapted = apply_method(sentiment.bert(), run_config("head"))
    groups = parameter_groups(adapted, lr=1e-3, head_lr=5e-3, weight_decay=0.0)
    assert len(groups) == 1 and groups[0]["lr"] == 5e-3
    assert sorted(adapted.head_parameter_names) == ["classifier.bias", "classifier.weight"]


def test_peft_keeps_the_original_head_frozen(sentiment):
    adapted = apply_method(sentiment.bert(), run_config("lora"))
    frozen = [n for n, p in adapted.model.named_parameters() if "classifier.original_module" in n]
    assert frozen and not any(dict(adapted.model.named_parameters())[n].requires_grad for n in frozen)


def test_baselines_share_craft_targets_on_fused_gpt2(tiny):
    """GPT-2's c_attn:q / c_attn:v become the whole c_attn for peft: r (d_in + 3 d) per layer."""
    model, inputs = tiny.build("gpt2")
    adapted = apply_method(model, run_config("lora"))
    assert adapted.adapter_parameters == 3 * 4 * (32 + 3 * 32)  # 3 layers, r = 4
    assert adapted.head_parameters == 32 * 3  # score: Linear(32, 3, bias=False)
    adapted.model(**inputs).loss.backward()


def test_head_count_equal_across_methods_with_two_head_modules(tiny):
    counts = {}
    for method in ("craft", "lora", "head"):
        model, _ = tiny.build("distilbert")
        counts[method] = apply_method(model, run_config(method)).head_parameters
    assert counts["craft"] == counts["lora"] == counts["head"] == (32 * 32 + 32) + (32 * 3 + 3)


@pytest.mark.parametrize("method", ["lora", "pissa", "vera"])
def test_peft_initialisation_is_seeded_and_leaves_global_rng(method, sentiment):
    built = []
    for draw in (False, True):
        model = sentiment.bert()
        if draw:
            torch.rand(5)  # another global RNG position must not change the adapter
        state = torch.get_rng_state()
        built.append(trainable(apply_method(model, run_config(method)).model))
        assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(built[0][n], built[1][n]) for n in built[0])


def test_unknown_target_is_one_clear_error(sentiment):
    run = run_config("lora")
    run.lora.target_modules = ["nope"]
    with pytest.raises(ValueError, match="matches no module"):
        apply_method(sentiment.bert(), run)


@pytest.mark.parametrize("method", METHODS)
def test_save_adapter_and_merge(method, sentiment, tmp_path):
    adapted = apply_method(sentiment.bert(dropout=0.0), run_config(method))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move away from the initialisation so that merging has work to do
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    adapted.model.eval()
    inputs = sentiment.tokenizer(["good movie", "bad plot and awful film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapted.model(**inputs).logits
    out = save_adapter(adapted, tmp_path / "adapter")
    files = {p.name for p in out.iterdir()}
    assert all(name.endswith((".safetensors", ".json", ".md")) for name in files)
    if method == "head":
        saved = load_file(str(out / HEAD_WEIGHTS_NAME))
        assert sorted(saved) == ["classifier.bias", "classifier.weight"]
    if method == "pissa":  # converted: a plain LoRA that applies to the original base weights
        import peft

        reloaded = peft.PeftModel.from_pretrained(sentiment.bert(dropout=0.0), str(out)).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    merged = merged_model(adapted).eval()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any("lora" in n or "vera" in n or "craft" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_craft_adapter_count_matches_the_model(sentiment):
    adapted = apply_method(sentiment.bert(), run_config("craft"))
    assert adapted.adapter_parameters == adapted.model.num_adapter_parameters()
    assert adapted.head_parameters == adapted.model.num_head_parameters()
