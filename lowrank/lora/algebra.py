r"""Adapter arithmetic on the factors: combine, recompress, re-rank LoRA adapters without a dense ``delta W``.

A LoRA adapter of a layer is a pair ``(B, A)`` with a scale ``s``: ``delta W = s B A``, ``B`` (out, r),
``A`` (r, in). A weighted sum of ``k`` adapters of one layer is again a product of two factors,

.. math::

    \sum_i w_i s_i B_i A_i = \underbrace{[w_1 s_1 B_1, \dots, w_k s_k B_k]}_{B_s\ (out, R)}
    \underbrace{\begin{bmatrix} A_1 \\ \vdots \\ A_k \end{bmatrix}}_{A_s\ (R, in)},
    \qquad R = \sum_i r_i,

exactly (no cross terms: mixing the ``A``'s and the ``B``'s separately, ``(\sum A_i)(\sum B_i)``, is not the
sum of the products). Its SVD, and so its best rank-``r`` approximation (Eckart–Young–Mirsky), follows from
two thin QR factorisations and one small SVD:

``B_s = Q_b R_b``, ``A_s^T = Q_a R_a``, ``R_b R_a^T = U S V^T`` (an ``R x R`` matrix), so
``B_s A_s = (Q_b U) S (Q_a V)^T`` is an SVD of the sum, and ``(Q_b U_r) S_r (Q_a V_r)^T`` its optimal
rank-``r`` truncation. The cost is ``O((out + in) R^2 + R^3)`` time and ``O((out + in) R)`` memory, never
``O(out * in)``: the dense ``delta W`` is not formed. This is the computation of a truncated SVD of a
product of thin factors (Golub & Van Loan, "Matrix Computations", 4th ed., sec. 2.5 and 5.2; the same
idea is the recompression step of hierarchical / tensor-train arithmetic, e.g. Oseledets, SIAM J. Sci.
Comput. 33(5), 2011).

Returned factors are balanced: ``B = Q_b U_r sqrt(S_r)``, ``A = sqrt(S_r) (Q_a V_r)^T``, with deterministic
signs (the largest-magnitude entry of each column of ``Q_b U_r`` is positive) and singular values in
descending order.

The model-level functions work on the layers of :mod:`lowrank.lora.layers` (``LoRALinear``,
``LoRAMergedLinear`` per enabled slice, ``LoRAEmbedding``), with each adapter's own scaling (``alpha / r``,
or ``alpha / sqrt(r)`` with rsLoRA) folded in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowrank._linop import no_autocast, python_number
from lowrank.budget import allocate_ranks
from lowrank.lora.init import LoRAFactors
from lowrank.lora.layers import LoRALayer, LoRAMergedLinear
from lowrank.lora.model import check_not_reserved, lora_layers
from lowrank.svd import svd

__all__ = ["combine_lora", "combine_adapters", "truncate_adapter"]

_METHODS = ("exact", "svd")


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------


def _finite_number(arg: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{arg} must be a finite real number, got {value!r}")
    return float(value)


def _check_rank_args(r: object, tol: object) -> tuple[int | None, float | None]:
    r = python_number(r)
    if r is not None and tol is not None:
        raise ValueError("give r or tol, not both")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"r must be a positive int, got {r!r}")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, Real) or not 0.0 <= float(tol) < 1.0:
            raise ValueError(f"tol must be a real number in [0, 1), got {tol!r}")
        tol = float(tol)
    return r, tol


def _check_weights(weights: Sequence[float] | None, count: int, arg: str = "weights") -> list[float]:
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (np.ndarray, torch.Tensor)) and weights.ndim == 1:
        weights = weights.tolist()  # a 1-D array of weights is a sequence of numbers to users
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{arg} must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"{arg} has {len(weights)} entries for {count} adapters")
    return [_finite_number(f"{arg}[{i}]", w) for i, w in enumerate(weights)]


def _check_factors(factors: object) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(
            f"factors must be a sequence of (B, A) or (B, A, scale), got {type(factors).__name__}"
        )
    if len(factors) == 0:
        raise ValueError("factors is empty: give at least one (B, A) or (B, A, scale)")
    checked = []
    for i, item in enumerate(factors):
        if not isinstance(item, Sequence) or len(item) not in (2, 3):
            raise TypeError(
                f"factors[{i}] must be a (B, A) or (B, A, scale) tuple, got {type(item).__name__}"
            )
        B, A = item[0], item[1]
        scale = _finite_number(f"factors[{i}] scale", item[2]) if len(item) == 3 else 1.0
        for side, t in (("B", B), ("A", A)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"factors[{i}] {side} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point() or t.dim() < 2:
                raise ValueError(
                    f"factors[{i}] {side} must be a real floating (..., rows, cols) tensor, "
                    f"got {t.dtype} of shape {tuple(t.shape)}"
                )
        if B.shape[-1] != A.shape[-2] or B.shape[-1] == 0 or B.shape[:-2] != A.shape[:-2]:
            raise ValueError(
                f"factors[{i}]: B {tuple(B.shape)} and A {tuple(A.shape)} must be (..., out, r) and "
                "(..., r, in) with the same r >= 1 and the same batch dimensions"
            )
        if B.shape[-2] == 0 or A.shape[-1] == 0:
            raise ValueError(f"factors[{i}]: B {tuple(B.shape)} / A {tuple(A.shape)} has an empty dimension")
        first_B, first_A = (B, A) if not checked else (checked[0][0], checked[0][1])
        if B.shape[:-1] != first_B.shape[:-1] or A.shape[:-2] + A.shape[-1:] != (
            first_A.shape[:-2] + first_A.shape[-1:]
        ):
            raise ValueError(
                f"factors[{i}]: B {tuple(B.shape)} / A {tuple(A.shape)} do not match factors[0]'s "
                f"(..., out, r) = {tuple(first_B.shape)} / (..., r, in) = {tuple(first_A.shape)}"
            )
        if B.device != first_B.device or A.device != first_B.device:
            raise ValueError(f"factors[{i}] is on {B.device}/{A.device}, factors[0] on {first_B.device}")
        for side, t in (("B", B), ("A", A)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"factors[{i}] {side} holds NaN or infinite values")
        checked.append((B, A, scale))
    return checked


# ----------------------------------------------------------------------------------------------------
# the factored SVD
# ----------------------------------------------------------------------------------------------------


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Factored:
    """The SVD of ``B @ A`` held as ``Q_b U``, ``S``, ``V^T Q_a^T`` (vectors formed for the kept k only)."""

    def __init__(self, B: torch.Tensor, A: torch.Tensor) -> None:
        # Scale invariance: the factors are normalised by their largest entries, whose product ``scale`` (a
        # Python float, i.e. float64) multiplies the singular values back; factors of 1e-25 or 1e30 neither
        # underflow nor overflow in the core product. ``S_n`` are the singular values of the normalised
        # product (for ratios: ranks by tolerance, energy), ``S`` = ``S_n * scale`` in the work dtype.
        b_max = float(B.abs().amax()) if B.numel() else 0.0
        a_max = float(A.abs().amax()) if A.numel() else 0.0
        b_max, a_max = b_max or 1.0, a_max or 1.0
        self.scale = b_max * a_max
        self.Qb, Rb = torch.linalg.qr(B / b_max)  # (..., m, p), (..., p, R): Householder, rank deficiency ok
        self.Qa, Ra = torch.linalg.qr(A.mT / a_max)  # (..., n, q), (..., q, R)
        self.U, self.S_n, self.Vh = svd(Rb @ Ra.mT)  # the (p, q) core, S descending
        self.S = self.S_n * self.scale

    def gains(self) -> torch.Tensor:
        """``S^2`` in float64 (no overflow or underflow for any representable factors)."""
        return self.S_n.double().square() * (self.scale * self.scale)

    def vectors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_k, Vh_k)`` of the product; signs: the largest-magnitude entry of each column of U_k > 0."""
        left = self.Qb @ self.U[..., :k]  # (..., m, k)
        right = self.Vh[..., :k, :] @ self.Qa.mT  # (..., k, n)
        left_t = left.mT
        pivot = left_t.gather(-1, left_t.abs().contiguous().argmax(-1, keepdim=True))  # (..., k, 1)
        sign = torch.where(pivot < 0, -1.0, 1.0).to(left.dtype)
        return left * sign.mT, right * sign


