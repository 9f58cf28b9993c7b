"""CRAFT: Cross-layer Rank Adaptation via Frozen Tucker.

Stacks a model's attention projections across layers into (layers, out, in) tensors, takes
their HOSVD, freezes every factor and trains one small square matrix per mode and projection
type. Usable on its own, like peft: nothing here imports ray, mlflow or the search.

This folder is the method: ``tucker`` (HOSVD), ``targets`` and ``layouts`` (which projections,
fused ones split, stacked across layers), ``config``, ``adapter`` (the shared J matrices of one
stack), ``layer`` (one wrapped projection), ``factors`` (HOSVD factors computed once, cached),
``model`` (inject, save, load, merge, disable), ``modules`` (heads, swapping submodules),
``pretrained`` (the adapter directory, local or on the hub), ``budget`` (closed-form parameter
counts) and ``inspection`` (spectra and costs of ranks).
The training harness (tasks, data, run configs, trainer, baselines, jobs) is :mod:`craft.harness`;
its public names are also reachable from here (``craft.run_job``) and load on first use.
"""

import importlib

from .adapter import CraftAdapter
from .config import CONFIG_NAME, CraftConfig
from .factors import Factors, check_ranks, compute_factors
from .layer import MERGED_MEMORY_LIMIT, AdapterPart, CraftLinear, choose_compute, compute_dtype
from .model import ADAPTER_NAME, FACTORS_NAME, CraftModel, adapter_dtype, find_heads, get_craft_model
from .targets import (
    DEFAULT_TARGETS,
    SAME_WEIGHTS_RTOL,
    TargetStack,
    find_targets,
    sketch_distance,
    stack_weights,
    weights_fingerprint,
    weights_sketch,
)
from .tucker import Tucker, energy_kept, hosvd, reconstruct, truncate


def __getattr__(name: str):
    """The harness's public names (``craft.harness.__all__``), imported on first use: ``craft.run_job``."""
    if not name.startswith("__"):
        harness = importlib.import_module(".harness", __name__)
        if name in harness.__all__:
            return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADAPTER_NAME",
    "CONFIG_NAME",
    "FACTORS_NAME",
    "AdapterPart",
    "CraftAdapter",
    "CraftConfig",
    "CraftLinear",
    "CraftModel",
    "DEFAULT_TARGETS",
    "Factors",
    "TargetStack",
    "Tucker",
    "check_ranks",
    "choose_compute",
    "compute_factors",
    "energy_kept",
    "find_heads",
    "find_targets",
    "get_craft_model",
    "hosvd",
    "reconstruct",
    "stack_weights",
    "truncate",
    "weights_fingerprint",
    "weights_sketch",
    "sketch_distance",
    "SAME_WEIGHTS_RTOL",
    "MERGED_MEMORY_LIMIT",
    "adapter_dtype",
    "compute_dtype",
]
