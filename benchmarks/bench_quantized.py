"""LoRA on a quantized (int8 / float8) base: the fused op against what users run instead, side by side.

Candidates per (M rows, 4096 x 4096, r = 16, bfloat16 activations on CPU):

- ``lowrank int8``: ``lowrank.lora_linear_quantized`` (base + LoRA in one op, int8 weights);
- ``int8pack_mm (no LoRA)``: ``torch.ops.aten._weight_int8pack_mm``, torch's int8 weight-only matmul (base);
- ``F.linear fp32 (no LoRA)``: the dense fp32 base (on CUDA: the bf16 fused op ``lowrank.lora_linear``);
- ``unfused``: ``F.linear(x, dequantize(q, s))`` + the two LoRA products (CPU quick mode: M = 1 only);
- ``lowrank fp8``: the same op with float8_e4m3fn weights.

Timings are medians of interleaved rounds, each sample from a cold cache (W comes from memory). Accuracy
rows compare each output with a float64 reference on the dequantized weight (relative max error).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import lowrank
from benchmarks.common import BenchResult, Table, cache_flusher, fmt_time, measure


def _log(message: str) -> None:
    print(f"  quantized: {message}", file=sys.stderr)


def run(*, quick: bool = True, device: str = "cpu") -> BenchResult:
    cuda = torch.device(device).type == "cuda"
    result = BenchResult(name="quantized")
    out_f = in_f = 4096
    r, scale = 16, 2.0
    if cuda:
        batches, repeats, warmup = [1, 4, 16, 256], 20, 5
    else:
        batches = [1, 16, 256]
        repeats, warmup = (3, 1) if quick else (11, 2)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    q8, s8 = (t.to(device) for t in lowrank.quantize_weight(W, "int8"))
    qf8, sf8 = (t.to(device) for t in lowrank.quantize_weight(W, "float8_e4m3fn"))
    W8 = lowrank.dequantize(q8.cpu(), s8.cpu(), torch.float64)
    Wf8 = lowrank.dequantize(qf8.cpu(), sf8.cpu(), torch.float64)
    dt = torch.bfloat16
    s8_act = s8.to(dt)
    W_dense = W.to(device=device, dtype=dt if cuda else torch.float32)
    A = (torch.randn(r, in_f, generator=g) * in_f**-0.5).to(device=device, dtype=dt)
    B = (torch.randn(out_f, r, generator=g) * r**-0.5).to(device=device, dtype=dt)
    flush = cache_flusher(device=device)
    dense_name = "lowrank bf16 fused (dense W)" if cuda else "F.linear fp32 (no LoRA)"
    rows, acc_rows = [], []
    names: list[str] = []
    for M in batches:
        x = torch.randn(M, in_f, generator=g).to(device=device, dtype=dt)
        x_dense = x if cuda else x.float()

        def unfused(x=x):
            return F.linear(x, lowrank.dequantize(q8, s8, dt)) + F.linear(F.linear(x, A), B) * scale

        def dense(x=x_dense):
            return lowrank.lora_linear(x, W_dense, A, B, scale) if cuda else F.linear(x, W_dense)

        candidates = {
            "lowrank int8": lambda x=x: lowrank.lora_linear_quantized(x, q8, s8, A, B, scale),
            "int8pack_mm (no LoRA)": lambda x=x: torch.ops.aten._weight_int8pack_mm(x, q8, s8_act),
            dense_name: dense,
            "unfused dequantize": unfused,
            "lowrank fp8": lambda x=x: lowrank.lora_linear_quantized(x, qf8, sf8, A, B, scale),
        }
        try:
            candidates["int8pack_mm (no LoRA)"]()
        except (RuntimeError, NotImplementedError):
            del candidates["int8pack_mm (no LoRA)"]
        if not cuda and quick and M > 1:
            del candidates["unfused dequantize"]  # bf16 F.linear on this CPU takes seconds at M >= 16
        names = list(dict.fromkeys([*names, *candidates]))
        with torch.no_grad():
            # cold cache where W's bytes matter (decode); the compute-bound M = 256 needs no flush
            before = flush if M <= 16 else None
            times = measure(candidates, device=device, warmup=warmup, repeats=repeats, before_each=before)
        t = {k: v.median for k, v in times.items()}
        ours = t["lowrank int8"]
        pack = t.get("int8pack_mm (no LoRA)")
        unf = t.get("unfused dequantize")
        rows.append(
            [
                M,
                *(fmt_time(t[k]) if k in t else "n/a" for k in names),
                f"{ours / pack:.2f}" if pack else "n/a",
                f"{t[dense_name] / ours:.2f}x",
                f"{unf / ours:.1f}x" if unf else "n/a",
            ]
        )
        if cuda:
            rows[-1].append(f"{(q8.numel() + 4 * out_f) / ours / 1e9:.0f}")
        for name, timing in times.items():
            result.records.append({"table": "time", "M": M, "candidate": name, **timing.as_dict()})
        with torch.no_grad():
            xd = x.double().cpu()
            lora = scale * (xd @ A.double().cpu().T) @ B.double().cpu().T
            checks = [
                ("lowrank int8", candidates["lowrank int8"](), xd @ W8.T + lora),
                ("lowrank fp8", candidates["lowrank fp8"](), xd @ Wf8.T + lora),
            ]
            if "int8pack_mm (no LoRA)" in candidates:
                checks.append(("int8pack_mm (no LoRA)", candidates["int8pack_mm (no LoRA)"](), xd @ W8.T))
            for name, got, ref in checks:
                err = float((got.double().cpu() - ref).abs().max() / ref.abs().max())
                acc_rows.append([M, name, f"{err:.2e}"])
                result.records.append({"table": "accuracy", "M": M, "candidate": name, "rel_max_err": err})
        _log(f"M={M} done")
    quant_err = float((W8 - W.double()).abs().max() / W.abs().max())
    quant_err8 = float((Wf8 - W.double()).abs().max() / W.abs().max())
    columns = [
        "M",
        *names,
        "lowrank int8 / int8pack_mm",
        f"{dense_name} / lowrank int8",
        "unfused / lowrank int8",
    ]
    if cuda:
        columns.append("int8 W GB/s")
    result.tables.append(
        Table(
            title=f"{device}, {out_f}x{in_f}, r={r}, bfloat16 activations: median time per call",
            columns=columns,
            rows=rows,
            notes=[
                "int8pack_mm and F.linear compute the base only (no LoRA); lowrank adds the r=16 adapter.",
                "Candidates interleaved, medians; samples at M <= 16 start from a cold cache. Other "
                "processes may share this machine's cores: compare ratios within a row.",
            ],
        )
    )
    result.tables.append(
        Table(
            title="Accuracy: max |y - y_ref| / max |y_ref|, y_ref in float64 on the dequantized weight",
            columns=["M", "candidate", "relative max error"],
            rows=acc_rows,
            notes=[
                "bfloat16 output: one rounding is 2^-9 = 2.0e-03 relative; int8pack_mm also rounds the "
                "scales to bfloat16. The quantization error itself (dequantized vs original W, max "
                f"relative): int8 {quant_err:.2e}, fp8 {quant_err8:.2e}.",
            ],
        )
    )
    return result
