"""Optuna, multi-objective, with early-stopped trials told as pruned.

Ray's ``OptunaSearch`` with a list of metrics tells Optuna COMPLETE whenever a trial ends with a
result, so a trial the scheduler stopped halfway would enter the study with a half-trained score. This
searcher reports ``score`` and ``adapter_parameters`` at every evaluation (Ray checks that every
searcher metric is in every result), but tells Optuna the objectives (``final_score`` max,
``adapter_parameters`` min) only for a trial whose last result carries ``final_score``: the
trial ran its full budget. Any other ending is PRUNED, and an error is FAIL.

The study lives in an RDB storage (SQLite by default) from its first trial on: every ask and tell
is in the database when it happens, so a killed driver loses none of them. What Ray Tune pickles
with its experiment state is the searcher without the study (the sampler's state and which Optuna
trial each Ray trial is); restoring reconnects to the database, at the URL the driver names with
:func:`study_location` (a resumed sweep may run on another machine, with the database elsewhere).
"""

from __future__ import annotations

import contextlib
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from .names import ADAPTER_PARAMETERS, FINAL_SCORE, SCORE
from .space import SpaceSampler, encode_choice

__all__ = [
    "ParetoOptunaSearch",
    "make_sampler",
    "study_location",
    "current_study_url",
    "open_study_storage",
    "close_study",
    "STUDY_NAME",
    "RAY_TRIAL_ATTR",
    "SUPERSEDES_ATTR",
]

STUDY_NAME = "craft-search"
OBJECTIVES = (FINAL_SCORE, ADAPTER_PARAMETERS)
DIRECTIONS = ("max", "min")
RAY_TRIAL_ATTR = "ray_trial_id"  # an Optuna trial's user attribute: the Ray Tune trial it is
SUPERSEDES_ATTR = "supersedes"  # user attribute: the number of the earlier record of the same Ray trial

_LOCATION: list[str] = []  # the study's URL on this driver, while a sweep that restores its searcher runs


@contextlib.contextmanager
def study_location(url: str) -> Iterator[None]:
    """While inside, a restored :class:`ParetoOptunaSearch` reconnects to the study at ``url``
    instead of the URL it was created with."""
    _LOCATION.append(url)
    try:
        yield
    finally:
        _LOCATION.pop()


def current_study_url() -> str | None:
    """The study's URL named by the innermost :func:`study_location`, None outside one."""
    return _LOCATION[-1] if _LOCATION else None


def open_study_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url`` (a SQLite file's directory is created)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def close_study(url: str) -> int:
    """Mark FAIL every trial of the study at ``url`` still RUNNING (asked, never told: sampled by a
    driver killed before its state was saved, so no Ray trial will ever run it). Call it once the
    sweep has ended. Returns how many."""
    storage = open_study_storage(url)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(stale)


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
        study_url: the Optuna RDB storage the study lives in (``sqlite:///PATH`` or any database
            URL Optuna takes); created, or continued when it exists.
    """

    def __init__(
        self,
        space: SpaceSampler,
        sampler: optuna.samplers.BaseSampler,
        points_to_evaluate: list[dict] | None = None,
        *,
        study_url: str,
    ):
        points = [{k: encode_choice(v) for k, v in p.items()} for p in points_to_evaluate or []]
        self._study_url = study_url
        super().__init__(
            space=space,
            metric=[SCORE, ADAPTER_PARAMETERS],  # what every report carries
            mode=list(DIRECTIONS),
            sampler=sampler,
            study_name=STUDY_NAME,
            points_to_evaluate=points or None,
            storage=open_study_storage(study_url),
        )

    @property
    def study(self) -> optuna.Study:
        """The Optuna study, in its RDB storage."""
        return self._ot_study

    @property
    def study_url(self) -> str:
        """Where the study lives."""
        return self._study_url

    # What Ray Tune pickles: everything but the study and its storage (a database connection, at
    # a URL that may not exist where the sweep resumes); the Optuna trials by their ids.
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_ot_study", "_storage", "_ot_trials")}
        state["_ot_trial_ids"] = {tid: trial._trial_id for tid, trial in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        ids = state.pop("_ot_trial_ids", {})
        self.__dict__.update(state)
        self._study_url = _LOCATION[-1] if _LOCATION else self._study_url
        self._storage = open_study_storage(self._study_url)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler,
                                           pruner=optuna.pruners.NopPruner())  # fmt: skip
        self._ot_trials = {tid: optuna.Trial(self._ot_study, trial_id) for tid, trial_id in ids.items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__setstate__(pickle.load(handle))

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if config is not None and trial is not None and RAY_TRIAL_ATTR not in trial.user_attrs:
            trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)  # which Ray trial this is, in the study itself
        return config

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
        told = self._storage.get_trial(ot_trial._trial_id)
        if not told.state.is_finished():
            self._ot_study.tell(ot_trial, values, state=state)
        elif (told.state, told.values) != (state, values):
            # Told by a driver killed before its last snapshot saw the ending; the resumed sweep ran
            # the trial on from its checkpoint to another ending. Optuna keeps a finished trial as
            # told: the new ending is a new record of the same Ray trial, which supersedes it.
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=told.params, distributions=told.distributions, values=values, state=state,
                user_attrs={RAY_TRIAL_ATTR: trial_id, SUPERSEDES_ATTR: told.number},
            ))  # fmt: skip
        self._completed_trials.add(trial_id)
