"""LoRA on transformers' Conv1D (GPT-2): PEFT's fan_in_fan_out layout, the fused op on the transposed view,
merge / PiSSA / remove_lora in the (in, out) storage, PEFT round trips and CLI extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lowrank
from lowrank.cli import main
from lowrank.lora.layers import LoRAConv1D, is_conv1d
from lowrank.lora.peft_format import AdapterCheckpointError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
Conv1D = transformers.pytorch_utils.Conv1D
TARGETS = ["c_attn", "c_proj", "c_fc"]


def gpt2_config():
    return transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )


@pytest.fixture(scope="module")
def gpt2_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in transformers.GPT2LMHeadModel(gpt2_config()).state_dict().items()}


def fresh_gpt2(state):
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    model.load_state_dict(state)
    return model


def randomize_adapters(model, seed=1, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def conv1d64(nx=32, nf=48, seed=0):
    torch.manual_seed(seed)
    conv = Conv1D(nf, nx).double()
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def test_forward_and_gradients_match_dense_float64():
    conv = conv1d64()
    W0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    layer = LoRAConv1D.from_conv1d(conv, 4, alpha=8)
    assert is_conv1d(conv) and not is_conv1d(nn.Linear(2, 2))
    assert layer.lora_A["default"].shape == (4, 32) and layer.lora_B["default"].shape == (48, 4)
    torch.nn.init.normal_(layer.lora_B["default"])
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    x_np, W_np = x.detach().numpy(), W0.numpy()
    A_np, B_np = A.detach().numpy(), B.detach().numpy()
    ref = x_np @ (W_np + 2.0 * (B_np @ A_np).T) + b0.numpy()  # y = x (W + s (B A)^T) + b
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    g_np = g.numpy().reshape(-1, 48)
    x2 = x_np.reshape(-1, 32)
    np.testing.assert_allclose(B.grad.numpy(), 2.0 * g_np.T @ (x2 @ A_np.T), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(A.grad.numpy(), 2.0 * (g_np @ B_np).T @ x2, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(
        x.grad.numpy().reshape(-1, 32), g_np @ (W_np + 2.0 * (B_np @ A_np).T).T, rtol=1e-11, atol=1e-11
    )
    assert conv.weight.grad is None and not conv.weight.requires_grad


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize("rows", [2, 64])  # the op's few-row kernel and its BLAS path
def test_forward_and_backward_copy_no_weight(rows):
    torch.manual_seed(0)
    layer = LoRAConv1D.from_conv1d(Conv1D(1024, 512), 8)
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    assert layer._linear_weight().data_ptr() == layer.weight.data_ptr()  # a view, not a copy
    # a per-call copy of W would be one allocation of its size: the profiler sees it (control below)
    assert _largest_allocation(lambda: layer.weight.T.contiguous()) >= weight_bytes
    x = torch.randn(rows, 512)
    assert _largest_allocation(lambda: layer(x)) < weight_bytes
    xg = torch.randn(rows, 512, requires_grad=True)
    assert _largest_allocation(lambda: layer(xg).sum().backward()) < weight_bytes
    assert xg.grad is not None and layer.lora_A["default"].grad is not None


def test_merge_unmerge_write_the_in_out_storage():
    conv = conv1d64()
    W0 = conv.weight.detach().clone()
    layer = LoRAConv1D.from_conv1d(conv, 4, alpha=4)
    torch.nn.init.normal_(layer.lora_B["default"])
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    x = torch.randn(7, 32, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    assert layer.weight.shape == (32, 48)
    np.testing.assert_allclose(layer.weight.numpy(), (W0 + (B @ A).T).numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(layer(x).detach().numpy(), y.detach().numpy(), rtol=1e-12, atol=1e-12)
    layer.unmerge()
    ulp = torch.finfo(torch.float64).eps * (W0 + (B @ A).T).abs().clamp_min(1e-300)
    assert bool(((layer.weight - W0).abs() <= ulp).all())


def test_pissa_factors_the_transposed_weight_like_float64_svd():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(48, 32, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    S = 2.0 ** -torch.arange(32, dtype=torch.float64)
    W_out_in = U @ torch.diag(S) @ V.T  # (out, in), decaying spectrum
    conv = Conv1D(48, 32).double()
    with torch.no_grad():
        conv.weight.copy_(W_out_in.T)  # Conv1D stores (in, out)
    x = torch.randn(5, 32, dtype=torch.float64)
    y0 = conv(x)
    layer = LoRAConv1D.from_conv1d(conv, 6, alpha=12, init="pissa")
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    u, s, vt = np.linalg.svd(W_out_in.numpy())
    top = (u[:, :6] * s[:6]) @ vt[:6]
    np.testing.assert_allclose((2.0 * B @ A).numpy(), top, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.weight.numpy(), (W_out_in.numpy() - top).T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer(x).detach().numpy(), y0.detach().numpy(), rtol=0, atol=1e-12)


def test_olora_factors_the_transposed_weight_like_float64_qr():
    torch.manual_seed(1)
    W_out_in = torch.randn(40, 24, dtype=torch.float64)
    conv = Conv1D(40, 24).double()
    with torch.no_grad():
        conv.weight.copy_(W_out_in.T)
    x = torch.randn(5, 24, dtype=torch.float64)
    y0 = conv(x)
    layer = LoRAConv1D.from_conv1d(conv, 5, alpha=10, init="olora")  # scaling 2
    A, B = layer.lora_A["default"].detach().numpy(), layer.lora_B["default"].detach().numpy()
    q, r = np.linalg.qr(
        W_out_in.numpy()
    )  # OLoRA: B = Q[:, :r], A = R[:r] (LAPACK's signs) of the (out, in) W
    signs = np.sign(np.diag(r)[:5]) * np.sign(np.diag(A[:, :5]))
    np.testing.assert_allclose(B, q[:, :5] * signs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(A, r[:5] * signs[:, None], rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.weight.numpy(), (W_out_in.numpy() - 2.0 * B @ A).T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer(x).detach().numpy(), y0.detach().numpy(), rtol=0, atol=1e-12)


def test_inject_pissa_and_remove_lora_give_back_conv1d(gpt2_state):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = fresh_gpt2(gpt2_state)(ids).logits
    model = lowrank.inject_lora(fresh_gpt2(gpt2_state), TARGETS, r=4, init="pissa")
    assert all(isinstance(m, LoRAConv1D) for n, m in model.named_modules() if n.endswith(tuple(TARGETS)))
    assert rel(model(ids).logits, reference) < 1e-5  # PiSSA leaves the output unchanged
    randomize_adapters(model)
    tuned = model(ids).logits
    assert rel(tuned, reference) > 1e-2
    lowrank.remove_lora(model, merge=True)
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn) is Conv1D and c_attn.weight.shape == (64, 192) and c_attn.nf == 192
    assert rel(model(ids).logits, tuned) < 1e-5

    model = lowrank.inject_lora(fresh_gpt2(gpt2_state), TARGETS, r=4)
    randomize_adapters(model)
    lowrank.remove_lora(model, merge=False)
    assert type(model.transformer.h[1].mlp.c_fc) is Conv1D
    assert rel(model(ids).logits, reference) == 0.0


def test_lowrank_adapter_loads_in_peft_with_the_same_outputs(gpt2_state, tmp_path):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model = lowrank.inject_lora(fresh_gpt2(gpt2_state), TARGETS, r=4, alpha=8)
    randomize_adapters(model)
    expected = model(ids).logits
    lowrank.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(fresh_gpt2(gpt2_state), tmp_path).eval()
    assert rel(peft_model(input_ids=ids).logits, expected) <= 1e-5
    assert rel(expected, fresh_gpt2(gpt2_state)(ids).logits) > 1e-2


def test_peft_adapter_loads_in_lowrank_with_the_same_outputs(gpt2_state, tmp_path):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, fan_in_fan_out=True)
    peft_model = peft.get_peft_model(fresh_gpt2(gpt2_state), config).eval()
    randomize_adapters(peft_model, seed=3)
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    model = lowrank.load_adapter(fresh_gpt2(gpt2_state), tmp_path)
    assert isinstance(model.transformer.h[0].mlp.c_proj, LoRAConv1D)
    assert rel(model(ids).logits, expected) <= 1e-5
    # and back again: the file lowrank writes holds the same tensors under the same keys
    lowrank.save_adapter(model, tmp_path / "again")
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "again" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _tiny_gpt2_checkpoints(root, state):
    base = fresh_gpt2(state)
    base.save_pretrained(root / "base")
    tuned = fresh_gpt2(state)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in tuned.modules():
            if isinstance(module, Conv1D):
                nx, nf = module.weight.shape
                module.weight += 0.05 * torch.randn(nx, 2, generator=gen) @ torch.randn(2, nf, generator=gen)
    tuned.save_pretrained(root / "tuned")
    return tuned


@pytest.mark.parametrize("how", ["auto", "regex"])
def test_cli_extract_from_gpt2_checkpoints_loads_in_peft(gpt2_state, tmp_path, how, capsys):
    tuned = _tiny_gpt2_checkpoints(tmp_path, gpt2_state)
    if how == "auto":  # config.json beside the checkpoints says model_type gpt2
        base_arg, tuned_arg, extra = tmp_path / "base", tmp_path / "tuned", []
    else:  # bare files, no config.json: name the Conv1D layers
        base_arg = tmp_path / "base" / "model.safetensors"
        (tmp_path / "t").mkdir()
        tuned_arg = tmp_path / "t" / "model.safetensors"
        tuned_arg.write_bytes((tmp_path / "tuned" / "model.safetensors").read_bytes())
        (tmp_path / "base" / "config.json").unlink()
        extra = ["--fan-in-fan-out", r"\.(c_attn|c_proj|c_fc)$"]
    out = tmp_path / "adapter"
    argv = ["extract", str(base_arg), str(tuned_arg), "--rank", "2", "--out", str(out), *extra]
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    peft_model = peft.PeftModel.from_pretrained(fresh_gpt2(gpt2_state), out).eval()
    expected = tuned(ids).logits
    assert rel(peft_model(input_ids=ids).logits, expected) <= 1e-5
    assert rel(lowrank.load_adapter(fresh_gpt2(gpt2_state), out)(ids).logits, expected) <= 1e-5


def test_cli_extract_without_the_layout_gives_an_adapter_that_is_refused(gpt2_state, tmp_path, capsys):
    _tiny_gpt2_checkpoints(tmp_path, gpt2_state)
    out = tmp_path / "adapter"
    argv = ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "--rank", "2", "--out", str(out)]
    assert main([*argv, "--fan-in-fan-out", "none"]) == 0
    with pytest.raises(AdapterCheckpointError, match="has shape"):
        lowrank.load_adapter(fresh_gpt2(gpt2_state), out)
    assert main([*argv, "--fan-in-fan-out", "c_attn("]) == 2
    assert "--fan-in-fan-out" in capsys.readouterr().err


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="conv1d must be a transformers Conv1D"):
        LoRAConv1D.from_conv1d(nn.Linear(4, 4), 2)
    with pytest.raises(TypeError, match="from_conv1d"):
        LoRAConv1D.from_linear(nn.Linear(4, 4), 2)
    conv = Conv1D(6, 4)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 4\]"):
        LoRAConv1D.from_conv1d(conv, 5)
    assert conv.weight.requires_grad  # bad input leaves the module as found
    with pytest.raises(TypeError, match="Conv1D"):
        lowrank.inject_lora(nn.Sequential(nn.ReLU()), ["0"], r=1)
    layer = LoRAConv1D(8, 6, 2)  # direct construction: (in, out) weight, to_conv1d gives a Conv1D back
    assert layer.weight.shape == (8, 6) and type(layer.to_conv1d()) is Conv1D
    with pytest.raises(ValueError, match="quantize_base|LoRALinear"):
        lowrank.quantize_base(nn.Sequential(layer))
