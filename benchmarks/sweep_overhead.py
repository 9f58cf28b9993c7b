"""What the search machinery costs: trial start-up with the factor cache, per-trial overhead, ASHA against FIFO.

Three measurements, side by side in one run, on one local Ray instance (``num_cpus=2``):

* (a) trial start-up on a random RoBERTa-base-shaped classifier, inside a one-thread Ray task:
  cold, the HOSVD in the trial (``craft.compute_factors`` at the trial's ranks), or warm,
  ``fetch_factors`` from a :class:`FactorCache` filled once at the sweep's largest ranks; then
  ``get_craft_model``. Each task deserialises a fresh model before its timer starts. One untimed
  warm-up round, then rounds alternating the two paths (order flipped each round); medians reported.
* (b) the system's own overhead per trial: a real sweep of ``spaces/smoke.yaml`` (FIFO, one trial
  at a time) through ``run_sweep``: (sweep wall time - the trials' training seconds) / trials, also
  without the trials' model and data loading (``prepare_s``). It holds the driver's model and task
  loading, the factor cache, Ray Tune's scheduling and the MLflow logging (the SQLite store is
  created beforehand, as a sweep usually finds it). Goal: under 5% of a 60-second trial (3 s).
* (c) ASHA against FIFO on the same spec, seed and number of samples (two trials at once): the
  optimiser steps and training seconds spent, the wall time and the best final score.

Run ``python benchmarks/sweep_overhead.py`` on a quiet machine (``--output FILE`` also writes every
number as JSON); ``--smoke`` runs a smaller model, fewer rounds and smaller sweeps in about 2 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the smoke spec is offline: never reach for the hub

import ray
import torch
from common import device_name, emit, log  # benchmarks/common.py, beside this script
from transformers import RobertaConfig, RobertaForSequenceClassification

import craft
from search.factor_cache import FactorCache, fetch_factors, publish_factors
from search.model_facts import FactorRequest
from search.spec import load_sweep_spec
from search.sweep import SweepResult, run_sweep

SPEC = Path(__file__).resolve().parent.parent / "spaces" / "smoke.yaml"
CACHE_NAME = "bench-cache"
TRIAL_S = 60.0  # the reference trial length of goal (b)


@dataclass(frozen=True)
class Size:
    """Shape of one run: the start-up model and ranks, the rounds, the sweeps' sizes."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_ranks: tuple[int, int, int]  # what the cache holds (rank_layers, rank_out, rank_in)
    trial_ranks: tuple[int, int, int]  # what one trial uses
    rounds: int
    overhead_samples: int
    overhead_budget: int
    scheduler_samples: int


FULL = Size(12, 768, 12, 3072, (12, 128, 128), (8, 64, 64), rounds=5, overhead_samples=6, overhead_budget=64, scheduler_samples=8)
SMOKE = Size(4, 256, 4, 512, (4, 64, 64), (3, 32, 32), rounds=2, overhead_samples=3, overhead_budget=32, scheduler_samples=4)


# --------------------------------------------------------------------------- (a) start-up


def build_model(size: Size) -> torch.nn.Module:
    """The random RoBERTa classifier (vocab 50265, 2 labels), identical on every call."""
    torch.manual_seed(0)
    shape = {"num_hidden_layers": size.layers, "hidden_size": size.hidden, "num_attention_heads": size.heads}
    return RobertaForSequenceClassification(RobertaConfig(**shape, intermediate_size=size.intermediate, num_labels=2))


@ray.remote(num_cpus=1)
def start_trial(model: torch.nn.Module, ranks: tuple[int, int, int], warm: bool) -> float:
    """Seconds to get the factors (HOSVD here, or the cache) and wrap the fresh ``model``."""
    torch.set_num_threads(1)
    config = craft.CraftConfig(rank_layers=ranks[0], rank_out=ranks[1], rank_in=ranks[2])
    start = time.perf_counter()
    factors = fetch_factors(CACHE_NAME, None) if warm else craft.compute_factors(model, None, ranks)
    craft.get_craft_model(model, config, factors)
    return time.perf_counter() - start


def measure_startup(size: Size, rounds: int, root: Path) -> dict:
    """Cold (HOSVD per trial) and warm (cache) start-up times, alternating over ``rounds``."""
    model = build_model(size)
    cache = FactorCache.options(name=CACHE_NAME).remote()
    start = time.perf_counter()
    publish_factors(cache, model, [FactorRequest(None, size.max_ranks)], cache_dir=root / "factors-startup")
    publish_s = time.perf_counter() - start
    model_ref = ray.put(model)  # each task deserialises its own copy before its timer starts
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    for r in range(rounds + 1):
        order = ("cold", "warm") if r % 2 else ("warm", "cold")
        this = {path: ray.get(start_trial.remote(model_ref, size.trial_ranks, path == "warm")) for path in order}
        if r:  # round 0 warms the workers up
            for path, elapsed in this.items():
                times[path].append(elapsed)
        log(f"start-up round {r}/{rounds}{' (warm-up)' if not r else ''}: " + ", ".join(f"{p} {s:.3f}s" for p, s in this.items()))
    ray.kill(cache)
    return {"publish_s": publish_s, "times": times}


