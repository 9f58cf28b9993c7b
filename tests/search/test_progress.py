"""The sweep's progress in the driver: finished-trial lines, the plain status lines of a log or a
pipe, the live status of a terminal, driven through Ray Tune's own callback list with real trials."""

from __future__ import annotations

import io
import os
import pickle
import pty
import re
import select
import sys

import pytest
from ray import tune
from ray.tune.callback import CallbackList
from ray.tune.experiment import Trial

from search import progress
from search.names import ADAPTER_PARAMETERS, FINAL_SCORE, SCORE, STEP
from search.progress import ProgressCallback, status_line, sweep_status

TRAINABLE = "craft_progress_probe"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _probe(config):  # never runs: a Trial needs a registered trainable to be built
    return None


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(progress, "_clock", fake)
    return fake


def _trial(trial_id: str, status: str = "RUNNING", rank: int = 8) -> Trial:
    tune.register_trainable(TRAINABLE, _probe)  # each time: a Ray started and shut down by another test module clears the registry
    trial = Trial(TRAINABLE, trial_id=trial_id, config={"method": "lora", "lora.r": rank})
    trial.set_status(status)
    return trial


def _report(hooks: CallbackList, trials: list, trial: Trial, **result) -> None:
    """As Ray's controller does: the callbacks see the report, then the trial keeps it."""
    hooks.on_trial_result(iteration=0, trials=trials, trial=trial, result=result)
    trial.update_last_result(result)


