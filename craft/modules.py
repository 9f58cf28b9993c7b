"""Module surgery for the model wrapper: which modules are heads, swapping a submodule, tied storages."""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from .targets import DEFAULT_HEADS, TargetStack

__all__ = ["find_heads", "checkpointing", "frozen_copy", "outermost", "set_submodule", "storage", "shared_storages"]


def find_heads(model: nn.Module, modules_to_save: list[str] | None, stacks: list[TargetStack]) -> list[str]:
    """Names of the head modules to train in full; none may hold an adapted projection."""
    suffixes = modules_to_save if modules_to_save is not None else list(DEFAULT_HEADS)
    heads = [n for n, _ in model.named_modules() if n and any(n == s or n.endswith("." + s) for s in suffixes)]
    if modules_to_save is not None and not heads:
        raise ValueError(f"modules_to_save {modules_to_save} matches no module of the model; name its head modules")
    sites = {site.module_name for stack in stacks for site in stack.sites}
    clash = sorted(h for h in heads for site in sites if site == h or site.startswith(h + "."))
    if clash:
        raise ValueError(
            f"modules_to_save includes {clash[0]}, which holds an adapted projection that CRAFT keeps frozen; "
            "remove it from modules_to_save or from target_modules"
        )
    return heads


def checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has activation checkpointing on (False for other modules)."""
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen."""
    original = copy.deepcopy(module)
    original.requires_grad_(False)
    return original


def outermost(names: list[str]) -> list[str]:
    """The names not inside another of ``names`` (a head nested in a head is swapped with it)."""
    return [n for n in names if not any(n.startswith(m + ".") for m in names)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def storage(t: torch.Tensor) -> int:
    """The address of ``t``'s storage: equal for tensors that share memory."""
    return t.untyped_storage().data_ptr()


def shared_storages(model: nn.Module) -> set[int]:
    """Storages held by more than one parameter slot of ``model`` (tied or shared weights)."""
    counts = Counter(storage(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {ptr for ptr, n in counts.items() if n > 1}
