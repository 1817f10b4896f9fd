"""Issue 19: the narrow-block branch of rsvd(method="auto") and of pca on sparse fp32 data.

Every branch of ``lowrank.svd._auto_narrow`` / ``_resolve`` and ``lowrank.pca._narrow_blocks`` is taken
here; which one ran is read from the Krylov routine's arguments (a spy), and each result is checked against
the exact SVD (NumPy, float64): near-optimal reconstruction, singular values, orthonormal factors.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import lowrank

svd_module = importlib.import_module("lowrank.svd")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def runs(monkeypatch):
    """Records ``(routine, block columns, n_iter)`` of every fixed-rank run."""
    calls: list[tuple[str, int, int]] = []
    krylov, subspace = svd_module._block_krylov, svd_module._subspace

    def spy_krylov(op, gen, k, block, n_iter, **kw):
        calls.append(("krylov", block, n_iter))
        return krylov(op, gen, k, block, n_iter, **kw)

    def spy_subspace(op, gen, k, width, n_iter, **kw):
        calls.append(("subspace", width, n_iter))
        return subspace(op, gen, k, width, n_iter, **kw)

    monkeypatch.setattr(svd_module, "_block_krylov", spy_krylov)
    monkeypatch.setattr(svd_module, "_subspace", spy_subspace)
    return calls


def _dense(m, n, decay=0.97, floor=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    r = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    s = decay ** np.arange(r) + floor
    return (U * s) @ V.T


def _sparse(m=1500, n=300, density=0.03, seed=0, dtype=np.float32):
    """Sparse with Zipf row/column degrees and decaying column scales (a spectrum that decays)."""
    rng = np.random.default_rng(seed)
    nnz = int(density * m * n)
    pr, pc = 1.0 / np.arange(1, m + 1), 1.0 / np.arange(1, n + 1)
    rows = rng.permutation(m)[rng.choice(m, nnz, p=pr / pr.sum())]
    cols = rng.permutation(n)[rng.choice(n, nnz, p=pc / pc.sum())]
    A = sp.coo_array((rng.standard_normal(nnz), (rows, cols)), shape=(m, n)).tocsr()
    A.sum_duplicates()
    return (A @ sp.diags(0.98 ** np.arange(n))).tocsr().astype(dtype)


def _torch_csr(A):
    return torch.sparse_csr_tensor(
        torch.from_numpy(A.indptr.astype(np.int64)),
        torch.from_numpy(A.indices.astype(np.int64)),
        torch.from_numpy(A.data),
        size=A.shape,
    )


def _check_against_exact(A, res, k, excess, sv_rtol, orth_atol, center=False):
    """Reconstruction within ``1 + excess`` of the optimal rank-k error, singular values and orthonormal
    factors, all against the exact SVD of (the centred) A in float64."""
    A = np.asarray(A, dtype=np.float64)
    if center:
        A = A - A.mean(axis=0)
    s = np.linalg.svd(A, compute_uv=False)
    U, S, Vh = (t.double().numpy() for t in res)
    error = np.linalg.norm(A - (U * S) @ Vh)
    optimal = np.sqrt(np.sum(s[k:] ** 2))
    assert error / optimal - 1 < excess, error / optimal - 1
    np.testing.assert_allclose(S, s[:k], rtol=sv_rtol)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=orth_atol)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(k), atol=orth_atol)


def test_dense_small_takes_narrow_blocks(runs):
    """Dense, CPU, k >= 16, at most 2^22 entries: blocks of ceil(k/2) + 8, n_iter=3 (subspace 4 b)."""
    A = _dense(300, 250)
    k = 21
    res = lowrank.rsvd(torch.from_numpy(A).float(), k, seed=0)
    assert runs == [("krylov", 19, 3)]
    _check_against_exact(A, res, k, excess=3e-3, sv_rtol=2e-2, orth_atol=1e-5)


def test_dense_fp64_narrow_is_near_exact(runs):
    A = _dense(500, 400, decay=0.9, floor=0.0)
    k = 16
    res = lowrank.rsvd(torch.from_numpy(A), k, seed=1)
    assert runs == [("krylov", 16, 3)]
    _check_against_exact(A, res, k, excess=1e-6, sv_rtol=1e-6, orth_atol=1e-12)


def _slow_decay(m, n, spectrum, seed=0):
    """fp64 ``m x n`` with exactly the singular values ``spectrum`` and random singular vectors."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    return (U * spectrum) @ V.T


def _excess(A, res, k):
    """``||A - U S Vh||_F / ||A - A_k||_F - 1`` against the exact SVD of A, float64."""
    s = np.linalg.svd(A, compute_uv=False)
    U, S, Vh = (np.asarray(t, dtype=np.float64) for t in res)
    return np.linalg.norm(A - (U * S) @ Vh) / np.sqrt(np.sum(s[k:] ** 2)) - 1


