"""lowrank.svd / rsvd / svd_error against float64 NumPy/SciPy references."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import torch

import lowrank


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small matrices: one thread is faster and immune to oversubscription on shared CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_matrix(m, n, spectrum, seed=0):
    """A = U diag(s) V^T with Haar-like random U, V (float64 NumPy) and the given spectrum."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    s = np.asarray(spectrum(np.arange(r)), dtype=np.float64)
    return (U * s) @ V.T, s


def fast_decay(i):
    return 0.7**i


def slow_decay(i):
    return 0.97**i + 1e-3


def optimal_error(s, k):
    return np.sqrt(np.sum(s[k:] ** 2))


def recon_error(A, res):
    U, S, Vh = (t.double().numpy() for t in res)
    return np.linalg.norm(A - (U * S) @ Vh)


def assert_orthonormal(X, atol):
    X = X.double().numpy()
    np.testing.assert_allclose(X.T @ X, np.eye(X.shape[1]), atol=atol)


def assert_signs(U):
    U = U.double().numpy()
    idx = np.abs(U).argmax(axis=0)
    assert np.all(U[idx, np.arange(U.shape[1])] > 0)


# ------------------------------------------------------------------------------------------------ exact


def test_svd_exact_matches_numpy():
    A, s = make_matrix(70, 50, slow_decay, seed=1)
    res = lowrank.svd(torch.from_numpy(A), 12)
    np.testing.assert_allclose(res.S.numpy(), s[:12], rtol=1e-12)
    assert res.U.shape == (70, 12) and res.Vh.shape == (12, 50)
    assert recon_error(A, res) == pytest.approx(optimal_error(s, 12), rel=1e-10)
    assert_orthonormal(res.U, 1e-12)
    assert_signs(res.U)
    full = lowrank.svd(torch.from_numpy(A))
    assert full.S.shape == (50,)


# ------------------------------------------------------------------------------------------------ rsvd


