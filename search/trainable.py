"""The Ray Tune trainable: one trial = one fine-tuning run of the config Optuna sampled.

It knows nothing of the search: it builds the trial's run config, takes CRAFT factors from the
sweep's cache, trains with :func:`craft.harness.job.run_job` and reports at every evaluation the score,
the adapter size, the step and the elapsed time, after saving its training checkpoint (so a
trial that fails, or loses its node, or whose driver dies, resumes where it was). Only a trial that
ran its full budget reports ``final_score``, after scoring its test split.

The trial writes on its node's own disk (:mod:`search.scratch`) and copies its ``run/`` (config,
adapter, metrics) to its directory in the sweep's storage at every evaluation, before it reports:
a trial the scheduler stops there, or one that fails later, leaves its last adapter and metrics in
the storage, whatever node it ran on. Its training checkpoint goes there too (``_TrialStorage``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from craft.harness.job import PreparedData, data_key, prepare_data, prepare_job, run_job
from craft.harness.methods import save_adapter
from craft.harness.trainer import EvalEvent, resolve_device

from .factor_cache import fetch_factors
from .names import (
    ADAPTER_PARAMETERS,
    ELAPSED,
    FINAL_SCORE,
    GPU_IDS,
    NODE_ID,
    PERSIST_SECONDS,
    REPORTED_AT,
    SCORE,
    STEP,
    TRAIN_SECONDS,
)
from .runner import event_metrics
from .scratch import scratch_dir
from .spec import SweepSpec

__all__ = ["run_trial", "RUN_DIR", "DIVERGED_FILE", "METRICS_FILE", "NOT_RETRIED"]

logger = logging.getLogger(__name__)

# The last trial's data in this worker: with reused actors, the next trial of the same task and
# model skips reading and tokenising it again (datasets are immutable Arrow tables).
_DATA: dict[str, PreparedData] = {}

RUN_DIR = "run"  # the trial's run output (config, adapter, metrics) inside its trial directory
DIVERGED_FILE = "diverged.json"  # in run/: the loss diverged (a retry fails at once)
NOT_RETRIED = "not trained again on retry: the same config diverges again"  # a retry's error says it
METRICS_FILE = "metrics.json"  # in run/: the last evaluation while the trial runs, the job's summary once complete
CHECKPOINT_POINTER = "checkpoint.json"  # in the trial's directory: its latest complete training checkpoint


def _trial_threads() -> int:
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)  # a trial uses the CPUs it asked for, not the node's
    return threads


class _TrialStorage:
    """The trial's directory in the sweep's storage, as Ray Tune set it up for this trial.

    The trial keeps its own training checkpoint there, not Ray's: ``checkpoint_<step>/`` beside a
    pointer file naming the latest complete one, written after the checkpoint and before the
    previous one is deleted. Ray's ``CheckpointConfig(num_to_keep)`` deletes a checkpoint as soon
    as a newer one registers, before the snapshot naming the newer one reaches the storage, so a
    driver killed in between leaves a snapshot whose checkpoint is gone and the trial fails on
    resume; the pointer is always right, and exactly one checkpoint per trial is kept.
    """

    def __init__(self) -> None:
        storage = tune.get_context().get_storage()
        self.fs: pafs.FileSystem = storage.storage_filesystem
        self.trial = storage.trial_fs_path
        self.run = f"{self.trial}/{RUN_DIR}"
        # The checkpoint the pointer names: read once here, then kept as this trial moves it.
        self._latest: str | None = (self._read_json(f"{self.trial}/{CHECKPOINT_POINTER}") or {}).get("dir")

    def _read_json(self, path: str) -> dict | None:
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())

    def read_json(self, name: str) -> dict | None:
        """The JSON file ``name`` in the trial's ``run/``, None when there is none."""
        return self._read_json(f"{self.run}/{name}")

    def upload(self, run_dir: Path) -> None:
        """Copy the local ``run_dir`` into the storage (files added or replaced)."""
        self.fs.create_dir(self.run, recursive=True)
        pafs.copy_files(str(run_dir), self.run, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def restore_checkpoint(self, target: Path) -> bool:
        """Copy the trial's latest checkpoint to ``target``; False when it has none yet."""
        if self._latest is None:
            return False
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        pafs.copy_files(f"{self.trial}/{self._latest}", str(target), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
        return True

    def save_checkpoint(self, source: Path, step: int) -> None:
        """Copy the local checkpoint ``source`` (taken at ``step``) to the storage, point at it,
        then delete the one it replaces."""
        name = f"checkpoint_{step:08d}"
        before = self._latest
        self.fs.create_dir(f"{self.trial}/{name}", recursive=True)
        pafs.copy_files(str(source), f"{self.trial}/{name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        partial = f"{self.trial}/.{CHECKPOINT_POINTER}.partial"
        with self.fs.open_output_stream(partial) as stream:
            stream.write(json.dumps({"dir": name, "step": step}).encode())
        self.fs.move(partial, f"{self.trial}/{CHECKPOINT_POINTER}")  # a rename on a local disk
        self._latest = name
        if before is not None and before != name:
            self.fs.delete_dir(f"{self.trial}/{before}")


def _device_line(device: str) -> str | None:
    """One line when Ray gave this trial GPUs that torch cannot use, else None."""
    gpus = ray.get_gpu_ids()
    if gpus and device == "auto" and resolve_device("auto").type == "cpu":
        return f"trial {tune.get_context().get_trial_id()}: Ray assigned GPU {','.join(map(str, gpus))} but CUDA is not available here; training on the CPU"
    return None


def run_trial(config: dict[str, Any], *, spec: SweepSpec, cache_name: str | None, scratch_key: str) -> None:
    """Train the trial whose sampled values are ``config`` (dotted keys) and report to Ray Tune.

    Args:
        config: the sampled values (``method``, ``craft.rank_out``, ``train.lr``, ...).
        spec: the sweep spec (everything not sampled).
        cache_name: the named :class:`~search.factor_cache.FactorCache` actor of the sweep.
        scratch_key: the sweep's scratch directory name on every node (:mod:`search.scratch`):
            the training checkpoint and ``run/`` are written there, on local disk, then copied to
            the trial's directory in the storage.

    Raises:
        FloatingPointError: the loss diverged (the trial fails; a retry fails at once).
    """
    started_at = time.time()
    threads = _trial_threads()
    trial_id = tune.get_context().get_trial_id()
    storage = _TrialStorage()
    diverged = storage.read_json(DIVERGED_FILE)
    if diverged is not None:  # a retry of a diverged trial would diverge again: fail without training
        raise FloatingPointError(f"{diverged['error']} ({NOT_RETRIED})")
    scratch = scratch_dir(scratch_key) / trial_id
    run_dir = scratch / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    run = spec.run_config(config, str(run_dir))
    run.tracking.enabled = False  # the driver tracks every trial (one writer per MLflow run)
    run.save_factors = False  # the sweep's factor cache holds them; a trial's adapter stays small
    note = _device_line(run.train.device)
    if note:
        logger.warning(note)
    resumed = storage.restore_checkpoint(scratch / "checkpoint")  # a retry, or a trial of a resumed sweep
    factors = fetch_factors(cache_name, run.craft.target_modules) if run.method == "craft" and cache_name else None
    key = data_key(run)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = prepare_data(run)
    prepared = prepare_job(run, factors, _DATA[key])
    params = prepared.adapted.adapter_parameters
    node = ray.get_runtime_context().get_node_id()
    common = {ADAPTER_PARAMETERS: params, NODE_ID: node, GPU_IDS: ",".join(map(str, ray.get_gpu_ids())),
              "device": resolve_device(run.train.device).type, "threads": threads, "started_at": started_at,
              "resumed": int(resumed)}  # fmt: skip

    def metrics_of(event: EvalEvent) -> dict[str, Any]:
        return {**event_metrics(event), SCORE: event.metrics["score"], STEP: event.step, ELAPSED: event.elapsed,
                REPORTED_AT: time.time(), **common}  # fmt: skip

    persisted = [0.0]

    def report(event: EvalEvent) -> None:
        if event.is_final:  # the last evaluation is reported with the test scores below
            return
        metrics = metrics_of(event)
        began = time.perf_counter()
        save_adapter(prepared.adapted, run_dir / "adapter", save_factors=False)  # J and head at this evaluation
        (run_dir / METRICS_FILE).write_text(json.dumps({"complete": False, **metrics}, indent=2, default=str) + "\n")
        storage.upload(run_dir)
        storage.save_checkpoint(scratch / "checkpoint", event.step)
        persisted[0] += time.perf_counter() - began
        metrics[PERSIST_SECONDS] = persisted[0]  # what keeping the trial in the storage has cost so far
        tune.report(metrics)

    try:
        job = run_job(run, prepared=prepared, callback=report, resume=resumed, progress=False, checkpoint_dir=scratch)
    except BaseException as err:  # failed, or stopped by Ray: what the trial wrote so far goes to the storage
        if isinstance(err, FloatingPointError):
            (run_dir / DIVERGED_FILE).write_text(json.dumps({"error": str(err)}) + "\n")
        if isinstance(err, Exception):
            storage.upload(run_dir)
        raise
    final = job.train.final
    metrics = metrics_of(final)
    metrics.update(job.test_metrics)
    metrics.update({FINAL_SCORE: final.metrics["score"], "prepare_s": prepared.seconds, TRAIN_SECONDS: job.timings["train_s"]})
    began = time.perf_counter()
    storage.upload(run_dir)  # run_job wrote config, adapter and the job's metrics.json there
    metrics[PERSIST_SECONDS] = persisted[0] + time.perf_counter() - began
    metrics["finished_at"] = time.time()
    tune.report(metrics)
    shutil.rmtree(scratch, ignore_errors=True)  # stopped trials leave theirs: the driver clears every node's at the end
