"""Adapter arithmetic on the factors (``lowrank.combine_lora``, ``combine_adapters``) vs the dense route.

- exactness: the ``"exact"`` combination against the float64 dense sum, and the rank-``r`` result's error
  against the Eckart–Young optimum (float64 dense SVD of the sum), with the time of the dense route
  (form ``delta W``, ``torch.linalg.svd``) beside ours;
- one layer: 4 adapters of r = 16 on an ``n x n`` layer recompressed to r = 32, lowrank's
  ``combine_adapters`` vs PEFT's ``add_weighted_adapter(combination_type="svd")`` on the same layer and the
  same factors, with the peak memory of each call;
- a model: a random-init BERT with all-MiniLM-L6-v2's shapes, 3 adapters, combined by both tools; the
  lowrank result saved with ``save_adapter`` and loaded by ``peft.PeftModel.from_pretrained``.

Time: ``benchmarks.common.measure`` (interleaved rounds; median, min-max). Peak memory: the largest rise of
allocated tensor bytes during one call over the bytes allocated when it starts, from ``torch.profiler``'s
CPU memory events (every CPU tensor allocation, LAPACK workspaces included, is recorded there), or
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings

import torch
from torch import nn

import lowrank
from benchmarks.common import BenchResult, SkipBenchmark, Table, fmt_timing, measure, synchronize


def _log(message: str) -> None:
    print(f"  algebra: {message}", file=sys.stderr)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _peak_bytes(call, device: str) -> int:
    """Peak rise of allocated bytes during one ``call()`` (see module docstring)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:  # CPU allocations (> 0) and frees (< 0)
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# ------------------------------------------------------------------------------------------ exactness


def _exactness_table(quick: bool, device: str, result: BenchResult) -> Table:
    cases = [(512, 512, (16, 16, 16, 16), 32), (2048, 256, (8, 16, 32), 24)]
    if not quick:
        cases += [(1024, 1024, (16, 16, 16, 16), 32), (4096, 1024, (64, 64, 32), 64)]
    rows = []
    for out, n_in, ranks, r in cases:
        gen = torch.Generator().manual_seed(out + n_in)
        factors = [
            (
                torch.randn(out, k, generator=gen).to(device),
                (torch.randn(k, n_in, generator=gen) / n_in**0.5).to(device),
                2.0 / k,
            )
            for k in ranks
        ]
        weights = [1.0 - 0.3 * i for i in range(len(ranks))]
        dense = sum(w * s * B.double() @ A.double() for (B, A, s), w in zip(factors, weights))
        S = torch.linalg.svdvals(dense)
        optimum = float(S[r:].norm())
        B, A = lowrank.combine_lora(factors, weights)
        exact_error = _rel(B @ A, dense)
        B, A = lowrank.combine_lora(factors, weights, r=r)
        excess = float((B.double() @ A.double() - dense).norm()) / optimum - 1.0

        def dense_route(factors=factors, weights=weights, r=r):
            delta = sum(w * s * B @ A for (B, A, s), w in zip(factors, weights))
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            return U[:, :r] * S[:r], Vh[:r]

        timings = measure(
            {
                "lowrank": lambda factors=factors, weights=weights, r=r: lowrank.combine_lora(
                    factors, weights, r=r
                ),
                "dense": dense_route,
            },
            device=device,
            warmup=1,
            repeats=2 if quick else 5,
        )
        case = f"{out}x{n_in}, ranks {'+'.join(map(str, ranks))} -> r={r}"
        speedup = timings["dense"].median / timings["lowrank"].median
        rows.append(
            [
                case,
                f"{exact_error:.1e}",
                f"{excess:.1e}",
                fmt_timing(timings["lowrank"]),
                fmt_timing(timings["dense"]),
                f"{speedup:.0f}x",
            ]
        )
        result.records.append(
            {
                "table": "exactness",
                "out": out,
                "in": n_in,
                "ranks": list(ranks),
                "r": r,
                "exact_rel_error": exact_error,
                "truncation_excess_over_optimum": excess,
                "lowrank_s": timings["lowrank"].as_dict(),
                "dense_svd_s": timings["dense"].as_dict(),
            }
        )
        _log(f"{case}: exact {exact_error:.1e}, excess {excess:.1e}, {speedup:.0f}x")
    return Table(
        title=f"combine_lora exactness (float32 in, float64 references), {device}",
        columns=[
            "case",
            "exact: rel. error",
            "rank r: error / optimum - 1",
            "lowrank combine_lora",
            "dense delta W + torch.linalg.svd",
            "speed-up",
        ],
        rows=rows,
        notes=[
            "exact: ||B A - sum_i w_i s_i B_i A_i||_F / ||sum||_F against the float64 dense sum "
            "(target <= 1e-6).",
            "rank r: ||sum - B A||_F over the Eckart-Young optimum from float64 svdvals of the dense sum, "
            "minus 1 (target <= 1e-5).",
        ],
    )


