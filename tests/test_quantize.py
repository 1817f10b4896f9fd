"""lowrank.quantize_weight / dequantize against float64 arithmetic: scales, rounding, saturation, bounds."""

from __future__ import annotations

import pytest
import torch

import lowrank


def _weight(out=48, inp=96, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    W[3] *= 100.0  # rows of very different magnitude: per-row scales matter
    W[5] = 0.0  # an all-zero row
    return W.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_int8_matches_float64_rounding(dtype):
    W = _weight(dtype=dtype)
    q, s = lowrank.quantize_weight(W, "int8")
    assert q.dtype == torch.int8 and q.shape == W.shape and s.dtype == torch.float32 and s.shape == (48,)
    Wd = W.double()
    amax = Wd.abs().amax(1)
    s_ref = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    torch.testing.assert_close(s.double(), s_ref, rtol=2e-7, atol=0)
    q_ref = torch.round(Wd / s_ref[:, None]).clamp(-127, 127)
    # fp32 division can move a value sitting exactly on a .5 boundary by one step: allow that, nothing more
    diff = (q.double() - q_ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    err = (lowrank.dequantize(q, s, torch.float64) - Wd).abs()
    assert bool((err <= s.double()[:, None] / 2 * (1 + 1e-5)).all())  # the documented bound
    assert int(q.abs().max()) == 127 and bool((q[5] == 0).all()) and float(s[5]) == 1.0


def test_fp8_error_bound_and_saturation():
    W = _weight()
    q, s = lowrank.quantize_weight(W, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn
    Wd = W.double()
    deq = lowrank.dequantize(q, s, torch.float64)
    bound = 2.0**-4 * Wd.abs() + 2.0**-10 * s.double()[:, None]
    assert bool(((deq - Wd).abs() <= bound * (1 + 1e-5)).all())
    # the row maximum maps to +-448 exactly (saturating, never inf/nan)
    assert float(q.float().abs().amax()) == 448.0 and bool(torch.isfinite(q.float()).all())
    # error is far from the bound's worst case on average (sanity: not just passing because it is loose)
    assert float(((deq - Wd).abs() / bound).mean()) < 0.6


def test_dequantize_is_inverse_on_representable_values():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    q[:, 0] = 127  # each row reaches the full range, so requantizing finds the same scale
    s = torch.rand(16, generator=g) + 0.5
    W = lowrank.dequantize(q, s)
    q2, s2 = lowrank.quantize_weight(W, "int8")
    torch.testing.assert_close(lowrank.dequantize(q2, s2), W, rtol=1e-6, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="dtype"):
        lowrank.quantize_weight(torch.randn(4, 4), "int4")
    with pytest.raises(ValueError, match="2-D"):
        lowrank.quantize_weight(torch.randn(4), "int8")
    with pytest.raises(TypeError, match="weight"):
        lowrank.quantize_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        lowrank.quantize_weight(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="weight_scale"):
        lowrank.dequantize(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))
    with pytest.raises(TypeError, match="qweight"):
        lowrank.dequantize(torch.zeros(4, 4), torch.ones(4))
