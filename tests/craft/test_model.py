"""CraftModel / CraftLinear: compute paths, gradients, merge, errors that name the fix, fingerprints."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import craft
from craft import CraftConfig, CraftLinear, CraftModel, choose_compute, get_craft_model, weights_fingerprint
from craft.targets import find_targets

J_NAMES = [f"craft_adapters.{i}.j_{a}" for i in range(2) for a in ("layers", "out", "in")]


def j_grads(cm: CraftModel) -> dict[str, torch.Tensor]:
    params = dict(cm.named_parameters())
    return {n: params[n].grad.clone() for n in J_NAMES}


# ----------------------------------------------------------------------------- compute paths


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_factored_and_merged_paths_agree(tiny, name):
    results = {}
    for compute in ("factored", "merged"):
        model, inputs = tiny.build(name)
        cm = get_craft_model(model, tiny.config(init_scale=0.2), compute=compute)
        assert all(m.compute == compute for m in cm.craft_layers())
        out = cm(**inputs)
        out.loss.backward()
        results[compute] = (
            out.logits.detach(),
            j_grads(cm),
            {n: p.grad.clone() for n, p in cm.named_parameters() if "base_model" in n and p.grad is not None},
        )
    (lf, gf, hf), (lm, gm, hm) = results["factored"], results["merged"]
    assert tiny.max_diff(lf, lm) <= 1e-5
    for n in J_NAMES:
        assert float(gf[n].abs().sum()) > 0
        assert float((gf[n] - gm[n]).norm() / gf[n].norm()) <= 1e-5, n
    assert hf.keys() == hm.keys() and hf
    for n in hf:
        assert float((hf[n] - hm[n]).norm() / hf[n].norm()) <= 1e-5, n


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_merged_path_at_identity_matches_base(tiny, name):
    model, inputs = tiny.build(name)
    base = tiny.logits(model, inputs)
    cm = get_craft_model(model, tiny.config(), compute="merged")
    assert tiny.max_diff(tiny.logits(cm, inputs), base) <= 1e-6


def test_choose_compute():
    assert choose_compute(tokens=8, d_out=768, d_in=768, r_out=100, r_in=100) == "factored"
    assert choose_compute(tokens=4096, d_out=768, d_in=768, r_out=100, r_in=100) == "merged"
    # monotone in the number of tokens: once merged wins it keeps winning
    picks = [choose_compute(t, 768, 768, 100, 100) for t in (1, 16, 64, 256, 1024, 4096, 65536)]
    assert picks == sorted(picks, key=lambda p: p == "merged")


def test_bad_compute_mode(tiny):
    model, _ = tiny.build("bert")
    with pytest.raises(ValueError, match="compute must be one of"):
        get_craft_model(model, tiny.config(), compute="fast")


def _double_bert(tiny, compute: str) -> tuple[CraftModel, dict[str, torch.Tensor]]:
    model, inputs = tiny.build("bert")
    model = model.double()
    cm = get_craft_model(model, CraftConfig(2, 4, 3, init_scale=0.2), compute=compute)
    assert cm.craft_adapters[0].j_out.dtype == torch.float64
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    return cm, inputs


def test_gradcheck_merged_path_float64(tiny):
    cm, inputs = _double_bert(tiny, "merged")
    names = J_NAMES
    start = tuple(dict(cm.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def logits(*js):
        return functional_call(cm, dict(zip(names, js)), args=(), kwargs=inputs).logits

    assert torch.autograd.gradcheck(logits, start, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_merged_and_factored_gradients_float64(tiny):
    grads, logits = {}, {}
    for compute in ("factored", "merged"):
        cm, inputs = _double_bert(tiny, compute)
        out = cm(**inputs).logits
        (out * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
        logits[compute] = out.detach()
        grads[compute] = j_grads(cm)
    assert tiny.max_diff(logits["factored"], logits["merged"]) < 1e-12
    for n in J_NAMES:
        g, h = grads["factored"][n], grads["merged"][n]
        assert float((g - h).norm() / g.norm()) < 1e-10, n


def _enable_checkpointing(model, kwargs):
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    for module in model.modules():  # train mode activates checkpointing; keep it deterministic
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@pytest.mark.parametrize("compute", ["factored", "merged"])
@pytest.mark.parametrize(
    "kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}], ids=["default", "non_reentrant", "reentrant"]
)
@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_activation_checkpointing_gives_same_gradients(tiny, name, compute, kwargs):
    """Training with the model's activation (gradient) checkpointing must work and not change
    gradients, text and vision (a ViT's frozen patch embeddings give reentrant checkpointing
    no input that requires grad)."""
    grads = {}
    for checkpointing in (False, True):
        model, inputs = tiny.build(name)
        cm = get_craft_model(model, tiny.config(init_scale=0.2), compute=compute)
        if checkpointing:
            _enable_checkpointing(model, kwargs)
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        cm(**inputs).loss.backward()
        grads[checkpointing] = j_grads(cm)
    for n in J_NAMES:
        g, h = grads[False][n], grads[True][n]
        assert float((g - h).norm() / g.norm()) <= 1e-5, n


@pytest.mark.parametrize("compute", ["factored", "merged"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_target_in_modules_to_save_is_refused(tiny, name, compute):
    """A module both adapted (its weight frozen under J) and listed in modules_to_save (trained in
    full) is refused in one line naming it, on either compute path, and the model is left untouched."""
    target = tiny.layouts[name].targets[0].partition(":")[0]
    head = tiny.layouts[name].heads[0]
    model, inputs = tiny.build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"^modules_to_save includes \S*{target}, which holds an adapted projection.*remove it"):
        get_craft_model(model, tiny.config(init_scale=0.2, modules_to_save=[head, target]), compute=compute)
    assert not any(isinstance(m, CraftLinear) for m in model.modules()), "nothing was wrapped"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("compute", ["factored", "merged"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_head_in_modules_to_save_trains_in_full_on_both_paths(tiny, name, compute):
    """The head named in modules_to_save trains in full: every one of its parameters gets the gradient
    float64 autograd gives the plain model (J = I, so the adapted model is the plain one), on both paths."""
    head = tiny.layouts[name].heads[0]
    plain, inputs = tiny.build(name)
    plain = plain.double()
    plain(**inputs).loss.backward()
    reference = {n: p.grad for n, p in plain.named_parameters() if n == head or n.startswith(head + ".") or f".{head}." in n}
    assert reference, f"the layout's head {head} has parameters"
    model, inputs = tiny.build(name)
    cm = get_craft_model(model.double(), tiny.config(modules_to_save=[head]), compute=compute)
    cm(**inputs).loss.backward()
    grads = {n.removeprefix("base_model."): p.grad for n, p in cm.named_parameters() if p.requires_grad and "craft_adapters" not in n}
    assert set(grads) == set(reference), "exactly the head trains besides J"
    for n, g in reference.items():
        assert _relative(grads[n], g) <= 1e-10, n


@pytest.mark.parametrize("which", ["bias", "weight"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_trainable_base_bias_or_weight_gets_its_gradient_on_both_paths(tiny, name, which):
    """BitFit-style: a wrapped projection's own bias (or weight) made trainable gets the same
    gradient whichever path computes the layer, checked against float64 autograd of the plain model."""
    model, inputs = tiny.build(name)
    reference = {}
    plain = model.double()
    for n, p in plain.named_parameters():
        p.requires_grad_(n.endswith(f"attn.c_attn.{which}") or n.endswith(f"self.query.{which}"))
    plain(**inputs).loss.backward()
    reference = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert len(reference) == 3
    for compute in ("factored", "merged"):
        model, inputs = tiny.build(name)
        cm = get_craft_model(model.double(), tiny.config(), compute=compute)  # J = I: the plain model
        for layer in cm.craft_layers():
            if name == "gpt2" or layer.parts[0].adapter is cm.craft_adapters[0]:
                getattr(layer.base_layer, which).requires_grad_(True)
        cm(**inputs).loss.backward()
        grads = {n.replace("base_layer.", "").removeprefix("base_model."): p.grad for n, p in cm.named_parameters()}
        for n, g in reference.items():
            assert grads[n] is not None, f"{compute} path gives {n} no gradient"
            assert _relative(grads[n], g) <= 1e-10, (compute, n)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tucker_delta(adapter, layer: int) -> torch.Tensor:
    """Delta W_l from the adapter's frozen Tucker factors and J, independently of the layer code:
    T(G; U_layers J_layers, U_out J_out, U_in J_in)_l - T(G; U_layers, U_out, U_in)_l, in float64."""
    core, u_l, u_o, u_i = (t.detach().double() for t in (adapter.core, adapter.u_layers, adapter.u_out, adapter.u_in))
    j_l, j_o, j_i = (t.detach().double() for t in (adapter.j_layers, adapter.j_out, adapter.j_in))
    # core (a, b, c); u_l (L, a); u_o (out, b); u_i (in, c) -> (L, out, in)
    adapted = torch.einsum("abc,la,ob,ic->loi", core, u_l @ j_l, u_o @ j_o, u_i @ j_i)
    base = torch.einsum("abc,la,ob,ic->loi", core, u_l, u_o, u_i)  # (L, out, in)
    return adapted[layer] - base[layer]


def _expected_delta(layer: CraftLinear) -> torch.Tensor:
    """The full (out, in) update of a wrapped projection: each part's Tucker delta in its rows."""
    d_out, d_in = layer.base_weight().shape
    full = torch.zeros(d_out, d_in, dtype=torch.float64)
    for part in layer.parts:
        lo, hi = part.rows or (0, d_out)
        full[lo:hi] = _tucker_delta(part.adapter, part.layer)
    return full


