"""Test accuracy per adapter parameter on the offline demo: CRAFT against LoRA, PiSSA, VeRA and the head alone.

Every variant fine-tunes the packaged pre-trained MiniLM (BERT, 6 layers, 384 wide) on the
packaged tweets-sentiment corpus (3 classes) through the project's own path: a
:class:`~craft.harness.runconfig.RunConfig` built from ``spaces/train-demo.yaml`` with dotted overrides,
trained by :func:`craft.harness.job.run_job`. Only the method, its block and the adapter learning rate
differ between variants; the data, the budget, the seed and the head learning rate are the same
for all:

* data: the demo's seeded subset of 4,000 training tweets, evaluated on the FULL validation and
  test splits (3,816 each; ``data.max_eval_samples`` null);
* 1 epoch, batch 32, max_length 64, warm-up then linear decay (the trainer's defaults), seed 0;
* a single evaluation, at the end (``train.eval_every`` above the number of steps); tracking off.

Variants (adapter learning rates from common practice for each method, not tuned here):

* ``craft-16``, ``craft-64``, ``craft-128``: CRAFT ranks 6/16/16, 6/64/64, 6/128/128
  (rank_layers/rank_out/rank_in), init_scale 0, lr 5e-3;
* ``lora``: LoRA r=8, alpha 16, dropout 0, lr 1e-3;
* ``pissa``: PiSSA r=8, alpha 8, lr 5e-4;
* ``vera``: VeRA r=256 (peft's default), lr 1e-2;
* ``head``: the classification head alone.

The head (head_lr 5e-3) trains in every variant and is counted apart; adapter parameters are
``JobResult.adapter_parameters`` as counted by :mod:`craft.harness.methods`. Wall time is that of the
whole ``run_job`` call (model load, adapter build, training, the final validation pass, the test
pass, saving); the packaged corpus and tokenizer are loaded once beforehand, so the first
variant does not pay for that.

Run ``python benchmarks/demo_accuracy.py`` on a quiet machine (about 18 minutes on 2 CPU cores:
2.5 to 3 minutes per variant); ``--smoke`` checks the whole path in about half a minute (64
training and 64 evaluation examples, 2 steps per variant).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is offline: never reach for the hub

import torch
from common import device_name, emit, log  # benchmarks/common.py, beside this script

from craft.harness.hub import load_tokenizer
from craft.harness.job import JobResult, run_job
from craft.harness.runconfig import RunConfig, load_run_config
from craft.harness.tasks import load_task
from craft.harness.trainer import resolve_device, total_steps

CONFIG = Path(__file__).resolve().parent.parent / "spaces" / "train-demo.yaml"
HEAD_LR = 5e-3
NEVER = 1_000_000  # train.eval_every: far above any step count here, so the only evaluation is the final one


@dataclass(frozen=True)
class Variant:
    """One method setting: its label in the report and its overrides of the demo config."""

    key: str
    label: str
    lr: float
    overrides: tuple[str, ...]

    @property
    def method(self) -> str:
        return next(o.partition("=")[2] for o in self.overrides if o.startswith("method="))


def _craft(ranks: tuple[int, int, int]) -> Variant:
    layers, out, inp = ranks
    return Variant(
        f"craft-{out}",
        f"CRAFT {layers}/{out}/{inp}",
        5e-3,
        (
            "method=craft",
            f"craft.rank_layers={layers}",
            f"craft.rank_out={out}",
            f"craft.rank_in={inp}",
            "craft.init_scale=0.0",
        ),
    )


VARIANTS = {
    v.key: v
    for v in (
        _craft((6, 16, 16)),
        _craft((6, 64, 64)),
        _craft((6, 128, 128)),
        Variant("lora", "LoRA r=8", 1e-3, ("method=lora", "craft=null", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0")),
        Variant("pissa", "PiSSA r=8", 5e-4, ("method=pissa", "craft=null", "pissa.r=8", "pissa.alpha=8")),
        Variant("vera", "VeRA r=256", 1e-2, ("method=vera", "craft=null", "vera.r=256")),
        Variant("head", "head only", HEAD_LR, ("method=head", "craft=null")),
    )
}


@dataclass
class Outcome:
    """What one variant measured."""

    variant: Variant
    job: JobResult
    wall_s: float

    @property
    def validation_accuracy(self) -> float:
        return self.job.train.final.metrics["validation/accuracy"]

    @property
    def test_accuracy(self) -> float:
        return self.job.test_metrics["test/accuracy"]


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every variant shares: data, budget, seed, head lr, one final evaluation, no tracking."""
    common = [
        f"train.seed={args.seed}",
        f"train.head_lr={HEAD_LR}",
        "train.epochs=1",
        "train.batch_size=32",
        "train.max_length=64",
        f"train.eval_every={NEVER}",
        "tracking.enabled=false",
    ]
    if args.smoke:
        return [*common, "data.max_train_samples=64", "data.max_eval_samples=64", "train.max_steps=2"]
    return [*common, "data.max_train_samples=4000", "data.max_eval_samples=null", "train.max_steps=null"]


