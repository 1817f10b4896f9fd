"""Tests of lowrank.lora_linear_multi: mixed-adapter batches against a per-row loop of lowrank.lora_linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowrank

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Tolerances of the op against a float64 reference, relative to the output's magnitude.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}

ID_PATTERNS = {
    "one_adapter": lambda m, n, g: torch.full((m,), 1 % n, dtype=torch.long),
    "all_different": lambda m, n, g: torch.arange(m) % n,
    "mixed_with_base": lambda m, n, g: torch.randint(-1, n, (m,), generator=g),
    "grouped_runs": lambda m, n, g: torch.sort(torch.randint(-1, n, (m,), generator=g)).values,
    "all_base": lambda m, n, g: torch.full((m,), -1, dtype=torch.long),
}


def make_problem(m, in_f, out_f, r, n, dtype=torch.float32, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    x = rnd(m, in_f)
    weight = rnd(out_f, in_f, scale=max(in_f, 1) ** -0.5)
    lora_A = rnd(n, r, in_f, scale=max(in_f, 1) ** -0.5)
    lora_B = rnd(n, out_f, r, scale=r**-0.5)
    scales = (torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.25).to(device=device)
    b = rnd(out_f) if bias else None
    return x, weight, lora_A, lora_B, scales, b, g


def per_row_reference(x, weight, lora_A, lora_B, ids, scales, bias):
    """Row by row: lowrank.lora_linear for rows with an adapter, F.linear for id -1 (all in float64)."""
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    x, weight, lora_A, lora_B, scales, bias = map(d, (x, weight, lora_A, lora_B, scales, bias))
    rows = []
    for i, a in enumerate(ids.reshape(-1).tolist()):
        xi = x.reshape(-1, x.shape[-1])[i : i + 1]
        if a < 0:
            rows.append(F.linear(xi, weight, bias))
        else:
            rows.append(lowrank.lora_linear(xi, weight, lora_A[a], lora_B[a], float(scales[a]), bias))
    if not rows:
        return torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float64)
    return torch.cat(rows).reshape(*x.shape[:-1], weight.shape[0])


def assert_close_to(y, ref, dtype):
    assert y.shape == ref.shape
    err = (y.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pattern", list(ID_PATTERNS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_per_row_lora_linear(dtype, pattern, with_bias):
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(23, 37, 29, 5, 6, dtype, bias=with_bias)
    ids = ID_PATTERNS[pattern](23, 6, g)
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)
    assert y.dtype == dtype
    assert_close_to(y, per_row_reference(x, weight, lora_A, lora_B, ids, scales, bias), dtype)


@pytest.mark.parametrize(
    "m,in_f,out_f,r,n",
    [(1, 5, 3, 1, 1), (2, 33, 17, 1, 9), (40, 9, 70, 12, 2), (31, 64, 64, 16, 40), (7, 3, 1, 4, 7)],
)
def test_random_shapes_match_per_row_reference(m, in_f, out_f, r, n):
    """Odd sizes, r = 1, one adapter, more adapters than rows, out = 1; ids uniform over -1..n-1."""
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(m, in_f, out_f, r, n, torch.float64, seed=m + n)
    ids = torch.randint(-1, n, (m,), generator=g)
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)
    assert_close_to(y, per_row_reference(x, weight, lora_A, lora_B, ids, scales, bias), torch.float64)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("ids_shaped_like_x", [False, True])
def test_leading_dims_and_id_layouts(id_dtype, ids_shaped_like_x):
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(12, 16, 10, 3, 4)
    x = x.reshape(3, 4, 16)
    ids = torch.randint(-1, 4, (12,), generator=g).to(id_dtype)
    y = lowrank.lora_linear_multi(
        x, weight, lora_A, lora_B, ids.reshape(3, 4) if ids_shaped_like_x else ids, scales, bias
    )
    assert y.shape == (3, 4, 10)
    assert_close_to(y, per_row_reference(x, weight, lora_A, lora_B, ids, scales, bias), torch.float32)


def test_per_sequence_ids_broadcast_over_tokens():
    """The layer use: one adapter per sequence of a (batch, seq, in) input, ids expanded over the tokens."""
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(15, 8, 6, 2, 3)
    x = x.reshape(3, 5, 8)
    per_sequence = torch.tensor([2, -1, 0])
    ids = per_sequence[:, None].expand(3, 5)  # a non-contiguous view
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)
    flat = per_sequence.repeat_interleave(5)
    assert_close_to(y, per_row_reference(x, weight, lora_A, lora_B, flat, scales, bias), torch.float32)


def test_strided_inputs():
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(9, 20, 14, 4, 3, torch.float64)
    x_t = x.t().contiguous().t()  # column-major view
    lora_A_nc = lora_A.transpose(1, 2).contiguous().transpose(1, 2)
    ids = torch.tensor([2, 0, -1, 2, 1, 0, 0, -1, 2])[::1]
    y = lowrank.lora_linear_multi(x_t, weight.t().contiguous().t(), lora_A_nc, lora_B, ids, scales, bias)
    assert_close_to(y, per_row_reference(x, weight, lora_A, lora_B, ids, scales, bias), torch.float64)


def test_differing_ranks_zero_padded():
    """Adapters of rank 2 and 5 padded to 5 give exactly their unpadded lora_linear."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 11, generator=g, dtype=torch.float64)
    ranks = [2, 5]
    a_list = [torch.randn(r, 11, generator=g, dtype=torch.float64) for r in ranks]
    b_list = [torch.randn(7, r, generator=g, dtype=torch.float64) for r in ranks]
    lora_A = torch.zeros(2, 5, 11, dtype=torch.float64)
    lora_B = torch.zeros(2, 7, 5, dtype=torch.float64)
    for k, r in enumerate(ranks):
        lora_A[k, :r] = a_list[k]
        lora_B[k, :, :r] = b_list[k]
    scales = torch.tensor([0.5, 1.5], dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 0, -1, 0])
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales)
    for i, a in enumerate(ids.tolist()):
        expect = (
            F.linear(x[i], weight)
            if a < 0
            else lowrank.lora_linear(x[i], weight, a_list[a], b_list[a], float(scales[a]))
        )
        torch.testing.assert_close(y[i], expect, rtol=1e-12, atol=1e-12)


