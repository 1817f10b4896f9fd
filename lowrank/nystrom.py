"""Randomized Nyström approximation of a symmetric positive semidefinite matrix (stable shifted variant)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lowrank._linop import DenseOp, SparseOp, as_linop, no_autocast
from lowrank.factor import _check_float, _check_int, _check_rank, _generator

__all__ = ["nystrom"]


def _check_symmetric(op, name: str) -> None:
    """Refuse an explicit matrix that is visibly not symmetric (relative to rounding in its dtype)."""
    eps = torch.finfo(op.dtype).eps
    # Both norms of A / max|A| in fp64: fp32 sums of squares under/overflow for entries below 1e-19 or
    # above 1e19, fp64 ones beyond 1e±154 (a gap of inf against a size of inf passed any matrix)
    if isinstance(op, DenseOp):
        A = op.A
        big = float(A.abs().amax())
        A = A.to(torch.float64) / (big if big > 0 else 1.0)
        gap = float(torch.linalg.matrix_norm(A - A.mT))
        size = float(torch.linalg.matrix_norm(A))
    elif isinstance(op, SparseOp):
        coo = op.A.to_sparse_coo().coalesce().to(torch.float64)
        big = float(coo.values().abs().max()) if coo._nnz() else 0.0
        coo = coo / (big if big > 0 else 1.0)
        gap = float((coo - coo.t()).coalesce().values().norm())
        size = float(coo.values().norm())
    else:
        return  # an implicit operator: symmetry cannot be checked cheaply
    if gap > 1e3 * eps * max(size, torch.finfo(op.dtype).tiny):
        raise ValueError(
            f"{name} must be symmetric, but ||{name} - {name}^T||_F / ||{name}||_F = {gap / size:.3g}"
        )


@no_autocast
def nystrom(
    A: Any,
    k: int,
    *,
    shift: float | str = "auto",
    oversample: int = 10,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Randomized Nyström approximation ``A ≈ U diag(L) Uᵀ`` of a symmetric positive semidefinite matrix.

    The numerically stable single-pass algorithm of Tropp, Yurtsever, Udell & Cevher (2017, "Fixed-rank
    approximation of a positive-semidefinite matrix from streaming data", NeurIPS, Algorithm 3; also Li,
    Linderman, Szlam, Stanton, Kluger & Tygert 2017): with an orthonormal test matrix Ω (n, l), form
    ``Y = A Ω`` (the only access to A), shift ``Y_ν = Y + νΩ``, factor ``Ωᵀ Y_ν = C Cᵀ`` (Cholesky),
    ``B = Y_ν C⁻ᵀ``, take the thin SVD ``B = U Σ Vᵀ`` and return ``U`` and ``max(Σ² − ν, 0)``, truncated
    to rank k. The tiny shift ν keeps the Cholesky factorisation well defined in floating point; it is
    removed again from the eigenvalues.

    Parameters
    ----------
    A : Tensor (dense or sparse), ndarray, scipy.sparse matrix, or linear operator, shape (n, n)
        Symmetric PSD (a kernel or covariance matrix, a Hessian, ``XᵀX``...). Explicit matrices are checked
        for symmetry; indefiniteness is detected on the sketch (ValueError).
    k : int
        Rank of the returned approximation, ``1 <= k <= n``.
    shift : "auto" or float
        ν; ``"auto"`` uses ``sqrt(n)·eps·‖Y‖_F`` (eps of A's dtype), as advised by Tropp et al. A float
        ``>= 0`` sets it (0: the plain Nyström formula, which can fail in floating point).
    oversample : int
        The sketch has ``l = min(n, k + oversample)`` columns; the rank-l approximation is truncated to k,
        which is much more accurate than sketching with l = k (Tropp et al. 2017, §5). 10 is a good
        default; raise it for slowly decaying spectra.
    seed : int, optional
        Seed of the test matrix.

    Returns
    -------
    U : Tensor, shape (n, k)
        Orthonormal columns (approximate eigenvectors).
    L : Tensor, shape (k,)
        Non-negative approximate eigenvalues, descending.

    Notes
    -----
    Cost: one product of A with an (n, l) block (O(n²l) dense, O(nnz·l) sparse) plus O(nl²) dense work.
    For PSD matrices the Nyström approximation is typically far more accurate than a randomized SVD with
    the same single pass (Gittens & Mahoney 2016).
    """
    op = as_linop(A, name="A", allow_batch=False)
    n, n2 = op.shape
    if n != n2:
        raise ValueError(f"A must be square (symmetric PSD), got shape {(n, n2)}")
    if op.dtype.is_complex:
        raise TypeError("A must be real (complex Hermitian input is not supported)")
    k = _check_rank(k, "k", upper=n)
    oversample = _check_int(oversample, "oversample")
    if isinstance(shift, str):
        if shift != "auto":
            raise ValueError(f"shift must be 'auto' or a non-negative float, got {shift!r}")
    else:
        try:
            shift = _check_float(shift, "shift")
        except ValueError:
            raise ValueError(f"shift must be 'auto' or a non-negative float, got {shift!r}") from None
    _check_symmetric(op, "A")

    dtype, device = op.dtype, op.device
    width = min(n, k + oversample)
    gen = _generator(seed, device)
    omega = torch.randn(n, width, dtype=dtype, device=device, generator=gen)
    omega, _ = torch.linalg.qr(omega)
    Y = op.matmul(omega)
    if not bool(torch.isfinite(Y).all()):
        raise ValueError("A contains NaN or Inf entries (A @ Omega is not finite)")
    # Nystrom is scale-equivariant: Y is divided by a power of two near its largest entry (exact) and the
    # eigenvalues multiplied back, so that the Gram, Cholesky and SVD steps work at any scale (a PSD matrix
    # of order 1e300 failed its Cholesky factorisation as "not positive semidefinite").
    largest = float(Y.abs().amax())
    if largest == 0:  # A Omega = 0: the Nystrom approximation Y (Omega^T Y)^+ Y^T is exactly zero
        return omega[:, :k].contiguous(), torch.zeros(k, dtype=dtype, device=device)
    exponent = math.frexp(largest)[1]
    if exponent:
        Y = torch.ldexp(Y, torch.tensor(-exponent, device=device))
    eps = torch.finfo(dtype).eps
    core = omega.t() @ Y
    core = 0.5 * (core + core.t())
    # Indefiniteness shows in the sketch: Omega^T A Omega must be PSD up to rounding.
    eig = torch.linalg.eigvalsh(core)
    scale = float(eig.abs().max())
    if float(eig.min()) < -1e2 * n**0.5 * eps * max(scale, torch.finfo(dtype).tiny):
        raise ValueError(
            f"A is not positive semidefinite: Omega^T A Omega has eigenvalue "
            f"{math.ldexp(float(eig.min()), exponent):.3g} "
            f"(largest magnitude {math.ldexp(scale, exponent):.3g})"
        )
    y_norm = float(torch.linalg.matrix_norm(Y, dtype=torch.float64))  # fp64: no under/overflow
    nu = n**0.5 * eps * y_norm if shift == "auto" else math.ldexp(shift, -exponent)
    for _ in range(8):
        Y_nu = Y + nu * omega
        gram = omega.t() @ Y_nu
        factor, info = torch.linalg.cholesky_ex(0.5 * (gram + gram.t()))
        if int(info) == 0:
            break
        # rounding pushed a tiny eigenvalue below zero: grow the shift (it is subtracted again below)
        nu = max(10 * nu, eps * max(scale, torch.finfo(dtype).tiny))
    else:  # pragma: no cover - only for pathological input
        raise ValueError("Cholesky factorisation of the shifted sketch failed; is A positive semidefinite?")
    B = torch.linalg.solve_triangular(factor, Y_nu.t(), upper=False).t()
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    L = (sigma.square() - nu).clamp(min=0)
    if exponent:
        L = torch.ldexp(L, torch.tensor(exponent, device=device))
    return U[:, :k].contiguous(), L[:k].contiguous()
