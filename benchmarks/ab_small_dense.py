"""A/B of ``rsvd``'s default against ``torch.svd_lowrank(q=k+10, niter=2)`` on small dense matrices with
slowly decaying spectra (issue 19 (a) and its neighbours), interleaved in one process.

Run once per checkout to compare two versions (``PYTHONPATH=<checkout> python -m benchmarks.ab_small_dense
--threads 1 --repeats 11 [--all]``), alternating processes: the ratio to torch is what compares across
runs on a shared machine. CPU time of the calling thread at 1 thread (less sensitive to other jobs than
wall time), wall time otherwise; excess = ``||A - U S Vh||_F / ||A - A_k||_F - 1`` from the exact spectrum.
Not part of the report suite (``python -m benchmarks`` runs ``bench_*.py`` only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import lowrank
from benchmarks.bench_svd import frobenius_errors, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument(
        "--all", action="store_true", help="also 2048^2 flat head, 1000^2 k=32, 3000x1000 k=128"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    cases = [(1500, 1500, 64, "0.7")]
    if args.all:
        cases += [(2048, 2048, 64, "e99"), (1000, 1000, 32, "0.7"), (3000, 1000, 128, "1")]
    for m, n, k, spectrum in cases:
        i = np.arange(1, min(m, n) + 1, dtype=np.float64)
        sigma = 0.99 ** (i - 1) + 1e-3 if spectrum == "e99" else i ** -float(spectrum)
        A_np = synthetic(m, n, sigma, seed=0 if spectrum == "e99" else 7)
        A = torch.from_numpy(A_np)
        fro_sq = float(np.sum(sigma**2))

        def torch_call(A=A, k=k):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(A, q=k + 10, niter=2)
            return U[:, :k], S[:k], V[:, :k].T

        calls = {"default": lambda A=A, k=k: lowrank.rsvd(A, k, seed=0), "torch": torch_call}
        error = {name: frobenius_errors(A_np, *fn(), sigma, fro_sq)[1] for name, fn in calls.items()}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                begin = clock()
                fn()
                times[name].append(clock() - begin)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(
            f"{m}x{n} k={k} sigma={spectrum} threads={args.threads}: default {ms['default']:.1f} ms "
            f"(excess {error['default']:.1e}), torch {ms['torch']:.1f} ms ({error['torch']:.1e}), "
            f"ratio {ms['torch'] / ms['default']:.2f}"
        )


if __name__ == "__main__":
    main()
