"""Initialisation of LoRA factors, and extraction of a LoRA adapter from a fine-tuned weight.

All SVD-based work here goes through the package's SVD engine (``lowrank.rsvd`` / ``lowrank.svd``), imported
at call time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from lowrank._linop import check_tensor, no_autocast, python_number

#: Initialisation methods understood by :func:`reset_lora_factors_` and the LoRA layers.
INIT_METHODS = ("default", "gaussian", "pissa", "olora", "zeros")

#: Initialisations that rewrite the base weight to a residual (the layer's output is unchanged).
WEIGHT_INITS = ("pissa", "olora")

#: Data-driven initialisations (PEFT's names): they need calibration batches, see
#: :func:`lowrank.lora.calibrate.calibrate_lora`.
CALIBRATED_INITS = ("corda", "eva")

#: The two modes of CorDA (Yang et al. 2024): instruction-previewed and knowledge-preserved.
CORDA_MODES = ("ipm", "kpm")

_SVD_METHODS = ("rsvd", "svd")

T = TypeVar("T")


def check_init(init: str | bool) -> str:
    """Validate an ``init=`` argument and return the name of ours it means.

    PEFT's ``init_lora_weights`` spellings are accepted: ``True`` is PEFT's default (Kaiming-uniform A, zero
    B) = ``"default"``; ``"pissa_niter_N"`` (PEFT: ``torch.svd_lowrank`` with N iterations, approximate) is
    ``"pissa"`` at PEFT's cost: the layers pass :func:`pissa_budget`'s ``N`` on as
    ``pissa_factors(..., n_iter=N)`` / ``pissa_triplets(..., n_iter=N)`` (a block Krylov space with PEFT's
    ``2 N + 2`` products, see :func:`budget_top_triplets`; the residual ``W - s B A`` is exact either way).
    ``"pissa"`` itself is accuracy-checked (top-r singular values within 1e-4, about twice PEFT's
    niter-4 time). ``False`` (PEFT: both factors random, for tests) is refused.
    """
    if init is True:
        return "default"
    if init is False:
        raise ValueError(
            "init=False (PEFT: both factors random, so the model changes at step 0) is not supported; use "
            "'default' (True in PEFT), 'gaussian' or 'zeros'"
        )
    if pissa_budget(init) is not None:
        return "pissa"
    if isinstance(init, str) and init in CALIBRATED_INITS:
        raise ValueError(
            f"init={init!r} needs calibration batches: use lowrank.lora.calibrate_lora(model, targets, "
            f"batches, init={init!r}) instead of init= on a layer or inject_lora"
        )
    if not isinstance(init, str) or init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    return init


def pissa_budget(init: object) -> int | None:
    """``N`` of PEFT's ``init="pissa_niter_N"`` spelling (PiSSA at the product budget of
    ``torch.svd_lowrank(W, q=r, niter=N)``), ``None`` for any other ``init``."""
    if isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9][0-9]*", init):
        return int(init[len("pissa_niter_") :])
    return None


@torch.no_grad()
def reset_lora_factors_(down: torch.Tensor, up: torch.Tensor, init: str) -> None:
    r"""Initialise a pair of LoRA factors in place so that their product is zero (except ``"pissa"``).

    Parameters
    ----------
    down : Tensor, shape (r, in_features)
        The factor applied first (``lora_A`` of a linear layer).
    up : Tensor, shape (out_features, r)
        The factor applied second (``lora_B`` of a linear layer); set to zero by every method here.
    init : {"default", "gaussian", "zeros"}
        ``"default"``: ``down`` Kaiming-uniform with ``a = sqrt(5)`` (bound ``1 / sqrt(in_features)``, as
        ``nn.Linear`` and Hu et al. 2021); ``"gaussian"``: ``down ~ N(0, 1/r^2)``; ``"zeros"``: both zero,
        for adapters whose weights are loaded afterwards (a zero pair receives zero gradients, so it does
        not train). In every case the product ``up @ down`` is zero: the model is unchanged at step 0.

    Notes
    -----
    ``"pissa"`` needs the base weight; it is handled by :func:`pissa_factors`.
    """
    init = check_init(init)
    if init in WEIGHT_INITS:
        raise ValueError(f"init={init!r} needs the base weight: use {init}_factors(weight, r, scale)")
    up.zero_()
    if init == "default":
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    elif init == "gaussian":
        torch.nn.init.normal_(down, std=1.0 / down.shape[0])
    else:
        down.zero_()


def _check_svd_method(method: str) -> None:
    if method not in _SVD_METHODS:
        raise ValueError(f"method must be one of {_SVD_METHODS}, got {method!r}")


def _top_singular_triplets(
    matrix: torch.Tensor, r: int, method: str, n_iter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``r`` singular triplets ``(U_r, S_r, Vh_r)`` of a 2-D float tensor (lowrank's SVD engine)."""
    from lowrank.svd import rsvd, svd

    if method == "svd":
        U, S, Vh = svd(matrix, r)
    else:  # fixed seed: the same weight gives the same adapter
        U, S, Vh = rsvd(matrix, r, seed=0, n_iter=n_iter)
    return U[:, :r], S[:r], Vh[:r]


