"""Pareto fronts, hypervolumes, plots and export picks on hand-made sweeps with known answers.

No Ray here: a sweep is a results directory written by the test (``sweep.json`` and
``summary.json`` as a sweep leaves them) or MLflow runs created by the test in the embedded store.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from search.cli import main
from search.names import ADAPTER_PARAMETERS, CONFIG_TAG, FINAL_SCORE, OUTCOME_TAG, SCORE, STEP, TRAIN_SECONDS, TRIAL_ID_TAG
from search.results.export import choose_trials, export_configs, parse_pick
from search.results.pareto import (
    ParetoTrial,
    SweepTable,
    default_reference,
    hypervolume,
    load_sweep,
    pareto_front,
    parse_reference,
)
from search.results.plots import write_html, write_png
from search.spec import load_sweep_spec
from search.tracking.runs import RunTracker
from spaces import preset_path


def T(trial_id, score, params, outcome="complete", seconds=None, method="craft", config=None):  # noqa: N802
    return ParetoTrial(trial_id, method, outcome, score, params, seconds, 32, config or {"method": method})


def ids(trials):
    return [t.trial_id for t in trials]


def lg(p):
    return math.log10(1 + p)


# The front ---------------------------------------------------------------------------------


def test_front_of_a_mixed_table():
    trials = [T("a", 0.90, 1000), T("b", 0.80, 100), T("c", 0.70, 500), T("d", 0.95, 5000), T("e", 0.60, 10)]
    assert ids(pareto_front(trials)) == ["e", "b", "a", "d"]  # c is beaten by b: more parameters, lower score


def test_ties_in_one_objective_keep_the_better_other():
    trials = [T("a", 0.8, 100), T("b", 0.8, 200), T("c", 0.7, 100), T("d", 0.9, 200)]
    assert ids(pareto_front(trials)) == ["a", "d"]  # b: same score, more params; c: same params, lower score


def test_duplicates_all_stay_on_the_front():
    trials = [T("a", 0.8, 100), T("b", 0.8, 100), T("c", 0.5, 1000)]
    assert ids(pareto_front(trials)) == ["a", "b"]


def test_a_single_trial_is_its_own_front():
    assert ids(pareto_front([T("only", 0.5, 42)])) == ["only"]


def test_pruned_failed_and_unscored_trials_never_enter_the_front():
    trials = [
        T("pruned", 0.99, 1, outcome="pruned"),
        T("failed", 0.99, 1, outcome="failed"),
        T("nan", float("nan"), 1),
        T("noparams", 0.99, None),
    ]
    assert pareto_front(trials) == [] and hypervolume(trials, (0.0, 1000.0)) == 0.0
    assert ids(pareto_front([*trials, T("ok", 0.1, 500)])) == ["ok"]


def test_time_as_a_third_objective_keeps_a_faster_trial():
    trials = [T("slow", 0.8, 100, seconds=60.0), T("fast", 0.7, 200, seconds=10.0), T("worse", 0.7, 200, seconds=20.0)]
    assert ids(pareto_front(trials)) == ["slow"]
    assert ids(pareto_front(trials, ("score", "params", "time"))) == ["slow", "fast"]


# The hypervolume -----------------------------------------------------------------------------


def test_hypervolume_of_a_single_trial_is_its_box():
    assert hypervolume([T("a", 0.6, 99)], (0.1, 9999.0)) == pytest.approx((0.6 - 0.1) * (4 - 2))


def test_hypervolume_of_a_staircase():
    trials = [T("a", 0.9, 999), T("b", 0.5, 9), T("c", 0.4, 99)]  # c dominated, adds nothing
    expected = 0.5 * (lg(99_999) - lg(9)) + (0.9 - 0.5) * (lg(99_999) - lg(999))
    assert hypervolume(trials, (0.0, 99_999.0)) == pytest.approx(expected)
    assert hypervolume(trials[:2], (0.0, 99_999.0)) == pytest.approx(expected)


def test_hypervolume_with_duplicates_counts_the_point_once():
    one = hypervolume([T("a", 0.8, 99)], (0.0, 9999.0))
    assert hypervolume([T("a", 0.8, 99), T("b", 0.8, 99)], (0.0, 9999.0)) == pytest.approx(one)


def test_trials_beyond_the_reference_add_nothing():
    ref = (0.5, 999.0)
    assert hypervolume([T("low", 0.4, 9), T("big", 0.9, 5000), T("edge", 0.9, 999)], ref) == 0.0
    assert hypervolume([T("low", 0.4, 9), T("in", 0.7, 99)], ref) == pytest.approx(0.2 * (3 - 2))


def test_hypervolume_in_three_objectives():
    trials = [T("a", 0.8, 9, seconds=10.0), T("b", 0.6, 9, seconds=5.0)]
    # Boxes down to the reference (score 0, 999 params, 20 s): a: 0.8 x 2 x 10, b: 0.6 x 2 x 15; overlap 0.6 x 2 x 10.
    expected = 0.8 * 2 * 10 + 0.6 * 2 * 15 - 0.6 * 2 * 10
    assert hypervolume(trials, (0.0, 999.0, 20.0), ("score", "params", "time")) == pytest.approx(expected)


def test_reference_points():
    table = SweepTable("s", "here", [T("a", 0.5, 100, seconds=3.0), T("p", 0.2, 400, outcome="pruned")], spec={})
    assert default_reference(table) == (0.0, 800.0)
    assert default_reference(table, ("score", "params", "time")) == (0.0, 800.0, 6.0)
    assert parse_reference("0.5,1e5", ("score", "params")) == (0.5, 100000.0)
    for bad in ("0.5", "a,b", "0.5,nan", "1,2,3"):
        with pytest.raises(ValueError, match="--reference"):
            parse_reference(bad, ("score", "params"))
    with pytest.raises(ValueError, match="needs 2 values"):
        hypervolume([T("a", 0.5, 1)], (0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="objectives"):
        pareto_front([T("a", 0.5, 1)], ("params", "score"))


# Plots -------------------------------------------------------------------------------------


def _table(trials, name="hand"):
    return SweepTable(name, "test", trials, spec={}, score_label="validation accuracy (fraction correct)")


MIXED = [
    T("c1", 0.70, 1_000, config={"method": "craft", "craft.rank_layers": 4, "craft.rank_out": 16, "craft.rank_in": 16}),
    T("c2", 0.65, 200, config={"method": "craft", "craft.rank_layers": 2, "craft.rank_out": 8, "craft.rank_in": 8}),
    T("c3", 0.50, 3_000, outcome="pruned", config={"method": "craft", "craft.rank_layers": 4, "craft.rank_out": 32, "craft.rank_in": 16}),
    T("l1", 0.72, 40_000, method="lora", config={"method": "lora", "lora.r": 8, "train.lr": 0.003}),
    T("l2", 0.40, 10_000, outcome="pruned", method="lora", config={"method": "lora", "lora.r": 2, "train.lr": 0.03}),
    T("h1", 0.55, 0, method="head", config={"method": "head"}),
    T("f1", None, 5_000, outcome="failed", method="lora", config={"method": "lora", "lora.r": 4}),
]  # fmt: skip


def test_png_is_written_and_decodes(tmp_path):
    import matplotlib.image

    table = _table(MIXED)
    path = write_png(table, pareto_front(table.trials), tmp_path / "front.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


def _read_html(path):
    text = path.read_text()
    for escaped, char in (("\\u003c", "<"), ("\\u003e", ">"), ("\\u002f", "/")):  # plotly escapes them in its JSON
        text = text.replace(escaped, char)
    return text


def test_html_holds_every_trial_with_its_config(tmp_path):
    table = _table(MIXED)
    html = _read_html(write_html(table, pareto_front(table.trials), tmp_path / "front.html"))
    for t in MIXED:
        if t.score is not None:
            assert f"<b>{t.trial_id}</b>" in html
    assert "lora.r = 8" in html and "craft.rank_out = 16" in html  # hover shows the config
    assert "stopped early" in html and "Pareto front (4)" in html and '"type":"log"' in html
    assert "validation accuracy (fraction correct)" in html and "trainable adapter parameters" in html


def test_plots_of_a_sweep_without_a_complete_trial(tmp_path):
    table = _table([T("p", 0.4, 100, outcome="pruned")])
    assert pareto_front(table.trials) == []
    assert write_png(table, [], tmp_path / "a.png").stat().st_size > 0
    assert "<b>p</b>" in _read_html(write_html(table, [], tmp_path / "a.html"))


# Picks and export ----------------------------------------------------------------------------


def test_picks():
    table = _table(MIXED)
    assert ids(choose_trials(table, parse_pick("best"))) == ["l1"]
    assert ids(choose_trials(table, parse_pick("best"), top=2)) == ["l1", "c1"]
    assert ids(choose_trials(table, parse_pick("pareto"))) == ["h1", "c2", "c1", "l1"]
    assert ids(choose_trials(table, parse_pick("pareto"), top=2)) == ["c1", "l1"]  # the two best, fewest params first
    assert ids(choose_trials(table, parse_pick("budget:1000"))) == ["c1"]  # at most 1,000: c1 (0.70) beats c2
    assert ids(choose_trials(table, parse_pick("budget:1_000"), top=5)) == ["c1", "c2", "h1"]
    assert parse_pick("budget:20,000").budget == 20_000


@pytest.mark.parametrize("text", ["top", "budget:", "budget:-5", "budget:1e4", "Best"])
def test_bad_picks_say_what_is_valid(text):
    with pytest.raises(ValueError, match="choose best, pareto or budget:N"):
        parse_pick(text)


def test_an_empty_sweep_and_a_budget_below_every_trial_are_refused():
    pruned = _table([T("p", 0.4, 100, outcome="pruned"), T("f", None, 100, outcome="failed")])
    with pytest.raises(ValueError, match="no trial that ran its full budget.*1 pruned, 1 failed"):
        choose_trials(pruned, parse_pick("best"))
    with pytest.raises(ValueError, match=r"fits budget:150: the smallest adapter has 200 parameters \(trial c2\)"):
        choose_trials(_table([t for t in MIXED if t.method != "head"]), parse_pick("budget:150"))


# Reading sweeps ------------------------------------------------------------------------------


def _write_sweep(root, trials, name="handmade", tracking_uri=None, parent_run_id=None):
    """A results directory as a finished sweep leaves it, for the smoke spec."""
    spec = load_sweep_spec(preset_path("smoke.yaml"), name=name)
    path = root / name
    path.mkdir(parents=True)
    state = {"name": name, "tracking_uri": tracking_uri, "experiment": "craft-smoke", "parent_run_id": parent_run_id,
             "spec": spec.to_dict()}  # fmt: skip
    (path / "sweep.json").write_text(json.dumps(state))
    rows = [
        {"trial_id": t.trial_id, "outcome": t.outcome, "config": t.config, "score": t.score, "adapter_parameters": t.adapter_parameters,
         "step": 32, "metrics": {"validation/accuracy": t.score, "validation/score": t.score, TRAIN_SECONDS: t.train_s}}
        for t in trials
    ]  # fmt: skip
    (path / "summary.json").write_text(json.dumps({"trials": rows}))
    return path


CRAFT = {"method": "craft", "craft.rank_layers": 2, "craft.rank_out": 4, "craft.rank_in": 4, "craft.init_scale": 0.0,
         "train.lr": 0.01, "train.head_lr": 0.01}  # fmt: skip
LORA = {"method": "lora", "lora.r": 4, "train.lr": 0.005, "train.head_lr": 0.02}


def test_load_a_finished_sweep_by_path_and_by_name(tmp_path):
    trials = [T("t1", 0.6, 120, config=CRAFT, seconds=2.0), T("t2", 0.7, 2048, method="lora", config=LORA),
              T("t3", 0.3, 2048, outcome="pruned", method="lora", config=LORA)]  # fmt: skip
    path = _write_sweep(tmp_path, trials)
    table = load_sweep(path)
    assert table.name == "handmade" and len(table.trials) == 3 and ids(table.full()) == ["t1", "t2"]
    assert table.score_label == "validation accuracy (fraction correct)" and table.trials[0].train_s == 2.0
    assert ids(load_sweep("handmade", storage=str(tmp_path)).trials) == ["t1", "t2", "t3"]
    with pytest.raises(ValueError, match="no sweep at nope or .*nope .*runs:/<parent run id>"):
        load_sweep("nope", storage=str(tmp_path))


def test_export_fixes_every_domain_and_keeps_provenance(tmp_path):
    trials = [T("t1", 0.6, 120, config=CRAFT), T("t2", 0.7, 2048, method="lora", config=LORA)]
    table = load_sweep(_write_sweep(tmp_path, trials))
    [best] = export_configs(table, parse_pick("best"), tmp_path / "out")
    data = yaml.safe_load(best.path.read_text())
    assert best.path.name == "handmade-t2.yaml" and data["method"] == "lora" and "craft" not in data
    assert data["lora"]["r"] == 4 and data["lora"]["alpha"] == 8 and data["train"]["lr"] == 0.005
    assert data["train"]["max_steps"] == 32 and data["save_merged"] is True  # the trial budget by default
    assert data["provenance"]["trial_id"] == "t2" and data["provenance"]["score"] == 0.7
    assert data["provenance"]["adapter_parameters"] == 2048 and data["provenance"]["sweep"] == "handmade"
    assert data["output_dir"] == "runs/production/handmade-t2"
    [long] = export_configs(table, parse_pick("budget:500"), tmp_path / "long", epochs=3)
    data = yaml.safe_load(long.path.read_text())
    assert data["craft"] == {**data["craft"], "rank_layers": 2, "rank_out": 4, "rank_in": 4}
    assert data["train"]["max_steps"] is None and data["train"]["epochs"] == 3.0
    with pytest.raises(ValueError, match="not both"):
        export_configs(table, parse_pick("best"), tmp_path / "x", max_steps=5, epochs=1)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_sweep(tmp_path / "runs" / "sweeps", [T("p", 0.4, 100, outcome="pruned", config=CRAFT)], name="empty")
    _write_sweep(tmp_path / "runs" / "sweeps", [T("t1", 0.6, 120, config=CRAFT)], name="one")
    cases = [
        (["export", "unknown", "--out", "x"], "no sweep at unknown"),
        (["pareto", "unknown"], "no sweep at unknown"),
        (["export", "empty", "--out", "x"], "has no trial that ran its full budget"),
        (["export", "one", "--pick", "budget:100", "--out", "x"], "no complete trial of sweep one fits budget:100"),
        (["export", "one", "--pick", "cheapest", "--out", "x"], "choose best, pareto or budget:N"),
        (["pareto", "one", "--reference", "1"], "--reference '1': give 2 numbers"),
        (["pareto", "runs:/0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], "no MLflow run '0123456789abcdef'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "x").exists()  # nothing written on bad input
    assert main(["pareto", "empty", "--no-log"]) == 1  # a sweep with no complete trial has no front: exit 1, plots still drawn
    assert "no trial has run its full budget yet" in capsys.readouterr().out
    assert (tmp_path / "runs" / "sweeps" / "empty" / "pareto" / "pareto.png").is_file()


def test_a_running_sweep_is_read_from_mlflow(tmp_path, capsys):
    """Parent and child runs as the sweep's callback writes them, one trial still running."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_sweep_spec(preset_path("smoke.yaml"), name="live")
    parent = RunTracker(uri, "craft-smoke", run_name="live", tags={"craft.kind": "sweep", "craft.sweep": "live"})
    state = {"name": "live", "tracking_uri": uri, "experiment": "craft-smoke", "parent_run_id": parent.run_id, "spec": spec.to_dict()}
    (tmp_path / "sweep.json").write_text(json.dumps(state))
    parent.client.log_artifact(parent.run_id, str(tmp_path / "sweep.json"))
    rows = [("t1", CRAFT, "complete", {FINAL_SCORE: 0.6, SCORE: 0.6, ADAPTER_PARAMETERS: 120, STEP: 32, TRAIN_SECONDS: 1.5}),
            ("t2", LORA, "pruned", {SCORE: 0.3, ADAPTER_PARAMETERS: 2048, STEP: 8}),
            ("t3", LORA, None, {SCORE: 0.5, ADAPTER_PARAMETERS: 2048, STEP: 16})]  # fmt: skip
    for trial_id, config, outcome, metrics in rows:
        tags = {TRIAL_ID_TAG: trial_id, "craft.method": config["method"], CONFIG_TAG: json.dumps(config)}
        child = RunTracker(uri, "craft-smoke", run_name=trial_id, parent_run_id=parent.run_id, tags=tags)
        child.log_metrics(metrics, step=metrics[STEP])
        if outcome:
            child.set_tags({OUTCOME_TAG: outcome})
            child.end("FINISHED")
    table = load_sweep(f"runs:/{parent.run_id}", tracking_uri=uri)
    assert table.running and {t.trial_id: t.outcome for t in table.trials} == {"t1": "complete", "t2": "pruned", "t3": "running"}
    assert ids(table.full()) == ["t1"] and table.trials[0].config == CRAFT and table.trials[0].run_id
    assert main(["pareto", f"runs:/{parent.run_id}", "--tracking-uri", uri, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "(still running)" in out and "t1" in out and "hypervolume" in out
    artifacts = {a.path for a in parent.client.list_artifacts(parent.run_id, "pareto")}
    assert artifacts == {"pareto/pareto.png", "pareto/pareto.html"}
    assert parent.client.get_run(parent.run_id).info.status == "RUNNING"  # logging plots leaves the sweep's status alone
    assert "running" in (tmp_path / "plots" / "pareto.html").read_text()
