"""calibrate_lora (CorDA ipm/kpm, EVA) on GPT-2's Conv1D layers: against PEFT's own CorDA/EVA on a tiny GPT-2
and against float64 references (the factors in PEFT's fan_in_fan_out layout, the residual in the (in, out)
storage)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import lowrank
from lowrank.lora.layers import LoRAConv1D

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
Conv1D = transformers.pytorch_utils.Conv1D
TARGETS = ["c_attn", "c_proj", "c_fc"]


def gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm())


def conv1d_inputs(model, batches, forward):
    """Every Conv1D's inputs over the batches, as float64 (rows, in), one entry per forward call."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, n=n: seen.setdefault(n, []).append(args[0].detach().double())
        )
        for n, m in model.named_modules()
        if isinstance(m, Conv1D)
    ]
    with torch.no_grad():
        for b in batches:
            forward(model, b)
    for h in hooks:
        h.remove()
    return seen


def corda_reference(W, C, r, scale, mode, damping=0.01):
    """PEFT's CorDA formulas densely in float64 with an explicit inverse, W in (out, in) layout."""
    Cd = C + damping * np.mean(np.diag(C)) * np.eye(C.shape[0])
    U, S, Vh = np.linalg.svd(W @ Cd, full_matrices=False)
    V = (Vh @ np.linalg.inv(Cd)).T
    sl = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    U, S, V = U[:, sl], S[sl] / scale, V[:, sl]
    return U * np.sqrt(S), V.T * np.sqrt(S)[:, None]


def token_batches(n=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (1, 16), generator=g) for _ in range(n)]  # PEFT's CorDA hook: batch 1


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_on_gpt2_matches_peft(mode):
    base = gpt2()
    batches = token_batches()
    theirs = copy.deepcopy(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="corda",
        fan_in_fan_out=True,
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=mode),
    )
    from peft.tuners.lora.corda import preprocess_corda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_corda(theirs, config, run_model=lambda: [theirs(b) for b in batches])
        theirs = peft.get_peft_model(theirs, config).eval()
    ours = copy.deepcopy(base)
    ranks = lowrank.calibrate_lora(
        ours, TARGETS, batches, r=4, alpha=8, init="corda", corda_mode=mode, method="svd"
    )
    assert len(ranks) == 8 and set(ranks.values()) == {4}
    x = batches[0]
    assert rel(ours(x).logits, theirs(input_ids=x).logits) < 1e-5
    assert rel(ours(x).logits, base(x).logits) < 1e-5  # the residual keeps the output
    for name, layer in ours.named_modules():
        if not isinstance(layer, LoRAConv1D):
            continue
        p = theirs.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        assert A.shape == p.lora_A["default"].weight.shape and B.shape == p.lora_B["default"].weight.shape
        delta_peft = p.lora_B["default"].weight @ p.lora_A["default"].weight
        assert rel(B @ A, delta_peft) < 2e-3  # PEFT inverts C~ in float32; see the float64 test below
        assert layer.weight.shape == p.base_layer.weight.shape  # the residual, in (in, out) storage
        assert rel(layer.weight, p.base_layer.weight) < 2e-4


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_on_gpt2_matches_float64_reference(mode):
    base = gpt2(torch.float64)
    batches = token_batches()
    seen = conv1d_inputs(base, batches, lambda m, b: m(b))
    model = copy.deepcopy(base)
    lowrank.calibrate_lora(model, TARGETS, batches, r=3, alpha=5, init="corda", corda_mode=mode, method="svd")
    for name, xs in seen.items():
        C = sum((x / x.max().abs()).reshape(-1, x.shape[-1]).T @ (x / x.max().abs()).reshape(-1, x.shape[-1])
                for x in xs) / len(xs)  # fmt: skip
        W = base.get_submodule(name).weight.detach().double().numpy().T  # (out, in)
        Br, Ar = corda_reference(W, C.numpy(), 3, 5 / 3, mode)
        layer = model.get_submodule(name)
        A, B = layer.lora_A["default"].detach().numpy(), layer.lora_B["default"].detach().numpy()
        signs = np.sign(np.sum(B * Br, axis=0))
        np.testing.assert_allclose(B * signs, Br, atol=1e-8 * np.abs(Br).max())
        np.testing.assert_allclose(A * signs[:, None], Ar, atol=1e-8 * np.abs(Ar).max())
        residual = (W - (5 / 3) * Br @ Ar).T  # back in the (in, out) storage
        np.testing.assert_allclose(layer.weight.detach().numpy(), residual, atol=1e-10 * np.abs(W).max())


def masked_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (6, 20), generator=g)
    mask = torch.ones(6, 20, dtype=torch.long)
    mask[:, 15:] = 0
    mask[0, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_eva_on_gpt2_matches_peft_and_float64_reference(tmp_path):
    base = gpt2()
    batch = masked_batch()
    theirs = copy.deepcopy(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2.0),
        fan_in_fan_out=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs, config, low_cpu_mem_usage=True)
        peft.initialize_lora_eva_weights(theirs, [batch], show_progress_bar=False)
    ours = copy.deepcopy(base)
    ranks = lowrank.calibrate_lora(ours, TARGETS, [batch], r=4, alpha=8, init="eva", rho=2.0, method="svd")
    assert sum(ranks.values()) == 4 * 8 and len(set(ranks.values())) > 1  # redistributed
    seen = conv1d_inputs(base, [batch], lambda m, b: m(**b))
    keep = batch["attention_mask"].bool()
    for name, k in ranks.items():
        layer = ours.get_submodule(name)
        p = theirs.base_model.model.get_submodule(name)
        # PEFT's ranks and alpha_pattern (adjust_scaling_factors) exactly
        assert p.lora_A["default"].weight.shape == (k, layer.in_features)
        assert layer.lora_alpha["default"] == pytest.approx(p.lora_alpha["default"])
        A = layer.lora_A["default"].detach().double()
        assert A.shape == (k, layer.in_features)
        assert float(layer.lora_B["default"].detach().abs().max()) == 0.0
        # the top-k principal directions of the layer's unmasked inputs (float64 SVD, up to sign)
        X = seen[name][0][keep]
        _, _, Vh = np.linalg.svd((X - X.mean(0)).numpy(), full_matrices=False)
        np.testing.assert_allclose(np.abs(A.numpy()), np.abs(Vh[:k]), atol=1e-5)
        # PEFT's incremental PCA (float32) reaches the same directions to its own precision
        assert float((A.abs() - p.lora_A["default"].weight.detach().double().abs()).abs().max()) < 5e-3
    # the base weights are untouched: the adapter loads in PEFT on the original GPT-2
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    lowrank.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = batch["input_ids"][:2]
    assert rel(loaded(input_ids=ids).logits, ours(ids).logits) <= 1e-5
    assert rel(ours(ids).logits, base(ids).logits) > 1e-3


def test_calibrate_on_wrapped_conv1d_and_bad_targets():
    model = lowrank.inject_lora(gpt2(), ["c_attn"], r=2)
    before = model(token_batches(1)[0]).logits
    ranks = lowrank.calibrate_lora(model, ["c_attn"], token_batches(), r=2, init="corda", adapter_name="cd")
    assert len(ranks) == 2
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRAConv1D) and set(layer.r) == {"default", "cd"}
    lowrank.set_adapter(model, "cd")
    assert rel(model(token_batches(1)[0]).logits, before) < 1e-5
    with pytest.raises(TypeError, match="Conv1D"):
        lowrank.calibrate_lora(gpt2(), ["wte"], token_batches(), r=2)