@pytest.mark.parametrize("head", ["power", "flat"])
def test_dense_narrow_default_reaches_torch_accuracy(runs, head):
    """The dense narrow rule's claim: at least the accuracy of torch.svd_lowrank(q=k+10, niter=2), on a
    slowly decaying spectrum (i^-0.7) and on a nearly flat head (0.995^i + 1e-3, the hardest kind
    measured), every seed of ours against the mean of torch's."""
    i = np.arange(1, 601, dtype=np.float64)
    spectrum = i**-0.7 if head == "power" else 0.995 ** (i - 1) + 1e-3
    A = _slow_decay(600, 600, spectrum)
    X = torch.from_numpy(A).float()
    k = 32
    ours = [_excess(A, lowrank.rsvd(X, k, seed=seed), k) for seed in range(3)]
    assert runs == [("krylov", 24, 3)] * 3
    theirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(X, q=k + 10, niter=2)
        theirs.append(_excess(A, (U[:, :k], S[:k], V[:, :k].T), k))
    assert max(ours) <= np.mean(theirs), (ours, theirs)


@pytest.mark.parametrize("center", [False, True])
def test_sparse_takes_narrow_blocks(runs, center):
    """Sparse (tall: factored as A^T, short-side Rayleigh-Ritz): blocks of ceil(k/2.5) spanning 3k."""
    A = _sparse()
    k = 20
    res = lowrank.rsvd(_torch_csr(A), k, seed=0, center=center)
    assert runs == [("krylov", 8, 7)]
    _check_against_exact(A.toarray(), res, k, excess=3e-3, sv_rtol=2e-2, orth_atol=1e-5, center=center)


def test_large_dense_keeps_the_wide_rule(runs, monkeypatch):
    """Above 2^22 entries (here: the limit lowered) dense matrices keep k + max(4, k // 8), n_iter=2."""
    monkeypatch.setattr(svd_module, "_NARROW_DENSE_MAX_ENTRIES", 300 * 250 - 1)
    A = _dense(300, 250)
    k = 21
    res = lowrank.rsvd(torch.from_numpy(A).float(), k, seed=0)
    assert runs == [("krylov", k + 4, 2)]
    _check_against_exact(A, res, k, excess=3e-3, sv_rtol=2e-2, orth_atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["small_k", "oversample", "n_iter", "method_krylov", "batched", "operator", "wide_subspace"],
)
def test_wide_rule_everywhere_else(runs, case):
    """k < 16, an explicit oversample / n_iter / method, batched input, an implicit operator, or a narrow
    subspace over half of min(m, n): the wide rule, unchanged."""
    A = _dense(300, 250)
    X = torch.from_numpy(A).float()
    k, kwargs = 21, {}
    expected = ("krylov", 25, 2)
    if case == "small_k":
        k, expected = 15, ("krylov", 19, 2)
    elif case == "oversample":
        kwargs, expected = dict(oversample=6), ("krylov", 27, 2)
    elif case == "n_iter":
        kwargs, expected = dict(n_iter=3), ("krylov", 25, 3)
    elif case == "method_krylov":
        kwargs = dict(method="krylov")
    elif case == "batched":
        X = torch.stack([X, 2 * X])
    elif case == "operator":
        from scipy.sparse.linalg import aslinearoperator

        X = aslinearoperator(A.astype(np.float32))
    elif case == "wide_subspace":
        # 2.5 k = 100 > min(m, n) // 2 = 90 columns: the narrow subspace is too large; the wide rule's
        # 3 (k + 5) = 135 does not fit either, so it is subspace iteration
        A = _dense(300, 180)
        X = torch.from_numpy(A).float()
        k, expected = 40, ("subspace", 50, 4)
    res = lowrank.rsvd(X, k, seed=0, **kwargs)
    assert runs == [expected]
    if case == "batched":
        for i, scale in enumerate((1.0, 2.0)):
            one = tuple(t[i] for t in res)
            _check_against_exact(scale * A, one, k, excess=3e-3, sv_rtol=2e-2, orth_atol=1e-5)
    else:
        _check_against_exact(A, res, k, excess=3e-3, sv_rtol=2e-2, orth_atol=1e-5)


