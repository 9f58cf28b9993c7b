"""Sweep specs: domains, validation in one line before Ray starts, the budget-bounded space."""

from __future__ import annotations

import optuna
import pytest
import yaml

from craft.harness.hub import TINY_MODEL, load_model
from search.cli import main
from search.model_facts import check_against_model
from search.space import Domain, parse_domain
from search.spec import load_sweep_spec, spec_from_dict
from spaces import preset_path

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BASE = {
    "model": TINY_MODEL,
    "task": "tweets",
    "method": {"choice": ["craft", "lora"]},
    "craft": {"rank_layers": {"int": [1, 4]}, "rank_out": {"int": [2, 32], "log": True}, "rank_in": 16},
    "lora": {"r": {"int": [1, 8]}},
    "train": {"lr": {"float": [1.0e-4, 1.0e-2], "log": True}, "eval_every": 4},
    "search": {"num_samples": 4, "max_budget": 8},
}


def _write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


@pytest.mark.parametrize("preset", ["smoke", "demo", "glue-roberta-base"])
def test_presets_load(preset):
    spec = load_sweep_spec(preset_path(f"{preset}.yaml"))
    assert spec.name == preset and spec.search.num_samples >= 6 and "craft" in spec.methods
    assert any(k.startswith("craft.rank") for k in spec.domains)


def test_domains_parse_and_trial_config_drops_other_methods(tmp_path):
    spec = load_sweep_spec(_write(tmp_path, BASE))
    assert spec.domains["craft.rank_out"] == Domain("int", (2, 32), True)
    assert spec.domains["train.lr"] == Domain("float", (1e-4, 1e-2), True)
    run = spec.run_config({"method": "lora", "lora.r": 3, "train.lr": 1e-3}, "out")
    assert run.method == "lora" and run.lora.r == 3 and run.craft is None and run.train.max_steps == 8
    run = spec.run_config({"method": "craft", "craft.rank_layers": 2, "craft.rank_out": 5, "train.lr": 1e-3})
    assert run.craft.ranks == (2, 5, 16) and run.lora is None and run.train.lr == 1e-3


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"int": [4]}, "int needs [lo, hi]"),
        ({"int": [8, 4]}, "low end 8 is above the high end 4"),
        ({"float": [0.0, 1.0], "log": True}, "log-scale domain needs a positive low end"),
        ({"choice": []}, "non-empty list"),
        ({"int": [1, 4], "step": 2}, "unknown key ['step']"),
        ({"int": [1, 4], "float": [1.0, 2.0]}, "one kind only"),
        ({"int": [1.5, 4]}, "two integers"),
    ],
)
def test_malformed_domains_say_how_to_write_them(raw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_domain("craft.rank_out", raw)


def test_plain_blocks_are_not_domains():
    assert parse_domain("craft", {"rank_out": 4}) is None and parse_domain("train.lr", 0.1) is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": "blue"}, "unknown key(s) ['colour']"),
        ({"search__patience": 3}, "unknown key(s) ['patience'] in the search block"),
        ({"craft__rank_in": {"int": [0, 4]}}, "rank"),  # a domain end the run config rejects
        ({"train__lr": {"float": [-1.0, 1.0]}}, "train.lr must be a positive number"),
        ({"method": {"choice": ["craft", "dora"]}}, "unknown method(s) ['dora']"),
        ({"search__max_budget": None}, "set search.max_budget"),
        ({"train__max_steps": 10}, "differs from search.max_budget=8"),
        ({"model": {"choice": ["a", "b"]}}, "model cannot be searched"),
        ({"search__grace_period": 20}, "exceeds search.max_budget"),
        ({"resources": {"gpu": -1}}, "resources.gpu must be a number >= 0"),
        ({"search__points_to_evaluate": [{"train.head_lr": 0.1}]}, "not search domains"),
        ({"export": {"max_steps": 100, "epochs": 2}}, "set export.max_steps or export.epochs, not both"),
        ({"export": {"epochs": 0}}, "export.epochs must be a positive number"),
        ({"export": {"steps": 10}}, "unknown key(s) ['steps'] in the export block"),
        ({"search__scheduler": "hyperband"}, "search.scheduler must be one of moasha, asha, fifo"),
        ({"search__max_total_steps": 0}, "search.max_total_steps must be an integer >= 1"),
        ({"search__warm_start": ""}, "search.warm_start must name a sweep"),
        ({"lora__train": {"lr_decay": 0.1}}, "lora.train names unknown train key(s) ['lr_decay']"),
        ({"lora__train": {"max_steps": 4}}, "lora.train.max_steps cannot differ per method"),
        ({"lora__train": {"lr": {"float": [-1.0, 1.0]}}}, "train.lr must be a positive number"),
        ({"lora__train": [1, 2]}, "lora.train must map train keys to values or domains"),
    ],
)
def test_invalid_specs_fail_in_one_line(tmp_path, changes, message):
    path = _write(tmp_path, _with(**changes))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_sweep_spec(path)


