"""Names of the metrics a trial reports, defined once for the trainable, searcher, scheduler and trackers."""

__all__ = [
    "SCORE",
    "FINAL_SCORE",
    "ADAPTER_PARAMETERS",
    "STEP",
    "ELAPSED",
    "NODE_ID",
    "GPU_IDS",
    "TRIAL_ID_TAG",
    "OUTCOME_TAG",
    "PRUNED_TAG",
    "CONFIG_TAG",
    "TRAIN_SECONDS",
    "PERSIST_SECONDS",
    "REPORTED_AT",
]

SCORE = "score"  # the first evaluation split's score at this evaluation (the schedulers' metric)
FINAL_SCORE = "final_score"  # the score at the end of the full budget: only in a completed trial's last report
ADAPTER_PARAMETERS = "adapter_parameters"  # trainable parameters outside the head (minimised)
STEP = "step"  # optimiser steps done (the schedulers' time attribute)
ELAPSED = "elapsed_s"  # seconds of training so far
REPORTED_AT = "reported_at"  # wall-clock time of the report (orders the reports of concurrent trials)
PERSIST_SECONDS = "persist_s"  # seconds the trial has spent so far copying run/ and its checkpoint to the storage
TRAIN_SECONDS = "train_s"  # seconds the full training took: only in a completed trial's last report
NODE_ID = "node_id"  # the Ray node the trial ran on
GPU_IDS = "gpu_ids"  # the GPUs Ray assigned the trial (ray.get_gpu_ids(), comma-separated; empty without)

TRIAL_ID_TAG = "craft.trial_id"  # MLflow tag: the Ray Tune trial of a child run
OUTCOME_TAG = "craft.outcome"  # MLflow tag: complete, pruned or failed
PRUNED_TAG = "craft.pruned"  # MLflow tag: true when the scheduler stopped the trial early
CONFIG_TAG = "craft.config"  # MLflow tag: the trial's sampled values, JSON by dotted key
