"""Search efficiency: hypervolume of the accuracy-vs-parameters front against compute, per strategy.

Four strategies, each run with several search seeds, every run cut at the same total compute
(optimiser steps summed over all its trials, ``search.max_total_steps``):

* ``random+fifo``: random sampling, every trial runs its full budget (what a user does by hand),
* ``tpe+asha``: TPE, ASHA on the score alone (the default before MO-ASHA),
* ``tpe+moasha``: TPE, MO-ASHA on (score, adapter parameters),
* ``nsga2+moasha``: NSGA-II, MO-ASHA.

The task is one the project was never tuned on: tweet *polarity* (positive against negative,
neutral tweets dropped; 2 classes, about 70/30) built from the packaged tweets corpus into CSV
files, on the packaged pre-trained MiniLM. The space is wide and untuned: CRAFT, LoRA and VeRA,
ranks over their whole useful range, one shared learning-rate range. Every trial is the real
sweep machinery (``run_sweep``: Ray Tune, Optuna, the schedulers, MLflow on SQLite).

The hypervolume is the project's (:func:`search.results.pareto.hypervolume`: score x log10(1 +
parameters)) against one fixed reference point for every run: score 0 and twice the largest
adapter the space allows. Compute is counted from each trial's reports (steps at each
evaluation, ordered by wall clock), and a trial enters the front when it completes.

Run ``python benchmarks/search_efficiency.py --output FILE`` (about 45 minutes on 2 cores);
``--smoke`` runs a tiny random model in a few minutes (checks the script, not the search).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray
from common import emit, log  # benchmarks/common.py, beside this script

from craft.harness.hub import load_model
from craft.harness.tasks import load_task, tweets_csv_path
from search.model_facts import check_against_model
from search.names import ADAPTER_PARAMETERS, FINAL_SCORE, REPORTED_AT, SCORE, STEP
from search.results.pareto import ParetoTrial, hypervolume
from search.spec import spec_from_dict
from search.sweep import run_sweep

STRATEGIES = {  # name -> (sampler, scheduler)
    "random+fifo": ("random", "fifo"),
    "tpe+asha": ("tpe", "asha"),
    "tpe+moasha": ("tpe", "moasha"),
    "nsga2+moasha": ("nsga2", "moasha"),
}
BASELINE, CHALLENGER, RIVAL = "random+fifo", "tpe+moasha", "tpe+asha"


@dataclass(frozen=True)
class Size:
    """One benchmark scale: model, data, trial budget and the sweeps' compute."""

    model: str
    train: int  # training tweets
    eval: int  # validation (and test) tweets
    budget: int  # optimiser steps of a full trial
    eval_every: int  # = the first rung
    total_steps: int  # compute of every run: full trials of random+fifo x budget
    samples: int  # trials a run may start (the compute limit ends it first)
    seeds: int


FULL = Size("demo", train=1500, eval=256, budget=48, eval_every=16, total_steps=12 * 48, samples=40, seeds=3)
SMOKE = Size("tiny-random", train=256, eval=64, budget=8, eval_every=4, total_steps=4 * 8, samples=10, seeds=2)


def polarity_task(root: Path, size: Size) -> str:
    """Positive-vs-negative tweets as train/validation/test CSV files in ``root``; the task name."""
    with open(tweets_csv_path(), encoding="utf-8", errors="replace", newline="") as handle:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(handle) if r["sentiment"] in ("positive", "negative")]
    random.Random(0).shuffle(rows)
    splits = {"train": rows[: size.train], "validation": rows[size.train : size.train + size.eval],
              "test": rows[size.train + size.eval : size.train + 2 * size.eval]}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("text", "label"))
            writer.writerows(part)
    return f"csv:{root}"


def spec_data(task: str, size: Size, strategy: str, seed: int, root: Path) -> dict:
    """The sweep spec of one run (the same space for every strategy; sampler, scheduler and seed vary)."""
    sampler, scheduler = STRATEGIES[strategy]
    return {
        "name": f"{strategy.replace('+', '-')}-{seed}",
        "model": size.model,
        "task": task,
        "data": {"text_columns": ["text"], "label_column": "label"},
        "method": {"choice": ["craft", "lora", "vera"]},
        "craft": {"rank_layers": {"int": [1, 6] if size.model == "demo" else [1, 4]},
                  "rank_out": {"int": [4, 384] if size.model == "demo" else [2, 32], "log": True},
                  "rank_in": {"int": [4, 384] if size.model == "demo" else [2, 32], "log": True},
                  "init_scale": {"choice": [0.0, 1.0e-3]}},  # fmt: skip
        "lora": {"r": {"int": [1, 32], "log": True}, "alpha": 16},
        "vera": {"r": {"int": [16, 1024], "log": True}},
        "train": {"lr": {"float": [1.0e-4, 3.0e-2], "log": True}, "head_lr": {"float": [1.0e-3, 3.0e-2], "log": True},
                  "batch_size": 16, "max_length": 48, "eval_every": size.eval_every, "seed": 0},  # fmt: skip
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "search-efficiency"},
        "search": {"num_samples": size.samples if scheduler != "fifo" else size.total_steps // size.budget,
                   "max_concurrent_trials": 2, "max_budget": size.budget, "grace_period": size.eval_every,
                   "reduction_factor": 3, "sampler": sampler, "scheduler": scheduler, "seed": seed,
                   "max_total_steps": size.total_steps, "storage": str(root / "sweeps"),
                   "factor_cache": str(root / "factors")},  # fmt: skip
        "resources": {"cpu": 1},
    }


