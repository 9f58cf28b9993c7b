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

* ``factored``: y = base(x) + (x U_in) P_l with P_l = M_l^T U_out^T (r_in, d_out), computed for
  all layers in one product per pass; per projection one matmul and one addmm (the add fused).
  A fused projection's slice gets P_l padded with zero columns to the full output.
* ``merged``: y = x (W_l + U_out M_l U_in^T)^T through :class:`_MergedLinear`, whose backward
  gets dM = (dy U_out)^T (x U_in) directly, never the d_out x d_in weight gradient. It holds
  one d_out x d_in weight per projection per step and wins once a batch holds a few hundred
  tokens, as long as those weights fit :data:`MERGED_MEMORY_LIMIT`.

Precision: the J matrices, the frozen factors and M live in the adapter's working dtype
(float32 whatever the base model's dtype, by default: ``CraftConfig.adapter_dtype``), so that a
bf16 model's J can move by 1e-3 and U stays orthonormal to float32 accuracy. A projection
computes its update in the pass's compute dtype: autocast's dtype when autocast is on, else the
input's. The per-pass tensors (P or M) are cast to it once per pass, the frozen factors once per
dtype, and no in-place op mixes dtypes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .targets import is_conv1d
from .tucker import Tucker

__all__ = [
    "CraftAdapter",
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


@dataclass
class AdapterPart:
    """One adapted slice of a wrapped projection: layer ``layer`` of ``adapter``'s stack,
    written into output rows ``rows`` (the whole output when None)."""

    adapter: CraftAdapter
    layer: int
    rows: tuple[int, int] | None = None


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
            lo, hi = part.rows or (0, weight.shape[0])
            delta[lo:hi] += part.adapter.delta_weight(part.layer)
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
            pad = (0, 0) if p.rows is None else (p.rows[0], width - p.rows[1])
            projection = p.adapter.projection(p.layer, dtype, pad)  # (r_in, out)
            if out._is_view():  # in place on a view would cost autograd a copy of the output
                out = torch.addmm(out, projected, projection)  # + (x U_in) P_l: (N, out)
            else:
                out.addmm_(projected, projection)  # += (x U_in) P_l, one kernel: (N, out)
        return out.view(*x.shape[:-1], width)


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
                else:
                    eff = eff.clone() if eff is weight else eff
                    eff[rows[0] : rows[1]].addmm_(left, u_in.T)  # (d_out, d_in) block of the fused weight
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
            g = (flat if rows is None else flat[:, rows[0] : rows[1]]) @ u_out  # (N, r_out)
            grads.append(g.T @ a.reshape(-1, a.shape[-1]))  # dM: (r_out, r_in)
        return (dx, dw, db, None, None, *grads)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
