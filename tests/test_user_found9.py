"""Public PEFT / LoRA-kernel bug reports replayed against lowrank's LoRA side (user test 9).

Each test names the report it replays; the reference is PEFT on the same weights or a float64 computation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank


class TiedLM(nn.Module):
    """Embedding -> linear head with the head's weight tied to the embedding (tie_word_embeddings)."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def _randomize_lora(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# huggingface/peft#2025 / #2972 (merging an adapter on a tied lm_head / embed_tokens changes the
# other module too; PEFT only warns): lowrank merged into the shared weight silently (logits off by ~12 on a
# tiny Llama). Now every in-place write into a tied weight is refused: a ValueError saying how to untie.
@pytest.mark.parametrize("targets", [["head"], ["embed"], ["head", "embed"]])
def test_merge_into_tied_weight_is_refused(targets):
    torch.manual_seed(0)
    model = TiedLM()
    lowrank.inject_lora(model, targets, r=2, alpha=4)
    _randomize_lora(model)
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        before = model(ids)
    weight = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        lowrank.merge_lora(model)
    with pytest.raises(ValueError, match="tied"):
        lowrank.remove_lora(model, merge=True)
    assert torch.equal(model.embed.weight, weight)  # nothing changed
    assert not any(layer.merged for _, layer in lowrank.lora.lora_layers(model))
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    # untied as the message says, the merge is exact again (float64 reference: the unmerged output)
    for name in targets:
        module = model.get_submodule(name)
        module.weight = nn.Parameter(module.weight.detach().clone())
    lowrank.merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_init_on_tied_weight_is_refused(init):
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        before = model(ids)
    with pytest.raises(ValueError, match="tied"):
        lowrank.inject_lora(model, ["head", "mid"], r=2, init=init)
    assert not list(lowrank.lora.lora_layers(model))
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    # the untied layers still take the init, and it keeps the base output (W - sBA + sBA)
    lowrank.inject_lora(model, ["mid"], r=2, init=init)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)


def test_unrelated_layers_still_merge():
    torch.manual_seed(0)
    model = TiedLM()
    lowrank.inject_lora(model, ["mid"], r=2)
    _randomize_lora(model)
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        before = model(ids)
    lowrank.merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)


# punica / vLLM "mixed-adapter index out of range" reports, embedding side: a token id outside the table
# surfaced as torch's internal IndexError ("index out of range in self"); now a ValueError naming x.
@pytest.mark.parametrize("bad", [10, -1])
@pytest.mark.parametrize("mixed", [False, True])
def test_embedding_token_id_out_of_range_is_a_value_error(bad, mixed):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    lowrank.inject_lora(model, ["0", "1"], r=2)
    model[0].add_adapter("b", 2)
    ids = torch.tensor([[1, bad], [3, 4]])
    if mixed:
        with pytest.raises(ValueError, match=r"x holds token ids .*\[0, 10\)"):
            with lowrank.mixed_adapter_batch(model, ["default", "b"]):
                model(ids)
    else:
        with pytest.raises(ValueError, match=r"x holds token ids .*\[0, 10\)"):
            model(ids)
    good = torch.tensor([[1, 9], [0, 4]])
    expected = model[1](nn.functional.embedding(good, model[0].weight + model[0].delta_weight()))
    torch.testing.assert_close(model(good), expected, atol=1e-6, rtol=1e-6)
