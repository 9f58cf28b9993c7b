"""Early stopping for sweeps: MO-ASHA (score and adapter size), ASHA (score) or none (FIFO).

=========  ==============================================================================
moasha     stops at rungs by Pareto rank on (score, adapter parameters): small adapters that
           trade a little score for many fewer parameters go on (the default when trials can
           differ in size)
asha       stops at rungs by score alone (Ray Tune's ``ASHAScheduler``)
fifo       no early stopping: every trial runs its full budget
=========  ==============================================================================
"""

from __future__ import annotations

from typing import Any

from ..names import ADAPTER_PARAMETERS, SCORE, STEP
from .budget import TotalStepsStopper
from .moasha import MOASHAScheduler, rung_milestones
from .ranking import promoted_count, promotion_order, size_axis

__all__ = ["make_scheduler", "TotalStepsStopper", "MOASHAScheduler", "rung_milestones", "promotion_order", "promoted_count", "size_axis"]

def make_scheduler(name: str, *, max_t: int, grace_period: int, reduction_factor: int) -> Any:
    """The Ray Tune scheduler named in ``search.scheduler``, on the sweep's metric names."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "moasha":
        return MOASHAScheduler(
            time_attr=STEP, metric=SCORE, size_attr=ADAPTER_PARAMETERS, max_t=max_t,
            grace_period=grace_period, reduction_factor=reduction_factor,
        )  # fmt: skip
    if name == "asha":
        return ASHAScheduler(
            time_attr=STEP, metric=SCORE, mode="max", max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor
        )
    if name == "fifo":
        return FIFOScheduler()
    raise ValueError(f"unknown scheduler {name!r}; choose moasha, asha or fifo")
