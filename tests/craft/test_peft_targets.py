"""CRAFT on every model type of peft's LoRA target table that transformers builds offline.

The model types are read from peft at run time. Each is built tiny from its transformers config
class (defaults, size fields overridden), with a sequence-classification head where transformers
has one, else the base model. For each: the detected stacks, an exact start at init_scale=0, the
trained count n_p * (r_l^2 + r_o^2 + r_i^2), a save / load round trip and the merge. The fused
q/k/v layouts are checked against the models' own attention (their forward and reshaping), and
the baselines adapt exactly the modules CRAFT does.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers import CONFIG_MAPPING, AutoModel, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from craft import CraftConfig, CraftModel, find_targets, get_craft_model, stack_weights
from craft.budget import method_parameters
from craft.harness.methods import apply_method
from craft.harness.runconfig import LoraBlock, RunConfig, VeraBlock
from craft.inspection import format_report, inspect_model
from craft.layouts import select_rows
from craft.targets import module_names

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PEFT_TYPES = sorted(PEFT_TARGETS)
VOCAB = 128
BATCH, SEQ = 2, 8
RANKS = (2, 4, 4)  # 2 layers; 4 <= the narrowest stack (a multi-query v: one head of 8)
# (config fields, tiny value): every field of these names a config has is set so
_SIZES = (
    (
        (
            "hidden_size",
            "d_model",
            "n_embd",
            "word_embed_proj_dim",
            "pooler_hidden_size",
            "embedding_size",
            "vision_output_dim",
            "projector_input_dim",
            "projector_output_dim",
            "hidden_size_per_layer_input",
            "attention_hidden_size",
        ),
        32,
    ),
    (("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers", "num_decoder_layers"), 2),
    (("num_attention_heads", "num_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads"), 4),
    (("num_key_value_heads", "num_kv_heads"), 2),
    (("head_dim", "d_kv", "global_head_dim"), 8),
    (
        (
            "intermediate_size",
            "d_ff",
            "ffn_dim",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "n_inner",
            "ffn_hidden_size",
            "moe_intermediate_size",
            "intermediate_size_mlp",
            "moe_shared_expert_intermediate_size",
        ),
        64,
    ),
    (("max_position_embeddings", "n_positions", "max_2d_position_embeddings"), 64),
    (("rotary_dim", "patch_size", "num_query_tokens"), 4),
    (("image_size",), 16),
    (("vocab_size", "vocab_size_per_layer_input"), VOCAB),
    (("initializer_range",), 0.2),  # weights wide enough that a change of q or v shows in the outputs
)
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
_DROPPED = ("id2label", "label2id", "model_type", "attention_layers", "per_layer_config")  # derived from the layer count
# Fields whose defaults assume many layers, per model type.
_EXTRA = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "nemotron_h": {
        "layers_block_type": ["mamba", "attention", "mlp", "attention"],  # two attention layers to stack
        "mamba_num_heads": 4,
        "mamba_head_dim": 8,
        "ssm_state_size": 8,
        "chunk_size": 16,
        "n_groups": 1,
    },
    "blip-2": {"image_token_index": VOCAB - 1},
    "gemma4": {"text_config": {"global_head_dim": 8}},  # else its full-attention layers have 4 x 512 query rows
}
# Stacks CRAFT finds: query and value of each stack of blocks (n_p), where not 2.
N_STACKS = {
    "t5": 6,  # encoder self, decoder self, decoder cross: q and v of each
    "mt5": 6,
    "bart": 6,
    "llama4": 4,  # the vision and the language model (peft's q_proj / v_proj match both)
}
NO_ATTENTION = {"rwkv"}  # peft adapts its time-mixing key / value; no query projection
# transformers 5.24's Llama4ForConditionalGeneration.forward fails on any input (reads
# outputs.image_outputs, which its language model does not return); tested once it runs
MAY_NOT_RUN = {"llama4"}


def _tiny(fields: dict) -> dict:
    """A config dict with every size field small, recursively through sub-configs."""
    layers = next((fields[k] for k in _LAYER_COUNTS if isinstance(fields.get(k), int)), None)
    out = {}
    for key, value in fields.items():
        if key in _DROPPED:
            continue
        if isinstance(value, dict) and "model_type" in value:
            value = _tiny(value)
        elif isinstance(value, list) and layers and len(value) == layers:
            value = value[:2]  # one entry per layer
        elif (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int) and value >= VOCAB:
            value = VOCAB - 1
        for names, size in _SIZES:
            if key in names and (value is not None or key in ("num_key_value_heads", "head_dim")):
                value = size
        out[key] = value
    return out


def tiny_config(model_type: str, **overrides) -> tf.PretrainedConfig:
    """The config class's defaults with hidden 32, 2 layers, 4 heads, vocabulary 128."""
    cls = CONFIG_MAPPING[model_type]
    fields = _tiny(cls().to_dict())
    for key, value in _EXTRA.get(model_type, {}).items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
    if "pad_token_id" in fields and fields["pad_token_id"] is None:
        fields["pad_token_id"] = 0  # a sequence-classification head needs one for batches
    if fields.get("is_encoder_decoder") and fields.get("decoder_start_token_id") is None:
        fields["decoder_start_token_id"] = fields.get("pad_token_id") or 0
    fields.update(overrides)
    return cls(**fields, num_labels=3)


