"""lowrank.lora_linear_quantized against a float64 reference on the dequantized weight."""

from __future__ import annotations

import pytest
import torch

import lowrank

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

QDTYPES = ["int8", "float8_e4m3fn"]
# Relative to the output's scale: fp32 accumulation of a few hundred terms; one output rounding for bf16.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make(shape_x, out_features, r, dtype, qdtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    inp = shape_x[-1]

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    W = rnd(out_features, inp, s=max(inp, 1) ** -0.5)
    q, s = lowrank.quantize_weight(W, qdtype)
    x = rnd(*shape_x).to(dtype)
    A = rnd(r, inp, s=max(inp, 1) ** -0.5).to(dtype)
    B = rnd(out_features, r, s=r**-0.5).to(dtype)
    b = rnd(out_features).to(dtype) if bias else None
    return [t if t is None else t.to(device) for t in (x, q, s, A, B, b)]


def reference(x, q, s, A, B, scale, bias):
    Wq = lowrank.dequantize(q.cpu(), s.cpu(), torch.float64)
    xd = x.double().cpu()
    y = xd @ Wq.T + scale * (xd @ A.double().cpu().T) @ B.double().cpu().T
    return y if bias is None else y + bias.double().cpu()


def check(y, ref, dtype):
    assert y.dtype == dtype
    err = (y.double().cpu() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(ref.abs().max().item(), 1.0), err


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 17])  # the streaming pass (<= 16) and the blocked path
def test_matches_reference(qdtype, dtype, rows):
    # out = 261 is not a multiple of the 4-row step, of the 64-row grain or of the 128-row block
    x, q, s, A, B, b = make((rows, 70), 261, 5, dtype, qdtype, seed=rows)
    y = lowrank.lora_linear_quantized(x, q, s, A, B, 0.75, b)
    check(y, reference(x, q, s, A, B, 0.75, b), dtype)


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_shapes_no_bias_and_strided_inputs(qdtype):
    x, q, s, A, B, _ = make((2, 3, 64), 40, 4, torch.float32, qdtype, bias=False)
    y = lowrank.lora_linear_quantized(x, q, s, A, B)
    assert y.shape == (2, 3, 40)
    check(y, reference(x, q, s, A, B, 1.0, None).reshape(2, 3, 40), torch.float32)
    # transposed (column-major) qweight and non-contiguous x, A, B: read through their strides
    qt = q.t().contiguous().t()
    xs = torch.randn(64, 4, dtype=torch.float32).t()
    At = A.t().contiguous().t()
    y2 = lowrank.lora_linear_quantized(xs, qt, s, At, B, 2.0)
    check(y2, reference(xs, q, s, A, B, 2.0, None), torch.float32)
    # empty batch, zero in_features
    assert lowrank.lora_linear_quantized(x[:0], q, s, A, B).shape == (0, 3, 40)
    x0, q0, s0, A0, B0, _ = make((3, 0), 8, 2, torch.float32, qdtype, bias=False)
    torch.testing.assert_close(lowrank.lora_linear_quantized(x0, q0, s0, A0, B0), torch.zeros(3, 8))


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("rows", [2, 20])
def test_gradients_match_dequantized_reference(qdtype, rows):
    x, q, s, A, B, b = make((rows, 48), 33, 4, torch.float32, qdtype, seed=7)
    x, A, B, b = (t.clone().requires_grad_() for t in (x, A, B, b))
    y = lowrank.lora_linear_quantized(x, q, s, A, B, 1.5, b)
    g = torch.randn_like(y)
    y.backward(g)
    xr, Ar, Br, br = (t.detach().double().requires_grad_() for t in (x, A, B, b))
    Wq = lowrank.dequantize(q, s, torch.float64)
    yr = xr @ Wq.T + 1.5 * (xr @ Ar.T) @ Br.T + br
    yr.backward(g.double())
    for got, want in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad), (b.grad, br.grad)):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel <= 1e-5, rel


def test_weight_scale_gradient():
    x, q, s, A, B, _ = make((3, 24), 10, 2, torch.float64, "int8", bias=False)
    s = s.clone().requires_grad_()
    y = lowrank.lora_linear_quantized(x, q, s, A, B)
    g = torch.randn_like(y)
    y.backward(g)
    sr = s.detach().double().requires_grad_()
    yr = x @ (sr[:, None] * q.double()).T + (x @ A.T) @ B.T
    yr.backward(g)
    torch.testing.assert_close(s.grad.double(), sr.grad, rtol=1e-5, atol=1e-6)


