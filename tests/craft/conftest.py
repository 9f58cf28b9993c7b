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


# A tiny sentiment task for the training loop and the baselines: texts of "good" / "bad" words and
# filler, label 1 when good words are the majority. Separable, but only through the attention: a
# random BERT's pooled output barely carries it, so head-only training stays near chance.
GOOD = ("good", "great", "fine", "nice", "superb")
BAD = ("bad", "awful", "poor", "sad", "boring")
FILLER = ("the", "a", "movie", "film", "is", "was", "it", "plot", "and", "very")
TASK_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *GOOD, *BAD, *FILLER)


@dataclass(frozen=True)
class TinySpec:
    """Stands in for craft.harness.tasks.TaskSpec (same attribute names)."""

    text_fields: tuple[str, ...] = ("text",)
    num_labels: int = 2
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


@dataclass
class TinyTask:
    """Stands in for craft.harness.tasks.Task: a spec and its splits."""

    spec: TinySpec
    splits: object  # datasets.DatasetDict


def _sentiment(n: int, seed: int) -> dict[str, list]:
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        major, minor = (GOOD, BAD) if label else (BAD, GOOD)
        k = rng.choice([1, 3])
        words = [rng.choice(major) for _ in range(k + 1)] + [rng.choice(minor) for _ in range(k // 2)]
        words += [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return {"text": texts, "label": labels}


class Sentiment:
    """The tiny task, its tokenizer, a BERT builder and a metrics function (``sentiment`` fixture)."""

    def __init__(self, n_train: int = 256, n_val: int = 128):
        import datasets

        splits = {"train": _sentiment(n_train, 1), "validation": _sentiment(n_val, 2)}
        self.task = TinyTask(TinySpec(), datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}))
        self.spec = self.task.spec
        self.tokenizer = tf.BertTokenizer(vocab={w: i for i, w in enumerate(TASK_WORDS)})

    @staticmethod
    def bert(seed: int = 0, dropout: float = 0.1, num_labels: int = 2) -> torch.nn.Module:
        """A 2-layer BERT (hidden 32) over the task's vocabulary; weights wide enough (std 0.1)
        that its attention can learn the task."""
        config = tf.BertConfig(
            vocab_size=len(TASK_WORDS),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=num_labels,
            initializer_range=0.1,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            attn_implementation="eager",
        )
        torch.manual_seed(seed)
        return tf.BertForSequenceClassification(config)

    @staticmethod
    def metrics(spec, predictions, labels) -> dict[str, float]:
        """Accuracy, also the score (regression: minus the mean squared error)."""
        if spec.is_regression:
            mse = float(((predictions - labels) ** 2).mean())
            return {"mse": mse, "score": -mse}
        accuracy = float((predictions == labels).mean())
        return {"accuracy": accuracy, "score": accuracy}


@pytest.fixture(scope="session")
def sentiment() -> Sentiment:
    """The tiny sentiment task (256 training, 128 validation examples) and its helpers."""
    return Sentiment()
