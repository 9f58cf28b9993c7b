"""Training-step time and memory of CRAFT against LoRA, a head-only baseline and the floor.

What is measured, on a randomly initialised RoBERTa-base-shaped sequence classifier (or, with
``--shape llama``, a LLaMA-shaped one: 2048 wide, 16 layers, grouped-query attention; the weights
do not matter for speed) and one fixed batch of random token ids:

* the wall time of one full training step (zero_grad, forward with labels, backward, AdamW
  step over the variant's trainable parameters) for each variant, interleaved over rounds in a
  shuffled order so that a noisy machine slows every variant alike; median and min reported;
* the extra memory one training step takes on top of the built model (CUDA: peak allocated
  during a step after warm-up; CPU: the growth of the process's peak RSS over one step, each
  variant in a fresh process);
* the HOSVD of the query and value stacks (``craft.compute_factors``), paid once per model.

Variants: ``craft`` (compute="auto"), ``craft-factored``, ``craft-merged``, ``lora`` (r=8 on
query and value), ``head`` (only the classifier trains; backward stops at the head) and
``floor``.

Why the floor matters: any adapter that lives inside the layers, CRAFT or LoRA, needs the
gradient at every adapted layer, so its backward must run through the whole frozen body even
though no base weight gets a gradient. ``floor`` trains only the head but makes the embedding
output require grad, which forces exactly that backward through every layer (plus the tiny
input-side gradient of layer 0, which an adapter does not need; so the floor is a hair above
the true minimum). ``head`` is cheaper than any in-layer adapter can ever be; the floor is the
cost an in-layer adapter cannot avoid. An adapter's overhead is therefore its time over the
floor's, and CRAFT / floor close to 1 means its update costs next to nothing.

Run ``python benchmarks/step_time.py`` on a quiet machine (``--device cuda [--bf16]`` on a
GPU; ``--bf16`` autocasts on the CPU too); ``--smoke`` checks the whole path on a tiny model in about half a minute (mostly the
imports of the per-variant memory processes; ``--no-memory`` skips them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from common import device_name, emit, log  # benchmarks/common.py, beside this script
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

import craft

VARIANTS = ("craft", "craft-factored", "craft-merged", "lora", "head", "floor")
CRAFT_COMPUTE = {"craft": "auto", "craft-factored": "factored", "craft-merged": "merged"}
WARMUP_STEPS = 2
HOSVD_RUNS = 3
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Size:
    """Shape of one benchmark: the model, the batch and the CRAFT ranks."""

    arch: str  # roberta or llama
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    ranks: tuple[int, int, int]  # (rank_layers, rank_out, rank_in)
    rounds: int  # default number of timed rounds
    kv_heads: int | None = None  # llama: key/value heads (grouped-query attention)
    dtype: str = "float32"  # the model's weights

    @property
    def targets(self) -> list[str]:
        """The query and value projections' module names."""
        return ["query", "value"] if self.arch == "roberta" else ["q_proj", "v_proj"]

    @property
    def head(self) -> str:
        """The classifier head's module name."""
        return "classifier" if self.arch == "roberta" else "score"


FULL = Size("roberta", layers=12, hidden=768, heads=12, intermediate=3072, vocab=50265, batch=16, seq=128, ranks=(12, 100, 100), rounds=5)
SMOKE = Size("roberta", layers=2, hidden=64, heads=4, intermediate=128, vocab=1000, batch=2, seq=16, ranks=(2, 8, 8), rounds=1)
LLAMA = Size(
    "llama", layers=16, hidden=2048, heads=16, intermediate=5632, vocab=32000, batch=16, seq=128, ranks=(16, 100, 100),
    rounds=5, kv_heads=4,
)  # fmt: skip
SHAPES = {"roberta": FULL, "llama": LLAMA}
SMOKES = {
    "roberta": SMOKE,
    "llama": dataclasses.replace(
        LLAMA, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1000, batch=2, seq=16, ranks=(2, 8, 8), rounds=1
    ),
}


@dataclass
class Variant:
    """One model under test, its optimiser and its trainable adapter size (head apart)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    adapter_params: int


# --------------------------------------------------------------------------- building


def model_config(size: Size) -> RobertaConfig | LlamaConfig:
    """The config of ``size`` (dropout left at the config defaults)."""
    if size.arch == "llama":
        return LlamaConfig(
            vocab_size=size.vocab,
            hidden_size=size.hidden,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            intermediate_size=size.intermediate,
            max_position_embeddings=2048,
            num_labels=2,
            pad_token_id=0,
        )
    return RobertaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=514,
        type_vocab_size=1,
        num_labels=2,
    )


def build_base(size: Size, seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised classifier from ``seed``: identical weights on every call, in
    ``size.dtype`` (a bf16 model is what users load LLaMA-like checkpoints as)."""
    torch.manual_seed(seed)
    cls = LlamaForSequenceClassification if size.arch == "llama" else RobertaForSequenceClassification
    return cls(model_config(size)).to(device=device, dtype=getattr(torch, size.dtype))