def test_a_log_gets_the_finished_lines_and_a_plain_status_line_every_30s(clock):
    out = io.StringIO()
    callback = ProgressCallback(6, stream=out, budget=100)
    hooks = CallbackList([callback])
    a, b = _trial("a"), _trial("b", rank=4)
    trials = [a, b]
    hooks.on_step_begin(iteration=0, trials=trials)  # the rate of steps counts from here: 0 steps at 1000
    clock.now = 1010
    _report(hooks, trials, a, **{STEP: 40, SCORE: 0.5})
    clock.now = 1012
    _report(hooks, trials, b, **{STEP: 40, SCORE: 0.45})
    clock.now = 1020
    _report(hooks, trials, a, **{STEP: 100, SCORE: 0.64, FINAL_SCORE: 0.64, ADAPTER_PARAMETERS: 4096})
    hooks.on_trial_complete(iteration=0, trials=trials, trial=a)
    a.set_status(Trial.TERMINATED)
    clock.now = 1022
    c = _trial("c")
    trials.append(c)
    _report(hooks, trials, b, **{STEP: 60, SCORE: 0.52})
    hooks.on_trial_complete(iteration=0, trials=trials, trial=b)  # no final score: pruned
    b.set_status(Trial.TERMINATED)
    clock.now = 1024
    d = _trial("d", rank=16)
    trials.append(d)
    hooks.on_trial_error(iteration=0, trials=trials, trial=d)  # still RUNNING to Ray: counted failed all the same
    clock.now = 1025
    _report(hooks, trials, c, **{STEP: 20, SCORE: 0.4})
    assert out.getvalue().count("[status") == 0  # 25 s: not yet
    clock.now = 1031
    hooks.on_step_end(iteration=0, trials=trials)
    clock.now = 1040
    hooks.on_step_begin(iteration=0, trials=trials)  # 9 s after the last line
    d.set_status(Trial.ERROR)
    clock.now = 1061
    hooks.on_step_begin(iteration=0, trials=trials)
    hooks.on_experiment_end(trials=trials)
    # 180 steps run (100 + 60 + 0 + 20) since 1000; the ended complete and pruned trials ran 80 on
    # average: c has 60 to go, the 2 trials not yet started 160 together: 220 steps at 180 / 31 s.
    assert out.getvalue().splitlines() == [
        "[1/6] a complete  score 0.6400  4,096 params  lora r=8  [20s]",
        "[2/6] b pruned    score 0.5200 at step 60  lora r=4  [22s]",
        "[3/6] d failed    lora r=16  ()  [24s]",
        "[status 31s] running 1 (c step 20 0.4000), complete 1, pruned 1, failed 1 of 6; ~38 s left",  # 220 * 31 / 180
        "[status 61s] running 1 (c step 20 0.4000), complete 1, pruned 1, failed 1 of 6; ~75 s left",  # 220 * 61 / 180
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_the_time_left_before_any_trial_ends_comes_from_the_budget_and_the_compute_budget_caps_it():
    trials = [_trial(f"t{i}") for i in range(1, 6)] + [_trial("t6", status=Trial.PENDING)]
    for i, trial in enumerate(trials[:5], start=1):
        trial.update_last_result({STEP: 25, SCORE: 0.5 + i / 100})
    status = sweep_status(trials, 8, started=0, now=10, since=(0, 0), budget=100)
    # 125 steps in 10 s; 5 running trials with 75 to go, t6 waiting and 2 not started with 100 each: 675.
    assert (status.steps, len(status.running), status.left_s) == (125, 5, pytest.approx(54.0))
    assert status_line(status, shown=3) == (
        "[status 10s] running 5 (t1 step 25 0.5100, t2 step 25 0.5200, t3 step 25 0.5300, +2 more), "
        "complete 0, pruned 0, failed 0 of 8; ~54 s left"
    )
    capped = sweep_status(trials, 8, started=0, now=10, since=(0, 0), budget=100, max_total_steps=200)
    assert capped.left_s == pytest.approx(6.0)  # 75 steps to the compute budget
    assert sweep_status(trials, 8, started=0, now=10, since=None, budget=100).left_s is None  # no rate yet
    assert sweep_status(trials, 8, started=0, now=10, since=(0, 0)).left_s is None  # nor any steps per trial


def _read(fd: int, wait: float = 0.3) -> str:
    """What the terminal got so far: read until it has been quiet for 50 ms (at most ``wait`` for the first byte)."""
    data, timeout = b"", wait
    while select.select([fd], [], [], timeout)[0]:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        data, timeout = data + chunk, 0.05
    return data.decode()


def test_a_terminal_gets_a_live_status_under_the_finished_lines(clock, monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    stdout = sys.stdout
    with os.fdopen(slave, "w") as terminal:
        callback = ProgressCallback(4, stream=terminal, budget=100)  # redrawn every 2 s
        hooks = CallbackList([callback])
        a, b = _trial("a"), _trial("b", rank=4)
        trials = [a, b]
        hooks.on_step_begin(iteration=0, trials=trials)
        first = ANSI.sub("", _read(master))
        assert "running 2, complete 0, pruned 0, failed 0 of 4" in first and "0/4" in first
        assert re.search(r"a\s+starting", first) and re.search(r"b\s+starting", first)

        clock.now = 1001
        _report(hooks, trials, a, **{STEP: 10, SCORE: 0.5})
        assert _read(master, wait=0.1) == ""  # 1 s: not redrawn yet
        clock.now = 1003
        hooks.on_step_end(iteration=0, trials=trials)
        redrawn = _read(master)
        assert "\x1b[2K" in redrawn  # the old lines erased: drawn again in place
        assert re.search(r"a\s+step 10\s+0\.5000", ANSI.sub("", redrawn)) and "elapsed 0:03" in ANSI.sub("", redrawn)

        restored = pickle.loads(pickle.dumps(callback))  # as Ray saves the experiment, while the display runs
        assert (restored.total, restored.stream, restored.budget) == (4, None, 100)

        clock.now = 1004
        _report(hooks, trials, a, **{STEP: 100, SCORE: 0.64, FINAL_SCORE: 0.64, ADAPTER_PARAMETERS: 4096})
        hooks.on_trial_complete(iteration=0, trials=trials, trial=a)
        a.set_status(Trial.TERMINATED)
        after = ANSI.sub("", _read(master))
        assert "[1/4] a complete  score 0.6400  4,096 params  lora r=8  [4s]\r\n" in after
        assert after.index("[1/4] a complete") < after.index("running 1, complete 1, pruned 0, failed 0 of 4")

        hooks.on_experiment_end(trials=trials)
        end = _read(master)
        assert "\x1b[?25h" in end  # the cursor shown again
        assert sys.stdout is stdout  # no longer redirected above the display
    os.close(master)


def test_a_callback_saved_by_the_earlier_version_restores_under_its_old_name():
    # Before the move, a sweep's state named search.callbacks.ProgressCallback and held only these fields.
    old = ProgressCallback.__new__(ProgressCallback)
    old.__dict__ = {"total": 4, "stream": None, "done": 1, "started": 0.0}
    saved = pickle.dumps(old, protocol=0).replace(b"search.progress", b"search.callbacks")  # text opcodes: no lengths
    assert b"search.progress" not in saved
    restored = pickle.loads(saved)
    assert type(restored) is ProgressCallback and restored.total == 4 and restored.refresh_s == 2.0
    assert restored._latest == {} and restored.budget is None
