"""lowrank.als: exact recovery of low-rank matrices from 30% of their entries, against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import lowrank
from lowrank.completion import _solve_side

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def problem(m=120, n=90, k=4, fraction=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, n, generator=g, dtype=torch.float64
    )
    mask = torch.rand(m, n, generator=g) < fraction
    held_out = ~mask & (torch.rand(m, n, generator=g) < 0.2)
    return X, mask, held_out


def relative_error(U, V, X):
    return float(torch.linalg.matrix_norm(U @ V.T - X) / torch.linalg.matrix_norm(X))


@pytest.mark.parametrize("init", ["svd", "random"])
def test_recovers_rank_k_from_30_percent(init):
    X, mask, held_out = problem()
    U, V, history = lowrank.als(X, mask, 4, init=init, seed=0, validation=held_out, return_history=True)
    assert U.shape == (120, 4) and V.shape == (90, 4)
    assert relative_error(U, V, X) <= 1e-3
    train, val = history["train_rmse"], history["val_rmse"]
    assert len(train) == len(val) >= 1
    # the recorded numbers are the RMSEs of the returned factors
    for which, rmse in ((mask, train[-1]), (held_out, val[-1])):
        assert rmse == pytest.approx(float((U @ V.T - X)[which].square().mean().sqrt()), rel=1e-9, abs=1e-15)
    assert val[-1] < 1e-3 * float(X.square().mean().sqrt())


def test_sparse_observations_match_dense_with_mask():
    X, mask, _ = problem(seed=1)
    U0, V0 = lowrank.als(X, mask, 4, seed=3, max_iter=5, tol=0.0)
    observed = (X * mask).numpy()
    coo = sp.coo_matrix(observed)  # the observed entries are non-zero with probability 1
    for sparse in (coo, torch.from_numpy(observed).to_sparse(), torch.from_numpy(observed).to_sparse_csr()):
        U, V = lowrank.als(sparse, None, 4, seed=3, max_iter=5, tol=0.0)
        torch.testing.assert_close(U @ V.T, U0 @ V0.T, rtol=1e-9, atol=1e-9)


def test_unobserved_nan_entries_are_ignored():
    X, mask, _ = problem(seed=2)
    Xnan = X.clone()
    Xnan[~mask] = float("nan")
    U, V = lowrank.als(Xnan, mask, 4, seed=0)
    assert relative_error(U, V, X) <= 1e-3


def test_half_step_is_the_per_row_ridge_solution():
    rng = np.random.default_rng(4)
    m, n, k, reg = 12, 9, 3, 0.3
    observed_mask = rng.random((m, n)) < 0.5
    values = rng.standard_normal((m, n)) * observed_mask
    F = rng.standard_normal((n, k))
    pattern = torch.from_numpy(observed_mask.astype(np.float64)).to_sparse_csr()
    observed = torch.from_numpy(values).to_sparse_csr()
    counts = torch.from_numpy(observed_mask.sum(axis=1))
    got = _solve_side(pattern, observed, counts, torch.from_numpy(F), reg).numpy()
    for i in range(m):
        cols = np.flatnonzero(observed_mask[i])
        G = F[cols].T @ F[cols] + reg * max(len(cols), 1) * np.eye(k)
        expected = np.linalg.solve(G, F[cols].T @ values[i, cols])
        np.testing.assert_allclose(got[i], expected, rtol=1e-10, atol=1e-12)


def test_regularisation_shrinks_the_factors():
    X, mask, _ = problem(seed=5)
    U0, V0 = lowrank.als(X, mask, 4, seed=0, reg=0.0)
    U1, V1 = lowrank.als(X, mask, 4, seed=0, reg=5.0)
    assert float((U1 @ V1.T).norm()) < float((U0 @ V0.T).norm())
    assert relative_error(U1, V1, X) > relative_error(U0, V0, X)


def test_errors():
    X, mask, _ = problem()
    with pytest.raises(ValueError, match="mask"):
        lowrank.als(X, None, 3)
    with pytest.raises(ValueError, match="mask"):
        lowrank.als(X, mask[:5], 3)
    with pytest.raises(TypeError, match="mask"):
        lowrank.als(X, mask.double(), 3)
    with pytest.raises(ValueError, match="mask=None"):
        lowrank.als(X.to_sparse(), mask, 3)
    with pytest.raises(ValueError, match="k"):
        lowrank.als(X, mask, 0)
    with pytest.raises(ValueError, match="k"):
        lowrank.als(X, mask, 500)
    with pytest.raises(ValueError, match="reg"):
        lowrank.als(X, mask, 3, reg=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        lowrank.als(X, mask, 3, max_iter=0)
    with pytest.raises(ValueError, match="init"):
        lowrank.als(X, mask, 3, init="zeros")
    with pytest.raises(ValueError, match="no observed"):
        lowrank.als(X, torch.zeros_like(mask), 3)
    bad = X.clone()
    bad[mask.nonzero()[0, 0], mask.nonzero()[0, 1]] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowrank.als(bad, mask, 3)
    with pytest.raises(TypeError, match="X"):
        lowrank.als("matrix", mask, 3)


@needs_cuda
def test_cuda_recovers():
    X, mask, held_out = problem()
    U, V = lowrank.als(X.cuda(), mask.cuda(), 4, seed=0, validation=held_out.cuda())
    assert U.is_cuda
    assert relative_error(U.cpu(), V.cpu(), X) <= 1e-3
