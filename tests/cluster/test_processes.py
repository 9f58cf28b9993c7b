"""Processes started and stopped by id: a detached start, an identity that outlives the pid, the
tree below a process, and a stop that reaches that tree and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.processes import Started, descendants, is_running, spawn, start_time, stop

# A parent that ignores SIGTERM (as ``ray start --block`` may) with a child in another session,
# out of reach of a signal to the parent's group: only the tree walk finds it.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
time.sleep(300)
"""


def _wait_for_children(pid: int, count: int) -> dict[int, float]:
    deadline = time.monotonic() + 30
    while len(found := descendants([pid])) < count:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    return found


def test_spawn_records_an_identity_that_a_reused_pid_does_not_match(tmp_path):
    proc = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "sleeper.log")
    try:
        assert os.getpgid(proc.pid) == proc.pid  # its own session and group
        assert is_running(proc.pid, proc.started)
        assert not is_running(proc.pid, proc.started + 60)  # same pid, another start: not ours
        assert Started.from_dict(proc.to_dict()) == proc
    finally:
        assert stop([proc], grace=5) == [proc.pid]
    assert start_time(proc.pid) is None


def test_stop_reaches_a_stubborn_parent_and_its_escaped_child(tmp_path):
    proc = spawn("stubborn", [sys.executable, "-c", STUBBORN], tmp_path / "stubborn.log")
    [child] = _wait_for_children(proc.pid, 1)
    assert os.getpgid(child) != proc.pid
    started = time.monotonic()
    stopped = stop([proc], grace=1)
    assert stopped == sorted([proc.pid, child])
    assert start_time(proc.pid) is None and start_time(child) is None
    assert time.monotonic() - started < 10  # SIGKILL after the grace, not a hang


def test_stop_leaves_other_processes_alone(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        proc = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "s.log")
        gone = Started("old", proc.pid, proc.started - 60, [], "")  # a recorded process whose pid was reused
        assert stop([gone], grace=0) == []
        assert is_running(proc.pid, proc.started)  # the pid's new owner was not signalled
        stop([proc], grace=5)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_state_written_before_psutil_still_names_its_process(tmp_path):
    """cluster.json files of older versions record ``start_ticks`` (``/proc/PID/stat`` field 22)."""
    proc = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "s.log")
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        old = {"role": "sleeper", "pid": proc.pid, "start_ticks": ticks, "command": proc.command, "log": proc.log}
        loaded = Started.from_dict(old)
        assert is_running(loaded.pid, loaded.started) and abs(loaded.started - proc.started) < 0.02
        earlier = Started.from_dict({**old, "start_ticks": ticks - 60 * os.sysconf("SC_CLK_TCK")})  # a minute off
        assert not is_running(earlier.pid, earlier.started)
    finally:
        stop([proc], grace=5)


def test_a_command_that_cannot_start_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"cannot start nothing: No such file or directory \(.*no-such-program\)"):
        spawn("nothing", [str(tmp_path / "no-such-program")], tmp_path / "n.log")