def freeze_all_but_head(model: nn.Module, size: Size) -> None:
    """Freeze every weight except the classifier head's."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_submodule(size.head).parameters():
        p.requires_grad_(True)


def wrap_craft(model: nn.Module, size: Size, compute: str) -> tuple[nn.Module, int]:
    """CRAFT on the detected query and value projections; returns (model, adapter params)."""
    config = craft.CraftConfig(rank_layers=size.ranks[0], rank_out=size.ranks[1], rank_in=size.ranks[2])
    wrapped = craft.get_craft_model(model, config, compute=compute)
    return wrapped, wrapped.num_adapter_parameters()


def wrap_lora(model: nn.Module, size: Size) -> tuple[nn.Module, int]:
    """peft LoRA r=8 on query and value; returns (model, lora_ params)."""
    from peft import LoraConfig, get_peft_model  # imported here: slow, and only this variant needs it

    config = LoraConfig(r=8, lora_alpha=16, target_modules=size.targets, lora_dropout=0.0, task_type="SEQ_CLS")
    wrapped = get_peft_model(model, config)
    count = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n and p.requires_grad)
    return wrapped, count


def build_variant(name: str, size: Size, seed: int, device: torch.device) -> Variant:
    """Build variant ``name`` from a fresh seeded model, in train() mode, with its AdamW."""
    model = build_base(size, seed, device)
    adapter_params = 0
    if name in CRAFT_COMPUTE:
        model, adapter_params = wrap_craft(model, size, CRAFT_COMPUTE[name])
    elif name == "lora":
        model, adapter_params = wrap_lora(model, size)
    elif name == "head":
        freeze_all_but_head(model, size)
    elif name == "floor":
        freeze_all_but_head(model, size)
        model.enable_input_require_grads()  # the backward now runs through every layer
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    return Variant(name, model, optimizer, adapter_params)


def head_param_count(variant: Variant, size: Size) -> int:
    """Trainable parameters of the classifier head (the same in every variant)."""
    return sum(p.numel() for n, p in variant.model.named_parameters() if p.requires_grad and size.head in n)


def make_batch(size: Size, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (no special tokens), a full attention mask and random labels."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, size.vocab, (size.batch, size.seq), generator=gen)  # 0-2: special tokens in both vocabularies
    labels = torch.randint(0, 2, (size.batch,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------- stepping


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(variant: Variant, batch: dict[str, torch.Tensor], bf16: bool) -> None:
    """zero_grad, forward with labels, backward, AdamW step."""
    variant.optimizer.zero_grad(set_to_none=True)
    device = next(variant.model.parameters()).device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        loss = variant.model(**batch).loss
    loss.backward()
    variant.optimizer.step()


def timed_step(variant: Variant, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool) -> float:
    """Seconds of one training step, the GPU synchronised on both sides."""
    gc.collect()
    sync(device)
    start = time.perf_counter()
    train_step(variant, batch, bf16)
    sync(device)
    return time.perf_counter() - start


def run_rounds(
    variants: list[Variant], batch: dict[str, torch.Tensor], rounds: int, seed: int, device: torch.device, bf16: bool
) -> dict[str, list[float]]:
    """One step of every variant per round, in an order shuffled anew each round."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            times[v.name].append(timed_step(v, batch, device, bf16))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{v.name} {times[v.name][-1]:.3f}s" for v in order))
    return times


def cuda_peak_extra_mib(variant: Variant, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool) -> float:
    """Peak memory allocated during one (post warm-up) step above what was allocated before it."""
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    train_step(variant, batch, bf16)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# --------------------------------------------------------------------------- CPU memory probes


