"""Scale-out on ``torch.distributed``: randomized SVD and PCA of a row-sharded matrix, LoRA checkpoints.

Each rank of a process group holds a block of rows of ``A`` (block sizes may differ, a block may be
empty). :func:`rsvd` and :func:`pca` factor the whole matrix with collectives only: every message is a
small ``b x b`` Gram matrix or a ``n x b`` product (``b = k + oversample``), never a block of rows, so the
volume per pass scales with ``n b`` and not with ``m`` (see :func:`rsvd_comm_bytes`; count it with
:func:`comm_log`). lowrank brings no transport of its own: NCCL on GPUs, gloo on CPUs, whatever group the
caller initialised.

For LoRA, :func:`save_adapter` and :func:`load_adapter` handle models wrapped in
``DistributedDataParallel`` or sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): the adapter is
gathered (only the adapter, never the frozen base weights) and written once, by rank 0; every rank reads
it back into its own shard.

References
----------
N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011.
C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster approximate singular value
decomposition", NeurIPS 2015.
T. Fukaya, Y. Nakatsukasa, Y. Yanagisawa, Y. Yamamoto, "CholeskyQR2: a simple and communication-avoiding
algorithm for computing a tall-skinny QR factorization on a large-scale parallel system", ScalA 2014.
T. Fukaya, R. Kannan, Y. Nakatsukasa, Y. Yamamoto, Y. Yanagisawa, "Shifted Cholesky QR for computing the
QR factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 42(1), 2020.
J. Demmel, L. Grigori, M. Hoemmen, J. Langou, "Communication-optimal parallel and sequential QR and LU
factorizations", SIAM J. Sci. Comput. 34(1), 2012 (TSQR).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowrank._linop import (
    DenseOp,
    LinOp,
    SparseOp,
    as_linop,
    check_not_meta,
    check_seed,
    compute_dtype,
    no_autocast,
    python_number,
    times_power_of_two,
)
from lowrank.pca import PCAResult, _variance_ratio
from lowrank.qr import cholesky_qr, orthonormalize
from lowrank.sketch import StreamingSVD
from lowrank.svd import SVDResult, _check_k, _check_nonneg_int, _default_params, _generator

__all__ = [
    "CommLog",
    "comm_log",
    "load_adapter",
    "pca",
    "reduce_sketch",
    "rsvd",
    "rsvd_comm_bytes",
    "save_adapter",
]

_METHODS = ("auto", "subspace", "krylov")
_PCA_METHODS = ("auto", "exact", "randomized")
_HEADER = 10  # int64 entries of the argument header each rank contributes

# --------------------------------------------------------------------------------------------- counting


@dataclass
class CommLog:
    """Collective traffic recorded by :func:`comm_log` on this rank.

    Attributes
    ----------
    bytes : int
        Payload bytes: for ``all_reduce`` the size of the reduced tensor, for ``all_gather`` the size of the
        gathered result (``world_size`` pieces). A ring all-reduce moves about ``2 (P - 1) / P`` times the
        payload in and out of each rank.
    calls : int
        Number of collectives.
    by_kind : dict[str, int]
        Payload bytes per kind (``"gram"``, ``"product"``, ``"header"``, ``"tsqr"``, ``"signs"``, ...).
    """

    bytes: int = 0
    calls: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes += nbytes
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes


_LOGS: list[CommLog] = []


@contextlib.contextmanager
def comm_log() -> Iterator[CommLog]:
    """Record the collectives lowrank.distributed issues on this rank inside the ``with`` block."""
    log = CommLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(kind: str, nbytes: int) -> None:
    for log in _LOGS:
        log.add(kind, nbytes)


def _all_reduce(t: torch.Tensor, group, kind: str) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    _record(kind, t.numel() * t.element_size())
    return t


def _all_gather(t: torch.Tensor, group, world: int, kind: str) -> torch.Tensor:
    t = t.contiguous()
    pieces = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(pieces, t, group=group)
    out = torch.stack(pieces)
    _record(kind, out.numel() * out.element_size())
    return out


# --------------------------------------------------------------------------------------------- setup


def _group_info(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first "
            "(e.g. under torchrun)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _local_op(A_local: Any, name: str = "A_local") -> LinOp:
    """The input adapter for one rank's block; an empty block (0 rows) is allowed here."""
    shape = getattr(A_local, "shape", None)
    if shape is not None and len(shape) == 2 and int(shape[0]) == 0 and int(shape[1]) > 0:
        if isinstance(A_local, torch.Tensor):
            check_not_meta(A_local, name)
        dtype = A_local.dtype
        if not isinstance(dtype, torch.dtype):
            dtype = torch.from_numpy(__import__("numpy").empty(0, dtype=dtype)).dtype
        dtype = compute_dtype(dtype, name)
        device = A_local.device if isinstance(A_local, torch.Tensor) else torch.device("cpu")
        return DenseOp(torch.zeros(0, int(shape[1]), dtype=dtype, device=device))
    return as_linop(A_local, name=name, check_finite=False, allow_batch=False)


_DTYPE_IDS = {torch.float32: 1, torch.float64: 2}


def _generator_digest(gen: torch.Generator) -> int:
    digest = hashlib.sha256(gen.get_state().cpu().numpy().tobytes()).digest()
    return int.from_bytes(digest[:7], "little")


