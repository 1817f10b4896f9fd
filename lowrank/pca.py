"""Principal component analysis on dense or sparse data (sparse data centred implicitly)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from lowrank._linop import (
    CenteredOp,
    DenseOp,
    SparseOp,
    as_linop,
    check_seed,
    check_tensor,
    no_autocast,
    python_number,
    rescale_extreme,
    times_power_of_two,
)
from lowrank.factor import _check_rank
from lowrank.svd import rsvd, svd

__all__ = ["PCAResult", "pca", "pca_inverse_transform", "pca_transform"]

_METHODS = ("auto", "exact", "randomized")


class PCAResult(NamedTuple):
    """Result of :func:`pca` (the fitted attributes of ``sklearn.decomposition.PCA``, same meanings).

    Attributes
    ----------
    components : Tensor, shape (k, n_features)
        Principal axes (orthonormal rows), by decreasing explained variance. Sign convention: the
        largest-magnitude entry of each row is positive.
    explained_variance : Tensor, shape (k,)
        Variance along each axis, ``singular_values² / (n_samples − 1)``.
    explained_variance_ratio : Tensor, shape (k,)
        Fraction of the total variance (of all features) explained by each axis.
    mean : Tensor, shape (n_features,)
        Column means that were removed (zeros when ``center=False``).
    singular_values : Tensor, shape (k,)
        Singular values of the centred data.
    """

    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    mean: torch.Tensor
    singular_values: torch.Tensor

    def transform(self, X: Any) -> torch.Tensor:
        """Project data onto the components: ``(X − mean) @ components.T``; see :func:`pca_transform`."""
        return pca_transform(self, X)

    def inverse_transform(self, Z: torch.Tensor) -> torch.Tensor:
        """Map scores back to feature space: ``Z @ components + mean``; see :func:`pca_inverse_transform`."""
        return pca_inverse_transform(self, Z)


def _real_op(X: Any, name: str):
    op = as_linop(X, name=name, allow_batch=False)
    if op.dtype.is_complex:
        raise TypeError(f"{name} must be real, got complex dtype {op.dtype}")
    return op


def _centred_ss(op) -> torch.Tensor:
    """``||X - 1 mu^T||_F^2`` in float64, two-pass (mean first, then the centred squares): the one-pass
    formula ``||X||^2 - m ||mu||^2`` cancels to its rounding error, about ``eps ||X||^2``, when the
    variance is small next to the means (constant data gave ratios of 25885); this is accurate to
    ``eps^2 ||X||^2``. Dense X is read in blocks of rows (no m x n float64 copy), sparse X touches its
    stored values only; implicit operators fall back to the formula."""
    m, n = op.shape
    if isinstance(op, DenseOp):
        A = op.A
        mean = A.sum(dim=0, dtype=torch.float64) / m
        total = torch.zeros((), dtype=torch.float64, device=A.device)
        step = max(1, (1 << 22) // max(n, 1))
        for start in range(0, m, step):
            block = A[start : start + step].to(torch.float64) - mean
            total = total + block.square().sum()
        return total
    if isinstance(op, SparseOp):
        coo = op.coalesced()
        cols = coo.indices()[1]
        values = coo.values().to(torch.float64)
        mean = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, cols, values) / m
        stored = torch.bincount(cols, minlength=n).to(torch.float64)
        return ((values - mean[cols]).square().sum() + ((m - stored) * mean.square()).sum()).to(torch.float64)
    return CenteredOp(op).fro_norm_sq().to(torch.float64)


def _variance_ratio(
    variance: torch.Tensor,
    total_ss: torch.Tensor,
    data_ss: torch.Tensor,
    m: int,
    center: bool,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``explained_variance_ratio`` with 0/0 defined: zeros when the data have no variance.

    ``total_ss`` is the sum of squares of the centred data (float64), ``data_ss`` that of the data as
    given (both from :func:`_centred_ss`-like two-pass sums, accurate to ``eps^2 data_ss``). A centred sum of
    squares below ``(4 eps)^2 data_ss`` (eps of the compute dtype) is below the resolution of the data
    themselves (constant columns): the variance is then zero and so is every ratio, instead of 0/0
    (scikit-learn's PCA returns 1.0 there, from rounding noise). Otherwise the denominator is at least the
    variance found, so the ratios sum to at most 1.
    """
    dtype = variance.dtype if dtype is None else dtype  # the compute dtype: its eps, and the result's dtype
    eps = torch.finfo(dtype).eps
    denom = max(m - 1, 1)
    noise = (4.0 * eps) ** 2 * float(data_ss) if center else 0.0
    total = float(total_ss)
    if not total > noise:
        return torch.zeros_like(variance, dtype=dtype)
    total = max(total / denom, float(variance.double().sum()))
    return (variance.double() / total).to(dtype)


