"""lowrank.distributed on gloo (CPU, loopback): 2 and 3 spawned ranks, each session with hard timeouts.

Each spawn runs several checks (process start costs seconds), writes what it measured to one file per rank,
and the tests assert on those numbers against single-process references (lowrank.rsvd / lowrank.pca on the
concatenated matrix, float64 NumPy SVD, scikit-learn PCA, hand-averaged gradients).
"""

from __future__ import annotations

import datetime
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_harness import GROUP_TIMEOUT_S, run_gloo
from torch import nn

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

# ------------------------------------------------------------------------------------------- harness


def _spawn(session: str, world: int, tmp_path) -> list[dict]:
    """Run ``SESSIONS[session]`` on ``world`` spawned ranks (tests/gloo_harness.py)."""
    return run_gloo(SESSIONS[session], world, tmp_path)


def _blocks(m: int, world: int, sizes: list[int] | None) -> list[tuple[int, int]]:
    sizes = sizes or [m // world + (r < m % world) for r in range(world)]
    starts = np.cumsum([0, *sizes])
    return [(int(starts[r]), int(starts[r + 1])) for r in range(world)]


def _test_matrix(
    m: int, n: int, decay: float, dtype=torch.float64, seed: int = 0, rank: int = 0
) -> torch.Tensor:
    """``U diag(s) V^T`` with geometric singular values ``decay**i`` (well separated: stable vectors)."""
    gen = torch.Generator().manual_seed(seed)
    r = rank or min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=gen))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


def _compare(rank: int, start: int, stop: int, dist_result, ref) -> dict:
    """Largest relative differences of S, the local rows of U, and Vh against the reference."""
    U, S, Vh = dist_result
    return {
        "S": float(((S - ref.S).abs() / ref.S.abs().max()).max()),
        "U": float((U - ref.U[start:stop]).abs().max()) if stop > start else 0.0,
        "Vh": float((Vh - ref.Vh).abs().max()),
        "U_rows": U.shape[0],
    }


# ------------------------------------------------------------------------------------------- sessions

RSVD_CASES = {
    # name: (m, n, k, decay, dtype, kwargs, block sizes for 2 ranks (None: even))
    "subspace_f64_even": (300, 80, 6, 0.8, torch.float64, {"method": "subspace"}, None),
    "subspace_f64_uneven": (300, 80, 6, 0.8, torch.float64, {"method": "subspace", "n_iter": 2}, [250, 50]),
    "krylov_f64": (300, 80, 6, 0.8, torch.float64, {"method": "krylov"}, [120, 180]),
    "auto_f32": (300, 80, 6, 0.8, torch.float32, {}, [7, 293]),
    "q0_f64": (300, 80, 6, 0.5, torch.float64, {"n_iter": 0, "method": "subspace"}, None),
    "exact_path": (300, 15, 6, 0.8, torch.float64, {"method": "subspace"}, [290, 10]),  # k + p >= n
    # rank 10 < k + p: the sketch is numerically rank deficient, CholeskyQR breaks down, TSQR takes over
    "rank_deficient": (300, 80, 4, 0.5, torch.float64, {"method": "subspace", "n_iter": 1}, [3, 297]),
    # kappa of the sketch ~1e15: CholeskyQR2 breaks, shifted CholeskyQR3 / TSQR take over
    "ill_conditioned": (300, 80, 6, 0.35, torch.float64, {"method": "subspace", "n_iter": 3}, None),
}


