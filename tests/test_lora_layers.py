"""LoRA layers: forward/backward against float64 references, init, merge, adapters, compile, autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lowrank
import lowrank.lora.layers as layers_module
from lowrank import LoRAEmbedding, LoRALinear, LoRAMergedLinear
from lowrank.lora import extract_lora, pissa_factors


def _randomize(layer: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in layer.lora_parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def test_from_linear_shares_parameters_and_starts_at_base():
    torch.manual_seed(0)
    linear = nn.Linear(24, 12)
    layer = LoRALinear.from_linear(linear, r=4, alpha=8)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A["default"].shape == (4, 24) and layer.lora_B["default"].shape == (12, 4)
    assert layer.scaling["default"] == 2.0 and layer.active_adapter == "default"
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
    # A is Kaiming-uniform with bound 1/sqrt(in): nonzero and inside the bound
    A = layer.lora_A["default"]
    assert A.abs().max() <= 1 / math.sqrt(24) and A.abs().max() > 0


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_backward_against_float64_reference(use_rslora, bias):
    torch.manual_seed(1)
    layer = LoRALinear(20, 14, r=3, alpha=6, bias=bias, use_rslora=use_rslora, dtype=torch.float64)
    _randomize(layer)
    scale = 6 / math.sqrt(3) if use_rslora else 2.0
    assert layer.scaling["default"] == pytest.approx(scale)
    x = torch.randn(2, 7, 20, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    W, A, B = _np(layer.weight), _np(layer.lora_A["default"]), _np(layer.lora_B["default"])
    ref = _np(x) @ W.T + scale * (_np(x) @ A.T) @ B.T + (_np(layer.bias) if bias else 0.0)
    np.testing.assert_allclose(_np(y), ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    G = _np(g).reshape(-1, 14)
    X = _np(x).reshape(-1, 20)
    np.testing.assert_allclose(
        _np(x.grad).reshape(-1, 20), G @ W + scale * (G @ B) @ A, rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        _np(layer.lora_B["default"].grad), scale * G.T @ (X @ A.T), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        _np(layer.lora_A["default"].grad), scale * (G @ B).T @ X, rtol=1e-10, atol=1e-12
    )
    assert layer.weight.grad is None


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(2)
    layer = LoRALinear(16, 8, r=2, dropout=0.5)
    _randomize(layer)
    x = torch.randn(6, 16)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    ref = F.linear(x, layer.weight, layer.bias) + (dropped @ A.T @ B.T) * layer.scaling["default"]
    torch.testing.assert_close(y, ref)
    assert not torch.allclose(dropped, x)
    layer.eval()
    ref_eval = F.linear(x, layer.weight, layer.bias) + (x @ A.T @ B.T) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), ref_eval)


def test_unmerged_forward_is_one_fused_call_and_merged_is_plain_linear(monkeypatch):
    torch.manual_seed(3)
    linear = nn.Linear(32, 16)
    original = linear.weight.detach().clone()
    layer = LoRALinear.from_linear(linear, r=4)
    _randomize(layer)
    x = torch.randn(9, 32)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return lowrank.lora_linear(*args, **kwargs)

    monkeypatch.setattr(layers_module, "lora_linear", counting)
    expected = layer(x)
    assert len(calls) == 1
    layer.merge()
    assert layer.merged_adapters == ["default"]
    merged_out = layer(x)
    assert len(calls) == 1  # merged: F.linear only
    torch.testing.assert_close(merged_out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_out, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(
        linear.weight.detach(), original, rtol=0, atol=4 * torch.finfo(torch.float32).eps
    )
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        layer.unmerge()


def test_adapter_switching_copies_no_weight():
    torch.manual_seed(4)
    layer = LoRALinear(12, 10, r=2)
    layer.add_adapter("second", 3, alpha=1.5, init="gaussian")
    assert layer.active_adapter == "default" and layer.r == {"default": 2, "second": 3}
    _randomize(layer)
    x = torch.randn(4, 12)
    pointer = layer.weight.data_ptr()
    base = F.linear(x, layer.weight, layer.bias)
    for name in ("second", "default", "second"):
        layer.set_adapter(name)
        A, B = layer.lora_A[name], layer.lora_B[name]
        torch.testing.assert_close(layer(x), base + (x @ A.T @ B.T) * layer.scaling[name])
    assert layer.weight.data_ptr() == pointer
    assert layer.scaling["second"] == pytest.approx(0.5)
    layer.set_adapter(None)
    torch.testing.assert_close(layer(x), base)
    layer.set_adapter("second")
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_adapter("default")
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.delete_adapter("second")
    layer.unmerge()
    layer.delete_adapter("second")
    assert layer.active_adapter == "default" and list(layer.lora_A) == ["default"]
    with pytest.raises(ValueError, match="unknown adapter 'second'"):
        layer.set_adapter("second")


def test_gaussian_and_zeros_init():
    torch.manual_seed(5)
    layer = LoRALinear(64, 32, r=8, init="gaussian")
    assert layer.lora_B["default"].abs().max() == 0
    std = float(layer.lora_A["default"].detach().std())
    assert 0.08 < std < 0.17  # N(0, (1/r)^2) with r = 8 -> std 0.125, 512 samples
    zeros = LoRALinear(64, 32, r=8, init="zeros")
    assert zeros.lora_A["default"].abs().max() == 0 and zeros.lora_B["default"].abs().max() == 0


def test_merged_linear_matches_per_slice_reference():
    torch.manual_seed(6)
    layer = LoRAMergedLinear(
        16, [8, 4, 8], r=2, enable_lora=[True, False, True], alpha=4, dtype=torch.float64
    )
    assert layer.lora_A["default"].shape == (4, 16) and layer.lora_B["default"].shape == (16, 2)
    _randomize(layer)
    x = torch.randn(5, 16, dtype=torch.float64)
    A, B = _np(layer.lora_A["default"]), _np(layer.lora_B["default"])
    X = _np(x)
    ref = X @ _np(layer.weight).T + _np(layer.bias)
    ref[:, 0:8] += 2.0 * (X @ A[0:2].T) @ B[0:8].T
    ref[:, 12:20] += 2.0 * (X @ A[2:4].T) @ B[8:16].T
    np.testing.assert_allclose(_np(layer(x)), ref, rtol=1e-12, atol=1e-12)
    layer.merge()
    np.testing.assert_allclose(_np(layer(x)), ref, rtol=1e-10, atol=1e-12)
    linear = nn.Linear(12, 9)
    wrapped = LoRAMergedLinear.from_linear(linear, r=2, enable_lora=[False, True, False])
    assert wrapped.out_slices == [3, 3, 3] and wrapped.weight is linear.weight
    with pytest.raises(ValueError, match="out_slices"):
        LoRAMergedLinear.from_linear(nn.Linear(12, 10), r=2, enable_lora=[True, False, True])
    with pytest.raises(ValueError, match="enable_lora"):
        LoRAMergedLinear(8, [4, 4], r=2, enable_lora=[False, False])


def test_embedding_against_reference_and_merge():
    torch.manual_seed(7)
    embedding = nn.Embedding(30, 12, padding_idx=0)
    layer = LoRAEmbedding.from_embedding(embedding, r=4, alpha=8)
    assert layer.weight is embedding.weight and not layer.weight.requires_grad
    assert layer.lora_embedding_A["default"].shape == (4, 30)
    assert layer.lora_embedding_B["default"].shape == (12, 4)
    idx = torch.tensor([[0, 3, 29], [7, 7, 1]])
    torch.testing.assert_close(layer(idx), embedding(idx), rtol=0, atol=0)
    _randomize(layer)
    A, B = _np(layer.lora_embedding_A["default"]), _np(layer.lora_embedding_B["default"])
    ref = _np(embedding.weight)[idx.numpy()] + 2.0 * A.T[idx.numpy()] @ B.T
    np.testing.assert_allclose(_np(layer(idx)), ref, rtol=1e-5, atol=1e-5)
    layer(idx).sum().backward()
    assert layer.lora_embedding_A["default"].grad[:, 0].abs().max() == 0  # padding row gets no gradient
    layer.merge()
    np.testing.assert_allclose(_np(layer(idx)), ref, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(_np(layer(idx)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be an int >= 1"),
        ({"r": 9, "init": "pissa"}, "r must be an int in \\[1, 8\\] for init='pissa'"),
        ({"r": 2.0}, "r must be"),
        ({"r": 2, "alpha": -1.0}, "alpha"),
        ({"r": 2, "dropout": 1.0}, "dropout"),
        ({"r": 2, "init": "kaiming"}, "init must be one of"),
    ],
)
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(16, 8, **kwargs)


def test_bad_adapter_names_and_types():
    layer = LoRALinear(8, 8, r=2)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", 2)
    with pytest.raises(ValueError, match="without '.'"):
        layer.add_adapter("a.b", 2)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=1)
    with pytest.raises(TypeError, match="embedding must be an nn.Embedding"):
        LoRAEmbedding.from_embedding(nn.Linear(2, 2), r=1)
    with pytest.raises(ValueError, match="in_features"):
        LoRALinear(0, 8, r=1)
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        LoRAEmbedding(4, 16, r=0)
    with pytest.raises(ValueError, match="reserved"):
        layer.add_adapter("__base__", 2)


@pytest.mark.parametrize("make", [lambda r: LoRALinear(6, 8, r=r), lambda r: LoRAEmbedding(5, 7, r=r)])
def test_rank_above_the_layer_size_is_a_plain_adapter(make):
    # PEFT trains and saves adapters with r > min(in, out); B A is then just a full-rank update
    torch.manual_seed(3)
    layer = make(9)
    A, B = (p for _, p in layer.lora_parameters())
    with torch.no_grad():
        B.normal_()
    delta = layer.delta_weight().double()
    first, second = (A.double(), B.double())
    expected = (second @ first) if isinstance(layer, LoRALinear) else (second @ first).T
    torch.testing.assert_close(delta, layer.scaling["default"] * expected, rtol=1e-6, atol=1e-6)
    assert layer.r["default"] == 9
    if isinstance(layer, LoRALinear):  # the fused op with r > min(in, out), against float64
        x = torch.randn(5, 6)
        W, b = layer.weight.double(), layer.bias.double()
        reference = x.double() @ (W + delta).T + b
        torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_keep_base_names():
    torch.manual_seed(8)
    linear = nn.Linear(10, 6)
    layer = LoRALinear.from_linear(nn.Linear(10, 6), r=2)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.default", "lora_B.default"}
    result = layer.load_state_dict(linear.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["lora_A.default", "lora_B.default"] and not result.unexpected_keys
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), linear(x))


def test_autocast_bf16_and_to_dtype():
    torch.manual_seed(9)
    model = nn.Sequential(LoRALinear(32, 64, r=4), nn.GELU(), LoRALinear(64, 16, r=4))
    for layer in (model[0], model[2]):
        _randomize(layer, std=0.1)
    x = torch.randn(8, 32)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert float((out.detach().float() - ref.detach()).norm() / ref.detach().norm()) < 2e-2
    out.float().square().mean().backward()
    assert model[0].lora_A["default"].grad.dtype == torch.float32
    model.to(torch.float64)
    assert model[0].lora_A["default"].dtype == torch.float64 and model[0].weight.dtype == torch.float64
    X = _np(x)
    h = X @ _np(model[0].weight).T + _np(model[0].bias)
    h += (X @ _np(model[0].lora_A["default"]).T) @ _np(model[0].lora_B["default"]).T
    h = _np(F.gelu(torch.from_numpy(h)))
    y = h @ _np(model[2].weight).T + _np(model[2].bias)
    y += (h @ _np(model[2].lora_A["default"]).T) @ _np(model[2].lora_B["default"]).T
    np.testing.assert_allclose(_np(model(x.double())), y, rtol=1e-10, atol=1e-12)


def _small_lora_net() -> nn.Module:
    torch.manual_seed(10)
    net = nn.Sequential(
        LoRAEmbedding(20, 16, r=2),
        LoRALinear(16, 32, r=4),
        nn.GELU(),
        LoRAMergedLinear(32, [8, 8], r=2, enable_lora=[True, False]),
    )
    for layer in (net[0], net[1], net[3]):
        _randomize(layer, std=0.2)
    return net


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    net = _small_lora_net()
    idx = torch.randint(0, 20, (4, 5))
    eager_out = net(idx)
    eager_out.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    # fullgraph=True raises on any graph break; aot_eager also traces the op's fake kernel and autograd
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(idx)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out)
    assert set(eager_grads) == {n for n, p in net.named_parameters() if p.grad is not None}
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(net.named_parameters())[name].grad, grad)


def test_activation_checkpointing_gives_same_gradients():
    net = _small_lora_net()
    idx = torch.randint(0, 20, (3, 6))
    net(idx).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    checkpoint(net, idx, use_reentrant=False).square().sum().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(net.named_parameters())[name].grad, grad)


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    return (U[:, :k] * (0.7 ** torch.arange(k, dtype=torch.float64))) @ V[:, :k].T


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding"])
def test_pissa_keeps_output(kind):
    torch.manual_seed(11)
    if kind == "embedding":
        layer = LoRAEmbedding(24, 16, r=4, alpha=8, init="pissa")
        base = nn.Embedding(24, 16)
        x = torch.randint(0, 24, (3, 5))
    else:
        base = nn.Linear(16, 24)
        x = torch.randn(3, 5, 16)
    with torch.no_grad():
        base.weight.copy_(_decaying(24, 16, 0))
    ref = base(x)
    original = base.weight.detach().clone()
    if kind == "embedding":
        layer = LoRAEmbedding.from_embedding(base, r=4, alpha=8, init="pissa")
    elif kind == "merged":
        layer = LoRAMergedLinear.from_linear(base, r=4, alpha=8, enable_lora=[True, False], init="pissa")
    else:
        layer = LoRALinear.from_linear(base, r=4, alpha=8, init="pissa")
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert float((base.weight - original).norm()) > 0.5  # the principal part moved into the adapter
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), original, rtol=1e-5, atol=1e-5)


def test_pissa_factors_are_the_principal_part():
    W = _decaying(20, 12, 1)
    B, A, residual = pissa_factors(W, 3, 0.5, method="svd")
    U, S, Vt = np.linalg.svd(W.numpy())
    top = (U[:, :3] * S[:3]) @ Vt[:3]
    np.testing.assert_allclose(0.5 * (B @ A).numpy(), top, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(residual.numpy(), W.numpy() - top, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(B.T @ B, A @ A.T, rtol=1e-9, atol=1e-12)  # balanced split


@pytest.mark.parametrize("method", ["svd", "rsvd"])
def test_extract_lora_against_numpy_truncated_svd(method):
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(40, 30, generator=gen)
    delta = _decaying(40, 30, 2).float()
    factors = extract_lora(base, base + delta, 5, method=method)
    B, A = factors
    assert B.shape == (40, 5) and A.shape == (5, 30) and B.dtype == torch.float32
    D = (base + delta).double().numpy() - base.double().numpy()
    U, S, Vt = np.linalg.svd(D)
    np.testing.assert_allclose((B @ A).double().numpy(), (U[:, :5] * S[:5]) @ Vt[:5], rtol=0, atol=1e-4)
    assert factors.energy == pytest.approx(float((S[:5] ** 2).sum() / (S**2).sum()), rel=1e-4)
    with pytest.raises(ValueError, match="r must be"):
        extract_lora(base, base, 31)
    with pytest.raises(ValueError, match="differ"):
        extract_lora(base, base[:5], 2)
    with pytest.raises(ValueError, match="method"):
        extract_lora(base, base, 2, method="qr")


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |t| (8-bit significand: 2**(e - 7) for |t| in [2**e, 2**(e+1)))."""
    exponent = torch.floor(torch.log2(t.float().abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 7)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_bf16_unmerge_within_one_ulp_of_the_merged_weight(kind):
    worst = 0.0
    for seed in range(4):
        torch.manual_seed(seed)
        if kind == "linear":
            layer = LoRALinear(96, 64, r=8, alpha=16, dtype=torch.bfloat16)
        else:
            layer = LoRAEmbedding(96, 64, r=8, alpha=16, dtype=torch.bfloat16)
        _randomize(layer, seed=seed, std=0.5)
        original = layer.weight.detach().clone()
        layer.merge()
        merged = layer.weight.detach().clone()
        assert not torch.equal(merged, original)
        layer.unmerge()
        error = (layer.weight.detach().float() - original.float()).abs()
        worst = max(worst, float((error / _bf16_ulp(merged)).max()))
    assert 0.0 < worst <= 1.0  # the docstring's bound, reached (bf16 loses bits) but never exceeded


def _meta_layer():
    return LoRALinear(8, 4, r=2, device="meta")


BAD_FORWARD = {
    "x None": (lambda: LoRALinear(8, 4, r=2), None, TypeError, "x must be a torch.Tensor, got NoneType"),
    "x a list": (lambda: LoRALinear(8, 4, r=2), [[0.0] * 8], TypeError, "x must be a torch.Tensor"),
    "x complex": (lambda: LoRALinear(8, 4, r=2), torch.randn(3, 8, dtype=torch.cfloat), TypeError, "complex"),
    "x integer": (lambda: LoRALinear(8, 4, r=2), torch.ones(3, 8, dtype=torch.int64), TypeError, "floating"),
    "x on meta, layer on cpu": (
        lambda: LoRALinear(8, 4, r=2),
        torch.empty(3, 8, device="meta"),
        ValueError,
        "meta",
    ),
    "x on cpu, layer on meta": (_meta_layer, torch.randn(3, 8), ValueError, "meta"),
    "merged layer, complex x": (
        lambda: _merged_linear(),
        torch.randn(3, 8, dtype=torch.cfloat),
        TypeError,
        "complex",
    ),
    "fused projection, x None": (
        lambda: LoRAMergedLinear(8, [4, 4], r=2, enable_lora=[True, False]),
        None,
        TypeError,
        "x must be a torch.Tensor",
    ),
    "embedding, float indices": (lambda: LoRAEmbedding(10, 4, r=2), torch.zeros(3), TypeError, "integer"),
    "embedding, x None": (lambda: LoRAEmbedding(10, 4, r=2), None, TypeError, "x must be a torch.Tensor"),
    "embedding, meta indices": (
        lambda: LoRAEmbedding(10, 4, r=2),
        torch.zeros(3, dtype=torch.int64, device="meta"),
        ValueError,
        "meta",
    ),
}


def _merged_linear():
    layer = LoRALinear(8, 4, r=2)
    layer.merge()
    return layer


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_layer_forward_bad_input(case):
    make, x, error, message = BAD_FORWARD[case]
    with pytest.raises(error, match=message):
        make()(x)


def test_meta_layer_with_meta_input_gives_shapes():
    assert _meta_layer()(torch.empty(5, 8, device="meta")).shape == (5, 4)