def build_run(variant: Variant, args: argparse.Namespace, root: Path) -> RunConfig:
    """The variant's RunConfig: the demo config, the shared budget, then the variant's method and lr."""
    overrides = [*budget_overrides(args), *variant.overrides, f"train.lr={variant.lr}", f"output_dir={root / variant.key}"]
    run = load_run_config(CONFIG, overrides=overrides)
    assert run.method == variant.method and run.train.head_lr == HEAD_LR and run.tracking.enabled is False
    return run


def header(args: argparse.Namespace, run: RunConfig, sizes: dict[str, int], steps: int, variants: list[Variant]) -> str:
    """Date, versions, device, threads, the exact command and the budget."""
    import transformers

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t = run.train
    lrs = ", ".join(f"{v.label} {v.lr:g}" for v in variants if v.method != "head")
    eval_note = "full splits" if run.data.max_eval_samples is None else f"seeded subsets of {run.data.max_eval_samples}"
    return "\n".join(
        [
            f"## demo_accuracy: {now} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"device {device_name(resolve_device(t.device))} | threads {torch.get_num_threads()}",
            "",
            f"- command: `{shlex.join(sys.orig_argv)}`",
            f"- model: {run.model} (packaged pre-trained MiniLM, 6 layers x 384), task {run.task} "
            f"(3 classes), config {CONFIG.relative_to(CONFIG.parent.parent)} with overrides",
            f"- data: train {sizes['train']:,} (seeded subset), validation {sizes['validation']:,}, "
            f"test {sizes['test']:,} ({eval_note}); seed {t.seed}",
            f"- budget, identical for every variant: {steps} optimiser steps "
            f"({'max_steps' if t.max_steps else f'{t.epochs:g} epoch'}), batch {t.batch_size}, max_length {t.max_length}, "
            f"AdamW, warm-up {t.warmup_ratio:g} then linear decay, grad clip {t.max_grad_norm}, "
            "one evaluation at the end, tracking off",
            f"- head lr {HEAD_LR:g} for every variant; adapter lr (common practice per method, not tuned): {lrs}",
            "- adapter params: trainable parameters outside the head (craft.harness.methods); head params counted apart",
            "- wall time: the whole run_job call (model load, adapter build, training, validation and test passes, save)",
        ]
    )


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def table(outcomes: list[Outcome]) -> str:
    """The markdown table, one row per variant."""
    lora = next((o for o in outcomes if o.variant.key == "lora"), None)
    rows = [
        "| variant | adapter params | head params | validation accuracy % | test accuracy % | params vs LoRA | wall time s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        vs_lora = f"{o.job.adapter_parameters / lora.job.adapter_parameters:.3f}" if lora else "n/a"
        rows.append(
            f"| {o.variant.label} | {o.job.adapter_parameters:,} | {o.job.head_parameters:,} | "
            f"{_pct(o.validation_accuracy)} | {_pct(o.test_accuracy)} | {vs_lora} | {o.wall_s:.1f} |"
        )
    return "\n".join(rows)


def reading(outcomes: list[Outcome], total_s: float, loads: tuple[float, float]) -> str:
    """Where each CRAFT setting stands against LoRA per parameter, from the measured numbers."""
    by_key = {o.variant.key: o for o in outcomes}
    lora, head = by_key.get("lora"), by_key.get("head")
    lines = []
    for o in outcomes:
        if o.variant.method != "craft" or lora is None:
            continue
        share = 100 * o.job.adapter_parameters / lora.job.adapter_parameters
        delta = 100 * (o.test_accuracy - lora.test_accuracy)
        line = f"{o.variant.label}: {share:.1f}% of LoRA's parameters, test accuracy Δ = {delta:+.2f} points"
        if head is not None and abs(lora.test_accuracy - head.test_accuracy) >= 0.005:  # a gain of half a point at least
            gain = (o.test_accuracy - head.test_accuracy) / (lora.test_accuracy - head.test_accuracy)
            line += f"; {100 * gain:.0f}% of LoRA's gain over the head alone"
        lines.append(line)
    if not lines:
        lines.append("(no CRAFT-against-LoRA comparison: run both a craft variant and lora)")
    cores = os.cpu_count() or 1
    busy = max(loads) > 1.25 * cores  # this run alone keeps the load near the thread count
    lines.append(
        f"total wall time: {total_s:.0f} s (1-minute load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the end, "
        f"{cores} cores{': other work shared the machine, times are inflated' if busy else ''})"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants to run (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data subset, the head, the adapters and the batches")
    parser.add_argument("--smoke", action="store_true", help="64 training and 64 evaluation examples, 2 steps: a quick check")
    parser.add_argument("--output", type=Path, default=None, help="also append the markdown report to this file")
    args = parser.parse_args(argv)
    args.variants = list(dict.fromkeys(args.variants))  # drop repeats, keep order
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every variant in turn, then print the report (and append it to --output)."""
    args = parse_args(argv)
    variants = [VARIANTS[k] for k in args.variants]
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="demo_accuracy-") as tmp:
        root = Path(tmp)
        first = build_run(variants[0], args, root)
        log("loading the corpus and the tokenizer once ...")
        task = load_task(first.task, first.data, seed=first.train.seed)  # parsed once, cached for every run
        load_tokenizer(first.model)
        sizes = {split: len(ds) for split, ds in task.splits.items()}
        steps = total_steps(first.train, sizes["train"])
        outcomes: list[Outcome] = []
        for i, variant in enumerate(variants, 1):
            run = build_run(variant, args, root)
            log(f"[{i}/{len(variants)}] {variant.label} (lr {variant.lr:g}) ...")
            t0 = time.perf_counter()
            job = run_job(run, progress=False)
            wall = time.perf_counter() - t0
            if job.train.steps != steps or len(job.train.history) != 1 or not job.train.final.is_final:
                raise RuntimeError(
                    f"{variant.key}: {job.train.steps} steps and {len(job.train.history)} evaluations, "
                    f"expected {steps} steps and one final evaluation"
                )
            outcome = Outcome(variant, job, wall)
            outcomes.append(outcome)
            log(
                f"    {job.adapter_parameters:,} adapter + {job.head_parameters:,} head params, "
                f"validation {_pct(outcome.validation_accuracy)}%, test {_pct(outcome.test_accuracy)}%, "
                f"{wall:.1f} s (train {job.timings.get('train_s', float('nan')):.1f} s)"
            )
    total = time.perf_counter() - started
    report = "\n\n".join(
        [header(args, first, sizes, steps, variants), table(outcomes), reading(outcomes, total, (load_start, os.getloadavg()[0]))]
    )
    emit(report, args.output)


if __name__ == "__main__":
    main()
