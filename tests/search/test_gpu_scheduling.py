"""GPU scheduling without a GPU: a Ray node that declares one (``num_gpus=1``).

Ray schedules fractional-GPU trials against the declared device and sets each trial's device
assignment, which the trials record; torch finds no CUDA here, so ``train.device: auto`` trains on
the CPU and says so in one logged line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from search.names import TRIAL_ID_TAG
from search.spec import load_sweep_spec
from search.sweep import run_sweep
from spaces import preset_path

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def ray_with_a_declared_gpu():
    """This module's Ray instance: 2 CPUs and 1 GPU it does not have."""
    context = ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield context
    ray.shutdown()


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_quarter_gpu_trials_run_four_at_a_time_record_their_gpu_and_fall_back_to_the_cpu(ray_with_a_declared_gpu, tmp_path):
    spec = load_sweep_spec(preset_path("smoke.yaml"), [
        "method=lora", "search.num_samples=4", "search.max_concurrent_trials=4", "search.scheduler=fifo",
        "search.points_to_evaluate=null", "search.max_budget=16", "resources.cpu=0.5", "resources.gpu=0.25",
        "train.device=auto",
    ], name="gpu-quarters")  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(spec, tracking_uri=uri, storage=str(tmp_path / "sweeps"), cache_dir=tmp_path / "factors", progress=False)
    assert result.count("complete") == 4
    intervals = [(t.metrics["started_at"], t.metrics["finished_at"]) for t in result.trials]
    assert _most_at_once(intervals) == 4  # 4 x 0.25 GPU (and 4 x 0.5 CPU) fit the node together
    assert {t.metrics["gpu_ids"] for t in result.trials} == {"0"}  # Ray's assignment, as each trial saw it
    assert {t.metrics["device"] for t in result.trials} == {"cpu"}

    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("craft-smoke").experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")  # fmt: skip
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in children) == sorted(t.trial_id for t in result.trials)
    assert {r.data.tags["craft.gpu_ids"] for r in children} == {"0"}
    assert {r.data.tags["craft.device"] for r in children} == {"cpu"}

    # One line per trial in the workers' logs: a GPU was assigned, CUDA is absent, the CPU trains.
    logs = Path(ray_with_a_declared_gpu.address_info["session_dir"]) / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    for trial in result.trials:
        lines = [line for line in text.splitlines() if f"trial {trial.trial_id}: Ray assigned GPU 0" in line]
        assert len(lines) == 1 and "CUDA is not available here; training on the CPU" in lines[0], lines
