"""Ray Tune callbacks of a sweep, run in the driver: MLflow child runs, the progress lines, and
the copy of the Optuna study in object storage.

The driver is the only writer of every MLflow run of a sweep: the parent and one nested run per
trial (params, metrics at every evaluation, adapter parameters, outcome). A trial's child run is
found again by its trial-id tag, so a resumed sweep or a retried trial never opens a second one.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from .layout import STUDY_FILE
from .names import (
    ADAPTER_PARAMETERS,
    CONFIG_TAG,
    FINAL_SCORE,
    GPU_IDS,
    NODE_ID,
    OUTCOME_TAG,
    PRUNED_TAG,
    SCORE,
    STEP,
    TRIAL_ID_TAG,
)
from .searcher import current_study_url
from .space import describe_config
from .spec import SweepSpec
from .storage import SweepStore
from .tracking import RunTracker

__all__ = ["MlflowSweepCallback", "ProgressCallback", "StudyMirrorCallback", "mirror_study", "trial_outcome", "error_line"]

_SKIP = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint", NODE_ID, GPU_IDS, "device",
                                 "started_at", "finished_at"}  # fmt: skip


def trial_outcome(trial: Any, ended: bool = False) -> str:
    """complete (ran its full budget), pruned (stopped early), failed, or running.

    ``ended``: the trial is known to have ended without error (Ray may not have set its status yet).
    """
    if trial.status == "ERROR":
        return "failed"
    if trial.status != "TERMINATED" and not ended:
        return "running"
    return "complete" if FINAL_SCORE in (trial.last_result or {}) else "pruned"


def error_line(trial: Any) -> str:
    """The last line of a failed trial's error (the exception), or an empty string."""
    path = getattr(trial, "error_file", None) or ""
    try:
        lines = [line for line in open(path).read().strip().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1].strip()[:300] if lines else ""


class MlflowSweepCallback(Callback):
    """One nested MLflow run per trial under the sweep's parent run, written by the driver.

    Args:
        uri: tracking URI.
        experiment: MLflow experiment of the sweep.
        parent_run_id: the sweep's parent run.
        spec: the sweep spec (a trial's params are its full run config).
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, spec: SweepSpec):
        self.uri, self.experiment, self.parent_run_id, self.spec = uri, experiment, parent_run_id, spec
        self._trackers: dict[str, RunTracker] = {}
        self._nodes: dict[str, str] = {}

    def __getstate__(self) -> dict:  # Ray saves callbacks with the experiment: no live clients
        return {**self.__dict__, "_trackers": {}, "_nodes": {}}

    def _tracker(self, trial: Any) -> RunTracker:
        tracker = self._trackers.get(trial.trial_id)
        if tracker is not None:
            return tracker
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=1,
        )
        if found:
            tracker = RunTracker(self.uri, self.experiment, run_id=found[0].info.run_id)
        else:
            method = trial.config.get("method", "craft")
            tags = {
                TRIAL_ID_TAG: trial.trial_id,
                "craft.method": method,
                "craft.sweep": self.spec.name,
                CONFIG_TAG: json.dumps(trial.config, default=str),
            }
            tracker = RunTracker(self.uri, self.experiment, run_name=trial.trial_id, parent_run_id=self.parent_run_id, tags=tags)
            tracker.log_params(self.spec.run_data(trial.config))
        self._trackers[trial.trial_id] = tracker
        return tracker

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._tracker(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        tracker = self._tracker(trial)
        metrics = {k: v for k, v in result.items() if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log_metrics(metrics, step=int(result.get(STEP, 0)))
        node = result.get(NODE_ID)
        if node and self._nodes.get(trial.trial_id) != node:  # the device assignment too: it changes with the node
            tracker.set_tags({"craft.node_id": node, "craft.gpu_ids": str(result.get(GPU_IDS, "")), "craft.device": str(result.get("device", ""))})
            self._nodes[trial.trial_id] = node

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._tracker(trial).set_tags({"craft.retries": trial.num_failures})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        tracker = self._tracker(trial)
        outcome = trial_outcome(trial, ended=True)
        tracker.set_tags({OUTCOME_TAG: outcome, PRUNED_TAG: str(outcome == "pruned").lower()})
        tracker.end("FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        tracker = self._tracker(trial)
        tracker.set_tags(
            {OUTCOME_TAG: "failed", PRUNED_TAG: "false", "craft.error": error_line(trial) or "see the trial's error.txt"}
        )
        tracker.end("FAILED")


class ProgressCallback(Callback):
    """A line per finished trial: outcome, score, adapter size, config; counts as it goes."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.stream = stream
        self.done = 0
        self.started = time.time()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "stream": None}

    def _print(self, trials: list, trial: Any, outcome: str) -> None:
        # Counted from the trials, not incremented: a resumed sweep counts the ones done before.
        self.done = sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials)
        last = trial.last_result or {}
        score = last.get(FINAL_SCORE, last.get(SCORE))
        params = last.get(ADAPTER_PARAMETERS)
        parts = [f"[{self.done}/{self.total}] {trial.trial_id} {outcome:<8}"]
        if isinstance(score, (int, float)) and math.isfinite(score):
            parts.append(f"score {score:.4f}" + (f" at step {last.get(STEP)}" if outcome == "pruned" else ""))
        if isinstance(params, int):
            parts.append(f"{params:,} params")
        parts.append(describe_config(trial.config))
        if outcome == "failed":
            parts.append(f"({error_line(trial)})")
        parts.append(f"[{time.time() - self.started:.0f}s]")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._print(trials, trial, trial_outcome(trial, ended=True))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._print(trials, trial, "failed")


def mirror_study(study_url: str, store: SweepStore, unless: str | None = None) -> str:
    """Copy the SQLite study at ``study_url`` to ``STUDY_FILE`` in ``store``: a consistent copy
    (SQLite's backup), written to the storage whole, unless its content hash is ``unless`` (the
    copy already there). Returns the hash."""
    source = study_url.removeprefix("sqlite:///")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / STUDY_FILE
        src, dst = sqlite3.connect(source), sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        digest = hashlib.sha256(copy.read_bytes()).hexdigest()
        if digest != unless:
            store.upload(copy, STUDY_FILE)
    return digest


class StudyMirrorCallback(Callback):
    """With object storage: the driver's SQLite study, copied to the sweep's storage with every
    snapshot of the sweep's state, when it changed.

    Ray Tune saves the searcher, then the callbacks (this one's :meth:`get_state`), then copies
    the snapshot to the storage: the study copied here holds every Optuna trial the saved searcher
    names, and every ending it has told, so a sweep resumed elsewhere from the storage alone finds
    each of them. (Whether it changed is told by its content: two writes within one tick of the
    file system's clock leave its time and size alike.)

    Args:
        storage: the sweep's storage (a URI).
        name: the sweep's name.
    """

    def __init__(self, storage: str, name: str):
        self.storage, self.name = storage, name
        self._copied: str | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_copied": None}

    def get_state(self) -> dict | None:
        url = current_study_url()
        if url is not None and url.startswith("sqlite:///"):
            self._copied = mirror_study(url, SweepStore(self.storage, self.name), unless=self._copied)
        return None