def _agree(
    rank: int,
    world: int,
    group,
    device: torch.device,
    local: list[int],
    error: Exception | None,
) -> torch.Tensor:
    """All-gather each rank's argument header; raise on every rank if any rank's arguments are bad.

    ``local`` holds ``_HEADER - 1`` integers; entry 0 of the header is the "arguments valid" flag. One
    collective of ``_HEADER`` int64 per rank, so that a bad argument on one rank is an error on all ranks
    instead of a hang in the next collective.
    """
    header = torch.tensor([0 if error is not None else 1, *local], dtype=torch.int64, device=device)
    table = _all_gather(header, group, world, "header").cpu()
    if error is not None:
        raise error
    bad = (table[:, 0] == 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"invalid arguments on rank(s) {bad} (see the error raised there)")
    return table


# --------------------------------------------------------------------------------------------- kernels


class _ShardedOp:
    """Row block of ``A`` (optionally centred by a replicated mean) plus the group to sum over."""

    def __init__(
        self,
        op: LinOp,
        group,
        rank: int,
        world: int,
        m_total: int,
        mean: torch.Tensor | None,
        name: str = "A_local",
    ):
        self.name = name  # the argument named in error messages
        self.op = op
        self.group = group
        self.rank = rank
        self.world = world
        self.m = m_total
        self.n = op.shape[1]
        self.mean = mean  # (n, 1) or None
        self.dtype = op.dtype
        self.device = op.device

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        """Local rows of ``A X`` (``X`` replicated): no communication."""
        out = self.op.matmul(X)
        if self.mean is not None:
            out = out - self.mean.mT @ X
        return out

    def rmatmul(self, Y_local: torch.Tensor) -> torch.Tensor:
        """``A^T Y`` replicated: one all-reduce of ``n x b``."""
        out = self.op.rmatmul(Y_local)
        if self.mean is not None:
            out = out - self.mean @ Y_local.sum(dim=0, keepdim=True)
        return _all_reduce(out, self.group, "product")

    def gram(self, X_local: torch.Tensor) -> torch.Tensor:
        """``X^T X`` replicated: one all-reduce of ``b x b``."""
        return _all_reduce(X_local.mT @ X_local, self.group, "gram")


def _tsqr(X_local: torch.Tensor, sop: _ShardedOp) -> tuple[torch.Tensor, torch.Tensor]:
    """TSQR (Demmel et al. 2012), one level: local Householder QR, all-gather the ``b x b`` R factors,
    QR of the stack (replicated). Unconditionally stable; ``P b^2`` numbers gathered."""
    m_loc, b = X_local.shape
    Q_loc, R_loc = torch.linalg.qr(X_local)
    if m_loc < b:  # pad so every rank contributes a b x b factor (an empty block contributes zeros)
        Q_loc = torch.cat([Q_loc, Q_loc.new_zeros(m_loc, b - Q_loc.shape[1])], dim=1)
        R_loc = torch.cat([R_loc, R_loc.new_zeros(b - R_loc.shape[0], b)], dim=0)
    stacked = _all_gather(R_loc, sop.group, sop.world, "tsqr").reshape(sop.world * b, b)
    Q_s, R = torch.linalg.qr(stacked)
    return Q_loc @ Q_s[sop.rank * b : (sop.rank + 1) * b], R


def _shift(G: torch.Tensor, m: int) -> float:
    """Fukaya et al. (2020) shift ``11 (m b + b (b + 1)) u ||X||_F^2`` from the Gram matrix."""
    b = G.shape[-1]
    u = torch.finfo(G.dtype).eps / 2
    return 11.0 * (m * b + b * (b + 1)) * u * float(torch.diagonal(G).sum())


def _chol(G: torch.Tensor, shift: float = 0.0) -> torch.Tensor | None:
    """Upper Cholesky factor of ``G + shift I``; ``None`` on breakdown. ``G`` is replicated, so every rank
    takes the same branch without further communication."""
    if shift:
        G = G + shift * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return None
    return L.mT


def _too_ill_conditioned(R: torch.Tensor) -> bool:
    diag = torch.diagonal(R).abs()
    u = torch.finfo(R.dtype).eps / 2
    return bool(diag.amax() > 0.1 * u**-0.5 * diag.amin())


