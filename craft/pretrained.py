"""The adapter directory: what :meth:`CraftModel.save_pretrained` writes and ``from_pretrained`` reads.

A directory (local, or a Hugging Face Hub repository fetched into the hub cache) holds

    craft_config.json            the :class:`~craft.config.CraftConfig`
    adapter_model.safetensors    J matrices, head weights, a sketch of the base target weights;
                                 metadata: format, fingerprint of the base weights, targets
    craft_factors.safetensors    optional: the float64 HOSVD factors at the trained ranks
                                 (a :class:`~craft.factors.Factors`), so loading runs no HOSVD

Directories written before the factors were stored (no ``craft_factors.safetensors``) load as
before: the factors are recomputed from the base weights.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import CONFIG_NAME, CraftConfig
from .factors import Factors
from .targets import SAME_WEIGHTS_RTOL, TargetStack, sketch_distance, weights_sketch

__all__ = ["ADAPTER_NAME", "FACTORS_NAME", "SavedAdapter", "resolve_adapter_dir", "write_adapter", "read_adapter", "check_base"]

ADAPTER_NAME = "adapter_model.safetensors"
FACTORS_NAME = "craft_factors.safetensors"
_FORMAT = "craft-adapter/1"
_SKETCH_PREFIX = "base_sketch."  # weights_sketch of the base, saved beside the J matrices


@dataclass
class SavedAdapter:
    """What an adapter directory holds.

    Attributes:
        directory: where it was read from.
        config: the adapter's config.
        state: J matrices and head weights, in :meth:`CraftModel.adapter_state_dict`'s layout.
        sketch: :func:`~craft.targets.weights_sketch` of the base it was trained on (empty for
            the oldest directories).
        fingerprint: :func:`~craft.targets.weights_fingerprint` of that base.
        factors: the stored factors at the trained ranks, or None (recompute them).
    """

    directory: Path
    config: CraftConfig
    state: dict[str, torch.Tensor]
    sketch: dict[str, torch.Tensor]
    fingerprint: str
    factors: Factors | None


def resolve_adapter_dir(
    path_or_id: str | Path, revision: str | None = None, cache_dir: str | Path | None = None, token: str | None = None
) -> Path:
    """A local adapter directory as is, or a hub repository id fetched the way peft does.

    A hub id downloads only the adapter's files (``snapshot_download`` with ``allow_patterns``)
    into the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` it is read from the cache only.

    Raises:
        ValueError: neither an existing directory nor a hub repository that can be fetched.
    """
    path = Path(path_or_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            str(path_or_id),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[CONFIG_NAME, ADAPTER_NAME, FACTORS_NAME],
        )
    except HFValidationError:
        raise ValueError(
            f"{path_or_id} is neither an adapter directory nor a hub repository id; pass a directory written by "
            "CraftModel.save_pretrained or an id like 'user/adapter'"
        ) from None
    except LocalEntryNotFoundError:
        raise ValueError(
            f"adapter {path_or_id!r} is no local directory, nor in the Hugging Face cache, and the hub cannot be reached "
            "(HF_HUB_OFFLINE is set or no connection); check the path, or download the adapter once online"
        ) from None
    except HfHubHTTPError as err:
        raise ValueError(
            f"adapter {path_or_id!r} is no local directory and cannot be fetched from the hub ({type(err).__name__}); "
            "check the path, or the hub id, revision and token"
        ) from None
    return Path(folder)


def write_adapter(
    directory: str | Path,
    config: CraftConfig,
    state: dict[str, torch.Tensor],
    sketch: dict[str, torch.Tensor],
    fingerprint: str,
    targets: list[str],
    factors: Factors | None,
) -> Path:
    """Write an adapter directory; ``factors`` None leaves the factors out (loading recomputes them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tensors.update({f"{_SKETCH_PREFIX}{name}": s for name, s in sketch.items()})
    meta = {"format": _FORMAT, "fingerprint": fingerprint, "targets": json.dumps(targets)}
    save_file(tensors, str(directory / ADAPTER_NAME), metadata=meta)
    stored = directory / FACTORS_NAME
    if factors is not None:
        factors.save(stored)
    elif stored.exists():
        stored.unlink()  # a stale file from an earlier save must not be loaded with these J matrices
    return directory


def read_adapter(directory: Path) -> SavedAdapter:
    """Read an adapter directory written by :func:`write_adapter` (with or without factors).

    Raises:
        ValueError: no adapter in ``directory``, or not a CRAFT adapter.
    """
    path = directory / ADAPTER_NAME
    if not path.is_file():
        raise ValueError(f"no {ADAPTER_NAME} in {directory}; pass a directory written by CraftModel.save_pretrained")
    config = CraftConfig.load(directory)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a CRAFT adapter ({_FORMAT}); save it with CraftModel.save_pretrained")
    sketch = {k.removeprefix(_SKETCH_PREFIX): tensors.pop(k) for k in list(tensors) if k.startswith(_SKETCH_PREFIX)}
    stored = directory / FACTORS_NAME
    factors = Factors.load(stored) if stored.is_file() else None
    if factors is not None and (factors.max_ranks != config.ranks or factors.fingerprint != meta["fingerprint"]):
        raise ValueError(
            f"{stored} does not belong to the adapter beside it (factors at ranks {factors.max_ranks} of another base, "
            f"or the config asks for {config.ranks}); delete it to recompute the factors, or save the adapter again"
        )
    return SavedAdapter(directory, config, tensors, sketch, meta["fingerprint"], factors)


def check_base(
    saved: SavedAdapter, model: nn.Module, stacks: list[TargetStack], fingerprint: str, force: bool = False
) -> dict[str, torch.Tensor] | None:
    """Refuse ``model`` unless it holds the base weights the adapter was trained on.

    The same weights in another dtype or on another device pass: every target weight within
    :data:`~craft.targets.SAME_WEIGHTS_RTOL` (relative Frobenius distance, estimated from the
    saved sketch) of the saved one's. ``force`` loads onto other weights with a warning.

    Returns:
        The sketch of ``model``'s weights when it had to be made (the fingerprints differ), else None.

    Raises:
        ValueError: ``model`` is another base and ``force`` is False.
    """
    if fingerprint == saved.fingerprint:
        return None
    found = weights_sketch(model, stacks) if saved.sketch else None
    distance = sketch_distance(found, saved.sketch) if found is not None else float("inf")
    if distance <= SAME_WEIGHTS_RTOL:
        return found
    away = f"a target weight is {distance:.2%} away" if distance < float("inf") else "the weights differ"
    if not force:
        raise ValueError(
            f"the adapter in {saved.directory} was trained on another base model ({away}; the same base in another "
            f"dtype is within {SAME_WEIGHTS_RTOL:.2%}); load it onto the model it was saved from, or pass force=True"
        )
    warnings.warn(f"loading the adapter in {saved.directory} onto another base model ({away}): force=True", stacklevel=3)
    return found
