"""A sweep's front as users see it: the table, the hypervolumes, the plots, logged to MLflow.

Shared by ``craft-search pareto`` and the end of every sweep (:func:`search.sweep.run_sweep`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..space import describe_config
from .pareto import ParetoTrial, SweepTable, default_reference, hypervolume, pareto_front
from .plots import HTML_NAME, PNG_NAME, write_html, write_png

__all__ = ["FrontReport", "report_front", "log_front"]

FRONT_DIR = "pareto"


@dataclass
class FrontReport:
    """The front of a sweep, its hypervolumes (overall and per method) and where the plots are."""

    table: SweepTable
    objectives: tuple[str, ...]
    reference: tuple[float, ...]
    front: list[ParetoTrial]
    hypervolumes: dict[str, float]  # "all" and one per method
    png: Path
    html: Path
    logged: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the front's trials, the hypervolumes with their reference, the plot paths."""
        return {
            "sweep": self.table.name,
            "source": self.table.source,
            "objectives": list(self.objectives),
            "reference": list(self.reference),
            "hypervolume": self.hypervolumes,
            "front": [t.__dict__ for t in self.front],
            "png": str(self.png),
            "html": str(self.html),
            "logged_to": self.table.parent_run_id if self.logged else None,
        }

    def format(self) -> str:
        """The front as a table, the hypervolumes against the stated reference point, the plots."""
        table = self.table
        lines = [
            f"sweep {table.name} ({table.source}): {len(table.trials)} trials, {len(table.full())} ran their full budget"
            + (" (still running)" if table.running else "")
        ]
        if not self.front:
            lines.append("  no trial has run its full budget yet: no front")
        else:
            lines.append(
                f"Pareto front on {', '.join(self.objectives)} ({len(self.front)} trials, fewest parameters first; "
                f"score: {table.score_label}):"
            )
            lines.append(f"  {'trial':<12} {'method':<7} {'score':>7} {'params':>10} {'train s':>8}  config")
            for t in self.front:
                seconds = f"{t.train_s:.1f}" if t.train_s is not None else "-"
                lines.append(
                    f"  {t.trial_id:<12} {t.method:<7} {t.score:>7.4f} {t.adapter_parameters:>10,} {seconds:>8}  "
                    f"{describe_config(t.config)}"
                )
            ref = ", ".join(f"{o} {v:g}" for o, v in zip(self.objectives, self.reference))
            space = "score x log10(1 + params)" + (" x seconds" if "time" in self.objectives else "")
            lines.append(f"hypervolume ({space}) against ({ref}):")
            lines.append("  " + "  ".join(f"{k} {v:.4f}" for k, v in self.hypervolumes.items()))
        where = f" (logged to MLflow parent run {table.parent_run_id})" if self.logged else ""
        lines.append(f"plots: {self.png} and {self.html}{where}")
        return "\n".join(lines)


def report_front(
    table: SweepTable,
    out_dir: str | Path | None = None,
    *,
    objectives: tuple[str, ...] = ("score", "params"),
    reference: tuple[float, ...] | None = None,
    log: bool = True,
) -> FrontReport:
    """Compute the front and hypervolumes of ``table``, draw both plots, log them to the parent run.

    Args:
        table: the sweep (:func:`search.results.pareto.load_sweep`).
        out_dir: where the plots go (default: ``<results>/pareto``, else ``./pareto-<sweep>``).
        objectives: score,params or score,params,time (the plots always draw score against params).
        reference: the hypervolume reference point (default :func:`search.results.pareto.default_reference`).
        log: log the plots and the hypervolume to the sweep's MLflow parent run.

    Raises:
        ValueError: bad objectives or reference, an unreachable tracking server.
    """
    reference = reference or default_reference(table, objectives)
    front = pareto_front(table.trials, objectives)
    volumes = {"all": hypervolume(table.trials, reference, objectives)}
    for method in table.methods:
        volumes[method] = hypervolume([t for t in table.trials if t.method == method], reference, objectives)
    out = Path(out_dir) if out_dir else (table.path / FRONT_DIR if table.path else Path(f"pareto-{table.name}"))
    drawn = front if objectives == ("score", "params") else pareto_front(table.trials)
    png, html = write_png(table, drawn, out / PNG_NAME), write_html(table, drawn, out / HTML_NAME)
    logged = bool(log and table.parent_run_id and table.tracking_uri)
    if logged:
        log_front(table, (png, html), volumes["all"])
    return FrontReport(table, tuple(objectives), tuple(reference), front, volumes, png, html, logged)


def log_front(table: SweepTable, plots: tuple[Path, ...], volume: float) -> None:
    """The plots (under ``pareto/``) and the hypervolume into the sweep's MLflow parent run; its
    status is left as it is (a running sweep stays running)."""
    from mlflow.tracking import MlflowClient

    from ..tracking import check_tracking_uri

    check_tracking_uri(table.tracking_uri)
    client = MlflowClient(tracking_uri=table.tracking_uri)
    for path in plots:
        client.log_artifact(table.parent_run_id, str(path), FRONT_DIR)
    client.log_metric(table.parent_run_id, "hypervolume", volume, timestamp=int(time.time() * 1000))
