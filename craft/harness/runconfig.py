"""The run config: one YAML file says what to fine-tune, on what, how, and where results go.

The same schema is the train command's input, a sweep's spec (with search domains in place of
values) and the export format of a sweep's winners. Keys are spelled like the fields they set.

    model: demo                       # local path, hub id, or demo (the packaged MiniLM)
    task: tweets                      # glue/<name>, tweets, csv:PATH, json:PATH, parquet:PATH
    data: {text_columns: [text], label_column: label}   # local files only
    method: craft                     # craft | lora | pissa | vera | head
    craft: {rank_layers: 6, rank_out: 64, rank_in: 64, init_scale: 0.0}
    train: {lr: 1.0e-3, head_lr: 1.0e-3, epochs: 1, batch_size: 32, max_length: 64, eval_every: 100, seed: 0}
    tracking: {uri: null, experiment: craft-search}
    output_dir: runs/demo
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import CraftConfig

__all__ = [
    "METHODS",
    "DataBlock",
    "LoraBlock",
    "PissaBlock",
    "VeraBlock",
    "TrainBlock",
    "TrackingBlock",
    "RunConfig",
    "load_run_config",
    "apply_overrides",
    "check_keys",
    "read_yaml_mapping",
    "parse_yaml",
]

METHODS = ("craft", "lora", "pissa", "vera", "head")


def check_keys(cls: type, data: Any, where: str) -> dict:
    """``data`` as a dict whose keys are all fields of dataclass ``cls``; else a ValueError naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys are {sorted(known)}")
    return data


