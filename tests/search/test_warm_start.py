"""Warm start from an earlier sweep's results: which trials seed the study, with what, and refusals.

The earlier sweep is a results directory written here by hand (``sweep.json`` and ``summary.json``
as a sweep leaves them); the study is a real Optuna study. A warm start from a real sweep on
real Ray is in test_sweep.py.
"""

from __future__ import annotations

import json

import optuna
import pytest

from craft.harness.hub import TINY_MODEL
from search.layout import SUMMARY_FILE, SWEEP_FILE
from search.spec import spec_from_dict
from search.warm_start import add_warm_trials, load_warm_start

SPEC = {
    "name": "earlier",
    "model": TINY_MODEL,
    "task": "tweets",
    "method": {"choice": ["craft", "lora"]},
    "craft": {"rank_layers": {"int": [1, 4]}, "rank_out": {"int": [2, 16]}, "rank_in": 8},
    "lora": {"r": {"int": [1, 8]}},
    "train": {"lr": {"float": [1.0e-4, 1.0e-2], "log": True}, "eval_every": 4},
    "search": {"num_samples": 4, "max_budget": 8},
}

TRIALS = [  # (trial id, outcome, config, final score, adapter parameters)
    ("a", "complete", {"method": "craft", "craft.rank_layers": 2, "craft.rank_out": 8, "train.lr": 1e-3}, 0.61, 264),
    ("b", "complete", {"method": "lora", "lora.r": 4, "train.lr": 5e-3}, 0.66, 2048),
    ("c", "pruned", {"method": "lora", "lora.r": 8, "train.lr": 2e-3}, 0.40, 4096),  # not complete: never seeds
    ("d", "complete", {"method": "craft", "craft.rank_layers": 4, "craft.rank_out": 16, "train.lr": 2e-4}, 0.58, 672),
]


def _spec(**changes):
    data = json.loads(json.dumps(SPEC))
    data.update(changes)
    return data


def _earlier(tmp_path, spec_data=None):
    """A finished sweep's results directory, as ``run_sweep`` leaves it."""
    spec = spec_from_dict(spec_data or _spec())
    path = tmp_path / "sweeps" / spec.name
    path.mkdir(parents=True)
    state = {"name": spec.name, "tracking_uri": "sqlite:///unused.db", "experiment": "x", "parent_run_id": "p", "spec": spec.to_dict()}
    (path / SWEEP_FILE).write_text(json.dumps(state))
    trials = [
        {"trial_id": t, "outcome": o, "config": c, "score": s, "adapter_parameters": p, "step": 8 if o == "complete" else 4,
         "metrics": {"validation/accuracy": s, "validation/score": s}}
        for t, o, c, s, p in TRIALS
    ]  # fmt: skip
    (path / SUMMARY_FILE).write_text(json.dumps({"trials": trials}))
    return path


def test_complete_trials_seed_the_study_with_their_values(tmp_path):
    source = _earlier(tmp_path)
    spec = spec_from_dict(_spec(name="wider", craft={**SPEC["craft"], "rank_out": {"int": [2, 32]}}, search={**SPEC["search"], "warm_start": str(source)}))
    warm = load_warm_start(spec)
    assert warm.sweep == "earlier" and warm.left_out == 0
    assert {t.trial_id: t.values for t in warm.trials} == {"a": (0.61, 264.0), "b": (0.66, 2048.0), "d": (0.58, 672.0)}
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert add_warm_trials(study, spec, warm) == 3
    added = {t.user_attrs["source_trial"]: t for t in study.trials}
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["warm_start"] == "earlier" for t in added.values())
    assert added["b"].params == {"method": "lora", "lora.r": 4, "train.lr": 5e-3} and added["b"].values == [0.66, 2048.0]
    assert added["a"].params == {"method": "craft", "craft.rank_layers": 2, "craft.rank_out": 8, "train.lr": 1e-3}
    sampler = spec.sampler()
    for _ in range(3):  # the study samples on from them
        trial = study.ask()
        sampler(trial)
        study.tell(trial, [0.5, 100.0])


