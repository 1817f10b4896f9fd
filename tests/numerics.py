"""Shared checks for the math routines' entry guards (issue 15): autocast, scale invariance, bad input.

``same_under_autocast(fn)`` runs ``fn()`` outside and inside a ``torch.autocast`` region and asserts that
every tensor in the results has the same dtype and the same values (the routines switch autocast off at
their entry, so the two runs execute the same kernels). ``META``/``NAN``... build bad-input rows.
"""

from __future__ import annotations

import re

import pytest
import torch

CUDA = torch.cuda.is_available()

#: (device type, autocast dtype) pairs; the CUDA ones skip without a GPU
AUTOCAST_CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param(
        "cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")
    ),
    pytest.param(
        "cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")
    ),
]


def tensors(result) -> list[torch.Tensor]:
    """The tensors in a (nested) result, in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in tensors(item)]
    if isinstance(result, dict):
        return [t for item in result.values() for t in tensors(item)]
    return []


def same_under_autocast(fn, device_type: str, dtype: torch.dtype, rtol: float = 1e-5) -> None:
    """``fn()`` inside ``torch.autocast(device_type, dtype)`` equals ``fn()`` outside: dtypes and values."""
    outside = tensors(fn())
    with torch.autocast(device_type, dtype=dtype):
        inside = tensors(fn())
    assert len(outside) == len(inside) and outside
    for a, b in zip(outside, inside):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert a.shape == b.shape
        if a.is_floating_point() or a.is_complex():
            scale = float(a.abs().max()) if a.numel() else 0.0
            assert torch.allclose(a, b, rtol=rtol, atol=rtol * scale), float((a - b).abs().max())
        else:
            assert torch.equal(a, b)


def check_bad(fn, error: type[Exception], match: str) -> None:
    """``fn()`` raises ``error`` whose message matches ``match`` (a regex, searched)."""
    with pytest.raises(error, match=match):
        fn()


def nan_at(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """A copy of ``t`` with its first entry replaced by ``value``."""
    out = t.clone(memory_format=torch.contiguous_format)
    out.view(-1)[0] = value
    return out


def names(text: str) -> str:
    """A regex matching ``text`` literally (for argument names in messages)."""
    return re.escape(text)