@pytest.mark.parametrize("method", ["subspace", "krylov", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rsvd_fast_decay_recovers_exact(method, dtype):
    A, s = make_matrix(160, 100, fast_decay, seed=2)
    k = 10
    res = lowrank.rsvd(torch.from_numpy(A).to(dtype), k, method=method, seed=0)
    assert res.U.dtype == dtype and res.S.dtype == dtype and res.Vh.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(res.S.double().numpy(), s[:k], rtol=tol)
    # sign-free subspace angles against the exact singular vectors
    U0, _, V0h = np.linalg.svd(A)
    assert np.max(scipy.linalg.subspace_angles(res.U.double().numpy(), U0[:, :k])) < 10 * tol**0.5
    assert np.max(scipy.linalg.subspace_angles(res.Vh.double().numpy().T, V0h[:k].T)) < 10 * tol**0.5
    # vectors (not only subspaces) agree once signs are fixed: the spectrum is well separated
    np.testing.assert_allclose(np.abs(res.U.double().numpy()), np.abs(U0[:, :k]), atol=1e3 * tol)
    assert_orthonormal(res.U, 1e2 * tol)
    assert_orthonormal(res.Vh.mT, 1e2 * tol)
    assert_signs(res.U)


@pytest.mark.parametrize("method,n_iter,factor", [("subspace", 4, 1.05), ("krylov", 2, 1.01)])
def test_rsvd_slow_decay_near_optimal(method, n_iter, factor):
    A, s = make_matrix(240, 160, slow_decay, seed=3)
    k = 20
    res = lowrank.rsvd(torch.from_numpy(A), k, method=method, n_iter=n_iter, seed=1)
    err = recon_error(A, res)
    assert optimal_error(s, k) <= err <= factor * optimal_error(s, k)
    assert np.max(np.abs(res.S.numpy() - s[:k]) / s[:k]) < 0.05


def test_krylov_more_accurate_per_pass_than_subspace():
    A, s = make_matrix(240, 160, slow_decay, seed=4)
    k = 20
    opt = optimal_error(s, k)
    sub = recon_error(
        A, lowrank.rsvd(torch.from_numpy(A), k, method="subspace", oversample=4, n_iter=2, seed=0)
    )
    kry = recon_error(
        A, lowrank.rsvd(torch.from_numpy(A), k, method="krylov", oversample=4, n_iter=2, seed=0)
    )
    assert kry - opt < 0.5 * (sub - opt)


def test_one_krylov_iteration_beats_torch_configuration():
    # n_iter=1 (4 passes, wider default block) must be at least as accurate as subspace iteration with
    # torch.svd_lowrank's defaults (q = k + 10 columns, niter=2: 6 passes) -- the documented quality knob
    A, s = make_matrix(400, 300, slow_decay, seed=12)
    k = 20
    opt = optimal_error(s, k)
    fast = recon_error(A, lowrank.rsvd(torch.from_numpy(A), k, method="krylov", n_iter=1, seed=0))
    torch_like = recon_error(
        A, lowrank.rsvd(torch.from_numpy(A), k, method="subspace", oversample=10, n_iter=2, seed=0)
    )
    assert opt <= fast <= torch_like


@pytest.mark.parametrize("method", ["subspace", "krylov"])
def test_rank_deficient_falls_back_robustly(method):
    # rank 6 < sketch width: the fast CholeskyQR path breaks down and the Householder rerun must fix it
    rng = np.random.default_rng(5)
    A = rng.standard_normal((120, 6)) @ rng.standard_normal((6, 90))
    s = np.linalg.svd(A, compute_uv=False)
    res = lowrank.rsvd(torch.from_numpy(A), 10, method=method, seed=0)
    np.testing.assert_allclose(res.S.numpy()[:6], s[:6], rtol=1e-10)
    assert np.all(res.S.numpy()[6:] < 1e-10 * s[0])
    assert_orthonormal(res.U, 1e-10)
    assert recon_error(A, res) < 1e-10 * np.linalg.norm(A)


def test_ill_conditioned_float32():
    A, s = make_matrix(300, 200, lambda i: 0.5**i, seed=6)  # kappa of the sketch ~ 1e9 in fp32
    res = lowrank.rsvd(torch.from_numpy(A).float(), 8, seed=0)
    np.testing.assert_allclose(res.S.double().numpy(), s[:8], rtol=1e-4)
    assert_orthonormal(res.U, 1e-4)


def test_k_near_min_falls_back_to_exact():
    A, s = make_matrix(30, 20, slow_decay, seed=7)
    res = lowrank.rsvd(torch.from_numpy(A), 18, seed=0)
    np.testing.assert_allclose(res.S.numpy(), s[:18], rtol=1e-12)
    res = lowrank.rsvd(torch.from_numpy(A), 20, seed=0)
    assert res.S.shape == (20,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_fp32(dtype):
    A, s = make_matrix(100, 80, fast_decay, seed=8)
    res = lowrank.rsvd(torch.from_numpy(A).to(dtype), 5, seed=0)
    assert res.S.dtype == torch.float32 and res.U.dtype == torch.float32
    np.testing.assert_allclose(res.S.double().numpy(), s[:5], rtol=2e-2)
    assert lowrank.svd(torch.from_numpy(A).to(dtype), 5).S.dtype == torch.float32


def test_seed_reproducibility():
    A = torch.from_numpy(make_matrix(200, 150, slow_decay, seed=9)[0])
    r1 = lowrank.rsvd(A, 10, seed=42)
    r2 = lowrank.rsvd(A, 10, seed=42)
    r3 = lowrank.rsvd(A, 10, seed=43, n_iter=0, method="subspace")
    r4 = lowrank.rsvd(A, 10, seed=44, n_iter=0, method="subspace")
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    assert not torch.equal(r3.S, r4.S)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(lowrank.rsvd(A, 10, seed=g1).U, lowrank.rsvd(A, 10, seed=g2).U)


def test_sparse_numpy_scipy_operator_agree_with_dense():
    rng = np.random.default_rng(10)
    S = sp.random(300, 200, density=0.05, random_state=rng, format="csr", dtype=np.float64)
    dense = S.toarray()
    ref = lowrank.rsvd(torch.from_numpy(dense), 8, seed=3)
    exact = np.linalg.svd(dense, compute_uv=False)[:8]
    np.testing.assert_allclose(ref.S.numpy(), exact, rtol=0.05)  # flat spectrum: loose

    class Op:
        shape = dense.shape
        dtype = np.float64

        def matmul(self, X):
            return torch.from_numpy(dense) @ X

        def rmatmul(self, Y):
            return torch.from_numpy(dense).T @ Y

    inputs = {
        "coo": torch.from_numpy(dense).to_sparse_coo(),
        "csr": torch.from_numpy(dense).to_sparse_csr(),
        "numpy": dense,
        "scipy": S,
        "operator": Op(),
        "scipy-linop": sp.linalg.aslinearoperator(S),
    }
    recon_ref = (ref.U * ref.S) @ ref.Vh
    for name, value in inputs.items():
        res = lowrank.rsvd(value, 8, seed=3)
        assert isinstance(res.U, torch.Tensor) and res.U.dtype == torch.float64, name
        np.testing.assert_allclose(res.S.numpy(), ref.S.numpy(), rtol=1e-8, err_msg=name)
        np.testing.assert_allclose(
            ((res.U * res.S) @ res.Vh).numpy(), recon_ref.numpy(), atol=1e-8, err_msg=name
        )


@pytest.mark.parametrize("sparse", [False, True])
def test_center_equals_explicitly_centered(sparse):
    rng = np.random.default_rng(11)
    A, _ = make_matrix(250, 120, fast_decay, seed=11)
    A = A + rng.standard_normal(120) * 3.0  # big column means
    centered = A - A.mean(axis=0)
    s = np.linalg.svd(centered, compute_uv=False)
    value = torch.from_numpy(A).to_sparse_csr() if sparse else torch.from_numpy(A)
    res = lowrank.rsvd(value, 6, seed=0, center=True)
    np.testing.assert_allclose(res.S.numpy(), s[:6], rtol=1e-9)
    assert recon_error(centered, res) == pytest.approx(np.sqrt(np.sum(s[6:] ** 2)), rel=1e-6)


def test_batched_equals_loop():
    mats = [make_matrix(90, 60, fast_decay, seed=20 + i)[0] for i in range(3)]
    batch = torch.from_numpy(np.stack(mats)).reshape(3, 1, 90, 60)
    for method in ("subspace", "krylov"):
        res = lowrank.rsvd(batch, 5, method=method, seed=0)
        assert res.U.shape == (3, 1, 90, 5) and res.S.shape == (3, 1, 5) and res.Vh.shape == (3, 1, 5, 60)
        for i, A in enumerate(mats):
            one = lowrank.svd(torch.from_numpy(A), 5)
            np.testing.assert_allclose(res.S[i, 0].numpy(), one.S.numpy(), rtol=1e-9)
            np.testing.assert_allclose(res.U[i, 0].numpy(), one.U.numpy(), atol=1e-5)
            np.testing.assert_allclose(res.Vh[i, 0].numpy(), one.Vh.numpy(), atol=1e-5)
    exact = lowrank.svd(batch, 4)
    for i, A in enumerate(mats):
        np.testing.assert_allclose(exact.S[i, 0].numpy(), np.linalg.svd(A, compute_uv=False)[:4], rtol=1e-12)


@pytest.mark.parametrize(
    "spectrum,tol",
    [(fast_decay, 1e-3), (slow_decay, 0.1), (lambda i: 1.0 / (1 + i), 0.3), (slow_decay, 0.02)],
)
def test_fixed_precision_meets_tol_with_near_oracle_rank(spectrum, tol):
    A, s = make_matrix(300, 200, spectrum, seed=12)
    res = lowrank.rsvd(torch.from_numpy(A), tol=tol, seed=0)
    rel = recon_error(A, res) / np.linalg.norm(A)
    assert rel <= tol * (1 + 1e-9)
    tails = np.sqrt(np.cumsum((s**2)[::-1])[::-1]) / np.linalg.norm(s)  # tails[r] = error of rank r
    oracle = int(np.argmax(tails <= tol)) if np.any(tails <= tol) else len(s)
    assert oracle <= res.S.shape[0] <= max(oracle + 1, int(1.3 * oracle))


def test_fixed_precision_cap_and_center():
    A, s = make_matrix(200, 150, slow_decay, seed=13)
    capped = lowrank.rsvd(torch.from_numpy(A), 7, tol=1e-6, seed=0)
    assert capped.S.shape == (7,)
    np.testing.assert_allclose(capped.S.numpy(), s[:7], rtol=0.05)
    B = A + 5.0
    res = lowrank.rsvd(torch.from_numpy(B), tol=0.05, seed=0, center=True)
    centered = B - B.mean(axis=0)
    assert recon_error(centered, res) <= 0.05 * np.linalg.norm(centered) * (1 + 1e-9)


def test_svd_error_matches_spectral_norm():
    A, s = make_matrix(200, 120, slow_decay, seed=14)
    res = lowrank.rsvd(torch.from_numpy(A), 10, seed=0, n_iter=1, method="subspace")
    U, S, Vh = (t.numpy() for t in res)
    true = np.linalg.norm(A - (U * S) @ Vh, 2)
    est = float(lowrank.svd_error(torch.from_numpy(A), *res, n_iter=30, seed=0))
    assert 0.95 * true <= est <= true * (1 + 1e-10)
    exact = lowrank.svd(torch.from_numpy(A), 10)
    assert float(lowrank.svd_error(A, *exact, seed=0)) == pytest.approx(s[10], rel=0.05)


def test_bad_inputs():
    A = torch.randn(20, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="k"):
        lowrank.rsvd(A, 0)
    with pytest.raises(ValueError, match="k"):
        lowrank.rsvd(A, 11)
    with pytest.raises(ValueError, match="k"):
        lowrank.svd(A, 11)
    with pytest.raises(TypeError, match="k"):
        lowrank.rsvd(A, 2.5)
    with pytest.raises(ValueError, match="k is required"):
        lowrank.rsvd(A)
    with pytest.raises(ValueError, match="tol"):
        lowrank.rsvd(A, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        lowrank.rsvd(A, tol=1.5)
    with pytest.raises(TypeError, match="A"):
        lowrank.rsvd(torch.ones(20, 10, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="A"):
        lowrank.rsvd(np.ones((20, 10), dtype=np.int32), 2)
    with pytest.raises(TypeError, match="A"):
        lowrank.rsvd([[1.0, 2.0]], 1)
    for bad in (float("nan"), float("inf")):
        B = A.clone()
        B[3, 4] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            lowrank.rsvd(B, 2, seed=0)
        with pytest.raises(ValueError, match="NaN or Inf"):
            lowrank.svd(B, 2)
        with pytest.raises(ValueError, match="NaN or Inf"):
            lowrank.rsvd(B.to_sparse_csr(), 2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        lowrank.rsvd(torch.zeros(0, 5), 1)
    with pytest.raises(ValueError, match="A"):
        lowrank.rsvd(torch.zeros(5), 1)
    with pytest.raises(ValueError, match="method"):
        lowrank.rsvd(A, 2, method="lanczos")
    with pytest.raises(ValueError, match="oversample"):
        lowrank.rsvd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter"):
        lowrank.rsvd(A, 2, n_iter=-1)
    with pytest.raises(TypeError, match="seed"):
        lowrank.rsvd(A, 2, seed="x")
    with pytest.raises(TypeError, match="center"):
        lowrank.rsvd(A, 2, center="yes")
    with pytest.raises(ValueError, match="tol"):
        lowrank.rsvd(torch.randn(2, 20, 10), tol=0.1)
    res = lowrank.rsvd(A, 2, seed=0)
    with pytest.raises(ValueError, match="factor"):
        lowrank.svd_error(A, res.U[:5], res.S, res.Vh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["subspace", "krylov"])
def test_cuda_matches_exact(method):
    A, s = make_matrix(500, 300, fast_decay, seed=15)
    res = lowrank.rsvd(torch.from_numpy(A).cuda(), 10, method=method, seed=0)
    assert res.U.is_cuda
    np.testing.assert_allclose(res.S.cpu().numpy(), s[:10], rtol=1e-9)
    res32 = lowrank.rsvd(torch.from_numpy(A).float().cuda(), 10, method=method, seed=0)
    np.testing.assert_allclose(res32.S.double().cpu().numpy(), s[:10], rtol=1e-4)
    tolres = lowrank.rsvd(torch.from_numpy(A).cuda(), tol=1e-3, seed=0)
    assert recon_error(A, tuple(t.cpu() for t in tolres)) <= 1e-3 * np.linalg.norm(A) * (1 + 1e-9)
    centered = lowrank.rsvd(torch.from_numpy(A).cuda().to_sparse_csr(), 5, seed=0, center=True)
    ref = np.linalg.svd(A - A.mean(0), compute_uv=False)[:5]
    np.testing.assert_allclose(centered.S.cpu().numpy(), ref, rtol=1e-8)


@pytest.mark.parametrize("n_iter", [1, 2, 4])
def test_krylov_fp32_wide_fast_decay(n_iter):
    """A spectrum that reaches fp32 rounding inside the Krylov width: on the short side of a wide matrix
    the new blocks are rounding noise inside the basis span, which two projections do not remove (this
    returned singular values up to 2.4x too large); the tall orientation is the reference."""
    rng = np.random.default_rng(40)
    m, n = 3000, 400
    A = (rng.random((m, n)) < 0.3) * (1 + np.abs(rng.standard_normal((m, n)))) * 0.7 ** np.arange(n)
    s = np.linalg.svd(A, compute_uv=False)[:20]
    for value in (A, A.T.copy()):
        res = lowrank.rsvd(
            torch.from_numpy(value.astype(np.float32)), 20, seed=1, method="krylov", n_iter=n_iter
        )
        np.testing.assert_allclose(res.S.numpy(), s, rtol=1e-5)
        U = res.U.double().numpy()
        np.testing.assert_allclose(U.T @ U, np.eye(20), atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 80), (80, 300)], ids=["tall", "wide"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("method", ["krylov", "subspace"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tall_and_wide_centered_against_exact(shape, sparse, method, dtype):
    """Both orientations (fp32 sparse tall inputs are factored through A^T) with implicit centring."""
    m, n = shape
    rng = np.random.default_rng(40)
    if sparse:  # 30% dense, positive entries (non-zero column means), columns scaled 0.6^j: fast decay
        A = (rng.random((m, n)) < 0.3) * (1 + np.abs(rng.standard_normal((m, n)))) * 0.6 ** np.arange(n)
    else:
        A, _ = make_matrix(m, n, fast_decay, seed=40)
        A = A + rng.standard_normal(n) * 2.0
    centered = A - A.mean(axis=0)
    Ue, se, Vhe = np.linalg.svd(centered, full_matrices=False)
    value = torch.from_numpy(A.astype(dtype))
    value = value.to_sparse_csr() if sparse else value
    k = 5
    res = lowrank.rsvd(value, k, seed=1, center=True, method=method, n_iter=6)
    assert res.U.shape == (m, k) and res.Vh.shape == (k, n) and res.U.dtype == value.dtype
    tol = 1e-6 if dtype == np.float64 else 2e-4  # fp32: input rounding (relative 6e-8) over gaps of ~0.3
    np.testing.assert_allclose(res.S.numpy(), se[:k], rtol=tol)
    # sign-free subspace agreement of both factors
    np.testing.assert_allclose(np.abs(np.sum(res.U.double().numpy() * Ue[:, :k], axis=0)), 1, atol=tol)
    np.testing.assert_allclose(np.abs(np.sum(res.Vh.double().numpy() * Vhe[:k], axis=1)), 1, atol=tol)
    assert recon_error(centered, res) == pytest.approx(np.sqrt(np.sum(se[k:] ** 2)), rel=tol)
    picked = res.U.numpy()[np.abs(res.U.numpy()).argmax(axis=0), np.arange(k)]
    assert (picked > 0).all()
    again = lowrank.rsvd(value, k, seed=1, center=True, method=method, n_iter=6)
    assert torch.equal(again.U, res.U) and torch.equal(again.S, res.S)


def test_tall_sparse_fp32_equals_dense_transpose():
    """The orientation itself: a tall fp32 sparse A gives, for the same seed, the dense A^T's factors
    swapped (to rounding), with A's sign convention (largest |entry| of each column of U positive)."""
    rng = np.random.default_rng(12)
    A = ((rng.random((200, 60)) < 0.2) * rng.standard_normal((200, 60)) * 0.8 ** np.arange(60)).astype(
        np.float32
    )
    res = lowrank.rsvd(sp.csr_array(A), 6, seed=4, center=True)
    centered_t = A.T - A.mean(axis=0)[:, None]  # centring A's columns = centring A^T's rows
    ref = lowrank.rsvd(torch.from_numpy(np.ascontiguousarray(centered_t)), 6, seed=4)
    np.testing.assert_allclose(res.S.numpy(), ref.S.numpy(), rtol=1e-5)
    signs = np.sign(res.U.numpy()[0] / ref.Vh.numpy().T[0])
    np.testing.assert_allclose(res.U.numpy(), ref.Vh.numpy().T * signs, atol=1e-5)
    np.testing.assert_allclose(res.Vh.numpy(), ref.U.numpy().T * signs[:, None], atol=1e-5)
    picked = res.U.numpy()[np.abs(res.U.numpy()).argmax(axis=0), np.arange(6)]
    assert (picked > 0).all()


@pytest.mark.parametrize("shape", [(120, 40), (40, 120), (50, 50)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_orientation_rule(shape, dtype, monkeypatch):
    """fp32 sparse/implicit tall inputs run the range finder on A^T (Gaussian sketch m long); dense,
    fp64, square or wide ones on A (sketch n long)."""
    import sys

    svd_module = sys.modules["lowrank.svd"]
    seen = []
    real = svd_module._gaussian
    monkeypatch.setattr(
        svd_module, "_gaussian", lambda op, rows, cols, gen: seen.append(rows) or real(op, rows, cols, gen)
    )
    m, n = shape
    A = np.random.default_rng(5).standard_normal((m, n)).astype(dtype)
    for value, dense in ((torch.from_numpy(A), True), (sp.csr_array(A), False)):
        seen.clear()
        res = lowrank.rsvd(value, 3, seed=0, method="subspace", oversample=2, n_iter=1, center=True)
        assert res.U.shape == (m, 3)
        assert seen == [m if (not dense and m > n and dtype == np.float32) else n]


# ---------------------------------------------------------------- issue 15: autocast, scale, bad input

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


def _low_rank_plus_noise(m=600, n=400, r=8, noise=1e-3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64
    )
    return (L + noise * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_svd_engine_ignores_autocast(device_type, dtype):
    """Issue 15 §1: inside autocast, rsvd raised ("lu_cpu" not implemented for BFloat16) or returned bf16
    factors with 400x the error; now every routine gives what it gives outside, same dtypes."""
    L = _low_rank_plus_noise().to(device_type)
    same_under_autocast(lambda: lowrank.rsvd(L, 5, seed=0), device_type, dtype)
    same_under_autocast(lambda: lowrank.rsvd(L, 5, seed=0, method="krylov"), device_type, dtype)
    same_under_autocast(lambda: lowrank.rsvd(L, 5, seed=0, center=True), device_type, dtype)
    same_under_autocast(lambda: lowrank.svd(L[:100], 5), device_type, dtype)
    U, S, Vh = lowrank.rsvd(L, 5, seed=0)
    same_under_autocast(lambda: lowrank.svd_error(L, U, S, Vh, seed=1), device_type, dtype)
    with torch.autocast(device_type, dtype=dtype):
        U, S, Vh = lowrank.rsvd(L, tol=1e-2, seed=0)
    assert U.dtype == torch.float32 and Vh.dtype == torch.float32
    L64 = L.double()
    achieved = float(torch.linalg.matrix_norm(L64 - (U.double() * S.double()) @ Vh.double()))
    assert achieved <= 1e-2 * float(torch.linalg.matrix_norm(L64))  # was 0.13 under autocast


SCALES = [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["subspace", "krylov", "tol", "exact"])
def test_singular_values_scale_with_the_matrix(method, dtype):
    """Issue 15 §5: rsvd (subspace) on fp32 matrices with norm < ~1e-19 lost 30-60% of the singular values
    (an absolute tiny-pivot guard in the LU step). S(c A) = c S(A) for every method and representable c."""
    A = _low_rank_plus_noise(120, 80, 6, 1e-2, dtype=dtype)
    exact = torch.linalg.svdvals(A.double())[:5]
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for c in SCALES:
        B = A * c
        if method == "exact":
            S = lowrank.svd(B, 5).S
        elif method == "tol":
            S = lowrank.rsvd(B, tol=0.05, seed=0).S[:5]
        else:
            S = lowrank.rsvd(B, 5, method=method, seed=0, n_iter=6).S
        assert S.dtype == dtype
        rel = ((S.double() / c) / exact - 1).abs().max()
        assert float(rel) < 1e3 * tol, (c, float(rel))


def test_svd_error_scales_with_the_matrix():
    A = _low_rank_plus_noise(120, 80, 6, 1e-2)
    U, S, Vh = lowrank.rsvd(A, 5, seed=0)
    ref = float(torch.linalg.matrix_norm((A - (U * S) @ Vh).double(), ord=2))
    for c in SCALES:
        est = lowrank.svd_error(A * c, U, S * c, Vh, seed=0, n_iter=30)
        assert est.dtype == torch.float32
        assert abs(float(est) / c / ref - 1) < 1e-3, c


def _meta(shape=(20, 10)):
    return torch.empty(shape, device="meta")


_A = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
_U, _S, _Vh = lowrank.svd(_A, 3)

SVD_BAD = [
    ("nan", lambda: lowrank.svd(nan_at(_A), 3), ValueError, "A contains NaN"),
    ("inf", lambda: lowrank.svd(nan_at(_A, float("inf")), 3), ValueError, "A contains NaN or Inf"),
    ("meta", lambda: lowrank.svd(_meta(), 3), ValueError, "A is on the meta device"),
    ("type", lambda: lowrank.svd([[1.0, 2.0]], 1), TypeError, "A must be"),
    (
        "int dtype",
        lambda: lowrank.svd(torch.ones(4, 3, dtype=torch.int64), 1),
        TypeError,
        "A must have a floating",
    ),
    ("k too big", lambda: lowrank.svd(_A, 11), ValueError, "k=11 exceeds"),
    ("k float", lambda: lowrank.svd(_A, 2.0), TypeError, "k must be an int"),
    ("empty", lambda: lowrank.svd(torch.ones(0, 3), 1), ValueError, "A has an empty dimension"),
]

RSVD_BAD = [
    ("nan", lambda: lowrank.rsvd(nan_at(_A), 3, seed=0), ValueError, "A contains NaN"),
    (
        "inf sparse",
        lambda: lowrank.rsvd(nan_at(_A, float("inf")).to_sparse(), 3, seed=0),
        ValueError,
        "A contains",
    ),
    ("meta", lambda: lowrank.rsvd(_meta(), 3), ValueError, "A is on the meta device"),
    ("seed 2**63", lambda: lowrank.rsvd(_A, 3, seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ("seed 2**64", lambda: lowrank.rsvd(_A, 3, seed=2**64), ValueError, "seed must be in"),
    ("seed negative", lambda: lowrank.rsvd(_A, 3, seed=-1), ValueError, "seed must be in"),
    ("seed float", lambda: lowrank.rsvd(_A, 3, seed=1.5), TypeError, "seed must be None, an int"),
    ("seed bool", lambda: lowrank.rsvd(_A, 3, seed=True), TypeError, "seed must be"),
    ("tol nan", lambda: lowrank.rsvd(_A, tol=float("nan")), ValueError, "tol must be in"),
    ("tol 1", lambda: lowrank.rsvd(_A, tol=1.0), ValueError, "tol must be in"),
    ("k missing", lambda: lowrank.rsvd(_A), ValueError, "k is required"),
    ("oversample", lambda: lowrank.rsvd(_A, 3, oversample=-1), ValueError, "oversample must be >= 0"),
    ("n_iter", lambda: lowrank.rsvd(_A, 3, n_iter=1.5), TypeError, "n_iter must be an int"),
    ("method", lambda: lowrank.rsvd(_A, 3, method="lanczos"), ValueError, "method must be one of"),
    ("center", lambda: lowrank.rsvd(_A, 3, center=1), TypeError, "center must be a bool"),
    ("type", lambda: lowrank.rsvd("A", 3), TypeError, "A must be"),
]

SVD_ERROR_BAD = [
    ("A nan", lambda: lowrank.svd_error(nan_at(_A), _U, _S, _Vh), ValueError, "A contains NaN"),
    ("A inf", lambda: lowrank.svd_error(nan_at(_A, float("inf")), _U, _S, _Vh), ValueError, "A contains NaN"),
    ("U nan", lambda: lowrank.svd_error(_A, nan_at(_U), _S, _Vh), ValueError, "U contains NaN"),
    ("S inf", lambda: lowrank.svd_error(_A, _U, nan_at(_S, float("inf")), _Vh), ValueError, "S contains NaN"),
    ("Vh nan", lambda: lowrank.svd_error(_A, _U, _S, nan_at(_Vh)), ValueError, "Vh contains NaN"),
    ("A meta", lambda: lowrank.svd_error(_meta(), _U, _S, _Vh), ValueError, "A is on the meta device"),
    ("U meta", lambda: lowrank.svd_error(_A, _meta((20, 3)), _S, _Vh), ValueError, "U is on the meta device"),
    (
        "S list",
        lambda: lowrank.svd_error(_A, _U, [1.0, 2.0, 3.0], _Vh),
        TypeError,
        "S must be a torch.Tensor",
    ),
    ("Vh sparse", lambda: lowrank.svd_error(_A, _U, _S, _Vh.to_sparse()), TypeError, "Vh must be a dense"),
    ("shapes", lambda: lowrank.svd_error(_A, _U[:, :2], _S, _Vh), ValueError, "do not factor"),
    ("n_iter 0", lambda: lowrank.svd_error(_A, _U, _S, _Vh, n_iter=0), ValueError, "n_iter must be >= 1"),
    ("seed", lambda: lowrank.svd_error(_A, _U, _S, _Vh, seed=2**63), ValueError, "seed must be in"),
]


@pytest.mark.parametrize("fn, error, match", [row[1:] for row in SVD_BAD], ids=[row[0] for row in SVD_BAD])
def test_svd_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize("fn, error, match", [row[1:] for row in RSVD_BAD], ids=[row[0] for row in RSVD_BAD])
def test_rsvd_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in SVD_ERROR_BAD], ids=[row[0] for row in SVD_ERROR_BAD]
)
def test_svd_error_bad_input(fn, error, match):
    check_bad(fn, error, match)


def test_seeds_at_the_edges_of_the_range_work():
    for seed in (0, 2**63 - 1, np.int64(7), np.uint64(2**63 - 1)):
        U, S, Vh = lowrank.rsvd(_A, 3, seed=seed)
        assert torch.isfinite(S).all()
    assert torch.equal(lowrank.rsvd(_A, 3, seed=np.int64(7)).S, lowrank.rsvd(_A, 3, seed=7).S)


# ---------------------------------------------------------------- issue 19: narrow Krylov blocks, short side

_svd_module = importlib.import_module("lowrank.svd")


def _tall_sparse(m=2000, n=200, density=0.01, decay=0.99, seed=0, dtype=np.float32):
    """Tall scipy CSR with power-law (Zipf) row/column degrees and slowly decaying column scales."""
    rng = np.random.default_rng(seed)
    nnz = int(density * m * n)
    pr = 1.0 / np.arange(1, m + 1)
    pc = 1.0 / np.arange(1, n + 1)
    rows = rng.permutation(m)[rng.choice(m, nnz, p=pr / pr.sum())]
    cols = rng.permutation(n)[rng.choice(n, nnz, p=pc / pc.sum())]
    A = sp.coo_array((rng.standard_normal(nnz), (rows, cols)), shape=(m, n)).tocsr()
    A = (A @ sp.diags(decay ** np.arange(n))).tocsr()
    return A.astype(dtype)


def _sparse_torch(A):
    return torch.sparse_csr_tensor(
        torch.from_numpy(A.indptr.astype(np.int64)),
        torch.from_numpy(A.indices.astype(np.int64)),
        torch.from_numpy(A.data),
        size=A.shape,
    )


@pytest.mark.parametrize("block_size,n_iter", [(8, 5), (16, None)])
def test_narrow_krylov_block_near_optimal(block_size, n_iter):
    """block_size < k: (n_iter + 1) narrow blocks still give a near-optimal rank-k approximation."""
    A, s = make_matrix(400, 300, slow_decay, seed=3)
    k = 20
    res = lowrank.rsvd(torch.from_numpy(A), k, block_size=block_size, n_iter=n_iter, seed=0)
    assert res.U.shape == (400, k) and res.S.shape == (k,) and res.Vh.shape == (k, 300)
    optimal = np.sqrt(np.sum(s[k:] ** 2))
    assert recon_error(A, res) / optimal < 1.01
    np.testing.assert_allclose(res.S.numpy(), s[:k], rtol=2e-2)
    assert_orthonormal(res.U, 1e-10)
    assert_orthonormal(res.Vh.T, 1e-10)


def test_block_size_default_n_iter_rule():
    """Default n_iter with block_size: smallest with (n_iter + 1) * block >= 2.5 k, at least 2."""
    rule = _svd_module._narrow_block_iters
    assert rule(64, 32, None) == 4  # 5 blocks of 32 = 160 >= 160
    assert rule(40, 16, None) == 6  # 7 blocks of 16 = 112 >= 100
    assert rule(10, 64, None) == 2
    assert rule(40, 16, 3) == 3
    with pytest.raises(ValueError, match="block_size=8 with n_iter=1 spans 16 columns, fewer than k=20"):
        rule(20, 8, 1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(block_size=8, n_iter=1), ValueError, "fewer than k=20"),
        (dict(block_size=8, oversample=2), ValueError, "block_size"),
        (dict(block_size=8, method="subspace"), ValueError, "block_size"),
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(block_size=500), ValueError, "block_size=500 exceeds"),
        (dict(block_size=4.0), TypeError, "block_size must be an int"),
    ],
)
def test_block_size_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        lowrank.rsvd(torch.randn(300, 200), 20, **kwargs)
    with pytest.raises(ValueError, match="block_size"):
        lowrank.rsvd(torch.randn(300, 200), tol=0.1, block_size=8)


def test_block_size_rejected_for_row_streams():
    blocks = [np.random.default_rng(0).standard_normal((50, 30)).astype(np.float32) for _ in range(3)]
    with pytest.raises(ValueError, match="block_size"):
        lowrank.rsvd(iter(blocks), 5, block_size=4)


def _count_short_side(monkeypatch):
    taken = []
    original = _svd_module._ritz_short_side

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_svd_module, "_ritz_short_side", spy)
    return taken


@pytest.mark.parametrize("center", [False, True])
def test_short_side_ritz_matches_long_side_and_exact(monkeypatch, center):
    """Tall sparse fp32 (factored as A^H, images 10x longer than the bases): the short-side Rayleigh-Ritz
    is taken and agrees with the long-side one (forced) and with the exact float64 SVD."""
    A = _tall_sparse()
    k = 12
    D = A.toarray().astype(np.float64)
    if center:
        D = D - D.mean(axis=0)
    s = np.linalg.svd(D, compute_uv=False)
    taken = _count_short_side(monkeypatch)
    res = lowrank.rsvd(_sparse_torch(A), k, block_size=8, n_iter=6, seed=0, center=center)
    assert taken == [True]
    monkeypatch.setattr(_svd_module, "_short_side_ritz", lambda *a: False)
    ref = lowrank.rsvd(_sparse_torch(A), k, block_size=8, n_iter=6, seed=0, center=center)
    assert taken == [True]  # the forced run did not take it
    np.testing.assert_allclose(res.S.numpy(), ref.S.numpy(), rtol=1e-5)
    np.testing.assert_allclose(res.S.numpy(), s[:k], rtol=1e-3)
    opt = np.sqrt(np.sum(s[k:] ** 2))
    assert np.linalg.norm(D - (res.U.double().numpy() * res.S.double().numpy()) @ res.Vh.double().numpy()) < (
        1.001 * opt
    )
    assert_orthonormal(res.U, 1e-5)
    assert_orthonormal(res.Vh.T, 1e-5)
    # the same subspace up to signs: |U^T U_ref| is the identity
    cross = np.abs(res.U.double().numpy().T @ ref.U.double().numpy())
    np.testing.assert_allclose(np.diag(cross)[:6], 1, atol=1e-3)


def test_short_side_ritz_falls_back_on_wide_spectra(monkeypatch):
    """sigma_1 / sigma_k > 100: the fp32 short-side Gram is not accurate enough; the long-side fp64 Gram is
    used (None from _ritz_short_side) and the small singular values keep their accuracy."""
    A = _tall_sparse(decay=0.6)  # column scales 0.6^j: sigma_1 / sigma_12 = 300
    k = 12
    s = np.linalg.svd(A.toarray().astype(np.float64), compute_uv=False)
    assert s[0] / s[k - 1] > 100
    taken = _count_short_side(monkeypatch)
    res = lowrank.rsvd(_sparse_torch(A), k, block_size=8, n_iter=6, seed=0)
    assert taken == [False]
    np.testing.assert_allclose(res.S.numpy(), s[:k], rtol=1e-4)


@pytest.mark.parametrize("c", [1e-30, 1e30])
def test_short_side_ritz_scales_with_the_matrix(monkeypatch, c):
    A = _tall_sparse()
    s = np.linalg.svd(A.toarray().astype(np.float64), compute_uv=False)
    taken = _count_short_side(monkeypatch)
    S = lowrank.rsvd(_sparse_torch(A) * c, 10, block_size=8, n_iter=6, seed=0).S
    assert taken == [True]
    np.testing.assert_allclose(S.double().numpy() / c, s[:10], rtol=1e-3)


def test_short_side_ritz_not_for_implicit_operators(monkeypatch):
    """An implicit operator keeps the long-side Rayleigh-Ritz (its products may cost a dense pass each)."""
    from scipy.sparse.linalg import aslinearoperator

    A = _tall_sparse()
    taken = _count_short_side(monkeypatch)
    s = np.linalg.svd(A.toarray().astype(np.float64), compute_uv=False)
    S = lowrank.rsvd(aslinearoperator(A), 10, block_size=8, n_iter=6, seed=0).S
    assert taken == []
    np.testing.assert_allclose(S.double().numpy(), s[:10], rtol=1e-3)
