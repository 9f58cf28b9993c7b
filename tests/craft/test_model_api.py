"""CraftModel as a peft user expects it: from_pretrained (local or hub cache, trainable or not),
the stored factors (no HOSVD on load), parameter counts in peft's format, disable_adapter, and
no silent training of a merged model."""

from __future__ import annotations

import copy
import re
import shutil

import peft
import pytest
import torch
from safetensors import safe_open

import craft
import craft.factors
import craft.model
import craft.tucker
from craft import ADAPTER_NAME, CONFIG_NAME, FACTORS_NAME, CraftLinear, CraftModel, get_craft_model


def perturb(cm: CraftModel, seed: int = 3, scale: float = 0.2) -> None:
    """J = I + scale * N(0, 1) and a shifted head: an adapter that changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in cm.craft_adapters:
            for axis in ("layers", "out", "in"):
                j = getattr(adapter, f"j_{axis}")
                j.copy_(torch.eye(j.shape[0]) + scale * torch.randn(j.shape, generator=g))
        for name in cm.head_names:
            for p in cm.base_model.get_submodule(name).parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def j_parameters(cm: CraftModel) -> list[torch.nn.Parameter]:
    return [getattr(a, f"j_{axis}") for a in cm.craft_adapters for axis in ("layers", "out", "in")]


def no_hosvd(monkeypatch) -> None:
    """Every way into a decomposition raises (our own functions, patched where they are looked up)."""

    def refuse(*_, **__):
        raise AssertionError("an HOSVD ran")

    monkeypatch.setattr(craft.tucker, "mode_gram", refuse)
    monkeypatch.setattr(craft.tucker, "hosvd", refuse)
    monkeypatch.setattr(craft.model, "hosvd", refuse)
    monkeypatch.setattr(craft.factors, "hosvd", refuse)


def count_hosvd(monkeypatch) -> list[int]:
    calls = []
    real = craft.tucker.hosvd

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(craft.model, "hosvd", counted)
    return calls


# ----------------------------------------------------------------------------- parameter counts


def test_counts_follow_peft_rule_and_format(tiny, capsys):
    """peft's own get_nb_trainable_parameters / print_trainable_parameters run on our model give
    our numbers; and against a peft LoRA on the same base, the base part counts alike."""
    model, _ = tiny.build("bert")
    plain = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    lora_base, _ = tiny.build("bert")
    cm = get_craft_model(model, tiny.config())
    j = 2 * (2 * 2 + 8 * 8 + 8 * 8)  # n_p * (r_L^2 + r_out^2 + r_in^2)
    trainable, total = cm.get_nb_trainable_parameters()
    assert (trainable, total) == peft.PeftModel.get_nb_trainable_parameters(cm)
    assert trainable == j + head and total == plain + j + head  # a frozen copy of the head, as peft keeps

    lora = peft.get_peft_model(lora_base, peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    lora_trainable, lora_total = lora.get_nb_trainable_parameters()
    lora_own = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert (trainable - j, total - j) == (lora_trainable - lora_own, lora_total - lora_own)

    cm.print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.PeftModel.print_trainable_parameters(cm)
    assert ours == capsys.readouterr().out
    assert re.fullmatch(rf"trainable params: {trainable:,d} \|\| all params: {total:,d} \|\| trainable%: \d+\.\d{{4}}\n", ours)


# ----------------------------------------------------------------------------- from_pretrained


def test_from_pretrained_frozen_by_default_trainable_on_request(tiny, tmp_path):
    model, inputs = tiny.build("bert")
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    cm.save_pretrained(tmp_path)

    frozen = CraftModel.from_pretrained(tiny.build("bert")[0].train(), tmp_path)
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.get_nb_trainable_parameters()[0] == 0

    trainable = CraftModel.from_pretrained(tiny.build("bert")[0], tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in j_parameters(trainable))
    assert all(p.requires_grad for p in trainable.base_model.classifier.parameters())
    assert trainable.get_nb_trainable_parameters()[0] == cm.get_nb_trainable_parameters()[0]
    before = [p.detach().clone() for p in j_parameters(trainable)]
    tiny.train(trainable, inputs, steps=2)
    assert all(not torch.equal(a, b) for a, b in zip(before, j_parameters(trainable)))


def test_peft_loads_frozen_by_default_too(tiny, tmp_path):
    """The default we copy: peft's from_pretrained gives a model with nothing to train."""
    model, _ = tiny.build("bert")
    config = peft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny.build("bert")[0], str(tmp_path))
    assert loaded.get_nb_trainable_parameters()[0] == 0


