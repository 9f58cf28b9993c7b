"""``craft-search``: the command line. Thin: it parses, calls library functions and prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _ranks(text: str) -> list[tuple[int, int, int]]:
    triples = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{item!r} is not LAYERS/OUT/IN ranks, e.g. 6/64/64")
        triples.append(tuple(int(p) for p in parts))
    return triples


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="craft-search", description="Search CRAFT fine-tuning configurations.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a model's target stacks, their energy per rank and adapter sizes")
    p.add_argument("model", nargs="?", default="demo", help="local path, hub id, or 'demo' (the packaged MiniLM; default)")
    p.add_argument("--targets", nargs="+", metavar="NAME", help="target module suffixes (default: detected query/value)")
    p.add_argument("--ranks", type=_ranks, help="candidate ranks to price, e.g. 6/64/64,3/32/32")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    p.set_defaults(func=_inspect)

    t = sub.add_parser("train", help="fine-tune one config (default: the offline demo) and track it in MLflow")
    t.add_argument("config", nargs="?", default=None, help="run config YAML (default: the packaged demo, spaces/train-demo.yaml)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 --set craft.rank_out=32 (repeatable)")  # fmt: skip
    t.add_argument("--model", help="model path, hub id or 'demo' (sets model)")
    t.add_argument("--task", help="task (sets task): glue/<name>, tweets, csv:PATH, json:PATH, parquet:PATH")
    t.add_argument("--method", help="craft, lora, pissa, vera or head (sets method)")
    t.add_argument("--output-dir", help="where the adapter, checkpoint and metrics go (sets output_dir)")
    t.add_argument("--max-steps", type=int, help="optimiser steps (sets train.max_steps)")
    t.add_argument("--seed", type=int, help="seed of data order, head and adapter init (sets train.seed)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (sets tracking.uri; default: ./mlflow.db)")
    t.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (sets tracking.enabled=false)")
    t.add_argument("--save-merged", action="store_true", help="also save the merged model (sets save_merged)")
    t.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    t.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)"
    )
    t.add_argument("--workers", type=int, default=1,
                   help="train data-parallel on N Ray Train workers (gloo on CPUs, nccl on GPUs; default 1: this process)")  # fmt: skip
    t.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) of each worker (default 1)")
    t.add_argument("--address", help="Ray cluster for --workers (default: a new local one)")
    t.set_defaults(func=_train)

    w = sub.add_parser("sweep", help="search CRAFT (and baseline) configs on Ray Tune with Optuna and MO-ASHA, tracked in MLflow")
    w.add_argument("spec", help="sweep spec YAML, a shipped preset (smoke, demo, glue-roberta-base), or with --resume a sweep's name in --storage")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set search.max_concurrent_trials=4 (repeatable)")  # fmt: skip
    w.add_argument(
        "--address",
        help="Ray cluster to run on (HOST:PORT or ray://HOST:PORT; default: the one ray start ran on this machine, else a new local one)",
    )
    w.add_argument("--num-samples", type=int, help="trials in all (sets search.num_samples)")
    w.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, else ./mlflow.db)")
    w.add_argument("--storage", help="where Ray Tune keeps the sweep (local path, s3://, gs://; default: ./runs/sweeps)")
    w.add_argument("--name", help="the sweep's name (default: the spec's name, else the file's stem)")
    w.add_argument("--cache-dir", help="on-disk HOSVD factor cache (default: ~/.cache/craft-search/factors)")
    w.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name in --storage")
    w.add_argument(
        "--smoke-test", action="store_true", help="a few short trials on little data: checks a spec end to end in minutes"
    )
    w.add_argument("--top", type=int, default=5, help="best trials shown at the end (default 5)")
    w.set_defaults(func=_sweep)

    c = sub.add_parser("cluster", help="a multi-node Ray cluster and an MLflow server on this machine (up, down, status)")
    c.add_argument("action", choices=["up", "down", "status"])
    c.add_argument("--local", action="store_true", help="on 127.0.0.1 (the only kind this command starts; cloud: cluster/*.yaml)")
    c.add_argument("--workers", type=int, default=2, help="worker nodes, each a separate ray start process (default 2)")
    c.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs of each worker node (default 1)")
    c.add_argument("--head-cpus", type=float, default=0.0, help="CPUs the head offers to trials (default 0: it coordinates)")
    c.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow tracking server")
    c.add_argument(
        "--state-dir", default="runs/cluster", help="where cluster.json, the logs and the MLflow store go (default runs/cluster)"
    )
    c.set_defaults(func=_cluster)

    f = sub.add_parser(
        "pareto", help="a sweep's Pareto front (score vs adapter parameters): table, hypervolume, PNG and HTML plots"
    )
    _sweep_source_args(f)
    f.add_argument("--out", help="where the plots go (default: the sweep's results directory, else ./pareto-NAME)")
    f.add_argument("--time", action="store_true", help="training time (s) as a third objective of the front")
    f.add_argument(
        "--reference",
        help="hypervolume reference point SCORE,PARAMS[,SECONDS] (default: 0, twice the largest adapter[, twice the longest training])",
    )
    f.add_argument("--no-log", action="store_true", help="do not log the plots to the sweep's MLflow parent run")
    f.add_argument("--json", action="store_true", help="print the front as JSON")
    f.set_defaults(func=_pareto)

    e = sub.add_parser("export", help="write a train config per chosen trial of a sweep, for production training")
    _sweep_source_args(e)
    e.add_argument("--pick", default="best", help="best, pareto, or budget:N (the best trials with at most N adapter parameters)")
    e.add_argument("--top", type=int, help="at most K trials (default: 1 for best and budget, the whole front for pareto)")
    e.add_argument("--out", required=True, help="directory for the configs (one YAML per trial)")
    e.add_argument(
        "--max-steps",
        type=int,
        help="production training length in optimiser steps (default: the spec's export block, else the trial budget)",
    )
    e.add_argument("--epochs", type=float, help="production training length in epochs (instead of --max-steps)")
    e.add_argument(
        "--output-root",
        default="runs/production",
        help="each config trains into OUTPUT_ROOT/<sweep>-<trial> (default runs/production)",
    )
    e.set_defaults(func=_export)
    return parser


def _sweep_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep's results directory, its name (in --storage), or its MLflow parent run as runs:/RUN_ID")
    p.add_argument("--storage", help="where sweeps are kept, for a name (default ./runs/sweeps)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/RUN_ID (default ./mlflow.db)")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "model": args.model,
        "task": args.task,
        "method": args.method,
        "output_dir": args.output_dir,
        "train.max_steps": args.max_steps,
        "train.seed": args.seed,
        "tracking.uri": args.tracking_uri,
    }
    extra = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if args.no_tracking:
        extra.append("tracking.enabled=false")
    if args.save_merged:
        extra.append("save_merged=true")
    return list(args.overrides) + extra


def _train(args: argparse.Namespace) -> int:
    from craft.harness.runconfig import load_run_config
    from spaces import DEMO_TRAIN, preset_path

    from .runner import train_tracked

    run = load_run_config(args.config or preset_path(DEMO_TRAIN), _train_overrides(args))
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1:
        from .production import train_distributed

        job = train_distributed(run, args.workers, address=args.address, cpus_per_worker=args.cpus_per_worker, resume=args.resume)
        print(format_job(job.summary, run.tracking.experiment, job.tracking_uri, job.run_id))
        print(f"data-parallel: {job.workers} workers ({job.backend})")
        return 0
    tracked = train_tracked(run, resume=args.resume, progress=args.progress)
    print(format_job(tracked.job.summary(), run.tracking.experiment, tracked.tracking_uri, tracked.run_id))
    return 0


def format_job(summary: dict, experiment: str, tracking_uri: str | None, run_id: str | None) -> str:
    """The end-of-run report from a job's summary (``metrics.json``): scores, sizes, where the results are."""
    stopped = summary.get("stopped_early")
    lines = [
        f"{summary['method']} on {summary['task']}: {summary['steps']} steps" + (", stopped early" if stopped else ""),
        f"adapter parameters {summary['adapter_parameters']:,} (head {summary['head_parameters']:,} apart)",
    ]
    final = summary.get("final") or {}
    splits = list(dict.fromkeys(k.split("/", 1)[0] for k in final if "/" in k))
    for split in (*splits, "test"):
        source = summary.get("test") or {} if split == "test" else final
        values = {k.split("/", 1)[1]: v for k, v in source.items() if k.startswith(split + "/") and not k.endswith("/loss")}
        if values:
            lines.append(f"  {split:<24}" + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    lines.append(f"adapter: {summary['adapter_dir']}")
    if summary.get("merged_dir"):
        lines.append(f"merged model: {summary['merged_dir']}")
    if run_id:
        lines.append(f"MLflow: run {run_id} in experiment {experiment!r} at {tracking_uri}")
    return "\n".join(lines)


SMOKE_OVERRIDES = [
    "data.max_train_samples=256",
    "data.max_eval_samples=128",
    "train.eval_every=4",
    "search.max_budget=12",
    "search.grace_period=4",
]


def _sweep_spec(args: argparse.Namespace):
    from pathlib import Path

    from spaces import preset_path

    from .spec import load_sweep_spec

    path = Path(args.spec)
    if not path.is_file() and path.suffix == "" and path.parent == Path("."):
        try:
            path = preset_path(f"{args.spec}.yaml")  # a preset name
        except ValueError:
            if not args.resume:
                raise
            from .sweep import stored_spec

            return stored_spec(args.name or args.spec, args.storage)  # resuming by name: the spec it started with
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"search.num_samples={args.num_samples}")
    if args.smoke_test:
        overrides += SMOKE_OVERRIDES + ["train.max_steps=null"]
    spec = load_sweep_spec(path, overrides, name=args.name)
    if args.smoke_test:
        spec.search.num_samples = min(spec.search.num_samples, 4)
        if args.name is None:
            spec.name += "-smoke"  # never mixes with the real sweep's results
    return spec


