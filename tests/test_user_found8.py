"""Public bug reports of the libraries lowrank replaces, replayed against lowrank's math side.

Each test names the report it replays (repository, issue) and checks lowrank's equivalent call against an
independent float64 reference (NumPy's exact SVD) or the documented behaviour.
"""

import numpy as np
import pytest
import torch

import lowrank


def _decaying(m: int, n: int, rate: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    S = rate ** torch.arange(n, dtype=torch.float64)
    return U * S @ V.T, S.numpy()


# scikit-learn #11624 / #23262 (randomized_svd overflows in its power iterations on large data): the
# float64 analogue -- sums of squares leave float64's range for norms beyond ~1e154 or below ~1e-154.
# lowrank's fixed-precision mode, PCA's variance ratios and svd_error were garbage there.
@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_fixed_precision_rank_is_scale_free_in_float64(scale):
    A, S = _decaying(120, 80)
    want = lowrank.rsvd(A, 60, tol=1e-3, seed=0)
    got = lowrank.rsvd(A * scale, 60, tol=1e-3, seed=0)
    assert len(got.S) == len(want.S) < 60
    np.testing.assert_allclose(got.S.numpy() / scale, want.S.numpy(), rtol=1e-8)
    np.testing.assert_allclose(got.S[:5].numpy() / scale, S[:5], rtol=1e-10)
    residual = torch.linalg.norm(got.U * (got.S / scale) @ got.Vh - A) / torch.linalg.norm(A)
    assert residual <= 1e-3


@pytest.mark.parametrize("scale", [1e-300, 1e300])
@pytest.mark.parametrize("sparse", [False, True])
def test_pca_variance_ratio_is_scale_free_in_float64(scale, sparse):
    A, _ = _decaying(120, 80)
    X = A * scale
    ref = np.linalg.svd((A - A.mean(0)).numpy(), compute_uv=False) ** 2
    ratio = ref[:5] / ref.sum()
    got = lowrank.pca(X.to_sparse() if sparse else X, 5, seed=0, method="randomized")
    np.testing.assert_allclose(got.explained_variance_ratio.numpy(), ratio, rtol=1e-8)


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_svd_error_is_scale_free_in_float64(scale):
    A, S = _decaying(120, 80)
    r = lowrank.rsvd(A * scale, 10, seed=0)
    err = float(lowrank.svd_error(A * scale, *r, n_iter=30, seed=0))
    assert err / scale == pytest.approx(S[10], rel=1e-4)


def _rank_three_15x15() -> torch.Tensor:
    # the matrix of pytorch #49886 ("SVD backward isn't correctly defined when multiple 0 eigenvalues")
    x = torch.zeros(15, 3, dtype=torch.float64)
    for i in range(3):
        x[i, i] = i + 1
    y = torch.zeros(15, 15, dtype=torch.float64)
    y[:, :5] = x[:, :1]
    y[:, 5:10] = x[:, 1:2]
    y[:, 10:] = x[:, 2:3]
    return y


# pytorch #49886 and jax-ml/jax #2311: gradients through an SVD with repeated zero singular values were NaN.
# rsvd's documented gradient of U U^H A (exact, the subspace held fixed) was NaN for k above the rank, and
# finite garbage (up to 2.7e17) with center=True; the product U S Vh had a NaN gradient.
@pytest.mark.parametrize("k", [5, 15])
@pytest.mark.parametrize("center", [False, True])
def test_gradient_of_the_projection_at_a_rank_deficient_input(k, center):
    A = _rank_three_15x15().requires_grad_()
    U, S, Vh = lowrank.rsvd(A, k, seed=0, center=center)
    X = A - A.mean(0) if center else A
    (U @ (U.mT @ X)).sum().backward()
    P = U.detach() @ U.detach().mT
    want = P @ torch.ones(15, 15, dtype=torch.float64)
    if center:
        want = want - want.mean(0)
    torch.testing.assert_close(A.grad, want, rtol=0, atol=1e-12)

    A.grad = None
    U, S, Vh = lowrank.rsvd(A, k, seed=0, center=center)
    r = 2 if center else 3  # centring removes one direction
    (S[:r].sum() + (U * S @ Vh).sum()).backward()
    assert bool(torch.isfinite(A.grad).all())
    # sum of the nonzero singular values: U_r V_r^T of the exact SVD (float64 reference)
    A.grad = None
    U, S, Vh = lowrank.rsvd(A, k, seed=0, center=center)
    S[:r].sum().backward()
    Ue, _, Vhe = np.linalg.svd(X.detach().numpy())
    want = Ue[:, :r] @ Vhe[:r]
    if center:
        want = want - want.mean(0)
    np.testing.assert_allclose(A.grad.numpy(), want, atol=1e-12)


def test_gradient_with_repeated_nonzero_singular_values_is_finite():
    # identity-like spectra (svdlibc #3 "3x3 identity returns erroneous results", sparsesvd #3 diag(a,b,b,a))
    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64, generator=g))
    S0 = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.25, 0.1, 0.0], dtype=torch.float64)
    A = (Q1[:, :9] * S0 @ Q2.T).requires_grad_()
    U, S, Vh = lowrank.rsvd(A, 6, seed=0)
    np.testing.assert_allclose(S.detach().numpy(), S0[:6].numpy(), rtol=1e-12)
    (U @ (U.mT @ A)).square().sum().backward()
    Ud = U.detach()
    G = 2 * (Ud @ Ud.T @ A.detach())
    torch.testing.assert_close(A.grad, Ud @ Ud.T @ G, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradient_matches_torch_where_the_spectrum_is_simple(dtype):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 20, 8, dtype=dtype, generator=g)
    w = torch.randn(20, 4, dtype=torch.float64, generator=g)

    def loss(U, S, Vh):
        return (U.abs().square() * w).sum() + S.sum() + (U * S[..., None, :] @ Vh).abs().sum()

    Ar = A.clone().requires_grad_()
    loss(*lowrank.rsvd(Ar, 4, seed=0)).backward()
    At = A.clone().requires_grad_()
    # the reference: the same Rayleigh-Ritz step through torch.linalg.svd (U of the engine held fixed)
    Q = lowrank.rsvd(A, 4, seed=0).U
    Ub, S, Vh = torch.linalg.svd(Q.mH @ At, full_matrices=False)
    loss(Q @ Ub, S, Vh).backward()
    torch.testing.assert_close(Ar.grad, At.grad, rtol=1e-9, atol=1e-12)


