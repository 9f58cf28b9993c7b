"""How a Ray Tune trial of a sweep ended, as the driver's callbacks tell it."""

from __future__ import annotations

from typing import Any

from .names import FINAL_SCORE

__all__ = ["trial_outcome", "error_line"]


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
