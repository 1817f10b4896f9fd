"""Every CUDA path of the fused ops against a float64 reference (skipped without a GPU).

The kernel paths of ``lora_linear`` (csrc/cuda/lora_linear.cu): the decode streaming kernel with split-K
shrink (M <= 16, M * r <= 4096), with 16-byte or scalar loads depending on the alignment of x, W and A; the
cuBLAS composite path (larger M, M * r > 4096, fp64). Of ``lora_linear_multi`` (lora_linear_multi.cu): the
BGMV gather kernels (chosen from the shapes, sync-free, graph-capturable) and the segment path. Also the
layers, a training step, streams, graph capture and one tensor over 2^31 elements.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# Relative to the output's scale: fp32 accumulation, plus one rounding of the output for the half types.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype, scale=1.0, g=None, offset=0):
    """A CUDA tensor of the given shape; ``offset`` elements into a fresh buffer (offset 1: misaligned)."""
    values = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    buffer = torch.empty(math.prod(shape) + offset, dtype=dtype, device="cuda")
    out = buffer[offset:].view(shape)
    out.copy_(values)
    return out


def problem(m, n_in, n_out, r, dtype, seed=0, offsets=(0, 0, 0, 0), lead=None):
    g = torch.Generator().manual_seed(seed)
    x = rand(m, n_in, dtype=dtype, g=g, offset=offsets[0])
    if lead is not None:
        x = x.view(*lead, n_in)
    w = rand(n_out, n_in, dtype=dtype, scale=max(n_in, 1) ** -0.5, g=g, offset=offsets[1])
    a = rand(r, n_in, dtype=dtype, scale=max(n_in, 1) ** -0.5, g=g, offset=offsets[2])
    b = rand(n_out, r, dtype=dtype, scale=r**-0.5, g=g, offset=offsets[3])
    bias = rand(n_out, dtype=dtype, g=g)
    return x, w, a, b, bias


def reference(x, w, a, b, scale, bias, keep_graph=False):
    """The op in float64; ``keep_graph`` keeps autograd's graph (for gradient references)."""
    x, w, a, b = (t.double() if keep_graph else t.detach().double() for t in (x, w, a, b))
    y = x @ w.T + scale * (x @ a.T) @ b.T
    if bias is None:
        return y
    return y + (bias.double() if keep_graph else bias.detach().double())


