"""lowrank.interpolative / lowrank.cur against scipy.linalg (geqp3, interpolative) and the SVD optimum."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import scipy.linalg.interpolative as sli
import scipy.sparse as sp
import torch
from helpers import MatrixOperator as Operator

import lowrank
from lowrank.cur import _pivoted_qr_r

CUDA = torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def decaying(m=150, n=100, decay=-6, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0, decay, n)
    return (U * s) @ V.T, s


def optimal(s, k):
    return float(np.sqrt((s[k:] ** 2).sum()))


def test_pivoted_qr_matches_lapack_geqp3():
    A, _ = decaying(60, 40)
    _, R_ref, p_ref = sla.qr(A, pivoting=True, mode="economic")
    perm, R = _pivoted_qr_r(torch.from_numpy(A), 12)
    np.testing.assert_array_equal(perm[:12].numpy(), p_ref[:12])
    # same triangular factor up to the signs of its rows, on the first 12 pivoted columns
    np.testing.assert_allclose(np.abs(R.numpy()[:, :12]), np.abs(R_ref[:12, :12]), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_interpolative_error_close_to_scipy_and_optimum(method):
    A, s = decaying()
    k = 15
    idx, proj = lowrank.interpolative(torch.from_numpy(A), k, method=method, seed=0)
    assert idx.shape == (100,) and proj.shape == (k, 100 - k)
    assert sorted(idx.tolist()) == list(range(100))
    P = lowrank.interpolation_matrix(idx, proj).numpy()
    np.testing.assert_allclose(P[:, idx[:k].numpy()], np.eye(k), atol=0)
    err = np.linalg.norm(A - A[:, idx[:k].numpy()] @ P)
    ref_idx, ref_proj = sli.interp_decomp(A, k, rand=False)
    ref_err = np.linalg.norm(
        A - sli.reconstruct_skel_matrix(A, k, ref_idx) @ sli.reconstruct_interp_matrix(ref_idx, ref_proj)
    )
    assert err <= 1.5 * ref_err
    assert err <= 3.0 * optimal(s, k)
    if method == "exact":  # the same greedy pivoting as scipy's deterministic ID
        assert set(idx[:k].tolist()) == set(ref_idx[:k].tolist())
        assert err == pytest.approx(ref_err, rel=1e-8)


def test_interpolative_exact_for_rank_k():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((80, 6)) @ rng.standard_normal((6, 50))
    idx, proj = lowrank.interpolative(A, 6, seed=0)
    P = lowrank.interpolation_matrix(idx, proj).numpy()
    assert np.linalg.norm(A - A[:, idx[:6].numpy()] @ P) <= 1e-10 * np.linalg.norm(A)


def test_rank_deficient_k_stays_finite():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))
    idx, proj = lowrank.interpolative(A, 8, method="exact")
    assert bool(torch.isfinite(proj).all())
    P = lowrank.interpolation_matrix(idx, proj).numpy()
    assert np.linalg.norm(A - A[:, idx[:8].numpy()] @ P) <= 1e-8 * np.linalg.norm(A)


def test_cur_dense():
    A, s = decaying(seed=3)
    k = 12
    C, U, R, rows, cols = lowrank.cur(torch.from_numpy(A), k, seed=0)
    assert C.shape == (150, k) and U.shape == (k, k) and R.shape == (k, 100)
    np.testing.assert_array_equal(C.numpy(), A[:, cols.numpy()])
    np.testing.assert_array_equal(R.numpy(), A[rows.numpy(), :])
    assert len(set(rows.tolist())) == k and len(set(cols.tolist())) == k
    # U is the Frobenius-optimal middle factor for these C and R
    np.testing.assert_allclose(
        U.numpy(), np.linalg.pinv(C.numpy()) @ A @ np.linalg.pinv(R.numpy()), atol=1e-8
    )
    err = np.linalg.norm(A - (C @ U @ R).numpy())
    assert err <= 4.0 * optimal(s, k)


@pytest.mark.parametrize("kind", ["scipy", "torch", "operator"])
def test_cur_sparse_and_operator(kind):
    rng = np.random.default_rng(4)
    dense = (rng.standard_normal((120, 5)) @ rng.standard_normal((5, 80))) * (rng.random((120, 80)) < 0.9)
    S = sp.csr_matrix(dense)
    A = {"scipy": S, "torch": torch.from_numpy(dense).to_sparse(), "operator": Operator(S)}[kind]
    s = np.linalg.svd(dense, compute_uv=False)
    C, U, R, rows, cols = lowrank.cur(A, 8, seed=0)
    np.testing.assert_allclose(C.numpy(), dense[:, cols.numpy()], atol=1e-12)
    np.testing.assert_allclose(R.numpy(), dense[rows.numpy(), :], atol=1e-12)
    assert np.linalg.norm(dense - (C @ U @ R).numpy()) <= 4.0 * optimal(s, 8)


def test_errors():
    A = torch.randn(20, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="k"):
        lowrank.interpolative(A, 0)
    with pytest.raises(ValueError, match="k"):
        lowrank.cur(A, 11)
    with pytest.raises(TypeError, match="k"):
        lowrank.interpolative(A, "3")
    with pytest.raises(ValueError, match="method"):
        lowrank.interpolative(A, 3, method="svd")
    with pytest.raises(ValueError, match="oversample"):
        lowrank.interpolative(A, 3, oversample=-1)
    with pytest.raises(TypeError, match="A"):
        lowrank.cur(torch.ones(4, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="A"):
        lowrank.interpolative(torch.ones(4), 2)
    with pytest.raises(ValueError, match="shapes"):
        lowrank.interpolation_matrix(torch.arange(5), torch.zeros(2, 2))


@needs_cuda
def test_cuda_matches_cpu_quality():
    A, s = decaying()
    C, U, R, rows, cols = lowrank.cur(torch.from_numpy(A).cuda(), 10, seed=0)
    assert C.is_cuda
    assert np.linalg.norm(A - (C @ U @ R).cpu().numpy()) <= 4.0 * optimal(s, 10)


# ---------------------------------------------------------------- issue 15: autocast, bad input

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_cur_and_interpolative_ignore_autocast(device_type, dtype):
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(120, 6, generator=g) @ torch.randn(6, 90, generator=g)).to(device_type)
    same_under_autocast(lambda: lowrank.interpolative(A, 6, seed=0), device_type, dtype)
    same_under_autocast(lambda: lowrank.interpolative(A, 6, method="exact"), device_type, dtype)
    same_under_autocast(lambda: lowrank.cur(A, 6, seed=0), device_type, dtype)
    idx, proj = lowrank.interpolative(A, 6, seed=0)
    same_under_autocast(lambda: lowrank.interpolation_matrix(idx, proj), device_type, dtype)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_interpolative_is_scale_invariant(scale):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(100, 5, generator=g) @ torch.randn(5, 70, generator=g)
    idx, proj = lowrank.interpolative(A, 5, seed=0)
    idx_s, proj_s = lowrank.interpolative(A * scale, 5, seed=0)
    assert torch.equal(idx[:5].sort().values, idx_s[:5].sort().values)
    P = lowrank.interpolation_matrix(idx_s, proj_s).double()
    B = A.double() * scale  # the check in fp64: fp32 norms of 1e30 entries overflow
    err = torch.linalg.matrix_norm(B - B[:, idx_s[:5]] @ P) / torch.linalg.matrix_norm(B)
    assert float(err) < 1e-4


_Ac = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
_meta = torch.empty(20, 10, device="meta")

INTERPOLATIVE_BAD = [
    ("nan", lambda: lowrank.interpolative(nan_at(_Ac), 3, seed=0), ValueError, "A contains NaN"),
    (
        "nan exact",
        lambda: lowrank.interpolative(nan_at(_Ac), 3, method="exact"),
        ValueError,
        "A contains NaN",
    ),
    ("inf", lambda: lowrank.interpolative(nan_at(_Ac, float("inf")), 3), ValueError, "A contains NaN or Inf"),
    ("meta", lambda: lowrank.interpolative(_meta, 3), ValueError, "A is on the meta"),
    ("complex", lambda: lowrank.interpolative(_Ac.to(torch.complex64), 3), TypeError, "A must be real"),
    ("type", lambda: lowrank.interpolative(None, 3), TypeError, "A must be"),
    ("k", lambda: lowrank.interpolative(_Ac, 11), ValueError, "k=11 exceeds"),
    ("seed big", lambda: lowrank.interpolative(_Ac, 3, seed=2**63), ValueError, "seed must be in"),
    ("seed neg", lambda: lowrank.interpolative(_Ac, 3, seed=-1), ValueError, "seed must be in"),
    ("oversample", lambda: lowrank.interpolative(_Ac, 3, oversample=-2), ValueError, "oversample must be"),
    ("method", lambda: lowrank.interpolative(_Ac, 3, method="qr"), ValueError, "method must be"),
]

CUR_BAD = [
    ("nan", lambda: lowrank.cur(nan_at(_Ac), 3, seed=0), ValueError, "A contains NaN"),
    (
        "inf sparse",
        lambda: lowrank.cur(nan_at(_Ac, float("inf")).to_sparse(), 3),
        ValueError,
        "A contains NaN",
    ),
    ("meta", lambda: lowrank.cur(_meta, 3), ValueError, "A is on the meta"),
    ("complex", lambda: lowrank.cur(_Ac.to(torch.complex64), 3), TypeError, "A must be real"),
    ("k", lambda: lowrank.cur(_Ac, 0), ValueError, "k must be >= 1"),
    ("seed big", lambda: lowrank.cur(_Ac, 3, seed=2**64), ValueError, "seed must be in"),
    ("seed float", lambda: lowrank.cur(_Ac, 3, seed=2.0), TypeError, "seed must be None or an int"),
]

_idx = torch.tensor([2, 0, 1, 3])
_proj = torch.ones(2, 2)

INTERPOLATION_MATRIX_BAD = [
    (
        "negative",
        lambda: lowrank.interpolation_matrix(torch.tensor([-1, 0, 1]), torch.ones(1, 2)),
        ValueError,
        "idx",
    ),
    (
        "duplicate",
        lambda: lowrank.interpolation_matrix(torch.tensor([0, 0, 1, 2]), _proj),
        ValueError,
        "permutation",
    ),
    (
        "too large",
        lambda: lowrank.interpolation_matrix(torch.tensor([0, 1, 2, 4]), _proj),
        ValueError,
        "permutation",
    ),
    (
        "float idx",
        lambda: lowrank.interpolation_matrix(_idx.float(), _proj),
        TypeError,
        "idx must be a dense integer",
    ),
    (
        "bool idx",
        lambda: lowrank.interpolation_matrix(_idx > 0, _proj),
        TypeError,
        "idx must be a dense integer",
    ),
    (
        "list idx",
        lambda: lowrank.interpolation_matrix([2, 0, 1, 3], _proj),
        TypeError,
        "idx must be a tensor",
    ),
    ("proj nan", lambda: lowrank.interpolation_matrix(_idx, nan_at(_proj)), ValueError, "proj contains NaN"),
    (
        "proj complex",
        lambda: lowrank.interpolation_matrix(_idx, _proj.to(torch.complex64)),
        TypeError,
        "proj",
    ),
    (
        "proj meta",
        lambda: lowrank.interpolation_matrix(_idx, torch.empty(2, 2, device="meta")),
        ValueError,
        "proj",
    ),
    (
        "proj sparse",
        lambda: lowrank.interpolation_matrix(_idx, _proj.to_sparse()),
        TypeError,
        "proj must be a dense",
    ),
    (
        "shapes",
        lambda: lowrank.interpolation_matrix(_idx, torch.ones(2, 3)),
        ValueError,
        "inconsistent shapes",
    ),
]


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in INTERPOLATIVE_BAD], ids=[row[0] for row in INTERPOLATIVE_BAD]
)
def test_interpolative_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize("fn, error, match", [row[1:] for row in CUR_BAD], ids=[row[0] for row in CUR_BAD])
def test_cur_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize(
    "fn, error, match",
    [row[1:] for row in INTERPOLATION_MATRIX_BAD],
    ids=[row[0] for row in INTERPOLATION_MATRIX_BAD],
)
def test_interpolation_matrix_bad_input(fn, error, match):
    check_bad(fn, error, match)


def test_interpolation_matrix_accepts_int32_permutations():
    P = lowrank.interpolation_matrix(_idx.int(), _proj.double())
    assert torch.equal(P, lowrank.interpolation_matrix(_idx, _proj.double()))
    assert torch.equal(P[:, [2, 0]], torch.eye(2, dtype=torch.float64))


def test_cur_past_the_numerical_rank_does_not_amplify_rounding():
    # sigma_i = 0.8^i: numerical rank ~160 in fp64. With the default pseudo-inverse cut-off, CUR got worse
    # as k grew past ~80 (relative error 3.6e-4 at k = 150 against 8.8e-8 at k = 80). Reference: the best
    # rank-80 error (numpy SVD) and the error of the exact projection Q_C Q_C^T A Q_R Q_R^T (numpy QR).
    rng = np.random.default_rng(0)
    A = rng.standard_normal((300, 200)) @ np.diag(0.8 ** np.arange(200)) @ rng.standard_normal((200, 200))
    s = np.linalg.svd(A, compute_uv=False)
    for k in (80, 100, 150, 200):
        C, U, R, _, _ = (t.numpy() for t in lowrank.cur(torch.from_numpy(A), k, seed=0))
        err = np.linalg.norm(A - C @ U @ R) / s[0]
        Qc, _ = np.linalg.qr(C)
        Qr, _ = np.linalg.qr(R.T)
        projection = np.linalg.norm(A - Qc @ (Qc.T @ A @ Qr) @ Qr.T) / s[0]
        assert err <= max(5 * projection, 10 * np.sqrt((s[80:] ** 2).sum()) / s[0]), k


def test_oversample_accepts_numpy_integers():
    A = torch.randn(40, 30, dtype=torch.float64)
    a = lowrank.interpolative(A, 5, oversample=np.int64(6), seed=0)
    b = lowrank.interpolative(A, 5, oversample=6, seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
