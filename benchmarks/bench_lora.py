"""The fused LoRA op against what users would run instead, side by side in one process.

Candidates, all computing y = x W^T + s (x A^T) B^T + bias under ``torch.no_grad()``:
- ``lowrank``: ``lowrank.lora_linear``;
- ``F.linear``: the base layer alone (the floor: a LoRA layer can at best cost this);
- ``unfused``: plain PyTorch, ``F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)``;
- ``peft``: PEFT's LoRA layer around an ``nn.Linear`` (when peft is installed).
A second table times a training step (forward + backward with A, B trainable, W frozen). On CPU a decode
table (issue 19) times ``lowrank.lora_linear`` against ``F.linear`` at M = 1 (quick; M = 1..4 in --full),
4096 x 4096, r = 16, float32 and bfloat16, with warm and with flushed caches, goal <= 1.02x.
On CUDA each case also reports achieved bandwidth and TFLOP/s against measured ceilings (a large
device-to-device copy, a large bf16 matmul).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import lowrank
from benchmarks.common import BenchResult, Plot, Table, cache_flusher, fmt_time, measure, rotating


class _OneLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(weight, bias, lora_A, lora_B, scale):
    """A PEFT LoRA layer with the same W, A, B, scale; None when peft is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    holder = _OneLinear(in_features, out_features, bias is not None).to(weight.device, weight.dtype)
    # The same tensors as the other candidates (no copy): same memory, same cache behaviour.
    holder.proj.weight = torch.nn.Parameter(weight, requires_grad=False)
    holder.proj.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=scale * r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    model.eval()
    return model


def _forward_candidates(weight, bias, lora_A, lora_B, scale, peft_model, xs):
    """The candidates, all on the same tensors (PEFT's layer holds a copy of them)."""
    candidates = {
        "lowrank": rotating(lambda x: lowrank.lora_linear(x, weight, lora_A, lora_B, scale, bias), xs),
        "F.linear": rotating(lambda x: F.linear(x, weight, bias), xs),
        "unfused": rotating(
            lambda x: F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_A), lora_B), xs
        ),
    }
    if peft_model is not None:
        candidates["peft"] = rotating(peft_model, xs)
    return candidates


def _inputs(M, in_features, dtype, device, count):
    g = torch.Generator(device="cpu").manual_seed(M)
    return [torch.randn(M, in_features, generator=g).to(dtype=dtype, device=device) for _ in range(count)]


def _ceilings(device):
    """Measured device-to-device copy bandwidth (bytes/s, read + write) and bf16 matmul FLOP/s."""
    n = 1 << 28  # 512 MiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy = measure({"copy": lambda: dst.copy_(src)}, device=device, warmup=3, repeats=10)["copy"]
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    mm = measure({"mm": lambda: a @ b}, device=device, warmup=3, repeats=10)["mm"]
    return 2 * n * 2 / copy.median, 2 * size**3 / mm.median