@no_autocast
def pca_transform(result: PCAResult, X: Any) -> torch.Tensor:
    """Scores ``(X − mean) @ components.T``, shape (n_samples, k); sparse X is never densified.

    X may be anything :func:`pca` accepts (dense/sparse torch, NumPy, scipy.sparse, linear operator).
    """
    if not isinstance(result, PCAResult):
        raise TypeError(f"result must be a PCAResult, got {type(result).__name__}")
    op = _real_op(X, "X")
    components = result.components
    if op.shape[1] != components.shape[1]:
        raise ValueError(f"X has {op.shape[1]} features but the PCA was fitted on {components.shape[1]}")
    C = components.to(device=op.device, dtype=op.dtype)
    mean = result.mean.to(device=op.device, dtype=op.dtype)
    return op.matmul(C.t()) - (mean @ C.t())[None, :]


@no_autocast
def pca_inverse_transform(result: PCAResult, Z: torch.Tensor) -> torch.Tensor:
    """Reconstruction ``Z @ components + mean``, shape (n_samples, n_features)."""
    if not isinstance(result, PCAResult):
        raise TypeError(f"result must be a PCAResult, got {type(result).__name__}")
    if isinstance(Z, torch.Tensor):
        check_tensor(Z, "Z", complex_ok=False)
        if Z.dim() == 2 and Z.numel() and not bool(torch.isfinite(Z).all()):
            raise ValueError("Z contains NaN or Inf entries")
    if not isinstance(Z, torch.Tensor) or Z.dim() != 2 or Z.shape[1] != result.components.shape[0]:
        shape = tuple(Z.shape) if isinstance(Z, torch.Tensor) else type(Z).__name__
        raise ValueError(f"Z must be a (n_samples, {result.components.shape[0]}) tensor, got {shape}")
    return Z.to(result.components.dtype) @ result.components + result.mean


