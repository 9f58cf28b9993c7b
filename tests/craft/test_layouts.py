"""Every supported layout end to end: detection, exact start, trainable set, merge, save/load."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import craft
from craft import CraftLinear, CraftModel, get_craft_model


def test_identity_start_and_detected_targets(tiny, layout):
    model, inputs = layout.build()
    before = tiny.logits(model, inputs)
    cm = get_craft_model(model, tiny.config())
    assert cm.target_names == layout.targets
    after = tiny.logits(cm, inputs)
    assert tiny.max_diff(after, before) <= 1e-5
    assert torch.equal(after, before)  # J = I is the base model bit for bit
    # every layer of each stack is wrapped, once per module (GPT-2: q and v share c_attn)
    layers = cm.craft_layers()
    n_layers = cm.stacks[0].shape[0]
    assert n_layers == 3
    assert len(layers) == (n_layers if layout.name == "gpt2" else 2 * n_layers)
    assert all(len(m.parts) == (2 if layout.name == "gpt2" else 1) for m in layers)


def test_stack_shapes(tiny, layout):
    model, _ = layout.build()
    q, v = craft.find_targets(model)
    assert q.shape == (3, 32, 32)
    if layout.gqa:
        # grouped-query attention: 2 key/value heads of 8 -> value stack 16 wide, query 32
        assert v.shape == (3, 16, 32)
        assert v.shape[1] < q.shape[1]
    else:
        assert v.shape == (3, 32, 32)
    if layout.name == "gpt2":
        assert [s.rows for s in q.sites] == [(0, 32)] * 3
        assert [s.rows for s in v.sites] == [(64, 96)] * 3
        # the q / v slices of the stack are the matching columns of the Conv1D (in x out) weight
        c_attn = model.transformer.h[1].attn.c_attn.weight
        torch.testing.assert_close(craft.stack_weights(model, v)[1], c_attn[:, 64:96].T, rtol=0, atol=0)


def test_parameter_count_and_trainable_set(tiny, layout):
    model, _ = layout.build()
    cm = get_craft_model(model, tiny.config())
    r_l, r_o, r_i = tiny.ranks
    assert cm.num_adapter_parameters() == 2 * (r_l**2 + r_o**2 + r_i**2)
    assert sorted(cm.head_names) == sorted(layout.heads)
    trainable = {n for n, p in cm.named_parameters() if p.requires_grad}
    expected_j = {f"craft_adapters.{i}.j_{a}" for i in range(2) for a in ("layers", "out", "in")}
    expected_head = {f"base_model.{head}.{n}" for head in layout.heads for n, _ in model.get_submodule(head).named_parameters()}
    assert expected_head, "the head has parameters"
    assert trainable == expected_j | expected_head
    assert cm.num_head_parameters() == sum(p.numel() for n, p in cm.named_parameters() if n in expected_head)


def test_gradients_reach_every_j_at_identity(tiny, layout):
    model, inputs = layout.build()
    cm = get_craft_model(model, tiny.config())
    labels = inputs["labels"]
    logits = cm(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    F.cross_entropy(logits, labels).backward()
    for i, adapter in enumerate(cm.craft_adapters):
        for axis in ("layers", "out", "in"):
            grad = getattr(adapter, f"j_{axis}").grad
            assert grad is not None, f"adapter {i} j_{axis} got no gradient"
            assert float(grad.abs().sum()) > 0, f"adapter {i} j_{axis} has a zero gradient"
    # frozen base weights get none
    assert all(p.grad is None for n, p in cm.named_parameters() if not p.requires_grad)


def test_merge_and_unload_after_training(tiny, layout):
    model, inputs = layout.build()
    cls = type(model)
    base = tiny.logits(model, inputs)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3, lr=1e-2)
    adapted = tiny.logits(cm, inputs)
    assert tiny.max_diff(adapted, base) > 1e-4  # training moved the model
    merged = cm.merge_and_unload()
    assert type(merged) is cls
    assert not any(isinstance(m, CraftLinear) for m in merged.modules())
    assert tiny.max_diff(tiny.logits(merged, inputs), adapted) <= 1e-5


def test_save_load_round_trip(tiny, layout, tmp_path):
    model, inputs = layout.build(seed=0)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3, lr=1e-2)
    expected = tiny.logits(cm, inputs)
    cm.save_pretrained(tmp_path)
    fresh, _ = layout.build(seed=0)
    assert tiny.max_diff(tiny.logits(fresh, inputs), expected) > 1e-4  # the head and J matter
    loaded = CraftModel.from_pretrained(fresh, tmp_path)
    assert loaded.target_names == layout.targets
    assert tiny.max_diff(tiny.logits(loaded, inputs), expected) <= 1e-6
    for a, b in zip(loaded.craft_adapters, cm.craft_adapters):
        for axis in ("layers", "out", "in"):
            assert torch.equal(getattr(a, f"j_{axis}"), getattr(b, f"j_{axis}"))


def test_a_stack_is_selected_by_its_starred_module_name(layout):
    """A target with the layer numbers starred ("encoder.layer.*.attention.self.query") selects the
    same stack as the detected name, which existing configs, adapters and factor caches keep using."""
    model, _ = layout.build()
    for stack in craft.find_targets(model):
        starred = ".".join("*" if part.isdigit() else part for part in stack.sites[0].module_name.split("."))
        fused_part = stack.name.partition(":")[2]
        (same,) = craft.find_targets(model, [f"{starred}:{fused_part}" if fused_part else starred])
        assert same.name == (f"{starred}:{fused_part}" if fused_part else starred)
        assert same.sites == stack.sites and same.shape == stack.shape
