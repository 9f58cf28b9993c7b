"""The progress of a sweep, shown by the driver: a line per finished trial and, between those lines,
what runs now.

A finished trial prints ``[done/total] trial_id outcome  score ...  [elapsed]``. In between, the
status: the running trials (id, step, last score), the counts of complete, pruned and failed
trials of the total, the time since the start and an estimate of the time left. On a terminal it
is a live display (rich) under the finished-trial lines, redrawn every ``refresh_s`` seconds;
elsewhere (a log, a pipe, CI) a plain ``[status 120s] ...`` line every ``status_every_s`` seconds,
with no control characters.

The time left is counted in optimiser steps, the unit every trial reports from its first
evaluation on (the first trial of the demo ends after minutes): the steps still to run over the
rate of steps since this driver started. A trial that has not ended is expected to run as many
steps as the ended ones did on average (pruned ones included), or the full budget while none has
ended, and never fewer than it has run; the sweep's compute budget, if any, caps the total.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray.tune import Callback

from .names import ADAPTER_PARAMETERS, FINAL_SCORE, SCORE, STEP
from .outcomes import error_line, trial_outcome
from .space import describe_config

__all__ = ["ProgressCallback", "RunningTrial", "SweepStatus", "sweep_status", "status_line"]

_clock = time.time  # one clock for the elapsed times and the rate (tests set it)


@dataclass
class RunningTrial:
    """A running trial as its last report left it (step and score None before its first)."""

    trial_id: str
    step: int | None = None
    score: float | None = None


@dataclass
class SweepStatus:
    """The facts the status shows, computed before any is printed."""

    total: int  # trials the sweep runs
    elapsed_s: float  # since the sweep started
    steps: int = 0  # optimiser steps run so far, all trials together
    running: list[RunningTrial] = field(default_factory=list)
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    left_s: float | None = None  # estimated time left; None until a rate and a steps-per-trial are known


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def sweep_status(
    trials: Sequence[Any],
    total: int,
    *,
    started: float,
    now: float,
    latest: dict[str, dict] | None = None,
    ended: dict[str, str] | None = None,
    since: tuple[float, int] | None = None,
    budget: int | None = None,
    max_total_steps: int | None = None,
) -> SweepStatus:
    """The status of a sweep from its Ray Tune trials.

    Args:
        trials: the sweep's trials so far.
        total: trials the sweep runs.
        started: when the sweep started; now: the time now (both ``time.time()``).
        latest: each trial's newest report by trial id, where newer than its ``last_result``
            (Ray updates that after the callbacks have seen the report).
        ended: outcomes by trial id of trials known to have ended (Ray may not have set their status yet).
        since: (time, steps run by then) where the rate of steps starts; None: no time left yet.
        budget: optimiser steps of a full trial.
        max_total_steps: the sweep's compute budget in steps.
    """
    latest, ended = latest or {}, ended or {}
    status = SweepStatus(total=total, elapsed_s=now - started)
    ended_steps, open_steps = [], []  # steps of the trials that ended complete or pruned; of those not ended
    for trial in trials:
        report = latest.get(trial.trial_id) or trial.last_result or {}
        step = _number(report.get(STEP))
        status.steps += int(step or 0)
        outcome = trial_outcome(trial)
        if outcome == "running":
            outcome = ended.get(trial.trial_id, outcome)
        if outcome != "running":
            setattr(status, outcome, getattr(status, outcome) + 1)
            if outcome != "failed":
                ended_steps.append(step or 0)
            continue
        open_steps.append(step or 0)
        if trial.status == "RUNNING":  # not PENDING or PAUSED
            status.running.append(RunningTrial(trial.trial_id, None if step is None else int(step), _number(report.get(SCORE))))
    per_trial = sum(ended_steps) / len(ended_steps) if ended_steps else budget
    if per_trial and since is not None and now > since[0] and status.steps > since[1]:
        rate = (status.steps - since[1]) / (now - since[0])
        left = sum(max(per_trial - s, 0) for s in open_steps) + max(total - len(trials), 0) * per_trial
        if max_total_steps:
            left = min(left, max(max_total_steps - status.steps, 0))
        status.left_s = left / rate
    return status


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"


def _counts(status: SweepStatus) -> str:
    return f"complete {status.complete}, pruned {status.pruned}, failed {status.failed} of {status.total}"


def _trial_words(trial: RunningTrial) -> list[str]:
    if trial.step is None:
        return [trial.trial_id, "starting"]
    return [trial.trial_id, f"step {trial.step}"] + ([] if trial.score is None else [f"{trial.score:.4f}"])


def status_line(status: SweepStatus, shown: int = 3) -> str:
    """The status in one plain line: ``[status 120s] running 2 (t1 step 40 0.6120, ...), complete 3,
    pruned 1, failed 0 of 20; ~6 min left``, naming at most ``shown`` running trials."""
    named = [" ".join(_trial_words(t)) for t in status.running[:shown]]
    if len(status.running) > shown:
        named.append(f"+{len(status.running) - shown} more")
    line = f"[status {status.elapsed_s:.0f}s] running {len(status.running)}" + (f" ({', '.join(named)})" if named else "")
    line += f", {_counts(status)}"
    return line + (f"; ~{_duration(status.left_s)} left" if status.left_s is not None else "")


def live_view(status: SweepStatus, shown: int = 3) -> Any:
    """The status as a small rich table: a bar of the finished trials, the time, the counts, then
    a row per running trial (at most ``shown``)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    def cell(text: str) -> Text:  # plain text: a trial id is never read as rich markup
        return Text(text, no_wrap=True, overflow="ellipsis")

    finished = status.complete + status.pruned + status.failed
    minutes, seconds = divmod(int(status.elapsed_s), 60)
    head = Table.grid(padding=(0, 1))
    head.add_row(
        ProgressBar(total=max(status.total, 1), completed=finished, width=24),
        cell(f"{finished}/{status.total}"),
        cell(f"elapsed {minutes}:{seconds:02d}" + (f", ~{_duration(status.left_s)} left" if status.left_s is not None else "")),
    )
    rows = Table.grid(padding=(0, 2))
    for trial in status.running[:shown]:
        rows.add_row(*(cell(w) for w in ["", *_trial_words(trial)]))
    if len(status.running) > shown:
        rows.add_row(cell(""), cell(f"+{len(status.running) - shown} more"))
    return Group(head, cell(f"running {len(status.running)}, {_counts(status)}"), rows)


