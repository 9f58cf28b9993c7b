"""Search orchestration for CRAFT: sweep specs, sweeps on Ray Tune, MLflow tracking, the CLI.

Importing this package starts nothing and imports no Ray; :func:`run_sweep` does. The Ray Tune
schedulers (MO-ASHA, ASHA, the compute budget) are in :mod:`search.schedulers`, which imports Ray.
"""

from .cli import main
from .model_facts import check_against_model
from .production import train_distributed
from .results.export import Pick, choose_trials, export_configs, parse_pick
from .results.pareto import ParetoTrial, SweepTable, hypervolume, load_sweep, pareto_front
from .results.report import FrontReport, report_front
from .space import Domain, SpaceSampler
from .spec import ResourcesBlock, SearchBlock, SweepSpec, load_sweep_spec
from .storage import SweepStore
from .sweep import SweepResult, TrialSummary, run_sweep, stored_spec
from .warm_start import WarmStart, load_warm_start

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
    "stored_spec",
    "SweepStore",
    "WarmStart",
    "load_warm_start",
    "ParetoTrial",
    "SweepTable",
    "load_sweep",
    "pareto_front",
    "hypervolume",
    "FrontReport",
    "report_front",
    "Pick",
    "parse_pick",
    "choose_trials",
    "export_configs",
    "train_distributed",
]
