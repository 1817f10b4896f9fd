"""Low-rank matrix completion by alternating least squares (ALS)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from lowrank._linop import check_seed, no_autocast
from lowrank.factor import (
    ConvergenceWarning,
    _as_matrix,
    _check_float,
    _check_int,
    _check_rank,
    _generator,
    _is_sparse,
    _scale_exponent,
)
from lowrank.svd import rsvd

__all__ = ["als"]


def _observed_entries(
    X: Any, mask: Any, name: str, mask_name: str = "mask"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """(rows, cols, values, shape) of the observed entries given dense X + boolean mask, or sparse X.
    ``mask_name`` is the argument the mask came in (``mask`` or ``validation``), for the error messages."""
    X = _as_matrix(X, name, check_finite=False)  # unobserved entries of dense X may be NaN
    if X.is_complex():
        raise TypeError(f"{name} must be real, got complex dtype {X.dtype}")
    if _is_sparse(X):
        if mask is not None:
            raise ValueError(f"{name} is sparse: its stored entries are the observations, so pass mask=None")
        X = X.to_sparse_coo().coalesce()
        indices = X.indices()
        return indices[0], indices[1], X.values(), tuple(X.shape)
    if mask is None:
        raise ValueError(
            f"mask is required when {name} is dense (or pass {name} as a sparse tensor of observations)"
        )
    if isinstance(mask, np.ndarray):
        mask = np.ascontiguousarray(mask)  # NumPy views with negative strides (a[::-1]) have no torch view
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception as error:
            raise TypeError(
                f"{mask_name} must be a boolean tensor or array, got {type(mask).__name__}"
            ) from error
    if mask.dtype != torch.bool:
        raise TypeError(f"{mask_name} must have dtype bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(X.shape):
        raise ValueError(f"{mask_name} has shape {tuple(mask.shape)} but {name} has shape {tuple(X.shape)}")
    if mask.device.type == "meta":
        raise ValueError(f"{mask_name} is on the meta device (it has no data); materialise it first")
    rows, cols = mask.to(X.device).nonzero(as_tuple=True)
    return rows, cols, X[rows, cols], tuple(X.shape)


def _is_bool_mask(value: Any) -> bool:
    """A boolean tensor or NumPy array (a mask over dense X), as opposed to held-out entries."""
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool and value.layout == torch.strided
    return isinstance(value, np.ndarray) and value.dtype == np.bool_


def _csr(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """CSR matrix from entries already sorted row-major without duplicates (no coalesce needed)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _transposed(rows, cols, values, shape):
    """The same entries sorted column-major, as the CSR matrix of the transpose."""
    order = torch.sort(cols, stable=True).indices
    return _csr(cols[order], rows[order], values[order], (shape[1], shape[0]))


def _rmse(U: torch.Tensor, V: torch.Tensor, entries: torch.Tensor | None) -> float:
    """RMSE of ``U Vᵀ`` on the stored entries of the CSR matrix ``entries`` (only those products formed)."""
    if entries is None or entries._nnz() == 0:
        return float("nan")
    residual = torch.sparse.sampled_addmm(entries, U, V.t(), beta=1.0, alpha=-1.0).values()
    return float(residual.square().mean().sqrt())


def _solve_side(
    pattern: torch.Tensor, observed: torch.Tensor, counts: torch.Tensor, F: torch.Tensor, reg: float
) -> torch.Tensor:
    """Ridge solve for every row i at once: (Σ_{j∈Ω_i} f_j f_jᵀ + reg·max(n_i, 1)·I) x_i = Σ_{j∈Ω_i} x_ij f_j.

    ``pattern`` and ``observed`` are sparse CSR (rows × cols) with ones / observed values; the k-by-k Gram
    matrices of all rows come from one sparse-times-dense product with the row-wise outer products f_j f_jᵀ.
    """
    k = F.shape[1]
    outer = (F[:, :, None] * F[:, None, :]).reshape(F.shape[0], k * k)
    gram = (pattern @ outer).reshape(-1, k, k)
    rhs = observed @ F
    shift = reg * counts.clamp(min=1).to(F.dtype)
    gram.diagonal(dim1=1, dim2=2).add_(shift[:, None])
    factor, info = torch.linalg.cholesky_ex(gram)
    solution = torch.cholesky_solve(rhs[:, :, None], factor)[:, :, 0]
    bad = info != 0
    if bool(bad.any()):  # singular systems (reg = 0 and fewer than k observations): minimum-norm solution
        solution[bad] = (torch.linalg.pinv(gram[bad], hermitian=True) @ rhs[bad][:, :, None])[:, :, 0]
    return solution


