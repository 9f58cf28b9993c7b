"""Pareto fronts of a sweep: accuracy against adapter size (and optionally training time).

Data first, drawing second (:mod:`search.results.plots` draws what this module computes). A sweep is read
from its results directory (``summary.json`` once it ended) or, while it runs or from another
machine, from its MLflow parent run and the nested trial runs (``runs:/<parent run id>``).

Objectives: the final validation score (maximised), the adapter's trainable parameters (head
excluded, minimised) and, optionally, the training time in seconds (minimised). Only trials
that ran their full budget enter the front. The hypervolume is computed by ``moocore`` in the
space the plot draws: score, log10(1 + parameters) and seconds, against a reference point
stated in the same units as the table (score, parameters, seconds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from craft.harness.metrics import CLASSIFICATION_METRICS, METRIC_NAMES

from ..layout import DEFAULT_STORAGE, SUMMARY_FILE, SWEEP_FILE
from ..names import ADAPTER_PARAMETERS, CONFIG_TAG, FINAL_SCORE, OUTCOME_TAG, SCORE, STEP, TRAIN_SECONDS, TRIAL_ID_TAG
from ..storage import SweepStore, is_uri

__all__ = [
    "OBJECTIVES",
    "ParetoTrial",
    "SweepTable",
    "load_sweep",
    "pareto_front",
    "hypervolume",
    "default_reference",
    "parse_reference",
]

OBJECTIVES = ("score", "params", "time")  # the first two always, time on request
_MAXIMISE = {"score": True, "params": False, "time": False}


@dataclass(frozen=True)
class ParetoTrial:
    """One trial of a sweep as the front sees it.

    ``score`` is the final validation score of a complete trial, else its last evaluation's
    (pruned, running); ``train_s`` is known for complete trials only.
    """

    trial_id: str
    method: str
    outcome: str  # complete, pruned, failed, unfinished or running
    score: float | None
    adapter_parameters: int | None
    train_s: float | None = None
    step: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # the trial's MLflow run, when known

    @property
    def full(self) -> bool:
        """Ran its full budget, with a finite score and a parameter count: may enter the front."""
        return (
            self.outcome == "complete"
            and self.score is not None
            and math.isfinite(self.score)
            and self.adapter_parameters is not None
        )

    def value(self, objective: str) -> float:
        """The objective as the front compares it (score, parameters or seconds)."""
        if objective == "score":
            return float(self.score)
        if objective == "params":
            return float(self.adapter_parameters)
        if objective == "time":
            return float(self.train_s) if self.train_s is not None else math.inf
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


@dataclass
class SweepTable:
    """Every trial of one sweep, and where the sweep lives."""

    name: str
    source: str  # the results directory or the MLflow parent run it was read from
    trials: list[ParetoTrial]
    spec: dict[str, Any]  # the sweep spec as plain data (search.spec.spec_from_dict reads it)
    score_label: str = "validation score"
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    path: Path | None = None  # the local results directory, when there is one
    running: bool = False
    location: str | None = None  # the sweep's directory in its storage (a local path or a URI)

    def full(self) -> list[ParetoTrial]:
        """The trials that ran their full budget: the table the front is taken from."""
        return [t for t in self.trials if t.full]

    def count(self, outcome: str) -> int:
        """Trials that ended (or are) ``outcome``."""
        return sum(t.outcome == outcome for t in self.trials)

    @property
    def methods(self) -> list[str]:
        """The methods of the trials, CRAFT first."""
        seen = sorted({t.method for t in self.trials})
        return sorted(seen, key=lambda m: (m != "craft", m))


def pareto_front(trials: list[ParetoTrial], objectives: tuple[str, ...] = ("score", "params")) -> list[ParetoTrial]:
    """The non-dominated trials among the full-budget ones, fewest parameters first.

    Duplicates (equal in every objective) all stay on the front: they are the same point.
    A trial without a training time counts as infinitely slow when time is an objective.
    """
    _check_objectives(objectives)
    full = [t for t in trials if t.full]
    if not full:
        return []
    import moocore

    points = np.array([[t.value(o) for o in objectives] for t in full], dtype=float)  # (N, objectives)
    keep = moocore.is_nondominated(points, maximise=[_MAXIMISE[o] for o in objectives], keep_weakly=True)
    front = [t for t, k in zip(full, keep) if k]
    return sorted(front, key=lambda t: (t.adapter_parameters, -t.score, t.trial_id))


def hypervolume(
    trials: list[ParetoTrial], reference: tuple[float, ...], objectives: tuple[str, ...] = ("score", "params")
) -> float:
    """Hypervolume of the full-budget trials against ``reference`` (score, parameters[, seconds]).

    Measured where the plot draws: score × log10(1 + parameters) [× seconds]. Trials that do
    not improve on the reference in every objective add nothing; no such trial gives 0.
    """
    _check_objectives(objectives)
    if len(reference) != len(objectives):
        raise ValueError(f"the reference point needs {len(objectives)} values ({', '.join(objectives)}), got {len(reference)}")
    full = [t for t in trials if t.full and all(_better(t.value(o), r, o) for o, r in zip(objectives, reference))]
    if not full:
        return 0.0
    import moocore

    points = np.array([[_scaled(t.value(o), o) for o in objectives] for t in full], dtype=float)  # (N, objectives)
    ref = np.array([_scaled(r, o) for o, r in zip(objectives, reference)], dtype=float)  # (objectives,)
    return float(moocore.hypervolume(points, ref=ref, maximise=[_MAXIMISE[o] for o in objectives]))


def default_reference(table: SweepTable, objectives: tuple[str, ...] = ("score", "params")) -> tuple[float, ...]:
    """A reference point from the whole sweep: score 0, twice the largest adapter, twice the longest training.

    Every trial of the sweep counts (pruned ones too), so per-method hypervolumes of one sweep
    share it. Pass your own (``--reference``) to compare sweeps with each other.
    """
    _check_objectives(objectives)
    params = [t.adapter_parameters for t in table.trials if t.adapter_parameters is not None]
    seconds = [t.train_s for t in table.trials if t.train_s is not None]
    values = {"score": 0.0, "params": 2.0 * max(params, default=1), "time": 2.0 * max(seconds, default=1.0)}
    return tuple(values[o] for o in objectives)


def parse_reference(text: str, objectives: tuple[str, ...]) -> tuple[float, ...]:
    """``"0.5,100000"`` (score, parameters[, seconds]) -> a reference point.

    Raises:
        ValueError: not one number per objective.
    """
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(objectives) or not all(math.isfinite(v) for v in values):
        raise ValueError(f"--reference {text!r}: give {len(objectives)} numbers, {','.join(objectives)}, e.g. 0.5,100000")
    return values


def _check_objectives(objectives: tuple[str, ...]) -> None:
    if (
        tuple(objectives[:2]) != ("score", "params")
        or any(o not in OBJECTIVES for o in objectives)
        or len(set(objectives)) != len(objectives)
    ):
        raise ValueError(f"objectives must be score,params or score,params,time; got {','.join(objectives)}")


def _better(value: float, reference: float, objective: str) -> bool:
    return value > reference if _MAXIMISE[objective] else value < reference


def _scaled(value: float, objective: str) -> float:
    return math.log10(1.0 + value) if objective == "params" else value


# Reading a sweep ------------------------------------------------------------------------------


def _stores(text: str, storage: str | None) -> list[tuple[str, SweepStore]]:
    """Where a sweep named or located by ``text`` may be, as the user would write each place: its
    directory, or NAME in ``storage``."""
    stores = []
    parent, _, name = text.rstrip("/").rpartition("/")
    if is_uri(text):
        stores.append((text, SweepStore(parent, name)))
    else:
        path = Path(text).expanduser().resolve()
        stores.append((text, SweepStore(str(path.parent), path.name)))
    if "/" not in text and "\\" not in text:
        where = storage or DEFAULT_STORAGE
        shown = f"{where.rstrip('/')}/{text}" if is_uri(where) else str(Path(where).expanduser() / text)
        stores.append((shown, SweepStore(where, text)))
    return stores


def load_sweep(source: str | Path, *, storage: str | None = None, tracking_uri: str | None = None) -> SweepTable:
    """Read a finished or running sweep.

    Args:
        source: the sweep's directory (a local path or a URI such as ``s3://bucket/sweeps/NAME``),
            its name (looked up in ``storage``), or its MLflow parent run as ``runs:/<run id>``.
        storage: where sweeps are kept (default ``./runs/sweeps``; a local path or a URI), for a name.
        tracking_uri: the MLflow tracking URI for ``runs:/`` (default ``./mlflow.db``).

    Raises:
        ValueError: no such sweep, in one line.
    """
    text = str(source)
    if text.startswith("runs:/"):
        from ..tracking import resolve_tracking_uri

        return _from_mlflow(resolve_tracking_uri(tracking_uri), text.removeprefix("runs:/").strip("/"), None)
    candidates = _stores(text, storage)
    store = next((c for _, c in candidates if c.exists(SWEEP_FILE)), None)
    if store is None:
        tried = " or ".join(dict.fromkeys(shown for shown, _ in candidates))
        raise ValueError(
            f"no sweep at {tried} (no {SWEEP_FILE}); pass a sweep's results directory, its name, or runs:/<parent run id>"
        )
    state = store.read_json(SWEEP_FILE)
    if store.exists(SUMMARY_FILE):
        return _from_summary(store, state, store.read_json(SUMMARY_FILE))
    return _from_mlflow(tracking_uri or state["tracking_uri"], state["parent_run_id"], store)  # still running


def _score_label(metrics: dict[str, Any]) -> str:
    """``validation accuracy`` or ``validation score (mean of f1, accuracy)`` from a trial's metrics."""
    splits = [k.rsplit("/", 1)[0] for k in metrics if k.endswith("/score") and not k.startswith(("test/", "lr/"))]
    if not splits:
        return "validation score"
    split = splits[0]
    names = [k.split("/", 1)[1] for k in metrics if k.startswith(split + "/") and k.split("/", 1)[1] in METRIC_NAMES]
    if len(names) == 1:
        unit = " (fraction correct)" if names[0] == "accuracy" else (" (0 to 1)" if names[0] in CLASSIFICATION_METRICS else "")
        return f"{split} {names[0]}{unit}"
    return f"{split} score (mean of {', '.join(names)})" if names else f"{split} score"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _from_summary(store: SweepStore, state: dict[str, Any], summary: dict[str, Any]) -> SweepTable:
    trials, label = [], "validation score"
    for t in summary.get("trials", []):
        metrics = t.get("metrics") or {}
        config = t.get("config") or {}
        params = _number(t.get("adapter_parameters"))
        trials.append(
            ParetoTrial(
                trial_id=t["trial_id"],
                method=str(config.get("method", state["spec"].get("method", "craft"))),
                outcome=t["outcome"],
                score=_number(t.get("score")),
                adapter_parameters=int(params) if params is not None else None,
                train_s=_number(metrics.get(TRAIN_SECONDS)),
                step=t.get("step"),
                config=config,
            )
        )
        if t["outcome"] == "complete":
            label = _score_label(metrics)
    return SweepTable(
        name=state["name"],
        source=store.uri,
        trials=trials,
        spec=state["spec"],
        score_label=label,
        tracking_uri=state.get("tracking_uri"),
        experiment=state.get("experiment"),
        parent_run_id=state.get("parent_run_id"),
        path=store.local_path,
        location=store.uri,
    )