def _session_two(rank: int, world: int, out_dir: str, results: dict) -> None:
    import lowrank
    import lowrank.distributed as ld

    for name, (m, n, k, decay, dtype, kwargs, sizes) in RSVD_CASES.items():
        A = _test_matrix(m, n, decay, dtype, rank=10 if name == "rank_deficient" else 0)
        start, stop = _blocks(m, world, sizes)[rank]
        with ld.comm_log() as log:
            got = ld.rsvd(A[start:stop], k, seed=7, **kwargs)
        ref = lowrank.rsvd(A, k, seed=7, **kwargs)
        results[name] = _compare(rank, start, stop, got, ref) | {"bytes": log.bytes, "by_kind": log.by_kind}
        if name == "subspace_f64_even":
            b = k + max(10, k // 2)
            results["bytes_formula"] = ld.rsvd_comm_bytes(
                n, k, world_size=world, method="subspace", dtype=dtype
            )
            results["bytes_predicted_by_hand"] = 8 * (5 * n * b + 6 * b * b + 2 * world * k) + 80 * world
        if name == "krylov_f64":
            results["krylov_formula"] = ld.rsvd_comm_bytes(
                n, k, world_size=world, method="krylov", dtype=dtype
            )
    # the same m, n, k with 4x the rows: the volume must not change
    A = _test_matrix(1200, 80, 0.8)
    start, stop = _blocks(1200, world, None)[rank]
    with ld.comm_log() as log:
        ld.rsvd(A[start:stop], 6, seed=7, method="subspace")
    results["bytes_4x_rows"] = log.bytes

    # seed=None: rank 0's draw is used everywhere, so S and Vh agree across ranks
    A = _test_matrix(300, 80, 0.8)
    start, stop = _blocks(300, world, None)[rank]
    results["seed_none_S"] = ld.rsvd(A[start:stop], 5, method="subspace").S

    # PCA against lowrank.pca and scikit-learn
    gen = torch.Generator().manual_seed(3)
    X = (
        (torch.randn(400, 6, dtype=torch.float64, generator=gen) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.2]))
        @ (torch.randn(6, 120, dtype=torch.float64, generator=gen))
        + 0.01 * torch.randn(400, 120, dtype=torch.float64, generator=gen)
        + 4.0
    )
    start, stop = _blocks(400, world, [150, 250])[rank]
    for method in ("exact", "randomized"):
        got = ld.pca(X[start:stop], 4, method=method, seed=5)
        ref = lowrank.pca(X, 4, method=method, seed=5)
        results[f"pca_{method}"] = {
            field: float(
                (getattr(got, field) - getattr(ref, field)).abs().max() / getattr(ref, field).abs().max()
            )
            for field in ("components", "explained_variance", "explained_variance_ratio", "mean")
        }
    results["pca_exact_components"] = ld.pca(X[start:stop], 4, method="exact").components
    results["pca_X"] = X

    # a bad argument on one rank is an error on every rank (no hang)
    try:
        ld.rsvd(A[start:stop], 0 if rank == 1 else 5, seed=1)
        results["bad_k"] = "no error"
    except (ValueError, TypeError) as error:
        results["bad_k"] = f"{type(error).__name__}: {error}"
    # disagreeing column counts
    try:
        ld.rsvd(torch.randn(50, 40 + rank, dtype=torch.float64), 3, seed=1)
        results["bad_n"] = "no error"
    except ValueError as error:
        results["bad_n"] = str(error)
    # NaN on one rank only
    B = torch.randn(60, 40, dtype=torch.float64)
    if rank == 1:
        B[3, 4] = float("nan")
    try:
        ld.rsvd(B, 3, seed=1, method="subspace")
        results["nan"] = "no error"
    except ValueError as error:
        results["nan"] = str(error)

    _lora_checks(rank, world, out_dir, results)


