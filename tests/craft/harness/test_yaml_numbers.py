"""Numbers as users type them in run configs, sweep specs and ``--set``: ``3e-4`` is a number.

PyYAML reads YAML 1.1, where a float needs a dot: ``lr: 3e-4`` was the string ``'3e-4'`` and was
refused as "must be a positive number". The expected values here are written out by hand.
"""

from __future__ import annotations

import pytest

from craft.harness.runconfig import load_run_config, parse_yaml
from search.spec import load_sweep_spec

RUN = "model: tiny\ntask: tweets\nmethod: craft\ncraft: {{rank_layers: 2, rank_out: 8, rank_in: 8}}\ntrain:\n  lr: {lr}\n  head_lr: {head}\n"


@pytest.mark.parametrize(
    ("text", "value"),
    [("3e-4", 0.0003), ("3E-4", 0.0003), ("3.0e-4", 0.0003), ("3.e-4", 0.0003), ("+3e-4", 0.0003), ("1e+3", 1000.0),
     ("-2e-5", -0.00002), ("5e3", 5000.0), (".5e1", 5.0), ("0.001", 0.001), ("1_000", 1000), ("2", 2)],
)  # fmt: skip
def test_the_spellings_users_write_are_numbers(text, value):
    parsed = parse_yaml(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["3e", "e3", "1e-", "abc", "'3e-4'", "3e-4x"])
def test_what_is_not_a_number_stays_a_string(text):
    assert isinstance(parse_yaml(text), str)


def test_a_run_config_file_and_set_take_3e_4(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(lr="3e-4", head="1E-3"))
    run = load_run_config(path)
    assert run.train.lr == 0.0003 and run.train.head_lr == 0.001
    run = load_run_config(path, ["train.lr=5e-5", "train.head_lr=2.5e-3"])
    assert run.train.lr == 0.00005 and run.train.head_lr == 0.0025


def test_a_run_config_still_refuses_what_is_not_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(lr="3e-4", head="1e-3"))
    with pytest.raises(ValueError, match="train.lr must be a positive number, got '3e'"):
        load_run_config(path, ["train.lr=3e"])


def test_a_sweep_spec_takes_bounds_and_set_values_in_e_notation(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "model: tiny-random\ntask: tweets\nmethod: craft\ncraft: {rank_layers: 2, rank_out: 8, rank_in: 8}\n"
        "train: {lr: {float: [1e-4, 1e-2], log: true}, head_lr: 3e-3}\nsearch: {num_samples: 2, max_budget: 8}\n"
    )
    spec = load_sweep_spec(path, ["train.head_lr=2e-3"])
    domain = spec.domains["train.lr"]
    assert (domain.low, domain.high, domain.log) == (0.0001, 0.01, True)
    assert spec.base["train"]["head_lr"] == 0.002


def test_an_id_that_looks_like_a_number_is_written_quoted_and_reads_back_a_string(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(lr="3e-4", head="1e-3"))
    run = load_run_config(path, ["provenance.trial_id='12e45678'", "provenance.sweep='1e3'"])
    assert run.provenance == {"trial_id": "12e45678", "sweep": "1e3"}
    text = run.to_yaml()
    assert "trial_id: '12e45678'" in text and "lr: 0.0003" in text
    (tmp_path / "again.yaml").write_text(text)
    assert load_run_config(tmp_path / "again.yaml") == run
