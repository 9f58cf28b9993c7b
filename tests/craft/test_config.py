"""CraftConfig: validation with messages that name the fix, JSON round trip."""

from __future__ import annotations

import json
import math

import pytest

from craft import CONFIG_NAME, CraftConfig


def full_config() -> CraftConfig:
    return CraftConfig(
        rank_layers=2,
        rank_out=8,
        rank_in=6,
        target_modules=["query", "value"],
        init_scale=0.25,
        seed=7,
        modules_to_save=["classifier"],
    )


def test_defaults_and_ranks():
    c = CraftConfig(3, 4, 5)
    assert c.ranks == (3, 4, 5)
    assert c.init_scale == 0.0 and c.seed == 0
    assert c.target_modules is None and c.modules_to_save is None


def test_json_round_trip():
    c = full_config()
    text = c.to_json()
    assert json.loads(text)["rank_in"] == 6
    back = CraftConfig.from_json(text)
    assert back == c
    assert CraftConfig.from_dict(c.to_dict()) == c
    default = CraftConfig(1, 2, 3)
    assert CraftConfig.from_json(default.to_json()) == default


def test_save_load_round_trip(tmp_path):
    c = full_config()
    path = c.save(tmp_path / "adapter")
    assert path == tmp_path / "adapter" / CONFIG_NAME and path.is_file()
    assert CraftConfig.load(tmp_path / "adapter") == c


def test_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="save_pretrained"):
        CraftConfig.load(tmp_path)


def test_int_init_scale_becomes_float_and_single_name_becomes_list():
    c = CraftConfig(1, 1, 1, init_scale=1, target_modules="query")
    assert isinstance(c.init_scale, float) and c.init_scale == 1.0
    assert c.target_modules == ["query"]


@pytest.mark.parametrize("field", ["rank_layers", "rank_out", "rank_in"])
@pytest.mark.parametrize("value", [0, -3])
def test_rank_below_one(field, value):
    kw = dict(rank_layers=2, rank_out=2, rank_in=2)
    kw[field] = value
    with pytest.raises(ValueError, match=rf"{field} must be at least 1"):
        CraftConfig(**kw)


@pytest.mark.parametrize("value", [2.0, "2", None, True, False])
def test_rank_not_an_int(value):
    with pytest.raises(ValueError, match="rank_out must be an integer"):
        CraftConfig(rank_layers=2, rank_out=value, rank_in=2)


def test_seed_not_an_int():
    with pytest.raises(ValueError, match="seed must be an integer"):
        CraftConfig(1, 1, 1, seed=1.5)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, -math.inf])
def test_init_scale_not_finite_non_negative(value):
    with pytest.raises(ValueError, match="init_scale must be finite and >= 0"):
        CraftConfig(1, 1, 1, init_scale=value)


@pytest.mark.parametrize("value", ["0.1", True, None])
def test_init_scale_not_a_number(value):
    with pytest.raises(ValueError, match="init_scale must be a number"):
        CraftConfig(1, 1, 1, init_scale=value)


def test_unknown_key_names_valid_keys():
    data = full_config().to_dict()
    data["rank_outt"] = 3
    with pytest.raises(ValueError, match="rank_outt") as err:
        CraftConfig.from_dict(data)
    for key in ("rank_layers", "rank_out", "rank_in", "target_modules", "init_scale", "seed", "modules_to_save"):
        assert key in str(err.value)


@pytest.mark.parametrize("field", ["target_modules", "modules_to_save"])
@pytest.mark.parametrize("value", [[], ["query", "query"], ["query", ""], [3], "", 5])
def test_bad_module_lists(field, value):
    with pytest.raises(ValueError, match=field):
        CraftConfig(1, 1, 1, **{field: value})


def test_duplicate_target_message():
    with pytest.raises(ValueError, match="twice"):
        CraftConfig(1, 1, 1, target_modules=["q_proj", "v_proj", "q_proj"])


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", '"rank"'])
def test_from_json_rejects_non_object(text):
    with pytest.raises(ValueError, match="CraftConfig"):
        CraftConfig.from_json(text)