# ----------------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_craft_linear_merge_unmerge(tiny, name):
    model, inputs = tiny.build(name)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3)
    layer: CraftLinear = cm.craft_layers()[1]
    original = layer.base_weight().detach().clone()
    x = torch.randn(2, 5, layer.base_weight().shape[1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unmerged = layer(x)
        assert tiny.max_diff(unmerged, layer.base_layer(x)) > 1e-5  # the update is not zero
        delta = _expected_delta(layer)
        assert float(delta.abs().max()) > 1e-4  # training moved J
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer.base_weight().double(), original.double() + delta, rtol=0, atol=1e-5)
        assert tiny.max_diff(layer(x), unmerged) <= 1e-5
        layer.merge()  # idempotent
        assert tiny.max_diff(layer(x), unmerged) <= 1e-5
        layer.unmerge()
        assert not layer.merged
        assert tiny.max_diff(layer.base_weight(), original) <= 1e-6
        assert tiny.max_diff(layer(x), unmerged) <= 1e-6


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_model_merge_unmerge(tiny, name):
    model, inputs = tiny.build(name)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3)
    adapted = tiny.logits(cm, inputs)
    layers = cm.craft_layers()
    expected = [layer.base_weight().detach().double() + _expected_delta(layer) for layer in layers]
    cm.merge()
    assert all(m.merged for m in layers)
    for layer, weight in zip(layers, expected):  # each merged weight is W + its Tucker delta, built apart
        torch.testing.assert_close(layer.base_weight().detach().double(), weight, rtol=0, atol=1e-5)
    assert tiny.max_diff(tiny.logits(cm, inputs), adapted) <= 1e-5
    cm.unmerge()
    assert tiny.max_diff(tiny.logits(cm, inputs), adapted) <= 1e-6


