"""Adapter parameter counts from a method's settings and a model's shapes, without building it.

A search prices a configuration before sampling its last rank (the parameter budget bounds it),
so the counts are closed forms. Each matches what :func:`craft.harness.methods.apply_method` trains
outside the head (checked in the tests):

- CRAFT: ``n_types * (rank_layers^2 + rank_out^2 + rank_in^2)``, n_types the stacks :func:`find_targets`
  gives (an encoder-decoder's q and v: 6, encoder self, decoder self and decoder cross-attention)
- LoRA / PiSSA: ``r * sum(in + out)`` over the adapted modules, each once (a fused module counts whole,
  whether CRAFT splits it in thirds or per head)
- VeRA: ``sum(r + out)`` over the adapted modules (two scaling vectors each)
- head: 0
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .targets import TargetStack, find_targets, is_conv1d

__all__ = ["craft_parameters", "module_shapes", "method_parameters"]


def craft_parameters(num_types: int, ranks: Sequence[int]) -> int:
    """CRAFT's trainable count: one square matrix per mode and projection type."""
    return num_types * sum(int(r) ** 2 for r in ranks)


def module_shapes(model: nn.Module, stacks: list[TargetStack]) -> list[tuple[int, int]]:
    """(in_features, out_features) of every distinct module the stacks touch, in model order."""
    shapes: dict[str, tuple[int, int]] = {}
    for stack in stacks:
        for site in stack.sites:
            module = model.get_submodule(site.module_name)
            rows, cols = module.weight.shape  # Linear: (out, in); Conv1D: (in, out)
            shapes.setdefault(site.module_name, (rows, cols) if is_conv1d(module) else (cols, rows))
    return list(shapes.values())


def method_parameters(method: str, block: object, model: nn.Module) -> int:
    """Adapter parameters that ``method`` with settings ``block`` trains on ``model``.

    Args:
        method: craft, lora, pissa, vera or head.
        block: the method's block (:class:`~craft.config.CraftConfig`, ``LoraBlock``, ...);
            ignored for head.
        model: the base model (only its target shapes are read).
    """
    if method == "head":
        return 0
    stacks = find_targets(model, getattr(block, "target_modules", None))
    if method == "craft":
        return craft_parameters(len(stacks), block.ranks)
    shapes = module_shapes(model, stacks)
    if method in ("lora", "pissa"):
        return block.r * sum(i + o for i, o in shapes)
    if method == "vera":
        return sum(block.r + o for _, o in shapes)
    raise ValueError(f"unknown method {method!r}")
