"""Finding a model's target projections and stacking them across layers.

A target names projection modules by the end of their names: "query", "q_proj",
"SelfAttention.q", or "encoder.block.*.layer.*.SelfAttention.q" ("*" stands for one part of a
name, a layer index). A fused projection's part is "c_attn:q", "query_key_value:v" (see
:mod:`craft.layouts` for the layouts CRAFT can split). Detected targets (none given) are the
query and value projections: :func:`craft.layouts.default_targets`.

A target's modules form stacks of weights (layers, out, in), one per stack of blocks: modules
whose names differ only in their numbers (layer indices) are one stack. An encoder-decoder's
encoder self-attention, decoder self-attention and decoder cross-attention are three stacks. A
target that selects one stack names it; one that selects several (T5's "q") gives each a name
from its modules' names, numbers starred, from the part that holds the layers on:
"encoder.block.*.layer.*.SelfAttention.q", "decoder.layers.*.encoder_attn.q_proj". Each such
name is itself a target that selects that stack alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .layouts import (
    DEFAULT_TARGETS,
    FUSED_PARTS,
    Rows,
    default_targets,
    fused_rows,
    is_conv1d,
    is_projection,
    out_in,
    part_row_indices,
    select_rows,
    starred,
)

__all__ = [
    "Site",
    "TargetStack",
    "DEFAULT_TARGETS",
    "DEFAULT_HEADS",
    "find_targets",
    "module_names",
    "stack_weights",
    "weights_fingerprint",
    "weights_sketch",
    "sketch_distance",
    "SAME_WEIGHTS_RTOL",
    "is_projection",
    "is_conv1d",
]

DEFAULT_HEADS: tuple[str, ...] = ("classifier", "score", "pre_classifier", "qa_outputs")
# Base weights count as the same when every target weight is within this relative distance
# (Frobenius norm) of the one an adapter was saved with: rounding to bf16 moves a weight by at
# most 2^-9 of itself, fp16 by 2^-12, so the same checkpoint in any dtype passes with room to spare.
SAME_WEIGHTS_RTOL = 2.0**-8
_SKETCH_SIZE = 16  # K: a K x K bilinear sketch per weight estimates distances within about 10%
_SKETCH_SEED = 20261130


@dataclass(frozen=True)
class Site:
    """One layer's piece of a projection type: a module and the output rows it contributes.

    ``rows``: None for the whole output, ``(start, stop)`` for a contiguous slice of a fused
    projection, ``(start, stop, period)`` for rows start..stop of every block of ``period`` rows
    (a per-head interleaved fused projection).
    """

    module_name: str
    rows: Rows | None = None


@dataclass(frozen=True)
class TargetStack:
    """The modules of one projection type across layers and the shape of their stack."""

    name: str
    sites: tuple[Site, ...]
    shape: tuple[int, int, int]  # (layers, out, in)


def _matches(name: str, pattern: str) -> bool:
    """Whether ``pattern``'s dot-separated parts end ``name``'s, "*" matching any one part."""
    want, have = pattern.split("."), name.split(".")
    return len(want) <= len(have) and all(w in ("*", h) for w, h in zip(want, have[len(have) - len(want) :]))


def _stack_names(keys: list[str]) -> dict[str, str]:
    """Short unique names for several stacks: each key from the part that holds the layers on
    (``encoder`` of ``transformer.encoder.block.*``), longer where two would be the same."""
    split = {k: k.split(".") for k in keys}
    start = {k: max(0, (parts.index("*") if "*" in parts else len(parts)) - 2) for k, parts in split.items()}
    while True:
        names = {k: ".".join(split[k][start[k] :]) for k in keys}
        clash = {k for k in keys if list(names.values()).count(names[k]) > 1 and start[k] > 0}
        if not clash:
            return names
        for k in clash:
            start[k] -= 1


def _resolve(model: nn.Module, target: str) -> list[TargetStack]:
    pattern, _, part = target.partition(":")
    if part and part not in FUSED_PARTS:
        raise ValueError(f"target {target!r}: the part after ':' must be q, k or v (a fused qkv projection's part)")
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or not _matches(name, pattern):
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
        groups.setdefault(starred(name), []).append((name, module))
    names = {next(iter(groups)): target} if len(groups) == 1 else _stack_names(list(groups))
    suffix = f":{part}" if part and len(groups) > 1 else ""
    return [_stack(model, target, names[key] + suffix, members, part) for key, members in groups.items()]


def _stack(model: nn.Module, target: str, name: str, members: list[tuple[str, nn.Module]], part: str) -> TargetStack:
    sites, shapes = [], []
    for module_name, module in members:
        d_out, d_in = out_in(module)
        rows = fused_rows(model, module_name, target)[part] if part else None
        sites.append(Site(module_name, rows))
        shapes.append((len(part_row_indices(rows, d_out)), d_in))
    for site, shape in zip(sites, shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"cannot stack target {name!r}: {sites[0].module_name} is {shapes[0][0]}x{shapes[0][1]} (out x in) but "
                f"{site.module_name} is {shape[0]}x{shape[1]}; list in target_modules suffixes that select layers of equal shape"
            )
    return TargetStack(name, tuple(sites), (len(sites), *shapes[0]))


def find_targets(model: nn.Module, target_modules: list[str] | None = None) -> list[TargetStack]:
    """The projection stacks to adapt, with their modules in layer order.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, usually).
        target_modules: targets (module-name ends, "*" for a layer index, ":q|k|v" for a
            fused projection's part), or None to detect the query and value projections
            (:func:`craft.layouts.default_targets`).

    Returns:
        One stack per target and stack of blocks: a target whose modules lie in several stacks
        of blocks (an encoder-decoder's self- and cross-attention) gives several.

    Raises:
        ValueError: no target found, a target is not a projection, a fused layout is not
            known, shapes differ across layers, or two targets claim the same rows of a module.
    """
    detected = target_modules is None
    stacks = []
    for target in default_targets(model) if detected else target_modules:
        found = _resolve(model, target)
        if not found:
            raise ValueError(
                f"target {target!r} matches no module of {type(model).__name__}; pass target_modules naming existing "
                "projection modules (e.g. 'query', 'q_proj', 'c_attn:q')"
            )
        stacks.extend(found)
    _check_disjoint(stacks)
    return stacks


def module_names(stacks: list[TargetStack]) -> list[str]:
    """Full names of the modules the stacks adapt, each once, in order: the same projections as
    exact ``target_modules`` for peft (a fused projection counts whole)."""
    return list(dict.fromkeys(site.module_name for stack in stacks for site in stack.sites))


def _check_disjoint(stacks: list[TargetStack]) -> None:
    claimed: dict[str, list[tuple[set[int] | None, str]]] = {}
    for stack in stacks:
        for site in stack.sites:
            rows = None if site.rows is None else set(part_row_indices(site.rows, _d_out_of(site, stack)))
            for other_rows, other in claimed.get(site.module_name, []):
                if rows is None or other_rows is None or rows & other_rows:
                    raise ValueError(
                        f"targets {other!r} and {stack.name!r} both adapt {site.module_name}; list each projection once"
                    )
            claimed.setdefault(site.module_name, []).append((rows, stack.name))


def _d_out_of(site: Site, stack: TargetStack) -> int:
    """How many output rows of a part's module its rows span (the module's d_out for interleaved rows)."""
    lo, hi, *period = site.rows
    return stack.shape[1] // (hi - lo) * period[0] if period else hi


def _site_weight(model: nn.Module, site: Site) -> torch.Tensor:
    module = model.get_submodule(site.module_name)
    module = getattr(module, "base_layer", module)  # a wrapped projection (CRAFT's, peft's): its base
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.T  # (out, in)
    if site.rows is not None:
        weight = select_rows(weight, site.rows)  # (d_part, in)
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
