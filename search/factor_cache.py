"""The sweep's HOSVD factor cache: decomposed once, shared through the Ray object store, kept on disk.

The driver decomposes each (model, targets) at the sweep's largest ranks before trials start,
or loads the decomposition from the on-disk cache (safetensors, keyed by a fingerprint of the
target weights) so that a second sweep on the same model decomposes nothing. The factors go
into the object store as numpy arrays (read zero-copy by every trial on a node) and a named
actor hands their references to trials, which slice them to their ranks. The actor counts
decompositions, disk loads and fetches per node.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray

from craft.factors import Factors, compute_factors
from craft.targets import find_targets, weights_fingerprint

from .model_facts import FactorRequest

__all__ = ["FactorCache", "default_cache_dir", "factor_key", "cached_factors", "publish_factors", "fetch_factors"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/craft-search/factors`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "craft-search" / "factors"


def factor_key(targets: Any) -> str:
    """The cache's key for a set of CRAFT targets (None: the detected ones)."""
    return json.dumps(list(targets) if targets else None)


@ray.remote(num_cpus=0)
class FactorCache:
    """Holds the object references of a sweep's factors and counts how they were obtained."""

    def __init__(self) -> None:
        self._refs: dict[str, list] = {}
        self._stats: dict[str, Any] = {"decompositions": 0, "disk_loads": 0, "fetches": {}}

    def publish(self, key: str, holder: list, source: str) -> None:
        """Keep ``holder[0]`` (an ObjectRef, wrapped so Ray does not resolve it) under ``key``."""
        self._refs[key] = holder
        self._stats["decompositions" if source == "computed" else "disk_loads"] += 1

    def lookup(self, key: str, node_id: str) -> list | None:
        """The wrapped reference for ``key`` (None when absent); counts a fetch from ``node_id``."""
        fetches = self._stats["fetches"]
        fetches[node_id] = fetches.get(node_id, 0) + 1
        return self._refs.get(key)

    def stats(self) -> dict[str, Any]:
        """Decompositions, disk loads and fetches per node so far."""
        return dict(self._stats)


def cached_factors(model: Any, request: FactorRequest, cache_dir: str | Path) -> tuple[Factors, str]:
    """The factors of ``request`` on ``model``: from disk when a large enough copy exists, else computed and saved.

    Returns:
        The factors and ``"disk"`` or ``"computed"``.
    """
    stacks = find_targets(model, request.targets)
    fingerprint = weights_fingerprint(model, stacks)
    path = Path(cache_dir) / f"{fingerprint[:40]}.safetensors"
    wanted = tuple(request.max_ranks)
    if path.is_file():
        try:
            found = Factors.load(path)
        except (ValueError, OSError):  # unreadable or another format: decompose again and replace it
            found = None
        if found is not None and found.fingerprint == fingerprint and all(h >= w for h, w in zip(found.max_ranks, wanted)):
            return found, "disk"
        if found is not None and found.fingerprint == fingerprint:
            wanted = tuple(max(h, w) for h, w in zip(found.max_ranks, wanted))  # grow, never shrink, the cached ranks
    factors = compute_factors(model, list(request.targets) if request.targets else None, wanted)
    factors.save(path)
    return factors, "computed"


def publish_factors(cache: Any, model: Any, requests: list[FactorRequest], cache_dir: str | Path) -> None:
    """Put every request's factors in the object store and register them with the ``cache`` actor."""
    for request in requests:
        factors, source = cached_factors(model, request, cache_dir)
        ref = ray.put(factors.to_numpy())
        ray.get(cache.publish.remote(factor_key(request.targets), [ref], source))


def fetch_factors(cache_name: str, targets: Any) -> Factors:
    """In a trial: the sweep's factors for ``targets``, read from the object store (no decomposition).

    Raises:
        RuntimeError: the sweep's cache holds no factors for these targets.
    """
    cache = ray.get_actor(cache_name)
    holder = ray.get(cache.lookup.remote(factor_key(targets), ray.get_runtime_context().get_node_id()))
    if holder is None:
        raise RuntimeError(f"the factor cache {cache_name!r} holds no factors for targets {targets}")
    arrays, meta = ray.get(holder[0])
    return Factors.from_numpy(arrays, meta)
