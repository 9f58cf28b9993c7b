"""A sweep: one spec, one Ray Tune experiment, one MLflow parent run, one factor cache.

Every input check happens before Ray starts: the spec, the tracking server, the task, the model
and the ranks against its shapes. Then the driver fills the factor cache, opens (or, resuming,
reopens) the MLflow parent run and runs the Tuner: ``ParetoOptunaSearch`` samples (seeded with an
earlier sweep's trials on ``search.warm_start``), the scheduler (MO-ASHA by default,
:mod:`search.schedulers`) stops, the trainable trains.

Everything lives in the sweep's directory ``STORAGE/NAME`` (a local path or object storage,
:mod:`search.storage`), so any machine that reaches the storage can resume, read or export it:
``sweep.json`` (the spec as started and the MLflow ids, written before the first trial), Ray
Tune's experiment (each trial's directory: its latest training checkpoint, kept by the trial
itself, see :mod:`search.trainable`, and ``run/`` with config, adapter and metrics), ``optuna-study.db`` (the Optuna study, SQLite, written at every ask and tell;
with object storage the driver's working copy is copied there with every snapshot) and, at the
end, ``summary.json`` (every trial) and ``pareto/`` (the plots).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.connect import connect_ray
from craft.harness.hub import load_model
from craft.harness.tasks import load_task

from .envvars import environment
from .layout import DEFAULT_STORAGE, STUDY_FILE, SUMMARY_FILE, SWEEP_FILE
from .model_facts import check_against_model
from .names import ADAPTER_PARAMETERS, FINAL_SCORE, NODE_ID, SCORE, STEP
from .plan import describe_methods
from .spec import SweepSpec, spec_changes, spec_from_dict
from .storage import SweepStore, resolve_storage
from .tracking.queue import PARENT, PENDING_FILE, TrackingQueue, TrackingUnavailable, keep_pending, tracking_queue
from .tracking.runs import RunTracker, check_tracking_uri, drop_orphans, resolve_tracking_uri

__all__ = [
    "TrialSummary",
    "SweepResult",
    "run_sweep",
    "experiment_dir",
    "ray_storage",
    "sweep_store",
    "stored_spec",
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
    path: str | None = None  # the trial's directory in the storage (its run/ holds config, adapter, metrics)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    """A finished (or interrupted) sweep: its trials and where everything is."""

    name: str
    path: str  # the sweep's directory in its storage (a local path or a URI)
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[TrialSummary]
    cache: dict[str, Any]
    wall_s: float
    requested: int
    pareto: dict[str, Any] | None = None  # the front's trial ids, hypervolumes and plot paths (search.results.report)
    tracking: dict[str, Any] | None = None  # the MLflow writes: requests, seconds, retries, longest outage

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


def ray_storage(spec: SweepSpec, storage: str | None = None) -> str:
    """Ray Tune's ``storage_path``: a URI (``s3://``, ``gs://``) as given, else an absolute local path."""
    return resolve_storage(storage or spec.search.storage or DEFAULT_STORAGE)


def sweep_store(spec: SweepSpec, storage: str | None = None) -> SweepStore:
    """The sweep's directory ``STORAGE/NAME`` in its storage (a local path or object storage)."""
    return SweepStore(ray_storage(spec, storage), spec.name)


def experiment_dir(spec: SweepSpec, storage: str | None = None) -> Path:
    """The sweep's directory on this machine: ``STORAGE/NAME`` itself for local storage.

    With object storage everything lives in the storage; this local directory
    (``./runs/sweeps/NAME``) holds the driver's working copy of the Optuna study (copied to the
    storage with every snapshot of the sweep) and the plots before they are copied there.
    """
    store = sweep_store(spec, storage)
    return store.local_path or Path(DEFAULT_STORAGE).resolve() / spec.name


def stored_spec(name: str, storage: str | None = None) -> SweepSpec:
    """The spec a sweep started with, read from its ``sweep.json`` in ``storage`` (what resuming
    after losing the driver's machine needs: no spec file, only the storage).

    Raises:
        ValueError: no sweep of that name there.
    """
    store = SweepStore(storage or DEFAULT_STORAGE, name)
    if not store.exists(SWEEP_FILE):
        raise ValueError(f"no sweep named {name!r} in {store.storage} (no {SWEEP_FILE}); pass a spec file or preset, or --storage")
    return spec_from_dict(store.read_json(SWEEP_FILE)["spec"])


