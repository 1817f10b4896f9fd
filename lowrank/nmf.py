"""Non-negative matrix factorization ``X ≈ W @ H`` (HALS and multiplicative updates)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lowrank._linop import DenseOp, SparseOp, as_linop, check_seed, no_autocast
from lowrank.factor import (
    ConvergenceWarning,
    _check_float,
    _check_int,
    _check_rank,
    _generator,
    _is_sparse,
    _scale_exponent,
    _times_power_of_two,
)
from lowrank.svd import rsvd, svd

__all__ = ["nmf"]


class _Data:
    """X (dense, or sparse CSR with its transpose in CSR) with the two products NMF needs and a few sums."""

    def __init__(self, X: Any):
        op = as_linop(X, name="X", allow_batch=False)
        if not isinstance(op, (DenseOp, SparseOp)):
            raise TypeError(
                "X must be a dense or sparse matrix (NMF needs its entries), not a linear operator"
            )
        if op.dtype.is_complex:
            raise TypeError(f"X must be real (NMF), got complex dtype {op.dtype}")
        self.op, self.X, self.shape = op, op.A, op.shape
        values = op.A if isinstance(op, DenseOp) else op.A.values()
        self.nnz = values.numel()
        self.sq_norm = float(op.fro_norm_sq())
        self.sum = float(values.sum(dtype=torch.float64)) if self.nnz else 0.0
        self.min = float(values.min()) if self.nnz else 0.0
        self.max = float(values.max()) if self.nnz else 0.0

        self.dense = isinstance(op, DenseOp)
        self.coo = None if self.dense else op.A.to_sparse_coo().coalesce()

    def rows_times_xt(self, M: torch.Tensor) -> torch.Tensor:  # M @ X.T, (k, m)
        if self.dense:
            return M @ self.X.t()
        return self.op.matmul(M.t()).t().contiguous()

    def rows_times_x(self, M: torch.Tensor) -> torch.Tensor:  # M @ X, (k, n)
        if self.dense:
            return M @ self.X
        return self.op.rmatmul(M.t()).t().contiguous()


def _scaled(data: _Data, exponent: int) -> torch.Tensor:
    """X times ``2**exponent`` (exact; ``torch.ldexp``, since the factor alone may not fit X's dtype), dense
    or sparse CSR, without touching the caller's X."""
    factor = torch.tensor(exponent, device=data.X.device)
    if data.dense:
        return torch.ldexp(data.X, factor)
    A = data.op.A
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            A.crow_indices(),
            A.col_indices(),
            torch.ldexp(A.values(), factor),
            A.shape,
            check_invariants=False,
        )


def _objective(data: _Data, Wt: torch.Tensor, WtX: torch.Tensor, WtW: torch.Tensor, H: torch.Tensor) -> float:
    """½‖X − WH‖_F².

    float64: from the products already at hand, ‖X‖² − 2⟨WᵀX, H⟩ + ⟨WᵀW, HHᵀ⟩ (no m-by-n temporary).
    Lower precisions: that expansion cancels catastrophically near a good fit, so dense X gets the residual
    itself and sparse X the expansion with its terms accumulated in float64 over the stored entries.
    """
    if Wt.dtype == torch.float64:
        value = data.sq_norm - 2.0 * float((WtX * H).sum()) + float((WtW * (H @ H.t())).sum())
    elif data.dense:
        value = float(torch.linalg.matrix_norm(torch.addmm(data.X, Wt.t(), H, alpha=-1)).double() ** 2)
    else:
        coo = data.coo
        rows, cols = coo.indices()
        Wd, Hd = Wt.double(), H.double()
        cross = float((coo.values().double() * (Wd[:, rows] * Hd[:, cols]).sum(dim=0)).sum())
        value = data.sq_norm - 2.0 * cross + float(((Wd @ Wd.t()) * (Hd @ Hd.t())).sum())
    return 0.5 * max(value, 0.0)


def _small_positive(shape: tuple[int, int], avg: float, like: torch.Tensor, gen: torch.Generator | None):
    """``avg / 100 * |N(0, 1)|`` entries: the small random values of scikit-learn's "nndsvdar"."""
    noise = torch.randn(*shape, dtype=like.dtype, device=like.device, generator=gen).abs_()
    return noise.mul_(avg / 100)


