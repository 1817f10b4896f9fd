"""modules_to_save: per-adapter full trainable copies of named modules (a classifier head), switched with the
adapter, trained, saved and loaded in PEFT's layout, kept by remove_lora(merge=True)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowrank
from lowrank.cli import main
from lowrank.lora.model import delete_adapter, set_adapter
from lowrank.lora.modules_to_save import ModulesToSaveWrapper
from lowrank.lora.peft_format import AdapterCheckpointError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TARGETS = ["query", "value"]


def bert_config():
    return transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )


@pytest.fixture(scope="module")
def bert_state():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config())
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh_bert(state):
    model = transformers.BertForSequenceClassification(bert_config()).eval()
    model.load_state_dict(state)
    return model


IDS = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model, adapter, seed, std=0.2):
    """Random values for adapter ``adapter``'s LoRA factors and classifier copy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                name.endswith(f"lora_A.{adapter}")
                or name.endswith(f"lora_B.{adapter}")
                or (f"modules_to_save.{adapter}." in name)
            ):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_copy_is_trainable_switched_and_deleted_with_its_adapter(bert_state):
    base_out = logits(fresh_bert(bert_state))
    model = lowrank.inject_lora(fresh_bert(bert_state), TARGETS, r=4, modules_to_save=["classifier"])
    wrapper = model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper) and wrapper.active_adapter == "default"
    assert wrapper.weight is wrapper.modules_to_save["default"].weight  # attributes of the active copy
    assert wrapper.modules_to_save["default"].weight.data_ptr() != wrapper.original_module.weight.data_ptr()
    assert torch.equal(logits(model), base_out)  # copy == original, B == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    assert set(lowrank.lora_state_dict(model)) == trainable
    params = dict(model.named_parameters())
    assert lowrank.adapter_size(model).adapter_params == sum(params[n].numel() for n in trainable)

    lowrank.inject_lora(model, TARGETS, r=2, adapter_name="other", modules_to_save=["classifier"])
    randomize(model, "default", 1)
    randomize(model, "other", 2)
    default_out = logits(model)
    set_adapter(model, "other")
    other_out = logits(model)
    assert rel(default_out, other_out) > 0.1
    # the other adapter's head alone: check the copy really is what forward uses
    head_in = model.bert(input_ids=IDS).pooler_output
    assert torch.allclose(other_out, model.classifier.modules_to_save["other"](head_in), atol=1e-6)
    set_adapter(model, None)
    assert torch.allclose(logits(model), base_out, atol=1e-6)

    # training reaches the active copy only
    set_adapter(model, "default")
    model.train()
    lowrank.mark_only_lora_trainable(model)
    model(input_ids=IDS).logits.sum().backward()
    assert model.classifier.modules_to_save["default"].weight.grad is not None
    assert model.classifier.modules_to_save["other"].weight.grad is None
    assert model.classifier.original_module.weight.grad is None
    model.eval()

    assert set(lowrank.lora_state_dict(model, adapter_name="other")) >= {
        "classifier.modules_to_save.other.weight",
        "classifier.modules_to_save.other.bias",
    }
    delete_adapter(model, "other")
    assert model.classifier.adapters == ["default"]
    assert not any(".other" in k for k in model.state_dict())
    assert torch.allclose(logits(model), default_out, atol=1e-6)


def test_remove_lora_merge_keeps_the_active_copy(bert_state):
    model = lowrank.inject_lora(fresh_bert(bert_state), TARGETS, r=4, modules_to_save=["classifier"])
    randomize(model, "default", 3)
    tuned = logits(model)
    copy = model.classifier.modules_to_save["default"]
    lowrank.remove_lora(model, merge=True)
    assert model.classifier is copy and type(copy) is nn.Linear
    assert rel(logits(model), tuned) < 1e-5

    model = lowrank.inject_lora(fresh_bert(bert_state), TARGETS, r=4, modules_to_save=["classifier"])
    original = model.classifier.original_module
    randomize(model, "default", 3)
    lowrank.remove_lora(model)
    assert model.classifier is original and original.weight.requires_grad
    assert torch.equal(logits(model), logits(fresh_bert(bert_state)))