def test_auto_narrow_rule_on_cuda_keeps_the_wide_rule():
    """The narrow branch is CPU-only (on GPUs wide blocks keep the device busy)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lowrank._linop import as_linop

    op = as_linop(torch.randn(300, 200, device="cuda"))
    assert svd_module._auto_narrow(op, 20) is None
    assert svd_module._auto_narrow(as_linop(torch.randn(300, 200)), 20) == (18, 3)


# ----------------------------------------------------------------------------------------- pca


@pytest.fixture
def pca_runs(monkeypatch):
    """Records the keyword arguments pca hands to rsvd."""
    calls: list[dict] = []
    pca_module = importlib.import_module("lowrank.pca")
    rsvd = pca_module.rsvd

    def spy(*args, **kwargs):
        calls.append({key: kwargs[key] for key in ("block_size", "n_iter", "oversample") if key in kwargs})
        return rsvd(*args, **kwargs)

    monkeypatch.setattr(pca_module, "rsvd", spy)
    return calls


def _pca_check(X_dense, result, k, rtol):
    D = np.asarray(X_dense, dtype=np.float64)
    D = D - D.mean(axis=0)
    s = np.linalg.svd(D, compute_uv=False)[:k]
    np.testing.assert_allclose(result.explained_variance.double().numpy(), s**2 / (D.shape[0] - 1), rtol=rtol)
    C = result.components.double().numpy()
    np.testing.assert_allclose(C @ C.T, np.eye(k), atol=1e-5)
    # the components span the top-k right singular subspace: projecting D on them keeps its energy
    captured = np.linalg.norm(D @ C.T) ** 2
    assert captured / np.sum(s**2) > 1 - 1e-4


def test_pca_sparse_fp32_takes_narrow_blocks(pca_runs):
    """Sparse fp32, k >= 16, no n_iter/oversample: blocks of ceil(3k/5) spanning 4k."""
    A = _sparse()
    k = 20
    result = lowrank.pca(A, k, seed=0)
    assert pca_runs == [dict(block_size=12, n_iter=6)]
    _pca_check(A.toarray(), result, k, rtol=1e-4)


@pytest.mark.parametrize("case", ["fp64", "small_k", "given_n_iter", "dense"])
def test_pca_wide_defaults_elsewhere(pca_runs, case):
    A = _sparse()
    k, kwargs, expected = 20, {}, dict(n_iter=4, oversample=10)
    X = A
    if case == "fp64":
        X = A.astype(np.float64)
    elif case == "small_k":
        k = 12
    elif case == "given_n_iter":
        kwargs, expected = dict(n_iter=3), dict(n_iter=3, oversample=10)
    elif case == "dense":
        X = torch.from_numpy(A.toarray())
    result = lowrank.pca(X, k, seed=0, method="randomized", **kwargs)
    assert pca_runs == [expected]
    _pca_check(A.toarray(), result, k, rtol=1e-4)


def test_pca_narrow_subspace_too_large_keeps_wide_defaults(pca_runs):
    """4k columns over half of min(m, n): the wide defaults."""
    A = _sparse(m=1000, n=150)
    k = 20
    result = lowrank.pca(A, k, seed=0)
    assert pca_runs == [dict(n_iter=4, oversample=10)]
    _pca_check(A.toarray(), result, k, rtol=1e-4)


@pytest.mark.parametrize("decay", ["slow", "fast"])
def test_rayleigh_ritz_fp32_gram_or_fp64_fallback(monkeypatch, decay):
    """fp32 CPU Rayleigh-Ritz: the Gram in fp32 when sigma_k >= sigma_1 / 100 (its eigenvalues are then
    well above its rounding), else in fp64 (lowrank.svd._gram64); both against the exact SVD, singular
    values to fp32 accuracy (they come from column norms accumulated in fp64, not from the fp32 Gram)."""
    gram64_calls = []
    gram64 = svd_module._gram64

    def spy(X):
        gram64_calls.append(X.shape)
        return gram64(X)

    monkeypatch.setattr(svd_module, "_gram64", spy)
    i = np.arange(400, dtype=np.float64)
    # slow: sigma_20 / sigma_1 = 0.37; fast: 1e-4 (lambda_k / lambda_1 = 1e-8, below the 1e-4 threshold)
    spectrum = 0.95**i if decay == "slow" else 10.0 ** (-i / 4.75)
    A = _slow_decay(500, 400, spectrum, seed=3)
    k = 20
    res = lowrank.rsvd(torch.from_numpy(A).float(), k, seed=0)
    assert bool(gram64_calls) == (decay == "fast")
    U, S, Vh = (t.double().numpy() for t in res)
    assert bool(np.all(S[1:] <= S[:-1]))
    if decay == "slow":
        _check_against_exact(A, res, k, excess=1e-4, sv_rtol=1e-5, orth_atol=1e-5)
    else:  # the tail is below fp32 rounding of A: relative accuracy of the head, orthonormal factors
        np.testing.assert_allclose(S[:8], spectrum[:8], rtol=1e-4)
        np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-5)
        np.testing.assert_allclose(Vh @ Vh.T, np.eye(k), atol=1e-5)


def test_rayleigh_ritz_fp32_sorts_nearly_equal_ritz_values():
    """Equal singular values (a flat head): the column norms of W Z_k may come out in any order; the
    triplets are returned sorted by S, and still reconstruct A's best rank-k approximation."""
    spectrum = np.concatenate([np.ones(12), 0.5 * 0.9 ** np.arange(288)])
    A = _slow_decay(400, 300, spectrum, seed=5)
    k = 16
    res = lowrank.rsvd(torch.from_numpy(A).float(), k, seed=0)
    S = res.S.double().numpy()
    assert bool(np.all(S[1:] <= S[:-1]))
    _check_against_exact(A, res, k, excess=1e-4, sv_rtol=1e-5, orth_atol=1e-5)


