"""A training run with MLflow tracking: the ``train`` command's work, apart from parsing.

One MLflow run per job: params (the flattened run config), metrics at every evaluation, the
final and test metrics, parameter counts, the adapter and config as artifacts. A resumed job
writes into the MLflow run it started (its id is kept in ``output_dir/mlflow_run.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from craft.harness.job import JobResult, prepare_job, run_job
from craft.harness.runconfig import RunConfig
from craft.harness.trainer import EvalEvent

from .tracking.runs import RunTracker, check_tracking_uri, resolve_tracking_uri

__all__ = ["TrackedJob", "train_tracked", "event_metrics", "open_tracker", "log_job", "log_missing_evaluations"]

_RUN_FILE = "mlflow_run.json"


@dataclass
class TrackedJob:
    """A finished job and where it was tracked (``run_id`` None when tracking is off)."""

    job: JobResult
    tracking_uri: str | None
    run_id: str | None


def event_metrics(event: EvalEvent) -> dict[str, float]:
    """The metrics of one evaluation as logged: eval metrics, train loss, learning rates."""
    metrics = dict(event.metrics)
    if event.train_loss is not None:
        metrics["train/loss"] = event.train_loss
    metrics.update({f"lr/{group}": lr for group, lr in event.learning_rates.items()})
    metrics["epoch"] = event.epoch
    return metrics


def open_tracker(run: RunConfig, resume: bool) -> RunTracker:
    """The job's MLflow run: the one a resumed job started, else a new one with the run config as
    params and, for an exported config, tags and a note linking the source trial."""
    uri = resolve_tracking_uri(run.tracking.uri)
    run_file = Path(run.output_dir) / _RUN_FILE
    previous = json.loads(run_file.read_text()) if resume and run_file.is_file() else None
    if previous and previous.get("tracking_uri") == uri:
        return RunTracker(uri, run.tracking.experiment, run_id=previous["run_id"])
    tags = {"craft.method": run.method, "craft.task": run.task, "craft.model": run.model}
    for key, value in (run.provenance or {}).items():
        tags[f"craft.source.{key}"] = str(value)
    if run.provenance:
        tags["mlflow.note.content"] = _source_note(run.provenance)
    tracker = RunTracker(uri, run.tracking.experiment, run_name=Path(run.output_dir).name, tags=tags)
    tracker.log_params(run.to_dict())
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"tracking_uri": uri, "run_id": tracker.run_id}) + "\n")
    return tracker


def train_tracked(run: RunConfig, *, resume: bool = False, progress: bool | None = None) -> TrackedJob:
    """Run :func:`craft.harness.job.run_job` and track it in MLflow (unless ``run.tracking.enabled`` is off).

    Raises:
        ValueError: bad input or an unreachable tracking server, before any training.
        FloatingPointError: the loss diverged (the MLflow run is marked FAILED).
    """
    if run.tracking.enabled:
        check_tracking_uri(resolve_tracking_uri(run.tracking.uri))  # before minutes of loading
    prepared = prepare_job(run)  # every input check, before an MLflow run exists
    if not run.tracking.enabled:
        return TrackedJob(run_job(run, prepared=prepared, resume=resume, progress=progress), None, None)
    tracker = open_tracker(run, resume)
    with tracker:

        def report(event: EvalEvent) -> None:
            tracker.log_metrics(event_metrics(event), step=event.step)

        job = run_job(run, prepared=prepared, callback=report, resume=resume, progress=progress)
        if resume:
            log_missing_evaluations(tracker, job.train.history)
        log_job(tracker, job)
    return TrackedJob(job, tracker.uri, tracker.run_id)


def log_missing_evaluations(tracker: RunTracker, history: list[EvalEvent]) -> None:
    """Log the evaluations of a resumed job that its MLflow run lacks: a job killed after writing a
    checkpoint and before logging that checkpoint's evaluation resumes past it, so only the
    checkpoint's history still holds it."""
    logged = {m.step for m in tracker.client.get_metric_history(tracker.run_id, "epoch")}
    for event in history:
        if event.step not in logged:
            tracker.log_metrics(event_metrics(event), step=event.step)


def log_job(tracker: RunTracker, job: JobResult) -> None:
    """A finished job's test metrics, sizes, adapter, config and metrics file into its MLflow run."""
    final_step = job.train.steps
    tracker.log_metrics(job.test_metrics, step=final_step)
    tracker.log_metrics({"adapter_parameters": job.adapter_parameters, "head_parameters": job.head_parameters}, step=final_step)
    tracker.set_tags({"craft.adapter_parameters": job.adapter_parameters, "craft.stopped_early": job.train.stopped_early})
    tracker.log_artifacts(job.adapter_dir, "adapter")
    for name in ("config.yaml", "metrics.json"):
        tracker.client.log_artifact(tracker.run_id, str(job.output_dir / name))


def _source_note(provenance: dict) -> str:
    """The MLflow run's description for a config exported from a sweep: which trial, which score."""
    parts = [f"Trained from sweep **{provenance.get('sweep')}**, trial `{provenance.get('trial_id')}`"]
    if provenance.get("run_id"):
        parts.append(f"(MLflow run `{provenance['run_id']}`)")
    if provenance.get("score") is not None:
        parts.append(f"which scored {provenance['score']:.4f} with {provenance.get('adapter_parameters') or 0:,} adapter parameters")
    return " ".join(parts) + "."
