"""Injecting CRAFT into a model: wrap the targets, freeze the rest, save, load, merge, disable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapter import CraftAdapter
from .config import CraftConfig
from .factors import Factors, check_ranks
from .layer import MERGED_MEMORY_LIMIT, AdapterPart, CraftLinear
from .modules import checkpointing, find_heads, frozen_copy, outermost, set_submodule, shared_storages, storage
from .pretrained import ADAPTER_NAME, FACTORS_NAME, check_base, read_adapter, resolve_adapter_dir, write_adapter
from .targets import TargetStack, find_targets, stack_weights, weights_fingerprint, weights_sketch
from .tucker import Tucker, hosvd

__all__ = ["CraftModel", "get_craft_model", "find_heads", "adapter_dtype", "ADAPTER_NAME", "FACTORS_NAME"]


class CraftModel(nn.Module):
    """A transformers model with CRAFT adapters on its target projections.

    Only the J matrices (``craft_adapters.*``) and the task head (``modules_to_save``) train.
    Calls and unknown attributes go to the wrapped model, so it trains and evaluates like it.
    Build it with :func:`get_craft_model`, or restore a saved adapter with :meth:`from_pretrained`.

    As peft's ``modules_to_save``, the model keeps a frozen copy of each head as it was before
    training (``original_heads``), so that :meth:`disable_adapter` gives the base model's outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CraftConfig,
        factors: Factors | None = None,
        compute: str = "auto",
        merged_memory_limit: int = MERGED_MEMORY_LIMIT,
        *,
        _fingerprint: str | None = None,
    ):
        super().__init__()
        stacks = find_targets(model, config.target_modules)
        check_ranks(stacks, config.ranks)
        fingerprint = _fingerprint or weights_fingerprint(model, stacks)
        if factors is not None:
            _check_factors(factors, stacks, fingerprint)
        reference = model.get_submodule(stacks[0].sites[0].module_name).weight
        dtype = adapter_dtype(config, reference.dtype)
        generator = torch.Generator().manual_seed(config.seed)
        adapters, self._tuckers = [], {}
        for stack in stacks:
            tucker = (
                factors.sliced(stack.name, config.ranks) if factors else hosvd(stack_weights(model, stack).cpu(), config.ranks)
            )
            # Owned, contiguous copies at the adapter's ranks (a cache's slices would pin the whole
            # cache): what save_pretrained stores, and what a load rebuilds the adapter from, bit for bit.
            self._tuckers[stack.name] = tucker = _owned(tucker)
            adapters.append(CraftAdapter(tucker, config.init_scale, generator, dtype))
        self.base_model = model
        self.craft_config = config
        self.fingerprint = fingerprint
        self._sketch: dict[str, torch.Tensor] | None = None  # weights_sketch of the base, made when first needed
        self.target_names = [s.name for s in stacks]
        self.stacks = stacks
        self.craft_adapters = nn.ModuleList(adapters).to(reference.device)
        self.head_names = find_heads(model, config.modules_to_save, stacks)
        self.original_heads = nn.ModuleList(frozen_copy(model.get_submodule(n)) for n in outermost(self.head_names))
        self._wrapped = self._wrap(stacks, compute, merged_memory_limit)
        self._freeze(self.head_names)
        self._input_grads = False
        self._unloaded = False
        self._hook = model.register_forward_pre_hook(self._refresh)

    @property
    def sketch(self) -> dict[str, torch.Tensor]:
        """:func:`~craft.targets.weights_sketch` of the base target weights, saved with the adapter so
        that loading can tell the same base in another dtype. Made on first use (a save, or the
        first :meth:`merge`, before the weights change), not at every wrap."""
        if self._sketch is None:
            self._sketch = weights_sketch(self.base_model, self.stacks)
        return self._sketch

    def _refresh(self, module: nn.Module, _args) -> None:
        if module.training and torch.is_grad_enabled() and any(layer.merged for layer in self._wrapped.values()):
            if any(p.requires_grad for p in self.craft_adapters.parameters()):
                raise RuntimeError(
                    "the CRAFT updates are merged into the base weights, so training would not update the J matrices; "
                    "call unmerge() before training (and merge() again for inference)"
                )
        # New per-pass tensors for every model call, made before any (checkpointed) layer runs.
        for adapter in self.craft_adapters:
            adapter.new_pass()
        if not self._input_grads and torch.is_grad_enabled() and checkpointing(self.base_model):
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

    def _wrap(self, stacks: list[TargetStack], compute: str, memory_limit: int) -> dict[str, CraftLinear]:
        parts: dict[str, list[AdapterPart]] = {}
        for adapter, stack in zip(self.craft_adapters, stacks):
            for layer, site in enumerate(stack.sites):
                parts.setdefault(site.module_name, []).append(AdapterPart(adapter, layer, site.rows))
        # What the merged path holds for one step: every adapted projection's effective weight.
        elements = sum(self.base_model.get_submodule(name).weight.numel() for name in parts)
        wrapped = {}
        for name, module_parts in parts.items():
            layer = CraftLinear(self.base_model.get_submodule(name), module_parts, compute, elements, memory_limit)
            set_submodule(self.base_model, name, layer)
            wrapped[name] = layer
        return wrapped

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

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as peft's ``PeftModel`` counts them.

        Every parameter of this module once (tied ones once): the base model's, the J matrices
        and the frozen copies of the heads (as peft counts a ``modules_to_save`` head twice);
        the frozen factors are buffers and not counted.
        """
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: X || all params: Y || trainable%: Z`` in peft's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def merge(self) -> None:
        """Merge every update into its base weight (inference at base-model cost).

        A weight shared with another module (tied weights) is not written into: its projection
        gets a merged copy of its own, so the merged model computes what the adapted one does.
        While merged, a forward in training mode with gradients on and J trainable raises (J
        would get no gradient): :meth:`unmerge` before training.
        """
        self._merge(self.craft_layers())

    def _merge(self, layers: list[CraftLinear]) -> None:
        self.sketch  # noqa: B018 - of the base weights, before they change
        shared = shared_storages(self.base_model)
        for layer in layers:
            layer.merge(untie=storage(layer.base_layer.weight) in shared)

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        for layer in self.craft_layers():
            layer.unmerge()

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Merge the updates and return the plain transformers model, wrappers removed."""
        self.merge()
        for name, layer in self._wrapped.items():
            set_submodule(self.base_model, name, layer.base_layer)
        self._hook.remove()
        self._unloaded = True
        return self.base_model

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs, as peft's ``disable_adapter``.

        The wrapped projections give way to their base layers and each head to its frozen copy
        from before training (nothing is written into a weight that autograd may have saved).
        A merged model is unmerged for the block (peft unmerges too) and merged again on exit.
        Everything is restored on exit, also when the block raises.

        Raises:
            ValueError: after :meth:`merge_and_unload`, which removed the adapter.
        """
        if self._unloaded:
            raise ValueError(
                "merge_and_unload() has removed the adapter: the model it returned is the merged one; "
                "load the base model again for the base model's outputs"
            )
        merged = [layer for layer in self._wrapped.values() if layer.merged]
        for layer in merged:
            layer.unmerge()
        swapped: list[tuple[str, nn.Module]] = []  # (name, the module to put back)
        try:
            for name, layer in self._wrapped.items():
                swapped.append((name, set_submodule(self.base_model, name, layer.base_layer)))
            for name, original in zip(outermost(self.head_names), self.original_heads):
                swapped.append((name, set_submodule(self.base_model, name, original)))
            yield
        finally:
            for name, module in reversed(swapped):
                set_submodule(self.base_model, name, module)
            self._merge(merged)

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

    def factors(self) -> Factors:
        """The HOSVD factors the adapter was built on, at its ranks (float64, on the CPU)."""
        return Factors(list(self.stacks), dict(self._tuckers), self.craft_config.ranks, self.fingerprint)

    def save_pretrained(self, directory: str | Path, save_factors: bool = True) -> Path:
        """Write the adapter directory: config, J matrices and head (safetensors), base fingerprint.

        Args:
            directory: created if missing.
            save_factors: also write the factors at the adapter's ranks (``craft_factors.safetensors``,
                float64: per projection type r_L r_out r_in + L r_L + d_out r_out + d_in r_in
                floats plus the spectra), so that loading runs no HOSVD; False leaves them out and
                :meth:`from_pretrained` recomputes them from the base weights.
        """
        factors = self.factors() if save_factors else None
        return write_adapter(
            directory, self.craft_config, self.adapter_state_dict(), self.sketch, self.fingerprint, self.target_names, factors
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path_or_id: str | Path,
        is_trainable: bool = False,
        *,
        factors: Factors | None = None,
        force: bool = False,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
        compute: str = "auto",
        merged_memory_limit: int = MERGED_MEMORY_LIMIT,
    ) -> CraftModel:
        """Restore an adapter saved by :meth:`save_pretrained` onto its base ``model``, as peft's
        ``PeftModel.from_pretrained``.

        ``model`` may hold the base weights in another dtype or on another device: it counts as
        the same base when every target weight is within :data:`~craft.targets.SAME_WEIGHTS_RTOL`
        (relative Frobenius distance) of the saved one's. The stored factors are used when the
        directory has them (no HOSVD); older directories without them recompute the HOSVD.

        Args:
            model: the base model the adapter was trained on; modified in place.
            path_or_id: a local adapter directory, or a Hugging Face Hub repository id (only the
                adapter's files are fetched; ``HF_HUB_OFFLINE=1`` reads the hub cache only).
            is_trainable: False (peft's default): J and the heads are frozen and the model is in
                eval mode, for inference; True: they train, as after :func:`get_craft_model`.
            factors: precomputed factors (a sweep's cache) to slice instead of the stored ones.
            force: load onto weights that are not the adapter's base (a warning instead of an error).
            revision, cache_dir, token: passed to ``huggingface_hub`` for a hub id.
            compute, merged_memory_limit: as in :func:`get_craft_model`.

        Raises:
            ValueError: the directory holds no adapter, the hub id cannot be fetched, or ``model``
                is not the base model the adapter was trained on (and ``force`` is False).
        """
        saved = read_adapter(resolve_adapter_dir(path_or_id, revision, cache_dir, token))
        stacks = find_targets(model, saved.config.target_modules)
        found = weights_fingerprint(model, stacks)
        found_sketch = check_base(saved, model, stacks, found, force)
        if factors is None and saved.factors is not None:
            factors = saved.factors.rebound(stacks, found)  # checked above: the same base, or forced
        craft = cls(model, saved.config, factors, compute, merged_memory_limit, _fingerprint=found)
        craft._sketch = found_sketch  # None: made when first needed
        craft.load_adapter_state_dict(saved.state)
        if not is_trainable:
            craft.requires_grad_(False)
            craft.eval()
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


def adapter_dtype(config: CraftConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The working dtype of the J matrices and factors for ``config`` on a model of ``model_dtype``."""
    if config.adapter_dtype == "auto":
        return torch.float64 if model_dtype == torch.float64 else torch.float32
    if config.adapter_dtype == "model":
        return model_dtype
    return getattr(torch, config.adapter_dtype)


def _owned(tucker: Tucker) -> Tucker:
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.clone(memory_format=torch.contiguous_format)

    return Tucker(own(tucker.core), [own(f) for f in tucker.factors], [own(s) for s in tucker.spectra])


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
