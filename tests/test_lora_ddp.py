"""DistributedDataParallel over LoRA layers: 2 gloo processes on CPU (loopback, file rendezvous, timeouts)."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD_SIZE = 2
DEADLINE_S = 120.0


def _model() -> nn.Module:
    import lowrank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    lowrank.inject_lora(model, ["0", "1", "3"], r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero factors everywhere, so every LoRA parameter gets a gradient
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _loss(model: nn.Module, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    ids = torch.randint(0, 50, (6, 5), generator=gen)
    target = torch.randn(6, 5, 8, generator=gen)
    return (model(ids) - target).square().mean()


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        # local gradients without DDP, averaged by hand: the reference for DDP's synchronised gradients
        local = _model()
        _loss(local, rank).backward()
        reference = {}
        for name, param in local.named_parameters():
            if param.grad is not None:
                grad = param.grad.clone()
                dist.all_reduce(grad)
                reference[name] = grad / WORLD_SIZE

        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        _loss(ddp, rank).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        optimizer.step()
        adapters = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}
        torch.save({"reference": reference, "grads": grads, "adapters": adapters}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_synchronise_lora_gradients(tmp_path, monkeypatch):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    lora_names = set(results[0]["adapters"])
    assert len(lora_names) == 6  # A and B of three layers
    for result in results:
        # only LoRA parameters received gradients, and they equal the hand-averaged local gradients
        assert set(result["grads"]) == lora_names == set(result["reference"])
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, result["reference"][name], rtol=1e-5, atol=1e-7)
    for name in lora_names:
        torch.testing.assert_close(results[0]["grads"][name], results[1]["grads"][name], rtol=0, atol=0)
        torch.testing.assert_close(results[0]["adapters"][name], results[1]["adapters"][name], rtol=0, atol=0)
    # the ranks' data differ, so the averaged gradient differs from either rank's own: the sync did something
    start = _model()
    _loss(start, 0).backward()
    own = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(own[n], results[0]["grads"][n]) for n in lora_names)