def _positive_int(value: Any, where: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")


def _positive_float(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a positive number, got {value!r}")


@dataclass
class DataBlock:
    """Columns and splits of a local task file (GLUE and tweets know theirs)."""

    text_columns: list[str] | None = None  # one or two text fields
    label_column: str = "label"
    validation_fraction: float = 0.1  # of the data, when the file has no validation split
    test_fraction: float = 0.1  # of the data, when the file has no test split
    max_train_samples: int | None = None  # a seeded subset of the training split
    max_eval_samples: int | None = None  # a seeded subset of each evaluation split

    def __post_init__(self) -> None:
        if self.text_columns is not None:
            if isinstance(self.text_columns, str):
                self.text_columns = [self.text_columns]
            if not (1 <= len(self.text_columns) <= 2) or not all(isinstance(c, str) and c for c in self.text_columns):
                raise ValueError(f"data.text_columns must name one or two text columns, got {self.text_columns!r}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"data.{name} must be in [0, 1), got {value!r}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("data.validation_fraction + data.test_fraction must leave some data for training")
        _positive_int(self.max_train_samples, "data.max_train_samples", allow_none=True)
        _positive_int(self.max_eval_samples, "data.max_eval_samples", allow_none=True)


@dataclass
class LoraBlock:
    """peft LoRA: rank, scaling alpha, dropout, targets (None: the same as CRAFT's)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        _positive_int(self.r, "lora.r")
        _positive_float(self.alpha, "lora.alpha")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class PissaBlock:
    """peft LoRA initialised from the principal singular vectors (PiSSA)."""

    r: int = 8
    alpha: float = 8
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        _positive_int(self.r, "pissa.r")
        _positive_float(self.alpha, "pissa.alpha")


@dataclass
class VeraBlock:
    """peft VeRA: shared frozen random projections of rank r, trained scaling vectors."""

    r: int = 256
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        _positive_int(self.r, "vera.r")


@dataclass
class TrainBlock:
    """The fine-tuning loop's settings."""

    lr: float = 1e-3  # adapter learning rate
    head_lr: float = 1e-3  # task-head learning rate
    epochs: float = 1.0  # used when max_steps is None
    max_steps: int | None = None  # optimiser steps; overrides epochs
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum_steps: int = 1
    max_length: int = 128  # tokens per example, longer ones truncated
    eval_every: int = 100  # optimiser steps between evaluations (and checkpoints)
    warmup_ratio: float = 0.06  # share of the steps spent warming up, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool | str = "auto"  # bf16 autocast: true = on any device (CPU too), auto = on CUDA only
    device: str = "auto"  # auto, cpu, cuda, cuda:N

    def __post_init__(self) -> None:
        _positive_float(self.lr, "train.lr")
        _positive_float(self.head_lr, "train.head_lr")
        _positive_float(self.epochs, "train.epochs")
        _positive_int(self.max_steps, "train.max_steps", allow_none=True)
        for name in ("batch_size", "eval_batch_size", "grad_accum_steps", "max_length", "eval_every"):
            _positive_int(getattr(self, name), f"train.{name}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"train.bf16 must be true, false or auto, got {self.bf16!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"train.seed must be an integer, got {self.seed!r}")


@dataclass
class TrackingBlock:
    """MLflow: a tracking URI (None: the embedded SQLite store in ./mlflow.db) and experiment."""

    uri: str | None = None
    experiment: str = "craft-search"
    enabled: bool = True


@dataclass
class RunConfig:
    """One fine-tuning run. See the module docstring for the YAML form."""

    model: str = "demo"
    task: str = "tweets"
    method: str = "craft"
    data: DataBlock = field(default_factory=DataBlock)
    craft: CraftConfig | None = None
    lora: LoraBlock | None = None
    pissa: PissaBlock | None = None
    vera: VeraBlock | None = None
    train: TrainBlock = field(default_factory=TrainBlock)
    tracking: TrackingBlock = field(default_factory=TrackingBlock)
    output_dir: str = "runs/latest"
    save_merged: bool = False  # also write the merged model (transformers format)
    save_factors: bool = True  # craft: keep the HOSVD factors with the adapter (loading runs no HOSVD)
    provenance: dict | None = None  # where an exported config came from (sweep, trial, score)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a local path, a hub id, or 'demo'")
        if not isinstance(self.task, str) or not self.task:
            raise ValueError("task must name a task: glue/<name>, tweets, csv:PATH, json:PATH or parquet:PATH")
        for flag in ("save_merged", "save_factors"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.method == "craft" and self.craft is None:
            raise ValueError("method craft needs a craft block with rank_layers, rank_out and rank_in")

    def method_block(self) -> Any:
        """The settings of the chosen method (defaults where the block is absent; None for head)."""
        defaults = {"lora": LoraBlock, "pissa": PissaBlock, "vera": VeraBlock}
        if self.method == "head":
            return None
        block = getattr(self, self.method)
        return block if block is not None else defaults[self.method]()

    def to_dict(self) -> dict[str, Any]:
        """Plain data, None-valued method blocks dropped."""
        data = asdict(self)
        return {k: v for k, v in data.items() if not (k in METHODS and v is None) and not (k == "provenance" and v is None)}

    def to_yaml(self) -> str:
        """The config as YAML that :func:`load_run_config` reads back unchanged."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> RunConfig:
        """Validate and build from plain data; every error names the key and the fix."""
        data = dict(check_keys(cls, data, "the run config"))
        blocks = {
            "data": DataBlock,
            "craft": CraftConfig,
            "lora": LoraBlock,
            "pissa": PissaBlock,
            "vera": VeraBlock,
            "train": TrainBlock,
            "tracking": TrackingBlock,
        }
        for key, block in blocks.items():
            if data.get(key) is not None:
                try:
                    data[key] = block(**check_keys(block, data[key], f"the {key} block"))
                except TypeError as err:  # a required field missing
                    raise ValueError(f"the {key} block: {err}") from None
        return cls(**data)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as people write them: YAML 1.1 (PyYAML's) takes a
    float only with a dot (``3.0e-4``), so ``lr: 3e-4`` was the string ``'3e-4'``; YAML 1.2 and
    every other reader of these files take it as the number."""


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes a string :class:`_Loader` would read as a number (a trial
    or run id such as ``12e45678``), so what is written reads back unchanged."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def parse_yaml(text: str) -> Any:
    """``text`` as YAML, with ``3e-4`` a number (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``dotted.key=value`` pairs (values parsed as YAML) on nested plain data."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=3e-4)")
        value = parse_yaml(raw)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path, missing_hint: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: ``{}``).

    Raises:
        ValueError: no such file (with ``missing_hint``), malformed YAML (with its line), or a
            document that is not a mapping; in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no file at {path}; {missing_hint}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML, apply ``overrides``, validate.

    Raises:
        ValueError: a missing file, malformed YAML or an invalid value, in one line.
    """
    data = read_yaml_mapping(path, "pass the path of a run config YAML")
    return RunConfig.from_dict(apply_overrides(data, overrides or []))