def test_trials_the_new_space_cannot_hold_are_left_out(tmp_path):
    source = _earlier(tmp_path)
    # rank_out narrowed to [2, 10]: d (16) is out; lora dropped: b is out; a stays.
    narrowed = _spec(name="narrow", method={"choice": ["craft"]}, craft={**SPEC["craft"], "rank_out": {"int": [2, 10]}})
    narrowed["search"] = {**SPEC["search"], "warm_start": str(source)}
    warm = load_warm_start(spec_from_dict(narrowed))
    assert [t.trial_id for t in warm.trials] == ["a"] and warm.left_out == 2
    # train.lr fixed at 1e-3: only trials that ran with 1e-3 (a) count; a new fixed value elsewhere drops all.
    fixed = _spec(name="fixed", train={"lr": 1e-3, "eval_every": 4}, search={**SPEC["search"], "warm_start": str(source)})
    assert [t.trial_id for t in load_warm_start(spec_from_dict(fixed)).trials] == ["a"]
    other_in = _spec(name="rank-in", craft={**SPEC["craft"], "rank_in": 4}, search={**SPEC["search"], "warm_start": str(source)})
    assert [t.trial_id for t in load_warm_start(spec_from_dict(other_in)).trials] == ["b"]  # craft ran rank_in 8


def test_a_methods_own_settings_are_matched_where_the_trial_ran_them(tmp_path):
    source = _earlier(tmp_path)
    data = _spec(name="own", lora={"r": {"int": [1, 8]}, "train": {"lr": {"float": [1.0e-3, 1.0e-2], "log": True}}})
    data["search"] = {**SPEC["search"], "warm_start": str(source)}
    spec = spec_from_dict(data)
    by_id = {t.trial_id: t for t in load_warm_start(spec).trials}
    assert by_id["b"].params == {"method": "lora", "lora.r": 4, "lora.train.lr": 5e-3}  # its train.lr, now lora's own
    assert by_id["a"].params["train.lr"] == 1e-3
    study = optuna.create_study(directions=["maximize", "minimize"])
    add_warm_trials(study, spec, load_warm_start(spec))
    assert len(study.trials) == 3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": "prajjwal1/bert-tiny"}, "sweep earlier ran model"),
        ({"task": "glue/sst2"}, "sweep earlier ran task 'tweets', this sweep 'glue/sst2'"),
        ({"data": {"max_train_samples": 100}}, "sweep earlier ran data"),
        ({"search": {"num_samples": 4, "max_budget": 16}}, "trained 8 steps a trial, this sweep 16"),
    ],
)
def test_a_sweep_of_another_model_task_data_or_budget_is_refused(tmp_path, changes, message):
    source = _earlier(tmp_path)
    data = _spec(name="other", **changes)
    data["search"] = {**data["search"], "warm_start": str(source)}
    with pytest.raises(ValueError, match=message) as err:
        load_warm_start(spec_from_dict(data))
    assert str(err.value).startswith("search.warm_start:") and "\n" not in str(err.value)


def test_a_missing_sweep_is_refused(tmp_path):
    data = _spec(name="other")
    data["search"] = {**data["search"], "warm_start": str(tmp_path / "nothing")}
    with pytest.raises(ValueError, match="search.warm_start: no sweep at"):
        load_warm_start(spec_from_dict(data))


def test_the_cli_refuses_a_warm_start_from_another_model_before_ray_starts(tmp_path, tiny_model_dir, capsys):
    import ray
    import yaml

    from search.cli import main

    source = _earlier(tmp_path)
    data = _spec(name="other-model", model=str(tiny_model_dir), craft={**SPEC["craft"], "rank_layers": {"int": [1, 2]}})
    data["search"] = {**data["search"], "warm_start": str(source)}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(data))
    assert not ray.is_initialized()
    code = main(["sweep", str(path), "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"sweep earlier ran model 'tiny-random', this sweep '{tiny_model_dir}'" in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
