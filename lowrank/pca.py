"""Principal component analysis on dense or sparse data (sparse data centred implicitly)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from lowrank.factor import _check_rank

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


def pca_transform(result: PCAResult, X: Any) -> torch.Tensor:
    """Scores ``(X − mean) @ components.T``, shape (n_samples, k); sparse X is never densified.

    X may be anything :func:`pca` accepts (dense/sparse torch, NumPy, scipy.sparse, linear operator).
    """
    from lowrank._linop import as_linop

    if not isinstance(result, PCAResult):
        raise TypeError(f"result must be a PCAResult, got {type(result).__name__}")
    op = as_linop(X, name="X", allow_batch=False)
    components = result.components
    if op.shape[1] != components.shape[1]:
        raise ValueError(f"X has {op.shape[1]} features but the PCA was fitted on {components.shape[1]}")
    C = components.to(device=op.device, dtype=op.dtype)
    mean = result.mean.to(device=op.device, dtype=op.dtype)
    return op.matmul(C.t()) - (mean @ C.t())[None, :]


def pca_inverse_transform(result: PCAResult, Z: torch.Tensor) -> torch.Tensor:
    """Reconstruction ``Z @ components + mean``, shape (n_samples, n_features)."""
    if not isinstance(result, PCAResult):
        raise TypeError(f"result must be a PCAResult, got {type(result).__name__}")
    if not isinstance(Z, torch.Tensor) or Z.dim() != 2 or Z.shape[1] != result.components.shape[0]:
        shape = tuple(Z.shape) if isinstance(Z, torch.Tensor) else type(Z).__name__
        raise ValueError(f"Z must be a (n_samples, {result.components.shape[0]}) tensor, got {shape}")
    return Z.to(result.components.dtype) @ result.components + result.mean


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
        TruncatedSVD / LSA compute); ``mean`` is then zero.
    method : {"auto", "exact", "randomized"}
        ``"exact"``: full SVD (``lowrank.svd``), O(mn·min(m, n)), densifies sparse input. ``"randomized"``:
        ``lowrank.rsvd``, O(mnk) per pass, accurate when the spectrum decays. ``"auto"`` follows
        scikit-learn's rule: exact when X is dense with both sides <= 500 or ``k >= 0.8·min(m, n)``,
        randomized otherwise (always for sparse or implicit X).
    seed : int, optional
        Seed of the randomized sketch.
    n_iter, oversample : int, optional
        Block Krylov iterations and extra block columns of the randomized SVD (``lowrank.rsvd`` with
        ``method="krylov"``, Musco & Musco 2015). Defaults 4 and 10: variances accurate to ~1e-10 relative
        on spectra decaying as slowly as 1000x over 400 components, at about the cost of scikit-learn's
        randomized PCA (which is ~1e-3 accurate there; see benchmarks/bench_factorize.py). Lower them
        (e.g. 2 and 2) for speed when a few digits suffice.

    Returns
    -------
    PCAResult
        ``(components, explained_variance, explained_variance_ratio, mean, singular_values)`` with
        ``transform`` / ``inverse_transform`` methods.

    Notes
    -----
    The total variance behind ``explained_variance_ratio`` is computed exactly from ``‖X‖_F²`` and the
    means, ``(‖X‖_F² − m‖μ‖²)/(m − 1)``, so the ratios are exact even when only k components are computed.
    """
    import lowrank
    from lowrank._linop import CenteredOp, DenseOp, as_linop

    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    op = as_linop(X, name="X", allow_batch=False)
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
        _, S, Vh = lowrank.svd(dense, k)
    else:
        _, S, Vh = lowrank.rsvd(
            op.A if hasattr(op, "A") else X,
            k,
            center=center,
            seed=seed,
            method="krylov",
            n_iter=4 if n_iter is None else n_iter,
            oversample=10 if oversample is None else oversample,
        )
    S, Vh = S[:k], Vh[:k]
    # scikit-learn's sign convention (svd_flip with u_based_decision=False): largest |entry| of each axis > 0
    pick = Vh.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(Vh.gather(1, pick))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    components = Vh * signs
    mean = data.mean[:, 0] if center else torch.zeros(n, dtype=op.dtype, device=op.device)
    denom = max(m - 1, 1)
    explained_variance = S.square() / denom
    total = data.fro_norm_sq().to(S.dtype) / denom
    ratio = explained_variance / total if float(total) > 0 else torch.zeros_like(explained_variance)
    return PCAResult(components.contiguous(), explained_variance, ratio, mean.contiguous(), S)
