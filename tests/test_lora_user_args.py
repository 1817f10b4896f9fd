"""Arguments a user trial passed to the model-level LoRA API: NumPy scalars and the reserved adapter name.

NumPy scalars (``r=np.int64(8)`` from a NumPy computation, ``alpha=np.float32(16)``, weights as an array)
were refused by inject_lora, calibrate_lora, combine_lora/combine_adapters and truncate_adapter ("r must be
a positive int, got np.int64(2)"); an adapter named ``"__base__"`` was accepted, and
``mixed_adapter_batch`` then ran that adapter for rows that asked for the base model.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from torch import nn

import lowrank


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)


def test_inject_lora_takes_numpy_scalars_as_the_python_numbers():
    x = torch.randn(5, 8, dtype=torch.float64)
    reference = small_model().double()
    lowrank.inject_lora(reference, ["0", "2"], r=3, alpha=6.0, dropout=0.25, use_rslora=True)
    model = small_model().double()
    lowrank.inject_lora(
        model,
        ["0", "2"],
        r=np.int64(3),
        alpha=np.float32(6.0),
        dropout=np.float32(0.25),
        use_rslora=np.bool_(True),
    )
    assert model[0].r["default"] == 3 and type(model[0].r["default"]) is int
    assert model[0].scaling["default"] == pytest.approx(6.0 / 3**0.5, rel=1e-12)
    randomize(reference)
    randomize(model)
    model.eval()
    reference.eval()
    # the same adapter as the Python-number call; and its update is s B A in float64
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    layer = model[0]
    delta = layer.scaling["default"] * layer.lora_B["default"] @ layer.lora_A["default"]
    torch.testing.assert_close(layer.delta_weight("default"), delta)


def test_algebra_and_calibration_take_numpy_scalars_and_arrays():
    model = small_model().double()
    lowrank.inject_lora(model, ["0"], r=3, init="gaussian")
    lowrank.inject_lora(model, ["0"], r=2, adapter_name="b", init="gaussian")
    randomize(model)
    layer = model[0]
    exact = 0.7 * layer.delta_weight("default") - 0.2 * layer.delta_weight("b")
    ranks = lowrank.combine_adapters(model, ["default", "b"], np.array([0.7, -0.2]), "mix", r=np.int64(5))
    assert ranks == {"0": 5}
    torch.testing.assert_close(layer.delta_weight("mix"), exact, rtol=1e-10, atol=1e-12)
    lowrank.combine_adapters(model, ["default", "b"], torch.tensor([0.7, -0.2], dtype=torch.float64), "mix2")
    torch.testing.assert_close(layer.delta_weight("mix2"), exact, rtol=1e-10, atol=1e-12)
    B0, A0 = layer.lora_B["default"].detach(), layer.lora_A["default"].detach()
    B, A = lowrank.combine_lora([(B0, A0)], r=np.int64(2))
    S = torch.linalg.svdvals(B0 @ A0)  # Eckart-Young: the rank-2 error is the norm of the tail
    assert float(torch.linalg.matrix_norm(B @ A - B0 @ A0)) == pytest.approx(float(S[2:].norm()), rel=1e-8)
    assert lowrank.truncate_adapter(model, "mix", np.int64(2)) == {"0": 2}
    assert lowrank.truncate_adapter(model, "mix2", budget=np.int64(48)) == {"0": 2}  # (16 + 8) per rank
    batches = [torch.randn(6, 8, dtype=torch.float64) for _ in range(3)]
    ranks = lowrank.calibrate_lora(small_model().double(), ["0"], batches, r=np.int64(2), init="eva")
    assert ranks == {"0": 2}


@pytest.mark.parametrize(
    "make",
    [
        lambda m: lowrank.inject_lora(m, ["0"], r=2, adapter_name="__base__"),
        lambda m: lowrank.combine_adapters(
            lowrank.inject_lora(m, ["0"], r=2), ["default"], None, lowrank.lora.BASE_ADAPTER
        ),
    ],
    ids=["inject_lora", "combine_adapters"],
)
def test_reserved_base_adapter_name_is_refused(make):
    model = small_model()
    with pytest.raises(ValueError, match="__base__.*reserved"):
        make(model)


def test_load_adapter_refuses_reserved_and_dotted_names():
    model = small_model()
    lowrank.inject_lora(model, ["0"], r=2)
    with tempfile.TemporaryDirectory() as folder:
        lowrank.save_adapter(model, folder)
        for name in ("__base__", "a.b"):
            target = small_model()
            with pytest.raises(ValueError, match="adapter_name"):
                lowrank.load_adapter(target, folder, adapter_name=name)
            assert type(target[0]) is nn.Linear  # unchanged


@pytest.mark.parametrize(
    "call",
    [
        lambda m: lowrank.set_adapter(m, ["default"]),
        lambda m: lowrank.delete_adapter(m, ["default"]),
        lambda m: lowrank.lora_state_dict(m, adapter_name=["default"]),
    ],
    ids=["set_adapter", "delete_adapter", "lora_state_dict"],
)
def test_a_list_of_adapter_names_is_a_type_error_naming_the_argument(call):
    # PEFT's set_adapter takes a list of active adapters; this raised "unhashable type: 'list'"
    model = small_model()
    lowrank.inject_lora(model, ["0"], r=2)
    with pytest.raises(TypeError, match="adapter_name must be one adapter name"):
        call(model)
    assert model[0].active_adapter == "default" and "default" in model[0].r


def test_quantize_base_twice_says_so():
    model = small_model()
    lowrank.inject_lora(model, ["0", "2"], r=2)
    lowrank.quantize_base(model)
    codes = model[0].qweight.clone()
    with pytest.raises(ValueError, match="quantized already"):
        lowrank.quantize_base(model)
    assert torch.equal(model[0].qweight, codes)