def test_empty_batch_forward_and_backward():
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(0, 8, 6, 2, 3)
    x.requires_grad_(True)
    lora_A.requires_grad_(True)
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, torch.empty(0, dtype=torch.long), scales, bias)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(lora_A.grad, torch.zeros_like(lora_A))


@pytest.mark.parametrize("in_f,out_f", [(0, 4), (4, 0)])
def test_empty_feature_dims_with_weight_and_bias_grads(in_f, out_f):
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(0, in_f, out_f, 2, 2)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, torch.empty(0, dtype=torch.int32), scales, bias)
    y.sum().backward()
    assert y.shape == (0, out_f) and weight.grad.shape == (out_f, in_f) and bias.grad.shape == (out_f,)
    assert not weight.grad.any() and not bias.grad.any()


def test_nan_stays_in_its_row():
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(5, 8, 6, 2, 3)
    x[2, 3] = float("nan")
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, torch.tensor([0, 1, 1, 2, 1]), scales, bias)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("pattern", ["grouped_runs", "mixed_with_base", "one_adapter"])
def test_gradcheck_fp64(pattern):
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(7, 5, 4, 2, 3, torch.float64)
    ids = ID_PATTERNS[pattern](7, 3, g)
    inputs = [t.clone().requires_grad_(True) for t in (x, weight, lora_A, lora_B)]
    scales = scales.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)

    def fn(x, weight, lora_A, lora_B, scales, bias):
        return lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)

    assert torch.autograd.gradcheck(fn, (*inputs, scales, bias))


def test_gradients_match_per_adapter_autograd():
    """Training three adapters in one batch: gradients equal those of the float64 per-row reference."""
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(16, 12, 9, 3, 4, torch.float32)
    ids = torch.randint(-1, 3, (16,), generator=g)  # adapter 3 absent: zero gradient
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
    y = lowrank.lora_linear_multi(leaves[0], weight, leaves[1], leaves[2], ids, scales, bias)
    upstream = torch.randn(y.shape, generator=g)
    y.backward(upstream)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B)]
    xd, ad, bd = ref_leaves
    rows = []
    for i, a in enumerate(ids.tolist()):
        base = xd[i] @ weight.double().T + bias.double()
        rows.append(base if a < 0 else base + float(scales[a]) * (xd[i] @ ad[a].T) @ bd[a].T)
    torch.stack(rows).backward(upstream.double())
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(leaves[1].grad[3], torch.zeros_like(lora_A[3]))


