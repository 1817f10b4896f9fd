r"""DoRA (weight-decomposed low-rank adaptation): the row norms of ``W + s B A`` without forming it.

DoRA (Liu et al. 2024) writes the adapted weight as a magnitude times a direction,

.. math::  W' = \operatorname{diag}\!\left(\frac{m}{\lVert W + s B A \rVert_{\text{row}}}\right) (W + s B A),

with ``m`` (out,) a trained magnitude vector (PEFT's ``lora_magnitude_vector``), initialised to the row
norms of ``W + s B A`` (that is ``‖W‖`` row-wise when ``B = 0``), and the norm treated as a constant in
backward (the paper's section 4.3, as PEFT does). The norm is taken over each output row of the
``(out, in)`` weight (PEFT: ``torch.linalg.norm(W + s B A, dim=1)``); for a GPT-2 ``Conv1D`` (weight stored
``(in, out)``, PEFT's ``fan_in_fan_out``) PEFT transposes first, so the norms are over the stored weight's
columns: pass the transposed view ``weight.T`` here (no copy; every function below takes any strides).

This module computes those norms from the factors:

.. math::  \lVert W_i + s B_i A\rVert^2 = \lVert W_i\rVert^2 + 2 s\, B_i \cdot (A W_i^T)
           + s^2\, B_i (A A^T) B_i^T,

one pass of ``A`` over ``W`` (``A W^T``, the cost of a forward of ``r`` tokens, ``2 r in out`` FLOPs) plus
``O(r^2 (in + out))`` work, never the ``out x in`` matrix ``W + s B A``; ``‖W_i‖^2`` is computed once per
weight (the base weight is frozen) and cached by the layer.

References
----------
S.-Y. Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353.
"""

from __future__ import annotations

import torch

__all__ = ["dora_row_norms", "weight_row_sq_norms"]

# A row whose squared norm is below this fraction of a bound on the size of its terms lost more than 4 bits
# to cancellation in the expanded formula; it is recomputed densely in float64.
_CANCELLATION = 1.0 / 16.0

# Entries per block of weight_row_sq_norms (its float64 temporary: 1 MiB).
_BLOCK_ENTRIES = 1 << 17


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_row_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖²`` for every output row of ``weight`` (out, in), accumulated in float64.

    Returns a float64 tensor of shape (out,) on ``weight``'s device (float32 on devices without float64,
    e.g. MPS). Cost: one pass over ``weight``; any strides (a transposed view, e.g. a ``Conv1D`` weight seen
    as (out, in), is read in place). ``vector_norm(..., dtype=float64)`` converts its whole input first, so
    the rows go through in blocks of at most ``2**17`` entries: the float64 temporary stays at 1 MiB
    whatever the size of ``weight``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (out, in), got {getattr(weight, 'shape', weight)!r}")
    dtype = torch.float32 if weight.device.type == "mps" else torch.float64
    weight = weight.detach()
    rows, cols = weight.shape
    step = max(1, _BLOCK_ENTRIES // max(cols, 1))
    if step >= rows:
        return torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square()
    out = torch.empty(rows, dtype=dtype, device=weight.device)
    for start in range(0, rows, step):
        block = weight[start : start + step]
        torch.linalg.vector_norm(block, dim=1, dtype=dtype, out=out[start : start + step])
    return out.square_()


@torch.no_grad()
def dora_row_norms(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    weight_sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Row norms ``‖W_i + s B_i A‖`` of the DoRA-adapted weight, without forming ``W + s B A``.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        Base weight ``W`` (any floating dtype).
    lora_A : Tensor, shape (r, in)
    lora_B : Tensor, shape (out, r)
    scaling : float
        The LoRA multiplier ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
    weight_sq_norms : Tensor, shape (out,), optional
        ``‖W_i‖²`` from :func:`weight_row_sq_norms` (cached by callers: ``W`` is frozen); computed if absent.

    Returns
    -------
    Tensor, shape (out,)
        float32 (float64 for float64 inputs), detached (no autograd graph), non-negative.

    Notes
    -----
    Computed in float32 for float32/bfloat16/float16 inputs (float64 for float64) from the expansion
    ``‖W_i‖² + 2 s B_i·(A W_iᵀ) + s² B_i (A Aᵀ) B_iᵀ``. The sum can cancel when ``s B_i A ≈ -W_i``;
    rows whose result is below 1/16 of ``‖W_i‖² + s² ‖B_i‖² ‖A‖_F²`` (a bound on the size of its
    terms) are recomputed densely in float64 from ``W_i + s B_i A`` (cost ``2 r in`` per such row), so
    every row keeps a relative error of a few float32 ulps (tested against the float64 dense formula,
    including nearly cancelling rows, where even the dense float32 formula loses digits). The result is
    clamped at 0. Cost: ``2 r in out`` FLOPs for ``A Wᵀ``, ``2 r² (in + out)`` for the rest, in about ten
    ATen calls; one float32 copy of ``W`` when it is half precision.

    Raises
    ------
    ValueError
        Shapes that do not fit together, or a non-finite ``scaling``.
    TypeError
        Non-floating tensors.
    """
    for name, t, dim in (("weight", weight, 2), ("lora_A", lora_A, 2), ("lora_B", lora_B, 2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    out, fan_in = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape[1] != fan_in or tuple(lora_B.shape) != (out, r):
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit weight "
            f"{tuple(weight.shape)}: need (r, {fan_in}) and ({out}, r)"
        )
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or scaling != scaling:
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    s = float(scaling)
    work = _work_dtype(weight.dtype)
    if weight_sq_norms is None:
        weight_sq_norms = weight_row_sq_norms(weight)
    t1 = weight_sq_norms if weight_sq_norms.dtype == work else weight_sq_norms.to(work)
    W, A, B = (t.detach() if t.dtype == work else t.detach().to(work) for t in (weight, lora_A, lora_B))
    # Few, fused ops (each ATen call costs a thread-pool round trip on a busy CPU):
    # C = 2 s W A^T + s^2 B (A A^T), so that ‖W_i + s B_i A‖² = ‖W_i‖² + B_i · C_i.
    G = A @ A.T
    C = torch.addmm(W @ A.T, B, G, beta=2.0 * s, alpha=s * s)
    sq = torch.linalg.vecdot(B, C).add_(t1)
    # Size of the terms: ‖W_i‖² + s² ‖B_i‖² ‖A‖_F² bounds |cross| and the quadratic term (Cauchy-Schwarz),
    # so a row below 1/16 of it lost more than 4 bits to cancellation.
    size = torch.linalg.vecdot(B, B).mul_(G.trace() * (s * s)).add_(t1)  # no host sync on a GPU
    bad = sq < size.mul_(_CANCELLATION)
    if bool(bad.any()):  # the one host sync per recomputation on a GPU (rows are cached between changes)
        rows = bad.nonzero().flatten()
        exact = torch.float32 if weight.device.type == "mps" else torch.float64
        dense = weight.detach()[rows].to(exact) + s * (
            lora_B.detach()[rows].to(exact) @ lora_A.detach().to(exact)
        )
        sq[rows] = torch.linalg.vector_norm(dense, dim=1).square().to(work)
    return sq.clamp_min_(0.0).sqrt_()
