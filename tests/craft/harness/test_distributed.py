"""Data-parallel helpers on a real 2-process gloo group: the update equals one process's on the
whole batch, for batches that split evenly, unevenly, and smaller than the world; each process
draws its slice's dropout masks from a stream of its own, the same at the same batch."""

from __future__ import annotations

import gc
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from craft.harness import distributed


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _loss(model, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])  # mean over the batch


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(n, 4, generator=g), "y": torch.randint(0, 3, (n,), generator=g)} for n in (4, 3, 1)]


def _step(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One DDP step on this rank's shard: the global loss and the averaged gradients. The DDP
    wrapper (and its reducer) is freed on return, while the process group is still registered."""
    model = _model()
    ddp = distributed.wrap(model, device)
    local, weight = distributed.shard(batch)
    loss = _loss(ddp, local)
    value = distributed.sum_across([loss.item() * weight], device)[0] / 2
    (loss * weight).backward()
    return value, model.weight.grad.clone(), model.bias.grad.clone()


def _dropout_draws() -> torch.Tensor:
    """What dropout draws at batches 3, 4, then 3 again of epoch 0, after other draws each time."""
    rows = []
    for batch in (3, 4, 3):
        torch.rand(5)  # whatever the stream drew before
        distributed.seed_slice(0, 0, batch)
        rows.append(torch.rand(8))
    return torch.stack(rows)  # (3, 8)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))  # fail, never hang
    try:
        device = torch.device("cpu")
        assert distributed.world_size() == 2 and distributed.rank() == rank and distributed.is_main() == (rank == 0)
        results = [_step(batch, device) for batch in _batches()]
        draws = [torch.empty(3, 8), torch.empty(3, 8)]
        dist.all_gather(draws, _dropout_draws())
        assert distributed.broadcast_flag(rank == 0, device) is True  # rank 0's decision everywhere
        try:
            distributed.check_same(rank, "the rank", device)
            raise AssertionError("check_same accepted different values")
        except ValueError as err:
            assert "the workers disagree on the rank (0 to 1)" in str(err)
        if rank == 0:
            tensors = {"draws.0": draws[0], "draws.1": draws[1]}
            for i, (value, weight_grad, bias_grad) in enumerate(results):
                tensors.update({f"{i}.value": torch.tensor([value]), f"{i}.weight": weight_grad, f"{i}.bias": bias_grad})
            save_file(tensors, out)
    finally:
        # A DDP reducer that outlives the group destroys it while holding the GIL, and deadlocks
        # with gloo's worker thread: every reducer is gone before the group is.
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_on_even_uneven_and_tiny_batches(tmp_path):
    out = str(tmp_path / "results.safetensors")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    saved = load_file(out)
    for i, batch in enumerate(_batches()):
        value, weight_grad, bias_grad = saved[f"{i}.value"].item(), saved[f"{i}.weight"], saved[f"{i}.bias"]
        model = _model()
        loss = _loss(model, batch)
        loss.backward()
        assert value == pytest.approx(loss.item(), abs=1e-6)
        torch.testing.assert_close(weight_grad, model.weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bias_grad, model.bias.grad, atol=1e-6, rtol=1e-5)
    mine, theirs = saved["draws.0"], saved["draws.1"]
    assert torch.equal(mine[0], mine[2]) and torch.equal(theirs[0], theirs[2])  # a batch's masks, wherever the stream was
    assert not torch.equal(mine[0], mine[1])  # another batch, other masks
    assert not torch.equal(mine[0], theirs[0]) and not torch.equal(mine[1], theirs[1])  # each slice its own masks


def test_one_process_is_a_no_op():
    batch = _batches()[0]
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(batch) == (batch, 1.0)
    model = _model()
    assert distributed.wrap(model, torch.device("cpu")) is model
    assert distributed.sum_across([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    distributed.check_same(3, "anything", torch.device("cpu"))
    state = torch.get_rng_state()
    distributed.seed_slice(0, 0, 3)  # one process keeps the stream seeded at the start
    assert torch.equal(torch.get_rng_state(), state)
