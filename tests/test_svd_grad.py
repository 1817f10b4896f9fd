"""Gradients through lowrank.rsvd (a dense A that requires grad): the engine runs detached and one
differentiable Rayleigh-Ritz step gives the factors. References: the exact SVD's gradients in float64."""

from __future__ import annotations

import pytest
import torch

import lowrank


def _low_rank_plus_noise(m, n, rank, noise, batch=(), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, m, rank, dtype=torch.float64, generator=g) @ torch.randn(
        *batch, rank, n, dtype=torch.float64, generator=g
    )
    return (A + noise * torch.randn(*batch, m, n, dtype=torch.float64, generator=g)).to(dtype)


@pytest.mark.parametrize("method", ["auto", "krylov", "subspace"])
@pytest.mark.parametrize("center", [False, True])
def test_gradient_of_top_singular_values(method, center):
    """d sum(S_k) / dA = U_k V_k^T (of the centred matrix, pulled back through the centring)."""
    A = _low_rank_plus_noise(50, 35, 6, 0.01)
    X = A.clone().requires_grad_()
    result = lowrank.rsvd(X, 4, seed=1, method=method, center=center)
    result.S.sum().backward()
    Ac = A - A.mean(0) if center else A
    U, S, Vh = torch.linalg.svd(Ac, full_matrices=False)
    G = U[:, :4] @ Vh[:4]
    expected = G - G.mean(0) if center else G
    torch.testing.assert_close(X.grad, expected, rtol=0, atol=1e-8)
    # the factors are those of the call without autograd, to rounding
    plain = lowrank.rsvd(A, 4, seed=1, method=method, center=center)
    for got, want in zip(result, plain):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.S.detach(), S[:4], rtol=1e-9, atol=0)


def test_gradient_of_the_rank_k_approximation_batched_float32():
    """||U S Vh||_F^2 = sum S^2: gradient 2 A_k, per matrix of a batch, fp32 to fp32 accuracy."""
    A = _low_rank_plus_noise(60, 40, 5, 1e-3, batch=(3,), seed=2)
    X = A.float().requires_grad_()
    U, S, Vh = lowrank.rsvd(X, 5, seed=0)
    assert U.requires_grad and S.requires_grad and Vh.requires_grad
    ((U * S[..., None, :]) @ Vh).square().sum().backward()
    u, s, vh = torch.linalg.svd(A, full_matrices=False)
    expected = 2 * (u[..., :5] * s[..., None, :5]) @ vh[..., :5, :]
    scale = float(expected.abs().max())
    torch.testing.assert_close(X.grad.double(), expected, rtol=0, atol=2e-5 * scale)


def test_low_rank_factor_rsvd_gradient():
    A = _low_rank_plus_noise(40, 30, 8, 0.01, seed=3)
    X = A.clone().requires_grad_()
    B, Ah = lowrank.low_rank_factor(X, 3, method="rsvd", seed=0)
    (B @ Ah).square().sum().backward()  # ||A_3||_F^2 -> 2 A_3
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    torch.testing.assert_close(X.grad, 2 * (U[:, :3] * S[:3]) @ Vh[:3], rtol=0, atol=1e-8)


def test_no_grad_mode_and_sparse_inputs():
    A = _low_rank_plus_noise(30, 20, 4, 0.01, seed=4)
    X = A.clone().requires_grad_()
    with torch.no_grad():
        result = lowrank.rsvd(X, 3, seed=0)
    assert not any(t.requires_grad for t in result)
    torch.testing.assert_close(result.S, lowrank.rsvd(A, 3, seed=0).S, rtol=0, atol=0)
    sparse = A.to_sparse().requires_grad_()
    with pytest.raises(ValueError, match="requires grad"):
        lowrank.rsvd(sparse, 3, seed=0)
    lowrank.rsvd(sparse.detach(), 3, seed=0)  # detached: fine
