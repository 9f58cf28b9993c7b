"""Sweep specs: a run config whose values may be search domains, plus ``search`` and ``resources``.

::

    name: demo                      # the sweep's name (default: the file's stem)
    model: demo
    task: tweets
    method: {choice: [craft, lora]}
    craft: {rank_layers: {int: [1, 6]}, rank_out: {int: [8, 128], log: true}, rank_in: 64}
    lora: {r: {choice: [4, 8, 16]}}
    train: {lr: {float: [1.0e-4, 1.0e-2], log: true}, eval_every: 25}
    search: {num_samples: 12, max_concurrent_trials: 2, max_budget: 100, grace_period: 25}
    resources: {cpu: 1, gpu: 0}

Everything is checked here without Ray: keys, domains, and every domain's ends against the run
config's own validation. :func:`search.model_facts.check_against_model` adds what needs the model's
shapes (ranks within the axis lengths, the parameter budget) and says what the factor cache must hold.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from craft.harness.runconfig import METHODS, RunConfig, TrainBlock, apply_overrides, check_keys, read_yaml_mapping

from .space import METHOD_KEY, RANK_KEYS, Domain, SpaceSampler, TargetCost, find_domains

__all__ = [
    "SearchBlock",
    "ResourcesBlock",
    "ExportBlock",
    "SweepSpec",
    "load_sweep_spec",
    "spec_from_dict",
    "spec_changes",
]

SCHEDULERS = ("moasha", "asha", "fifo")
OVERRIDE_BLOCK = "train"  # a method's block may hold train.* values and domains for that method's trials
FIXED_BY_SWEEP = ("max_steps", "epochs", "eval_every")  # the sweep sets these for every trial alike
SAMPLERS = ("tpe", "random", "nsga2")


def _int_at_least(value: Any, low: int, where: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where} must be an integer >= {low}, got {value!r}")


@dataclass
class SearchBlock:
    """How a sweep searches: trials, concurrency, early stopping, budget."""

    num_samples: int = 8  # trials in all
    max_concurrent_trials: int = 2  # trials running at once
    # moasha (stops at rungs by Pareto rank on score and adapter size), asha (by score alone) or fifo
    # (every trial runs its budget); default: moasha when trials can differ in adapter size, else asha
    scheduler: str | None = None
    grace_period: int | None = None  # optimiser steps before a trial may be stopped: the first rung (default: train.eval_every)
    reduction_factor: int = 2  # 1 / reduction_factor of the trials at each rung go on
    max_budget: int | None = None  # optimiser steps of a full trial (sets train.max_steps)
    seed: int = 0  # the sampler's seed
    sampler: str = "tpe"  # tpe, random or nsga2 (Optuna, multi-objective)
    max_adapter_params: int | None = None  # no trial's adapter exceeds this
    max_failures: int = 2  # retries of a failed trial from its last checkpoint (a lost node)
    points_to_evaluate: list[dict] | None = None  # configs tried first, by dotted key
    storage: str | None = None  # where Ray Tune keeps results (default: ./runs/sweeps)
    factor_cache: str | None = None  # directory of cached HOSVD factors (default: ~/.cache/craft-search/factors)
    warm_start: str | None = None  # an earlier sweep (name, path or runs:/ID) whose complete trials seed the study
    max_total_steps: int | None = None  # stop the sweep once its trials have run this many optimiser steps in all
    tracking_wait_s: float = 120.0  # at the end, how long an unreachable MLflow server is waited for (then: --resume)

    def __post_init__(self) -> None:
        _int_at_least(self.num_samples, 1, "search.num_samples")
        _int_at_least(self.max_concurrent_trials, 1, "search.max_concurrent_trials")
        _int_at_least(self.grace_period, 1, "search.grace_period", allow_none=True)
        _int_at_least(self.reduction_factor, 2, "search.reduction_factor")
        _int_at_least(self.max_budget, 1, "search.max_budget", allow_none=True)
        _int_at_least(self.max_adapter_params, 0, "search.max_adapter_params", allow_none=True)
        _int_at_least(self.max_failures, 0, "search.max_failures")
        _int_at_least(self.max_total_steps, 1, "search.max_total_steps", allow_none=True)
        wait = self.tracking_wait_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < float("inf"):
            raise ValueError(f"search.tracking_wait_s must be a number of seconds >= 0, got {wait!r}")
        if self.warm_start is not None and (not isinstance(self.warm_start, str) or not self.warm_start.strip()):
            raise ValueError(f"search.warm_start must name a sweep (its name, results directory or runs:/ID), got {self.warm_start!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"search.seed must be an integer, got {self.seed!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"search.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"search.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.points_to_evaluate is not None and not (
            isinstance(self.points_to_evaluate, list) and all(isinstance(p, dict) for p in self.points_to_evaluate)
        ):
            raise ValueError("search.points_to_evaluate must be a list of {dotted.key: value} mappings")


@dataclass
class ResourcesBlock:
    """What one trial asks of the cluster (fractional GPUs share a device)."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cpu", "gpu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"resources.{name} must be a number >= 0, got {value!r}")
        if self.cpu <= 0:
            raise ValueError("resources.cpu must be positive (a trial needs a CPU to run its loop)")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"resources.gpu above 1 must be a whole number of GPUs, got {self.gpu}")

    def to_ray(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass
class ExportBlock:
    """How an exported config trains in production: ``max_steps`` or ``epochs`` (at most one).

    Neither set: the sweep's trial budget (the exported config reproduces its trial).
    """

    max_steps: int | None = None
    epochs: float | None = None
    save_merged: bool = True  # production runs also write the merged transformers model

    def __post_init__(self) -> None:
        _int_at_least(self.max_steps, 1, "export.max_steps", allow_none=True)
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or self.epochs <= 0):
            raise ValueError(f"export.epochs must be a positive number, got {self.epochs!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set export.max_steps or export.epochs, not both")
        if not isinstance(self.save_merged, bool):
            raise ValueError(f"export.save_merged must be true or false, got {self.save_merged!r}")


