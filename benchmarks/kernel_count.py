"""Kernels per training step of CRAFT against LoRA: the GPU speed proxy that a CPU can measure.

A small adapter's training step on a GPU is dispatch-bound: the adapted projections' matmuls are
tiny, so the step's time grows with the number of kernels it launches more than with its flops.
This script counts, with ``torch.profiler`` on the CPU, the aten ops one training step runs
(zero_grad, forward with labels, backward, AdamW with ``foreach=True`` as on a GPU). An op that
computes is one kernel launch on a GPU; views, reshapes and allocations launch none and are
not counted; an op made of other ops counts as its parts, and a matrix product as one kernel
(plus the copy an out-of-place addmm makes of its input, as on a GPU).

Variants (see ``step_time.py``): ``craft-factored``, ``craft-merged``, ``lora`` (peft, r=8) and
``floor`` (the head trains, the backward runs through every layer: the cost no in-layer adapter
avoids). Shapes: RoBERTa-base's 12 layers and a LLaMA layout's 16 layers with grouped-query
attention, at a narrow width and a short batch: the number of ops a step runs depends on the
layers and the layout, not on the width or the batch (``--width`` checks it).

Run ``python benchmarks/kernel_count.py`` (a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
from collections import Counter
from pathlib import Path

import torch
from common import emit, log  # benchmarks/common.py, beside this script
from step_time import FULL, LLAMA, Size, build_variant, make_batch
from torch.profiler import ProfilerActivity, profile, record_function

VARIANTS = ("craft-factored", "craft-merged", "lora", "floor")
PHASES = ("forward", "backward", "optimizer")
# Leaf ops that launch no kernel on a GPU: views, metadata and allocations.
NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "view", "reshape", "_reshape_alias", "_unsafe_view", "t", "transpose", "permute", "as_strided", "expand",
        "expand_as", "view_as", "unsqueeze", "squeeze", "slice", "select", "narrow", "unbind", "split",
        "split_with_sizes", "chunk", "unflatten", "flatten", "detach", "alias", "lift_fresh", "empty", "empty_like",
        "empty_strided", "resize_", "result_type", "contiguous", "to", "_to_copy", "numpy_T", "is_nonzero", "item",
        "_local_scalar_dense", "size", "stride", "dim", "is_same_size", "requires_grad_", "resolve_conj", "resolve_neg",
        "conj", "_conj", "new_empty", "new_empty_strided",
    )
)  # fmt: skip


GEMM = frozenset("aten::" + n for n in ("mm", "bmm", "addmm", "addmm_", "baddbmm", "addbmm", "_addmm_activation", "mv", "addmv"))


def narrow(size: Size, width: int) -> Size:
    """``size`` with its layers and layout but ``width`` wide (heads kept at 64 wide) and a 2 x 16 batch."""
    heads = max(1, width // 64)
    kv = None if size.kv_heads is None else max(1, heads * size.kv_heads // size.heads)
    rank = min(8, width // 8)
    return dataclasses.replace(
        size, hidden=width, heads=heads, kv_heads=kv, intermediate=2 * width, vocab=1000, batch=2, seq=16,
        ranks=(min(size.ranks[0], size.layers), rank, rank),
    )  # fmt: skip


def launches(event) -> bool:
    """One kernel: a matrix product (its BLAS call is no aten op; a copy of an addmm's input is
    counted apart), or an aten op that computes and has no computing aten op inside."""
    if event.name in GEMM:
        return True
    if not event.name.startswith("aten::") or event.name in NO_KERNEL:
        return False
    return not any(_computes_inside(child) for child in event.cpu_children)


def _computes_inside(event) -> bool:
    if event.name.startswith("aten::") and event.name not in NO_KERNEL:
        return True
    return any(_computes_inside(child) for child in event.cpu_children)


def phase_of(event) -> str | None:
    """The phase label an event runs under (its outermost ``record_function`` ancestor)."""
    label = None
    while event is not None:
        if event.name in PHASES:
            label = event.name
        event = event.cpu_parent
    return label


def count_step(name: str, size: Size, bf16: bool = False) -> dict[str, int]:
    """Kernel-launching aten ops of one training step of variant ``name``, by phase."""
    device = torch.device("cpu")
    variant = build_variant(name, size, seed=0, device=device)
    trainable = [p for p in variant.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, foreach=True)  # the GPU default
    batch = make_batch(size, seed=0, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with record_function("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = variant.model(**batch).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()

    for _ in range(2):  # warm-up: optimizer state built, caches filled
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: Counter[str] = Counter()
    for event in prof.events():
        if not launches(event):
            continue  # a view, an allocation, or an op counted as its parts
        phase = phase_of(event)
        if phase is not None:
            counts[phase] += 1
    return {phase: counts[phase] for phase in PHASES}


def report(shapes: dict[str, Size], width: int, args: argparse.Namespace) -> str:
    """Count every variant on every shape and format the markdown report."""
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        f"## kernel_count: {now} | torch {torch.__version__}",
        "",
        f"- command: `{shlex.join(sys.orig_argv)}`",
        f"- kernel-launching aten ops per training step (torch.profiler, CPU), {width} wide, batch 2 x 16, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, AdamW foreach; views and allocations not counted",
        "",
        "| shape | variant | forward | backward | forward + backward | / LoRA's | above the floor's | optimizer (CPU) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for shape, size in shapes.items():
        counted = {}
        for name in args.variants:
            log(f"{shape}: {name} ...")
            counted[name] = count_step(name, narrow(size, width), args.bf16)
        body = {name: phases["forward"] + phases["backward"] for name, phases in counted.items()}
        for name, phases in counted.items():
            ratio = f"{body[name] / body['lora']:.2f}" if "lora" in body else "n/a"
            above = str(body[name] - body["floor"]) if "floor" in body else "n/a"
            lines.append(
                f"| {shape} ({size.layers} layers) | {name} | {phases['forward']} | {phases['backward']} | {body[name]} | "
                f"{ratio} | {above} | {phases['optimizer']} |"
            )
    lines += [
        "",
        "The optimizer column is the CPU's: there foreach AdamW loops over the tensors (LoRA trains 8x more",
        "of them than CRAFT); on a GPU it runs a few multi-tensor kernels whatever their number, so the",
        "forward and backward are the comparison.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Count, then print the report (and append it to --output)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--width", type=int, default=128, help="hidden size of the counted models (default 128)")
    parser.add_argument("--bf16", action="store_true", help="the forward under bf16 autocast (the CPU's, same dtype logic as CUDA's)")
    parser.add_argument("--output", default=None, help="also append the markdown report to this file")
    args = parser.parse_args(argv)
    if args.width < 64 or args.width % 64:
        parser.error("--width must be a positive multiple of 64")
    torch.set_num_threads(1)
    emit(report({"roberta": FULL, "llama": LLAMA}, args.width, args), Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
