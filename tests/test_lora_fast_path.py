"""LoRALinear's inference fast path (one cached decision per layer): every change of what the cached op
arguments were derived from must reach the output, checked against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from lowrank import LoRALinear, LoRAMergedLinear
from lowrank._ops import lora_linear_inference


def _reference(layer: LoRALinear, x: torch.Tensor, name: str | None) -> torch.Tensor:
    """x W^T + b + s (x A^T) B^T in float64 from the layer's current parameters (no adapter: base only)."""
    x64 = x.double()
    y = x64 @ layer.weight.double().T
    if layer.bias is not None:
        y = y + layer.bias.double()
    if name is not None and not layer.merged_adapters:
        A, B = layer.lora_A[name].double(), layer.lora_B[name].double()
        y = y + layer.scaling[name] * (x64 @ A.T) @ B.T
    return y


def _layer(seed=0, **kwargs) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(24, 16, r=4, alpha=8, **kwargs)
    layer.add_adapter("other", 2, alpha=6)
    with torch.no_grad():  # non-zero B: every adapter changes the output
        for p in layer.lora_B.values():
            p.normal_()
    return layer.eval()


def _run(layer, x):
    """Two no-grad calls: the first (re)builds the cache, the second takes the fast path."""
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    return second


def _assert_ref(y, layer, x, name, tol=1e-5):
    ref = _reference(layer, x, name)
    assert y.dtype == x.dtype
    assert (y.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def test_cache_is_built_and_used_without_grad_only():
    layer = _layer()
    x = torch.randn(3, 24)
    y = _run(layer, x)
    assert layer._fast is not None
    _assert_ref(y, layer, x, "default")
    # with autograd on, the general path runs and the output carries the graph
    y_grad = layer(x)
    assert y_grad.requires_grad and y_grad.grad_fn is not None
    torch.testing.assert_close(y_grad.detach(), y)
    # torch.inference_mode also takes the fast path
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), y)


def test_layer_without_bias():
    torch.manual_seed(2)
    layer = LoRALinear.from_linear(nn.Linear(24, 16, bias=False), r=4).eval()
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 24)
    _assert_ref(_run(layer, x), layer, x, "default")
    assert layer._fast is not None


def test_set_adapter_delete_adapter_and_none():
    layer, x = _layer(), torch.randn(2, 5, 24)
    _assert_ref(_run(layer, x), layer, x, "default")
    layer.set_adapter("other")
    _assert_ref(_run(layer, x), layer, x, "other")
    layer.set_adapter(None)
    _assert_ref(_run(layer, x), layer, x, None)
    layer.set_adapter("other")
    _run(layer, x)
    layer.delete_adapter("other")  # the active one: "default" becomes active
    assert layer.active_adapter == "default"
    _assert_ref(_run(layer, x), layer, x, "default")


def test_merge_unmerge():
    layer, x = _layer(), torch.randn(4, 24)
    before = _run(layer, x)
    layer.merge()
    merged = _run(layer, x)
    _assert_ref(merged, layer, x, None)  # F.linear on the merged weight
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    _assert_ref(_run(layer, x), layer, x, "default")


def test_dtype_change_with_to_and_input_dtype():
    layer, x = _layer(), torch.randn(3, 24)
    _run(layer, x)
    layer.to(torch.float64)
    x64 = x.double()
    y = _run(layer, x64)
    assert y.dtype == torch.float64
    _assert_ref(y, layer, x64, "default", tol=1e-12)
    # a float32 input into the float64 layer is cast (general path), then float64 again hits the cache
    y32 = _run(layer, x)
    assert y32.dtype == torch.float64
    _assert_ref(y32, layer, x.double(), "default", tol=1e-12)
    layer.to(torch.bfloat16)
    xb = x.bfloat16()
    yb = _run(layer, xb)
    assert yb.dtype == torch.bfloat16
    _assert_ref(yb, layer, xb, "default", tol=2e-2)


