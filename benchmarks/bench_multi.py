"""Mixed-adapter batches: ``lowrank.lora_linear_multi`` against single-adapter, PEFT and per-adapter loops.

A batch of M tokens spread over N distinct LoRA adapters of one linear layer (rows shuffled, so adapters
interleave as in a decode batch of independent requests) is computed by

* ``multi``: ``lowrank.lora_linear_multi`` (one op for the whole batch);
* ``single``: ``lowrank.lora_linear`` with one adapter for every row (the cost floor the goal is set
  against: ``multi`` with 16 adapters should stay within 1.15x of it);
* ``peft``: PEFT's mixed-batch inference (``model(x, adapter_names=[...])`` on a one-``Linear`` model
  holding the N adapters), which loops over the adapters in Python (goal: ``multi`` >= 3x faster);
* ``loop``: one base GEMM, then a per-adapter Python loop adding each adapter's term to its rows
  (``index_add_``), the best a plain-PyTorch loop does (calling ``lora_linear`` per adapter would re-read the
  base weight once per adapter).

Memory-traffic floor: where the layer is memory bound (small M; on a CPU only a few rows), ``multi`` must
read each present adapter's ``r (in + out)`` weights on top of the base weight's ``in * out``, so
``multi / single`` cannot go below ``1 + (N - 1) r (in + out) / (in out + r (in + out))``; the ``floor``
column gives that number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lowrank
from benchmarks.common import BenchResult, Plot, Table, fmt_time, measure

try:  # optional: PEFT's mixed-batch inference
    import peft
except ImportError:  # pragma: no cover - peft is an optional benchmark dependency
    peft = None


class _OneLinear(torch.nn.Module):
    """The tiny model PEFT wraps: one Linear layer."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _make_adapters(in_f, out_f, r, n, dtype, device, generator):
    """N adapters as a PEFT model (when available) and as the stacks lora_linear_multi takes."""
    weight = torch.randn(out_f, in_f, generator=generator) * in_f**-0.5
    lora_A = torch.randn(n, r, in_f, generator=generator) * in_f**-0.5
    lora_B = torch.randn(n, out_f, r, generator=generator) * r**-0.5
    alphas = torch.randint(8, 33, (n,), generator=generator).double()
    scales = (alphas / r).float()
    peft_model = None
    if peft is not None:
        base = _OneLinear(in_f, out_f)
        with torch.no_grad():
            base.proj.weight.copy_(weight)
        for a in range(n):
            config = peft.LoraConfig(
                r=r, lora_alpha=int(alphas[a]), target_modules=["proj"], lora_dropout=0.0
            )
            if peft_model is None:
                peft_model = peft.get_peft_model(base, config, adapter_name=f"a{a}")
            else:
                peft_model.add_adapter(f"a{a}", config)
            layer = peft_model.base_model.model.proj
            with torch.no_grad():
                layer.lora_A[f"a{a}"].weight.copy_(lora_A[a])
                layer.lora_B[f"a{a}"].weight.copy_(lora_B[a])
        peft_model = peft_model.to(device=device, dtype=dtype).eval()
    cast = {"device": device, "dtype": dtype}
    return weight.to(**cast), lora_A.to(**cast), lora_B.to(**cast), scales.to(device), peft_model


def _per_adapter_loop(x, weight, lora_A, lora_B, ids, scales):
    """Strategy (c): one base GEMM, then a Python loop over the adapters present adding each one's term."""
    y = F.linear(x, weight)
    for a in torch.unique(ids).tolist():
        if a < 0:
            continue
        rows = (ids == a).nonzero().squeeze(1)
        y.index_add_(0, rows, (x[rows] @ lora_A[a].T) @ lora_B[a].T, alpha=float(scales[a]))
    return y


