"""Search domains in a sweep spec and the define-by-run space Optuna samples from.

In a sweep spec any run-config value may be a domain::

    {choice: [craft, lora]}          # categorical (values may be lists, e.g. target modules)
    {int: [4, 128], log: true}       # integers in [lo, hi], optionally on a log scale
    {float: [1.0e-4, 1.0e-2], log: true}

Domains under a method's block (``craft.*``, ``lora.*``, ...) are sampled only for trials of
that method. With a parameter budget the ranks are sampled last, each bounded so that the
trial's adapter stays within the budget (exact closed forms, see :mod:`craft.budget`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from craft.budget import craft_parameters
from craft.harness.runconfig import METHODS

__all__ = [
    "describe_config",
    "encode_choice",
    "decode_choice",
    "Domain",
    "parse_domain",
    "find_domains",
    "TargetCost",
    "SpaceSampler",
    "RANK_KEYS",
    "METHOD_KEY",
]

KINDS = ("choice", "int", "float")
METHOD_KEY = "method"
RANK_KEYS: dict[str, tuple[str, ...]] = {
    "craft": ("craft.rank_layers", "craft.rank_out", "craft.rank_in"),
    "lora": ("lora.r",),
    "pissa": ("pissa.r",),
    "vera": ("vera.r",),
}


def _is_number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Domain:
    """One searchable value: ``kind`` choice, int or float; ``values`` the choices or (lo, hi)."""

    kind: str
    values: tuple
    log: bool = False

    def candidates(self) -> list:
        """The values that bound the domain: every choice, or its two ends."""
        return list(self.values) if self.kind == "choice" else [self.values[0], self.values[1]]

    @property
    def low(self) -> Any:
        return min(self.values) if self.kind == "choice" else self.values[0]

    @property
    def high(self) -> Any:
        return max(self.values) if self.kind == "choice" else self.values[1]

    def suggest(self, trial: Any, name: str, high: int | None = None) -> Any:
        """Sample from an Optuna trial; ``high`` lowers an int domain's upper end (a budget)."""
        if self.kind == "int":
            top = self.values[1] if high is None else max(self.values[0], min(self.values[1], high))
            return trial.suggest_int(name, self.values[0], top, log=self.log)
        if self.kind == "float":
            return trial.suggest_float(name, self.values[0], self.values[1], log=self.log)
        encoded = [encode_choice(v) for v in self.values]  # Optuna categoricals hold only scalars
        return decode_choice(trial.suggest_categorical(name, encoded))

    def to_dict(self) -> dict:
        data: dict[str, Any] = {self.kind: list(self.values)}
        if self.log:
            data["log"] = True
        return data


def encode_choice(value: Any) -> Any:
    """A choice as Optuna can hold it: lists and mappings as JSON text, scalars unchanged."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode_choice(value: Any) -> Any:
    """The inverse of :func:`encode_choice`."""
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def parse_domain(path: str, raw: Any) -> Domain | None:
    """The :class:`Domain` written at ``path``; None when ``raw`` is a plain value or block.

    Raises:
        ValueError: ``raw`` names a domain kind but is malformed.
    """
    if not isinstance(raw, Mapping) or not any(k in raw for k in KINDS):
        return None
    kinds = [k for k in KINDS if k in raw]
    hint = "write {choice: [a, b]}, {int: [lo, hi]} or {float: [lo, hi]}, with log: true for a log scale"
    extra = sorted(set(raw) - set(KINDS) - {"log"})
    if len(kinds) != 1 or extra:
        raise ValueError(
            f"{path}: {dict(raw)} is not a search domain ({'unknown key ' + str(extra) if extra else 'one kind only'}); {hint}"
        )
    kind = kinds[0]
    values, log = raw[kind], raw.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{path}: log must be true or false, got {log!r}")
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: choice needs a non-empty list of values, got {values!r}; {hint}")
        if log:
            raise ValueError(f"{path}: log applies to int and float domains, not to choice")
        return Domain("choice", tuple(values))
    integer = kind == "int"
    if not (isinstance(values, list) and len(values) == 2 and all(_is_number(v, integer) for v in values)):
        raise ValueError(f"{path}: {kind} needs [lo, hi] as two {'integers' if integer else 'numbers'}, got {values!r}; {hint}")
    lo, hi = values
    if lo > hi:
        raise ValueError(f"{path}: the low end {lo} is above the high end {hi}; write [lo, hi]")
    if log and lo <= 0:
        raise ValueError(f"{path}: a log-scale domain needs a positive low end, got {lo}")
    return Domain(kind, (lo, hi) if integer else (float(lo), float(hi)), log)


def find_domains(data: Mapping[str, Any], prefix: str = "") -> dict[str, Domain]:
    """Every domain in nested plain data, by dotted path, in document order."""
    found: dict[str, Domain] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        domain = parse_domain(path, value)
        if domain is not None:
            found[path] = domain
        elif isinstance(value, Mapping):
            found.update(find_domains(value, path + "."))
    return found


@dataclass(frozen=True)
class TargetCost:
    """What prices one method's adapter on a model: see :mod:`craft.budget`."""

    num_types: int  # CRAFT projection types (stacks)
    lora_per_rank: int  # sum of (in + out) over the adapted modules
    num_modules: int
    sum_out: int

    def price(self, method: str, values: Mapping[str, Any]) -> int:
        """Adapter parameters of ``method`` with the rank values in ``values`` (dotted keys)."""
        if method == "craft":
            return craft_parameters(self.num_types, [values[k] for k in RANK_KEYS["craft"]])
        if method in ("lora", "pissa"):
            return values[f"{method}.r"] * self.lora_per_rank
        if method == "vera":
            return values["vera.r"] * self.num_modules + self.sum_out
        return 0


