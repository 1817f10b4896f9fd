"""lowrank.lora.init (pissa_factors, extract_lora) under autocast and on bad input (issue 15).

The numerical checks of both against NumPy's SVD live in test_lora_layers.py; here: autocast, and one
bad-input table per function whose messages name the argument.
"""

from __future__ import annotations

import pytest
import torch
from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast

from lowrank.lora import extract_lora, pissa_factors

_g = torch.Generator().manual_seed(0)
_W = torch.randn(24, 16, generator=_g)
_T = _W + 0.1 * torch.randn(24, 4, generator=_g) @ torch.randn(4, 16, generator=_g)
_meta = torch.empty(24, 16, device="meta")


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_pissa_and_extract_ignore_autocast(device_type, dtype):
    W, T = _W.to(device_type), _T.to(device_type)
    for method in ("rsvd", "svd"):
        same_under_autocast(lambda m=method: pissa_factors(W, 4, 0.5, method=m), device_type, dtype)
        same_under_autocast(lambda m=method: tuple(extract_lora(W, T, 4, method=m)), device_type, dtype)
    with torch.autocast(device_type, dtype=dtype):
        B, A, residual = pissa_factors(W, 4, 0.5)
        factors = extract_lora(W, T, 4)
    assert B.dtype == A.dtype == residual.dtype == torch.float32
    assert float((residual + 0.5 * B @ A - W).abs().max()) < 1e-5
    assert factors.energy > 0.999  # the delta has rank 4


PISSA_BAD = [
    ("nan", lambda: pissa_factors(nan_at(_W), 4, 1.0), ValueError, "weight contains NaN"),
    (
        "inf",
        lambda: pissa_factors(nan_at(_W, float("inf")), 4, 1.0),
        ValueError,
        "weight contains NaN or Inf",
    ),
    ("meta", lambda: pissa_factors(_meta, 4, 1.0), ValueError, "weight is on the meta device"),
    ("sparse", lambda: pissa_factors(_W.to_sparse(), 4, 1.0), TypeError, "weight must be a dense"),
    ("complex", lambda: pissa_factors(_W.to(torch.complex64), 4, 1.0), TypeError, "weight must be real"),
    ("type", lambda: pissa_factors(_W.numpy(), 4, 1.0), TypeError, "weight must be a torch.Tensor"),
    (
        "int",
        lambda: pissa_factors(torch.ones(4, 4, dtype=torch.int64), 2, 1.0),
        TypeError,
        "weight must have",
    ),
    ("1-D", lambda: pissa_factors(_W[0], 4, 1.0), ValueError, "weight must be a 2-D"),
    ("r big", lambda: pissa_factors(_W, 17, 1.0), ValueError, "r must be an int in"),
    ("r float", lambda: pissa_factors(_W, 2.0, 1.0), ValueError, "r must be an int in"),
    ("scale 0", lambda: pissa_factors(_W, 4, 0.0), ValueError, "scale must be"),
    ("scale nan", lambda: pissa_factors(_W, 4, float("nan")), ValueError, "scale must be"),
    ("scale inf", lambda: pissa_factors(_W, 4, float("inf")), ValueError, "scale must be"),
    ("method", lambda: pissa_factors(_W, 4, 1.0, method="eig"), ValueError, "method must be"),
]

EXTRACT_BAD = [
    ("base nan", lambda: extract_lora(nan_at(_W), _T, 4), ValueError, "base_weight contains NaN"),
    (
        "tuned inf",
        lambda: extract_lora(_W, nan_at(_T, float("inf")), 4),
        ValueError,
        "tuned_weight contains NaN",
    ),
    ("base meta", lambda: extract_lora(_meta, _T, 4), ValueError, "base_weight is on the meta device"),
    ("tuned meta", lambda: extract_lora(_W, _meta, 4), ValueError, "tuned_weight is on the meta device"),
    ("sparse", lambda: extract_lora(_W, _T.to_sparse(), 4), TypeError, "tuned_weight must be a dense"),
    ("complex", lambda: extract_lora(_W.to(torch.complex64), _T, 4), TypeError, "base_weight must be real"),
    ("type", lambda: extract_lora(_W, None, 4), TypeError, "tuned_weight must be a torch.Tensor"),
    ("shapes", lambda: extract_lora(_W, _T[:, :8], 4), ValueError, "differ"),
    ("r", lambda: extract_lora(_W, _T, 0), ValueError, "r must be an int in"),
    ("method", lambda: extract_lora(_W, _T, 4, method="qr"), ValueError, "method must be"),
]


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in PISSA_BAD], ids=[row[0] for row in PISSA_BAD]
)
def test_pissa_factors_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in EXTRACT_BAD], ids=[row[0] for row in EXTRACT_BAD]
)
def test_extract_lora_bad_input(fn, error, match):
    check_bad(fn, error, match)
