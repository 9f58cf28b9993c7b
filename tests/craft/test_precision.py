"""Half precision and autocast on every layout and both compute paths.

Each case runs a tiny model in one precision: fp32, bf16, fp16, or fp32 under bf16 autocast
(``torch.autocast("cpu", dtype=torch.bfloat16)`` runs the dtype logic CUDA's autocast runs). It
checks that the model starts as the base model bit for bit, that J's diagonal moves after a few
AdamW steps, and that J's gradients match a float64 reference on the same (rounded) weights
within the tolerances below, which were set about three times above the largest error seen.
fp16 back-propagates a loss scaled by 2^10, as a gradient scaler would: unscaled, the small
gradients of a BERT underflow in fp16 whatever the adapter does.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from craft import get_craft_model

LAYOUTS = ["bert", "distilbert", "gpt2", "llama", "vit"]
# precision -> (model dtype, autocast, relative tolerance on J's gradients and on the logits)
PRECISIONS = {
    "fp32": (torch.float32, False, 1e-5),
    "bf16": (torch.bfloat16, False, 6e-2),
    "fp16": (torch.float16, False, 1e-2),
    "autocast-bf16": (torch.float32, True, 6e-2),
}
FP16_LOSS_SCALE = 2.0**10
J_NAMES = [f"craft_adapters.{i}.j_{a}" for i in range(2) for a in ("layers", "out", "in")]


def _build(tiny, name: str, dtype: torch.dtype):
    model, inputs = tiny.build(name)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}  # ViT's pixels
    return model.to(dtype), cast


def _context(autocast: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()


def _loss_and_grads(cm, inputs, autocast: bool, dtype: torch.dtype):
    """Logits (float64) and J's gradients (float64) of one forward and backward pass."""
    with _context(autocast):
        out = cm(**inputs)
    scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    (out.loss.float() * scale).backward()
    params = dict(cm.named_parameters())
    return out.logits.detach().double(), {n: params[n].grad.double() / scale for n in J_NAMES}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("compute", ["factored", "merged"])
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", LAYOUTS)
def test_exact_start_in_every_precision(tiny, name, precision, compute):
    dtype, autocast, _ = PRECISIONS[precision]
    model, inputs = _build(tiny, name, dtype)
    with torch.no_grad(), _context(autocast):
        base = model(**inputs).logits.clone()
        cm = get_craft_model(model, tiny.config(), compute=compute)
        adapted = cm(**inputs).logits
    assert adapted.dtype == base.dtype
    assert torch.equal(adapted, base), f"J = I changes the output by {float((adapted - base).abs().max()):.3g}"


@pytest.mark.parametrize("compute", ["factored", "merged"])
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", LAYOUTS)
def test_j_trains_in_fp32_and_its_diagonal_moves(tiny, name, precision, compute):
    dtype, autocast, _ = PRECISIONS[precision]
    model, inputs = _build(tiny, name, dtype)
    cm = get_craft_model(model, tiny.config(init_scale=1e-3), compute=compute)
    js = [p for n, p in cm.named_parameters() if n in J_NAMES]
    assert all(j.dtype == torch.float32 for j in js), "J trains in float32 whatever the model's dtype"
    for adapter in cm.craft_adapters:  # the frozen factors keep U orthonormal to float32 accuracy
        for u in (adapter.u_out, adapter.u_in):
            eye = torch.eye(u.shape[1], dtype=torch.float64)
            assert float((u.double().T @ u.double() - eye).abs().max()) < 1e-6
    before = [j.detach().clone() for j in js]
    optimizer = torch.optim.AdamW(js, lr=1e-3)  # J alone: the head's dtype is the model's
    for _ in range(3):
        optimizer.zero_grad()
        _loss_and_grads(cm, inputs, autocast, dtype)
        optimizer.step()
    for j, start in zip(js, before):
        moved = (j.detach().diagonal() != start.diagonal()).sum()
        assert int(moved) == j.shape[0], f"{int(moved)} of {j.shape[0]} diagonal entries moved"


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", LAYOUTS)
def test_gradients_match_a_float64_reference_on_both_paths(tiny, name, precision):
    """Both paths' J gradients and logits are within the precision's tolerance of float64's,
    computed on the same weights (the low-precision model cast up to float64), and of each other."""
    dtype, autocast, tol = PRECISIONS[precision]
    model, inputs = _build(tiny, name, dtype)
    reference = get_craft_model(model.double(), tiny.config(init_scale=0.1), compute="factored")
    assert reference.craft_adapters[0].j_out.dtype == torch.float64
    ref_logits, ref_grads = _loss_and_grads(
        reference, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}, False, torch.float64
    )
    paths = {}
    for compute in ("factored", "merged"):
        model, inputs = _build(tiny, name, dtype)
        cm = get_craft_model(model, tiny.config(init_scale=0.1), compute=compute)
        logits, grads = paths[compute] = _loss_and_grads(cm, inputs, autocast, dtype)
        assert float((logits - ref_logits).abs().max() / ref_logits.abs().max()) <= tol, compute
        for n in J_NAMES:
            assert _relative(grads[n], ref_grads[n]) <= tol, f"{compute} {n}: {_relative(grads[n], ref_grads[n]):.2e}"
    (factored, f_grads), (merged, m_grads) = paths["factored"], paths["merged"]
    assert float((factored - merged).abs().max() / factored.abs().max()) <= tol  # the two paths agree
    for n in J_NAMES:
        assert _relative(m_grads[n], f_grads[n]) <= tol, f"paths differ on {n}"


@pytest.mark.parametrize("precision", ["bf16", "autocast-bf16"])
def test_merged_and_factored_agree_after_training(tiny, precision):
    """Trained J (not the identity): the two paths give the same logits within the tolerance."""
    dtype, autocast, tol = PRECISIONS[precision]
    logits = {}
    for compute in ("factored", "merged"):
        model, inputs = _build(tiny, "gpt2", dtype)
        cm = get_craft_model(model, tiny.config(init_scale=0.1), compute=compute)
        optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            _loss_and_grads(cm, inputs, autocast, dtype)
            optimizer.step()
        with torch.no_grad(), _context(autocast):
            logits[compute] = cm(**inputs).logits.double()
    assert float((logits["factored"] - logits["merged"]).abs().max() / logits["factored"].abs().max()) <= tol


def test_adapter_dtype_model_keeps_the_old_behaviour(tiny):
    """adapter_dtype="model" trains J in the model's bf16: then 1 + 1e-3 rounds back to 1."""
    model, inputs = _build(tiny, "llama", torch.bfloat16)
    cm = get_craft_model(model, tiny.config(adapter_dtype="model"))
    j = cm.craft_adapters[0].j_out
    assert j.dtype == torch.bfloat16
    assert torch.equal(torch.tensor(1.0, dtype=torch.bfloat16) + 1e-3, torch.tensor(1.0, dtype=torch.bfloat16))
    model, _ = _build(tiny, "llama", torch.bfloat16)
    assert get_craft_model(model, tiny.config(adapter_dtype="float64")).craft_adapters[0].j_out.dtype == torch.float64


def test_bad_adapter_dtype(tiny):
    with pytest.raises(ValueError, match="adapter_dtype must be one of auto, model, float32"):
        tiny.config(adapter_dtype="fp8")
