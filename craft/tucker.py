"""Tucker decomposition of 3-way (or N-way) tensors: unfoldings, mode products, HOSVD.

Pure tensor code, no modules. A projection type's layer stack is a tensor of shape
(layers, out, in); its HOSVD gives one orthonormal factor per mode and a core:

    W = G x_1 U_layers x_2 U_out x_3 U_in

The factors are the leading eigenvectors of the mode Gram matrices W_(n) W_(n)^T. The Gram
matrices are accumulated slice by slice in the tensor's working precision (at least float32)
and summed in float64; the eigendecomposition, the core and the reconstruction run in float64,
where precision matters. A float64 input therefore gives a float64-exact decomposition.

Truncation is slicing: the rank-r factors are the first r columns of the full ones and the
rank-r core is the leading corner of the full core, so one decomposition at the largest ranks
a search can ask for serves every smaller rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Tucker",
    "unfold",
    "fold",
    "mode_product",
    "multi_mode_product",
    "mode_gram",
    "hosvd",
    "truncate",
    "reconstruct",
    "energy_kept",
]


@dataclass
class Tucker:
    """A Tucker decomposition: ``tensor ~= core x_1 factors[0] x_2 factors[1] ...``.

    Attributes:
        core: the core tensor, shape (r_1, ..., r_N).
        factors: one (I_n, r_n) matrix with orthonormal columns per mode.
        spectra: per mode, the eigenvalues of the full mode Gram matrix in decreasing order
            (the squared singular values of the unfolding, all I_n of them, not truncated),
            so energy kept at any rank is known without the tensor.
    """

    core: torch.Tensor
    factors: list[torch.Tensor]
    spectra: list[torch.Tensor]

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks (r_1, ..., r_N) of this decomposition."""
        return tuple(int(f.shape[1]) for f in self.factors)


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n unfolding: the mode-n fibres as columns, shape (I_n, prod of the other I_k)."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold` for a tensor of the given full ``shape``."""
    moved = [shape[mode]] + [s for k, s in enumerate(shape) if k != mode]
    return torch.movedim(matrix.reshape(moved), 0, mode)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n product ``tensor x_n matrix``: contracts axis ``mode`` (length I_n) with a (J, I_n) matrix.

    The result has the shape of ``tensor`` with axis ``mode`` replaced by J.
    """
    if matrix.shape[1] != tensor.shape[mode]:
        raise ValueError(
            f"mode_product: matrix has {matrix.shape[1]} columns but mode {mode} of the tensor "
            f"has length {tensor.shape[mode]}; pass a (J, {tensor.shape[mode]}) matrix"
        )
    moved = torch.movedim(tensor, mode, -1)  # (..., I_n)
    out = torch.matmul(moved, matrix.T)  # (..., J)
    return torch.movedim(out, -1, mode)


def multi_mode_product(tensor: torch.Tensor, matrices: Sequence[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """Products along every mode in turn: ``tensor x_1 M_1 x_2 M_2 ...``.

    With ``transpose=True`` each matrix is applied transposed (projection onto factors).
    """
    out = tensor
    for mode, m in enumerate(matrices):
        out = mode_product(out, m.T if transpose else m, mode)
    return out


def mode_gram(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Gram matrix of the mode-n unfolding, W_(n) W_(n)^T, shape (I_n, I_n), in float64.

    The products run slice by slice along the first axis that is not ``mode`` in the
    tensor's working precision (float32 at least), and the slices are summed in float64:
    the bulk of the flops stays fast and the long sum keeps its accuracy.
    """
    work = tensor if tensor.dtype == torch.float64 else tensor.to(torch.float32)
    moved = torch.movedim(work, mode, 0)  # (I_n, ...)
    if moved.dim() == 1:
        return torch.outer(moved, moved).double()
    if moved.shape[0] <= 64 or moved.dim() == 2:
        # Short mode (the layers axis): one product over the whole unfolding, float64.
        flat = moved.reshape(moved.shape[0], -1).double()  # (I_n, rest)
        return flat @ flat.T  # (I_n, I_n)
    # Slice along the next axis; loop rather than batch so that memory stays at one slice.
    slices = torch.movedim(moved, 1, 0)  # (K, I_n, rest...)
    gram = torch.zeros(moved.shape[0], moved.shape[0], dtype=torch.float64, device=tensor.device)
    for piece in slices:
        flat = piece.reshape(piece.shape[0], -1)  # (I_n, R)
        gram += (flat @ flat.T).double()  # (I_n, I_n)
    return gram


