"""Search orchestration for CRAFT: sweep specs, sweeps on Ray Tune, MLflow tracking, the CLI.

Importing this package starts nothing and imports no Ray; :func:`run_sweep` does.
"""

from .cli import main
from .space import Domain, SpaceSampler
from .spec import ResourcesBlock, SearchBlock, SweepSpec, check_against_model, load_sweep_spec
from .sweep import SweepResult, TrialSummary, run_sweep

__all__ = [
    "main",
    "Domain",
    "SpaceSampler",
    "SearchBlock",
    "ResourcesBlock",
    "SweepSpec",
    "load_sweep_spec",
    "check_against_model",
    "SweepResult",
    "TrialSummary",
    "run_sweep",
]
