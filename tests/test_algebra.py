"""Adapter arithmetic (lowrank.lora.algebra): exact sums, optimal truncation, model level, PEFT round trip."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank.lora.algebra import factored_svd
from lowrank.lora.peft_format import CONFIG_NAME


def _factors(out=40, n_in=30, ranks=(3, 5, 4), seed=0, dtype=torch.float32, batch=()):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i, r in enumerate(ranks):
        B = torch.randn(*batch, out, r, generator=gen, dtype=torch.float64)
        A = torch.randn(*batch, r, n_in, generator=gen, dtype=torch.float64)
        items.append((B.to(dtype), A.to(dtype), 0.5 + i))
    return items


def _dense(items, weights):
    return sum(w * s * B.double() @ A.double() for (B, A, s), w in zip(items, weights))


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


# ---------------------------------------------------------------------------------------- factor level


def test_exact_combination_equals_weighted_sum():
    items, weights = _factors(), [0.7, -1.3, 0.25]
    B, A = lowrank.combine_lora(items, weights)
    assert B.shape == (40, 12) and A.shape == (12, 30) and B.dtype == torch.float32
    assert _rel(B @ A, _dense(items, weights)) <= 1e-6


def test_truncation_is_the_eckart_young_optimum():
    items, weights = _factors(out=60, n_in=50, ranks=(8, 8, 8, 8)), [1.0, 0.5, -0.8, 2.0]
    dense = _dense(items, weights)
    U, S, Vh = torch.linalg.svd(dense)
    for r in (1, 7, 20):
        res = lowrank.combine_lora(items, weights, r=r)
        B, A = res
        assert B.shape == (60, r) and A.shape == (r, 50)
        optimum = float(S[r:].norm())
        error = float((B.double() @ A.double() - dense).norm())
        assert error <= optimum * (1 + 1e-5)
        # balanced: B^T B = A A^T = diag(S_r), the top singular values of the dense sum
        torch.testing.assert_close(B.double().T @ B.double(), torch.diag(S[:r]), rtol=1e-5, atol=1e-4 * S[0])
        torch.testing.assert_close(A.double() @ A.double().T, torch.diag(S[:r]), rtol=1e-5, atol=1e-4 * S[0])
        assert res.energy == pytest.approx(float(S[:r].square().sum() / S.square().sum()), rel=1e-5)


def test_full_rank_svd_form_is_exact_and_capped():
    items = _factors(out=10, n_in=30, ranks=(6, 7))  # sum of ranks 13 > min(out, in) = 10
    B, A = lowrank.combine_lora(items, method="svd")
    assert B.shape == (10, 10)
    assert _rel(B @ A, _dense(items, [1, 1])) <= 1e-6
    B, A = lowrank.combine_lora(items, r=50)  # r above what the sum can have: capped, still exact
    assert B.shape == (10, 10)


def test_tol_picks_the_smallest_sufficient_rank():
    items, weights = _factors(out=50, n_in=45, ranks=(10, 10)), [1.0, 0.3]
    dense = _dense(items, weights)
    S = torch.linalg.svdvals(dense)
    tails = [float(S[k:].norm() / S.norm()) for k in range(S.shape[0] + 1)]
    for tol in (0.05, 0.3, 0.6):
        B, A = lowrank.combine_lora(items, weights, tol=tol)
        k = B.shape[1]
        assert tails[k] <= tol and (k == 1 or tails[k - 1] > tol)
        assert _rel(B @ A, dense) <= tol * (1 + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_computed_wide_and_returned_as_given(dtype):
    items, weights = _factors(dtype=dtype), [1.0, -0.5, 0.5]
    dense = _dense(items, weights)
    B, A = lowrank.combine_lora(items, weights, r=12)
    assert B.dtype == dtype and A.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else (4e-3 if dtype == torch.float16 else 3e-2)
    assert _rel(B.double() @ A.double(), dense) <= tol


def test_batched_equals_one_by_one():
    items, weights = _factors(batch=(3,)), [1.0, 2.0, -1.0]
    B, A = lowrank.combine_lora(items, weights, r=5)
    assert B.shape == (3, 40, 5) and A.shape == (3, 5, 30)
    for b in range(3):
        Bb, Ab = lowrank.combine_lora([(x[b], y[b], s) for x, y, s in items], weights, r=5)
        torch.testing.assert_close(B[b], Bb, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(A[b], Ab, rtol=1e-4, atol=1e-4)


def test_signs_and_order_are_deterministic():
    items, weights = _factors(), [1.0, 0.5, 0.25]
    B1, A1 = lowrank.combine_lora(items, weights, r=6)
    B2, A2 = lowrank.combine_lora(items[::-1], weights[::-1], r=6)  # same sum, other stacking order
    torch.testing.assert_close(B1, B2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(A1, A2, rtol=1e-4, atol=1e-4)
    pivot = B1.gather(0, B1.abs().argmax(0, keepdim=True))
    assert bool((pivot > 0).all())
    norms = B1.norm(dim=0)
    assert bool((norms[:-1] >= norms[1:]).all())  # descending singular values


def test_rank_deficient_stacks_duplicates_and_cancellation():
    (B, A, s), _, _ = _factors(ranks=(5, 1, 1))
    # the same adapter twice: the stack has rank 5, not 10; tol finds it and the sum is exact
    Bc, Ac = lowrank.combine_lora([(B, A, s), (B, A, s)], [0.25, 0.75], tol=1e-5)
    assert Bc.shape[1] == 5
    assert _rel(Bc @ Ac, s * B.double() @ A.double()) <= 1e-5
    # an adapter minus itself: zero, with finite factors
    Bz, Az = lowrank.combine_lora([(B, A, s), (B, A, s)], [1.0, -1.0], r=3)
    assert bool(torch.isfinite(Bz).all()) and float((Bz @ Az).norm()) <= 1e-5 * float((B @ A).norm())


def test_factored_svd_matches_dense_svd():
    gen = torch.Generator().manual_seed(4)
    B, A = torch.randn(70, 9, generator=gen, dtype=torch.float64), torch.randn(9, 20, generator=gen).double()
    U, S, Vh = factored_svd(B, A)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[:9])
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, B @ A)
    torch.testing.assert_close(U.T @ U, torch.eye(9, dtype=torch.float64))


def test_bad_input_names_the_argument():
    B, A = torch.randn(8, 2), torch.randn(2, 6)
    cases = [
        (([],), {}, "factors is empty"),
        (([(B, torch.randn(3, 6))],), {}, r"factors\[0\]"),
        (([(B, A), (torch.randn(9, 2), A)],), {}, r"factors\[1\]"),
        (([(B, A), (B, A)], [1.0, float("nan")]), {}, r"weights\[1\]"),
        (([(B, A)], [1.0, 2.0]), {}, "weights has 2 entries"),
        (([(B, A, float("inf"))],), {}, r"factors\[0\] scale"),
        (([(B * float("nan"), A)],), {}, r"factors\[0\] B holds NaN"),
        (([(B, A)],), {"r": 0}, "r must be"),
        (([(B, A)],), {"tol": 1.5}, "tol must be"),
        (([(B, A)],), {"r": 2, "method": "exact"}, "method='svd'"),
        (([(B, A)],), {"method": "cat"}, "method must be"),
        (([(B, A)],), {"r": 1, "tol": 0.1}, "r or tol"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lowrank.combine_lora(*args, **kwargs)
    with pytest.raises(TypeError, match="factors"):
        lowrank.combine_lora([(B.numpy(), A)])


# ------------------------------------------------------------------------------------------ model level


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 24)
        self.qkv = nn.Linear(24, 24)
        self.head = nn.Linear(24, 8)

    def forward(self, ids):
        return self.head(self.qkv(self.proj(self.embed(ids))))


def _randomize(model, seed, size=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * size)


def _toy():
    torch.manual_seed(0)
    model = Toy()
    lowrank.inject_lora(model, ["proj", "embed"], r=3, alpha=6, adapter_name="a")
    lowrank.inject_lora(model, ["qkv"], r=2, adapter_name="a", merged_modules={"qkv": [True, False, True]})
    lowrank.inject_lora(model, ["proj", "head"], r=4, alpha=2, use_rslora=True, adapter_name="b")
    for _, layer in lowrank.lora.lora_layers(model):
        if "a" in layer.r:
            layer.add_adapter("c", 2, alpha=5.0)
    _randomize(model, 1)
    return model


def test_combine_adapters_is_the_weighted_sum_on_every_layer():
    model = _toy()
    weights = {"a": 0.6, "b": -1.1, "c": 0.4}
    ranks = lowrank.combine_adapters(model, list(weights), list(weights.values()), "mix")
    assert ranks == {"embed": 5, "proj": 9, "qkv": 4, "head": 4}  # present adapters' ranks summed
    for path, layer in lowrank.lora.lora_layers(model):
        expected = sum(w * layer.delta_weight(n).double() for n, w in weights.items() if n in layer.r)
        assert layer.scaling["mix"] == 1.0
        assert _rel(layer.delta_weight("mix"), expected) <= 1e-6, path
    ranks = lowrank.combine_adapters(model, list(weights), list(weights.values()), "mix2", r=3)
    assert ranks == {"embed": 3, "proj": 3, "qkv": 3, "head": 3}
    for path, layer in lowrank.lora.lora_layers(model):
        if isinstance(layer, lowrank.LoRAMergedLinear):
            continue
        expected = sum(
            w * layer.delta_weight(n).detach().double() for n, w in weights.items() if n in layer.r
        )
        S = torch.linalg.svdvals(expected)
        error = float((layer.delta_weight("mix2").detach().double() - expected).norm())
        assert error <= float(S[3:].norm()) * (1 + 1e-5) + 1e-6, path


def test_combine_adapters_bad_input_leaves_model_unchanged():
    model = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for args, message in [
        ((["a", "zzz"], None, "new"), "no LoRA layer .* 'zzz'"),
        (([], None, "new"), "adapters is empty"),
        ((["a", "a"], None, "new"), "duplicates"),
        ((["a", "b"], [1.0, math.inf], "new"), r"weights\[1\]"),
        ((["a", "b"], None, "b"), "new_name"),
        ((["a", "b"], None, "x.y"), "new_name"),
    ]:
        with pytest.raises(ValueError, match=message):
            lowrank.combine_adapters(model, *args)
    assert set(model.state_dict()) == set(before)


def test_truncate_adapter_rank_tol_budget():
    model = _toy()
    lowrank.combine_adapters(model, ["a", "b", "c"], [1.0, 1.0, 1.0], "sum")
    dense = {p: layer.delta_weight("sum").double() for p, layer in lowrank.lora.lora_layers(model)}
    ranks = lowrank.truncate_adapter(model, "sum", 2)
    assert set(ranks.values()) == {2}
    for path, layer in lowrank.lora.lora_layers(model):
        assert layer.lora_alpha["sum"] == pytest.approx(2.0) and layer.scaling["sum"] == 1.0
        if not isinstance(layer, lowrank.LoRAMergedLinear):
            S = torch.linalg.svdvals(dense[path])
            error = float((layer.delta_weight("sum").double() - dense[path]).norm())
            assert error <= float(S[2:].norm()) * (1 + 1e-5), path

    model = _toy()
    dense = {
        p: layer.delta_weight("a").double() for p, layer in lowrank.lora.lora_layers(model) if "a" in layer.r
    }
    ranks = lowrank.truncate_adapter(model, "a", tol=0.5)
    for path, layer in lowrank.lora.lora_layers(model):
        if "a" in layer.r:
            assert layer.scaling["a"] == pytest.approx(2.0 if path != "qkv" else 1.0)  # scaling kept
            assert _rel(layer.delta_weight("a"), dense[path]) <= 0.5 * (1 + 1e-5)

    model = _toy()
    costs = {
        p: (layer.lora_A["b"].numel() + layer.lora_B["b"].numel()) // 4 for p, layer in _with(model, "b")
    }
    dense = {p: layer.delta_weight("b").double() for p, layer in _with(model, "b")}
    budget = 2 * sum(costs.values()) + 5
    ranks = lowrank.truncate_adapter(model, "b", budget=budget)
    assert sum(ranks[p] * costs[p] for p in ranks) <= budget
    total_error = sum(
        float((layer.delta_weight("b").double() - dense[p]).norm() ** 2) for p, layer in _with(model, "b")
    )
    # the greedy allocation is no worse than any allocation of the same budget (here: both feasible splits)
    best = min(
        sum(float(torch.linalg.svdvals(dense[p])[k:].square().sum()) for p, k in zip(costs, split))
        for split in [(a, b) for a in range(1, 5) for b in range(1, 5)]
        if sum(k * c for k, c in zip(split, costs.values())) <= budget
    )
    assert total_error <= best * (1 + 1e-4) + 1e-8
    with pytest.raises(ValueError, match="budget must be at least"):
        lowrank.truncate_adapter(model, "b", budget=3)
    with pytest.raises(ValueError, match="exactly one"):
        lowrank.truncate_adapter(model, "b")
    with pytest.raises(ValueError, match="no LoRA layer"):
        lowrank.truncate_adapter(model, "nope", 2)


def _with(model, name):
    return [(p, layer) for p, layer in lowrank.lora.lora_layers(model) if name in layer.r]


def test_truncate_refuses_a_merged_adapter():
    model = _toy()
    model.proj.set_adapter("b")
    model.proj.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        lowrank.truncate_adapter(model, "b", 2)
    assert model.proj.r["b"] == 4


# ------------------------------------------------------------------------------ PEFT: cross terms, round trip

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _bert_config():
    # all-MiniLM-L6-v2's shapes (hidden 384, 12 heads, intermediate 1536), 2 layers and a small vocabulary
    return transformers.BertConfig(
        vocab_size=200,
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def bert_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in transformers.BertModel(_bert_config()).state_dict().items()}


def _bert(state):
    model = transformers.BertModel(_bert_config()).eval()
    model.load_state_dict(state)
    return model


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_peft_linear_mode_adds_cross_terms_ours_does_not(bert_state):
    config = dict(target_modules=["query"], init_lora_weights=False)
    model = peft.get_peft_model(_bert(bert_state), peft.LoraConfig(r=4, lora_alpha=8, **config), "a")
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, **config))
    _randomize(model, 5)
    weights = [0.5, 0.5]
    model.add_weighted_adapter(["a", "b"], weights, "lin", combination_type="linear")
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    true_sum = sum(w * layer.get_delta_weight(n).double() for n, w in zip("ab", weights))
    assert _rel(layer.get_delta_weight("lin"), true_sum) > 0.3  # (sum A)(sum B) != sum AB
    factors = [(layer.lora_B[n].weight, layer.lora_A[n].weight, layer.scaling[n]) for n in "ab"]
    B, A = lowrank.combine_lora(factors, weights)
    assert _rel(B @ A, true_sum) <= 1e-6
    # and PEFT's exact-but-dense "svd" mode agrees with ours at the same rank
    model.add_weighted_adapter(["a", "b"], weights, "svd", combination_type="svd", svd_rank=5)
    B, A = lowrank.combine_lora(factors, weights, r=5)
    assert _rel(B @ A, layer.get_delta_weight("svd")) <= 1e-5


def test_combined_adapter_saves_and_loads_in_peft(bert_state, tmp_path):
    model = _bert(bert_state)
    lowrank.inject_lora(model, ["query", "value"], r=4, alpha=8, adapter_name="a")
    lowrank.inject_lora(model, ["query", "key", "intermediate.dense"], r=8, use_rslora=True, adapter_name="b")
    lowrank.inject_lora(model, ["word_embeddings", "value"], r=2, alpha=3, adapter_name="c")
    _randomize(model, 7, size=0.1)
    ranks = lowrank.combine_adapters(model, ["a", "b", "c"], [0.5, -0.7, 1.2], "mix", r=6)
    assert set(ranks.values()) == {2, 6}  # layers with one rank-2 adapter keep rank 2
    for _, layer in lowrank.lora.lora_layers(model):
        layer.set_adapter("mix" if "mix" in layer.r else None)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    ours = _hidden(model, ids)
    assert _rel(ours, _hidden(_bert(bert_state), ids)) > 1e-3  # the adapter matters
    lowrank.save_adapter(model, tmp_path, adapter_name="mix")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and not config["use_rslora"]
    assert config["rank_pattern"] == {"embeddings.word_embeddings": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_bert(bert_state), str(tmp_path)).eval()
    assert _rel(_hidden(theirs, ids), ours) <= 1e-5
    # re-ranked by tolerance: per-layer ranks and alphas still round-trip
    ranks = lowrank.truncate_adapter(model, "mix", tol=0.4)
    assert len(set(ranks.values())) > 1
    ours = _hidden(model, ids)
    lowrank.save_adapter(model, tmp_path, adapter_name="mix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_bert(bert_state), str(tmp_path)).eval()
    assert _rel(_hidden(theirs, ids), ours) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    items, weights = _factors(), [1.0, -0.5, 0.5]
    B, A = lowrank.combine_lora([(b.cuda(), a.cuda(), s) for b, a, s in items], weights, r=6)
    assert B.is_cuda
    Bc, Ac = lowrank.combine_lora(items, weights, r=6)
    torch.testing.assert_close(B.cpu(), Bc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(A.cpu(), Ac, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1.0, 1e12, 1e30])
def test_combine_lora_is_scale_invariant(scale):
    g = torch.Generator().manual_seed(7)
    fs = [(torch.randn(40, 4, generator=g), torch.randn(4, 30, generator=g)) for _ in range(2)]
    ref = lowrank.combine_lora(fs, r=3)
    got = lowrank.combine_lora([(B * scale, A * scale) for B, A in fs], r=3)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    # B, A are balanced (sqrt of the singular values on each side): each scales by `scale`
    torch.testing.assert_close(got[0].double() / scale, ref[0].double(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got[1].double() / scale, ref[1].double(), rtol=1e-3, atol=1e-4)


def test_combine_lora_and_truncate_ignore_autocast():
    g = torch.Generator().manual_seed(8)
    fs = [(torch.randn(70, 4, generator=g), torch.randn(4, 50, generator=g)) for _ in range(2)]
    ref = lowrank.combine_lora(fs, r=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lowrank.combine_lora(fs, r=3)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