def test_exact_svd_gradient_of_the_reconstruction_at_a_rank_deficient_input():
    # pytorch #49886 verbatim: U S V^T of the full SVD of a rank-3 15x15 matrix is A itself, so the gradient
    # of its sum is all ones; torch.svd gave NaN
    A = _rank_three_15x15().requires_grad_()
    U, S, Vh = lowrank.svd(A)
    (U * S @ Vh).sum().backward()
    torch.testing.assert_close(A.grad, torch.ones_like(A), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (2, 6, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_exact_svd_gradient_matches_torch_where_the_spectrum_is_simple(shape, dtype):
    g = torch.Generator().manual_seed(2)
    B = torch.randn(*shape, dtype=dtype, generator=g)
    w = torch.randn(shape[-2], 2, dtype=torch.float64, generator=g)

    def loss(U, S, Vh):
        vectors = (U.abs() ** 2 * w).sum() + (Vh.abs() ** 3).sum()
        return vectors + S.sum() + (U * S[..., None, :] @ Vh).abs().sum()

    X = B.clone().requires_grad_()
    loss(*lowrank.svd(X, 2)).backward()
    Y = B.clone().requires_grad_()
    u, s, vh = torch.linalg.svd(Y, full_matrices=False)
    loss(u[..., :2], s[..., :2], vh[..., :2, :]).backward()
    torch.testing.assert_close(X.grad, Y.grad, rtol=1e-9, atol=1e-12)


# scipy #14784 / #10974 (svds with LOBPCG silently wrong on a matrix with many zero singular values): the
# fixed-precision mode on an exactly low-rank float64 matrix, tol below what ||A||^2 - ||B||^2 resolves.
# It drew blocks of rounding noise past the rank: error 7.7e-6 (not 1e-15) and U orthonormal to 5e-10.
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("tol", [1e-8, 1e-12])
def test_fixed_precision_on_an_exactly_low_rank_matrix(dtype, tol):
    g = torch.Generator().manual_seed(0)
    L = torch.randn(300, 40, dtype=dtype, generator=g) @ torch.randn(40, 300, dtype=dtype, generator=g)
    r = lowrank.rsvd(L, 300, tol=tol, seed=0)
    assert len(r.S) == 40
    assert torch.linalg.norm(r.U * r.S @ r.Vh - L) <= 1e-13 * torch.linalg.norm(L)
    eye = torch.eye(40, dtype=dtype)
    torch.testing.assert_close(r.U.mH @ r.U, eye, rtol=0, atol=1e-13)
    np.testing.assert_allclose(r.S.numpy(), np.linalg.svd(L.numpy(), compute_uv=False)[:40], rtol=1e-12)


def test_fixed_precision_below_the_rounding_floor_returns_the_smallest_rank_reaching_it():
    A, S = _decaying(300, 200)
    floor = (16 * np.finfo(np.float64).eps) ** 0.5
    smallest = int(np.argmax(S <= floor * np.linalg.norm(S)))  # ||A - A_r||_F = S_r ||A||_F here (geometric)
    r = lowrank.rsvd(A, 200, tol=1e-12, seed=0)  # was the cap (here: a full SVD's worth of blocks)
    assert len(r.S) <= smallest + 2
    assert torch.linalg.norm(r.U * r.S @ r.Vh - A) <= 2 * floor * torch.linalg.norm(A)


@pytest.mark.parametrize("scale", [1e-300, 1e300])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_distributed_pca_variance_ratio_is_scale_free_in_float64(scale, method):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed without a process group in this process")
    import lowrank.distributed as ld

    X = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = lowrank.pca(X, 3, method="exact").explained_variance_ratio
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for data in (X * scale, (X * scale).to_sparse()):
            m = method if data.layout == torch.strided else "randomized"
            got = ld.pca(data, 3, method=m, seed=0)
            torch.testing.assert_close(got.explained_variance_ratio, want, rtol=1e-10, atol=0)
    finally:
        dist.destroy_process_group()
