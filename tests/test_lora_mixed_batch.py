"""Mixed-adapter batches through the LoRA layers: each row equals that row run with its adapter alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.up = nn.Linear(24, 40)
        self.qkv = nn.Linear(40, 48)
        self.down = nn.Linear(48, 16)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.down(torch.relu(self.qkv(torch.relu(self.up(h)))))


def make_model(seed=0):
    torch.manual_seed(seed)
    model = TinyModel().double()
    lowrank.inject_lora(
        model, ["embed", "up", "down", "qkv"], r=4, alpha=8, merged_modules={"qkv": [True, False, True]}
    )
    # Second and third adapters with other ranks; the third only on two layers.
    for name, layer in lowrank.lora.lora_layers(model):
        layer.add_adapter("b", 2, alpha=3.0)
        if name in ("up", "down"):
            layer.add_adapter("c", 3, alpha=1.5, use_rslora=True)
        for _, param in layer.lora_parameters():
            with torch.no_grad():
                param.normal_(0, 0.3)  # make every adapter's term non-zero
    return model


def run_single(model, tokens, name):
    for _, layer in lowrank.lora.lora_layers(model):
        layer.set_adapter(name if name in layer.r else None)
    return model(tokens)


def test_each_row_equals_its_own_adapter_and_base_rows_equal_base():
    model = make_model()
    tokens = torch.randint(0, 50, (6, 5))
    names = ["b", "__base__", "default", "c", "b", "default"]
    with torch.no_grad():
        with lowrank.mixed_adapter_batch(model, names):
            mixed = model(tokens)
        for i, name in enumerate(names):
            expected = run_single(model, tokens[i : i + 1], None if name == "__base__" else name)
            torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-12, atol=1e-12)
    # the context restored ordinary (single-adapter) behaviour
    assert all(layer._row_adapters is None for _, layer in lowrank.lora.lora_layers(model))


def test_inference_cache_follows_parameter_updates():
    model = make_model(1)
    tokens = torch.randint(0, 50, (3, 4))
    names = ["b", "default", "b"]
    with torch.no_grad():
        with lowrank.mixed_adapter_batch(model, names):
            first = model(tokens)
            model.up.lora_B["b"].mul_(2.0)  # an in-place update must invalidate the cached stacks
            second = model(tokens)
        expected = torch.cat([run_single(model, tokens[i : i + 1], n) for i, n in enumerate(names)])
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, expected, rtol=1e-12, atol=1e-12)


def test_training_two_adapters_in_one_batch_matches_separate_batches():
    model = make_model(2)
    lowrank.mark_only_lora_trainable(model)
    tokens = torch.randint(0, 50, (4, 3))
    names = ["default", "b", "default", "b"]
    with lowrank.mixed_adapter_batch(model, names):
        model(tokens).square().sum().backward()
    mixed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0
    for name in ("default", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        total = total + run_single(model, tokens[rows], name).square().sum()
    total.backward()
    separate = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(mixed_grads) == set(separate)
    assert any(".b" in k for k in mixed_grads) and any(".default" in k for k in mixed_grads)
    for key, grad in separate.items():
        torch.testing.assert_close(mixed_grads[key], grad, rtol=1e-10, atol=1e-12)


def test_bad_use_is_refused_clearly():
    model = make_model(3)
    tokens = torch.randint(0, 50, (2, 3))
    with pytest.raises(ValueError, match="unknown adapter names \\['nope'\\]"):
        with lowrank.mixed_adapter_batch(model, ["nope", "b"]):
            pass
    with pytest.raises(TypeError, match="sequence of adapter names"):
        with lowrank.mixed_adapter_batch(model, "b"):
            pass
    with pytest.raises(ValueError, match="one name per row"), lowrank.mixed_adapter_batch(model, ["b"] * 3):
        model(tokens)
    model.up.set_adapter("b")
    model.up.merge()
    with pytest.raises(RuntimeError, match="merged"), lowrank.mixed_adapter_batch(model, ["b", "b"]):
        model(tokens)
    model.up.unmerge()
    plain = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lowrank.mixed_adapter_batch(plain, ["a"]):
            pass
