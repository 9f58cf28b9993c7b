"""Data-parallel training helpers over ``torch.distributed`` (whoever set up the process group).

When a process group with more than one process is initialised (Ray Train's TorchTrainer does it
for ``craft-search train --workers N``), every process holds the whole model and sees the same
shuffled global batches; each takes its slice of every batch, DistributedDataParallel averages
the gradients, and the loss is scaled so that the update equals one process training the whole
batch. Only rank 0 writes files and reports. Without a process group every helper is a no-op.

Dropout is the one thing that differs: its masks come from each process's torch RNG, drawn over
the shape of what that process runs, so no slice gets the masks one process would draw for those
examples. :func:`seed_slice` gives every slice its own stream, so masks are independent from
example to example as in one process: N workers train what one process would in distribution,
and in value only without dropout.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "is_main", "wrap", "shard", "sum_across", "broadcast_flag", "check_same", "seed_slice"]


def world_size() -> int:
    """Processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """True in the process that writes files and reports (rank 0)."""
    return rank() == 0


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes train, else ``model`` itself."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """This process's slice of a global batch, and the factor its mean loss is scaled by.

    The factor ``n_local * world / n_global`` makes the averaged gradient equal to the global
    batch's. A process whose slice is empty (a last batch smaller than the world) gets one
    example with factor 0: it still runs forward and backward, which DDP requires of every rank.
    """
    world = world_size()
    if world == 1:
        return batch, 1.0
    total = next(iter(batch.values())).shape[0]
    index = torch.tensor_split(torch.arange(total), world)[rank()]  # (n_local,)
    if len(index) == 0:
        return {k: v[-1:] for k, v in batch.items()}, 0.0
    return {k: v[index] for k, v in batch.items()}, len(index) * world / total


def seed_slice(seed: int, epoch: int, batch: int) -> None:
    """Seed this process's torch RNG (dropout's) for its slice of batch ``batch`` of ``epoch``.

    Seeded alike, every process would draw the same masks for its slice, so that example i of
    each slice shared them. Seeded from (seed, epoch, batch, rank), the slices draw independent
    masks, as the examples of one process's batch do, and a resumed run draws the masks of an
    uninterrupted one without any RNG state in the checkpoint. A no-op in one process, whose
    stream stays the one seeded at the start.
    """
    if world_size() == 1:
        return
    key = hashlib.blake2b(f"{seed}/{epoch}/{batch}/{rank()}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(key, "little"))  # CPU and every CUDA device


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over every process (``values`` itself with one)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # (len(values),)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` in every process (a decision only rank 0 can make, such as stopping)."""
    if world_size() == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)  # (1,)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def check_same(value: int, what: str, device: torch.device) -> None:
    """Raise in every process when the processes disagree on ``value`` (e.g. the resumed step).

    Raises:
        ValueError: naming ``what``, the lowest and the highest value.
    """
    if world_size() == 1:
        return
    low = torch.tensor([value], dtype=torch.int64, device=device)  # (1,)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise ValueError(f"the workers disagree on {what} ({low.item()} to {high.item()})")
