"""What a sweep needs to know of its base model before Ray starts: prices and factors to cache.

:func:`check_against_model` checks a :class:`~search.spec.SweepSpec` against the model's shapes
(targets found, ranks within the axis lengths, a parameter budget some configuration fits) and
says how to price each method's trials and which HOSVDs the factor cache must hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from craft.budget import module_shapes
from craft.factors import check_ranks
from craft.targets import find_targets

from .space import RANK_KEYS, TargetCost
from .spec import SweepSpec

__all__ = ["FactorRequest", "ModelFacts", "check_against_model"]


@dataclass(frozen=True)
class FactorRequest:
    """One HOSVD the factor cache must hold: CRAFT targets (None: detected) at the sweep's largest ranks."""

    targets: tuple[str, ...] | None
    max_ranks: tuple[int, int, int]


@dataclass
class ModelFacts:
    """What a spec needs to know of its model: prices per method and the factors to cache."""

    costs: dict[str, TargetCost]
    factor_requests: list[FactorRequest]


def check_against_model(spec: SweepSpec, model: Any) -> ModelFacts:
    """Check the spec against the base model's shapes; say what to cache and how to price trials.

    Raises:
        ValueError: no targets found, a rank above an axis length, or a parameter budget that no
            configuration of a method fits, in one line.
    """
    costs: dict[str, TargetCost] = {}
    requests: list[FactorRequest] = []
    budget = spec.search.max_adapter_params
    for method in spec.methods:
        if method == "head":
            costs[method] = TargetCost(0, 0, 0, 0)
            continue
        target_sets = spec.candidates(f"{method}.target_modules")
        if budget is not None and len(target_sets) > 1:
            raise ValueError(f"with search.max_adapter_params, fix {method}.target_modules (a budget prices one set)")
        for targets in target_sets:
            stacks = find_targets(model, targets)
            shapes = module_shapes(model, stacks)
            costs[method] = TargetCost(len(stacks), sum(i + o for i, o in shapes), len(shapes), sum(o for _, o in shapes))
            if method == "craft":
                highs = tuple(max(spec.candidates(k)) for k in RANK_KEYS["craft"])
                try:
                    check_ranks(stacks, highs)
                except ValueError as err:
                    raise ValueError(f"the rank domains reach {highs}: {err}") from None
                requests.append(FactorRequest(tuple(targets) if targets else None, highs))
        if budget is not None:
            ranks = RANK_KEYS.get(method, ())
            if any(spec.domains.get(k) is not None and spec.domains[k].kind == "choice" for k in ranks):
                raise ValueError(
                    f"with search.max_adapter_params, give {method} ranks as int domains (a budget bounds their high end)"
                )
            lowest = spec.size_range(method, costs[method])[0]
            if lowest > budget:
                raise ValueError(
                    f"search.max_adapter_params={budget:,} is below the smallest {method} adapter "
                    f"({lowest:,} parameters at its lowest ranks); raise the budget or lower the ranks"
                )
    return ModelFacts(costs, requests)