def rss_marks_kib() -> tuple[int, int | None]:
    """(ru_maxrss, VmHWM) of this process in KiB; VmHWM is None where /proc is missing."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return maxrss, int(line.split()[1])
    except OSError:
        pass
    return maxrss, None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where not possible.

    Without it, transient memory of the build (model init, the HOSVD) would hide part of the
    step's memory under an already higher high-water mark.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_probe(name: str, size: Size, seed: int, bf16: bool = False) -> dict:
    """Child side: build ``name`` on the CPU, run one step, report the step's extra peak RSS.

    ru_maxrss also carries the peak RSS of the parent at spawn time (Linux copies it at exec).
    When that inherited value sits above this process's own peak before the step, the
    ru_maxrss difference would read low, so the VmHWM difference is used instead and flagged.
    """
    device = torch.device("cpu")
    variant = build_variant(name, size, seed, device)
    batch = make_batch(size, seed, device)
    gc.collect()
    was_reset = reset_peak_rss()
    before, before_hwm = rss_marks_kib()
    train_step(variant, batch, bf16=bf16)
    after, after_hwm = rss_marks_kib()
    inherited = before_hwm is not None and before > before_hwm + 1024
    extra_kib = (after_hwm - before_hwm) if inherited else (after - before)
    return {"variant": name, "extra_mib": extra_kib / 1024, "inherited": inherited, "reset": was_reset}


def cpu_memory_mib(names: list[str], smoke: bool, seed: int, size: Size, bf16: bool = False) -> dict[str, dict]:
    """Parent side: one fresh subprocess per variant (two at a time), each running :func:`memory_probe`."""

    def probe(name: str) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, "--seed", str(seed)]
        cmd += ["--batch", str(size.batch), "--seq", str(size.seq), "--shape", size.arch, "--model-dtype", size.dtype]
        cmd += ["--smoke"] if smoke else []
        cmd += ["--bf16"] if bf16 else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe of {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        return {r["variant"]: r for r in pool.map(probe, names)}


# --------------------------------------------------------------------------- HOSVD


def time_hosvd(size: Size, seed: int, device: torch.device) -> float:
    """Median seconds of ``craft.compute_factors`` on both stacks (query, value) at the sweep's ranks."""
    model = build_base(size, seed, device)
    runs = []
    for _ in range(HOSVD_RUNS):
        sync(device)
        start = time.perf_counter()
        craft.compute_factors(model, None, max_ranks=size.ranks)
        runs.append(time.perf_counter() - start)
    del model
    gc.collect()
    return statistics.median(runs)


# --------------------------------------------------------------------------- reporting


def header(args: argparse.Namespace, size: Size, device: torch.device, head_params: int) -> str:
    """Date, versions, device, threads, shapes, dropout and the exact command line."""
    import transformers

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    shape = f"{size.layers} layers x {size.hidden} wide" + (f", {size.kv_heads} key/value heads" if size.kv_heads else "")
    precision = ("bf16 autocast" if args.bf16 else "no autocast") + f", {size.dtype} weights"
    return "\n".join(
        [
            f"## step_time: {now} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"device {device_name(device)} | threads {torch.get_num_threads()}",
            "",
            f"- command: `{shlex.join(sys.orig_argv)}`",
            f"- model: {size.arch} {shape} (random init, seed {args.seed}), batch {size.batch} x {size.seq} tokens, {precision}",
            f"- CRAFT ranks (layers, out, in) = {size.ranks}; LoRA r=8 on {', '.join(size.targets)}; AdamW lr {LEARNING_RATE}",
            f"- {dropout_note(size)}",
            f"- classifier head ({head_params} params) trains in every variant; counted apart from the adapter",
            f"- {WARMUP_STEPS} warm-up steps per variant, then {args.rounds} interleaved round(s) in shuffled order",
            f"- peak extra memory: {memory_note(args, device)}",
        ]
    )


def dropout_note(size: Size) -> str:
    """The dropout policy, with the config's default rates."""
    config = model_config(size)
    if size.arch == "llama":
        return f"dropout: attention {config.attention_dropout} (LLaMA has no other), train() mode, identical for every variant"
    return (
        f"dropout: config defaults (hidden {config.hidden_dropout_prob}, attention {config.attention_probs_dropout_prob}), "
        "train() mode, identical for every variant"
    )


def memory_note(args: argparse.Namespace, device: torch.device) -> str:
    """How the memory column was measured."""
    if args.no_memory:
        return "not measured (--no-memory)"
    if device.type == "cuda":
        return (
            "max_memory_allocated during one step after warm-up, minus memory_allocated before it (optimizer state already built)"
        )
    return "ru_maxrss after one step minus ru_maxrss after the build, each variant in a fresh process (optimizer state included)"