def _solve(X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(R, X, upper=True, left=False)


def _normalise(Y_local: torch.Tensor, sop: _ShardedOp, first: bool = False) -> torch.Tensor:
    """A well-conditioned basis of ``range(Y)`` for the power steps (only the span matters there).

    One Gram all-reduce: a CholeskyQR pass, shifted (Fukaya et al. 2020) when ``Y`` is too ill conditioned;
    TSQR if even that breaks down. ``first`` turns a non-finite Gram matrix into the NaN/Inf error.
    """
    G = sop.gram(Y_local)
    if not bool(torch.isfinite(G).all()):
        if first:
            raise ValueError(
                f"{sop.name} contains NaN or Inf entries (or its products overflow) on some rank"
            )
        return _tsqr(Y_local, sop)[0]
    R = _chol(G)
    if R is None or _too_ill_conditioned(R):
        R = _chol(G, _shift(G, sop.m))
    if R is None:
        return _tsqr(Y_local, sop)[0]
    return _solve(Y_local, R)


def _orthonormal_basis(Y_local: torch.Tensor, sop: _ShardedOp, first: bool = False) -> torch.Tensor:
    """Distributed CholeskyQR2 (two Gram all-reduces), shifted CholeskyQR3 when ``Y`` is ill conditioned
    (three), TSQR when ``Y`` is numerically rank deficient. Orthogonality ``O(u)`` in all cases."""
    G = sop.gram(Y_local)
    if not bool(torch.isfinite(G).all()):
        if first:
            raise ValueError(
                f"{sop.name} contains NaN or Inf entries (or its products overflow) on some rank"
            )
        return _tsqr(Y_local, sop)[0]
    R = _chol(G)
    passes = 1
    if R is None or _too_ill_conditioned(R):
        R = _chol(G, _shift(G, sop.m))
        passes = 2
        if R is None:
            return _tsqr(Y_local, sop)[0]
    Q = _solve(Y_local, R)
    for _ in range(passes):
        G = sop.gram(Q)
        R = _chol(G)
        if R is None:
            return _tsqr(Y_local, sop)[0]
        Q = _solve(Q, R)
    # G is the Gram matrix of the last pass's input: near I means that input was well conditioned, so the
    # output is orthonormal to working precision (Yamamoto et al. 2015); otherwise fall back to TSQR
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    if float(torch.linalg.matrix_norm(G - eye)) > 0.5:
        return _tsqr(Y_local, sop)[0]
    return Q


def _signs(U_local: torch.Tensor, Vh: torch.Tensor, sop: _ShardedOp) -> tuple[torch.Tensor, torch.Tensor]:
    """lowrank's sign convention over the whole ``U``: its largest-magnitude entry per column is positive.

    One all-gather of ``2 k`` numbers per rank; ties go to the first row, as in the single-process code.
    """
    k = U_local.shape[1]
    if U_local.shape[0]:
        absmax, idx = U_local.abs().max(dim=0)
        pivot = U_local.gather(0, idx[None, :])[0]
    else:
        absmax = U_local.new_full((k,), -1.0)
        pivot = U_local.new_ones(k)
    table = _all_gather(torch.stack([absmax, pivot]), sop.group, sop.world, "signs")  # (P, 2, k)
    owner = table[:, 0, :].argmax(dim=0)  # first rank holding the global maximum
    chosen = table[:, 1, :].gather(0, owner[None, :])[0]
    sign = torch.where(chosen < 0, -1.0, 1.0).to(U_local.dtype)
    return U_local * sign, Vh * sign[:, None]


def _ritz(Q_local: torch.Tensor, W: torch.Tensor, k: int, sop: _ShardedOp) -> SVDResult:
    """Rayleigh-Ritz on ``A ~= Q W^T`` (``W = A^T Q`` replicated): all small work is replicated."""
    Qw, Rw = cholesky_qr(W)  # W replicated: every rank computes the same factors
    Ur, S, Vwh = torch.linalg.svd(Rw)
    U_local = Q_local @ Vwh[:k].mT
    Vh = (Qw @ Ur[:, :k]).mT
    U_local, Vh = _signs(U_local, Vh, sop)
    return SVDResult(U_local, S[:k], Vh.contiguous())


def _exact(sop: _ShardedOp, k: int) -> SVDResult:
    """Exact truncated SVD by TSQR of the (centred) rows, then the SVD of the ``n x n`` triangle."""
    n = sop.n
    eye = torch.eye(n, dtype=sop.dtype, device=sop.device)
    block = sop.matmul(eye)  # the local rows, densified (and centred)
    if _consensus(not bool(torch.isfinite(block).all()), sop.group, sop.device):
        raise ValueError(f"{sop.name} contains NaN or Inf entries on some rank")
    Q_local, R = _tsqr(block, sop)
    Ur, S, Vh = torch.linalg.svd(R)
    U_local, Vh = _signs(Q_local @ Ur[:, :k], Vh[:k], sop)
    return SVDResult(U_local, S[:k], Vh.contiguous())


def _subspace(sop: _ShardedOp, gen: torch.Generator, k: int, width: int, n_iter: int) -> SVDResult:
    omega = torch.randn(sop.n, width, dtype=sop.dtype, device=sop.device, generator=gen)
    Y = sop.matmul(omega)
    if n_iter == 0:
        Q = _orthonormal_basis(Y, sop, first=True)
        return _ritz(Q, sop.rmatmul(Q), k, sop)
    for i in range(n_iter):
        Z = sop.rmatmul(_normalise(Y, sop, first=i == 0))
        Y = sop.matmul(orthonormalize(Z, "lu"))  # Z is replicated: the single-process step, on every rank
    Q = _orthonormal_basis(Y, sop)
    return _ritz(Q, sop.rmatmul(Q), k, sop)


def _block_krylov(sop: _ShardedOp, gen: torch.Generator, k: int, block: int, n_iter: int) -> SVDResult:
    omega = torch.randn(sop.n, block, dtype=sop.dtype, device=sop.device, generator=gen)
    Q = _orthonormal_basis(sop.matmul(omega), sop, first=True)
    bases, images = [Q], []
    for _ in range(n_iter):
        W = sop.rmatmul(Q)
        images.append(W)
        Y = sop.matmul(orthonormalize(W, "lu"))
        basis = torch.cat(bases, dim=1)
        Y = Y - basis @ _all_reduce(basis.mT @ Y, sop.group, "gram")
        Y = _normalise(Y, sop)
        Y = Y - basis @ _all_reduce(basis.mT @ Y, sop.group, "gram")
        Q = _orthonormal_basis(Y, sop)
        bases.append(Q)
    images.append(sop.rmatmul(Q))
    return _ritz(torch.cat(bases, dim=1), torch.cat(images, dim=1), k, sop)


# --------------------------------------------------------------------------------------------- public


def _prepare(A_local, group, what: str, extra: list[int], error: Exception | None, name: str = "A_local"):
    """Adapter + argument header shared by rsvd and pca. Returns (op, rank, world, m_total, table)."""
    rank, world = _group_info(group)
    op = None
    try:
        op = _local_op(A_local, name)
        if op.dtype not in _DTYPE_IDS:
            raise TypeError(
                f"{name}: {what} supports float32/float64 (fp16/bf16 computed in fp32), got {op.dtype}"
            )
    except (TypeError, ValueError) as bad:
        error = error or bad
    device = op.device if op is not None else torch.device("cpu")
    if isinstance(A_local, torch.Tensor) and A_local.is_cuda:
        device = A_local.device
    m_loc, n = op.shape if op is not None else (0, 0)
    dtype_id = _DTYPE_IDS.get(op.dtype, 0) if op is not None else 0
    table = _agree(rank, world, group, device, [m_loc, n, dtype_id, *extra], error)
    names = {v: str(k).removeprefix("torch.") for k, v in _DTYPE_IDS.items()}
    for col, label in ((2, "number of columns"), (3, "dtype")):
        if (table[:, col] != table[0, col]).any():
            values = table[:, col].tolist()
            shown = [names.get(v, "invalid") for v in values] if col == 3 else values
            raise ValueError(f"{name}: the {label} differs between ranks (by rank: {shown})")
    last = _HEADER if int(table[0, -2]) != 0 else _HEADER - 1  # a seed drawn by each rank: rank 0's wins
    labels = ("k", "oversample", "n_iter", "method" if what == "rsvd" else "method or center", "seed", "seed")
    differ = [labels[col - 4] for col in range(4, last) if (table[:, col] != table[0, col]).any()]
    if differ:
        raise ValueError(
            f"{what}: the arguments (k, oversample, n_iter, method, seed) differ between ranks: "
            f"{', '.join(dict.fromkeys(differ))} (pass the same values on every rank)"
        )
    m_total = int(table[:, 1].sum())
    if m_total == 0:
        raise ValueError(f"{name}: every rank holds zero rows")
    return op, rank, world, m_total, table


def _seed_fields(seed: Any) -> tuple[list[int], Exception | None]:
    """Two header fields describing the seed; None draws one on rank 0 (used by every rank)."""
    try:
        seed = check_seed(seed)
    except (TypeError, ValueError) as bad:
        return [0, 0], bad
    if seed is None:
        return [0, secrets.randbits(62)], None
    if isinstance(seed, torch.Generator):
        return [2, _generator_digest(seed)], None
    return [1, seed % (1 << 62)], None


def _resolve_seed(seed: Any, table: torch.Tensor, device: torch.device) -> torch.Generator:
    if seed is None:  # rank 0's draw, so that every rank builds the same sketch
        return _generator(int(table[0, -1]), device)
    return _generator(seed, device)


@no_autocast
def rsvd(
    A_local: Any,
    k: int,
    *,
    group: dist.ProcessGroup | None = None,
    oversample: int | None = None,
    n_iter: int | None = None,
    method: str = "auto",
    seed: int | torch.Generator | None = None,
) -> SVDResult:
    r"""Randomized truncated SVD of a matrix whose rows are spread over the ranks of a process group.

    Rank ``r`` passes its block ``A_r`` (``m_r x n``; the ``m_r`` may differ, one may be 0); the matrix is
    ``A = [A_0; A_1; ...]`` in rank order. Call it on every rank of ``group`` with the same arguments.

    Parameters
    ----------
    A_local : Tensor (dense or sparse), ndarray, scipy.sparse matrix, or linear operator, shape (m_r, n)
        This rank's rows (2-D; fp16/bf16 computed in fp32). Everything :func:`lowrank.rsvd` accepts.
    k : int
        Target rank, ``1 <= k <= min(m, n)`` with ``m = sum m_r``.
    group : ProcessGroup, optional
        The group to factor over (default: the world). gloo for CPU tensors, NCCL for CUDA tensors.
    oversample, n_iter : int, optional
        As in :func:`lowrank.rsvd` (defaults: ``"subspace"`` ``max(10, k // 2)`` and 4, ``"krylov"``
        ``max(2, k // 8)`` and 2).
    method : {"auto", "subspace", "krylov"}
        As in :func:`lowrank.rsvd`, same defaults (``"auto"`` resolves the same way). Fixed-precision mode
        (``tol``) is not offered: it would need a collective per block to decide when to stop.
    seed : int or torch.Generator, optional
        Seed of the Gaussian test matrix ``Omega`` (``n x (k + oversample)``), drawn identically on every
        rank with the generator :func:`lowrank.rsvd` uses, so the sketch is the single-process sketch.
        ``None`` draws a seed on rank 0 and uses it everywhere. A generator must be in the same state on
        every rank (checked).

    Returns
    -------
    SVDResult
        ``(U_local, S, Vh)``: ``U_local`` (m_r, k), the rows of ``U`` for this rank's block; ``S`` (k,) and
        ``Vh`` (k, n) replicated. Equal, to rounding, to ``lowrank.rsvd(A, k, ...)`` with the same seed,
        method and parameters, including the sign convention (largest-magnitude entry of each column of
        the whole ``U`` positive).

    Raises
    ------
    ValueError, TypeError
        On every rank, if the arguments on any rank are bad or disagree (shapes, dtype, k, seed), or if
        ``A`` has NaN/Inf entries on some rank. A rank that never calls (it crashed) makes the others fail
        after the process group's timeout (``init_process_group(timeout=...)``), not hang.

    Notes
    -----
    The algorithms are those of :func:`lowrank.rsvd` (Halko et al. 2011; Musco & Musco 2015); only the
    orthonormalisation of row-sharded blocks changes: distributed CholeskyQR2 (Fukaya et al. 2014), one
    ``b x b`` Gram all-reduce per pass, shifted CholeskyQR3 (Fukaya et al. 2020) when the block is ill
    conditioned, one-level TSQR (Demmel et al. 2012, all-gather of ``b x b`` triangles) when even that
    breaks down. Power steps normalise by one (possibly shifted) CholeskyQR pass instead of the LU
    normalisation of the single-process code (no pivoted LU across ranks); only the span matters there.

    Communication, ``subspace`` with ``b = k + oversample`` and ``q = n_iter`` (the fast path; see
    :func:`rsvd_comm_bytes`): ``(q + 1)`` all-reduces of ``n x b`` products ``A^T Y``, ``q + 2`` of ``b x b``
    Gram matrices, one all-gather of ``2k`` numbers per rank (signs) and one of 10 int64 (arguments):
    ``s [(q + 1) n b + (q + 2) b^2 + 2 P k] + 80 P`` bytes for ``s``-byte scalars and ``P`` ranks.
    Independent of ``m``. Work per rank: ``2 (q + 1)`` passes over ``A_r`` (``4 (q + 1) m_r n b`` flops)
    plus ``O(m_r b^2 + n b^2)``. When ``k + oversample`` reaches ``min(m, n)`` the exact SVD is computed by
    TSQR of ``A`` (all-gather of ``P n^2`` numbers) as :func:`lowrank.rsvd` switches to its exact path.
    """
    error: Exception | None = None
    k, oversample, n_iter = python_number(k), python_number(oversample), python_number(n_iter)
    if method not in _METHODS:
        error = ValueError(f"method must be one of {_METHODS}, got {method!r}")
    try:
        for name, value in (("oversample", oversample), ("n_iter", n_iter)):
            if value is not None:
                _check_nonneg_int(value, name)
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
    except (TypeError, ValueError) as bad:
        error = error or bad
    seed_fields, seed_error = _seed_fields(seed)
    error = error or seed_error
    extra = [
        k if isinstance(k, int) else 0,
        -1 if not isinstance(oversample, int) else oversample,
        -1 if not isinstance(n_iter, int) else n_iter,
        _METHODS.index(method) if method in _METHODS else -1,
        *seed_fields,
    ]
    op, rank, world, m_total, table = _prepare(A_local, group, "rsvd", extra, error)
    sop = _ShardedOp(op, group, rank, world, m_total, None)
    return _rsvd(sop, k, oversample, n_iter, method, _resolve_seed(seed, table, op.device))


def _rsvd(sop: _ShardedOp, k: int, oversample, n_iter, method: str, gen: torch.Generator) -> SVDResult:
    k = _check_k(k, min(sop.m, sop.n))
    method, default_over, default_iter = _default_params(method, k, sop.m, sop.n, sop.device, n_iter)
    over = default_over if oversample is None else oversample
    q = default_iter if n_iter is None else n_iter
    width = (k + over) * (q + 1 if method == "krylov" else 1)
    if width >= min(sop.m, sop.n):
        return _exact(sop, k)
    if method == "krylov":
        return _block_krylov(sop, gen, k, k + over, q)
    return _subspace(sop, gen, k, k + over, q)


def rsvd_comm_bytes(
    n: int,
    k: int,
    *,
    world_size: int,
    oversample: int | None = None,
    n_iter: int | None = None,
    method: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> int:
    """Payload bytes per rank that :func:`rsvd` communicates on its fast path (no fallback), as counted by
    :func:`comm_log`: all-reduces count the reduced tensor, all-gathers the gathered result.

    ``subspace`` (``b = k + p``, ``q`` power iterations): ``s [(q+1) n b + (q+2) b^2 + 2 P k] + 80 P``.
    ``krylov`` (block ``b``): ``s [(q+1) n b + (2 + 3q + q(q+1)) b^2 + 2 P k] + 80 P``. The ``m`` rows never
    travel. Assumes the randomized path (``width < min(m, n)``).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    # "auto" resolves as for a tall matrix (m >= n), the case row sharding is for.
    method, default_over, default_iter = _default_params(method, k, n, n, torch.device("cpu"), n_iter)
    b = k + (default_over if oversample is None else oversample)
    q = default_iter if n_iter is None else n_iter
    s = torch.empty(0, dtype=dtype).element_size()
    grams = q + 2 if method == "subspace" else 2 + 3 * q + q * (q + 1)
    return s * ((q + 1) * n * b + grams * b * b + 2 * world_size * k) + 8 * _HEADER * world_size


_SKETCH_CONFIG = ("n_features", "k", "sketch", "core", "n_test", "seed", "center", "keep_u", "dtype")


def _sketch_header(sketch: Any) -> list[int]:
    """The int64 fields :func:`reduce_sketch` agrees on: the configuration (``_SKETCH_CONFIG``), then
    ``row_offset`` and the rows seen. Raises TypeError/ValueError for a sketch that cannot be reduced."""
    if not isinstance(sketch, StreamingSVD):
        raise TypeError(f"sketch must be a lowrank.StreamingSVD, got {type(sketch).__name__}")
    if sketch._reduced_rows is not None:
        raise ValueError("this sketch was already reduced")
    if sketch.dtype is None:
        raise ValueError("a rank that saw no rows needs StreamingSVD(dtype=...) to contribute zeros")
    config = [getattr(sketch, name) for name in _SKETCH_CONFIG[:-1]]
    return [int(v) for v in config] + [_DTYPE_IDS[sketch.dtype], sketch.row_offset, sketch.n_rows]


def reduce_sketch(sketch: StreamingSVD, group=None) -> StreamingSVD:
    """Sum the streaming sketches of all ranks in place: every rank then describes the whole row-sharded
    matrix (:class:`lowrank.sketch.StreamingSVD`).

    Each rank streams its own rows into a ``StreamingSVD`` built with the same ``n_features``, ``k``, sizes,
    ``center`` and ``seed``, and ``row_offset`` = the global index of its first row (rank order as in
    :func:`rsvd`: the result then equals, to rounding, that of one process streaming the concatenated
    matrix; disjoint offsets such as ``rank * 2**40`` also work when the sizes are not known in advance,
    with a different but equally distributed draw). After the call, ``result()`` gives ``S`` and ``Vh``
    of the whole matrix on every rank and ``U`` for this rank's rows; ``update()`` is refused.

    Two collectives: an all-gather of 12 int64 per rank (configuration, row range, "valid" flag), so that
    a configuration mismatch or a bad argument on any rank raises on every rank -- the sketch buffers differ
    in size when the configurations do, and an all-reduce of buffers of different sizes aborts the process
    (gloo) or hangs -- then one all-reduce of a float64 buffer of about ``(s + c + q + 1) n + s^2`` entries:
    the co-range, core (``Phi A``) and test sketches (``(s + c + q) x n``), the column sums and the Gram
    matrix ``Y^T Y``.

    Raises
    ------
    TypeError
        ``sketch`` is not a StreamingSVD (on that rank; the others raise ValueError).
    ValueError
        The ranks' configurations (sizes, seed, centring, ``keep_u``, dtype) differ; their row ranges
        ``[row_offset, row_offset + rows seen)`` overlap; the sketch was already reduced; a rank saw no
        rows and has no ``dtype``. Raised on every rank.
    """
    rank, world = _group_info(group)
    error: Exception | None = None
    try:
        local = _sketch_header(sketch)
    except (TypeError, ValueError) as bad:
        error, local = bad, [0] * (len(_SKETCH_CONFIG) + 2)
    device = torch.device("cpu")
    if error is None and sketch.device is not None:
        device = sketch.device
    table = _agree(rank, world, group, device, local, error)  # raises on every rank if one failed
    width = len(_SKETCH_CONFIG)
    differ = [name for col, name in enumerate(_SKETCH_CONFIG, 1) if (table[:, col] != table[0, col]).any()]
    if differ:
        raise ValueError(
            f"the ranks' StreamingSVD configurations (sizes, seed, center, dtype) differ: {', '.join(differ)}"
        )
    ranges = sorted(
        (int(start), int(start) + int(rows)) for start, rows in table[:, width + 1 :].tolist() if rows > 0
    )
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:]):
        if next_lo < hi:
            raise ValueError(
                f"the ranks' row ranges [row_offset, row_offset + rows) overlap ([{lo}, {hi}) and "
                f"[{next_lo}, ...)): give each rank the global index of its first row as row_offset"
            )
    buffers = sketch._sum_buffers()
    flat = _all_reduce(torch.cat([b.reshape(-1) for b in buffers]), group, "sketch")
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    sketch._reduced_rows = int(table[:, -1].sum())
    return sketch


@no_autocast
def pca(
    X_local: Any,
    k: int,
    *,
    group: dist.ProcessGroup | None = None,
    center: bool = True,
    method: str = "auto",
    seed: int | None = None,
    n_iter: int | None = None,
    oversample: int | None = None,
) -> PCAResult:
    r"""PCA of samples spread over the ranks by rows: :func:`lowrank.pca` on ``X = [X_0; X_1; ...]``.

    The column means are global (one all-reduce of ``n + 1`` numbers) and the centring is implicit inside
    every product, ``(X_r - 1 mu^T) Omega = X_r Omega - 1 (mu^T Omega)``, so sparse blocks stay sparse.

    Parameters
    ----------
    X_local : anything :func:`rsvd` accepts, shape (m_r, n)
        This rank's samples.
    k : int
        Number of components, ``1 <= k <= min(m, n)``.
    group : ProcessGroup, optional
    center : bool
        Remove the global column means (``False``: uncentred, like TruncatedSVD).
    method : {"auto", "exact", "randomized"}
        As in :func:`lowrank.pca`: ``"auto"`` is exact when every block is dense and ``max(m, n) <= 500``
        or ``k >= 0.8 min(m, n)``, randomized otherwise. ``"exact"`` is a TSQR of the centred rows
        (``P n^2`` numbers gathered), ``"randomized"`` is :func:`rsvd` with ``method="krylov"``.
    seed : int, optional
        Seed of the sketch (shared as in :func:`rsvd`).
    n_iter, oversample : int, optional
        Block Krylov iterations and extra block columns, defaults 4 and 10, as :func:`lowrank.pca`.

    Returns
    -------
    PCAResult
        Replicated on every rank, equal to rounding to ``lowrank.pca(X, k, ...)`` with the same seed. Scores
        of the local samples: ``result.transform(X_local)``.
    """
    error: Exception | None = None
    k, oversample, n_iter = python_number(k), python_number(oversample), python_number(n_iter)
    center = python_number(center)
    if method not in _PCA_METHODS:
        error = ValueError(f"method must be one of {_PCA_METHODS}, got {method!r}")
    elif not isinstance(center, bool):
        error = TypeError(f"center must be a bool, got {type(center).__name__}")
    elif isinstance(k, bool) or not isinstance(k, int):
        error = TypeError(f"k must be an int, got {type(k).__name__}")
    elif k < 1:
        error = ValueError(f"k must be >= 1, got {k}")
    else:
        try:
            for name, value in (("oversample", oversample), ("n_iter", n_iter)):
                if value is not None:
                    _check_nonneg_int(value, name)
        except (TypeError, ValueError) as bad:
            error = bad
    seed_fields, seed_error = _seed_fields(seed)
    error = error or seed_error
    extra = [
        k if isinstance(k, int) else 0,
        -1 if not isinstance(oversample, int) else oversample,
        -1 if not isinstance(n_iter, int) else n_iter,
        2 * _PCA_METHODS.index(method) + int(center is True) if method in _PCA_METHODS else -1,
        *seed_fields,
    ]
    op, rank, world, m, table = _prepare(X_local, group, "pca", extra, error, name="X_local")
    n = op.shape[1]
    k = _check_k(k, min(m, n))
    if center and m < 2:
        raise ValueError("X_local: the samples of all ranks together must be at least 2 to centre")
    dense = torch.tensor([float(isinstance(op, DenseOp))], dtype=torch.float64, device=op.device)
    sums = torch.cat(
        [
            op.rmatmul(torch.ones(op.shape[0], 1, dtype=op.dtype, device=op.device))[:, 0].double(),
            op.fro_norm_sq().double().reshape(1),
            -dense,
        ]
    )
    sums = _all_reduce(sums, group, "mean")
    all_dense = float(sums[-1]) == -world
    mean = (sums[:n] / m).to(op.dtype)[:, None] if center else None
    if method == "auto":
        small = max(m, n) <= 500 or k >= 0.8 * min(m, n)
        method = "exact" if all_dense and small else "randomized"
    sop = _ShardedOp(op, group, rank, world, m, mean, name="X_local")
    if method == "exact":
        _, S, Vh = _exact(sop, k)
    else:
        over = 10 if oversample is None else oversample
        q = 4 if n_iter is None else n_iter
        _, S, Vh = _rsvd(sop, k, over, q, "krylov", _resolve_seed(seed, table, op.device))
    pick = Vh.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(Vh.gather(1, pick))
    components = Vh * torch.where(signs == 0, torch.ones_like(signs), signs)
    mean_vec = mean[:, 0] if center else torch.zeros(n, dtype=op.dtype, device=op.device)
    denom = max(m - 1, 1)
    data_ss = sums[n]
    variance = S.square() / denom
    scaled_variance, scaled_mean = variance, mean_vec
    if op.dtype == torch.float64 and not 2.0**-900 < float(data_ss) < 2.0**900:
        # float64 data beyond ~1e154 or below ~1e-154 (as lowrank.pca): their sums of squares left fp64's
        # range (ratios of 0); redo them on X / 2^e, e common to all ranks (one more collective, only here)
        data_ss, exponent = _scaled_fro_norm_sq(op, group)
        scaled_variance = times_power_of_two(S.double(), -exponent).square() / denom
        scaled_mean = times_power_of_two(mean_vec.double(), -exponent)
    total = data_ss - (m * scaled_mean.double().square().sum() if center else 0.0)
    ratio = _variance_ratio(
        scaled_variance, total, data_ss, m, center
    )  # as lowrank.pca: 0/0 defined, sum <= 1
    return PCAResult(components.contiguous(), variance, ratio, mean_vec.contiguous(), S)


def _scaled_fro_norm_sq(op, group) -> tuple[torch.Tensor, int]:
    """``(||X / 2^e||_F^2, e)`` over all ranks, ``2^e`` near the largest entry of any rank (one all-reduce
    of the local maxima, one of the local sums); ``e = 0`` (plain sums) for implicit operators."""
    values = op.A if isinstance(op, DenseOp) else op.A.values() if isinstance(op, SparseOp) else None
    if values is None:
        return _all_reduce(op.fro_norm_sq().double().reshape(1), group, "mean")[0], 0
    big = values.abs().amax().double().reshape(1) if values.numel() else torch.zeros(1, dtype=torch.float64)
    dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
    _record("mean", big.numel() * big.element_size())
    exponent = math.frexp(float(big))[1] if float(big) > 0 else 0
    local = torch.linalg.vector_norm(times_power_of_two(values, -exponent), dtype=torch.float64).square()
    return _all_reduce(local.reshape(1), group, "mean")[0], exponent


# --------------------------------------------------------------------------------------------- LoRA


def _unwrap(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def _full_adapters(
    model: nn.Module, adapter_name: str
) -> Iterator[list[tuple[nn.ParameterDict, nn.Parameter]]]:
    """Swap every FSDP2-sharded factor of ``adapter_name`` for a plain full-size copy (one all-gather per
    factor, on every rank, in module order) and put the sharded parameters back afterwards."""
    from lowrank.lora.model import lora_layers

    swapped: list[tuple[nn.ParameterDict, nn.Parameter]] = []
    try:
        for _, layer in lora_layers(model):
            for attr in layer._factor_names:
                factors = getattr(layer, attr)
                if adapter_name in factors and _is_dtensor(factors[adapter_name]):
                    sharded = factors[adapter_name]
                    full = sharded.detach().full_tensor()
                    _record("adapter", full.numel() * full.element_size())
                    swapped.append((factors, sharded))
                    factors[adapter_name] = nn.Parameter(full, requires_grad=sharded.requires_grad)
        yield swapped
    finally:
        for factors, sharded in swapped:
            factors[adapter_name] = sharded


def _consensus(failed: bool, group, device: torch.device | None = None) -> bool:
    """True if any rank failed (one all-reduce of one number)."""
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        )
    flag = torch.tensor([float(failed)], device=device)
    return float(_all_reduce(flag, group, "status")) > 0


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    group: dist.ProcessGroup | None = None,
    adapter_name: str = "default",
    **kwargs: Any,
) -> None:
    """Save a LoRA adapter once, from rank 0, of a plain, DDP-wrapped or FSDP2-sharded model.

    Collective: call it on every rank. FSDP2-sharded factors are all-gathered first (the adapter only, never
    the frozen base weights); rank 0 then calls :func:`lowrank.save_adapter` (PEFT layout, atomic write) on
    the unwrapped model (DDP's ``module.`` prefix is dropped, so the checkpoint loads into the bare model and
    into PEFT). Returns on every rank once the files are in place; an error on rank 0 is raised on every
    rank. ``kwargs`` go to :func:`lowrank.save_adapter`.
    """
    from lowrank.lora.checkpoint import save_adapter as save_local

    rank, _ = _group_info(group)
    base = _unwrap(model)
    error: BaseException | None = None
    with _full_adapters(base, adapter_name):
        if rank == 0:
            try:
                save_local(base, path, adapter_name=adapter_name, **kwargs)
            except Exception as bad:  # raised below, after telling the other ranks
                error = bad
    if _consensus(error is not None, group):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed to save the adapter to {os.fspath(path)!r} (see its error)")


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    group: dist.ProcessGroup | None = None,
    adapter_name: str = "default",
    inject: bool | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a LoRA adapter on every rank (collective), into a plain, DDP-wrapped or FSDP2-sharded model.

    Every rank reads ``path`` (a file system all ranks see, e.g. the directory :func:`save_adapter` wrote)
    with :func:`lowrank.load_adapter`, which validates everything before touching the model. FSDP2: the
    factors are loaded at full size and each rank keeps its own shard. ``inject`` defaults to ``True`` for a
    bare model and ``False`` for wrapped or sharded ones (the module tree of a wrapped model must not change;
    inject before wrapping). If any rank fails, every rank raises.
    """
    from lowrank.lora.checkpoint import prepare_load

    _group_info(group)
    base = _unwrap(model)
    sharded = any(_is_dtensor(p) for p in base.parameters())
    wrapped = sharded or base is not model
    if inject is None:
        inject = not wrapped
    error: BaseException | None = None
    if wrapped and inject:
        error = ValueError(
            "inject: a DDP-wrapped or FSDP-sharded model cannot take new modules; use inject=False"
        )
    with _full_adapters(base, adapter_name) as swapped:
        # every rank checks and reads first; the models change only when all could (a rank that cannot
        # read the folder, or whose model differs, leaves every rank's model as it was)
        apply = None
        if error is None:
            try:
                apply = prepare_load(base, path, adapter_name=adapter_name, inject=inject, strict=strict)
            except Exception as bad:
                error = bad
        if _consensus(error is not None, group):
            if error is not None:
                raise error
            raise RuntimeError(
                f"loading the adapter from {os.fspath(path)!r} failed on another rank; no rank's model "
                "changed"
            )
        try:
            apply()
        except Exception as bad:
            error = bad
        if error is None and swapped:
            from torch.distributed.tensor import distribute_tensor

            with torch.no_grad():
                for factors, dtensor in swapped:
                    full = factors[adapter_name].detach()
                    shard = distribute_tensor(
                        full, dtensor.device_mesh, dtensor.placements, src_data_rank=None
                    )
                    dtensor.to_local().copy_(shard.to_local())
    if _consensus(error is not None, group):
        if error is not None:
            raise error
        raise RuntimeError(f"loading the adapter from {os.fspath(path)!r} failed on another rank")
    return model
