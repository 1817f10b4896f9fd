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
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 4\] for init='pissa'"):
        LoRAConv1D.from_conv1d(conv, 5, init="pissa")
    assert conv.weight.requires_grad  # bad input leaves the module as found
    with pytest.raises(TypeError, match="Conv1D"):
        lowrank.inject_lora(nn.Sequential(nn.ReLU()), ["0"], r=1)
    layer = LoRAConv1D(8, 6, 2)  # direct construction: (in, out) weight, to_conv1d gives a Conv1D back
    assert layer.weight.shape == (8, 6) and type(layer.to_conv1d()) is Conv1D
    with pytest.raises(ValueError, match="quantize_base|LoRALinear"):
        lowrank.quantize_base(nn.Sequential(layer))


# --------------------------------------------------------------------------------------------------
# DoRA on Conv1D (PEFT's fan_in_fan_out convention: norms over the output features, i.e. the columns of
# the stored (in, out) weight)
# --------------------------------------------------------------------------------------------------


def dense_dora_conv1d(x, W_in_out, A, B, m, s, bias):
    """float64 reference: PEFT's formula on the transposed weight, W + s (B A)^T formed explicitly."""
    V = W_in_out + s * (B @ A).T  # (in, out)
    factor = m / torch.linalg.norm(V, dim=0).detach()  # one norm per output feature (column)
    out = factor * (x @ V)
    return out if bias is None else out + bias


def dora_conv1d64(nx=24, nf=36, r=3, alpha=5, seed=0):
    layer = LoRAConv1D.from_conv1d(conv1d64(nx, nf, seed), r, alpha=alpha, use_dora=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lora_B["default"].copy_(0.3 * torch.randn(nf, r, generator=g, dtype=torch.float64))
        layer.lora_magnitude_vector["default"].mul_(0.5 + torch.rand(nf, generator=g, dtype=torch.float64))
    return layer


def test_dora_magnitude_is_the_column_norm_and_forward_gradients_match_float64():
    conv = conv1d64(24, 36)
    W0 = conv.weight.detach().clone()
    layer = LoRAConv1D.from_conv1d(conv, 3, alpha=5, use_dora=True)
    m0 = layer.lora_magnitude_vector["default"]
    assert m0.shape == (36,)  # one entry per output feature
    np.testing.assert_allclose(m0.detach().numpy(), np.linalg.norm(W0.numpy(), axis=0), rtol=1e-13)
    layer = dora_conv1d64()
    names = ("lora_A.default", "lora_B.default", "lora_magnitude_vector.default")
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 36, dtype=torch.float64)
    y = layer(x)
    (y * g).sum().backward()
    got = [x.grad] + [dict(layer.named_parameters())[n].grad for n in names]
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    xr = x.detach().clone().requires_grad_(True)
    want_y = dense_dora_conv1d(xr, ref["weight"], *(ref[n] for n in names), 5 / 3, ref["bias"])
    assert rel(y, want_y) < 1e-13
    (want_y * g).sum().backward()
    want = [xr.grad] + [ref[n].grad for n in names]
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-12
    assert layer.weight.grad is None  # the base stays frozen

    # float64 gradcheck of the layer in x and m, and of the factors with the norm held constant (PEFT)
    def f(x, m):
        return torch.func.functional_call(layer, {"lora_magnitude_vector.default": m}, (x,))

    m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x.detach()[:, :2].clone().requires_grad_(True), m))
    norms = layer.dora_weight_norm().clone()

    def h(A, B):
        return torch.func.functional_call(layer, {"lora_A.default": A, "lora_B.default": B}, (x.detach(),))

    def h_ref(A, B):
        V = ref["weight"].detach() + (5 / 3) * (B @ A).T
        m = ref["lora_magnitude_vector.default"].detach()
        return (m / norms) * (x.detach() @ V) + ref["bias"].detach()

    A = layer.lora_A["default"].detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(h_ref, (A, B))
    jac = torch.autograd.functional.jacobian(h, (A, B))
    jac_ref = torch.autograd.functional.jacobian(h_ref, (A, B))
    for a, b in zip(jac, jac_ref):
        assert rel(a, b) < 1e-12


