"""Optuna, multi-objective, with early-stopped trials told as pruned.

Ray's ``OptunaSearch`` with a list of metrics tells Optuna COMPLETE whenever a trial ends with a
result, so a trial the scheduler stopped halfway would enter the study with a half-trained score. This
searcher reports ``score`` and ``adapter_parameters`` at every evaluation (Ray checks that every
searcher metric is in every result), but tells Optuna the objectives (``final_score`` max,
``adapter_parameters`` min) only for a trial whose last result carries ``final_score``: the
trial ran its full budget. Any other ending is PRUNED, and an error is FAIL.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from .names import ADAPTER_PARAMETERS, FINAL_SCORE, SCORE
from .space import SpaceSampler, encode_choice

__all__ = ["ParetoOptunaSearch", "make_sampler", "STUDY_NAME"]

STUDY_NAME = "craft-search"
OBJECTIVES = (FINAL_SCORE, ADAPTER_PARAMETERS)
DIRECTIONS = ("max", "min")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in ``search.sampler``, seeded."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class ParetoOptunaSearch(OptunaSearch):
    """``OptunaSearch`` on (final score max, adapter parameters min), telling early stops as PRUNED.

    Args:
        space: the define-by-run :class:`~search.space.SpaceSampler`.
        sampler: the Optuna sampler (seeded).
        points_to_evaluate: configs (dotted keys) tried first.
    """

    def __init__(self, space: SpaceSampler, sampler: optuna.samplers.BaseSampler, points_to_evaluate: list[dict] | None = None):
        points = [{k: encode_choice(v) for k, v in p.items()} for p in points_to_evaluate or []]
        super().__init__(
            space=space,
            metric=[SCORE, ADAPTER_PARAMETERS],  # what every report carries
            mode=list(DIRECTIONS),
            sampler=sampler,
            study_name=STUDY_NAME,
            points_to_evaluate=points or None,
        )

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (in memory; see :func:`search.sweep.save_study` for a copy on disk)."""
        return self._ot_study

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        values = None
        if error:
            state = TrialState.FAIL
        elif result and all(isinstance(result.get(k), (int, float)) and math.isfinite(result[k]) for k in OBJECTIVES):
            state, values = TrialState.COMPLETE, [float(result[k]) for k in OBJECTIVES]
        else:
            state = TrialState.PRUNED  # stopped before its full budget: no final score to learn from
        self._ot_study.tell(ot_trial, values, state=state)
        self._completed_trials.add(trial_id)
