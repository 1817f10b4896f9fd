"""lowrank.cholesky_qr against NumPy float64 QR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowrank
from lowrank.qr import cholqr_pass, orthonormalize


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conditioned(m, n, kappa, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, n)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    s = np.logspace(0, -np.log10(kappa), n)
    return ((U * s) @ V.T).astype(dtype)


def orthogonality(Q):
    Q = Q.double().numpy()
    return np.abs(Q.T @ Q - np.eye(Q.shape[1])).max()


@pytest.mark.parametrize("kappa", [1.0, 1e4, 1e6, 1e8])
@pytest.mark.parametrize("shift", [None, True])
def test_orthogonal_to_1e12_up_to_kappa_1e8(kappa, shift):
    X = conditioned(400, 30, kappa, seed=1)
    Q, R = lowrank.cholesky_qr(torch.from_numpy(X), shift=shift)
    assert orthogonality(Q) <= 1e-12
    R = R.numpy()
    np.testing.assert_allclose(np.tril(R, -1), 0, atol=0)
    assert np.all(np.diag(R) > 0)
    assert np.linalg.norm(Q.numpy() @ R - X) <= 1e-13 * np.linalg.norm(X)
    # unique thin QR with positive diag(R): equals NumPy's after sign normalisation (well-conditioned case)
    if kappa <= 1e4:
        Q0, R0 = np.linalg.qr(X)
        sign = np.sign(np.diag(R0))
        np.testing.assert_allclose(R, R0 * sign[:, None], atol=1e-10 * kappa)


def test_plain_cholesky_qr2_and_three_passes():
    X = conditioned(300, 20, 1e3, seed=2)
    for passes in (2, 3):
        Q, R = lowrank.cholesky_qr(torch.from_numpy(X), passes=passes, shift=False)
        assert orthogonality(Q) <= 1e-13
    Q1, _ = lowrank.cholesky_qr(torch.from_numpy(X), passes=1, shift=False)
    assert orthogonality(Q1) > 1e-12  # one pass loses u * kappa^2


def test_rank_deficient_uses_householder():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((100, 5)) @ rng.standard_normal((5, 12))
    Q, R = lowrank.cholesky_qr(torch.from_numpy(X))
    assert orthogonality(Q) <= 1e-12
    np.testing.assert_allclose(Q.numpy() @ R.numpy(), X, atol=1e-12)
    assert np.all(np.diag(R.numpy()) >= 0)


def test_float32_and_half():
    X = conditioned(200, 16, 1e3, seed=4, dtype=np.float32)
    Q, R = lowrank.cholesky_qr(torch.from_numpy(X))
    assert Q.dtype == torch.float32 and orthogonality(Q) <= 1e-5
    Qh, Rh = lowrank.cholesky_qr(torch.from_numpy(X).half())
    assert Qh.dtype == torch.float32 and orthogonality(Qh) <= 1e-5


def test_batched_equals_loop():
    Xs = np.stack([conditioned(80, 10, 10.0**i, seed=i) for i in range(3)])
    Q, R = lowrank.cholesky_qr(torch.from_numpy(Xs))
    for i in range(3):
        Qi, Ri = lowrank.cholesky_qr(torch.from_numpy(Xs[i]))
        np.testing.assert_allclose(Q[i].numpy(), Qi.numpy(), atol=1e-10)
        np.testing.assert_allclose(R[i].numpy(), Ri.numpy(), atol=1e-10)


@pytest.mark.parametrize("scheme", ["qr", "cholqr", "lu", "none"])
def test_orthonormalize_spans_the_same_space(scheme):
    X = torch.from_numpy(conditioned(120, 8, 1e3, seed=5))
    B = orthonormalize(X, scheme).numpy()
    P = X.numpy() @ np.linalg.pinv(X.numpy())  # projector onto range(X)
    np.testing.assert_allclose(P @ B, B, atol=1e-8)
    assert np.linalg.matrix_rank(B) == 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cholqr_pass_by_inverse_matches_triangular_solve(dtype):
    X = torch.from_numpy(conditioned(200, 12, 10.0, seed=6)).to(dtype)
    Q_solve, R_solve, info_solve = cholqr_pass(X)
    Q_inv, R_inv, info_inv = cholqr_pass(X, by_inverse=True)
    assert int(info_solve) == 0 and int(info_inv) == 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(R_inv, R_solve, rtol=0, atol=tol)
    torch.testing.assert_close(Q_inv, Q_solve, rtol=0, atol=tol)
    np.testing.assert_allclose((Q_inv @ R_inv).double().numpy(), X.double().numpy(), atol=10 * tol)


def test_bad_inputs():
    with pytest.raises(ValueError, match="tall"):
        lowrank.cholesky_qr(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        lowrank.cholesky_qr(torch.ones(5, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="passes"):
        lowrank.cholesky_qr(torch.randn(5, 3), passes=0)
    with pytest.raises(ValueError, match="shift"):
        lowrank.cholesky_qr(torch.randn(5, 3), shift=-1.0)
    with pytest.raises(ValueError, match="X"):
        lowrank.cholesky_qr(torch.randn(5))
    with pytest.raises(TypeError, match="X"):
        lowrank.cholesky_qr(np.ones((5, 3)))
    bad = torch.randn(5, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lowrank.cholesky_qr(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_orthogonal():
    X = torch.from_numpy(conditioned(2000, 64, 1e8, seed=6)).cuda()
    Q, R = lowrank.cholesky_qr(X)
    assert orthogonality(Q.cpu()) <= 1e-12
    assert torch.linalg.norm(Q @ R - X) <= 1e-13 * torch.linalg.norm(X)


# ---------------------------------------------------------------- issue 15: autocast, scale, bad input

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_cholesky_qr_ignores_autocast(device_type, dtype):
    X = torch.randn(300, 20, generator=torch.Generator().manual_seed(0)).to(device_type)
    same_under_autocast(lambda: lowrank.cholesky_qr(X), device_type, dtype)
    with torch.autocast(device_type, dtype=dtype):
        Q, R = lowrank.cholesky_qr(X)
    assert Q.dtype == torch.float32
    assert float((Q.mT @ Q - torch.eye(20, device=device_type)).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lu_normalisation_is_scale_invariant(dtype):
    """The LU pivot guard was absolute (sqrt(tiny)): every pivot of a matrix with norm < 1e-19 became 1."""
    Y = torch.randn(200, 12, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref = orthonormalize(Y, "lu")
    for c in (1e-30, 1e-20, 1e20, 1e30):
        out = orthonormalize(Y * c, "lu")
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), c
        _, R = lowrank.cholesky_qr(Y * c)
        _, R1 = lowrank.cholesky_qr(Y)
        assert torch.allclose(R / c, R1, rtol=1e-4), c


def test_lu_normalisation_of_a_rank_deficient_block_stays_finite():
    Y = torch.zeros(50, 6, dtype=torch.float64)
    Y[:, :3] = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = orthonormalize(Y * 1e-30, "lu")  # exactly zero pivots: replaced, never divided by
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, :3], orthonormalize(Y[:, :3], "lu"), atol=1e-12)


_X = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))

CHOLESKY_QR_BAD = [
    ("nan", lambda: lowrank.cholesky_qr(nan_at(_X)), ValueError, "X contains NaN"),
    ("inf", lambda: lowrank.cholesky_qr(nan_at(_X, float("inf"))), ValueError, "X contains NaN or Inf"),
    ("meta", lambda: lowrank.cholesky_qr(torch.empty(30, 5, device="meta")), ValueError, "X is on the meta"),
    ("sparse", lambda: lowrank.cholesky_qr(_X.to_sparse()), TypeError, "X must be a dense"),
    ("type", lambda: lowrank.cholesky_qr(_X.numpy()), TypeError, "X must be a torch.Tensor"),
    (
        "int",
        lambda: lowrank.cholesky_qr(torch.ones(4, 2, dtype=torch.int32)),
        TypeError,
        "X must have a floating",
    ),
    ("wide", lambda: lowrank.cholesky_qr(_X.t()), ValueError, "X must be tall"),
    ("1-D", lambda: lowrank.cholesky_qr(_X[0]), ValueError, "X must have shape"),
    ("passes", lambda: lowrank.cholesky_qr(_X, passes=0), ValueError, "passes must be"),
    ("shift", lambda: lowrank.cholesky_qr(_X, shift=-1.0), ValueError, "shift must be >= 0"),
]


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in CHOLESKY_QR_BAD], ids=[row[0] for row in CHOLESKY_QR_BAD]
)
def test_cholesky_qr_bad_input(fn, error, match):
    check_bad(fn, error, match)
