"""Tall-skinny QR by Cholesky: CholeskyQR2, shifted CholeskyQR3, Householder fallback.

CholeskyQR computes ``G = X^H X``, ``R = chol(G)`` and ``Q = X R^{-1}``: two GEMM-like passes over ``X``
(``2 m n^2`` flops, all level-3 BLAS), much faster than Householder QR on GPUs and on many-core CPUs, but
its orthogonality error grows like ``u * kappa(X)^2``. Repeating it (CholeskyQR2, Fukaya et al. 2014;
Yamamoto et al. 2015) gives an ``O(u)`` orthogonality error for ``kappa(X) <~ u^{-1/2}``; a first pass on
the shifted Gram matrix ``G + s I`` with ``s = 11 (m n + n (n + 1)) u ||X||_2^2`` (shifted CholeskyQR3,
Fukaya, Kannan, Nakatsukasa, Zhang & Kawamura 2020) extends that to ``kappa(X) <~ u^{-1}``.

References
----------
T. Fukaya, Y. Nakatsukasa, Y. Yanagisawa, Y. Yamamoto, "CholeskyQR2: a simple and communication-avoiding
algorithm for computing a tall-skinny QR factorization on a large-scale parallel system", ScalA 2014.
Y. Yamamoto, Y. Nakatsukasa, Y. Yanagisawa, T. Fukaya, "Roundoff error analysis of the CholeskyQR2
algorithm", ETNA 44 (2015).
T. Fukaya, R. Kannan, Y. Nakatsukasa, Y. Yamamoto, Y. Yanagisawa, "Shifted Cholesky QR for computing the
QR factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 42(1) (2020).
"""

from __future__ import annotations

import math

import torch

from lowrank._linop import check_tensor, compute_dtype, no_autocast, python_number

__all__ = ["cholesky_qr"]


