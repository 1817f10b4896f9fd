"""LoRA on GPT-2's Conv1D: ``lowrank.LoRAConv1D`` (fused op on the transposed weight view) side by side.

One GPT-2-small projection (``c_attn``: 768 -> 2304, weight stored (in, out)) with a rank-8 adapter:

* ``conv1d``: transformers' plain ``Conv1D`` (no adapter): the cost floor;
* ``lowrank``: :class:`lowrank.LoRAConv1D`, one :func:`lowrank.lora_linear` call on ``weight.T`` (a view);
* ``linear``: :class:`lowrank.LoRALinear` on a contiguous (out, in) copy of the same weight: what the
  fused op costs without the transposed layout (``lowrank / linear`` near 1 means the view is free);
* ``peft``: PEFT's LoRA layer on the Conv1D (``fan_in_fan_out=True``).

Inference (no autograd) at several token counts, and one training step (forward + backward of the
adapter; base frozen) at the largest. Medians of interleaved repeats (``benchmarks.common.measure``).
"""

from __future__ import annotations

import torch

import lowrank
from benchmarks.common import BenchResult, SkipBenchmark, Table, measure

try:
    import peft
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - optional benchmark dependencies
    peft = None
    Conv1D = None


class _Holder(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.proj = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _layers(in_f: int, out_f: int, r: int, device: str, generator: torch.Generator):
    conv = Conv1D(out_f, in_f).to(device)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(in_f, out_f, generator=generator) * 0.02)
    ours = lowrank.LoRAConv1D.from_conv1d(conv, r, alpha=16)
    with torch.no_grad():
        ours.lora_B["default"].copy_(torch.randn(out_f, r, generator=generator) * 0.02)
    linear = torch.nn.Linear(in_f, out_f, device=device)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    theirs_linear = lowrank.LoRALinear.from_linear(linear, r, alpha=16)
    plain = Conv1D(out_f, in_f).to(device)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        plain.bias.copy_(conv.bias)
    with torch.no_grad():
        theirs_linear.lora_A["default"].copy_(ours.lora_A["default"])
        theirs_linear.lora_B["default"].copy_(ours.lora_B["default"])
    layers = {"conv1d": plain, "lowrank": ours, "linear": theirs_linear}
    if peft is not None:
        base = Conv1D(out_f, in_f).to(device)
        with torch.no_grad():
            base.weight.copy_(conv.weight)
            base.bias.copy_(conv.bias)
        config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=["proj"], fan_in_fan_out=True)
        model = peft.get_peft_model(_Holder(base), config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours.lora_A["default"])
            layer.lora_B["default"].weight.copy_(ours.lora_B["default"])
        layers["peft"] = model
    return layers


def run(*, quick: bool, device: str = "cpu") -> BenchResult:
    if peft is None:
        raise SkipBenchmark("needs transformers and peft")
    generator = torch.Generator().manual_seed(0)
    in_f, out_f, r = 768, 2304, 8
    layers = _layers(in_f, out_f, r, device, generator)
    for layer in layers.values():
        layer.eval()
    result = BenchResult(name="conv1d")
    tokens = [1, 64] if quick else [1, 4, 16, 64, 256, 1024]
    repeats = 5 if quick else 15
    rows = []
    for m in tokens:
        x = torch.randn(m, in_f, generator=generator).to(device)
        with torch.no_grad():
            ref = layers["linear"](x)
            error = max(float((layers[k](x) - ref).abs().max()) for k in layers if k != "conv1d")
            t = measure(
                {k: (lambda f=f, x=x: f(x)) for k, f in layers.items()},
                device=device,
                repeats=repeats,
                min_time=0.01 if quick else 0.05,
            )
        med = {k: v.median for k, v in t.items()}
        rows.append(
            [
                m,
                t["conv1d"],
                t["lowrank"],
                t["linear"],
                t["peft"],
                med["lowrank"] / med["linear"],
                med["peft"] / med["lowrank"],
                error,
            ]
        )
        result.records.append(
            {
                "mode": "inference",
                "tokens": m,
                "device": device,
                **{f"{k}_s": v.as_dict() for k, v in t.items()},
            }
        )
    result.tables.append(
        Table(
            title=f"LoRA on Conv1D {in_f}->{out_f} (GPT-2 c_attn), r={r}, float32, {device}, inference",
            columns=[
                "tokens",
                "conv1d",
                "lowrank",
                "linear",
                "peft",
                "lowrank/linear",
                "peft/lowrank",
                "max|diff|",
            ],
            rows=rows,
            notes=[
                "lowrank: LoRAConv1D, the fused op on weight.T (a view, no copy); linear: LoRALinear on a "
                "contiguous (out, in) copy of the weight; conv1d: the plain layer (no adapter)",
                "max|diff|: largest output difference of lowrank / peft from linear (same factors)",
            ],
        )
    )
    m = tokens[-1]
    x = torch.randn(m, in_f, generator=generator).to(device)
    train = {k: f for k, f in layers.items() if k != "conv1d"}
    for layer in train.values():
        layer.train()

    def step(layer):
        def call():
            out = layer(x)
            out.sum().backward()

        return call

    t = measure(
        {k: step(f) for k, f in train.items()},
        device=device,
        repeats=repeats,
        min_time=0.01 if quick else 0.05,
    )
    med = {k: v.median for k, v in t.items()}
    result.tables.append(
        Table(
            title=f"LoRA on Conv1D {in_f}->{out_f}, r={r}, float32, {device}, training step ({m} tokens)",
            columns=["lowrank", "linear", "peft", "lowrank/linear", "peft/lowrank"],
            rows=[
                [
                    t["lowrank"],
                    t["linear"],
                    t["peft"],
                    med["lowrank"] / med["linear"],
                    med["peft"] / med["lowrank"],
                ]
            ],
            notes=["forward + backward (adapter factors and input need gradients; base frozen)"],
        )
    )
    result.records.append(
        {"mode": "train", "tokens": m, "device": device, **{f"{k}_s": v.as_dict() for k, v in t.items()}}
    )
    return result


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
