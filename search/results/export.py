"""Export a sweep's chosen trials as run configs for production training.

Each exported file is the sweep spec with every domain fixed to the trial's values (other
methods' blocks dropped), the production training length, and a ``provenance`` block naming
the sweep, the trial, its score and adapter size, and its MLflow run. ``craft-search train
FILE`` trains it unchanged; at the trial's budget and seed it reproduces the trial.

Picks: ``best`` (highest final score, fewer parameters on ties), ``pareto`` (the front, fewest
parameters first) and ``budget:N`` (the best trials with at most N adapter parameters).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft.harness.runconfig import RunConfig

from ..spec import spec_from_dict
from .pareto import ParetoTrial, SweepTable, pareto_front

__all__ = ["Pick", "parse_pick", "choose_trials", "export_configs", "ExportedConfig"]


@dataclass(frozen=True)
class Pick:
    """Which trials to export: ``kind`` best, pareto or budget (with ``budget`` parameters)."""

    kind: str
    budget: int | None = None

    def __str__(self) -> str:
        return f"budget:{self.budget}" if self.kind == "budget" else self.kind


@dataclass(frozen=True)
class ExportedConfig:
    """One written config and the trial it came from."""

    path: Path
    trial: ParetoTrial
    run: RunConfig


def parse_pick(text: str) -> Pick:
    """``best``, ``pareto`` or ``budget:N`` (N adapter parameters, ``_`` and ``,`` allowed).

    Raises:
        ValueError: anything else, in one line.
    """
    if text in ("best", "pareto"):
        return Pick(text)
    if text.startswith("budget:"):
        digits = text.removeprefix("budget:").replace("_", "").replace(",", "")
        if digits.isdigit():
            return Pick("budget", int(digits))
    raise ValueError(f"--pick {text!r}: choose best, pareto or budget:N (N adapter parameters, e.g. budget:20000)")


def _by_score(trials: list[ParetoTrial]) -> list[ParetoTrial]:
    return sorted(trials, key=lambda t: (-t.score, t.adapter_parameters, t.trial_id))


def choose_trials(table: SweepTable, pick: Pick, top: int | None = None) -> list[ParetoTrial]:
    """The trials ``pick`` selects, at most ``top`` of them (default: 1 for best and budget, all of the front).

    Raises:
        ValueError: no trial of the sweep ran its full budget, or none fits the budget.
    """
    full = table.full()
    if not full:
        counts = ", ".join(f"{table.count(o)} {o}" for o in ("pruned", "failed", "unfinished", "running") if table.count(o))
        raise ValueError(
            f"sweep {table.name} has no trial that ran its full budget ({len(table.trials)} trials"
            f"{': ' + counts if counts else ''}); nothing to export"
        )
    if top is not None and top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    if pick.kind == "best":
        return _by_score(full)[: top or 1]
    if pick.kind == "pareto":
        front = pareto_front(full)
        return front if top is None else sorted(_by_score(front)[:top], key=lambda t: t.adapter_parameters)
    fitting = [t for t in full if t.adapter_parameters <= pick.budget]
    if not fitting:
        smallest = min(full, key=lambda t: t.adapter_parameters)
        raise ValueError(
            f"no complete trial of sweep {table.name} fits budget:{pick.budget:,}: the smallest adapter has "
            f"{smallest.adapter_parameters:,} parameters (trial {smallest.trial_id}); raise the budget"
        )
    return _by_score(fitting)[: top or 1]


def _trial_run_id(table: SweepTable, trial: ParetoTrial) -> str | None:
    """The trial's MLflow run, looked up under the sweep's parent run (None when unreachable)."""
    if trial.run_id or not (table.tracking_uri and table.parent_run_id):
        return trial.run_id
    try:
        from mlflow.tracking import MlflowClient

        from ..names import TRIAL_ID_TAG
        from ..tracking import check_tracking_uri

        check_tracking_uri(table.tracking_uri, timeout=2.0)
        client = MlflowClient(tracking_uri=table.tracking_uri)
        parent = client.get_run(table.parent_run_id)
        found = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{table.parent_run_id}'",
            max_results=1,
        )
        return found[0].info.run_id if found else None
    except Exception:  # provenance without the run id beats no export: the sweep and trial id still name it
        return None


def export_configs(
    table: SweepTable,
    pick: Pick,
    out_dir: str | Path,
    *,
    top: int | None = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    output_root: str = "runs/production",
) -> list[ExportedConfig]:
    """Write one run config per chosen trial into ``out_dir`` (``<sweep>-<trial>.yaml``).

    Args:
        table: the sweep (:func:`search.results.pareto.load_sweep`).
        pick: which trials (:func:`parse_pick`).
        out_dir: where the YAML files go (created).
        top: at most this many trials.
        max_steps, epochs: the production training length (at most one); default the spec's
            ``export`` block, else the sweep's trial budget (the trial reproduced).
        output_root: each config's ``output_dir`` is ``<output_root>/<sweep>-<trial>``.

    A config whose spec names no tracking URI gets the sweep's, so the production run sits
    beside the trial it came from.

    Raises:
        ValueError: bad pick, empty sweep, budget below every trial, conflicting lengths.
    """
    if max_steps is not None and epochs is not None:
        raise ValueError("give --max-steps or --epochs, not both")
    spec = spec_from_dict(table.spec)
    if max_steps is None and epochs is None:
        max_steps, epochs = spec.export.max_steps, spec.export.epochs
    chosen = choose_trials(table, pick, top)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exported = []
    for trial in chosen:
        name = f"{table.name}-{trial.trial_id}"
        data = spec.run_data(trial.config, output_dir=f"{output_root.rstrip('/')}/{name}")
        if epochs is not None:
            data["train"]["max_steps"], data["train"]["epochs"] = None, float(epochs)
        elif max_steps is not None:
            data["train"]["max_steps"] = int(max_steps)
        data["save_merged"] = spec.export.save_merged
        if table.tracking_uri and not (data.get("tracking") or {}).get("uri"):
            data.setdefault("tracking", {})["uri"] = table.tracking_uri  # production runs beside their sweep
        data["provenance"] = _provenance(table, trial, spec.budget)
        run = RunConfig.from_dict(data)  # the file trains as written: check it now
        path = out / f"{name}.yaml"
        path.write_text(_header(table, trial, pick) + run.to_yaml())
        exported.append(ExportedConfig(path, trial, run))
    return exported


def _provenance(table: SweepTable, trial: ParetoTrial, budget: int) -> dict[str, Any]:
    data = {
        "sweep": table.name,
        "trial_id": trial.trial_id,
        "score": trial.score,
        "adapter_parameters": trial.adapter_parameters,
        "trial_steps": budget,
        "sweep_results": table.location or (str(table.path) if table.path else None),
        "tracking_uri": table.tracking_uri,
        "experiment": table.experiment,
        "sweep_run_id": table.parent_run_id,
        "run_id": _trial_run_id(table, trial),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return {k: v for k, v in data.items() if v is not None}


def _header(table: SweepTable, trial: ParetoTrial, pick: Pick) -> str:
    lines = [
        f"# Exported from sweep {table.name}, trial {trial.trial_id} (--pick {pick}):",
        f"# final validation score {trial.score:.4f} with {trial.adapter_parameters:,} adapter parameters.",
        "# Train it with: craft-search train <this file> [--workers N]",
    ]
    return "\n".join(lines) + "\n"
