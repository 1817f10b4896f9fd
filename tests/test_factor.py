"""lowrank.low_rank_factor against the truncated SVD from numpy.linalg.svd (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowrank

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def matrix(m=60, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)) * np.logspace(0, -3, n)


def truncated(W, r):
    U, s, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r], s[:r]


@pytest.mark.parametrize("balance", ["sqrt", "left", "right"])
def test_product_is_the_best_rank_r_approximation(balance):
    W = matrix()
    best, s = truncated(W, 7)
    B, A = lowrank.low_rank_factor(torch.from_numpy(W), 7, balance=balance)
    assert B.shape == (60, 7) and A.shape == (7, 40)
    np.testing.assert_allclose((B @ A).numpy(), best, atol=1e-12)
    Bn, An = B.numpy(), A.numpy()
    if balance == "sqrt":
        np.testing.assert_allclose(Bn.T @ Bn, np.diag(s), atol=1e-12)
        np.testing.assert_allclose(An @ An.T, np.diag(s), atol=1e-12)
    elif balance == "left":
        np.testing.assert_allclose(An @ An.T, np.eye(7), atol=1e-12)
        np.testing.assert_allclose(Bn.T @ Bn, np.diag(s**2), atol=1e-12)
    else:
        np.testing.assert_allclose(Bn.T @ Bn, np.eye(7), atol=1e-12)
        np.testing.assert_allclose(An @ An.T, np.diag(s**2), atol=1e-12)


def test_rsvd_and_residual():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((80, 5)) @ rng.standard_normal((5, 50)) + 1e-9 * rng.standard_normal((80, 50))
    B, A, residual = lowrank.low_rank_factor(
        torch.from_numpy(W), 5, method="rsvd", seed=0, return_residual=True
    )
    best, _ = truncated(W, 5)
    np.testing.assert_allclose((B @ A).numpy(), best, atol=1e-10)
    np.testing.assert_allclose(residual.numpy(), W - (B @ A).numpy(), atol=1e-12)
    assert np.linalg.norm(residual.numpy()) <= 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(dtype):
    W = torch.from_numpy(matrix(seed=2))
    B, A = lowrank.low_rank_factor(W.to(dtype), 6)
    assert B.dtype == dtype and A.dtype == dtype
    best, _ = truncated(W.to(dtype).double().numpy(), 6)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert np.abs((B.double() @ A.double()).numpy() - best).max() <= tol * np.abs(best).max()


def test_errors():
    W = torch.from_numpy(matrix())
    with pytest.raises(ValueError, match="r"):
        lowrank.low_rank_factor(W, 0)
    with pytest.raises(ValueError, match="r"):
        lowrank.low_rank_factor(W, 41)
    with pytest.raises(TypeError, match="r"):
        lowrank.low_rank_factor(W, 2.0)
    with pytest.raises(ValueError, match="method"):
        lowrank.low_rank_factor(W, 3, method="qr")
    with pytest.raises(ValueError, match="balance"):
        lowrank.low_rank_factor(W, 3, balance="middle")
    with pytest.raises(TypeError, match="W"):
        lowrank.low_rank_factor(W.numpy(), 3)
    with pytest.raises(ValueError, match="W"):
        lowrank.low_rank_factor(W[0], 3)
    with pytest.raises(TypeError, match="W"):
        lowrank.low_rank_factor(torch.ones(4, 4, dtype=torch.int64), 2)
    bad = W.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowrank.low_rank_factor(bad, 2)


@needs_cuda
def test_cuda():
    W = torch.from_numpy(matrix())
    B, A = lowrank.low_rank_factor(W.cuda(), 7)
    assert B.is_cuda
    np.testing.assert_allclose((B @ A).cpu().numpy(), truncated(W.numpy(), 7)[0], atol=1e-10)


# ---------------------------------------------------------------- issue 15: autocast, bad input

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_low_rank_factor_ignores_autocast(device_type, dtype):
    W = torch.randn(80, 60, generator=torch.Generator().manual_seed(0)).to(device_type)
    same_under_autocast(lambda: lowrank.low_rank_factor(W, 6, return_residual=True), device_type, dtype)
    same_under_autocast(lambda: lowrank.low_rank_factor(W, 6, method="rsvd", seed=0), device_type, dtype)
    Wh = W.to(torch.bfloat16)
    same_under_autocast(lambda: lowrank.low_rank_factor(Wh, 6), device_type, dtype)
    with torch.autocast(device_type, dtype=dtype):
        B, A = lowrank.low_rank_factor(W, 6)
    assert B.dtype == A.dtype == torch.float32


_W = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))

LOW_RANK_FACTOR_BAD = [
    ("nan", lambda: lowrank.low_rank_factor(nan_at(_W), 3), ValueError, "W contains NaN"),
    (
        "inf",
        lambda: lowrank.low_rank_factor(nan_at(_W, float("inf")), 3),
        ValueError,
        "W contains NaN or Inf",
    ),
    (
        "meta",
        lambda: lowrank.low_rank_factor(torch.empty(20, 10, device="meta"), 3),
        ValueError,
        "W is on the meta",
    ),
    ("sparse", lambda: lowrank.low_rank_factor(_W.to_sparse(), 3), TypeError, "W must be a dense"),
    ("complex", lambda: lowrank.low_rank_factor(_W.to(torch.complex64), 3), TypeError, "W must be real"),
    ("type", lambda: lowrank.low_rank_factor(_W.numpy(), 3), TypeError, "W must be a torch.Tensor"),
    ("3-D", lambda: lowrank.low_rank_factor(_W[None], 3), ValueError, "W must be a 2-D"),
    ("r big", lambda: lowrank.low_rank_factor(_W, 11), ValueError, "r=11 exceeds"),
    ("r float", lambda: lowrank.low_rank_factor(_W, 2.5), TypeError, "r must be a positive int"),
    (
        "seed big",
        lambda: lowrank.low_rank_factor(_W, 3, method="rsvd", seed=2**63),
        ValueError,
        "seed must be in",
    ),
    ("seed neg", lambda: lowrank.low_rank_factor(_W, 3, seed=-5), ValueError, "seed must be in"),
    ("method", lambda: lowrank.low_rank_factor(_W, 3, method="qr"), ValueError, "method must be"),
    ("balance", lambda: lowrank.low_rank_factor(_W, 3, balance="up"), ValueError, "balance must be"),
]


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in LOW_RANK_FACTOR_BAD], ids=[row[0] for row in LOW_RANK_FACTOR_BAD]
)
def test_low_rank_factor_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize("balance", ["left", "right"])
def test_float16_factor_that_overflows_is_refused(balance):
    # 200 x 200 of 60000: one singular value 1.2e7, beyond float16's 65504 when a factor carries it whole
    # (it came back as inf); the exact factor is checked against float64.
    W = torch.full((200, 200), 60000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="overflows W's dtype torch.float16"):
        lowrank.low_rank_factor(W, 1, balance=balance)
    B, A = lowrank.low_rank_factor(W, 1)  # sqrt(1.2e7) = 3464 per factor fits
    assert bool(torch.isfinite(B).all() and torch.isfinite(A).all())
    assert float((B.double() @ A.double() - W.double()).abs().max()) <= 60000 * 2e-3
