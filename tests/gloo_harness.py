"""Shared test harness for torch.distributed on gloo (CPU, loopback): spawned ranks with hard timeouts.

A session is a module-level function ``session(rank, world, out_dir, results)`` (spawn pickles it by
reference); it records what it measured in ``results``, which every rank saves to ``rank<r>.pt`` for the
parent to assert on. A rank that raises records its traceback instead, and the parent fails with it.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable

import pytest
import torch

#: The parent never waits longer than this for a session's ranks (a hang fails the test).
SESSION_DEADLINE_S = 90.0
#: The process group's own timeout for collectives.
GROUP_TIMEOUT_S = 20.0

Session = Callable[[int, int, str, dict], None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, session: Session) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    results: dict = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        session(rank, world, out_dir, results)
    except BaseException:  # recorded for the parent, which fails the test with it
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(session: Session, world: int, tmp_path) -> list[dict]:
    """Run ``session`` on ``world`` spawned gloo ranks and return each rank's results; never waits past
    :data:`SESSION_DEADLINE_S` (skips without gloo)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    name = session.__name__
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, str(tmp_path), session)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SESSION_DEADLINE_S
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    if hung:
        pytest.fail(f"ranks {hung} of session {name!r} did not finish within {SESSION_DEADLINE_S} s")
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        assert path.exists(), f"rank {r} of {name!r} wrote no results (exit code {procs[r].exitcode})"
        res = torch.load(path, weights_only=False)
        assert "crash" not in res, f"rank {r} of {name!r} crashed:\n{res['crash']}"
        results.append(res)
    return results
