"""The training harness around CRAFT: tasks and data, run configs, the trainer, baselines, jobs.

Everything here uses the method (:mod:`craft`) and nothing of the method uses it: a reader who
wants CRAFT alone reads ``craft/`` without this folder. A run config's path through the harness:

    runconfig (the YAML) -> job.run_job -> tasks.load_task (taskdata) -> data.tokenize_task
    -> hub.load_model -> methods.apply_method (CRAFT or a baseline) -> trainer.train
    (checkpoint, distributed) -> metrics.compute_metrics -> methods.save_adapter
"""

from .data import make_loader, tokenize_task
from .hub import DEMO_MODEL, load_model, load_tokenizer
from .job import JobResult, run_job
from .methods import AdaptedModel, apply_method, merged_model, parameter_groups, save_adapter
from .metrics import compute_metrics
from .runconfig import METHODS, RunConfig, load_run_config
from .tasks import GLUE_TASKS, Task, TaskSpec, load_task
from .trainer import EvalEvent, TrainResult, evaluate, train

__all__ = [
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
]
