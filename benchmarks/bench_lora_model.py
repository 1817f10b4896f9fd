"""A LoRA fine-tuning step of a small transformer block stack, and unmerged inference of a small BERT.

Training table: lowrank against PEFT, same model, same r.

The model is a Hugging Face ``LlamaModel`` built from a config (no download): ``layers`` decoder blocks,
adapters on every projection (q, k, v, o, gate, up, down), base frozen. One step is
``zero_grad -> forward -> loss (mean square of the last hidden state) -> backward -> AdamW step`` on the
adapter parameters. Both candidates start from the same base weights (deep copies of one model).

Inference table (issue 19): a BERT of MiniLM's size (``BertConfig``: 6 layers, hidden 384, 12 heads,
intermediate 1536; random init, vocabulary 1000 as it costs only a gather), adapters of rank 8 on ``query``
and ``value`` with non-zero B, eval mode, ``torch.no_grad()``, unmerged; time of the forward against the
base model's (goal: <= 1.05x at both 1 x 16 and 8 x 128 tokens) and PEFT's.

Time: ``benchmarks.common.measure`` (interleaved rounds after warm-up; median, min-max).
Peak memory: the largest rise of allocated tensor bytes during one step over the bytes allocated when it
starts, from the allocation/free events of ``torch.profiler`` with ``profile_memory=True`` on CPU (every
CPU tensor allocation is recorded there; ``tracemalloc`` would miss them), and from
``torch.cuda.max_memory_allocated`` on CUDA. Activations, gradients, optimizer states and temporaries all
count; the base weights (allocated before the step) do not.
"""

from __future__ import annotations

import copy

import torch

