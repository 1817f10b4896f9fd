"""A/B helper for issue 19's inference row: lowrank-LoRA BERT (MiniLM's size) over its base, in one process.

The same models as ``bench_lora_model._inference_table`` (BertConfig 6 x 384, 12 heads, intermediate 1536,
vocabulary 1000, seed 0; LoRA r = 8, alpha = 16 on query and value; B ~ 0.02 N(0, 1) from seed 1; eval,
``torch.no_grad()``, unmerged), timed in ``rounds`` interleaved rounds (order alternating). With one thread
it reads the thread's CPU time (``time.thread_time``), which other processes on a shared machine disturb
less than the wall clock; with more it reads the wall clock. Prints the median ratio and its quartiles at
1 x 16 and 8 x 128 tokens. For before/after figures run it alternately against two checkouts
(``PYTHONPATH=<tree> python <this file> --threads 1``): the ratio is normalised within each process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lowrank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    from transformers import BertConfig, BertModel

    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    config = BertConfig(
        vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    torch.manual_seed(0)
    base = BertModel(config).eval()
    for param in base.parameters():
        param.requires_grad_(False)
    ours = lowrank.inject_lora(copy.deepcopy(base), ["query", "value"], r=8, alpha=16).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    parts = []
    for batch, seq in [(1, 16), (8, 128)]:
        ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(batch))
        inner = 20 if batch * seq <= 64 else 1
        ratios, base_times = [], []
        with torch.no_grad():
            for model in (base, ours):
                for _ in range(3):
                    model(input_ids=ids)
            for k in range(args.rounds):
                times = {}
                for model in (base, ours) if k % 2 == 0 else (ours, base):
                    start = clock()
                    for _ in range(inner):
                        model(input_ids=ids)
                    times[id(model)] = (clock() - start) / inner
                ratios.append(times[id(ours)] / times[id(base)])
                base_times.append(times[id(base)])
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        parts.append(
            f"{batch}x{seq} lowrank/base median {statistics.median(ratios):.3f} (q1 {q1:.3f}, q3 {q3:.3f}), "
            f"base {statistics.median(base_times) * 1e3:.2f} ms"
        )
    print(f"threads={args.threads}: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