def _leading_eigvecs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``rank`` eigenvectors of a symmetric PSD matrix, signs fixed, and all eigenvalues.

    Signs are made deterministic (largest-magnitude entry of each vector positive) so that
    a truncated decomposition is exactly a slice of a full one.
    """
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals = evals.flip(0).clamp_min(0.0)  # (I_n,) descending, rounding noise removed
    evecs = evecs.flip(1)[:, :rank]  # (I_n, rank)
    idx = evecs.abs().argmax(dim=0)  # (rank,)
    signs = torch.sign(evecs[idx, torch.arange(rank)])
    signs[signs == 0] = 1.0
    return evecs * signs, evals


def hosvd(tensor: torch.Tensor, ranks: Sequence[int] | None = None) -> Tucker:
    """Higher-order SVD of ``tensor``, truncated to ``ranks`` (full ranks when None).

    Args:
        tensor: an N-way tensor, e.g. a (layers, out, in) weight stack.
        ranks: one rank per mode, each between 1 and that axis length.

    Returns:
        A :class:`Tucker` with float64 core and factors.

    Raises:
        ValueError: when a rank is outside [1, axis length].
    """
    shape = tuple(tensor.shape)
    ranks = tuple(shape) if ranks is None else tuple(int(r) for r in ranks)
    if len(ranks) != tensor.dim():
        raise ValueError(f"hosvd: got {len(ranks)} ranks for a {tensor.dim()}-way tensor; pass one per mode")
    for mode, (r, n) in enumerate(zip(ranks, shape)):
        if not 1 <= r <= n:
            raise ValueError(f"hosvd: rank {r} for mode {mode} is outside [1, {n}]; choose a rank up to the axis length {n}")
    factors, spectra = [], []
    for mode, r in enumerate(ranks):
        u, evals = _leading_eigvecs(mode_gram(tensor, mode), r)
        factors.append(u)
        spectra.append(evals)
    core = _project(tensor, factors)  # (r_1, ..., r_N)
    return Tucker(core=core, factors=factors, spectra=spectra)


def _project(tensor: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``tensor x_1 U_1^T x_2 U_2^T ...`` in float64, one slice of the first axis at a time.

    Mode products are linear in each slice of axis 0, so every slice is projected on the
    other modes first (float64, one slice in memory) and the first mode is applied last.
    """
    rest = factors[1:]
    projected = torch.stack(
        [multi_mode_product(piece.double(), rest, transpose=True) for piece in tensor]
    )  # (I_1, r_2, ..., r_N)
    return mode_product(projected, factors[0].T, 0)  # (r_1, r_2, ..., r_N)


def truncate(tucker: Tucker, ranks: Sequence[int]) -> Tucker:
    """The rank-``ranks`` HOSVD obtained by slicing a higher-rank one (no recomputation)."""
    ranks = tuple(int(r) for r in ranks)
    for mode, (r, have) in enumerate(zip(ranks, tucker.ranks)):
        if not 1 <= r <= have:
            raise ValueError(
                f"truncate: rank {r} for mode {mode} is outside [1, {have}]; the decomposition "
                f"was computed at rank {have}: recompute it at a higher rank"
            )
    core = tucker.core[tuple(slice(0, r) for r in ranks)]
    factors = [f[:, :r] for f, r in zip(tucker.factors, ranks)]
    return Tucker(core=core, factors=factors, spectra=tucker.spectra)


def reconstruct(tucker: Tucker) -> torch.Tensor:
    """The full tensor ``core x_1 U_1 x_2 U_2 ...`` of a decomposition."""
    return multi_mode_product(tucker.core, tucker.factors)


def energy_kept(spectrum: torch.Tensor, rank: int) -> float:
    """Share of a mode's energy (squared Frobenius norm) captured by its leading ``rank`` vectors."""
    total = float(spectrum.sum())
    return 1.0 if total == 0.0 else float(spectrum[:rank].sum()) / total
