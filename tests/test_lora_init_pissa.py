"""PiSSA's accuracy-checked randomized SVD and inject_lora's batched PiSSA (issue 18, item 4 targets).

References: float64 exact singular values (NumPy), and the exactness contract W = residual + s B A.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

import lowrank.lora.init as init_module
from lowrank.lora import LoRALinear, LoRAMergedLinear, inject_lora, pissa_factors
from lowrank.lora.init import PISSA_TOL, checked_top_triplets, pissa_triplets, same_shape_groups

svd_module = importlib.import_module("lowrank.svd")  # the package face shadows the module name


def _flat(m: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A randomly initialised weight: flat Marchenko-Pastur bulk, the hardest case for randomized SVD."""
    return 0.02 * torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, 24, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, 24, generator=g))[0]
    s = 3.0 * torch.arange(1, 25, dtype=torch.float32) ** -0.5
    return 0.02 * torch.randn(m, n, generator=g) + (U * s) @ V.T


def _top_sv_error(B: torch.Tensor, A: torch.Tensor, scale: float, W: torch.Tensor) -> float:
    r = A.shape[0]
    exact = np.linalg.svd(W.detach().double().numpy(), compute_uv=False)[:r]
    got = np.linalg.svd(scale * (B.detach().double() @ A.detach().double()).numpy(), compute_uv=False)[:r]
    return float(np.max(np.abs(got - exact) / exact))


def _exactness(W0: torch.Tensor, residual: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float):
    back = residual.detach().double() + scale * (B.detach().double() @ A.detach().double())
    return float((back - W0.double()).norm() / W0.double().norm())


