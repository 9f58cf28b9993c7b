"""Replay a finished sweep's first rung through Ray's ASHA and through MO-ASHA, side by side.

Reads every trial's report at the rung step from the sweep's results directory (Ray Tune's
``result.json`` per trial), orders them by their wall-clock time (``reported_at``), feeds them to
both schedulers one at a time as Ray Tune's loop would, and prints each one's decision beside
what the trial actually did. A counterfactual at the rung only: under the other scheduler the
sampler would have seen other results afterwards.

    python benchmarks/replay_rung.py runs/sweeps/demo --rung 30 --max-t 90 --reduction-factor 3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

from search.names import ADAPTER_PARAMETERS, FINAL_SCORE, REPORTED_AT, SCORE, STEP
from search.schedulers import MOASHAScheduler


@dataclass(frozen=True)
class _Trial:  # what a scheduler reads of a trial
    trial_id: str


def rung_reports(sweep_dir: Path, rung: int) -> list[dict]:
    """Each trial's report at ``rung`` in wall-clock order, with whether the trial completed."""
    reports = []
    for result_file in sweep_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines()]
        at = [r for r in rows if r.get(STEP) == rung]
        if at:
            reports.append({**at[0], "completed": FINAL_SCORE in rows[-1], "method": rows[0]["config"].get("method", "")})
    return sorted(reports, key=lambda r: r.get(REPORTED_AT, 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's results directory (STORAGE/NAME)")
    parser.add_argument("--rung", type=int, required=True, help="the first rung: search.grace_period")
    parser.add_argument("--max-t", type=int, required=True, help="search.max_budget")
    parser.add_argument("--reduction-factor", type=int, required=True, help="search.reduction_factor")
    args = parser.parse_args()
    shape = {"time_attr": STEP, "metric": SCORE, "max_t": args.max_t, "grace_period": args.rung, "reduction_factor": args.reduction_factor}
    asha = ASHAScheduler(mode="max", **shape)
    moasha = MOASHAScheduler(size_attr=ADAPTER_PARAMETERS, **shape)
    print(f"| trial | method | adapter params | score at step {args.rung} | ASHA | MO-ASHA | the trial |")
    print("| --- | --- | ---: | ---: | --- | --- | --- |")
    for report in rung_reports(args.sweep_dir, args.rung):
        trial = _Trial(report["trial_id"])
        asha.on_trial_add(None, trial)
        result = {STEP: args.rung, SCORE: report[SCORE], ADAPTER_PARAMETERS: report[ADAPTER_PARAMETERS]}
        decisions = [s.on_trial_result(None, trial, result).lower() for s in (asha, moasha)]
        done = "completed" if report["completed"] else "stopped"
        print(f"| {trial.trial_id} | {report['method']} | {report[ADAPTER_PARAMETERS]:,} | {report[SCORE]:.4f} | "
              f"{decisions[0]} | {decisions[1]} | {done} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
