"""From a task's text splits to batches: tokenization and a resumable, deterministic data order.

The order of epoch e is a function of (seed, e) only, so a run resumed at batch b of epoch e
continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

__all__ = ["MODEL_COLUMNS", "tokenize_task", "make_loader", "epoch_order", "num_batches"]

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _encode(batch: dict[str, list], tokenizer: Any, fields: tuple[str, ...], max_length: int, regression: bool) -> dict:
    texts = [batch[f] for f in fields]  # one list of strings, or two for text pairs
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    out = {k: encoded[k] for k in MODEL_COLUMNS[:3] if k in encoded}
    out["labels"] = [float(y) for y in batch["label"]] if regression else [int(y) for y in batch["label"]]
    return out


def tokenize_task(task: Any, tokenizer: Any, max_length: int) -> datasets.DatasetDict:
    """Tokenize every split of ``task`` (truncated to ``max_length``, not padded).

    Args:
        task: a task with ``.spec`` (``text_fields``: one or two column names,
            ``is_regression``) and ``.splits`` (a ``DatasetDict`` with those columns and
            ``label``).
        tokenizer: a transformers tokenizer.
        max_length: tokens per example (pair) after truncation.

    Returns:
        A ``DatasetDict`` with ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
        tokenizer makes them) and ``labels`` (float32 for regression, int64 otherwise). The map
        is fingerprinted by datasets, so file-backed splits are tokenized once and cached.

    Raises:
        ValueError: a split lacks a text column or the label column.
    """
    spec = task.spec
    fields = tuple(spec.text_fields)
    if not 1 <= len(fields) <= 2:
        raise ValueError(f"a task has one or two text fields, got {list(fields)}")
    out = {}
    for name, split in task.splits.items():
        missing = [c for c in (*fields, "label") if c not in split.column_names]
        if missing:
            raise ValueError(f"split {name!r} has no column(s) {missing} (columns: {split.column_names}); fix the task's columns")
        kwargs = {"tokenizer": tokenizer, "fields": fields, "max_length": max_length, "regression": bool(spec.is_regression)}
        encoded = split.map(_encode, batched=True, fn_kwargs=kwargs, remove_columns=split.column_names, desc=f"tokenize {name}")
        if spec.is_regression:
            encoded = encoded.cast_column("labels", datasets.Value("float32"))
        out[name] = encoded
    return datasets.DatasetDict(out)


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches in one pass over ``num_examples`` (the last one may be short)."""
    return math.ceil(num_examples / batch_size)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def make_loader(
    dataset: datasets.Dataset,
    tokenizer: Any,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    *,
    start_batch: int = 0,
) -> DataLoader:
    """Batches of one epoch, padded to the longest example of each batch.

    Args:
        dataset: a tokenized split (:func:`tokenize_task`).
        tokenizer: the tokenizer, for its padding side and pad token.
        batch_size: examples per batch.
        shuffle: order by :func:`epoch_order` (training) or keep the dataset order (evaluation).
        seed, epoch: select the permutation when shuffling.
        start_batch: skip the first ``start_batch`` batches (resuming mid-epoch).

    Returns:
        A ``DataLoader`` yielding dicts of tensors ready for ``model(**batch)``. It uses no
        global random state, so creating it leaves dropout's RNG stream untouched.
    """
    columns = [c for c in dataset.column_names if c in MODEL_COLUMNS]
    dataset = dataset.select_columns(columns)
    n = len(dataset)
    order = epoch_order(n, seed, epoch) if shuffle else list(range(n))
    batches = [order[i : i + batch_size] for i in range(start_batch * batch_size, n, batch_size)]
    collator = DataCollatorWithPadding(tokenizer)
    # An own generator: a DataLoader draws a worker base seed per iterator, from the global RNG otherwise.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator, generator=torch.Generator())
