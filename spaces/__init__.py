"""Search-space presets and run configs (YAML) shipped with craft-search; nothing here imports Ray."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["preset_path", "DEMO_TRAIN"]

DEMO_TRAIN = "train-demo.yaml"


def preset_path(name: str) -> Path:
    """Path of a YAML file shipped in this package (e.g. ``train-demo.yaml``)."""
    path = Path(str(files(__name__).joinpath(name)))
    if not path.is_file():
        shipped = sorted(p.name for p in Path(str(files(__name__))).glob("*.yaml"))
        raise ValueError(f"no preset {name!r}; shipped presets: {shipped}")
    return path
