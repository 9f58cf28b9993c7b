"""Where a sweep keeps its files: the default storage and the names of the files in its directory.

Read by the sweep that writes them and by everything that reads a sweep back (fronts, export,
warm start), so that none of those needs the sweep's own module.
"""

__all__ = ["DEFAULT_STORAGE", "SWEEP_FILE", "SUMMARY_FILE", "STUDY_FILE"]

DEFAULT_STORAGE = "runs/sweeps"  # relative to the working directory
SWEEP_FILE = "sweep.json"  # how to reach everything: the spec as started, the MLflow ids
SUMMARY_FILE = "summary.json"  # every trial as the sweep ended it
STUDY_FILE = "optuna-study.db"  # the Optuna study (SQLite)
