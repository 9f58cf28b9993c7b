"""The Ray Tune trainable: one trial = one fine-tuning run of the config Optuna sampled.

It knows nothing of the search: it builds the trial's run config, takes CRAFT factors from the
sweep's cache, trains with :func:`craft.job.run_job` and reports at every evaluation the score,
the adapter size, the step and the elapsed time, with the training checkpoint (so a trial that
fails, or loses its node, resumes where it was). Only a trial that ran its full budget reports
``final_score``, after scoring its test split.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from craft.job import PreparedData, data_key, prepare_data, prepare_job, run_job
from craft.trainer import EvalEvent

from .factor_cache import fetch_factors
from .names import ADAPTER_PARAMETERS, ELAPSED, FINAL_SCORE, NODE_ID, REPORTED_AT, SCORE, STEP, TRAIN_SECONDS
from .runner import event_metrics
from .spec import SweepSpec

__all__ = ["run_trial", "RUN_DIR", "DIVERGED_FILE"]

# The last trial's data in this worker: with reused actors, the next trial of the same task and
# model skips reading and tokenising it again (datasets are immutable Arrow tables).
_DATA: dict[str, PreparedData] = {}

RUN_DIR = "run"  # the trial's run output (config, adapter, metrics) inside its trial directory
DIVERGED_FILE = "diverged.json"


def _trial_threads() -> int:
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)  # a trial uses the CPUs it asked for, not the node's
    return threads


def _restore_checkpoint(scratch: Path) -> bool:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return False
    target = scratch / "checkpoint"
    with checkpoint.as_directory() as source:
        if Path(source).resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
    return True


def run_trial(config: dict[str, Any], *, spec: SweepSpec, cache_name: str | None, scratch_root: str) -> None:
    """Train the trial whose sampled values are ``config`` (dotted keys) and report to Ray Tune.

    Args:
        config: the sampled values (``method``, ``craft.rank_out``, ``train.lr``, ...).
        spec: the sweep spec (everything not sampled).
        cache_name: the named :class:`~search.factor_cache.FactorCache` actor of the sweep.
        scratch_root: local directory for the training checkpoint while it is written. Not the
            trial directory: Ray uploads that one while the trial runs, and would race the
            checkpoint's atomic writes. Ray keeps the checkpoints reported to it.

    Raises:
        FloatingPointError: the loss diverged (the trial fails; a retry fails at once).
    """
    started_at = time.time()
    threads = _trial_threads()
    run_dir = Path(tune.get_context().get_trial_dir()) / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    diverged = run_dir / DIVERGED_FILE
    if diverged.is_file():  # a retry of a diverged trial would diverge again: fail without training
        raise FloatingPointError(json.loads(diverged.read_text())["error"])
    run = spec.run_config(config, str(run_dir))
    run.tracking.enabled = False  # the driver tracks every trial (one writer per MLflow run)
    scratch = Path(scratch_root) / tune.get_context().get_trial_id()
    scratch.mkdir(parents=True, exist_ok=True)
    resumed = _restore_checkpoint(scratch)
    factors = fetch_factors(cache_name, run.craft.target_modules) if run.method == "craft" and cache_name else None
    key = data_key(run)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = prepare_data(run)
    prepared = prepare_job(run, factors, _DATA[key])
    params = prepared.adapted.adapter_parameters
    node = ray.get_runtime_context().get_node_id()
    common = {ADAPTER_PARAMETERS: params, NODE_ID: node, "threads": threads, "started_at": started_at, "resumed": int(resumed)}

    def metrics_of(event: EvalEvent) -> dict[str, Any]:
        return {**event_metrics(event), SCORE: event.metrics["score"], STEP: event.step, ELAPSED: event.elapsed,
                REPORTED_AT: time.time(), **common}  # fmt: skip

    def checkpoint() -> tune.Checkpoint:
        return tune.Checkpoint.from_directory(str(scratch / "checkpoint"))

    def report(event: EvalEvent) -> None:
        if not event.is_final:  # the last evaluation is reported with the test scores below
            tune.report(metrics_of(event), checkpoint=checkpoint())

    try:
        job = run_job(run, prepared=prepared, callback=report, resume=resumed, progress=False, checkpoint_dir=scratch)
    except FloatingPointError as err:
        diverged.write_text(json.dumps({"error": str(err)}) + "\n")
        raise
    final = job.train.final
    metrics = metrics_of(final)
    metrics.update(job.test_metrics)
    metrics.update({FINAL_SCORE: final.metrics["score"], "prepare_s": prepared.seconds, TRAIN_SECONDS: job.timings["train_s"]})
    metrics["finished_at"] = time.time()
    tune.report(metrics, checkpoint=checkpoint())
    shutil.rmtree(scratch, ignore_errors=True)  # stopped trials leave theirs: the driver clears the root at the end
