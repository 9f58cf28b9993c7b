"""A sweep: one spec, one Ray Tune experiment, one MLflow parent run, one factor cache.

Every input check happens before Ray starts: the spec, the tracking server, the task, the model
and the ranks against its shapes. Then the driver fills the factor cache, opens (or, resuming,
reopens) the MLflow parent run and runs the Tuner: ``ParetoOptunaSearch`` samples (seeded with an
earlier sweep's trials on ``search.warm_start``), the scheduler (MO-ASHA by default,
:mod:`search.schedulers`) stops, the trainable trains. At the end the parent run gets the summary and the experiment directory
holds ``sweep.json`` (how to reach everything), ``summary.json`` (every trial) and
``optuna-study.db`` (the Optuna study, SQLite).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.connect import connect_ray
from craft.hub import load_model
from craft.tasks import load_task

from .layout import DEFAULT_STORAGE, STUDY_FILE, SUMMARY_FILE, SWEEP_FILE
from .names import ADAPTER_PARAMETERS, FINAL_SCORE, NODE_ID, SCORE, STEP, TRIAL_ID_TAG
from .plan import describe_methods
from .spec import SweepSpec, check_against_model
from .tracking import RunTracker, check_tracking_uri, resolve_tracking_uri

__all__ = [
    "TrialSummary",
    "SweepResult",
    "run_sweep",
    "experiment_dir",
    "ray_storage",
    "SWEEP_FILE",
    "SUMMARY_FILE",
    "STUDY_FILE",
]



@dataclass
class TrialSummary:
    """One trial as the sweep ended it."""

    trial_id: str
    outcome: str  # complete, pruned, failed, or unfinished (an interrupted sweep's running or pending trial)
    config: dict[str, Any]  # the sampled values, by dotted key
    score: float | None  # final score when complete, else the last evaluation's
    adapter_parameters: int | None
    step: int | None  # optimiser steps done
    node_id: str | None = None
    error: str | None = None
    path: str | None = None  # the trial's directory (its run/ holds the adapter)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    """A finished (or interrupted) sweep: its trials and where everything is."""

    name: str
    path: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[TrialSummary]
    cache: dict[str, Any]
    wall_s: float
    requested: int
    pareto: dict[str, Any] | None = None  # the front's trial ids, hypervolumes and plot paths (search.report)

    def count(self, outcome: str) -> int:
        """Trials that ended ``outcome`` (complete, pruned, failed)."""
        return sum(t.outcome == outcome for t in self.trials)

    def best(self, k: int = 5) -> list[TrialSummary]:
        """The ``k`` complete trials with the best final score (fewer adapter parameters first on ties)."""
        done = [t for t in self.trials if t.outcome == "complete" and t.score is not None]
        return sorted(done, key=lambda t: (-t.score, t.adapter_parameters or 0))[:k]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = {o: self.count(o) for o in ("complete", "pruned", "failed", "unfinished")}
        return data


def _is_uri(storage: str) -> bool:
    return "://" in storage


def ray_storage(spec: SweepSpec, storage: str | None = None) -> str:
    """Ray Tune's ``storage_path``: a URI (``s3://``, ``gs://``) as given, else an absolute local path."""
    where = storage or spec.search.storage or DEFAULT_STORAGE
    return where if _is_uri(where) else str(Path(where).expanduser().resolve())


def experiment_dir(spec: SweepSpec, storage: str | None = None) -> Path:
    """The sweep's local directory: ``STORAGE/NAME``, Ray Tune's experiment itself for local storage.

    With a URI storage Ray Tune writes there and this local directory (``./runs/sweeps/NAME``)
    holds the sweep's own files (``sweep.json``, ``summary.json``, the Optuna study).
    """
    where = ray_storage(spec, storage)
    return (Path(DEFAULT_STORAGE).resolve() if _is_uri(where) else Path(where)) / spec.name


