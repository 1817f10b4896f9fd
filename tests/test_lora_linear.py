"""lowrank.lora_linear against a float64 reference: shapes, dtypes, strides, autograd, compile, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# Tolerances relative to the scale of the output: fp32 GEMMs of a few hundred terms, and for the half
# types one rounding of the output (2^-8 for bf16, 2^-11 for fp16) plus rounding of the inputs' products.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def reference(x, weight, lora_A, lora_B, scale, bias):
    x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
    y = x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T
    if bias is not None:
        y = y + bias.double()
    return y


def make(shape_x, out_features, r, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_features = shape_x[-1]

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype=dtype, device=device)

    x = rnd(*shape_x)
    weight = rnd(out_features, in_features, s=max(in_features, 1) ** -0.5)
    lora_A = rnd(r, in_features, s=max(in_features, 1) ** -0.5)
    lora_B = rnd(out_features, r, s=r**-0.5)
    b = rnd(out_features) if bias else None
    return x, weight, lora_A, lora_B, b


def assert_close_to_reference(y, args, scale):
    ref = reference(*args[:4], scale, args[4])
    assert y.shape == ref.shape
    assert y.dtype == args[0].dtype and y.device == args[0].device
    if ref.numel() == 0:
        return
    err = (y.double() - ref).abs().max().item()
    bound = TOL[y.dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape_x,out_features,r",
    [
        ((1, 64), 48, 1),
        ((3, 19), 21, 2),
        ((2, 2, 40), 30, 5),
        ((7, 33), 65, 3),
        ((2, 5, 130), 17, 16),
        ((3, 1, 2, 257), 31, 128),
        ((64,), 40, 8),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference_cpu(dtype, shape_x, out_features, r, bias):
    args = make(shape_x, out_features, r, dtype, bias=bias)
    y = lowrank.lora_linear(*args[:4], scale=0.75, bias=args[4])
    assert_close_to_reference(y, args, 0.75)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 70),
    r=st.integers(1, 24),
    scale=st.floats(-4, 4, allow_nan=False),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_fp32(lead, in_features, out_features, r, scale, bias, seed):
    args = make((*lead, in_features), out_features, r, torch.float32, bias=bias, seed=seed)
    y = lowrank.lora_linear(*args[:4], scale=scale, bias=args[4])
    assert_close_to_reference(y, args, scale)


def test_strided_and_transposed_inputs():
    x, weight, lora_A, lora_B, bias = make((6, 40), 24, 5, torch.float32)
    x_strided = torch.randn(40, 12)[:, ::2].T  # (6, 40), non-contiguous
    weight_t = weight.T.contiguous().T  # (24, 40) with transposed strides
    lora_A_nc = torch.cat([lora_A, lora_A], 1)[:, ::2]  # every other column: stride 2
    lora_B_t = lora_B.T.contiguous().T
    bias_nc = torch.stack([bias, bias], 1)[:, 0]
    args = (x_strided, weight_t, lora_A_nc, lora_B_t, bias_nc)
    assert not any(t.is_contiguous() for t in args)
    y = lowrank.lora_linear(*args[:4], scale=1.5, bias=args[4])
    assert_close_to_reference(y, args, 1.5)


def test_empty_batch_and_zero_in_features():
    x, weight, lora_A, lora_B, bias = make((2, 0, 16), 8, 4, torch.float32)
    assert lowrank.lora_linear(x, weight, lora_A, lora_B, 2.0, bias).shape == (2, 0, 8)
    x0, w0, a0, b0, bias0 = make((3, 0), 5, 2, torch.float32)
    y = lowrank.lora_linear(x0, w0, a0, b0, 2.0, bias0)
    torch.testing.assert_close(y, bias0.expand(3, 5))


def test_nan_passes_through():
    x, weight, lora_A, lora_B, bias = make((3, 16), 8, 4, torch.float32)
    x[1, 3] = float("nan")
    y = lowrank.lora_linear(x, weight, lora_A, lora_B, 1.0, bias)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


def test_opcheck():
    for bias in (True, False):
        args = make((5, 24), 12, 4, torch.float64, bias=bias)
        for t in args:
            if t is not None:
                t.requires_grad_(True)
        torch.library.opcheck(torch.ops.lowrank.lora_linear.default, (*args[:4], 0.5, args[4]))


def test_gradcheck_all_inputs():
    args = make((2, 3, 7), 5, 3, torch.float64)
    inputs = [t.requires_grad_(True) for t in args]
    fn = lambda x, w, a, b, bias: lowrank.lora_linear(x, w, a, b, 1.7, bias)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradient_only_for_adapter_when_base_frozen():
    x, weight, lora_A, lora_B, bias = make((4, 9), 6, 2, torch.float64)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    y = lowrank.lora_linear(x, weight, lora_A, lora_B, 0.5, bias)
    y.square().sum().backward()
    assert weight.grad is None and bias.grad is None and x.grad is None
    # Independent reference: the same loss through plain float64 autograd.
    a_ref = lora_A.detach().clone().requires_grad_(True)
    b_ref = lora_B.detach().clone().requires_grad_(True)
    (x @ weight.T + 0.5 * (x @ a_ref.T) @ b_ref.T + bias).square().sum().backward()
    torch.testing.assert_close(lora_A.grad, a_ref.grad)
    torch.testing.assert_close(lora_B.grad, b_ref.grad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, weight, lora_A, lora_B, bias = make((3, 4, 16), 12, 4, torch.float32)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)

    def layer(x, weight, lora_A, lora_B, bias):
        return torch.relu(lowrank.lora_linear(x, weight, lora_A, lora_B, 2.0, bias)).sum()

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out = compiled(x, weight, lora_A, lora_B, bias)
    out.backward()
    grads = (lora_A.grad.clone(), lora_B.grad.clone())
    lora_A.grad = lora_B.grad = None
    expected = layer(x, weight, lora_A, lora_B, bias)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads[0], lora_A.grad)
    torch.testing.assert_close(grads[1], lora_B.grad)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 16)
        y = lowrank.lora_linear(
            x, torch.empty(8, 16), torch.empty(4, 16), torch.empty(8, 4), 1.0, torch.empty(8)
        )
        assert y.shape == (2, 3, 8)
        with pytest.raises(ValueError, match="lora_B"):
            lowrank.lora_linear(x, torch.empty(8, 16), torch.empty(4, 16), torch.empty(8, 5))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"weight": torch.zeros(8, 15)}, ValueError, "weight"),
        ({"lora_A": torch.zeros(4, 15)}, ValueError, "lora_A"),
        ({"lora_A": torch.zeros(0, 16), "lora_B": torch.zeros(8, 0)}, ValueError, "r >= 1"),
        ({"lora_B": torch.zeros(9, 4)}, ValueError, "lora_B"),
        ({"lora_B": torch.zeros(8, 4, 1)}, ValueError, "lora_B must be 2-D"),
        ({"bias": torch.zeros(7)}, ValueError, "bias"),
        ({"weight": torch.zeros(8, 16, dtype=torch.float64)}, TypeError, "weight has dtype"),
        ({"x": torch.zeros(3, 16, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"x": torch.tensor(1.0)}, ValueError, "0-d"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    args = {
        "x": torch.zeros(3, 16),
        "weight": torch.zeros(8, 16),
        "lora_A": torch.zeros(4, 16),
        "lora_B": torch.zeros(8, 4),
        "bias": torch.zeros(8),
    }
    if "x" in change and change["x"].dtype == torch.int64:
        args = {k: v.to(torch.int64) for k, v in args.items()}
    args.update(change)
    with pytest.raises(error, match=match):
        lowrank.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], 1.0, args["bias"])


# ----------------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 16, 17, 64, 300])
@pytest.mark.parametrize(
    "in_features,out_features,r", [(256, 384, 16), (4096, 96, 64), (67, 45, 3), (520, 7, 1)]
)
def test_matches_float64_reference_cuda(dtype, M, in_features, out_features, r):
    args = make((M, in_features), out_features, r, dtype, device="cuda", seed=M)
    y = lowrank.lora_linear(*args[:4], scale=0.5, bias=args[4])
    assert_close_to_reference(y, args, 0.5)
    y_nobias = lowrank.lora_linear(*args[:4], scale=0.5)
    assert_close_to_reference(y_nobias, (*args[:4], None), 0.5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_unaligned_strided_large_rank_and_empty(dtype):
    # x starting one element into its storage: 16-byte loads are not allowed, the scalar path must run.
    base = torch.randn(4 * 128 + 1, device="cuda", dtype=dtype)
    x = base[1:].view(4, 128)
    _, weight, lora_A, lora_B, bias = make((4, 128), 64, 8, dtype, device="cuda")
    assert_close_to_reference(
        lowrank.lora_linear(x, weight, lora_A, lora_B, 1.0, bias), (x, weight, lora_A, lora_B, bias), 1.0
    )
    # M * r above the shared-memory budget falls back to the cuBLAS path.
    args = make((16, 64), 32, 512, dtype, device="cuda")
    assert_close_to_reference(lowrank.lora_linear(*args[:4], 1.0, args[4]), args, 1.0)
    # Non-contiguous x and weight.
    args = make((6, 96), 40, 4, dtype, device="cuda")
    xs = torch.cat([args[0], args[0]], 1)[:, ::2]
    ws = args[1].T.contiguous().T
    assert_close_to_reference(lowrank.lora_linear(xs, ws, *args[2:4], 2.0, args[4]), (xs, ws, *args[2:]), 2.0)
    empty = torch.empty(0, 96, device="cuda", dtype=dtype)
    assert lowrank.lora_linear(empty, *args[1:4], 1.0, args[4]).shape == (0, 40)


@needs_cuda
def test_cuda_autograd_opcheck_and_device_mismatch():
    args = make((3, 40), 24, 4, torch.float32, device="cuda")
    leaves = [t.requires_grad_(True) for t in args]
    torch.library.opcheck(torch.ops.lowrank.lora_linear.default, (*leaves[:4], 0.5, leaves[4]))
    y = lowrank.lora_linear(*leaves[:4], 0.5, leaves[4])
    y.sum().backward()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in args]
    reference(*ref_leaves[:4], 0.5, ref_leaves[4]).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="lora_A is on cpu"):
        lowrank.lora_linear(args[0], args[1], args[2].detach().cpu(), args[3], 1.0, args[4])


@pytest.mark.parametrize("which", ["weight", "lora_A", "lora_B", "bias"])
def test_meta_tensor_mixed_with_cpu_raises_naming_it(which):
    # A meta tensor among CPU ones dispatches to the Meta kernel; it must refuse, not return garbage.
    args = dict(zip(["x", "weight", "lora_A", "lora_B", "bias"], make((3, 16), 8, 4, torch.float32)))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta but x is on cpu"):
        lowrank.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], 1.0, args["bias"])
    meta = {k: v.to("meta") for k, v in args.items()}  # all on meta: shapes only, no error
    assert lowrank.lora_linear(meta["x"], meta["weight"], meta["lora_A"], meta["lora_B"]).shape == (3, 8)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("x", None, "x must be a torch.Tensor, got NoneType"),
        ("x", [[1.0] * 16] * 3, "x must be a torch.Tensor, got list"),
        ("weight", 2.0, "weight must be a torch.Tensor, got float"),
        ("lora_A", None, "lora_A must be a torch.Tensor"),
        ("lora_B", "B", "lora_B must be a torch.Tensor, got str"),
        ("bias", 0.5, "bias must be a torch.Tensor, got float"),
        ("scale", "2", "scale must be a real number, got str"),
        ("scale", None, "scale must be a real number, got NoneType"),
        ("scale", 1j, "scale must be a real number, got complex"),
        ("scale", torch.ones(2), "scale must be a real number or a 1-element real tensor"),
    ],
)
def test_non_tensor_arguments_raise_type_error_naming_them(name, value, match):
    args = dict(zip(["x", "weight", "lora_A", "lora_B", "bias"], make((3, 16), 8, 4, torch.float32)))
    args["scale"] = 1.0
    args[name] = value
    with pytest.raises(TypeError, match=match):
        lowrank.lora_linear(
            args["x"], args["weight"], args["lora_A"], args["lora_B"], args["scale"], args["bias"]
        )


def test_scale_accepts_numpy_and_one_element_tensors():
    import numpy as np

    args = make((3, 16), 8, 4, torch.float64)
    for scale in (np.float32(0.5), np.int64(2), torch.tensor(0.5), torch.tensor([2.0])):
        y = lowrank.lora_linear(*args[:4], scale, args[4])
        assert_close_to_reference(y, args, float(scale))
