"""``craft-search``: the command line. Thin: it parses, calls library functions and prints."""

from __future__ import annotations

import argparse
import json
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
    return parser


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
    try:
        return args.func(args)
    except ValueError as err:
        print(f"craft-search: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
