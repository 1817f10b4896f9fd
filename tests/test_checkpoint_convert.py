"""save_adapter(convert_to_lora_from=...): PiSSA / OLoRA / CorDA adapters (which rewrite the base weights)
saved as plain LoRA adapters for the ORIGINAL weights, as PEFT's path_initial_model_for_weight_conversion;
the ResidualBaseWarning when such an adapter is saved without conversion."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank.lora.checkpoint import ResidualBaseWarning

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10)).eval()


def train_step(model, seed=1, std=0.05):
    """A training step's worth of change to every adapter tensor (factors and DoRA magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(std * torch.randn(p.shape, generator=g).to(p.dtype) * p.abs().mean().clamp_min(0.1))


def save_initial(model, path, **kwargs):
    with pytest.warns(ResidualBaseWarning, match="convert_to_lora_from"):
        lowrank.save_adapter(model, path, **kwargs)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_converted_adapter_loads_on_the_original_base_in_peft(tmp_path, init, use_rslora):
    base = mlp()
    model = lowrank.inject_lora(
        copy.deepcopy(base), ["0", "2"], r=3, alpha=6, init=init, use_rslora=use_rslora
    )
    lowrank.inject_lora(model, ["4"], r=2, alpha=5, init=init, use_rslora=use_rslora)  # rank/alpha patterns
    x = torch.randn(7, 24)
    assert rel(model(x), base(x)) < 1e-5  # the init leaves the output alone ...
    assert rel(model[0].weight, base[0].weight) > 1e-2  # ... by rewriting the base weights
    save_initial(model, tmp_path / "init")
    train_step(model)
    tuned = model(x)
    assert rel(tuned, base(x)) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ResidualBaseWarning with the conversion
        lowrank.save_adapter(model, tmp_path / "lora", convert_to_lora_from=tmp_path / "init")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["use_rslora"] is use_rslora
    assert config["r"] == 6 and config["rank_pattern"] == {"4": 4}  # 2r per layer
    grow = math.sqrt(2) if use_rslora else 2  # PEFT's rule: the scaling s stays the same
    assert config["lora_alpha"] == pytest.approx(6 * grow) and config["alpha_pattern"]["4"] == pytest.approx(
        5 * grow
    )
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert rel(theirs(x), tuned) <= 1e-5
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "lora")
    assert rel(ours(x), tuned) <= 1e-5
    # the same from a mapping: lowrank.lora_state_dict taken right after the init
    again = lowrank.inject_lora(
        copy.deepcopy(base), ["0", "2"], r=3, alpha=6, init=init, use_rslora=use_rslora
    )
    lowrank.inject_lora(again, ["4"], r=2, alpha=5, init=init, use_rslora=use_rslora)
    snapshot = {k: v.clone() for k, v in lowrank.lora_state_dict(again).items()}
    train_step(again)
    lowrank.save_adapter(again, tmp_path / "lora2", convert_to_lora_from=snapshot)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora2").eval()
    assert rel(theirs(x), again(x)) <= 1e-5


