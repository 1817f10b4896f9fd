"""Weight-only quantization of linear-layer weights: int8 and float8 (e4m3fn), per-output-channel scales.

``quantize_weight`` turns a dense (out_features, in_features) weight into a quantized tensor of the same
shape and one float32 scale per output row; ``dequantize`` is its inverse map (``scale[:, None] * q``).
The fused operator :func:`lowrank.lora_linear_quantized` consumes the pair directly, without forming the
dequantized weight.
"""

from __future__ import annotations

import torch

__all__ = ["QUANT_DTYPES", "quantize_weight", "dequantize"]

#: Supported storage dtypes: name -> (torch dtype, largest representable magnitude).
QUANT_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "float8_e4m3fn": (torch.float8_e4m3fn, 448.0),
}


def _resolve_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype, float]:
    for name, (tdtype, qmax) in QUANT_DTYPES.items():
        if dtype == name or dtype == tdtype:
            return name, tdtype, qmax
    raise ValueError(f"quantize_weight: dtype must be one of {sorted(QUANT_DTYPES)}, got {dtype!r}")


def quantize_weight(
    weight: torch.Tensor, dtype: str | torch.dtype = "int8"
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Quantize a weight matrix per output channel (symmetric, round-to-nearest, saturating).

    For each row ``i``: ``weight_scale[i] = max_j |W[i, j]| / qmax`` (``qmax`` = 127 for int8, 448 for
    float8_e4m3fn; a row of zeros gets scale 1), and ``qweight[i, j] = Q(W[i, j] / weight_scale[i])``
    where ``Q`` rounds to the nearest representable value (ties to even) and saturates to ``[-qmax, qmax]``.
    This is the weight-only scheme of LLM.int8()'s per-row ("vector-wise") absmax quantization without the
    outlier decomposition, and the per-channel float8 scaling of Micikevicius et al.

    Parameters
    ----------
    weight : Tensor, shape (out_features, in_features)
        Floating-point weight (float16, bfloat16, float32 or float64), any device. Must be finite.
    dtype : {"int8", "float8_e4m3fn"} or the matching torch dtype, default "int8"
        Storage type of ``qweight``.

    Returns
    -------
    qweight : Tensor, shape (out_features, in_features), dtype int8 or float8_e4m3fn
        Contiguous, on ``weight``'s device.
    weight_scale : Tensor, shape (out_features,), dtype float32
        Per-row scales, strictly positive and normal (at least ``torch.finfo(torch.float32).tiny``: a row
        whose ``max |W| / qmax`` is smaller gets that scale).

    Raises
    ------
    TypeError
        ``weight`` is not a floating-point tensor.
    ValueError
        ``weight`` is not 2-D, holds NaN or infinity, has a row whose scale ``max |W| / qmax`` exceeds
        float32's range (only possible for a float64 weight), or ``dtype`` is not supported.

    Notes
    -----
    Error bound, element-wise, with ``s_i = weight_scale[i]`` (up to float32 rounding of the division,
    a relative 2**-24):

    - int8: ``|W[i, j] - s_i q[i, j]| <= s_i / 2 = max_j |W[i, j]| / 254``;
    - float8_e4m3fn (3 mantissa bits): ``|W[i, j] - s_i q[i, j]| <= 2**-4 |W[i, j]| + 2**-10 s_i``
      (half a unit in the last place of a normal number, or half the smallest subnormal ``2**-9``).

    Cost: one pass over ``weight`` computed in float32 (float64 for a float64 weight), with one
    temporary of the weight's size in that precision; storage becomes 1 byte per element plus 4 per row.

    References
    ----------
    T. Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", NeurIPS 2022,
    arXiv:2208.07339. P. Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433.

    Examples
    --------
    >>> W = torch.randn(32, 64)
    >>> q, s = lowrank.quantize_weight(W, "int8")
    >>> bool(((lowrank.dequantize(q, s) - W).abs() <= s[:, None] / 2 + 1e-6).all())
    True
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_weight: weight must be a torch.Tensor, got {type(weight).__name__}")
    _, tdtype, qmax = _resolve_dtype(dtype)
    if not weight.is_floating_point() or weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(
            f"quantize_weight: weight must be a float16/bfloat16/float32/float64 tensor, got {weight.dtype}"
        )
    if weight.dim() != 2:
        raise ValueError(
            "quantize_weight: weight must be 2-D (out_features, in_features), got shape "
            f"{tuple(weight.shape)}"
        )
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    # (meta tensors: shapes and dtypes only, no values to check)
    if work.numel() and not work.is_meta and not bool(torch.isfinite(work).all()):
        raise ValueError("quantize_weight: weight holds NaN or infinity; it cannot be quantized")
    if work.shape[1] == 0:
        amax = torch.zeros(work.shape[0], dtype=work.dtype, device=work.device)
    else:
        amax = work.abs().amax(dim=1)
    # The scales are stored in float32: a row whose amax / qmax lies beyond float32's largest value cannot be
    # represented (only a float64 weight can have one); one below its smallest normal number is raised to it
    # (the row then quantizes with an absolute error <= 2**-127, below float32's resolution of such a row)
    # instead of underflowing to a zero or subnormal scale that would lose the row.
    f32 = torch.finfo(torch.float32)
    scale = amax / qmax
    if not work.is_meta and bool((scale > f32.max).any()):
        row = int(torch.argmax(amax))
        raise ValueError(
            f"quantize_weight: row {row} of weight has max |W| = {float(amax[row]):.3g}; its scale "
            f"(max |W| / {qmax:g}) exceeds float32's range, in which the scales are stored"
        )
    scale = torch.where(amax > 0, scale.clamp(min=f32.tiny), torch.ones_like(scale))
    scaled = work / scale[:, None]
    if tdtype == torch.int8:
        qweight = scaled.round_().clamp_(-qmax, qmax).to(torch.int8)
    else:
        # torch's float -> float8_e4m3fn cast rounds to nearest even; clamping first makes it saturate.
        qweight = scaled.clamp_(-qmax, qmax).to(tdtype)
    return qweight.contiguous(), scale.to(torch.float32).contiguous()


def dequantize(
    qweight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    r"""Dense weight from quantized storage: ``weight_scale[:, None] * qweight`` in ``dtype``.

    Parameters
    ----------
    qweight : Tensor, shape (out_features, in_features), dtype int8 or float8_e4m3fn
    weight_scale : Tensor, shape (out_features,), floating point
        Same device as ``qweight``.
    dtype : torch.dtype, default torch.float32
        Floating dtype of the result. The product is formed in float32 (float64 when ``dtype`` is
        float64), so for float32/float64 it is exact up to one rounding of the product.

    Returns
    -------
    Tensor, shape (out_features, in_features), dtype ``dtype``

    Raises
    ------
    TypeError
        A non-tensor ``qweight``/``weight_scale``, or wrong dtypes.
    ValueError
        Shapes or devices do not match.

    Notes
    -----
    Cost: one pass, one dense result of ``out_features * in_features`` elements. The fused op
    :func:`lowrank.lora_linear_quantized` never forms it.
    """
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"dequantize: qweight must be a torch.Tensor, got {type(qweight).__name__}")
    if not isinstance(weight_scale, torch.Tensor):
        raise TypeError(f"dequantize: weight_scale must be a torch.Tensor, got {type(weight_scale).__name__}")
    if qweight.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"dequantize: qweight must be int8 or float8_e4m3fn, got {qweight.dtype}")
    if not weight_scale.is_floating_point():
        raise TypeError(f"dequantize: weight_scale must be floating point, got {weight_scale.dtype}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dequantize: dtype must be a floating torch.dtype, got {dtype!r}")
    if qweight.dim() != 2 or weight_scale.shape != (qweight.shape[0],):
        raise ValueError(
            f"dequantize: expected qweight (out, in) and weight_scale (out,), got {tuple(qweight.shape)} "
            f"and {tuple(weight_scale.shape)}"
        )
    if weight_scale.device != qweight.device:
        raise ValueError(
            f"dequantize: weight_scale is on {weight_scale.device} but qweight is on {qweight.device}"
        )
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (qweight.to(work) * weight_scale.to(work)[:, None]).to(dtype)
