"""DoRA (lowrank/lora/dora.py and LoRALinear(use_dora=True)) against float64 dense formulas and PEFT."""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from torch import nn

import lowrank
from lowrank.lora import layers as layers_module
from lowrank.lora.dora import dora_row_norms
from lowrank.lora.layers import LoRAEmbedding, LoRALinear, LoRAMergedLinear
from lowrank.lora.model import lora_layers


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def dense_norms(W, A, B, s):
    """The float64 dense reference ‖W_i + s B_i A‖ (PEFT's formula, formed explicitly)."""
    V = W.detach().double() + s * (B.detach().double() @ A.detach().double())
    return torch.linalg.norm(V, dim=1)


def dense_dora(x, W, A, B, m, s, bias):
    """float64 reference of the DoRA forward with the norm detached (paper section 4.3, PEFT)."""
    V = W + s * B @ A
    factor = m / torch.linalg.norm(V, dim=1).detach()
    out = factor * (x @ V.T)
    return out if bias is None else out + bias


def randomize(layer: LoRALinear, name: str = "default", seed: int = 0) -> None:
    """Non-zero B and a magnitude away from ‖W‖ so every term of the formula matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B = layer.lora_B[name]
        B.copy_(0.3 * torch.randn(B.shape, generator=g, dtype=torch.float64).to(B.dtype))
        m = layer.lora_magnitude_vector[name]
        m.mul_((0.5 + torch.rand(m.shape, generator=g, dtype=torch.float64)).to(m.dtype))


# --------------------------------------------------------------------------------------------------
# the row norms
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float64, 1e-13), (torch.float32, 2e-6), (torch.bfloat16, 2e-6), (torch.float16, 2e-6)],
)
def test_row_norms_match_dense_float64(dtype, tol):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 80, generator=g).to(dtype)
    A = (torch.randn(6, 80, generator=g) / 9).to(dtype)
    B = torch.randn(96, 6, generator=g).to(dtype)
    got = dora_row_norms(W, A, B, 1.7)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = dense_norms(W, A, B, 1.7)
    assert float(((got.double() - want) / want).abs().max()) < tol


def test_row_norms_nearly_cancelling_rows_are_exact():
    """Rows where s B_i A ≈ -W_i: the expansion cancels, the float64 row recompute keeps them exact."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 64, generator=g)
    B = torch.randn(32, 4, generator=g)
    s = 0.5
    W = torch.randn(32, 64, generator=g)
    W[3] = -s * (B[3] @ A) + 1e-6 * torch.randn(64, generator=g)  # norm ~1e-5 next to terms ~10
    W[7] = -s * (B[7] @ A)  # cancels to float32 rounding of the row
    W[9] = -s * (B[9] @ A) + 1e-3 * torch.randn(64, generator=g)
    got = dora_row_norms(W, A, B, s).double()
    want = dense_norms(W, A, B, s)
    assert bool(torch.isfinite(got).all()) and bool((got >= 0).all())
    for i in (3, 9):
        assert abs(got[i] - want[i]) / want[i] < 1e-6, (i, got[i], want[i])
    assert abs(got[7] - want[7]) < 1e-12 + 1e-6 * want[7]
    others = [i for i in range(32) if i not in (3, 7, 9)]
    assert float(((got[others] - want[others]) / want[others]).abs().max()) < 2e-6
    # the plain expansion in float32 would be off by orders of magnitude on row 3
    naive = (
        W.square().sum(1) + 2 * s * (B * (W @ A.T)).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
    ).clamp_min(0)
    assert abs(naive[3].sqrt().double() - want[3]) / want[3] > 1e-2