def test_a_spec_round_trips_through_its_dict_with_the_export_block(tmp_path):
    spec = load_sweep_spec(_write(tmp_path, _with(export={"max_steps": 500, "save_merged": False})))
    again = spec_from_dict(spec.to_dict())
    assert again.export.max_steps == 500 and again.export.save_merged is False and again.name == spec.name
    assert again.domains.keys() == spec.domains.keys() and again.search == spec.search
    with pytest.raises(ValueError, match="a sweep spec must be a mapping"):
        spec_from_dict(["not", "a", "spec"])


def test_ranks_above_the_model_axis_are_refused():
    spec = load_sweep_spec(preset_path("smoke.yaml"), ["craft.rank_out={int: [2, 64]}"])
    model = load_model(TINY_MODEL, num_labels=3)  # 32 wide
    with pytest.raises(ValueError, match="rank_out=64 exceeds the out axis"):
        check_against_model(spec, model)


def test_budget_below_every_config_is_refused(tmp_path):
    spec = load_sweep_spec(_write(tmp_path, _with(search__max_adapter_params=100)))
    with pytest.raises(ValueError, match="below the smallest craft adapter"):
        check_against_model(spec, load_model(TINY_MODEL, num_labels=3))


def test_budget_needs_int_rank_domains(tmp_path):
    spec = load_sweep_spec(_write(tmp_path, _with(craft__rank_out={"choice": [2, 4]}, search__max_adapter_params=5000)))
    with pytest.raises(ValueError, match="give craft ranks as int domains"):
        check_against_model(spec, load_model(TINY_MODEL, num_labels=3))


def test_sampled_trials_stay_within_the_budget_and_axes(tmp_path):
    """The last rank's domain ends exactly at the budget's bound for the ranks drawn before it, by hand:
    craft trains 2 stacks * (l^2 + o^2 + 16^2) (rank_in fixed at 16), so with budget 1100 rank_out may
    reach 17 when rank_layers is 1 or 2 (2 * (4 + 289 + 256) = 1098), 16 when it is 3 or 4; LoRA trains
    r * 8 modules * (32 + 32), so r <= 2 (3 * 512 > 1100)."""
    budget = 1100
    spec = load_sweep_spec(_write(tmp_path, _with(search__max_adapter_params=budget)))
    model = load_model(TINY_MODEL, num_labels=3)
    facts = check_against_model(spec, model)
    space = spec.sampler(facts.costs)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    highs = {"craft": set(), "lora": set()}
    for _ in range(60):
        trial = study.ask()
        values = space(trial)
        run = spec.run_config(values)
        block = run.craft if run.method == "craft" else run.method_block()
        from craft.budget import method_parameters

        params = method_parameters(run.method, block, model)
        assert params <= budget
        assert facts.costs[run.method].price(run.method, values | {"craft.rank_in": 16}) == params
        if run.method == "craft":
            layers = values["craft.rank_layers"]
            bound = max(o for o in range(1, 33) if 2 * (layers**2 + o**2 + 16**2) <= budget)
            assert bound == (17 if layers <= 2 else 16)
            assert trial.distributions["craft.rank_out"].high == bound, layers  # reached: the domain ends there
            assert values["craft.rank_out"] <= bound
            highs["craft"].add(bound)
        else:
            assert trial.distributions["lora.r"].high == 2
            highs["lora"].add(2)
        study.tell(trial, [0.5, params])
    assert highs == {"craft": {16, 17}, "lora": {2}}  # both craft bounds were met among the 60 draws


