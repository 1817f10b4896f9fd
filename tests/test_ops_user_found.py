"""Faults a user trial of the compiled LoRA ops found, each asserted against a float64 reference.

- lora_linear_quantized's many-rows CPU path returned a view of a temporary: in-place use of the output
  under autograd (``nn.ReLU(inplace=True)``, ``y += residual``) and double backward failed.
- lora_linear_multi with ``create_graph=True`` failed inside its compiled backward (addmm out=).
- lora_linear_quantized with ``scale == 0`` let a non-finite adapter leak in (0 * inf) at few rows.
- Inside ``torch.autocast`` the ops' internal GEMMs were cast against their own float32 buffers (mixed-dtype
  RuntimeErrors in lora_linear_multi / lora_linear_quantized), and bf16 activations with float32
  parameters were refused; the ops now follow F.linear's autocast policy.
- A ``scale`` tensor that requires grad was silently read as a constant (no gradient).
- lora_linear_multi with ``scales[a] == 0`` let a non-finite adapter leak in for bf16/fp16 (BLAS skips
  alpha = 0 products for float32/float64 only).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _dequant64(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return s.double()[:, None] * q.to(torch.float32).double()


def _ref(x, weight, A, B, scale, bias):
    """The plain formula in float64 (weight dense)."""
    xd = x.double()
    y = xd @ weight.double().T + scale * (xd @ A.double().T) @ B.double().T
    return y if bias is None else y + bias.double()


def _ref_multi(x, weight, A, B, ids, scales, bias):
    xd = x.double().reshape(-1, x.shape[-1])
    flat = ids.reshape(-1)
    rows = []
    for i in range(xd.shape[0]):
        a = int(flat[i])
        y = xd[i] @ weight.double().T
        if a >= 0:
            y = y + scales[a].double() * (xd[i] @ A[a].double().T) @ B[a].double().T
        rows.append(y if bias is None else y + bias.double())
    return torch.stack(rows).reshape(*x.shape[:-1], weight.shape[0])


K, N, R = 24, 20, 4


def _case(op: str, lead: tuple[int, ...], dtype: torch.dtype):
    """(trainable inputs in ``dtype``, the op on them, the float64 formula on float64 copies of them)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g)
    x = torch.randn(*lead, K, generator=g)
    bias = torch.randn(N, generator=g)
    if op == "lora_linear_multi":
        A, B = torch.randn(3, R, K, generator=g), torch.randn(3, N, R, generator=g)
    else:
        A, B = torch.randn(R, K, generator=g), torch.randn(N, R, generator=g)
    inputs = [t.to(dtype).requires_grad_() for t in (x, A, B, bias)]
    if op == "lora_linear":
        Wd = W.to(dtype)
        return (
            inputs,
            lambda x, A, B, b: lowrank.lora_linear(x, Wd, A, B, 0.5, b),
            (lambda x, A, B, b: _ref(x, Wd, A, B, 0.5, b)),
        )
    if op.startswith("quantized"):
        q, s = lowrank.quantize_weight(W, op.split("_", 1)[1])
        return (
            inputs,
            lambda x, A, B, b: lowrank.lora_linear_quantized(x, q, s, A, B, 0.5, b),
            (lambda x, A, B, b: _ref(x, _dequant64(q, s), A, B, 0.5, b)),
        )
    scales = torch.tensor([0.5, -1.0, 2.0])
    ids = torch.arange(x.shape[:-1].numel()).remainder(4).sub(1).flip(0)  # -1, 0, 1, 2 cycling: gathered
    Wd = W.to(dtype)
    return (
        inputs,
        lambda x, A, B, b: lowrank.lora_linear_multi(x, Wd, A, B, ids, scales, b),
        (lambda x, A, B, b: _ref_multi(x, Wd, A, B, ids, scales, b)),
    )


