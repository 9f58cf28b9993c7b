"""Processes we start and stop by id: a detached start, an identity that survives pid reuse, the
process tree below a pid, and a stop that signals exactly those (Linux ``/proc``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Started", "spawn", "start_time", "is_running", "descendants", "stop"]


@dataclass(frozen=True)
class Started:
    """One process we started, in its own session (its pid is its process group id).

    ``start_ticks`` is the kernel's start time of the process (``/proc/PID/stat`` field 22):
    with the pid it names the process even after the pid is reused.
    """

    role: str  # head, worker-1, ..., mlflow
    pid: int
    start_ticks: int
    command: list[str]
    log: str

    def to_dict(self) -> dict:
        return asdict(self)


def start_time(pid: int) -> int | None:
    """The start time (clock ticks after boot) of ``pid``, or None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def is_running(pid: int, ticks: int) -> bool:
    """True when the process ``pid`` that started at ``ticks`` still runs."""
    return start_time(pid) == ticks


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def descendants(pids: list[int]) -> dict[int, int]:
    """Every live process below ``pids`` (children, grandchildren, ...), as pid -> start ticks."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, int] = {}
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            ticks = start_time(child)
            if ticks is not None and child not in found:
                found[child] = ticks
                todo.append(child)
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
    ticks = start_time(proc.pid)
    if ticks is None:
        raise ValueError(f"{role} exited at once ({' '.join(command[:3])} ...); see {log}")
    return Started(role, proc.pid, ticks, command, str(log))


def _signal(pid: int, ticks: int, sig: int, group: bool) -> None:
    if not is_running(pid, ticks):
        return
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(processes: list[Started], grace: float = 10.0) -> list[int]:
    """Stop ``processes``, their process groups and every process below them; return the pids stopped.

    SIGTERM to each group, up to ``grace`` seconds to exit, then SIGKILL to whatever of that tree
    still runs (``ray start --block`` ignores SIGTERM). Only processes that are ours by pid and
    start time are signalled.
    """
    tree = {p.pid: p.start_ticks for p in processes if is_running(p.pid, p.start_ticks)}
    tree.update(descendants(list(tree)))
    for p in processes:
        _signal(p.pid, p.start_ticks, signal.SIGTERM, group=True)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(pid, ticks) for pid, ticks in tree.items()):
        time.sleep(0.2)
    for p in processes:
        _signal(p.pid, p.start_ticks, signal.SIGKILL, group=True)
    for pid, ticks in tree.items():
        _signal(pid, ticks, signal.SIGKILL, group=False)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(pid, ticks) for pid, ticks in tree.items()):
        time.sleep(0.2)
    return sorted(tree)
