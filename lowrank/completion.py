"""Low-rank matrix completion by alternating least squares (ALS)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lowrank.factor import _as_matrix, _check_rank, _generator, _is_sparse

__all__ = ["als"]


def _observed_entries(X: Any, mask: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """(rows, cols, values, shape) of the observed entries given dense X + boolean mask, or sparse X."""
    X = _as_matrix(X, name, check_finite=False)  # unobserved entries of dense X may be NaN
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
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception as error:
            raise TypeError(f"mask must be a boolean tensor or array, got {type(mask).__name__}") from error
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(X.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {name} has shape {tuple(X.shape)}")
    rows, cols = mask.to(X.device).nonzero(as_tuple=True)
    return rows, cols, X[rows, cols], tuple(X.shape)


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


def als(
    X: Any,
    mask: Any,
    k: int,
    *,
    reg: float = 1e-6,
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
    reg : float
        Ridge weight per observation (same units as X). Keep it tiny (default 1e-6) for exact low-rank data;
        use 1e-3 to 1e-1 times the typical entry for noisy data, choosing it on validation RMSE.
    max_iter : int
        Maximum number of ALS sweeps (each updates U, then V).
    tol : float
        Stop when the training RMSE changes by less than ``tol`` relative to itself, or falls below ``tol``
        times the RMS of the observed values.
    seed : int, optional
        Seed of the random sketch / initialisation.
    init : {"svd", "random"}
        Spectral initialisation (recommended) or Gaussian V.
    validation : sparse Tensor (held-out entries) or bool Tensor (mask over dense X), optional
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

    Notes
    -----
    Cost per sweep: O(|Ω|k²) to form the Gram matrices plus O((m + n)k³) for the solves; memory
    O((m + n)k²). Runs on the device of X.
    """
    rows, cols, values, shape = _observed_entries(X, mask, "X")  # row-major, no duplicates
    m, n = shape
    k = _check_rank(k, "k", upper=min(m, n))
    if not isinstance(reg, (int, float)) or isinstance(reg, bool) or reg < 0:
        raise ValueError(f"reg must be a non-negative number, got {reg!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if values.numel() == 0:
        raise ValueError("X has no observed entries")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("the observed entries of X contain NaN or Inf")

    dtype, device = values.dtype, values.device
    val = None
    if validation is not None:
        if isinstance(validation, torch.Tensor) and validation.dtype == torch.bool:
            if _is_sparse(_as_matrix(X, "X", check_finite=False)):
                raise ValueError(
                    "a boolean validation mask needs dense X; pass held-out entries as a sparse tensor"
                )
            vr, vc, vv, vshape = _observed_entries(X, validation, "X")
        else:
            vr, vc, vv, vshape = _observed_entries(validation, None, "validation")
        if vshape != shape:
            raise ValueError(f"validation has shape {vshape} but X has shape {shape}")
        val = _csr(vr.to(device), vc.to(device), vv.to(device=device, dtype=dtype), shape)

    ones = torch.ones_like(values)
    observed, pattern = _csr(rows, cols, values, shape), _csr(rows, cols, ones, shape)
    observed_t, pattern_t = _transposed(rows, cols, values, shape), _transposed(rows, cols, ones, shape)
    row_counts = torch.bincount(rows, minlength=m)
    col_counts = torch.bincount(cols, minlength=n)

    if init == "svd":
        import lowrank

        _, S, Vh = lowrank.rsvd(observed, k, seed=seed)
        V = (Vh[:k].t() * S[:k].sqrt()).to(dtype)
    else:
        gen = _generator(seed, device)
        scale = float(values.square().mean().sqrt()) ** 0.5 / k**0.25
        V = scale * torch.randn(n, k, dtype=dtype, device=device, generator=gen)

    rms = float(values.square().mean().sqrt())
    history: dict[str, list[float]] = {"train_rmse": [], "val_rmse": []}
    previous = None
    U = torch.zeros(m, k, dtype=dtype, device=device)
    for _ in range(max_iter):
        U = _solve_side(pattern, observed, row_counts, V, reg)
        V = _solve_side(pattern_t, observed_t, col_counts, U, reg)
        train = _rmse(U, V, observed)
        history["train_rmse"].append(train)
        if val is not None:
            history["val_rmse"].append(_rmse(U, V, val))
        if train <= tol * rms or (previous is not None and abs(previous - train) <= tol * previous):
            break
        previous = train
    return (U, V, history) if return_history else (U, V)