def assert_close(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == dtype and y.is_cuda
    if ref.numel() == 0:
        return
    err = (y.double() - ref).abs().max().item()
    bound = TOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


# ------------------------------------------------------------------------------------------ lora_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_scale_zero_is_the_base_layer_even_with_a_non_finite_adapter(dtype, m):
    """scale == 0 on both CUDA paths (streaming kernel at m <= 16, cuBLAS beyond): the base layer exactly as
    on the CPU; an inf in lora_A must not leak in as 0 * inf = NaN."""
    x, w, a, b, bias = problem(m, 256, 96, 4, dtype, seed=11)
    a[0, 0] = float("inf")
    for with_bias in (bias, None):
        y = lowrank.lora_linear(x, w, a, b, scale=0.0, bias=with_bias)
        assert torch.isfinite(y).all()
        assert_close(y, reference(x, w, torch.zeros_like(a), b, 0.0, with_bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 16, 33])
def test_transposed_weight_is_read_in_place(dtype, m):
    """A weight stored (in, out) and passed as its transposed view (GPT-2's Conv1D) at decode sizes: right
    answer, gradients, and no copy of W per call (the streaming kernels need row-major W; cuBLAS does not)."""
    x, w, a, b, bias = problem(m, 1024, 768, 8, dtype, seed=7)
    stored = w.T.contiguous()  # (in, out), as Conv1D keeps it
    weight = stored.T  # (out, in) view, column-major
    assert not weight.is_contiguous()
    y = lowrank.lora_linear(x, weight, a, b, scale=0.5, bias=bias)
    assert_close(y, reference(x, w, a, b, 0.5, bias), dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lowrank.lora_linear(x, weight, a, b, scale=0.5, bias=bias)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < stored.numel() * stored.element_size() // 2, f"{extra} bytes allocated: W was copied"
    if dtype == torch.float32:
        xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, a, b))
        lowrank.lora_linear(xg, weight, ag, bg, scale=0.5, bias=bias).square().sum().backward()
        xr, ar, br = (t.detach().double().requires_grad_() for t in (x, a, b))
        reference(xr, w, ar, br, 0.5, bias, keep_graph=True).square().sum().backward()
        for got, want in ((xg.grad, xr.grad), (ag.grad, ar.grad), (bg.grad, br.grad)):
            err = (got.double() - want).abs().max().item()
            assert err <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which", ["weight", "lora_A", "lora_B", "x"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_one_misaligned_tensor_among_aligned_ones(dtype, which, m):
    offsets = {"x": (1, 0, 0, 0), "weight": (0, 1, 0, 0), "lora_A": (0, 0, 1, 0), "lora_B": (0, 0, 0, 1)}[
        which
    ]
    x, w, a, b, bias = problem(m, 256, 72, 8, dtype, seed=m, offsets=offsets)
    assert_close(lowrank.lora_linear(x, w, a, b, 0.7, bias), reference(x, w, a, b, 0.7, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,r", [(16, 256), (8, 512), (1, 4096), (16, 257), (16, 255), (2, 2049)])
def test_shared_memory_edge_of_the_decode_kernel(dtype, m, r):
    # M * r == 4096 is the last case of the streaming kernel (16 KiB of u in shared memory); above it cuBLAS.
    x, w, a, b, bias = problem(m, 128, 40, r, dtype, seed=r)
    assert_close(lowrank.lora_linear(x, w, a, b, 0.25, bias), reference(x, w, a, b, 0.25, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 100])
@pytest.mark.parametrize("n_in,n_out", [(0, 24), (24, 0), (0, 0)])
def test_zero_in_or_out_features_forward_and_backward(dtype, m, n_in, n_out):
    x, w, a, b, bias = problem(m, n_in, n_out, 4, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b, bias)]
    y = lowrank.lora_linear(*leaves[:4], 0.5, leaves[4])
    assert_close(y, reference(x, w, a, b, 0.5, bias), dtype)
    y.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape
        assert torch.isfinite(t.grad).all()
    if n_out == 0:
        assert (leaves[0].grad == 0).all()  # nothing flows back from an empty output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(2, 3, 1), (2, 2, 2, 2), (3, 1, 40)])
def test_inputs_with_three_or_more_dims(dtype, lead):
    m = math.prod(lead)
    x, w, a, b, bias = problem(m, 136, 48, 8, dtype, lead=lead)
    y = lowrank.lora_linear(x, w, a, b, 1.5, bias)
    assert y.shape == (*lead, 48)
    assert_close(y.reshape(m, 48), reference(x.reshape(m, 136), w, a, b, 1.5, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_half_precision_backward(dtype, m):
    x, w, a, b, bias = problem(m, 192, 80, 8, dtype, seed=m)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b, bias)]
    y = lowrank.lora_linear(*leaves[:4], 0.5, leaves[4])
    g = rand(*y.shape, dtype=dtype, g=torch.Generator().manual_seed(1))
    y.backward(g)
    refs = [t.detach().double().requires_grad_(True) for t in (x, w, a, b, bias)]
    reference(*refs[:4], 0.5, refs[4], keep_graph=True).backward(g.double())
    for got, want in zip(leaves, refs):
        err = (got.grad.double() - want.grad).abs().max().item()
        assert err <= 4 * TOL[dtype] * max(1.0, want.grad.abs().max().item()), err


@pytest.mark.parametrize("m", [1, 16, 256])
def test_call_on_a_side_stream(m):
    x, w, a, b, bias = problem(m, 512, 96, 16, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = lowrank.lora_linear(x, w, a, b, 0.5, bias)
        ids = torch.zeros(m, dtype=torch.long, device="cuda")
        z = lowrank.lora_linear_multi(x, w, a[None], b[None], ids, torch.tensor([0.5], device="cuda"), bias)
    side.synchronize()
    ref = reference(x, w, a, b, 0.5, bias)
    assert_close(y, ref, torch.bfloat16)
    assert_close(z, ref, torch.bfloat16)


def test_cuda_graph_capture_and_replay_of_the_decode_kernel():
    x, w, a, b, bias = problem(4, 256, 64, 8, torch.float32)
    lowrank.lora_linear(x, w, a, b, 0.5, bias)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lowrank.lora_linear(x, w, a, b, 0.5, bias)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, reference(x, w, a, b, 0.5, bias), torch.float32)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 40),
    n_in=st.integers(1, 300),
    n_out=st.integers(1, 200),
    r=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    offsets=st.tuples(*[st.integers(0, 1)] * 4),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes_dtypes_alignment(m, n_in, n_out, r, dtype, offsets, with_bias, seed):
    x, w, a, b, bias = problem(m, n_in, n_out, r, dtype, seed=seed, offsets=offsets)
    bias = bias if with_bias else None
    assert_close(lowrank.lora_linear(x, w, a, b, -1.25, bias), reference(x, w, a, b, -1.25, bias), dtype)


