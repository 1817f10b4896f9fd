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


# -------------------------------------------- issue 15: autocast, degenerate starts, bad input

import warnings  # noqa: E402

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("form", ["coo", "dense"])
def test_als_svd_start_on_the_diagonal_of_ones(k, form):
    """Issue 15 §3: every observed entry is 1 (the diagonal of a 10 x 10 matrix); the exact SVD start put
    the top-k vectors on k coordinates, ALS never moved the zero rows: 7 of 10 predictions were 0 (RMSE
    0.84; 0.95 at k = 1). u_i = v_i with u_i . v_i = 1 fits every observation."""
    if form == "coo":
        X, mask = sp.coo_matrix(np.eye(10)), None
    else:
        X, mask = torch.eye(10, dtype=torch.float64), torch.eye(10, dtype=torch.bool)
    U, V, history = lowrank.als(X, mask, k, seed=0, return_history=True)
    assert torch.allclose((U * V).sum(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-4)
    assert history["train_rmse"][-1] < 1e-4


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_als_ignores_autocast(device_type, dtype):
    g = torch.Generator().manual_seed(0)
    L = (torch.randn(60, 3, generator=g) @ torch.randn(3, 40, generator=g)).to(device_type)
    mask = (torch.rand(60, 40, generator=g) < 0.5).to(device_type)
    same_under_autocast(lambda: lowrank.als(L, mask, 3, seed=0, max_iter=5, tol=0.0), device_type, dtype)
    same_under_autocast(
        lambda: lowrank.als(L, mask, 3, seed=0, init="random", max_iter=5, tol=0.0), device_type, dtype
    )


def test_als_warns_when_it_stops_at_max_iter():
    g = torch.Generator().manual_seed(1)
    L = torch.randn(60, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 40, generator=g, dtype=torch.float64
    )
    L = L + 0.1 * torch.randn(60, 40, generator=g, dtype=torch.float64)
    mask = torch.rand(60, 40, generator=g) < 0.5
    with pytest.warns(lowrank.ConvergenceWarning, match="max_iter=1"):
        lowrank.als(L, mask, 3, seed=0, max_iter=1, tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.als(L, mask, 3, seed=0, max_iter=1, tol=0.0)


_L = torch.randn(12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_M = torch.rand(12, 8, generator=torch.Generator().manual_seed(1)) < 0.6

ALS_BAD = [
    (
        "nan observed",
        lambda: lowrank.als(nan_at(_L), torch.ones_like(_M), 2),
        ValueError,
        "observed entries of X",
    ),
    (
        "inf sparse",
        lambda: lowrank.als(nan_at(_L, float("inf")).to_sparse(), None, 2),
        ValueError,
        "X contain",
    ),
    ("reg nan", lambda: lowrank.als(_L, _M, 2, reg=float("nan")), ValueError, "reg must be"),
    ("reg inf", lambda: lowrank.als(_L, _M, 2, reg=float("inf")), ValueError, "reg must be"),
    ("reg negative", lambda: lowrank.als(_L, _M, 2, reg=-1.0), ValueError, "reg must be"),
    ("tol nan", lambda: lowrank.als(_L, _M, 2, tol=float("nan")), ValueError, "tol must be"),
    ("seed big", lambda: lowrank.als(_L, _M, 2, seed=2**63), ValueError, "seed must be in"),
    ("seed neg", lambda: lowrank.als(_L, _M, 2, seed=-3), ValueError, "seed must be in"),
    ("seed float", lambda: lowrank.als(_L, _M, 2, seed=0.5), TypeError, "seed must be None or an int"),
    ("meta X", lambda: lowrank.als(torch.empty(12, 8, device="meta"), _M, 2), ValueError, "X is on the meta"),
    (
        "meta mask",
        lambda: lowrank.als(_L, torch.ones(12, 8, dtype=torch.bool, device="meta"), 2),
        ValueError,
        "mask",
    ),
    ("complex", lambda: lowrank.als(_L.to(torch.complex128), _M, 2), TypeError, "X must be real"),
    ("mask dtype", lambda: lowrank.als(_L, _M.float(), 2), TypeError, "mask must have dtype bool"),
    ("mask shape", lambda: lowrank.als(_L, _M[:5], 2), ValueError, "mask has shape"),
    ("no mask", lambda: lowrank.als(_L, None, 2), ValueError, "mask is required"),
    ("k", lambda: lowrank.als(_L, _M, 9), ValueError, "k=9 exceeds"),
    ("max_iter", lambda: lowrank.als(_L, _M, 2, max_iter=0), ValueError, "max_iter must be"),
    ("init", lambda: lowrank.als(_L, _M, 2, init="zeros"), ValueError, "init must be"),
]


@pytest.mark.parametrize("fn, error, match", [row[1:] for row in ALS_BAD], ids=[row[0] for row in ALS_BAD])
def test_als_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize(
    "scale, dtype",
    [(1e-30, torch.float64), (1e-30, torch.float32), (1e30, torch.float32), (1e200, torch.float64)],
)
def test_recovers_at_any_scale(scale, dtype):
    # ALS is scale-equivariant. With the former fixed default reg = 1e-6, data of order 1e-30 came back as
    # zero factors (relative error 1.0); fp32 data at 1e30 raised a LinAlgError from eigh (overflowed
    # Gram matrices). Reference: the float64 low-rank matrix itself.
    X, mask, held_out = problem()
    U, V, history = lowrank.als(
        (X * scale).to(dtype), mask, 4, seed=0, validation=held_out, return_history=True
    )
    assert U.dtype == V.dtype == dtype
    root = scale**0.5
    U, V = U.double() / root, V.double() / root
    assert relative_error(U, V, X) <= (1e-3 if dtype == torch.float64 else 2e-3)
    # the recorded RMSEs are in X's units
    got = float(((U @ V.T - X)[held_out]).square().mean().sqrt())
    assert history["val_rmse"][-1] / scale == pytest.approx(got, rel=1e-2, abs=1e-6)


def test_numpy_validation_mask_and_numeric_scalars():
    X, mask, held_out = problem()
    reference = lowrank.als(X, mask, 4, seed=0, validation=held_out, return_history=True)
    got = lowrank.als(
        X.numpy(),
        mask.numpy(),
        np.int64(4),
        seed=0,
        validation=held_out.numpy(),  # was a TypeError: "validation must have a floating dtype"
        tol=np.float32(1e-4),
        max_iter=np.int64(100),
        return_history=True,
    )
    assert torch.allclose(got[0], reference[0]) and torch.allclose(got[1], reference[1])
    assert got[2]["val_rmse"] == pytest.approx(reference[2]["val_rmse"], rel=1e-6)


def test_non_finite_held_out_values_are_refused():
    X, mask, held_out = problem()
    bad = X.clone()
    bad[held_out.nonzero()[0, 0], held_out.nonzero()[0, 1]] = float("nan")
    with pytest.raises(ValueError, match="validation entries must be finite"):
        lowrank.als(bad, mask, 4, validation=held_out)  # the NaN is held out: val_rmse was NaN
    entries = sp.coo_matrix((np.array([np.inf]), (np.array([0]), np.array([0]))), shape=tuple(X.shape))
    with pytest.raises(ValueError, match="validation entries must be finite"):
        lowrank.als(X, mask, 4, validation=entries)


def test_reg_accepts_numpy_scalars():
    X, mask, _ = problem()
    a = lowrank.als(X, mask, 4, seed=0, reg=np.float32(0.5), max_iter=5, tol=0.0)
    b = lowrank.als(X, mask, 4, seed=0, reg=0.5, max_iter=5, tol=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