def _fake_hub_cache(root, repo: str, files_from) -> None:
    """A Hugging Face cache holding ``repo`` at main, as ``snapshot_download`` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, folder / "snapshots" / commit)


def test_from_pretrained_hub_id_offline(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    model, inputs = tiny.build("bert")
    cm = get_craft_model(model, tiny.config())
    perturb(cm)
    expected = tiny.logits(cm, inputs)
    cm.save_pretrained(tmp_path / "adapter")
    _fake_hub_cache(tmp_path / "hub", "acme/craft-adapter", tmp_path / "adapter")
    no_hosvd(monkeypatch)  # the cached repository has the factors too
    loaded = CraftModel.from_pretrained(tiny.build("bert")[0], "acme/craft-adapter", cache_dir=tmp_path / "hub")
    assert torch.equal(tiny.logits(loaded, inputs), expected)
    with pytest.raises(ValueError, match=r"^adapter 'acme/other' is no local directory, nor in the Hugging Face cache"):
        CraftModel.from_pretrained(tiny.build("bert")[0], "acme/other", cache_dir=tmp_path / "hub")
    with pytest.raises(ValueError, match=r"neither an adapter directory nor a hub repository id"):
        CraftModel.from_pretrained(tiny.build("bert")[0], str(tmp_path / "not" / "there"), cache_dir=tmp_path / "hub")


# ----------------------------------------------------------------------------- stored factors


def _stored_shapes(directory) -> dict[str, list[int]]:
    with safe_open(str(directory / FACTORS_NAME), framework="pt") as handle:
        return {k: handle.get_slice(k).get_shape() for k in handle.keys()}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_stored_factors_load_without_hosvd_and_reproduce_the_trained_model(tiny, tmp_path, monkeypatch, name):
    model, inputs = tiny.build(name)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3)
    trained = tiny.logits(cm, inputs)
    cm.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, ADAPTER_NAME, FACTORS_NAME}
    # The stored size, from the shapes alone: per stack G (r_L r_out r_in) + U_layers (L r_L)
    # + U_out (d_out r_out) + U_in (d_in r_in), plus the spectra (L + d_out + d_in), float64.
    shapes = _stored_shapes(tmp_path)
    r_l, r_o, r_i = tiny.ranks
    expected = 0
    for stack in cm.stacks:
        layers, d_out, d_in = stack.shape
        expected += r_l * r_o * r_i + layers * r_l + d_out * r_o + d_in * r_i + layers + d_out + d_in
    assert sum(torch.Size(s).numel() for s in shapes.values()) == expected
    assert shapes[f"{cm.target_names[0]}/core"] == [r_l, r_o, r_i]

    no_hosvd(monkeypatch)
    fresh, _ = tiny.build(name)
    loaded = CraftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(tiny.logits(loaded, inputs), trained)  # bit for bit
    for a, b in zip(loaded.craft_adapters, cm.craft_adapters):
        for buffer in ("u_layers", "u_out", "u_in", "core", "core_base"):
            assert torch.equal(getattr(a, buffer), getattr(b, buffer)), buffer


def test_adapter_without_factors_loads_by_recomputing_them(tiny, tmp_path, monkeypatch):
    """What the previous version wrote (no factors file) still loads: the HOSVD runs again."""
    model, inputs = tiny.build("bert")
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    tiny.train(cm, inputs, steps=3)
    trained = tiny.logits(cm, inputs)
    cm.save_pretrained(tmp_path, save_factors=False)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, ADAPTER_NAME}
    with safe_open(str(tmp_path / ADAPTER_NAME), framework="pt") as handle:
        assert handle.metadata()["format"] == "craft-adapter/1"  # the format the previous version wrote
    calls = count_hosvd(monkeypatch)
    loaded = CraftModel.from_pretrained(tiny.build("bert")[0], tmp_path)
    assert len(calls) == 2  # query and value
    assert tiny.max_diff(tiny.logits(loaded, inputs), trained) <= 1e-6


def test_stored_factors_on_another_base_need_force(tiny, tmp_path, monkeypatch):
    model, _ = tiny.build("bert", seed=0)
    cm = get_craft_model(model, tiny.config())
    perturb(cm)
    cm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^the adapter in .* was trained on another base model .*pass force=True$"):
        CraftModel.from_pretrained(tiny.build("bert", seed=1)[0], tmp_path)
    no_hosvd(monkeypatch)
    with pytest.warns(UserWarning, match="another base model"):
        forced = CraftModel.from_pretrained(tiny.build("bert", seed=1)[0], tmp_path, force=True)
    # the trained update itself lands on the other base: the same Delta W in every projection
    for a, b in zip(forced.craft_layers(), cm.craft_layers()):
        assert torch.equal(a.full_delta_weight(), b.full_delta_weight())


def test_a_later_save_without_factors_removes_the_stale_file(tiny, tmp_path):
    model, _ = tiny.build("bert")
    cm = get_craft_model(model, tiny.config())
    cm.save_pretrained(tmp_path)
    assert (tmp_path / FACTORS_NAME).is_file()
    cm.save_pretrained(tmp_path, save_factors=False)
    assert not (tmp_path / FACTORS_NAME).exists()


def test_factors_of_another_adapter_are_refused(tiny, tmp_path):
    model, _ = tiny.build("bert")
    get_craft_model(model, tiny.config()).save_pretrained(tmp_path / "a")
    get_craft_model(tiny.build("bert")[0], craft.CraftConfig(1, 4, 4)).save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / FACTORS_NAME, tmp_path / "a" / FACTORS_NAME)
    with pytest.raises(ValueError, match=r"does not belong to the adapter beside it"):
        CraftModel.from_pretrained(tiny.build("bert")[0], tmp_path / "a")


# ----------------------------------------------------------------------------- disable_adapter


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_disable_adapter_gives_the_base_models_outputs(tiny, name):
    model, inputs = tiny.build(name)
    untouched = copy.deepcopy(model)
    base = tiny.logits(untouched, inputs)
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    wrapped = cm.craft_layers()
    tiny.train(cm, inputs, steps=3)  # J and the head move
    adapted = tiny.logits(cm, inputs)
    assert tiny.max_diff(adapted, base) > 1e-3
    with cm.disable_adapter():
        assert torch.equal(tiny.logits(cm, inputs), base)
    assert torch.equal(tiny.logits(cm, inputs), adapted)
    with pytest.raises(KeyError), cm.disable_adapter():
        raise KeyError("inside the block")
    assert torch.equal(tiny.logits(cm, inputs), adapted)  # restored after an exception too
    assert cm.craft_layers() == wrapped and all(p.requires_grad for p in j_parameters(cm))


def test_disable_adapter_when_merged(tiny):
    """peft unmerges a merged layer to disable it; we do too, and merge again on exit."""
    model, inputs = tiny.build("bert")
    base = tiny.logits(copy.deepcopy(model), inputs)
    cm = get_craft_model(model, tiny.config())
    perturb(cm)
    adapted = tiny.logits(cm, inputs)
    cm.merge()
    with cm.disable_adapter():
        assert not any(layer.merged for layer in cm._wrapped.values())
        assert tiny.max_diff(tiny.logits(cm, inputs), base) <= 1e-5
    assert all(layer.merged for layer in cm.craft_layers())
    assert tiny.max_diff(tiny.logits(cm, inputs), adapted) <= 1e-5


def test_disable_adapter_keeps_the_graph_of_an_earlier_pass(tiny):
    """A reference pass inside the block (as DPO does) writes no weight that backward needs."""
    model, inputs = tiny.build("bert")
    cm = get_craft_model(model, tiny.config(init_scale=0.1))
    loss = cm(**inputs).loss
    with cm.disable_adapter(), torch.no_grad():
        reference = cm(**inputs).loss
    (loss - reference).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in j_parameters(cm))


def test_disable_adapter_after_merge_and_unload(tiny):
    model, _ = tiny.build("bert")
    cm = get_craft_model(model, tiny.config())
    cm.merge_and_unload()
    with pytest.raises(ValueError, match="merge_and_unload"), cm.disable_adapter():
        pass


# ----------------------------------------------------------------------------- merged and training


def test_training_a_merged_model_raises_until_unmerged(tiny):
    model, inputs = tiny.build("bert")
    cm = get_craft_model(model, tiny.config())
    perturb(cm)
    cm.merge()
    with torch.no_grad():
        cm(**inputs)  # inference on the merged model is fine
    cm.train()
    with pytest.raises(RuntimeError, match=r"merged into the base weights.*call unmerge\(\) before training"):
        cm(**inputs)
    cm.unmerge()
    before = [p.detach().clone() for p in j_parameters(cm)]
    logits = tiny.logits(cm, inputs)
    opt = torch.optim.SGD(j_parameters(cm), lr=0.1)
    cm(**inputs).loss.backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, j_parameters(cm)))
    cm.eval()
    assert tiny.max_diff(tiny.logits(cm, inputs), logits) > 1e-4  # the outputs follow J


def test_frozen_j_merged_in_train_mode_is_allowed(tiny, tmp_path):
    """Only trainable J matrices make a merged model refuse: a loaded, frozen adapter may be
    merged while something else (here the head) trains."""
    model, inputs = tiny.build("bert")
    get_craft_model(model, tiny.config()).save_pretrained(tmp_path)
    cm = CraftModel.from_pretrained(tiny.build("bert")[0], tmp_path)
    cm.merge()
    cm.base_model.classifier.requires_grad_(True)
    cm.train()
    cm(**inputs).loss.backward()
    assert cm.base_model.classifier.weight.grad is not None


def test_harness_trainer_refuses_a_merged_model(sentiment):
    from craft.harness.data import tokenize_task
    from craft.harness.methods import apply_method
    from craft.harness.runconfig import RunConfig, TrainBlock
    from craft.harness.trainer import train

    data = tokenize_task(sentiment.task, sentiment.tokenizer, 32)
    run = RunConfig(method="craft", craft=craft.CraftConfig(2, 8, 8), train=TrainBlock(batch_size=32, max_steps=2, eval_every=2))
    adapted = apply_method(sentiment.bert(), run)
    adapted.model.merge()
    with pytest.raises(RuntimeError, match=r"call unmerge\(\)"):
        train(adapted, data, sentiment.spec, run.train, sentiment.tokenizer, metrics_fn=sentiment.metrics, progress=False)
    assert isinstance(adapted.model.craft_layers()[0], CraftLinear)