class _KrylovCalls:
    """Wraps lowrank.svd.krylov_until (PiSSA's engine), recording the batch size of each call."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[int] = []
        original = svd_module.krylov_until

        def wrapped(A, k, **kw):
            self.calls.append(A.shape[0] if A.dim() == 3 else 1)
            return original(A, k, **kw)

        monkeypatch.setattr(svd_module, "krylov_until", wrapped)


def test_default_meets_tol_on_the_flat_bulk_where_a_fixed_budget_does_not():
    W = _flat(300, 200, seed=0)
    B, A, residual = pissa_factors(W, 8, 2.0)
    assert _top_sv_error(B, A, 2.0, W) <= PISSA_TOL
    assert _exactness(W, residual, B, A, 2.0) < 1e-6
    # the case is hard: the engine's default budget (and PEFT-like short runs) miss the tolerance
    B, A, _ = pissa_factors(W, 8, 2.0, n_iter=2)
    assert _top_sv_error(B, A, 2.0, W) > 10 * PISSA_TOL


def test_checks_stop_early_on_a_decaying_spectrum_and_go_on_for_a_flat_one(monkeypatch):
    calls = _KrylovCalls(monkeypatch)
    finished = []
    original = svd_module._ritz_from_left

    def recorded(op, left, flags):  # which matrices of the batch were accepted at that check
        finished.append([int(torch.equal(op.A[j], stack[1].mT)) for j in range(op.A.shape[0])])
        return original(op, left, flags)

    monkeypatch.setattr(svd_module, "_ritz_from_left", recorded)
    stack = torch.stack([_decaying(240, 160, seed=1), _flat(240, 160, seed=2)])
    U, S, Vh = checked_top_triplets(stack, 8)
    # one extended Krylov run for both; the decaying one is accepted first, the flat one deeper
    assert calls.calls == [2]
    assert finished == [[0], [1]]
    for i in range(2):
        exact = np.linalg.svd(stack[i].double().numpy(), compute_uv=False)[:8]
        assert np.max(np.abs(S[i].double().numpy() - exact) / exact) <= PISSA_TOL
        # orthonormal triplets that reproduce W V = U S and W^T U = V S
        np.testing.assert_allclose((U[i].T @ U[i]).numpy(), np.eye(8), atol=1e-5)
        np.testing.assert_allclose((stack[i] @ Vh[i].T).numpy(), (U[i] * S[i]).numpy(), atol=2e-3 * S[i, 0])
        np.testing.assert_allclose((stack[i].T @ U[i]).numpy(), (Vh[i].T * S[i]).numpy(), atol=2e-3 * S[i, 0])


def test_tolerance_out_of_reach_falls_back_to_the_exact_svd(monkeypatch):
    W = _flat(120, 90, seed=3, dtype=torch.float64)
    U, S, Vh = checked_top_triplets(W, 5, tol=1e-30)  # no Ritz residual gets this small
    exact = np.linalg.svd(W.numpy(), compute_uv=False)[:5]
    np.testing.assert_allclose(S.numpy(), exact, rtol=1e-12)
    np.testing.assert_allclose((U.T @ W @ Vh.T).abs().numpy(), np.diag(exact), atol=1e-12)


@pytest.mark.parametrize("tol", [0, 1, -1e-3, float("nan"), "1e-4", True])
def test_bad_tol_is_refused(tol):
    with pytest.raises(ValueError, match="tol must be"):
        pissa_factors(_flat(10, 8, 0), 2, 1.0, tol=tol)


def test_same_shape_groups_close_at_either_cap_and_stream():
    items = [("a", 10), ("b", 10), ("a", 10), ("a", 10), ("b", 10), ("a", 10), ("c", 50)]
    seen = []

    def stream():
        for item in items:
            seen.append(item)
            yield item

    groups = same_shape_groups(stream(), key=lambda x: x[0], size=lambda x: x[1], max_items=3, max_bytes=25)
    first = next(groups)
    assert [x[0] for x in first] == ["a", "a", "a"] and len(seen) == 4  # yielded as soon as it is full
    assert [[x[0] for x in g] for g in groups] == [["c"], ["b", "b"], ["a"]]
    groups = same_shape_groups(items, key=lambda x: x[0], size=lambda x: x[1], max_items=2, max_bytes=1000)
    assert [[x[0] for x in g] for g in groups] == [["a", "a"], ["b", "b"], ["a", "a"], ["c"]]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.q = nn.Linear(48, 48, bias=False)
        self.k = nn.Linear(48, 48)
        self.v = nn.Linear(48, 48, bias=False)
        self.up = nn.Linear(48, 96)
        self.down = nn.Linear(96, 48)
        self.qkv = nn.Linear(48, 96, bias=False)  # a fused projection: two 48x48 slices
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.up, self.down, self.qkv):
                lin.weight.copy_(0.02 * torch.randn(lin.weight.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) + self.k(x) + self.v(x) + self.qkv(x)[..., :48] + self.qkv(x)[..., 48:]
        return self.down(torch.tanh(self.up(h)))


def test_inject_pissa_factors_same_shape_weights_in_one_call_and_keeps_the_contract(monkeypatch):
    model = _Net()
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(6))
    before = model(x).detach()
    calls = _KrylovCalls(monkeypatch)
    inject_lora(
        model, ["q", "k", "v", "up", "down"], r=4, alpha=8, init="pissa", merged_modules={"qkv": [True, True]}
    )
    # one call for the five 48x48 matrices (q, k, v and the two qkv slices), one per other shape
    assert sorted(calls.calls) == [1, 1, 5]
    assert not hasattr(init_module, "_PRECOMPUTED")  # no module-level state: triplets are arguments
    scale = 2.0
    for name in ("q", "k", "v", "up", "down"):
        layer = getattr(model, name)
        B, A, W0 = layer.lora_B["default"], layer.lora_A["default"], originals[f"{name}.weight"]
        assert _exactness(W0, layer.weight, B, A, scale) < 1e-6
        assert _top_sv_error(B, A, scale, W0) <= PISSA_TOL
    fused = model.qkv
    for i in range(2):
        B = fused.lora_B["default"][48 * i : 48 * (i + 1)]
        A = fused.lora_A["default"][4 * i : 4 * (i + 1)]
        W0 = originals["qkv.weight"][48 * i : 48 * (i + 1)]
        assert _exactness(W0, fused.weight[48 * i : 48 * (i + 1)], B, A, scale) < 1e-6
        assert _top_sv_error(B, A, scale, W0) <= PISSA_TOL
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-6)


def test_inject_pissa_on_tied_weights_is_refused():
    # Factoring the shared weight twice kept W0 = residual + B1A1 + B2A2, but each layer then computed
    # W0 - (the other's BA): the model's output moved by 64% (relative) at step 0. Refused now (see
    # tests/test_user_found9.py); nothing is changed.
    shared = nn.Linear(40, 40, bias=False)
    with torch.no_grad():
        shared.weight.copy_(_flat(40, 40, seed=7))
    model = nn.Sequential(shared, nn.Linear(40, 40, bias=False))
    model[1].weight = shared.weight  # tied
    W0 = shared.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        inject_lora(model, ["0", "1"], r=3, alpha=3, init="pissa")
    assert torch.equal(shared.weight, W0) and isinstance(model[0], nn.Linear)


def test_inject_pissa_groups_by_dtype_and_keeps_bf16_layers_exact_to_their_rounding(monkeypatch):
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(_flat(32, 32, seed=8))
        model[1].weight.copy_(_flat(32, 32, seed=9))
    model[1].to(torch.bfloat16)
    W0 = [m.weight.detach().clone() for m in model]
    calls = _KrylovCalls(monkeypatch)
    inject_lora(model, ["0", "1"], r=2, alpha=2, init="pissa")
    assert calls.calls == [1, 1]  # fp32 and bf16: two groups
    layer = model[1]
    assert layer.weight.dtype == layer.lora_A["default"].dtype == torch.bfloat16
    B, A = layer.lora_B["default"].detach(), layer.lora_A["default"].detach()
    back = layer.weight.double() + B.double() @ A.double()
    # residual and factors are each rounded to bf16 once (the SVD itself runs in float32)
    assert float((back - W0[1].double()).abs().max()) <= 2**-7 * float(W0[1].abs().max())


def test_inject_and_per_layer_pissa_agree_on_the_adapter_subspace():
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(3)])
    for i, lin in enumerate(model):
        with torch.no_grad():
            lin.weight.copy_(_decaying(64, 64, seed=10 + i))
    references = []
    for lin in model:
        ref = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            ref.weight.copy_(lin.weight)
        references.append(LoRALinear.from_linear(ref, 4, alpha=4, init="pissa"))
    inject_lora(model, r"\d", r=4, alpha=4, init="pissa")
    for layer, ref in zip(model, references):
        delta = (layer.lora_B["default"] @ layer.lora_A["default"]).detach().double()
        delta_ref = (ref.lora_B["default"] @ ref.lora_A["default"]).detach().double()
        assert float((delta - delta_ref).norm() / delta_ref.norm()) < 1e-4


def test_inject_pissa_batches_conv1d_and_embedding_views(monkeypatch):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.ModuleDict(
        {"c1": Conv1D(nf=24, nx=40), "c2": Conv1D(nf=24, nx=40), "emb": nn.Embedding(30, 20)}
    )
    with torch.no_grad():
        for i, p in enumerate((model["c1"].weight, model["c2"].weight, model["emb"].weight)):
            p.copy_(_flat(*p.shape, seed=20 + i))
    W0 = {k: m.weight.detach().clone() for k, m in model.items()}
    calls = _KrylovCalls(monkeypatch)
    inject_lora(model, ["c1", "c2", "emb"], r=3, alpha=6, init="pissa")
    # the two Conv1D weights (stored (in, out)) are factored as their (out, in) views, in one call
    assert sorted(calls.calls) == [1, 2]
    for key in ("c1", "c2"):
        layer = model[key]
        B, A = layer.lora_B["default"], layer.lora_A["default"]
        assert _exactness(W0[key].T, layer.weight.T, B, A, 2.0) < 1e-6
        assert _top_sv_error(B, A, 2.0, W0[key].T) <= PISSA_TOL
    emb = model["emb"]  # the table's update is scale (B A)^T
    B, A = emb.lora_embedding_B["default"], emb.lora_embedding_A["default"]
    assert _exactness(W0["emb"].T, emb.weight.T, B, A, 2.0) < 1e-6
    assert _top_sv_error(B, A, 2.0, W0["emb"].T) <= PISSA_TOL


@pytest.mark.parametrize("r", [True, 0, 9, 2.0])
def test_inject_pissa_bad_rank_is_refused_and_changes_nothing(r):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    W0 = [m.weight.detach().clone() for m in model]
    with pytest.raises(ValueError, match="r must be an int"):
        inject_lora(model, ["0", "1"], r=r, init="pissa")
    assert all(type(m) is nn.Linear for m in model)
    assert all(torch.equal(m.weight, w) for m, w in zip(model, W0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact_also_when_the_sum_overflows(dtype):
    from lowrank.lora.init import all_finite

    big = torch.full((64, 64), torch.finfo(dtype).max / 2, dtype=dtype)  # finite; its sum overflows
    assert all_finite(big) and all_finite(-big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = big.clone()
        broken[3, 5] = bad
        assert not all_finite(broken)
        with pytest.raises(ValueError, match="weight contains NaN or Inf"):
            pissa_factors(broken, 2, 1.0)
    assert all_finite(torch.zeros(0, 3, dtype=dtype))


def test_pissa_factors_with_triplets_computed_ahead_equals_computing_them():
    W = _decaying(60, 40, seed=30)
    alone = pissa_factors(W, 5, 2.0)
    (triplets,) = pissa_triplets([W], 5)
    given = pissa_factors(W, 5, 2.0, triplets=triplets)
    for a, b in zip(alone, given):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the triplets are used as given: those of another weight give that weight's adapter
    other = pissa_triplets([_flat(60, 40, seed=31)], 5)[0]
    B, A, residual = pissa_factors(W, 5, 2.0, triplets=other)
    torch.testing.assert_close(2.0 * B @ A, other[0] * other[1] @ other[2], rtol=1e-5, atol=1e-6)
    assert _exactness(W, residual, B, A, 2.0) < 1e-6


@pytest.mark.parametrize(
    "triplets, error, match",
    [
        ("usv", TypeError, "triplets must be a"),
        ((torch.zeros(60, 5), torch.zeros(5)), TypeError, "triplets must be a"),
        ((torch.zeros(60, 5), [0.0] * 5, torch.zeros(5, 40)), TypeError, "S must be a tensor"),
        ((torch.zeros(60, 4), torch.zeros(5), torch.zeros(5, 40)), ValueError, r"U has shape \(60, 4\)"),
        ((torch.zeros(60, 5), torch.zeros(5), torch.zeros(5, 41)), ValueError, r"Vh has shape"),
    ],
)
def test_bad_triplets_are_refused(triplets, error, match):
    with pytest.raises(error, match=match):
        pissa_factors(_flat(60, 40, seed=0), 5, 1.0, triplets=triplets)


def test_pissa_triplets_skips_what_cannot_be_computed_ahead():
    base = _flat(40, 40, seed=32)
    other = _flat(40, 40, seed=33)
    tied = base.view(40, 40)  # same storage as base
    half = base[20:]  # overlaps base
    small = _flat(3, 40, seed=34)  # below r
    meta = torch.empty(40, 40, device="meta")
    out = pissa_triplets([base, other, tied, half, small, meta, other.T], 4)
    assert [entry is None for entry in out] == [False, False, True, True, True, True, True]
    for W, entry in ((base, out[0]), (other, out[1])):
        exact = np.linalg.svd(W.double().numpy(), compute_uv=False)[:4]
        np.testing.assert_allclose(entry[1].double().numpy(), exact, rtol=PISSA_TOL)


def test_layers_take_the_triplets_explicitly_and_check_them():
    g = torch.Generator().manual_seed(35)
    fused = nn.Linear(24, 48, bias=False)
    with torch.no_grad():
        fused.weight.copy_(0.02 * torch.randn(48, 24, generator=g))
    W0 = fused.weight.detach().clone()
    triplets = pissa_triplets([W0[:24], W0[24:]], 3)
    reference = nn.Linear(24, 48, bias=False)
    with torch.no_grad():
        reference.weight.copy_(W0)
    expected = LoRAMergedLinear.from_linear(reference, 3, enable_lora=[True, True], init="pissa")
    layer = LoRAMergedLinear.from_linear(
        fused, 3, enable_lora=[True, True], init="pissa", pissa_triplets=triplets
    )
    torch.testing.assert_close(layer.weight, expected.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_A["default"], expected.lora_A["default"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pissa_triplets has 1 entries; the layer factors 2"):
        layer.add_adapter("second", 3, init="pissa", pissa_triplets=triplets[:1])
    with pytest.raises(ValueError, match="pissa_triplets must be a list"):
        layer.add_adapter("third", 3, init="default", pissa_triplets=triplets)
    assert list(layer.r) == ["default"]