def test_row_norms_bad_inputs():
    W, A, B = torch.randn(8, 6), torch.randn(2, 6), torch.randn(8, 2)
    with pytest.raises(ValueError, match="lora_A"):
        dora_row_norms(W, torch.randn(2, 5), B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        dora_row_norms(W, A, torch.randn(7, 2), 1.0)
    with pytest.raises(TypeError, match="weight"):
        dora_row_norms(W.long(), A, B, 1.0)
    with pytest.raises(ValueError, match="scaling"):
        dora_row_norms(W, A, B, float("nan"))
    with pytest.raises(ValueError, match="weight"):
        dora_row_norms(torch.randn(8), A, B, 1.0)


# --------------------------------------------------------------------------------------------------
# the layer: forward, gradients, merge, cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_forward_matches_dense_formula(bias, dtype, tol):
    torch.manual_seed(3)
    layer = LoRALinear(40, 24, 4, alpha=8, bias=bias, use_dora=True, dtype=dtype)
    m0 = layer.lora_magnitude_vector["default"]
    assert rel(m0, torch.linalg.norm(layer.weight.double(), dim=1)) < 1e-6  # init: ‖W‖ (B = 0)
    randomize(layer)
    x = torch.randn(2, 5, 40, dtype=dtype)
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    want = dense_dora(
        x.double(), p["weight"], p["lora_A.default"], p["lora_B.default"], p["lora_magnitude_vector.default"],
        layer.scaling["default"], p.get("bias"),
    )  # fmt: skip
    assert rel(layer(x), want) < tol


def test_gradients_match_float64_reference_with_detached_norm():
    torch.manual_seed(4)
    layer = LoRALinear(12, 9, 3, alpha=5, use_dora=True, dtype=torch.float64)
    randomize(layer)
    names = ("lora_A.default", "lora_B.default", "lora_magnitude_vector.default")
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 9, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    got = [x.grad] + [dict(layer.named_parameters())[n].grad for n in names]

    ref = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    xr = x.detach().clone().requires_grad_(True)
    out = dense_dora(xr, ref["weight"], *(ref[n] for n in names[:2]), ref[names[2]], 5 / 3, ref["bias"])
    (out * g).sum().backward()
    want = [xr.grad] + [ref[n].grad for n in names]
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-12

    # gradcheck of the whole layer in x and the magnitude (the norm does not depend on them), and of the
    # factors through a function that holds the norm fixed as the reference does
    def f(x, m):
        return torch.func.functional_call(layer, {"lora_magnitude_vector.default": m}, (x,))

    m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x.detach().clone().requires_grad_(True), m))


