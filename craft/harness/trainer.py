"""The fine-tuning loop shared by every method: AdamW, warm-up then linear decay, evaluation,
checkpoints and exact resumption.

Optimiser steps are counted across epochs; a gradient-accumulation window may span an epoch
boundary. Evaluations (and checkpoints) happen right after an optimiser step, so a checkpoint
never holds a half-accumulated gradient.

Data-parallel (see :mod:`craft.harness.distributed`): under a ``torch.distributed`` process group every
process takes its slice of each global batch and DDP averages the gradients; every process
evaluates (the same weights, the same numbers), rank 0 alone writes checkpoints, calls the
callback and shows progress, and its stop decision is broadcast. Each process draws dropout masks
for its slice alone, from a stream of its own (:func:`~craft.harness.distributed.seed_slice`).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .checkpoint import load_checkpoint, save_checkpoint
from .data import make_loader, num_batches
from .distributed import broadcast_flag, check_same, is_main, seed_slice, shard, sum_across, world_size, wrap
from .methods import AdaptedModel, parameter_groups
from .runconfig import TrainBlock

__all__ = ["EvalEvent", "TrainResult", "train", "evaluate", "total_steps", "warmup_steps", "make_schedule", "resolve_device"]

MetricsFn = Callable[[Any, np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class EvalEvent:
    """One evaluation.

    Attributes:
        step: optimiser steps done.
        epoch: passes over the training data done (fractional).
        metrics: ``"<split>/<metric>"`` (``loss`` and the task's metrics) for every evaluation
            split, and ``"score"``: the first evaluation split's score.
        train_loss: mean training loss of the micro-batches since the previous evaluation.
        learning_rates: current learning rate of each parameter group (``adapter``, ``head``).
        elapsed: seconds of training so far (across resumptions).
        is_final: the evaluation at the end of the full budget.
    """

    step: int
    epoch: float
    metrics: dict[str, float]
    train_loss: float | None
    learning_rates: dict[str, float]
    elapsed: float
    is_final: bool = False


@dataclass
class TrainResult:
    """The outcome of :func:`train`: the last evaluation (``final``; ``is_final`` is False when the
    run stopped early), every evaluation in order, and why it stopped early (``"callback"``)."""

    steps: int
    epochs_done: float
    final: EvalEvent
    history: list[EvalEvent] = field(default_factory=list)
    stopped_early: bool = False
    stop_reason: str | None = None
    elapsed: float = 0.0


def total_steps(cfg: TrainBlock, num_examples: int) -> int:
    """Optimiser steps of a run: ``max_steps``, else ceil(epochs * batches per epoch / grad_accum_steps)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_batches(num_examples, cfg.batch_size) / cfg.grad_accum_steps))