def _session_three(rank: int, world: int, out_dir: str, results: dict) -> None:
    import lowrank
    import lowrank.distributed as ld

    sizes = [170, 0, 130]  # the middle rank holds no rows
    A = _test_matrix(300, 80, 0.8)
    start, stop = _blocks(300, world, sizes)[rank]
    for method in ("subspace", "krylov"):
        got = ld.rsvd(A[start:stop], 6, seed=11, method=method)
        ref = lowrank.rsvd(A, 6, seed=11, method=method)
        results[f"rsvd_{method}_zero_rows"] = _compare(rank, start, stop, got, ref)
    got = ld.pca(A[start:stop], 5, method="randomized", seed=2)
    ref = lowrank.pca(A, 5, method="randomized", seed=2)
    results["pca_zero_rows"] = float((got.components - ref.components).abs().max())

    # rank 2 raises (and survives) instead of calling: the others time out on a group with a short timeout
    short = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=2))
    begin = time.monotonic()
    try:
        if rank == 2:
            raise RuntimeError("simulated failure on rank 2")
        ld.rsvd(A[start:stop], 6, seed=11, group=short)
        results["peer_timeout"] = "no error"
    except Exception as error:
        results["peer_timeout"] = f"{type(error).__name__}: {error}"
    results["peer_timeout_s"] = time.monotonic() - begin
    if rank == 2:
        time.sleep(4)  # stay alive past the others' timeout, so that it is the timeout that ends their wait

    # rank 2 fails before the collective: the others must get an error (group timeout or lost peer), not hang
    if rank == 2:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        os._exit(3)  # a crash: no clean shutdown of the group
    begin = time.monotonic()
    try:
        ld.rsvd(A[start:stop], 6, seed=11)
        results["peer_failure"] = "no error"
    except Exception as error:  # gloo reports the lost peer or the timeout as a RuntimeError subclass
        results["peer_failure"] = type(error).__name__
    results["peer_failure_s"] = time.monotonic() - begin


# ------------------------------------------------------------------------------------------- LoRA


