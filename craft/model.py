"""Injecting CRAFT into a model: wrap the targets, freeze the rest, save, load, merge."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import CraftAdapter
from .config import CraftConfig
from .factors import Factors, check_ranks
from .layer import MERGED_MEMORY_LIMIT, AdapterPart, CraftLinear
from .targets import (
    DEFAULT_HEADS,
    SAME_WEIGHTS_RTOL,
    TargetStack,
    find_targets,
    sketch_distance,
    stack_weights,
    weights_fingerprint,
    weights_sketch,
)
from .tucker import hosvd

__all__ = ["CraftModel", "get_craft_model", "find_heads", "adapter_dtype", "ADAPTER_NAME"]

ADAPTER_NAME = "adapter_model.safetensors"
_FORMAT = "craft-adapter/1"
_SKETCH_PREFIX = "base_sketch."  # weights_sketch of the base, saved beside the J matrices


class CraftModel(nn.Module):
    """A transformers model with CRAFT adapters on its target projections.

    Only the J matrices (``craft_adapters.*``) and the task head (``modules_to_save``) train.
    Calls and unknown attributes go to the wrapped model, so it trains and evaluates like it.
    Build it with :func:`get_craft_model`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CraftConfig,
        factors: Factors | None = None,
        compute: str = "auto",
        merged_memory_limit: int = MERGED_MEMORY_LIMIT,
    ):
        super().__init__()
        stacks = find_targets(model, config.target_modules)
        check_ranks(stacks, config.ranks)
        fingerprint = weights_fingerprint(model, stacks)
        if factors is not None:
            _check_factors(factors, stacks, fingerprint)
        reference = model.get_submodule(stacks[0].sites[0].module_name).weight
        dtype = adapter_dtype(config, reference.dtype)
        generator = torch.Generator().manual_seed(config.seed)
        adapters = []
        for stack in stacks:
            tucker = (
                factors.sliced(stack.name, config.ranks) if factors else hosvd(stack_weights(model, stack).cpu(), config.ranks)
            )
            adapters.append(CraftAdapter(tucker, config.init_scale, generator, dtype))
        self.base_model = model
        self.craft_config = config
        self.fingerprint = fingerprint
        self._sketch: dict[str, torch.Tensor] | None = None  # weights_sketch of the base, made when first needed
        self.target_names = [s.name for s in stacks]
        self.stacks = stacks
        self.craft_adapters = nn.ModuleList(adapters).to(reference.device)
        self.head_names = find_heads(model, config.modules_to_save, stacks)
        self._wrap(stacks, compute, merged_memory_limit)
        self._freeze(self.head_names)
        self._input_grads = False
        self._hook = model.register_forward_pre_hook(self._refresh)

    @property
    def sketch(self) -> dict[str, torch.Tensor]:
        """:func:`~craft.targets.weights_sketch` of the base target weights, saved with the adapter so
        that loading can tell the same base in another dtype. Made on first use (a save, or the
        first :meth:`merge`, before the weights change), not at every wrap."""
        if self._sketch is None:
            self._sketch = weights_sketch(self.base_model, self.stacks)
        return self._sketch

    def _refresh(self, *_) -> None:
        # New per-pass tensors for every model call, made before any (checkpointed) layer runs.
        for adapter in self.craft_adapters:
            adapter.new_pass()
        if not self._input_grads and torch.is_grad_enabled() and _checkpointing(self.base_model):
            # Reentrant checkpointing back-propagates through a layer only when its input requires
            # grad; frozen embeddings (a vision model's patches) give none, so J would get none.
            # transformers does this for text models only; every transformers model offers it.
            enable = getattr(self.base_model, "enable_input_require_grads", None)
            if enable is not None:
                enable()
            self._input_grads = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def _wrap(self, stacks: list[TargetStack], compute: str, memory_limit: int) -> None:
        parts: dict[str, list[AdapterPart]] = {}
        for adapter, stack in zip(self.craft_adapters, stacks):
            for layer, site in enumerate(stack.sites):
                parts.setdefault(site.module_name, []).append(AdapterPart(adapter, layer, site.rows))
        # What the merged path holds for one step: every adapted projection's effective weight.
        elements = sum(self.base_model.get_submodule(name).weight.numel() for name in parts)
        for name, module_parts in parts.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, CraftLinear(getattr(parent, child), module_parts, compute, elements, memory_limit))

    def _freeze(self, heads: list[str]) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for name in heads:
            for p in self.base_model.get_submodule(name).parameters():
                p.requires_grad_(True)

    def craft_layers(self) -> list[CraftLinear]:
        """Every wrapped projection, in model order."""
        return [m for m in self.base_model.modules() if isinstance(m, CraftLinear)]

    def num_adapter_parameters(self) -> int:
        """Trainable adapter parameters: n_p * (rank_layers^2 + rank_out^2 + rank_in^2)."""
        return sum(p.numel() for p in self.craft_adapters.parameters())

    def num_head_parameters(self) -> int:
        """Parameters of the task head (trained in full, counted apart from the adapter)."""
        return sum(p.numel() for n in self.head_names for p in self.base_model.get_submodule(n).parameters())

    def merge(self) -> None:
        """Merge every update into its base weight (inference at base-model cost).

        A weight shared with another module (tied weights) is not written into: its projection
        gets a merged copy of its own, so the merged model computes what the adapted one does.
        """
        self.sketch  # noqa: B018 - of the base weights, before they change
        shared = _shared_storages(self.base_model)
        for layer in self.craft_layers():
            layer.merge(untie=_storage(layer.base_layer.weight) in shared)

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        for layer in self.craft_layers():
            layer.unmerge()

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Merge the updates and return the plain transformers model, wrappers removed."""
        self.merge()
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, CraftLinear):
                parent_name, _, child = name.rpartition(".")
                parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
                setattr(parent, child, module.base_layer)
        self._hook.remove()
        return self.base_model

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """J matrices by ``{target}.j_{axis}`` and head weights by ``head.{name}``."""
        state = {}
        for name, adapter in zip(self.target_names, self.craft_adapters):
            for axis in ("layers", "out", "in"):
                state[f"{name}.j_{axis}"] = getattr(adapter, f"j_{axis}").detach()
        for head in self.head_names:
            for key, value in self.base_model.get_submodule(head).state_dict().items():
                state[f"head.{head}.{key}"] = value.detach()
        return state

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the J matrices and head (safetensors), the config and the base fingerprint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.craft_config.save(directory)
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        tensors.update({f"{_SKETCH_PREFIX}{name}": sketch for name, sketch in self.sketch.items()})
        meta = {"format": _FORMAT, "fingerprint": self.fingerprint, "targets": json.dumps(self.target_names)}
        save_file(tensors, str(directory / ADAPTER_NAME), metadata=meta)
        return directory

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, factors: Factors | None = None) -> CraftModel:
        """Restore an adapter saved by :meth:`save_pretrained` onto its base ``model``.

        ``model`` may hold the base weights in another dtype or on another device: it counts as
        the same base when every target weight is within :data:`~craft.targets.SAME_WEIGHTS_RTOL`
        (relative Frobenius distance) of the saved one's.

        Raises:
            ValueError: the directory holds no adapter, or ``model`` is not the base model
                the adapter was trained on (its target weights differ).
        """
        directory = Path(directory)
        path = directory / ADAPTER_NAME
        if not path.is_file():
            raise ValueError(f"no {ADAPTER_NAME} in {directory}; pass a directory written by CraftModel.save_pretrained")
        config = CraftConfig.load(directory)
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a CRAFT adapter ({_FORMAT}); save it with CraftModel.save_pretrained")
        sketch = {k.removeprefix(_SKETCH_PREFIX): tensors.pop(k) for k in list(tensors) if k.startswith(_SKETCH_PREFIX)}
        stacks = find_targets(model, config.target_modules)
        found, found_sketch = weights_fingerprint(model, stacks), None
        if found != meta["fingerprint"]:
            found_sketch = weights_sketch(model, stacks) if sketch else None
            distance = sketch_distance(found_sketch, sketch) if sketch else float("inf")
            if distance > SAME_WEIGHTS_RTOL:
                away = f"a target weight is {distance:.2%} away" if distance < float("inf") else "the weights differ"
                raise ValueError(
                    f"the adapter in {directory} was trained on another base model ({away}; the same base in another "
                    f"dtype is within {SAME_WEIGHTS_RTOL:.2%}); load it onto the model it was saved from"
                )
        craft = cls(model, config, factors)
        craft._sketch = found_sketch  # None: made when first needed
        craft.load_adapter_state_dict(tensors)
        return craft

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy J matrices and head weights from :meth:`adapter_state_dict`'s layout."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"adapter weights missing {missing[:4]}; save and load with the same config")
        for key, target in own.items():
            if state[key].shape != target.shape:
                raise ValueError(f"adapter weight {key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[key].to(target.dtype))


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


def adapter_dtype(config: CraftConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The working dtype of the J matrices and factors for ``config`` on a model of ``model_dtype``."""
    if config.adapter_dtype == "auto":
        return torch.float64 if model_dtype == torch.float64 else torch.float32
    if config.adapter_dtype == "model":
        return model_dtype
    return getattr(torch, config.adapter_dtype)


