"""quantize_base / QuantizedLoRALinear: vs a dequantized-weight reference; adapters, merge, training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import tiny_llama_config
from torch import nn

import lowrank
from lowrank.lora import LoRALinear, QuantizedLoRALinear, lora_layers

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(96)).eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for _, p in layer.lora_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _dequantized_reference(model):
    """The same model with plain LoRALinear layers holding the dequantized weights (float32)."""
    ref = copy.deepcopy(model)
    for name, layer in list(lora_layers(ref)):
        if isinstance(layer, QuantizedLoRALinear):
            plain = LoRALinear(layer.in_features, layer.out_features, 1, bias=layer.bias is not None)
            plain.__dict__.update(
                {k: v for k, v in layer.__dict__.items() if k not in ("_parameters", "_buffers")}
            )
            plain._parameters = dict(layer._parameters)
            plain._parameters["weight"] = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            plain._buffers = {}
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, plain)
    return ref


@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
def test_quantize_base_matches_dequantized_reference(qdtype):
    model = lowrank.inject_lora(_tiny_llama(), TARGETS, r=4, alpha=8)
    _randomize_adapters(model)
    fp32_bytes = sum(layer.weight.numel() * 4 for _, layer in lora_layers(model))
    lowrank.quantize_base(model, qdtype)
    layers = dict(lora_layers(model))
    assert len(layers) == 12 and all(isinstance(m, QuantizedLoRALinear) for m in layers.values())
    q_bytes = sum(m.qweight.numel() + 4 * m.weight_scale.numel() for m in layers.values())
    assert fp32_bytes / q_bytes >= 3.5  # >= 2.5x less weight memory (issue 21 target)
    layer = layers["model.layers.0.self_attn.q_proj"]
    assert layer.qweight.dtype == getattr(torch, qdtype) and layer.weight_scale.dtype == torch.float32
    assert "weight" not in dict(layer.named_parameters())
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        want = _dequantized_reference(model)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # adapter keys unchanged: PEFT layout, adapters only
    assert set(lowrank.lora_state_dict(model)) == {
        k for k in lowrank.lora_state_dict(_dequantized_reference(model))
    }


def test_checkpoint_roundtrip_merge_and_dtype_casts(tmp_path):
    model = lowrank.inject_lora(_tiny_llama(), ["q_proj", "down_proj"], r=4, alpha=8)
    _randomize_adapters(model)
    lowrank.quantize_base(model, "int8")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = lowrank.quantize_base(lowrank.inject_lora(_tiny_llama(), ["q_proj", "down_proj"], r=4, alpha=8))
    lowrank.load_adapter(fresh, tmp_path / "a", inject=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, before, rtol=0, atol=0)
        # merge: dequantise -> add -> requantise, with a warning; close to the unmerged output
        with pytest.warns(UserWarning, match="quantized again"):
            lowrank.merge_lora(fresh)
        merged = fresh(ids).logits
    assert float((merged - before).abs().max()) < 0.05 * float(before.abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.unmerge_lora(fresh)
    # dtype casts touch the adapters and bias, never the codes or the scales
    layer = fresh.model.layers[0].self_attn.q_proj
    fresh.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.lora_A["default"].dtype == torch.bfloat16
    with torch.no_grad():
        out_bf16 = fresh(ids).logits.float()
    assert float((out_bf16 - before).abs().max()) < 0.1 * float(before.abs().max())
    with pytest.raises(ValueError, match="pissa"):
        layer.add_adapter("p", 2, init="pissa")


def test_mixed_adapter_batch_and_bad_input():
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    model = lowrank.inject_lora(model, ["0", "2"], r=2)
    for _, layer in lora_layers(model):
        layer.add_adapter("b", 3)
    _randomize_adapters(model)
    lowrank.quantize_base(model, "float8_e4m3fn")
    x = torch.randn(3, 16)
    with torch.no_grad(), lowrank.mixed_adapter_batch(model, ["default", "b", "__base__"]):
        mixed = model(x)
    ref = _dequantized_reference(model)
    with torch.no_grad():
        for i, name in enumerate(["default", "b"]):
            for _, layer in lora_layers(ref):
                layer.set_adapter(name)
            torch.testing.assert_close(mixed[i], ref(x[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dtype"):
        lowrank.quantize_base(model, "int4")
    with pytest.raises(ValueError, match="no LoRALinear"):
        lowrank.quantize_base(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="model"):
        lowrank.quantize_base("not a model")


def test_int8_base_finetuning_tracks_fp32_base():
    """Same data, seed and steps: the int8-base LoRA run lowers the loss like the fp32-base run."""
    base = _tiny_llama(seed=3).train()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    losses = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
    try:
        for kind in ("fp32", "int8"):
            losses[kind] = _finetune(base, ids, kind)
    finally:
        torch.set_num_threads(threads)
    f32, i8 = losses["fp32"], losses["int8"]
    assert f32[-1] < 0.8 * f32[0]  # the run learns
    assert abs(i8[-1] - f32[-1]) <= 0.05 * f32[-1]
    assert i8[-1] < 0.8 * i8[0]


def _finetune(base, ids, kind, steps=20):
    """LoRA (r=8) fine-tuning of a copy of ``base`` with an fp32 or int8 base; the loss at each step."""
    model = lowrank.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)
    if kind == "int8":
        lowrank.quantize_base(model, "int8")
    lowrank.mark_only_lora_trainable(model)
    torch.manual_seed(1)
    for _, layer in lora_layers(model):  # same non-zero start in both runs
        for _, p in layer.lora_parameters():
            nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    trace = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append(loss.item())
    return trace