def factored_svd(
    B: torch.Tensor, A: torch.Tensor, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of the product ``B @ A`` from its factors, never forming the product.

    ``B`` (..., m, R) and ``A`` (..., R, n) in a float32/float64 dtype; returns the ``k`` (default
    ``K = min(m, n, R)``) leading triplets: ``U`` (..., m, k), ``S`` (..., k) descending, ``Vh`` (..., k, n),
    with deterministic signs (the largest-magnitude entry of each column of ``U`` is positive). Two
    Householder QRs (rank-deficient factors are fine) and one ``min(m, R) x min(n, R)`` SVD:
    ``O((m + n) R^2 + R^3)``.
    """
    core = _Factored(B, A)
    k = core.S.shape[-1] if k is None else min(k, core.S.shape[-1])
    left, right = core.vectors(k)
    return left, core.S[..., :k], right


def _tol_rank(S: torch.Tensor, tol: float) -> int:
    """Smallest k >= 1 with ||tail after k||_F <= tol ||all||_F for every matrix of the batch."""
    sq = S.reshape(-1, S.shape[-1]).double().square()
    tail = sq.flip(-1).cumsum(-1).flip(-1)  # tail[:, j] = sum_{i >= j} S_i^2
    total = tail[:, :1]
    ok = tail <= (tol * tol) * total  # ok[:, j]: keeping j values leaves tail[:, j]
    ok = torch.cat([ok, torch.ones_like(ok[:, :1])], dim=1)
    first = ok[:, 1:].float().argmax(dim=1) + 1  # keep at least one
    return int(first.max())


def _energy(S: torch.Tensor, k: int) -> float:
    total = float(S.double().square().sum())
    return 1.0 if total == 0.0 else min(1.0, float(S[..., :k].double().square().sum()) / total)


def _balanced(core: _Factored, k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_k sqrt(S_k / scale), sqrt(S_k / scale) Vh_k)``."""
    left, right = core.vectors(k)
    root = (core.S_n[..., :k] / scale).sqrt() * math.sqrt(core.scale)
    return left * root.unsqueeze(-2), root.unsqueeze(-1) * right


# ----------------------------------------------------------------------------------------------------
# factor level
# ----------------------------------------------------------------------------------------------------


@no_autocast
@torch.no_grad()
def combine_lora(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, float]],
    weights: Sequence[float] | None = None,
    *,
    r: int | None = None,
    tol: float | None = None,
    method: str | None = None,
) -> LoRAFactors:
    r"""Weighted sum of LoRA adapters of one layer, exact or optimally truncated, on the factors.

    Computes ``D = sum_i w_i s_i B_i A_i`` as a pair ``(B, A)`` with ``B @ A`` equal to ``D`` (``"exact"``)
    or to its best rank-``r`` approximation in Frobenius and spectral norm (``"svd"``), without forming the
    ``out x in`` matrix ``D``. The algebra is in the module docstring (:mod:`lowrank.lora.algebra`).

    Parameters
    ----------
    factors : sequence of (B, A) or (B, A, scale)
        ``B_i`` (..., out, r_i) and ``A_i`` (..., r_i, in), real floating tensors (float16, bfloat16,
        float32, float64) on one device; ranks ``r_i`` may differ, ``out``, ``in`` and the leading batch
        dimensions must agree. ``scale_i`` (default 1) is the adapter's LoRA scaling (``alpha / r``).
    weights : sequence of float, optional
        One finite weight per adapter (negative weights subtract); default all 1.
    r : int, optional
        Rank of the result (``method="svd"``): the ``r`` largest singular triplets of ``D``. Capped at
        ``K = min(out, in, sum r_i)``, the most ``D`` can have; by default ``K`` (then ``B @ A == D``).
    tol : float, optional
        Instead of ``r``: the smallest rank with ``||D - B A||_F <= tol ||D||_F`` (``0 <= tol < 1``; the
        largest such rank over a batch). At least 1.
    method : {"exact", "svd"}, optional
        ``"exact"``: the stacked pair ``B = [w_1 s_1 B_1, ..., w_k s_k B_k]``, ``A = [A_1; ...; A_k]``
        (rank ``sum r_i``, no arithmetic beyond the scaling, not balanced). ``"svd"``: two thin QRs of the
        stacked factors and one ``(sum r_i)``-square SVD, balanced factors ``B = U_r sqrt(S_r)``,
        ``A = sqrt(S_r) V_r^T``. Default: ``"svd"`` if ``r`` or ``tol`` is given, else ``"exact"``.

    Returns
    -------
    LoRAFactors
        Unpacks as ``B, A``: ``B`` (..., out, k), ``A`` (..., k, in), in the promoted dtype of the inputs
        (computed in float32, or float64 for float64 input), on their device, with ``B @ A ~= D`` at scale 1.
        ``.energy``: captured fraction ``||B A||_F^2 / ||D||_F^2 = sum(S_k^2) / sum(S^2)`` over the batch
        (1.0 for ``"exact"`` and for ``D = 0``).

    Raises
    ------
    TypeError, ValueError
        Naming the argument: empty ``factors``, a non-tensor, mismatched shapes/ranks/devices, non-finite
        factors, scales or weights, a wrong number of weights, bad ``r``/``tol``/``method``, ``r``/``tol``
        with ``method="exact"``.

    Notes
    -----
    Cost of ``"svd"``: ``O((out + in) R^2 + R^3)`` time and ``O((out + in) R)`` memory for
    ``R = sum r_i``, against ``O(out in min(out, in))`` time and ``O(out in)`` memory to form and
    decompose ``D`` (what PEFT's ``add_weighted_adapter(combination_type="svd")`` does). Signs are
    deterministic (the largest-magnitude entry of each column of ``B`` is positive), singular values
    descending.

    Examples
    --------
    >>> B1, A1, B2, A2 = torch.randn(64, 4), torch.randn(4, 32), torch.randn(64, 8), torch.randn(8, 32)
    >>> B, A = combine_lora([(B1, A1, 2.0), (B2, A2, 0.5)], [0.7, 0.3], r=6)
    >>> B.shape, A.shape
    (torch.Size([64, 6]), torch.Size([6, 32]))
    """
    items = _check_factors(factors)
    w = _check_weights(weights, len(items))
    r, tol = _check_rank_args(r, tol)
    if method is None:
        method = "svd" if (r is not None or tol is not None) else "exact"
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "exact" and (r is not None or tol is not None):
        raise ValueError("r and tol truncate: they need method='svd' (method='exact' keeps the full rank)")
    out_dtype = items[0][0].dtype
    for B, A, _ in items:
        out_dtype = torch.promote_types(torch.promote_types(out_dtype, B.dtype), A.dtype)
    work = _work_dtype(out_dtype)
    Bs = torch.cat([B.to(work) * (wi * s) for (B, _, s), wi in zip(items, w)], dim=-1)
    As = torch.cat([A.to(work) for _, A, _ in items], dim=-2)
    if method == "exact":
        return LoRAFactors(Bs.to(out_dtype), As.to(out_dtype), 1.0)
    core = _Factored(Bs, As)
    S = core.S_n  # ranks by tolerance and the energy are ratios: the normalised values suffice
    kmax = S.shape[-1]
    k = (
        kmax
        if r is None and tol is None
        else (min(r, kmax) if r is not None else min(_tol_rank(S, tol), kmax))
    )
    B, A = _balanced(core, k)
    return LoRAFactors(B.to(out_dtype), A.to(out_dtype), _energy(S, k))


