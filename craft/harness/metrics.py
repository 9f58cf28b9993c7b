"""Evaluation metrics of a task and its single score (the GLUE convention: the mean of its metrics).

Every metric is a finite float. Degenerate inputs give 0.0 rather than NaN, so that a trial that
predicts one class (or a constant) is scored as useless instead of breaking the search:

- pearson / spearman: 0.0 when the predictions or the labels are constant, or N < 2;
- matthews: 0.0 when only one class is predicted or present (sklearn's convention);
- f1: 0.0 when class 1 is never predicted and never true (``zero_division=0``).

Non-finite predictions (a diverged model) are an error, not a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class ScoredTask(Protocol):
    """What scoring needs of a task (:class:`craft.harness.tasks.TaskSpec` has it)."""

    name: str
    metrics: Sequence[str]
    num_labels: int
    is_regression: bool

__all__ = [
    "CLASSIFICATION_METRICS",
    "METRIC_NAMES",
    "REGRESSION_METRICS",
    "SCORE",
    "compute_metrics",
    "score_of",
]

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
METRIC_NAMES = CLASSIFICATION_METRICS + REGRESSION_METRICS
SCORE = "score"  # key of the task's single score in what compute_metrics returns


def _f1(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    from sklearn.metrics import f1_score

    if num_labels == 2:  # GLUE: F1 of the positive class (1)
        return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))
    return float(f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0.0))


def _matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    value = float(matthews_corrcoef(labels, preds))
    return value if np.isfinite(value) else 0.0


def _correlation(name: str, preds: np.ndarray, labels: np.ndarray) -> float:
    # A constant side has no defined correlation: scipy warns and returns NaN; we say 0.0.
    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    from scipy.stats import pearsonr, spearmanr

    value = float((pearsonr if name == "pearson" else spearmanr)(preds, labels)[0])
    return value if np.isfinite(value) else 0.0


def compute_metrics(spec: ScoredTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics of a set of predictions.

    Args:
        spec: the task; ``spec.metrics`` names what to compute.
        predictions: classification: logits or probabilities (N, K), argmax taken, or class ids
            (N,) of an integer dtype; regression: values (N,) or (N, 1).
        labels: (N,) class ids, or target values for regression.

    Returns:
        Each metric of ``spec.metrics`` (accuracy, f1, matthews, pearson, spearman) as a float,
        plus ``"score"``: :func:`score_of` of them. f1 is the F1 of class 1 for two classes (as
        GLUE), macro-averaged otherwise. Degenerate cases give 0.0 (see the module docstring).

    Raises:
        ValueError: no examples, shapes that disagree, or non-finite predictions.
    """
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if preds.dtype.kind == "f" and not np.isfinite(preds).all():
        raise ValueError(f"predictions of {spec.name} contain NaN or inf; the model has diverged")
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"{spec.name} is a regression: predictions must be (N,) or (N, 1), got {preds.shape}")
        preds, labels = preds.astype(np.float64), labels.astype(np.float64)
    elif preds.ndim == 2:
        if preds.shape[1] != spec.num_labels:
            raise ValueError(f"{spec.name} has {spec.num_labels} labels but the predictions have {preds.shape[1]} columns")
        preds = preds.argmax(axis=1)
    elif preds.ndim != 1 or preds.dtype.kind not in "iu":
        raise ValueError(f"{spec.name}: predictions must be logits (N, {spec.num_labels}) or integer class ids (N,)")
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels; they must pair up")

    results: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            results[name] = float(np.mean(preds == labels))
        elif name == "f1":
            results[name] = _f1(preds, labels, spec.num_labels)
        elif name == "matthews":
            results[name] = _matthews(preds, labels)
        elif name in REGRESSION_METRICS:
            results[name] = _correlation(name, preds, labels)
        else:
            raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRIC_NAMES)}")
    results[SCORE] = score_of(spec, results)
    return results


def score_of(spec: ScoredTask, metrics: dict[str, float]) -> float:
    """The task's single score: the mean of its metrics (GLUE: MRPC is mean(f1, accuracy)).

    Raises:
        ValueError: a metric of the task is missing from ``metrics``.
    """
    missing = [name for name in spec.metrics if name not in metrics]
    if missing:
        raise ValueError(f"the score of {spec.name} needs the metric(s) {missing}; got {sorted(metrics)}")
    return float(np.mean([metrics[name] for name in spec.metrics]))
