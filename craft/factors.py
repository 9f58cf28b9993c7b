"""HOSVD factors of a model's target stacks, computed once at maximum ranks and sliced per use.

A :class:`Factors` is what a search caches: for every projection type the float64 core and
factors at the largest ranks a sweep may ask for, the full mode spectra, the targets and a
fingerprint of the base weights. It is stored as safetensors (no pickle).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CraftConfig
from .targets import Site, TargetStack, find_targets, stack_weights, weights_fingerprint
from .tucker import Tucker, hosvd, truncate

__all__ = ["Factors", "compute_factors", "check_ranks"]

_FORMAT = "craft-factors/1"


@dataclass
class Factors:
    """Per projection type, the HOSVD of its (layers, out, in) stack at ``max_ranks``.

    Attributes:
        stacks: the targets, in order, with their modules and stack shapes.
        tuckers: projection-type name -> float64 :class:`Tucker` at ``max_ranks``
            (clipped to each stack's axis lengths).
        max_ranks: (rank_layers, rank_out, rank_in) the decomposition was computed at.
        fingerprint: :func:`weights_fingerprint` of the base weights.
    """

    stacks: list[TargetStack]
    tuckers: dict[str, Tucker]
    max_ranks: tuple[int, int, int]
    fingerprint: str

    @property
    def target_names(self) -> list[str]:
        """The projection-type names, in order."""
        return [s.name for s in self.stacks]

    def sliced(self, name: str, ranks: Sequence[int]) -> Tucker:
        """The rank-``ranks`` decomposition of one projection type, by slicing."""
        tucker = self.tuckers[name]
        have = tucker.ranks
        if any(r > h for r, h in zip(ranks, have)):
            raise ValueError(
                f"ranks {tuple(ranks)} exceed the cached factors of {name!r}, computed at {have}; "
                "recompute the factors with larger max_ranks"
            )
        return truncate(tucker, ranks)

    def rebound(self, stacks: list[TargetStack], fingerprint: str) -> Factors:
        """The same decompositions, declared for ``stacks`` of a model whose weights have
        ``fingerprint``: for factors stored with an adapter, loaded onto the same base in another
        dtype (the caller has checked that the weights are the same) or forced onto another.

        Raises:
            ValueError: the stacks have other names or shapes than the ones decomposed.
        """
        have = [(s.name, s.shape) for s in self.stacks]
        want = [(s.name, s.shape) for s in stacks]
        if have != want:
            raise ValueError(
                f"the factors decompose stacks {have} (name, layers x out x in), the model has {want}; "
                "load the adapter onto the architecture it was trained on"
            )
        return Factors(list(stacks), self.tuckers, self.max_ranks, fingerprint)

    def _flat(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, t in self.tuckers.items():
            tensors[f"{name}/core"] = t.core.contiguous().cpu()
            for axis, (factor, spectrum) in zip(("layers", "out", "in"), zip(t.factors, t.spectra)):
                tensors[f"{name}/u_{axis}"] = factor.contiguous().cpu()
                tensors[f"{name}/spectrum_{axis}"] = spectrum.contiguous().cpu()
        meta = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "max_ranks": json.dumps(list(self.max_ranks)),
            "stacks": json.dumps(
                [
                    {"name": s.name, "shape": list(s.shape), "sites": [[x.module_name, x.rows] for x in s.sites]}
                    for s in self.stacks
                ]
            ),
        }
        return tensors, meta

    @classmethod
    def _from_flat(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str) -> Factors:
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{source} is not a CRAFT factors file ({_FORMAT}); recompute the factors")
        stacks = [
            TargetStack(s["name"], tuple(Site(m, tuple(r) if r else None) for m, r in s["sites"]), tuple(s["shape"]))
            for s in json.loads(meta["stacks"])
        ]
        tuckers = {
            s.name: Tucker(
                core=tensors[f"{s.name}/core"],
                factors=[tensors[f"{s.name}/u_{a}"] for a in ("layers", "out", "in")],
                spectra=[tensors[f"{s.name}/spectrum_{a}"] for a in ("layers", "out", "in")],
            )
            for s in stacks
        }
        return cls(stacks, tuckers, tuple(json.loads(meta["max_ranks"])), meta["fingerprint"])

    def to_numpy(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Plain numpy arrays and string metadata: what a Ray object store shares without copies."""
        tensors, meta = self._flat()
        return {k: v.numpy() for k, v in tensors.items()}, meta

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> Factors:
        """The inverse of :meth:`to_numpy`; tensors share the arrays' memory (never written to)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # object-store arrays are read-only
            tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        return cls._from_flat(tensors, meta, "the shared factors")

    def save(self, path: str | Path) -> Path:
        """Write the factors to one safetensors file (tensors plus JSON metadata), atomically."""
        tensors, meta = self._flat()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file(tensors, str(partial), metadata=meta)
        partial.replace(path)  # readers never see half a file, even with several sweeps writing
        return path

    @classmethod
    def load(cls, path: str | Path) -> Factors:
        """Read factors written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no factors file at {path}; compute them with craft.compute_factors and save them")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a CRAFT factors file ({_FORMAT}); recompute the factors")
        return cls._from_flat(load_file(str(path)), meta, str(path))


def check_ranks(stacks: list[TargetStack], ranks: Sequence[int]) -> None:
    """Raise a ValueError naming the axis and the fix when a rank exceeds a stack's axis."""
    for stack in stacks:
        for axis, rank, length in zip(("rank_layers", "rank_out", "rank_in"), ranks, stack.shape):
            if rank > length:
                raise ValueError(
                    f"{axis}={rank} exceeds the {axis.removeprefix('rank_')} axis of {stack.name!r} "
                    f"(stack {stack.shape[0]}x{stack.shape[1]}x{stack.shape[2]}, layers x out x in); "
                    f"choose {axis} <= {length}"
                )


def compute_factors(
    model: nn.Module,
    config_or_targets: CraftConfig | Sequence[str] | None = None,
    max_ranks: Sequence[int] | None = None,
) -> Factors:
    """HOSVD of every target stack of ``model`` at ``max_ranks``.

    Args:
        model: the base model (not yet wrapped).
        config_or_targets: a :class:`CraftConfig` (its ``target_modules`` and, when
            ``max_ranks`` is None, its ranks), a list of target names, or None for the
            detected query and value projections.
        max_ranks: (rank_layers, rank_out, rank_in) to decompose at; None takes the config's
            ranks, or every axis in full when no config is given.

    Returns:
        The :class:`Factors`, float64, on the CPU.
    """
    if isinstance(config_or_targets, CraftConfig):
        targets = config_or_targets.target_modules
        max_ranks = config_or_targets.ranks if max_ranks is None else max_ranks
    else:
        targets = None if config_or_targets is None else list(config_or_targets)
    stacks = find_targets(model, targets)
    if max_ranks is not None:
        max_ranks = tuple(int(r) for r in max_ranks)
        if len(max_ranks) != 3 or min(max_ranks) < 1:
            raise ValueError(f"max_ranks must be three positive ranks (layers, out, in), got {max_ranks}")
        check_ranks(stacks, max_ranks)
    tuckers = {}
    for stack in stacks:
        ranks = stack.shape if max_ranks is None else max_ranks
        tuckers[stack.name] = hosvd(stack_weights(model, stack).cpu(), ranks)
    return Factors(
        stacks=stacks,
        tuckers=tuckers,
        max_ranks=tuple(max_ranks) if max_ranks is not None else tuple(max(s.shape[i] for s in stacks) for i in range(3)),
        fingerprint=weights_fingerprint(model, stacks),
    )
