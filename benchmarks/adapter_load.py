"""Loading a CRAFT adapter with its stored factors against recomputing the HOSVD, side by side.

``CraftModel.save_pretrained`` stores the HOSVD factors at the trained ranks beside the J matrices
(``craft_factors.safetensors``); ``save_pretrained(..., save_factors=False)`` leaves them out and
loading decomposes the base weights again. This script saves one adapter both ways, then loads
each onto a fresh base model ``--rounds`` times in alternating order and reports the best and
median seconds of ``CraftModel.from_pretrained``, the files' sizes and the ratios, and checks that
both loads give the same logits. The model is the packaged demo MiniLM (6 layers, 384 wide) at
the demo's ranks by default; ``--model`` takes a local path or hub id, ``--ranks L O I`` others.

Run ``python benchmarks/adapter_load.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import emit, log  # benchmarks/common.py, beside this script

import craft
from craft.harness.hub import load_model


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--ranks", type=int, nargs=3, default=(6, 64, 64), metavar=("L", "O", "I"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, help="append the report to this file (e.g. benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    def base() -> torch.nn.Module:
        return load_model(args.model, num_labels=3).eval()

    inputs = {"input_ids": torch.randint(1000, 2000, (4, 32), generator=torch.Generator().manual_seed(0))}
    model = craft.get_craft_model(base(), craft.CraftConfig(*args.ranks, init_scale=0.1))  # J away from I
    with torch.no_grad():
        expected = model(**inputs).logits
    seconds: dict[str, list[float]] = {"stored factors": [], "HOSVD on load": []}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"stored factors": Path(tmp) / "with", "HOSVD on load": Path(tmp) / "without"}
        model.save_pretrained(dirs["stored factors"])
        model.save_pretrained(dirs["HOSVD on load"], save_factors=False)
        sizes = {kind: _size(path) for kind, path in dirs.items()}
        for round_ in range(args.rounds):
            for kind in (list(dirs) if round_ % 2 == 0 else list(dirs)[::-1]):
                fresh = base()
                start = time.perf_counter()
                loaded = craft.CraftModel.from_pretrained(fresh, dirs[kind])
                seconds[kind].append(time.perf_counter() - start)
                with torch.no_grad():
                    diff = float((loaded(**inputs).logits - expected).abs().max())
                assert diff <= 1e-4, f"{kind}: logits differ from the saved model's by {diff}"
                log(f"round {round_}: {kind} {seconds[kind][-1]:.3f} s (logits within {diff:.1e})")
    best = {k: min(v) for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"## adapter_load: {when} | torch {torch.__version__} | {os.cpu_count()} CPUs | model {args.model} | ranks {tuple(args.ranks)}",
        "",
        f"`python benchmarks/adapter_load.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        "| load | best s | median s | adapter directory |",
        "| --- | --- | --- | --- |",
    ]
    for kind in seconds:
        lines.append(f"| {kind} | {best[kind]:.3f} | {median[kind]:.3f} | {sizes[kind] / 1e6:.2f} MB |")
    ratio = median["HOSVD on load"] / median["stored factors"]
    lines += ["", f"HOSVD on load / stored factors: x{ratio:.1f} the time (median), "
              f"x{sizes['stored factors'] / sizes['HOSVD on load']:.1f} the bytes on disk."]
    emit("\n".join(lines), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
