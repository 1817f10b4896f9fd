"""The CPU many-rows (M > 4) path of lowrank.lora_linear against a float64 reference.

On AVX2 CPUs, float32 / bfloat16 / float16 write y = bias + scale (x A^T) B^T in tiles of four rows
(csrc/cpu/lora_linear.cpp), then the base GEMM accumulates into y; float64 takes the composite BLAS path and
scale = 0 the base layer's. The shapes below reach every branch of the tile kernel: row tails (M mod 4 =
0..3), column tails of the 16- and 8-wide steps, K below one vector, r = 1, odd r and r > 16, strided /
expanded / 3-D x, no bias, and enough rows to be split over threads.
"""

from __future__ import annotations

import pytest
import torch

import lowrank

# One rounding of the output (half types; the LoRA term and the GEMM each round once: two) plus fp32
# accumulation, relative to sum |terms| (see _check).
EPS = {torch.float64: 1e-13, torch.float32: 4e-6, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _make(shape_x, out_features, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_features = shape_x[-1]

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    x = rnd(*shape_x)
    W = rnd(out_features, in_features, s=max(in_features, 1) ** -0.5)
    A = rnd(r, in_features, s=max(in_features, 1) ** -0.5)
    B = rnd(out_features, r, s=r**-0.5)
    b = rnd(out_features) if bias else None
    return x, W, A, B, b


def _check(y, x, W, A, B, scale, b):
    """|y - y_ref| <= eps * (|x| |W|^T + |scale| |x A^T| |B|^T + |b|), all in float64."""
    x64, W64, A64, B64 = (t.double() for t in (x, W, A, B))
    u = x64 @ A64.T
    ref = x64 @ W64.T + scale * u @ B64.T
    mag = x64.abs() @ W64.abs().T + abs(scale) * (x64.abs() @ A64.abs().T) @ B64.abs().T
    if b is not None:
        ref = ref + b.double()
        mag = mag + b.double().abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.double() - ref).abs()
    bound = EPS[x.dtype] * (mag + 1e-30)
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the bound"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [5, 6, 7, 8, 13])
@pytest.mark.parametrize(
    "in_features,out_features,r", [(384, 384, 8), (17, 27, 3), (5, 1, 1), (40, 43, 24), (33, 20, 12)]
)
def test_many_rows_match_float64(dtype, M, in_features, out_features, r):
    x, W, A, B, b = _make((M, in_features), out_features, r, dtype, seed=M + r)
    y = lowrank.lora_linear(x, W, A, B, 1.5, b)
    _check(y, x, W, A, B, 1.5, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_3d_input_no_bias_and_negative_scale(dtype, bias):
    x, W, A, B, b = _make((3, 7, 33), 50, 16, dtype, bias=bias, seed=3)
    y = lowrank.lora_linear(x, W, A, B, -0.75, b)
    assert y.shape == (3, 7, 50)
    _check(y, x, W, A, B, -0.75, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_expanded_and_non_contiguous_inputs(dtype):
    x, W, A, B, b = _make((9, 30), 26, 5, dtype, seed=11)
    wide = torch.zeros(9, 45, dtype=dtype)
    wide[:, 7:37] = x
    x_rows = wide[:, 7:37]  # row stride 45, unit column stride: read in place
    assert not x_rows.is_contiguous() and x_rows.stride(1) == 1
    x_cols = x.T.contiguous().T  # column stride 9: copied once
    x_bcast = x[2:3].expand(9, 30)  # row stride 0: every row is x[2]
    A_nc = torch.stack([A, A], -1)[..., 0]  # column stride 2
    B_t = B.T.contiguous().T
    b_nc = torch.stack([b, b], 1)[:, 0]
    for xi in (x_rows, x_cols, x_bcast):
        y = lowrank.lora_linear(xi, W, A_nc, B_t, 0.5, b_nc)
        _check(y, xi, W, A, B, 0.5, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_split_over_threads_are_deterministic(dtype):
    # 2001 rows of a 64 -> 72 layer: ~500 four-row tiles, ~32 per task: several tasks, a 1-row tail tile
    x, W, A, B, b = _make((2001, 64), 72, 8, dtype, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = lowrank.lora_linear(x, W, A, B, 2.0, b)
        torch.set_num_threads(max(2, threads))
        y2 = lowrank.lora_linear(x, W, A, B, 2.0, b)
    finally:
        torch.set_num_threads(threads)
    _check(y2, x, W, A, B, 2.0, b)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_outputs_round_to_nearest_even(dtype):
    # W = 0 and small integers: the LoRA term is exact in fp32, so y is that exact value rounded once to
    # dtype; the bias puts it on ties (1 + 1/2 ulp, 1 + 3/2 ulp) and between them, all of which must round
    # to nearest, ties to even, as torch's own conversion does.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    M, out_features = 6, 40
    x = torch.tensor([[1.0, 2.0, -1.0]] * M, dtype=dtype)
    A = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=dtype)  # u = (0, 2) for every row
    B = torch.zeros(out_features, 2, dtype=dtype)
    B[:, 1] = torch.arange(out_features, dtype=dtype) % 3  # adds 0, 2 or 4
    fractions = torch.tensor([0.5, 1.5, 0.25, 0.75, 2.5], dtype=torch.float64) * ulp
    bias64 = 1.0 + fractions[torch.arange(out_features) % 5]
    bias = bias64.to(dtype)  # the bias itself rounds first: use its dtype value in the reference
    W = torch.zeros(out_features, 3, dtype=dtype)
    y = lowrank.lora_linear(x, W, A, B, 1.0, bias)
    exact = bias.double() + 2.0 * B[:, 1].double()
    assert torch.equal(y, exact.to(dtype).expand(M, out_features))
    # a term that is not representable: 1 + k ulp/2 for odd k is a tie in dtype
    A2 = torch.tensor([[1.0, 0.0, 0.0]], dtype=dtype)
    B2 = torch.full((out_features, 1), ulp / 2, dtype=dtype)
    x2 = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]] * 3, dtype=dtype)
    ones = torch.ones(out_features, dtype=dtype)
    y2 = lowrank.lora_linear(x2, W, A2, B2, 1.0, ones)
    ref = (1.0 + x2[:, :1].double() * (ulp / 2)).expand(M, out_features)
    assert torch.equal(y2, ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_stays_in_its_row_and_scale_zero_is_the_base_layer(dtype):
    x, W, A, B, b = _make((10, 24), 19, 4, dtype, seed=2)
    x[3, 5] = float("nan")
    y = lowrank.lora_linear(x, W, A, B, 1.0, b)
    assert torch.isnan(y[3]).all()
    assert torch.isfinite(torch.cat([y[:3], y[4:]])).all()
    A_bad = A.clone()
    A_bad[0, 0] = float("inf")
    for rows in (x[4:], x[:2]):  # many rows and few rows (the decode pass)
        y0 = lowrank.lora_linear(rows, W, A_bad, B, 0.0, b)  # scale 0: the adapter cannot leak in
        _check(y0, rows, W, A, B, 0.0, b)
        assert torch.isfinite(y0).all()


def test_empty_rows_and_zero_in_features():
    x, W, A, B, b = _make((0, 16), 9, 2, torch.float32)
    assert lowrank.lora_linear(x, W, A, B, 1.0, b).shape == (0, 9)
    x0, W0, A0, B0, b0 = _make((7, 0), 9, 2, torch.float32)
    torch.testing.assert_close(lowrank.lora_linear(x0, W0, A0, B0, 1.0, b0), b0.expand(7, 9))
    assert torch.equal(lowrank.lora_linear(x0, W0, A0, B0, 1.0), torch.zeros(7, 9))


def test_gradients_through_the_many_rows_forward():
    x, W, A, B, b = _make((2, 6, 20), 14, 3, torch.float32, seed=9)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
    y = lowrank.lora_linear(leaves[0], W, leaves[1], leaves[2], 0.5, b)
    _check(y.detach(), x, W, A, B, 0.5, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, A, B)]
    x64, A64, B64 = ref_leaves
    ref = x64 @ W.double().T + 0.5 * (x64 @ A64.T) @ B64.T + b.double()
    ref.backward(g.double())
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