#: Default target accuracy of PiSSA's randomized SVD: relative error of each top-r singular value.
PISSA_TOL = 1e-4

#: Largest Krylov depth of :func:`checked_top_triplets` before the exact SVD (flat spectra of BERT-base
#: shapes converged by depth 13-15 with blocks of 16; one depth costs ~2 passes over W, the exact SVD of a
#: 768 x 768 weight ~100 of them)
_MAX_DEPTH = 24


def _check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    return float(tol)


def _relative_residuals(
    work: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
) -> torch.Tensor:
    """``||W v_i - s_i u_i|| / max(s_i, 1e-3 s_1)`` per triplet (``(..., r)``); one product ``W V_r``."""
    residual = torch.linalg.vector_norm(work @ Vh.mT - U * S[..., None, :], dim=-2)
    floor = torch.maximum(S, 1e-3 * S[..., :1]).clamp_min(torch.finfo(S.dtype).tiny)
    return residual / floor


@torch.no_grad()
def checked_top_triplets(
    work: torch.Tensor, r: int, tol: float = PISSA_TOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` singular triplets of ``work`` (``(m, n)`` or a batch ``(b, m, n)``, float32/64) whose
    singular values are accurate to about ``tol`` (relative).

    One :func:`lowrank.svd.krylov_until` call (block Krylov, ``block_size=max(r, 8)``, seed 0) extends its
    Krylov space until every Ritz triplet's estimated residual passes
    ``||W v_i - s_i u_i|| <= sqrt(tol) / 2 * max(s_i, 1e-3 s_1)`` (at most ``_MAX_DEPTH`` blocks); the
    accepted triplets are tested again with the residual computed from ``W`` (one product of ``r``
    columns, on the side that the construction does not make exact), and what fails either test gets the
    exact SVD (:func:`lowrank.svd`). See :func:`pissa_factors` (Notes).
    """
    from lowrank.svd import krylov_until, svd

    batched = work.dim() == 3
    stack = work if batched else work[None]
    count, m, n = stack.shape
    block = min(max(r, 8), m, n)
    limit = 0.5 * math.sqrt(tol)
    depth = min(_MAX_DEPTH, (min(m, n) - 1) // block - 1)
    if depth < 1 or (depth + 1) * block < r:
        U, S, Vh = svd(stack, r)
        return (U, S, Vh) if batched else (U[0], S[0], Vh[0])
    (U, S, Vh), ok = krylov_until(stack, r, block_size=block, max_iter=depth, residual_tol=limit, seed=0)
    if m > n:  # krylov_until worked on W^T: W v_i = s_i u_i holds by construction, test W^T u_i = s_i v_i
        ok &= (_relative_residuals(stack.mT, Vh.mT, S, U.mT) <= limit).all(dim=-1)
    else:
        ok &= (_relative_residuals(stack, U, S, Vh) <= limit).all(dim=-1)
    pending = (~ok).nonzero()[:, 0]
    if len(pending):
        u, s, vh = svd(stack[pending], r)
        U[pending], S[pending], Vh[pending] = u, s, vh
    return (U, S, Vh) if batched else (U[0], S[0], Vh[0])


def _check_n_iter(n_iter: object) -> int:
    n_iter = python_number(n_iter)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0 or None, got {n_iter!r}")
    return n_iter


@torch.no_grad()
def budget_top_triplets(
    work: torch.Tensor, r: int, n_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` singular triplets of ``work`` (``(m, n)`` or a batch ``(b, m, n)``, float32/64) at the
    product budget of PEFT's ``pissa_niter_<n_iter>`` (``torch.svd_lowrank(W, q=r, niter=n_iter)``:
    ``2 n_iter + 2`` products of ``r`` columns with ``W``), unchecked.

    One :func:`lowrank.svd.krylov_until` call with ``residual_tol=None`` (block Golub-Kahan-Lanczos:
    blocks of ``r`` columns on the short side, depth ``n_iter``, seed 0): the same ``2 n_iter + 2``
    products, but every block is kept (a Krylov space of ``(n_iter + 1) r`` columns against the
    subspace iteration's ``r``) and the last projection ``Q^H W`` comes from the products already made.
    When that space would reach ``min(m, n)``, the exact SVD (:func:`lowrank.svd`) instead.

    Where the time goes (BERT-base 3072 x 768 and 768 x 768, r = 16, N = 4, 1 thread, loaded 2-core
    machine): the 10 products are 65-75% of it on the large weight (~45% on the small one), the
    orthonormalisation of the 4 new blocks (projection, Householder QR, twice) and the Rayleigh-Ritz step
    (Gram of the images, an 80 x 80 eigen-decomposition, ``V`` and one CholeskyQR pass) most of the rest.
    PEFT's path makes the same 10 products (the last one its ``B = Q^H W``) plus 9 Householder QRs of ``W``'s
    long side and forms the residual with three temporaries of ``W``'s size; :func:`pissa_factors` forms it
    in one GEMM.
    """
    from lowrank.svd import krylov_until, svd

    m, n = work.shape[-2:]
    if (n_iter + 1) * r >= min(m, n):
        return svd(work, r)
    (U, S, Vh), _ = krylov_until(work, r, block_size=r, max_iter=n_iter, residual_tol=None, seed=0)
    return U, S, Vh


# Same-shape weights of a model are factored together in one batched rsvd call; a group holds at most this
# many weights and bytes (its stacked float32/64 copy), so the extra memory stays a few layers.
GROUP_LAYERS = 16
GROUP_BYTES = 256 << 20

#: Top-``r`` singular triplets ``(U, S, Vh)`` of one weight (view), as :func:`pissa_triplets` returns them.
Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _span(view: torch.Tensor) -> tuple[int, int, int]:
    """``(storage, first, last)``: the storage elements a strided view can touch."""
    offset = view.storage_offset()
    last = offset + sum((size - 1) * step for size, step in zip(view.shape, view.stride()))
    return view.untyped_storage().data_ptr(), offset, last


def same_shape_groups(
    items: Iterable[T],
    key: Callable[[T], Hashable],
    size: Callable[[T], int],
    max_items: int = GROUP_LAYERS,
    max_bytes: int = GROUP_BYTES,
) -> Iterator[list[T]]:
    """Groups of ``items`` with equal ``key(item)`` (shape, dtype, ...), for batched factorizations.

    A group is yielded as soon as it holds ``max_items`` items or ``max_bytes`` bytes or more
    (``size(item)`` each), the unfilled ones at the end in first-seen order; so a stream of items is
    grouped while it is read, holding at most one partial group per key. Used by
    :func:`precomputed_pissa` and by the CLI's reader of checkpoint deltas.
    """
    pending: dict[Hashable, list[T]] = {}
    for item in items:
        group_key = key(item)
        group = pending.setdefault(group_key, [])
        group.append(item)
        if len(group) >= max_items or len(group) * size(item) >= max_bytes:
            yield pending.pop(group_key)
    yield from pending.values()


@torch.no_grad()
def pissa_triplets(
    weights: list[torch.Tensor], r: int, tol: float = PISSA_TOL, *, n_iter: int | None = None
) -> list[Triplets | None]:
    """The top-``r`` singular triplets :func:`pissa_factors` (default ``method``, this ``r``, ``tol`` and
    ``n_iter``) would compute for each of ``weights``, same-shape weights (dtype, device) batched into one
    :func:`checked_top_triplets` call (``n_iter=None``) or :func:`budget_top_triplets` call (``n_iter=N``:
    PEFT's ``pissa_niter_N`` budget, unchecked) per group of at most ``GROUP_LAYERS`` weights and
    ``GROUP_BYTES`` (a batch draws its own random start per weight: only a group of one equals the
    single call).

    ``weights`` are the (out, in) matrices (views allowed) the layers will factor, in the order they will
    factor them; pass each entry on as ``pissa_factors(..., triplets=...)`` (the LoRA layers' and
    constructors' ``pissa_triplets=``). An entry is ``None`` (factor on the spot) for a weight on the meta
    device, not 2-D, with a dimension below ``r``, or overlapping the storage of an earlier entry (tied
    weights): the earlier one's layer rewrites that storage to its residual first, and the later one
    factors the residual, as without precomputation. The triplets assume the weights do not change
    otherwise until they are used.
    """
    if n_iter is not None:
        n_iter = _check_n_iter(n_iter)

    def factor(work: torch.Tensor) -> Triplets:
        return checked_top_triplets(work, r, tol) if n_iter is None else budget_top_triplets(work, r, n_iter)

    out: list[Triplets | None] = [None] * len(weights)
    spans: dict[int, list[tuple[int, int]]] = {}
    todo: list[tuple[int, torch.Tensor]] = []
    for i, weight in enumerate(weights):
        if weight.device.type == "meta" or weight.dim() != 2 or not r <= min(weight.shape):
            continue
        ptr, first, last = _span(weight)
        taken = spans.setdefault(ptr, [])
        if any(lo <= last and first <= hi for lo, hi in taken):
            continue
        taken.append((first, last))
        todo.append((i, weight))
    for group in same_shape_groups(
        todo,
        key=lambda iw: (tuple(iw[1].shape), iw[1].dtype, iw[1].device),
        size=lambda iw: iw[1].numel() * torch.finfo(_work_dtype(iw[1].dtype)).bits // 8,
    ):
        work = _work_dtype(group[0][1].dtype)
        if len(group) == 1:  # as pissa_factors would compute it alone
            out[group[0][0]] = factor(group[0][1].detach().to(work))
            continue
        stack = torch.stack([w.detach().to(work) for _, w in group])
        U, S, Vh = factor(stack)
        del stack
        for j, (i, _) in enumerate(group):
            out[i] = (U[j], S[j], Vh[j])
    return out


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_weight(value: object, name: str, *, finite: bool = True) -> torch.Tensor:
    """A dense, real, finite 2-D float tensor, or a TypeError/ValueError naming ``name`` (``finite=False``:
    NaN/Inf not looked for here, the caller's first product with it shows them)."""
    check_tensor(value, name, complex_ok=False)
    if value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} has an empty dimension (shape {tuple(value.shape)})")
    if finite and not all_finite(value):
        raise ValueError(f"{name} contains NaN or Inf entries")
    return value


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite: one sum (NaN/Inf propagate into it), the entry-wise test only when
    the sum is not finite (overflow of a sum of finite entries; measured 0.2 vs 19 ms for 3072x768 fp32)."""
    if tensor.is_floating_point():
        total = tensor.sum(dtype=torch.float32 if tensor.element_size() < 4 else None)
        if bool(torch.isfinite(total)):
            return True
    return bool(torch.isfinite(tensor).all())


def _check_r(r: object, shape: tuple[int, ...]) -> int:
    r = python_number(r)  # NumPy integers (np.int64(5)) as the model-level API takes them
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(shape):
        raise ValueError(f"r must be an int in [1, {min(shape)}] for shape {tuple(shape)}, got {r!r}")
    return r


@no_autocast
@torch.no_grad()
def pissa_factors(
    weight: torch.Tensor,
    r: int,
    scale: float,
    *,
    method: str = "rsvd",
    n_iter: int | None = None,
    tol: float = PISSA_TOL,
    triplets: Triplets | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""PiSSA initialisation: LoRA factors from the principal singular triplets of ``weight``.

    With ``W = U S V^T`` and its top-``r`` part ``U_r S_r V_r^T``, returns

    ``B = U_r sqrt(S_r / scale)``, ``A = sqrt(S_r / scale) V_r^T`` and ``W_res = W - scale * B @ A``,

    so that ``W_res + scale * B A == W`` and a layer initialised this way computes the same output as before
    (up to rounding), while the adapter starts on the principal subspace (Meng, Wang & Zhang, 2024).

    Parameters
    ----------
    weight : Tensor, shape (out_features, in_features)
        Base weight (any float dtype; the SVD runs in float32, or float64 for float64 input).
    r : int
        Adapter rank, ``1 <= r <= min(weight.shape)``.
    scale : float
        The layer's LoRA scaling (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA), > 0.
    method : {"rsvd", "svd"}, default "rsvd"
        ``"rsvd"`` (``lowrank.rsvd``): ``O(out * in * r)`` per pass, the choice for large layers; ``"svd"``
        (``lowrank.svd``): exact, ``O(out * in * min(out, in))``. The output is unchanged either way; only
        how principal the starting subspace is depends on the method.
    n_iter : int, optional
        ``None`` (default): accuracy-checked stages (see Notes) reaching ``tol``. An int ``N >= 0``: a
        fast, unchecked SVD at the cost of PEFT's ``init_lora_weights="pissa_niter_N"``
        (``torch.svd_lowrank(W, q=r, niter=N)``: ``2 N + 2`` products of ``r`` columns with ``W``), see
        :func:`budget_top_triplets`; more accurate than PEFT's at the same products (``N = 4`` on BERT-base
        shapes, r = 16: 16-26x on a trained-like spectrum, only 2x on the flat bulk of a random init,
        ``benchmarks/bench_init.py``), no accuracy guarantee. The exact SVD when ``(N + 1) r`` reaches
        ``min(out, in)``.
    tol : float, default 1e-4
        Target relative accuracy of each of the top-``r`` singular values of ``scale * B @ A`` (default
        ``method="rsvd"``, ``n_iter=None`` only), in (0, 1).
    triplets : (U, S, Vh), optional
        The top-``r`` singular triplets of ``weight`` computed ahead (shapes (out, r), (r,), (r, in);
        :func:`pissa_triplets` batches them over a model's same-shape weights); no SVD is then run here
        (``method``, ``n_iter`` and ``tol`` are not used).

    Returns
    -------
    B : Tensor, shape (out_features, r)
    A : Tensor, shape (r, in_features)
    residual : Tensor, shape (out_features, in_features)
        All in ``weight``'s dtype and device.

    Raises
    ------
    TypeError
        ``weight`` not a dense real floating tensor.
    ValueError
        ``weight`` not 2-D, with NaN/Inf entries or on the meta device; bad ``r``, ``scale``, ``method``,
        ``tol``.

    Notes
    -----
    Default (``method="rsvd"``, ``n_iter=None``): randomized block Krylov (:func:`lowrank.svd.krylov_until`,
    blocks of ``max(r, 8)`` columns on the short side of ``weight``) whose Krylov space is *extended* until
    its Ritz triplets ``(u_i, s_i, v_i)`` pass the residual test
    ``||W v_i - s_i u_i|| <= sqrt(tol) / 2 * s_i`` (``s_i`` floored at ``1e-3 s_1``; estimated from the
    iteration's own products, then confirmed with one product ``W V_r``), at most 24 blocks deep; a weight
    that still fails gets the exact SVD. A Ritz value's error is of the order of its squared relative
    residual (times ``s_i`` over the gap to the rest of the spectrum): measured on BERT-base shapes
    (768x768, 3072x768, 768x3072, r = 16) it stayed within 3 times the squared residual, also on the flat
    Marchenko-Pastur bulk of a randomly initialised weight (the hardest case), so the test accepts errors
    up to about ``0.75 tol``. Trained-like spectra (a decaying top) pass at depth 6-8; the flat bulk at
    13-17 (checks at depth 6, 8, then where the residuals' decay predicts). Figures:
    ``benchmarks/bench_init.py``.
    :func:`lowrank.inject_lora` computes the triplets of all its targets ahead, same-shape weights in one
    batched call per group (:func:`pissa_triplets`), and passes each weight's on as ``triplets``.

    References
    ----------
    F. Meng, Z. Wang, M. Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
    Language Models", NeurIPS 2024, arXiv:2404.02948.
    """
    _check_svd_method(method)
    if n_iter is not None:
        n_iter = _check_n_iter(n_iter)
    budget = triplets is None and method == "rsvd" and n_iter is not None
    # the budget path's first product shows NaN/Inf (one pass over W less: ~2% of its time on 3072 x 768)
    _check_weight(weight, "weight", finite=not budget)
    r = _check_r(r, tuple(weight.shape))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0 for PiSSA, got {scale!r}")
    _check_tol(tol)
    work = weight.detach().to(_work_dtype(weight.dtype))
    if triplets is not None:
        U, S, Vh = _check_triplets(triplets, tuple(weight.shape), r, work)
    elif budget:
        try:
            U, S, Vh = budget_top_triplets(work, r, n_iter)
        except ValueError as err:
            if "NaN or Inf" in str(err):
                message = "weight contains NaN or Inf entries (or overflows in its products)"
                raise ValueError(message) from None
            raise
    elif method == "rsvd" and n_iter is None:
        U, S, Vh = checked_top_triplets(work, r, tol)
    else:
        U, S, Vh = _top_singular_triplets(work, r, method)
    root = (S / scale).sqrt()
    B = U * root
    A = root[:, None] * Vh
    residual = torch.addmm(work, B, A, alpha=-scale)  # W - s B A in one GEMM, no temporaries of W's size
    return B.to(weight.dtype), A.to(weight.dtype), residual.to(weight.dtype)


def weight_init_factors(
    init: str, triplets: Sequence[Triplets | None] | None, count: int, n_iter: int | None = None
) -> Callable[[int, torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``factors(i, weight, r, scale) -> (B, A, residual)`` of a weight-rewriting ``init`` (``"pissa"``,
    ``"olora"``) for a layer that factors ``count`` matrices; with ``triplets`` (PiSSA only, one entry per
    matrix, ``None`` entries computed on the spot) the ``i``-th uses ``triplets[i]``; ``n_iter`` (PiSSA
    only): those computed on the spot at PEFT's ``pissa_niter_<n_iter>`` budget."""
    if triplets is not None and len(triplets) != count:
        raise ValueError(f"pissa_triplets has {len(triplets)} entries; this layer factors {count} matrices")
    if init == "olora":
        return lambda i, weight, r, scale: olora_factors(weight, r, scale)
    return lambda i, weight, r, scale: pissa_factors(
        weight, r, scale, n_iter=n_iter, triplets=None if triplets is None else triplets[i]
    )


def _check_triplets(triplets: object, shape: tuple[int, int], r: int, work: torch.Tensor) -> Triplets:
    """``triplets`` as ``(U, S, Vh)`` of an (out, in) = ``shape`` weight and rank ``r``, in ``work``'s dtype
    and device, or a TypeError/ValueError naming ``triplets``."""
    if not isinstance(triplets, (tuple, list)) or len(triplets) != 3:
        raise TypeError(f"triplets must be a (U, S, Vh) tuple of tensors, got {type(triplets).__name__}")
    expected = ((shape[0], r), (r,), (r, shape[1]))
    for name, value, want in zip(("U", "S", "Vh"), triplets, expected):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"triplets: {name} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != want:
            raise ValueError(f"triplets: {name} has shape {tuple(value.shape)}, expected {want} here")
    return tuple(t.detach().to(work.device, work.dtype) for t in triplets)  # type: ignore[return-value]


class LoRAFactors(tuple):
    """``(B, A)`` of an extracted adapter (unpacks as a pair), with ``energy``: the captured fraction."""

    B: torch.Tensor
    A: torch.Tensor
    energy: float

    def __new__(cls, B: torch.Tensor, A: torch.Tensor, energy: float) -> LoRAFactors:
        obj = super().__new__(cls, (B, A))
        obj.B, obj.A, obj.energy = B, A, energy
        return obj

    def __repr__(self) -> str:
        return f"LoRAFactors(B={tuple(self.B.shape)}, A={tuple(self.A.shape)}, energy={self.energy:.4f})"


@no_autocast
@torch.no_grad()
def extract_lora(
    base_weight: torch.Tensor, tuned_weight: torch.Tensor, r: int, *, method: str = "rsvd"
) -> LoRAFactors:
    r"""The rank-``r`` adapter that best approximates a fine-tuning delta: ``tuned - base ~= B @ A``.

    By Eckart–Young–Mirsky the best rank-``r`` approximation of ``D = tuned - base`` in Frobenius (and
    spectral) norm is its truncated SVD ``U_r S_r V_r^T``; it is split evenly as ``B = U_r sqrt(S_r)`` and
    ``A = sqrt(S_r) V_r^T``. The pair has scale 1 (``D ~= B @ A``); for a layer whose LoRA scaling is ``s``,
    load ``B / sqrt(s)`` and ``A / sqrt(s)``.

    Parameters
    ----------
    base_weight, tuned_weight : Tensor, shape (out_features, in_features)
        Weights of the same layer before and after full fine-tuning (same shape).
    r : int
        Rank, ``1 <= r <= min(out_features, in_features)``.
    method : {"rsvd", "svd"}, default "rsvd"
        ``"rsvd"``: randomized SVD (``lowrank.rsvd``), ``O(out * in * r)``, enough when the delta's spectrum
        decays; ``"svd"``: exact (``lowrank.svd``), ``O(out * in * min(out, in))``.

    Returns
    -------
    LoRAFactors
        Unpacks as ``B, A`` (shapes (out, r) and (r, in), in ``base_weight``'s dtype); ``.energy`` is the
        captured fraction ``||B A||_F^2 / ||D||_F^2 = sum(S_r^2) / ||D||_F^2`` in [0, 1] (1.0 for a zero
        delta).

    Raises
    ------
    TypeError
        A weight that is not a dense real floating tensor (the message names it).
    ValueError
        Weights not 2-D, of different shapes, with NaN/Inf entries or on the meta device (named); bad
        ``r`` or ``method``.

    References
    ----------
    C. Eckart, G. Young, "The approximation of one matrix by another of lower rank", Psychometrika 1936.
    E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    """
    for arg, value in (("base_weight", base_weight), ("tuned_weight", tuned_weight)):
        _check_weight(value, arg)
    if base_weight.shape != tuned_weight.shape:
        raise ValueError(
            f"base_weight {tuple(base_weight.shape)} and tuned_weight {tuple(tuned_weight.shape)} differ"
        )
    r = _check_r(r, tuple(base_weight.shape))
    _check_svd_method(method)
    work_dtype = _work_dtype(base_weight.dtype)
    delta = tuned_weight.detach().to(base_weight.device, work_dtype) - base_weight.detach().to(work_dtype)
    total = float(delta.pow(2).sum())
    U, S, Vh = _top_singular_triplets(delta, r, method)
    root = S.sqrt()
    B = (U * root).to(base_weight.dtype)
    A = (root[:, None] * Vh).to(base_weight.dtype)
    energy = 1.0 if total == 0.0 else min(1.0, float(S.pow(2).sum()) / total)
    return LoRAFactors(B, A, energy)


def _check_scale(scale: object, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0 for {what}, got {scale!r}")
    return float(scale)


@no_autocast
@torch.no_grad()
def olora_factors(
    weight: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""OLoRA initialisation: LoRA factors from the QR decomposition of ``weight`` (PEFT's ``"olora"``).

    With the Householder QR ``W = Q R`` (no pivoting), returns ``B = Q[:, :r]``, ``A = R[:r]`` and
    ``W_res = W - scale * B @ A``, exactly PEFT's ``olora_init`` (no ``1/scale`` in the factors, so
    ``scale * B A`` is ``scale`` times the projection ``Q_r Q_r^T W``; the layer's output is unchanged).

    Only the first ``r`` columns of ``W`` determine ``Q[:, :r]`` (the first ``r`` Householder reflectors
    act on them alone), and ``R[:r] = Q_r^T W``. So this takes the thin Householder QR of the
    ``(out, r)`` panel (same LAPACK/cuSOLVER routine as a full QR, hence the same signs: ``R``'s diagonal
    as LAPACK leaves it) plus one GEMM for the rest of ``R[:r]``: ``O(out * in * r)`` instead of the full
    QR's ``O(out * in * min(out, in))``.

    Parameters
    ----------
    weight : Tensor, shape (out_features, in_features)
        Base weight (float32 work for fp16/bf16/fp32, float64 for float64; PEFT refuses float64).
    r : int
        Rank, ``1 <= r <= min(weight.shape)``.
    scale : float
        The layer's LoRA scaling (``alpha / r`` or ``alpha / sqrt(r)``), > 0.

    Returns
    -------
    B : Tensor, shape (out_features, r)
        Orthonormal columns.
    A : Tensor, shape (r, in_features)
        Upper trapezoidal in its first ``r`` columns.
    residual : Tensor, shape (out_features, in_features)
        All in ``weight``'s dtype and device.

    Raises
    ------
    TypeError
        ``weight`` not a dense real floating tensor.
    ValueError
        ``weight`` not 2-D, with NaN/Inf entries or on the meta device; bad ``r`` or ``scale``.

    References
    ----------
    K. Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv:2406.01775.
    """
    _check_weight(weight, "weight")
    r = _check_r(r, tuple(weight.shape))
    scale = _check_scale(scale, "OLoRA")
    work = weight.detach().to(_work_dtype(weight.dtype))
    Q, R_panel = torch.linalg.qr(work[:, :r])  # Householder (geqrf + orgqr), the full QR's first r columns
    A = torch.cat([R_panel, Q.T @ work[:, r:]], dim=1)
    residual = work - scale * (Q @ A)
    return Q.to(weight.dtype), A.to(weight.dtype), residual.to(weight.dtype)


def _check_covariance(covariance: object, n: int) -> torch.Tensor:
    check_tensor(covariance, "covariance", complex_ok=False)
    if tuple(covariance.shape) != (n, n):
        raise ValueError(
            f"covariance must have shape ({n}, {n}) (in_features squared), got {tuple(covariance.shape)}"
        )
    if not bool(torch.isfinite(covariance).all()):
        raise ValueError("covariance contains NaN or Inf entries")
    return covariance


@no_autocast
@torch.no_grad()
def corda_factors(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    r: int,
    scale: float,
    *,
    mode: str = "ipm",
    damping: float = 0.01,
    method: str = "rsvd",
    n_iter: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""CorDA initialisation: LoRA factors from the SVD of ``W C`` (PEFT's ``init_lora_weights="corda"``).

    PEFT's formulas (``peft.tuners.lora.corda``, PEFT 0.21): with the damped covariance
    ``C~ = C + damping * mean(diag C) * I`` and the SVD ``W C~ = U S V^T``, the adapter takes the
    components ``i`` of the chosen mode, ``B = U_i sqrt(S_i / scale)``,
    ``A = sqrt(S_i / scale) V_i^T C~^{-1}`` and ``W_res = W - scale * B A`` (output unchanged, since
    ``sum_i U_i S_i V_i^T C~^{-1} = W``).

    * ``"ipm"`` (instruction-previewed): the ``r`` largest. Here ``V_r^T C~^{-1} = S_r^{-1} U_r^T W``
      (from ``U_r^T W C~ = S_r V_r^T``), so no inverse is formed: ``A = U_r^T W / sqrt(scale S_r)``, and
      ``scale B A = U_r U_r^T W``. The top-``r`` triplets come from :func:`lowrank.rsvd` (``method="rsvd"``,
      ``O(out in^2 + out in r)`` with the product ``W C~``) or the exact :func:`lowrank.svd`.
    * ``"kpm"`` (knowledge-preserved): the ``r`` smallest (of ``min(out, in)``), in PEFT's order. A
      randomized range finder converges to the *dominant* subspace, the smallest singular values are the
      ones it resolves worst, so this mode always takes the exact SVD (``method`` is ignored), and
      ``V_r^T C~^{-1}`` is a Cholesky solve with ``C~`` in float64 (dividing by the small ``S_r`` as in the
      ipm shortcut would amplify rounding).

    Parameters
    ----------
    weight : Tensor, shape (out_features, in_features)
        Base weight (float32 work for fp16/bf16/fp32, float64 for float64).
    covariance : Tensor, shape (in_features, in_features)
        Symmetric positive semi-definite input covariance, as :func:`lowrank.lora.calibrate_lora` collects
        it (PEFT's: the mean over calibration batches of ``X^T X`` with each batch's ``X`` divided by
        ``|max(X)|``). Its scale only changes how ``S`` is split between ``A`` and ``B``.
    r : int
        Rank, ``1 <= r <= min(weight.shape)``.
    scale : float
        The layer's LoRA scaling, > 0.
    mode : {"ipm", "kpm"}, default "ipm"
    damping : float, default 0.01
        Relative damping of ``C`` (PEFT starts at 0.01 and doubles it only while its float32 inverse of
        ``C~`` is inaccurate, ``||C~ C~^{-1} - I||_F >= 0.05``; no inverse is formed here, ``C~`` is
        factored in float64 only in "kpm" mode). Pass PEFT's final value to match it on a covariance so
        badly conditioned that PEFT had to double it.
    method : {"rsvd", "svd"}, default "rsvd"
        SVD of ``W C~`` in ``"ipm"`` mode.
    n_iter : int, optional
        Iterations of ``"rsvd"`` (default: the engine's).

    Returns
    -------
    B : Tensor, shape (out_features, r)
    A : Tensor, shape (r, in_features)
    residual : Tensor, shape (out_features, in_features)
        All in ``weight``'s dtype and device.

    Raises
    ------
    TypeError
        ``weight`` or ``covariance`` not a dense real floating tensor.
    ValueError
        Bad shapes, NaN/Inf entries, a zero covariance, bad ``r``, ``scale``, ``mode``, ``damping`` or
        ``method``.

    References
    ----------
    Y. Yang et al., "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
    Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv:2406.05223.
    """
    _check_weight(weight, "weight")
    n = weight.shape[1]
    _check_covariance(covariance, n)
    r = _check_r(r, tuple(weight.shape))
    scale = _check_scale(scale, "CorDA")
    if mode not in CORDA_MODES:
        raise ValueError(f"mode must be one of {CORDA_MODES}, got {mode!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < math.inf:
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    _check_svd_method(method)
    work_dtype = _work_dtype(weight.dtype)
    W = weight.detach().to(work_dtype)
    C = covariance.detach().to(weight.device, torch.float64)
    level = float(torch.diagonal(C).mean())
    if not level > 0:
        raise ValueError("covariance is zero (or has a non-positive diagonal): the layer saw no input signal")
    eye = torch.eye(n, dtype=torch.float64, device=C.device)
    C_damped = C + (float(damping) * level) * eye
    W_C = W @ C_damped.to(work_dtype)
    if mode == "ipm":
        U, S, _ = _top_singular_triplets(W_C, r, method, n_iter)
        if bool((S > 0).all()):
            A = (U.T @ W) / (scale * S).sqrt()[:, None]
            B = U * (S / scale).sqrt()
            residual = W - scale * (B @ A)
            return B.to(weight.dtype), A.to(weight.dtype), residual.to(weight.dtype)
        U, S, Vh = _top_singular_triplets(W_C, r, "svd")  # W has rank < r: take the solve below
    else:
        from lowrank.svd import svd

        U_all, S_all, Vh_all = svd(W_C)
        U, S, Vh = U_all[:, -r:], S_all[-r:], Vh_all[-r:]
    L, info = torch.linalg.cholesky_ex(C_damped)
    if int(info) != 0:  # C~ is PD in exact arithmetic; a failure means C is far from PSD
        raise ValueError("covariance + damping is not positive definite: pass a symmetric PSD covariance")
    VhCinv = torch.cholesky_solve(Vh.to(torch.float64).T, L).T.to(work_dtype)  # V_r^T C~^{-1}
    root = (S / scale).sqrt()
    A = root[:, None] * VhCinv
    B = U * root
    residual = W - scale * (B @ A)
    return B.to(weight.dtype), A.to(weight.dtype), residual.to(weight.dtype)


def _flip_to_largest_positive(Vh: torch.Tensor) -> torch.Tensor:
    """Rows of ``Vh`` signed so that each row's largest-magnitude entry is positive (PEFT's svd_flip)."""
    idx = Vh.abs().argmax(dim=1)
    signs = torch.sign(Vh.gather(1, idx[:, None]))
    return Vh * torch.where(signs == 0, 1.0, signs).to(Vh.dtype)


@no_autocast
@torch.no_grad()
def eva_components(
    gram: torch.Tensor, col_sum: torch.Tensor, n_rows: int, k: int, *, method: str = "svd"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""EVA's statistics of a layer's inputs: top-``k`` principal directions and explained-variance ratios.

    For the ``n_rows x d`` matrix ``X`` of all the inputs a layer saw (never stored), given
    ``gram = X^T X`` and ``col_sum = X^T 1``: the centred scatter ``M = X^T X - col_sum col_sum^T / n``
    equals ``X_c^T X_c`` for the column-centred ``X_c = X - 1 mu^T``; its top-``k`` eigenvectors are the
    top right singular vectors of ``X_c`` (PEFT's incremental PCA components), its eigenvalues ``lambda``
    the squared singular values, and ``lambda / trace(M)`` the explained-variance ratios PEFT
    redistributes ranks by. ``M`` is symmetric PSD, so its SVD (lowrank's engine) is its eigen-decomposition.

    Parameters
    ----------
    gram : Tensor, shape (d, d)
        ``X^T X`` (float64 recommended; accumulated by :func:`lowrank.lora.calibrate_lora`).
    col_sum : Tensor, shape (d,)
    n_rows : int
        Number of rows of ``X``, >= 2.
    k : int
        Number of components, ``1 <= k <= d``.
    method : {"svd", "rsvd"}, default "svd"
        Exact SVD of ``M`` (``O(d^3)``) or :func:`lowrank.rsvd` (``O(d^2 k)``).

    Returns
    -------
    components : Tensor, shape (k, d)
        Orthonormal rows, each signed so that its largest-magnitude entry is positive (PEFT's
        ``svd_flip(u_based_decision=False)``), float64.
    ratio : Tensor, shape (k,)
        Explained-variance ratios ``lambda_i / trace(M)``, descending.
    singular_values : Tensor, shape (k,)
        ``sqrt(lambda_i)``, the singular values of ``X_c`` (EVA's whitening divides by their square root).

    Raises
    ------
    TypeError, ValueError
        Bad tensors, shapes, ``n_rows`` or ``k``.

    References
    ----------
    F. Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
    Adaptation", arXiv:2410.07170.
    """
    check_tensor(gram, "gram", complex_ok=False)
    check_tensor(col_sum, "col_sum", complex_ok=False)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    d = gram.shape[0]
    if tuple(col_sum.shape) != (d,):
        raise ValueError(f"col_sum must have shape ({d},), got {tuple(col_sum.shape)}")
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 2:
        raise ValueError(f"n_rows must be an int >= 2, got {n_rows!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an int in [1, {d}], got {k!r}")
    _check_svd_method(method)
    G = gram.detach().to(torch.float64)
    s = col_sum.detach().to(G.device, torch.float64)
    M = G - torch.outer(s, s) / n_rows
    M = 0.5 * (M + M.T)
    total = float(torch.diagonal(M).sum())
    if not total > 1e-13 * float(torch.diagonal(G).sum()):  # below the rounding of G - s s^T / n
        raise ValueError("the inputs have zero variance: EVA has no direction to take")
    _, lam, Vh = _top_singular_triplets(M, k, method)
    return _flip_to_largest_positive(Vh), lam / total, lam.clamp_min(0).sqrt()