def run(*, quick: bool = True, device: str = "cpu") -> BenchResult:
    cuda = torch.device(device).type == "cuda"
    result = BenchResult(name="lora")
    if cuda:
        dtype = torch.bfloat16
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
        ranks = [16, 64]
        batches = [1, 4, 16, 64, 512, 4096]
        repeats, warmup = 50, 10
        bandwidth, flops_ceiling = _ceilings(device)
        result.notes.append(
            f"Measured ceilings: device-to-device copy {bandwidth / 1e9:.0f} GB/s (read + write), "
            f"bf16 matmul 8192^3 {flops_ceiling / 1e12:.0f} TFLOP/s."
        )
    else:
        dtype = torch.float32
        shapes = [(4096, 4096)]
        ranks = [16] if quick else [16, 64]
        batches = [1, 16, 256, 2048]
        # A 3% question needs many samples where calls are short: per-call timings, more repeats at small M.
        repeats, warmup = (7, 2) if quick else (15, 3)
        bandwidth = flops_ceiling = None
    scale = 2.0
    flush = cache_flusher(device=device)  # every sample from a cold cache: W must come from memory
    columns = [
        "out x in",
        "r",
        "M",
        "lowrank",
        "F.linear",
        "unfused",
        "peft",
        "lowrank / F.linear",
        "peft / lowrank",
    ]
    if cuda:
        columns += ["GB/s (% copy)", "TFLOP/s (% mm)"]
    rows = []
    series: dict[str, list[tuple[float, float]]] = {}
    for out_features, in_features in shapes:
        for r in ranks:
            g = torch.Generator(device="cpu").manual_seed(out_features + r)
            weight = (torch.randn(out_features, in_features, generator=g) * in_features**-0.5).to(
                device, dtype
            )
            bias = torch.randn(out_features, generator=g).to(device, dtype)
            lora_A = (torch.randn(r, in_features, generator=g) * in_features**-0.5).to(device, dtype)
            lora_B = (torch.randn(out_features, r, generator=g) * r**-0.5).to(device, dtype)
            peft_model = _peft_layer(weight, bias, lora_A, lora_B, scale)
            for M in batches:
                xs = _inputs(M, in_features, dtype, device, count=4 if M <= 256 else 2)
                candidates = _forward_candidates(weight, bias, lora_A, lora_B, scale, peft_model, xs)
                with torch.no_grad():
                    reps = (
                        repeats
                        if cuda
                        else max(repeats, int(repeats * 3e9 / (2 * M * in_features * out_features)))
                    )
                    times = measure(
                        candidates, device=device, warmup=warmup, repeats=min(reps, 61), before_each=flush
                    )
                base = times["F.linear"].median
                ours = times["lowrank"].median
                row = [
                    f"{out_features}x{in_features}",
                    r,
                    M,
                    fmt_time(ours),
                    fmt_time(base),
                    fmt_time(times["unfused"].median),
                    fmt_time(times["peft"].median) if "peft" in times else "n/a",
                    f"{ours / base:.3f}",
                    f"{times['peft'].median / ours:.2f}" if "peft" in times else "n/a",
                ]
                elem = torch.empty((), dtype=dtype).element_size()
                moved = elem * (
                    out_features * in_features
                    + r * (in_features + out_features)
                    + M * (in_features + out_features)
                )
                flops = 2 * M * out_features * in_features + 2 * M * r * (in_features + out_features)
                if cuda:
                    row += [
                        f"{moved / ours / 1e9:.0f} ({100 * moved / ours / bandwidth:.0f}%)",
                        f"{flops / ours / 1e12:.1f} ({100 * flops / ours / flops_ceiling:.0f}%)",
                    ]
                rows.append(row)
                for name, timing in times.items():
                    result.records.append(
                        {
                            "table": "forward",
                            "out_features": out_features,
                            "in_features": in_features,
                            "r": r,
                            "M": M,
                            "dtype": str(dtype).removeprefix("torch."),
                            "candidate": name,
                            **timing.as_dict(),
                            "bytes": moved,
                            "flops": flops,
                        }
                    )
                    if (out_features, in_features, r) == (shapes[0][0], shapes[0][1], ranks[0]):
                        series.setdefault(name, []).append((M, timing.median))
                print(
                    f"  lora forward {out_features}x{in_features} r={r} M={M}: ratio {ours / base:.3f}",
                    file=sys.stderr,
                )
    dtype_name = str(dtype).removeprefix("torch.")
    result.tables.append(
        Table(
            title=f"Forward, {dtype_name}, {device}: median time per call (scale={scale}, with bias)",
            columns=columns,
            rows=rows,
            notes=[
                "lowrank / F.linear is the overhead of the LoRA term over the base layer (1.000 = free).",
                "Each row: candidates interleaved, rotated inputs, all on the same weight tensors, caches "
                "flushed before every timed call; median of the repeats, raw min/max in results.json.",
            ],
        )
    )
    result.plots.append(
        Plot(
            file="lora_forward_time_vs_batch.png",
            title=f"LoRA forward {shapes[0][0]}x{shapes[0][1]}, r={ranks[0]}, {dtype_name}, {device}",
            xlabel="tokens M",
            ylabel="seconds per call",
            series=series,
            logx=True,
            logy=True,
        )
    )
    if not cuda:
        result.tables.append(_decode_table(quick, result))
    result.tables.append(_training_table(device, dtype, quick, result))
    return result


#: Goal of issue 19 for one-token decode on CPU: lora_linear at most this many times F.linear's time.
DECODE_GOAL = 1.02


