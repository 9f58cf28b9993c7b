"""MO-ASHA on hand-made rung tables, against Ray's own ASHA where they must agree, and the compute budget.

No Ray instance: the schedulers are driven directly, one result at a time, as Ray Tune's loop
would drive them. Every expected decision is worked out by hand in the comments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.schedulers.trial_scheduler import TrialScheduler

from search.names import ADAPTER_PARAMETERS, SCORE, STEP
from search.schedulers import MOASHAScheduler, TotalStepsStopper, make_scheduler, promotion_order, rung_milestones

C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP


@dataclass(frozen=True)
class _Trial:  # what a scheduler reads of a trial
    trial_id: str


def _moasha(grace: int = 10, max_t: int = 40, rf: int = 2) -> MOASHAScheduler:
    return MOASHAScheduler(time_attr=STEP, metric=SCORE, size_attr=ADAPTER_PARAMETERS, max_t=max_t, grace_period=grace, reduction_factor=rf)


def _asha(grace: int = 10, max_t: int = 40, rf: int = 2) -> ASHAScheduler:
    return ASHAScheduler(time_attr=STEP, metric=SCORE, mode="max", max_t=max_t, grace_period=grace, reduction_factor=rf)


def _feed(scheduler, rows: list[tuple[str, int, float, int]]) -> list[str]:
    """Each row (trial, step, score, params) as one result; the scheduler's decisions."""
    decisions = []
    for trial_id, step, score, params in rows:
        trial = _Trial(trial_id)
        if hasattr(scheduler, "_trial_info") and trial_id not in scheduler._trial_info:
            scheduler.on_trial_add(None, trial)  # Ray's ASHA assigns a bracket on add
        decisions.append(scheduler.on_trial_result(None, trial, {STEP: step, SCORE: score, ADAPTER_PARAMETERS: params}))
    return decisions


def test_fronts_first_then_the_extremes_of_each_front():
    # (score, params). 0, 1, 2 are non-dominated; 4 is dominated by 1 (worse score, more params);
    # 3 is dominated by 4 (and 0): fronts {0, 1, 2}, {4}, {3}. Inside the first front the best
    # score comes first (0), then the member farthest from it: 2 is farther than 1 in both objectives.
    scores = [0.70, 0.65, 0.60, 0.55, 0.60]
    params = [73_728, 16_456, 1_696, 80_000, 36_864]
    assert promotion_order(scores, params) == [0, 2, 1, 4, 3]


def test_one_adapter_size_orders_by_score_like_asha():
    # Equal sizes: dominance is the score order; ties keep arrival order.
    assert promotion_order([0.5, 0.7, 0.6, 0.7], [100] * 4) == [1, 3, 2, 0]
    assert promotion_order([], []) == []
    with pytest.raises(ValueError, match="3 scores but 2 sizes"):
        promotion_order([0.1, 0.2, 0.3], [1, 2])


def test_rungs_are_ashas_rungs():
    for grace, max_t, rf in [(30, 90, 3), (8, 32, 2), (10, 100, 3), (16, 48, 3), (5, 7, 2)]:
        ray_rungs = sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs)
        assert rung_milestones(grace, max_t, rf) == ray_rungs


def test_a_small_trial_asha_stops_goes_on_under_moasha():
    # Rungs at steps 10 and 20 (reduction factor 2), full budget 40: ceil(n / 2) of n go on.
    rows = [
        ("t1", 10, 0.60, 70_000),  # alone at the rung: on (both)
        ("t2", 10, 0.50, 70_000),  # dominated by t1; 1 of 2 goes on: stop (both)
        ("t3", 10, 0.52, 2_000),  # MO: front {t1, t3} (t3 is 35x smaller), 2 of 3 go on: on.
        #                           ASHA: cutoff = median(0.60, 0.50) = 0.55 > 0.52: stop.
        ("t4", 10, 0.58, 60_000),  # MO: front {t1, t3, t4}, 2 of 4 go on: t1 (best score), then t3
        #                           (farther from t1 than t4 in both objectives): stop.
        #                           ASHA: cutoff = median(0.60, 0.50, 0.52) = 0.52 <= 0.58: on.
        ("t1", 20, 0.70, 70_000),  # alone at rung 20: on (both)
        ("t3", 20, 0.60, 2_000),  # MO: front {t1, t3}, 1 of 2 goes on: best score first, t1: stop.
        ("t1", 40, 0.75, 70_000),  # its full budget: stop (both)
    ]
    assert _feed(_moasha(), rows) == [C, S, C, S, C, S, S]
    assert _feed(_asha(), [r for r in rows if r[0] != "t3" or r[1] == 10]) == [C, S, S, C, C, S]  # Ray's ASHA, same table


def test_equal_sizes_decide_as_rays_asha():
    # One size: MO-ASHA keeps the best ceil(n / 2) by score, ASHA those at or above the median of
    # the earlier ones; on this table both give on, on, stop, on, on, on.
    scores = [0.5, 0.6, 0.4, 0.7, 0.55, 0.65]
    rows = [(f"t{i}", 10, s, 1_000) for i, s in enumerate(scores)]
    assert _feed(_moasha(), rows) == _feed(_asha(), rows) == [C, C, S, C, C, C]


def test_results_without_both_objectives_are_not_judged():
    scheduler = _moasha()
    trial = _Trial("t1")
    assert scheduler.on_trial_result(None, trial, {STEP: 10, SCORE: 0.5}) == C  # no size
    assert scheduler.on_trial_result(None, trial, {STEP: 10, SCORE: math.nan, ADAPTER_PARAMETERS: 5}) == C
    assert scheduler.rungs() == {10: {}, 20: {}, 40: {}}
    assert scheduler.on_trial_result(None, trial, {STEP: 10, SCORE: 0.5, ADAPTER_PARAMETERS: 5}) == C
    assert scheduler.rungs()[10] == {"t1": (0.5, 5.0)}


def test_a_completed_trial_counts_at_its_rung():
    scheduler = _moasha()
    scheduler.on_trial_complete(None, _Trial("a"), {STEP: 12, SCORE: 0.9, ADAPTER_PARAMETERS: 10})
    # b is bigger and worse than a: dominated, and 1 of 2 goes on.
    assert _feed(scheduler, [("b", 10, 0.8, 20)]) == [S]


def test_make_scheduler_and_bad_settings():
    assert isinstance(make_scheduler("moasha", max_t=30, grace_period=10, reduction_factor=3), MOASHAScheduler)
    assert isinstance(make_scheduler("asha", max_t=30, grace_period=10, reduction_factor=3), ASHAScheduler)
    with pytest.raises(ValueError, match="unknown scheduler 'hyperband'"):
        make_scheduler("hyperband", max_t=30, grace_period=10, reduction_factor=3)
    with pytest.raises(ValueError, match="grace_period"):
        _moasha(grace=50, max_t=40)
    assert _moasha().set_search_properties(None, None) and not _moasha().set_search_properties("loss", "min")


def test_total_steps_stopper_counts_each_trials_last_step():
    stopper = TotalStepsStopper(100)
    for trial_id, step in [("a", 20), ("b", 20), ("a", 40), ("b", 40), ("a", 40)]:  # a repeated report counts once
        assert stopper(trial_id, {STEP: step}) is False
    assert stopper.spent == 80 and not stopper.stop_all()
    stopper("c", {STEP: 20})
    assert stopper.spent == 100 and stopper.stop_all()
