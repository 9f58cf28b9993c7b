"""Search orchestration for CRAFT: the command-line interface (sweeps on Ray Tune come next)."""

from .cli import main

__all__ = ["main"]
