"""What keeping a sweep in object storage costs, against a local disk, side by side in one run.

The same sweep (``spaces/smoke.yaml``, FIFO, one trial at a time, same seed) runs on a local
storage path and on S3, in alternating order over ``--rounds``. Every trial copies its ``run/``
(config, adapter, metrics) and its training checkpoint to the storage at every evaluation, and
the driver keeps ``sweep.json``, the Optuna study and the summary there; each trial reports the
seconds its copies took (``persist_s``, inside its training time). Reported per storage: the sweep's
wall time, the trials' mean training and copy seconds, the copies' share of training, the
overhead per trial outside training, and S3 / local ratios.

S3 is, by default, a ``moto`` server on 127.0.0.1 (the API, not the network: a real bucket adds
its round trips); ``--s3 s3://BUCKET/PREFIX`` measures a real bucket with the usual ``AWS_*``
settings. Run ``python benchmarks/storage_overhead.py`` on a quiet machine (about 3 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the smoke spec is offline: never reach for the hub

import ray
import torch
from common import device_name, emit, log  # benchmarks/common.py, beside this script

from search.spec import load_sweep_spec
from search.sweep import SweepResult, run_sweep

SPEC = Path(__file__).resolve().parent.parent / "spaces" / "smoke.yaml"
OVERRIDES = ["search.scheduler=fifo", "search.max_concurrent_trials=1", "search.points_to_evaluate=null"]


def start_moto() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points S3 clients at it."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bench")
    return server, "s3://bench/sweeps"


def one_sweep(storage: str, name: str, samples: int, root: Path) -> SweepResult:
    spec = load_sweep_spec(SPEC, [*OVERRIDES, f"search.num_samples={samples}"], name=name)
    result = run_sweep(spec, storage=storage, cache_dir=root / "factors", tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                       progress=False)  # fmt: skip
    log(f"    {name} on {storage}: {len(result.trials)} trials in {result.wall_s:.1f} s")
    return result


def summarise(results: list[SweepResult]) -> dict[str, float]:
    """Means over the sweeps of one storage."""
    trials = [t for r in results for t in r.trials]
    train = statistics.mean(float(t.metrics.get("train_s", t.metrics.get("elapsed_s", 0.0))) for t in trials)
    persist = statistics.mean(float(t.metrics.get("persist_s", 0.0)) for t in trials)
    wall = statistics.mean(r.wall_s for r in results)
    per_trial = statistics.mean((r.wall_s - sum(float(t.metrics.get("train_s", 0.0)) for t in r.trials)) / len(r.trials) for r in results)
    return {"wall_s": wall, "train_s": train, "persist_s": persist, "persist_share": persist / train, "overhead_per_trial_s": per_trial}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6, help="trials per sweep (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="sweeps per storage, alternating (default 2)")
    parser.add_argument("--s3", help="a real bucket prefix (s3://BUCKET/PREFIX) instead of a local moto server")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    server, s3 = (None, args.s3.rstrip("/")) if args.s3 else start_moto()
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # after the S3 settings: workers inherit them
    stamp = started.strftime("%H%M%S")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            runs: dict[str, list[SweepResult]] = {"local": [], "s3": []}
            for r in range(args.rounds):
                order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
                for where in order:
                    storage = str(root / "sweeps") if where == "local" else f"{s3}/{stamp}"
                    runs[where].append(one_sweep(storage, f"bench-{where}-{r}", args.samples, root))
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    stats = {where: summarise(results) for where, results in runs.items()}
    lines = [
        f"#### storage_overhead: {started.isoformat(timespec='seconds')} | torch {torch.__version__} | ray {ray.__version__} | "
        f"device {device_name(torch.device('cpu'))}",
        "",
        f"- command: `{shlex.join(['python', f'benchmarks/{Path(__file__).name}', *sys.argv[1:]])}`",
        f"- smoke.yaml, FIFO, one trial at a time, {args.samples} trials per sweep, {args.rounds} sweeps per storage (alternating)",
        f"- S3: {'a moto server on 127.0.0.1' if server is not None else s3}; 1-minute load average {load:.2f} at the start",
        "",
        "| storage | sweep wall s | mean train s | mean persist s (in train) | persist % of train | overhead / trial s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for where, d in stats.items():
        lines.append(f"| {where} | {d['wall_s']:.2f} | {d['train_s']:.2f} | {d['persist_s']:.3f} | {100 * d['persist_share']:.1f}% | "
                     f"{d['overhead_per_trial_s']:.2f} |")  # fmt: skip
    s3_, local = stats["s3"], stats["local"]
    lines += ["", f"s3 / local: wall {s3_['wall_s'] / local['wall_s']:.2f}, persist {s3_['persist_s'] / max(local['persist_s'], 1e-9):.2f}, "
              f"overhead per trial {s3_['overhead_per_trial_s'] / local['overhead_per_trial_s']:.2f}"]  # fmt: skip
    emit("\n".join(lines), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
