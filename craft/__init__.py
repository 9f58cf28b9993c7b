"""CRAFT: Cross-layer Rank Adaptation via Frozen Tucker.

Stacks a model's attention projections across layers into (layers, out, in) tensors, takes
their HOSVD, freezes every factor and trains one small square matrix per mode and projection
type. Usable on its own, like peft: nothing here imports ray, mlflow or the search.
"""

from .config import CONFIG_NAME, CraftConfig
from .factors import Factors, check_ranks, compute_factors
from .layer import AdapterPart, CraftAdapter, CraftLinear, choose_compute
from .model import ADAPTER_NAME, CraftModel, get_craft_model
from .targets import DEFAULT_TARGETS, TargetStack, find_targets, stack_weights, weights_fingerprint
from .tucker import Tucker, energy_kept, hosvd, reconstruct, truncate

__all__ = [
    "ADAPTER_NAME",
    "CONFIG_NAME",
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
    "find_targets",
    "get_craft_model",
    "hosvd",
    "reconstruct",
    "stack_weights",
    "truncate",
    "weights_fingerprint",
]