def warmup_steps(cfg: TrainBlock, steps: int) -> int:
    """Warm-up steps: ceil(warmup_ratio * steps)."""
    return math.ceil(cfg.warmup_ratio * steps)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainBlock, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over :func:`warmup_steps`, then linear decay to 0 at ``steps``."""
    return get_linear_schedule_with_warmup(optimizer, warmup_steps(cfg, steps), steps)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as torch reads it."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already consumed
    loss_sum: float = 0.0  # training loss since the previous evaluation
    loss_count: int = 0
    elapsed: float = 0.0  # seconds before this (resumed) session


def train(
    adapted: AdaptedModel,
    tokenized: Any,
    spec: Any,
    cfg: TrainBlock,
    tokenizer: Any,
    *,
    metrics_fn: MetricsFn,
    callback: Callable[[EvalEvent], bool | None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> TrainResult:
    """Fine-tune ``adapted`` on ``tokenized["train"]``, evaluating every ``cfg.eval_every`` steps.

    Args:
        adapted: the model from :func:`craft.harness.methods.apply_method` (moved to the device).
        tokenized: a ``DatasetDict`` from :func:`craft.harness.data.tokenize_task` with a ``train``
            split and every split in ``spec.eval_splits``.
        spec: the task spec (``eval_splits``, ``is_regression``).
        cfg: the loop's settings.
        tokenizer: pads the batches.
        metrics_fn: ``metrics_fn(spec, predictions, labels)`` -> dict with a ``"score"`` key;
            predictions are class ids (int64) for classification, floats for regression.
        callback: called with each :class:`EvalEvent` after its checkpoint is written; returning
            True stops training (``stop_reason="callback"``). Data-parallel: rank 0 only.
        checkpoint_dir: write a checkpoint at every evaluation there (latest only).
        resume: continue from the checkpoint in ``checkpoint_dir`` (fresh start when none);
            data-parallel, every process must see the same checkpoint (shared storage).
        progress: a tqdm bar; None shows it when stderr is a terminal.

    Raises:
        FloatingPointError: the loss or the gradient norm is NaN or infinite.
        ValueError: an empty training split or a missing evaluation split.
    """
    train_set = tokenized["train"] if "train" in tokenized else None
    if train_set is None or len(train_set) == 0:
        raise ValueError("the training split is missing or empty; check the task's data")
    splits = tuple(spec.eval_splits)
    _check_splits(tokenized, splits)
    device = resolve_device(cfg.device)
    autocast = _autocast(cfg, device)
    model = adapted.model.to(device)
    main = is_main()
    _seed_everything(cfg.seed)
    steps = total_steps(cfg, len(train_set))
    per_epoch = num_batches(len(train_set), cfg.batch_size)
    optimizer = torch.optim.AdamW(parameter_groups(adapted, cfg.lr, cfg.head_lr, cfg.weight_decay))
    scheduler = make_schedule(optimizer, cfg, steps)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    plan = {"total_steps": steps, "batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps, "seed": cfg.seed}
    pos, history = _Position(), []
    if resume and checkpoint_dir is not None:
        saved = load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
        if saved is not None:
            if saved["plan"] != plan:
                raise ValueError(f"the checkpoint in {checkpoint_dir} is of another plan {saved['plan']}, this run is {plan}")
            pos = _Position(**saved["position"])
            history = [EvalEvent(**e) for e in saved["history"]]
        check_same(pos.step, f"the step to resume from (is {checkpoint_dir} on storage every worker shares?)", device)
    forward = wrap(model, device)  # DDP when several processes train, else the model

    def evaluate_and_report() -> bool:
        event = EvalEvent(
            step=pos.step,
            epoch=pos.epoch + pos.batch / per_epoch,
            metrics=_evaluate(model, tokenized, spec, splits, cfg, tokenizer, device, autocast, metrics_fn),
            train_loss=pos.loss_sum / pos.loss_count if pos.loss_count else None,
            learning_rates={g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)},
            elapsed=pos.elapsed + time.perf_counter() - start,
            is_final=pos.step >= steps,
        )
        history.append(event)
        pos.loss_sum, pos.loss_count = 0.0, 0
        if checkpoint_dir is not None and main:
            state = {"plan": plan, "history": [asdict(e) for e in history]}
            state["position"] = {**asdict(pos), "elapsed": event.elapsed}
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, state)
        stop = bool(callback(event)) if callback is not None and main else False
        return broadcast_flag(stop, device)

    start = time.perf_counter()
    stop_reason = None
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=steps, initial=pos.step, disable=not (show and main), desc=f"train {adapted.method}", unit="step")
    model.train()
    micro = 0
    optimizer.zero_grad(set_to_none=True)
    while pos.step < steps and stop_reason is None:
        loader = make_loader(train_set, tokenizer, cfg.batch_size, True, cfg.seed, pos.epoch, start_batch=pos.batch)
        for batch in loader:
            local, weight = shard(batch)  # the whole batch and 1.0 in a single process
            seed_slice(cfg.seed, pos.epoch, pos.batch)  # data-parallel: this slice's own dropout stream
            with autocast:
                loss = forward(**{k: v.to(device) for k, v in local.items()}).loss
            value = loss.item()
            if world_size() > 1:  # the global batch's mean loss, and its gradient after DDP's average
                value = sum_across([value * weight], device)[0] / world_size()
                loss = loss * weight
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss is {value} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch}); "
                    "lower the learning rate or check the data and the base model"
                )
            (loss / cfg.grad_accum_steps).backward()
            pos.batch, pos.loss_sum, pos.loss_count, micro = pos.batch + 1, pos.loss_sum + value, pos.loss_count + 1, micro + 1
            if micro < cfg.grad_accum_steps:
                continue
            if cfg.max_grad_norm is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
                if not math.isfinite(norm):
                    raise FloatingPointError(f"gradient norm is {norm} at step {pos.step}; lower the learning rate")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro, pos.step = 0, pos.step + 1
            bar.update(1)
            if pos.step % cfg.eval_every == 0 or pos.step >= steps:
                if evaluate_and_report() and pos.step < steps:
                    stop_reason = "callback"
                bar.set_postfix(score=f"{history[-1].metrics['score']:.4g}")
            if pos.step >= steps or stop_reason is not None:
                break
        else:  # the epoch ran out
            pos.epoch, pos.batch = pos.epoch + 1, 0
    bar.close()
    if not history or history[-1].step != pos.step:  # defensive: a result always ends on an evaluation
        evaluate_and_report()
    final = history[-1]
    return TrainResult(
        steps=pos.step,
        epochs_done=pos.epoch + pos.batch / per_epoch,
        final=final,
        history=history,
        stopped_early=stop_reason is not None,
        stop_reason=stop_reason,
        elapsed=final.elapsed,
    )


def evaluate(
    adapted: AdaptedModel,
    tokenized: Any,
    spec: Any,
    cfg: TrainBlock,
    tokenizer: Any,
    *,
    metrics_fn: MetricsFn,
    splits: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Loss and task metrics of ``splits`` (default ``spec.eval_splits``), on ``cfg``'s device.

    Returns:
        ``"<split>/loss"`` and ``"<split>/<metric>"`` for every split, and ``"score"``: the
        first split's score.

    Raises:
        ValueError: a split not in ``tokenized``, or ``metrics_fn`` gave no ``score``.
        FloatingPointError: the model outputs NaN or inf.
    """
    splits = tuple(splits) if splits is not None else tuple(spec.eval_splits)
    _check_splits(tokenized, splits)
    device = resolve_device(cfg.device)
    return _evaluate(
        adapted.model.to(device), tokenized, spec, splits, cfg, tokenizer, device, _autocast(cfg, device), metrics_fn
    )


