"""OLoRA, CorDA (ipm/kpm) and EVA initialisations (issue 18, item 4) against PEFT and float64 references."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lowrank.lora import (
    LoRAEmbedding,
    LoRALinear,
    LoRAMergedLinear,
    calibrate_lora,
    corda_factors,
    eva_components,
    inject_lora,
    load_adapter,
    olora_factors,
    pissa_factors,
    remove_lora,
    save_adapter,
)

peft = pytest.importorskip("peft")


def _rel(a, b) -> float:
    a = torch.as_tensor(a.detach() if isinstance(a, torch.Tensor) else a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


class _MLP(nn.Module):
    def __init__(self, d_in: int = 24, d_hidden: int = 32, d_out: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, d_hidden)
        self.b = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _batches(n: int = 4, rows: int = 50, d: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)
    return [torch.randn(rows, d, generator=g) @ mix + 0.3 for _ in range(n)]


# ------------------------------------------------------------------------------------------------ OLoRA


@pytest.mark.parametrize("shape, r", [((30, 40), 4), ((40, 30), 7), ((16, 16), 16)])
def test_olora_matches_peft_float32(shape, r):
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(shape[1], shape[0]))
    W0 = base[0].weight.detach().clone()
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights="olora")
    theirs = peft.get_peft_model(copy.deepcopy(base), config).base_model.model[0]
    B, A, residual = olora_factors(W0, r, 2.0)
    assert _rel(B, theirs.lora_B["default"].weight.detach()) < 1e-5
    assert _rel(A, theirs.lora_A["default"].weight.detach()) < 1e-5
    assert _rel(residual, theirs.base_layer.weight.detach()) < 1e-5
    # the layer path gives the same factors, and the output is unchanged
    layer = LoRALinear.from_linear(copy.deepcopy(base[0]), r, alpha=2 * r, init="olora")
    assert _rel(layer.lora_A["default"].detach(), A) < 1e-6
    x = torch.randn(5, shape[1])
    assert _rel(layer(x).detach(), base(x).detach()) < 1e-5


@pytest.mark.parametrize("shape, r", [((50, 20), 5), ((20, 50), 3)])
def test_olora_float64_matches_numpy_qr(shape, r):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    B, A, residual = olora_factors(W, r, 0.5)
    Q, R = np.linalg.qr(W.numpy())  # LAPACK Householder, PEFT's convention (R's diagonal as LAPACK leaves it)
    assert B.dtype == A.dtype == residual.dtype == torch.float64
    np.testing.assert_allclose(B.numpy(), Q[:, :r], atol=1e-12)
    np.testing.assert_allclose(A.numpy(), R[:r], atol=1e-12)
    np.testing.assert_allclose(residual.numpy(), W.numpy() - 0.5 * Q[:, :r] @ R[:r], atol=1e-12)


def test_olora_through_inject_and_merged_and_refusals():
    torch.manual_seed(3)
    model = _MLP()
    x = torch.randn(6, 24)
    before = model(x).detach()
    inject_lora(model, ["a", "b"], r=4, alpha=8, init="olora")
    assert _rel(model(x).detach(), before) < 1e-5
    assert _rel(model.a.lora_B["default"].T @ model.a.lora_B["default"], torch.eye(4)) < 1e-5
    fused = nn.Linear(12, 18)
    W0 = fused.weight.detach().clone()
    merged = LoRAMergedLinear.from_linear(fused, 3, enable_lora=[True, False, True], init="olora")
    B0, A0, _ = olora_factors(W0[12:18], 3, 1.0)
    assert _rel(merged.lora_A["default"][3:6].detach(), A0) < 1e-6
    assert torch.equal(merged.weight[6:12], W0[6:12])  # the disabled slice is untouched
    emb = LoRAEmbedding.from_embedding(nn.Embedding(10, 8), 2)
    with pytest.raises(ValueError, match="init='olora' is not supported by LoRAEmbedding"):
        emb.add_adapter("o", 2, init="olora")
    assert "o" not in emb.r
    with pytest.raises(ValueError, match="calibrate_lora"):
        LoRALinear(8, 8, 2, init="corda")


# ------------------------------------------------------------------------------------------------ CorDA


def _corda_reference(W, C, r, scale, mode, damping=0.01):
    """PEFT's formulas, densely in float64 with an explicit inverse (independent of lowrank's shortcuts)."""
    W, C = W.astype(np.float64), C.astype(np.float64)
    Cd = C + damping * np.mean(np.diag(C)) * np.eye(C.shape[0])
    U, S, Vh = np.linalg.svd(W @ Cd, full_matrices=False)
    V = (Vh @ np.linalg.inv(Cd)).T
    sl = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    U, S, V = U[:, sl], S[sl] / scale, V[:, sl]
    A = V.T * np.sqrt(S)[:, None]
    B = U * np.sqrt(S)
    return B, A, W - scale * B @ A


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_corda_factors_match_float64_dense_recompute(mode, shape):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = torch.randn(200, shape[1], generator=g, dtype=torch.float64) @ torch.randn(
        shape[1], shape[1], generator=g, dtype=torch.float64
    )
    C = X.T @ X / 200
    B, A, residual = corda_factors(W, C, 5, 0.5, mode=mode, method="svd")
    Br, Ar, Rr = _corda_reference(W.numpy(), C.numpy(), 5, 0.5, mode)
    signs = np.sign(np.sum(B.numpy() * Br, axis=0))  # singular vectors are defined up to sign
    np.testing.assert_allclose(B.numpy() * signs, Br, atol=1e-9 * np.abs(Br).max())
    np.testing.assert_allclose(A.numpy() * signs[:, None], Ar, atol=1e-9 * np.abs(Ar).max())
    np.testing.assert_allclose(residual.numpy(), Rr, atol=1e-9 * np.abs(Rr).max())
    if mode == "ipm":  # the randomized engine reaches the same top-r adapter on this small problem
        B2, A2, _ = corda_factors(W, C, 5, 0.5, mode=mode, method="rsvd")
        assert _rel(B2 @ A2, Br @ Ar) < 1e-6


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_calibrate_corda_matches_peft(mode):
    torch.manual_seed(0)
    base = _MLP()
    batches = _batches()
    theirs = copy.deepcopy(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["a", "b"],
        init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=mode),
    )
    from peft.tuners.lora.corda import preprocess_corda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_corda(theirs, config, run_model=lambda: [theirs(x) for x in batches])
        theirs = peft.get_peft_model(theirs, config)
    ours = copy.deepcopy(base)
    ranks = calibrate_lora(
        ours, ["a", "b"], batches, r=4, alpha=8, init="corda", corda_mode=mode, method="svd"
    )
    assert ranks == {"a": 4, "b": 4}
    for name in ("a", "b"):
        p, q = getattr(theirs.base_model.model, name), getattr(ours, name)
        delta_peft = (p.lora_B["default"].weight @ p.lora_A["default"].weight).detach()
        delta_ours = (q.lora_B["default"] @ q.lora_A["default"]).detach()
        assert _rel(delta_ours, delta_peft) < 1e-4  # PEFT inverts C~ in float32
        assert _rel(q.weight, p.base_layer.weight.detach()) < 1e-4
    x = torch.randn(7, 24)
    assert _rel(ours(x).detach(), theirs(x).detach()) < 1e-5
    assert _rel(ours(x).detach(), base(x).detach()) < 1e-5  # CorDA leaves the output unchanged
    assert not any(m._forward_hooks for m in ours.modules())


def test_corda_adapter_loads_in_peft_with_residual_base(tmp_path):
    torch.manual_seed(5)
    base = _MLP()
    ours = copy.deepcopy(base)
    calibrate_lora(ours, ["a", "b"], _batches(), r=3, alpha=6, init="corda")
    with torch.no_grad():  # a training step's worth of change, so the adapter is not its init
        ours.a.lora_B["default"].add_(0.01)
    save_adapter(ours, tmp_path)
    residual_base = remove_lora(copy.deepcopy(ours))  # what a user ships with the adapter
    theirs = peft.PeftModel.from_pretrained(residual_base, str(tmp_path)).eval()
    x = torch.randn(5, 24)
    assert _rel(theirs(x).detach(), ours(x).detach()) < 1e-5
    again = load_adapter(remove_lora(copy.deepcopy(ours)), tmp_path)
    assert _rel(again(x).detach(), ours(x).detach()) < 1e-6


# -------------------------------------------------------------------------------------------------- EVA


def test_eva_components_match_float64_svd_of_the_inputs():
    g = torch.Generator().manual_seed(6)
    X = (
        torch.randn(300, 12, generator=g, dtype=torch.float64)
        @ torch.diag(torch.logspace(0, -2, 12, dtype=torch.float64))
        + 5.0
    )
    comps, ratio, sv = eva_components(X.T @ X, X.sum(0), 300, 4)
    Xc = (X - X.mean(0)).numpy()
    _, S, Vh = np.linalg.svd(Xc, full_matrices=False)
    signs = np.sign(np.sum(comps.numpy() * Vh[:4], axis=1))
    np.testing.assert_allclose(comps.numpy() * signs[:, None], Vh[:4], atol=1e-9)
    np.testing.assert_allclose(sv.numpy(), S[:4], rtol=1e-9)
    np.testing.assert_allclose(ratio.numpy(), S[:4] ** 2 / np.sum(S**2), rtol=1e-9)
    largest = comps.abs().argmax(dim=1)
    assert bool((comps.gather(1, largest[:, None]) > 0).all())  # PEFT's svd_flip convention
    comps2, ratio2, _ = eva_components(X.T @ X, X.sum(0), 300, 4, method="rsvd")
    assert float((comps2.abs() - comps.abs()).abs().max()) < 1e-6


class _Tok(nn.Module):
    """Token model: embeddings -> two linear layers, called as model(input_ids=..., attention_mask=...)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.emb = nn.Embedding(50, 16)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(50, 16, generator=g) @ torch.diag(torch.logspace(0, -1.5, 16)))
        self.q = nn.Linear(16, 16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.down(torch.relu(self.up(self.q(h))))


def _token_batches(n: int = 3):
    g = torch.Generator().manual_seed(8)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[:, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_calibrate_eva_components_ranks_and_output():
    model = _Tok()
    batches = _token_batches()
    x = batches[0]
    before = model(**x).detach()
    # reference: the inputs of `up` on the unmasked tokens, concatenated
    with torch.no_grad():
        rows = [model.q(model.emb(b["input_ids"]))[b["attention_mask"].bool()] for b in batches]
    X = torch.cat(rows).double()
    r, rho = 4, 2.0
    ranks = calibrate_lora(
        model, ["q", "up", "down"], batches, r=r, alpha=8, init="eva", rho=rho, method="svd"
    )
    assert sum(ranks.values()) == r * 3  # the budget is redistributed, not changed
    assert all(0 <= k <= round(r * rho) for k in ranks.values())
    assert _rel(model(**x).detach(), before) < 1e-6  # lora_B = 0
    k = ranks["up"]
    _, S, Vh = np.linalg.svd((X - X.mean(0)).numpy(), full_matrices=False)
    A = model.up.lora_A["default"].detach().double().numpy()
    np.testing.assert_allclose(np.abs(A), np.abs(Vh[:k]), atol=1e-5)
    assert model.up.lora_alpha["default"] == pytest.approx(8 * k / r)  # adjust_scaling_factors
    assert float(model.up.lora_B["default"].detach().abs().max()) == 0.0
    assert model.up.lora_B["default"].requires_grad and not model.up.weight.requires_grad


def test_eva_redistribution_is_the_budget_largest_ratios():
    model = _Tok()
    batches = _token_batches()
    ranks = calibrate_lora(copy.deepcopy(model), ["q", "up", "down"], batches, r=3, init="eva", rho=2.0)
    # recompute every layer's ratios independently and take the 9 largest of the 6 + 6 + 6 candidates
    stats = {}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda m, a, o, n=n: stats.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for n in ("q", "up", "down")
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    masks = torch.cat([b["attention_mask"].bool().reshape(-1) for b in batches])
    pooled = []
    for n, xs in stats.items():
        X = torch.cat(xs).double()[masks]
        S = np.linalg.svd((X - X.mean(0)).numpy(), compute_uv=False)
        pooled += [(v, n) for v in (S**2 / np.sum(S**2))[:6]]
    pooled.sort(key=lambda t: -t[0])
    expected = {n: sum(1 for _, m in pooled[:9] if m == n) for n in ("q", "up", "down")}
    assert ranks == expected


def test_eva_adapter_round_trips_through_peft(tmp_path):
    model = _Tok()
    base = copy.deepcopy(model)
    ranks = calibrate_lora(model, ["q", "up", "down"], _token_batches(), r=3, alpha=6, init="eva", rho=2.0)
    assert len(set(ranks.values())) > 1  # per-layer ranks: rank_pattern / alpha_pattern in the config
    with torch.no_grad():
        for name, k in ranks.items():
            if k:
                getattr(model, name).lora_B["default"].normal_(std=0.05)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    x = _token_batches(1)[0]
    assert _rel(theirs(**x).detach(), model(**x).detach()) < 1e-5


# ------------------------------------------------------------------------------------- hooks, bad input


def test_hooks_removed_and_model_unchanged_on_error():
    model = _MLP()
    model.train()
    model.b.eval()
    state = copy.deepcopy(model.state_dict())

    def batches():
        yield torch.randn(5, 24)
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        calibrate_lora(model, ["a", "b"], batches(), r=2, init="corda")
    assert not any(m._forward_hooks for m in model.modules())
    assert model.training and model.a.training and not model.b.training
    assert isinstance(model.a, nn.Linear) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    def bad_forward(m, batch):
        m(batch)
        raise ValueError("forward failed")

    with pytest.raises(ValueError, match="forward failed"):
        calibrate_lora(model, "a", [torch.randn(5, 24)], r=2, init="eva", forward=bad_forward)
    assert not any(m._forward_hooks for m in model.modules())


BAD = [
    (dict(init="pissa"), ValueError, "init must be one of"),
    (dict(r=0), ValueError, "r must be a positive int"),
    (dict(r=100), ValueError, "r must be an int in"),
    (dict(corda_mode="top"), ValueError, "corda_mode must be one of"),
    (dict(damping=0.0), ValueError, "damping must be > 0"),
    (dict(init="eva", rho=0.5), ValueError, "rho must be >= 1"),
    (dict(method="eigh"), ValueError, "method must be one of"),
    (dict(whiten=1), TypeError, "whiten must be a bool"),
    (dict(forward=3), TypeError, "forward must be a callable"),
    (dict(target_modules="nope"), ValueError, "match no module"),
    (dict(batches=3), TypeError, "batches must be an iterable"),
    (dict(batches=[]), ValueError, "received 0 input rows"),
    (dict(batches=[torch.full((4, 24), float("nan"))]), ValueError, "NaN or Inf inputs"),
    (dict(batches=[torch.zeros(4, 24)]), ValueError, "maximum is 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be > 0"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_input_is_refused_and_changes_nothing(kwargs, error, match):
    model = _MLP()
    state = copy.deepcopy(model.state_dict())
    args = {"target_modules": ["a", "b"], "batches": _batches(1), "r": 2, **kwargs}
    with pytest.raises(error, match=match):
        calibrate_lora(model, **args)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(model.a, nn.Linear)


def test_bad_tensors_to_the_factor_functions():
    W = torch.randn(6, 5)
    with pytest.raises(ValueError, match="covariance must have shape"):
        corda_factors(W, torch.eye(6), 2, 1.0)
    with pytest.raises(ValueError, match="covariance is zero"):
        corda_factors(W, torch.zeros(5, 5), 2, 1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        corda_factors(W, torch.eye(5), 2, 1.0, mode="x")
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        olora_factors(np.ones((4, 4)), 2, 1.0)
    with pytest.raises(ValueError, match="r must be an int"):
        olora_factors(W, 6, 1.0)
    with pytest.raises(ValueError, match="scale must be"):
        olora_factors(W, 2, math.nan)
    with pytest.raises(ValueError, match="zero variance"):
        eva_components(torch.full((3, 3), 8.0), torch.full((3,), 4.0), 2, 2)  # two equal rows
    with pytest.raises(ValueError, match="k must be an int"):
        eva_components(torch.eye(3), torch.zeros(3), 5, 4)


def test_n_iter_reaches_exact_top_singular_values():
    """pissa_factors / corda_factors pass n_iter to the randomized engine: more iterations, exact top-r."""
    g = torch.Generator().manual_seed(9)
    U = torch.linalg.qr(torch.randn(120, 8, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(90, 8, generator=g, dtype=torch.float64))[0]
    W = 0.05 * torch.randn(120, 90, generator=g, dtype=torch.float64) + (U * torch.linspace(3, 2, 8)) @ V.T
    exact = np.linalg.svd(W.numpy(), compute_uv=False)[:4]
    B, A, _ = pissa_factors(W, 4, 1.0, n_iter=8)
    np.testing.assert_allclose(np.linalg.svd((B @ A).numpy(), compute_uv=False)[:4], exact, rtol=1e-10)
    B, A, _ = corda_factors(W, torch.eye(90, dtype=torch.float64), 4, 1.0, n_iter=8)
    np.testing.assert_allclose(np.linalg.svd((B @ A).numpy(), compute_uv=False)[:4], exact, rtol=1e-10)


def test_quantized_base_refuses_olora():
    from lowrank.lora import quantize_base

    model = inject_lora(nn.Sequential(nn.Linear(16, 16)), "0", r=2)
    quantize_base(model)
    codes = model[0].qweight.clone()
    with pytest.raises(ValueError, match="init='olora' rewrites the base weight"):
        model[0].add_adapter("o", 2, init="olora")
    assert torch.equal(model[0].qweight, codes)