def _is_terminal(stream: TextIO) -> bool:
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
    # A dumb terminal (TERM=dumb, as in an editor's shell) cannot redraw: it gets the plain lines.
    return tty and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")


class ProgressCallback(Callback):
    """A line per finished trial (outcome, score, adapter size, config) and, between those lines,
    the sweep's status: a live display on a terminal, a plain line now and then elsewhere.

    Args:
        total: trials the sweep runs.
        stream: where to write (default: ``sys.stdout`` at the time of writing).
        budget: optimiser steps of a full trial (the time left before any trial has ended).
        max_total_steps: the sweep's compute budget in steps, if any.
        refresh_s: seconds between redraws of the live display on a terminal.
        status_every_s: seconds between plain status lines elsewhere.
        shown: running trials named at most (then ``+N more``).
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        budget: int | None = None,
        max_total_steps: int | None = None,
        refresh_s: float = 2.0,
        status_every_s: float = 30.0,
        shown: int = 3,
    ):
        self.total = total
        self.stream = stream
        self.budget, self.max_total_steps = budget, max_total_steps
        self.refresh_s, self.status_every_s, self.shown = refresh_s, status_every_s, shown
        self.done = 0
        self.started = _clock()
        self._latest: dict[str, dict] = {}
        self._ended: dict[str, str] = {}
        self._since: tuple[float, int] | None = None  # when and at how many steps this driver began to count
        self._shown_at: float | None = None
        self._live: Any = None  # rich.live.Live while the live display runs

    @staticmethod
    def _fresh() -> dict:  # what one driver knows alone: no stream, no display, no counts of its own
        return {"stream": None, "_live": None, "_latest": {}, "_ended": {}, "_since": None, "_shown_at": None}

    def __getstate__(self) -> dict:  # Ray saves callbacks with the experiment
        return {**self.__dict__, **self._fresh()}

    def __setstate__(self, state: dict) -> None:  # a sweep saved by an earlier version lacks the newer fields
        defaults = {"budget": None, "max_total_steps": None, "refresh_s": 2.0, "status_every_s": 30.0, "shown": 3}
        self.__dict__.update({**defaults, **state, **self._fresh()})

    def _write(self, line: str) -> None:
        if self._live is not None:  # above the live display
            self._live.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        else:
            print(line, file=self.stream or sys.stdout, flush=True)

    def _show(self, trials: list, force: bool = False) -> None:
        """The status, when its time has come (each call is cheap otherwise: Ray calls this every loop)."""
        now, out = _clock(), self.stream or sys.stdout
        live = self._live is not None or _is_terminal(out)
        if not force and self._shown_at is not None and now - self._shown_at < (self.refresh_s if live else self.status_every_s):
            return
        status = sweep_status(trials, self.total, started=self.started, now=now, latest=self._latest, ended=self._ended,
                              since=self._since, budget=self.budget, max_total_steps=self.max_total_steps)  # fmt: skip
        if self._since is None:
            self._since = (now, status.steps)
        first, self._shown_at = self._shown_at is None, now
        if not live:
            if not first:  # the first plain line after status_every_s, not at the start
                print(status_line(status, self.shown), file=out, flush=True)
            return
        view = live_view(status, self.shown)
        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(view, console=Console(file=out, force_terminal=True), auto_refresh=False)
            self._live.start(refresh=True)  # stray prints (Ray's, the workers' logs) now go above it
        else:
            self._live.update(view, refresh=True)

    def _print(self, trials: list, trial: Any, outcome: str) -> None:
        # Counted from the trials, not incremented: a resumed sweep counts the ones done before.
        self.done = sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials)
        self._ended[trial.trial_id] = outcome
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
        parts.append(f"[{_clock() - self.started:.0f}s]")
        self._write("  ".join(parts))
        if self._live is not None:
            self._show(trials, force=True)  # the counts move with the line

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self._show(trials)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._show(trials)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        self._latest[trial.trial_id] = {STEP: result.get(STEP), SCORE: result.get(SCORE)}
        self._show(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._print(trials, trial, trial_outcome(trial, ended=True))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._print(trials, trial, "failed")

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._live is not None:  # the last counts stay on screen; the cursor comes back
            self._show(trials, force=True)
            self._live.stop()
            self._live = None