def test_autocast_bypasses_the_cache():
    layer, x = _layer(), torch.randn(3, 24)
    _run(layer, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    _assert_ref(_run(layer, x), layer, x, "default")


def test_train_eval_with_dropout():
    layer = _layer(dropout=0.5)
    x = torch.randn(64, 24)
    eval_out = _run(layer, x)
    _assert_ref(eval_out, layer, x, "default")
    layer.train()
    with torch.no_grad():
        train_out = layer(x)  # dropout on the adapter's input: differs from eval almost surely
    assert (train_out - eval_out).abs().max().item() > 1e-3
    layer.eval()
    torch.testing.assert_close(_run(layer, x), eval_out)


def test_requires_grad_changes():
    layer, x = _layer(), torch.randn(3, 24)
    _run(layer, x)
    for p in layer.parameters():
        p.requires_grad_(False)
    assert not layer(x).requires_grad
    layer.lora_A["default"].requires_grad_(True)
    y = layer(x)
    assert y.requires_grad
    y.sum().backward()
    x64 = x.double()
    B, s = layer.lora_B["default"].double(), layer.scaling["default"]
    expected = s * B.sum(0)[:, None] * x64.sum(0)[None, :]  # d sum(s x A^T B^T) / dA = s B^T 1 1^T x
    torch.testing.assert_close(layer.lora_A["default"].grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_replaced_and_edited_parameters_and_scaling():
    layer, x = _layer(), torch.randn(3, 24)
    _run(layer, x)
    layer.lora_A["default"] = nn.Parameter(torch.randn(4, 24))
    _assert_ref(_run(layer, x), layer, x, "default")
    layer.weight = nn.Parameter(torch.randn(16, 24), requires_grad=False)
    _assert_ref(_run(layer, x), layer, x, "default")
    with torch.no_grad():
        layer.lora_B["default"].mul_(-3.0)
    _assert_ref(_run(layer, x), layer, x, "default")
    layer.scaling["default"] = 0.125
    _assert_ref(_run(layer, x), layer, x, "default")


def test_merged_linear_in_place_factor_edits_reach_the_output():
    torch.manual_seed(1)
    layer = LoRAMergedLinear(20, [8, 8, 8], r=2, enable_lora=[True, False, True]).eval()
    x = torch.randn(3, 20)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    y = _run(layer, x)
    torch.testing.assert_close(y, layer(x).detach())  # the general path (autograd on)
    with torch.no_grad():
        layer.lora_B["default"].add_(1.0)  # B's derived block layout is cached: its version must be checked
    y2 = _run(layer, x)
    torch.testing.assert_close(y2, layer(x).detach())
    assert (y2 - y).abs().max().item() > 1e-3


def test_mixed_adapter_batch_bypasses_the_cache():
    model = nn.Sequential(nn.Linear(24, 16))
    lowrank.inject_lora(model, ["0"], r=4, alpha=8)
    layer = model[0]
    layer.add_adapter("other", 2, alpha=6)
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.normal_()
    model.eval()
    x = torch.randn(2, 24)
    _run(layer, x)
    with torch.no_grad(), lowrank.mixed_adapter_batch(model, ["other", "default"]):
        y = model(x)
    _assert_ref(y[:1], layer, x[:1], "other")
    _assert_ref(y[1:], layer, x[1:], "default")


@pytest.mark.parametrize("bad", ["device", "type"])
def test_bad_input_after_caching_still_raises(bad):
    layer, x = _layer(), torch.randn(3, 24)
    _run(layer, x)
    with torch.no_grad():
        if bad == "device":
            with pytest.raises(ValueError, match="device"):
                layer(torch.empty(3, 24, device="meta"))
        else:
            with pytest.raises(TypeError, match="floating-point"):
                layer(torch.ones(3, 24, dtype=torch.int64))


def test_dora_adapter_never_takes_the_cached_lora_path():
    """Switching between a LoRA and a DoRA adapter: the DoRA output keeps its magnitude scaling (float64
    reference m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b)."""
    layer = _layer()
    layer.add_adapter("dora", 3, alpha=3, use_dora=True)
    with torch.no_grad():
        layer.lora_B["dora"].normal_()
        layer.lora_magnitude_vector["dora"].mul_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(5, 24)
    _assert_ref(_run(layer, x), layer, x, "default")
    layer.set_adapter("dora")
    y = _run(layer, x)
    assert layer._fast is None or layer._fast[0] != "dora"
    W, b = layer.weight.double(), layer.bias.double()
    A, B = layer.lora_A["dora"].double(), layer.lora_B["dora"].double()
    s = layer.scaling["dora"]
    norm = (W + s * B @ A).norm(dim=1)
    ref = (layer.lora_magnitude_vector["dora"].double() / norm) * (x.double() @ (W + s * B @ A).T) + b
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    layer.set_adapter("default")
    _assert_ref(_run(layer, x), layer, x, "default")


def test_conv1d_layer_caches_the_transposed_view_and_sees_merges():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    conv = transformers.pytorch_utils.Conv1D(16, 24)  # weight (in=24, out=16)
    layer = lowrank.LoRAConv1D.from_conv1d(conv, 4, alpha=8).eval()
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 24)

    def ref():
        W = layer.weight.double().T  # (out, in)
        y = x.double() @ W.T + layer.bias.double()
        if not layer.merged_adapters:
            A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
            y = y + layer.scaling["default"] * (x.double() @ A.T) @ B.T
        return y

    y = _run(layer, x)
    assert layer._fast is not None and (y.double() - ref()).abs().max().item() <= 1e-5
    layer.merge()
    assert (_run(layer, x).double() - ref()).abs().max().item() <= 1e-5
    layer.unmerge()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place on the (in, out) storage: the cached view sees it
    assert (_run(layer, x).double() - ref()).abs().max().item() <= 1e-5


# -- lowrank._ops.lora_linear_inference: the direct call of the op that the cached path makes ---------
_INFERENCE_FNS = [pytest.param(lora_linear_inference, id="extension")]


def _op_args(dtype=torch.float32, bias=True, rows=(2, 5)):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*rows, 24, generator=gen).to(dtype)
    W, A, B = (torch.randn(s, generator=gen).to(dtype) for s in [(16, 24), (3, 24), (16, 3)])
    b = torch.randn(16, generator=gen).to(dtype) if bias else None
    return x, W, A, B, 0.75, b