def _table(
    in_f, out_f, r, batches, adapter_counts, repeats, dtype, device, generator, result, title_extra=""
):
    """Times every (tokens, adapters) pair of one layer size; appends a table, records and a plot series."""
    weight, lora_A, lora_B, scales, peft_model = _make_adapters(
        in_f, out_f, r, max(adapter_counts), dtype, device, generator
    )
    rows, series = [], {}
    for m in batches:
        for n in adapter_counts:
            if n > m:
                continue
            # rows spread evenly over adapters 0..n-1, then shuffled (interleaved, as independent requests)
            ids = (torch.arange(m) % n)[torch.randperm(m, generator=generator)]
            names = [f"a{a}" for a in ids.tolist()]
            ids = ids.to(device)
            x = torch.randn(m, in_f, generator=generator).to(device=device, dtype=dtype)
            scale0 = float(scales[0])
            candidates = {
                "multi": lambda x=x, ids=ids: lowrank.lora_linear_multi(
                    x, weight, lora_A, lora_B, ids, scales
                ),
                "single": lambda x=x, scale0=scale0: lowrank.lora_linear(
                    x, weight, lora_A[0], lora_B[0], scale0
                ),
                "loop": lambda x=x, ids=ids: _per_adapter_loop(x, weight, lora_A, lora_B, ids, scales),
            }
            if peft_model is not None:
                candidates["peft"] = lambda x=x, names=names: peft_model(x, adapter_names=names)
            with torch.inference_mode():
                y = candidates["multi"]()
                for other in ("loop", "peft"):
                    if other in candidates:
                        err = (candidates[other]().float() - y.float()).abs().max().item()
                        scale = y.float().abs().max().item()
                        assert err <= (2e-2 if dtype == torch.bfloat16 else 1e-3) * max(scale, 1.0), (
                            other,
                            err,
                        )
                timings = measure(candidates, device=device, warmup=1, repeats=repeats, min_time=0.0)
            t = {k: v.median for k, v in timings.items()}
            lora_size = r * (in_f + out_f)
            floor = 1 + (n - 1) * lora_size / (in_f * out_f + lora_size)
            rows.append(
                [
                    m,
                    n,
                    fmt_time(t["multi"]),
                    fmt_time(t["single"]),
                    f"{t['multi'] / t['single']:.2f}x",
                    f"{floor:.2f}x",
                    fmt_time(t["peft"]) if "peft" in t else "-",
                    f"{t['peft'] / t['multi']:.2f}x" if "peft" in t else "-",
                    fmt_time(t["loop"]),
                    f"{t['loop'] / t['multi']:.2f}x",
                ]
            )
            result.records.append(
                {
                    "tokens": m,
                    "adapters": n,
                    "in_features": in_f,
                    "out_features": out_f,
                    "rank": r,
                    "dtype": str(dtype),
                    "device": device,
                    **{f"{k}_s": v.as_dict() for k, v in timings.items()},
                }
            )
            series.setdefault(f"{in_f}x{out_f}, {n} adapters", []).append((m, t["multi"] / t["single"]))
    result.tables.append(
        Table(
            title=f"Mixed-adapter batch, {in_f}x{out_f}, r={r}, {str(dtype).replace('torch.', '')}, {device}"
            + title_extra,
            columns=[
                "tokens",
                "adapters",
                "multi",
                "single",
                "multi/single",
                "floor",
                "peft mixed",
                "peft/multi",
                "loop",
                "loop/multi",
            ],
            rows=rows,
            notes=[
                "median of interleaved repeats; rows shuffled so adapters interleave; 'floor' is the memory-"
                "traffic bound of multi/single where the base GEMM is memory bound (each present adapter's A "
                "and B must be read on top of W; on CPU only M of a few rows is memory bound, larger M is "
                "compute bound and the ratio can sit below it)",
                "goals (issue 8): 16 adapters <= 1.15x single, >= 3x faster than PEFT's mixed batch",
            ],
        )
    )
    return series


def run(*, quick: bool, device: str = "cpu") -> BenchResult:
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    generator = torch.Generator().manual_seed(0)
    result = BenchResult(name="multi")
    if peft is None:
        result.notes.append("peft is not installed: the PEFT column is skipped")
    repeats = 7 if quick else 15
    series = _table(
        4096,
        4096,
        16,
        [1, 16, 64, 256] if quick else [1, 4, 16, 32, 64, 128, 256],
        [1, 4, 16, 64],
        repeats,
        dtype,
        device,
        generator,
        result,
    )
    # A small layer: the per-adapter overheads of the Python loops (PEFT, loop) are no longer hidden by
    # the base GEMM, which is where fusing the adapters into one op pays most.
    series |= _table(
        1024,
        1024,
        16,
        [16, 64, 256] if quick else [1, 16, 64, 128, 256],
        [16, 64],
        repeats,
        dtype,
        device,
        generator,
        result,
        title_extra=" (small layer)",
    )
    result.plots.append(
        Plot(
            file="multi_overhead.png",
            title="lora_linear_multi time / single-adapter lora_linear",
            xlabel="tokens in batch",
            ylabel="ratio",
            series=series,
            logx=True,
        )
    )
    return result


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
