"""CRAFT adapter configuration: ranks per axis, targets, initialisation; validated, JSON round trip."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["CraftConfig", "CONFIG_NAME", "ADAPTER_DTYPES"]

CONFIG_NAME = "craft_config.json"
# "auto": float32, or float64 on a float64 model; "model": the base weights' dtype (a bf16 model's J
# then cannot move its diagonal by less than 1/128); or a dtype by name.
ADAPTER_DTYPES = ("auto", "model", "float32", "float64", "bfloat16", "float16")


@dataclass
class CraftConfig:
    """Configuration of a CRAFT adapter.

    Ranks are named by the axis of the (layers, out, in) weight stack they truncate. The same
    ranks apply to every projection type; each must be at most that stack's axis length.

    Attributes:
        rank_layers: rank of the layers axis (at most the number of layers).
        rank_out: rank of the output-features axis (at most d_out of every target).
        rank_in: rank of the input-features axis (at most d_in of every target).
        target_modules: projection types to adapt, by module-name suffix ("query", "q_proj");
            ``*`` stands for a layer number ("decoder.layers.*.encoder_attn.q_proj" names one
            stack of an encoder-decoder); a fused projection whose layout is known is split as
            "c_attn:q", "query_key_value:v" (see :mod:`craft.layouts`). None: the model's query and
            value projections, from peft's table for its model type or the project's own.
        init_scale: s in J = I + s * E, E ~ N(0, 1); 0 starts exactly at the base model.
        seed: seed of E.
        modules_to_save: module-name suffixes trained in full alongside the adapter (the task
            head). None: the usual heads ("classifier", "score", "pre_classifier",
            "qa_outputs") where the model has them.
        adapter_dtype: working dtype of the J matrices, the frozen factors and the middles M.
            "auto" (default): float32 whatever the base dtype (float64 on a float64 model), as
            peft keeps its adapters; "model": the base weights' dtype; or "float32",
            "float64", "bfloat16", "float16". The update is cast to each pass's compute dtype.
    """

    rank_layers: int
    rank_out: int
    rank_in: int
    target_modules: list[str] | None = None
    init_scale: float = 0.0
    seed: int = 0
    modules_to_save: list[str] | None = None
    adapter_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("rank_layers", "rank_out", "rank_in", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"CraftConfig.{name} must be an integer, got {value!r}")
        for name in ("rank_layers", "rank_out", "rank_in"):
            if getattr(self, name) < 1:
                raise ValueError(f"CraftConfig.{name} must be at least 1, got {getattr(self, name)}")
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float)):
            raise ValueError(f"CraftConfig.init_scale must be a number, got {self.init_scale!r}")
        if not math.isfinite(self.init_scale) or self.init_scale < 0:
            raise ValueError(f"CraftConfig.init_scale must be finite and >= 0, got {self.init_scale}")
        self.init_scale = float(self.init_scale)
        self.target_modules = _name_list("target_modules", self.target_modules)
        self.modules_to_save = _name_list("modules_to_save", self.modules_to_save)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"CraftConfig.adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")

    @property
    def ranks(self) -> tuple[int, int, int]:
        """(rank_layers, rank_out, rank_in), in the axis order of a weight stack."""
        return (self.rank_layers, self.rank_out, self.rank_in)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CraftConfig:
        """Build from a dict; unknown keys are an error naming the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CraftConfig: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CraftConfig:
        """Parse a JSON string written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"CraftConfig: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError("CraftConfig: JSON must be an object of config fields")
        return cls.from_dict(data)

    def save(self, directory: str | Path) -> Path:
        """Write ``craft_config.json`` into ``directory``; returns the file path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CraftConfig:
        """Read ``craft_config.json`` from ``directory``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"no {CONFIG_NAME} in {directory}; pass a directory written by CraftModel.save_pretrained")
        return cls.from_json(path.read_text())


def _name_list(field: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"CraftConfig.{field} must be None or a non-empty list of module names, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"CraftConfig.{field} lists a module twice: {list(value)}")
    return list(value)