def _nndsvd_init(X: torch.Tensor, data: _Data, k: int, variant: str, seed: int | None, solver: str):
    """NNDSVD (Boutsidis & Gallopoulos 2008), vectorised over the k singular pairs.

    No returned component is exactly zero: components whose singular value is (numerically) zero -- rank
    deficient or sparse data with ``k`` above its rank -- get small random values (``mean(X) / 100`` times
    ``|N(0, 1)|`` from ``seed``), as do all zero entries when ``solver="mu"`` (multiplicative updates
    never move a zero: scikit-learn's "nndsvdar"), so that no iteration starts from a stuck zero.
    """
    m, n = data.shape
    if k <= min(m, n) // 4 or _is_sparse(X):
        U, S, Vh = rsvd(X, k, seed=seed)
    else:
        U, S, Vh = svd(X, k)
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    V = Vh.t()
    up, un = U.clamp(min=0), (-U).clamp(min=0)
    vp, vn = V.clamp(min=0), (-V).clamp(min=0)
    nup, nun = up.norm(dim=0), un.norm(dim=0)
    nvp, nvn = vp.norm(dim=0), vn.norm(dim=0)
    pos, neg = nup * nvp, nun * nvn
    take_pos = pos >= neg
    tiny = torch.finfo(U.dtype).tiny
    u = torch.where(take_pos, up / nup.clamp(min=tiny), un / nun.clamp(min=tiny))
    v = torch.where(take_pos, vp / nvp.clamp(min=tiny), vn / nvn.clamp(min=tiny))
    scale = (S * torch.where(take_pos, pos, neg)).sqrt()
    W = u * scale
    H = (v * scale).t().contiguous()
    eps = 1e-6 * max(abs(float(W.max())), abs(float(H.max())), 1e-30)
    W = torch.where(W < eps, torch.zeros_like(W), W)
    H = torch.where(H < eps, torch.zeros_like(H), H)
    avg = data.sum / (m * n)
    if variant == "nndsvda":
        W = torch.where(W == 0, torch.full_like(W, avg), W)
        H = torch.where(H == 0, torch.full_like(H, avg), H)
    elif avg > 0:
        gen = _generator(seed, W.device)
        dead = ((W == 0).all(dim=0) | (H == 0).all(dim=1))[None, :]  # (1, k): the component is zero
        stuck = (W == 0) if solver == "mu" else dead.expand_as(W)
        W = torch.where(stuck, _small_positive(tuple(W.shape), avg, W, gen), W)
        stuck = (H == 0) if solver == "mu" else dead.t().expand_as(H)
        H = torch.where(stuck, _small_positive(tuple(H.shape), avg, H, gen), H)
    return W.contiguous(), H


def _hals_sweep(F: torch.Tensor, XG: torch.Tensor, G: torch.Tensor, buf: torch.Tensor) -> None:
    """One HALS pass over the rows of ``F`` (k, p), in place.

    Row j becomes ``max(0, F_j + (XG_j − G_j F) / G_jj)`` -- the exact minimiser of the objective over that
    row with the others fixed (Cichocki & Phan 2009). ``XG`` is ``H Xᵀ`` (or ``Wᵀ X``) and ``G`` the k-by-k
    Gram matrix of the other factor. Written as one ``addmv`` with the diagonal of G zeroed plus one clamp
    per row, so that the unavoidable loop over the k components costs two kernel launches per row.
    """
    diag = G.diagonal().clamp(min=torch.finfo(G.dtype).tiny).tolist()
    off = G.clone()
    off.diagonal().zero_()
    rows, targets, grams, Ft = F.unbind(0), XG.unbind(0), off.unbind(0), F.t()
    for j in range(F.shape[0]):
        torch.addmv(targets[j], Ft, grams[j], beta=1.0 / diag[j], alpha=-1.0 / diag[j], out=buf)
        torch.clamp(buf, min=0, out=rows[j])


def _hals_update(F: torch.Tensor, XG: torch.Tensor, G: torch.Tensor, max_inner: int) -> None:
    """Repeated HALS sweeps on the same products (Gillis & Glineur 2012): stop once a sweep moves F by
    less than 1% of what the first one did."""
    buf = torch.empty(F.shape[1], dtype=F.dtype, device=F.device)
    before = torch.empty_like(F)
    first = None
    for _ in range(max_inner):
        before.copy_(F)
        _hals_sweep(F, XG, G, buf)
        moved = float(before.sub_(F).norm())
        if first is None:
            first = moved
        elif moved <= 1e-2 * first:
            break


