"""Rank-r factor splits ``W ≈ B @ A`` and the argument checks shared by the factorization modules."""

from __future__ import annotations

import math
from typing import Any

import torch

from lowrank._linop import check_seed, check_tensor, no_autocast, python_number

__all__ = ["ConvergenceWarning", "low_rank_factor"]


class ConvergenceWarning(UserWarning):
    """An iterative routine (``als``, ``nmf``) stopped at ``max_iter`` before its tolerance was met.

    The result is returned anyway (as scikit-learn does with its own ``ConvergenceWarning``); raise
    ``max_iter``, loosen ``tol`` or silence it with ``warnings.filterwarnings``.
    """


# ----------------------------------------------------------------------------------------------------------
# shared argument checks (private; used by pca, nmf, completion, cur, nystrom)
# ----------------------------------------------------------------------------------------------------------


def _check_rank(k: Any, name: str = "k", *, upper: int | None = None) -> int:
    """Return ``k`` as an int after checking ``1 <= k (<= upper)``; a clear error names the argument."""
    k = python_number(k)
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be a positive int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    if upper is not None and k > upper:
        raise ValueError(f"{name}={k} exceeds min(shape) = {upper}")
    return k


def _check_int(value: Any, name: str, *, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum``: Python and NumPy integers (not bool); a ValueError naming the
    argument otherwise (a float such as ``3.0`` included, as the checks did before NumPy integers were
    accepted)."""
    value = python_number(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def _check_float(value: Any, name: str) -> float:
    """``value`` as a finite float ``>= 0``: Python and NumPy reals (not bool); a ValueError naming the
    argument otherwise. NumPy scalars such as ``np.float32(1e-6)`` are numbers too (they are not ``float``
    instances, which the checks of als / nmf / nystrom used to require)."""
    value = python_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _scale_exponent(largest: float) -> int:
    """An even power-of-two exponent e near ``log2(largest)``, or 0 when the data are within ``2**±20``
    of unit scale (no rescaling, no copy of the data). Used by nmf and als, which are scale-equivariant:
    data divided by ``2**e`` (exact) keep fp32 products and objectives in range; the factors are then
    multiplied by ``2**(e/2)``."""
    if not largest > 0 or 2.0**-20 <= largest <= 2.0**20:
        return 0
    exponent = math.frexp(largest)[1]
    return exponent - (exponent % 2)


def _times_power_of_two(value: float, exponent: int) -> float:
    try:
        return math.ldexp(value, exponent)
    except OverflowError:  # the objective of data near float64's limit: its square is out of range
        return math.inf


def _is_sparse(X: torch.Tensor) -> bool:
    return X.layout != torch.strided


def _as_matrix(X: Any, name: str = "X", *, check_finite: bool = True) -> torch.Tensor:
    """The explicit 2-D matrix behind ``X`` (torch dense/sparse, NumPy, scipy.sparse), via ``as_linop``.

    Dense input comes back dense in its compute dtype (fp16/bf16 -> fp32), sparse input as a torch CSR
    tensor. Implicit linear operators are refused (TypeError naming the argument): the caller needs entries.
    """
    from lowrank._linop import DenseOp, SparseOp, as_linop

    op = as_linop(X, name=name, check_finite=check_finite, allow_batch=False)
    if isinstance(op, (DenseOp, SparseOp)):
        return op.A
    raise TypeError(
        f"{name} must be a dense or sparse matrix here (its entries are needed), not a linear operator"
    )


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    seed = check_seed(seed, allow_generator=False)
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------------------------------------
# low_rank_factor
# ----------------------------------------------------------------------------------------------------------


@no_autocast
def low_rank_factor(
    W: torch.Tensor,
    r: int,
    *,
    method: str = "svd",
    balance: str = "sqrt",
    return_residual: bool = False,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Split a matrix into rank-``r`` factors ``W ≈ B @ A`` from its truncated SVD.

    With ``W ≈ U_r diag(S_r) Vh_r`` (the best rank-``r`` approximation in every unitarily invariant
    norm, Eckart & Young 1936), the factors are

    * ``balance="sqrt"``:  ``B = U_r diag(√S_r)``, ``A = diag(√S_r) Vh_r`` (both factors carry the same
      scale -- the usual choice to initialise a LoRA pair or a factorised layer, cf. PiSSA, Meng et al. 2024);
    * ``balance="left"``:  ``B = U_r diag(S_r)``, ``A = Vh_r`` (A has orthonormal rows);
    * ``balance="right"``: ``B = U_r``, ``A = diag(S_r) Vh_r`` (B has orthonormal columns).

    Parameters
    ----------
    W : Tensor, shape (m, n)
        The matrix to split (e.g. an ``nn.Linear`` weight, ``(out_features, in_features)``). float16 and
        bfloat16 are factorised in float32 and the factors cast back to ``W.dtype``.
    r : int
        Target rank, ``1 <= r <= min(m, n)``.
    method : {"svd", "rsvd"}
        ``"svd"``: exact truncated SVD (``lowrank.svd``), O(mn·min(m, n)) -- use it for matrices up to a
        few thousand on a side or when ``r`` is a sizeable fraction of ``min(m, n)``. ``"rsvd"``:
        randomized SVD (``lowrank.rsvd``, Halko, Martinsson & Tropp 2011), O(mnr) -- for large matrices and
        small ``r``; accurate when the spectrum decays.
    balance : {"sqrt", "left", "right"}
        Where the singular values go (see above).
    return_residual : bool
        Also return ``W - B @ A`` (in ``W.dtype``), e.g. to keep it as a frozen base weight.
    seed : int, optional
        Seed of the random sketch for ``method="rsvd"``.

    Returns
    -------
    B : Tensor, shape (m, r)
    A : Tensor, shape (r, n)
    residual : Tensor, shape (m, n)
        Only when ``return_residual=True``.

    Raises
    ------
    TypeError
        W not a dense real floating tensor; ``r`` not an int; ``seed`` not an int.
    ValueError
        W not 2-D, NaN/Inf in W, ``r`` outside ``[1, min(m, n)]``, unknown ``method``/``balance``, or factors
        that overflow W's dtype (float16: a singular value above 65504 in one factor with
        ``balance="left"``/``"right"``, or above 65504² with ``"sqrt"``).

    Examples
    --------
    >>> W = torch.randn(64, 32, dtype=torch.float64)
    >>> B, A = low_rank_factor(W, 8)
    >>> B.shape, A.shape
    (torch.Size([64, 8]), torch.Size([8, 32]))
    """
    check_tensor(W, "W", complex_ok=False)
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D matrix, got shape {tuple(W.shape)}")
    seed = check_seed(seed, allow_generator=False)
    r = _check_rank(r, "r", upper=min(W.shape))
    if method not in ("svd", "rsvd"):
        raise ValueError(f"method must be 'svd' or 'rsvd', got {method!r}")
    if balance not in ("sqrt", "left", "right"):
        raise ValueError(f"balance must be 'sqrt', 'left' or 'right', got {balance!r}")
    work = W if W.dtype in (torch.float32, torch.float64) else W.to(torch.float32)  # fp16/bf16/fp8
    if not bool(torch.isfinite(work).all()):
        raise ValueError("W contains NaN or Inf")

    from lowrank.svd import rsvd, svd

    if method == "svd":
        U, S, Vh = svd(work, r)
    else:
        U, S, Vh = rsvd(work, r, seed=seed)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    if balance == "sqrt":
        root = S.sqrt()
        B, A = U * root, root[:, None] * Vh
    elif balance == "left":
        B, A = U * S, Vh
    else:
        B, A = U, S[:, None] * Vh
    B, A = B.to(W.dtype).contiguous(), A.to(W.dtype).contiguous()
    residual = (work - (U * S) @ Vh).to(W.dtype) if return_residual else None
    # float16 tops out at 65504: the factors of a finite W can exceed it (balance="left"/"right" put a whole
    # singular value into one factor), which must not come back as silent inf
    for name, value in (("B", B), ("A", A), ("residual", residual)):
        if value is not None and not bool(
            torch.isfinite(value if value.element_size() > 1 else value.float()).all()
        ):
            raise ValueError(
                f"the factor {name} overflows W's dtype {W.dtype} (largest singular value "
                f"{float(S[0]):.3g}, balance={balance!r}); use balance='sqrt' or a wider dtype"
            )
    return (B, A, residual) if return_residual else (B, A)
