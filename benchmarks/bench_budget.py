"""Size budgets for extraction and compression: allocate_ranks vs a uniform rank, and extraction speed.

1. Per-layer ranks from ``lowrank.allocate_ranks`` against one uniform rank of the same total size, on a
   synthetic fine-tune whose layer deltas differ in rank and decay (a transformer's q/k/v/o/up/down shapes,
   on top of random base weights). Goal: >= 20% lower total Frobenius error, never worse.
2. Extraction time of a BERT-sized set of deltas at r = 32: ``lowrank.rsvd`` per layer (what ``lowrank
   extract`` runs) against a full SVD per layer (``torch.linalg.svd``) at equal adapter error.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import lowrank
from benchmarks.common import BenchResult, Table


def _layer_shapes(d: int, layers: int) -> list[tuple[str, int, int]]:
    names = []
    for i in range(layers):
        for proj, (m, n) in {
            "q": (d, d),
            "k": (d, d),
            "v": (d, d),
            "o": (d, d),
            "up": (4 * d, d),
            "down": (d, 4 * d),
        }.items():
            names.append((f"layers.{i}.{proj}", m, n))
    return names


def _delta(m: int, n: int, rank: int, decay: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """A fine-tuning-like update: rank ``rank``, singular values ``scale * decay**i``, plus a noise floor."""
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    s = scale * decay ** torch.arange(rank, dtype=torch.float64)
    noise = torch.randn(m, n, generator=g, dtype=torch.float64) * (1e-3 * scale / np.sqrt(max(m, n)))
    return (U * s) @ V.T + noise


def _budget_table(quick: bool) -> Table:
    d, layers = (128, 4) if quick else (384, 6)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    spectra, costs, norms = [], [], []
    for _name, m, n in _layer_shapes(d, layers):
        rank = int(rng.choice([2, 4, 8, 16, 32, 64]))
        delta = _delta(m, n, min(rank, m, n), float(rng.uniform(0.6, 0.97)), float(rng.uniform(0.2, 3)), g)
        s = torch.linalg.svdvals(delta).numpy()
        spectra.append(s)
        costs.append(m + n)
        norms.append(float(np.sum(s**2)))
    total = sum(norms)
    rows = []
    for r in (2, 4, 8, 16, 32):
        size = r * sum(costs)
        uniform = sum(float(np.sum(s[r:] ** 2)) for s in spectra)
        start = time.perf_counter()
        alloc = lowrank.allocate_ranks(spectra, size, costs)
        seconds = time.perf_counter() - start
        budgeted = total - alloc.captured
        reduction = 1 - np.sqrt(budgeted / uniform) if uniform > 0 else 0.0
        rows.append(
            [
                f"{r}",
                f"{size:,}",
                f"{np.sqrt(uniform / total):.3e}",
                f"{np.sqrt(max(budgeted, 0.0) / total):.3e}",
                f"{100 * reduction:.1f}%",
                "met" if reduction >= 0.2 else ("not worse" if reduction >= 0 else "WORSE"),
                f"{min(alloc.ranks)}-{max(alloc.ranks)}",
                alloc.method,
                f"{1e3 * seconds:.1f} ms",
            ]
        )
    return Table(
        title=f"Size budget: allocate_ranks vs one uniform rank ({len(spectra)} layers, d={d}, fp64 spectra)",
        columns=[
            "uniform rank",
            "size (params)",
            "uniform rel. error",
            "allocated rel. error",
            "error reduction",
            "goal >= 20%",
            "allocated ranks",
            "solver",
            "allocation time",
        ],
        rows=rows,
        notes=[
            "Relative error: sqrt(total squared Frobenius error / total squared norm of the deltas). "
            "Each layer's delta has its own rank (2-64) and decay (0.6-0.97 per singular value) plus a "
            "1e-3 noise floor.",
        ],
    )


def _speed_table(quick: bool) -> Table:
    d, layers, r = 768, (1 if quick else 12), 32
    g = torch.Generator().manual_seed(1)
    shapes = _layer_shapes(d, layers)  # BERT-base: 12 layers, ~85 M linear weights
    if quick:
        shapes = [s for s in shapes if s[0].endswith((".q", ".up"))]  # one layer's q and up projections
    deltas = [_delta(m, n, 96, 0.96, 1.0, g).float() for _name, m, n in shapes]
    params = sum(x.numel() for x in deltas)

    def extract_rsvd():
        return [lowrank.rsvd(x, r, seed=0) for x in deltas]

    def extract_full():
        out = []
        for x in deltas:
            U, S, Vh = torch.linalg.svd(x, full_matrices=False)
            out.append((U[:, :r], S[:r], Vh[:r]))
        return out

    times, errors = {}, {}
    for name, fn in (("lowrank.rsvd (extract)", extract_rsvd), ("torch.linalg.svd per layer", extract_full)):
        start = time.perf_counter()
        factors = fn()
        times[name] = time.perf_counter() - start
        err_sq = sum(
            float((x.double() - (U.double() * S.double()) @ Vh.double()).pow(2).sum())
            for x, (U, S, Vh) in zip(deltas, factors)
        )
        errors[name] = np.sqrt(err_sq / sum(float(x.double().pow(2).sum()) for x in deltas))
    full = "torch.linalg.svd per layer"
    rows = [
        [
            name,
            f"{times[name]:.2f} s",
            f"{errors[name]:.4e}",
            f"{errors[name] / errors[full]:.4f}",
            f"{times[full] / times[name]:.1f}x",
        ]
        for name in times
    ]
    return Table(
        title=f"Extraction at r={r}: {len(deltas)} BERT-base matrices of deltas ({params / 1e6:.1f} M, fp32)",
        columns=["method", "time", "rel. error", "error / optimal", "speed-up vs full SVD"],
        rows=rows,
        notes=["Goal: >= 5x faster than a full SVD per layer at an error within 1% of it. One run each."],
    )


def run(*, quick: bool, device: str = "cpu") -> BenchResult:
    result = BenchResult(name="budget")
    result.tables.append(_budget_table(quick))
    result.tables.append(_speed_table(quick))
    if quick:
        result.notes.append(
            "quick mode: a smaller synthetic model and two BERT-base matrices; --full: 12 layers"
        )
    return result


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