import lowrank
from benchmarks.common import BenchResult, SkipBenchmark, Table, fmt_timing, measure

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base_model(hidden: int, layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    try:
        from transformers import LlamaConfig, LlamaModel
    except ImportError as error:
        raise SkipBenchmark(f"transformers is not installed ({error})") from error
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return LlamaModel(config).to(device=device, dtype=dtype)


def _step_fn(model: torch.nn.Module, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        hidden = model(input_ids=ids).last_hidden_state
        loss = hidden.float().square().mean()
        loss.backward()
        optimizer.step()
        return loss

    return step, sum(p.numel() for p in params)


def _peak_step_bytes(step, device: str) -> int:
    """Peak rise of allocated bytes during one call of ``step`` (see module docstring)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:  # a CPU-only run: every event is a CPU allocation (> 0) or free (< 0)
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _candidates(base, r: int, alpha: float, dropout: float):
    ours = lowrank.inject_lora(copy.deepcopy(base), TARGETS, r=r, alpha=alpha, dropout=dropout)
    models = {"lowrank": ours}
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return models, "peft is not installed: lowrank only"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS)
    models["peft"] = get_peft_model(copy.deepcopy(base), config)
    return models, None


#: Goal of issue 19: unmerged LoRA inference at most this many times the base model's time.
INFERENCE_GOAL = 1.05


def _inference_table(quick: bool, device: str, result: BenchResult) -> Table:
    """Unmerged eval inference of a MiniLM-sized BERT with LoRA on query/value: base vs lowrank vs PEFT."""
    try:
        from transformers import BertConfig, BertModel
    except ImportError as error:
        raise SkipBenchmark(f"transformers is not installed ({error})") from error
    config = BertConfig(
        vocab_size=1000,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
    )
    torch.manual_seed(0)
    base = BertModel(config).to(device).eval()
    for param in base.parameters():
        param.requires_grad_(False)
    r, targets = 8, ["query", "value"]
    models = {"base": base, "lowrank": lowrank.inject_lora(copy.deepcopy(base), targets, r=r, alpha=2 * r)}
    try:
        from peft import LoraConfig, get_peft_model

        config_peft = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
        models["peft"] = get_peft_model(copy.deepcopy(base), config_peft)
    except ImportError:
        result.notes.append("peft is not installed: inference table without peft")
    with torch.no_grad():
        for model in models.values():
            model.eval()
            gen = torch.Generator().manual_seed(1)
            for pname, param in model.named_parameters():
                if "lora_B" in pname:  # same non-zero B for both: the adapters change the output
                    param.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.02)
    rows = []
    for batch, seq in [(1, 16), (8, 128)]:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, 1000, (batch, seq), generator=gen).to(device)
        calls = {name: (lambda m=model, ids=ids: m(input_ids=ids)) for name, model in models.items()}
        small = batch * seq <= 64
        with torch.no_grad():
            timings = measure(
                calls,
                device=device,
                warmup=3,
                repeats=(41 if small else 9) if quick else (101 if small else 21),
                min_time=0.02 if small else 0.0,
            )
        base_time = timings["base"].median
        for name in models:
            ratio = timings[name].median / base_time
            rows.append(
                [
                    f"{batch} x {seq}",
                    name,
                    fmt_timing(timings[name]),
                    f"{ratio:.3f}",
                    "" if name == "base" else f"<= {INFERENCE_GOAL:.2f}",
                    "" if name == "base" else ("met" if ratio <= INFERENCE_GOAL else "not met"),
                ]
            )
            result.records.append(
                {
                    "table": "inference",
                    "model": "bert-minilm-size",
                    "tokens": f"{batch}x{seq}",
                    "r": r,
                    "candidate": name,
                    "time_s": timings[name].as_dict(),
                    "ratio_to_base": ratio,
                    "goal": INFERENCE_GOAL,
                }
            )
    return Table(
        title=f"Unmerged LoRA inference, BERT of MiniLM's size (6 x 384, r = 8 on query/value), {device}",
        columns=["tokens", "candidate", "forward time", "/ base", "goal", "goal met"],
        rows=rows,
        notes=[
            "Eval mode, torch.no_grad(), adapters not merged; candidates interleaved (medians).",
            "/ base: forward time over the base model's (no adapters); issue 19's goal is <= 1.05x.",
        ],
    )


def run(*, quick: bool = True, device: str = "cpu") -> BenchResult:
    result = BenchResult(name="lora_model")
    result.tables.append(_inference_table(quick, device, result))
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    if on_cuda:
        cases = (
            [(1024, 4, 8, 512, 16, 0.0)]
            if quick
            else [(1024, 4, 8, 512, 16, 0.0), (2048, 4, 4, 1024, 16, 0.05)]
        )
    else:
        cases = (
            [(256, 4, 4, 128, 16, 0.0)] if quick else [(256, 4, 4, 128, 16, 0.0), (512, 4, 4, 256, 16, 0.05)]
        )
    repeats = 5 if quick else 9
    rows = []
    for hidden, layers, batch, seq, r, dropout in cases:
        base = _base_model(hidden, layers, device, dtype)
        for param in base.parameters():
            param.requires_grad_(False)
        models, note = _candidates(base, r, 2.0 * r, dropout)
        if note and note not in result.notes:
            result.notes.append(note)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 1000, (batch, seq), generator=gen).to(device)
        steps, trainable = {}, {}
        for name, model in models.items():
            model.train()
            steps[name], trainable[name] = _step_fn(model, ids)
        timings = measure(steps, device=device, warmup=2, repeats=repeats)
        peaks = {name: _peak_step_bytes(step, device) for name, step in steps.items()}
        case = f"{layers} x d={hidden}, {batch}x{seq} tokens, r={r}, dropout={dropout}"
        for name in models:
            ratio = timings["peft"].median / timings[name].median if "peft" in timings else float("nan")
            mem_ratio = peaks[name] / peaks["peft"] if "peft" in peaks else float("nan")
            rows.append(
                [
                    case,
                    name,
                    fmt_timing(timings[name]),
                    f"{ratio:.2f}x",
                    f"{peaks[name] / 2**20:.1f}",
                    f"{mem_ratio:.2f}",
                    trainable[name],
                ]
            )
            result.records.append(
                {
                    "hidden": hidden,
                    "layers": layers,
                    "tokens": batch * seq,
                    "r": r,
                    "dropout": dropout,
                    "dtype": str(dtype),
                    "candidate": name,
                    "step_s": timings[name].as_dict(),
                    "peak_step_bytes": peaks[name],
                    "trainable_params": trainable[name],
                }
            )
        del models, steps
    memory_source = (
        "torch.cuda.max_memory_allocated" if on_cuda else "torch.profiler memory events (CPU allocator)"
    )
    result.tables.append(
        Table(
            title=f"LoRA fine-tuning step (forward + backward + AdamW), LlamaModel, {dtype}, {device}",
            columns=[
                "case",
                "candidate",
                "step time",
                "speed-up vs peft",
                "peak MiB",
                "peak / peft",
                "trainable",
            ],
            rows=rows,
            notes=[
                "Adapters on q, k, v, o, gate, up, down; alpha = 2r; base weights frozen; same base model.",
                f"Peak MiB: largest rise of allocated bytes during one step ({memory_source}).",
                "speed-up vs peft > 1 means lowrank's step is faster.",
            ],
        )
    )
    return result


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