def _get(data: dict, path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


@dataclass
class SweepSpec:
    """A validated sweep spec.

    Attributes:
        name: the sweep's name (its Ray Tune experiment and MLflow parent run).
        base: the run-config part as plain data, domains in place.
        domains: dotted path -> :class:`~search.space.Domain`.
        search: the :class:`SearchBlock`.
        resources: the :class:`ResourcesBlock` of one trial.
        export: the :class:`ExportBlock`: production training of exported configs.
        path: the YAML file it came from.
    """

    name: str
    base: dict[str, Any]
    domains: dict[str, Domain]
    search: SearchBlock = field(default_factory=SearchBlock)
    resources: ResourcesBlock = field(default_factory=ResourcesBlock)
    export: ExportBlock = field(default_factory=ExportBlock)
    path: Path | None = None

    @property
    def methods(self) -> list[str]:
        """The methods a trial may get, in the spec's order."""
        domain = self.domains.get(METHOD_KEY)
        return list(domain.values) if domain else [self.base.get(METHOD_KEY, "craft")]

    @property
    def budget(self) -> int:
        """Optimiser steps of a full trial."""
        return self.search.max_budget

    def fixed_values(self) -> dict[str, Any]:
        """The method and the rank keys the spec fixes (the sampler prices them under a budget)."""
        fixed = {METHOD_KEY: self.base.get(METHOD_KEY, "craft")} if METHOD_KEY not in self.domains else {}
        for keys in RANK_KEYS.values():
            for key in keys:
                value = _get(self.base, key)
                if key not in self.domains and value is not None:
                    fixed[key] = value
        return fixed

    def sampler(self, costs: dict[str, TargetCost] | None = None) -> SpaceSampler:
        """The define-by-run space for Optuna (``costs`` from :func:`check_against_model`)."""
        return SpaceSampler(
            dict(self.domains), self.fixed_values(), dict(costs or {}), self.search.max_adapter_params, self.method_overrides()
        )

    def method_overrides(self) -> dict[str, tuple[str, ...]]:
        """Method -> the ``train.*`` keys its block sets for its trials (values or domains)."""
        found = {}
        for method in self.methods:
            block = self.base.get(method)
            if isinstance(block, dict) and isinstance(block.get(OVERRIDE_BLOCK), dict):
                found[method] = tuple(f"{OVERRIDE_BLOCK}.{key}" for key in block[OVERRIDE_BLOCK])
        return found

    def run_data(self, values: dict[str, Any], output_dir: str | None = None) -> dict[str, Any]:
        """The run config of one trial as plain data: domains set to ``values``, other methods' blocks dropped."""
        data = copy.deepcopy(self.base)
        for path, value in values.items():
            _set(data, path, value)
        method = data.get(METHOD_KEY, "craft")
        block = data.get(method)
        if isinstance(block, dict) and OVERRIDE_BLOCK in block:  # the method's own train settings win
            data.setdefault(OVERRIDE_BLOCK, {}).update(block.pop(OVERRIDE_BLOCK))
        for other in METHODS:
            if other != method:
                data.pop(other, None)
        _set(data, "train.max_steps", self.budget)
        if output_dir is not None:
            data["output_dir"] = output_dir
        return data

    def run_config(self, values: dict[str, Any], output_dir: str | None = None) -> RunConfig:
        """The validated :class:`~craft.harness.runconfig.RunConfig` of one trial."""
        return RunConfig.from_dict(self.run_data(values, output_dir))

    def candidates(self, path: str, default: Any = None) -> list:
        """The values that bound ``path``: its domain's candidates, or its fixed value (``default`` if unset)."""
        if path in self.domains:
            return self.domains[path].candidates()
        value = _get(self.base, path)
        return [default if value is None else value]

    def size_range(self, method: str, cost: TargetCost) -> tuple[int, int]:
        """The smallest and largest adapter of ``method`` the space allows (before a parameter budget)."""
        ranks = RANK_KEYS.get(method, ())
        low, high = (cost.price(method, {k: pick(self.candidates(k, _default_rank(k))) for k in ranks}) for pick in (min, max))
        return low, high

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (loadable again)."""
        return {
            "name": self.name,
            **copy.deepcopy(self.base),
            "search": asdict(self.search),
            "resources": asdict(self.resources),
            "export": asdict(self.export),
        }

    def _probe(self) -> None:
        # Every domain's ends (or choices) through the run config's own validation, per method.
        for method in self.methods:
            first = {p: d.candidates()[0] for p, d in self.domains.items()}
            first[METHOD_KEY] = method
            probes = [first] + [{**first, p: c} for p, d in self.domains.items() if p != METHOD_KEY for c in d.candidates()[1:]]
            for values in probes:
                self.run_config(values)


_SWEEP_KEYS = {"name", "search", "resources", "export"}


def load_sweep_spec(path: str | Path, overrides: list[str] | None = None, name: str | None = None) -> SweepSpec:
    """Read and validate a sweep spec YAML (``overrides`` as ``dotted.key=value``).

    Raises:
        ValueError: a missing file, malformed YAML, an unknown key, a malformed domain, or a
            value (at any domain end) that the run config rejects; in one line.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "pass the path of a sweep spec YAML (see spaces/ for presets)")
    data = apply_overrides(data, overrides or [])
    try:
        return _build(data, path, name)
    except ValueError as err:
        raise ValueError(f"sweep spec {path.name}: {err}") from None