def _sweep(args: argparse.Namespace) -> int:
    import optuna

    from .sweep import run_sweep, stored_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created"

    spec = _sweep_spec(args)
    shown = spec
    if args.resume:  # what runs is the spec the sweep started with
        with contextlib.suppress(ValueError):  # no such sweep: run_sweep says so
            shown = stored_spec(spec.name, args.storage)
    print(f"sweep {shown.name}: {shown.search.num_samples} trials of {shown.budget} steps, "
          f"{shown.search.max_concurrent_trials} at a time, methods {', '.join(shown.methods)}", flush=True)  # fmt: skip
    result = run_sweep(
        spec,
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        resume=args.resume,
        cache_dir=args.cache_dir,
    )
    print(format_sweep(result, args.top))
    return 0 if result.count("complete") else 1


def format_sweep(result, top: int = 5) -> str:
    """The end-of-sweep report: best trials, counts, where the results are."""
    from .layout import STUDY_FILE, SUMMARY_FILE
    from .space import describe_config

    lines = ["", f"best trials of {result.name} (final validation score; adapter parameters exclude the head):"]
    best = result.best(top)
    if best:
        lines.append(f"  {'#':>2}  {'trial':<10} {'score':>7} {'params':>10}  config")
        for i, t in enumerate(best, 1):
            lines.append(
                f"  {i:>2}  {t.trial_id:<10} {t.score:>7.4f} {t.adapter_parameters or 0:>10,}  {describe_config(t.config)}"
            )
    else:
        lines.append("  none completed its budget")
    counts = ", ".join(
        f"{result.count(o)} {o}" for o in ("complete", "pruned", "failed", "unfinished") if o != "unfinished" or result.count(o)
    )
    lines.append(f"trials: {len(result.trials)} of {result.requested} ({counts}) in {result.wall_s:.0f} s")
    lines.append(f"HOSVD decompositions: {result.cache['decompositions']} (factors read from disk: {result.cache['disk_loads']})")
    lines.append(f"results: {result.path} ({SUMMARY_FILE}, {STUDY_FILE}, each trial's run/)")
    if result.pareto:
        front = result.pareto["front"]
        lines.append(
            f"Pareto front: {len(front)} trial(s) ({', '.join(front) or 'none yet'}); hypervolume {result.pareto['hypervolume']['all']:.4f}"
        )
        lines.append(f"plots: {result.pareto['png']} and {result.pareto['html']} (also in the MLflow parent run)")
    lines.append(f"MLflow: parent run {result.parent_run_id} in experiment {result.experiment!r} at {result.tracking_uri}")
    if len(result.trials) < result.requested or result.count("unfinished"):
        lines.append("interrupted: run the same command with --resume to finish it")
    return "\n".join(lines)