def _adjoint(X: torch.Tensor) -> torch.Tensor:
    return X.mH if X.is_complex() else X.mT


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def matmul_like(X: torch.Tensor, M: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``X @ M`` stored like ``like``: column-major when ``like`` is, so that elementwise updates between
    the two (``Y - Q C``) stream through memory instead of striding (measured 5x slower on CPU)."""
    if like.mT.is_contiguous() and not like.is_contiguous():
        return (M.mT @ X.mT).mT
    return X @ M


def matmul_rows_inplace(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``X <- X @ M`` for a 2-D ``X`` and a square ``M``, by blocks of rows through one small buffer
    (at most 1 MiB): a long ``X`` (30000 x 40) then costs no fresh pages, which on a VM cost more than
    the GEMM (about 2 us per 4 KiB page). Returns ``X``."""
    rows, cols = X.shape
    step = max(64, (1 << 18) // max(cols, 1))
    column_major = X.mT.is_contiguous() and not X.is_contiguous()
    if rows <= step:  # the product in X's own layout: a straight copy back, not a transposing one
        return X.copy_(matmul_like(X, M, X))
    if column_major:  # a row block of a column-major X: its product as the (cols, r) row-major M^T X^T
        for start in range(0, rows, step):
            block = X[start : start + step]
            block.copy_((M.mT @ block.mT).mT)
        return X
    buffer = torch.empty(step, cols, dtype=X.dtype, device=X.device)
    for start in range(0, rows, step):
        block = X[start : start + step]
        out = buffer[: block.shape[0]]
        torch.matmul(block, M, out=out)
        block.copy_(out)
    return X


def fukaya_shift(X: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """The shift ``11 (m n + n (n + 1)) u ||X||^2`` of Fukaya et al. (2020), ``||X||_F`` bounding ``||X||_2``.

    Returns a tensor of shape ``X.shape[:-2]`` (no host synchronisation).
    """
    m, n = X.shape[-2], X.shape[-1]
    if gram is not None:
        fro_sq = torch.diagonal(gram, dim1=-2, dim2=-1).real.sum(-1)
    else:
        fro_sq = torch.linalg.vector_norm(X, dim=(-2, -1)).square()
    return 11.0 * (m * n + n * (n + 1)) * _unit_roundoff(X.dtype) * fro_sq


def cholqr_pass(
    X: torch.Tensor,
    shift: torch.Tensor | float | None = None,
    *,
    by_inverse: bool = False,
    inplace: bool = False,
):
    """One CholeskyQR pass: returns ``(Q, R, info)`` with ``X = Q R`` (no host synchronisation).

    ``shift`` (scalar or per-batch tensor) is added to the Gram diagonal. ``info > 0`` where the
    Cholesky factorization broke down (then ``Q``/``R`` are meaningless). ``by_inverse=True`` applies
    ``R^{-1}`` as a GEMM with the explicit (small) inverse instead of a triangular solve: use it only when
    ``X`` is known to be well conditioned (e.g. already LU-normalised or nearly orthonormal), where the
    two agree to rounding. ``inplace=True`` (with ``by_inverse``, 2-D ``X``): ``Q`` overwrites ``X`` (see
    :func:`matmul_rows_inplace`).
    """
    gram = _adjoint(X) @ X
    if shift is not None:
        shift_t = torch.as_tensor(shift, dtype=gram.real.dtype, device=gram.device)
        gram = gram + shift_t[..., None, None] * torch.eye(
            gram.shape[-1], dtype=gram.dtype, device=gram.device
        )
    lower, info = torch.linalg.cholesky_ex(gram)
    upper = _adjoint(lower)
    if by_inverse:
        # X R^{-1} = X (L^{-1})^H: one small triangular inverse and a GEMM, faster than a triangular
        # solve with a tall right-hand side (measured 2x on CPU); accurate when R is well conditioned
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        inverse = _adjoint(torch.linalg.solve_triangular(lower, eye, upper=False))
        Q = matmul_rows_inplace(X, inverse) if inplace and X.dim() == 2 else matmul_like(X, inverse, X)
    else:
        Q = torch.linalg.solve_triangular(upper, X, upper=True, left=False)
    return Q, upper, info


def orthonormalize(Y: torch.Tensor, scheme: str = "qr", *, final: bool = True) -> torch.Tensor:
    """A basis of ``range(Y)`` without host synchronisation; used inside the SVD iterations.

    ``scheme``:

    * ``"qr"``: Householder QR (``torch.linalg.qr``): orthonormal, robust, slowest on GPUs.
    * ``"cholqr"``: shifted CholeskyQR followed by one more shifted pass (two Gram GEMMs + two triangular
      solves). Never breaks down (the shift keeps the Gram matrix positive definite), spans ``range(Y)``
      and is well conditioned, but is only *near*-orthonormal when ``Y`` is ill-conditioned in
      fp32; fine for power-iteration steps, not for a final basis.
    * ``"lu"``: ``Y U^{-1}`` with ``Y = P L U`` (LU with partial pivoting), i.e. ``P L``: unit lower
      trapezoidal, well conditioned in practice, not orthonormal (the choice of scikit-learn and fbpca for
      power iterations). The permutation is never formed.
    * ``"none"``: ``Y`` divided by its largest column norm (only safe for one or two steps).

    ``final`` is ignored except by ``"cholqr"``, which then adds a third, unshifted pass.
    """
    if scheme == "qr":
        return torch.linalg.qr(Y).Q
    if scheme == "cholqr":
        Q, _, _ = cholqr_pass(Y, fukaya_shift(Y))
        Q, _, _ = cholqr_pass(Q, fukaya_shift(Q))
        if final:
            Q, _, _ = cholqr_pass(Q)
        return Q
    if scheme == "lu":
        LU, _, _ = torch.linalg.lu_factor_ex(Y)
        n = Y.shape[-1]
        upper = torch.triu(LU[..., :n, :])
        # guard (numerically) singular pivots of a rank-deficient Y without synchronising. The threshold
        # is relative to the largest pivot (sqrt(tiny) of it: 1e-19 in fp32), never absolute: an absolute
        # one replaced every pivot of a matrix with norm below ~1e-19 by 1 and lost 30-60% of its
        # singular values. A guarded pivot becomes the largest one, so the column keeps A's scale.
        diag = torch.diagonal(upper, dim1=-2, dim2=-1)
        big = diag.abs().amax(-1, keepdim=True)
        floor = big * torch.finfo(Y.dtype).tiny ** 0.5
        fill = torch.where(big > 0, big, torch.ones_like(big)).to(diag.dtype).expand_as(diag)
        diag.copy_(torch.where(diag.abs() > floor, diag, fill))
        return torch.linalg.solve_triangular(upper, Y, upper=True, left=False)
    if scheme == "none":
        scale = torch.linalg.vector_norm(Y, dim=-2, keepdim=True).amax(-1, keepdim=True)
        return Y / scale.clamp_min(torch.finfo(Y.dtype).tiny)
    raise ValueError(f"unknown orthonormalization scheme {scheme!r}")


def _householder(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(X)
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    sign = torch.where(diag.real < 0, -1.0, 1.0).to(X.dtype)
    return Q * sign[..., None, :], R * sign[..., :, None]


@no_autocast
def cholesky_qr(
    X: torch.Tensor, *, passes: int = 2, shift: bool | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Thin QR factorization ``X = Q R`` of a tall matrix by repeated Cholesky QR.

    Parameters
    ----------
    X : Tensor, shape (..., m, n), m >= n
        Floating dtype (fp16/bf16 are computed and returned in fp32); batched inputs factor each matrix.
    passes : int, default 2
        Plain CholeskyQR passes (2 = CholeskyQR2, orthogonal to working precision for
        ``kappa(X) <~ u^{-1/2}``: about 1e8 in fp64, 4e3 in fp32).
    shift : None, bool or float, default None
        ``None``: automatic; plain CholeskyQR2, and if the first Cholesky factorization breaks down or
        the matrix looks too ill conditioned, shifted CholeskyQR3 (a shifted pass, then ``passes`` plain
        ones; Fukaya et al. 2020), for ``kappa(X)`` up to about ``u^{-1}``. ``True``: always start with
        the shifted pass. ``False``: never shift. A float: that shift is added to the first Gram
        matrix's diagonal.

    Returns
    -------
    Q : Tensor, shape (..., m, n)
        Orthonormal columns (``||Q^H Q - I|| = O(u)`` in the ranges above).
    R : Tensor, shape (..., n, n)
        Upper triangular with a positive diagonal.

    Notes
    -----
    If a Cholesky factorization still breaks down (``X`` numerically rank deficient), the result falls
    back to Householder QR (``torch.linalg.qr``, signs normalised so that ``diag(R) >= 0``). That check
    synchronises with the device once; the SVD iterations use a synchronisation-free variant.

    Cost: ``passes`` (+1 when shifted) times ``2 m n^2`` flops for the Gram matrices and as many for the
    triangular solves, all level-3 BLAS; ``O(n^3)`` for the Cholesky factorizations.

    Complex inputs give unitary ``Q`` (``X^H X`` Gram matrices).
    """
    check_tensor(X, "X")
    if X.dim() < 2:
        raise ValueError(f"X must have shape (..., m, n), got {tuple(X.shape)}")
    m, n = X.shape[-2], X.shape[-1]
    if m == 0 or n == 0:
        raise ValueError(f"X has an empty dimension (shape {tuple(X.shape)})")
    if m < n:
        raise ValueError(f"X must be tall (m >= n) for a thin QR, got shape {tuple(X.shape)}")
    if not (X.dtype.is_floating_point or X.dtype.is_complex):
        raise TypeError(f"X must have a floating dtype, got {X.dtype}")
    passes, shift = python_number(passes), python_number(shift)
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive integer, got {passes!r}")
    if not (shift is None or isinstance(shift, (bool, int, float))):
        raise TypeError(f"shift must be None, a bool or a float, got {type(shift).__name__}")
    if not isinstance(shift, bool) and isinstance(shift, (int, float)) and not 0 <= shift < math.inf:
        raise ValueError(f"shift must be >= 0 and finite, got {shift}")
    if compute_dtype(X.dtype, "X") != X.dtype:  # fp16/bf16/fp8 -> fp32, complex32 -> complex64
        X = X.to(compute_dtype(X.dtype, "X"))
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or Inf entries")
    if X.numel() == 0:  # an empty batch of matrices: empty factors of the right shapes
        return _householder(X)

    u = _unit_roundoff(X.dtype)
    use_shift = shift is True or (not isinstance(shift, bool) and isinstance(shift, (int, float)))
    if use_shift:
        value = fukaya_shift(X) if shift is True else float(shift)
        Q, R, info = cholqr_pass(X, value)
        plain = passes
    else:
        Q, R, info = cholqr_pass(X)
        plain = passes - 1
        if shift is None:
            # kappa(R) >= max diag / min diag; CholeskyQR2 needs kappa(X) well below u^{-1/2}
            diag = torch.diagonal(R, dim1=-2, dim2=-1).abs()
            ratio = diag.amax(-1) / diag.amin(-1).clamp_min(torch.finfo(X.dtype).tiny)
            if bool((info > 0).any() | ~torch.isfinite(Q).all() | (ratio > 0.1 / u**0.5).any()):
                Q, R, info = cholqr_pass(X, fukaya_shift(X))
                plain = passes
    for _ in range(plain):
        Q, R_next, info_next = cholqr_pass(Q)
        R = R_next @ R
        info = torch.maximum(info, info_next)
    ok = bool((info == 0).all() & torch.isfinite(Q).all())
    if ok:
        # a last check that costs nothing extra on small n: the pass should have made Q orthonormal
        err = (_adjoint(Q) @ Q - torch.eye(n, dtype=Q.dtype, device=Q.device)).abs().amax()
        ok = bool(err < max(1e3 * n * u, 10 * u**0.5))
    if not ok:
        return _householder(X)
    return Q, R
