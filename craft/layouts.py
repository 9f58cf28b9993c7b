"""Where a model keeps its query and value projections, and how fused q/k/v projections are laid out.

Default targets come first from peft's own table of LoRA targets per model type
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, read at run time), keeping its query and
value projections, then from :data:`DEFAULT_TARGETS` for the model types peft does not list.

A fused projection (one module computing q, k and v) is split into its parts only where the layout
of the parts inside its output is known exactly (:data:`FUSED_LAYOUTS`): GPT-2's contiguous
thirds, GPT-NeoX's and BLOOM's per-head interleaving, Falcon's grouped layout, Phi-3's unequal
blocks, ... Any other fused module is refused in one line that names it and the way out.

A part's output rows are ``(start, stop)``, or ``(start, stop, period)`` for rows start..stop of
every block of ``period`` rows (per-head interleaving); :func:`select_rows`, :func:`add_rows_`
and :func:`spread_rows` read, update and place them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Rows",
    "DEFAULT_TARGETS",
    "QUERY_NAMES",
    "VALUE_NAMES",
    "FUSED_LAYOUTS",
    "FUSED_PARTS",
    "starred",
    "default_targets",
    "fused_rows",
    "is_projection",
    "is_conv1d",
    "out_in",
    "select_rows",
    "add_rows_",
    "spread_rows",
    "part_row_indices",
]

Rows = tuple[int, int] | tuple[int, int, int]

# Query / value projections of the layouts peft does not list, in order of preference.
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, ELECTRA (and ViT before transformers 5)
    ("q_lin", "v_lin"),  # DistilBERT
    ("q_proj", "v_proj"),  # LLaMA, Mistral, Qwen2 (grouped-query k/v), ViT in transformers 5, OPT, CLIP
    ("c_attn:q", "c_attn:v"),  # GPT-2 family fused Conv1D
    ("qkv_proj:q", "qkv_proj:v"),  # Phi-3: q | k | v blocks of unequal size (grouped-query k/v)
)
# The names peft's table uses for a query or a value projection (the last part of a module name).
QUERY_NAMES = frozenset({"q", "q_proj", "query", "query_proj", "q_lin"})
VALUE_NAMES = frozenset({"v", "v_proj", "value", "value_proj", "v_lin"})
# Module names that hold q, k and v in one output.
FUSED_NAMES = frozenset({"c_attn", "query_key_value", "Wqkv", "qkv_proj", "qkv", "in_proj"})
FUSED_PARTS = ("q", "k", "v")  # the parts a fused projection is split into


def is_projection(module: nn.Module) -> bool:
    """True for the module kinds CRAFT can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's projections, weight stored in x out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a projection (``Conv1D`` stores its weight in x out)."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if isinstance(module, nn.Linear) else (w.shape[1], w.shape[0])


# ----------------------------------------------------------------------------- fused layouts


def _blocks(d_out: int, blocks: int, widths: tuple[int, int, int], order: str = "qkv") -> dict[str, Rows]:
    """Rows of q, k and v when the output is ``blocks`` equal blocks, each holding the parts in
    ``order`` with ``widths`` (in units of d_out / (blocks * sum(widths)) rows, a head's size)."""
    units = blocks * sum(widths)
    if d_out % units:
        raise ValueError(f"{d_out} outputs do not split into {blocks} blocks of q/k/v widths {widths}")
    unit, period = d_out // units, d_out // blocks
    rows, start = {}, 0
    for part in order:
        width = widths[FUSED_PARTS.index(part)] * unit
        rows[part] = (start, start + width) if blocks == 1 else (start, start + width, period)
        start += width
    return rows


def _heads(config) -> int:
    return int(config.num_attention_heads)