def test_weight_and_bias_grad_only_when_required():
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(6, 5, 4, 2, 2, torch.float64)
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    y = lowrank.lora_linear_multi(x, w, lora_A, lora_B, ids, scales, b)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(w.grad, torch.ones(6, 4, dtype=torch.float64).T @ x)
    torch.testing.assert_close(b.grad, torch.full((4,), 6.0, dtype=torch.float64))


@pytest.mark.parametrize("pattern", ["grouped_runs", "mixed_with_base"])
def test_opcheck(pattern):
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(8, 6, 5, 2, 3)
    ids = ID_PATTERNS[pattern](8, 3, g)
    for t in (x, lora_A, lora_B, scales):
        t.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.lowrank.lora_linear_multi.default, (x, weight, lora_A, lora_B, ids, scales, bias)
    )
    grad = torch.randn(8, 5, generator=g)
    torch.library.opcheck(
        torch.ops.lowrank.lora_linear_multi_backward.default,
        (
            grad,
            x.detach(),
            weight,
            lora_A.detach(),
            lora_B.detach(),
            ids,
            scales.detach(),
            [True, False, True, True],
        ),
    )


def test_torch_compile_fullgraph():
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(10, 8, 6, 2, 3)
    ids = torch.randint(-1, 3, (10,), generator=g)
    lora_A.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, lora_A, ids):
        return torch.relu(lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)).sum()

    loss = step(x, lora_A, ids)
    loss.backward()
    shorter = step(x[:7], lora_A, ids[:7])  # another batch size: recompiles or runs the dynamic graph
    expect = torch.relu(lowrank.lora_linear_multi(x[:7], weight, lora_A, lora_B, ids[:7], scales, bias)).sum()
    torch.testing.assert_close(shorter, expect)
    expect_a = lora_A.grad.clone()
    lora_A.grad = None
    torch.relu(lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)).sum().backward()
    torch.testing.assert_close(expect_a, lora_A.grad)


@pytest.mark.parametrize("bad_id", [3, -2, 100])
def test_out_of_range_ids_raise_value_error(bad_id):
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(4, 6, 5, 2, 3)
    ids = torch.tensor([0, bad_id, 1, -1])
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = .*out of range"):
        lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)


def test_bad_arguments_raise_clear_errors():
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(4, 6, 5, 2, 3)
    ids = torch.tensor([0, 1, 2, -1])
    call = lowrank.lora_linear_multi
    with pytest.raises(TypeError, match="adapter_ids must be an int64 or int32"):
        call(x, weight, lora_A, lora_B, ids.float(), scales, bias)
    with pytest.raises(ValueError, match="adapter_ids must hold one id per row"):
        call(x, weight, lora_A, lora_B, ids[:3], scales, bias)
    with pytest.raises(TypeError, match="scales must be a floating-point"):
        call(x, weight, lora_A, lora_B, ids, torch.ones(3, dtype=torch.long), bias)
    with pytest.raises(ValueError, match="scales must have shape"):
        call(x, weight, lora_A, lora_B, ids, torch.ones(2), bias)
    with pytest.raises(TypeError, match="lora_B has dtype"):
        call(x, weight, lora_A, lora_B.double(), ids, scales, bias)
    with pytest.raises(ValueError, match="lora_A must be 3-D"):
        call(x, weight, lora_A[0], lora_B, ids, scales, bias)
    with pytest.raises(ValueError, match="lora_B has shape"):
        call(x, weight, lora_A, lora_B[:2], ids, scales, bias)
    with pytest.raises(ValueError, match="weight has shape"):
        call(x, weight[:, :5], lora_A, lora_B, ids, scales, bias)