def _lora_model(seed: int = 0) -> nn.Module:
    import lowrank

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    lowrank.inject_lora(model, ["0", "2"], r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B so that every factor gets a gradient
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    return torch.randn(6, 16, generator=gen), torch.randn(6, 8, generator=gen)


def _lora_checks(rank: int, world: int, out_dir: str, results: dict) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.fsdp import fully_shard

    import lowrank
    import lowrank.distributed as ld

    # reference: hand-averaged gradients of an unwrapped copy
    local = _lora_model()
    x, y = _batch(rank)
    (local(x) - y).square().mean().backward()
    reference = {}
    for name, p in local.named_parameters():
        if p.grad is not None:
            reference[name] = p.grad.clone()
            dist.all_reduce(reference[name])
            reference[name] /= world

    # DDP: only adapter bytes go through the reducer
    model = _lora_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    synced = []

    def counting_hook(state, bucket):
        synced.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    (ddp(x) - y).square().mean().backward()
    results["ddp_synced_bytes"] = sum(synced)
    results["ddp_adapter_bytes"] = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )
    results["ddp_grad_err"] = max(
        float((p.grad - reference[n]).abs().max()) for n, p in model.named_parameters() if p.grad is not None
    )
    results["ddp_grad_names"] = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    ld.save_adapter(ddp, os.path.join(out_dir, "ddp_adapter"))
    results["ddp_adapters"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    results["ddp_files"] = sorted(os.listdir(os.path.join(out_dir, "ddp_adapter")))
    fresh = nn.parallel.DistributedDataParallel(_lora_model(seed=0))
    with torch.no_grad():
        for n, p in fresh.module.named_parameters():
            if ".lora_" in n:
                p.zero_()
    ld.load_adapter(fresh, os.path.join(out_dir, "ddp_adapter"))
    results["ddp_loaded"] = {
        n: p.detach().clone() for n, p in fresh.module.named_parameters() if ".lora_" in n
    }

    # FSDP2: frozen base weights get no gradient, adapters equal across ranks after a step
    model = _lora_model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    (model(x) - y).square().mean().backward()
    results["fsdp_grad_none"] = sorted(n for n, p in model.named_parameters() if p.grad is None)
    results["fsdp_grad_err"] = max(
        float((p.grad.full_tensor() - reference[n]).abs().max())
        for n, p in model.named_parameters()
        if p.grad is not None
    )
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    results["fsdp_adapters"] = {
        n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if ".lora_" in n
    }
    path = os.path.join(out_dir, "fsdp_adapter")
    with ld.comm_log() as log:
        ld.save_adapter(model, path)
    results["fsdp_save_bytes"] = log.by_kind
    # load into a fresh sharded model whose adapters are zero: each rank gets its shard of the saved values
    fresh = _lora_model(seed=0)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if ".lora_" in n:
                p.zero_()
    for layer in (fresh[0], fresh[2]):
        fully_shard(layer)
    fully_shard(fresh)
    ld.load_adapter(fresh, path)
    results["fsdp_loaded"] = {
        n: p.detach().full_tensor().clone() for n, p in fresh.named_parameters() if ".lora_" in n
    }
    # and into a bare model with plain lowrank.load_adapter (the file is an ordinary PEFT checkpoint)
    bare = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    lowrank.load_adapter(bare, path)
    results["bare_loaded"] = {n: p.detach().clone() for n, p in bare.named_parameters() if ".lora_" in n}
    # a missing checkpoint is an error on every rank
    try:
        ld.load_adapter(fresh, os.path.join(out_dir, "missing" if rank == 0 else "fsdp_adapter"))
        results["load_missing"] = "no error"
    except (FileNotFoundError, RuntimeError) as error:
        results["load_missing"] = type(error).__name__


SESSIONS = {"two": _session_two, "three": _session_three}


# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _spawn("two", 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _spawn("three", 3, tmp_path_factory.mktemp("three"))


TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


@pytest.mark.parametrize("case", list(RSVD_CASES))
def test_rsvd_equals_single_process_on_concatenation(two, case):
    m, n, k, decay, dtype, kwargs, sizes = RSVD_CASES[case]
    tol = TOL[dtype]
    for rank, res in enumerate(two):
        got = res[case]
        assert got["U_rows"] == _blocks(m, 2, sizes)[rank][1] - _blocks(m, 2, sizes)[rank][0]
        assert got["S"] < tol, (case, rank, got)
        assert got["U"] < 100 * tol, (case, rank, got)
        assert got["Vh"] < 100 * tol, (case, rank, got)


def test_rsvd_matches_exact_svd_in_float64(two):
    # independent reference: NumPy's float64 SVD of the test matrix (decay 0.8: the sketch captures it)
    A = _test_matrix(300, 80, 0.8).numpy()
    s = np.linalg.svd(A, compute_uv=False)[:6]
    import lowrank

    S = lowrank.rsvd(torch.from_numpy(A), 6, seed=7, method="subspace").S.numpy()
    assert np.abs(S - s).max() / s[0] < 1e-8
    assert two[0]["subspace_f64_even"]["S"] < 1e-10  # and the distributed one equals it


def test_communication_volume_is_the_formula_and_independent_of_m(two):
    for res in two:
        assert res["subspace_f64_even"]["bytes"] == res["bytes_formula"] == res["bytes_predicted_by_hand"]
        assert res["bytes_4x_rows"] == res["bytes_formula"]
        assert res["krylov_f64"]["bytes"] == res["krylov_formula"]
        # the ill-conditioned case took a fallback path: it communicated more than the fast path
        assert res["ill_conditioned"]["bytes"] > 0


def test_seed_none_is_shared(two):
    torch.testing.assert_close(two[0]["seed_none_S"], two[1]["seed_none_S"], rtol=0, atol=0)


def test_pca_equals_single_process_and_sklearn(two):
    sklearn = pytest.importorskip("sklearn.decomposition")
    for res in two:
        for method in ("exact", "randomized"):
            for field, err in res[f"pca_{method}"].items():
                assert err < 1e-9, (method, field, err)
    ref = sklearn.PCA(n_components=4, svd_solver="full").fit(two[0]["pca_X"].numpy())
    comps = two[0]["pca_exact_components"].numpy()
    signs = np.sign((comps * ref.components_).sum(1, keepdims=True))
    np.testing.assert_allclose(comps * signs, ref.components_, atol=1e-9)


def test_bad_arguments_raise_on_every_rank(two):
    for res in two:
        assert res["bad_k"].startswith("ValueError"), res["bad_k"]
        assert "differs between ranks" in res["bad_n"], res["bad_n"]
        assert "NaN" in res["nan"], res["nan"]


def test_ddp_syncs_only_adapters_and_checkpoint_round_trips(two):
    for res in two:
        assert res["ddp_synced_bytes"] == res["ddp_adapter_bytes"] == 4 * 4 * (16 + 32 + 32 + 8)
        assert res["ddp_grad_err"] < 1e-6
        assert all(".lora_" in n for n in res["ddp_grad_names"]) and len(res["ddp_grad_names"]) == 4
        assert res["ddp_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    for name, value in two[0]["ddp_adapters"].items():
        torch.testing.assert_close(two[1]["ddp_adapters"][name], value, rtol=0, atol=0)
        for res in two:
            torch.testing.assert_close(res["ddp_loaded"][name], value, rtol=0, atol=0)


def test_fsdp2_frozen_base_and_sharded_checkpoint(two):
    for res in two:
        assert res["fsdp_grad_none"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert res["fsdp_grad_err"] < 1e-6
        # saving gathers the adapter only: 4 factors of r=4, fp32
        assert res["fsdp_save_bytes"]["adapter"] == 4 * 4 * (16 + 32 + 32 + 8)
        assert res["load_missing"] in ("FileNotFoundError", "RuntimeError")
    for name, value in two[0]["fsdp_adapters"].items():
        torch.testing.assert_close(two[1]["fsdp_adapters"][name], value, rtol=0, atol=0)
        # the step moved the adapters the same way under DDP and FSDP2 (same averaged gradient)
        torch.testing.assert_close(two[0]["ddp_adapters"][name], value, rtol=1e-5, atol=1e-6)
        for res in two:
            torch.testing.assert_close(res["fsdp_loaded"][name], value, rtol=0, atol=0)
            torch.testing.assert_close(res["bare_loaded"][name], value, rtol=0, atol=0)


def test_three_ranks_with_an_empty_block(three):
    for res in (three[0], three[1]):
        for method in ("subspace", "krylov"):
            got = res[f"rsvd_{method}_zero_rows"]
            assert got["S"] < 1e-10 and got["U"] < 1e-8 and got["Vh"] < 1e-8, (method, got)
        assert res["pca_zero_rows"] < 1e-8
    assert three[1]["rsvd_subspace_zero_rows"]["U_rows"] == 0


def test_a_crashed_rank_does_not_hang_the_others(three):
    assert three[2]["peer_timeout"].startswith("RuntimeError: simulated")
    for res in (three[0], three[1]):
        assert "timed out" in res["peer_timeout"].lower(), res["peer_timeout"]
        assert 1.5 < res["peer_timeout_s"] < 15
        assert res["peer_failure"] != "no error"
        assert res["peer_failure_s"] < GROUP_TIMEOUT_S + 10


# ------------------------------------------------- issue 15: autocast, names, bad input (one in-process rank)

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


@pytest.fixture(scope="module")
def single_rank():
    """A one-rank gloo group in this process (no spawn): the argument checks and the numerics of the
    distributed routines are the same code whatever the number of ranks."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES[:1])
def test_distributed_ignores_autocast(single_rank, device_type, dtype):
    import lowrank
    import lowrank.distributed as ld

    A = _test_matrix(200, 60, 0.8, dtype=torch.float32)
    same_under_autocast(lambda: ld.rsvd(A, 5, seed=0), device_type, dtype)
    same_under_autocast(lambda: ld.pca(A, 4, seed=0, method="randomized"), device_type, dtype)
    with torch.autocast(device_type, dtype=dtype):
        got = ld.rsvd(A, 5, seed=0, method="subspace")
    ref = lowrank.rsvd(A, 5, seed=0, method="subspace")
    assert got.S.dtype == torch.float32
    assert float((got.S - ref.S).abs().max() / ref.S[0]) < 1e-5


def test_distributed_pca_of_constant_data_explains_no_variance(single_rank):
    import lowrank.distributed as ld

    for method in ("exact", "randomized"):
        result = ld.pca(torch.full((300, 12), 3.7), 3, method=method, seed=0)
        assert torch.equal(result.explained_variance_ratio, torch.zeros(3))


_Ad = _test_matrix(40, 12, 0.8, dtype=torch.float32)


def _ld():
    import lowrank.distributed as ld

    return ld


DIST_RSVD_BAD = [
    ("nan", lambda: _ld().rsvd(nan_at(_Ad), 3, seed=0), ValueError, "A_local contains NaN"),
    (
        "inf exact",
        lambda: _ld().rsvd(nan_at(_Ad, float("inf")), 11, seed=0),
        ValueError,
        "A_local contains NaN",
    ),
    ("meta", lambda: _ld().rsvd(torch.empty(40, 12, device="meta"), 3), ValueError, "A_local is on the meta"),
    (
        "meta no rows",
        lambda: _ld().rsvd(torch.empty(0, 12, device="meta"), 3),
        ValueError,
        "A_local is on the",
    ),
    ("seed big", lambda: _ld().rsvd(_Ad, 3, seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ("seed neg", lambda: _ld().rsvd(_Ad, 3, seed=-1), ValueError, "seed must be in"),
    ("seed float", lambda: _ld().rsvd(_Ad, 3, seed=0.5), TypeError, "seed must be None, an int"),
    ("k", lambda: _ld().rsvd(_Ad, 0), ValueError, "k must be >= 1"),
    ("type", lambda: _ld().rsvd("A", 3), TypeError, "A_local must be"),
    ("method", lambda: _ld().rsvd(_Ad, 3, method="lanczos"), ValueError, "method must be one of"),
]

DIST_PCA_BAD = [
    (
        "nan",
        lambda: _ld().pca(nan_at(_Ad), 3, seed=0, method="randomized"),
        ValueError,
        "X_local contains NaN",
    ),
    ("nan exact", lambda: _ld().pca(nan_at(_Ad), 3, method="exact"), ValueError, "X_local contains NaN"),
    ("meta", lambda: _ld().pca(torch.empty(40, 12, device="meta"), 3), ValueError, "X_local is on the meta"),
    ("complex", lambda: _ld().pca(_Ad.to(torch.complex64), 3), TypeError, "X_local"),
    ("seed big", lambda: _ld().pca(_Ad, 3, seed=2**64), ValueError, "seed must be in"),
    ("seed neg", lambda: _ld().pca(_Ad, 3, seed=-7), ValueError, "seed must be in"),
    ("k", lambda: _ld().pca(_Ad, 13), ValueError, "k=13 exceeds"),
    ("center", lambda: _ld().pca(_Ad, 3, center="yes"), TypeError, "center must be a bool"),
    ("one row", lambda: _ld().pca(_Ad[:1], 1), ValueError, "at least 2"),
]


@pytest.mark.parametrize(
    "fn, error, match", [r[1:] for r in DIST_RSVD_BAD], ids=[r[0] for r in DIST_RSVD_BAD]
)
def test_distributed_rsvd_bad_input(single_rank, fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize("fn, error, match", [r[1:] for r in DIST_PCA_BAD], ids=[r[0] for r in DIST_PCA_BAD])
def test_distributed_pca_bad_input(single_rank, fn, error, match):
    check_bad(fn, error, match)


def test_distributed_numpy_integer_arguments(single_rank):
    """Found by a user test: ``k=np.int64(3)`` was refused ("k must be an int, got int64") by the distributed
    rsvd and pca, which lowrank.rsvd / lowrank.pca accept (center=np.True_ likewise); the results equal those
    of Python ints."""
    import lowrank.distributed as ld

    A = _test_matrix(120, 40, 0.8, dtype=torch.float64)
    ref = ld.rsvd(A, 3, oversample=4, n_iter=2, seed=0)
    got = ld.rsvd(A, np.int64(3), oversample=np.int64(4), n_iter=np.int32(2), seed=0)
    torch.testing.assert_close(got.S, ref.S, rtol=0, atol=0)
    S = torch.linalg.svdvals(A - A.mean(0))[:3]
    pcs = ld.pca(A, np.int64(3), seed=0, method="randomized", n_iter=np.int64(4), center=np.True_)
    torch.testing.assert_close(pcs.singular_values, S, rtol=1e-10, atol=0)