@contextlib.contextmanager
def _tune_environment(spec: SweepSpec):
    """Ray Tune settings read from the environment, set for one ``fit`` and restored after."""
    settings = {
        "TUNE_MAX_PENDING_TRIALS_PG": str(spec.search.max_concurrent_trials),  # else Optuna trials start one by one
        # Snapshots of the sweep's state on Ray's adaptive schedule (<= 5% of the time, at least every 10 s)
        # unless the user sets one; a resumed sweep reruns what the last snapshot missed, from the trials' checkpoints.
        "TUNE_GLOBAL_CHECKPOINT_S": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "auto"),
        "RAY_AIR_NEW_OUTPUT": os.environ.get("RAY_AIR_NEW_OUTPUT", "0"),  # with verbose=0: no Ray tables, our lines
        # A snapshot that takes a while (a large sweep, object storage) is what --resume needs: expected, not a warning.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    with environment(settings):
        yield


def _load_checked(spec: SweepSpec):
    run = spec.run_config({p: d.candidates()[0] for p, d in spec.domains.items()})
    task = load_task(run.task, run.data, seed=run.train.seed)  # unknown task, missing column, empty split: here
    model = load_model(run.model, num_labels=task.spec.num_labels, label_names=task.spec.label_names)
    try:
        return model, check_against_model(spec, model)
    except ValueError as err:
        raise ValueError(f"sweep spec {spec.path.name if spec.path else spec.name}: {err}") from None


def _check_resources(spec: SweepSpec) -> None:
    """Refuse a trial no node of the cluster, running or one its autoscaler may add, can hold."""
    from cluster.capacity import check_capacity

    need = spec.resources
    fix = "lower resources.cpu" + (" or resources.gpu (0: no GPU)" if need.gpu else "")
    check_capacity({"CPU": need.cpu, "GPU": need.gpu}, 1, "a trial", fix)


def _parent_run(spec: SweepSpec, uri: str, store: SweepStore, state: dict[str, Any] | None) -> tuple[RunTracker, str]:
    """The sweep's MLflow parent run and its experiment's name: reopened from ``state`` (the
    stored ``sweep.json``) when resuming, else created, with ``sweep.json`` written to the storage."""
    if state is not None:
        return RunTracker(state["tracking_uri"], state["experiment"], run_id=state["parent_run_id"]), state["experiment"]
    experiment = spec.base.get("tracking", {}).get("experiment", "craft-search")
    tags = {"craft.sweep": spec.name, "craft.storage": store.uri, "craft.kind": "sweep"}
    parent = RunTracker(uri, experiment, run_name=spec.name, tags=tags)
    parent.log_params(spec.to_dict())
    state = {"name": spec.name, "tracking_uri": uri, "experiment": experiment, "parent_run_id": parent.run_id,
             "storage": store.storage, "spec": spec.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    store.write_json(SWEEP_FILE, state)
    with tempfile.TemporaryDirectory() as tmp:  # the spec, for pareto and export from MLflow alone
        (Path(tmp) / SWEEP_FILE).write_text(json.dumps(state, indent=2) + "\n")
        parent.client.log_artifact(parent.run_id, str(Path(tmp) / SWEEP_FILE))
    return parent, experiment


def _summaries(results: Any, store: SweepStore) -> list[TrialSummary]:
    # The trials' states (ResultGrid keeps its ExperimentAnalysis, whose trials have them, in order).
    statuses = [t.status for t in results._experiment_analysis.trials]
    trials = []
    for result, status in zip(results, statuses):
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or str(result.path).rstrip("/").rpartition("/")[2]
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
                path=store.location(str(result.path).rstrip("/").rpartition("/")[2]),
                metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "config"},
            )
        )
    return trials


