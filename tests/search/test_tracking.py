"""MLflow tracking against the embedded SQLite store and a real server on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from search.tracking.runs import RunTracker, check_tracking_uri, flatten, resolve_tracking_uri


def test_flatten_nested_config():
    flat = flatten({"train": {"lr": 0.001, "seed": 0}, "craft": {"target_modules": ["query", "value"]}, "x": None})
    assert flat == {"train.lr": "0.001", "train.seed": "0", "craft.target_modules": '["query", "value"]'}


def test_embedded_sqlite_default(tmp_path):
    uri = resolve_tracking_uri(None, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights.txt").write_text("j")
    with RunTracker(uri, "exp", run_name="one") as run:
        run.log_params({"train": {"lr": 0.01}})
        run.log_metrics({"validation/accuracy": 0.5, "nan": float("nan")}, step=10)
        run.log_metrics({"validation/accuracy": 0.75}, step=20)
        run.log_artifacts(tmp_path / "adapter", "adapter")
    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"train.lr": "0.01"}
    history = client.get_metric_history(run.run_id, "validation/accuracy")
    assert [(m.step, m.value) for m in history] == [(10, 0.5), (20, 0.75)]
    assert "nan" not in got.data.metrics
    assert [f.path for f in client.list_artifacts(run.run_id, "adapter")] == ["adapter/weights.txt"]
    assert (tmp_path / "mlartifacts" / "exp").is_dir()  # artifacts live next to the database


def test_failed_run_is_marked(tmp_path):
    uri = resolve_tracking_uri(None, tmp_path)
    with pytest.raises(RuntimeError):
        with RunTracker(uri, "exp") as run:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_server_nested_runs(mlflow_server, tmp_path):
    parent = RunTracker(mlflow_server, "server-exp", run_name="parent")
    with RunTracker(mlflow_server, "server-exp", run_name="child", parent_run_id=parent.run_id) as child:
        child.log_metrics({"score": 0.9}, step=1)
        (tmp_path / "a.txt").write_text("x")
        child.log_artifacts(tmp_path, "adapter")
    parent.end()
    client = MlflowClient(mlflow_server)
    got = client.get_run(child.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert got.data.metrics == {"score": 0.9}
    assert [f.path for f in client.list_artifacts(child.run_id, "adapter")] == ["adapter/a.txt"]


def test_unreachable_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(ValueError, match="unreachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout=2)
    assert time.monotonic() - start < 5


def test_orphan_cleanup_reads_every_page_of_child_runs(tmp_path):
    """A resumed sweep deletes the child runs of trials its restored state does not know: every
    one of them, however many pages of children the parent has (pages of 2 here)."""
    from search.names import TRIAL_ID_TAG
    from search.tracking.runs import drop_orphans

    uri = resolve_tracking_uri(None, tmp_path)
    parent = RunTracker(uri, "exp", run_name="sweep")
    known = {f"t{i}" for i in range(4)}
    orphans = {f"o{i}" for i in range(3)}
    children = {}
    for trial in sorted(known | orphans):  # interleaved: orphans fall on several pages
        child = RunTracker(uri, "exp", run_name=trial, parent_run_id=parent.run_id, tags={TRIAL_ID_TAG: trial})
        child.end("FINISHED")
        children[trial] = child.run_id
    assert drop_orphans(parent, "exp", known, page_size=2) == 3
    client = MlflowClient(uri)
    left = client.search_runs([client.get_experiment_by_name("exp").experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in left) == sorted(known)
    assert all(client.get_run(children[o]).info.lifecycle_stage == "deleted" for o in orphans)


def test_the_queue_batches_a_runs_writes_and_stores_a_write_sent_twice_once(tmp_path):
    from search.names import TRIAL_ID_TAG
    from search.tracking.queue import TrackingQueue

    uri = resolve_tracking_uri(None, tmp_path)
    parent = RunTracker(uri, "queue", run_name="parent")
    stamp = 1_700_000_000_000
    logs = [{"op": "log", "key": "t1", "metrics": [["score", 0.5 + s / 100, stamp + s, s]], "tags": {"n": str(s)}} for s in (8, 16)]
    # what a driver kept after an outage: the open, two evaluations, the second one again (its answer
    # was lost, so it was sent a second time), and the end
    pending = [{"op": "open", "key": "t1", "name": "t1", "tags": {"craft.sweep": "q"}, "params": {"train.lr": "0.01"}},
               *logs, logs[1], {"op": "end", "key": "t1", "status": "FINISHED", "end_time": stamp + 20}]  # fmt: skip
    queue = TrackingQueue(uri, "queue", parent.run_id, pending=pending)
    assert queue.close(wait_s=30) == []
    client = MlflowClient(uri)
    (run,) = client.search_runs([parent.experiment_id], f"tags.`{TRIAL_ID_TAG}` = 't1'")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params == {"train.lr": "0.01"} and run.data.tags["n"] == "16"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "score")] == [(8, 0.58), (16, 0.66)]
    # the experiment's id, the search for the run, its creation, its params; the three evaluations in one batch; the end
    assert queue.stats["requests"] == 1 + 1 + 1 + 1 + 1 + 1
    assert queue.stats["writes"] == 5 and queue.stats["retries"] == 0


def test_the_queue_waits_for_a_server_that_does_not_answer_then_gives_the_writes_back():
    from search.tracking.queue import TrackingQueue

    dead = "http://127.0.0.1:9"  # the discard port: nothing answers there
    queue = TrackingQueue(dead, "queue", "0" * 32, max_pause_s=0.2)
    queue.log("parent", {"x": 1.0}, step=1)
    start = time.monotonic()
    left = queue.close(wait_s=1.0)
    assert 1.0 <= time.monotonic() - start < 30 and queue.stats["retries"] >= 1
    assert [w["op"] for w in left] == ["log"] and left[0]["metrics"][0][:2] == ["x", 1.0]