# ----------------------------------------------------------------------------------------------------
# model level
# ----------------------------------------------------------------------------------------------------


def _refuse_dora(path: str, layer: LoRALayer, names: Sequence[str]) -> None:
    """DoRA adapters scale rows by ``m / ‖W + s B A‖``: algebra on ``s B A`` alone would drop that."""
    dora = [n for n in names if getattr(layer, "use_dora", {}).get(n, False)]
    if dora:
        raise ValueError(
            f"adapters {dora} of {path!r} are DoRA adapters (use_dora=True); combining or truncating acts on "
            "s B A alone and would drop their magnitude, so they are not supported here"
        )


def _factor_params(layer: LoRALayer, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    first, second = layer._factor_names
    return getattr(layer, first)[name], getattr(layer, second)[name]


def _blocks(layer: LoRALayer, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(B_j, A_j)`` per independent block: one for linear/embedding, one per enabled slice if merged."""
    A, B = _factor_params(layer, name)
    if isinstance(layer, LoRAMergedLinear):
        r = layer.r[name]
        Bs = B.split(layer._enabled_sizes, dim=0)
        return [(Bs[j], A[j * r : (j + 1) * r]) for j in range(len(Bs))]
    return [(B, A)]


def _assemble(layer: LoRALayer, blocks: list[tuple[torch.Tensor, torch.Tensor]], k: int):
    """``(A, B)`` in the layer's storage layout from per-block factors of rank <= k (zero-padded to k)."""
    A_parts = [F.pad(A, (0, 0, 0, k - A.shape[0])) for _, A in blocks]
    B_parts = [F.pad(B, (0, k - B.shape[1])) for B, _ in blocks]
    return torch.cat(A_parts, dim=0), torch.cat(B_parts, dim=0)


def _check_name(arg: str, name: object) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{arg} must be a non-empty str without '.', got {name!r}")
    return name


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@no_autocast
@torch.no_grad()
def combine_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float] | None,
    new_name: str,
    *,
    r: int | None = None,
    tol: float | None = None,
    method: str | None = None,
) -> dict[str, int]:
    r"""Add adapter ``new_name``, the weighted sum of ``adapters``, to every LoRA layer holding any of them.

    On each layer, ``delta W_new = sum_i w_i delta W_i`` over the adapters that layer holds (a layer where
    only some exist takes the present ones), with ``delta W_i = s_i B_i A_i`` at each adapter's own scaling
    (rsLoRA included), computed by :func:`combine_lora` on the factors; merged q/k/v layers
    (``LoRAMergedLinear``) are combined slice by slice, embeddings as ``(B, A)`` like linear layers.

    Scale convention: the new adapter has ``use_rslora=False`` and ``alpha = r`` on each layer, so its
    scaling is 1 and the stored factors carry the singular values (``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``; stacked factors for ``"exact"``). :func:`lowrank.save_adapter` writes the per-layer
    ranks and alphas as ``rank_pattern`` / ``alpha_pattern``; PEFT reproduces the same ``delta W``.

    Parameters
    ----------
    model : nn.Module
        A model holding LoRA layers (:func:`lowrank.inject_lora`, :func:`lowrank.load_adapter`).
    adapters : sequence of str
        Distinct names of existing adapters; each must be on at least one layer.
    weights : sequence of float or None
        One finite weight per adapter; ``None``: all 1.
    new_name : str
        Name of the new adapter; must not exist on any layer. It is not activated (unless a layer had no
        active adapter), as in PEFT; use ``set_adapter``.
    r : int, optional
        Maximum rank of the new adapter per layer (``method="svd"``): the optimal rank-``r`` truncation of
        each layer's sum. Default: the sum's full rank ``min(out, in, sum r_i)``.
    tol : float, optional
        Instead of ``r``: per layer, the smallest rank with relative Frobenius error ``<= tol``.
    method : {"exact", "svd"}, optional
        As :func:`combine_lora`; default ``"svd"`` with ``r``/``tol``, else ``"exact"`` (rank ``sum r_i``
        of the present adapters; a layer where that exceeds ``min(out, in)`` gets the equally exact
        full-rank SVD form instead).

    Returns
    -------
    dict of str to int
        Rank of the new adapter on each layer that got it, by module path.

    Raises
    ------
    TypeError, ValueError
        Bad ``model``, empty or duplicate ``adapters``, an adapter no layer holds, wrong number of or
        non-finite ``weights``, ``new_name`` invalid (``"__base__"`` is reserved) or already used, bad
        ``r``/``tol``/``method``. The model
        is unchanged on error.

    Notes
    -----
    Per layer ``O((out + in) R^2 + R^3)`` time, ``O((out + in) R)`` memory, ``R = sum r_i``; no ``out x in``
    matrix. Ranks are capped at the layer's maximum (``min(in, out)``; ``min(in, smallest enabled slice)``
    for merged layers, where a slice whose sum has a higher rank is then truncated optimally); on merged
    layers the slices share one rank (the largest a slice needs) and shorter slices are zero-padded.
    """
    _check_model(model)
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a sequence of adapter names, got {type(adapters).__name__}")
    if len(adapters) == 0:
        raise ValueError("adapters is empty: give at least one adapter name")
    for i, a in enumerate(adapters):
        _check_name(f"adapters[{i}]", a)
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters has duplicates: {list(adapters)}")
    w = _check_weights(weights, len(adapters))
    _check_name("new_name", new_name)
    check_not_reserved("new_name", new_name)
    r, tol = _check_rank_args(r, tol)
    if method is None:
        method = "svd" if (r is not None or tol is not None) else "exact"
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "exact" and (r is not None or tol is not None):
        raise ValueError("r and tol truncate: they need method='svd' (method='exact' keeps the full rank)")

    layers = [(path, layer) for path, layer in lora_layers(model) if any(a in layer.r for a in adapters)]
    for a in adapters:
        if not any(a in layer.r for _, layer in layers):
            raise ValueError(f"adapters: no LoRA layer of the model holds an adapter named {a!r}")
    for path, layer in lora_layers(model):
        if new_name in layer.r:
            raise ValueError(f"new_name: {path!r} already holds an adapter named {new_name!r}")
    for path, layer in layers:
        _refuse_dora(path, layer, adapters)

    plans = []
    for path, layer in layers:
        present = [(a, wi) for a, wi in zip(adapters, w) if a in layer.r]
        cap = layer._max_rank()
        total_rank = sum(layer.r[a] for a, _ in present)
        per_block = [_blocks(layer, a) for a, _ in present]
        results = []
        for j in range(len(per_block[0])):
            block_factors = [
                (blocks[j][0], blocks[j][1], layer.scaling[a]) for blocks, (a, _) in zip(per_block, present)
            ]
            block_weights = [wi for _, wi in present]
            if method == "exact" and total_rank <= cap:
                results.append(combine_lora(block_factors, block_weights, method="exact"))
            elif tol is not None:
                results.append(combine_lora(block_factors, block_weights, tol=tol))
            else:
                results.append(combine_lora(block_factors, block_weights, r=min(r or cap, cap)))
        k = min(cap, max(B.shape[1] for B, _ in results))
        blocks = [(B[:, :k], A[:k]) for B, A in results]
        plans.append((path, layer, k, _assemble(layer, blocks, k)))

    added: list[LoRALayer] = []
    try:
        for _, layer, k, (A, B) in plans:
            layer.add_adapter(new_name, k, alpha=float(k), init="zeros")
            added.append(layer)
            A_param, B_param = _factor_params(layer, new_name)
            A_param.copy_(A.to(A_param.dtype))
            B_param.copy_(B.to(B_param.dtype))
    except BaseException:
        for layer in added:
            layer.delete_adapter(new_name)
        raise
    return {path: k for path, _, k, _ in plans}


