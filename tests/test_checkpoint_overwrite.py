"""load_adapter(inject=False) into an adapter whose scaling differs from the file's.

A user trial found that the factors were overwritten and the held alpha / use_rslora kept, so the model
computed ``s' B A`` for the file's ``s B A`` (94% off at alpha 4 vs 16) without a word; now refused, naming
the fields, with the model unchanged. Matching settings still load to the saved model's outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from lowrank.lora.peft_format import AdapterCheckpointError


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def saved(tmp_path, **options):
    model = small_model()
    lowrank.inject_lora(model, ["0", "2"], r=4, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    lowrank.save_adapter(model, tmp_path)
    return model


@pytest.mark.parametrize(
    "held",
    [{"alpha": 4.0}, {"alpha": 16.0, "use_rslora": True}],
    ids=["alpha", "use_rslora"],
)
def test_overwrite_with_another_scaling_is_refused(tmp_path, held):
    saved(tmp_path, alpha=16.0)
    target = small_model()
    lowrank.inject_lora(target, ["0", "2"], r=4, **held)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterCheckpointError, match="lora_alpha=16.*use_rslora"):
        lowrank.load_adapter(target, tmp_path, inject=False)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_overwrite_with_the_same_scaling_reproduces_the_saved_model(tmp_path):
    source = saved(tmp_path, alpha=16.0, use_rslora=True)
    target = small_model()
    lowrank.inject_lora(target, ["0", "2"], r=4, alpha=16.0, use_rslora=True)
    lowrank.load_adapter(target, tmp_path, inject=False)
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = source.double()(x)
        # float64 reference: W x + b + s B A x per layer
        h = x
        for layer in (source[0], source[2]):
            s = layer.scaling["default"]
            h = h @ (layer.weight + s * layer.lora_B["default"] @ layer.lora_A["default"]).T + layer.bias
            h = torch.relu(h) if layer is source[0] else h
        torch.testing.assert_close(expected, h)
        torch.testing.assert_close(target.double()(x), h, rtol=1e-12, atol=1e-12)