@pytest.mark.parametrize("fn", _INFERENCE_FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_fn_serves_plain_calls(fn, dtype, bias):
    x, W, A, B, s, b = _op_args(dtype, bias)
    with torch.no_grad():
        y = fn(x, W, A, B, s, b)
    ref = x.double() @ W.double().T + s * (x.double() @ A.double().T) @ B.double().T
    if b is not None:
        ref = ref + b.double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    assert y is not None and y.dtype == dtype and y.shape == (2, 5, 16) and not y.requires_grad
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    # autograd on but nothing requires grad: still served; Parameters are plain tensors here
    y2 = fn(x, nn.Parameter(W, requires_grad=False), A, B, s, b)
    assert y2 is not None and not y2.requires_grad
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


class _Sub(torch.Tensor):
    pass


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fn", _INFERENCE_FNS)
def test_inference_fn_declines_what_needs_the_general_path(fn):
    x, W, A, B, s, b = _op_args()
    assert fn(x.double(), W, A, B, s, b) is None  # mixed dtypes
    assert fn(x, W, A, B.double(), s, b) is None
    assert fn(x, W, A, B, s, b.double()) is None
    assert fn(x.as_subclass(_Sub), W, A, B, s, b) is None  # a subclass must see the op
    assert fn(x, W.as_subclass(_Sub), A, B, s, b) is None
    assert fn(x, W, A, B, 1, b) is None  # scale not a float
    assert fn(x.to("meta"), W.to("meta"), A.to("meta"), B.to("meta"), s, b.to("meta")) is None
    with torch.enable_grad():
        assert fn(x.requires_grad_(), W, A, B, s, b) is None  # autograd needed
        x.requires_grad_(False)
        assert fn(x, W, A.requires_grad_(), B, s, b) is None
    A.requires_grad_(False)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fn(x, W, A, B, s, b) is None
        with _Mode():
            assert fn(x, W, A, B, s, b) is None
        assert fn(x, W, A, B, s, b) is not None


def test_inference_fn_errors():
    x, W, A, B, s, b = _op_args()
    with pytest.raises(TypeError, match="6 arguments"):
        lora_linear_inference(x, W, A, B, s)
    with torch.no_grad(), pytest.raises(ValueError, match="lora_A"):
        lora_linear_inference(x, W, A[:, :5], B, s, b)  # the op's own checks, as ValueError
