"""One harness for CRAFT and its baselines: build the adapted model, count, group, save, merge.

Every method adapts the same projections (CRAFT's targets, detected from the layout unless a block
names others) and trains the same task head in full, so a Pareto plot of score against adapter
parameters compares like with like:

* ``craft``: :func:`craft.get_craft_model`.
* ``lora``: peft LoRA of rank r on each target.
* ``pissa``: peft LoRA initialised from the principal singular vectors of each target weight,
  ``init_lora_weights="pissa_niter_4"``: a fast randomized SVD (4 subspace iterations), not an
  exact one; the base weights become the residual W - A B.
* ``vera``: peft VeRA, shared frozen random projections and trained scaling vectors.
* ``head``: the task head alone, everything else frozen.

peft adapts whole modules: GPT-2's fused ``c_attn`` (CRAFT's ``c_attn:q`` and ``c_attn:v``)
becomes one ``c_attn`` target for the baselines, which therefore also adapt the key slice.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..factors import Factors
from ..model import CraftModel, find_heads, get_craft_model
from ..targets import find_targets, is_conv1d, module_names
from .runconfig import RunConfig

__all__ = ["AdaptedModel", "apply_method", "parameter_groups", "save_adapter", "merged_model", "HEAD_WEIGHTS_NAME"]

HEAD_WEIGHTS_NAME = "head_model.safetensors"  # what save_adapter writes for the head-only method


@dataclass
class AdaptedModel:
    """A model ready to fine-tune and how many parameters it trains.

    Attributes:
        model: the wrapped model (a :class:`CraftModel`, a peft ``PeftModel``, or the model
            itself for ``head``); call it like the transformers model.
        method: craft, lora, pissa, vera or head.
        adapter_parameters: trainable parameters outside the task head.
        head_parameters: trainable parameters of the task head (counted once).
        head_parameter_names: names (as in ``model.named_parameters()``) of the trainable head
            parameters.
        initial_adapter: pissa only: the adapter right after initialisation, kept so that
            :func:`save_adapter` can write a plain LoRA adapter for the original base model.
    """

    model: nn.Module
    method: str
    adapter_parameters: int
    head_parameters: int
    head_parameter_names: frozenset[str] = frozenset()
    initial_adapter: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def apply_method(model: nn.Module, run: RunConfig, *, factors: Factors | None = None) -> AdaptedModel:
    """Wrap ``model`` with ``run.method``'s adapter; only the adapter and the head train.

    Heads are the modules CRAFT trains in full: ``run.craft.modules_to_save`` when a craft block
    is given, else the usual heads (``classifier``, ``score``, ``pre_classifier``,
    ``qa_outputs``) that the model has. peft methods get them as ``modules_to_save``. peft
    adapters are initialised under ``run.train.seed`` without touching the global RNG.

    Args:
        model: a transformers model; modified in place.
        run: the run config (method and its block; ``craft`` also sets the heads).
        factors: precomputed CRAFT factors (method craft only).

    Returns:
        The :class:`AdaptedModel` with its parameter counts.

    Raises:
        ValueError: no targets or no head found, or a target that is not a projection.
    """
    heads_setting = run.craft.modules_to_save if run.craft is not None else None
    if run.method == "craft":
        wrapped = get_craft_model(model, run.craft, factors)
        heads = [wrapped.base_model.get_submodule(h) for h in wrapped.head_names]
        adapted = _counted(wrapped, "craft", heads)
        if adapted.adapter_parameters != wrapped.num_adapter_parameters():
            raise AssertionError("CRAFT adapter count differs from num_adapter_parameters(): a base weight is trainable")
        return adapted
    if run.method == "head":
        names = find_heads(model, heads_setting, [])
        if not names:
            raise ValueError(f"method head found no head module in {type(model).__name__}; name it in craft.modules_to_save")
        for p in model.parameters():
            p.requires_grad_(False)
        heads = [model.get_submodule(n) for n in names]
        for p in (p for h in heads for p in h.parameters()):
            p.requires_grad_(True)
        return _counted(model, "head", heads)
    return _apply_peft(model, run, heads_setting)


def _apply_peft(model: nn.Module, run: RunConfig, heads_setting: list[str] | None) -> AdaptedModel:
    import peft  # deferred: a heavy import that CRAFT alone does not need

    block = run.method_block()
    stacks = find_targets(model, block.target_modules)
    targets = module_names(stacks)  # exact names: c_attn:q, c_attn:v -> the whole c_attn of each layer
    conv1d = any(is_conv1d(model.get_submodule(site.module_name)) for s in stacks for site in s.sites)
    heads = find_heads(model, heads_setting, stacks) or None
    if run.method == "vera":
        config = peft.VeraConfig(r=block.r, target_modules=targets, modules_to_save=heads, fan_in_fan_out=conv1d)
    else:
        init = "pissa_niter_4" if run.method == "pissa" else True
        config = peft.LoraConfig(
            r=block.r,
            lora_alpha=block.alpha,
            lora_dropout=getattr(block, "dropout", 0.0),
            target_modules=targets,
            modules_to_save=heads,
            init_lora_weights=init,
            fan_in_fan_out=conv1d,
        )
    with _seeded(run.train.seed, model):
        wrapped = peft.get_peft_model(model, config)
    saved = [m for m in wrapped.modules() if isinstance(m, peft.utils.other.ModulesToSaveWrapper)]
    if len(saved) != len(heads or []):
        raise ValueError(f"peft wrapped {len(saved)} head modules for heads {heads}: another module's name ends like a head's")
    copies = [m.modules_to_save[m.active_adapter] for m in saved]  # the trainable copy of each head
    adapted = _counted(wrapped, run.method, copies)
    if run.method == "pissa":
        state = peft.get_peft_model_state_dict(wrapped)
        adapted.initial_adapter = {k: v.detach().clone() for k, v in state.items()}
    return adapted


class _seeded:
    """Run a block under a fixed torch seed and restore the global RNG afterwards."""

    def __init__(self, seed: int, model: nn.Module):
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        self._fork = torch.random.fork_rng(devices=devices)
        self._seed = seed

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)


def _counted(model: nn.Module, method: str, heads: list[nn.Module]) -> AdaptedModel:
    head_ids = {id(p) for h in heads for p in h.parameters()}
    adapter, head, names = 0, 0, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            head += p.numel()
            names.add(name)
        else:
            adapter += p.numel()
    return AdaptedModel(model, method, adapter, head, frozenset(names))


def parameter_groups(adapted: AdaptedModel, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``adapter`` at ``lr`` and ``head`` at ``head_lr``.

    Empty groups are dropped; each group carries its ``name``. Every trainable parameter is in
    exactly one group.
    """
    adapter, head = [], []
    for name, p in adapted.model.named_parameters():
        if p.requires_grad:
            (head if name in adapted.head_parameter_names else adapter).append(p)
    groups = [
        {"name": "adapter", "params": adapter, "lr": lr, "weight_decay": weight_decay},
        {"name": "head", "params": head, "lr": head_lr, "weight_decay": weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in adapted.model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, "a trainable parameter is in no group or two"
    return groups


def save_adapter(adapted: AdaptedModel, directory: str | Path, save_factors: bool = True) -> Path:
    """Write the trained adapter and head as safetensors (plus the method's config) to ``directory``.

    craft: :meth:`CraftModel.save_pretrained`, with the HOSVD factors unless ``save_factors`` is off. lora, vera: peft's ``save_pretrained``. pissa:
    converted by peft into a plain LoRA adapter of rank 2r that applies to the *original* base
    weights (not the residual ones). head: the head's weights in ``head_model.safetensors``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = adapted.model
    if adapted.method == "craft":
        return model.save_pretrained(directory, save_factors=save_factors)
    if adapted.method == "head":
        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n in adapted.head_parameter_names}
        save_file(state, str(directory / HEAD_WEIGHTS_NAME), metadata={"method": "head", "names": json.dumps(sorted(state))})
        return directory
    if adapted.method == "pissa" and adapted.initial_adapter is not None:
        from peft import get_peft_model_state_dict

        with tempfile.TemporaryDirectory() as tmp, _seeded(0, model):
            initial = Path(tmp) / "initial"
            config = copy.deepcopy(model.peft_config["default"])
            config.init_lora_weights = True  # loading it must not decompose the residual again
            config.save_pretrained(str(initial))
            tensors = {k: v.contiguous().cpu() for k, v in adapted.initial_adapter.items()}
            save_file(tensors, str(initial / "adapter_model.safetensors"), metadata={"format": "pt"})
            model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(initial))
        # peft 0.21's conversion keeps only lora_A / lora_B: put the trained head back.
        path = directory / "adapter_model.safetensors"
        tensors = load_file(str(path))
        head = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items() if k not in tensors}
        save_file({**tensors, **head}, str(path), metadata={"format": "pt"})
        return directory
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def merged_model(adapted: AdaptedModel) -> nn.Module:
    """The plain transformers model with the adapter merged into its weights (zero overhead).

    Merges in place: ``adapted.model`` must not be trained or saved as an adapter afterwards.
    """
    if adapted.method == "head":
        return adapted.model
    if adapted.method == "craft":
        assert isinstance(adapted.model, CraftModel)
    return adapted.model.merge_and_unload()