def _pareto(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .results.pareto import load_sweep, parse_reference
    from .results.report import report_front

    table = load_sweep(args.sweep, storage=args.storage, tracking_uri=args.tracking_uri)
    objectives = ("score", "params", "time") if args.time else ("score", "params")
    reference = parse_reference(args.reference, objectives) if args.reference else None
    report = report_front(
        table, Path(args.out) if args.out else None, objectives=objectives, reference=reference, log=not args.no_log
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.format())
    return 0 if report.front else 1


def _export(args: argparse.Namespace) -> int:
    from .results.export import export_configs, parse_pick
    from .results.pareto import load_sweep

    pick = parse_pick(args.pick)  # before reading anything
    table = load_sweep(args.sweep, storage=args.storage, tracking_uri=args.tracking_uri)
    exported = export_configs(table, pick, args.out, top=args.top, max_steps=args.max_steps, epochs=args.epochs,
                              output_root=args.output_root)  # fmt: skip
    train = exported[0].run.train
    length = f"{train.max_steps} steps" if train.max_steps is not None else f"{train.epochs:g} epochs"
    print(f"exported {len(exported)} config(s) of sweep {table.name} (--pick {pick}), each training {length}:")
    for item in exported:
        t = item.trial
        print(f"  {item.path}  trial {t.trial_id} {t.method} score {t.score:.4f} {t.adapter_parameters:,} params")
    print(f"train one with: craft-search train {exported[0].path} [--workers N]")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from cluster.local import down, read_state, up

    if args.action == "up":
        if not args.local:
            raise ValueError(
                "craft-search cluster up starts local clusters only (--local); for AWS or GCP run "
                "ray up cluster/aws.yaml or cluster/gcp.yaml, on Kubernetes apply cluster/kuberay/*.yaml"
            )
        cluster = up(args.workers, worker_cpus=args.worker_cpus, head_cpus=args.head_cpus,
                     state_dir=args.state_dir, mlflow=not args.no_mlflow)  # fmt: skip
        print(format_cluster(cluster))
        print(f"sweep on it:  craft-search sweep SPEC --address {cluster.ray_address}"
              + (f" --tracking-uri {cluster.mlflow_uri}" if cluster.mlflow_uri else ""))  # fmt: skip
        print(f"stop it:      craft-search cluster down --state-dir {args.state_dir}")
        return 0
    if args.action == "down":
        cluster, stopped = down(args.state_dir)
        own = len({p.pid for p in cluster.processes} & set(stopped))
        print(f"stopped the cluster at {cluster.ray_address}: {own} processes started by up "
              f"and {len(stopped) - own} below them (pids {', '.join(map(str, stopped))})")  # fmt: skip
        return 0
    cluster = read_state(args.state_dir)
    if cluster is None:
        print(f"no cluster recorded in {args.state_dir}")
        return 1
    print(format_cluster(cluster))
    return 0 if len(cluster.running()) == len(cluster.processes) else 1


def format_cluster(cluster) -> str:
    """Addresses and processes of a local cluster, each process running or not."""
    running = cluster.running()
    lines = [f"Ray:    {cluster.ray_address}", f"MLflow: {cluster.mlflow_uri or '(not started)'}", "processes:"]
    for p in cluster.processes:
        node = cluster.nodes.get(p.role, "")
        state = "running" if p in running else "gone"
        lines.append(f"  {p.role:<10} pid {p.pid:<8} {state:<8} {('node ' + node[:12]) if node else ''}  log {p.log}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from craft.harness.hub import DEMO_MODEL, load_model, resolve_model
    from craft.inspection import format_report, inspect_model

    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    report = inspect_model(model, args.targets, args.ranks)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        source = resolve_model(args.model)
        print(format_report(report, f"{args.model} = {source}" if args.model == DEMO_MODEL else args.model))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input prints one line on stderr and returns exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per result, not a bar per weight file
    hf_logging.set_verbosity_error()  # e.g. "newly initialized classifier": expected, the head is trained
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per downloaded sweep.json
    if args.command in ("train", "sweep", "pareto", "export"):
        import mlflow  # noqa: F401  (it sets its loggers' levels on import: quiet them after)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables"
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # our own lines report the trials
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # resume: trials with no result yet
    import datasets

    datasets.disable_progress_bars()  # reading and tokenising data: a bar per split is noise
    try:
        return args.func(args)
    except ValueError as err:
        print(f"craft-search: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"craft-search: training diverged: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from .tracking.queue import TrackingUnavailable

        if not isinstance(err, TrackingUnavailable):
            raise
        print(f"craft-search: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
