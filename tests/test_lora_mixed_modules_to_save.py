"""Mixed-adapter batches through ``modules_to_save`` copies, against PEFT's own mixed-batch forward.

A user trial found ``mixed_adapter_batch`` refused any model with ``modules_to_save`` (NotImplementedError)
where PEFT routes each row through its adapter's copy (``model(..., adapter_names=[...])``): a classifier
fine-tuned per task could not serve several tasks in one batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_bert_classifier

import lowrank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

NAMES = ["default", "other", "__base__", "other"]
IDS = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(3))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    base = tiny_bert_classifier()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            init_lora_weights=False,
            modules_to_save=["classifier"],
        ),
    )
    theirs.add_adapter(
        "other",
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["query"],
            init_lora_weights=False,
            modules_to_save=["classifier"],
        ),
    )
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.3)
    theirs.eval()
    folder = tmp_path_factory.mktemp("adapters")
    theirs.save_pretrained(folder)
    ours = lowrank.load_adapter(copy.deepcopy(base), folder)
    lowrank.load_adapter(ours, folder / "other", adapter_name="other")
    return theirs, ours


def test_mixed_batch_with_modules_to_save_equals_peft(models):
    theirs, ours = models
    with torch.no_grad():
        expected = theirs(input_ids=IDS, adapter_names=NAMES).logits
        with lowrank.mixed_adapter_batch(ours, NAMES):
            got = ours(input_ids=IDS).logits
    assert rel(got, expected) <= 1e-5
    assert ours.classifier._row_adapters is None  # restored on exit


def test_mixed_batch_gradients_reach_each_rows_copy(models):
    _, ours = models
    ours = copy.deepcopy(ours)
    lowrank.mark_only_lora_trainable(ours)
    with lowrank.mixed_adapter_batch(ours, NAMES):
        ours(input_ids=IDS).logits.pow(2).sum().backward()
    mixed = {n: p.grad.clone() for n, p in ours.named_parameters() if "modules_to_save" in n}
    ours.zero_grad()
    for row, name in enumerate(NAMES):  # reference: each row alone with its adapter active
        if name == "__base__":
            continue  # the frozen base: no trainable parameter sees this row
        lowrank.set_adapter(ours, name)
        ours(input_ids=IDS[row : row + 1]).logits.pow(2).sum().backward()
    for name, grad in mixed.items():
        param = dict(ours.named_parameters())[name]
        assert float(grad.norm()) > 0
        assert rel(grad, param.grad) <= 1e-5, name


def test_mixed_batch_with_the_wrong_batch_size_names_the_rows(models):
    _, ours = models
    with pytest.raises(ValueError, match="one name per row"), lowrank.mixed_adapter_batch(ours, NAMES[:3]):
        ours(input_ids=IDS)