def spec_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two specs as plain data (:meth:`SweepSpec.to_dict`)."""
    keys = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += spec_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def spec_from_dict(data: dict[str, Any]) -> SweepSpec:
    """Rebuild a spec from :meth:`SweepSpec.to_dict` (as a sweep's ``sweep.json`` keeps it).

    Raises:
        ValueError: the data is not a valid spec, in one line.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a sweep spec must be a mapping, got {type(data).__name__}")
    return _build(copy.deepcopy(data), None, None)


def _build(data: dict, path: Path | None, name: str | None) -> SweepSpec:
    known = {f.name for f in fields(RunConfig)} | _SWEEP_KEYS
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; valid keys are {sorted(known)}")
    search = SearchBlock(**check_keys(SearchBlock, data.get("search") or {}, "the search block"))
    resources = ResourcesBlock(**check_keys(ResourcesBlock, data.get("resources") or {}, "the resources block"))
    export = ExportBlock(**check_keys(ExportBlock, data.get("export") or {}, "the export block"))
    base = {k: v for k, v in data.items() if k not in _SWEEP_KEYS}
    domains = find_domains(base)
    for path_key in ("model", "task", "output_dir", "train.max_steps", "train.eval_every", "tracking.uri", "tracking.experiment"):
        if path_key in domains:
            raise ValueError(f"{path_key} cannot be searched in a sweep; fix its value")
    for block in ("data", "provenance"):
        if any(p.startswith(block + ".") for p in domains):
            raise ValueError(f"the {block} block cannot hold search domains; fix its values")
    fixed_steps = _get(base, "train.max_steps")
    if search.max_budget is None:
        if fixed_steps is None:
            raise ValueError("set search.max_budget: the optimiser steps of a full trial (the schedulers' max budget)")
        search.max_budget = fixed_steps
    elif fixed_steps is not None and fixed_steps != search.max_budget:
        raise ValueError(f"train.max_steps={fixed_steps} differs from search.max_budget={search.max_budget}; set only one")
    eval_every = _get(base, "train.eval_every") or 100
    if search.grace_period is None:
        search.grace_period = min(eval_every, search.max_budget)
    if search.grace_period > search.max_budget:
        raise ValueError(f"search.grace_period={search.grace_period} exceeds search.max_budget={search.max_budget}")
    methods = domains[METHOD_KEY].values if METHOD_KEY in domains else (base.get(METHOD_KEY, "craft"),)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    _check_method_overrides(base)
    if search.scheduler is None:
        search.scheduler = "moasha" if _sizes_vary(domains) else "asha"
    spec = SweepSpec(
        name=str(name or data.get("name") or (path.stem if path else "sweep")),
        base=base,
        domains=domains,
        search=search,
        resources=resources,
        export=export,
        path=path,
    )
    if not spec.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"sweep name {spec.name!r} may hold only letters, digits, '-', '_' and '.'")
    spec._probe()
    for point in search.points_to_evaluate or []:
        unknown = sorted(set(point) - set(domains))
        if unknown:
            raise ValueError(f"search.points_to_evaluate names {unknown}, which are not search domains {sorted(domains)}")
    return spec


