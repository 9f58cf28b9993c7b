"""The closed-form adapter counts match what apply_method really trains, on every layout."""

from __future__ import annotations

import pytest

from craft.budget import method_parameters
from craft.harness.methods import apply_method
from craft.harness.runconfig import LoraBlock, PissaBlock, RunConfig, VeraBlock

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _run(method: str, tiny) -> RunConfig:
    blocks = {"lora": LoraBlock(r=4), "pissa": PissaBlock(r=2), "vera": VeraBlock(r=8)}
    return RunConfig(method=method, craft=tiny.config(), **({method: blocks[method]} if method in blocks else {}))


@pytest.mark.parametrize("method", ["craft", "lora", "pissa", "vera", "head"])
def test_formula_matches_the_trained_count(method, layout, tiny):
    run = _run(method, tiny)
    model, _ = layout.build()
    block = run.craft if method == "craft" else run.method_block()
    expected = method_parameters(method, block, model)
    adapted = apply_method(model, run)
    assert adapted.adapter_parameters == expected


def test_craft_count_is_ranks_squared_per_type(tiny):
    model, _ = tiny.build("bert")
    assert method_parameters("craft", tiny.config(rank_layers=3, rank_out=5, rank_in=7), model) == 2 * (9 + 25 + 49)