@pytest.mark.parametrize("name", ["x", "weight", "lora_A", "lora_B", "adapter_ids", "scales", "bias"])
def test_non_tensor_arguments_raise_type_error_naming_them(name):
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(4, 6, 5, 2, 3)
    args = dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, adapter_ids=torch.tensor([0, 1, 2, -1]))
    args.update(scales=scales, bias=bias)
    args[name] = [0, 1, 2, -1] if name == "adapter_ids" else 1.5
    with pytest.raises(TypeError, match=f"lora_linear_multi: {name} must be a torch.Tensor"):
        lowrank.lora_linear_multi(**args)


def test_mixed_devices_raise_value_error_on_cpu():
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(4, 6, 5, 2, 3)
    ids = torch.tensor([0, 1, 2, -1])
    with pytest.raises(ValueError, match="adapter_ids is on meta but x is on cpu"):
        lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids.to("meta"), scales, bias)
    with pytest.raises(ValueError, match="scales is on meta"):
        lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales.to("meta"), bias)


@needs_cuda
def test_wrong_device_raises_value_error():
    x, weight, lora_A, lora_B, scales, bias, _ = make_problem(4, 6, 5, 2, 3, device="cuda")
    ids = torch.tensor([0, 1, 2, -1])  # on the CPU
    with pytest.raises(ValueError, match="adapter_ids is on cpu"):
        lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)
    with pytest.raises(ValueError, match="scales is on cpu"):
        lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids.cuda(), scales.cpu(), bias)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16, 300, 1000])  # 1000 rows over 6 adapters: segment GEMMs
@pytest.mark.parametrize("in_f,out_f", [(64, 48), (37, 29), (520, 264)])
@pytest.mark.parametrize(
    "pattern", ["one_adapter", "all_different", "mixed_with_base", "grouped_runs", "all_base"]
)
def test_cuda_matches_per_row_reference(dtype, m, in_f, out_f, pattern):
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(m, in_f, out_f, 8, 6, dtype, device="cuda")
    ids = ID_PATTERNS[pattern](m, 6, g).cuda()
    y = lowrank.lora_linear_multi(x, weight, lora_A, lora_B, ids, scales, bias)
    assert y.device.type == "cuda" and y.dtype == dtype
    assert_close_to(y, per_row_reference(x, weight, lora_A, lora_B, ids.cpu(), scales, bias), dtype)


@needs_cuda
@pytest.mark.parametrize("r", [8, 5])
def test_cuda_misaligned_and_int32_ids(r):
    """x and lora_A starting one element into their storage (not 16-byte aligned, though in = 64 is a multiple
    of the vector width) and r = 5 (rows of B not a multiple of it) take the scalar paths and stay correct."""
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(6, 64, 33, r, 3, torch.bfloat16, device="cuda")
    x_off = torch.empty(1 + x.numel(), dtype=x.dtype, device="cuda")[1:].view(x.shape).copy_(x)
    a_off = torch.empty(1 + lora_A.numel(), dtype=x.dtype, device="cuda")[1:].view(lora_A.shape).copy_(lora_A)
    assert x_off.is_contiguous() and x_off.data_ptr() % 16 != 0 and a_off.data_ptr() % 16 != 0
    ids = torch.tensor([2, -1, 0, 2, 1, 0], dtype=torch.int32, device="cuda")
    y = lowrank.lora_linear_multi(x_off, weight, a_off, lora_B, ids, scales, bias)
    assert_close_to(y, per_row_reference(x, weight, lora_A, lora_B, ids.cpu(), scales, bias), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("m", [0, 3, 200])
def test_cuda_backward_matches_cpu(m):
    x, weight, lora_A, lora_B, scales, bias, g = make_problem(m, 40, 24, 4, 5, torch.float32, device="cuda")
    ids = torch.randint(-1, 5, (m,), generator=g)
    outs = {}
    for device in ("cpu", "cuda"):
        leaves = [t.detach().to(device).requires_grad_(True) for t in (x, lora_A, lora_B, scales)]
        y = lowrank.lora_linear_multi(
            leaves[0], weight.to(device), leaves[1], leaves[2], ids.to(device), leaves[3], bias.to(device)
        )
        y.backward(torch.ones_like(y))
        outs[device] = [y.detach().cpu()] + [t.grad.cpu() for t in leaves]
    for got, ref in zip(outs["cuda"], outs["cpu"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