def _special_ids(config) -> set[int]:
    configs = [config] + [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]
    ids = set()
    for c in configs:
        for key, value in c.to_dict().items():
            if (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int):
                ids.add(value)
    return ids


def tiny_inputs(model_type: str, config) -> dict[str, torch.Tensor]:
    """Token ids without special tokens, ending in eos (what encoder-decoder heads pool)."""
    g = torch.Generator().manual_seed(123)
    allowed = torch.tensor([i for i in range(VOCAB) if i not in _special_ids(config)])
    ids = allowed[torch.randint(len(allowed), (BATCH, SEQ), generator=g)]
    if isinstance(getattr(config, "eos_token_id", None), int):
        ids[:, -1] = config.eos_token_id
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type == "blip-2":  # an image: its query tokens stand at the start of the text
        ids[:, : config.num_query_tokens] = config.image_token_index
        inputs["pixel_values"] = torch.randn(BATCH, 3, 16, 16, generator=g)
    return inputs


def build(model_type: str, seed: int = 0, **overrides) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny model of ``model_type`` in eval mode and inputs for it."""
    config = tiny_config(model_type, **overrides)
    auto = AutoModelForSequenceClassification if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES else AutoModel
    torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation="eager").eval()
    return model, tiny_inputs(model_type, config)


@torch.no_grad()
def output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output (logits, or the last hidden state of a base model)."""
    return model(**inputs).to_tuple()[0].detach().clone()


def _buildable(model_type: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny model, or a skip that says why it cannot be had offline."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type}: transformers has no config class (remote code only)")
    if model_type in NO_ATTENTION:
        pytest.skip(f"{model_type}: no attention (checked by test_types_without_attention_are_refused_in_one_line)")
    model, inputs = build(model_type)
    if model_type in MAY_NOT_RUN:
        try:
            output(model, inputs)
        except Exception as err:  # noqa: BLE001 - transformers' own failure, reported as the skip reason
            pytest.skip(f"{model_type}: the tiny {type(model).__name__} does not run ({type(err).__name__}: {err})")
    return model, inputs


