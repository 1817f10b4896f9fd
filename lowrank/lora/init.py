"""Initialisation of LoRA factors, and extraction of a LoRA adapter from a fine-tuned weight.

All SVD-based work here goes through the package's SVD engine (``lowrank.rsvd`` / ``lowrank.svd``), imported
at call time.
"""

from __future__ import annotations

import math

import torch

from lowrank._linop import check_tensor, no_autocast

#: Initialisation methods understood by :func:`reset_lora_factors_` and the LoRA layers.
INIT_METHODS = ("default", "gaussian", "pissa", "zeros")

_SVD_METHODS = ("rsvd", "svd")


def check_init(init: str) -> str:
    """Validate an ``init=`` argument and return it."""
    if not isinstance(init, str) or init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    return init


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
    check_init(init)
    if init == "pissa":
        raise ValueError("init='pissa' needs the base weight: use pissa_factors(weight, r, scale)")
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
    matrix: torch.Tensor, r: int, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``r`` singular triplets ``(U_r, S_r, Vh_r)`` of a 2-D float tensor (lowrank's SVD engine)."""
    from lowrank.svd import rsvd, svd

    if method == "svd":
        U, S, Vh = svd(matrix, r)
    else:
        U, S, Vh = rsvd(matrix, r, seed=0)  # fixed seed: the same weight gives the same adapter
    return U[:, :r], S[:r], Vh[:r]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_weight(value: object, name: str) -> torch.Tensor:
    """A dense, real, finite 2-D float tensor, or a TypeError/ValueError naming ``name``."""
    check_tensor(value, name, complex_ok=False)
    if value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} has an empty dimension (shape {tuple(value.shape)})")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")
    return value


def _check_r(r: object, shape: tuple[int, ...]) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(shape):
        raise ValueError(f"r must be an int in [1, {min(shape)}] for shape {tuple(shape)}, got {r!r}")
    return r


@no_autocast
@torch.no_grad()
def pissa_factors(
    weight: torch.Tensor, r: int, scale: float, *, method: str = "rsvd"
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
        ``"rsvd"`` (``lowrank.rsvd``): ``O(out * in * r)``, the choice for large layers; ``"svd"``
        (``lowrank.svd``): exact, ``O(out * in * min(out, in))``. The output is unchanged either way; only
        how principal the starting subspace is depends on the method.

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
        ``weight`` not 2-D, with NaN/Inf entries or on the meta device; bad ``r``, ``scale``, ``method``.

    References
    ----------
    F. Meng, Z. Wang, M. Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
    Language Models", NeurIPS 2024, arXiv:2404.02948.
    """
    _check_svd_method(method)
    _check_weight(weight, "weight")
    _check_r(r, tuple(weight.shape))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0 for PiSSA, got {scale!r}")
    work = weight.detach().to(_work_dtype(weight.dtype))
    U, S, Vh = _top_singular_triplets(work, r, method)
    root = (S / scale).sqrt()
    B = U * root
    A = root[:, None] * Vh
    residual = work - scale * (B @ A)
    return B.to(weight.dtype), A.to(weight.dtype), residual.to(weight.dtype)


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
    _check_r(r, tuple(base_weight.shape))
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