def _tie_query(model) -> None:
    """Layer 1's query projection uses layer 0's weight (one Parameter in two modules)."""
    layers = model.bert.encoder.layer
    layers[1].attention.self.query.weight = layers[0].attention.self.query.weight


def test_merge_of_tied_weights_stays_exact(tiny):
    model, inputs = tiny.build("bert")
    _tie_query(model)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3)
    first, second = (layer.self.query for layer in (model.bert.encoder.layer[0].attention, model.bert.encoder.layer[1].attention))
    shared = first.base_layer.weight
    assert second.base_layer.weight is shared
    adapted = tiny.logits(cm, inputs)
    expected = [shared.detach().double() + _expected_delta(layer) for layer in (first, second)]
    cm.merge()
    assert tiny.max_diff(tiny.logits(cm, inputs), adapted) <= 1e-5
    assert first.base_layer.weight is not second.base_layer.weight  # each layer got its own merged copy
    for layer, weight in zip((first, second), expected):  # the shared W plus that layer's own delta
        torch.testing.assert_close(layer.base_weight().detach().double(), weight, rtol=0, atol=1e-5)
    cm.unmerge()
    assert first.base_layer.weight is shared and second.base_layer.weight is shared  # the tie is back
    assert tiny.max_diff(tiny.logits(cm, inputs), adapted) <= 1e-6
    plain = cm.merge_and_unload()
    assert tiny.max_diff(tiny.logits(plain, inputs), adapted) <= 1e-5


