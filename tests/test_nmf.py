"""lowrank.nmf against scikit-learn's NMF (same objective, same algorithms) and exact non-negative data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import lowrank

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def objective(X: np.ndarray, W, H) -> float:
    W = W.detach().cpu().double().numpy() if isinstance(W, torch.Tensor) else W
    H = H.detach().cpu().double().numpy() if isinstance(H, torch.Tensor) else H
    return 0.5 * float(np.linalg.norm(X - W @ H) ** 2)


def data(m=60, n=40, k=5, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((m, k)) @ rng.random((k, n)) + noise * rng.random((m, n))


def sklearn_nmf(X, k, **kw):
    from sklearn.decomposition import NMF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NMF(k, random_state=0, **kw)
        W = model.fit_transform(X)
    return objective(np.asarray(X.todense()) if sp.issparse(X) else X, W, model.components_)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "random"])
def test_hals_reaches_sklearn_objective(init):
    X = data()
    reference = sklearn_nmf(X, 5, init="nndsvda", tol=1e-6, max_iter=1000)
    W, H = lowrank.nmf(torch.from_numpy(X), 5, init=init, tol=1e-7, max_iter=1000, seed=0)
    assert W.shape == (60, 5) and H.shape == (5, 40)
    assert bool((W >= 0).all()) and bool((H >= 0).all())
    assert objective(X, W, H) <= 1.01 * reference


def test_mu_matches_sklearn_mu_and_history_is_monotone():
    X = data(seed=1)
    reference = sklearn_nmf(X, 5, init="nndsvda", solver="mu", tol=0.0, max_iter=300)
    W, H, history = lowrank.nmf(
        torch.from_numpy(X), 5, init="nndsvda", solver="mu", tol=0.0, max_iter=300, return_history=True
    )
    assert len(history) == 300
    assert objective(X, W, H) <= 1.01 * reference
    assert objective(X, W, H) == pytest.approx(history[-1], rel=1e-8)
    steps = np.diff(history)
    assert (steps <= 1e-9 * history[0]).all()  # Lee & Seung: the objective never increases


def test_hals_history_monotone_and_exact_recovery():
    rng = np.random.default_rng(2)
    X = rng.random((50, 4)) @ rng.random((4, 40))  # exactly non-negative rank 4
    W, H, history = lowrank.nmf(torch.from_numpy(X), 4, tol=1e-12, max_iter=1000, return_history=True)
    assert (np.diff(history) <= 1e-10 * history[0]).all()
    assert np.linalg.norm(X - (W @ H).numpy()) <= 1e-3 * np.linalg.norm(X)


def test_sparse_inputs_give_the_dense_result():
    X = sp.random(80, 50, density=0.2, random_state=3, format="csr", dtype=np.float64)
    dense = torch.from_numpy(X.toarray())
    kw = dict(init="random", seed=5, max_iter=50, tol=0.0)
    W0, H0 = lowrank.nmf(X, 4, **kw)
    for sparse in (dense.to_sparse(), dense.to_sparse_csr()):
        W, H = lowrank.nmf(sparse, 4, **kw)
        torch.testing.assert_close(W, W0, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(H, H0, rtol=1e-8, atol=1e-10)
    # dense X takes more inner sweeps per product (they are cheaper relative to it), so compare the fit
    Wd, Hd = lowrank.nmf(dense, 4, **kw)
    assert objective(X.toarray(), W0, H0) <= 1.01 * objective(X.toarray(), Wd, Hd)
    reference = sklearn_nmf(X, 4, init="nndsvda", tol=1e-6, max_iter=1000)
    W, H = lowrank.nmf(X, 4, tol=1e-7, max_iter=1000, seed=0)
    assert objective(X.toarray(), W, H) <= 1.01 * reference


def test_float32_and_numpy_input():
    X = data(seed=4).astype(np.float32)
    W, H = lowrank.nmf(X, 5, tol=1e-7, max_iter=1000, seed=0)
    assert W.dtype == torch.float32 and H.dtype == torch.float32
    reference = sklearn_nmf(X.astype(np.float64), 5, init="nndsvda", tol=1e-6, max_iter=1000)
    assert objective(X.astype(np.float64), W, H) <= 1.02 * reference


def test_zero_matrix():
    W, H = lowrank.nmf(torch.zeros(5, 4, dtype=torch.float64), 2, init="random", seed=0)
    assert float(W.abs().sum()) == 0 and float(H.abs().sum()) == 0


def test_errors():
    X = torch.from_numpy(data())
    with pytest.raises(ValueError, match="non-negative"):
        lowrank.nmf(X - 1.0, 3)
    with pytest.raises(ValueError, match="non-negative"):
        lowrank.nmf(sp.csr_matrix(-np.eye(4)), 2)
    with pytest.raises(ValueError, match="NaN"):
        bad = X.clone()
        bad[0, 0] = float("nan")
        lowrank.nmf(bad, 3)
    with pytest.raises(ValueError, match="k"):
        lowrank.nmf(X, 0)
    with pytest.raises(TypeError, match="k"):
        lowrank.nmf(X, 2.5)
    with pytest.raises(ValueError, match="init"):
        lowrank.nmf(X, 3, init="svd")
    with pytest.raises(ValueError, match="solver"):
        lowrank.nmf(X, 3, solver="cd")
    with pytest.raises(ValueError, match="max_iter"):
        lowrank.nmf(X, 3, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        lowrank.nmf(X, 3, tol=-1.0)
    with pytest.raises(ValueError, match="min"):
        lowrank.nmf(X[:4, :3], 4)
    with pytest.raises(TypeError, match="X"):
        lowrank.nmf(torch.ones(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="X"):
        lowrank.nmf(torch.ones(4), 2)
    W, H = lowrank.nmf(X[:4, :3], 4, init="random", seed=0)  # k > min(m, n) is fine with random init
    assert W.shape == (4, 4)


@needs_cuda
def test_cuda_reaches_sklearn_objective():
    X = data()
    reference = sklearn_nmf(X, 5, init="nndsvda", tol=1e-6, max_iter=1000)
    for dtype in (torch.float64, torch.float32):
        W, H = lowrank.nmf(torch.from_numpy(X).to("cuda", dtype), 5, tol=1e-7, max_iter=1000, seed=0)
        assert W.is_cuda and W.dtype == dtype
        assert objective(X, W, H) <= 1.02 * reference
    sparse = torch.from_numpy(X).to_sparse_csr().cuda()
    W, H = lowrank.nmf(sparse, 5, tol=1e-7, max_iter=1000, seed=0)
    assert objective(X, W, H) <= 1.01 * reference


# -------------------------------------------- issue 15: autocast, degenerate starts, bad input

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402

# rank 3 (singular values 2, sqrt 2, sqrt 2, 0) but non-negative rank 4: W = I, H = X is an exact fit
CYCLIC = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.float64)


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_nmf_ignores_autocast(device_type, dtype):
    X = torch.from_numpy(data()).float().to(device_type)
    for kw in (dict(), dict(solver="mu", init="nndsvda"), dict(init="random", seed=3)):
        same_under_autocast(lambda kw=kw: lowrank.nmf(X, 5, max_iter=4, tol=0.0, **kw), device_type, dtype)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "random"])
def test_hals_does_not_stall_in_a_zero_component(init):
    """Issue 15 §3: the 4th singular value of CYCLIC is 0, so NNDSVD started (and HALS stayed) with a zero
    component: objective 0.293 instead of the exact fit (0)."""
    W, H, history = lowrank.nmf(CYCLIC, 4, init=init, seed=0, tol=1e-10, max_iter=2000, return_history=True)
    assert history[-1] < 1e-12
    assert torch.allclose(W @ H, CYCLIC, atol=1e-6)
    assert bool((W > 0).any(dim=0).all())  # every component is used


def test_mu_from_nndsvd_moves_its_zeros():
    """Multiplicative updates never move a zero: from NNDSVD (half of each factor zero) MU stayed at 0.5 on
    CYCLIC; the zeros now start at small random values (scikit-learn's "nndsvdar")."""
    W, H, history = lowrank.nmf(CYCLIC, 4, solver="mu", seed=0, tol=0.0, max_iter=2000, return_history=True)
    assert history[-1] < 1e-5
    assert bool((W > 0).all()) or history[-1] < 1e-5


def test_nmf_warns_when_it_stops_at_max_iter():
    X = torch.from_numpy(data(20, 10, 3))
    with pytest.warns(lowrank.ConvergenceWarning, match="max_iter=2"):
        lowrank.nmf(X, 3, max_iter=2, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.nmf(X, 3, max_iter=2, tol=0.0)  # tol = 0 asks for max_iter iterations: no warning
        lowrank.nmf(CYCLIC, 4, max_iter=1000, tol=1e-3)


_Xn = torch.from_numpy(data(20, 10, 3))

NMF_BAD = [
    ("nan", lambda: lowrank.nmf(nan_at(_Xn), 3), ValueError, "X contains NaN"),
    ("inf", lambda: lowrank.nmf(nan_at(_Xn, float("inf")), 3), ValueError, "X contains NaN or Inf"),
    ("negative", lambda: lowrank.nmf(nan_at(_Xn, -1.0), 3), ValueError, "X must be non-negative"),
    ("meta", lambda: lowrank.nmf(torch.empty(20, 10, device="meta"), 3), ValueError, "X is on the meta"),
    ("complex", lambda: lowrank.nmf(_Xn.to(torch.complex128), 3), TypeError, "X must be real"),
    ("type", lambda: lowrank.nmf([[1.0]], 1), TypeError, "X must be"),
    ("k", lambda: lowrank.nmf(_Xn, 11), ValueError, "k=11 exceeds"),
    ("seed big", lambda: lowrank.nmf(_Xn, 3, init="random", seed=2**63), ValueError, "seed must be in"),
    ("seed neg", lambda: lowrank.nmf(_Xn, 3, seed=-1), ValueError, "seed must be in"),
    ("seed float", lambda: lowrank.nmf(_Xn, 3, seed=1.0), TypeError, "seed must be None or an int"),
    ("tol nan", lambda: lowrank.nmf(_Xn, 3, tol=float("nan")), ValueError, "tol must be"),
    ("tol inf", lambda: lowrank.nmf(_Xn, 3, tol=float("inf")), ValueError, "tol must be"),
    ("max_iter", lambda: lowrank.nmf(_Xn, 3, max_iter=0), ValueError, "max_iter must be"),
    ("init", lambda: lowrank.nmf(_Xn, 3, init="svd"), ValueError, "init must be"),
    ("solver", lambda: lowrank.nmf(_Xn, 3, solver="cd"), ValueError, "solver must be"),
]


@pytest.mark.parametrize("fn, error, match", [row[1:] for row in NMF_BAD], ids=[row[0] for row in NMF_BAD])
def test_nmf_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("sparse", [False, True])
def test_any_scale_in_float32(scale, sparse):
    # NMF is scale-equivariant; fp32 data at 1e-30 used to stop after two iterations (the objective
    # underflowed to 0) and at 1e30 returned NaN (X @ H^T overflowed). Reference: scikit-learn on the data
    # at unit scale, in float64.
    X = data(60, 40, 5)
    reference = sklearn_nmf(X, 5, init="nndsvd", tol=1e-6, max_iter=2000)
    Xs = torch.tensor(X * scale, dtype=torch.float32)
    Xs = Xs.to_sparse_csr() if sparse else Xs
    W, H, history = lowrank.nmf(Xs, 5, tol=1e-6, max_iter=2000, seed=0, return_history=True)
    assert W.dtype == H.dtype == torch.float32
    assert bool(torch.isfinite(W).all() and torch.isfinite(H).all())
    root = scale**0.5
    got = objective(X, W.double() / root, H.double() / root)
    assert got <= 1.01 * reference
    assert history[-1] / scale**2 == pytest.approx(got, rel=1e-3)  # the history is in X's units


def test_scale_args_accept_numpy_scalars():
    X = data(30, 20, 3)
    W, H = lowrank.nmf(X, 3, tol=np.float32(1e-4), max_iter=np.int64(50), seed=0)
    W2, H2 = lowrank.nmf(X, 3, tol=1e-4, max_iter=50, seed=0)
    assert torch.equal(W, W2) and torch.equal(H, H2)
