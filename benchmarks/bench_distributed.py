"""Distributed randomized SVD (lowrank.distributed.rsvd): strong scaling 1 -> 2 ranks on gloo (CPU), and the
communication volume measured against the formula.

Workers are spawned from ``run()`` (torch.multiprocessing, loopback TCP, hard timeouts); each rank uses one
thread, so the 1 -> 2 rank comparison is one core against two. A third row gives one rank two threads (the
same cores, shared-memory parallelism), and the first the single-process ``lowrank.rsvd``.

Run: ``python -m benchmarks.bench_distributed [--full]``. On multi-GPU nodes use torchrun and NCCL (README).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import torch

from benchmarks.common import BenchResult, SkipBenchmark, Table, fmt_timing, measure

SPAWN_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A tall float32 matrix with a decaying spectrum (rank-40 signal plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(m, 40, generator=gen)
    right = torch.randn(40, n, generator=gen) * (0.8 ** torch.arange(40.0))[:, None]
    return left @ right + 0.01 * torch.randn(m, n, generator=gen)


def _worker(rank: int, world: int, port: int, threads: int, config: dict, out: str) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    import lowrank
    import lowrank.distributed as ld

    record: dict = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        m, n, k = config["m"], config["n"], config["k"]
        A = _matrix(m, n)
        rows = torch.tensor_split(torch.arange(m), world)[rank]
        A_local = A[rows[0] : rows[-1] + 1].contiguous() if len(rows) else A[:0]
        kwargs = {"method": "subspace", "seed": 1}

        def distributed_call():
            dist.barrier()
            ld.rsvd(A_local, k, **kwargs)
            dist.barrier()

        candidates = {"distributed": distributed_call}
        if world == 1 and config.get("single"):
            candidates["single"] = lambda: lowrank.rsvd(A, k, **kwargs)
        timings = measure(candidates, warmup=1, repeats=config["repeats"])
        record["timings"] = {name: t.as_dict() for name, t in timings.items()}
        with ld.comm_log() as log:
            _, S, _ = ld.rsvd(A_local, k, **kwargs)
        record["bytes"] = log.bytes
        record["by_kind"] = dict(log.by_kind)
        record["formula"] = ld.rsvd_comm_bytes(n, k, world_size=world, method="subspace", dtype=A.dtype)
        if rank == 0:
            S_ref = lowrank.rsvd(A, k, **kwargs).S
            record["S_diff"] = float(((S - S_ref).abs() / S_ref[0]).max())
        if world > 1:  # the volume for twice the rows: unchanged
            B = torch.cat([A_local, A_local])
            with ld.comm_log() as log:
                ld.rsvd(B, k, **kwargs)
            record["bytes_2m"] = log.bytes
    except BaseException:
        record["crash"] = traceback.format_exc()
    finally:
        torch.save(record, os.path.join(out, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, threads: int, config: dict) -> dict:
    import torch.multiprocessing as mp

    target = _worker
    if not __name__.startswith("benchmarks."):  # loaded from a file path: spawn needs an importable name
        import benchmarks.bench_distributed as importable

        target = importable._worker
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [
            ctx.Process(target=target, args=(r, world, port, threads, config, out)) for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if hung:
            raise RuntimeError(f"ranks {hung} did not finish within {SPAWN_TIMEOUT_S} s")
        records = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, rec in enumerate(records):
        if "crash" in rec:
            raise RuntimeError(f"rank {r} of {world} failed:\n{rec['crash']}")
    return records[0] | {"all": records}


def run(*, quick: bool = True, device: str = "cpu") -> BenchResult:
    import torch.distributed as dist

    from benchmarks.common import Timing

    if torch.device(device).type != "cpu":
        raise SkipBenchmark(
            "the distributed benchmark runs gloo on CPU processes; on GPUs run it under torchrun with NCCL "
            "(see the README)"
        )
    if not (dist.is_available() and dist.is_gloo_available()):
        raise SkipBenchmark("torch.distributed with gloo is not available")
    m, n, k = (60_000, 256, 20) if quick else (400_000, 512, 32)
    repeats = 5 if quick else 7
    config = {"m": m, "n": n, "k": k, "repeats": repeats}
    one = _spawn(1, 1, config | {"single": True})
    two = _spawn(2, 1, config)
    threaded = _spawn(1, 2, config)

    def timing(rec: dict, name: str = "distributed") -> Timing:
        return Timing(**rec["timings"][name])

    base = timing(one).median
    rows = [
        ["lowrank.rsvd (one process)", 1, 1, fmt_timing(timing(one, "single")), "-", "-"],
        ["distributed.rsvd", 1, 1, fmt_timing(timing(one)), "1.00", f"{one['S_diff']:.1e}"],
        [
            "distributed.rsvd",
            2,
            1,
            fmt_timing(timing(two)),
            f"{base / timing(two).median:.2f}",
            f"{two['S_diff']:.1e}",
        ],
        [
            "distributed.rsvd",
            1,
            2,
            fmt_timing(timing(threaded)),
            f"{base / timing(threaded).median:.2f}",
            f"{threaded['S_diff']:.1e}",
        ],
    ]
    b = k + max(10, k // 2)
    scaling = Table(
        title=f"Strong scaling, gloo on CPU: rsvd of a {m} x {n} float32 matrix, k={k}, subspace, 4 power "
        f"iterations (b = {b})",
        columns=[
            "call",
            "ranks",
            "threads/rank",
            "time (median, min-max)",
            "speed-up vs 1 rank",
            "max |dS|/S1",
        ],
        rows=rows,
        notes=[
            "Speed-up is the 1-rank median over this row's median. max |dS|/S1: difference of the singular "
            "values from lowrank.rsvd on the whole matrix (same seed), relative to the largest.",
            "The 2-rank row uses both cores of a 2-core machine shared with other jobs: read it as an "
            "upper bound on overhead, not a clean scaling figure.",
        ],
    )
    itemsize = 4
    comm_rows = []
    for label, rec in (("1 rank", one), ("2 ranks", two)):
        grams = rec["by_kind"].get("gram", 0) // (b * b * itemsize)
        comm_rows.append(
            [label, m, rec["bytes"], rec["formula"], grams, rec.get("bytes_2m", "-"), m * n * itemsize]
        )
    comm = Table(
        title="Communication per rsvd call (payload bytes per rank, counted in the collectives)",
        columns=[
            "ranks",
            "m",
            "measured",
            "formula (fast path)",
            "b x b Gram all-reduces",
            "measured with 2m rows",
            "size of A (bytes)",
        ],
        rows=comm_rows,
        notes=[
            f"Formula (subspace, q=4, b={b}, n={n}, s=4 bytes): s[(q+1) n b + (q+2) b^2 + 2Pk] + 80P bytes; "
            "it does not contain m. A ring all-reduce moves about 2(P-1)/P times the payload per rank.",
            f"The fast path has q+2 = 6 Gram all-reduces; one more ({b * b * itemsize} bytes) means the "
            "final basis took shifted CholeskyQR3 (kappa of the fp32 sketch above 0.1 u^-1/2); TSQR "
            "would show as 'tsqr' below.",
            "By kind (2 ranks): " + ", ".join(f"{kind} {nbytes}" for kind, nbytes in two["by_kind"].items()),
        ],
    )
    records = [
        {"ranks": 1, "threads": 1, **one["timings"]["distributed"], "bytes": one["bytes"]},
        {"ranks": 2, "threads": 1, **two["timings"]["distributed"], "bytes": two["bytes"]},
        {"ranks": 1, "threads": 2, **threaded["timings"]["distributed"]},
        {"single_process": True, **one["timings"]["single"]},
    ]
    return BenchResult(name="distributed", tables=[scaling, comm], records=records)


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