def _fill_zero_rows(V: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Give the rows of ``V`` that are exactly zero small random values.

    The SVD of sparse or rank-deficient observations can leave rows of the spectral start exactly zero
    (the 0/1 diagonal matrix: its exact SVD puts the top-k vectors on k coordinates), and ALS never moves
    them: a zero ``v_j`` makes every ``u_i`` observed only in column ``j`` zero, which keeps ``v_j`` zero.
    Their new values are Gaussian with 1% of the root-mean-square row norm of the non-zero rows.
    """
    zero = (V == 0).all(dim=1)
    if not bool(zero.any()):
        return V
    norms = V.norm(dim=1)
    typical = float(norms[~zero].square().mean().sqrt()) if bool((~zero).any()) else 1.0
    noise = torch.randn(V.shape, dtype=V.dtype, device=V.device, generator=gen)
    noise *= 0.01 * typical / V.shape[1] ** 0.5
    return torch.where(zero[:, None], noise, V)


@no_autocast
def als(
    X: Any,
    mask: Any,
    k: int,
    *,
    reg: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int | None = None,
    init: str = "svd",
    validation: Any = None,
    return_history: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]:
    r"""Matrix completion by alternating least squares: ``X ≈ U @ V.T`` fitted to the observed entries only.

    Minimises ``Σ_{(i,j)∈Ω} (x_ij − u_iᵀ v_j)² + reg·(Σ_i n_i‖u_i‖² + Σ_j n_j‖v_j‖²)`` over U (m, k) and
    V (n, k), where n_i, n_j count the observations in row i / column j (the weighted-λ regularisation of
    Zhou, Wilkinson, Schreiber & Pan 2008, "Large-scale parallel collaborative filtering for the Netflix
    prize"). Each half-step solves all m (or n) k-by-k ridge systems at once (batched Cholesky). The
    default initialisation is the spectral one of Jain, Netrapalli & Sanghavi (2013, "Low-rank matrix
    completion using alternating minimization"): V from the top-k SVD of the zero-filled observations
    (``lowrank.rsvd``), under which ALS provably recovers incoherent rank-k matrices from
    O(k^c·n log n) random entries.

    Parameters
    ----------
    X : Tensor, numpy array or scipy.sparse matrix, shape (m, n)
        Either dense with the observations where ``mask`` is True (other entries are ignored), or sparse
        (COO/CSR) whose stored entries are the observations (then ``mask=None``).
    mask : bool Tensor, shape (m, n), or None
        Which entries of dense X are observed.
    k : int
        Rank of the model, ``1 <= k <= min(m, n)``.
    reg : float, optional
        Ridge weight per observation (same units as X). Default: ``1e-6`` times the root mean square of the
        observed values -- tiny, for exact low-rank data, at any scale of X (a fixed 1e-6 would swamp data
        of order 1e-30 and return zero factors). Use 1e-3 to 1e-1 times the typical entry for noisy data,
        choosing it on validation RMSE.
    max_iter : int
        Maximum number of ALS sweeps (each updates U, then V).
    tol : float
        Stop when the training RMSE changes by less than ``tol`` relative to itself, or falls below ``tol``
        times the RMS of the observed values.
    seed : int, optional
        Seed of the random sketch / initialisation.
    init : {"svd", "random"}
        Spectral initialisation (recommended) or Gaussian V.
    validation : sparse Tensor / scipy.sparse matrix (held-out entries) or bool Tensor / array (a mask over
        dense X), optional
        Held-out observations whose RMSE is recorded after every sweep (never used for fitting).
    return_history : bool
        Also return ``{"train_rmse": [...], "val_rmse": [...]}``, one value per sweep (``val_rmse`` empty
        without ``validation``).

    Returns
    -------
    U : Tensor, shape (m, k)
    V : Tensor, shape (n, k)
        ``U @ V.T`` is the completed matrix.
    history : dict
        Only with ``return_history=True``.

    Raises
    ------
    TypeError
        X of an unsupported type or complex; mask not boolean; ``seed`` not an int.
    ValueError
        Bad shapes, ``k``, ``reg``/``tol`` negative or not finite, ``max_iter < 1``, no or non-finite
        observations (held-out ones included), ``seed`` outside ``[0, 2**63)``, inputs on the meta device.

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` sweeps ran without meeting ``tol`` (``tol > 0``), as scikit-learn warns.

    Notes
    -----
    Degenerate starts: rows of the spectral start that are exactly zero (the SVD of sparse or rank
    deficient observations, e.g. a 0/1 diagonal matrix, leaves some) get small random values from
    ``seed``; ALS would never move them (a zero ``v_j`` keeps the rows of U observed only in column j
    zero, and they keep ``v_j`` zero).

    Scale: ALS is scale-equivariant (``c X`` gives ``√c U, √c V``); observations far from unit scale
    (beyond ``2**±20``) are divided by a power of two near their largest magnitude (exact) while fitting,
    so fp32 Gram matrices and right-hand sides neither under- nor overflow (fp32 data at 1e30 used to
    fail in ``eigh``).

    Cost per sweep: O(|Ω|k²) to form the Gram matrices plus O((m + n)k³) for the solves; memory
    O((m + n)k²). Runs on the device of X.
    """
    rows, cols, values, shape = _observed_entries(X, mask, "X")  # row-major, no duplicates
    m, n = shape
    k = _check_rank(k, "k", upper=min(m, n))
    reg = None if reg is None else _check_float(reg, "reg")
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    tol = _check_float(tol, "tol")
    seed = check_seed(seed, allow_generator=False)
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if values.numel() == 0:
        raise ValueError("X has no observed entries")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("the observed entries of X contain NaN or Inf")

    dtype, device = values.dtype, values.device
    # exact power-of-two rescaling of the observations (see Notes); reg is in X's units
    exponent = _scale_exponent(float(values.abs().max()))
    shift = torch.tensor(-exponent, device=device)
    if exponent:
        values = torch.ldexp(values, shift)
    rms = float(values.double().square().mean().sqrt())
    reg = 1e-6 * rms if reg is None else math.ldexp(reg, -exponent)
    val = None
    if validation is not None:
        if _is_bool_mask(validation):
            if _is_sparse(_as_matrix(X, "X", check_finite=False)):
                raise ValueError(
                    "a boolean validation mask needs dense X; pass held-out entries as a sparse tensor"
                )
            vr, vc, vv, vshape = _observed_entries(X, validation, "X", "validation")
            what = "the held-out entries of X (under the validation mask)"
        else:
            vr, vc, vv, vshape = _observed_entries(validation, None, "validation")
            what = "the held-out entries in validation"
        if vshape != shape:
            raise ValueError(f"validation has shape {vshape} but X has shape {shape}")
        if vv.numel() == 0:  # its RMSE would be NaN after every sweep
            raise ValueError("validation holds no held-out entries")
        if not bool(torch.isfinite(vv).all()):
            raise ValueError(f"{what} contain NaN or Inf; validation entries must be finite")
        vv = vv.to(device=device, dtype=dtype)
        val = _csr(vr.to(device), vc.to(device), torch.ldexp(vv, shift) if exponent else vv, shape)

    ones = torch.ones_like(values)
    observed, pattern = _csr(rows, cols, values, shape), _csr(rows, cols, ones, shape)
    observed_t, pattern_t = _transposed(rows, cols, values, shape), _transposed(rows, cols, ones, shape)
    row_counts = torch.bincount(rows, minlength=m)
    col_counts = torch.bincount(cols, minlength=n)

    gen = _generator(seed, device)
    if init == "svd":
        _, S, Vh = rsvd(observed, k, seed=seed)
        V = _fill_zero_rows((Vh[:k].t() * S[:k].sqrt()).to(dtype), gen)
    else:
        scale = float(values.square().mean().sqrt()) ** 0.5 / k**0.25
        V = scale * torch.randn(n, k, dtype=dtype, device=device, generator=gen)

    history: dict[str, list[float]] = {"train_rmse": [], "val_rmse": []}
    previous = None
    converged = False
    U = torch.zeros(m, k, dtype=dtype, device=device)
    for _ in range(max_iter):
        U = _solve_side(pattern, observed, row_counts, V, reg)
        V = _solve_side(pattern_t, observed_t, col_counts, U, reg)
        train = _rmse(U, V, observed)
        history["train_rmse"].append(math.ldexp(train, exponent))  # in X's units
        if val is not None:
            history["val_rmse"].append(math.ldexp(_rmse(U, V, val), exponent))
        if train <= tol * rms or (previous is not None and abs(previous - train) <= tol * previous):
            converged = True
            break
        previous = train
    if not converged and tol > 0:
        warnings.warn(
            f"als stopped at max_iter={max_iter} before the training RMSE met tol={tol}; raise max_iter "
            "or tol",
            ConvergenceWarning,
            stacklevel=3,
        )
    if exponent:
        half = torch.tensor(exponent // 2, device=device)
        U, V = torch.ldexp(U, half), torch.ldexp(V, half)
    return (U, V, history) if return_history else (U, V)