def test_same_file_as_peft_conversion(tmp_path):
    """PEFT's own PiSSA conversion and lowrank's give the same keys, tensors and config numbers."""
    base = mlp()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights="pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), config)
        theirs.save_pretrained(tmp_path / "peft_init")
    initial = {n: p.detach().clone() for n, p in theirs.named_parameters() if "lora_" in n}
    train_step(theirs)
    # the same adapter in lowrank: PEFT's initial factors and residual, then the same trained factors
    ours = lowrank.inject_lora(copy.deepcopy(base), ["0", "2"], r=3, alpha=6, init="pissa")
    snapshot = {}
    with torch.no_grad():
        for i in (0, 2):
            layer, p = ours[i], theirs.base_model.model[i]
            layer.weight.copy_(p.base_layer.weight)
            for f in ("lora_A", "lora_B"):
                snapshot[f"{i}.{f}.default"] = initial[f"base_model.model.{i}.{f}.default.weight"]
                getattr(layer, f)["default"].copy_(getattr(p, f)["default"].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(
            tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init")
        )
    lowrank.save_adapter(ours, tmp_path / "ours", convert_to_lora_from=snapshot)
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (ca["r"], ca["lora_alpha"], ca["init_lora_weights"]) == (
        cb["r"],
        cb["lora_alpha"],
        cb["init_lora_weights"],
    )


def test_gpt2_conv1d_pissa_and_dora_conversion(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    for use_dora in (False, True):
        model = lowrank.inject_lora(
            copy.deepcopy(base), ["c_attn", "c_fc"], r=4, alpha=8, init="pissa", use_dora=use_dora
        )
        folder = tmp_path / f"init{use_dora}"
        save_initial(model, folder)
        train_step(model, seed=2)
        tuned = model(ids).logits
        out = tmp_path / f"lora{use_dora}"
        lowrank.save_adapter(model, out, convert_to_lora_from=folder)
        saved = json.loads((out / "adapter_config.json").read_text())
        assert saved["fan_in_fan_out"] is True and saved["use_dora"] is use_dora and saved["r"] == 8
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        assert (
            rel(theirs(input_ids=ids).logits, tuned) <= 1e-5
        )  # DoRA: W + s B'A' = W_res + s B A, same norms
        assert rel(lowrank.load_adapter(copy.deepcopy(base), out)(ids).logits, tuned) <= 1e-5


def test_conversion_keeps_modules_to_save(tmp_path):
    base = mlp()
    model = lowrank.inject_lora(
        copy.deepcopy(base), ["0", "2"], r=2, alpha=4, init="pissa", modules_to_save=["4"]
    )
    snapshot = {k: v.clone() for k, v in lowrank.lora_state_dict(model).items()}
    train_step(model)
    with torch.no_grad():
        model[4].modules_to_save["default"].weight.mul_(1.5)  # the trained copy of the head
    x = torch.randn(5, 24)
    tuned = model(x)
    lowrank.save_adapter(model, tmp_path, convert_to_lora_from=snapshot)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["4"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel(theirs(x), tuned) <= 1e-5
    assert rel(lowrank.load_adapter(copy.deepcopy(base), tmp_path)(x), tuned) <= 1e-5


def test_corda_conversion_with_another_adapter_present(tmp_path):
    base = mlp()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(20, 24, generator=g) for _ in range(3)]
    lowrank.calibrate_lora(model, ["0", "2"], batches, r=3, alpha=6, init="corda")
    lowrank.inject_lora(model, ["0"], r=2, adapter_name="other")  # not part of the conversion
    snapshot = {k: v.clone() for k, v in lowrank.lora_state_dict(model).items()}
    with pytest.warns(ResidualBaseWarning, match="corda"):
        lowrank.save_adapter(model, tmp_path / "plain")
    train_step(model)
    x = batches[0]
    tuned = model(x)
    lowrank.save_adapter(model, tmp_path / "lora", convert_to_lora_from=snapshot)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert rel(theirs(x), tuned) <= 1e-5


def test_warning_follows_the_adapter(tmp_path):
    model = lowrank.inject_lora(mlp(), ["0"], r=2, init="olora", adapter_name="o")
    lowrank.inject_lora(model, ["0"], r=2, adapter_name="plain")
    assert model[0].weight_init == {"o": "olora"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.save_adapter(model, tmp_path / "a", adapter_name="plain")
    with pytest.warns(ResidualBaseWarning, match="'olora'"):
        lowrank.save_adapter(model, tmp_path / "b", adapter_name="o")
    lowrank.delete_adapter(model, "o")
    assert model[0].weight_init == {}


def test_bad_initial_adapters_are_refused_and_nothing_is_written(tmp_path):
    base = mlp()
    model = lowrank.inject_lora(copy.deepcopy(base), ["0", "2"], r=3, init="pissa")
    other = lowrank.inject_lora(copy.deepcopy(base), ["0", "2"], r=2, init="pissa")
    only_first = lowrank.inject_lora(copy.deepcopy(base), ["0"], r=3, init="pissa")
    more = lowrank.inject_lora(copy.deepcopy(base), ["0", "2", "4"], r=3, init="pissa")
    out = tmp_path / "out"
    cases = [
        (lowrank.lora_state_dict(other), ValueError, r"'0.lora_A.default' has shape \(2, 24\)"),
        (lowrank.lora_state_dict(only_first), ValueError, "no initial factor for layer '2'"),
        (lowrank.lora_state_dict(more), ValueError, "'4.lora_A.default' is a LoRA factor of a layer"),
        ([1, 2], TypeError, "convert_to_lora_from must be"),
        ({"0.lora_A.default": 3}, TypeError, "not a str key with a Tensor"),
        (tmp_path / "missing", ValueError, "not a folder"),
    ]
    for source, error, match in cases:
        with pytest.raises(error, match=match):
            lowrank.save_adapter(model, out, convert_to_lora_from=source)
        assert not out.exists()
    bad = {k: v.clone() for k, v in lowrank.lora_state_dict(model).items()}
    bad["2.lora_B.default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lowrank.save_adapter(model, out, convert_to_lora_from=bad)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# loading PEFT's unconverted PiSSA / OLoRA adapters: PEFT re-runs the init on the base when it loads them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_unconverted_adapter_loads_on_the_original_base_as_in_peft(tmp_path, init):
    base = mlp()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    train_step(theirs)
    x = torch.randn(6, 24)
    expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel(reloaded(x), expected) < 1e-6  # PEFT itself: the init is re-run on the original base
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(ours(x), expected) <= 1e-5
    assert ours[0].weight_init == {"default": init}
    assert rel(ours[0].weight, theirs.base_model.model[0].base_layer.weight) < 1e-5  # the same residual
    # an adapter that already exists is only overwritten (no second rewrite), as in PEFT
    lowrank.load_adapter(ours, tmp_path, inject=False)
    assert rel(ours(x), expected) <= 1e-5
    # saved again with its config (init_lora_weights: pissa/olora), it still loads on the original base
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.save_adapter(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["init_lora_weights"] == init
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    assert rel(again(x), expected) <= 1e-5
    # but a lowrank-made PiSSA/OLoRA adapter (config init_lora_weights: true) warns
    made = lowrank.inject_lora(copy.deepcopy(base), ["0"], r=2, init=init)
    with pytest.warns(ResidualBaseWarning, match=init):
        lowrank.save_adapter(made, tmp_path / "made")


def test_peft_unconverted_pissa_on_gpt2_and_the_inits_that_cannot_be_reproduced(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), lora).eval()
    train_step(theirs)
    expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path / "pissa")
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "pissa")
    assert rel(ours(ids).logits, expected) <= 1e-5
    # randomized PiSSA: re-derived with the exact SVD, with a warning
    text = (tmp_path / "pissa" / "adapter_config.json").read_text()
    for init, error in (("pissa_niter_4", None), ("corda", "calibration data"), ("loftq", "LoftQ")):
        folder = tmp_path / init
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(
            (tmp_path / "pissa" / "adapter_model.safetensors").read_bytes()
        )
        (folder / "adapter_config.json").write_text(text.replace('"pissa"', f'"{init}"'))
        if error is None:
            with pytest.warns(ResidualBaseWarning, match="randomized"):
                model = lowrank.load_adapter(copy.deepcopy(base), folder)
            assert rel(model(ids).logits, expected) <= 1e-5  # exact here: PEFT's init used the exact SVD
            continue
        model = copy.deepcopy(base)
        with pytest.raises(lowrank.lora.peft_format.AdapterCheckpointError, match=error):
            lowrank.load_adapter(model, folder)
        assert type(model.transformer.h[0].attn.c_attn) is transformers.pytorch_utils.Conv1D  # unchanged
        with pytest.warns(ResidualBaseWarning, match="loaded as is"):
            lowrank.load_adapter(model, folder, strict=False)


def test_peft_pissa_adapter_is_refused_on_a_quantized_base(tmp_path):
    base = mlp()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights="pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    model = lowrank.quantize_base(lowrank.inject_lora(copy.deepcopy(base), ["0"], r=2, adapter_name="q"))
    codes = model[0].state_dict()
    with pytest.raises(lowrank.lora.peft_format.AdapterCheckpointError, match="quantize_base"):
        lowrank.load_adapter(model, tmp_path)
    assert set(model[0].r) == {"q"}
    assert all(torch.equal(v, model[0].state_dict()[k]) for k, v in codes.items())
