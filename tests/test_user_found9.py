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


def _two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 4))


def _reference(model: nn.Module, x: torch.Tensor, adapters: dict[int, str | None]) -> torch.Tensor:
    """float64 forward of the 3-layer MLP where layer i runs adapter adapters[i] (None: base only)."""
    h = x.double()
    for i in (0, 2, 4):
        layer = model[i]
        base = getattr(layer, "base_layer", layer)
        w = layer.weight.double()
        name = adapters.get(i)
        if name is not None:
            w = w + layer.delta_weight(name).double()
        h = h @ w.T + base.bias.double()
        if i < 4:
            h = torch.tanh(h)
    return h


# huggingface/peft#1574 ("set_adapter() after load_adapter()") and the adapter-switching reports: loading or
# injecting a second adapter into a model that runs "default" made the NEW layers run the new adapter at
# once while the old layers kept "default" -- a mixture of two adapters nobody asked for (PEFT, and
# load_adapter's own docstring: a new adapter is not activated). Now the model keeps running "default"
# until set_adapter switches.
@pytest.mark.parametrize("how", ["inject", "load"])
def test_adding_an_adapter_keeps_the_running_one(how, tmp_path):
    model = _two_layer()
    lowrank.inject_lora(model, ["0"], r=2)
    source = _two_layer()
    lowrank.inject_lora(source, ["0", "2"], r=3, alpha=5)
    _randomize_lora(model)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if how == "inject":
        lowrank.inject_lora(model, ["0", "2"], r=3, alpha=5, adapter_name="x")
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.lora_A["x"].copy_(torch.randn(layer.lora_A["x"].shape, generator=gen) * 0.3)
                layer.lora_B["x"].copy_(torch.randn(layer.lora_B["x"].shape, generator=gen) * 0.3)
    else:
        lowrank.save_adapter(source, tmp_path)
        lowrank.load_adapter(model, tmp_path, adapter_name="x")
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x).double(), _reference(model, x, {0: "default"}), atol=1e-5, rtol=1e-5
        )
        lowrank.set_adapter(model, "x")
        expected_x = _reference(model, x, {0: "x", 2: "x"})
        torch.testing.assert_close(model(x).double(), expected_x, atol=1e-5, rtol=1e-5)
        if how == "load":
            torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=1e-5)
        lowrank.set_adapter(model, "default")
        torch.testing.assert_close(
            model(x).double(), _reference(model, x, {0: "default"}), atol=1e-5, rtol=1e-5
        )


def test_adding_an_adapter_keeps_the_running_modules_to_save_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lowrank.inject_lora(model, ["0"], r=2)
    _randomize_lora(model)
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
        lowrank.inject_lora(model, ["0"], r=2, adapter_name="y", modules_to_save=["2"])
        model[2].modules_to_save["y"].weight.sub_(2.0)  # a trained copy for "y"
        torch.testing.assert_close(model(x), before)  # the model still runs "default" (no copy for it)
        lowrank.set_adapter(model, "y")
        head = model[2].modules_to_save["y"]
        hidden = torch.tanh(x @ (model[0].weight + model[0].delta_weight("y")).T + model[0].bias)
        torch.testing.assert_close(model(x), head(hidden), atol=1e-5, rtol=1e-5)


# huggingface/peft#1105 / #3512 (after deleting the active adapter, layers fell back to different
# adapters): lowrank's delete_adapter let each layer pick its own first remaining adapter, so a model that
# ran "x" ran "default" in one layer and "other" in the next. Now the model runs one replacement.
def test_deleting_the_running_adapter_leaves_one_adapter_running():
    model = _two_layer()
    lowrank.inject_lora(model, ["0"], r=2)
    lowrank.inject_lora(model, ["2"], r=2, adapter_name="other")
    lowrank.inject_lora(model, ["0", "2", "4"], r=2, adapter_name="x")
    _randomize_lora(model)
    lowrank.set_adapter(model, "other")
    lowrank.set_adapter(model, "x")
    lowrank.delete_adapter(model, "x")
    active = [layer.active_adapter for _, layer in lowrank.lora.lora_layers(model)]
    assert active == ["default", None, None]
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x).double(), _reference(model, x, {0: "default"}), atol=1e-5, rtol=1e-5
        )


