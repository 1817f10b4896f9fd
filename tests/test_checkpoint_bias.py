"""Adapters with trained biases (PEFT's ``bias="all"`` / ``"lora_only"``), both ways, against PEFT itself.

A user trial found that ``mark_only_lora_trainable(model, bias="all")`` trained the biases but
``save_adapter`` dropped them without a word (the file said ``"bias": "none"``), and that ``load_adapter``
refused PEFT's own ``bias="all"`` / ``"lora_only"`` adapters. As in PEFT (``LoraConfig.bias``), the mode
given to ``mark_only_lora_trainable`` now also decides what ``save_adapter`` writes.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import tiny_bert_classifier
from safetensors.torch import load_file, save_file

import lowrank
from lowrank.lora.peft_format import AdapterCheckpointError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
CASES = {"opt": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"]}


def base_model(kind: str):
    torch.manual_seed(0)
    if kind == "opt":
        config = transformers.OPTConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
        return transformers.OPTForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def shift_trainable(model, skip_lora: bool) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not (skip_lora and "lora_" in name):
                param.add_(0.1)


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_adapter_with_trained_biases_loads_with_peft_outputs(kind, bias, tmp_path):
    base = base_model(kind)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=CASES[kind], init_lora_weights=False, bias=bias
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    shift_trainable(peft_model, skip_lora=True)  # the biases PEFT trains
    peft_model.save_pretrained(tmp_path)
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    expected = logits(peft_model)
    assert rel(logits(base), expected) > 1e-2  # the biases matter
    assert rel(logits(ours), expected) <= 1e-5
    # a loaded bias adapter is saved again with its biases (the config's bias is kept)
    lowrank.save_adapter(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["bias"] == bias
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    assert rel(logits(again), expected) <= 1e-5


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_saved_in_peft_layout(kind, bias, tmp_path):
    base = base_model(kind)
    model = lowrank.inject_lora(copy.deepcopy(base), CASES[kind], r=4, alpha=8, init="gaussian")
    lowrank.mark_only_lora_trainable(model, bias=bias)
    shift_trainable(model, skip_lora=False)
    expected = logits(model)
    with pytest.warns(UserWarning, match="made trainable"):
        lowrank.save_adapter(model, tmp_path / "none", bias="none")  # dropping them is not silent
    lowrank.save_adapter(model, tmp_path / "with")  # default: the bias mode the model was trained with
    assert json.loads((tmp_path / "with" / "adapter_config.json").read_text())["bias"] == bias
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "with").eval()
    assert rel(logits(theirs), expected) <= 1e-5
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "with")
    assert rel(logits(ours), expected) <= 1e-6
    # the keys are PEFT's own: the same set PEFT writes for the same model and mode
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES[kind], bias=bias),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    assert set(load_file(tmp_path / "with" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )


def test_bias_argument_and_bad_bias_keys(tmp_path):
    base = base_model("opt")
    model = lowrank.inject_lora(copy.deepcopy(base), CASES["opt"], r=4, init="gaussian")
    with pytest.raises(ValueError, match="bias must be one of"):
        lowrank.save_adapter(model, tmp_path / "x", bias="some")
    lowrank.save_adapter(model, tmp_path / "a", bias="all")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("fc1.bias"))
    before = {k: v.clone() for k, v in base.state_dict().items()}

    def rewrite(change):
        data = dict(tensors)
        change(data)
        save_file(data, weights, metadata={"format": "pt"})

    rewrite(lambda d: d.__setitem__(key, torch.zeros(3)))
    target = copy.deepcopy(base)
    with pytest.raises(AdapterCheckpointError, match="shape"):
        lowrank.load_adapter(target, tmp_path / "a")
    rewrite(lambda d: d.__setitem__(key, torch.full_like(tensors[key], float("nan"))))
    with pytest.raises(AdapterCheckpointError, match="finite"):
        lowrank.load_adapter(target, tmp_path / "a")
    rewrite(lambda d: d.__setitem__("base_model.model.model.decoder.nothere.bias", torch.zeros(3)))
    with pytest.raises(AdapterCheckpointError, match="nothere"):
        lowrank.load_adapter(target, tmp_path / "a")
    # nothing changed on error
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.load_adapter(target, tmp_path / "a", strict=False)
    assert rel(logits(target), logits(model)) <= 1e-6


def test_bias_all_with_modules_to_save_both_ways(tmp_path):
    # PEFT writes the copy's bias twice (<path>.bias and <path>.modules_to_save.bias) and the wrapped
    # original's trained bias as <path>.original_module.bias; the second was refused as an unknown key
    torch.manual_seed(0)
    base = tiny_bert_classifier()
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        init_lora_weights=False,
        modules_to_save=["classifier"],
        bias="all",
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    shift_trainable(theirs, skip_lora=True)
    theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.classifier.modules_to_save.bias" in load_file(
        tmp_path / "peft" / "adapter_model.safetensors"
    )
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert rel(logits(ours), logits(theirs)) <= 1e-5
    lowrank.set_adapter(ours, None)
    with theirs.disable_adapter():
        assert rel(logits(ours), logits(theirs)) <= 1e-5  # the original head's trained bias, too
    lowrank.set_adapter(ours, "default")
    lowrank.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert rel(logits(again), logits(theirs)) <= 1e-5
    with again.disable_adapter(), theirs.disable_adapter():
        assert rel(logits(again), logits(theirs)) <= 1e-5
