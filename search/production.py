"""Production training, data-parallel on Ray Train: ``craft-search train CONFIG --workers N``.

A TorchTrainer starts N workers (gloo on CPUs, nccl on GPUs); each runs
:func:`craft.harness.job.run_job` with the same config and seed, takes its slice of every global
batch, and DistributedDataParallel averages the gradients (:mod:`craft.harness.distributed`), so
N workers train what one process would, N times wider: the same weights without dropout, the same
only in distribution with it (each worker draws the dropout masks of its own slice). Every input
check happens in the driver before an MLflow run exists; rank 0 logs every evaluation into that
run, writes ``output_dir`` (adapter, merged model, metrics) on its node and reports the job's
summary to Ray Train, where the driver reads it; the driver closes the run.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft.harness.job import prepare_job
from craft.harness.runconfig import RunConfig

from .tracking.runs import RunTracker, check_tracking_uri, resolve_tracking_uri

__all__ = ["DistributedJob", "train_distributed"]

SUMMARY_KEY = "job_summary"  # rank 0's metrics.json, as JSON text, in the Ray Train result


@dataclass
class DistributedJob:
    """A finished data-parallel job: its ``metrics.json`` summary and where it was tracked."""

    summary: dict[str, Any]
    workers: int
    backend: str
    tracking_uri: str | None
    run_id: str | None


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: threads = its CPUs, train, rank 0 logs to the driver's MLflow run."""
    import ray.train
    import torch

    from craft.harness.job import run_job

    from .runner import event_metrics, log_job

    torch.set_num_threads(config["threads"])  # the CPUs this worker asked for, not the node's
    run = RunConfig.from_dict(config["run"])
    main = ray.train.get_context().get_world_rank() == 0
    tracker = RunTracker(config["uri"], run.tracking.experiment, run_id=config["run_id"]) if main and config["run_id"] else None

    def report(event) -> None:
        tracker.log_metrics(event_metrics(event), step=event.step)

    job = run_job(run, callback=report if tracker else None, resume=config["resume"], progress=False)
    if tracker is not None:
        log_job(tracker, job)
    # Every worker reports once (Ray Train expects as many reports from each). Rank 0's report
    # carries the job's summary and, as a checkpoint, its metrics.json: Ray Train keeps the metrics
    # of the latest report with a checkpoint as its result, which the driver reads wherever rank 0
    # ran (no file on a disk the driver shares).
    summary = json.dumps(job.summary())
    if main:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "metrics.json").write_text(summary + "\n")
            ray.train.report({SUMMARY_KEY: summary}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report({SUMMARY_KEY: summary})
    # Ray Train destroys the process group after this returns. A DDP reducer still alive then (in
    # a reference cycle) would destroy the group itself while holding the GIL, and deadlock with
    # gloo's worker thread: collect every one while the group is registered.
    del job
    gc.collect()


def _check_cluster(workers: int, cpus: float, use_gpu: bool) -> None:
    """Refuse workers that no nodes of the cluster, running or ones its autoscaler may add, can hold."""
    from cluster.capacity import check_capacity

    what = f"--workers {workers} with {cpus:g} CPU" + (" and 1 GPU" if use_gpu else "") + " each"
    check_capacity({"CPU": cpus, "GPU": 1 if use_gpu else 0}, workers, what, "use fewer workers or a larger cluster (--address)")


def train_distributed(
    run: RunConfig,
    workers: int,
    *,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    resume: bool = False,
    storage: str | None = None,
) -> DistributedJob:
    """Train ``run`` data-parallel on ``workers`` Ray Train workers, tracked in MLflow.

    GPUs are used when ``run.train.device`` is ``auto`` or ``cuda`` and the cluster has one per
    worker (backend nccl); otherwise CPUs (backend gloo).

    Args:
        run: the validated run config (an exported one, or any).
        workers: processes training together (at least 2; one is plain ``train``).
        address: the Ray cluster (default: the one initialised here, else a new local one).
        cpus_per_worker: CPUs (and torch threads) of each worker.
        resume: continue from ``output_dir/checkpoint``; every worker must see it (shared storage).
        storage: Ray Train's storage path (default ``<output_dir>/ray``).

    Raises:
        ValueError: bad input, too few CPUs or GPUs in the cluster, an unreachable server.
    """
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.capacity import can_hold
    from cluster.connect import connect_ray

    from .runner import open_tracker

    if workers < 2:
        raise ValueError(f"--workers must be at least 2 for data-parallel training, got {workers}; leave it out for one process")
    if cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be positive, got {cpus_per_worker}")
    run.output_dir = str(Path(run.output_dir).resolve())  # workers may start elsewhere
    uri = resolve_tracking_uri(run.tracking.uri) if run.tracking.enabled else None
    if uri:
        check_tracking_uri(uri)
        run.tracking.uri = uri  # the workers log where the driver does
    del prepare_job(run).adapted  # every input check, before an MLflow run exists
    # gloo picks its network interface by resolving the host name, which on some machines names an
    # address that is not theirs: the workers then wait for each other until a 30-minute timeout.
    # On a Ray started here every worker is on this machine, so loopback is always right.
    connect_ray(address, local_env={"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")})
    use_gpu = run.train.device in ("auto", "cuda") and can_hold({"CPU": cpus_per_worker, "GPU": 1}, workers)
    if run.train.device.startswith("cuda") and not use_gpu:
        raise ValueError(
            f"train.device={run.train.device} but the Ray cluster has fewer than {workers} GPUs; set train.device: cpu"
        )
    _check_cluster(workers, cpus_per_worker, use_gpu)
    backend = "nccl" if use_gpu else "gloo"
    tracker = open_tracker(run, resume) if uri else None
    config = {
        "run": run.to_dict(),
        "uri": uri,
        "run_id": tracker.run_id if tracker else None,
        "resume": resume,
        "threads": max(1, int(cpus_per_worker)),
    }
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=backend),
        run_config=TrainRunConfig(
            name=f"{Path(run.output_dir).name}-{uuid.uuid4().hex[:6]}",
            storage_path=storage or str(Path(run.output_dir) / "ray"),
        ),
    )
    try:
        if tracker is not None:
            tracker.set_tags({"craft.workers": workers, "craft.backend": backend})
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException as err:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise _one_line(err) from None
    if tracker is not None:
        tracker.end("FINISHED")
    summary = json.loads(result.metrics[SUMMARY_KEY])
    return DistributedJob(summary, workers, backend, uri, tracker.run_id if tracker else None)


def _one_line(err: BaseException) -> BaseException:
    """The worker's own error (ValueError, FloatingPointError) out of Ray Train's wrapper."""
    failures = getattr(err, "worker_failures", None) or {}
    for candidate in (err, getattr(err, "cause", None), *failures.values()):
        if isinstance(candidate, (ValueError, FloatingPointError)):
            return type(candidate)(str(candidate).strip().splitlines()[-1])
    text = str(err).strip().splitlines()
    if os.environ.get("CRAFT_DEBUG"):
        return err
    return RuntimeError(f"data-parallel training failed: {text[-1] if text else type(err).__name__}")