def _perturb(cm: CraftModel, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapter in cm.craft_adapters:
            for j in (adapter.j_layers, adapter.j_out, adapter.j_in):
                j.add_(scale * torch.randn(j.shape, generator=g, dtype=j.dtype))


def _config(**kw) -> CraftConfig:
    return CraftConfig(*RANKS, **kw)


@pytest.mark.parametrize("model_type", PEFT_TYPES)
def test_exact_start_and_trained_count(model_type):
    model, inputs = _buildable(model_type)
    base = output(model, inputs)
    cm = get_craft_model(model, _config())
    assert torch.equal(output(cm, inputs), base)  # J = I: the base model bit for bit
    n_p = N_STACKS.get(model_type, 2)
    assert len(cm.stacks) == n_p, [s.name for s in cm.stacks]
    r_l, r_o, r_i = RANKS
    heads = {f"base_model.{h}." for h in cm.head_names}
    adapter = sum(p.numel() for n, p in cm.named_parameters() if p.requires_grad and not n.startswith(tuple(heads)))
    assert adapter == n_p * (r_l**2 + r_o**2 + r_i**2) == cm.num_adapter_parameters()


@pytest.mark.parametrize("model_type", PEFT_TYPES)
def test_save_load_round_trip(model_type, tmp_path):
    model, inputs = _buildable(model_type)
    base = output(model, inputs)
    cm = get_craft_model(model, _config())
    _perturb(cm)
    expected = output(cm, inputs)
    assert float((expected - base).abs().max()) > 1e-4  # the perturbed J matter
    cm.save_pretrained(tmp_path)
    fresh, _ = build(model_type)
    loaded = CraftModel.from_pretrained(fresh, tmp_path)
    assert loaded.target_names == cm.target_names
    assert torch.equal(output(loaded, inputs), expected)  # the stored factors rebuild the weights exactly


@pytest.mark.parametrize("model_type", PEFT_TYPES)
def test_merge_gives_the_adapted_outputs(model_type):
    model, inputs = _buildable(model_type)
    cls = type(model)
    base = output(model, inputs)
    cm = get_craft_model(model, _config())
    _perturb(cm)
    adapted = output(cm, inputs)
    assert float((adapted - base).abs().max()) > 1e-4
    merged = cm.merge_and_unload()
    assert type(merged) is cls
    scale = float(adapted.abs().max())
    assert float((output(merged, inputs) - adapted).abs().max()) <= 1e-5 * max(scale, 1.0)


# ----------------------------------------------------------------------------- names and refusals


def test_encoder_decoder_stacks_are_separate_and_named_by_their_blocks():
    model, _ = build("t5")
    names = [s.name for s in find_targets(model)]
    assert names == [
        "encoder.block.*.layer.*.SelfAttention.q",
        "decoder.block.*.layer.*.SelfAttention.q",
        "decoder.block.*.layer.*.EncDecAttention.q",
        "encoder.block.*.layer.*.SelfAttention.v",
        "decoder.block.*.layer.*.SelfAttention.v",
        "decoder.block.*.layer.*.EncDecAttention.v",
    ]
    stacks = {s.name: s for s in find_targets(model)}
    cross = stacks["decoder.block.*.layer.*.EncDecAttention.q"]
    assert [s.module_name for s in cross.sites] == [f"transformer.decoder.block.{i}.layer.1.EncDecAttention.q" for i in (0, 1)]
    # each name is a target that selects its stack alone, in the base model too (no "transformer.")
    base = AutoModel.from_config(tiny_config("t5"))
    (alone,) = find_targets(base, ["decoder.block.*.layer.*.EncDecAttention.q"])
    assert alone.name == "decoder.block.*.layer.*.EncDecAttention.q"
    assert [s.module_name for s in alone.sites] == [f"decoder.block.{i}.layer.1.EncDecAttention.q" for i in (0, 1)]
    # a target matching one stack keeps its own name
    assert [s.name for s in find_targets(model, ["EncDecAttention.q"])] == ["EncDecAttention.q"]


def test_bart_stacks_and_their_weights():
    model, _ = build("bart")
    stacks = {s.name: s for s in find_targets(model)}
    assert list(stacks) == [
        "encoder.layers.*.self_attn.q_proj",
        "decoder.layers.*.self_attn.q_proj",
        "decoder.layers.*.encoder_attn.q_proj",
        "encoder.layers.*.self_attn.v_proj",
        "decoder.layers.*.self_attn.v_proj",
        "decoder.layers.*.encoder_attn.v_proj",
    ]
    cross_v = stack_weights(model, stacks["decoder.layers.*.encoder_attn.v_proj"])
    torch.testing.assert_close(cross_v[1], model.model.decoder.layers[1].encoder_attn.v_proj.weight, rtol=0, atol=0)


def test_two_towers_with_the_same_names_are_two_stacks_each():
    """Llama 4: peft's q_proj / v_proj match the vision and the language model; their stacks are
    kept apart (and named apart, the shorter names being the same for both)."""
    model, _ = build("llama4")
    names = [s.name for s in find_targets(model)]
    assert names == [
        "vision_model.model.layers.*.self_attn.q_proj",
        "language_model.model.layers.*.self_attn.q_proj",
        "vision_model.model.layers.*.self_attn.v_proj",
        "language_model.model.layers.*.self_attn.v_proj",
    ]


def test_types_without_attention_are_refused_in_one_line():
    for model_type in sorted(NO_ATTENTION & set(PEFT_TYPES)):
        model, _ = build(model_type)
        with pytest.raises(ValueError, match=r"no query/value projections found.*pass target_modules") as err:
            find_targets(model)
        assert "\n" not in str(err.value)


def test_unknown_fused_layout_is_refused_in_one_line():
    """Persimmon's query_key_value is not in the layout table: no guessing thirds."""
    model = AutoModel.from_config(tiny_config("persimmon"))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.query_key_value .*does not know; pass targets") as err:
        find_targets(model, ["query_key_value:q"])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- fused layouts


def _capture(model: torch.nn.Module, names: dict[str, str]) -> tuple[dict, list]:
    """Inputs (args and kwargs) of the named modules at their first call."""
    seen: dict[str, tuple] = {}
    hooks = []
    for key, name in names.items():

        def hook(_, args, kwargs, key=key):
            seen.setdefault(key, (args, kwargs))

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    return seen, hooks


def _part(model, stack, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x W_part^T + b_part of one layer, from CRAFT's stack: (batch, seq, d_part)."""
    weight = stack_weights(model, stack)[layer]  # (d_part, in)
    bias = model.get_submodule(stack.sites[layer].module_name).bias
    return x @ weight.T + (0 if bias is None else select_rows(bias, stack.sites[layer].rows))


@torch.no_grad()
def test_gpt_neox_per_head_split_is_what_its_attention_computes():
    """q, k, v from CRAFT's per-head interleaved rows give exactly GPT-NeoX's own attention
    probabilities (through its rotary embedding) and attention output."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    model, inputs = build("gpt_neox", attention_bias=True)
    q, k, v = find_targets(model, ["query_key_value:q", "query_key_value:k", "query_key_value:v"])
    assert q.sites[0].rows == (0, 8, 24) and v.sites[0].rows == (16, 24, 24)  # head_size 8, per head q | k | v
    layer = 1
    attention = f"gpt_neox.layers.{layer}.attention"
    seen, hooks = _capture(model, {"attention": attention, "dense": f"{attention}.dense"})
    probs = model(**inputs, output_attentions=True).attentions[layer]  # (B, H, S, S)
    for h in hooks:
        h.remove()
    args, kwargs = seen["attention"]
    x = args[0] if args else kwargs["hidden_states"]  # (B, S, hidden)
    qh, kh, vh = (_part(model, s, layer, x).view(BATCH, SEQ, 4, 8).transpose(1, 2) for s in (q, k, v))  # (B, H, S, d)
    cos, sin = kwargs["position_embeddings"]
    qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    scores = qh @ kh.transpose(-1, -2) / 8**0.5  # (B, H, S, S)
    scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), probs, rtol=1e-5, atol=1e-6)
    (dense_in,), _ = seen["dense"]
    torch.testing.assert_close((probs @ vh).transpose(1, 2).reshape(BATCH, SEQ, 32), dense_in, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt_neox", "codegen"])
def test_interleaved_parts_agree_on_both_compute_paths(model_type):
    results = {}
    for compute in ("factored", "merged"):
        model, inputs = build(model_type)
        cm = get_craft_model(model, _config(), compute=compute)
        _perturb(cm)
        out = cm(**inputs).to_tuple()[0]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results[compute] = out.detach(), [p.grad.clone() for p in cm.craft_adapters.parameters()]
    (factored, f_grads), (merged, m_grads) = results["factored"], results["merged"]
    torch.testing.assert_close(merged, factored, rtol=1e-5, atol=1e-6)
    for f, m in zip(f_grads, m_grads):
        assert float(f.abs().max()) > 0
        torch.testing.assert_close(m, f, rtol=1e-4, atol=1e-6)


def test_interleaved_delta_lands_in_each_heads_rows():
    """The merged update of GPT-NeoX's query_key_value, cut the way its attention cuts the
    output (per head: q | k | v), is CRAFT's q update and v update, with k untouched."""
    model, _ = build("gpt_neox")
    cm = get_craft_model(model, _config())
    _perturb(cm)
    fused = cm.craft_layers()[1]
    per_head = fused.full_delta_weight().detach().view(4, 3 * 8, 32).split(8, dim=1)  # heads x (q | k | v) x in
    q_part, v_part = fused.parts
    torch.testing.assert_close(per_head[0].reshape(32, 32), q_part.adapter.delta_weight(1).detach(), rtol=0, atol=0)
    torch.testing.assert_close(per_head[2].reshape(32, 32), v_part.adapter.delta_weight(1).detach(), rtol=0, atol=0)
    assert float(per_head[2].abs().max()) > 0 and float(per_head[1].abs().max()) == 0.0


def test_parts_of_one_module_overlap_only_when_they_share_rows():
    model, _ = build("gpt_neox")
    assert len(find_targets(model, ["query_key_value:q", "query_key_value:k", "query_key_value:v"])) == 3
    with pytest.raises(ValueError, match="list each projection once"):
        find_targets(model, ["query_key_value:v", "query_key_value"])


def test_inspection_reports_every_stack_in_its_own_column():
    model, _ = build("t5")
    report = inspect_model(model, candidates=[(2, 4, 4)])
    assert report.targets == [s.name for s in find_targets(model)] and len(report.targets) == 6
    assert report.adapter_parameters == {"2/4/4": 6 * (4 + 16 + 16)}
    header = next(line for line in format_report(report).splitlines() if line.lstrip().startswith("rank_layers/out/in"))
    assert all(f"  kept {name}" in header for name in report.targets)


FUSED_CASES = {  # model type and config overrides -> the output projection its attention output enters
    "gpt2": ("gpt2", {}, "transformer.h.{}.attn.c_proj"),
    "mpt": ("mpt", {}, "transformer.blocks.{}.attn.out_proj"),
    "gpt_neox": ("gpt_neox", {}, "gpt_neox.layers.{}.attention.dense"),
    "bloom": ("bloom", {}, "transformer.h.{}.self_attention.dense"),
    "deberta": ("deberta", {}, "deberta.encoder.layer.{}.attention.output.dense"),
    "falcon-per-head": ("falcon", {"multi_query": False, "num_kv_heads": 4}, "transformer.h.{}.self_attention.dense"),
    "falcon-multi-query": ("falcon", {"multi_query": True}, "transformer.h.{}.self_attention.dense"),
    "falcon-grouped": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, "transformer.h.{}.self_attention.dense"),
    "gpt_bigcode-per-head": ("gpt_bigcode", {"multi_query": False}, "transformer.h.{}.attn.c_proj"),
    "gpt_bigcode-multi-query": ("gpt_bigcode", {"multi_query": True}, "transformer.h.{}.attn.c_proj"),
    "codegen": ("codegen", {}, "h.{}.attn.out_proj"),
    "phi3": ("phi3", {}, "model.layers.{}.self_attn.o_proj"),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@torch.no_grad()
def test_fused_value_rows_give_the_models_attention_output(case):
    """Attention probabilities times the values from CRAFT's v rows (of the fused projection's
    input) are exactly what the model's own attention feeds its output projection, head by head
    (a query head h reads key / value head h // (heads / kv_heads))."""
    model_type, overrides, out_proj = FUSED_CASES[case]
    model, inputs = build(model_type, **overrides)
    q, v = find_targets(model)
    assert q.name.endswith(":q") and v.name.endswith(":v")
    layer, heads, head_dim = 1, 4, 8
    seen, hooks = _capture(model, {"fused": v.sites[layer].module_name, "out": out_proj.format(layer)})
    probs = model(**inputs, output_attentions=True).attentions[layer]  # (B, H, S, S)
    for h in hooks:
        h.remove()
    kv_heads = v.shape[1] // head_dim
    assert q.shape[1] == heads * head_dim and heads % kv_heads == 0
    values = _part(model, v, layer, seen["fused"][0][0]).view(BATCH, SEQ, kv_heads, head_dim).transpose(1, 2)  # (B, KV, S, d)
    values = values.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, S, d)
    expected = (probs @ values).transpose(1, 2).reshape(BATCH, SEQ, heads * head_dim)  # (B, S, H * d)
    torch.testing.assert_close(seen["out"][0][0], expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- budget and baselines

BASELINE_TYPES = ["t5", "bart", "blip-2", "gpt_neox", "falcon", "deberta", "codegen", "llama"]


def _run(method: str) -> RunConfig:
    blocks = {"lora": LoraBlock(r=4), "vera": VeraBlock(r=8)}
    return RunConfig(method=method, craft=_config(), **({method: blocks[method]} if method in blocks else {}))


@pytest.mark.parametrize("method", ["craft", "lora", "vera"])
@pytest.mark.parametrize("model_type", BASELINE_TYPES)
def test_closed_form_count_matches_the_trained_one(model_type, method):
    model, _ = build(model_type)
    run = _run(method)
    expected = method_parameters(method, run.craft if method == "craft" else run.method_block(), model)
    assert apply_method(model, run).adapter_parameters == expected


@pytest.mark.parametrize("model_type", BASELINE_TYPES)
def test_lora_adapts_the_modules_craft_adapts(model_type):
    """peft gets the exact module names of CRAFT's stacks: the same projections (a fused one whole),
    in every stack of an encoder-decoder, and nothing that only ends like one."""
    from peft.tuners.lora import LoraLayer

    model, inputs = build(model_type)
    wanted = module_names(find_targets(model))
    adapted = apply_method(model, _run("lora"))
    wrapped = [n.removeprefix("base_model.model.") for n, m in adapted.model.named_modules() if isinstance(m, LoraLayer)]
    assert sorted(wrapped) == sorted(wanted)
    fused = model_type in ("gpt_neox", "falcon", "deberta", "codegen")  # q and v in one module per layer
    assert len(wanted) == (2 if fused else 2 * N_STACKS.get(model_type, 2))  # 2 layers
    adapted.model(**inputs)  # runs
