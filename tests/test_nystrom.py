"""lowrank.nystrom against the exact eigendecomposition (numpy.linalg.eigh) of PSD test matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import MatrixOperator as Operator

import lowrank

CUDA = torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def psd(n=200, decay=-8, seed=0, lam=None):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0, decay, n) if lam is None else lam
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, lam


def optimal(lam, k):
    return float(np.sqrt((lam[k:] ** 2).sum()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_error_near_optimal(dtype):
    A, lam = psd()
    k = 15
    U, L = lowrank.nystrom(torch.from_numpy(A).to(dtype), k, seed=0)
    assert U.shape == (200, k) and L.shape == (k,) and U.dtype == dtype
    Ud, Ld = U.double().numpy(), L.double().numpy()
    assert (Ld >= 0).all() and (np.diff(Ld) <= 0).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(Ud.T @ Ud, np.eye(k), atol=tol)
    err = np.linalg.norm(A - (Ud * Ld) @ Ud.T)
    assert err <= 2.5 * optimal(lam, k)
    # Nystrom never overestimates eigenvalues (A - A_nys is PSD)
    assert (Ld <= lam[:k] * (1 + 1e-5)).all()


def test_fast_decay_eigenvalues_accurate():
    A, lam = psd(lam=0.6 ** np.arange(200))
    U, L = lowrank.nystrom(torch.from_numpy(A), 10, oversample=30, seed=1)
    np.testing.assert_allclose(L.numpy(), lam[:10], rtol=1e-6)


def test_exact_low_rank_and_shift_zero():
    rng = np.random.default_rng(2)
    G = rng.standard_normal((150, 5))
    A = G @ G.T
    for shift in ("auto", 0.0):
        U, L = lowrank.nystrom(torch.from_numpy(A), 8, seed=0, shift=shift)
        assert np.linalg.norm(A - ((U * L) @ U.T).numpy()) <= 1e-10 * np.linalg.norm(A)
        np.testing.assert_allclose(L.numpy()[:5], np.linalg.eigvalsh(A)[::-1][:5], rtol=1e-10)
        assert (L.numpy()[5:] <= 1e-9 * L.numpy()[0]).all()


def test_float32_rank_deficient_stays_finite():
    # the case the shift exists for: Omega^T A Omega is singular to working precision
    rng = np.random.default_rng(3)
    G = rng.standard_normal((300, 4)).astype(np.float32)
    A = torch.from_numpy(G @ G.T)
    U, L = lowrank.nystrom(A, 20, seed=0)
    assert bool(torch.isfinite(U).all()) and bool(torch.isfinite(L).all())
    assert float(torch.linalg.matrix_norm(A - (U * L) @ U.T) / torch.linalg.matrix_norm(A)) <= 1e-4


@pytest.mark.parametrize("kind", ["scipy", "torch", "operator"])
def test_sparse_and_operator_inputs(kind):
    rng = np.random.default_rng(4)
    B = sp.random(200, 200, density=0.02, random_state=5, format="csr")
    S = (B @ B.T + sp.diags(np.logspace(1, -3, 200))).tocsr()
    dense = S.toarray()
    A = {"scipy": S, "torch": torch.from_numpy(dense).to_sparse(), "operator": Operator(S)}[kind]
    lam = np.linalg.eigvalsh(dense)[::-1]
    U, L = lowrank.nystrom(A, 10, oversample=30, seed=0)
    err = np.linalg.norm(dense - (U.numpy() * L.numpy()) @ U.numpy().T)
    assert err <= 2.5 * optimal(lam, 10)
    del rng


def test_errors():
    A, _ = psd(30)
    At = torch.from_numpy(A)
    with pytest.raises(ValueError, match="square"):
        lowrank.nystrom(At[:, :20], 3)
    with pytest.raises(ValueError, match="symmetric"):
        lowrank.nystrom(At + torch.triu(torch.ones(30, 30, dtype=torch.float64)), 3)
    with pytest.raises(ValueError, match="positive semidefinite"):
        lowrank.nystrom(At - 0.5 * torch.eye(30, dtype=torch.float64), 5, seed=0)
    with pytest.raises(ValueError, match="k"):
        lowrank.nystrom(At, 31)
    with pytest.raises(ValueError, match="shift"):
        lowrank.nystrom(At, 3, shift=-1.0)
    with pytest.raises(ValueError, match="shift"):
        lowrank.nystrom(At, 3, shift="big")
    with pytest.raises(ValueError, match="oversample"):
        lowrank.nystrom(At, 3, oversample=-2)
    with pytest.raises(TypeError, match="A"):
        lowrank.nystrom(torch.eye(4, dtype=torch.int64), 2)
    bad = At.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lowrank.nystrom(bad, 3)


@needs_cuda
def test_cuda():
    A, lam = psd()
    U, L = lowrank.nystrom(torch.from_numpy(A).cuda(), 15, seed=0)
    assert U.is_cuda
    Ud, Ld = U.cpu().numpy(), L.cpu().numpy()
    assert np.linalg.norm(A - (Ud * Ld) @ Ud.T) <= 2.5 * optimal(lam, 15)