def fmt(value: float | None, digits: int = 3) -> str:
    """A number, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def memory_cell(memory: dict[str, dict], name: str) -> str:
    """The extra memory of ``name`` in MiB, flagged when the VmHWM fallback was used."""
    if name not in memory:
        return "n/a"
    entry = memory[name]
    return f"{entry['extra_mib']:.1f}" + (" †" if entry.get("inherited") else "")


def table(variants: list[Variant], times: dict[str, list[float]], memory: dict[str, dict]) -> str:
    """The markdown table, one row per variant."""
    floor = statistics.median(times["floor"]) if "floor" in times else None
    rows = [
        "| variant | adapter params (head apart) | median step s | min step s | peak extra memory MiB | ratio vs floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in variants:
        median = statistics.median(times[v.name])
        ratio = median / floor if floor else None
        rows.append(
            f"| {v.name} | {v.adapter_params:,} | {fmt(median, 4)} | {fmt(min(times[v.name]), 4)} | "
            f"{memory_cell(memory, v.name)} | {fmt(ratio, 2)} |"
        )
    if any(e.get("inherited") for e in memory.values()):
        rows.append("")
        rows.append("† ru_maxrss held the parent's inherited peak; VmHWM growth over the step shown instead")
    return "\n".join(rows)


def paired(times: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over rounds of a's step time over b's in the same round: drift cancels out."""
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def ratio_lines(times: dict[str, list[float]], hosvd_s: float) -> str:
    """CRAFT / LoRA and CRAFT / floor for each compute mode, and the HOSVD time, with goals.

    Each ratio is given twice: from the medians, and paired (the median of the per-round
    ratios), which is the steadier of the two on a noisy machine.
    """
    med = {name: statistics.median(t) for name, t in times.items()}

    def ratio(a: str, b: str) -> str:
        plain = fmt(med[a] / med[b], 2) if a in med and b in med else "n/a"
        return f"{plain} (paired {fmt(paired(times, a, b), 2)})"

    lines = [
        f"CRAFT / LoRA = {ratio('craft', 'lora')} (goal <= 1.0)",
        f"CRAFT / floor = {ratio('craft', 'floor')} (goal <= 1.05)",
        f"HOSVD of both stacks = {hosvd_s:.2f} s (goal < 1 s)",
    ]
    for mode in ("craft-factored", "craft-merged"):
        label = "CRAFT-" + mode.removeprefix("craft-")
        lines.append(f"{label} / LoRA = {ratio(mode, 'lora')} (goal <= 1.0)")
        lines.append(f"{label} / floor = {ratio(mode, 'floor')} (goal <= 1.05)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 1 with --smoke)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass (CUDA, or the CPU's)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="roberta", help="roberta-base (default) or llama (2048 x 16, GQA)")
    parser.add_argument(
        "--model-dtype", choices=["float32", "bfloat16"], default="float32", help="the model's weights (CRAFT's J stay float32)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 2x16, ranks 2/8/8, 1 round: a quick check")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 16; 2 with --smoke)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; 16 with --smoke)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the batch and the round order")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--output", type=Path, default=None, help="also append the markdown report to this file")
    parser.add_argument("--memory-probe", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no GPU")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.variants = list(dict.fromkeys(args.variants))  # drop repeats, keep order
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure, then print the report (and append it to --output)."""
    args = parse_args(argv)
    size = (SMOKES if args.smoke else SHAPES)[args.shape]
    size = dataclasses.replace(size, batch=args.batch or size.batch, seq=args.seq or size.seq, dtype=args.model_dtype)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, size, args.seed, args.bf16)))
        return
    args.rounds = args.rounds or size.rounds
    device = torch.device(args.device)

    memory: dict[str, dict] = {}
    if not args.no_memory and device.type == "cpu":
        log("peak memory: one fresh process per variant ...")  # first, while this process is small
        memory = cpu_memory_mib(args.variants, args.smoke, args.seed, size, args.bf16)

    log("HOSVD timing ...")
    hosvd_s = time_hosvd(size, args.seed, device)
    log(f"building {', '.join(args.variants)} ...")
    variants = [build_variant(name, size, args.seed, device) for name in args.variants]
    batch = make_batch(size, args.seed, device)
    head_params = head_param_count(variants[0], size)

    log("warm-up ...")
    for v in variants:
        for _ in range(WARMUP_STEPS):
            train_step(v, batch, args.bf16)
    sync(device)
    if not args.no_memory and device.type == "cuda":
        memory = {v.name: {"extra_mib": cuda_peak_extra_mib(v, batch, device, args.bf16)} for v in variants}

    times = run_rounds(variants, batch, args.rounds, args.seed, device, args.bf16)
    report = "\n\n".join([header(args, size, device, head_params), table(variants, times, memory), ratio_lines(times, hosvd_s)])
    emit(report, args.output)


if __name__ == "__main__":
    main()