def _checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has activation checkpointing on (False for other modules)."""
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _shared_storages(model: nn.Module) -> set[int]:
    """Storages held by more than one parameter slot of ``model`` (tied or shared weights)."""
    counts = Counter(_storage(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {ptr for ptr, n in counts.items() if n > 1}


def _check_factors(factors: Factors, stacks: list[TargetStack], fingerprint: str) -> None:
    if factors.target_names != [s.name for s in stacks]:
        raise ValueError(
            f"factors cover targets {factors.target_names}, the config asks for {[s.name for s in stacks]}; recompute the factors"
        )
    if factors.fingerprint != fingerprint:
        raise ValueError("factors were computed from other base weights (fingerprint differs); recompute them for this model")


def get_craft_model(
    model: nn.Module,
    config: CraftConfig,
    factors: Factors | None = None,
    compute: str = "auto",
    merged_memory_limit: int = MERGED_MEMORY_LIMIT,
) -> CraftModel:
    """Wrap ``model`` with CRAFT adapters.

    Args:
        model: a transformers model (any ``nn.Module`` with Linear / Conv1D projections).
        config: ranks, targets, initialisation.
        factors: precomputed :class:`Factors` at ranks >= the config's (sliced, not
            recomputed); None decomposes the targets here.
        compute: "auto" (cheaper path per batch shape), "factored" or "merged".
        merged_memory_limit: bytes the merged path may hold for one step under "auto" (one
            effective weight per adapted projection); above it "auto" stays factored.

    Returns:
        The :class:`CraftModel`; the input model is modified in place.
    """
    return CraftModel(model, config, factors, compute, merged_memory_limit)