def test_module_reachable_at_two_paths_is_refused(tiny):
    model, _ = tiny.build("bert")
    layers = model.bert.encoder.layer
    layers[1].attention.self.query = layers[0].attention.self.query
    with pytest.raises(ValueError, match=r"layer\.0\.attention\.self\.query and .*layer\.1\.attention\.self\.query are one module"):
        get_craft_model(model, tiny.config())


def test_auto_weighs_the_merged_paths_memory(tiny):
    # A 4096-wide, 32-layer model, q and v adapted, bf16: the merged path would hold 2 GiB.
    two_gib = 32 * 2 * 4096 * 4096 * 2
    assert choose_compute(16384, 4096, 4096, 64, 64) == "merged"  # on flops alone
    assert choose_compute(16384, 4096, 4096, 64, 64, merged_bytes=two_gib) == "factored"
    assert craft.MERGED_MEMORY_LIMIT == 256 * 2**20
    elements = 2 * 3 * 32 * 32  # query and value, 3 layers, 32 x 32 each
    x = torch.randn(64, 64, 32)  # 4096 tokens: merged is cheaper in flops
    for limit, plain, autocast in [(elements * 4, "merged", "merged"), (elements * 4 - 1, "factored", "merged"), (elements * 2 - 1, "factored", "factored")]:
        model, _ = tiny.build("bert")
        layer = get_craft_model(model, tiny.config(), merged_memory_limit=limit).craft_layers()[0]
        assert layer.merged_elements == elements
        assert layer.choose(x) == plain, limit  # fp32: 4 bytes an element
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.choose(x) == autocast, limit  # bf16: 2 bytes an element


def test_get_delta_weight_single_and_fused(tiny):
    model, _ = tiny.build("gpt2")
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    fused = cm.craft_layers()[0]
    with pytest.raises(ValueError, match="several parts"):
        fused.get_delta_weight()
    q_part, v_part = fused.parts
    assert (q_part.rows, v_part.rows) == ((0, 32), (64, 96))  # c_attn holds q | k | v, 32 rows each
    full = fused.full_delta_weight().detach().double()
    assert full.shape == (96, 32)
    q_delta, v_delta = _tucker_delta(q_part.adapter, q_part.layer), _tucker_delta(v_part.adapter, v_part.layer)
    assert float(q_delta.abs().max()) > 1e-4 and float(v_delta.abs().max()) > 1e-4  # init_scale 0.1 moved J
    torch.testing.assert_close(full[0:32], q_delta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full[64:96], v_delta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.get_delta_weight(q_part).detach().double(), q_delta, rtol=1e-4, atol=1e-6)
    assert float(full[32:64].abs().max()) == 0.0  # k is not adapted


