"""Model-level LoRA: inject into a plain MLP and a tiny transformers Llama (checked against PEFT), training on
scikit-learn's digits, merge/unmerge/remove, state dicts, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama_config
from torch import nn

import lowrank
from lowrank import LoRAEmbedding, LoRALinear, LoRAMergedLinear
from lowrank.lora import lora_layers


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def _randomize(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for _, param in layer.lora_parameters():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def test_inject_mlp_starts_at_base_and_freezes_the_rest():
    base = _mlp()
    model = lowrank.inject_lora(copy.deepcopy(base), ["0", "2"], r=4, alpha=8)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
    assert type(model[4]) is nn.Linear
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A.default", "0.lora_B.default", "2.lora_A.default", "2.lora_B.default"]
    x = torch.randn(7, 64)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    # the base state dict still loads (LoRA keys are the only missing ones)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".lora_" in k for k in result.missing_keys)


def test_unknown_and_unsupported_targets_raise_clear_errors():
    model = _mlp()
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no module.*\['0', '2', '4'\]"):
        lowrank.inject_lora(model, ["0", "q_proj"], r=2)
    assert type(model[0]) is nn.Linear  # nothing replaced on error
    with pytest.raises(TypeError, match="ReLU"):
        lowrank.inject_lora(model, ["1"], r=2)
    with pytest.raises(ValueError, match="target_modules"):
        lowrank.inject_lora(model, [], r=2)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 10\] for init='pissa' on module '4'"):
        lowrank.inject_lora(model, ["0", "4"], r=11, init="pissa")
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad
    with pytest.raises(ValueError, match="alpha"):
        lowrank.inject_lora(model, ["0"], r=2, alpha=-1.0)
    assert model[0].weight.requires_grad and model[0].bias.requires_grad
    with pytest.raises(ValueError, match="r must be"):
        lowrank.inject_lora(_mlp(), ["4"], r=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lowrank.merge_lora(_mlp())
    with pytest.raises(ValueError, match="adapter_name"):
        lowrank.inject_lora(model, ["0"], r=2, adapter_name="a.b")
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


def test_training_on_digits_lowers_loss_and_changes_only_lora():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:1000], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:1000])
    model = lowrank.inject_lora(_mlp(1), ["0", "2", "4"], r=8, alpha=16, dropout=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        model.eval()
        initial = F.cross_entropy(model(x), y).item()
    model.train()
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs would dominate on a busy machine
    try:
        for _ in range(100):
            batch = torch.randint(0, len(x), (128,), generator=gen)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert final < 0.35 * initial and accuracy > 0.75  # chance: loss 2.30, accuracy 0.1
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == (".lora_" in key), key


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=96)).eval()


def test_inject_into_transformers_llama_matches_peft():
    peft = pytest.importorskip("peft")
    base = _tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        base_logits = base(ids).logits
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    ours = lowrank.inject_lora(copy.deepcopy(base), targets, r=4, alpha=8)
    assert sum(1 for _ in lora_layers(ours)) == 7
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, base_logits, rtol=0, atol=0)

    # PEFT with random (non-zero) factors; copy them into ours and compare outputs and merged weights
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), config).eval()
    peft_state = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            prefix = f"base_model.model.{name}."
            if isinstance(layer, LoRAEmbedding):
                layer.lora_embedding_A["default"].copy_(peft_state[prefix + "lora_embedding_A.default"])
                layer.lora_embedding_B["default"].copy_(peft_state[prefix + "lora_embedding_B.default"])
            else:
                layer.lora_A["default"].copy_(peft_state[prefix + "lora_A.default.weight"])
                layer.lora_B["default"].copy_(peft_state[prefix + "lora_B.default.weight"])
        peft_logits = reference(ids).logits
        ours_logits = ours(ids).logits
        assert float((peft_logits - base_logits).abs().max()) > 1e-2  # the adapters do something
        torch.testing.assert_close(ours_logits, peft_logits, rtol=1e-4, atol=1e-4)
        assert len(lowrank.lora_state_dict(ours)) == len(peft_state)
        merged_peft = reference.merge_and_unload()
        lowrank.merge_lora(ours)
        torch.testing.assert_close(ours(ids).logits, ours_logits, rtol=1e-4, atol=1e-4)
        for name, layer in lora_layers(ours):
            torch.testing.assert_close(
                layer.weight, merged_peft.get_submodule(name).weight, rtol=1e-5, atol=1e-6
            )


def test_merge_unmerge_remove_and_multiple_adapters():
    base = _mlp(2)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = lowrank.inject_lora(base, ["0", "4"], r=4)
    _randomize(model)
    lowrank.inject_lora(model, ["0"], r=2, adapter_name="other")
    assert model[0].r == {"default": 4, "other": 2} and model[4].r == {"default": 4}
    assert model[0].lora_A["other"].requires_grad
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = model(x)
        lowrank.merge_lora(model)
        assert all(layer.merged for _, layer in lora_layers(model))
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="already merged"):
            lowrank.merge_lora(model)
        lowrank.unmerge_lora(model)
        for key in ("0.weight", "4.weight"):
            torch.testing.assert_close(model.state_dict()[key], original[key], rtol=0, atol=1e-6)
        with pytest.raises(RuntimeError, match="nothing to unmerge"):
            lowrank.unmerge_lora(model)
        model[0].set_adapter("other")
        out_other = model(x)
        assert not torch.allclose(out_other, out)
        model[0].set_adapter("default")
        plain = lowrank.remove_lora(model, merge=True)
        assert plain is model and not any(True for _ in lora_layers(model))
        assert type(model[0]) is nn.Linear and model[0].weight.requires_grad
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)

    restored = lowrank.remove_lora(lowrank.inject_lora(_mlp(2), ["2"], r=2))
    assert type(restored[2]) is nn.Linear
    torch.testing.assert_close(restored(x), _mlp(2)(x), rtol=0, atol=0)


def test_lora_state_dict_roundtrip_and_bias_modes():
    model = lowrank.inject_lora(_mlp(3), ["0", "2"], r=3)
    _randomize(model, seed=5)
    state = lowrank.lora_state_dict(model)
    assert sorted(state) == ["0.lora_A.default", "0.lora_B.default", "2.lora_A.default", "2.lora_B.default"]
    fresh = lowrank.inject_lora(_mlp(3), ["0", "2"], r=3)
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    x = torch.randn(4, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert set(lowrank.lora_state_dict(model, bias="lora_only")) - set(state) == {"0.bias", "2.bias"}
    assert set(lowrank.lora_state_dict(model, bias="all")) - set(state) == {"0.bias", "2.bias", "4.bias"}
    lowrank.mark_only_lora_trainable(model, bias="lora_only")
    assert model[0].bias.requires_grad and not model[4].bias.requires_grad
    with pytest.raises(ValueError, match="bias must be one of"):
        lowrank.mark_only_lora_trainable(model, bias="some")
    with pytest.raises(ValueError, match="unknown adapter"):
        lowrank.lora_state_dict(model, adapter_name="nope")


def test_inject_merged_projection_and_regex_targets():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.out = nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
            return self.out(weights @ v)

    torch.manual_seed(4)
    model = nn.Sequential(Attention(), Attention())
    x = torch.randn(2, 5, 16)
    ref = model(x)
    lowrank.inject_lora(model, [r"\d\.out"], r=2, merged_modules={"qkv": [True, False, True]})
    assert isinstance(model[0].qkv, LoRAMergedLinear) and isinstance(model[1].out, LoRALinear)
    assert model[0].qkv.enable_lora == [True, False, True] and model[0].qkv.out_slices == [16, 16, 16]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# inject_lora is all or nothing (issue 15 §5): a later target failing leaves the model as it was
# ----------------------------------------------------------------------------------------------------


class _Fused(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(16, 12)
        self.qkv = nn.Linear(16, 12)
        self.c = nn.Linear(12, 12)


def _state(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _nan_in_c(model):
    with torch.no_grad():
        model.c.weight[3, 4] = float("nan")


def _fail_on_second_wrap(monkeypatch):
    real = LoRALinear.from_linear.__func__
    calls = []

    def flaky(cls, linear, r, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure while wrapping")
        return real(cls, linear, r, **kwargs)

    monkeypatch.setattr(LoRALinear, "from_linear", classmethod(flaky))


ALL_OR_NOTHING = {
    # name: (prepare(model, monkeypatch), kwargs, error, message)
    "existing adapter name on a later target": (
        lambda m, mp: lowrank.inject_lora(m, ["c"], r=2, adapter_name="x", freeze_base=False),
        {"target_modules": ["a", "b", "c"], "adapter_name": "x"},
        ValueError,
        "already holds an adapter named 'x'",
    ),
    "bad merged-module flags": (
        None,
        {"target_modules": ["a", "b"], "merged_modules": {"qkv": [True, "no", True]}},
        ValueError,
        "merged_modules",
    ),
    "merged flags that do not split the layer": (
        None,
        {"target_modules": ["a"], "merged_modules": {"qkv": [True, False, True, True, False]}},
        ValueError,
        "equal slices",
    ),
    "PiSSA on a NaN weight": (
        lambda m, mp: _nan_in_c(m),
        {"target_modules": ["a", "b", "c"], "init": "pissa"},
        ValueError,
        "NaN",
    ),
    "failure while wrapping the second target (PiSSA)": (
        lambda m, mp: _fail_on_second_wrap(mp),
        {"target_modules": ["a", "b", "c"], "init": "pissa"},
        RuntimeError,
        "injected",
    ),
}


@pytest.mark.parametrize("case", list(ALL_OR_NOTHING))
def test_failed_inject_leaves_model_unchanged(case, monkeypatch):
    prepare, kwargs, error, message = ALL_OR_NOTHING[case]
    model = _Fused()
    if prepare is not None:
        prepare(model, monkeypatch)
    before = _state(model)
    with pytest.raises(error, match=message):
        lowrank.inject_lora(model, r=2, **kwargs)
    after = _state(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    for key, value in before[1].items():  # bit-identical weights (the NaN of one case kept in place)
        assert torch.equal(after[1][key].nan_to_num(nan=1234.5), value.nan_to_num(nan=1234.5)), key


# ----------------------------------------------------------------------------------------------------
# Bad-input tables: one row per kind, each a clear exception naming the argument
# ----------------------------------------------------------------------------------------------------


def _injected():
    return lowrank.inject_lora(_mlp(), ["0"], r=2)


def _merged():
    model = _injected()
    lowrank.merge_lora(model)
    return model


BAD_CALLS = {
    "inject: model not a module": (lambda: lowrank.inject_lora("m", ["0"]), TypeError, "model"),
    "inject: target_modules None": (lambda: lowrank.inject_lora(_mlp(), None), TypeError, "target_modules"),
    "inject: target_modules a number": (lambda: lowrank.inject_lora(_mlp(), 3), TypeError, "target_modules"),
    "inject: target_modules empty": (lambda: lowrank.inject_lora(_mlp(), []), ValueError, "target_modules"),
    "inject: target_modules holds None": (
        lambda: lowrank.inject_lora(_mlp(), ["0", None]),
        ValueError,
        "target_modules",
    ),
    "inject: r too large for pissa": (
        lambda: lowrank.inject_lora(_mlp(), ["4"], r=11, init="pissa"),
        ValueError,
        "r must",
    ),
    "inject: r zero": (lambda: lowrank.inject_lora(_mlp(), ["4"], r=0), ValueError, "r must"),
    "inject: r a float": (lambda: lowrank.inject_lora(_mlp(), ["4"], r=2.5), ValueError, "r must"),
    "inject: bad dropout": (lambda: lowrank.inject_lora(_mlp(), ["0"], dropout=1.0), ValueError, "dropout"),
    "inject: bad init": (lambda: lowrank.inject_lora(_mlp(), ["0"], init="svd"), ValueError, "init"),
    "inject: merged_modules a list": (
        lambda: lowrank.inject_lora(_mlp(), ["0"], merged_modules=["0"]),
        TypeError,
        "merged_modules",
    ),
    "inject: adapter_name with a dot": (
        lambda: lowrank.inject_lora(_mlp(), ["0"], adapter_name="a.b"),
        ValueError,
        "adapter_name",
    ),
    "mark_only: no LoRA layers": (lambda: lowrank.mark_only_lora_trainable(_mlp()), ValueError, "no LoRA"),
    "mark_only: bad bias": (lambda: lowrank.mark_only_lora_trainable(_injected(), "x"), ValueError, "bias"),
    "state_dict: unknown adapter": (
        lambda: lowrank.lora_state_dict(_injected(), adapter_name="x"),
        ValueError,
        "unknown adapter",
    ),
    "state_dict: bad bias": (lambda: lowrank.lora_state_dict(_injected(), bias="x"), ValueError, "bias"),
    "merge: no LoRA layers": (lambda: lowrank.merge_lora(_mlp()), ValueError, "no LoRA"),
    "merge: already merged": (lambda: lowrank.merge_lora(_merged()), RuntimeError, "already merged"),
    "unmerge: nothing merged": (
        lambda: lowrank.unmerge_lora(_injected()),
        RuntimeError,
        "nothing to unmerge",
    ),
    "remove: no LoRA layers": (lambda: lowrank.remove_lora(_mlp()), ValueError, "no LoRA"),
    "lora_layers: not a module": (lambda: list(lora_layers("m")), TypeError, "model"),
    "mixed batch: a str": (
        lambda: lowrank.mixed_adapter_batch(_injected(), "default").__enter__(),
        TypeError,
        "adapter_names",
    ),
    "mixed batch: unknown name": (
        lambda: lowrank.mixed_adapter_batch(_injected(), ["x"]).__enter__(),
        ValueError,
        "unknown adapter",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_model_functions_bad_input(case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()


def test_peft_init_spellings():
    # PEFT's init_lora_weights values: True = the default init; "pissa_niter_N" = PiSSA at PEFT's budget
    # (tests/test_lora_init_budget.py); False (both factors random) refused with a clear error
    ours, peftish = _mlp(), _mlp()
    torch.manual_seed(5)
    lowrank.inject_lora(ours, ["0", "2"], r=4, init="default")
    torch.manual_seed(5)
    lowrank.inject_lora(peftish, ["0", "2"], r=4, init=True)
    for (_, a), (_, b) in zip(lora_layers(ours), lora_layers(peftish)):
        for (name, p), (_, q) in zip(a.lora_parameters(), b.lora_parameters()):
            assert torch.equal(p, q), name

    model = _mlp().double()
    original = [m.weight.detach().clone() for m in (model[0], model[2])]
    lowrank.inject_lora(model, ["0", "2"], r=4, init="pissa_niter_4")
    for W, (_, layer) in zip(original, lora_layers(model)):
        delta = layer.delta_weight()
        torch.testing.assert_close(layer.weight.detach() + delta, W, rtol=0, atol=1e-12)  # residual exact
        exact = torch.linalg.svdvals(W)[:4]
        got = torch.linalg.svdvals(delta)[:4]
        torch.manual_seed(0)
        peft = torch.linalg.svdvals(torch.svd_lowrank(W, q=4, niter=4)[1].diag())
        assert ((got - exact).abs() / exact).max() <= ((peft - exact).abs() / exact).max()
        assert layer.weight_init["default"] == "pissa"

    with pytest.raises(ValueError, match="init=False"):
        lowrank.inject_lora(_mlp(), ["0"], r=2, init=False)
    with pytest.raises(ValueError, match="init must be one of"):
        lowrank.inject_lora(_mlp(), ["0"], r=2, init="pissa_niter_0")
    layer = LoRALinear(8, 6, r=2)
    layer.add_adapter("b", 2, init=True)
    assert layer.lora_B["b"].abs().max() == 0 and layer.lora_A["b"].abs().max() > 0