def test_dora_norms_read_the_weight_in_place():
    torch.manual_seed(0)
    layer = LoRAConv1D.from_conv1d(Conv1D(1024, 512), 8, use_dora=True)
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    layer.clear_dora_cache()
    assert _largest_allocation(lambda: layer.dora_weight_norm()) < weight_bytes  # no W + s(BA)^T, no copy
    x = torch.randn(4, 512)
    assert _largest_allocation(lambda: layer(x)) < weight_bytes // 4  # eval: the cached norms
    want = torch.linalg.norm(layer.weight.double() + 1.0 * (layer.delta_weight().double()), dim=0)
    assert rel(layer.dora_weight_norm(), want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dora_merge_unmerge_scale_the_columns(dtype):
    layer = dora_conv1d64().to(dtype).eval()
    W0 = layer.weight.detach().clone()
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    x = torch.randn(7, 24, dtype=dtype)
    before = layer(x).detach()
    layer.merge()
    V = W0.double() + (5 / 3) * (p["lora_B.default"] @ p["lora_A.default"]).T
    merged_want = V * (p["lora_magnitude_vector.default"] / torch.linalg.norm(V, dim=0))[None, :]
    eps = torch.finfo(dtype).eps
    assert layer.weight.shape == (24, 36)
    assert rel(layer.weight, merged_want) < 4 * eps
    assert rel(layer(x), before) < 16 * eps
    layer.unmerge()
    # float32: one ulp of max(|W|, |V|) (the float64 work loses nothing, see LoRALinear.unmerge); float64
    # weights are worked on in float64 itself, so a few roundings of that size remain
    ulps = 1.01 if dtype == torch.float32 else 4.0
    bound = ulps * eps * torch.maximum(W0.double().abs(), V.abs()) + 1e-300
    assert bool(((layer.weight.double() - W0.double()).abs() <= bound).all())
    assert rel(layer(x), before) < 16 * eps


def test_dora_gpt2_matches_peft_forward_and_gradients(gpt2_state):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, fan_in_fan_out=True, lora_dropout=0.2
    )
    theirs = peft.get_peft_model(fresh_gpt2(gpt2_state), config)
    ours = lowrank.inject_lora(fresh_gpt2(gpt2_state), TARGETS, r=4, alpha=8, dropout=0.2, use_dora=True)
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, LoRAConv1D)]
    assert len(layers) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks
    gen = torch.Generator().manual_seed(3)
    for name, o in layers:
        t = theirs.base_model.model.get_submodule(name)
        magnitude = t.lora_magnitude_vector["default"].weight
        assert rel(o.lora_magnitude_vector["default"], magnitude) < 1e-6  # both initialised from ‖W^T‖
        with torch.no_grad():
            B = t.lora_B["default"].weight
            B.copy_(0.2 * torch.randn(B.shape, generator=gen))
            magnitude.mul_(0.7 + 0.6 * torch.rand(magnitude.shape, generator=gen))
            o.lora_A["default"].copy_(t.lora_A["default"].weight)
            o.lora_B["default"].copy_(t.lora_B["default"].weight)
            o.lora_magnitude_vector["default"].copy_(magnitude)
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    for train in (False, True):  # train: dropout on the adapter's input, as PEFT
        theirs.train(train)
        ours.train(train)
        theirs.zero_grad()
        ours.zero_grad()
        torch.manual_seed(7)
        out_t = theirs(input_ids=ids).logits
        torch.manual_seed(7)
        out_o = ours(ids).logits
        assert rel(out_o, out_t) < 1e-5
        out_t.square().mean().backward()
        out_o.square().mean().backward()
        for name, o in layers:
            t = theirs.base_model.model.get_submodule(name)
            assert rel(o.lora_A["default"].grad, t.lora_A["default"].weight.grad) < 1e-5
            assert rel(o.lora_B["default"].grad, t.lora_B["default"].weight.grad) < 1e-5
            m_grad = t.lora_magnitude_vector["default"].weight.grad
            assert rel(o.lora_magnitude_vector["default"].grad, m_grad) < 1e-5
    # merged, both give the same outputs again
    theirs.eval()
    ours.eval()
    expected = theirs(input_ids=ids).logits
    lowrank.merge_lora(ours)
    assert rel(ours(ids).logits, expected) < 1e-5
    theirs.merge_adapter()
    for name, o in layers:
        t = theirs.base_model.model.get_submodule(name)
        assert rel(o.weight, t.base_layer.weight) < 1e-6


def test_dora_gpt2_checkpoints_both_ways_with_peft(gpt2_state, tmp_path):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(8))
    # PEFT -> lowrank
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, use_dora=True, fan_in_fan_out=True)
    theirs = peft.get_peft_model(fresh_gpt2(gpt2_state), config).eval()
    randomize_adapters(theirs, seed=9)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.add_(1.0)  # magnitudes away from ‖W‖ (randomize_adapters drew them near 0)
    expected = theirs(input_ids=ids).logits
    assert rel(expected, fresh_gpt2(gpt2_state)(ids).logits) > 1e-2
    theirs.save_pretrained(tmp_path / "peft")
    ours = lowrank.load_adapter(fresh_gpt2(gpt2_state), tmp_path / "peft")
    layer = ours.transformer.h[1].attn.c_attn
    assert isinstance(layer, LoRAConv1D) and layer.use_dora["default"]
    assert rel(ours(ids).logits, expected) <= 1e-5
    # lowrank -> PEFT: the same keys and tensors, and PEFT reads it back to the same outputs
    lowrank.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["fan_in_fan_out"] is True
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = peft.PeftModel.from_pretrained(fresh_gpt2(gpt2_state), tmp_path / "ours").eval()
    assert rel(again(input_ids=ids).logits, expected) <= 1e-5
    # a DoRA adapter made by lowrank on GPT-2, loaded by PEFT
    made = lowrank.inject_lora(fresh_gpt2(gpt2_state), TARGETS, r=2, alpha=4, use_dora=True).eval()
    randomize_adapters(made, seed=10)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_magnitude_vector" in name:
                p.add_(1.0)
    lowrank.save_adapter(made, tmp_path / "made")
    loaded = peft.PeftModel.from_pretrained(fresh_gpt2(gpt2_state), tmp_path / "made").eval()
    assert rel(loaded(input_ids=ids).logits, made(ids).logits) <= 1e-5