@contextlib.contextmanager
def _tune_environment(spec: SweepSpec):
    """Ray Tune settings read from the environment, set for one ``fit`` and restored after."""
    settings = {
        "TUNE_MAX_PENDING_TRIALS_PG": str(spec.search.max_concurrent_trials),  # else Optuna trials start one by one
        "TUNE_GLOBAL_CHECKPOINT_S": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "2"),  # a killed driver loses <= ~2 s
        "RAY_AIR_NEW_OUTPUT": os.environ.get("RAY_AIR_NEW_OUTPUT", "0"),  # with verbose=0: no Ray tables, our lines
        # Every trial checkpoint forces a snapshot of the sweep state (what --resume needs): expected, not a warning.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_checked(spec: SweepSpec):
    run = spec.run_config({p: d.candidates()[0] for p, d in spec.domains.items()})
    task = load_task(run.task, run.data, seed=run.train.seed)  # unknown task, missing column, empty split: here
    model = load_model(run.model, num_labels=task.spec.num_labels, label_names=task.spec.label_names)
    try:
        return model, check_against_model(spec, model)
    except ValueError as err:
        raise ValueError(f"sweep spec {spec.path.name if spec.path else spec.name}: {err}") from None


def _check_resources(spec: SweepSpec) -> None:
    import ray

    total = ray.cluster_resources()
    need = spec.resources
    if need.cpu > total.get("CPU", 0):
        raise ValueError(f"a trial asks for {need.cpu} CPUs but the Ray cluster has {total.get('CPU', 0):g}; lower resources.cpu")
    if need.gpu > total.get("GPU", 0):
        raise ValueError(
            f"a trial asks for {need.gpu} GPUs but the Ray cluster has {total.get('GPU', 0):g}; set resources.gpu: 0"
        )


def _parent_run(spec: SweepSpec, uri: str, exp_dir: Path, resume: bool) -> tuple[RunTracker, str]:
    """The sweep's MLflow parent run (reopened when resuming) and its experiment's name."""
    experiment = spec.base.get("tracking", {}).get("experiment", "craft-search")
    state_file = exp_dir / SWEEP_FILE
    if resume:
        state = json.loads(state_file.read_text())
        return RunTracker(state["tracking_uri"], state["experiment"], run_id=state["parent_run_id"]), state["experiment"]
    tags = {"craft.sweep": spec.name, "craft.storage": str(exp_dir), "craft.kind": "sweep"}
    parent = RunTracker(uri, experiment, run_name=spec.name, tags=tags)
    parent.log_params(spec.to_dict())
    exp_dir.mkdir(parents=True, exist_ok=True)
    state = {"name": spec.name, "tracking_uri": uri, "experiment": experiment, "parent_run_id": parent.run_id,
             "spec": spec.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    parent.client.log_artifact(parent.run_id, str(state_file))  # the spec, for pareto and export from MLflow alone
    return parent, experiment


def _summaries(results: Any) -> list[TrialSummary]:
    # The trials' states (ResultGrid keeps its ExperimentAnalysis, whose trials have them, in order).
    statuses = [t.status for t in results._experiment_analysis.trials]
    trials = []
    for result, status in zip(results, statuses):
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if result.error or status == "ERROR":
            outcome = "failed"
        elif FINAL_SCORE in metrics:
            outcome = "complete"
        else:  # stopped early (a rung or the compute budget), or left running / pending by an interrupted sweep
            outcome = "pruned" if status == "TERMINATED" else "unfinished"
        score = metrics.get(FINAL_SCORE, metrics.get(SCORE))
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                outcome=outcome,
                config=dict(result.config or {}),
                score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
                adapter_parameters=metrics.get(ADAPTER_PARAMETERS),
                step=metrics.get(STEP),
                node_id=metrics.get(NODE_ID),
                error=str(result.error).strip().splitlines()[-1][:300] if result.error else None,
                path=str(result.path),
                metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "config"},
            )
        )
    return trials


