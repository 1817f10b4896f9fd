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


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
def test_quantize_base_on_a_meta_model_then_to_empty_and_load(fmt):
    """Deferred init: build on meta, inject, quantize, shape-check, materialise, load the real state."""
    from torch import nn

    def build(device):
        torch.manual_seed(0)
        with torch.device(device):
            model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
        lowrank.inject_lora(model, ["0", "2"], r=2)
        return lowrank.quantize_base(model, fmt)

    real = build("cpu")
    for name, p in real.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    lazy = build("meta")
    assert lazy(torch.empty(3, 16, device="meta")).shape == (3, 8)
    lazy.to_empty(device="cpu")
    assert lazy[0].qweight.device.type == "cpu" and lazy[0].qweight.dtype == real[0].qweight.dtype
    lazy.load_state_dict(real.state_dict())
    x = torch.randn(5, 16)
    with torch.no_grad():
        h = x.double() @ _dequant64(real[0].qweight, real[0].weight_scale).T + real[0].bias.double()
        h = h + real[0].scaling["default"] * (x.double() @ real[0].lora_A["default"].double().T) @ (
            real[0].lora_B["default"].double().T
        )
        h = h.relu()
        y = h @ _dequant64(real[2].qweight, real[2].weight_scale).T + real[2].bias.double()
        y = y + real[2].scaling["default"] * (h @ real[2].lora_A["default"].double().T) @ (
            real[2].lora_B["default"].double().T
        )
        torch.testing.assert_close(lazy(x).double(), y, rtol=1e-5, atol=1e-5)
