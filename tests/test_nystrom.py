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


# ---------------------------------------------------------------- issue 15: autocast, scale, bad input

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


def _psd(n=80, r=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, r, generator=g, dtype=torch.float64) * 0.8 ** torch.arange(r, dtype=torch.float64)
    return (G @ G.T).to(dtype)


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_nystrom_ignores_autocast(device_type, dtype):
    A = _psd().to(device_type)
    same_under_autocast(lambda: lowrank.nystrom(A, 5, seed=0), device_type, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nystrom_eigenvalues_scale_with_the_matrix(dtype):
    A = _psd(dtype=dtype)
    exact = torch.linalg.eigvalsh(A.double()).flip(0)[:5]
    for c in (1e-30, 1e-20, 1.0, 1e20, 1e30):
        _, L = lowrank.nystrom(A * c, 5, seed=0)
        assert float(((L.double() / c) / exact - 1).abs().max()) < 1e-3, c


_P = _psd(10, 4)

NYSTROM_BAD = [
    ("nan", lambda: lowrank.nystrom(nan_at(_P), 3), ValueError, "A contains NaN"),
    ("inf", lambda: lowrank.nystrom(nan_at(_P, float("inf")), 3), ValueError, "A"),
    ("meta", lambda: lowrank.nystrom(torch.empty(10, 10, device="meta"), 3), ValueError, "A is on the meta"),
    ("complex", lambda: lowrank.nystrom(_P.to(torch.complex64), 3), TypeError, "A must be real"),
    ("not square", lambda: lowrank.nystrom(_P[:, :5], 3), ValueError, "A must be square"),
    (
        "not symmetric",
        lambda: lowrank.nystrom(_P + torch.triu(torch.ones(10, 10)), 3),
        ValueError,
        "symmetric",
    ),
    ("indefinite", lambda: lowrank.nystrom(-_P, 3), ValueError, "positive semidefinite"),
    ("seed big", lambda: lowrank.nystrom(_P, 3, seed=2**63), ValueError, "seed must be in"),
    ("seed neg", lambda: lowrank.nystrom(_P, 3, seed=-1), ValueError, "seed must be in"),
    ("shift nan", lambda: lowrank.nystrom(_P, 3, shift=float("nan")), ValueError, "shift must be"),
    ("shift inf", lambda: lowrank.nystrom(_P, 3, shift=float("inf")), ValueError, "shift must be"),
    ("oversample", lambda: lowrank.nystrom(_P, 3, oversample=-1), ValueError, "oversample must be"),
    ("k", lambda: lowrank.nystrom(_P, 11), ValueError, "k=11 exceeds"),
]


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in NYSTROM_BAD], ids=[row[0] for row in NYSTROM_BAD]
)
def test_nystrom_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize("c", [1e-300, 1e300])
def test_float64_extreme_scales(c):
    # A PSD matrix of order 1e300 failed with "Cholesky factorisation ... is A positive semidefinite?";
    # reference: the exact eigenvalues (float64 eigvalsh) of the unscaled matrix.
    A, lam = psd(lam=0.6 ** np.arange(200))
    U, L = lowrank.nystrom(torch.from_numpy(A) * c, 10, oversample=30, seed=1)
    np.testing.assert_allclose(L.numpy() / c, lam[:10], rtol=1e-6)
    with pytest.raises(ValueError, match="symmetric"):  # norms of 1e300 entries were inf: any A passed
        lowrank.nystrom(torch.from_numpy(A + np.triu(np.ones_like(A), 1)) * c, 3)


def test_numeric_arguments_accept_numpy_scalars():
    A, lam = psd()
    U1, L1 = lowrank.nystrom(torch.from_numpy(A), 5, oversample=np.int64(7), shift=np.float32(1e-9), seed=0)
    U2, L2 = lowrank.nystrom(torch.from_numpy(A), 5, oversample=7, shift=float(np.float32(1e-9)), seed=0)
    assert torch.equal(L1, L2) and torch.equal(U1, U2)
