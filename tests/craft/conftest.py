"""Tiny random transformers models, one builder per supported layout, and small helpers.

Everything is reached through fixtures (this directory is not a package): ``tiny`` gives the
builders and helpers, ``layout`` parametrizes a test over every supported layout. A builder
returns ``(model, inputs)``: the model in ``eval()`` mode (dropout off), identical weights for
an identical seed, and a dict of example inputs including ``labels``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tf

import craft

VOCAB = 100
BATCH, SEQ = 2, 6
NUM_LABELS = 3
RANKS = (2, 8, 8)  # valid for every tiny model: 3 layers, d_out >= 16 (GQA v_proj), d_in = 32


def _text_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)  # no pad / special tokens
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 2])}


def _image_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=g), "labels": torch.tensor([0, 2])}


def _build(cls, config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(config).eval()


_BERT_KW = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=NUM_LABELS,
    attn_implementation="eager",
)
_LLAMA_KW = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: k/v are 16 wide, q is 32
    max_position_embeddings=64,
    num_labels=NUM_LABELS,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)


def build_bert(seed: int = 0):
    return _build(tf.BertForSequenceClassification, tf.BertConfig(**_BERT_KW), seed), _text_inputs()


def build_roberta(seed: int = 0):
    config = tf.RobertaConfig(**_BERT_KW, pad_token_id=1)
    return _build(tf.RobertaForSequenceClassification, config, seed), _text_inputs()


def build_electra(seed: int = 0):
    config = tf.ElectraConfig(**_BERT_KW, embedding_size=32)
    return _build(tf.ElectraForSequenceClassification, config, seed), _text_inputs()


def build_distilbert(seed: int = 0):
    config = tf.DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=3,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        attn_implementation="eager",
    )
    return _build(tf.DistilBertForSequenceClassification, config, seed), _text_inputs()


def build_gpt2(seed: int = 0):
    config = tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        num_labels=NUM_LABELS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return _build(tf.GPT2ForSequenceClassification, config, seed), _text_inputs()


def build_llama(seed: int = 0):
    return _build(tf.LlamaForSequenceClassification, tf.LlamaConfig(**_LLAMA_KW), seed), _text_inputs()


def build_mistral(seed: int = 0):
    config = tf.MistralConfig(**_LLAMA_KW, sliding_window=None)
    return _build(tf.MistralForSequenceClassification, config, seed), _text_inputs()


def build_qwen2(seed: int = 0):
    return _build(tf.Qwen2ForSequenceClassification, tf.Qwen2Config(**_LLAMA_KW), seed), _text_inputs()


def build_vit(seed: int = 0):
    config = tf.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=NUM_LABELS,
        attn_implementation="eager",
    )
    return _build(tf.ViTForImageClassification, config, seed), _image_inputs()


def _vit_targets() -> list[str]:
    """ViT names its projections query/value up to transformers 4.x, q_proj/v_proj from 5.x."""
    model, _ = build_vit()
    names = [n for n, _ in model.named_modules()]
    return ["q_proj", "v_proj"] if any(n.endswith(".q_proj") for n in names) else ["query", "value"]


@dataclass(frozen=True)
class Layout:
    """A supported layout: its builder, expected CRAFT targets and expected task-head modules."""

    name: str
    build: Callable[..., tuple[torch.nn.Module, dict[str, torch.Tensor]]]
    targets: list[str]
    heads: list[str]
    gqa: bool = False


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("bert", build_bert, ["query", "value"], ["classifier"]),
        Layout("roberta", build_roberta, ["query", "value"], ["classifier"]),
        Layout("electra", build_electra, ["query", "value"], ["classifier"]),
        Layout("distilbert", build_distilbert, ["q_lin", "v_lin"], ["pre_classifier", "classifier"]),
        Layout("gpt2", build_gpt2, ["c_attn:q", "c_attn:v"], ["score"]),
        Layout("llama", build_llama, ["q_proj", "v_proj"], ["score"], gqa=True),
        Layout("mistral", build_mistral, ["q_proj", "v_proj"], ["score"], gqa=True),
        Layout("qwen2", build_qwen2, ["q_proj", "v_proj"], ["score"], gqa=True),
        Layout("vit", build_vit, _vit_targets(), ["classifier"]),
    )
}


class Tiny:
    """Builders and helpers handed to tests by the ``tiny`` fixture."""

    layouts = LAYOUTS
    ranks = RANKS

    @staticmethod
    def build(name: str, seed: int = 0):
        """``(model, inputs)`` of layout ``name``."""
        return LAYOUTS[name].build(seed)

    @staticmethod
    def config(**overrides) -> craft.CraftConfig:
        """A CraftConfig at :data:`RANKS` with ``overrides``."""
        kw = dict(zip(("rank_layers", "rank_out", "rank_in"), RANKS))
        kw.update(overrides)
        return craft.CraftConfig(**kw)

    @staticmethod
    @torch.no_grad()
    def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of one forward pass without gradients."""
        return model(**inputs).logits.detach().clone()

    @staticmethod
    def train(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3, lr: float = 1e-2) -> None:
        """A few AdamW steps on the model's cross-entropy loss (dropout stays off)."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            model(**inputs).loss.backward()
            opt.step()

    @staticmethod
    def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    """Builders of tiny models and small helpers."""
    return Tiny()


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request) -> Layout:
    """Every supported layout in turn."""
    return LAYOUTS[request.param]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and threads spin when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