def test_matches_peft_forward_and_gradients_with_dropout():
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    base = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10))
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0", "2"], use_dora=True, lora_dropout=0.25)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = lowrank.inject_lora(copy.deepcopy(base), ["0", "2"], r=4, alpha=12, dropout=0.25, use_dora=True)
    for i in (0, 2):
        layer = theirs.base_model.model[i]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(std=0.3)
            layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.rand(layer.out_features))
            # the magnitude was initialised by both from ‖W‖: equal before we copy anything
            assert (
                rel(ours[i].lora_magnitude_vector["default"], torch.linalg.norm(layer.weight, dim=1)) < 1e-6
            )
            ours[i].lora_A["default"].copy_(layer.lora_A["default"].weight)
            ours[i].lora_B["default"].copy_(layer.lora_B["default"].weight)
            ours[i].lora_magnitude_vector["default"].copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(6, 20)
    for train in (False, True):  # eval: no dropout; train: dropout(x) on the DoRA term, as PEFT
        theirs.train(train)
        ours.train(train)
        for model in (theirs, ours):
            model.zero_grad()
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        torch.manual_seed(6)
        out_t = theirs(xs[0])
        torch.manual_seed(6)
        out_o = ours(xs[1])
        assert rel(out_o, out_t) < 1e-5
        out_t.square().sum().backward()
        out_o.square().sum().backward()
        assert rel(xs[1].grad, xs[0].grad) < 1e-5
        for i in (0, 2):
            t, o = theirs.base_model.model[i], ours[i]
            assert rel(o.lora_A["default"].grad, t.lora_A["default"].weight.grad) < 1e-5
            assert rel(o.lora_B["default"].grad, t.lora_B["default"].weight.grad) < 1e-5
            magnitude = t.lora_magnitude_vector["default"].weight
            assert rel(o.lora_magnitude_vector["default"].grad, magnitude.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(dtype):
    torch.manual_seed(7)
    layer = LoRALinear(48, 32, 4, alpha=8, use_dora=True, dtype=dtype).eval()
    randomize(layer)
    W0 = layer.weight.detach().clone()
    x = torch.randn(5, 48, dtype=dtype)
    before = layer(x).detach()
    layer.merge()
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    V = W0.double() + 2.0 * p["lora_B.default"] @ p["lora_A.default"]
    merged_want = (p["lora_magnitude_vector.default"] / torch.linalg.norm(V, dim=1))[:, None] * V
    ulp = torch.finfo(dtype).eps
    assert rel(layer.weight, merged_want) < (2e-6 if dtype == torch.float32 else ulp)
    assert rel(layer(x), before) < (1e-5 if dtype == torch.float32 else 4 * ulp)
    layer.unmerge()
    # unmerge: within ~one ulp of max(|W|, |W + sBA|) per entry (see LoRALinear.unmerge)
    bound = 1.01 * ulp * torch.maximum(W0.double().abs(), V.abs()) + 1e-30
    assert bool(((layer.weight.double() - W0.double()).abs() <= bound).all())
    assert rel(layer(x), before) < (1e-6 if dtype == torch.float32 else 4 * ulp)


def test_merge_refuses_zero_magnitude():
    layer = LoRALinear(8, 6, 2, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][2] = 0.0
    W0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        layer.merge()
    assert torch.equal(layer.weight, W0) and not layer.merged


def test_eval_cache_and_invalidation_after_optimizer_step(monkeypatch):
    torch.manual_seed(8)
    layer = LoRALinear(32, 16, 4, use_dora=True)
    randomize(layer)
    calls = []
    real = layers_module.dora_row_norms
    monkeypatch.setattr(layers_module, "dora_row_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 32)
    layer.eval()
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert torch.equal(first, second) and len(calls) == 1  # computed once, then cached

    layer.train()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    layer(x).square().sum().backward()
    assert len(calls) == 1  # factors unchanged: the training forward reuses it
    opt.step()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
    assert len(calls) == 2  # the step changed lora_A / lora_B: recomputed
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    want = dense_dora(
        x.double(), layer.weight.double(), p["lora_A.default"], p["lora_B.default"],
        p["lora_magnitude_vector.default"], layer.scaling["default"], layer.bias.double(),
    )  # fmt: skip
    assert rel(after, want) < 2e-6 and rel(after, first) > 1e-3
    # a change of the base weight (in place) also invalidates it
    with torch.no_grad():
        layer.weight.mul_(1.5)
        layer(x)
    assert len(calls) == 3


def test_named_adapters_switch_delete_and_state_dict():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lowrank.inject_lora(model, ["0", "2"], r=2, use_dora=True)
    lowrank.inject_lora(model, ["0", "2"], r=3, adapter_name="plain")
    lowrank.inject_lora(model, ["0"], r=4, adapter_name="d2", use_dora=True)
    layer = model[0]
    assert layer.use_dora == {"default": True, "plain": False, "d2": True}
    assert all(p.requires_grad for _, p in layer.lora_parameters())
    keys = sorted(lowrank.lora_state_dict(model, adapter_name="d2"))
    assert keys == ["0.lora_A.d2", "0.lora_B.d2", "0.lora_magnitude_vector.d2"]
    randomize(layer, "d2")
    x = torch.randn(3, 16)
    layer.set_adapter("d2")
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    want = dense_dora(
        x.double(), p["weight"], p["lora_A.d2"], p["lora_B.d2"], p["lora_magnitude_vector.d2"],
        layer.scaling["d2"], p["bias"],
    )  # fmt: skip
    assert rel(layer(x), want) < 2e-6
    layer.set_adapter("plain")
    assert (
        rel(layer(x), lowrank.lora_linear(x, layer.weight, *layer._factors("plain"), 1.0, layer.bias)) < 1e-6
    )
    layer.delete_adapter("d2")
    assert "d2" not in layer.lora_magnitude_vector and "d2" not in layer.use_dora
    assert "d2" not in layer.__dict__.get("_dora_cache", {}).get("norms", {})
    # the cache (weak references) is dropped when pickling / deep-copying; the copy computes the same output
    layer.set_adapter("default")
    with torch.no_grad():
        y = layer(x)
        clone = pickle.loads(pickle.dumps(layer))
        assert torch.equal(clone(x), y) and torch.equal(copy.deepcopy(layer)(x), y)
    assert "dora" in repr(layer)


def test_bad_inputs_refused_clearly(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 12))
    with pytest.raises(TypeError, match="use_dora"):
        lowrank.inject_lora(copy.deepcopy(model), ["1"], r=2, use_dora="yes")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="use_dora"):
        lowrank.inject_lora(model, ["0", "1"], r=2, use_dora=True)
    assert type(model[1]) is nn.Linear and type(model[0]) is nn.Embedding  # nothing changed
    assert torch.equal(model[1].weight, before[1].weight) and model[1].weight.requires_grad
    with pytest.raises(ValueError, match="use_dora"):
        lowrank.inject_lora(
            nn.Sequential(nn.Linear(8, 12)), ["0"], r=2, use_dora=True, merged_modules={"0": [True] * 3}
        )
    with pytest.raises(ValueError, match="use_dora"):
        LoRAEmbedding(10, 8, 2).add_adapter("d", 2, use_dora=True)
    merged = LoRAMergedLinear(8, [4, 4], 2, enable_lora=[True, False])
    with pytest.raises(ValueError, match="use_dora"):
        merged.add_adapter("d", 2, use_dora=True)
    assert "d" not in merged.r
    with pytest.raises(TypeError, match="use_dora"):
        LoRALinear(8, 8, 2, use_dora=1)
    dora = lowrank.inject_lora(nn.Sequential(nn.Linear(8, 12)), ["0"], r=2, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        lowrank.quantize_base(dora)
    with pytest.raises(ValueError, match="use_dora"):
        with lowrank.mixed_adapter_batch(dora, ["default", "__base__"]):
            dora(torch.randn(2, 8))
    mixed = lowrank.inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0"], r=2, use_dora=True)
    lowrank.inject_lora(mixed, ["1"], r=2)
    with pytest.raises(ValueError, match="use_dora"):
        lowrank.truncate_adapter(mixed, "default", r=1)
    with pytest.raises(ValueError, match="use_dora"):
        lowrank.combine_adapters(mixed, ["default"], None, "sum")
    assert mixed[0].r == {"default": 2}
    with pytest.raises(ValueError, match="use_dora"):
        lowrank.save_adapter(mixed, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# checkpoints in PEFT's layout, both ways, on a tiny BERT
# --------------------------------------------------------------------------------------------------


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(10)
    return transformers.BertModel(config).eval()


def hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_peft_saves_lowrank_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    ids = torch.randint(0, 64, (2, 12))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    want = hidden(theirs, ids)
    assert rel(hidden(ours, ids), want) < 1e-5
    assert rel(hidden(ours, ids), hidden(base, ids)) > 1e-3  # the adapter does something
    layer = ours.encoder.layer[1].attention.self.value
    assert layer.use_dora["default"] and layer.lora_magnitude_vector["default"].shape == (32,)


def test_lowrank_saves_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    ids = torch.randint(0, 64, (2, 12))
    ours = lowrank.inject_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=8, use_dora=True)
    for _, layer in lora_layers(ours):
        randomize(layer)
    lowrank.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel(hidden(theirs, ids), hidden(ours, ids)) < 1e-5
    # and back into lowrank
    again = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(hidden(again, ids), hidden(ours, ids)) < 1e-6


def test_load_refuses_inconsistent_dora_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    base = nn.Sequential(nn.Linear(8, 6))
    lowrank.save_adapter(lowrank.inject_lora(copy.deepcopy(base), ["0"], r=2, use_dora=True), tmp_path)
    weights, config_file = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors = load_file(weights)
    key = "base_model.model.0.lora_magnitude_vector"
    assert tensors[key].shape == (6,)

    def write(tensors=tensors, **fields):
        save_file(tensors, weights)
        config = json.loads(config_file.read_text())
        config.update(fields)
        config_file.write_text(json.dumps(config))

    for tensors_, fields, match in [
        ({k: v for k, v in tensors.items() if k != key}, {}, "missing key .*lora_magnitude_vector"),
        ({**tensors, key: torch.ones(5)}, {}, "lora_magnitude_vector"),
        ({**tensors, key: torch.full((6,), float("nan"))}, {}, "lora_magnitude_vector"),
        (tensors, {"use_dora": False}, "use_dora=false"),
        (tensors, {"use_dora": "yes"}, "use_dora"),
    ]:
        write(tensors_, **fields)
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            lowrank.load_adapter(model, tmp_path)
        assert type(model[0]) is nn.Linear
    # a DoRA checkpoint into an existing plain LoRA adapter of the same name (inject=False)
    write(tensors, use_dora=True)
    plain = lowrank.inject_lora(copy.deepcopy(base), ["0"], r=2)
    with pytest.raises(ValueError, match="use_dora"):
        lowrank.load_adapter(plain, tmp_path, inject=False)