@pytest.mark.slow
def test_weight_with_more_than_2_31_elements():
    # 524416 x 4096 bf16 (4.3 GB): out * in > 2^31, so every index into W must be 64-bit.
    n_out, n_in, r = 524416, 4096, 16
    assert n_out * n_in > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16, generator=g)
    a = torch.randn(r, n_in, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    b = torch.randn(n_out, r, device="cuda", dtype=torch.bfloat16, generator=g)
    y = lowrank.lora_linear(x, w, a, b, 0.5)
    rows = torch.tensor([0, 1, 2**19 - 1, 2**19, 524287, n_out - 2, n_out - 1], device="cuda")
    ref = reference(x, w[rows], a, b[rows], 0.5, None)
    assert_close(y[:, rows], ref, torch.bfloat16)
    del w


# ------------------------------------------------------------------------------------ lora_linear_multi


def multi_problem(m, n_in, n_out, r, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand(m, n_in, dtype=dtype, g=g)
    w = rand(n_out, n_in, dtype=dtype, scale=n_in**-0.5, g=g)
    a = rand(n, r, n_in, dtype=dtype, scale=n_in**-0.5, g=g)
    b = rand(n, n_out, r, dtype=dtype, scale=r**-0.5, g=g)
    scales = torch.linspace(0.25, 2.0, n, device="cuda")
    return x, w, a, b, scales


def multi_reference(x, w, a, b, ids, scales, bias):
    x2 = x.reshape(-1, x.shape[-1]).double()
    flat = ids.reshape(-1).cpu()
    y = x2 @ w.double().T
    for i, j in enumerate(flat.tolist()):
        if j >= 0:
            y[i] += scales[j].double() * (x2[i] @ a[j].double().T) @ b[j].double().T
    if bias is not None:
        y += bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize(
    "lead,n,path",
    [((16,), 4, "bgmv"), ((2, 8), 4, "bgmv"), ((4, 50), 8, "bgmv (M < 64 N)"), ((300,), 2, "segments")],
)
@pytest.mark.parametrize("dtype,r", [(torch.float32, 5), (torch.float32, 8), (torch.bfloat16, 12)])
def test_multi_without_bias_ids_shaped_like_x_and_odd_rank(lead, n, path, dtype, r):
    m = math.prod(lead)
    x, w, a, b, scales = multi_problem(m, 96, 40, r, n, dtype, seed=m)
    x = x.view(*lead, 96)
    ids = torch.randint(-1, n, lead, generator=torch.Generator().manual_seed(m)).cuda()
    y = lowrank.lora_linear_multi(x, w, a, b, ids, scales)  # ids shaped like x.shape[:-1], no bias
    assert y.shape == (*lead, 40)
    assert_close(y, multi_reference(x, w, a, b, ids, scales, None), dtype)


@pytest.mark.parametrize("sorted_runs", [True, False])
def test_multi_segment_path(sorted_runs):
    m, n = 400, 3
    x, w, a, b, scales = multi_problem(m, 128, 64, 8, n, torch.bfloat16)
    ids = torch.arange(m) * n // m if sorted_runs else torch.randint(-1, n, (m,))
    ids = ids.cuda()
    bias = rand(64, dtype=torch.bfloat16)
    assert_close(
        lowrank.lora_linear_multi(x, w, a, b, ids, scales, bias),
        multi_reference(x, w, a, b, ids, scales, bias),
        torch.bfloat16,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [8, 300])
def test_multi_half_precision_backward(dtype, m):
    n = 3
    x, w, a, b, scales = multi_problem(m, 64, 48, 4, n, dtype, seed=m)
    ids = torch.randint(-1, n, (m,), generator=torch.Generator().manual_seed(m)).cuda()
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    y = lowrank.lora_linear_multi(leaves[0], w, leaves[1], leaves[2], ids, scales)
    g = rand(*y.shape, dtype=dtype, g=torch.Generator().manual_seed(2))
    y.backward(g)
    refs = [t.detach().double().requires_grad_(True) for t in (x, a, b)]
    multi_reference(refs[0], w, refs[1], refs[2], ids, scales.double(), None).backward(g.double())
    for got, want in zip(leaves, refs):
        err = (got.grad.double() - want.grad).abs().max().item()
        assert err <= 4 * TOL[dtype] * max(1.0, want.grad.abs().max().item()), err


def test_multi_is_captured_in_a_cuda_graph_and_replayed_with_new_ids():
    m, n = 16, 4
    x, w, a, b, scales = multi_problem(m, 128, 64, 8, n, torch.bfloat16)
    ids = torch.zeros(m, dtype=torch.long, device="cuda")
    lowrank.lora_linear_multi(x, w, a, b, ids, scales)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host read of the ids here would raise: capture proves it is sync-free
        y = lowrank.lora_linear_multi(x, w, a, b, ids, scales)
    for seed in range(3):
        new_ids = torch.randint(-1, n, (m,), generator=torch.Generator().manual_seed(seed))
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, multi_reference(x, w, a, b, new_ids, scales, None), torch.bfloat16)


def test_multi_out_of_range_id_on_the_gather_path_is_a_device_assert():
    # The gather path never reads the ids on the host; a bad id trips a device-side assertion. It poisons
    # the CUDA context, so it runs in a child process.
    code = textwrap.dedent(
        """
        import torch, lowrank
        x = torch.randn(4, 64, device="cuda"); w = torch.randn(32, 64, device="cuda")
        a = torch.randn(2, 4, 64, device="cuda"); b = torch.randn(2, 32, 4, device="cuda")
        ids = torch.tensor([0, 1, 2, -1], device="cuda")
        lowrank.lora_linear_multi(x, w, a, b, ids, torch.ones(2, device="cuda"))
        torch.cuda.synchronize()
        print("NO ERROR")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout
    assert "assert" in (proc.stderr + proc.stdout).lower()


# --------------------------------------------------------------------------------------- layers, training


def test_lora_linear_layer_and_mixed_adapter_batch_on_cuda():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).cuda()
    layer = lowrank.LoRALinear.from_linear(base, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    layer.add_adapter("other", 4)
    with torch.no_grad():
        layer.lora_B["other"].normal_()
    x = torch.randn(6, 64, device="cuda")
    y = layer(x)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    ref = reference(x, base.weight, a, b, layer.scaling["default"], base.bias)
    assert_close(y, ref, torch.float32)
    model = torch.nn.Sequential(layer)
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    with torch.no_grad(), lowrank.mixed_adapter_batch(model, names):
        mixed = model(x)
    for i, name in enumerate(names):
        if name == "__base__":
            want = x[i : i + 1].double() @ base.weight.detach().double().T + base.bias.detach().double()
        else:
            want = reference(
                x[i : i + 1],
                base.weight,
                layer.lora_A[name],
                layer.lora_B[name],
                layer.scaling[name],
                base.bias,
            )
        assert_close(mixed[i : i + 1], want, torch.float32)


def test_one_training_step_of_a_small_model_matches_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    lowrank.inject_lora(model, ["0", "2"], r=4, alpha=8)
    for module in model.modules():
        if isinstance(module, lowrank.LoRALinear):
            with torch.no_grad():
                module.lora_B["default"].normal_(std=0.1)
    lowrank.mark_only_lora_trainable(model)
    x, target = torch.randn(16, 32), torch.randn(16, 8)
    results = {}
    for device in ("cpu", "cuda"):
        replica = copy.deepcopy(model).to(device)
        opt = torch.optim.SGD([p for p in replica.parameters() if p.requires_grad], lr=0.1)
        loss = torch.nn.functional.mse_loss(replica(x.to(device)), target.to(device))
        loss.backward()
        opt.step()
        after = torch.nn.functional.mse_loss(replica(x.to(device)), target.to(device))
        results[device] = (loss.item(), after.item(), [p.detach().cpu() for p in replica.parameters()])
    assert results["cuda"][1] < results["cuda"][0]
    assert math.isclose(results["cuda"][0], results["cpu"][0], rel_tol=1e-4)
    assert math.isclose(results["cuda"][1], results["cpu"][1], rel_tol=1e-4)
    for got, want in zip(results["cuda"][2], results["cpu"][2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