OPS = ["lora_linear", "lora_linear_multi", "quantized_int8", "quantized_float8_e4m3fn"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead", [(1,), (5,), (20,), (40,), (2, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_is_a_fresh_tensor_that_takes_in_place_updates_under_autograd(op, lead, dtype):
    inputs, run, formula = _case(op, lead, dtype)
    y = run(*inputs)
    assert not y._is_view()
    y.mul_(2).add_(1)  # what nn.ReLU(inplace=True) or `y += residual` do
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y.double() * weights).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    expected = formula(*leaves) * 2 + 1
    (expected * weights).sum().backward()
    scale = expected.abs().max().item()
    assert (y.double() - expected).abs().max().item() <= TOL[dtype] * scale
    for got, leaf in zip(inputs, leaves):
        reference = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad  # an adapter no row uses
        assert (got.grad.double() - reference).abs().max().item() <= TOL[dtype] * reference.abs().max().item()


@pytest.mark.parametrize("rows", [1, 20])
def test_quantized_double_backward(rows):
    g = torch.Generator().manual_seed(1)
    q, s = lowrank.quantize_weight(torch.randn(6, 7, generator=g, dtype=torch.float64))
    x = torch.randn(rows, 7, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda *t: lowrank.lora_linear_quantized(t[0], q, s, *t[1:3], 0.7, t[3]), (x, A, B, b)
    )


@pytest.mark.parametrize("ids", [[0, 2, -1, 0, 1], [1, 1, 0, 0, -1], [-1, -1, -1, -1, -1], [2, 2, 2, 2, 2]])
def test_multi_double_backward(ids):
    g = torch.Generator().manual_seed(2)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    ids = torch.tensor(ids)
    inputs = (t(5, 7), t(6, 7), t(3, 2, 7), t(3, 6, 2), t(3), t(6))
    assert torch.autograd.gradgradcheck(
        lambda x, W, A, B, s, b: lowrank.lora_linear_multi(x, W, A, B, ids, s, b), inputs
    )


