"""A sweep's compute budget: stop every trial once the optimiser steps of all trials reach a total."""

from __future__ import annotations

import math
from typing import Any

from ray.tune.stopper import Stopper

from ..names import STEP

__all__ = ["TotalStepsStopper"]


class TotalStepsStopper(Stopper):
    """Ends the sweep when the trials' optimiser steps, summed, reach ``limit`` (``search.max_total_steps``).

    Each trial counts the last step it reported, so a trial stopped at a rung counts the steps it
    ran and a resumed trial is not counted twice. Trials still running when the limit is reached
    are stopped and end pruned (no final score).
    """

    def __init__(self, limit: int, time_attr: str = STEP):
        self.limit = int(limit)
        self._time_attr = time_attr
        self._steps: dict[str, float] = {}

    @property
    def spent(self) -> float:
        """Optimiser steps reported so far, over all trials."""
        return sum(self._steps.values())

    @property
    def exhausted(self) -> bool:
        """Whether the budget is spent."""
        return self.spent >= self.limit

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        step = result.get(self._time_attr)
        if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
            self._steps[trial_id] = max(self._steps.get(trial_id, 0.0), float(step))
        return False

    def stop_all(self) -> bool:
        return self.exhausted