def _falcon(config, attention: nn.Module, d_out: int) -> dict[str, Rows]:
    heads = _heads(config)
    if config.new_decoder_architecture:  # per kv head: its group of query heads, then k, then v
        groups = int(config.num_kv_heads)
        return _blocks(d_out, groups, (heads // groups, 1, 1))
    if config.multi_query:  # all query heads, then one k head, then one v head
        return _blocks(d_out, 1, (heads, 1, 1))
    return _blocks(d_out, heads, (1, 1, 1))  # per head: q, k, v


def _gpt_bigcode(config, attention: nn.Module, d_out: int) -> dict[str, Rows]:
    if config.multi_query:  # all query heads, then one k head, then one v head
        return _blocks(d_out, 1, (_heads(config), 1, 1))
    return _blocks(d_out, _heads(config), (1, 1, 1))  # view(heads, 3 * head_dim).split


def _thirds(config, attention: nn.Module, d_out: int) -> dict[str, Rows]:
    return _blocks(d_out, 1, (1, 1, 1))


def _per_head(config, attention: nn.Module, d_out: int) -> dict[str, Rows]:
    return _blocks(d_out, _heads(config), (1, 1, 1))


def _codegen(config, attention: nn.Module, d_out: int) -> dict[str, Rows]:
    # interleaved across the model-parallel shards CodeGen was trained with; each shard holds q, v, k
    return _blocks(d_out, int(getattr(attention, "mp_num", 4)), (1, 1, 1), order="qvk")


def _phi3(config, attention: nn.Module, d_out: int) -> dict[str, Rows]:
    return _blocks(d_out, 1, (_heads(config), int(config.num_key_value_heads), int(config.num_key_value_heads)))


# (model type, module name) -> rows of q, k, v from (config, attention module, d_out). Each entry
# mirrors how that model's attention splits the fused output (transformers' modeling_<type>.py).
FUSED_LAYOUTS: dict[tuple[str, str], Callable[..., dict[str, Rows]]] = {
    ("gpt2", "c_attn"): _thirds,  # split(embed_dim, dim=2)
    ("mpt", "Wqkv"): _thirds,  # chunk(3, dim=2)
    ("gpt_neox", "query_key_value"): _per_head,  # view(..., heads, 3 * head_size).chunk(3)
    ("bloom", "query_key_value"): _per_head,  # view(..., heads, 3, head_dim)
    ("deberta", "in_proj"): _per_head,  # view(..., heads, -1).chunk(3)
    ("falcon", "query_key_value"): _falcon,
    ("gpt_bigcode", "c_attn"): _gpt_bigcode,
    ("codegen", "qkv_proj"): _codegen,  # view(..., mp_num, 3 * local).split(local): q, v, k
    ("phi3", "qkv_proj"): _phi3,  # q | k | v, k and v num_key_value_heads wide
}


def _owner(model: nn.Module, module_name: str) -> tuple[object | None, nn.Module]:
    """The config of the innermost module above ``module_name`` that has a transformers config,
    and the module's parent (its attention block)."""
    parts = module_name.split(".")
    parent = model.get_submodule(".".join(parts[:-1]))
    for i in range(len(parts) - 1, -1, -1):
        config = getattr(model.get_submodule(".".join(parts[:i])), "config", None)
        if getattr(config, "model_type", None):
            return config, parent
    return None, parent


def fused_rows(model: nn.Module, module_name: str, target: str) -> dict[str, Rows]:
    """Output rows of q, k and v inside the fused projection ``module_name`` of ``model``.

    Known exactly for the layouts of :data:`FUSED_LAYOUTS`, and for a GPT-2 family ``Conv1D``
    named ``c_attn`` with three times as many outputs as inputs (contiguous thirds).

    Raises:
        ValueError: the layout is not known (or does not fit the module), in one line naming
            the module and the fix.
    """
    module = model.get_submodule(module_name)
    d_out, d_in = out_in(module)
    config, attention = _owner(model, module_name)
    model_type = getattr(config, "model_type", None)
    leaf = module_name.rpartition(".")[2]
    layout = FUSED_LAYOUTS.get((model_type, leaf))
    if layout is None and is_conv1d(module) and leaf == "c_attn" and d_out == 3 * d_in:
        layout = _thirds  # GPT-2's Conv1D attention, copied by its derivatives (ImageGPT, ...)
    if layout is None:
        raise ValueError(
            f"target {target!r}: {module_name} ({type(module).__name__} {d_in} -> {d_out}, model type {model_type}) fuses "
            "q/k/v in a layout CRAFT does not know; pass targets naming unfused projections, or the whole module without ':q|k|v'"
        )
    try:
        return layout(config, attention, d_out)
    except (ValueError, AttributeError, TypeError) as err:
        raise ValueError(
            f"target {target!r}: {module_name} does not have the {model_type} q/k/v layout ({err}); "
            "pass targets naming unfused projections"
        ) from None


# ----------------------------------------------------------------------------- default targets


@functools.lru_cache(maxsize=1)
def _peft_mapping() -> dict[str, list[str] | str]:
    try:  # deferred: a heavy import, needed only to detect targets
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return {}
    return dict(mapping)


def starred(name: str) -> str:
    """``name`` with its numbers (layer indices) starred: the same for every layer of one stack."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _from_peft(entry: list[str] | str, projections: list[str]) -> list[str]:
    """Query and value targets from peft's entry for the model type ([] when it has none)."""
    if isinstance(entry, str):  # a regular expression over full module names
        names = list(dict.fromkeys(starred(n) for n in projections if re.fullmatch(entry, n)))
    else:
        leaves = {_leaf(n) for n in projections}
        names = [n for n in entry if _leaf(n) in leaves]
    queries = [n for n in names if _leaf(n) in QUERY_NAMES]
    values = [n for n in names if _leaf(n) in VALUE_NAMES]
    if queries and values:
        return queries + values
    fused = [n for n in names if _leaf(n) in FUSED_NAMES]
    return [f"{n}:{part}" for part in ("q", "v") for n in fused]


def default_targets(model: nn.Module) -> list[str]:
    """The query and value projections of ``model`` as target names: peft's table for its model
    type first, then :data:`DEFAULT_TARGETS`.

    Raises:
        ValueError: none found, in one line naming what was looked for and the fix.
    """
    projections = [n for n, m in model.named_modules() if n and is_projection(m)]
    leaves = {_leaf(n) for n in projections}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = _peft_mapping().get(model_type) if model_type else None
    found = _from_peft(entry, projections) if entry else []
    if found:
        return found
    for pair in DEFAULT_TARGETS:
        if all(_leaf(t.partition(":")[0]) in leaves for t in pair):
            return list(pair)
    looked = ([f"peft's {entry}"] if entry else []) + [list(p) for p in DEFAULT_TARGETS]
    raise ValueError(
        f"no query/value projections found in {type(model).__name__} (model type {model_type}; looked for {looked}); "
        "pass target_modules with the names of its projection modules"
    )


# ----------------------------------------------------------------------------- rows of a part


def _split(rows: Rows) -> tuple[int, int, int | None]:
    return (rows[0], rows[1], rows[2] if len(rows) == 3 else None)


def part_row_indices(rows: Rows | None, d_out: int) -> range | list[int]:
    """The output rows a part covers in a projection with ``d_out`` outputs, in stack order."""
    if rows is None:
        return range(d_out)
    lo, hi, period = _split(rows)
    if period is None:
        return range(lo, hi)
    return [b * period + i for b in range(d_out // period) for i in range(lo, hi)]


def select_rows(t: torch.Tensor, rows: Rows, dim: int = 0) -> torch.Tensor:
    """The part's entries of ``t`` along ``dim`` (a view for contiguous rows, else a copy)."""
    lo, hi, period = _split(rows)
    if period is None:
        return t.narrow(dim, lo, hi - lo)
    dim %= t.dim()
    blocks = t.unflatten(dim, (-1, period))  # (..., blocks, period, ...)
    return blocks.narrow(dim + 1, lo, hi - lo).flatten(dim, dim + 1)  # (..., blocks * (hi - lo), ...)


def add_rows_(t: torch.Tensor, rows: Rows, update: torch.Tensor) -> None:
    """In place: add ``update`` (d_part, ...) to the part's rows of ``t`` (d_out, ...)."""
    lo, hi, period = _split(rows)
    if period is None:
        t[lo:hi] += update
        return
    blocks = t.view(t.shape[0] // period, period, *t.shape[1:])  # (blocks, period, ...), a view of t
    blocks[:, lo:hi] += update.view(t.shape[0] // period, hi - lo, *t.shape[1:])


def spread_rows(t: torch.Tensor, rows: Rows, width: int) -> torch.Tensor:
    """``t`` (..., d_part) placed at the part's rows of a zero (..., width) tensor."""
    lo, hi, period = _split(rows)
    if period is None:
        return F.pad(t, (lo, width - hi))
    blocks = t.unflatten(-1, (-1, hi - lo))  # (..., blocks, hi - lo)
    return F.pad(blocks, (lo, period - hi)).flatten(-2)  # (..., blocks * period)