def test_multi_double_backward_without_stacked_adapters():
    g = torch.Generator().manual_seed(2)
    x, W = (
        torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        for shape in [(3, 5), (4, 5)]
    )
    A = torch.zeros(0, 2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.zeros(0, 4, 2, dtype=torch.float64, requires_grad=True)
    s = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([-1, -1, -1])
    assert torch.autograd.gradgradcheck(
        lambda *t: lowrank.lora_linear_multi(t[0], t[1], t[2], t[3], ids, t[4]), (x, W, A, B, s)
    )


def test_multi_gradient_penalty_matches_the_float64_reference():
    """A gradient penalty (create_graph=True) through the op equals the same through the plain formula."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 7, generator=g, dtype=torch.float64)
    A = torch.randn(3, 2, 7, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[2, -1, 0], [2, 1, 0]])

    def penalty(f):
        (gx,) = torch.autograd.grad(f().square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (A, B, s))

    got = penalty(lambda: lowrank.lora_linear_multi(x, W, A, B, ids, s))
    expected = penalty(lambda: _ref_multi(x, W, A, B, ids, s, None))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("with_bias", [True, False])
def test_quantized_scale_zero_is_exactly_the_base_layer(fmt, rows, bad, with_bias):
    g = torch.Generator().manual_seed(4)
    q, s = lowrank.quantize_weight(torch.randn(N, K, generator=g), fmt)
    x = torch.randn(rows, K, generator=g)
    A = torch.randn(R, K, generator=g)
    B = torch.randn(N, R, generator=g)
    A[0, 0] = bad
    B[3, 1] = bad
    bias = torch.randn(N, generator=g) if with_bias else None
    y = lowrank.lora_linear_quantized(x, q, s, A, B, 0.0, bias)
    base = x.double() @ _dequant64(q, s).T + (0 if bias is None else bias.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), base, rtol=1e-5, atol=1e-5)


def _round(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.bfloat16).double()


@pytest.mark.parametrize("rows", [1, 5, 20])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_under_autocast_follows_f_linear(rows, x_dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, K, generator=g).to(x_dtype)
    W = torch.randn(N, K, generator=g)
    A = torch.randn(R, K, generator=g, requires_grad=True)
    B = torch.randn(N, R, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank.lora_linear(x, W, A, B, 0.5, b)
        assert y.dtype == torch.nn.functional.linear(x, W, b).dtype == torch.bfloat16
    expected = _ref(_round(x), _round(W), _round(A), _round(B), 0.5, _round(b))
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and torch.isfinite(A.grad).all()


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_multi_under_autocast(rows):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(rows, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g)
    A = torch.randn(3, R, K, generator=g, requires_grad=True)
    B = torch.randn(3, N, R, generator=g, requires_grad=True)
    s = torch.tensor([0.5, -1.0, 2.0])
    ids = torch.arange(rows).remainder(4).sub(1).flip(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank.lora_linear_multi(x, W, A, B, ids, s, None)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()  # backward inside the autocast region too
    expected = _ref_multi(_round(x), _round(W), _round(A), _round(B), ids, s, None)
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert x.grad.dtype == torch.float32 and torch.isfinite(A.grad).all()


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("rows", [1, 20])
def test_quantized_under_autocast(fmt, rows):
    g = torch.Generator().manual_seed(7)
    q, s = lowrank.quantize_weight(torch.randn(N, K, generator=g), fmt)
    x = torch.randn(rows, K, generator=g, requires_grad=True)
    A = torch.randn(R, K, generator=g, requires_grad=True)
    B = torch.randn(N, R, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank.lora_linear_quantized(x, q, s, A, B, 0.5, None)
        assert y.dtype == torch.bfloat16
    expected = _ref(_round(x), _dequant64(q, s), _round(A), _round(B), 0.5, None)
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    y.float().sum().backward()
    assert torch.isfinite(A.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rows", [1, 20])
def test_quantized_model_under_autocast(rows):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(K, 32), nn.ReLU(inplace=True), nn.Linear(32, N))
    lowrank.inject_lora(model, ["0", "2"], r=4)
    lowrank.quantize_base(model, "int8")
    x = torch.randn(rows, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    with torch.no_grad():
        h = x.double() @ _dequant64(model[0].qweight, model[0].weight_scale).T + model[0].bias.double()
        expected = h.relu() @ _dequant64(model[2].qweight, model[2].weight_scale).T + model[2].bias.double()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())
    y.float().sum().backward()  # ReLU(inplace=True) on the quantized layer's output, at both paths
    assert model[0].lora_A["default"].grad is not None


@pytest.mark.parametrize("call", ["lora_linear", "quantized"])
def test_scale_tensor_that_requires_grad_is_refused(call):
    x, A, B = torch.randn(3, K), torch.randn(R, K), torch.randn(N, R)
    scale = torch.tensor(0.5, requires_grad=True)
    if call == "lora_linear":
        W = torch.randn(N, K)
        op = lambda sc: lowrank.lora_linear(x, W, A, B, sc)  # noqa: E731
    else:
        q, s = lowrank.quantize_weight(torch.randn(N, K))
        op = lambda sc: lowrank.lora_linear_quantized(x, q, s, A, B, sc)  # noqa: E731
    with pytest.raises(TypeError, match="scale is a tensor that requires grad"):
        op(scale)
    with torch.no_grad():  # no gradient is asked for: read as a constant
        torch.testing.assert_close(op(scale), op(0.5))
    torch.testing.assert_close(op(scale.detach()), op(0.5))


@requires_cuda
@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_quantized_scale_zero_is_exactly_the_base_layer_cuda(fmt, rows):
    g = torch.Generator().manual_seed(9)
    q, s = lowrank.quantize_weight(torch.randn(N, K, generator=g), fmt)
    x = torch.randn(rows, K, generator=g)
    A = torch.randn(R, K, generator=g)
    B = torch.randn(N, R, generator=g)
    A[0, 0] = float("inf")
    B[1, 1] = float("nan")
    bias = torch.randn(N, generator=g)
    y = lowrank.lora_linear_quantized(x.cuda(), q.cuda(), s.cuda(), A.cuda(), B.cuda(), 0.0, bias.cuda())
    base = x.double() @ _dequant64(q, s).T + bias.double()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double().cpu(), base, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_ops_under_cuda_autocast():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, K, generator=g).cuda()
    W = torch.randn(N, K, generator=g).cuda()
    A = torch.randn(R, K, generator=g).cuda()
    B = torch.randn(N, R, generator=g).cuda()
    q, s = lowrank.quantize_weight(W)
    Am, Bm = A.expand(2, R, K).contiguous(), B.expand(2, N, R).contiguous()
    ids = torch.tensor([0, 1, -1, 1] * 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        for y, expected in [
            (lowrank.lora_linear(x, W, A, B, 0.5), _ref(x.cpu(), W.cpu(), A.cpu(), B.cpu(), 0.5, None)),
            (
                lowrank.lora_linear_quantized(x, q, s, A, B, 0.5),
                _ref(x.cpu(), _dequant64(q, s).cpu(), A.cpu(), B.cpu(), 0.5, None),
            ),
            (
                lowrank.lora_linear_multi(x, W, Am, Bm, ids, torch.ones(2, device="cuda")),
                _ref_multi(x.cpu(), W.cpu(), Am.cpu(), Bm.cpu(), ids.cpu(), torch.ones(2), None),
            ),
        ]:
            assert y.dtype == torch.float16
            torch.testing.assert_close(
                y.double().cpu(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item()
            )


def _dynamic_cases():
    g = torch.Generator().manual_seed(11)
    W = torch.randn(N, K, generator=g)
    A, B = torch.randn(R, K, generator=g), torch.randn(N, R, generator=g)
    Am, Bm = torch.randn(2, R, K, generator=g), torch.randn(2, N, R, generator=g)
    scales = torch.tensor([0.5, -1.0])
    q, s = lowrank.quantize_weight(W)

    def ids_for(x):
        return torch.arange(x.shape[:-1].numel()).remainder(3).sub(1).reshape(x.shape[:-1])

    return {
        "lora_linear": (
            lambda x: lowrank.lora_linear(x, W, A, B, 0.5),
            lambda x: _ref(x, W, A, B, 0.5, None),
        ),
        "lora_linear_multi": (
            lambda x, ids: lowrank.lora_linear_multi(x, W, Am, Bm, ids, scales),
            lambda x, ids: _ref_multi(x, W, Am, Bm, ids, scales, None),
            ids_for,
        ),
        "lora_linear_quantized": (
            lambda x: lowrank.lora_linear_quantized(x, q, s, A, B, 0.5),
            lambda x: _ref(x, _dequant64(q, s), A, B, 0.5, None),
        ),
    }


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_multi", "lora_linear_quantized"])
def test_compile_with_dynamic_shapes_compiles_once(op):
    """The Meta kernels keep the batch dimension symbolic: one graph for all sizes (was one per size)."""
    from torch._dynamo.testing import CompileCounter

    case = _dynamic_cases()[op]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(case[0], backend=counter, dynamic=True, fullgraph=True)
    for rows in (3, 5, 9, 17, 40):
        x = torch.randn(2, rows, K)
        args = (x, case[2](x)) if len(case) == 3 else (x,)
        expected = case[1](*args)
        torch.testing.assert_close(
            compiled(*args).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max()
        )
    assert counter.frame_count == 1


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_multi", "lora_linear_quantized"])
def test_export_with_a_dynamic_batch_dimension(op):
    case = _dynamic_cases()[op]

    class One(nn.Module):
        def forward(self, x):
            return case[0](x)

    class Two(nn.Module):
        def forward(self, x, ids):
            return case[0](x, ids)

    Module = Two if len(case) == 3 else One

    x = torch.randn(6, K)
    batch = torch.export.Dim("batch", min=2)
    if len(case) == 3:
        args, dynamic = (x, case[2](x)), ({0: batch}, {0: batch})
    else:
        args, dynamic = (x,), ({0: batch},)
    program = torch.export.export(Module(), args, dynamic_shapes=dynamic)
    for rows in (2, 11, 33):
        x = torch.randn(rows, K)
        args = (x, case[2](x)) if len(case) == 3 else (x,)
        expected = case[1](*args)
        torch.testing.assert_close(
            program.module()(*args).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max()
        )


def test_compiled_training_step_with_dynamic_shapes_compiles_once():
    from torch._dynamo.testing import CompileCounter

    g = torch.Generator().manual_seed(12)
    W = torch.randn(N, K, generator=g)
    A = torch.randn(R, K, generator=g, requires_grad=True)
    B = torch.randn(N, R, generator=g, requires_grad=True)
    q, s = lowrank.quantize_weight(W)

    def step(x):
        return (
            (lowrank.lora_linear(x, W, A, B, 0.5) + lowrank.lora_linear_quantized(x, q, s, A, B, 0.5))
            .square()
            .sum()
        )

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, dynamic=True)
    for rows in (3, 7, 20):
        x = torch.randn(rows, K, generator=g)
        compiled(x).backward()
        got = (A.grad.clone(), B.grad.clone())
        A.grad = B.grad = None
        step(x).backward()
        torch.testing.assert_close(got[0], A.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], B.grad, rtol=1e-4, atol=1e-4)
        A.grad = B.grad = None
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids", [[0, 0, 1, -1], [0, 1, 0, 1], [1] * 40, [1, 0, -1, 1] * 10])
def test_multi_zero_scale_is_exactly_the_base_layer_for_its_rows(dtype, ids):
    g = torch.Generator().manual_seed(13)
    W = torch.randn(N, K, generator=g)
    A, B = torch.randn(2, R, K, generator=g), torch.randn(2, N, R, generator=g)
    A[1, 0, 0] = float("inf")
    B[1, 2, 1] = float("nan")
    x = torch.randn(len(ids), K, generator=g)
    bias = torch.randn(N, generator=g)
    ids = torch.tensor(ids)
    scales = torch.tensor([0.5, 0.0])
    y = lowrank.lora_linear_multi(
        x.to(dtype), W.to(dtype), A.to(dtype), B.to(dtype), ids, scales, bias.to(dtype)
    )
    keep = ids != 1
    expected = _ref_multi(
        x.to(dtype),
        W.to(dtype),
        A.to(dtype).nan_to_num(0, 0, 0),
        B.to(dtype).nan_to_num(0, 0, 0),
        ids,
        scales,
        bias,
    )
    base = x.to(dtype).double() @ W.to(dtype).double().T + bias.to(dtype).double()
    assert torch.isfinite(y).all()
    tol = TOL.get(dtype, 2e-3) * 4
    torch.testing.assert_close(y.double()[~keep], base[~keep], rtol=tol, atol=tol * base.abs().max().item())
    torch.testing.assert_close(
        y.double()[keep], expected[keep], rtol=tol, atol=tol * expected.abs().max().item()
    )


@requires_cuda
@pytest.mark.parametrize("ids", [[0, 1, 0, 1], [1] * 200, [1, 0, -1, 1] * 50])
def test_multi_zero_scale_is_exactly_the_base_layer_cuda(ids):
    g = torch.Generator().manual_seed(14)
    W = torch.randn(N, K, generator=g)
    A, B = torch.randn(2, R, K, generator=g), torch.randn(2, N, R, generator=g)
    A[1, 0, 0] = float("inf")
    B[1, 2, 1] = float("nan")
    x = torch.randn(len(ids), K, generator=g)
    ids = torch.tensor(ids)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = lowrank.lora_linear_multi(
            *(t.to(dtype).cuda() for t in (x, W, A, B)), ids.cuda(), torch.tensor([0.5, 0.0]).cuda()
        )
        assert torch.isfinite(y).all()
        base = x.to(dtype).double() @ W.to(dtype).double().T
        rows = ids == 1
        torch.testing.assert_close(
            y.double().cpu()[rows], base[rows], rtol=1e-2, atol=1e-2 * base.abs().max().item()
        )