def test_lowrank_checkpoint_is_peft_layout_and_loads_in_peft(bert_state, tmp_path, capsys):
    model = lowrank.inject_lora(fresh_bert(bert_state), TARGETS, r=4, modules_to_save=["classifier"])
    randomize(model, "default", 4)
    expected = logits(model)
    assert rel(expected, logits(fresh_bert(bert_state))) > 0.1
    lowrank.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert main(["info", str(tmp_path / "ours")]) == 0
    assert re.search(r"^modules_to_save +classifier$", capsys.readouterr().out, re.M)

    peft_model = peft.PeftModel.from_pretrained(fresh_bert(bert_state), tmp_path / "ours").eval()
    assert rel(peft_model(input_ids=IDS).logits.detach(), expected) <= 1e-5
    # PEFT re-saving the loaded adapter writes the same keys and tensors
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.classifier.weight" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_peft_checkpoint_loads_in_lowrank_with_the_same_outputs(bert_state, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(fresh_bert(bert_state), config).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    expected = peft_model(input_ids=IDS).logits.detach()
    peft_model.save_pretrained(tmp_path)

    model = lowrank.load_adapter(fresh_bert(bert_state), tmp_path)
    assert isinstance(model.classifier, ModulesToSaveWrapper)
    assert rel(logits(model), expected) <= 1e-5
    # a second adapter from the same file: a second copy, inactive until set_adapter
    lowrank.load_adapter(model, tmp_path, adapter_name="again")
    assert model.classifier.adapters == ["default", "again"]
    with pytest.raises(AdapterCheckpointError, match="already holds a modules_to_save copy"):
        lowrank.load_adapter(model, tmp_path, adapter_name="again")
    set_adapter(model, "again")
    assert rel(logits(model), expected) <= 1e-5


def test_bad_inputs_raise_clear_errors_and_change_nothing(bert_state, tmp_path):
    model = fresh_bert(bert_state)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\] match no module"):
        lowrank.inject_lora(model, TARGETS, r=2, modules_to_save=["head"])
    with pytest.raises(ValueError, match="is a LoRA target .* and is in modules_to_save"):
        lowrank.inject_lora(model, ["query", "classifier"], r=2, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="lies inside 'bert.pooler'"):
        lowrank.inject_lora(model, ["query", "dense"], r=2, modules_to_save=["pooler"])
    with pytest.raises(TypeError, match="modules_to_save must be"):
        lowrank.inject_lora(model, TARGETS, r=2, modules_to_save=3)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())

    lowrank.inject_lora(model, TARGETS, r=2, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="'classifier', which is in modules_to_save"):
        lowrank.inject_lora(model, ["classifier"], r=2, adapter_name="second")
    # mixed-adapter batches route rows through the copies now (tests/test_lora_mixed_modules_to_save.py)
    lowrank.save_adapter(model, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    from safetensors.torch import save_file

    weights["base_model.model.classifier.weight"] = torch.zeros(4, 32)  # wrong shape
    save_file(weights, tmp_path / "adapter_model.safetensors")
    target = fresh_bert(bert_state)
    with pytest.raises(AdapterCheckpointError, match="classifier.weight' has shape"):
        lowrank.load_adapter(target, tmp_path)
    assert type(target.classifier) is nn.Linear


def test_wrapper_state_from_before_row_routing_still_runs():
    # a wrapper unpickled from a version without mixed-batch routing has no ``_row_adapters`` in its
    # __dict__: forward must fall back to the active copy (the class default), not raise AttributeError
    head = nn.Linear(5, 3)
    wrapper = ModulesToSaveWrapper(head, "a")
    with torch.no_grad():
        wrapper.modules_to_save["a"].weight.add_(1.0)
    state = wrapper.__dict__.copy()
    del state["_row_adapters"]
    old = ModulesToSaveWrapper.__new__(ModulesToSaveWrapper)
    old.__dict__.update(state)
    x = torch.randn(4, 5, dtype=torch.float32)
    expected = x.double() @ (head.weight.double() + 1).T + head.bias.double()
    torch.testing.assert_close(old(x).double(), expected, rtol=1e-5, atol=1e-6)