def test_delta_weight_matches_residual_tucker_form(tiny):
    """Delta W_l = T(G; U J)_l - T(G; U)_l, the design's residual form."""
    model, _ = tiny.build("bert")
    cm = get_craft_model(model, tiny.config(init_scale=0.3))
    a = cm.craft_adapters[0]
    with torch.no_grad():
        u_l, u_o, u_i = a.u_layers, a.u_out, a.u_in
        adapted = torch.einsum("abc,la,ob,ic->loi", a.core, u_l @ a.j_layers, u_o @ a.j_out, u_i @ a.j_in)
        base = torch.einsum("abc,la,ob,ic->loi", a.core, u_l, u_o, u_i)
        for layer in range(3):
            torch.testing.assert_close(a.delta_weight(layer), adapted[layer] - base[layer], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_rank_above_axis(tiny):
    model, _ = tiny.build("bert")
    with pytest.raises(ValueError, match=r"rank_layers=99.*choose rank_layers <= 3"):
        get_craft_model(model, CraftConfig(99, 8, 8))


def test_rank_above_gqa_value_axis(tiny):
    model, _ = tiny.build("llama")
    with pytest.raises(ValueError, match=r"rank_out=20.*'v_proj'.*choose rank_out <= 16"):
        get_craft_model(model, CraftConfig(2, 20, 8))


def test_no_targets_found():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="target_modules"):
        get_craft_model(model, CraftConfig(1, 1, 1))


def test_target_that_matches_nothing(tiny):
    model, _ = tiny.build("bert")
    with pytest.raises(ValueError, match=r"'nope' matches no module.*target_modules"):
        get_craft_model(model, tiny.config(target_modules=["query", "nope"]))


def test_target_that_is_not_a_projection(tiny):
    model, _ = tiny.build("bert")
    with pytest.raises(ValueError, match=r"nn.Linear and Conv1D.*target_modules"):
        get_craft_model(model, tiny.config(target_modules=["attention"]))


def test_overlapping_targets(tiny):
    model, _ = tiny.build("bert")
    with pytest.raises(ValueError, match="list each projection once"):
        find_targets(model, ["query", "self.query"])


def test_bad_fused_part(tiny):
    model, _ = tiny.build("gpt2")
    with pytest.raises(ValueError, match="q, k or v"):
        find_targets(model, ["c_attn:x"])


class _Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.query = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.query(x)


class _Uneven(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(8, 8), _Block(8, 8), _Block(8, 6)])


def test_unstackable_shapes_name_the_modules():
    with pytest.raises(ValueError, match=r"blocks\.0\.query is 8x8.*blocks\.2\.query is 6x8.*target_modules"):
        get_craft_model(_Uneven(), CraftConfig(1, 1, 1, target_modules=["query"]))


class _Even(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def test_custom_module_with_named_target():
    torch.manual_seed(0)
    model = _Even()
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model(x)
    cm = get_craft_model(model, CraftConfig(2, 3, 3, target_modules=["query"], modules_to_save=["head"]))
    assert [s.module_name for s in cm.stacks[0].sites] == ["blocks.0.query", "blocks.1.query", "blocks.2.query"]
    assert cm.head_names == ["head"]
    assert cm.num_adapter_parameters() == 4 + 9 + 9
    with torch.no_grad():
        assert torch.equal(cm(x), before)


def test_modules_to_save_that_matches_nothing(tiny):
    model, _ = tiny.build("bert")
    with pytest.raises(ValueError, match="modules_to_save"):
        get_craft_model(model, tiny.config(modules_to_save=["head_that_is_not_there"]))


def test_load_onto_another_base_model(tiny, tmp_path):
    model, _ = tiny.build("bert", seed=0)
    get_craft_model(model, tiny.config()).save_pretrained(tmp_path)
    other, _ = tiny.build("bert", seed=1)
    with pytest.raises(ValueError, match="another base model"):
        CraftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_onto_the_same_base_in_another_dtype(tiny, tmp_path, dtype):
    """Trained in fp32, served in half precision: the same base weights, so the adapter loads."""
    model, inputs = tiny.build("bert", seed=0)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3)
    adapted = tiny.logits(cm, inputs)
    cm.save_pretrained(tmp_path)
    half, _ = tiny.build("bert", seed=0)
    loaded = CraftModel.from_pretrained(half.to(dtype), tmp_path)
    for key, value in cm.adapter_state_dict().items():
        if ".j_" in key:
            assert torch.equal(loaded.adapter_state_dict()[key], value), key  # J stays float32
    assert float((tiny.logits(loaded, inputs).float() - adapted).abs().max() / adapted.abs().max()) < 5e-2


