"""Finding a model's target projections and stacking them across layers.

A projection type ("query", "q_proj", "c_attn:v") names one module per layer by suffix. Its
modules, in model order, form a stack of weights (layers, out, in). Fused projections such as
GPT-2's ``c_attn`` (a Conv1D holding q, k and v side by side) are split as ``c_attn:q|k|v``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Site",
    "TargetStack",
    "DEFAULT_TARGETS",
    "DEFAULT_HEADS",
    "find_targets",
    "stack_weights",
    "weights_fingerprint",
    "weights_sketch",
    "sketch_distance",
    "SAME_WEIGHTS_RTOL",
    "is_projection",
    "is_conv1d",
]

# Query / value projections of the common layouts, in order of preference.
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, ELECTRA (and ViT before transformers 5)
    ("q_lin", "v_lin"),  # DistilBERT
    ("q_proj", "v_proj"),  # LLaMA, Mistral, Qwen2 (grouped-query k/v), ViT in transformers 5, OPT, CLIP
    ("c_attn:q", "c_attn:v"),  # GPT-2 fused Conv1D
)
DEFAULT_HEADS: tuple[str, ...] = ("classifier", "score", "pre_classifier", "qa_outputs")
_FUSED_PARTS = {"q": 0, "k": 1, "v": 2}
# Base weights count as the same when every target weight is within this relative distance
# (Frobenius norm) of the one an adapter was saved with: rounding to bf16 moves a weight by at
# most 2^-9 of itself, fp16 by 2^-12, so the same checkpoint in any dtype passes with room to spare.
SAME_WEIGHTS_RTOL = 2.0**-8
_SKETCH_SIZE = 16  # K: a K x K bilinear sketch per weight estimates distances within about 10%
_SKETCH_SEED = 20261130


@dataclass(frozen=True)
class Site:
    """One layer's piece of a projection type: a module and the output rows it contributes."""

    module_name: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class TargetStack:
    """The modules of one projection type across layers and the shape of their stack."""

    name: str
    sites: tuple[Site, ...]
    shape: tuple[int, int, int]  # (layers, out, in)


def is_projection(module: nn.Module) -> bool:
    """True for the module kinds CRAFT can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's projections, weight stored in x out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _out_in(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if isinstance(module, nn.Linear) else (w.shape[1], w.shape[0])


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _resolve(model: nn.Module, target: str) -> TargetStack | None:
    suffix, _, part = target.partition(":")
    if part and part not in _FUSED_PARTS:
        raise ValueError(f"target {target!r}: the part after ':' must be q, k or v (a fused qkv projection split in thirds)")
    sites, shapes, seen = [], [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not _matches(name, suffix):
            continue
        if id(module) in seen:
            raise ValueError(
                f"target {target!r}: {seen[id(module)]} and {name} are one module shared by several layers; CRAFT gives "
                "each layer its own update: give each layer its own module, or leave it out of target_modules"
            )
        seen[id(module)] = name
        if not is_projection(module):
            raise ValueError(
                f"target {target!r} matches {name}, a {type(module).__name__}; CRAFT wraps nn.Linear and "
                "Conv1D projections: name a projection module in target_modules"
            )
        d_out, d_in = _out_in(module)
        rows = None
        if part:
            if d_out % 3:
                raise ValueError(
                    f"target {target!r}: {name} has {d_out} outputs, not three equal q/k/v blocks; name an unfused projection"
                )
            third = d_out // 3
            rows = (_FUSED_PARTS[part] * third, (_FUSED_PARTS[part] + 1) * third)
            d_out = third
        sites.append(Site(name, rows))
        shapes.append((d_out, d_in))
    if not sites:
        return None
    for site, shape in zip(sites, shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"cannot stack target {target!r}: {sites[0].module_name} is {shapes[0][0]}x{shapes[0][1]} (out x in) but "
                f"{site.module_name} is {shape[0]}x{shape[1]}; list in target_modules suffixes that select layers of equal shape"
            )
    return TargetStack(target, tuple(sites), (len(sites), *shapes[0]))


def find_targets(model: nn.Module, target_modules: list[str] | None = None) -> list[TargetStack]:
    """The projection types to adapt, with their modules in layer order.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, usually).
        target_modules: module-name suffixes, or None to detect the query and value
            projections of a known layout.

    Raises:
        ValueError: no target found, a target is not a projection, shapes differ across
            layers, or two targets claim the same rows of a module.
    """
    if target_modules is None:
        for pair in DEFAULT_TARGETS:
            stacks = [_resolve(model, t) for t in pair]
            if all(stacks):
                return stacks  # type: ignore[return-value]
        raise ValueError(
            f"no query/value projections found in {type(model).__name__} (looked for {[list(p) for p in DEFAULT_TARGETS]}); "
            "pass target_modules with the names of its projection modules"
        )
    stacks = []
    for target in target_modules:
        stack = _resolve(model, target)
        if stack is None:
            raise ValueError(
                f"target {target!r} matches no module of {type(model).__name__}; pass target_modules naming existing "
                "projection modules (e.g. 'query', 'q_proj', 'c_attn:q')"
            )
        stacks.append(stack)
    _check_disjoint(stacks)
    return stacks


def _check_disjoint(stacks: list[TargetStack]) -> None:
    claimed: dict[str, list[tuple[tuple[int, int] | None, str]]] = {}
    for stack in stacks:
        for site in stack.sites:
            for rows, other in claimed.get(site.module_name, []):
                if rows is None or site.rows is None or (site.rows[0] < rows[1] and rows[0] < site.rows[1]):
                    raise ValueError(
                        f"targets {other!r} and {stack.name!r} both adapt {site.module_name}; list each projection once"
                    )
            claimed.setdefault(site.module_name, []).append((site.rows, stack.name))


def _site_weight(model: nn.Module, site: Site) -> torch.Tensor:
    module = model.get_submodule(site.module_name)
    module = getattr(module, "base_layer", module)  # a wrapped projection (CRAFT's, peft's): its base
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.T  # (out, in)
    if site.rows is not None:
        weight = weight[site.rows[0] : site.rows[1]]
    return weight.detach()


def stack_weights(model: nn.Module, stack: TargetStack) -> torch.Tensor:
    """The (layers, out, in) tensor of one projection type's weights (a copy)."""
    return torch.stack([_site_weight(model, s) for s in stack.sites])  # (L, d_out, d_in)


