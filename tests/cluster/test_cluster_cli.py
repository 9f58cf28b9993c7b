"""``craft-search cluster``: bad input is one line and exit code 2, before anything starts."""

from __future__ import annotations

import json
import os

import pytest

from cluster.local import STATE_FILE, LocalCluster, read_state
from cluster.processes import Started, start_time
from search.cli import main


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_up_needs_local(capsys, tmp_path):
    assert main(["cluster", "up", "--state-dir", str(tmp_path)]) == 2
    assert "local clusters only (--local); for AWS or GCP run ray up cluster/aws.yaml" in _error(capsys)


@pytest.mark.parametrize(
    "flags, message",
    [(["--workers", "0"], "--workers must be at least 1, got 0"),
     (["--worker-cpus", "0"], "--worker-cpus must be positive")],
)  # fmt: skip
def test_up_refuses_bad_counts(capsys, tmp_path, flags, message):
    assert main(["cluster", "up", "--local", "--state-dir", str(tmp_path), *flags]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / STATE_FILE).exists()


def test_up_refuses_a_second_cluster_in_the_same_state_dir(capsys, tmp_path):
    me = Started("head", os.getpid(), start_time(os.getpid()), ["pytest"], "")  # a running process as its head
    (tmp_path / STATE_FILE).write_text(json.dumps(LocalCluster("127.0.0.1:1", None, str(tmp_path), [me]).to_dict()))
    assert main(["cluster", "up", "--local", "--state-dir", str(tmp_path)]) == 2
    assert "a cluster is already up (Ray at 127.0.0.1:1" in _error(capsys)
    assert read_state(tmp_path).processes == [me]  # nothing lost


def test_down_and_status_without_a_cluster(capsys, tmp_path):
    assert main(["cluster", "down", "--state-dir", str(tmp_path)]) == 2
    assert "no cluster recorded in" in _error(capsys)
    assert main(["cluster", "status", "--state-dir", str(tmp_path)]) == 1
    assert "no cluster recorded" in capsys.readouterr().out


def test_status_reports_a_gone_process(capsys, tmp_path):
    me = Started("head", os.getpid(), start_time(os.getpid()), ["pytest"], "head.log")
    gone = Started("worker-1", os.getpid(), start_time(os.getpid()) - 60, ["ray"], "worker-1.log")  # pid reused
    cluster = LocalCluster("127.0.0.1:1", None, str(tmp_path), [me, gone], nodes={"head": "ab" * 28})
    (tmp_path / STATE_FILE).write_text(json.dumps(cluster.to_dict()))
    assert main(["cluster", "status", "--state-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Ray:    127.0.0.1:1" in out and "MLflow: (not started)" in out
    assert [line.split()[3] for line in out.splitlines() if "pid" in line] == ["running", "gone"]


def test_status_reads_a_state_file_written_before_psutil(capsys, tmp_path):
    stat = open(f"/proc/{os.getpid()}/stat").read()  # older versions recorded its field 22, start_ticks
    me = {"role": "head", "pid": os.getpid(), "start_ticks": int(stat[stat.rindex(")") + 2 :].split()[19]),
          "command": ["pytest"], "log": "head.log"}  # fmt: skip
    state = {"ray_address": "127.0.0.1:1", "mlflow_uri": None, "state_dir": str(tmp_path), "processes": [me]}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert main(["cluster", "status", "--state-dir", str(tmp_path)]) == 0
    assert [line.split()[3] for line in capsys.readouterr().out.splitlines() if "pid" in line] == ["running"]