def _study_url(spec: SweepSpec, store: SweepStore, storage: str | None, resume: bool) -> str:
    """Where the Optuna study lives: the SQLite file in the sweep's directory (local storage),
    else the driver's working copy in :func:`experiment_dir`, fetched from the storage when
    resuming (on this machine or another)."""
    local = experiment_dir(spec, storage) / STUDY_FILE
    if store.local_path is None and not resume:
        local.unlink(missing_ok=True)  # a working copy left by an earlier sweep of this name, since deleted
    if store.local_path is None and resume and store.exists(STUDY_FILE):
        store.download(STUDY_FILE, local)  # the storage's copy goes with the snapshot the sweep resumes from
    local.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local}"


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
        storage: where the sweep lives (a local path, ``s3://`` or ``gs://``; default: the
            spec's, else ``./runs/sweeps``).
        resume: continue the interrupted sweep of this name in ``storage``, with the spec it
            started with (read from its ``sweep.json``; a ``spec`` that differs is named in one line).
        cache_dir: the on-disk factor cache (default: the spec's, else ``~/.cache/craft-search/factors``).
        progress: print a line per finished trial and, between them, the sweep's status.

    Raises:
        ValueError: bad input of any kind, before Ray starts; an unreachable cluster.
    """
    from ray import tune

    from .callbacks import MlflowSweepCallback, StudyMirrorCallback, mirror_study
    from .factor_cache import FactorCache, default_cache_dir, publish_factors
    from .progress import ProgressCallback
    from .schedulers import TotalStepsStopper, make_scheduler
    from .scratch import clear_scratch_everywhere
    from .searcher import ParetoOptunaSearch, close_study, make_sampler, study_location
    from .trainable import run_trial
    from .warm_start import add_warm_trials, load_warm_start

    started = time.time()
    store = sweep_store(spec, storage)
    state = None
    if resume:
        if not store.exists(SWEEP_FILE):
            raise ValueError(f"no sweep named {spec.name!r} to resume in {store.storage}; run it without --resume first")
        state = store.read_json(SWEEP_FILE)
        changed = spec_changes(state["spec"], spec.to_dict())
        spec = spec_from_dict(state["spec"])  # the trials already run came from this one
        if changed and progress:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            print(f"the spec differs from the one sweep {spec.name} started with ({shown}); resuming with the one it started with",
                  flush=True)  # fmt: skip
    elif store.exists():
        raise ValueError(
            f"a sweep named {spec.name!r} already exists in {store.storage}; pass --resume to continue it or --name to start another"
        )
    uri = state["tracking_uri"] if state else resolve_tracking_uri(tracking_uri or spec.base.get("tracking", {}).get("uri"))
    check_tracking_uri(uri)
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
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    cache_name = f"craft-factor-cache-{spec.name}-{uuid.uuid4().hex[:8]}"
    cache = FactorCache.options(
        name=cache_name, scheduling_strategy=here
    ).remote()  # on the driver's node: a lost worker cannot take it
    publish_factors(cache, model, facts.factor_requests, cache_dir or spec.search.factor_cache or default_cache_dir())
    del model
    stats = ray.get(cache.stats.remote())
    parent, experiment = _parent_run(spec, uri, store, state)
    previous = parent.client.get_run(parent.run_id).data.tags.get("craft.decompositions")
    decompositions = stats["decompositions"] + (int(previous) if resume and previous else 0)
    parent.set_tags({"craft.decompositions": decompositions, "craft.factor_disk_loads": stats["disk_loads"]})
    scratch_key = f"{spec.name}-{parent.run_id[:8]}"  # the same after a resume: its leftovers are cleared too
    study_url = _study_url(spec, store, storage, resume)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, cache_name=cache_name, scratch_key=scratch_key),
        spec.resources.to_ray(),
    )
    stopper = TotalStepsStopper(spec.search.max_total_steps) if spec.search.max_total_steps else None
    with study_location(study_url):
        if resume:
            tuner = tune.Tuner.restore(store.uri, trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            searcher = ParetoOptunaSearch(
                spec.sampler(facts.costs), make_sampler(spec.search.sampler, spec.search.seed), spec.search.points_to_evaluate,
                study_url=study_url,
            )  # fmt: skip
            if warm is not None:
                add_warm_trials(searcher.study, spec, warm)
            scheduler = make_scheduler(
                spec.search.scheduler, max_t=spec.budget, grace_period=spec.search.grace_period,
                reduction_factor=spec.search.reduction_factor,
            )  # fmt: skip
            callbacks = [MlflowSweepCallback(uri, experiment, parent.run_id, spec)]
            if store.local_path is None:
                callbacks.append(StudyMirrorCallback(store.storage, spec.name))
            if progress:
                callbacks.append(ProgressCallback(spec.search.num_samples, budget=spec.budget,
                                                  max_total_steps=spec.search.max_total_steps))  # fmt: skip
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
                    storage_path=store.storage,
                    callbacks=callbacks,
                    stop=stopper,
                    failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                    verbose=0,
                ),
            )
        copied = None  # the study's hash as last copied to object storage
        pending = store.read_json(PENDING_FILE) if resume and store.exists(PENDING_FILE) else None  # an outage's writes
        queue = TrackingQueue(uri, experiment, parent.run_id, pending=pending)
        try:
            with _tune_environment(spec), tracking_queue(queue):
                results = tuner.fit()
            fetches = ray.get(cache.stats.remote())["fetches"]
        finally:
            ray.kill(cache)
            clear_scratch_everywhere(scratch_key)
            if store.local_path is None:
                copied = mirror_study(study_url, store)
            if sys.exc_info()[0] is not None:  # interrupted: what the server has not taken waits for --resume
                keep_pending(queue.close(min(spec.search.tracking_wait_s, 10.0)), store)
    trials = _summaries(results, store)
    result = SweepResult(
        name=spec.name,
        path=store.uri,
        tracking_uri=parent.uri,
        experiment=experiment,
        parent_run_id=parent.run_id,
        trials=trials,
        cache={**stats, "decompositions": decompositions, "fetches": fetches},
        wall_s=time.time() - started,
        requested=spec.search.num_samples,
    )
    best = result.best(1)
    limit = spec.search.max_total_steps  # the compute budget ended it: finished, not interrupted (also after --resume)
    spent = limit is not None and sum(t.step or 0 for t in trials) >= limit
    finished = (spent or len(trials) >= spec.search.num_samples) and result.count("unfinished") == 0
    if finished:  # trials a killed driver sampled that no Ray trial will run: FAIL, none left RUNNING
        unrun = close_study(study_url)
    if store.local_path is None:
        mirror_study(study_url, store, unless=copied)  # again only if close_study changed it
    counts = {"craft.trials": len(trials), **{f"craft.{o}": result.count(o) for o in ("complete", "pruned", "failed")},
              "craft.best_trial": best[0].trial_id if best else "none"}  # fmt: skip
    if finished:
        counts["craft.study_trials_failed_unrun"] = unrun
    queue.log(PARENT, {"best_final_score": best[0].score, "best_adapter_parameters": best[0].adapter_parameters or 0}
              if best else {}, tags=counts)  # fmt: skip
    left = queue.close(spec.search.tracking_wait_s)
    result.tracking = queue.summary(len(trials))
    store.write_json(SUMMARY_FILE, result.to_dict())
    keep_pending(left, store)
    if left:
        raise TrackingUnavailable(
            f"MLflow at {uri} has not answered for {spec.search.tracking_wait_s:.0f} s: the sweep's {len(trials)} trials are "
            f"done and kept in {store.uri}, {len(left)} MLflow writes wait in {store.location(PENDING_FILE)}; start the "
            f"server and run `craft-search sweep {spec.name} --resume --storage {store.storage}` to write them"
        )
    parent.set_tags({"craft.orphans_deleted": drop_orphans(parent, experiment, {t.trial_id for t in trials}) if resume else 0,
                     **{f"craft.mlflow_{k}": v for k, v in result.tracking.items()}})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        parent.client.log_artifact(parent.run_id, str(Path(tmp) / SUMMARY_FILE))
    try:
        from .results.pareto import load_sweep
        from .results.report import FRONT_DIR, report_front

        local = experiment_dir(spec, storage) / FRONT_DIR
        report = report_front(load_sweep(store.uri), local, log=True)  # the plots and the hypervolume, in the parent run
        store.upload(local, FRONT_DIR)
        result.pareto = {"front": [t.trial_id for t in report.front], "hypervolume": report.hypervolumes,
                         "png": store.location(f"{FRONT_DIR}/{report.png.name}"),
                         "html": store.location(f"{FRONT_DIR}/{report.html.name}")}  # fmt: skip
    finally:
        parent.end("FINISHED" if finished else "KILLED")
    return result
