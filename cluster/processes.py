"""Processes we start and stop by id: a detached start, an identity that survives pid reuse, the
process tree below a pid, and a stop that signals exactly those (through ``psutil``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

__all__ = ["Started", "spawn", "start_time", "is_running", "descendants", "stop"]

# psutil's create_time() is the kernel's start time (ticks after boot) plus the boot time, which
# /proc/stat gives in whole seconds and which moves when the system clock is stepped or slewed:
# the same process may read a second apart between `cluster up` and `cluster down`. A pid reused
# within seconds of our process's start is not a practical case (the kernel cycles through
# pid_max before it reuses a pid).
SAME_START_S = 2.5


@dataclass(frozen=True)
class Started:
    """One process we started, in its own session (its pid is its process group id).

    ``started`` is its creation time (``psutil.Process.create_time()``, seconds since the
    epoch): with the pid it names the process even after the pid is reused.
    """

    role: str  # head, worker-1, ..., mlflow
    pid: int
    started: float
    command: list[str]
    log: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Started:
        """The process ``to_dict`` wrote; also reads the ``start_ticks`` (clock ticks after boot,
        ``/proc/PID/stat`` field 22) of state files written before psutil, as psutil converts them."""
        data = dict(data)
        if "start_ticks" in data:
            data["started"] = data.pop("start_ticks") / os.sysconf("SC_CLK_TCK") + psutil.boot_time()
        return cls(**data)


def _started(proc: psutil.Process) -> float | None:
    """The creation time of ``proc``, or None once it has exited (a zombie has)."""
    try:
        with proc.oneshot():
            return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:  # NoSuchProcess, ZombieProcess, AccessDenied
        return None


def start_time(pid: int) -> float | None:
    """The creation time (seconds since the epoch) of ``pid``, or None when no such process runs."""
    try:
        return _started(psutil.Process(pid))
    except psutil.Error:
        return None


def is_running(pid: int, started: float) -> bool:
    """True when the process ``pid`` created at ``started`` still runs."""
    now = start_time(pid)
    return now is not None and abs(now - started) < SAME_START_S


def descendants(pids: list[int]) -> dict[int, float]:
    """Every live process below ``pids`` (children, grandchildren, ...), as pid -> creation time."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            started = _started(child)
            if started is not None:
                found[child.pid] = started
    return found


def spawn(role: str, command: list[str], log: Path, env: dict[str, str] | None = None) -> Started:
    """Start ``command`` detached (its own session; output to ``log``) and record its identity."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        except OSError as err:
            raise ValueError(f"cannot start {role}: {err.strerror} ({command[0]}); is it installed?") from None
    started = start_time(proc.pid)
    if started is None:
        raise ValueError(f"{role} exited at once ({' '.join(command[:3])} ...); see {log}")
    return Started(role, proc.pid, started, command, str(log))


def _signal(pid: int, started: float, sig: int, group: bool) -> None:
    if not is_running(pid, started):
        return
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(processes: list[Started], grace: float = 10.0) -> list[int]:
    """Stop ``processes``, their process groups and every process below them; return the pids stopped.

    SIGTERM to each group, up to ``grace`` seconds to exit, then SIGKILL to whatever of that tree
    still runs (``ray start --block`` ignores SIGTERM). Only processes that are ours by pid and
    creation time are signalled.
    """
    tree = {p.pid: p.started for p in processes if is_running(p.pid, p.started)}
    tree.update(descendants(list(tree)))
    for p in processes:
        _signal(p.pid, p.started, signal.SIGTERM, group=True)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(pid, started) for pid, started in tree.items()):
        time.sleep(0.2)
    for p in processes:
        _signal(p.pid, p.started, signal.SIGKILL, group=True)
    for pid, started in tree.items():
        _signal(pid, started, signal.SIGKILL, group=False)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(pid, started) for pid, started in tree.items()):
        time.sleep(0.2)
    return sorted(tree)