# ------------------------------------------------------------------------------------- one layer vs PEFT


class _OneLayer(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layer = nn.Linear(n, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _layer_case(n: int, quick: bool, device: str, peft) -> dict:
    """One ``n x n`` layer with 4 adapters of r = 16, combined to r = 32 by both tools: times, peaks."""
    names, weights, r_in, r_out = ["a0", "a1", "a2", "a3"], [0.4, 0.3, 0.2, 0.1], 16, 32
    torch.manual_seed(0)
    base = _OneLayer(n).to(device)
    ours = copy.deepcopy(base)
    config = peft.LoraConfig(r=r_in, lora_alpha=2 * r_in, target_modules=["layer"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, copy.deepcopy(config), names[0])
        for name in names[1:]:
            theirs.add_adapter(name, copy.deepcopy(config))
    peft_layer = theirs.base_model.model.layer
    for name in names:
        lowrank.inject_lora(ours, ["layer"], r=r_in, alpha=2 * r_in, adapter_name=name)
        with torch.no_grad():
            ours.layer.lora_A[name].copy_(peft_layer.lora_A[name].weight)
            ours.layer.lora_B[name].copy_(peft_layer.lora_B[name].weight)
    counter = {"peft": 0}

    def run_peft():
        counter["peft"] += 1  # PEFT silently skips a name it has: a fresh one each call
        theirs.add_weighted_adapter(
            names, weights, f"mix{counter['peft']}", combination_type="svd", svd_rank=r_out
        )

    def run_ours():
        lowrank.combine_adapters(ours, names, weights, "mix", r=r_out)

    last = {}

    def cleanup():  # untimed (measure's before_each); keeps each tool's latest delta W for the comparison
        if "mix" in ours.layer.r:
            last["lowrank"] = ours.layer.delta_weight("mix")
            ours.layer.delete_adapter("mix")
        for name in list(theirs.peft_config):
            if name.startswith("mix"):
                last["peft"] = peft_layer.get_delta_weight(name)
                theirs.delete_adapter(name)

    run_ours()  # warm-up of lowrank's code paths (PEFT's cost is its SVD, warm or not)
    timings = measure(
        {"lowrank": run_ours, "peft": run_peft},
        device=device,
        warmup=0,
        repeats=2 if quick else 3,
        before_each=cleanup,
    )
    cleanup()
    agreement = _rel(last["lowrank"], last["peft"])
    cleanup()
    peaks = {"lowrank": _peak_bytes(run_ours, device)}
    cleanup()
    peaks["peft"] = _peak_bytes(run_peft, device)
    cleanup()
    return {
        "table": "layer_vs_peft",
        "n": n,
        "ranks_in": [r_in] * len(names),
        "r": r_out,
        "lowrank_s": timings["lowrank"],
        "peft_s": timings["peft"],
        "speedup": timings["peft"].median / timings["lowrank"].median,
        "lowrank_peak_bytes": peaks["lowrank"],
        "peft_peak_bytes": peaks["peft"],
        "delta_w_rel_diff": agreement,
        "torch_threads": torch.get_num_threads(),
    }


def _layer_table(quick: bool, device: str, result: BenchResult, peft) -> Table:
    rows = []
    for n in [768] if quick else [1024, 4096]:
        record = _layer_case(n, quick, device, peft)
        case = f"{n}x{n}, 4 x r=16 -> r=32"
        rows.append(
            [
                case,
                fmt_timing(record["lowrank_s"]),
                fmt_timing(record["peft_s"]),
                f"{record['speedup']:.0f}x",
                f"{record['lowrank_peak_bytes'] / 2**20:.2f}",
                f"{record['peft_peak_bytes'] / 2**20:.1f}",
                f"{record['delta_w_rel_diff']:.1e}",
            ]
        )
        result.records.append(
            {**record, "lowrank_s": record["lowrank_s"].as_dict(), "peft_s": record["peft_s"].as_dict()}
        )
        _log(f"{case}: {rows[-1]}")
    return Table(
        title=f"One layer: combine_adapters vs PEFT add_weighted_adapter(svd), float32, {device}",
        columns=[
            "case",
            "lowrank",
            "peft",
            "speed-up",
            "lowrank peak MiB",
            "peft peak MiB",
            "delta W rel. diff",
        ],
        rows=rows,
        notes=[
            "Same layer, same 4 adapters (PEFT's random factors copied to lowrank), weights 0.4/0.3/0.2/0.1.",
            "PEFT forms the dense delta W of each adapter, sums them and runs a full torch.linalg.svd "
            "(its defaults); lowrank works on the stacked factors. Both calls add the new adapter.",
            "Peak MiB: largest rise of allocated bytes during one call (torch.profiler CPU memory events, or "
            "torch.cuda.max_memory_allocated). An n x n float32 delta W alone is n*n*4 bytes.",
            f"torch threads: {torch.get_num_threads()}.",
        ],
    )


# ------------------------------------------------------------------------------------------- model level


def _bert(transformers, layers: int, state=None):
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=1536,
    )
    model = transformers.BertModel(config).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _model_table(quick: bool, device: str, result: BenchResult, peft) -> Table:
    try:
        import transformers
    except ImportError as error:
        raise SkipBenchmark(f"transformers is not installed ({error})") from error
    layers = 1 if quick else 6
    torch.manual_seed(0)
    base = _bert(transformers, layers)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = base.to(device)
    lowrank.inject_lora(ours, ["query", "value"], r=8, alpha=16, adapter_name="a")
    lowrank.inject_lora(
        ours, ["query", "key", "attention.output.dense"], r=16, use_rslora=True, adapter_name="b"
    )
    lowrank.inject_lora(ours, ["intermediate.dense", "value"], r=4, alpha=4, adapter_name="c")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    names, weights, r = ["a", "b", "c"], [0.5, -0.4, 0.8], 16
    ids = torch.randint(0, 30522, (4, 32), generator=torch.Generator().manual_seed(2)).to(device)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            lowrank.save_adapter(ours, f"{tmp}/{name}", adapter_name=name)
        theirs = peft.PeftModel.from_pretrained(
            _bert(transformers, layers, state).to(device), f"{tmp}/a", adapter_name="a"
        )
        for name in names[1:]:
            theirs.load_adapter(f"{tmp}/{name}", adapter_name=name)
        theirs.eval()
        timings = measure(
            {
                "lowrank": lambda: lowrank.combine_adapters(ours, names, weights, "mix", r=r),
                "peft": lambda: theirs.add_weighted_adapter(
                    names, weights, "mix", combination_type="svd", svd_rank=r
                ),
            },
            device=device,
            warmup=0,
            repeats=1,
        )
        for _, layer in lowrank.lora.lora_layers(ours):
            layer.set_adapter("mix" if "mix" in layer.r else None)
        theirs.set_adapter("mix")
        with torch.no_grad():
            expected = ours(input_ids=ids).last_hidden_state
            peft_merge = theirs(input_ids=ids).last_hidden_state
            lowrank.save_adapter(ours, f"{tmp}/mix", adapter_name="mix")
            loaded = peft.PeftModel.from_pretrained(
                _bert(transformers, layers, state).to(device), f"{tmp}/mix"
            )
            round_trip = loaded.eval()(input_ids=ids).last_hidden_state
            base_out = _bert(transformers, layers, state).to(device)(input_ids=ids).last_hidden_state
    synchronize(device)
    ranks = sorted({layer.r["mix"] for _, layer in lowrank.lora.lora_layers(ours) if "mix" in layer.r})
    row = [
        f"BERT (MiniLM-L6 shapes), {layers} layers, 3 adapters -> r<={r}, ranks {ranks}",
        fmt_timing(timings["lowrank"]),
        fmt_timing(timings["peft"]),
        f"{timings['peft'].median / timings['lowrank'].median:.0f}x",
        f"{_rel(round_trip, expected):.1e}",
        f"{_rel(peft_merge, expected):.1e}",
        f"{_rel(base_out, expected):.1e}",
    ]
    result.records.append(
        {
            "table": "model",
            "layers": layers,
            "lowrank_s": timings["lowrank"].as_dict(),
            "peft_s": timings["peft"].as_dict(),
            "peft_load_rel_diff": _rel(round_trip, expected),
            "peft_merge_rel_diff": _rel(peft_merge, expected),
            "adapter_effect": _rel(base_out, expected),
            "ranks": ranks,
        }
    )
    _log(f"model: {row}")
    return Table(
        title=f"Model level: combine_adapters, save_adapter, PEFT from_pretrained, float32, {device}",
        columns=[
            "case",
            "lowrank combine",
            "peft add_weighted_adapter(svd)",
            "speed-up",
            "PEFT-loaded vs lowrank",
            "PEFT's own merge vs lowrank",
            "adapter effect",
        ],
        rows=[row],
        notes=[
            "Adapters: a (q, v; r=8), b (q, k, attention.output.dense; r=16, rsLoRA), "
            "c (intermediate, v; r=4), "
            "weights 0.5 / -0.4 / 0.8; identical factors in both tools (saved by lowrank, loaded by PEFT).",
            "Columns 5-7: relative difference of the last hidden state (4 x 32 tokens) to lowrank's; "
            "'adapter effect' is the base model's difference, the scale the others are measured against.",
        ],
    )


def run(*, quick: bool = True, device: str = "cpu") -> BenchResult:
    result = BenchResult(name="algebra")
    result.tables.append(_exactness_table(quick, device, result))
    try:
        import peft
    except ImportError:
        result.notes.append("peft is not installed: PEFT comparisons skipped")
        return result
    result.tables.append(_layer_table(quick, device, result, peft))
    result.tables.append(_model_table(quick, device, result, peft))
    return result


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