def test_opcheck_and_compile():
    x, q, s, A, B, b = make((3, 32), 20, 4, torch.float32, "int8")
    A.requires_grad_()
    B.requires_grad_()
    torch.library.opcheck(torch.ops.lowrank.lora_linear_quantized.default, (x, q, s, A, B, 0.5, b))
    torch.library.opcheck(torch.ops.lowrank.lora_linear_quantized.default, (x, q, s, A, B, 0.5, None))

    def f(x, A, B):
        return lowrank.lora_linear_quantized(x, q, s, A, B, 0.5, b).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, A, B)
    gA, gB = torch.autograd.grad(loss, (A, B))
    loss_ref = f(x, A, B)
    gA_ref, gB_ref = torch.autograd.grad(loss_ref, (A, B))
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(gA, gA_ref)
    torch.testing.assert_close(gB, gB_ref)


def test_bad_input_raises_clear_errors():
    x, q, s, A, B, b = make((2, 16), 8, 2, torch.float32, "int8")
    op = lowrank.lora_linear_quantized
    with pytest.raises(TypeError, match="qweight"):
        op(x, q.float(), s, A, B)
    with pytest.raises(TypeError, match="weight_scale"):
        op(x, q, s.double(), A, B)
    with pytest.raises(ValueError, match="weight_scale"):
        op(x, q, s[:3], A, B)
    with pytest.raises(ValueError, match="qweight"):
        op(x[:, :8], q, s, A[:, :8], B)
    with pytest.raises(TypeError, match="lora_A"):
        op(x, q, s, A.double(), B)
    with pytest.raises(TypeError, match="x must be"):
        op(x.to(torch.int32), q, s, A, B)
    with pytest.raises(ValueError, match="bias"):
        op(x, q, s, A, B, 1.0, b[:3])
    with pytest.raises(ValueError, match="lora_B"):
        op(x, q, s, A, B[:, :1])
    with pytest.raises(ValueError, match="device"):  # a meta tensor mixed with CPU ones
        op(x, q.to("meta"), s, A, B)
    with pytest.raises(ValueError, match="device"):
        op(x.to("meta"), q, s, A, B)


@needs_cuda
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16, 37])  # the decode kernel (M <= 16) and the large-M path
@pytest.mark.parametrize("inp", [256, 70])  # 16-byte loads, and the scalar path (70 % 16 != 0)
def test_cuda_matches_reference(qdtype, dtype, rows, inp):
    x, q, s, A, B, b = make((rows, inp), 261, 5, dtype, qdtype, seed=rows, device="cuda")
    y = lowrank.lora_linear_quantized(x, q, s, A, B, 0.75, b)
    check(y, reference(x, q, s, A, B, 0.75, b), dtype)
    # an unaligned view of x (offset by one element) takes the scalar loads
    xo = torch.empty(rows * inp + 1, dtype=dtype, device="cuda")[1:].view(rows, inp).copy_(x)
    check(lowrank.lora_linear_quantized(xo, q, s, A, B, 0.75, b), reference(x, q, s, A, B, 0.75, b), dtype)


@needs_cuda
def test_cuda_gradients_and_empty():
    x, q, s, A, B, b = make((4, 64), 48, 4, torch.float32, "int8", seed=3, device="cuda")
    x, A, B = (t.clone().requires_grad_() for t in (x, A, B))
    y = lowrank.lora_linear_quantized(x, q, s, A, B, 1.5, b)
    g = torch.randn_like(y)
    y.backward(g)
    xr, Ar, Br = (t.detach().double().cpu().requires_grad_() for t in (x, A, B))
    yr = xr @ lowrank.dequantize(q.cpu(), s.cpu(), torch.float64).T + 1.5 * (xr @ Ar.T) @ Br.T
    yr.backward(g.double().cpu())
    for got, want in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
        assert ((got.double().cpu() - want).norm() / want.norm()).item() <= 1e-5
    assert lowrank.lora_linear_quantized(x[:0].detach(), q, s, A.detach(), B.detach()).shape == (0, 48)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("x", None, "x must be a torch.Tensor"),
        ("qweight", [[1]], "qweight must be a torch.Tensor, got list"),
        ("weight_scale", 1.0, "weight_scale must be a torch.Tensor"),
        ("bias", 0.5, "bias must be a torch.Tensor, got float"),
        ("scale", "2", "scale must be a real number, got str"),
    ],
)
def test_non_tensor_arguments_raise_type_error_naming_them(name, value, match):
    W = torch.randn(8, 16)
    q, s = lowrank.quantize_weight(W, "int8")
    args = dict(
        x=torch.randn(3, 16), qweight=q, weight_scale=s, lora_A=torch.randn(4, 16), lora_B=torch.randn(8, 4)
    )
    args.update(scale=1.0, bias=None)
    args[name] = value
    with pytest.raises(TypeError, match=match):
        lowrank.lora_linear_quantized(**args)
