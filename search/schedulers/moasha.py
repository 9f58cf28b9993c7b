"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

ASHA judges a trial at each rung by its score alone, so a 3K-parameter trial at 0.56 stops
exactly like a 74K one at 0.56, though only the first can be on the front of accuracy against
adapter size. MO-ASHA (Schmucker, Donini, Zafar, Salinas, Archambeau 2021) keeps ASHA's rungs and
its asynchrony and changes the ranking: when a trial reaches a rung it is placed among the
trials that reached that rung before it by :func:`~search.schedulers.ranking.promotion_order`
(non-dominated sorting on score and size, an epsilon-net inside each front), and it goes on when
it is among the first ceil(n / reduction_factor) of the n trials recorded there, itself included.
A trial that reaches ``max_t`` ends (its full budget), as under ASHA.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from .ranking import promoted_count, promotion_order

__all__ = ["MOASHAScheduler", "rung_milestones"]


def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """The rungs, lowest first: grace_period * reduction_factor**k, up to max_t (ASHA's rungs)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1 + 1e-9)
    return [round(grace_period * reduction_factor**k) for k in range(count)]


class MOASHAScheduler(FIFOScheduler):
    """Stops trials at rungs by Pareto rank on (score max, adapter size min).

    Args:
        time_attr: the result key that counts progress (optimiser steps).
        metric: the score, maximised.
        size_attr: the adapter size, minimised.
        max_t: a full trial's budget in ``time_attr`` units.
        grace_period: the first rung.
        reduction_factor: 1 / reduction_factor of the trials at a rung go on.
    """

    def __init__(self, *, time_attr: str, metric: str, size_attr: str, max_t: int, grace_period: int, reduction_factor: float):
        if not 0 < grace_period <= max_t:
            raise ValueError(f"grace_period must be in (0, max_t={max_t}], got {grace_period}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be above 1, got {reduction_factor}")
        super().__init__()
        self._time_attr, self._metric, self._size_attr = time_attr, metric, size_attr
        self._max_t, self._reduction_factor = max_t, reduction_factor
        # milestone -> {trial_id: (score, size)} in arrival order; highest milestone first for the lookup
        self._rungs: list[tuple[int, dict[str, tuple[float, float]]]] = [
            (m, {}) for m in reversed(rung_milestones(grace_period, max_t, reduction_factor))
        ]
        self._num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The metric and its direction are set here; a TuneConfig that names others is a conflict.
        return (metric is None or metric == self._metric) and (mode is None or mode == "max")

    def rungs(self) -> dict[int, dict[str, tuple[float, float]]]:
        """What each rung recorded, lowest rung first: milestone -> {trial id: (score, size)}."""
        return {m: dict(recorded) for m, recorded in reversed(self._rungs)}

    def decide(self, trial_id: str, step: float, score: float, size: float) -> str:
        """Record a result and say whether the trial goes on (CONTINUE) or stops (STOP)."""
        for milestone, recorded in self._rungs:
            if step < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = (float(score), float(size))
            ids = list(recorded)
            order = promotion_order([recorded[t][0] for t in ids], [recorded[t][1] for t in ids])
            keep = {ids[i] for i in order[: promoted_count(len(ids), self._reduction_factor)]}
            return TrialScheduler.CONTINUE if trial_id in keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _values(self, result: dict) -> tuple[float, float, float] | None:
        values = [result.get(k) for k in (self._time_attr, self._metric, self._size_attr)]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return None  # a report without the objectives (or a NaN score) is not judged
        return tuple(float(v) for v in values)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        values = self._values(result)
        if values is None:
            return TrialScheduler.CONTINUE
        step, score, size = values
        if step >= self._max_t:
            action = TrialScheduler.STOP  # its full budget
        else:
            action = self.decide(trial.trial_id, step, score, size)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        values = self._values(result or {})
        if values is not None:
            self.decide(trial.trial_id, *values)  # a finished trial counts at the rungs it reached, as under ASHA

    def debug_string(self) -> str:
        rungs = " | ".join(f"step {m}: {len(r)} trials" for m, r in reversed(self._rungs))
        return f"Using MO-ASHA: num_stopped={self._num_stopped}; {rungs}"
