"""Trials per minute on one worker node against two (one CPU each), on a real local multi-node cluster.

For each node count, ``cluster.local.up`` starts a head that only coordinates (0 CPUs) and N
worker nodes of 1 CPU, every one a separate ``ray start`` process; the same CPU-bound sweep (the
smoke spec, FIFO, every trial its full budget, N trials at once) runs through the real CLI driver
joined with ``--address``; then ``down`` stops the cluster. Throughput is trials / minutes from the
first trial's start to the last trial's end (read from ``summary.json``), so cluster start-up and
the driver's model loading are outside it; the sweep's wall time is reported beside it.
Goal: two nodes at least 1.7 times the trials per minute of one.

Run ``python benchmarks/cluster_scaling.py`` on a quiet machine with at least 2 cores
(``--trials``, ``--budget`` to change the sweep; ``--output FILE`` also writes JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import emit, log  # benchmarks/common.py, beside this script

from cluster.local import down, up


def _sweep(nodes: int, trials: int, budget: int, root: Path) -> dict:
    state = root / f"cluster-{nodes}"
    cluster = up(nodes, worker_cpus=1, head_cpus=0, state_dir=state, mlflow=False)
    try:
        name = f"scaling-{nodes}"
        sets = [f"search.num_samples={trials}", "search.scheduler=fifo", f"search.max_concurrent_trials={nodes}",
                f"search.max_budget={budget}", f"train.eval_every={budget // 4}", "data.max_train_samples=2048",
                "search.points_to_evaluate=null", "method=craft"]  # fmt: skip
        command = [sys.executable, "-m", "search.cli", "sweep", "smoke", "--name", name, "--address", cluster.ray_address,
                   "--storage", str(root / "sweeps"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
                   "--cache-dir", str(root / "factors"), *[a for s in sets for a in ("--set", s)]]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        summary = json.loads((root / "sweeps" / name / "summary.json").read_text())
    finally:
        down(state)
    rows = summary["trials"]
    first = min(t["metrics"]["started_at"] for t in rows)
    last = max(t["metrics"]["finished_at"] for t in rows)
    return {
        "nodes": nodes,
        "trials": len(rows),
        "complete": summary["counts"]["complete"],
        "span_s": last - first,
        "trials_per_min": len(rows) / ((last - first) / 60),
        "sweep_wall_s": wall,
        "mean_train_s": sum(t["metrics"]["train_s"] for t in rows) / len(rows),
        "node_ids": sorted({t["node_id"] for t in rows}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--budget", type=int, default=768, help="optimiser steps per trial (default 768: ~13 s trials)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for nodes in (1, 2):
            log(f"sweep on {nodes} worker node(s)")
            results[nodes] = _sweep(nodes, args.trials, args.budget, Path(tmp))
            log(f"  {results[nodes]}")
    ratio = results[2]["trials_per_min"] / results[1]["trials_per_min"]
    lines = [
        f"# cluster scaling, {datetime.date.today()}, `{shlex.join(['python', *sys.argv])}`",
        "",
        f"smoke spec, CRAFT only, FIFO, {args.trials} trials of {args.budget} steps, 1 CPU (1 torch thread) per trial;",
        f"{os.cpu_count()} cores on this machine; head with 0 CPUs, worker nodes of 1 CPU each",
        "",
        "| worker nodes | trials | span of the trials (s) | trials / min | mean trial training (s) | sweep wall (s) | nodes used |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, r in results.items():
        lines.append(f"| {n} | {r['trials']} | {r['span_s']:.1f} | {r['trials_per_min']:.2f} | {r['mean_train_s']:.1f} | "
                     f"{r['sweep_wall_s']:.0f} | {len(r['node_ids'])} |")  # fmt: skip
    lines += ["", f"**two nodes / one node: {ratio:.2f}x trials per minute** (goal >= 1.7)"]
    emit("\n".join(lines), args.output)
    if args.output:
        args.output.with_suffix(".json").write_text(json.dumps({"ratio": ratio, "results": results}, indent=2))


if __name__ == "__main__":
    main()
