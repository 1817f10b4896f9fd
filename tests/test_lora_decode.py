"""The CPU few-rows (decode, M <= 4) pass of lowrank.lora_linear against a float64 reference.

One threaded pass over the weight (csrc/cpu/lora_linear.cpp) on AVX2 CPUs for float32 / bfloat16 / float16,
the LoRA term + BLAS GEMV otherwise (float64, or no AVX2). Every shape below goes through it: M = 1..4 rows,
odd in/out sizes (vector tails, row remainders of the 4- and 2-row steps), strided x, with and without bias,
scale 0 and negative, r = 1 and 64, and a layer large enough to be split over threads.
"""

from __future__ import annotations

import pytest
import torch

import lowrank

# One rounding of the output (half types) plus fp32 accumulation, relative to sum |terms| (see _bound).
EPS = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _factors(M, in_features, out_features, r, dtype, bias, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    x = rnd(*lead, M, in_features)
    W = rnd(out_features, in_features, s=in_features**-0.5)
    A = rnd(r, in_features, s=in_features**-0.5)
    B = rnd(out_features, r, s=r**-0.5)
    b = rnd(out_features) if bias else None
    return x, W, A, B, b


def _check(y, x, W, A, B, scale, b):
    """|y - y_ref| <= eps * (|x| |W|^T + |scale| |x A^T| |B|^T + |b|), all in float64."""
    x64, W64, A64, B64 = (t.double() for t in (x, W, A, B))
    u = x64 @ A64.T
    ref = x64 @ W64.T + scale * u @ B64.T
    mag = x64.abs() @ W64.abs().T + abs(scale) * u.abs() @ B64.abs().T
    if b is not None:
        ref = ref + b.double()
        mag = mag + b.double().abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.double() - ref).abs()
    bound = EPS[x.dtype] * (mag + 1e-30)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the bound"


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features,out_features", [(1, 5), (3, 1), (17, 5), (4097, 5), (3, 13)])
def test_few_rows_match_float64(dtype, M, in_features, out_features):
    r = min(4, in_features) if in_features > 1 else 1
    x, W, A, B, b = _factors(M, in_features, out_features, r, dtype, bias=True, seed=M)
    y = lowrank.lora_linear(x, W, A, B, 1.5, b)
    _check(y, x, W, A, B, 1.5, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 4])
def test_threaded_rows_large_rank_and_no_bias(dtype, M):
    # 1003 rows x 521 columns: several threads' blocks, 64-row chunks, remainders of the 4/2-row steps
    x, W, A, B, _ = _factors(M, 521, 1003, 64, dtype, bias=False, seed=7)
    y = lowrank.lora_linear(x, W, A, B, 0.25)
    _check(y, x, W, A, B, 0.25, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.0, -2.0])
@pytest.mark.parametrize("r", [1, 64])
def test_scale_zero_negative_and_rank(dtype, scale, r):
    x, W, A, B, b = _factors(2, 200, 70, r, dtype, bias=True, seed=r)
    y = lowrank.lora_linear(x, W, A, B, scale, b)
    _check(y, x, W, A, B, scale, b)
    if scale == 0.0:  # exactly the base layer's math: no LoRA term can leak in
        base = torch.nn.functional.linear(x.double(), W.double(), b.double())
        mag = (x.double().abs() @ W.double().abs().T + b.double().abs()).max().item()
        assert (y.double() - base).abs().max().item() <= EPS[dtype] * mag


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_contiguous_x_and_leading_dims(dtype):
    x, W, A, B, b = _factors(3, 2 * 33, 9, 3, dtype, bias=True, seed=3)
    xs = x[:, ::2]  # stride 2 in the last dimension
    assert not xs.is_contiguous()
    W2, A2 = W[:, :33].contiguous(), A[:, :33].contiguous()
    y = lowrank.lora_linear(xs, W2, A2, B, 0.5, b)
    _check(y, xs, W2, A2, B, 0.5, b)
    # (1, 2, in) -> M = 2 rows through the leading dimensions; a transposed (non-contiguous) weight
    x3, W3, A3, B3, b3 = _factors(2, 40, 12, 2, dtype, bias=True, seed=4, lead=(1,))
    W3t = W3.T.contiguous().T
    y3 = lowrank.lora_linear(x3, W3t, A3, B3, 1.0, b3)
    assert y3.shape == (1, 2, 12)
    _check(y3, x3, W3, A3, B3, 1.0, b3)


@pytest.mark.parametrize("M", [1, 4])
def test_backward_unchanged(M):
    x, W, A, B, b = _factors(M, 37, 11, 3, torch.float64, bias=True, seed=5)
    for t in (x, A, B, b):
        t.requires_grad_(True)
    y = lowrank.lora_linear(x, W, A, B, -0.7, b)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B, b), g)
    ref = x @ W.T + -0.7 * (x @ A.T) @ B.T + b
    ref_grads = torch.autograd.grad(ref, (x, A, B, b), g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # fp32 forward with grad goes through the same few-rows kernel; its gradient matches float64's
    x32, A32, B32 = (t.detach().float().requires_grad_(True) for t in (x, A, B))
    y32 = lowrank.lora_linear(x32, W.float(), A32, B32, -0.7, b.detach().float())
    y32.backward(g.float())
    torch.testing.assert_close(x32.grad.double(), ref_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(A32.grad.double(), ref_grads[1], rtol=1e-4, atol=1e-5)