def test_factor_requests_take_the_largest_ranks_of_the_space():
    spec = load_sweep_spec(preset_path("smoke.yaml"))
    facts = check_against_model(spec, load_model(TINY_MODEL, num_labels=3))
    assert [r.max_ranks for r in facts.factor_requests] == [(4, 32, 32)]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"craft__rank_out": {"int": [2, 64]}}, "exceeds the out axis"),
        ({"sched": 1}, "unknown key(s) ['sched']"),
        ({"search__scheduler": "median"}, "search.scheduler must be one of moasha, asha, fifo"),
        ({"craft__train": {"learning_rate": 1.0e-3}}, "craft.train names unknown train key(s) ['learning_rate']"),
        ({"train__lr": {"float": [1.0e-3]}}, "float needs [lo, hi]"),
    ],
)
def test_cli_refuses_bad_specs_before_ray_starts(tmp_path, capsys, changes, message):
    import ray

    assert not ray.is_initialized()
    code = main(["sweep", str(_write(tmp_path, _with(**changes))), "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("craft-search: error: sweep spec")
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_cli_refuses_a_missing_spec_and_unknown_preset(capsys):
    assert main(["sweep", "no-such-preset"]) == 2
    assert "no preset 'no-such-preset.yaml'" in capsys.readouterr().err


def test_cli_refuses_to_resume_a_missing_sweep_or_to_overwrite_one(tmp_path, capsys):
    import ray

    storage = str(tmp_path / "runs")
    assert main(["sweep", "smoke", "--resume", "--storage", storage]) == 2
    assert "no sweep named 'smoke' to resume" in capsys.readouterr().err
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    assert main(["sweep", "smoke", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert "a sweep named 'smoke' already exists" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized()


def test_a_target_domain_asks_the_cache_for_each_target_set():
    targets = "craft.target_modules={choice: [[query, value], [query, key, value]]}"
    spec = load_sweep_spec(preset_path("smoke.yaml"), [targets, "method=craft"])
    facts = check_against_model(spec, load_model(TINY_MODEL, num_labels=3))
    assert [(r.targets, r.max_ranks) for r in facts.factor_requests] == [
        (("query", "value"), (4, 32, 32)),
        (("query", "key", "value"), (4, 32, 32)),
    ]
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    drawn = {tuple(spec.sampler(facts.costs)(study.ask())["craft.target_modules"]) for _ in range(12)}
    assert drawn == {("query", "value"), ("query", "key", "value")}  # lists travel through Optuna as JSON and back


def test_the_default_scheduler_is_moasha_when_trials_differ_in_size(tmp_path):
    assert load_sweep_spec(_write(tmp_path, BASE)).search.scheduler == "moasha"  # method and ranks searched
    one_size = _with(method="lora", lora={"r": 4}, craft=None)
    assert load_sweep_spec(_write(tmp_path, one_size, "one.yaml")).search.scheduler == "asha"  # only train.lr searched
    chosen = _with(search__scheduler="fifo")
    assert load_sweep_spec(_write(tmp_path, chosen, "fifo.yaml")).search.scheduler == "fifo"


def test_a_methods_own_train_settings_replace_the_shared_ones(tmp_path):
    data = _with(lora__train={"lr": {"float": [1.0e-4, 1.0e-3], "log": True}, "head_lr": 0.02})
    spec = load_sweep_spec(_write(tmp_path, data))
    assert {m: set(k) for m, k in spec.method_overrides().items()} == {"lora": {"train.lr", "train.head_lr"}}
    sampler = spec.sampler()
    assert "train.lr" not in sampler.keys_for("lora") and "lora.train.lr" in sampler.keys_for("lora")
    assert "train.lr" in sampler.keys_for("craft") and "lora.train.lr" not in sampler.keys_for("craft")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        values = sampler(study.ask())
        seen.add(values["method"])
        run = spec.run_config(values)
        if values["method"] == "lora":
            assert "train.lr" not in values and 1e-4 <= values["lora.train.lr"] <= 1e-3
            assert run.train.lr == values["lora.train.lr"] and run.train.head_lr == 0.02
        else:
            assert "lora.train.lr" not in values and run.train.lr == values["train.lr"] and run.train.head_lr == 1e-3
    assert seen == {"craft", "lora"}
    again = spec_from_dict(spec.to_dict())  # sweep.json keeps the overrides
    assert again.method_overrides() == spec.method_overrides() and again.domains == spec.domains


def test_an_export_carries_the_methods_own_settings(tmp_path):
    from search.results.export import export_configs, parse_pick
    from search.results.pareto import ParetoTrial, SweepTable

    spec = load_sweep_spec(_write(tmp_path, _with(lora__train={"lr": {"float": [1.0e-4, 1.0e-3], "log": True}})))
    config = {"method": "lora", "lora.r": 4, "lora.train.lr": 5.0e-4}
    trial = ParetoTrial("t1", "lora", "complete", 0.8, 4096, step=8, config=config)
    table = SweepTable(name="s", source="hand-made", trials=[trial], spec=spec.to_dict())
    [exported] = export_configs(table, parse_pick("best"), tmp_path / "export", output_root=str(tmp_path / "prod"))
    written = yaml.safe_load(exported.path.read_text())
    assert written["train"]["lr"] == 5.0e-4 and written["lora"] == {**written["lora"], "r": 4} and "train" not in written["lora"]


def test_the_sweep_says_each_methods_sizes_and_own_settings(tmp_path):
    from search.plan import describe_methods

    spec = load_sweep_spec(_write(tmp_path, _with(lora__train={"lr": 5.0e-4}, craft__rank_in=16)))
    costs = check_against_model(spec, load_model(TINY_MODEL, num_labels=3)).costs
    craft_line, lora_line = describe_methods(spec, costs)
    # tiny-random: 4 layers, 32 wide, query and value; CRAFT 2 * (r_l^2 + r_o^2 + 16^2), LoRA r * 8 modules * (32 + 32)
    assert craft_line == f"  craft: {2 * (1 + 4 + 256):,} to {2 * (16 + 1024 + 256):,} adapter parameters"
    assert lora_line == f"  lora: {1 * 8 * 64:,} to {8 * 8 * 64:,} adapter parameters; its own train settings: lr=0.0005"