def _budget_ranks(spectra: list[torch.Tensor], costs: list[int], caps: list[int], budget: int) -> list[int]:
    """Per-layer ranks (>= 1) with ``sum k_l cost_l <= budget`` minimising the total dropped ``sum S^2``.

    ``spectra`` hold each layer's squared singular values (summed over merged slices, still
    non-increasing); rank 1 everywhere first, the rest by :func:`lowrank.allocate_ranks` (exact dynamic
    programme when small, else greedy on gain per parameter with a certified gap).
    """
    floor = sum(costs)
    if budget < floor:
        raise ValueError(
            f"budget must be at least {floor} parameters (rank 1 on each of the {len(costs)} layers), "
            f"got {budget}"
        )
    tails = [gains[1 : max(cap, 1)].clamp_min(0).sqrt() for gains, cap in zip(spectra, caps)]
    extra = allocate_ranks(tails, budget - floor, costs).ranks
    return [1 + k for k in extra]


@no_autocast
@torch.no_grad()
def truncate_adapter(
    model: nn.Module,
    name: str,
    r: int | None = None,
    *,
    tol: float | None = None,
    budget: int | None = None,
) -> dict[str, int]:
    r"""Re-rank adapter ``name`` in place by the optimal truncation of ``s B A`` on every layer ("resize").

    Each layer's update ``delta W = s B A`` is decomposed on its factors (:func:`factored_svd`: two thin
    QRs and one ``r x r`` SVD) and replaced by its best rank-``k`` approximation (Eckart–Young–Mirsky), as
    balanced factors ``B = U_k sqrt(S_k / s)``, ``A = sqrt(S_k / s) V_k^T``. The layer keeps its scaling
    ``s`` and ``use_rslora``; ``alpha`` is set to ``s k`` (``s sqrt(k)`` with rsLoRA) so that
    ``alpha / r`` stays ``s``. Ranks never grow: ``k <= `` the current rank.

    Parameters
    ----------
    model : nn.Module
        A model holding LoRA layers.
    name : str
        The adapter to re-rank; it must not be merged into the weights.
    r : int, optional
        New rank on every layer (capped at each layer's current rank).
    tol : float, optional
        Per layer, the smallest rank with ``||delta W - delta W_k||_F <= tol ||delta W||_F``
        (``0 <= tol < 1``).
    budget : int, optional
        Total number of parameters of the adapter (``lora_A`` + ``lora_B`` entries, over all layers): ranks
        are allotted across layers to minimise the summed squared Frobenius error ``sum_l ||delta W_l -
        delta W_l^(k_l)||_F^2`` (greedy on the singular values' energy per parameter; every layer keeps at
        least rank 1). Exactly one of ``r``, ``tol``, ``budget``.

    Returns
    -------
    dict of str to int
        The new rank of each layer that holds ``name``, by module path.

    Raises
    ------
    TypeError, ValueError
        Bad ``model``/``name``, no layer holds ``name``, not exactly one of ``r``/``tol``/``budget``, a bad
        value, or a budget below rank 1 everywhere.
    RuntimeError
        If ``name`` is merged into a layer's weight (unmerge first). The model is unchanged on error.

    Notes
    -----
    Per layer ``O((out + in) r^2 + r^3)``; no ``out x in`` matrix. The factor Parameters are replaced by new
    ones (``requires_grad`` kept): rebuild an optimizer that held the old ones. Merged q/k/v layers are
    truncated slice by slice, sharing the largest rank a slice needs (zero-padded).
    """
    _check_model(model)
    _check_name("name", name)
    given = [arg for arg, v in (("r", r), ("tol", tol), ("budget", budget)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of r, tol, budget (got {given or 'none'})")
    r, tol = _check_rank_args(r, tol)
    budget = python_number(budget)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be a positive int (a number of parameters), got {budget!r}")
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.r]
    if not layers:
        raise ValueError(f"name: no LoRA layer of the model holds an adapter named {name!r}")
    for path, layer in layers:
        if name in layer.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into {path!r}; unmerge it before truncating")
        _refuse_dora(path, layer, [name])

    decomposed = []
    for _, layer in layers:
        s = layer.scaling[name]
        parts = []
        for B, A in _blocks(layer, name):
            work = _work_dtype(B.dtype)
            parts.append(_Factored(B.to(work) * s, A.to(work)))
        decomposed.append(parts)

    caps = [layer.r[name] for _, layer in layers]
    if r is not None:
        ranks = [min(r, cap) for cap in caps]
    elif tol is not None:
        ranks = [
            min(cap, max(_tol_rank(part.S_n, tol) for part in parts)) for parts, cap in zip(decomposed, caps)
        ]
    else:
        spectra = []
        for parts in decomposed:
            length = max(part.S.shape[-1] for part in parts)
            gains = torch.zeros(length, dtype=torch.float64)
            for part in parts:
                gains[: part.S.shape[-1]] += part.gains().cpu()
            spectra.append(gains)
        costs = []
        for _, layer in layers:
            A, B = _factor_params(layer, name)
            costs.append((A.numel() + B.numel()) // layer.r[name])
        ranks = _budget_ranks(spectra, costs, caps, budget)

    plans = []
    for (path, layer), parts, k in zip(layers, decomposed, ranks):
        s = layer.scaling[name]
        blocks = [_balanced(part, min(k, part.S.shape[-1]), s) for part in parts]
        plans.append((path, layer, k, _assemble(layer, blocks, k)))
    for _, layer, k, (A, B) in plans:
        A_old, B_old = _factor_params(layer, name)
        first, second = layer._factor_names
        getattr(layer, first)[name] = nn.Parameter(A.to(A_old.dtype), requires_grad=A_old.requires_grad)
        getattr(layer, second)[name] = nn.Parameter(B.to(B_old.dtype), requires_grad=B_old.requires_grad)
        s = layer.scaling[name]
        layer.r[name] = k
        layer.lora_alpha[name] = s * (math.sqrt(k) if layer.use_rslora[name] else k)
    return {path: k for path, _, k, _ in plans}