def _narrow_blocks(op, k: int) -> tuple[int, int] | None:
    """``(block_size, n_iter)`` of the randomized PCA of fp32 sparse data on CPU with ``k >= 16``: Krylov
    blocks of ``ceil(3k/5)`` columns spanning at least ``4k`` (``None``: the wide defaults 4 and 10).

    Narrow blocks with more iterations reach a given accuracy with fewer passes (Musco & Musco 2015);
    sparse passes are cheap next to the per-block dense work, so the saving is in the subspace width.
    PCA asks for variances to fp32 accuracy (scikit-learn's ARPACK PCA reaches ~8e-7 of the top variance
    on bench_svd's sparse 20000 x 2000 at 0.5%, k = 20); measured there (CPU time, 1 thread,
    interleaved): blocks of 12 with 6 iterations 42 ms, variance error 8e-7; the wide defaults 69-82 ms,
    7e-7; ARPACK 56-63 ms. fp64 data keep the wide defaults (their accuracy goes to ~1e-10).
    """
    if not isinstance(op, SparseOp) or op.dtype != torch.float32 or op.device.type != "cpu" or k < 16:
        return None
    block = -(-3 * k // 5)
    n_iter = max(2, -(-4 * k // block) - 1)
    if (n_iter + 1) * block > min(op.shape) // 2:
        return None
    return block, n_iter


@no_autocast
def pca(
    X: Any,
    k: int,
    *,
    center: bool = True,
    method: str = "auto",
    seed: int | None = None,
    n_iter: int | None = None,
    oversample: int | None = None,
) -> PCAResult:
    r"""Principal component analysis: the top-``k`` principal axes of the rows of X.

    The SVD of the centred data ``X − 1 μᵀ = U S Vᵀ`` gives the axes (rows of Vᵀ) and the variances
    ``S²/(n_samples − 1)`` (Pearson 1901; Hotelling 1933; Jolliffe 2002). ``method="randomized"`` computes
    it with ``lowrank.rsvd`` (Halko, Martinsson & Tropp 2011), applying the centring implicitly inside
    every product (``(X − 1μᵀ)Ω = XΩ − 1(μᵀΩ)``), so sparse X is never densified -- unlike
    scikit-learn's PCA, which does not centre sparse input, and TruncatedSVD, which does not centre at all.

    Parameters
    ----------
    X : Tensor (dense or sparse), ndarray, scipy.sparse matrix, or linear operator
        Shape (n_samples, n_features); rows are samples. fp16/bf16 are computed in fp32.
    k : int
        Number of components, ``1 <= k <= min(n_samples, n_features)``.
    center : bool
        Remove the column means first (PCA). ``False`` gives the uncentred decomposition (what
        TruncatedSVD / LSA compute: the same ``components`` and ``singular_values``); ``mean`` is then
        zero, ``explained_variance`` is ``S²/(n_samples − 1)`` and ``explained_variance_ratio`` is
        ``S²/‖X‖_F²`` (second moments about zero). These are *not* TruncatedSVD's ``explained_variance_``
        and ``explained_variance_ratio_``, which are the variances of the score columns about their means
        over the total variance of the centred columns; compute those from ``result.transform(X)`` if
        needed.
    method : {"auto", "exact", "randomized"}
        ``"exact"``: full SVD (``lowrank.svd``), O(mn·min(m, n)), densifies sparse input. ``"randomized"``:
        ``lowrank.rsvd``, O(mnk) per pass, accurate when the spectrum decays. ``"auto"`` follows
        scikit-learn's rule: exact when X is dense with both sides <= 500 or ``k >= 0.8·min(m, n)``,
        randomized otherwise (always for sparse or implicit X).
    seed : int or torch.Generator, optional
        Seed of the randomized sketch.
    n_iter, oversample : int, optional
        Block Krylov iterations and extra block columns of the randomized SVD (``lowrank.rsvd`` with
        ``method="krylov"``, Musco & Musco 2015). Defaults 4 and 10: variances accurate to ~1e-10 relative
        on spectra decaying as slowly as 1000x over 400 components, at about the cost of scikit-learn's
        randomized PCA (which is ~1e-3 accurate there; see benchmarks/bench_factorize.py). Lower them
        (e.g. 2 and 2) for speed when a few digits suffice. When neither is given, fp32 sparse data on
        CPU with ``k >= 16`` use narrow Krylov blocks instead: ``block_size=ceil(3k/5)`` and the
        smallest ``n_iter`` spanning ``4k`` columns (variances to fp32 accuracy, ~1.5x faster).

    Returns
    -------
    PCAResult
        ``(components, explained_variance, explained_variance_ratio, mean, singular_values)`` with
        ``transform`` / ``inverse_transform`` methods.

    Notes
    -----
    The total variance behind ``explained_variance_ratio`` is computed exactly from ``‖X‖_F²`` and the
    means, ``(‖X‖_F² − m‖μ‖²)/(m − 1)`` (from the centred matrix itself when it is formed,
    ``method="exact"``), so the ratios are exact even when only k components are computed. Data without
    variance (constant columns, to rounding: a centred sum of squares below ``(4 eps)² ‖X‖_F²``) get
    ratios of 0, not 0/0; otherwise the ratios sum to at most 1.

    Raises
    ------
    TypeError
        X of an unsupported type, complex or non-floating dtype; ``seed`` not an int.
    ValueError
        NaN/Inf entries, bad ``k``, ``method``, fewer than 2 samples to centre, ``X`` on the meta device,
        ``seed`` outside ``[0, 2**63)``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    center = python_number(center)  # np.bool_ too
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    seed = check_seed(seed)
    op = _real_op(X, "X")
    m, n = op.shape
    k = _check_rank(k, "k", upper=min(m, n))
    if center and m < 2:
        raise ValueError("X needs at least 2 samples (rows) to centre")
    if method == "auto":
        small = max(m, n) <= 500 or k >= 0.8 * min(m, n)
        method = "exact" if isinstance(op, DenseOp) and small else "randomized"
    data = CenteredOp(op) if center else op
    if method == "exact":
        dense = data.to_dense()
        if not isinstance(op, DenseOp):
            dense = dense.to(op.dtype)
        _, S, Vh = svd(dense, k)
    else:
        narrow = _narrow_blocks(op, k) if n_iter is None and oversample is None else None
        if narrow is not None:
            options = dict(block_size=narrow[0], n_iter=narrow[1])
        else:
            options = dict(
                method="krylov",
                n_iter=4 if n_iter is None else n_iter,
                oversample=10 if oversample is None else oversample,
            )
        _, S, Vh = rsvd(op, k, center=center, seed=seed, **options)  # op: its transpose is built once
    S, Vh = S[:k], Vh[:k]
    # scikit-learn's sign convention (svd_flip with u_based_decision=False): largest |entry| of each axis > 0
    pick = Vh.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(Vh.gather(1, pick))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    components = Vh * signs
    mean = data.mean[:, 0] if center else torch.zeros(n, dtype=op.dtype, device=op.device)
    denom = max(m - 1, 1)
    # Variances in float64: S**2 of float32 data leaves float32's range beyond ~1e19 (inf) or below ~1e-19
    # (0), and the ratios must not (the variances themselves are returned in the data's dtype).
    variance64 = S.double().square() / denom
    explained_variance = variance64.to(S.dtype)
    # float64 data beyond ~1e154 or below ~1e-154: their sums of squares leave float64's range (ratios of 0
    # from inf or 0 totals); the ratios are scale-free, so take them on X / 2^e
    data_ss = op.fro_norm_sq()
    scaled, exponent = (op, 0) if 2.0**-900 < float(data_ss) < 2.0**900 else rescale_extreme(op)
    if exponent:
        data_ss = scaled.fro_norm_sq()
    total_ss = _centred_ss(scaled) if center else data_ss
    variance_scaled = times_power_of_two(S.double(), -exponent).square() / denom if exponent else variance64
    ratio = _variance_ratio(variance_scaled, total_ss, data_ss, m, center, dtype=S.dtype)
    return PCAResult(components.contiguous(), explained_variance, ratio, mean.contiguous(), S)