def startup_report(data: dict, size: Size) -> str:
    """Table (a) and the cold / warm ratio."""
    med = {p: statistics.median(t) for p, t in data["times"].items()}
    rows = [[p, f"{med[p]:.3f}", f"{min(t):.3f}", len(t)] for p, t in data["times"].items()]
    ratio = (
        f"cold / warm = {med['cold'] / med['warm']:.1f}x (trial ranks {size.trial_ranks}, cache at {size.max_ranks}; "
        f"the cache's one decomposition in the driver: {data['publish_s']:.2f} s)"
    )
    columns = ["trial start-up (factors + get_craft_model)", "median s", "min s", "runs"]
    return f"### (a) trial start-up: HOSVD in every trial (cold) vs warm factor cache\n\n{md_table(columns, rows)}\n\n{ratio}"


def md_table(columns: list[str], rows: list[list]) -> str:
    """A markdown table, the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# --------------------------------------------------------------------------- sweeps


def sweep(root: Path, name: str, overrides: list[str]) -> SweepResult:
    """One run_sweep of the smoke spec with ``overrides``, in a fresh storage dir, the shared MLflow store."""
    spec = load_sweep_spec(SPEC, overrides=overrides, name=name)
    log(f"sweep {name}: {' '.join(overrides)} ...")
    result = run_sweep(
        spec, storage=str(root / "sweeps" / name), cache_dir=root / "factors", tracking_uri=tracking_uri(root), progress=False
    )
    log(f"    {len(result.trials)} trials in {result.wall_s:.1f} s")
    return result


def tracking_uri(root: Path) -> str:
    """The benchmark's MLflow store (SQLite in the temporary root)."""
    return f"sqlite:///{root / 'mlflow.db'}"


def training_s(metrics: dict) -> float:
    """A trial's training seconds: train_s when it completed, else the elapsed training time of its last report."""
    return float(metrics.get("train_s", metrics.get("elapsed_s", 0.0)))


def mean_or_none(values: list) -> float | None:
    """The mean, or None when a value is missing."""
    return None if not values or None in values else statistics.mean(values)


def overhead_report(result: SweepResult) -> tuple[str, dict]:
    """Table (b): the sweep's time outside the trials' training, per trial."""
    n = len(result.trials)
    train = [training_s(t.metrics) for t in result.trials]
    prepare = [float(t.metrics.get("prepare_s", 0.0)) for t in result.trials]
    spans = sorted((t.metrics["started_at"], t.metrics["finished_at"]) for t in result.trials if "finished_at" in t.metrics)
    d = {
        "trials": n,
        "wall_s": result.wall_s,
        "mean_train_s": statistics.mean(train),
        "mean_prepare_s": statistics.mean(prepare),
        "mean_ray_time_total_s": mean_or_none([t.metrics.get("time_total_s") for t in result.trials]),
        "overhead_per_trial_s": (result.wall_s - sum(train)) / n,
        "overhead_excl_prepare_s": (result.wall_s - sum(train) - sum(prepare)) / n,
        "median_gap_s": statistics.median(b[0] - a[1] for a, b in zip(spans, spans[1:])) if len(spans) > 1 else None,
        "mean_persist_s": mean_or_none([t.metrics.get("persist_s") for t in result.trials]),
    }
    columns = ["trials", "sweep wall s", "mean train s", "mean prepare s", "mean Ray time_total_s", "overhead / trial s"]
    columns += ["overhead excl. prepare s", "median gap between trials s", "mean persist s (in train s)"]
    row = [n, *("n/a" if v is None else f"{v:.2f}" for k, v in d.items() if k != "trials")]
    share = (
        f"overhead as % of a {TRIAL_S:.0f} s trial = {100 * d['overhead_per_trial_s'] / TRIAL_S:.1f}% "
        f"(goal < 5%, i.e. < 3 s per trial); excluding prepare {100 * d['overhead_excl_prepare_s'] / TRIAL_S:.1f}%"
    )
    if d["mean_persist_s"] is not None:  # copying run/ and the checkpoint to the storage at every evaluation
        share += f"; keeping each trial in the storage (inside train s) = {100 * d['mean_persist_s'] / d['mean_train_s']:.1f}% of its training"
    title = "### (b) the system's own overhead per trial (FIFO, one trial at a time)"
    return f"{title}\n\n{md_table(columns, [row])}\n\n{share}", {**d, "train_s": train, "prepare_s": prepare}


