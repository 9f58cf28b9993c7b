"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory ``<checkpoint_dir>/checkpoint`` holding

    trainable.safetensors   the trainable parameters (adapter and head) by parameter name
    optimizer.safetensors   optimizer state tensors as ``state.<index>.<key>``
    optimizer.json          param groups (hyperparameters, parameter names) and non-tensor state
    scheduler.json          the LR scheduler's state
    rng.safetensors         torch CPU (and CUDA) generator states as uint8 tensors
    rng.json                python ``random`` and numpy generator states
    trainer_state.json      the caller's position and history (written last)

It is written to a temporary directory and renamed into place; only the latest is kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

CHECKPOINT_NAME = "checkpoint"
_OLD = ".checkpoint-old"
_FORMAT = "craft-train-checkpoint/1"


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The complete checkpoint in ``checkpoint_dir``, or None when there is none."""
    for name in (CHECKPOINT_NAME, _OLD):  # the old one survives a crash between two renames
        path = Path(checkpoint_dir) / name
        if (path / "trainer_state.json").is_file():
            return path
    return None


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    checkpoint_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict
) -> Path:
    """Write a checkpoint of the training state atomically; returns its directory.

    Args:
        checkpoint_dir: where checkpoints live (created if needed).
        model: its trainable parameters are saved.
        optimizer: its state is flattened into tensors and JSON.
        scheduler: an LR scheduler with a JSON-ready ``state_dict``.
        state: JSON-ready data of the caller (position, history).
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".checkpoint-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()}, str(tmp / "trainable.safetensors"))
    tensors, meta = _flatten_optimizer(model, optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "rng.json").write_text(json.dumps(rng_meta))
    (tmp / "trainer_state.json").write_text(json.dumps({"format": _FORMAT, **state}))
    final, old = root / CHECKPOINT_NAME, root / _OLD
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    checkpoint_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict | None:
    """Restore parameters, optimizer, scheduler and RNG states; returns the caller's state.

    Returns None (and changes nothing) when ``checkpoint_dir`` holds no checkpoint.

    Raises:
        ValueError: the checkpoint was written for other trainable parameters.
    """
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    state = json.loads((path / "trainer_state.json").read_text())
    if state.pop("format", None) != _FORMAT:
        raise ValueError(f"{path} is not a craft training checkpoint ({_FORMAT}); delete it or pass another checkpoint_dir")
    saved = load_file(str(path / "trainable.safetensors"))
    own = _trainable(model)
    if set(saved) != set(own):
        diff = sorted(set(saved) ^ set(own))[:3]
        raise ValueError(
            f"checkpoint {path} holds other trainable parameters ({diff} ...); resume with the same method and config"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(saved[name])
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(model, optimizer, load_file(str(path / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    _set_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return state


def _flatten_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, other = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                other.setdefault(str(index), {})[key] = value
    groups = []
    for group, live in zip(state_dict["param_groups"], optimizer.param_groups):
        groups.append({**group, "param_names": [names[id(p)] for p in live["params"]]})
    return tensors, {"param_groups": groups, "state": other}


def _unflatten_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    live = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if live != [g["param_names"] for g in meta["param_groups"]]:
        raise ValueError("the checkpoint's optimizer holds other parameter groups than this run's; resume with the same config")
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        group.pop("param_names")
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON turned the tuple into a list
        groups.append(group)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["state"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
