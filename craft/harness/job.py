"""One fine-tuning run from a :class:`~craft.harness.runconfig.RunConfig`, end to end.

Load the task and the model, apply the method, train with evaluations, score the test split,
save the adapter (and on request the merged model). Tracking is the caller's: it passes a
``callback`` that sees every evaluation (the CLI logs to MLflow, a search trial reports to Ray).

Layout of ``output_dir``::

    config.yaml     the run config as run (train it again unchanged)
    checkpoint/     the latest training checkpoint (resume with resume=True)
    adapter/        the trained adapter and head (safetensors)
    merged/         the merged transformers model and tokenizer (save_merged only)
    metrics.json    final evaluation, test metrics, parameter counts
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..factors import Factors
from .data import tokenize_task
from .distributed import is_main
from .hub import load_model, load_tokenizer
from .methods import AdaptedModel, apply_method, merged_model, save_adapter
from .metrics import compute_metrics
from .runconfig import RunConfig
from .tasks import Task, TaskSpec, load_task
from .trainer import EvalEvent, TrainResult, evaluate, train

__all__ = ["JobResult", "PreparedData", "PreparedJob", "data_key", "prepare_data", "prepare_job", "run_job"]


@dataclass
class JobResult:
    """What a run produced: its training history, test metrics, sizes and files."""

    run: RunConfig
    spec: TaskSpec
    adapter_parameters: int
    head_parameters: int
    train: TrainResult
    test_metrics: dict[str, float]  # "test/<metric>"; empty when the task has no labelled test split
    output_dir: Path
    adapter_dir: Path
    merged_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """Final metrics, test metrics, parameter counts and paths, JSON-ready."""
        return {
            "task": self.spec.name,
            "method": self.run.method,
            "adapter_parameters": self.adapter_parameters,
            "head_parameters": self.head_parameters,
            "steps": self.train.steps,
            "stopped_early": self.train.stopped_early,
            "final": self.train.final.metrics,
            "test": self.test_metrics,
            "adapter_dir": str(self.adapter_dir),
            "merged_dir": str(self.merged_dir) if self.merged_dir else None,
            "timings": self.timings,
        }


@dataclass
class PreparedJob:
    """Everything a run needs before training: data, tokenizer, adapted model (validated)."""

    task: Task
    tokenizer: Any
    adapted: AdaptedModel
    tokenized: Any
    seconds: float


@dataclass(frozen=True)
class PreparedData:
    """A run's task, tokenizer and tokenized splits: what runs that differ only in method,
    ranks or learning rates can share (see :func:`data_key`)."""

    task: Task
    tokenizer: Any
    tokenized: Any


def data_key(run: RunConfig) -> str:
    """The settings :func:`prepare_data` depends on, as a string: equal keys, equal data."""
    return json.dumps([run.task, run.model, asdict(run.data), run.train.seed, run.train.max_length], sort_keys=True)


def prepare_data(run: RunConfig) -> PreparedData:
    """Load the task and the tokenizer and tokenize every split.

    Raises:
        ValueError: unknown task or model, missing column, empty split, bad labels.
    """
    task = load_task(run.task, run.data, seed=run.train.seed)
    tokenizer = load_tokenizer(run.model)
    return PreparedData(task, tokenizer, tokenize_task(task, tokenizer, run.train.max_length))


def prepare_job(run: RunConfig, factors: Factors | None = None, data: PreparedData | None = None) -> PreparedJob:
    """Load the task and the model and apply the method: every input check happens here.

    Args:
        run: the validated run config.
        factors: cached HOSVD factors for a CRAFT run.
        data: the result of :func:`prepare_data` for a run with the same :func:`data_key`
            (loaded here when None).

    Raises:
        ValueError: unknown task or model, missing column, empty split, bad labels or ranks.
    """
    started = time.perf_counter()
    data = data or prepare_data(run)
    torch.manual_seed(run.train.seed)  # the new head's initialisation is part of the run
    spec = data.task.spec
    model = load_model(run.model, num_labels=spec.num_labels, label_names=spec.label_names)
    adapted = apply_method(model, run, factors=factors)
    return PreparedJob(data.task, data.tokenizer, adapted, data.tokenized, time.perf_counter() - started)


def run_job(
    run: RunConfig,
    *,
    prepared: PreparedJob | None = None,
    callback: Callable[[EvalEvent], bool | None] | None = None,
    factors: Factors | None = None,
    resume: bool = False,
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
) -> JobResult:
    """Train ``run`` and save its outputs under ``run.output_dir``.

    Args:
        run: the validated run config.
        prepared: the result of :func:`prepare_job` for this run (prepared here when None).
        callback: sees every evaluation; returning True stops the run early.
        factors: cached HOSVD factors for a CRAFT run (sliced, not recomputed).
        resume: continue from ``output_dir/checkpoint`` when it exists.
        progress: show a progress bar (None: when stderr is a terminal).
        checkpoint_dir: keep the training checkpoint in ``checkpoint_dir/checkpoint`` instead of
            ``output_dir/checkpoint`` (a search trial keeps it in local scratch space).

    Data-parallel (a ``torch.distributed`` process group, see :mod:`craft.harness.distributed`): every
    process calls this; rank 0 alone writes ``output_dir``.

    Raises:
        ValueError: bad data, model or config, in one line.
        FloatingPointError: the loss turned NaN or infinite.
    """
    prepared = prepared or prepare_job(run, factors)
    task, tokenizer, adapted, tokenized = prepared.task, prepared.tokenizer, prepared.adapted, prepared.tokenized
    out = Path(run.output_dir)
    main = is_main()  # data-parallel: rank 0 writes every file
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(run.to_yaml())
    started = time.perf_counter()
    metrics_fn = compute_metrics
    result = train(
        adapted,
        tokenized,
        task.spec,
        run.train,
        tokenizer,
        metrics_fn=metrics_fn,
        callback=callback,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else out,  # latest checkpoint in <dir>/checkpoint
        resume=resume,
        progress=progress,
    )
    trained = time.perf_counter()
    test = {}
    if "test" in tokenized and not result.stopped_early:
        scored = evaluate(adapted, tokenized, task.spec, run.train, tokenizer, metrics_fn=metrics_fn, splits=("test",))
        test = {k: v for k, v in scored.items() if k.startswith("test/")}  # its bare "score" is the validation's name
    adapter_dir = save_adapter(adapted, out / "adapter", run.save_factors) if main else out / "adapter"
    merged_dir = None
    if run.save_merged and not result.stopped_early and main:
        merged_dir = out / "merged"
        merged_model(adapted).save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
    job = JobResult(
        run=run,
        spec=task.spec,
        adapter_parameters=adapted.adapter_parameters,
        head_parameters=adapted.head_parameters,
        train=result,
        test_metrics=test,
        output_dir=out,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        timings={
            "prepare_s": prepared.seconds,
            "train_s": trained - started,
            "total_s": prepared.seconds + time.perf_counter() - started,
        },
    )
    if main:
        (out / "metrics.json").write_text(json.dumps(job.summary(), indent=2) + "\n")
    return job