def test_load_refuses_weights_beyond_the_tolerance(tiny, tmp_path):
    """0.1% of noise on one target weight is within SAME_WEIGHTS_RTOL (0.39%); 1% is not, and the
    message gives the distance (a sketch's estimate: within 10% of the true 1%)."""
    model, _ = tiny.build("bert", seed=0)
    get_craft_model(model, tiny.config()).save_pretrained(tmp_path)
    assert craft.SAME_WEIGHTS_RTOL == 2.0**-8
    for share, accepted in [(1e-3, True), (1e-2, False)]:
        other, _ = tiny.build("bert", seed=0)
        with torch.no_grad():
            w = other.bert.encoder.layer[1].attention.self.value.weight
            noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
            w += noise * (share * w.norm() / noise.norm())  # ||W' - W|| = share * ||W||
        if accepted:
            CraftModel.from_pretrained(other, tmp_path)
        else:
            with pytest.raises(ValueError, match=r"another base model \(a target weight is (0\.9|1\.0)\d% away"):
                CraftModel.from_pretrained(other, tmp_path)


def test_from_pretrained_empty_directory(tiny, tmp_path):
    model, _ = tiny.build("bert")
    with pytest.raises(ValueError, match=r"no adapter_model\.safetensors.*save_pretrained"):
        CraftModel.from_pretrained(model, tmp_path)


def test_from_pretrained_missing_weights(tiny, tmp_path):
    model, _ = tiny.build("bert")
    get_craft_model(model, tiny.config()).save_pretrained(tmp_path)
    fresh, _ = tiny.build("bert")
    cm = get_craft_model(fresh, tiny.config())
    state = cm.adapter_state_dict()
    del state["query.j_out"]
    with pytest.raises(ValueError, match="missing.*same config"):
        cm.load_adapter_state_dict(state)


# ----------------------------------------------------------------------------- fingerprint


def test_weights_fingerprint(tiny):
    a, _ = tiny.build("bert", seed=0)
    b, _ = tiny.build("bert", seed=0)
    c, _ = tiny.build("bert", seed=1)
    stacks = find_targets(a)
    fp = weights_fingerprint(a, stacks)
    assert len(fp) == 64
    assert weights_fingerprint(b, find_targets(b)) == fp
    assert weights_fingerprint(c, find_targets(c)) != fp
    with torch.no_grad():
        w = b.bert.encoder.layer[2].attention.self.value.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))  # one ulp of one element
    assert weights_fingerprint(b, stacks) != fp
    # other targets are another fingerprint too
    assert weights_fingerprint(a, find_targets(a, ["query"])) != fp


def test_fingerprint_of_fused_slice(tiny):
    a, _ = tiny.build("gpt2")
    stacks = find_targets(a)
    fp = weights_fingerprint(a, stacks)
    with torch.no_grad():
        a.transformer.h[0].attn.c_attn.weight[0, 40] += 1.0  # a k column: not a target
    assert weights_fingerprint(a, stacks) == fp
    with torch.no_grad():
        a.transformer.h[0].attn.c_attn.weight[0, 70] += 1.0  # a v column
    assert weights_fingerprint(a, stacks) != fp


def test_public_api():
    for name in craft.__all__:
        assert hasattr(craft, name), name
