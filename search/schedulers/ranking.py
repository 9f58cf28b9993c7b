"""The order in which a rung promotes its trials: non-dominated sorting, then an epsilon-net.

Pure numpy (with moocore for the sorting): no Ray here. Objectives are the score (maximised)
and the adapter size (minimised), the size measured as log10(1 + parameters) like the
hypervolume of :mod:`search.results.pareto`: a 1K adapter against a 2K one weighs as much as 40K
against 80K.

Inside one front the order is a greedy epsilon-net (Schmucker et al. 2021, "Multi-objective
Asynchronous Successive Halving", EPS-NET; a farthest-point traversal): first the member with
the best score, so that with one adapter size the whole order is ASHA's order by score; then,
again and again, the member farthest from those already taken (the largest smallest distance,
objectives scaled by their range over the rung). Ties go to the trial that reached the rung
first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["promotion_order", "promoted_count", "size_axis"]


def size_axis(parameters: float) -> float:
    """The size objective as it is compared: log10(1 + adapter parameters)."""
    return math.log10(1.0 + float(parameters))


def promoted_count(n: int, reduction_factor: float) -> int:
    """How many of the ``n`` trials at a rung go on: ceil(n / reduction_factor), at least 1."""
    return max(1, math.ceil(n / reduction_factor))


def _epsilon_net(members: list[int], points: np.ndarray) -> list[int]:
    """``members`` (indices into ``points``, in arrival order) as a farthest-point traversal."""
    first = min(members, key=lambda i: (-points[i, 0], points[i, 1], i))  # best score, then smallest, then earliest
    taken, left = [first], [i for i in members if i != first]
    while left:
        # (left, taken) distances in the scaled objective space; the smallest per candidate.
        gaps = np.linalg.norm(points[left][:, None, :] - points[taken][None, :, :], axis=-1).min(axis=1)  # (left,)
        pick = left[int(np.argmax(gaps))]  # argmax keeps the first of equal gaps: the earliest arrival
        taken.append(pick)
        left.remove(pick)
    return taken


def promotion_order(scores: Sequence[float], sizes: Sequence[float]) -> list[int]:
    """The trials of one rung, best first: by front, then epsilon-net inside each front.

    Args:
        scores: each trial's score at the rung (higher is better), in arrival order.
        sizes: each trial's adapter parameters (fewer is better), same order.

    Returns:
        Indices into ``scores`` from the first to promote to the last.
    """
    if len(scores) != len(sizes):
        raise ValueError(f"{len(scores)} scores but {len(sizes)} sizes")
    if not len(scores):
        return []
    import moocore

    points = np.array([[float(s), size_axis(p)] for s, p in zip(scores, sizes)], dtype=float)  # (n, 2)
    fronts = moocore.pareto_rank(points, maximise=[True, False])  # (n,) 0 = non-dominated
    span = points.max(axis=0) - points.min(axis=0)  # (2,)
    scaled = (points - points.min(axis=0)) / np.where(span > 0, span, 1.0)  # (n, 2) in [0, 1]; a flat axis stays 0
    order: list[int] = []
    for front in sorted(set(fronts.tolist())):
        members = [i for i in range(len(points)) if fronts[i] == front]
        order.extend(_epsilon_net(members, scaled))
    return order