@dataclass
class SpaceSampler:
    """The define-by-run space handed to ``OptunaSearch``: call it with an Optuna trial.

    Returns the trial's values by dotted key (``method`` first). Picklable: Ray saves it with
    the searcher's state so an interrupted sweep resumes.

    Attributes:
        domains: dotted path -> :class:`Domain`, from the spec.
        fixed: dotted path -> value for the rank keys the spec fixes (priced under a budget).
        costs: method -> :class:`TargetCost` on the sweep's model (needed with a budget).
        max_adapter_params: the budget, or None.
        overrides: method -> the global ``train.*`` keys its own block sets (not sampled for it).
    """

    domains: dict[str, Domain]
    fixed: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, TargetCost] = field(default_factory=dict)
    max_adapter_params: int | None = None
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def methods(self) -> list[str]:
        """The methods a trial may get."""
        method = self.domains.get(METHOD_KEY)
        return list(method.values) if method is not None else [self.fixed.get(METHOD_KEY, "craft")]

    def __call__(self, trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        method_domain = self.domains.get(METHOD_KEY)
        method = method_domain.suggest(trial, METHOD_KEY) if method_domain else self.fixed.get(METHOD_KEY, "craft")
        values[METHOD_KEY] = method
        ranks = RANK_KEYS.get(method, ())
        for path in self.keys_for(method):
            if path != METHOD_KEY and path not in ranks:
                values[path] = self.domains[path].suggest(trial, path)
        for path in ranks:  # last, so the budget can bound each one
            if path in self.domains:
                values[path] = self.domains[path].suggest(trial, path, self._rank_bound(method, path, values))
        return values

    def keys_for(self, method: str) -> list[str]:
        """The domains a trial of ``method`` samples: not other methods' blocks, not the global
        ``train.*`` keys its own block overrides."""
        overridden = getattr(self, "overrides", {}).get(method, ())  # a sampler pickled by an older sweep has none
        keys = []
        for path in self.domains:
            block = path.split(".", 1)[0]
            if path in overridden or (block in METHODS and block != method):
                continue
            keys.append(path)
        return keys

    def _rank_bound(self, method: str, path: str, values: dict[str, Any]) -> int | None:
        if self.max_adapter_params is None:
            return None
        cost = self.costs[method]
        ranks = RANK_KEYS[method]
        # The smallest the keys still to sample can be: their low ends (or fixed values).
        trial_values = {k: values.get(k, self.fixed.get(k, self.domains[k].low if k in self.domains else None)) for k in ranks}
        if method == "craft":
            trial_values[path] = 0
            left = self.max_adapter_params - cost.price("craft", trial_values)
            return math.isqrt(max(left, 0) // cost.num_types)
        if method == "vera":
            return (self.max_adapter_params - cost.sum_out) // cost.num_modules
        return self.max_adapter_params // cost.lora_per_rank


def describe_config(config: dict[str, Any]) -> str:
    """A trial's sampled values in a short line: ``craft 6/32/64 lr=3.1e-03 ...``."""
    method = config.get("method", "")
    ranks = [config.get(f"craft.{k}") for k in ("rank_layers", "rank_out", "rank_in")]
    head = f"{method} {'/'.join(str(r) for r in ranks)}" if method == "craft" and all(ranks) else method
    rest = []
    for key, value in config.items():
        if key == "method" or (method == "craft" and key in {f"craft.{k}" for k in ("rank_layers", "rank_out", "rank_in")}):
            continue
        short = key.split(".", 1)[-1]
        rest.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join([head, *rest]).strip()