def _from_mlflow(uri: str, parent_run_id: str, store: SweepStore | None) -> SweepTable:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..tracking import check_tracking_uri

    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {parent_run_id!r} at {uri}; pass a sweep's parent run id (see its sweep.json)") from None
    if parent.data.tags.get("craft.kind") != "sweep":
        raise ValueError(f"MLflow run {parent_run_id} is not a sweep's parent run (tag craft.kind=sweep is missing)")
    if store is not None and store.exists(SWEEP_FILE):
        state = store.read_json(SWEEP_FILE)
    else:
        local = client.download_artifacts(parent_run_id, SWEEP_FILE)
        state = json.loads(Path(local).read_text())
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=50000
    )
    trials, label = [], "validation score"
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        outcome = tags.get(OUTCOME_TAG) or ("running" if run.info.status == "RUNNING" else "unfinished")
        complete = outcome == "complete"
        params = _number(metrics.get(ADAPTER_PARAMETERS))
        trials.append(
            ParetoTrial(
                trial_id=tags.get(TRIAL_ID_TAG, run.info.run_name or run.info.run_id),
                method=tags.get("craft.method", "craft"),
                outcome=outcome,
                score=_number(metrics.get(FINAL_SCORE if complete else SCORE)),
                adapter_parameters=int(params) if params is not None else None,
                train_s=_number(metrics.get(TRAIN_SECONDS)) if complete else None,
                step=int(metrics[STEP]) if STEP in metrics else None,
                config=json.loads(tags.get(CONFIG_TAG, "{}")),
                run_id=run.info.run_id,
            )
        )
        if complete:
            label = _score_label(metrics)
    trials.sort(key=lambda t: t.trial_id)
    return SweepTable(
        name=state["name"],
        source=f"runs:/{parent_run_id} at {uri}",
        trials=trials,
        spec=state["spec"],
        score_label=label,
        tracking_uri=uri,
        experiment=state.get("experiment"),
        parent_run_id=parent_run_id,
        path=store.local_path if store else None,
        running=parent.info.status == "RUNNING",
        location=store.uri if store else parent.data.tags.get("craft.storage"),
    )
