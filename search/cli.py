"""``craft-search``: the command line. Thin: it parses, calls library functions and prints."""

from __future__ import annotations

import argparse
import json
import logging
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
    t.set_defaults(func=_train)
    return parser


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
    from craft.runconfig import load_run_config
    from spaces import DEMO_TRAIN, preset_path

    from .runner import train_tracked

    run = load_run_config(args.config or preset_path(DEMO_TRAIN), _train_overrides(args))
    tracked = train_tracked(run, resume=args.resume, progress=args.progress)
    print(format_job(tracked))
    return 0


def format_job(tracked) -> str:
    """The end-of-run report: scores, sizes, where the results are."""
    job = tracked.job
    final = job.train.final
    lines = [
        f"{job.run.method} on {job.spec.name}: {job.train.steps} steps"
        + (f", stopped early ({job.train.stop_reason})" if job.train.stopped_early else ""),
        f"adapter parameters {job.adapter_parameters:,} (head {job.head_parameters:,} apart)",
    ]
    for split in (*job.spec.eval_splits, "test"):
        source = job.test_metrics if split == "test" else final.metrics
        values = {k.split("/", 1)[1]: v for k, v in source.items() if k.startswith(split + "/") and not k.endswith("/loss")}
        if values:
            lines.append(f"  {split:<24}" + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    lines.append(f"adapter: {job.adapter_dir}")
    if job.merged_dir:
        lines.append(f"merged model: {job.merged_dir}")
    if tracked.run_id:
        lines.append(f"MLflow: run {tracked.run_id} in experiment {job.run.tracking.experiment!r} at {tracked.tracking_uri}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from craft.hub import load_model, resolve_model
    from craft.inspection import format_report, inspect_model

    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    report = inspect_model(model, args.targets, args.ranks)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        source = resolve_model(args.model)
        print(format_report(report, f"demo = {source}" if source != args.model else source))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input prints one line on stderr and returns exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per result, not a bar per weight file
    hf_logging.set_verbosity_error()  # e.g. "newly initialized classifier": expected, the head is trained
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables"
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


if __name__ == "__main__":
    sys.exit(main())
