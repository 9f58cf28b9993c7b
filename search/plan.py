"""What a sweep says before its trials start: each method's adapter sizes and its own settings."""

from __future__ import annotations

import yaml

from .space import TargetCost
from .spec import OVERRIDE_BLOCK, SweepSpec

__all__ = ["describe_methods"]


def describe_methods(spec: SweepSpec, costs: dict[str, TargetCost]) -> list[str]:
    """One line per method before a sweep starts: its adapter sizes on this model (under the
    parameter budget) and the train settings its own block sets."""
    budget = spec.search.max_adapter_params
    lines = []
    for method in spec.methods:
        ends = list(spec.size_range(method, costs[method]))
        if budget is not None:
            ends[1] = min(ends[1], budget)
        sizes = f"{ends[0]:,}" if ends[0] == ends[1] else f"{ends[0]:,} to {ends[1]:,}"
        line = f"  {method}: {sizes} adapter parameters" + (f" (budget {budget:,})" if budget is not None else "")
        block = spec.base.get(method)
        own = block.get(OVERRIDE_BLOCK) if isinstance(block, dict) else None
        if own:
            flow = {k: yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip() if isinstance(v, dict) else v for k, v in own.items()}
            shown = ", ".join(f"{k}={v}" for k, v in flow.items())
            line += f"; its own train settings: {shown}"
        lines.append(line)
    return lines
