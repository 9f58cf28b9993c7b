"""MLflow tracking: one writer per run, the embedded SQLite store by default, a server when given.

A :class:`RunTracker` owns one MLflow run through an explicit ``MlflowClient`` (no global
active-run state, so several runs can be written from one process without crossing). The
embedded default is ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..names import TRIAL_ID_TAG

__all__ = ["DEFAULT_DB", "resolve_tracking_uri", "check_tracking_uri", "flatten", "RunTracker", "drop_orphans"]

DEFAULT_DB = "mlflow.db"
_MAX_PARAM = 500  # MLflow's limit on a param value's length (6000 on new servers; stay safe)


def resolve_tracking_uri(uri: str | None, base_dir: str | Path | None = None) -> str:
    """The URI to log to: ``uri`` as given, or the embedded SQLite store in ``base_dir`` (cwd)."""
    if uri:
        return uri
    base = Path(base_dir or Path.cwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a tracking server does not answer (SQLite and files pass).

    Raises:
        ValueError: the server at ``uri`` is unreachable or unhealthy.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            if reply.status != 200:
                raise ValueError(f"MLflow server at {uri} answered {reply.status} on /health; check the server")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(
            f"MLflow tracking server at {uri} is unreachable ({reason}); start it, or leave tracking.uri empty "
            "for the embedded SQLite store"
        ) from None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.001", ...}`` as MLflow params (None values dropped)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif value is not None:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:_MAX_PARAM]
    return flat


def _artifact_root(uri: str, experiment: str) -> str | None:
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None  # a server decides (it proxies artifacts by default)


class RunTracker:
    """One MLflow run, written by this object alone.

    Args:
        uri: tracking URI (see :func:`resolve_tracking_uri`).
        experiment: experiment name, created when missing.
        run_name: display name of the run.
        parent_run_id: makes this a nested run of that one.
        tags: tags set at creation.
        run_id: reattach to this existing run (a resumed job) instead of creating one.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        check_tracking_uri(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment(experiment)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id: str = run.info.run_id

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_root(self.uri, name))
        except MlflowException:  # created meanwhile by another writer
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flattened params in one batch."""
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics at ``step`` in one batch (NaN / inf skipped)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as strings) in one batch per 100 (MLflow's cap)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[start : start + 100])

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Upload a directory's files under ``artifact_path``."""
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))


def drop_orphans(parent: RunTracker, experiment: str, trial_ids: set[str], page_size: int = 1000) -> int:
    """Delete the child runs of ``parent`` whose trial (tag ``craft.trial_id``) is not in ``trial_ids``:
    trials a resumed sweep's restored experiment does not know (sampled after its last save).
    Reads every page of the parent's children first; returns how many it deleted."""
    exp = parent.client.get_experiment_by_name(experiment)
    query = f"tags.`mlflow.parentRunId` = '{parent.run_id}'"
    orphans, token = [], None
    while True:
        page = parent.client.search_runs([exp.experiment_id], filter_string=query, max_results=page_size, page_token=token)
        orphans += [r.info.run_id for r in page if r.data.tags.get(TRIAL_ID_TAG) not in trial_ids]
        token = page.token
        if not token:
            break
    for run_id in orphans:  # after reading: deleting while paging would shift the pages
        parent.client.delete_run(run_id)
    return len(orphans)
