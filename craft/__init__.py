"""CRAFT: Cross-layer Rank Adaptation via Frozen Tucker.

Stacks a model's attention projections across layers into (layers, out, in) tensors, takes
their HOSVD, freezes every factor and trains one small square matrix per mode and projection
type. Usable on its own, like peft: nothing here imports ray, mlflow or the search.
"""

from .adapter import CraftAdapter
from .config import CONFIG_NAME, CraftConfig
from .data import make_loader, tokenize_task
from .factors import Factors, check_ranks, compute_factors
from .hub import DEMO_MODEL, load_model, load_tokenizer
from .job import JobResult, run_job
from .layer import MERGED_MEMORY_LIMIT, AdapterPart, CraftLinear, choose_compute, compute_dtype
from .methods import AdaptedModel, apply_method, merged_model, parameter_groups, save_adapter
from .metrics import compute_metrics
from .model import ADAPTER_NAME, CraftModel, adapter_dtype, find_heads, get_craft_model
from .runconfig import METHODS, RunConfig, load_run_config
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
from .tasks import GLUE_TASKS, Task, TaskSpec, load_task
from .trainer import EvalEvent, TrainResult, evaluate, train
from .tucker import Tucker, energy_kept, hosvd, reconstruct, truncate

__all__ = [
    "ADAPTER_NAME",
    "DEMO_MODEL",
    "GLUE_TASKS",
    "METHODS",
    "AdaptedModel",
    "EvalEvent",
    "JobResult",
    "RunConfig",
    "Task",
    "TaskSpec",
    "TrainResult",
    "apply_method",
    "compute_metrics",
    "evaluate",
    "find_heads",
    "load_model",
    "load_run_config",
    "load_task",
    "load_tokenizer",
    "make_loader",
    "merged_model",
    "parameter_groups",
    "run_job",
    "save_adapter",
    "tokenize_task",
    "train",
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
    "weights_sketch",
    "sketch_distance",
    "SAME_WEIGHTS_RTOL",
    "MERGED_MEMORY_LIMIT",
    "adapter_dtype",
    "compute_dtype",
]