def _drop_orphans(parent: RunTracker, experiment: str, trial_ids: set[str]) -> int:
    """Delete child runs of trials the restored experiment does not know (sampled after its last save)."""
    exp = parent.client.get_experiment_by_name(experiment)
    runs = parent.client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    orphans = [r for r in runs if r.data.tags.get(TRIAL_ID_TAG) not in trial_ids]
    for run in orphans:
        parent.client.delete_run(run.info.run_id)
    return len(orphans)


def _prune_checkpoints(exp_dir: Path) -> None:
    """Keep each trial's latest checkpoint, once the sweep's state names no other (local storage)."""
    for trial_dir in exp_dir.glob("*/"):
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        for old in checkpoints[:-1]:
            shutil.rmtree(old, ignore_errors=True)


def _save_study(searcher: Any, exp_dir: Path) -> Path | None:
    import optuna

    study = getattr(searcher, "study", None)
    if study is None or not study.trials:
        return None
    path = exp_dir / STUDY_FILE
    path.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=f"sqlite:///{path}")
    return path


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run (or resume) the sweep ``spec`` on Ray Tune and track it in MLflow.

    Args:
        spec: the validated sweep spec.
        address: a Ray cluster (``ray://`` or ``HOST:PORT``); None starts Ray here or joins the
            one already initialised in this process.
        tracking_uri: MLflow tracking URI (default: the spec's, else ``./mlflow.db``).
        storage: where Ray Tune keeps results (default: the spec's, else ``./runs/sweeps``).
        resume: continue the interrupted sweep of this name in ``storage``.
        cache_dir: the on-disk factor cache (default: the spec's, else ``~/.cache/craft-search/factors``).
        progress: print a line per finished trial.

    Raises:
        ValueError: bad input of any kind, before Ray starts; an unreachable cluster.
    """
    from ray import tune

    from .callbacks import MlflowSweepCallback, ProgressCallback
    from .factor_cache import FactorCache, default_cache_dir, publish_factors
    from .schedulers import TotalStepsStopper, make_scheduler
    from .searcher import ParetoOptunaSearch, make_sampler
    from .trainable import run_trial
    from .warm_start import add_warm_trials, load_warm_start

    started = time.time()
    uri = resolve_tracking_uri(tracking_uri or spec.base.get("tracking", {}).get("uri"))
    check_tracking_uri(uri)
    exp_dir = experiment_dir(spec, storage)
    if resume and not (exp_dir / SWEEP_FILE).is_file():
        raise ValueError(f"no sweep named {spec.name!r} to resume in {exp_dir.parent}; run it without --resume first")
    if not resume and exp_dir.exists():
        raise ValueError(
            f"a sweep named {spec.name!r} already exists in {exp_dir.parent}; pass --resume to continue it or --name to start another"
        )
    model, facts = _load_checked(spec)
    warm = None if resume else load_warm_start(spec, storage=storage or spec.search.storage, tracking_uri=tracking_uri)
    if progress:
        for line in describe_methods(spec, facts.costs):
            print(line, flush=True)
        if warm is not None:
            print(f"warm start from sweep {warm.sweep}: {len(warm.trials)} complete trial(s) seed the study"
                  + (f", {warm.left_out} left out (outside this space)" if warm.left_out else ""), flush=True)  # fmt: skip

    connect_ray(address)
    _check_resources(spec)
    run_id = uuid.uuid4().hex[:8]
    cache_name = f"craft-factor-cache-{spec.name}-{run_id}"
    scratch_root = Path(tempfile.gettempdir()) / "craft-search" / f"{spec.name}-{run_id}"
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    cache = FactorCache.options(
        name=cache_name, scheduling_strategy=here
    ).remote()  # on the driver's node: a lost worker cannot take it
    publish_factors(cache, model, facts.factor_requests, cache_dir or spec.search.factor_cache or default_cache_dir())
    del model
    stats = ray.get(cache.stats.remote())
    parent, experiment = _parent_run(spec, uri, exp_dir, resume)
    previous = parent.client.get_run(parent.run_id).data.tags.get("craft.decompositions")
    decompositions = stats["decompositions"] + (int(previous) if resume and previous else 0)
    parent.set_tags({"craft.decompositions": decompositions, "craft.factor_disk_loads": stats["disk_loads"]})

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, cache_name=cache_name, scratch_root=str(scratch_root)),
        spec.resources.to_ray(),
    )
    searcher = None
    stopper = TotalStepsStopper(spec.search.max_total_steps) if spec.search.max_total_steps else None
    if resume:
        tuner = tune.Tuner.restore(
            f"{ray_storage(spec, storage).rstrip('/')}/{spec.name}",
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
        )
    else:
        searcher = ParetoOptunaSearch(
            spec.sampler(facts.costs), make_sampler(spec.search.sampler, spec.search.seed), spec.search.points_to_evaluate
        )
        if warm is not None:
            add_warm_trials(searcher.study, spec, warm)
        scheduler = make_scheduler(
            spec.search.scheduler, max_t=spec.budget, grace_period=spec.search.grace_period,
            reduction_factor=spec.search.reduction_factor,
        )  # fmt: skip
        callbacks = [MlflowSweepCallback(uri, experiment, parent.run_id, spec)]
        if progress:
            callbacks.append(ProgressCallback(spec.search.num_samples))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.search.max_concurrent_trials,
                reuse_actors=True,  # a trial's worker keeps torch and transformers imported for the next
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=ray_storage(spec, storage),
                callbacks=callbacks,
                stop=stopper,
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                # Every checkpoint kept while the sweep runs: with num_to_keep, a killed driver's last
                # snapshot may name one already deleted. _prune_checkpoints keeps each trial's last.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                verbose=0,
            ),
        )
    try:
        with _tune_environment(spec):
            results = tuner.fit()
        fetches = ray.get(cache.stats.remote())["fetches"]
    finally:
        ray.kill(cache)
        shutil.rmtree(scratch_root, ignore_errors=True)
    trials = _summaries(results)
    if not _is_uri(ray_storage(spec, storage)):
        _prune_checkpoints(exp_dir)
    orphans = _drop_orphans(parent, experiment, {t.trial_id for t in trials}) if resume else 0
    result = SweepResult(
        name=spec.name,
        path=str(exp_dir),
        tracking_uri=parent.uri,
        experiment=experiment,
        parent_run_id=parent.run_id,
        trials=trials,
        cache={**stats, "decompositions": decompositions, "fetches": fetches},
        wall_s=time.time() - started,
        requested=spec.search.num_samples,
    )
    best = result.best(1)
    parent.set_tags(
        {
            "craft.trials": len(trials),
            "craft.complete": result.count("complete"),
            "craft.pruned": result.count("pruned"),
            "craft.failed": result.count("failed"),
            "craft.orphans_deleted": orphans,
            "craft.best_trial": best[0].trial_id if best else "none",
        }
    )
    if best:
        parent.log_metrics({"best_final_score": best[0].score, "best_adapter_parameters": best[0].adapter_parameters or 0})
    (exp_dir / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    _save_study(searcher, exp_dir)
    parent.client.log_artifact(parent.run_id, str(exp_dir / SUMMARY_FILE))
    limit = spec.search.max_total_steps  # the compute budget ended it: finished, not interrupted (also after --resume)
    spent = limit is not None and sum(t.step or 0 for t in trials) >= limit
    finished = (spent or len(trials) >= spec.search.num_samples) and result.count("unfinished") == 0
    try:
        from .pareto import load_sweep
        from .report import report_front

        report = report_front(load_sweep(exp_dir), log=True)  # the plots and the hypervolume, in the parent run
        result.pareto = {"front": [t.trial_id for t in report.front], "hypervolume": report.hypervolumes,
                         "png": str(report.png), "html": str(report.html)}  # fmt: skip
    finally:
        parent.end("FINISHED" if finished else "KILLED")
    return result
