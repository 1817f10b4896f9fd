"""Faults a user trial of quantize_weight / dequantize found.

quantize_weight stored a zero (or infinite) float32 scale for rows whose ``max |W| / qmax`` lies outside
float32's range (the documented "strictly positive" scale and error bound failed), and refused meta
tensors with an internal error; dequantize raised AttributeError for non-tensors.
"""

from __future__ import annotations

import pytest
import torch

import lowrank


def _dequant64(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return s.double()[:, None] * q.to(torch.float32).double()


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize(
    "row",
    [
        torch.tensor([3e-45, 1.4e-45, 0.0]),  # float32 subnormals: amax / qmax underflows
        torch.tensor([1e-300, -3e-301, 0.0], dtype=torch.float64),  # below float32's range
        torch.tensor([1e-40, 5e-41, -2e-41], dtype=torch.float64),
    ],
)
def test_quantize_tiny_rows_keep_a_positive_normal_scale_and_the_bound(fmt, row):
    W = torch.stack([row, torch.tensor([1.0, -0.5, 0.25], dtype=row.dtype)])
    q, s = lowrank.quantize_weight(W, fmt)
    assert bool((s >= torch.finfo(torch.float32).tiny).all())
    err = (_dequant64(q, s) - W.double()).abs()
    if fmt == "int8":
        bound = s.double()[:, None] / 2
    else:
        bound = 2**-4 * W.double().abs() + 2**-10 * s.double()[:, None]
    assert bool((err <= bound * (1 + 2**-20)).all())


def test_quantize_rows_beyond_float32_scales_are_refused():
    W = torch.tensor([[1.0, 2.0], [1e300, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="row 1 of weight"):
        lowrank.quantize_weight(W)


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
def test_quantize_meta_weight(fmt):
    q, s = lowrank.quantize_weight(torch.empty(5, 3, device="meta"), fmt)
    assert q.device.type == s.device.type == "meta"
    assert q.shape == (5, 3) and s.shape == (5,) and s.dtype == torch.float32
    assert q.dtype == lowrank.quantize.QUANT_DTYPES[fmt][0]


def test_dequantize_non_tensors_are_type_errors():
    q, s = lowrank.quantize_weight(torch.randn(3, 4))
    with pytest.raises(TypeError, match="qweight must be a torch.Tensor"):
        lowrank.dequantize(q.tolist(), s)
    with pytest.raises(TypeError, match="weight_scale must be a torch.Tensor"):
        lowrank.dequantize(q, 1.0)
