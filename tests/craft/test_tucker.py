"""Tucker math: HOSVD exactness, orthogonality, truncation by slicing, agreement with tensorly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition._tucker import initialize_tucker

from craft.tucker import (
    energy_kept,
    fold,
    hosvd,
    mode_gram,
    mode_product,
    multi_mode_product,
    reconstruct,
    truncate,
    unfold,
)

SHAPE = (5, 12, 9)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64)


def test_full_rank_hosvd_reconstructs_exactly(x):
    t = hosvd(x)
    assert t.ranks == SHAPE
    assert t.core.dtype == torch.float64 and all(f.dtype == torch.float64 for f in t.factors)
    assert rel(reconstruct(t), x) < 1e-10


def test_factors_orthonormal(x):
    for ranks in (None, (2, 5, 4)):
        for u in hosvd(x, ranks).factors:
            eye = torch.eye(u.shape[1], dtype=torch.float64)
            assert float((u.T @ u - eye).abs().max()) < 1e-12


def test_core_all_orthogonal_with_spectrum_on_diagonal(x):
    t = hosvd(x)
    for mode in range(3):
        gram = unfold(t.core, mode) @ unfold(t.core, mode).T
        diag = torch.diagonal(gram)
        off = gram - torch.diag(diag)
        assert float(off.abs().max()) < 1e-10 * float(diag.max())
        assert torch.all(diag[:-1] >= diag[1:] - 1e-10 * float(diag.max()))
        # the diagonal is the mode spectrum (squared singular values of the unfolding)
        torch.testing.assert_close(diag, t.spectra[mode], rtol=1e-10, atol=1e-10 * float(diag.max()))
        sv = torch.linalg.svdvals(unfold(x, mode))
        torch.testing.assert_close(t.spectra[mode], sv**2, rtol=1e-10, atol=1e-10)
        assert len(t.spectra[mode]) == SHAPE[mode]


@pytest.mark.parametrize("ranks", [(1, 1, 1), (2, 5, 4), (4, 11, 3), (5, 12, 9)])
def test_truncate_equals_direct_hosvd(x, ranks):
    direct = hosvd(x, ranks)
    sliced = truncate(hosvd(x), ranks)
    assert sliced.ranks == ranks
    assert float((sliced.core - direct.core).abs().max()) < 1e-10
    for a, b in zip(sliced.factors, direct.factors):
        assert float((a - b).abs().max()) < 1e-10
    for a, b in zip(sliced.spectra, direct.spectra):
        assert float((a - b).abs().max()) < 1e-10


def test_truncate_rejects_rank_above_decomposition(x):
    t = hosvd(x, (2, 5, 4))
    with pytest.raises(ValueError, match="recompute"):
        truncate(t, (3, 5, 4))
    with pytest.raises(ValueError, match="outside"):
        truncate(t, (0, 5, 4))


@pytest.mark.parametrize("ranks", [(1, 2, 2), (2, 5, 4), (3, 8, 6), (4, 10, 8)])
def test_truncated_error_matches_tensorly(ranks):
    tl.set_backend("numpy")
    array = np.random.RandomState(1).randn(*SHAPE)
    core, factors = initialize_tucker(
        tl.tensor(array), list(ranks), modes=[0, 1, 2], random_state=0, init="svd", svd="truncated_svd"
    )
    theirs = np.asarray(tl.tucker_to_tensor((core, factors)))
    ours = reconstruct(hosvd(torch.from_numpy(array), ranks)).numpy()
    norm = np.linalg.norm(array)
    err_theirs = np.linalg.norm(array - theirs) / norm
    err_ours = np.linalg.norm(array - ours) / norm
    assert abs(err_ours - err_theirs) < 1e-8
    # both project on the same leading subspaces, so the approximations themselves agree
    assert np.linalg.norm(ours - theirs) / norm < 1e-8


def test_unfold_fold_round_trip(x):
    for mode in range(3):
        m = unfold(x, mode)
        assert m.shape == (SHAPE[mode], x.numel() // SHAPE[mode])
        assert torch.equal(fold(m, mode, SHAPE), x)
    # the columns of the mode-1 unfolding are the mode-1 fibres
    assert torch.equal(unfold(x, 1)[:, 0], x[0, :, 0])


def test_mode_product_matches_einsum(x):
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(n, s, generator=g, dtype=torch.float64) for n, s in zip((3, 7, 4), SHAPE)]
    patterns = ("ia,abc->ibc", "jb,abc->ajc", "kc,abc->abk")
    for mode, (m, pattern) in enumerate(zip(mats, patterns)):
        torch.testing.assert_close(mode_product(x, m, mode), torch.einsum(pattern, m, x), rtol=1e-12, atol=1e-12)
    expected = torch.einsum("ia,jb,kc,abc->ijk", *mats, x)
    torch.testing.assert_close(multi_mode_product(x, mats), expected, rtol=1e-12, atol=1e-12)
    transposed = [m.T.contiguous() for m in mats]
    torch.testing.assert_close(multi_mode_product(x, transposed, transpose=True), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="columns"):
        mode_product(x, mats[0], 1)


def test_energy_kept(x):
    t = hosvd(x)
    for mode, spectrum in enumerate(t.spectra):
        n = SHAPE[mode]
        assert energy_kept(spectrum, n) == pytest.approx(1.0, abs=1e-15)
        kept = [energy_kept(spectrum, r) for r in range(1, n + 1)]
        assert all(a <= b for a, b in zip(kept, kept[1:]))
        assert 0 < kept[0] < 1
        # energy kept at rank r = share of ||x||^2 left after projecting mode `mode` on U[:, :r]
        r = max(1, n // 2)
        u = t.factors[mode][:, :r]
        projected = mode_product(x, u @ u.T, mode)
        assert kept[r - 1] == pytest.approx(float(projected.norm() ** 2 / x.norm() ** 2), rel=1e-10)
    assert energy_kept(torch.zeros(4, dtype=torch.float64), 2) == 1.0


@pytest.mark.parametrize("bad", [0, 13])
def test_hosvd_rejects_bad_rank(x, bad):
    with pytest.raises(ValueError, match="12"):
        hosvd(x, (2, bad, 4))


def test_hosvd_rejects_wrong_number_of_ranks(x):
    with pytest.raises(ValueError, match="one per mode"):
        hosvd(x, (2, 3))


@pytest.mark.parametrize("shape", [(3, 80, 70), (70, 5, 4), (90, 66)])
def test_mode_gram_float32_matches_float64(shape):
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x32 = x64.float()
    for mode in range(len(shape)):
        reference = unfold(x32.double(), mode) @ unfold(x32.double(), mode).T
        got = mode_gram(x32, mode)
        assert got.dtype == torch.float64 and got.shape == (shape[mode], shape[mode])
        assert rel(got, reference) < 1e-5
        exact = mode_gram(x64, mode)
        assert rel(exact, unfold(x64, mode) @ unfold(x64, mode).T) < 1e-12


def test_hosvd_of_float32_tensor_is_float64_and_accurate():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 20, 16, generator=g)
    t = hosvd(x)
    assert t.core.dtype == torch.float64
    assert rel(reconstruct(t), x.double()) < 1e-6