def largest_adapter(spec_dict: dict) -> int:
    """The largest adapter the space allows on the model (the reference point's parameter end)."""
    spec = spec_from_dict(spec_dict)
    run = spec.run_config({p: d.candidates()[0] for p, d in spec.domains.items()})
    task = load_task(run.task, run.data, seed=0)
    model = load_model(run.model, num_labels=task.spec.num_labels)
    costs = check_against_model(spec, model).costs
    highs = {p: d.high for p, d in spec.domains.items() if p != "method"}
    return max(costs[m].price(m, highs) for m in spec.methods)


def curve(exp_dir: Path, reference: tuple[float, float]) -> list[tuple[float, float]]:
    """(compute, hypervolume) after every report of the run, in wall-clock order."""
    events = []
    for result_file in exp_dir.glob("*/result.json"):
        trial = result_file.parent.name
        for line in result_file.read_text().splitlines():
            r = json.loads(line)
            if STEP in r and REPORTED_AT in r:
                events.append((r[REPORTED_AT], trial, r[STEP], r.get(FINAL_SCORE), r.get(ADAPTER_PARAMETERS)))
    events.sort()
    steps: dict[str, float] = {}
    done: list[ParetoTrial] = []
    points = [(0.0, 0.0)]
    for _, trial, step, final, params in events:
        steps[trial] = max(steps.get(trial, 0), step)
        if final is not None:
            done.append(ParetoTrial(trial, "", "complete", float(final), int(params)))
        points.append((float(sum(steps.values())), hypervolume(done, reference)))
    return points


def at(points: list[tuple[float, float]], compute: float) -> float:
    """The hypervolume reached with at most ``compute`` steps."""
    return max((hv for c, hv in points if c <= compute), default=0.0)


def reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The compute at which the hypervolume first reaches ``target`` (None: never)."""
    return next((c for c, hv in points if hv >= target - 1e-12), None)


def first_rung_ties(exp_dir: Path, rung: int) -> tuple[int, int]:
    """(trials whose score at the first rung is the rung's most common score, trials that reached it).

    Many trials tied at one score (a classifier still predicting the majority class) leave ASHA
    nothing to rank by and MO-ASHA only the adapter size."""
    scores = []
    for result_file in exp_dir.glob("*/result.json"):
        at_rung = [json.loads(line) for line in result_file.read_text().splitlines()]
        at_rung = [r[SCORE] for r in at_rung if r.get(STEP) == rung]
        scores.extend(at_rung[:1])
    if not scores:
        return 0, 0
    return max(scores.count(s) for s in set(scores)), len(scores)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _paired(runs: dict[str, list[dict]], done: list[dict], size: Size) -> str:
    """The compute each run needs to reach the final HV of random+fifo with the same search seed
    (TPE's first trials are random draws: a seed's runs start from the same configurations)."""
    finals = {r["seed"]: at(r["curve"], size.total_steps) for r in runs.get(BASELINE, [])}
    needs = [reach(r["curve"], finals[r["seed"]]) for r in done if r["seed"] in finals]
    reached = [n / size.total_steps for n in needs if n is not None and n <= size.total_steps]
    if not reached:
        return f"not reached (0/{len(needs)})"
    return f"{statistics.mean(reached):.0%} ({len(reached)}/{len(needs)}: " + ", ".join(f"{f:.0%}" for f in reached) + ")"


def report(runs: dict[str, list[dict]], size: Size, reference: tuple[float, float], header: str) -> str:
    """The markdown table of hypervolume against compute, and the compute to reach the baseline."""
    fractions = (0.25, 0.4, 0.5, 0.75, 1.0)
    lines = [header, "", "| strategy | runs | " + " | ".join(f"HV at {f:.0%} compute" for f in fractions)
             + " | compute to reach random+fifo's mean final HV | ... its own seed's final HV | complete / pruned trials per run |",
             "| --- | ---: | " + " | ".join("---:" for _ in fractions) + " | ---: | ---: | ---: |"]  # fmt: skip
    target = statistics.mean(at(r["curve"], size.total_steps) for r in runs.get(BASELINE, [])) if runs.get(BASELINE) else None
    for name in STRATEGIES:
        done = runs.get(name, [])
        if not done:
            continue
        cells = [_mean_sd([at(r["curve"], f * size.total_steps) for r in done]) for f in fractions]
        needs = [reach(r["curve"], target) for r in done] if target is not None else []
        reached = [n for n in needs if n is not None and n <= size.total_steps]
        need = (f"{statistics.mean(reached) / size.total_steps:.0%} ({len(reached)}/{len(done)} runs reach it)"
                if reached else f"not reached (0/{len(done)})")  # fmt: skip
        counts = f"{statistics.mean(r['complete'] for r in done):.1f} / {statistics.mean(r['pruned'] for r in done):.1f}"
        lines.append(f"| {name} | {len(done)} | " + " | ".join(cells) + f" | {need} | {_paired(runs, done, size)} | {counts} |")
    ties = [r["ties"] for done in runs.values() for r in done if r.get("ties")]
    if ties:
        tied, total = sum(t[0] for t in ties), sum(t[1] for t in ties)
        lines.append("")
        lines.append(f"first rung (step {size.eval_every}): {tied} of {total} trials ({tied / total:.0%}) scored the rung's most common score")
    lines.append("")
    lines.append(f"compute = optimiser steps summed over a run's trials; 100% = {size.total_steps} steps "
                 f"({size.total_steps // size.budget} full trials of {size.budget}); reference point: score 0, "
                 f"{reference[1]:,.0f} parameters; HV mean ± sd over search seeds")  # fmt: skip
    if target is not None:
        lines.append(f"random+fifo's final HV (mean over its runs): {target:.4f}")
        for name in (CHALLENGER, RIVAL):
            if runs.get(name):
                lines.append(f"{name} final HV: " + ", ".join(f"{at(r['curve'], size.total_steps):.4f}" for r in runs[name]))
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], size: Size, path: Path) -> None:
    """Hypervolume against compute: the mean of each strategy's runs, their range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.linspace(0, size.total_steps, 97)  # (G,)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, done in runs.items():
        if not done:
            continue
        values = np.array([[at(r["curve"], c) for c in grid] for r in done])  # (runs, G)
        ax.plot(grid, values.mean(axis=0), label=f"{name} ({len(done)} seeds)")
        ax.fill_between(grid, values.min(axis=0), values.max(axis=0), alpha=0.15)
    ax.set_xlabel("compute: optimiser steps summed over the trials")
    ax.set_ylabel("hypervolume (score x log10(1 + params))")
    ax.set_title("Search efficiency: MiniLM on tweet polarity (CRAFT, LoRA, VeRA)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, short runs: checks the script")
    parser.add_argument("--seeds", type=int, help="search seeds per strategy (default 3; smoke 2)")
    parser.add_argument("--output", type=Path, help="append the report to this markdown file")
    parser.add_argument("--json", type=Path, help="write every run's curve here (updated after each run)")
    parser.add_argument("--plot", type=Path, help="the PNG plot (default: beside --output, else a temporary directory)")
    parser.add_argument("--from-json", type=Path, help="report and plot the runs a --json file holds, running nothing")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        size, reference, runs = Size(**saved["size"]), tuple(saved["reference"]), saved["runs"]
        plot_path = args.plot or args.from_json.with_suffix(".png")
        plot(runs, size, plot_path)
        header = (f"## search_efficiency (from {args.from_json.name}) | {size.model} | {len(runs[BASELINE])} seeds\n\n"
                  f"- command: `python benchmarks/search_efficiency.py {shlex.join(sys.argv[1:])}`\n- plot: {plot_path}")  # fmt: skip
        emit(report(runs, size, reference, header), args.output)
        return 0
    size = SMOKE if args.smoke else FULL
    seeds = args.seeds or size.seeds
    root = Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    task = polarity_task(root / "polarity", size)
    reference = (0.0, 2.0 * largest_adapter(spec_data(task, size, BASELINE, 0, root)))
    log(f"work directory {root}; reference point {reference}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {name: [] for name in STRATEGIES}
    started = time.time()
    for seed in range(seeds):  # seed by seed, so that a cut-short run still compares every strategy
        for name in STRATEGIES:
            spec = spec_from_dict(spec_data(task, size, name, seed, root))
            t0 = time.time()
            result = run_sweep(spec, progress=False)
            points = curve(Path(result.path), reference)
            runs[name].append({"seed": seed, "curve": points, "complete": result.count("complete"), "pruned": result.count("pruned"),
                               "ties": first_rung_ties(Path(result.path), size.eval_every), "wall_s": time.time() - t0})  # fmt: skip
            log(f"{name} seed {seed}: HV {at(points, size.total_steps):.4f} at {points[-1][0]:.0f} steps, "
                f"{result.count('complete')} complete, {result.count('pruned')} pruned, {time.time() - t0:.0f} s")  # fmt: skip
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"size": size.__dict__, "reference": reference, "runs": runs}) + "\n")
    ray.shutdown()
    plot_path = args.plot or ((args.output.parent if args.output else root) / "search_efficiency.png")
    plot(runs, size, plot_path)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = (f"## search_efficiency: {stamp} | {size.model} | {seeds} seeds | {time.time() - started:.0f} s\n\n"
              f"- command: `python benchmarks/search_efficiency.py {shlex.join(sys.argv[1:])}`\n- plot: {plot_path}")  # fmt: skip
    emit(report(runs, size, reference, header), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
