"""The MLflow writes of a sweep, sent by a thread of their own: never in Ray Tune's scheduling
loop, never able to stop the sweep, and kept through an outage of the tracking server.

Ray Tune's callbacks put *writes* (plain JSON-able dicts) on a :class:`TrackingQueue`; its thread
sends them in order, the metrics and tags of one run that wait side by side in one ``log_batch``.
A write that fails because the server cannot be reached (a connection error, a 5xx) is sent again,
with a growing pause, until it passes; one the server refuses (a 4xx) is dropped with one logged
line. Sending again writes nothing twice: a trial's run is looked up by its trial-id tag before it
is created, metrics carry the timestamp of their evaluation (MLflow's store ignores a metric it
holds already), tags and params are set to the same values.

A sweep that ends while the server is still down gets back the writes left (:meth:`close`); the
sweep keeps them in its storage (:data:`PENDING_FILE`) and a resumed sweep sends them first.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..envvars import environment
from ..names import TRIAL_ID_TAG

if TYPE_CHECKING:
    from ..storage import SweepStore

__all__ = [
    "PENDING_FILE",
    "TrackingUnavailable",
    "TrackingQueue",
    "tracking_queue",
    "current_tracking_queue",
    "keep_pending",
    "mlflow_http_settings",
]

PENDING_FILE = "mlflow-pending.json"  # in STORAGE/NAME: the writes a sweep could not send
PARENT = "parent"  # the key of the sweep's parent run
_MAX_METRICS, _MAX_TAGS, _MAX_PARAMS = 1000, 100, 100  # MLflow's limits on one log_batch
_REFUSED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED",
            "RESOURCE_ALREADY_EXISTS", "UNAUTHENTICATED", "MALFORMED_REQUEST"}  # fmt: skip
_log = logging.getLogger(__name__)


class TrackingUnavailable(RuntimeError):
    """The sweep ended while its MLflow server was down: its writes wait in the storage."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _retryable(err: BaseException) -> bool:
    """True for a server that cannot be reached or fails (sent again), False for a refusal."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code not in _REFUSED
    return isinstance(err, (OSError, ConnectionError, TimeoutError))


class TrackingQueue:
    """The MLflow runs of one sweep, written by one background thread.

    Args:
        uri: tracking URI.
        experiment: the sweep's MLflow experiment (it exists: the parent run is in it).
        parent_run_id: the sweep's parent run; trial runs are nested under it.
        pending: writes an earlier driver could not send (sent first).
        max_pause_s: the longest pause between two tries of a failed write.

    While it runs, MLflow's HTTP client makes one try per request (:func:`mlflow_http_settings`):
    the queue's own retries replace its pauses of up to minutes.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, pending: list[dict] | None = None,
                 max_pause_s: float = 5.0):  # fmt: skip
        self.uri, self.experiment, self.parent_run_id, self.max_pause_s = uri, experiment, parent_run_id, max_pause_s
        self._writes: collections.deque[dict] = collections.deque(pending or [])
        self._runs: dict[str, str] = {PARENT: parent_run_id}
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._client = None
        self._experiment_id: str | None = None
        self.stats = {"writes": 0, "requests": 0, "request_s": 0.0, "retries": 0, "dropped": 0, "longest_outage_s": 0.0}
        self._down_since: float | None = None
        self._http = mlflow_http_settings()
        self._http.__enter__()
        self._thread = threading.Thread(target=self._run, name="craft-mlflow-writer", daemon=True)
        self._thread.start()

    # -- what callbacks call: each returns at once --------------------------------------------
    def open_run(self, key: str, run_name: str, tags: Mapping[str, Any], params: Mapping[str, str]) -> None:
        """The run of trial ``key``: found by its trial-id tag, else created with ``tags`` and ``params``."""
        self._put({"op": "open", "key": key, "name": run_name, "tags": {k: str(v) for k, v in tags.items()},
                   "params": dict(params)})  # fmt: skip

    def log(self, key: str, metrics: Mapping[str, float] | None = None, step: int = 0,
            tags: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """Finite metrics at ``step`` (stamped now) and tags, for the run of ``key``."""
        stamp = _now_ms()
        rows = [[k, float(v), stamp, int(step)] for k, v in (metrics or {}).items() if math.isfinite(float(v))]
        self._put({"op": "log", "key": key, "metrics": rows, "tags": {k: str(v) for k, v in (tags or {}).items()}})

    def end_run(self, key: str, status: str, tags: Mapping[str, Any] | None = None) -> None:
        """Tags, then the run of ``key`` closed as ``status`` (FINISHED, FAILED, KILLED)."""
        if tags:
            self.log(key, tags=tags)
        self._put({"op": "end", "key": key, "status": status, "end_time": _now_ms()})

    def _put(self, write: dict) -> None:
        with self._cond:
            self._writes.append(write)
            self._cond.notify_all()

    # -- the end ----------------------------------------------------------------------------------
    def close(self, wait_s: float) -> list[dict]:
        """Wait until every write is sent, or the server has not answered for ``wait_s`` seconds
        in a row; stop the thread. Returns the writes not sent (empty when all went through)."""
        with self._cond:
            while (self._writes or self._busy) and self._thread.is_alive():
                down = self._down_since
                if down is not None and time.monotonic() - down >= wait_s:
                    break
                self._cond.wait(timeout=0.5)
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=self.max_pause_s + 60)
        if self._http is not None:
            self._http.__exit__(None, None, None)
            self._http = None
        with self._cond:
            return list(self._writes)

    def summary(self, trials: int) -> dict[str, Any]:
        """What the writes cost: :attr:`stats` and the request seconds per trial of ``trials``."""
        per_trial = self.stats["request_s"] / max(trials, 1)
        return {**self.stats, "request_s": round(self.stats["request_s"], 3), "request_s_per_trial": round(per_trial, 4)}

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        pause = 0.5
        while True:
            with self._cond:
                while not self._writes and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                batch = self._next_batch()
                self._busy = True
            try:
                self._send(batch)
            except BaseException as err:  # noqa: BLE001 - nothing here may end the sweep
                with self._cond:
                    self._busy = False
                    if _retryable(err):
                        if self._down_since is None:
                            self._down_since = time.monotonic()
                            _log.warning("MLflow at %s did not answer (%s); its writes wait and are sent again", self.uri,
                                         str(err).splitlines()[0][:200])  # fmt: skip
                        self.stats["retries"] += 1
                        self._cond.wait(timeout=pause)  # close() may end the wait
                        pause = min(pause * 2, self.max_pause_s)
                        continue
                    _log.warning("MLflow refused a write for run %s (%s); dropped", batch[0].get("key"),
                                 str(err).splitlines()[0][:200])  # fmt: skip
                    self.stats["dropped"] += len(batch)
                    self._done(len(batch))
                    continue
            with self._cond:
                self._busy = False
                if self._down_since is not None:
                    outage = time.monotonic() - self._down_since
                    self.stats["longest_outage_s"] = max(self.stats["longest_outage_s"], round(outage, 1))
                    _log.warning("MLflow at %s answers again after %.0f s", self.uri, outage)
                    self._down_since = None
                pause = 0.5
                self._done(len(batch))

    def _done(self, count: int) -> None:  # holding the lock
        for _ in range(count):
            self._writes.popleft()
        self.stats["writes"] += count
        self._cond.notify_all()

    def _next_batch(self) -> list[dict]:
        """The first write, with the log writes of the same run right behind it (one request)."""
        first = self._writes[0]
        batch = [first]
        if first["op"] != "log":
            return batch
        metrics, tags = len(first["metrics"]), len(first["tags"])
        for write in list(self._writes)[1:]:
            if write["op"] != "log" or write["key"] != first["key"]:
                break
            metrics, tags = metrics + len(write["metrics"]), tags + len(write["tags"])
            if metrics > _MAX_METRICS or tags > _MAX_TAGS:
                break
            batch.append(write)
        return batch

    def _call(self, method: str, *args, **kwargs) -> Any:
        start = time.perf_counter()
        try:
            return getattr(self._client, method)(*args, **kwargs)
        finally:
            self.stats["requests"] += 1
            self.stats["request_s"] += time.perf_counter() - start

    def _send(self, batch: list[dict]) -> None:
        from mlflow.entities import Metric, RunTag

        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        first = batch[0]
        if first["op"] == "open":
            self._open(first)
            return
        run_id = self._run_id(first["key"])
        if first["op"] == "end":
            self._call("set_terminated", run_id, status=first["status"], end_time=first["end_time"])
            return
        metrics = [Metric(k, v, stamp, step) for w in batch for k, v, stamp, step in w["metrics"]]
        tags = {k: v for w in batch for k, v in w["tags"].items()}  # the last value of a tag wins
        self._call("log_batch", run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])

    def _run_id(self, key: str) -> str:
        """The run of ``key``: known, or found by its trial-id tag (a resumed driver's trial)."""
        if key not in self._runs:
            found = self._find(key)
            if found is None:
                raise KeyError(f"no MLflow run for trial {key}")  # a refusal: dropped with a line
            self._runs[key] = found
        return self._runs[key]

    def _find(self, key: str) -> str | None:
        if self._experiment_id is None:
            self._experiment_id = self._call("get_experiment_by_name", self.experiment).experiment_id
        query = f"tags.`{TRIAL_ID_TAG}` = '{key}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        found = self._call("search_runs", [self._experiment_id], filter_string=query, max_results=1)
        return found[0].info.run_id if found else None

    def _open(self, write: dict) -> None:
        from mlflow.entities import Param

        key = write["key"]
        if key in self._runs:
            return
        run_id = self._find(key)  # looked up first: a create whose answer was lost made it already
        if run_id is None:
            tags = {**write["tags"], TRIAL_ID_TAG: key, "mlflow.parentRunId": self.parent_run_id}
            run_id = self._call("create_run", self._experiment_id, run_name=write["name"], tags=tags).info.run_id
        params = [Param(k, v) for k, v in write["params"].items()]  # again when found: the same values, so harmless
        for start in range(0, len(params), _MAX_PARAMS):
            self._call("log_batch", run_id, params=params[start : start + _MAX_PARAMS])
        self._runs[key] = run_id