def _overflowing_fp16_case(rows: int):
    """float16 inputs whose r-wide u = x A^T (128000) exceeds float16's 65504, while the output and every
    gradient are well inside its range (float64 reference)."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.full((rows, 64), 100.0, dtype=torch.float16)
    weight = (torch.randn(24, 64, generator=gen) * 1e-3).half()
    lora_A = torch.full((4, 64), 20.0, dtype=torch.float16)
    lora_B = (torch.rand(24, 4, generator=gen) * 1e-3).half()
    grad = (torch.rand(rows, 24, generator=gen) * 0.01).half()
    return x, weight, lora_A, lora_B, grad


def _f64_grads(x, weight, lora_A, lora_B, grad, scale):
    xd, Ad, Bd = (t.double().requires_grad_() for t in (x, lora_A, lora_B))
    y = xd @ weight.double().T + scale * (xd @ Ad.T) @ Bd.T
    y.backward(grad.double())
    return y.detach(), xd.grad, Ad.grad, Bd.grad


# punica/vLLM-style "LoRA kernel wrong for some shapes/dtypes" reports, float16 side: lora_linear keeps the
# r-wide u in float32 in its forward (documented), but its backward recomputed u in float16: u = 128000
# overflowed and grad_B came back inf / NaN on every step (a loss scaler cannot fix it: u does not depend on
# the loss scale), while the true grad_B is ~1e2.
@pytest.mark.parametrize("rows", [1, 5, 70])
@pytest.mark.parametrize("block", [None, 2])
def test_lora_linear_float16_backward_keeps_u_in_float32(rows, block, monkeypatch):
    if block is not None:  # several row blocks of the float32 products
        monkeypatch.setattr("lowrank._ops._FP16_BACKWARD_ROWS", block)
    x, weight, lora_A, lora_B, grad = _overflowing_fp16_case(rows)
    y_ref, gx_ref, ga_ref, gb_ref = _f64_grads(x, weight, lora_A, lora_B, grad, 0.5)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, lora_A, lora_B))
    y = lowrank.lora_linear(xg, weight, Ag, Bg, 0.5)
    y.backward(grad)
    for got, ref in ((y, y_ref), (xg.grad, gx_ref), (Ag.grad, ga_ref), (Bg.grad, gb_ref)):
        assert torch.isfinite(got).all()
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < 2e-3


# The same overflow in the mixed-adapter op (forward and backward), whose composite C++ path computed the
# per-adapter u in the input dtype: output inf where lora_linear (and the float64 reference) are finite. Now
# float16 on the CPU forms u, g B and their products in float32 (blocks of 2048 rows: 2100 rows take two).
@pytest.mark.parametrize("rows", [5, 2100])
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_lora_linear_multi_float16_keeps_u_in_float32(rows, layout):
    x, weight, A0, B0, grad = _overflowing_fp16_case(rows)
    gen = torch.Generator().manual_seed(1)
    if rows > 5:  # grad_B sums g u^T over rows: signs that cancel keep it inside float16's range
        grad = ((torch.rand(rows, 24, generator=gen) - 0.5) * 0.01).half()
    A1 = (torch.randn(4, 64, generator=gen) * 5).half()
    B1 = (torch.rand(24, 4, generator=gen) * 1e-3).half()
    lora_A, lora_B = torch.stack([A0, A1]), torch.stack([B0, B1])
    if layout == "contiguous":
        ids = torch.cat([torch.zeros(rows - rows // 2), torch.ones(rows // 2)]).long()
    else:
        ids = torch.arange(rows) % 2
    scales = torch.tensor([0.5, 0.25], dtype=torch.float64)
    # float64 reference, per row with its adapter
    xd, Ad, Bd, sd = (t.detach().double().clone().requires_grad_() for t in (x, lora_A, lora_B, scales))
    u = torch.einsum("mi,mri->mr", xd, Ad[ids])
    y_ref = xd @ weight.double().T + sd[ids, None] * torch.einsum("mr,mor->mo", u, Bd[ids])
    y_ref.backward(grad.double())
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, lora_A, lora_B))
    sg = scales.clone().requires_grad_()
    y = lowrank.lora_linear_multi(xg, weight, Ag, Bg, ids, sg)
    y.backward(grad)
    pairs = ((y, y_ref), (xg.grad, xd.grad), (Ag.grad, Ad.grad), (Bg.grad, Bd.grad), (sg.grad, sd.grad))
    for got, ref in pairs:
        assert torch.isfinite(got).all()
        assert float((got.double() - ref.detach()).abs().max() / ref.detach().abs().max()) < 2e-3


# huggingface/peft#1001 / #3710 (safe_merge: a NaN/Inf adapter merged into the base weight destroys it for
# good, unmerge cannot restore it): lowrank merged silently (weight all-NaN/Inf after merge AND unmerge).
# Now a merge whose result is not finite in the weight's dtype raises ValueError and changes nothing, and
# merge_lora / remove_lora(merge=True) are all-or-none across layers.
@pytest.mark.parametrize("kind", ["inf", "fp16_overflow", "dora", "embedding", "int8"])
def test_merge_refuses_a_non_finite_result_and_changes_nothing(kind):
    torch.manual_seed(0)
    dtype = torch.float16 if kind == "fp16_overflow" else torch.float32
    first = nn.Embedding(10, 6) if kind == "embedding" else nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(6, 6), first, nn.Linear(6, 4)).to(dtype)
    if kind == "embedding":
        model = nn.Sequential(first, nn.Linear(6, 6), nn.Linear(6, 4))
    bad = "0" if kind == "embedding" else "1"
    lowrank.inject_lora(model, ["0", "1", "2"], r=2, use_dora=kind == "dora")
    _randomize_lora(model)
    if kind == "int8":
        lowrank.quantize_base(model, "int8")
    layer = model.get_submodule(bad)
    factor_b = layer.lora_embedding_B if kind == "embedding" else layer.lora_B
    with torch.no_grad():
        factor_b["default"][0, 0] = 1e4 if kind == "fp16_overflow" else float("inf")
        if kind == "fp16_overflow":
            layer.lora_A["default"].fill_(10.0)  # delta 2e5 * scale > 65504, finite in float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model]
    message = "NaN or infinite|not finite"
    with pytest.raises(ValueError, match=message):
        layer.merge()
    assert not layer.merged
    with pytest.raises(ValueError, match=message):
        lowrank.merge_lora(model)
    with pytest.raises(ValueError, match=message):
        lowrank.remove_lora(model, merge=True)
    assert [type(m) for m in model] == modules
    assert not any(m.merged for _, m in lowrank.lora.lora_layers(model))
    after = model.state_dict()
    # the layers merged before the bad one were unmerged again: back to the documented round trip (float16:
    # one ulp; int8: merge/unmerge re-quantize, a few codes of the row)
    tol = {"fp16_overflow": 1e-3, "int8": 3.0}.get(kind, 1e-6)
    for key, value in before.items():
        assert "lora_" in key or torch.isfinite(after[key]).all()
        torch.testing.assert_close(after[key].float(), value.float(), atol=tol, rtol=min(tol, 1e-3))


class _FixedMaskDropout(nn.Dropout):
    """A dropout whose mask is fixed (every other input feature), so a float64 reference can replay it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(x.shape[-1]) % 2 == 0).to(x.dtype) / (1 - self.p)
        return x * mask


