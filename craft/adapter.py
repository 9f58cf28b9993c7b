"""The shared adapter of one projection type: its frozen Tucker factors and three J matrices.

For a projection type with stack W (L, d_out, d_in) and frozen HOSVD (G; U_layers, U_out, U_in)
the adapted weight of layer l is W_l + U_out M_l U_in^T with

    M_l = J_out Gt_l J_in^T - Gb_l,   Gt = G x_layers (U_layers J_layers),   Gb = G x_layers U_layers

computed once per forward pass for all layers by :class:`CraftAdapter`. Writing J = I + D,
M = dG + D_out Gt J_in^T + Gt D_in^T with dG = G x_layers (U_layers D_layers), which is exactly
zero at J = I in any precision: the model starts as the base model bit for bit.

Precision: the J matrices, the frozen factors and M live in the adapter's working dtype
(float32 whatever the base model's dtype, by default: ``CraftConfig.adapter_dtype``), so that a
bf16 model's J can move by 1e-3 and U stays orthonormal to float32 accuracy. The per-pass
tensors (M, or P = M^T U_out^T) are cast to a projection's compute dtype once per pass, the
frozen factors once per dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .tucker import Tucker

__all__ = ["CraftAdapter"]


class CraftAdapter(nn.Module):
    """Frozen Tucker factors of one projection type and its three trainable J matrices.

    Every adapted layer of this projection type holds a reference to the same instance.

    Args:
        tucker: the (already truncated) HOSVD of the (layers, out, in) stack.
        init_scale: s in J = I + s * E.
        generator: source of E (seeded by the caller for reproducibility).
        dtype: working dtype of the J matrices, the frozen factors and M (float32 unless the
            config asks otherwise); the update is cast from it to each pass's compute dtype.
    """

    def __init__(self, tucker: Tucker, init_scale: float, generator: torch.Generator, dtype: torch.dtype = torch.float32):
        super().__init__()
        u_layers, u_out, u_in = tucker.factors
        core = tucker.core  # (r_L, r_out, r_in), float64
        self.register_buffer("u_layers", u_layers.to(dtype), persistent=False)  # (L, r_L)
        self.register_buffer("u_out", u_out.to(dtype).contiguous(), persistent=False)  # (d_out, r_out)
        self.register_buffer("u_in", u_in.to(dtype).contiguous(), persistent=False)  # (d_in, r_in)
        self.register_buffer("core", core.to(dtype), persistent=False)  # (r_L, r_out, r_in)
        base = torch.einsum("lk,kab->lab", u_layers, core)  # (L, r_out, r_in), float64
        self.register_buffer("core_base", base.to(dtype), persistent=False)  # Gb
        self.j_layers = nn.Parameter(_init_j(core.shape[0], init_scale, generator, dtype))
        self.j_out = nn.Parameter(_init_j(core.shape[1], init_scale, generator, dtype))
        self.j_in = nn.Parameter(_init_j(core.shape[2], init_scale, generator, dtype))
        # Per pass: (kind, dtype, padding) -> (key, tensor, per-layer views); per dtype: cast factors.
        self._shared: dict[tuple, tuple[tuple, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._cast: dict[torch.dtype, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    @property
    def ranks(self) -> tuple[int, int, int]:
        """(rank_layers, rank_out, rank_in)."""
        return tuple(self.core.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype of the J matrices, the factors and M."""
        return self.j_out.dtype

    def new_pass(self) -> None:
        """Forget the per-pass tensors: the model calls this once per forward pass (a pre-hook,
        outside any checkpointed layer), so a J written through ``.data`` is seen too."""
        self._shared.clear()

    def _per_pass(
        self, kind: str, dtype: torch.dtype, pad: tuple[int, int] = (0, 0)
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        # Recomputed when a J changes version, the tensors move, or grad mode changes.
        tensors = (self.j_layers, self.j_out, self.j_in, self.core)
        key = (torch.is_grad_enabled(),) + tuple((t._version, t.data_ptr()) for t in tensors)
        hit = self._shared.get((kind, dtype, pad))
        if hit is None or hit[0] != key:
            fn = functools.partial(_projections, pad=pad) if kind == "projections" else _middles
            fn = functools.partial(fn, dtype=dtype)
            js, frozen = (self.j_layers, self.j_out, self.j_in), (self.u_layers, self.core, self.core_base, self.u_out)
            if torch.is_grad_enabled() and any(j.requires_grad for j in js):
                out = _Shared.apply(fn, *js, *frozen)
            else:
                with torch.autocast(self.u_out.device.type, enabled=False):
                    out = fn(*js, *frozen)
            # One unbind per pass: its backward stacks the layers' gradients in one op, where
            # indexing per layer would zero-fill and add an (L, ...) tensor per layer.
            hit = (key, out, out.unbind(0))
            self._shared[(kind, dtype, pad)] = hit
        return hit[1], hit[2]

    def middles(self, refresh: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """M for every layer, shape (L, r_out, r_in), in ``dtype`` (default: the working dtype).

        Computed once per pass and shared by every layer. Its graph may be walked by several
        backward calls (reentrant checkpointing), see :class:`_Shared`.

        Args:
            refresh: recompute even if nothing seems to have changed (J written via ``.data``).
            dtype: the dtype to return M in (cast once per pass).
        """
        if refresh:
            self.new_pass()
        return self._per_pass("middles", dtype or self.dtype)[0]

    def middle(self, layer: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """M of one layer, shape (r_out, r_in), from the pass's shared computation."""
        return self._per_pass("middles", dtype or self.dtype)[1][layer]

    def projection(self, layer: int, dtype: torch.dtype | None = None, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """P_l = M_l^T U_out^T of one layer, shape (r_in, d_out): the update is (x U_in) P_l.

        Args:
            pad: zero columns before and after P_l, so that it spans a fused projection's output.
        """
        return self._per_pass("projections", dtype or self.dtype, pad)[1][layer]

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_out, U_in) in ``dtype``, cast once per dtype and device (frozen, so never stale)."""
        if dtype is None or dtype == self.dtype:
            return self.u_out, self.u_in
        key = (self.u_out.data_ptr(), self.u_in.data_ptr())
        hit = self._cast.get(dtype)
        if hit is None or hit[0] != key:
            hit = (key, self.u_out.to(dtype), self.u_in.to(dtype))
            self._cast[dtype] = hit
        return hit[1], hit[2]

    def delta_weight(self, layer: int) -> torch.Tensor:
        """Update U_out M_l U_in^T of one layer, shape (d_out, d_in), in the working dtype."""
        mid = self.middles(refresh=True)[layer]  # (r_out, r_in)
        return self.u_out @ mid @ self.u_in.T  # (d_out, d_in)


def _compute_middles(j_layers, j_out, j_in, u_layers, core, core_base) -> torch.Tensor:
    """M = dG + D_out Gt J_in^T + Gt D_in^T with D = J - I: exactly 0 at J = I."""
    d_layers, d_out, d_in = (j - _eye(j.shape[0], j.dtype, j.device) for j in (j_layers, j_out, j_in))
    delta_core = torch.einsum("lk,kab->lab", u_layers @ d_layers, core)  # dG: (L, r_out, r_in)
    top = core_base + delta_core  # Gt: (L, r_out, r_in)
    return (
        delta_core
        + torch.einsum("oa,lab,ib->loi", d_out, top, j_in)  # D_out Gt J_in^T: (L, r_out, r_in)
        + torch.einsum("lab,ib->lai", top, d_in)  # Gt D_in^T: (L, r_out, r_in)
    )


@functools.lru_cache(maxsize=64)
def _eye(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An identity matrix, made once per size, dtype and device (two kernels fewer per J per pass)."""
    with torch.inference_mode(False), torch.no_grad():  # a plain constant, usable in any later graph
        return torch.eye(n, dtype=dtype, device=device)


def _middles(j_layers, j_out, j_in, u_layers, core, core_base, u_out, *, dtype) -> torch.Tensor:
    """M in the working dtype, cast to ``dtype``: (L, r_out, r_in)."""
    return _compute_middles(j_layers, j_out, j_in, u_layers, core, core_base).to(dtype)


def _projections(j_layers, j_out, j_in, u_layers, core, core_base, u_out, *, dtype, pad) -> torch.Tensor:
    """P = M^T U_out^T for every layer in the working dtype, cast to ``dtype``, with ``pad``
    zero columns before and after: (L, r_in, pad[0] + d_out + pad[1])."""
    mids = _compute_middles(j_layers, j_out, j_in, u_layers, core, core_base)  # (L, r_out, r_in)
    projections = torch.einsum("loi,do->lid", mids, u_out).to(dtype)  # (L, r_in, d_out)
    return F.pad(projections, pad) if any(pad) else projections


class _Shared(torch.autograd.Function):
    """A per-pass tensor computed from the J matrices, with a backward that can run more than once.

    The tensor (M or P) is shared by every layer. Reentrant activation checkpointing
    back-propagates each layer in a backward call of its own, so its graph is walked once per
    layer; the usual saved tensors would be freed after the first walk. Here the small graph
    (r x r matrices, L x r x r middles) is built on detached J leaves, kept on ``ctx`` and walked
    with ``retain_graph`` each time; it goes when the model's graph goes. Autocast is off
    inside: the working dtype is what the caller chose.
    """

    @staticmethod
    def forward(ctx, fn: Callable, j_layers, j_out, j_in, *frozen):  # noqa: D102
        js = (j_layers, j_out, j_in)
        ctx.js, ctx.versions = js, tuple(j._version for j in js)
        # Identity saved-tensor hooks: the small graph keeps its tensors as they are, out of reach of
        # an enclosing non-reentrant checkpoint, which would otherwise count them in one pass only.
        with torch.enable_grad(), torch.autocast(j_out.device.type, enabled=False), _keep_saved():
            ctx.leaves = [j.detach().requires_grad_(n) for j, n in zip(js, ctx.needs_input_grad[1:4])]
            ctx.out = fn(*ctx.leaves, *frozen)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if tuple(j._version for j in ctx.js) != ctx.versions:
            raise RuntimeError("a CRAFT J matrix was modified in place between the forward pass and its backward")
        wanted = [leaf for leaf in ctx.leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad(ctx.out, wanted, grad, retain_graph=True) if wanted else ())
        return (None, *[next(found) if leaf.requires_grad else None for leaf in ctx.leaves], *[None] * (len(ctx.needs_input_grad) - 4))


def _keep_saved() -> torch.autograd.graph.saved_tensors_hooks:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _init_j(rank: int, scale: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    noise = torch.randn(rank, rank, generator=generator, dtype=torch.float64)
    return (torch.eye(rank, dtype=torch.float64) + scale * noise).to(dtype)