def weights_fingerprint(model: nn.Module, stacks: list[TargetStack]) -> str:
    """SHA-256 over the target names, shapes and weight bytes: identifies the base weights.

    The same model loaded twice gives the same fingerprint; any change of a target weight,
    of the targets or of their dtype gives another.
    """
    digest = hashlib.sha256()
    for stack in stacks:
        digest.update(f"{stack.name}|{stack.shape}".encode())
        for site in stack.sites:
            weight = _site_weight(model, site).contiguous().cpu()
            digest.update(f"{site.module_name}|{site.rows}|{weight.dtype}".encode())
            digest.update(weight.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype
    return digest.hexdigest()


def weights_sketch(model: nn.Module, stacks: list[TargetStack]) -> dict[str, torch.Tensor]:
    """Per projection type, a float64 (L, K*K + 1) summary of each layer's weight W_l: the
    bilinear sketch A^T W_l B with fixed Gaussian A (d_out, K) and B (d_in, K), then ||W_l||_F.

    Two weights' sketches differ by about K ||W - W'||_F (:func:`sketch_distance`), so an
    adapter can tell its base weights in another dtype or on another device (a tiny distance)
    from other weights without keeping them. Computed on the CPU in float64.
    """
    sketches = {}
    for stack in stacks:
        _, d_out, d_in = stack.shape
        g = torch.Generator().manual_seed(_SKETCH_SEED)
        a = torch.randn(d_out, _SKETCH_SIZE, generator=g, dtype=torch.float64)  # (d_out, K)
        b = torch.randn(d_in, _SKETCH_SIZE, generator=g, dtype=torch.float64)  # (d_in, K)
        rows = []
        for site in stack.sites:
            w = _site_weight(model, site).to(device="cpu", dtype=torch.float64)  # (d_out, d_in)
            rows.append(torch.cat([(a.T @ w @ b).reshape(-1), w.norm().reshape(1)]))  # (K*K + 1,)
        sketches[stack.name] = torch.stack(rows)  # (L, K*K + 1)
    return sketches


def sketch_distance(found: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> float:
    """The largest relative distance ||W_l - W_saved,l||_F / ||W_saved,l||_F over every target
    weight, estimated from two :func:`weights_sketch` results (inf when the targets differ)."""
    if found.keys() != saved.keys() or any(found[k].shape != saved[k].shape for k in saved):
        return float("inf")
    worst = 0.0
    for name, ref in saved.items():
        # E ||A^T D B||_F^2 = K^2 ||D||_F^2 for Gaussian A, B with K columns each.
        distance = (found[name][:, :-1] - ref[:, :-1]).norm(dim=1) / _SKETCH_SIZE  # (L,)
        worst = max(worst, float((distance / ref[:, -1].clamp_min(1e-300)).max()))
    return worst