# The same float16 overflow in the layers' training path with dropout (the adapter's term computed apart
# from the base product, as PEFT does): u = dropout(x) A^T overflowed float16 and the output was inf.
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_layer_float16_dropout_path_keeps_u_in_float32(use_dora):
    x, weight, lora_A, lora_B, grad = _overflowing_fp16_case(6)
    layer = lowrank.LoRALinear(64, 24, 4, alpha=2.0, dropout=0.5, use_dora=use_dora, dtype=torch.float16)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
        layer.lora_A["default"].copy_(lora_A)
        layer.lora_B["default"].copy_(lora_B)
    layer.lora_dropout["default"] = _FixedMaskDropout(0.5)
    layer.train()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(grad)
    # float64 reference
    xd = x.double().requires_grad_()
    Ad, Bd = lora_A.double().requires_grad_(), lora_B.double().requires_grad_()
    Wd, s = weight.double(), 0.5
    dropped = _FixedMaskDropout(0.5)(xd)
    if use_dora:
        V = Wd + s * Bd @ Ad
        factor = layer.lora_magnitude_vector["default"].double() / V.norm(dim=1).detach()
        ref = xd @ Wd.T + factor * (dropped @ Wd.T + s * (dropped @ Ad.T) @ Bd.T) - dropped @ Wd.T
    else:
        ref = xd @ Wd.T + s * (dropped @ Ad.T) @ Bd.T
    ref.backward(grad.double())
    for got, want in ((y, ref), (xg.grad, xd.grad), (layer.lora_A["default"].grad, Ad.grad)):
        assert torch.isfinite(got).all()
        assert float((got.double() - want.detach()).abs().max() / want.detach().abs().max()) < 5e-3
    got_b = layer.lora_B["default"].grad
    assert torch.isfinite(got_b).all()
    assert float((got_b.double() - Bd.grad).abs().max() / Bd.grad.abs().max()) < 5e-3
