"""Size budgets for extraction and compression: allocate_ranks vs a uniform rank, and extraction speed.

1. Per-layer ranks from ``lowrank.allocate_ranks`` against one uniform rank of the same total size, on a
   synthetic fine-tune whose layer deltas differ in rank and decay (a transformer's q/k/v/o/up/down shapes,
   on top of random base weights). Goal: >= 20% lower total Frobenius error, never worse.
2. Extraction time of a BERT-base-sized pair of checkpoints at r = 32: ``lowrank extract`` (in process, files
   in and out) against a script doing a full SVD per layer (``torch.linalg.svd``), at equal adapter error.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
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


def _write_pair(folder: str, layers: int, g: torch.Generator) -> tuple[str, str, dict[str, torch.Tensor]]:
    """A BERT-base-shaped base checkpoint and a tuned one (base + a decaying rank-96 delta per layer)."""
    from safetensors.torch import save_file

    base, tuned, deltas = {}, {}, {}
    for name, m, n in _layer_shapes(768, layers):
        key = f"encoder.{name}.weight"
        w = torch.randn(m, n, generator=g) / np.sqrt(n)
        deltas[key] = _delta(m, n, 96, 0.96, 0.05, g).float()
        base[key], tuned[key] = w, w + deltas[key]
    paths = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    save_file(base, paths[0])
    save_file(tuned, paths[1])
    deltas = {k: tuned[k].double() - base[k].double() for k in deltas}  # what the files hold
    return *paths, deltas


def _full_svd_extract(base_path: str, tuned_path: str, out: str, r: int) -> None:
    """What a user writes without lowrank: read both checkpoints, full SVD of each delta, keep r triplets."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(base_path, framework="pt") as fb, safe_open(tuned_path, framework="pt") as ft:
        for key in ft.keys():
            delta = ft.get_tensor(key) - fb.get_tensor(key)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            root = S[:r].sqrt()
            module = "base_model.model." + key[: -len(".weight")]
            tensors[module + ".lora_A.weight"] = (root[:, None] * Vh[:r]).contiguous()
            tensors[module + ".lora_B.weight"] = (U[:, :r] * root).contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))


def _adapter_error(folder: str, deltas: dict[str, torch.Tensor]) -> float:
    """Relative Frobenius error of the adapter in ``folder`` against the deltas, in float64."""
    from safetensors.torch import load_file

    factors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    err_sq = norm_sq = 0.0
    for key, delta in deltas.items():
        module = "base_model.model." + key[: -len(".weight")]
        B, A = factors[module + ".lora_B.weight"].double(), factors[module + ".lora_A.weight"].double()
        err_sq += float((delta - B @ A).pow(2).sum())
        norm_sq += float(delta.pow(2).sum())
    return float(np.sqrt(err_sq / norm_sq))


def _speed_table(quick: bool) -> Table:
    """``lowrank extract --rank 32`` (the CLI, in process, files in and out) against a full-SVD script."""
    from lowrank.cli import main as cli_main

    layers, r = (1 if quick else 12), 32
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as folder:
        base_path, tuned_path, deltas = _write_pair(folder, layers, g)
        params = sum(x.numel() for x in deltas.values())
        runs = {
            "lowrank extract --rank 32": lambda out: cli_main(
                ["extract", base_path, tuned_path, "--rank", str(r), "--out", out, "--seed", "0"]
            ),
            "torch.linalg.svd per layer (script)": lambda out: _full_svd_extract(
                base_path, tuned_path, out, r
            ),
        }
        times, errors = {}, {}
        for name, fn in runs.items():
            out = os.path.join(folder, f"out{len(times)}")
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                fn(out)
            times[name] = time.perf_counter() - start
            errors[name] = _adapter_error(out, deltas)
    full = "torch.linalg.svd per layer (script)"
    rows = [
        [
            name,
            f"{times[name]:.2f} s",
            f"{errors[name]:.4e}",
            f"{errors[name] / errors[full]:.4f}",
            f"{times[full] / times[name]:.1f}x",
            "<= 1.01 error ratio, >= 5x" if name != full else "",
        ]
        for name in times
    ]
    return Table(
        title=(
            f"Extraction at r={r} from two safetensors checkpoints: {len(deltas)} BERT-base matrices "
            f"({params / 1e6:.1f} M params per checkpoint, fp32), files in and out"
        ),
        columns=["method", "time", "rel. error", "error / full SVD", "speed-up vs full SVD", "goal"],
        rows=rows,
        notes=[
            "Both read the two checkpoints and write an adapter; error in float64 from the written factors. "
            "One run each (the CLI computes its per-layer errors too: included in its time)."
        ],
    )


def run(*, quick: bool, device: str = "cpu") -> BenchResult:
    result = BenchResult(name="budget")
    result.tables.append(_budget_table(quick))
    result.tables.append(_speed_table(quick))
    if quick:
        result.notes.append(
            "quick mode: a smaller synthetic model and one BERT-base layer (6 matrices); --full: 12 layers"
        )
    return result


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
