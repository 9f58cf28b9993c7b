"""Cached factors: computed once at max ranks, sliced per use, saved as safetensors."""

from __future__ import annotations

import pytest
import torch

from craft import CraftConfig, Factors, check_ranks, compute_factors, get_craft_model

BUFFERS = ("u_layers", "u_out", "u_in", "core", "core_base")


def set_js(cm, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in cm.craft_adapters:
            for axis in ("layers", "out", "in"):
                j = getattr(adapter, f"j_{axis}")
                j.copy_(torch.eye(j.shape[0]) + 0.2 * torch.randn(j.shape, generator=g))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("max_ranks", [None, (3, 12, 10)])
def test_sliced_factors_match_direct(tiny, name, max_ranks):
    model, inputs = tiny.build(name)
    factors = compute_factors(model, None, max_ranks=max_ranks)
    if max_ranks is None:
        # full ranks of each stack (GQA: the value stack is narrower)
        for stack in factors.stacks:
            assert factors.tuckers[stack.name].ranks == stack.shape
    config = tiny.config()
    direct_model, _ = tiny.build(name)
    direct = get_craft_model(direct_model, config)
    cached = get_craft_model(model, config, factors=factors)
    assert cached.target_names == direct.target_names
    for a, b in zip(cached.craft_adapters, direct.craft_adapters):
        assert a.ranks == tiny.ranks
        for buf in BUFFERS:
            assert tiny.max_diff(getattr(a, buf), getattr(b, buf)) <= 1e-6, buf
    set_js(cached)
    set_js(direct)
    assert tiny.max_diff(tiny.logits(cached, inputs), tiny.logits(direct, inputs)) <= 1e-6


def test_compute_factors_from_config_and_target_list(tiny):
    model, _ = tiny.build("bert")
    from_config = compute_factors(model, CraftConfig(2, 6, 5, target_modules=["query", "value"]))
    assert from_config.max_ranks == (2, 6, 5)
    assert from_config.target_names == ["query", "value"]
    assert from_config.tuckers["value"].ranks == (2, 6, 5)
    from_list = compute_factors(model, ["value"], max_ranks=(3, 4, 4))
    assert from_list.target_names == ["value"]
    torch.testing.assert_close(from_list.sliced("value", (2, 4, 4)).factors[1], from_config.tuckers["value"].factors[1][:, :4])
    assert from_config.fingerprint != from_list.fingerprint  # other targets


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_save_load_round_trip(tiny, tmp_path, name):
    model, _ = tiny.build(name)
    factors = compute_factors(model, None, max_ranks=(3, 10, 9))
    path = factors.save(tmp_path / "sub" / "factors.safetensors")
    assert path.is_file()
    loaded = Factors.load(path)
    assert loaded.stacks == factors.stacks
    assert loaded.max_ranks == factors.max_ranks == (3, 10, 9)
    assert loaded.fingerprint == factors.fingerprint
    assert loaded.target_names == factors.target_names
    for key, t in factors.tuckers.items():
        u = loaded.tuckers[key]
        assert torch.equal(u.core, t.core) and u.core.dtype == torch.float64
        assert all(torch.equal(a, b) for a, b in zip(u.factors, t.factors))
        assert all(torch.equal(a, b) for a, b in zip(u.spectra, t.spectra))
    # the loaded factors are usable on the same base weights
    fresh, inputs = tiny.build(name)
    cm = get_craft_model(fresh, tiny.config(), factors=loaded)
    assert cm.target_names == factors.target_names


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="compute_factors"):
        Factors.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="recompute"):
        Factors.load(tmp_path / "other.safetensors")


def test_factors_of_another_model(tiny):
    model, _ = tiny.build("bert", seed=0)
    other, _ = tiny.build("bert", seed=1)
    factors = compute_factors(other, None, max_ranks=(3, 16, 16))
    with pytest.raises(ValueError, match="fingerprint|recompute"):
        get_craft_model(model, tiny.config(), factors=factors)


def test_factors_of_other_targets(tiny):
    model, _ = tiny.build("bert")
    factors = compute_factors(model, ["query"], max_ranks=(3, 16, 16))
    with pytest.raises(ValueError, match="recompute"):
        get_craft_model(model, tiny.config(), factors=factors)


def test_ranks_above_cached_max(tiny):
    model, _ = tiny.build("bert")
    factors = compute_factors(model, None, max_ranks=(2, 8, 8))
    with pytest.raises(ValueError, match="recompute"):
        get_craft_model(model, CraftConfig(3, 8, 8), factors=factors)
    with pytest.raises(ValueError, match="recompute"):
        factors.sliced("query", (2, 9, 8))


def test_max_ranks_validation(tiny):
    model, _ = tiny.build("llama")
    with pytest.raises(ValueError, match="three positive ranks"):
        compute_factors(model, None, max_ranks=(2, 8))
    with pytest.raises(ValueError, match="three positive ranks"):
        compute_factors(model, None, max_ranks=(0, 8, 8))
    with pytest.raises(ValueError, match=r"rank_out=20.*choose rank_out <= 16"):
        compute_factors(model, None, max_ranks=(2, 20, 8))


def test_check_ranks(tiny):
    model, _ = tiny.build("bert")
    from craft import find_targets

    stacks = find_targets(model)
    check_ranks(stacks, (3, 32, 32))
    with pytest.raises(ValueError, match=r"rank_in=33.*choose rank_in <= 32"):
        check_ranks(stacks, (3, 32, 33))


def test_numpy_round_trip_shares_memory_and_keeps_values(tiny):
    import numpy as np

    model, _ = tiny.build("llama")
    factors = compute_factors(model, None, (2, 8, 8))
    arrays, meta = factors.to_numpy()
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    for a in arrays.values():
        a.setflags(write=False)  # as the Ray object store hands them out
    again = Factors.from_numpy(arrays, meta)
    assert again.fingerprint == factors.fingerprint and again.max_ranks == factors.max_ranks
    assert [s.shape for s in again.stacks] == [s.shape for s in factors.stacks]
    for name in factors.target_names:
        a, b = factors.sliced(name, (1, 4, 4)), again.sliced(name, (1, 4, 4))
        assert torch.equal(a.core, b.core) and all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    name = factors.target_names[0]
    assert np.shares_memory(again.tuckers[name].core.numpy(), arrays[f"{name}/core"])  # no copy out of the store
