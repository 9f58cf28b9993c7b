"""Ray Tune callbacks of a sweep, run in the driver: MLflow child runs and the copy of the Optuna
study in object storage (the progress lines are in :mod:`search.progress`).

The driver is the only writer of every MLflow run of a sweep: the parent and one nested run per
trial (params, metrics at every evaluation, adapter parameters, outcome), through the sweep's
tracking queue, off Ray Tune's scheduling loop. A trial's child run is found again by its
trial-id tag, so a resumed sweep or a retried trial never opens a second one.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from .layout import STUDY_FILE
from .names import (
    CONFIG_TAG,
    GPU_IDS,
    NODE_ID,
    OUTCOME_TAG,
    PRUNED_TAG,
    STEP,
)
from .outcomes import error_line, trial_outcome
from .searcher import current_study_url
from .spec import SweepSpec
from .storage import SweepStore
from .tracking.queue import TrackingQueue, current_tracking_queue
from .tracking.runs import flatten

__all__ = ["MlflowSweepCallback", "StudyMirrorCallback", "mirror_study"]


def __getattr__(name: str) -> Any:  # sweeps saved before ProgressCallback moved name it here
    if name == "ProgressCallback":
        from .progress import ProgressCallback

        return ProgressCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SKIP = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint", NODE_ID, GPU_IDS, "device",
                                 "started_at", "finished_at"}  # fmt: skip


class MlflowSweepCallback(Callback):
    """One nested MLflow run per trial under the sweep's parent run: the driver's writes, put on
    the sweep's :class:`~search.tracking.queue.TrackingQueue` (sent by its own thread: nothing
    here waits on the server or can fail the sweep).

    Args:
        uri: tracking URI.
        experiment: MLflow experiment of the sweep.
        parent_run_id: the sweep's parent run.
        spec: the sweep spec (a trial's params are its full run config).
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, spec: SweepSpec):
        self.uri, self.experiment, self.parent_run_id, self.spec = uri, experiment, parent_run_id, spec
        self._opened: set[str] = set()
        self._nodes: dict[str, str] = {}

    def __getstate__(self) -> dict:  # Ray saves callbacks with the experiment: a resumed driver opens again
        return {**self.__dict__, "_opened": set(), "_nodes": {}}

    def __setstate__(self, state: dict) -> None:  # an earlier version kept live trackers here
        state = {k: v for k, v in state.items() if k != "_trackers"}
        self.__dict__.update({**state, "_opened": set(), "_nodes": {}})

    def _queue(self, trial: Any) -> TrackingQueue | None:
        queue = current_tracking_queue()
        if queue is None:
            return None
        if trial.trial_id not in self._opened:  # the first event this driver sees of the trial
            tags = {"craft.method": trial.config.get("method", "craft"), "craft.sweep": self.spec.name,
                    CONFIG_TAG: json.dumps(trial.config, default=str)}  # fmt: skip
            queue.open_run(trial.trial_id, trial.trial_id, tags, flatten(self.spec.run_data(trial.config)))
            self._opened.add(trial.trial_id)
        return queue

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._queue(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        queue = self._queue(trial)
        if queue is None:
            return
        metrics = {k: v for k, v in result.items() if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}
        tags = {}
        node = result.get(NODE_ID)
        if node and self._nodes.get(trial.trial_id) != node:  # the device assignment too: it changes with the node
            tags = {
                "craft.node_id": node,
                "craft.gpu_ids": str(result.get(GPU_IDS, "")),
                "craft.device": str(result.get("device", "")),
            }
            self._nodes[trial.trial_id] = node
        queue.log(trial.trial_id, metrics, step=int(result.get(STEP, 0)), tags=tags)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info) -> None:
        queue = self._queue(trial)
        if queue is not None:
            queue.log(trial.trial_id, tags={"craft.retries": trial.num_failures})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        queue = self._queue(trial)
        if queue is not None:
            outcome = trial_outcome(trial, ended=True)
            queue.end_run(trial.trial_id, "FINISHED", {OUTCOME_TAG: outcome, PRUNED_TAG: str(outcome == "pruned").lower()})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        queue = self._queue(trial)
        if queue is not None:
            tags = {OUTCOME_TAG: "failed", PRUNED_TAG: "false", "craft.error": error_line(trial) or "see the trial's error.txt"}
            queue.end_run(trial.trial_id, "FAILED", tags)


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