def _check_splits(tokenized: Any, splits: tuple[str, ...]) -> None:
    missing = [s for s in splits if s not in tokenized]
    if not splits or missing:
        raise ValueError(f"evaluation split(s) {missing or '(none)'} not in the data (splits: {list(tokenized)})")


def _autocast(cfg: TrainBlock, device: torch.device) -> torch.autocast:
    """bf16 autocast: on any device when asked for (CPUs run it too), on CUDA alone under "auto"."""
    enabled = cfg.bf16 is True or (cfg.bf16 == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def _evaluate(model, tokenized, spec, splits, cfg, tokenizer, device, autocast, metrics_fn) -> dict[str, float]:
    """Eval mode, no gradients; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for split in splits:
        loss_sum, count, predictions, labels = 0.0, 0, [], []
        for batch in make_loader(tokenized[split], tokenizer, cfg.eval_batch_size, False):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                out = model(**batch)
            logits = out.logits.float()  # (B, num_labels)
            if not torch.isfinite(logits).all():
                raise FloatingPointError(
                    f"the model outputs NaN or inf on split {split!r}; it has diverged, lower the learning rate"
                )
            n = batch["labels"].shape[0]
            loss_sum, count = loss_sum + out.loss.item() * n, count + n
            predictions.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))  # (B,)
            labels.append(batch["labels"])
        values = metrics_fn(spec, torch.cat(predictions).cpu().numpy(), torch.cat(labels).cpu().numpy())
        if "score" not in values:
            raise ValueError(f"metrics_fn returned {sorted(values)} without a 'score' key")
        metrics[f"{split}/loss"] = loss_sum / max(count, 1)
        metrics.update({f"{split}/{k}": float(v) for k, v in values.items()})
    metrics["score"] = metrics[f"{splits[0]}/score"]
    model.train(was_training)
    return metrics