@pytest.mark.parametrize("decay", ["slow", "fast"])
def test_krylov_block_normalisation_cholesky_or_householder(monkeypatch, decay):
    """fp32 CPU Krylov blocks are first normalised by one CholeskyQR pass when its R is well conditioned
    (slowly decaying spectra), by Householder QR otherwise (fast decay: a Krylov block is then nearly
    rank deficient). Both span the same blocks: the result equals that of Householder QR everywhere, and
    matches the exact SVD."""
    outcomes = []
    normalize = svd_module._normalize_block

    def spy(Y):
        Q = normalize(Y)
        outcomes.append(Q is not None)
        return Q

    i = np.arange(300, dtype=np.float64)
    spectrum = 0.95**i if decay == "slow" else 0.3**i
    A = _slow_decay(400, 300, spectrum, seed=2)
    X = torch.from_numpy(A).float()
    k = 16
    monkeypatch.setattr(svd_module, "_normalize_block", spy)
    res = lowrank.rsvd(X, k, seed=0, block_size=8, n_iter=4)
    monkeypatch.setattr(svd_module, "_normalize_block", lambda Y: None)
    householder = lowrank.rsvd(X, k, seed=0, block_size=8, n_iter=4)
    assert len(outcomes) == 4
    assert all(outcomes) if decay == "slow" else not all(outcomes), outcomes
    top = k if decay == "slow" else 8  # 0.3^i: the tail is below fp32 rounding of A
    np.testing.assert_allclose(res.S.numpy()[:top], householder.S.numpy()[:top], rtol=1e-4)
    if decay == "slow":
        _check_against_exact(A, res, k, excess=1e-3, sv_rtol=1e-3, orth_atol=1e-5)
    else:
        np.testing.assert_allclose(res.S.double().numpy()[:6], spectrum[:6], rtol=1e-4)
        U, Vh = res.U.double().numpy(), res.Vh.double().numpy()
        np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-5)
        np.testing.assert_allclose(Vh @ Vh.T, np.eye(k), atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_products_and_bases_follow_the_thread_count(monkeypatch, threads):
    """A dense real A on CPU: transposed products (column-major blocks) with one thread, direct ones
    (row-major) with more; the Krylov store, the images buffer (``rmatmul_into``) and the CholeskyQR'd
    blocks (``_cholqr_kept`` writing into the store) follow that layout, and the factorization matches the
    exact SVD either way (and the other thread count's to rounding)."""
    i = np.arange(300, dtype=np.float64)
    A = _slow_decay(400, 300, (i + 1) ** -0.7, seed=3)
    X = torch.from_numpy(A).float()
    k = 24
    torch.set_num_threads(threads)
    try:
        op = svd_module.as_linop(X)
        assert op.column_major_products == (threads == 1)
        Y = torch.randn(400, 8)
        out = torch.empty(8, 300).mT if threads == 1 else torch.empty(300, 16)[:, 4:12]
        assert op.rmatmul_into(Y, out) is out
        torch.testing.assert_close(out, X.mT @ Y, rtol=1e-5, atol=1e-5)
        kept = []
        cholqr = svd_module._cholqr_kept

        def spy(P, out=None):
            Q = cholqr(P, out)
            kept.append(Q is not None and Q is out)
            return Q

        monkeypatch.setattr(svd_module, "_cholqr_kept", spy)
        res = lowrank.rsvd(X, k, seed=0)
        other_threads = 2 if threads == 1 else 1
        torch.set_num_threads(other_threads)
        other = lowrank.rsvd(X, k, seed=0)
    finally:
        torch.set_num_threads(1)
    assert kept and all(kept), kept  # every projected block passed Kahan's test and went into the store
    assert res.U.is_contiguous() == (threads != 1)  # U = basis Z_k in the basis' layout
    _check_against_exact(A, res, k, excess=2e-2, sv_rtol=2e-2, orth_atol=1e-5)
    np.testing.assert_allclose(res.S.numpy(), other.S.numpy(), rtol=1e-5)
