"""Truncated and randomized SVD: ``svd``, ``rsvd`` (subspace iteration, block Krylov, fixed precision),
``svd_error``.

Every input goes through :func:`lowrank._linop.as_linop`, so dense (also batched), ``torch.sparse``, NumPy,
``scipy.sparse`` and implicit linear operators all work, on any device torch supports. Inside the
iterations there is no host synchronisation (one check for NaN/Inf after the first product; the
fixed-precision mode synchronises once per block to decide whether to stop).

References
----------
N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic algorithms for
constructing approximate matrix decompositions", SIAM Review 53(2), 2011.
C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster approximate singular value
decomposition", NeurIPS 2015.
W. Yu, Y. Gu, Y. Li, "Efficient randomized algorithms for the fixed-precision low-rank matrix
approximation", SIAM J. Matrix Anal. Appl. 39(3), 2018 (randQB_EI).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from lowrank._linop import (
    CenteredOp,
    DenseOp,
    LinOp,
    SparseOp,
    TransposedOp,
    as_linop,
    check_seed,
    check_tensor,
    no_autocast,
    python_number,
    rescale_extreme,
    times_power_of_two,
)
from lowrank.qr import cholqr_pass, matmul_like, matmul_rows_inplace, orthonormalize

__all__ = ["SVDResult", "rsvd", "svd", "svd_error"]

_METHODS = ("auto", "subspace", "krylov")


class SVDResult(NamedTuple):
    """``A ~= U @ diag(S) @ Vh`` (the ``torch.linalg.svd`` convention).

    Attributes
    ----------
    U : Tensor, shape (..., m, k)
        Left singular vectors (orthonormal columns).
    S : Tensor, shape (..., k)
        Singular values, descending.
    Vh : Tensor, shape (..., k, n)
        Right singular vectors as rows.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


# --------------------------------------------------------------------------------------------- helpers


def _adjoint(X: torch.Tensor) -> torch.Tensor:
    return X.mH if X.is_complex() else X.mT


def _flip_signs(
    U: torch.Tensor, Vh: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: the largest-magnitude entry of each left vector is real positive (svd_flip).

    Real CPU tensors find the pivot's sign from the column maxima and minima (value reductions, no
    ``|U|`` temporary and no index search: on a long 30000 x 40 factor, 0.2-1.7 ms against 2.3 ms for
    ``argmax(|U|)`` plus a fresh buffer); only when a column's largest and smallest entries tie in
    magnitude is the first of them looked up, as ``argmax(|U|)`` does. ``inplace=True`` scales the
    given tensors (only for tensors the caller owns, outside autograd).
    """
    if U.is_complex():
        idx = U.abs().argmax(dim=-2, keepdim=True)
        pivot = torch.gather(U, -2, idx)  # (..., 1, k)
        phase = pivot / pivot.abs().clamp_min(torch.finfo(U.real.dtype).tiny)
        phase = torch.where(pivot.abs() > 0, phase, torch.ones_like(phase))
        return U * phase.conj(), Vh * phase.mT
    negative = None
    if U.device.type == "cpu" and U.numel():
        hi = U.amax(dim=-2, keepdim=True)
        lo = U.amin(dim=-2, keepdim=True)
        if not bool(((-lo == hi) & (hi > 0)).any()):
            negative = -lo > hi
    if negative is None:
        idx = U.abs().argmax(dim=-2, keepdim=True)
        negative = torch.gather(U, -2, idx) < 0
    sign = torch.where(negative, -1.0, 1.0).to(U.dtype)
    if inplace and not (U.requires_grad or Vh.requires_grad):
        return U.mul_(sign), Vh.mul_(sign.mT)
    return U * sign, Vh * sign.mT


def _check_k(k: Any, kmax: int, name: str = "k") -> int:
    k = python_number(k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"{name} must be >= 1, got {k}")
    if k > kmax:
        raise ValueError(f"{name}={k} exceeds min(m, n)={kmax}")
    return k


def _check_nonneg_int(value: Any, name: str) -> int:
    value = python_number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _generator(seed: Any, device: torch.device) -> torch.Generator:
    seed = check_seed(seed)
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _norm64(X: torch.Tensor, dim: Any = None, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm accumulated in fp64 (complex128), returned as fp64: an fp32 sum of squares under- or
    overflows for entries below ~1e-19 or above ~1e19, which made results depend on the scale of A."""
    wide = torch.complex128 if X.is_complex() else torch.float64
    norm = torch.linalg.vector_norm(X, dim=dim, keepdim=keepdim, dtype=wide)
    if X.dtype not in (torch.float64, torch.complex128) or X.numel() == 0:
        return norm  # narrower entries square within fp64's range
    if bool(((norm > 2.0**-450) & (norm < 2.0**450)).all()):
        return norm
    # fp64 squares under- or overflow too (norms below ~1e-154 or above ~1e154: a vector of norm 1e-300 had
    # norm 0): redo the norms out of that range on the entries divided by a power of two near their largest
    big = torch.linalg.vector_norm(X, ord=float("inf"), dim=dim, keepdim=True, dtype=wide)
    scale = torch.ldexp(
        torch.ones_like(big), -torch.frexp(torch.where(big > 0, big, torch.ones_like(big)))[1]
    )
    scaled = torch.linalg.vector_norm(X * scale, dim=dim, keepdim=True, dtype=wide) / scale
    if not keepdim:
        scaled = scaled.reshape(norm.shape)
    return torch.where(torch.isfinite(scaled), scaled, norm)


def _gaussian(op: LinOp, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*op.batch_shape, rows, cols, dtype=op.dtype, device=op.device, generator=gen)


def _check_product(Y: torch.Tensor) -> None:
    """One synchronisation per call: NaN/Inf in A shows in its first product with a Gaussian matrix.

    fp32 (and lower) blocks are checked through their sum in fp64, one read of ``Y`` instead of four
    (a sum of finite fp32 numbers cannot overflow in fp64; NaN and Inf propagate into it).
    """
    if Y.dtype in (torch.float32, torch.float16, torch.bfloat16):
        finite = torch.isfinite(Y.sum(dtype=torch.float64))
    else:
        finite = torch.isfinite(Y).all()
    if not bool(finite):
        raise ValueError("A contains NaN or Inf entries (or its products overflow)")


