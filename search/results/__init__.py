"""What a sweep leaves: its Pareto front, plots, the front's report, and exported train configs.

Reading a sweep needs no sweep module: :func:`load_sweep` reads its storage and MLflow runs.
"""

from .export import ExportedConfig, Pick, choose_trials, export_configs, parse_pick
from .pareto import OBJECTIVES, ParetoTrial, SweepTable, hypervolume, load_sweep, pareto_front
from .plots import HTML_NAME, PNG_NAME, write_html, write_png
from .report import FrontReport, log_front, report_front

__all__ = [
    "OBJECTIVES",
    "ParetoTrial",
    "SweepTable",
    "load_sweep",
    "pareto_front",
    "hypervolume",
    "PNG_NAME",
    "HTML_NAME",
    "write_png",
    "write_html",
    "FrontReport",
    "report_front",
    "log_front",
    "Pick",
    "parse_pick",
    "choose_trials",
    "export_configs",
    "ExportedConfig",
]
