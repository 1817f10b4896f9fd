"""lowrank.svd.krylov_until: block Krylov extended (never restarted) until its Ritz residuals pass.

References: exact SVD (NumPy, float64) of the same matrices; the residuals computed from A directly.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from lowrank.svd import krylov_until

svd_module = importlib.import_module("lowrank.svd")  # the package face shadows the module name


def _decaying(m: int, n: int, seed: int, dtype=torch.float64, rate: float = 0.85) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=dtype))[0]
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=dtype))[0]
    s = rate ** torch.arange(min(m, n), dtype=dtype) + 1e-3
    return (U * s) @ V.T


def _flat(m: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype) / (m**0.5)


def _exact(A: torch.Tensor, k: int) -> np.ndarray:
    return np.linalg.svd(A.double().numpy(), compute_uv=False)[:k]


def _residuals(A, U, S, Vh) -> tuple[np.ndarray, np.ndarray]:
    """Relative residuals ||A v - s u|| / s and ||A^T u - s v|| / s, in float64."""
    A, U, S, Vh = (t.double().numpy() for t in (A, U, S, Vh))
    right = np.linalg.norm(A @ Vh.T - U * S, axis=0) / S
    left = np.linalg.norm(A.T @ U - Vh.T * S, axis=0) / S
    return right, left


@pytest.mark.parametrize("shape", [(120, 90), (90, 120), (100, 100)])
def test_fixed_depth_matches_the_exact_svd_on_a_decaying_spectrum(shape):
    A = _decaying(*shape, seed=0)
    (U, S, Vh), converged = krylov_until(A, 6, block_size=8, max_iter=4, residual_tol=None, seed=1)
    assert bool(converged)
    assert U.shape == (shape[0], 6) and S.shape == (6,) and Vh.shape == (6, shape[1])
    np.testing.assert_allclose(S.numpy(), _exact(A, 6), rtol=1e-10)
    np.testing.assert_allclose((U.T @ U).numpy(), np.eye(6), atol=1e-12)
    np.testing.assert_allclose((Vh @ Vh.T).numpy(), np.eye(6), atol=1e-12)
    right, left = _residuals(A, U, S, Vh)
    assert right.max() < 1e-6 and left.max() < 1e-6
    # deterministic signs: the largest-magnitude entry of each left vector is positive
    idx = U.abs().argmax(dim=0)
    assert bool((U[idx, torch.arange(6)] > 0).all())


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_residual_tol_extends_the_space_until_the_residuals_pass(shape):
    A = _flat(*shape, seed=2)
    tol = 1e-3
    (U, S, Vh), converged = krylov_until(A, 8, block_size=8, max_iter=20, residual_tol=tol, seed=0)
    assert bool(converged)
    right, left = _residuals(A, U, S, Vh)
    # the estimate is of the residual that is not exact by construction; both pass (float32 rounding aside)
    assert max(right.max(), left.max()) <= 2 * tol
    exact = _exact(A, 8)
    # a Ritz value's error is about its squared residual (Saad, Thm. 4.6) times a modest factor
    assert np.max(np.abs(S.double().numpy() - exact) / exact) <= 10 * tol**2
    # a fixed budget of the depth the first check takes is far from it: the extension did the work
    (_, S6, _), _ = krylov_until(A, 8, block_size=8, max_iter=6, residual_tol=None, seed=0)
    assert np.max(np.abs(S6.double().numpy() - exact) / exact) > 100 * tol**2


def test_the_space_is_extended_not_rebuilt(monkeypatch):
    """One Gaussian start and one block (two products) per depth, whatever the number of checks."""
    A = _flat(200, 160, seed=3)
    draws = []
    original = svd_module._gaussian

    def counted(op, rows, cols, gen):
        draws.append((rows, cols))
        return original(op, rows, cols, gen)

    monkeypatch.setattr(svd_module, "_gaussian", counted)
    (_, S, _), converged = krylov_until(A, 8, block_size=8, max_iter=17, residual_tol=1e-4, seed=0)
    assert draws == [(200, 8)]  # one start (a tall A is handled as A^T: the Gaussian block is 200 long)
    assert bool(converged)


def test_a_batch_stops_matrix_by_matrix_and_matches_each_alone():
    fast = _decaying(150, 100, seed=4, dtype=torch.float32, rate=0.5)
    flat = _flat(150, 100, seed=5)
    stack = torch.stack([fast, flat, 2 * fast, 3 * fast, 2 * flat])
    calls = []
    original = svd_module._ritz_from_left

    def recorded(op, left, flags):
        calls.append(tuple(op.batch_shape))
        return original(op, left, flags)

    svd_module._ritz_from_left = recorded
    try:
        (U, S, Vh), converged = krylov_until(stack, 6, block_size=8, max_iter=10, residual_tol=1e-3, seed=0)
    finally:
        svd_module._ritz_from_left = original
    assert converged.tolist() == [True] * 5
    # the decaying ones left the batch first (together), the flat ones later (each its own random start)
    assert calls[0] == (3,) and sum(c[0] for c in calls) == 5
    for i in range(5):
        exact = _exact(stack[i], 6)
        assert np.max(np.abs(S[i].double().numpy() - exact) / exact) <= 1e-4
        right, left = _residuals(stack[i], U[i], S[i], Vh[i])
        assert max(right.max(), left.max()) <= 2e-3


def test_unreachable_tolerance_reports_not_converged_and_returns_the_deepest_space():
    A = _flat(200, 150, seed=6)
    (U, S, Vh), converged = krylov_until(A, 5, block_size=5, max_iter=3, residual_tol=1e-12, seed=0)
    assert not bool(converged)
    (U2, S2, Vh2), _ = krylov_until(A, 5, block_size=5, max_iter=3, residual_tol=None, seed=0)
    torch.testing.assert_close(S, S2)
    torch.testing.assert_close(U, U2)


def test_same_seed_same_result_and_float64_stays_float64():
    A = _decaying(80, 60, seed=7)
    (U1, S1, V1), _ = krylov_until(A, 4, block_size=4, max_iter=5, residual_tol=1e-6, seed=3)
    (U2, S2, V2), _ = krylov_until(A, 4, block_size=4, max_iter=5, residual_tol=1e-6, seed=3)
    assert S1.dtype == torch.float64
    assert torch.equal(S1, S2) and torch.equal(U1, U2) and torch.equal(V1, V2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(max_iter=0), ValueError, "max_iter must be >= 1"),
        (dict(max_iter=-1), ValueError, "max_iter must be >= 0"),
        (dict(block_size=10, max_iter=5), ValueError, "must hold k=4 and stay below"),
        (dict(k=8, block_size=1, max_iter=2), ValueError, "must hold k=8"),
        (dict(residual_tol=0.0), ValueError, "residual_tol must be"),
        (dict(residual_tol="1e-3"), ValueError, "residual_tol must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    args = dict(k=4, block_size=4, max_iter=3, residual_tol=1e-3)
    args.update(kwargs)
    A = _flat(40, 30, seed=0)
    with pytest.raises(error, match=match):
        krylov_until(A, args.pop("k"), **args)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="dense matrix"):
        krylov_until(torch.zeros(2, 3, 4, 5), 1, block_size=1, max_iter=1, residual_tol=None)
    with pytest.raises(TypeError, match="float32 or float64"):
        krylov_until(torch.zeros(20, 20, dtype=torch.float16), 1, block_size=1, max_iter=1, residual_tol=None)
    A = _flat(30, 20, seed=0)
    A[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        krylov_until(A, 2, block_size=2, max_iter=2, residual_tol=None)