def _check_method_overrides(base: dict) -> None:
    """A method's ``train`` block: a mapping of train keys, none of those the sweep fixes."""
    known = {f.name for f in fields(TrainBlock)}
    for method in METHODS:
        block = base.get(method)
        if not isinstance(block, dict) or OVERRIDE_BLOCK not in block:
            continue
        where = f"{method}.{OVERRIDE_BLOCK}"
        overrides = block[OVERRIDE_BLOCK]
        if not isinstance(overrides, dict):
            raise ValueError(f"{where} must map train keys to values or domains, got {type(overrides).__name__}")
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{where} names unknown train key(s) {unknown}; valid keys are {sorted(known)}")
        fixed = sorted(set(overrides) & set(FIXED_BY_SWEEP))
        if fixed:
            raise ValueError(f"{where}.{fixed[0]} cannot differ per method: every trial runs search.max_budget steps")


def _sizes_vary(domains: dict[str, Domain]) -> bool:
    """Whether two trials of this space can differ in adapter size (then the front has two objectives)."""
    rank_keys = {k for keys in RANK_KEYS.values() for k in keys}
    return any(p == METHOD_KEY or p in rank_keys or p.endswith(".target_modules") for p in domains)


def _default_rank(key: str) -> int:
    from craft.harness.runconfig import LoraBlock, PissaBlock, VeraBlock

    defaults = {"lora.r": LoraBlock.r, "pissa.r": PissaBlock.r, "vera.r": VeraBlock.r}
    return defaults.get(key, 1)