def _project_out(Y: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """``Y - B B^H Y`` for ``B = [blocks...]`` (orthonormal), block by block: no concatenated copy of B."""
    coefs = [_adjoint(Q) @ Y for Q in blocks]
    out = None
    for Q, C in zip(blocks, coefs):
        update = matmul_like(Q, C, Y)
        out = Y - update if out is None else out.sub_(update)  # in place after the first: no new pages
    return Y if out is None else out


def _basis(
    Y: torch.Tensor,
    robust: bool,
    against: list[torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal basis of ``range(Y)`` (minus the span of the orthonormal blocks ``against``, when given)
    and a breakdown flag (a tensor, never synchronised here).

    Fast path on CUDA (and other non-CPU devices): LU normalisation ``Y U^{-1} = P L`` (well conditioned
    whatever ``kappa(Y)``; as accurate a span as ``Y`` itself), projection against ``against`` (the second
    half of block classical Gram-Schmidt with reorthogonalisation; the caller did the first before the
    LU), then CholeskyQR2 with the small ``R^{-1}`` applied by GEMM, all level-3 BLAS. It breaks down only
    when ``Y`` is numerically rank deficient; the caller then reruns with ``robust=True``. On CPU:
    CholeskyQR (or Householder QR), projection, then CholeskyQR where Kahan's test passes, else
    Householder QR (see the comment in the code). ``out`` (``Y``'s shape, column- or row-major): where the
    basis is written when the CholeskyQR path can; the returned ``Q`` is ``out`` then, else a fresh tensor.
    """
    if robust:
        if against:
            Y = _project_out(_project_out(Y, against), against)
        return torch.linalg.qr(Y).Q, None
    if Y.device.type == "cpu":
        # LAPACK's Householder QR measured 1.5-1.9x faster than LU + CholeskyQR2 on CPU (blocks of
        # 4096-20000 rows, 70-150 columns, 1 and 2 threads) and never breaks down. With ``against``:
        # block Gram-Schmidt twice (the caller projected once), each time followed by a Householder QR, so
        # that a block that was numerically inside the previous span (fast-decaying spectra) comes out as
        # fresh directions orthogonal to it, never as a breakdown and a rerun. "Twice is enough" fails when
        # the whole block was numerically inside the span (spectrum at rounding level within the Krylov
        # width; seen on the short side of wide fp32 matrices): each residual is then rounding noise whose
        # normalised directions lie partly in the span again (measured: cross products 0.4, singular
        # values up to 2.4x too large). So the projection is repeated, at most 3 more times, until
        # Kahan's test holds on the diagonal of R (every column kept >= 1/sqrt(2) of its norm); on CPU
        # the check costs nothing, and blocks with fresh directions pass it the first time. When the
        # first projected block passes the test (the common case), one CholeskyQR pass replaces its
        # Householder QR (see _cholqr_kept). A block without ``against`` keeps Householder QR (CholeskyQR2
        # of a 1500 x 40 block measured no faster: 0.63-0.97 against 0.45-0.70 ms, 1 and 2 threads)
        if not against:
            return torch.linalg.qr(Y).Q, None
        Q = _normalize_block(Y)
        if Q is None:
            Q = torch.linalg.qr(Y).Q
        fast = _cholqr_kept(_project_out(Q, against), out)
        if fast is not None:
            return fast, None
        for _ in range(4):
            Q, R = torch.linalg.qr(_project_out(Q, against))
            if bool((torch.diagonal(R, dim1=-2, dim2=-1).abs() >= 0.7071).all()):
                break
        return Q, None
    Y = orthonormalize(Y, "lu")
    if against:
        Y = _project_out(Y, against)
    Q, _, info1 = cholqr_pass(Y, by_inverse=True)
    Q, R, info2 = cholqr_pass(Q, by_inverse=True)
    diag = torch.diagonal(R, dim1=-2, dim2=-1).real
    bad = (info1 > 0) | (info2 > 0) | ((diag - 1).abs() > 0.5).any(-1) | ~torch.isfinite(diag).all(-1)
    return Q, bad


def _cholqr_step(
    Y: torch.Tensor, accept: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``Y R^{-1}`` with ``R`` the Cholesky factor of ``Y^T Y`` formed in fp32 and factored in fp64 (one
    CholeskyQR pass, ``R^{-1}`` applied by GEMM) for a real 2-D fp32 ``Y`` on CPU when
    ``accept(diag(R))`` holds; ``None`` otherwise. Written into ``out`` when given and in ``Y``'s layout
    (column- or row-major), else a fresh tensor in that layout."""
    if Y.dtype != torch.float32 or Y.device.type != "cpu" or Y.dim() != 2:
        return None
    lower, info = torch.linalg.cholesky_ex((Y.mT @ Y).to(torch.float64))
    if not bool((info == 0) & accept(torch.diagonal(lower))):
        return None
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype)
    inverse = torch.linalg.solve_triangular(lower, eye, upper=False).mT.to(Y.dtype)
    if out is not None and out.mT.is_contiguous() and Y.mT.is_contiguous():
        torch.mm(inverse.mT, Y.mT, out=out.mT)
        return out
    if out is not None and out.stride(-1) == 1 and Y.stride(-1) == 1:
        torch.mm(Y, inverse, out=out)
        return out
    return matmul_like(Y, inverse, Y)


def _normalize_block(Y: torch.Tensor) -> torch.Tensor | None:
    """``Y R^{-1}`` (:func:`_cholqr_step`) when ``R`` is well conditioned (diagonal within a factor 1e3,
    which also excludes a Gram that overflowed); ``None`` otherwise (the caller then runs Householder QR).

    The first orthonormalisation of a projected Krylov block in :func:`_basis`: only its span and a near
    orthonormality matter there (the projection and the Kahan test that follow make the basis). With
    ``kappa(R) <= 1e3`` the columns are orthonormal to ``u kappa^2 <~ 0.06``, so the test still reads how
    much of each column the projection kept; a block that fails it is redone from a Householder basis
    anyway. Measured on 1500 x 40 blocks (1 thread, loaded machine): 0.37 ms against 0.74 ms for
    ``torch.linalg.qr``.
    """
    return _cholqr_step(Y, lambda diag: diag.amin() * 1e3 >= diag.amax())


def _cholqr_kept(P: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``P R^{-1}`` (:func:`_cholqr_step`, into ``out`` when given) for the projected block ``P`` of
    :func:`_basis` (its columns had unit norm before the projection) when every column kept at least
    ``1/sqrt(2)`` of its norm (Kahan's test on the diagonal of ``R``); ``None`` otherwise (the caller then
    runs the Householder loop).

    ``P`` is the second projection of a block already orthonormalised once: its columns are nearly
    orthonormal and the test bounds how far they moved, so ``kappa(P)`` is small and one pass gives an
    orthonormal basis to ``O(u kappa^2)``, like Householder QR, with the same span. Measured on 1500 x 40
    blocks (quiet, medians of 300): 0.35-0.46 / 0.31-0.39 ms at 1 / 2 threads against 0.45-0.70 /
    0.54-0.69 ms for ``torch.linalg.qr``; with the projections, a whole block 1.67 -> 1.30 ms at 1 thread
    and 1.11 -> 0.89 ms at 2 (against 120 columns, loaded).
    """
    return _cholqr_step(P, lambda diag: diag.amin() >= 0.7071, out)


def _any_bad(flags: list) -> torch.Tensor | None:
    flags = [f for f in flags if f is not None]
    if not flags:
        return None
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out.any()


def _ritz(
    Q: torch.Tensor | list[torch.Tensor],
    W: torch.Tensor | list[torch.Tensor],
    k: int,
    robust: bool,
    flags: list,
    scale: torch.Tensor | None = None,
) -> SVDResult:
    """Rayleigh-Ritz: ``A ~= Q Q^H A = Q W^H`` with ``W = A^H Q`` (given divided by ``scale`` when that is
    not ``None``: the singular values are multiplied back); SVD of the small ``W``; top k.

    ``Q`` and ``W`` may be lists of column blocks (``Q = [Q_0, Q_1, ...]``): the tall basis is then never
    concatenated. fp32 (and fp16/bf16 computed in fp32): eigen-decomposition of the ``s x s`` Gram matrix
    ``W^H W`` formed in fp64 (exact products of fp32 numbers, so squaring the conditioning costs nothing
    at fp32 accuracy), ``V = W Z S^{-1}`` in fp32 made orthonormal by one CholeskyQR pass (its
    orthogonality error, about ``u sigma_1 / sigma_k``, is then ``O(u)``): measured 2x faster than an
    LU + CholeskyQR2 reduction of ``W`` and 1.4x faster than ``torch.linalg.svd(W)`` for ``W`` of
    4096 x 160 on CPU. Other dtypes: ``torch.linalg.svd(W)``.
    """
    Q_blocks = Q if isinstance(Q, list) else [Q]
    W = _cat_columns(W) if isinstance(W, list) else W
    fast = None if robust else _ritz_fp32(W, k, flags)
    if fast is not None:
        Zk, S, Vh = fast
    elif W.dtype == torch.float32 and not robust:
        evals, Z = torch.linalg.eigh(_gram64(W))  # ascending
        Zk = Z[..., :, -k:].flip(-1)
        S = evals[..., -k:].flip(-1).clamp_min(0).sqrt()
        inv = torch.where(S > 0, 1 / S, torch.zeros_like(S))
        V, _, info = cholqr_pass(matmul_like(W, (Zk * inv[..., None, :]).to(W.dtype), W), by_inverse=True)
        flags.append(info > 0)
        Vh = _adjoint(V)
        S = S.to(W.dtype)
        Zk = Zk.to(W.dtype)
    else:
        Uw, S, Vwh = torch.linalg.svd(W, full_matrices=False)
        Zk = _adjoint(Vwh[..., :k, :])
        Vh = _adjoint(Uw[..., :, :k])
        S = S[..., :k]
    if scale is not None:  # W was given divided by ``scale``
        S = S * scale[..., 0].to(S.dtype)
    basis = _cat_columns(Q_blocks)
    U = matmul_like(basis, Zk, basis)
    U, Vh = _flip_signs(U, Vh, inplace=True)
    return SVDResult(U, S, Vh)


#: smallest ``lambda_k / lambda_1`` of the fp32 Gram accepted by :func:`_ritz_fp32`
_FP32_GRAM_MIN_RATIO = 1e-4


def _ritz_fp32(
    W: torch.Tensor, k: int, flags: list
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(Z_k, S, V^H)`` of the Rayleigh-Ritz step from the Gram ``W^T W`` formed and decomposed in fp32,
    for real fp32 2-D ``W`` on CPU whose top-k Ritz values are well above its rounding; ``None`` otherwise
    (the caller then forms the Gram in fp64).

    The fp32 Gram's entries carry an error of about ``u sigma_1^2``: with ``lambda_k >= 1e-4 lambda_1``
    (``sigma_k >= sigma_1 / 100``) its eigenvectors select the top-k subspace well (the captured energy
    is second order in their error), but its eigenvalues would be off by up to ~1e-3 relative, so ``S``
    is not taken from them: ``V' = W Z_k``, ``S`` = the column norms of ``V'`` (accumulated in fp64,
    the Rayleigh quotients: as accurate as the fp64 path's), then ``V = V' S^{-1}`` made orthonormal by
    one CholeskyQR pass, ``S`` times its diagonal, the triplets sorted by ``S``. Measured on the 1500 x 1500
    narrow-branch case (``W`` of 1500 x 160, 1 thread): Gram and eigh 3.4 + 1.9 ms in fp64 -> 1.0 + 1.0 ms.
    """
    if W.dtype != torch.float32 or W.device.type != "cpu" or W.dim() != 2:
        return None
    gram = _adjoint(W) @ W
    # W is not scaled on every path (subspace iteration): a Gram near the ends of the fp32 range (overflow,
    # or products in the subnormal range) goes to the fp64 path; ``lambda_1 <= s max(diag)``
    big = torch.diagonal(gram).amax()
    if not bool(torch.isfinite(gram).all() & (big >= 1e-26) & (big <= 1e36)):
        return None
    evals, Z = torch.linalg.eigh(gram)  # ascending
    top = evals[-1]
    if not bool(torch.isfinite(evals).all()) or not bool(
        (top > 0) & (evals[-k] >= _FP32_GRAM_MIN_RATIO * top)
    ):
        return None
    Zk = Z[:, -k:].flip(-1)
    V = matmul_like(W, Zk, W)
    S = _norm64(V, dim=0)
    V = V.div_(S.to(V.dtype))
    V, R, info = cholqr_pass(V, by_inverse=True, inplace=True)
    flags.append(info > 0)
    S = (S * torch.diagonal(R).to(S.dtype)).to(W.dtype)
    if not bool((S[1:] <= S[:-1]).all()):  # nearly equal Ritz values may come out swapped
        S, order = S.sort(descending=True)
        Zk, V = Zk[:, order], V[:, order]
    return Zk, S, _adjoint(V)


def _gram64(X: torch.Tensor) -> torch.Tensor:
    """``X^H X`` of an fp32 ``X`` accumulated in fp64 (products of fp32 numbers are exact in fp64), from
    fp64 copies of at most 1 MiB of rows at a time: a whole fp64 copy of a long ``X`` (30000 x 40: 9.6
    MB) cost more in fresh pages than the Gram's flops."""
    rows, cols = X.shape[-2], X.shape[-1]
    step = max(64, (1 << 17) // max(cols, 1))
    gram = None
    for start in range(0, rows, step):
        chunk = X[..., start : start + step, :].to(torch.float64)
        part = _adjoint(chunk) @ chunk
        gram = part if gram is None else gram.add_(part)
    return gram


def _cat_columns(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(blocks, dim=-1)``, column-major when the blocks are (what QR and the transposed CPU
    products return): a contiguous copy instead of a strided one (measured 0.6 -> 0.1 ms for 1500 x 120,
    and 5 -> 1 ms for 30000 x 96, 1 thread). One GEMM on the concatenated basis then replaces a GEMM and
    an addition per block (2.4 -> 0.5 ms for 5 blocks of 1500 x 24)."""
    if len(blocks) == 1:
        return blocks[0]
    if all(b.mT.is_contiguous() for b in blocks):
        return torch.cat([b.mT for b in blocks], dim=-2).mT
    return torch.cat(blocks, dim=-1)


def _exact(op: LinOp, k: int) -> SVDResult:
    dense = op.to_dense()
    if not dense.is_contiguous():
        dense = dense.contiguous()
    if dense.requires_grad and torch.is_grad_enabled():
        # finite gradients on degenerate spectra (rank-deficient A, repeated singular values): _RitzSVD
        # factors wide matrices, so a tall one is factored as A^H = V S U^H
        if dense.shape[-2] <= dense.shape[-1]:
            U, S, Vh = _RitzSVD.apply(dense)
        else:
            V, S, Uh = _RitzSVD.apply(_adjoint(dense))
            U, Vh = _adjoint(Uh), _adjoint(V)
    else:
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    U, Vh = _flip_signs(U[..., :, :k], Vh[..., :k, :], inplace=True)
    return SVDResult(U, S[..., :k], Vh)


# --------------------------------------------------------------------------------------------- public


@no_autocast
def svd(A: Any, k: int | None = None) -> SVDResult:
    """Exact truncated SVD: the ``k`` largest singular triplets (LAPACK / cuSOLVER through torch).

    Parameters
    ----------
    A : Tensor (dense ``(..., m, n)`` or sparse), ndarray, scipy.sparse matrix, or linear operator
        Sparse and implicit inputs are densified (an implicit one by ``n`` products).
    k : int, optional
        Number of triplets, ``1 <= k <= min(m, n)``; all of them by default.

    Returns
    -------
    SVDResult
        ``(U, S, Vh)``, ``U`` (..., m, k), ``S`` (..., k) descending, ``Vh`` (..., k, n), in A's floating
        dtype (fp16/bf16 computed and returned in fp32), on A's device, with deterministic signs (the
        largest-magnitude entry of each column of ``U`` is positive).

    Notes
    -----
    Costs ``O(m n min(m, n))`` whatever ``k``; for ``k << min(m, n)`` use :func:`rsvd`.
    """
    op = as_linop(A, name="A", check_finite=True)
    kmax = min(op.shape)
    k = kmax if k is None else _check_k(k, kmax)
    return _exact(op, k)


def _default_params(
    method: str, k: int, m: int, n: int, device: torch.device, n_iter: int | None = None
) -> tuple[str, int, int]:
    """``(method, oversample, n_iter)`` for ``method`` (possibly "auto") and the requested ``n_iter``
    (``None``: the default); rule in :func:`rsvd` Notes."""
    kmax = min(m, n)
    krylov_over = max(4, k // 8)
    if method == "auto":
        method = "krylov" if 3 * (k + krylov_over) <= kmax // 2 else "subspace"
    if method == "krylov":
        if n_iter == 1:
            # two blocks only: a wider block buys back the accuracy of the missing third one; 14 + k // 8
            # is the smallest oversampling that matched torch.svd_lowrank(q=k+10, niter=2) for k = 10-100
            return method, 14 + k // 8, 1
        return method, krylov_over, 2 if n_iter is None else n_iter
    return method, max(10, k // 4), 4 if n_iter is None else n_iter


@no_autocast
def rsvd(
    A: Any,
    k: int | None = None,
    *,
    tol: float | None = None,
    oversample: int | None = None,
    n_iter: int | None = None,
    method: str = "auto",
    seed: int | torch.Generator | None = None,
    center: bool = False,
    block_size: int | None = None,
) -> SVDResult:
    r"""Randomized truncated SVD: ``A ~= U diag(S) Vh`` of rank ``k`` (or the smallest rank meeting ``tol``).

    Parameters
    ----------
    A : Tensor (dense ``(..., m, n)`` or ``torch.sparse``), ndarray, scipy.sparse matrix, or linear operator
        A linear operator is any object with ``shape``, ``dtype``, ``matmul(X)`` (``A @ X``) and
        ``rmatmul(Y)`` (``A^T @ Y``); results are torch tensors.
        A row-block stream (an iterator/generator of ``(b_i, n)`` blocks, a list of blocks or of
        ``.npy``/``.safetensors`` shard paths, a NumPy memmap of 256 MiB or more) is factored in one pass
        by :class:`lowrank.sketch.StreamingSVD` (``oversample`` sets its sketch size ``k + oversample``;
        ``tol``/``n_iter``/``method`` are multi-pass options and raise ``ValueError`` there).
    k : int, optional
        Target rank, ``1 <= k <= min(m, n)``. Required unless ``tol`` is given (then it caps the rank).
        When ``k + oversample`` reaches ``min(m, n)``, the exact SVD is computed instead (it is then both
        cheaper and exact).
    tol : float, optional
        Fixed-precision mode: the smallest rank ``r`` with ``||A - U S Vh||_F <= tol ||A||_F`` (relative
        Frobenius error, estimated exactly from the computed factorization), grown block by block by
        randQB_EI (Yu, Gu & Li 2018). The error is tracked as ``||A||_F^2 - ||B||_F^2``, known to about
        ``eps ||A||_F^2`` only: ``tol`` below ``sqrt(16 eps)`` (``1.4e-3`` in fp32, ``6e-8`` in fp64) acts as
        ``sqrt(16 eps)`` (the growth stops at that floor; the rank returned is the smallest reaching it).
        Only for 2-D inputs.
    oversample : int, optional
        Extra random vectors (giving it selects the wide block of ``"auto"``, see Notes).
        ``"subspace"``: the sketch has ``k + oversample`` columns (default
        ``max(10, k // 4)``). ``"krylov"``: the block has ``k + oversample`` columns (default
        ``max(4, k // 8)``, or ``14 + k // 8`` when ``n_iter=1``). Fixed precision: block size (default
        ``min(64, max(8, k_cap // 8))``).
    n_iter : int, optional
        Power iterations (``"subspace"``, default 4) or extra Krylov blocks (``"krylov"``, default 2;
        ``"auto"``'s narrow branch: 4 or more, see Notes; giving ``n_iter`` selects the wide block);
        each costs two passes over A. This is the quality knob: with the Krylov method, ``n_iter=1``
        (4 passes) is at least as accurate as ``torch.svd_lowrank(q=k+10, niter=2)`` (6 passes), the
        default ``n_iter=2`` (6 passes) as accurate as scikit-learn's ``randomized_svd`` defaults (16
        passes) on the decaying spectra of the Notes, but not on nearly flat ones (``sigma_i = i^-0.5``,
        400 x 300, k = 10: excess 7.4e-4 against scikit-learn's 2.2e-7; raise ``n_iter`` there),
        ``n_iter=3`` reaches ~1e-7 excess error on slowly decaying spectra (figures in Notes). Fixed
        precision: power iterations per block (default 1).
    method : {"auto", "subspace", "krylov"}
        ``"subspace"``: Halko–Martinsson–Tropp range finder with subspace (power) iterations.
        ``"krylov"``: randomized block Krylov (Musco & Musco 2015): keeps every block, so it gets more
        accuracy per pass over A on slowly decaying spectra. ``"auto"``: see Notes.
    seed : int or torch.Generator, optional
        Seed of the Gaussian test matrix; ``None`` draws a fresh one.
    center : bool
        Factor ``A - 1 mean(A, 0)`` (column means removed, as PCA does) without forming it: sparse
        inputs stay sparse.
    block_size : int, optional
        Block Krylov only (implies ``method="krylov"``; not with ``oversample`` or ``tol``): the number of
        columns per block, which may be *smaller* than ``k``, as long as the subspace
        ``(n_iter + 1) * block_size`` holds ``k``; ``n_iter`` then defaults to the smallest count with
        ``(n_iter + 1) * block_size >= 2.5 k`` (at least 2). Narrow blocks with more iterations get
        more accuracy per pass over A on slowly decaying spectra (Musco & Musco 2015, Sec. 7), the best
        trade on small dense and on sparse matrices (figures in Notes).

    Returns
    -------
    SVDResult
        ``(U, S, Vh)`` as :func:`svd`: A's floating dtype (fp16/bf16 -> fp32), A's device,
        deterministic signs. When a dense ``A`` requires grad (and grad mode is on), the engine runs on
        ``A.detach()`` and the factors come from one differentiable Rayleigh-Ritz step on the computed
        ``U`` (``B = U^H A``, ``torch.linalg.svd(B)``; one more pass of ``k`` columns): gradients of the
        singular values and of ``U U^H A`` are exact to the accuracy of the triplets, those of ``U`` and
        ``Vh`` hold the part within the computed subspace. Degenerate spectra (``k`` above the rank of A,
        repeated singular values) keep these gradients finite: the parts that depend on the choice of
        vectors within a degenerate subspace, undefined there, are dropped (``torch.linalg.svd`` returns
        NaN), so those of ``S`` and ``U U^H A`` stay exact while those of ``U S Vh`` lose their share
        inside a degenerate block.

    Raises
    ------
    ValueError
        ``k`` out of range or missing, bad ``tol``/``method``/``block_size`` combinations, NaN/Inf in ``A``,
        a sparse ``A`` that requires grad.
    TypeError
        Arguments of the wrong type.

    Notes
    -----
    Passes over A (each ``2 m n b`` flops for a block of ``b`` columns): subspace ``2 n_iter + 2`` with
    ``b = k + oversample``; Krylov ``2 n_iter + 2`` with ``b = k + oversample`` but a final subspace of
    ``(n_iter + 1) b`` columns. Other work is ``O((m + n) b^2)`` per pass.

    ``method="auto"`` rule (from ``benchmarks/bench_svd.py``, 2-core CPU, fp32). Narrow branch, when
    neither ``oversample`` nor ``n_iter`` is given, on CPU, 2-D, ``k >= 16``, for sparse matrices and
    dense ones of at most ``2^22`` entries, as long as the subspace fits in half of ``min(m, n)``: block
    Krylov with blocks of ``ceil(k/2) + 8`` columns and ``n_iter=3`` (dense; 8 passes, subspace
    ``4 b``: the accuracy of ``torch.svd_lowrank(q=k+10, niter=2)`` with a margin, in 0.7x its
    column-passes) or ``ceil(k/2.5)`` columns and the smallest ``n_iter`` spanning ``3k`` (sparse);
    figures in ``lowrank.svd._auto_narrow`` and ``lowrank.svd._narrow_dense_block``. Wide branch
    otherwise: block Krylov with ``n_iter=2`` and a block of ``k + max(4, k // 8)`` columns whenever its
    final subspace (``3 (k + oversample)`` columns) fits in half of ``min(m, n)``; otherwise subspace
    iteration with ``n_iter=4``, ``oversample=max(10, k // 4)``. Measured (``python -m benchmarks.bench_svd
    --full --threads 1``, median of 5 interleaved runs, 2-core CPU; excess = Frobenius error over the optimal
    rank-k error, minus 1): on 4096x4096, sigma_i = 0.99^i + 1e-3, k=64, ``auto`` takes 246 ms with
    excess 2.7e-4 (scikit-learn's defaults: 0.79 s, 3.2e-4), ``n_iter=1`` 184 ms with excess 8.9e-3
    where ``torch.svd_lowrank(q=k+10, niter=2)`` takes 274 ms with 1.6e-2 (1.49x); on 20000x2000,
    sigma_i = 0.98^i + 1e-3, k=50, ``auto`` 481 ms (excess 1.4e-5; scikit-learn 1.42 s, 4.9e-5) and
    ``n_iter=1`` 403 ms (excess 1.6e-3; torch 563 ms, 6.2e-3: 1.40x). Times are 1.24-1.35x the GEMM
    floor of the passes made. With ``n_iter=1`` the smallest oversampling
    matching torch's accuracy was measured for k = 10-100 (``14 + k // 8``); a smaller Krylov block
    with more iterations is more accurate per flop but measured slower (narrow GEMMs).

    Narrow Krylov blocks (``block_size``), measured (``python -m benchmarks.bench_svd``, its
    "small and sparse" table; accuracy = the excess above; 2-core CPU shared with other jobs, so
    ratios of interleaved runs): on 1500 x 1500 with ``sigma_i = i^-0.7``, k = 64, ``block_size=32``
    (``n_iter=3``: 8 passes of 32 columns) matches ``torch.svd_lowrank(q=k+10, niter=2)``'s accuracy
    (excess 6.5e-3, 3 seeds) in 256 instead of 444 column-passes, but not on nearly flat heads (the
    default takes 40 columns); on a 30000 x 2500 sparse matrix with
    Zipf-distributed row and column indices (density 2e-3), k = 40, ``block_size=16`` with
    ``n_iter=5`` (excess 2.2e-3; torch 5.8e-3) and ``n_iter=7`` (5e-5; scikit-learn's
    ``randomized_svd`` 1.4e-4). CPU time, 1 thread, medians of 7 interleaved runs on a loaded machine:
    (a) 1.27x faster than torch; (b) 2.2x faster than torch and 2.3x faster than scikit-learn.

    Tall (``m > n``) fp32 sparse and implicit inputs on CPU are factored as ``A^H`` (the factors swapped
    back), so that the bases of the range finder are ``n`` long (15-25% faster on a sparse 20000x2000);
    for the same seed their results then equal those of the dense ``A^T``, transposed. Dense inputs
    keep their side (and equal ``lowrank.distributed.rsvd``); fp64 ones too (measured slower there).

    Implementation (no host synchronisation inside the iterations): on CPU, dense products are computed
    as ``(X^T A^T)^T`` (1.0-1.5x faster than ``A @ X``), Krylov and final bases are orthonormalised by
    Householder QR (LAPACK; 1.5-1.9x faster than LU + CholeskyQR2 there), each new Krylov block projected
    out of the previous ones twice, each time followed by Householder QR (BCGS2). On CUDA,
    where Householder QR is slow, bases are LU-normalised (``P L``) and orthonormalised by CholeskyQR2
    with ``R^{-1}`` applied as a GEMM, all level-3 BLAS; a breakdown (numerically rank-deficient sketch)
    is detected once at the end and the call rerun with Householder QR, same random draws.
    Power-iteration bases of the subspace method are LU-normalised on every device. Rayleigh-Ritz: the
    small SVD comes from the eigen-decomposition of ``W^H W`` (``W = A^H Q``) formed in fp64 for fp32
    inputs (``torch.linalg.svd(W)`` for other dtypes).
    """
    from lowrank.sketch import is_row_stream, stream_rsvd  # sketch.py imports this module

    center = python_number(center)  # np.bool_ too
    if is_row_stream(A):  # row blocks, shard paths, a large memmap: one pass (lowrank.sketch)
        if block_size is not None:
            raise ValueError("block_size is a multi-pass (Krylov) option; row-block streams take one pass")
        return stream_rsvd(
            A, k, tol=tol, oversample=oversample, n_iter=n_iter, method=method, seed=seed, center=center
        )
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    grad = isinstance(A, torch.Tensor) and A.requires_grad and torch.is_grad_enabled()
    if grad and A.layout != torch.strided:
        raise ValueError(
            "A requires grad: rsvd differentiates dense (strided) tensors only; pass A.detach() for the "
            "factors without a gradient"
        )
    op = as_linop(A.detach() if grad else A, name="A", check_finite=False)
    m, n = op.shape
    kmax = min(m, n)
    if tol is not None:
        tol = python_number(tol)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"tol must be a float, got {type(tol).__name__}")
        if not (0 < tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {tol}")
        cap = kmax if k is None else _check_k(k, kmax)
    elif k is None:
        raise ValueError("k is required unless tol is given")
    else:
        k = _check_k(k, kmax)
    if oversample is not None:
        oversample = _check_nonneg_int(oversample, "oversample")
    if n_iter is not None:
        n_iter = _check_nonneg_int(n_iter, "n_iter")
    if block_size is not None:
        _check_k(block_size, kmax, "block_size")
        if tol is not None or oversample is not None or method == "subspace":
            raise ValueError(
                "block_size sets the block of the Krylov method: give it without tol, oversample or "
                "method='subspace'"
            )
        method = "krylov"
    gen = _generator(seed, op.device)
    exponent = 0
    if tol is not None:
        # the tolerance is tested on fp64 sums of squares, out of range for float64 data beyond ~1e154 or
        # below ~1e-154: factor A / 2^e (exact), the singular values multiplied back below
        op, exponent = rescale_extreme(op)
    transpose = _short_side_first(op)
    if center:
        op = CenteredOp(op)
    if transpose:
        op = TransposedOp(op)  # after the centring: A's column means stay what is removed
    if tol is not None and len(op.batch_shape):
        raise ValueError("tol (fixed-precision mode) needs a 2-D A, got a batch of matrices")
    try:
        if tol is not None:
            result = _fixed_precision(op, float(tol), cap, oversample, n_iter, gen)
        else:
            result = _fixed_rank(op, k, oversample, n_iter, method, gen, block_size)
    except (ValueError, torch.linalg.LinAlgError):
        # a finite dense A near the top of its dtype's range can overflow the engine's products (fp32 with
        # sigma_1 ~ 1e37): rerun on A divided by a power of two (exact), the singular values multiplied back
        exponent = _overflow_exponent(A)
        if exponent is None:
            raise
        again = rsvd(
            A * 2.0**-exponent, k, tol=tol, oversample=oversample, n_iter=n_iter, method=method,
            seed=seed, center=center, block_size=block_size,
        )  # fmt: skip
        S = again.S * 2.0**exponent
        if not bool(torch.isfinite(S).all()):
            raise ValueError(f"the singular values of A overflow its dtype {S.dtype}") from None
        return SVDResult(again.U, S, again.Vh)
    if transpose:
        # the SVD of A^H is V S U^H: swap the factors, then A's sign convention (on U) again
        U, Vh = _flip_signs(_adjoint(result.Vh), _adjoint(result.U), inplace=True)
        result = SVDResult(U, result.S, Vh)
    if exponent:
        result = SVDResult(result.U, times_power_of_two(result.S, exponent), result.Vh)
    if grad:
        result = _differentiable_ritz(A, result.U, center)
    return result


def _overflow_exponent(A: Any) -> int | None:
    """For a finite dense float ``A`` with ``max|A| >= 2^60``: the exponent ``e`` of a power of two near
    ``max|A|`` (``A / 2^e`` has entries below 1 in magnitude); ``None`` otherwise (the engine's error
    stands)."""
    if not isinstance(A, torch.Tensor) or A.layout != torch.strided or not A.is_floating_point():
        return None
    big = A.detach().abs().amax() if A.numel() else torch.zeros(())
    if not bool(torch.isfinite(big)) or float(big) < 2.0**60:
        return None
    return int(math.frexp(float(big))[1])


def _differentiable_ritz(A: torch.Tensor, Q: torch.Tensor, center: bool) -> SVDResult:
    """Rayleigh-Ritz on the computed left singular vectors ``Q`` (``m x k``, orthonormal, held constant),
    differentiable in ``A``: ``B = Q^H A`` (``A`` centred when asked), ``B = U_B S V^H`` by
    ``torch.linalg.svd``, ``U = Q U_B``. For Ritz vectors ``Q = U_k`` of the engine's subspace,
    ``U_k^H A = S_k V_k^H``, so the factors are the engine's to rounding; the gradient is that of the
    Rayleigh-Ritz step with the subspace fixed: exact for the singular values (``U_k V_k^H`` for
    ``sum(S)``) and for ``Q Q^H A``, and for ``U``, ``Vh`` the part within the subspace, to the accuracy of
    the triplets. Cost: one product of ``k`` columns with ``A`` and an SVD of ``k x n``."""
    Q = Q.detach()
    X = A.to(Q.dtype)
    if center:
        X = X - X.mean(dim=-2, keepdim=True)
    Ub, S, Vh = _RitzSVD.apply(_adjoint(Q) @ X)
    U, Vh = _flip_signs(Q @ Ub, Vh)
    return SVDResult(U, S, Vh)


class _RitzSVD(torch.autograd.Function):
    """``torch.linalg.svd(B, full_matrices=False)`` of the small ``(..., k, n)`` Rayleigh-Ritz matrix
    (``k <= n``), with a backward that stays finite on degenerate spectra.

    torch's backward divides by ``s_j^2 - s_i^2`` and by ``s_i``: for a rank-deficient A (``k`` above its
    rank, so that ``B`` has repeated zero singular values) or repeated singular values it returned NaN, or
    finite garbage of order 1e17, even for the gradient of ``U U^H A`` (which does not depend on how the
    degenerate vectors are chosen). Here pairs closer than ``max(k, n) eps s_1`` (numerically equal) get
    a zero coupling and singular values below it a zero inverse (pseudo-inverse): the gradient of any loss
    that does not depend on the choice of vectors within a degenerate subspace (``U U^H``, ``S``, and
    ``U S Vh`` where the singular values are nonzero) is then what the limit gives, and the ill-defined
    parts are dropped instead of poisoning the whole gradient. Otherwise the formula is the usual one
    (Townsend 2016, "Differentiating the singular value decomposition"; the imaginary diagonal term for
    complex inputs from Wan & Zhang 2019), the same as torch's to rounding.
    """

    @staticmethod
    def forward(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.linalg.svd(B, full_matrices=False)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*output)

    @staticmethod
    def backward(ctx, gU, gS, gVh):
        U, S, Vh = ctx.saved_tensors
        k, n = U.shape[-1], Vh.shape[-1]
        tol = max(k, n) * torch.finfo(S.dtype).eps * S[..., :1]  # (..., 1): numerically zero or equal
        inv = torch.where(S > tol, 1.0 / torch.where(S > tol, S, torch.ones_like(S)), torch.zeros_like(S))
        si, sj = S[..., :, None], S[..., None, :]
        gap = (sj - si) * (sj + si)  # s_j^2 - s_i^2
        coupled = (sj - si).abs() > tol[..., None]
        F = torch.where(coupled, 1.0 / torch.where(coupled, gap, torch.ones_like(gap)), torch.zeros_like(gap))
        inner = torch.zeros(U.shape[:-2] + (k, k), dtype=U.dtype, device=U.device)
        if gU is not None:
            J = _adjoint(U) @ gU
            J = J - _adjoint(J)
            inner = inner + (F * J) * sj
            if U.is_complex():
                inner = inner + torch.diag_embed(J.diagonal(dim1=-2, dim2=-1) * inv / 2)
        if gS is not None:
            inner = inner + torch.diag_embed(gS.to(U.dtype))
        gB = U @ inner @ Vh
        if gVh is not None:
            V = _adjoint(Vh)
            K = Vh @ _adjoint(gVh)  # V^H gV with gV = gVh^H
            K = K - _adjoint(K)
            gB = gB + U @ ((si * (F * K)) @ Vh)
            # the component of gV outside span(V): U S^+ gV^H (I - V V^H)
            outside = gVh - (gVh @ V) @ Vh
            gB = gB + U @ (inv[..., :, None] * outside)
        return gB


def _short_side_first(op: LinOp) -> bool:
    """Whether :func:`rsvd` factors ``A^H`` instead of ``A``: tall (``m > n``) sparse or implicit fp32
    (fp16/bf16 are computed in fp32) matrices on CPU.

    The range finder's dense work (Householder QR, block Gram-Schmidt, LU, copies) is on bases as long as
    the side the sketch is multiplied into, ``m``; on ``A^H`` they are ``n`` long, and only the images
    ``A Q`` (the Rayleigh-Ritz Gram and the final ``U``) are ``m`` long. Measured (interleaved, median of
    7, 2-core CPU, sparse 20000x2000 at 0.5%): fp32 ``rsvd`` k=20 centred 44.0 -> 37.4 ms, k=50 122 ->
    93 ms (1 thread: 44.7 -> 39.2, 131 -> 113 ms), accuracy unchanged; wide inputs unaffected. In fp64
    (and complex) it measured 10-25% *slower* (k=20 centred 77 -> 84 ms, k=50 252 -> 288 ms, 1 thread):
    their Rayleigh-Ritz step is a ``torch.linalg.svd`` of the ``m x s`` images, not the fp32 path's
    Gram eigen-decomposition, and that outweighs the cheaper bases. CUDA: not measured, unchanged.
    Dense inputs keep their orientation: a dense ``A^H`` factorization measured ~15% faster in fp32 too,
    but ``lowrank.distributed``'s row-sharded rsvd equals the single-process one on the tall stacked
    matrix for the same seed, and would no longer. Consequence: for the same seed, a tall fp32 sparse A
    gives the factorization of the dense ``A^T``, transposed (equal to rounding), not that of dense A.
    """
    m, n = op.shape
    fp32_cpu = op.dtype == torch.float32 and op.device.type == "cpu"
    return fp32_cpu and not op.is_dense and not len(op.batch_shape) and m > n


def _narrow_block_iters(k: int, block: int, n_iter: int | None) -> int:
    """``n_iter`` of the Krylov method with an explicit ``block_size``: the given one (``ValueError`` if
    the subspace cannot hold ``k``), else the smallest with ``(n_iter + 1) block >= 2.5 k``, at least 2."""
    if n_iter is None:
        return max(2, -(-5 * k // (2 * block)) - 1)
    if (n_iter + 1) * block < k:
        raise ValueError(
            f"block_size={block} with n_iter={n_iter} spans {(n_iter + 1) * block} columns, fewer than "
            f"k={k}: raise block_size or n_iter"
        )
    return n_iter


#: the narrow-block branch of ``method="auto"`` needs ``k`` at least this (narrower blocks than ~8 columns
#: run GEMMs far below their peak and pay the per-block Python and LAPACK overhead ``2.5 k / b`` times)
_NARROW_MIN_K = 16
#: dense matrices of at most this many entries (16 MiB in fp32: the size class that stays in a CPU's
#: last-level cache, where a pass of a narrow block costs its flops and not a read of A from memory)
_NARROW_DENSE_MAX_ENTRIES = 1 << 22


def _stored(op: LinOp) -> LinOp:
    """The operator under any transposition and implicit centring: what holds ``A``'s entries."""
    while isinstance(op, (TransposedOp, CenteredOp)):
        op = op.base
    return op


def _auto_narrow(op: LinOp, k: int) -> tuple[int, int] | None:
    """``(block, n_iter)`` of the narrow-block branch of ``method="auto"``, or ``None`` for the wide rule
    of :func:`_default_params`; the rule is in :func:`rsvd`'s Notes.

    Narrow blocks (``b < k``) with more iterations reach a given accuracy with fewer column-passes over A
    than a block of ``k + p`` columns (Musco & Musco 2015, Sec. 7). Dense: ``b = ceil(k/2) + 8``, 3
    iterations (8 passes of ``b`` columns, subspace ``4 b``; the wide rule makes 6 passes of ``9k/8``),
    aimed at the accuracy of ``torch.svd_lowrank(q=k+10, niter=2)`` (see :func:`_narrow_dense_block`).
    Where the time goes (1500 x 1500, k = 64, 1 thread): the 8 passes (GEMMs of A with 40 columns, about
    2.6 ms each quiet) are 60-70% of the call; the rest is small dense work (Householder QR of 1500 x 40
    blocks, projections, the Rayleigh-Ritz Gram, its eigh and two 1500 x 160 x 64 GEMMs). The previous
    rule (``ceil(k/2)``, 4 iterations: 10 passes) was 10x more accurate than torch there but no faster
    than it. Narrower blocks with as many column-passes measured no faster (GEMMs of 16-24 columns run
    at 0.6-0.8x the rate of 32-64, and per-block QR and projections add up); a 4th iteration at
    ``ceil(k/2) + 4`` columns is more accurate but costs 2 passes more. Sparse: ``b = ceil(k/2.5)``,
    subspace >= 3k: their passes cost ``O(nnz b)``, so accuracy is cheap (30000 x 2500 Zipf, k = 40: 8
    blocks of 16, 54 ms, excess 5e-5; the wide rule 95 ms, 2.1e-3; scikit-learn's ``randomized_svd`` 137 ms,
    1.4e-4). They pay where a pass is cheap next to its fixed costs: sparse matrices and dense ones that stay
    in cache.
    """
    if op.device.type != "cpu" or k < _NARROW_MIN_K or len(op.batch_shape):
        return None
    m, n = op.shape
    base = _stored(op)
    if isinstance(base, SparseOp):
        block = -(-2 * k // 5)
        n_iter = max(2, -(-3 * k // block) - 1)
    elif isinstance(base, DenseOp) and m * n <= _NARROW_DENSE_MAX_ENTRIES:
        block, n_iter = _narrow_dense_block(k), 3
    else:
        return None
    if (n_iter + 1) * block > min(m, n) // 2:  # a subspace this large: the wide rule decides
        return None
    return block, n_iter


def _narrow_dense_block(k: int) -> int:
    """Block columns of the dense narrow branch, ``ceil(k/2) + 8`` (with ``n_iter=3``: 8 passes over A,
    subspace ``4 b``).

    The smallest of the forms tried that reached the accuracy of ``torch.svd_lowrank(q=k+10, niter=2)``
    with a margin everywhere: worst excess of 3 seeds at most 0.73x torch's mean excess on 1000^2,
    2048^2 fp32 matrices with ``sigma_i = 0.99^i + 1e-3`` and ``0.995^i + 1e-3`` (nearly flat heads, the
    hardest kind), k = 16-128; ``ceil(k/2) + 4`` (the form behind the figures for ``i^-0.5``, ``i^-0.7``,
    ``i^-1``, ``0.97^i`` on 1000^2-2000^2, 3000 x 1000, 4096 x 1024, k = 16-160, at most 0.74x there)
    reached 1.0-1.18x torch's excess on the flat heads. Cost: ``8 b`` column-passes against torch's
    ``6 (k + 10)`` (0.72x at k = 64, 0.70x at k = 128)."""
    return -(-k // 2) + 8


def _resolve(
    op: LinOp, k: int, method: str, oversample: int | None, n_iter: int | None, block_size: int | None
) -> tuple[str, int, int]:
    """``(method, block columns, n_iter)`` that :func:`rsvd` runs for these arguments (fixed rank)."""
    m, n = op.shape
    if block_size is not None:
        return "krylov", block_size, _narrow_block_iters(k, block_size, n_iter)
    if method == "auto" and oversample is None and n_iter is None:
        narrow = _auto_narrow(op, k)
        if narrow is not None:
            return "krylov", narrow[0], narrow[1]
    method, default_over, q = _default_params(method, k, m, n, op.device, n_iter)
    return method, k + (default_over if oversample is None else oversample), q


def _fixed_rank(
    op: LinOp,
    k: int,
    oversample: int | None,
    n_iter: int | None,
    method: str,
    gen: torch.Generator,
    block_size: int | None = None,
) -> SVDResult:
    m, n = op.shape
    kmax = min(m, n)
    method, block, q = _resolve(op, k, method, oversample, n_iter, block_size)
    width = block * (q + 1 if method == "krylov" else 1)
    if width >= kmax:
        _check_product(op.matmul(torch.zeros(*op.batch_shape, n, 1, dtype=op.dtype, device=op.device)))
        return _exact(op, k)
    if method == "krylov":
        return _run_with_fallback(_block_krylov, op, gen, k, block, q)
    return _run_with_fallback(_subspace, op, gen, k, block, q)


def _run_with_fallback(algorithm, op: LinOp, gen: torch.Generator, *args) -> SVDResult:
    """Run the fast path; if any CholeskyQR broke down (checked once, at the end), rerun robustly.

    The rerun draws the same Gaussian matrices, so results stay reproducible for a given seed.
    """
    state = gen.get_state()
    flags: list = []
    result = algorithm(op, gen, *args, robust=False, flags=flags)
    bad = _any_bad(flags)
    if bad is not None and bool(bad):
        gen.set_state(state)
        result = algorithm(op, gen, *args, robust=True, flags=[])
    return result


def _subspace(
    op: LinOp, gen: torch.Generator, k: int, width: int, n_iter: int, *, robust: bool, flags: list
) -> SVDResult:
    """HMT range finder (Halko et al. 2011, Alg. 4.4) with ``n_iter`` power iterations; Rayleigh-Ritz.

    Intermediate bases are LU-normalised (``P L``, not orthonormal, as scikit-learn and fbpca do: only the
    span matters there); the last one is orthonormalised. ``2 n_iter + 2`` passes over A.
    """
    n = op.shape[1]
    Y = op.matmul(_gaussian(op, n, width, gen))
    _check_product(Y)
    scheme = "qr" if robust else "lu"
    for _ in range(n_iter):
        Z = op.rmatmul(orthonormalize(Y, scheme))
        Y = op.matmul(orthonormalize(Z, scheme))
    Q, bad = _basis(Y, robust)
    flags.append(bad)
    return _ritz(Q, op.rmatmul(Q), k, robust, flags)


def _block_krylov(
    op: LinOp, gen: torch.Generator, k: int, block: int, n_iter: int, *, robust: bool, flags: list
) -> SVDResult:
    """Randomized block Krylov (Musco & Musco 2015) with blockwise reorthogonalisation (BCGS2).

    The orthonormal basis ``[Q_0, ..., Q_q]`` of ``span{A G, (A A^H) A G, ..., (A A^H)^q A G}`` is built
    block by block (kept as a list: never concatenated); ``A^H Q_i``, needed for the next block anyway,
    is kept, so that ``Q^H A`` costs one extra pass only: ``2 n_iter + 2`` passes of ``block`` columns for
    a subspace of ``(n_iter + 1) block`` columns. Each new block is projected against the basis and
    orthonormalised (see :func:`_basis`).

    The images ``W = A^H Q_i`` are multiplied by ``A`` again after a scalar scaling only (no LU
    normalisation, unlike the subspace method's iterates): ``Q_i`` is orthonormal, so ``W`` already
    carries an absolute rounding error of about ``u ||A||`` per column, and the product's own rounding,
    ``u ||A|| ||w_j||``, is of the same order whatever the conditioning of ``W``; normalising ``W`` first
    cannot recover more (the subspace method differs: its iterates are not orthonormal). The LU of
    ``W`` was the largest single cost of sparse inputs with few entries per row, where ``W`` is the long
    side (30000 x 16: 8 ms against a 2 ms sparse product, 1 thread). Every image is divided by one scale,
    ``c = max |A^H Q_0|`` (about ``||A||``: the images of orthonormal blocks are no larger), which keeps
    ``A W`` inside the fp32 range for any scale of ``A``; the singular values are multiplied back.
    """
    m, n = op.shape
    Y = op.matmul(_gaussian(op, n, block, gen))
    _check_product(Y)
    # the basis [Q_0 ... Q_q] lives in one buffer, column-major unless the products come row-major (a dense
    # A with several threads): the projection of a new block against it is one GEMM pair, not one per
    # block (1500 x 32 blocks: 12 small GEMMs of 0.15 ms became 6), and Rayleigh-Ritz reads it without a
    # concatenated copy
    column_major = _column_major(op)
    width = block * (n_iter + 1)
    if column_major:
        store = torch.empty(*op.batch_shape, width, m, dtype=Y.dtype, device=Y.device).mT
    else:
        store = torch.empty(*op.batch_shape, m, width, dtype=Y.dtype, device=Y.device)
    first = store[..., :, :block]
    Q, bad = _basis(Y, robust, out=first)
    flags.append(bad)
    if Q is not first:
        first.copy_(Q)
    # short-side Rayleigh-Ritz needs no long images but the last: each one is scaled in place and dropped
    # after its product (a fresh long buffer per block cost more in page faults than the sparse product)
    short = not robust and _short_side_ritz(op)
    # the images are divided by one scale, c = max|A^H Q_0| (no fp32 under- or overflow of A A^H Q for
    # tiny or huge A), in place where the product is ours: one pass over W, no reduction per block
    owned = short or _owns_products(op)
    scale = None
    images = []
    products = []  # A (A^H Q_i) / c and c, for the short-side Gram of _ritz_short_side
    buffer = torch.empty(n, block, dtype=Q.dtype, device=Q.device) if short else None
    # the long-side images [W_0 ... W_q] of a dense A go straight into one buffer in the products' layout
    # (its rmatmul_into writes there): Rayleigh-Ritz then reads them without a concatenated copy (0.8 ms
    # of ~45 for 1500 x 1500, k = 64, 1 thread)
    wide = None
    if not (short or robust or len(op.batch_shape)) and isinstance(_stored(op), DenseOp):
        if column_major:
            wide = torch.empty(width, n, dtype=Q.dtype, device=Q.device).mT
        else:
            wide = torch.empty(n, width, dtype=Q.dtype, device=Q.device)
    in_wide = wide is not None

    def image(Q: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal in_wide
        if short:
            return op.rmatmul_into(Q, buffer)
        if wide is None:
            return op.rmatmul(Q)
        out = wide[:, i * block : (i + 1) * block]
        W = op.rmatmul_into(Q, out)
        in_wide = in_wide and W is out
        return W

    for i in range(n_iter):
        filled = store[..., :, : (i + 1) * block]
        W = image(Q, i)
        if robust:
            images.append(W)
            Y = op.matmul(orthonormalize(W, "qr"))
        else:
            scale = _max_abs(W) if scale is None else scale
            W = W.div_(scale) if owned or in_wide else W / scale
            Y = op.matmul(W)
            if short:
                products.append((Y, scale))
            else:
                images.append(W)
        Y = _project_out(Y, [filled])
        out = store[..., :, (i + 1) * block : (i + 2) * block]
        Q, bad = _basis(Y, robust, against=[filled], out=out)
        flags.append(bad)
        if Q is not out:
            out.copy_(Q)
    if short:
        W = op.rmatmul_into(Q, buffer)
        scale = _max_abs(W) if scale is None else scale
        products.append((op.matmul(W.div_(scale)), scale))
        result = _ritz_short_side(op, store, products, k, flags)
        if result is not None:
            return result
        return _ritz(store, [op.rmatmul(store)], k, robust, flags)  # the long-side step after all
    W = image(Q, n_iter)
    if not robust:
        scale = _max_abs(W) if scale is None else scale
        W = W.div_(scale) if owned or in_wide else W / scale
    images.append(W)
    return _ritz(store, [wide] if in_wide else images, k, robust, flags, scale=scale)


def _column_major(op: LinOp) -> bool:
    """Whether the products of ``op`` come column-major (all but a dense A's with several CPU threads,
    see ``DenseOp.column_major_products``): the layout the Krylov bases are kept in."""
    base = _stored(op)
    return base.column_major_products if isinstance(base, DenseOp) else True


def _owns_products(op: LinOp) -> bool:
    """Whether the products of ``op`` are fresh tensors (dense or sparse A, centred or transposed), which
    may be scaled in place; a user operator's may be its own storage."""
    base = _stored(op)
    return isinstance(base, (DenseOp, SparseOp))


def _max_abs(W: torch.Tensor) -> torch.Tensor:
    """``max|W|`` per matrix of a batch, shape ``(..., 1, 1)``, 1 where ``W`` is zero (no sync)."""
    if W.is_complex():
        big = W.abs().amax(dim=(-2, -1), keepdim=True)
    else:  # two value reductions: measured 10-20x faster than vector_norm(ord=inf) on 30000 x 16
        big = torch.maximum(W.amax(dim=(-2, -1), keepdim=True), -W.amin(dim=(-2, -1), keepdim=True))
    return torch.where(big > 0, big, torch.ones_like(big))


def _short_side_ritz(op: LinOp) -> bool:
    """Whether the Krylov Rayleigh-Ritz step works on the short side (:func:`_ritz_short_side`): real
    fp32 ``torch.sparse`` / scipy.sparse 2-D matrices (centred or not) on CPU whose images ``A^H Q`` are
    at least 4 times longer than the basis ``Q`` (tall ones, which :func:`rsvd` factors as ``A^H``; wide
    ones). Implicit operators keep the long-side step: their products may cost as much as a dense
    matrix's, and the short side needs two more of them. There the
    dense work on the long images (the fp64 Gram of ``[W_0 ... W_q]``, ``m s^2`` flops, and
    ``V = W Z``) dominated the whole call: 2/3 of it on a 30000 x 2500 sparse matrix with 5 entries per
    row (k = 40, 8 blocks of 16), while products with a sparse A of that width cost ``O(nnz s)``."""
    base = _stored(op)
    return (
        isinstance(base, SparseOp)
        and op.dtype == torch.float32
        and op.device.type == "cpu"
        and not len(op.batch_shape)
        and op.shape[1] >= 4 * op.shape[0]
    )


#: smallest ``lambda_k / lambda_1`` of the short-side Gram accepted by :func:`_ritz_short_side`
_SHORT_SIDE_MIN_RATIO = 1e-4


def _ritz_short_side(
    op: LinOp,
    basis: torch.Tensor,
    products: list[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    flags: list,
) -> SVDResult | None:
    """Rayleigh-Ritz of block Krylov from the short side; ``None`` when its fp32 Gram is not accurate
    enough (the caller then runs :func:`_ritz` on the long images).

    The Gram ``W^H W`` of the images ``W = A^H Q`` equals ``Q^H (A A^H Q)``, and ``A A^H Q_i`` is the
    product the iteration computed anyway (``products``; one more for the last block): ``s x s`` from
    ``n_short x s`` blocks, instead of ``m s^2`` fp64 flops on the long images. Its entries carry an fp32
    error of about ``u sigma_1^2`` (the long-side fp64 Gram: ``u sigma_1`` on ``sigma``), so it only
    selects the top-k subspace ``Z_k``; when ``lambda_k / lambda_1 < 1e-4`` (``sigma_1 / sigma_k > 100``)
    that is not accurate enough and ``None`` is returned. Then ``V' = A^H (Q Z_k)`` (one product of
    ``k`` columns), the SVD of ``V'`` by its Gram formed in fp64 (``m k^2`` flops; exact products of
    fp32 numbers: the singular values get the accuracy of the long-side path), and one CholeskyQR pass
    on ``V``, as in :func:`_ritz`. Measured on the 30000 x 2500 sparse matrix above (k = 40, 8 blocks of
    16, 1 thread, CPU time of interleaved runs on a loaded machine): the whole call 173 -> 127 ms, the
    same accuracy to 6 digits.
    """
    coefs = []
    for Y, scale in products:
        coefs.append((_adjoint(basis) @ Y).to(torch.float64) * scale.to(torch.float64))
    gram = torch.cat(coefs, dim=-1)
    gram = (gram + _adjoint(gram)) / 2
    evals, Z = torch.linalg.eigh(gram)  # ascending
    top = evals[..., -1]
    if not bool(torch.isfinite(evals).all()) or not bool(evals[..., -k] >= _SHORT_SIDE_MIN_RATIO * top):
        return None
    Zk = Z[..., :, -k:].flip(-1).to(basis.dtype)
    left = matmul_like(basis, Zk, basis)  # Q Z_k, orthonormal (short)
    image = op.rmatmul(left)  # V' = A^H Q Z_k (long)
    hevals, Zh = torch.linalg.eigh(_gram64(image))
    Zh = Zh.flip(-1)
    S = hevals.flip(-1).clamp_min(0).sqrt()
    inv = torch.where(S > 0, 1 / S, torch.zeros_like(S))
    # V = V' Z_h S^{-1}, then one CholeskyQR pass, both written over V' (no fresh long buffers)
    V = matmul_rows_inplace(image, (Zh * inv[..., None, :]).to(image.dtype))
    V, _, info = cholqr_pass(V, by_inverse=True, inplace=True)
    flags.append(info > 0)
    U = matmul_like(left, Zh.to(left.dtype), left)
    U, Vh = _flip_signs(U, _adjoint(V), inplace=True)
    return SVDResult(U, S.to(image.dtype), Vh)


# ------------------------------------------------------------------ block Krylov extended until converged


def _ritz_from_left(op: LinOp, left: torch.Tensor, flags: list) -> SVDResult:
    """Rayleigh-Ritz on the orthonormal ``k`` columns ``left`` (``m x k``): ``V' = A^H left`` (one product),
    its Gram in fp64 (fp32 ``V'``; exact products), ``V = V' Z S^{-1}`` and one CholeskyQR pass on ``V``,
    ``U = left Z``; deterministic signs. The singular values get the accuracy of the long-side path."""
    # one CholeskyQR pass first: Z from an fp32 eigen-decomposition is orthonormal to only ~u sqrt(s),
    # and a non-orthonormal ``left`` scales the singular values by as much (measured 5e-7 relative)
    left, _, info = cholqr_pass(left, by_inverse=True)
    flags.append((info > 0).any())  # reduced: krylov_until's calls see batches of different sizes
    image = op.rmatmul(left)
    if image.dtype == torch.float32:
        hevals, Zh = torch.linalg.eigh(_gram64(image))
    else:
        hevals, Zh = torch.linalg.eigh(_adjoint(image) @ image)
    Zh = Zh.flip(-1)
    S = hevals.flip(-1).clamp_min(0).sqrt()
    inv = torch.where(S > 0, 1 / S, torch.zeros_like(S))
    V = matmul_like(image, (Zh * inv[..., None, :]).to(image.dtype), image)
    V, _, info = cholqr_pass(V, by_inverse=True)
    flags.append((info > 0).any())
    U = matmul_like(left, Zh.to(left.dtype), left)
    U, Vh = _flip_signs(U, _adjoint(V), inplace=True)
    return SVDResult(U, S.to(image.dtype), Vh)


#: depth (``n_iter``) of the first accuracy check of :func:`krylov_until`, and the fewest blocks between two
_FIRST_CHECK = 6
_MIN_CHECK_STEP = 2


def krylov_until(
    A: torch.Tensor,
    k: int,
    *,
    block_size: int,
    max_iter: int,
    residual_tol: float | None,
    seed: int | torch.Generator | None = 0,
) -> tuple[SVDResult, torch.Tensor]:
    r"""Randomized block Krylov SVD of a dense ``A`` whose depth is chosen by the Ritz residuals: the Krylov
    space is *extended* (never rebuilt) until every top-``k`` Ritz triplet satisfies
    ``||A v_i - s_i u_i|| <= residual_tol * max(s_i, 1e-3 s_1)``, or ``max_iter`` blocks after the first.

    Parameters
    ----------
    A : Tensor, shape (m, n) or (b, m, n)
        Dense float32/float64 (a batch: each matrix stops on its own; converged ones leave the batch).
    k : int
        Number of triplets, ``1 <= k <= min(m, n)``.
    block_size : int
        Columns per Krylov block, ``>= 1``; the space holds ``(depth + 1) * block_size`` columns.
    max_iter : int
        Largest depth (Krylov blocks after the first), ``>= 1``; ``(max_iter + 1) * block_size`` must be
        at least ``k`` and below ``min(m, n)``.
    residual_tol : float or None
        Target relative residual; ``None``: no check, exactly ``max_iter`` (a fixed-cost randomized SVD,
        the lean form of :func:`_krylov_fixed`: ``2 (max_iter + 1)`` products of ``block_size`` columns,
        no residual bookkeeping, no final pass; ``max_iter=0`` allowed).
    seed : int or torch.Generator, optional

    Returns
    -------
    result : SVDResult
        ``U`` (..., m, k), ``S`` (..., k), ``Vh`` (..., k, n) as :func:`rsvd`'s.
    converged : Tensor of bool, shape (...)
        Whether the residual estimate met ``residual_tol`` (all True when it is ``None``).

    Notes
    -----
    The basis ``Q = [Q_0 ... Q_d]`` of ``span{A G, (A A^H) A G, ...}`` lives on the short side (a tall
    ``A`` is handled as ``A^H``, factors swapped back). With ``Y_{j+1} = A A^H Q_j`` (the products that
    extend the space) the projected Gram ``T = Q^H A A^H Q`` is assembled block column by block column
    (``c Q^H Y_{j+1}``, ``c`` the images' scale), so a check needs no product with ``A``: the Ritz pairs
    ``(s_i^2, z_i)`` of ``T`` give ``u_i = Q z_i``, ``v_i = A^H u_i / s_i`` with residual
    ``||A v_i - s_i u_i|| = ||(I - Q Q^H) Y_{d+1} z_i^{(d)}|| c / s_i`` (``z_i^{(d)}``: the rows of the last
    block), and ``(I - Q Q^H) Y_{d+1}`` is the next block before its orthonormalisation: a failed check
    costs one ``s x s`` eigen-decomposition (``s`` the space's width) and the iteration goes on from there.
    Checks run at depth 6, 8, then where the residuals' geometric decay between the last two checks
    predicts convergence (at least 2 blocks later). The accepted triplets come from
    Rayleigh-Ritz on ``Q Z_k`` (one product of ``k`` columns, its Gram in fp64), so the singular values
    are as accurate as the long-side Rayleigh-Ritz of :func:`rsvd`. The residual estimate is from fp32
    products (error about ``u (s_1 / s_i)^2``); callers that need a guarantee test the returned triplets
    (``lowrank.lora.init.checked_top_triplets`` does). A Ritz value's error is of the order of the square
    of its relative residual times ``s_i`` over its gap (Saad, "Numerical Methods for Large Eigenvalue
    Problems", Thm. 4.6; Musco & Musco 2015 for the depth such spectra need).
    """
    check_tensor(A, "A", complex_ok=False)
    if A.dim() not in (2, 3):
        raise ValueError(f"A must be a (m, n) or (b, m, n) dense matrix, got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A must be float32 or float64, got {A.dtype}")
    m, n = A.shape[-2:]
    k = _check_k(k, min(m, n))
    block = _check_k(block_size, min(m, n), "block_size")
    max_iter = _check_nonneg_int(max_iter, "max_iter")
    if max_iter < 1 and residual_tol is not None:
        raise ValueError("max_iter must be >= 1 (>= 0 with residual_tol=None)")
    if (max_iter + 1) * block < k or (max_iter + 1) * block >= min(m, n):
        raise ValueError(
            f"block_size={block} with max_iter={max_iter} spans {(max_iter + 1) * block} columns: it must "
            f"hold k={k} and stay below min(m, n)={min(m, n)}"
        )
    if residual_tol is not None:
        residual_tol = python_number(residual_tol)
        if isinstance(residual_tol, bool) or not isinstance(residual_tol, (int, float)) or residual_tol <= 0:
            raise ValueError(f"residual_tol must be a number > 0 or None, got {residual_tol!r}")
    gen = _generator(seed, A.device)
    transpose = m > n
    work = A.mT if transpose else A
    if residual_tol is None:  # fixed depth: the lean form, no residual bookkeeping
        U, S, Vh = _run_with_fallback(_krylov_fixed, work, gen, k, block, max_iter)
        if transpose:
            U, Vh = _flip_signs(_adjoint(Vh), _adjoint(U), inplace=True)
        return SVDResult(U, S, Vh), torch.ones(A.shape[:-2], dtype=torch.bool, device=A.device)
    state = gen.get_state()
    flags: list = []
    result, converged = _krylov_until(work, gen, k, block, max_iter, residual_tol, False, flags)
    bad = _any_bad(flags)
    if bad is not None and bool(bad):
        gen.set_state(state)
        result, converged = _krylov_until(work, gen, k, block, max_iter, residual_tol, True, [])
    U, S, Vh = result
    if transpose:
        U, Vh = _flip_signs(_adjoint(Vh), _adjoint(U), inplace=True)
    return SVDResult(U, S, Vh), converged


def _krylov_fixed(
    A: torch.Tensor, gen: torch.Generator, k: int, b: int, depth: int, *, robust: bool, flags: list
) -> SVDResult:
    """Fixed-depth randomized block Krylov of a dense ``(m, n)`` or ``(count, m, n)`` ``A`` with ``m <= n``
    (the short side first; ``A`` may be the transposed view of a tall matrix): ``2 (depth + 1)`` products
    of ``b`` columns, subspace ``(depth + 1) b``.

    Block Golub-Kahan-Lanczos with one-sided (full, blockwise) reorthogonalisation: the short-side basis
    ``Q = [Q_0 ... Q_d]`` of ``span{A G, (A A^H) A G, ..., (A A^H)^d A G}`` is orthonormalised block by
    block, and every image ``A^H Q_j`` (the product that makes the next block) is *kept*, so that after the
    last image the Rayleigh-Ritz projection ``Q^H A`` is already there: no final pass over ``A`` (a range
    finder followed by ``B = Q^H A``, as ``torch.svd_lowrank``, spends one). Rayleigh-Ritz: :func:`_ritz`
    on the images (top-``k`` ``Z_k`` of their Gram, ``S`` and ``V`` from ``A^H Q Z_k``, ``U = Q Z_k``).

    Orthonormalisation of a new block (:func:`_orth_against`): projection against the basis twice (block
    classical Gram-Schmidt with reorthogonalisation, Kahan's test) and one Householder QR. Products take
    the forms BLAS streams the stored matrix in: with ``M`` the row-major storage of ``A`` (``A = M`` or
    ``A = M^T``), ``M X`` and ``M^T X`` as ``M @ X`` and ``(X^T M)^T``, never ``X^T M^T`` (measured 15-20%
    slower for 16 columns of a 3072 x 768 fp32 weight, 1 thread). When ``max|A G|`` is outside
    ``[1e-12, 1e12]``, the images are divided by ``c = max|A^H Q_0|`` before they are multiplied again
    (``A A^H Q`` stays in the floating range for any scale of ``A``); the singular values are multiplied
    back.

    References: G. Golub, W. Kahan, "Calculating the singular values and pseudo-inverse of a matrix", SIAM
    J. Numer. Anal. 2(2), 1965 (bidiagonalisation); C. Musco, C. Musco 2015 (randomized block Krylov: the
    accuracy per product on slowly decaying spectra); J. W. Daniel et al., Math. Comp. 30, 1976 (twice is
    enough).
    """
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    tall_storage = not A.is_contiguous() and A.mT.is_contiguous()  # A = M^T with M (n, m) row-major
    M = A.mT if tall_storage else A

    def times_a(X: torch.Tensor) -> torch.Tensor:  # A X, X (..., n, b)
        return M.mT @ X if tall_storage else M @ X

    def times_ah(X: torch.Tensor) -> torch.Tensor:  # A^H X, X (..., m, b)
        return M @ X if tall_storage else (X.mT @ M).mT

    width = b * (depth + 1)
    basis = torch.empty(*batch, width, m, dtype=A.dtype, device=A.device).mT  # column-major (m, width)
    start = torch.randn(*batch, n, b, dtype=A.dtype, device=A.device, generator=gen)
    Y = times_a(start)
    # one pass over the first product for both checks: NaN/Inf in A (they propagate into A G), and whether
    # A's scale needs the images divided (max|A G| in [1e-12, 1e12], any sane weight: sigma_1^2 stays far
    # inside the fp32 range, so A A^H Q is formed unscaled)
    low, high = torch.aminmax(Y)
    peak = torch.maximum(-low, high)
    finite, sane = torch.stack([torch.isfinite(peak), (peak >= 1e-12) & (peak <= 1e12)]).tolist()
    if not finite:
        raise ValueError("A contains NaN or Inf entries (or its products overflow)")
    basis[..., :, :b] = _orth_against(Y, None, robust)
    images = []
    scale = None
    for j in range(depth + 1):
        lo, hi = j * b, (j + 1) * b
        image = times_ah(basis[..., :, lo:hi])
        if j == 0 and not sane:
            scale = _max_abs(image)
        if scale is not None:
            image = image.div_(scale)
        images.append(image)
        if j == depth:
            break
        Y = times_a(orthonormalize(image, "qr") if robust else image)
        basis[..., :, hi : hi + b] = _orth_against(Y, basis[..., :, :hi], robust)
    W = _cat_columns(images)
    if robust or W.dtype != torch.float32 or W.device.type != "cpu":
        return _ritz(basis, W, k, robust, flags, scale=scale)
    # fp32 on CPU: the Gram of the images in fp32 selects Z_k (its error, u sigma_1^2, moves the
    # eigenvectors to second order only), S are the norms of W Z_k (the Rayleigh quotients, as accurate as
    # the fp64 path's); one synchronisation for every check (the unscaled images of a sane weight stay far
    # from the fp32 range, see above). Measured 1.97 -> ~1.6 ms against _ritz for 768 x 80 images.
    evals, Z = torch.linalg.eigh(W.mT @ W)  # ascending
    top = evals[..., -1:]
    if not bool(
        torch.isfinite(evals).all() & (top > 0).all() & (evals[..., -k : -k + 1] >= 1e-4 * top).all()
    ):
        return _ritz(basis, W, k, robust, flags, scale=scale)
    Zk = Z[..., :, -k:].flip(-1)
    V = W @ Zk
    S = torch.linalg.vector_norm(V, dim=-2)
    V, R, info = cholqr_pass(V.div_(S[..., None, :]), by_inverse=True)
    flags.append(info > 0 if info.dim() == 0 else (info > 0).any())
    S = S * torch.diagonal(R, dim1=-2, dim2=-1)
    if not bool((S[..., 1:] <= S[..., :-1]).all()):  # nearly equal Ritz values may come out swapped
        S, order = S.sort(dim=-1, descending=True)
        Zk = Zk.gather(-1, order[..., None, :].expand_as(Zk))
        V = V.gather(-1, order[..., None, :].expand_as(V))
    if scale is not None:
        S = S * scale[..., 0]
    U, Vh = _flip_signs(basis @ Zk, V.mT, inplace=True)
    return SVDResult(U, S, Vh)


def _orth_against(Y: torch.Tensor, basis: torch.Tensor | None, robust: bool) -> torch.Tensor:
    """Orthonormal basis of the part of ``range(Y)`` orthogonal to the orthonormal columns ``basis``.

    Classical Gram-Schmidt twice (``Y1 = Y - P Y``, ``Y2 = Y1 - P Y1`` with ``P = basis basis^H``), then one
    Householder QR of ``Y2``, accepted when Kahan's test holds column by column (``||Y2_j|| >=
    ||Y1_j|| / sqrt(2)``: the second projection removed little, so ``Y2`` is orthogonal to the basis to
    working accuracy; Daniel et al. 1976, "twice is enough"). Otherwise (a block numerically inside the
    span, as on the short side of a rank-deficient matrix) the projection and Householder QR are repeated
    on the orthonormal ``Q`` (at most 4 times) until Kahan's test holds on ``R``'s diagonal. One QR per
    block instead of two: measured 0.3 ms less per call of :func:`_krylov_fixed` on a 768 x 768 weight
    (blocks of 16, depth 4, 1 thread). ``robust``: the projection is done twice in every repetition."""
    if basis is None:
        return torch.linalg.qr(Y).Q
    Y1 = Y - basis @ (basis.mT @ Y)
    Y2 = Y1 - basis @ (basis.mT @ Y1)
    if not robust:
        before = torch.linalg.vector_norm(Y1, dim=-2)
        after = torch.linalg.vector_norm(Y2, dim=-2)
        if bool((after >= 0.7071 * before).all()):
            return torch.linalg.qr(Y2).Q
    Q = torch.linalg.qr(Y2).Q
    for _ in range(4):
        Q = Q - basis @ (basis.mT @ Q)
        if robust:
            Q = Q - basis @ (basis.mT @ Q)
        Q, R = torch.linalg.qr(Q)
        if bool((torch.diagonal(R, dim1=-2, dim2=-1).abs() >= 0.7071).all()):
            break
    return Q


def _next_check(depth: int, history: list[tuple[int, float]], tol: float, max_iter: int) -> int:
    """Depth of the next residual check after a failed one at ``depth`` (see :func:`krylov_until`):
    ``_MIN_CHECK_STEP`` blocks after the first check; then where the geometric decay of the worst residual
    between the last two checks reaches ``tol``, at least 1 and at most ``max(2, depth // 2)`` blocks later
    (Krylov residuals decay faster and faster, so a long extrapolation overshoots)."""
    step = _MIN_CHECK_STEP
    if len(history) >= 2:
        (d0, r0), (d1, r1) = history[-2], history[-1]
        if 0 < r1 < r0:
            per_block = math.log(r1 / r0) / (d1 - d0)
            step = max(1, min(math.ceil(math.log(tol / r1) / per_block), max(2, depth // 2)))
    return min(depth + step, max_iter)


def _krylov_until(
    A: torch.Tensor,
    gen: torch.Generator,
    k: int,
    b: int,
    max_iter: int,
    tol: float | None,
    robust: bool,
    flags: list,
) -> tuple[SVDResult, torch.Tensor]:
    """The iteration of :func:`krylov_until` on an ``(m, n)`` matrix or ``(count, m, n)`` stack, ``m <= n``;
    matrices of a stack that converge leave it (their rows of the state are dropped)."""
    m, n = A.shape[-2:]
    dtype, device = A.dtype, A.device
    batched = A.dim() == 3
    count = A.shape[0] if batched else 1
    outputs: list[tuple[torch.Tensor, SVDResult, torch.Tensor]] = []  # (indices, triplets, converged)
    active = torch.arange(count, device=device)
    op = DenseOp(A)
    width = b * (max_iter + 1)
    Y = op.matmul(_gaussian(op, n, b, gen))
    _check_product(Y)
    Q, bad = _basis(Y, robust)
    flags.append(bad)
    store = torch.empty(*A.shape[:-2], width, m, dtype=dtype, device=device).mT  # column-major basis
    store[..., :, :b] = Q
    T = torch.zeros(*A.shape[:-2], width, width, dtype=dtype, device=device)  # Q^H A A^H Q / c, block
    # tridiagonal: block column j holds rows 0 .. j + 1 (the others are zero in exact arithmetic)
    scale = None
    check_at = min(_FIRST_CHECK, max_iter) if tol is not None else max_iter
    history: list[tuple[int, float]] = []
    for depth in range(max_iter + 1):
        s = (depth + 1) * b
        filled = store[..., :, :s]
        W = op.rmatmul(Q)
        scale = _max_abs(W) if scale is None else scale
        Y = op.matmul(W.div_(scale))  # A A^H Q_depth / c
        coef = _adjoint(filled) @ Y
        T[..., :s, depth * b : s] = coef
        Y_out = Y - matmul_like(filled, coef, Y)
        if depth == check_at or depth == max_iter:
            # T is formed from fp32 products (error ~ u ||A||^2): its eigen-decomposition in the working
            # dtype selects the subspace; the singular values come from _ritz_from_left's fp64 Gram
            Tsym = T[..., :s, :s]
            evals, Z = torch.linalg.eigh((Tsym + _adjoint(Tsym)) / 2)
            lam = evals[..., -k:].flip(-1).clamp_min(0).to(torch.float64) * scale[..., 0].to(torch.float64)
            Zk = Z[..., :, -k:].flip(-1)
            sigma = lam.sqrt()
            floor = torch.maximum(sigma, 1e-3 * sigma[..., :1]) * sigma
            resid = _norm64(Y_out @ Zk[..., depth * b : s, :], dim=-2) * scale[..., 0].to(torch.float64)
            rel = resid / floor.clamp_min(torch.finfo(torch.float64).tiny)
            worst = rel.amax(-1)
            if tol is None or depth == max_iter:
                done = torch.ones_like(worst, dtype=torch.bool)
            else:
                done = worst <= tol
            ok = worst <= tol if tol is not None else done
            if not batched:
                if bool(done):
                    left = matmul_like(filled, Zk, filled)
                    return _ritz_from_left(op, left, flags), ok
            elif bool(done.any()):
                idx = done.nonzero()[:, 0]
                every = bool(done.all())
                sub = op if every else DenseOp(op.A[idx])
                part = filled if every else filled[idx]
                left = matmul_like(part, Zk if every else Zk[idx], part)
                outputs.append((active[idx], _ritz_from_left(sub, left, flags), ok[idx]))
                if every:
                    break
                keep = (~done).nonzero()[:, 0]
                active = active[keep]
                op = DenseOp(op.A[keep])
                store, T, scale = store[keep], T[keep], scale[keep]
                filled = store[..., :, :s]
                Y, Y_out, worst = Y[keep], Y_out[keep], worst[keep]
            history.append((depth, float(worst.amax())))
            check_at = _next_check(depth, history, tol, max_iter)
        Q, bad = _basis(Y_out, robust, against=[filled])
        flags.append(None if bad is None else bad.any())
        store[..., :, s : s + b] = Q
        T[..., s : s + b, depth * b : s] = _adjoint(Q) @ Y
    U_out = torch.empty(count, m, k, dtype=dtype, device=device)
    S_out = torch.empty(count, k, dtype=dtype, device=device)
    Vh_out = torch.empty(count, k, n, dtype=dtype, device=device)
    converged = torch.empty(count, dtype=torch.bool, device=device)
    for where, (U, S, Vh), ok in outputs:
        U_out[where], S_out[where], Vh_out[where], converged[where] = U, S, Vh, ok
    return SVDResult(U_out, S_out, Vh_out), converged


def _deflate_cols(AX, X, Q_all, W_all):
    """``(A - Q B) X = A X - Q (W^H X)`` with ``W = B^H``."""
    return AX if Q_all is None else AX - Q_all @ (_adjoint(W_all) @ X)


def _deflate_rows(AhY, Y, Q_all, W_all):
    """``(A - Q B)^H Y = A^H Y - W (Q^H Y)``."""
    return AhY if Q_all is None else AhY - W_all @ (_adjoint(Q_all) @ Y)


def _fixed_precision(
    op: LinOp, tol: float, cap: int, block: int | None, n_iter: int | None, gen: torch.Generator
) -> SVDResult:
    """randQB_EI (Yu, Gu & Li 2018): grow ``Q``, ``B = Q^H A`` until ``||A - Q B||_F <= tol ||A||_F``."""
    m, n = op.shape
    b = min(64, max(8, cap // 8)) if block is None else max(1, block)
    p = 1 if n_iter is None else n_iter
    total = op.fro_norm_sq().to(torch.float64)
    # ||A - Q B||^2 = ||A||^2 - ||B||^2 is known to about eps ||A||^2 only (the subtraction cancels): below
    # that floor the test cannot decide, and blocks drawn past it are rounding noise that cost passes and
    # spoil the basis (an exactly rank-40 float64 matrix with tol=1e-10 came back with error 7.7e-6 and a
    # basis orthonormal to 5e-10 only): tol acts as at least sqrt(16 eps) (6e-8 fp64, 1.4e-3 fp32)
    floor = 16 * torch.finfo(op.dtype.to_real()).eps * total
    threshold = tol * tol * total
    stop = torch.maximum(threshold, floor)
    remaining = total.clone()
    bases: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    rank = 0
    first = True
    limit = min(cap + b, min(m, n))  # oversampled: the last block is truncated to the cap
    while rank < limit:
        bb = min(b, limit - rank)
        Q_all = torch.cat(bases, dim=-1) if bases else None
        W_all = torch.cat(images, dim=-1) if images else None

        omega = _gaussian(op, n, bb, gen)
        Y = _deflate_cols(op.matmul(omega), omega, Q_all, W_all)
        if first:
            _check_product(Y)
            first = False
        for _ in range(p):
            Qi = orthonormalize(Y, "qr")
            Z = orthonormalize(_deflate_rows(op.rmatmul(Qi), Qi, Q_all, W_all), "qr")
            Y = _deflate_cols(op.matmul(Z), Z, Q_all, W_all)
        Qi = orthonormalize(Y, "qr")
        if Q_all is not None:
            Qi = orthonormalize(Qi - Q_all @ (_adjoint(Q_all) @ Qi), "qr")
        Wi = op.rmatmul(Qi)
        bases.append(Qi)
        images.append(Wi)
        rank += bb
        # in fp64: an fp32 sum of squares under- or overflows for ||A|| below ~1e-19 or above ~1e19
        remaining = remaining - _norm64(Wi).square()
        if bool(remaining <= stop):
            break
    Q_all = torch.cat(bases, dim=-1)
    W_all = torch.cat(images, dim=-1)
    Uw, S, Vwh = torch.linalg.svd(W_all, full_matrices=False)
    # error of the rank-r truncation: what the blocks missed plus the tail of S, the tail summed directly
    # (total - cumsum(S^2) cancels as above and picked ranks far above the smallest one for small tol)
    tail = torch.flip(torch.cumsum(torch.flip(S.to(torch.float64).square(), (0,)), dim=0), (0,))
    tail = torch.cat([tail[1:], tail.new_zeros(1)])  # tail[r - 1] = sum of S_i^2 for i >= r
    ok = (remaining.clamp_min(0) + tail) <= stop
    r = min(cap, int(ok.nonzero()[0, 0]) + 1 if bool(ok.any()) else S.shape[0])
    U = Q_all @ _adjoint(Vwh[:r, :])
    Vh = _adjoint(Uw[:, :r])
    U, Vh = _flip_signs(U, Vh, inplace=True)
    return SVDResult(U, S[:r], Vh)


@no_autocast
def svd_error(
    A: Any,
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    *,
    n_iter: int = 20,
    seed: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Estimated spectral norm ``||A - U diag(S) Vh||_2`` by the power method, never forming the residual.

    Parameters
    ----------
    A : any input :func:`rsvd` accepts (batched dense too)
    U, S, Vh : Tensors
        A factorization as returned by :func:`rsvd` (``(..., m, k)``, ``(..., k)``, ``(..., k, n)``).
    n_iter : int, default 20
        Power iterations (each one product with A and one with A^H). The estimate is a lower bound that
        converges to the norm at a rate set by the residual's top two singular values.
    seed : int or torch.Generator, optional

    Returns
    -------
    Tensor, shape (...,)
        The estimate in the compute dtype, on A's device.

    Notes
    -----
    The approach of fbpca's ``diffsnorm`` (Tygert et al.): ``x <- R^H R x / ||R^H R x||``,
    ``R x = A x - U (S * (Vh x))``. Cost ``n_iter`` (2 m n + 4 (m + n) k) flops.
    """
    op = as_linop(A, name="A", check_finite=False)
    m, n = op.shape
    n_iter = _check_nonneg_int(n_iter, "n_iter")
    if n_iter == 0:
        raise ValueError("n_iter must be >= 1")
    for name, value in (("U", U), ("S", S), ("Vh", Vh)):
        check_tensor(value, name)
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf entries")
    batch = tuple(op.batch_shape)
    if (
        U.dim() < 2
        or Vh.dim() < 2
        or S.dim() < 1
        or U.shape[-2] != m
        or Vh.shape[-1] != n
        or U.shape[-1] != S.shape[-1]
        or Vh.shape[-2] != S.shape[-1]
        or not tuple(U.shape[:-2]) == tuple(S.shape[:-1]) == tuple(Vh.shape[:-2]) == batch
    ):  # the batch dimensions too: a diag(S) matrix for S broadcast into a batch of wrong estimates
        raise ValueError(
            f"U {tuple(U.shape)}, S {tuple(S.shape)}, Vh {tuple(Vh.shape)} do not factor an {m}x{n} matrix"
            + (f" (batch {batch})" if batch else "")
            + ": expected (..., m, k), (..., k), (..., k, n)"
        )
    U, S, Vh = (t.to(device=op.device, dtype=op.dtype) for t in (U, S, Vh))
    gen = _generator(seed, op.device)

    def residual(x):
        return op.matmul(x) - U @ (S[..., :, None] * (Vh @ x))

    def residual_adj(y):
        return op.rmatmul(y) - _adjoint(Vh) @ (S[..., :, None] * (_adjoint(U) @ y))

    x = _gaussian(op, n, 1, gen)
    x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True)
    real = torch.empty(0, dtype=op.dtype).real.dtype
    estimate = torch.zeros(op.batch_shape, dtype=real, device=op.device)
    for i in range(n_iter):
        y = residual(x)
        if i == 0:
            _check_product(y)  # U, S, Vh were checked above: NaN/Inf here comes from A
        # norms accumulated in fp64, so that the estimate scales with A (fp32 sums of squares under- or
        # overflow below ~1e-19 / above ~1e19); x is normalised, so the divisions stay in range
        norm = _norm64(y, dim=(-2, -1), keepdim=True)
        estimate = norm[..., 0, 0].to(real)
        # y normalised before the adjoint product: R^H R x is of order ||A||^2, which leaves fp32's range
        # for ||A|| below ~1e-19 or above ~1e19; only its direction is needed
        z = residual_adj((y / torch.where(norm > 0, norm, torch.ones_like(norm))).to(op.dtype))
        norm = _norm64(z, dim=-2, keepdim=True)
        x = (z / torch.where(norm > 0, norm, torch.ones_like(norm))).to(op.dtype)
    return estimate
