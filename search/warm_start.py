"""Warm start: seed a new sweep's Optuna study with the complete trials of an earlier one.

A user who widens a range, or adds a method, should not pay again for what is known. The earlier
sweep is read from its results (``summary.json``) or its MLflow parent run
(:func:`search.results.pareto.load_sweep`); each trial that ran its full budget enters the new study as a
COMPLETE trial with its values (final score, adapter parameters), through Optuna's ``add_trial``.

Only a sweep of the same model, task, data and trial budget can seed another: scores of another
model or another budget would mislead the sampler. A trial whose values the new space cannot
hold (outside a narrowed range, a method no longer searched, a now-fixed key at another value)
is left out, and the count says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .space import METHOD_KEY, Domain, encode_choice
from .spec import OVERRIDE_BLOCK, SweepSpec, _get, spec_from_dict

__all__ = ["WarmTrial", "WarmStart", "load_warm_start", "add_warm_trials", "optuna_distribution"]

_MUST_MATCH = ("model", "task", "data")


@dataclass(frozen=True)
class WarmTrial:
    """One earlier trial as the new study holds it: Optuna params (encoded) and objective values."""

    trial_id: str
    params: dict[str, Any]
    values: tuple[float, float]  # final score, adapter parameters


@dataclass
class WarmStart:
    """What an earlier sweep gives a new one."""

    source: str
    sweep: str
    trials: list[WarmTrial] = field(default_factory=list)
    left_out: int = 0  # complete trials the new space cannot hold


def optuna_distribution(domain: Domain) -> Any:
    """The Optuna distribution :meth:`Domain.suggest` samples from (the full range)."""
    import optuna

    if domain.kind == "int":
        return optuna.distributions.IntDistribution(domain.values[0], domain.values[1], log=domain.log)
    if domain.kind == "float":
        return optuna.distributions.FloatDistribution(domain.values[0], domain.values[1], log=domain.log)
    return optuna.distributions.CategoricalDistribution([encode_choice(v) for v in domain.values])


def _holds(domain: Domain, value: Any) -> bool:
    if domain.kind == "choice":
        return value in domain.values
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if domain.kind == "int" and value != int(value):
        return False
    return domain.values[0] <= value <= domain.values[1]


def _params(spec: SweepSpec, sampled: dict[str, list[str]], earlier: SweepSpec, config: dict[str, Any]) -> dict[str, Any] | None:
    """The trial's values as the new space's Optuna params; None when the new space cannot hold them.

    The new sweep must be able to sample a trial that trains exactly as the earlier one did: same
    method, every sampled value inside its new domain, every other train and method setting equal.
    """
    method = config.get(METHOD_KEY, earlier.base.get(METHOD_KEY, "craft"))
    if method not in spec.methods:
        return None
    old = earlier.run_data(config)  # every value the trial ran with, sampled or fixed, overrides merged
    values: dict[str, Any] = {}
    for path in sampled[method]:
        value = method if path == METHOD_KEY else _get(old, _run_path(path, method))
        if value is None or not _holds(spec.domains[path], value):
            return None
        values[path] = value
    before, after = earlier.run_config(config), spec.run_config(values)
    if before.train != after.train or getattr(before, method) != getattr(after, method):
        return None  # a setting this sweep fixes (or defaults) differs from the one the trial ran with
    return {path: encode_choice(value) for path, value in values.items()}


def _run_path(path: str, method: str) -> str:
    """Where a sampled key lands in a trial's run config (a method's train override lands in train)."""
    prefix = f"{method}.{OVERRIDE_BLOCK}."
    return OVERRIDE_BLOCK + "." + path[len(prefix) :] if path.startswith(prefix) else path


def load_warm_start(spec: SweepSpec, *, storage: str | None = None, tracking_uri: str | None = None) -> WarmStart | None:
    """Read ``spec.search.warm_start`` and turn its complete trials into the new study's trials.

    Raises:
        ValueError: no such sweep, or a sweep of another model, task, data or budget; in one line.
    """
    source = spec.search.warm_start
    if not source:
        return None
    from .results.pareto import load_sweep

    try:
        table = load_sweep(source, storage=storage, tracking_uri=tracking_uri)
    except ValueError as err:
        raise ValueError(f"search.warm_start: {err}") from None
    earlier = spec_from_dict(table.spec)
    for key in _MUST_MATCH:
        if earlier.base.get(key) != spec.base.get(key):
            raise ValueError(
                f"search.warm_start: sweep {table.name} ran {key} {earlier.base.get(key)!r}, this sweep {spec.base.get(key)!r}; "
                "warm-start only from a sweep of the same model, task and data"
            )
    if earlier.budget != spec.budget:
        raise ValueError(
            f"search.warm_start: sweep {table.name} trained {earlier.budget} steps a trial, this sweep {spec.budget}; "
            "its scores are not comparable: set search.max_budget to match or drop warm_start"
        )
    warm = WarmStart(source=str(source), sweep=table.name)
    space = spec.sampler()
    sampled = {method: space.keys_for(method) for method in spec.methods}  # what a trial of each method samples
    for trial in table.full():
        params = _params(spec, sampled, earlier, trial.config)
        if params is None:
            warm.left_out += 1
        else:
            warm.trials.append(WarmTrial(trial.trial_id, params, (float(trial.score), float(trial.adapter_parameters))))
    return warm


def add_warm_trials(study: Any, spec: SweepSpec, warm: WarmStart) -> int:
    """Add the warm trials to ``study`` as COMPLETE trials; returns how many."""
    import optuna

    for trial in warm.trials:
        distributions = {path: optuna_distribution(spec.domains[path]) for path in trial.params}
        study.add_trial(
            optuna.trial.create_trial(
                params=trial.params,
                distributions=distributions,
                values=list(trial.values),
                user_attrs={"warm_start": warm.sweep, "source_trial": trial.trial_id},
            )
        )
    return len(warm.trials)
