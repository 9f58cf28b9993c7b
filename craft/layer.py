"""CRAFT modules: the shared adapter of one projection type and the wrapper of one projection.

For a projection type with stack W (L, d_out, d_in) and frozen HOSVD (G; U_layers, U_out, U_in)
the adapted weight of layer l is W_l + U_out M_l U_in^T with

    M_l = J_out Gt_l J_in^T - Gb_l,   Gt = G x_layers (U_layers J_layers),   Gb = G x_layers U_layers

computed once per forward pass for all layers by :class:`CraftAdapter`. Writing J = I + D,
M = dG + D_out Gt J_in^T + Gt D_in^T with dG = G x_layers (U_layers D_layers), which is exactly
zero at J = I in any precision: the model starts as the base model bit for bit.

:class:`CraftLinear` wraps one ``nn.Linear`` or GPT-2 ``Conv1D`` and adds the update of each
part it carries (a fused projection such as ``c_attn`` carries one part per adapted slice).
Two equivalent ways to compute it (see :func:`choose_compute`):

* ``factored``: y = base(x) + ((x U_in) M_l^T) U_out^T, a rank-r update; no d x d tensor.
* ``merged``: y = x (W_l + U_out M_l U_in^T)^T through :class:`_MergedLinear`, whose backward
  gets dM = (dy U_out)^T (x U_in) directly, never the d_out x d_in weight gradient. It costs
  one d_out x d_in weight per layer per step and wins once a batch holds a few hundred tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .tucker import Tucker

__all__ = ["CraftAdapter", "CraftLinear", "AdapterPart", "choose_compute", "COMPUTE_MODES"]

COMPUTE_MODES = ("auto", "factored", "merged")


class CraftAdapter(nn.Module):
    """Frozen Tucker factors of one projection type and its three trainable J matrices.

    Every adapted layer of this projection type holds a reference to the same instance.

    Args:
        tucker: the (already truncated) HOSVD of the (layers, out, in) stack.
        init_scale: s in J = I + s * E.
        generator: source of E (seeded by the caller for reproducibility).
        dtype: dtype of the buffers and parameters (the model's).
    """

    def __init__(self, tucker: Tucker, init_scale: float, generator: torch.Generator, dtype: torch.dtype):
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
        self._cache: torch.Tensor | None = None
        self._per_layer: tuple[torch.Tensor, ...] = ()
        self._cache_key: tuple = ()

    @property
    def ranks(self) -> tuple[int, int, int]:
        """(rank_layers, rank_out, rank_in)."""
        return tuple(self.core.shape)  # type: ignore[return-value]

    def middles(self, refresh: bool = False) -> torch.Tensor:
        """M for every layer, shape (L, r_out, r_in).

        The model refreshes it once per forward pass (a pre-hook, outside any checkpointed
        layer) and every layer indexes it. Between refreshes it is recomputed when a J matrix
        changes version, the tensors move, or grad mode changes. Its graph may be walked by
        several backward calls (reentrant checkpointing), see :class:`_Middles`.

        Args:
            refresh: recompute even if nothing seems to have changed (J written via ``.data``).
        """
        tensors = (self.j_layers, self.j_out, self.j_in, self.core)
        key = (torch.is_grad_enabled(),) + tuple((t._version, t.data_ptr()) for t in tensors)
        if refresh or self._cache is None or key != self._cache_key:
            self._cache = _Middles.apply(self.j_layers, self.j_out, self.j_in, self.u_layers, self.core, self.core_base)
            # One unbind per pass: its backward stacks the layers' gradients in one op, where
            # indexing per layer would zero-fill and add an (L, r_out, r_in) tensor per layer.
            self._per_layer = self._cache.unbind(0)
            self._cache_key = key
        return self._cache

    def middle(self, layer: int) -> torch.Tensor:
        """M of one layer, shape (r_out, r_in), from the pass's shared computation."""
        self.middles()
        return self._per_layer[layer]

    def delta_weight(self, layer: int) -> torch.Tensor:
        """Update U_out M_l U_in^T of one layer, shape (d_out, d_in)."""
        mid = self.middles(refresh=True)[layer]  # (r_out, r_in)
        return self.u_out @ mid @ self.u_in.T  # (d_out, d_in)


def _minus_eye(j: torch.Tensor) -> torch.Tensor:
    return j - torch.eye(j.shape[0], dtype=j.dtype, device=j.device)


def _compute_middles(j_layers, j_out, j_in, u_layers, core, core_base) -> torch.Tensor:
    """M = dG + D_out Gt J_in^T + Gt D_in^T with D = J - I: exactly 0 at J = I."""
    d_layers, d_out, d_in = (_minus_eye(j) for j in (j_layers, j_out, j_in))
    delta_core = torch.einsum("lk,kab->lab", u_layers @ d_layers, core)  # dG: (L, r_out, r_in)
    top = core_base + delta_core  # Gt: (L, r_out, r_in)
    return (
        delta_core
        + torch.einsum("oa,lab,ib->loi", d_out, top, j_in)  # D_out Gt J_in^T: (L, r_out, r_in)
        + torch.einsum("lab,ib->lai", top, d_in)  # Gt D_in^T: (L, r_out, r_in)
    )


class _Middles(torch.autograd.Function):
    """:func:`_compute_middles` with a backward that can run more than once.

    M is shared by every layer. Reentrant activation checkpointing back-propagates each
    layer in a backward call of its own, so M's graph is walked once per layer; the usual
    saved tensors would be freed after the first walk. Here the inputs are kept on ``ctx``
    (r x r matrices, a few KB) and backward recomputes the small graph each time.
    """

    @staticmethod
    def forward(ctx, j_layers, j_out, j_in, u_layers, core, core_base):  # noqa: D102
        ctx.kept = tuple(t.detach().clone() for t in (j_layers, j_out, j_in)) + (u_layers, core, core_base)
        return _compute_middles(j_layers, j_out, j_in, u_layers, core, core_base)

    @staticmethod
    def backward(ctx, dmids):  # noqa: D102
        *js, u_layers, core, core_base = ctx.kept
        with torch.enable_grad():
            leaves = [j.detach().requires_grad_() for j in js]
            mids = _compute_middles(*leaves, u_layers, core, core_base)
            grads = torch.autograd.grad(mids, leaves, dmids)
        return (*grads, None, None, None)


def _init_j(rank: int, scale: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    noise = torch.randn(rank, rank, generator=generator, dtype=torch.float64)
    return (torch.eye(rank, dtype=torch.float64) + scale * noise).to(dtype)


@dataclass
class AdapterPart:
    """One adapted slice of a wrapped projection: layer ``layer`` of ``adapter``'s stack,
    written into output rows ``rows`` (the whole output when None)."""

    adapter: CraftAdapter
    layer: int
    rows: tuple[int, int] | None = None


def choose_compute(tokens: int, d_out: int, d_in: int, r_out: int, r_in: int) -> str:
    """Pick the cheaper path for a batch of ``tokens`` rows by counting extra flops.

    factored: 2N(2 d_in r_in + 2 d_out r_out + 3 r_in r_out)  (forward and backward)
    merged:   2N(d_in r_in + d_out r_out + r_in r_out) + 2 d_out r_in (r_out + d_in)
    """
    factored = 2 * tokens * (2 * d_in * r_in + 2 * d_out * r_out + 3 * r_in * r_out)
    merged = 2 * tokens * (d_in * r_in + d_out * r_out + r_in * r_out) + 2 * d_out * r_in * (r_out + d_in)
    return "merged" if merged < factored else "factored"


class CraftLinear(nn.Module):
    """A wrapped ``nn.Linear`` / ``Conv1D`` projection that adds its CRAFT parts' updates.

    The adapters are held by reference (not registered as submodules): the model registers
    each shared adapter once.
    """

    def __init__(self, base_layer: nn.Module, parts: list[AdapterPart], compute: str = "auto"):
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        self.base_layer = base_layer
        self._parts = list(parts)
        self.compute = compute
        self.merged = False

    @property
    def parts(self) -> list[AdapterPart]:
        """The adapter parts this projection carries."""
        return list(self._parts)

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view (Conv1D stores it as in x out)."""
        return _weight_out_in(self.base_layer)

    def get_delta_weight(self, part: AdapterPart | None = None) -> torch.Tensor:
        """The update of one part (the only part when None), shape (d_out of the part, d_in)."""
        if part is None:
            if len(self._parts) != 1:
                raise ValueError("this projection carries several parts; pass the part whose delta you want")
            part = self._parts[0]
        return part.adapter.delta_weight(part.layer)

    def full_delta_weight(self) -> torch.Tensor:
        """Sum of every part's update placed in its rows, shape (out, in) of the base weight."""
        weight = self.base_weight()
        delta = torch.zeros_like(weight)
        for part in self._parts:
            lo, hi = part.rows or (0, weight.shape[0])
            delta[lo:hi] += part.adapter.delta_weight(part.layer).to(weight.dtype)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; forward then costs nothing extra."""
        if not self.merged:
            self.base_weight().add_(self.full_delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract a merged update again (exact up to rounding)."""
        if self.merged:
            self.base_weight().sub_(self.full_delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self._parts:
            return self.base_layer(x)
        mode = self.compute
        if mode == "auto":
            a = self._parts[0].adapter
            d_out, d_in = a.u_out.shape[0], a.u_in.shape[0]
            mode = choose_compute(x.numel() // x.shape[-1], d_out, d_in, a.u_out.shape[1], a.u_in.shape[1])
        if mode == "merged":
            mids = [p.adapter.middle(p.layer) for p in self._parts]
            spec = tuple((p.rows, p.adapter.u_out, p.adapter.u_in) for p in self._parts)
            return _MergedLinear.apply(x, self.base_weight(), _bias(self.base_layer), spec, *mids)
        out = self.base_layer(x)
        for p in self._parts:
            mid = p.adapter.middle(p.layer)  # (r_out, r_in)
            update = ((x @ p.adapter.u_in) @ mid.T) @ p.adapter.u_out.T  # (..., d_out)
            if p.rows is None:
                out = out + update
            else:
                out = torch.cat([out[..., : p.rows[0]], out[..., p.rows[0] : p.rows[1]] + update, out[..., p.rows[1] :]], -1)
        return out


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return module.weight  # (out, in)
    return module.weight.T  # Conv1D keeps (in, out): a transposed view


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


class _MergedLinear(torch.autograd.Function):
    """y = x W'^T + b with W' = W + sum over parts of U_out M U_in^T placed in its rows.

    Backward returns dx = dy W' and dM = (dy_rows U_out)^T (x U_in) for each part; the frozen
    W, U and bias get no gradient and the d_out x d_in weight gradient is never formed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec, *mids):  # noqa: D102
        eff = weight
        for (rows, u_out, u_in), mid in zip(spec, mids):
            left = u_out @ mid  # (d_out, r_in)
            if rows is None:
                eff = torch.addmm(eff, left, u_in.T)  # W + U_out M U_in^T: (out, in), a new tensor
            else:
                eff = eff.clone() if eff is weight else eff
                eff[rows[0] : rows[1]].addmm_(left, u_in.T)  # (d_out, d_in) block of the fused weight
        y = F.linear(x, eff, bias)  # (..., out)
        need = list(ctx.needs_input_grad[4:])
        projected = [x @ u_in if n else None for (_, _, u_in), n in zip(spec, need)]  # (..., r_in)
        ctx.spec = spec
        ctx.need = need
        ctx.save_for_backward(eff, *[p for p in projected if p is not None])
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        eff, *projected = ctx.saved_tensors
        dx = dy @ _as(eff, dy.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        grads, it = [], iter(projected)
        for (rows, u_out, _), need in zip(ctx.spec, ctx.need):
            if not need:
                grads.append(None)
                continue
            a = next(it)  # (..., r_in)
            g = (dy if rows is None else dy[..., rows[0] : rows[1]]) @ _as(u_out, dy.dtype)  # (..., r_out)
            dmid = g.reshape(-1, g.shape[-1]).T @ _as(a, dy.dtype).reshape(-1, a.shape[-1])  # (r_out, r_in)
            grads.append(_as(dmid, u_out.dtype))
        return (dx, None, None, None, *grads)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
