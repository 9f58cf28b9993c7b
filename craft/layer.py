"""The wrapper of one adapted projection: it adds its CRAFT parts' updates to the base output.

:class:`CraftLinear` wraps one ``nn.Linear`` or GPT-2 ``Conv1D`` and adds the update
U_out M_l U_in^T x of each part it carries (a fused projection such as ``c_attn`` carries one
part per adapted slice, its rows contiguous or interleaved per head); M_l comes from the shared
:class:`~craft.adapter.CraftAdapter`. Two equivalent ways to compute it (see :func:`choose_compute`):

* ``factored``: y = base(x) + (x U_in) P_l with P_l = M_l^T U_out^T (r_in, d_out), computed for
  all layers in one product per pass; per projection one matmul and one addmm (the add fused).
  A fused projection's part gets P_l spread with zero columns to the full output.
* ``merged``: y = x (W_l + U_out M_l U_in^T)^T through :class:`_MergedLinear`, whose backward
  gets dM = (dy U_out)^T (x U_in) directly, never the d_out x d_in weight gradient. It holds
  one d_out x d_in weight per projection per step and wins once a batch holds a few hundred
  tokens, as long as those weights fit :data:`MERGED_MEMORY_LIMIT`.

A projection computes in the pass's compute dtype: autocast's dtype when autocast is on, else
the input's; no in-place op mixes dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import CraftAdapter
from .layouts import Rows, add_rows_, is_conv1d, select_rows, spread_rows

__all__ = [
    "CraftLinear",
    "AdapterPart",
    "choose_compute",
    "compute_dtype",
    "COMPUTE_MODES",
    "MERGED_MEMORY_LIMIT",
]

COMPUTE_MODES = ("auto", "factored", "merged")
# "auto" takes the merged path only while the effective weights it holds for one step, summed over
# every adapted projection of the model, stay within this many bytes.
MERGED_MEMORY_LIMIT = 256 * 2**20


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a projection computes in: autocast's when autocast is on for ``x``'s device
    (float64 inputs excepted, which autocast leaves alone), else ``x``'s dtype."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@dataclass
class AdapterPart:
    """One adapted slice of a wrapped projection: layer ``layer`` of ``adapter``'s stack,
    written into output rows ``rows`` (the whole output when None; see :class:`~craft.targets.Site`)."""

    adapter: CraftAdapter
    layer: int
    rows: Rows | None = None


def choose_compute(
    tokens: int,
    d_out: int,
    d_in: int,
    r_out: int,
    r_in: int,
    merged_bytes: int = 0,
    memory_limit: int = MERGED_MEMORY_LIMIT,
) -> str:
    """Pick the path for a batch of ``tokens`` rows: the merged one when it needs fewer flops
    and the effective weights it holds fit the memory limit, else the factored one.

    factored: 2N(2 d_in r_in + 2 d_out r_out + 3 r_in r_out)  (forward and backward)
    merged:   2N(d_in r_in + d_out r_out + r_in r_out) + 2 d_out r_in (r_out + d_in)

    Args:
        merged_bytes: what the merged path would hold for one step: one d_out x d_in weight
            per adapted projection of the model, in the compute dtype.
        memory_limit: the most bytes the merged path may hold (:data:`MERGED_MEMORY_LIMIT`).
    """
    if merged_bytes > memory_limit:
        return "factored"
    factored = 2 * tokens * (2 * d_in * r_in + 2 * d_out * r_out + 3 * r_in * r_out)
    merged = 2 * tokens * (d_in * r_in + d_out * r_out + r_in * r_out) + 2 * d_out * r_in * (r_out + d_in)
    return "merged" if merged < factored else "factored"


class CraftLinear(nn.Module):
    """A wrapped ``nn.Linear`` / ``Conv1D`` projection that adds its CRAFT parts' updates.

    The adapters are held by reference (not registered as submodules): the model registers
    each shared adapter once.

    Args:
        base_layer: the projection to wrap.
        parts: the adapted slices it carries.
        compute: "auto", "factored" or "merged" (see :func:`choose_compute`).
        merged_elements: weight elements the merged path holds per step across the whole model
            (the model sets it; default: this projection's weight alone).
        memory_limit: bytes the merged path may hold under "auto".
    """

    def __init__(
        self,
        base_layer: nn.Module,
        parts: list[AdapterPart],
        compute: str = "auto",
        merged_elements: int | None = None,
        memory_limit: int = MERGED_MEMORY_LIMIT,
    ):
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        self.base_layer = base_layer
        self._parts = list(parts)
        self.compute = compute
        self.merged = False
        self.merged_elements = base_layer.weight.numel() if merged_elements is None else merged_elements
        self.memory_limit = memory_limit
        self._untied: nn.Parameter | None = None  # the shared weight a merge replaced

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
        """Sum of every part's update placed in its rows, shape (out, in) of the base weight,
        in the adapters' working dtype."""
        weight = self.base_weight()
        delta = torch.zeros(weight.shape, dtype=self._parts[0].adapter.dtype, device=weight.device)
        for part in self._parts:
            add_rows_(delta, part.rows or (0, weight.shape[0]), part.adapter.delta_weight(part.layer))  # (d_part, in)
        return delta

    @torch.no_grad()
    def merge(self, untie: bool = False) -> None:
        """Add the update into the base weight; forward then costs nothing extra.

        The sum is formed in the working dtype and rounded once to the weight's dtype (in bf16,
        an update below half a unit in the last place of a weight does not survive the merge).

        Args:
            untie: the weight is shared with another module (tied weights): give this module
                its own merged copy instead of writing into the shared tensor;
                :meth:`unmerge` puts the shared weight back.
        """
        if self.merged or not self._parts:
            return
        weight = self.base_weight()
        merged = (weight.to(self._parts[0].adapter.dtype) + self.full_delta_weight()).to(weight.dtype)  # (out, in)
        if untie:
            shared = self.base_layer.weight
            stored = merged if isinstance(self.base_layer, nn.Linear) else merged.T  # Conv1D keeps (in, out)
            self.base_layer.weight = nn.Parameter(stored.contiguous(), requires_grad=shared.requires_grad)
            self._untied = shared
        else:
            weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract a merged update again (exact up to rounding; a tied weight is put back as it was)."""
        if not self.merged:
            return
        if self._untied is not None:
            self.base_layer.weight, self._untied = self._untied, None
        else:
            weight = self.base_weight()
            weight.copy_((weight.to(self._parts[0].adapter.dtype) - self.full_delta_weight()).to(weight.dtype))
        self.merged = False

    def choose(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> str:
        """The path this projection takes for input ``x`` (its ``compute``, or the "auto" pick)."""
        if self.compute != "auto":
            return self.compute
        a = self._parts[0].adapter
        dtype = dtype or compute_dtype(x)
        return choose_compute(
            x.numel() // x.shape[-1],
            a.u_out.shape[0],
            a.u_in.shape[0],
            a.u_out.shape[1],
            a.u_in.shape[1],
            merged_bytes=self.merged_elements * dtype.itemsize,
            memory_limit=self.memory_limit,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self._parts:
            return self.base_layer(x)
        dtype = compute_dtype(x)
        if self.choose(x, dtype) == "merged":
            mids = [p.adapter.middle(p.layer, dtype) for p in self._parts]  # (r_out, r_in) each
            spec = tuple((p.rows, *p.adapter.factors(dtype)) for p in self._parts)
            return _MergedLinear.apply(x, self.base_weight(), _bias(self.base_layer), dtype, spec, *mids)
        rows_in = x.reshape(-1, x.shape[-1])  # (N, in)
        out = _base_2d(self.base_layer, rows_in)  # (N, out), in the compute dtype
        dtype, width = out.dtype, out.shape[-1]
        rows_in = _as(rows_in, dtype)
        for p in self._parts:
            projected = rows_in @ p.adapter.factors(dtype)[1]  # x U_in: (N, r_in)
            projection = _full_projection(p, dtype, width)  # (r_in, out)
            if out._is_view():  # in place on a view would cost autograd a copy of the output
                out = torch.addmm(out, projected, projection)  # + (x U_in) P_l: (N, out)
            else:
                out.addmm_(projected, projection)  # += (x U_in) P_l, one kernel: (N, out)
        return out.view(*x.shape[:-1], width)


def _full_projection(part: AdapterPart, dtype: torch.dtype, width: int) -> torch.Tensor:
    """P_l of a part with zero columns outside its rows: (r_in, width). Contiguous rows are padded
    once per pass for every layer by the adapter; interleaved rows are spread here."""
    rows = part.rows
    if rows is None or len(rows) == 2:
        pad = (0, 0) if rows is None else (rows[0], width - rows[1])
        return part.adapter.projection(part.layer, dtype, pad)  # (r_in, width)
    return spread_rows(part.adapter.projection(part.layer, dtype), rows, width)  # (r_in, d_part) -> (r_in, width)


def _base_2d(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The base projection of (N, in) rows, (N, out): a fresh tensor (not a view) where possible,
    so that the update can be added in place. Nothing saved for backward is the output."""
    if is_conv1d(module):
        return torch.addmm(module.bias, rows, module.weight)  # what Conv1D computes, without its final view
    return module(rows)


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return module.weight  # (out, in)
    return module.weight.T  # Conv1D keeps (in, out): a transposed view


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


class _MergedLinear(torch.autograd.Function):
    """y = x W'^T + b with W' = W + sum over parts of U_out M U_in^T placed in its rows.

    Everything runs in the compute dtype ``dtype`` (inputs cast explicitly, autocast off).
    Backward returns dx = dy W' and dM = (dy_rows U_out)^T (x U_in) for each part, and the
    gradients of W and b when they require one (dW = dy^T x, db = sum of dy); the d_out x d_in
    weight gradient is formed only then.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, spec, *mids):  # noqa: D102
        with torch.autocast(x.device.type, enabled=False):
            rows_in = _as(x, dtype)
            eff = _as(weight, dtype)
            for (rows, u_out, u_in), mid in zip(spec, mids):
                left = u_out @ mid  # (d_out, r_in)
                if rows is None:
                    eff = torch.addmm(eff, left, u_in.T)  # W + U_out M U_in^T: (out, in), a new tensor
                elif len(rows) == 2:
                    eff = eff.clone() if eff is weight else eff
                    eff[rows[0] : rows[1]].addmm_(left, u_in.T)  # (d_out, d_in) block of the fused weight
                else:
                    eff = eff.clone() if eff is weight else eff
                    add_rows_(eff, rows, left @ u_in.T)  # (d_part, d_in) interleaved rows of the fused weight
            y = F.linear(rows_in, eff, None if bias is None else _as(bias, dtype))  # (..., out)
            need = list(ctx.needs_input_grad[5:])
            projected = [rows_in @ u_in if n else None for (_, _, u_in), n in zip(spec, need)]  # (..., r_in)
        ctx.spec, ctx.need, ctx.dtypes = spec, need, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        keep_x = rows_in if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(eff, keep_x, *[p for p in projected if p is not None])
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        eff, rows_in, *projected = ctx.saved_tensors
        dy = _as(dy, eff.dtype)
        dx = _as(dy @ eff, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None  # (..., in)
        flat = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dw = _as(flat.T @ rows_in.reshape(-1, rows_in.shape[-1]), ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        db = _as(flat.sum(0), ctx.dtypes[2]) if ctx.needs_input_grad[2] else None  # (out,)
        grads, it = [], iter(projected)
        for (rows, u_out, _), need in zip(ctx.spec, ctx.need):
            if not need:
                grads.append(None)
                continue
            a = next(it)  # (..., r_in)
            g = (flat if rows is None else select_rows(flat, rows, dim=1)) @ u_out  # (N, r_out)
            grads.append(g.T @ a.reshape(-1, a.shape[-1]))  # dM: (r_out, r_in)
        return (dx, dw, db, None, None, *grads)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