def scheduler_report(results: dict[str, SweepResult]) -> tuple[str, dict]:
    """Table (c): compute, wall time and best score of each scheduler, and ASHA / FIFO."""
    data, rows = {}, []
    for name, r in results.items():
        scores = [t.score for t in r.trials if t.outcome == "complete" and t.score is not None]
        d = {o: r.count(o) for o in ("complete", "pruned", "failed")}
        d.update(steps=sum(t.step or 0 for t in r.trials), train_s=sum(training_s(t.metrics) for t in r.trials), wall_s=r.wall_s)
        d["best_final_score"] = max(scores) if scores else None
        data[name] = d
        best = "n/a" if d["best_final_score"] is None else f"{d['best_final_score']:.4f}"
        rows.append(
            [name, d["complete"], d["pruned"], d["failed"], d["steps"], f"{d['train_s']:.1f}", f"{d['wall_s']:.1f}", best]
        )
    columns = ["scheduler", "complete", "pruned", "failed", "optimiser steps", "training s", "wall s", "best final score"]
    a, f = data["asha"], data["fifo"]
    ratios = (
        f"ASHA / FIFO: compute (steps) = {a['steps'] / max(f['steps'], 1):.2f}, "
        f"training s = {a['train_s'] / max(f['train_s'], 1e-9):.2f}, wall = {a['wall_s'] / f['wall_s']:.2f}"
    )
    title = f"### (c) ASHA vs FIFO, {results['fifo'].requested} samples each, two trials at once"
    return f"{title}\n\n{md_table(columns, rows)}\n\n{ratios}", data


# --------------------------------------------------------------------------- main


def header(args: argparse.Namespace, size: Size, loads: tuple[float, float]) -> str:
    """Date, versions, device, the exact command, the sizes and the machine's load."""
    import transformers

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return "\n".join(
        [
            f"## sweep_overhead: {now} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"ray {ray.__version__} | device {device_name(torch.device('cpu'))}",
            "",
            f"- command: `{shlex.join(sys.orig_argv)}`",
            f"- (a) RoBERTa {size.layers} layers x {size.hidden} (random init, seed 0), one thread per Ray task, "
            f"{args.rounds} rounds after one warm-up round",
            f"- (b), (c) {SPEC.name} (tiny random model on tweets); (b) {args.overhead_samples} trials of "
            f"{size.overhead_budget} steps; (c) {args.scheduler_samples} samples of the spec's {load_sweep_spec(SPEC).budget} steps",
            f"- 1-minute load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the end ({os.cpu_count()} cores"
            f"{'; other work shared the machine, times are inflated' if max(loads) > 1.25 * (os.cpu_count() or 1) else ''})",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="smaller model, 2 rounds, 3- and 4-trial sweeps: a quick check")
    parser.add_argument("--rounds", type=int, default=None, help="start-up rounds per path (default 5; 2 with --smoke)")
    parser.add_argument("--overhead-samples", type=int, default=None, help="trials of sweep (b) (default 6; 3 with --smoke)")
    parser.add_argument("--scheduler-samples", type=int, default=None, help="trials per sweep of (c) (default 8; 4 with --smoke)")
    parser.add_argument("--output", type=Path, default=None, help="also write every measured number to this JSON file")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    args.rounds = args.rounds or size.rounds
    args.overhead_samples = args.overhead_samples or size.overhead_samples
    args.scheduler_samples = args.scheduler_samples or size.scheduler_samples
    if min(args.rounds, args.overhead_samples, args.scheduler_samples) < 1:
        parser.error("--rounds and the sample counts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure (a), (b) and (c), print the report and write --output."""
    args = parse_args(argv)
    size = SMOKE if args.smoke else FULL
    load_start = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="sweep_overhead-") as tmp:
            root = Path(tmp)
            log("(a) trial start-up ...")
            startup = measure_startup(size, args.rounds, root)
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri(root)).search_experiments()  # creates the SQLite store before the timed sweeps
            fifo1 = ["search.scheduler=fifo", "search.max_concurrent_trials=1", f"search.num_samples={args.overhead_samples}"]
            overhead = sweep(root, "bench-overhead", [*fifo1, f"search.max_budget={size.overhead_budget}"])
            both = ["search.max_concurrent_trials=2", f"search.num_samples={args.scheduler_samples}"]
            schedulers = {s: sweep(root, f"bench-{s}", [f"search.scheduler={s}", *both]) for s in ("asha", "fifo")}
    finally:
        ray.shutdown()
    overhead_md, overhead_data = overhead_report(overhead)
    scheduler_md, scheduler_data = scheduler_report(schedulers)
    parts = [header(args, size, (load_start, os.getloadavg()[0])), startup_report(startup, size), overhead_md, scheduler_md]
    emit("\n\n".join(parts), None)
    if args.output:
        data = dict(size=asdict(size), args=vars(args) | {"output": str(args.output)}, startup=startup)
        data.update(overhead=overhead_data, schedulers=scheduler_data)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