def _decode_table(quick: bool, result: BenchResult) -> Table:
    """lowrank.lora_linear / F.linear at M = 1..4 rows, 4096 x 4096, r = 16, warm and cold caches (CPU)."""
    size, r, scale = 4096, 16, 2.0
    flush = cache_flusher()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(19)
        weight = (torch.randn(size, size, generator=g) * size**-0.5).to(dtype)
        bias = torch.randn(size, generator=g).to(dtype)
        lora_A = (torch.randn(r, size, generator=g) * size**-0.5).to(dtype)
        lora_B = (torch.randn(size, r, generator=g) * r**-0.5).to(dtype)
        for M in [1] if quick else [1, 2, 3, 4]:
            xs = _inputs(M, size, dtype, "cpu", count=4)
            candidates = _forward_candidates(weight, bias, lora_A, lora_B, scale, None, xs)
            del candidates["unfused"]
            for cache in ("warm", "cold"):
                with torch.no_grad():
                    times = measure(
                        candidates,
                        warmup=3,
                        repeats=21 if quick else 61,
                        before_each=flush if cache == "cold" else None,
                    )
                ratio = times["lowrank"].median / times["F.linear"].median
                rows.append(
                    [
                        str(dtype).removeprefix("torch."),
                        M,
                        cache,
                        fmt_time(times["lowrank"].median),
                        fmt_time(times["F.linear"].median),
                        f"{ratio:.3f}",
                        f"<= {DECODE_GOAL:.2f}",
                        "met" if ratio <= DECODE_GOAL else "not met",
                    ]
                )
                for name, timing in times.items():
                    result.records.append(
                        {
                            "table": "decode",
                            "M": M,
                            "r": r,
                            "dtype": str(dtype).removeprefix("torch."),
                            "cache": cache,
                            "candidate": name,
                            **timing.as_dict(),
                            "goal": DECODE_GOAL,
                        }
                    )
                print(f"  lora decode {dtype} M={M} {cache}: ratio {ratio:.3f}", file=sys.stderr)
    return Table(
        title=f"Decode (few rows), {size}x{size}, r={r}, cpu: lowrank.lora_linear vs F.linear",
        columns=["dtype", "M", "caches", "lowrank", "F.linear", "lowrank / F.linear", "goal", "goal met"],
        rows=rows,
        notes=[
            "Few rows take one threaded pass over W that adds the LoRA term per output row "
            "(csrc/cpu/lora_linear.cpp); floor ~1.01x (A and B are 0.8% of W's bytes at r = 16).",
            "Interleaved, rotated inputs, medians; cold: 256 MiB streamed before each timed call.",
        ],
    )


def _training_table(device, dtype, quick, result) -> Table:
    """Forward + backward with A, B trainable and W, bias frozen: lowrank vs unfused vs PEFT."""
    out_features = in_features = 4096 if (not quick or torch.device(device).type == "cuda") else 2048
    r, scale = 16, 2.0
    batches = [256] if quick else [16, 256, 2048]
    g = torch.Generator(device="cpu").manual_seed(7)
    weight = (torch.randn(out_features, in_features, generator=g) * in_features**-0.5).to(device, dtype)
    bias = torch.randn(out_features, generator=g).to(device, dtype)
    lora_A = (torch.randn(r, in_features, generator=g) * in_features**-0.5).to(device, dtype).requires_grad_()
    lora_B = (torch.randn(out_features, r, generator=g) * r**-0.5).to(device, dtype).requires_grad_()
    peft_model = _peft_layer(weight, bias, lora_A.detach(), lora_B.detach(), scale)
    if peft_model is not None:
        peft_model.train()
    rows = []
    for M in batches:
        xs = _inputs(M, in_features, dtype, device, count=2)
        grads = [torch.randn(M, out_features, dtype=dtype, device=device) for _ in range(2)]
        pairs = list(zip(xs, grads))

        def step_lowrank(pair):
            y = lowrank.lora_linear(pair[0], weight, lora_A, lora_B, scale, bias)
            y.backward(pair[1])

        def step_unfused(pair):
            x = pair[0]
            y = F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_A), lora_B)
            y.backward(pair[1])

        candidates = {"lowrank": rotating(step_lowrank, pairs), "unfused": rotating(step_unfused, pairs)}
        if peft_model is not None:
            candidates["peft"] = rotating(lambda pair: peft_model(pair[0]).backward(pair[1]), pairs)
        times = measure(candidates, device=device, warmup=2, repeats=5 if quick else 9)
        ours = times["lowrank"].median
        rows.append(
            [
                f"{out_features}x{in_features}",
                r,
                M,
                fmt_time(ours),
                fmt_time(times["unfused"].median),
                fmt_time(times["peft"].median) if "peft" in times else "n/a",
                f"{times['peft'].median / ours:.2f}" if "peft" in times else "n/a",
            ]
        )
        for name, timing in times.items():
            result.records.append(
                {"table": "train_step", "M": M, "r": r, "candidate": name, **timing.as_dict()}
            )
        print(f"  lora train step M={M}: done", file=sys.stderr)
    return Table(
        title="Training step (forward + backward, A and B trainable), "
        f"{str(dtype).removeprefix('torch.')}, {device}",
        columns=["out x in", "r", "M", "lowrank", "unfused", "peft", "peft / lowrank"],
        rows=rows,
    )


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