def keep_pending(left: list[dict], store: SweepStore) -> None:
    """Keep the writes the server did not take (``left``) in the sweep's storage for ``--resume``,
    or remove those an earlier driver kept once all are sent (``left`` empty)."""
    if left:
        store.write_json(PENDING_FILE, left)
    elif store.exists(PENDING_FILE):
        store.remove(PENDING_FILE)


_CURRENT: list[TrackingQueue] = []


@contextlib.contextmanager
def tracking_queue(queue: TrackingQueue) -> Iterator[TrackingQueue]:
    """Make ``queue`` the one the sweep's callbacks write to (restored callbacks too: Ray pickles
    them without it) while the block runs."""
    _CURRENT.append(queue)
    try:
        yield queue
    finally:
        _CURRENT.remove(queue)


def current_tracking_queue() -> TrackingQueue | None:
    """The queue of the sweep running in this process, if any."""
    return _CURRENT[-1] if _CURRENT else None


@contextlib.contextmanager
def mlflow_http_settings(timeout_s: int = 20) -> Iterator[None]:
    """MLflow's HTTP client without its own long retries (up to minutes of pauses) while the
    queue retries: one try per write, ``timeout_s`` at most; a user's own settings are kept."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    with environment({key: os.environ.get(key, value) for key, value in defaults.items()}):
        yield
