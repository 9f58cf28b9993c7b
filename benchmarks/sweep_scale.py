"""How a sweep scales with its number of trials: 100, 300, 1,000 short trials side by side.

Each size is one real sweep of ``spaces/smoke.yaml`` (the tiny random model on tweets) through
``run_sweep``, FIFO, two trials at once, ``--budget`` optimiser steps per trial (one evaluation),
tracked in the embedded SQLite MLflow store, in a fresh driver process of its own so that its
peak memory is its own. Per size it reports:

* per-trial overhead: (2 trial slots x sweep wall time - the trials' training seconds) / trials,
  the time a trial slot spends on anything but training; "steady" counts from the first trial's
  start to the last one's end instead (the driver's start-up, loading the model and the
  decomposition, left out), the figure the 20% goal is judged on;
* the driver's peak RSS (``ru_maxrss``), and its growth per trial: RSS sampled every 0.5 s, from
  the moment a tenth of the trials had finished to the end, divided by the trials in between; and
  the same over the second half of the trials alone;
* MLflow: the tracking queue's request seconds per trial (sent off Ray Tune's loop);
* the size of the sweep's state: Ray Tune's snapshot files (experiment state, searcher, tuner)
  and the Optuna study.

Goal: per-trial overhead and RSS per trial flat from 100 to 1,000 trials (within 20%), the
driver under 2 GB at 1,000. Run ``python benchmarks/sweep_scale.py`` (``--sizes 100 300`` for the
two smaller ones; ``--output FILE`` appends the report).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPEC = Path(__file__).resolve().parent.parent / "spaces" / "smoke.yaml"
STATE_PREFIXES = ("experiment_state", "searcher-state", "tuner.pkl", "basic-variant-state", "trainable.pkl")


def _rss_sampler(samples: list[tuple[float, int]], stop: threading.Event) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        samples.append((time.time(), me.memory_info().rss))
        stop.wait(0.5)


def one_size(trials: int, budget: int, root: Path) -> dict:
    """Run one sweep of ``trials`` trials in this process; every measured number."""
    import ray

    from search.spec import load_sweep_spec
    from search.sweep import run_sweep

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    overrides = [f"search.num_samples={trials}", "search.scheduler=fifo", f"search.max_budget={budget}",
                 f"train.eval_every={budget}", "search.max_concurrent_trials=2", "data.max_train_samples=256",
                 "data.max_eval_samples=64"]  # fmt: skip
    spec = load_sweep_spec(SPEC, overrides=overrides, name=f"scale-{trials}")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_rss_sampler, args=(samples, stop), daemon=True)
    sampler.start()
    result = run_sweep(spec, storage=str(root / "sweeps"), cache_dir=root / "factors",
                       tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False)  # fmt: skip
    stop.set()
    sampler.join()
    train = [float(t.metrics.get("train_s", t.metrics.get("elapsed_s", 0.0))) for t in result.trials]
    ends = sorted(float(t.metrics["finished_at"]) for t in result.trials if "finished_at" in t.metrics)
    tenth = ends[len(ends) // 10] if ends else samples[0][0]
    after = [rss for stamp, rss in samples if stamp >= tenth] or [samples[-1][1]]
    trials_after = sum(end > tenth for end in ends)
    half = ends[len(ends) // 2] if ends else samples[0][0]
    second = [rss for stamp, rss in samples if stamp >= half] or [samples[-1][1]]
    starts = [float(t.metrics["started_at"]) for t in result.trials if "started_at" in t.metrics]
    span = (ends[-1] - min(starts)) if ends and starts else result.wall_s
    sweep_dir = root / "sweeps" / spec.name
    state_bytes = sum(p.stat().st_size for p in sweep_dir.iterdir() if p.is_file() and p.name.startswith(STATE_PREFIXES))
    study = sweep_dir / "optuna-study.db"
    return {
        "trials": len(result.trials),
        "complete": result.count("complete"),
        "wall_s": result.wall_s,
        "train_s": sum(train),
        "overhead_per_trial_s": (2 * result.wall_s - sum(train)) / len(result.trials),
        "steady_overhead_per_trial_s": (2 * span - sum(train)) / len(result.trials),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_at_tenth_mb": after[0] / 2**20,
        "rss_end_mb": after[-1] / 2**20,
        "rss_per_trial_kb": (max(after) - after[0]) / 1024 / max(trials_after, 1),
        "rss_per_trial_second_half_kb": (max(second) - second[0]) / 1024 / max(len(ends) - len(ends) // 2, 1),
        "mlflow_s_per_trial": result.tracking["request_s_per_trial"] if getattr(result, "tracking", None) else None,
        "mlflow_requests_per_trial": result.tracking["requests"] / len(result.trials) if getattr(result, "tracking", None) else None,
        "state_kb": state_bytes / 1024,
        "study_kb": study.stat().st_size / 1024 if study.exists() else 0.0,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def md_table(columns: list[str], rows: list[list]) -> str:
    """A markdown table, the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def report(data: list[dict], args: argparse.Namespace, loads: tuple[float, float]) -> str:
    """The table, the ratios of the largest size to the smallest, and the goal's verdict."""
    import ray
    import torch

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    columns = ["trials", "wall s", "overhead / trial s", "steady overhead / trial s", "peak RSS MB", "RSS / trial KB",
               "RSS / trial, 2nd half KB", "MLflow s / trial",
               "MLflow requests / trial", "Ray state KB", "study KB"]  # fmt: skip
    rows = [[d["trials"], f"{d['wall_s']:.0f}", f"{d['overhead_per_trial_s']:.2f}", f"{d['steady_overhead_per_trial_s']:.2f}",
             f"{d['peak_rss_mb']:.0f}", f"{d['rss_per_trial_kb']:.1f}", f"{d['rss_per_trial_second_half_kb']:.1f}",
             _fmt(d["mlflow_s_per_trial"], ".4f"), _fmt(d["mlflow_requests_per_trial"], ".1f"),
             f"{d['state_kb']:.0f}", f"{d['study_kb']:.0f}"] for d in data]  # fmt: skip
    small, large = data[0], data[-1]
    ratio = large["steady_overhead_per_trial_s"] / small["steady_overhead_per_trial_s"]
    lines = [
        f"## sweep_scale: {now} | torch {torch.__version__} | ray {ray.__version__} | {os.cpu_count()} cores",
        "",
        f"- command: `{shlex.join(sys.orig_argv)}`",
        f"- {SPEC.name}, FIFO, 2 trials at once, {args.budget} steps per trial, SQLite MLflow store, one driver process per size",
        f"- 1-minute load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the end",
        "",
        md_table(columns, rows),
        "",
        f"{large['trials']} vs {small['trials']} trials: steady overhead per trial x{ratio:.2f} "
        f"({'flat, within 20%' if abs(ratio - 1) <= 0.2 else 'NOT within 20%'}); RSS per trial "
        f"{small['rss_per_trial_kb']:.1f} -> {large['rss_per_trial_kb']:.1f} KB; peak RSS at {large['trials']}: "
        f"{large['peak_rss_mb']:.0f} MB ({'under' if large['peak_rss_mb'] < 2048 else 'OVER'} 2 GB)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Each size in a driver process of its own; then the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="trials per sweep")
    parser.add_argument("--budget", type=int, default=8, help="optimiser steps per trial (default 8)")
    parser.add_argument("--output", type=Path, help="append the report to this file")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child: one size, JSON on stdout
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one, args.budget, args.root)))
        return
    if min(args.sizes) < 10 or args.budget < 1:
        parser.error("sizes must be at least 10 trials and --budget at least 1 step")
    load_start = os.getloadavg()[0]
    data = []
    with tempfile.TemporaryDirectory(prefix="sweep-scale-") as tmp:
        for size in sorted(args.sizes):
            root = Path(tmp) / str(size)
            root.mkdir()
            print(f"{size} trials ...", file=sys.stderr, flush=True)
            child = subprocess.run([sys.executable, __file__, "--one", str(size), "--budget", str(args.budget), "--root", str(root)],
                                   capture_output=True, text=True, cwd=root)  # fmt: skip
            if child.returncode != 0:
                sys.exit(f"the {size}-trial sweep failed:\n{child.stderr[-3000:]}")
            data.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"    {json.dumps(data[-1])}", file=sys.stderr, flush=True)
    text = report(data, args, (load_start, os.getloadavg()[0]))
    print(text)
    if args.output:
        with args.output.open("a") as handle:
            handle.write(text + "\n\n")


if __name__ == "__main__":
    main()