def _revive(F: torch.Tensor, G: torch.Tensor, avg: float, gen: torch.Generator | None) -> bool:
    """Refill the components (rows of ``F``, (k, p)) that HALS drove to exactly zero (``G = F F^T`` has a
    zero diagonal entry there) with small random values. A zero component is a fixed point of HALS: the
    other factor's update divides by that zero Gram entry and keeps its component at zero too. Refilling
    it while the other factor's component is zero leaves the objective unchanged, so the iteration stays
    monotone. Returns whether anything was refilled."""
    dead = G.diagonal() == 0
    if avg <= 0 or not bool(dead.any()):
        return False
    fresh = _small_positive((F.shape[0], F.shape[1]), avg, F, gen)
    F.copy_(torch.where(dead[:, None], fresh, F))
    return True


@no_autocast
def nmf(
    X: Any,
    k: int,
    *,
    init: str = "nndsvd",
    solver: str = "hals",
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int | None = None,
    return_history: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[float]]:
    r"""Non-negative matrix factorization: ``X ≈ W @ H`` with ``W, H >= 0``, minimising ``½‖X − WH‖_F²``.

    Solvers
    -------
    ``"hals"`` (default): hierarchical alternating least squares -- exact coordinate minimisation over
    one column of W (row of H) at a time (Cichocki & Phan 2009, "Fast local algorithms for large scale
    nonnegative matrix and tensor factorizations"), with the acceleration of Gillis & Glineur (2012,
    "Accelerated multiplicative updates and hierarchical ALS algorithms for nonnegative matrix
    factorization"): the expensive products ``X Hᵀ`` / ``Wᵀ X`` are formed once per outer iteration and
    reused for several cheap inner sweeps while they still make progress. This is the algorithm of
    scikit-learn's ``solver="cd"``; it converges much faster than ``"mu"``.

    ``"mu"``: multiplicative updates of Lee & Seung (2001, "Algorithms for non-negative matrix
    factorization"); simple, monotone, but slow to converge. Entries that start at zero stay zero, so the
    zeros of an ``init="nndsvd"`` start are replaced by small random values (scikit-learn's "nndsvdar");
    ``init="nndsvda"`` fills them with the mean of X instead.

    Degenerate starts: no component starts exactly zero (components of numerically zero singular values
    get small random values from ``seed``), and a HALS component driven to exactly zero is refilled the
    same way, since HALS would never move it again.

    Parameters
    ----------
    X : Tensor (dense or sparse), numpy array or scipy.sparse matrix, shape (m, n)
        Non-negative data (float32 or float64). Sparse X is never densified: the solver only needs
        ``X @ Hᵀ`` and ``Xᵀ @ W``. A tensor that requires grad is read detached (no gradient flows
        through the iterations).
    k : int
        Number of components, >= 1 (``k <= min(m, n)`` for the NNDSVD initialisations).
    init : {"nndsvd", "nndsvda", "random"}
        ``"nndsvd"``: non-negative double SVD (Boutsidis & Gallopoulos 2008, "SVD based initialization: a
        head start for nonnegative matrix factorization") from the rank-k truncated SVD
        (``lowrank.svd`` / ``lowrank.rsvd``); deterministic up to the sketch, good for sparse factors.
        ``"nndsvda"``: the same with its zeros replaced by the mean of X (better for ``"mu"``).
        ``"random"``: ``√(mean(X)/k)·|N(0, 1)|`` entries (scikit-learn's scaling).
    solver : {"hals", "mu"}
    max_iter : int
        Maximum number of outer iterations (each one updates W and then H).
    tol : float
        Stop when the objective decreased by less than ``tol`` times its value over one iteration.
        ``1e-4`` matches scikit-learn's default accuracy; use ``1e-6`` for a tighter fit.
    seed : int, optional
        Seed of the random initialisation / sketch.
    return_history : bool
        Also return the objective ``½‖X − WH‖_F²`` after every iteration.

    Returns
    -------
    W : Tensor, shape (m, k), non-negative
    H : Tensor, shape (k, n), non-negative
    history : list of float
        Only with ``return_history=True``.

    Notes
    -----
    Cost per outer iteration: two products with X, O(nnz(X)·k) (O(mnk) dense), plus O((m + n)k²) per HALS
    sweep. The loop over the k components in a HALS sweep is inherent to the method (each column update
    uses the previous ones); every step inside it is a vectorised matrix-vector product. Runs on the
    device of X (CPU or CUDA).

    Raises
    ------
    TypeError
        X of an unsupported type, complex or non-floating; ``seed`` not an int.
    ValueError
        Negative or non-finite entries, bad ``k``, unknown ``init``/``solver``, ``max_iter < 1``, ``tol < 0``
        or NaN, ``seed`` outside ``[0, 2**63)``, X on the meta device.

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` iterations ran without meeting ``tol`` (``tol > 0``), as scikit-learn warns.
    """
    if isinstance(X, torch.Tensor) and X.requires_grad:
        X = X.detach()  # the iterations run in place: NMF is not differentiable through them
    data = _Data(X)
    X = data.X
    m, n = data.shape
    k = _check_rank(k, "k")
    if init not in ("nndsvd", "nndsvda", "random"):
        raise ValueError(f"init must be 'nndsvd', 'nndsvda' or 'random', got {init!r}")
    if solver not in ("hals", "mu"):
        raise ValueError(f"solver must be 'hals' or 'mu', got {solver!r}")
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    tol = _check_float(tol, "tol")
    if init != "random" and k > min(m, n):
        raise ValueError(f"k={k} exceeds min(X.shape)={min(m, n)}; use init='random' for k > min(m, n)")

    seed = check_seed(seed, allow_generator=False)
    if data.min < 0:
        raise ValueError(f"X must be non-negative (NMF), its smallest entry is {data.min:g}")
    # NMF is scale-equivariant: nmf(c X) = (sqrt(c) W, sqrt(c) H). Data far from unit scale are divided by
    # a power of 4 near their largest entry (exact, no rounding) and the factors multiplied back, so that
    # products of the factors and the objective neither under- nor overflow (fp32 data at 1e-30 stopped
    # at once on an objective that underflowed to zero; at 1e30 the products with X overflowed to NaN).
    exponent = _scale_exponent(data.max)
    if exponent:
        data = _Data(_scaled(data, -exponent))
        X = data.X

    dtype, device = X.dtype, X.device
    if init == "random":
        gen = _generator(seed, device)
        scale = (data.sum / (m * n) / k) ** 0.5
        W = scale * torch.randn(m, k, dtype=dtype, device=device, generator=gen).abs_()
        H = scale * torch.randn(k, n, dtype=dtype, device=device, generator=gen).abs_()
    else:
        W, H = _nndsvd_init(X, data, k, init, seed, solver)
        W, H = W.to(dtype), H.to(dtype)

    if data.sq_norm == 0.0:
        W.zero_(), H.zero_()
        return (W, H, [0.0]) if return_history else (W, H)

    history: list[float] = []
    eps = torch.finfo(dtype).eps
    # Gillis & Glineur: an inner sweep costs (m + n)k^2 flops against 2 nnz k for the two products; allow
    # up to 1 + 0.5 * rho of them per outer iteration.
    nnz = data.nnz
    max_inner = int(min(10, 1 + 0.5 * (2 * nnz + (m + n) * k) / ((m + n) * k + 1)))
    Wt, H = W.t().contiguous(), H.contiguous()  # both factors stored component-major, (k, m) and (k, n)
    previous = None
    avg = data.sum / (m * n)
    gen = _generator(seed, device) if seed is not None else None
    converged = False
    for _ in range(max_iter):
        HXt = data.rows_times_xt(H)
        HHt = H @ H.t()
        if solver == "hals":
            _hals_update(Wt, HXt, HHt, max_inner)
        else:
            Wt.mul_(HXt / (HHt @ Wt).clamp_(min=eps))
        WtW = Wt @ Wt.t()
        if solver == "hals" and _revive(Wt, WtW, avg, gen):
            WtW = Wt @ Wt.t()
        WtX = data.rows_times_x(Wt)
        if solver == "hals":
            _hals_update(H, WtX, WtW, max_inner)
        else:
            H.mul_(WtX / (WtW @ H).clamp_(min=eps))
        objective = _objective(data, Wt, WtX, WtW, H)
        history.append(objective)
        if previous is not None and previous - objective <= tol * max(previous, 1e-300):
            converged = True
            break
        previous = objective
    if not converged and tol > 0:
        warnings.warn(
            f"nmf stopped at max_iter={max_iter} before the objective's relative decrease fell below "
            f"tol={tol}; raise max_iter or tol",
            ConvergenceWarning,
            stacklevel=3,
        )
    W = Wt.t().contiguous()
    W, H = W.contiguous(), H.contiguous()
    if exponent:
        half = torch.tensor(exponent // 2, device=device)
        W, H = torch.ldexp(W, half), torch.ldexp(H, half)
        history = [_times_power_of_two(value, 2 * exponent) for value in history]
    return (W, H, history) if return_history else (W, H)
