"""Small CUDA cases for compute-sanitizer (run by gpu_check.sh): each kernel path and its edges.

``python benchmarks/memcheck_case.py`` runs every case (memcheck); ``--small`` runs three (initcheck and
racecheck, which are slower). Run under ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own
allocation and an access a few elements past x, W, A, B, y or the split-K partials is reported (the caching
allocator packs small tensors into shared 2 MiB blocks, where such an access goes unseen). Exits non-zero if
a result is wrong against a float64 reference.

Which path each case reaches follows the rules in csrc/cuda/lora_linear.cu and lora_linear_multi.cu:
lora_linear takes the streaming decode kernel for M <= 16 and M * r <= 4096 (non-fp64), with split-K shrink
slices when in_features allows several 256-element sweeps, 16-byte loads when x, W and A are 16-byte aligned
and in_features is a multiple of the vector width, scalar loads otherwise; else the cuBLAS composite path.
lora_linear_multi takes the BGMV gather kernels when M <= 64 or M < 64 * num_adapters, else the segments.
"""

from __future__ import annotations

import sys

import torch

import lowrank


def _tensor(shape, dtype, offset=0, scale=1.0):
    """A fresh CUDA tensor of ``shape``, ``offset`` elements into its own allocation (1: misaligned)."""
    n = 1
    for d in shape:
        n *= d
    buf = torch.empty(n + offset, device="cuda", dtype=dtype)
    out = buf[offset:].view(shape)
    out.copy_(torch.randn(shape, dtype=torch.float64) * scale)
    return out


def _check(y, ref, tol, label):
    err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err < tol, (label, err)


# (label, M, in, out, r, dtype, offsets of (x, W, A, B))
SINGLE = [
    ("decode, split-K shrink, 16-byte loads", 1, 4096, 72, 4, torch.bfloat16, (0, 0, 0, 0)),
    ("decode M=16, M*r = 4096 (shared-memory edge)", 16, 512, 40, 256, torch.bfloat16, (0, 0, 0, 0)),
    ("decode M=3 fp16, odd in (scalar loads)", 3, 67, 45, 3, torch.float16, (0, 0, 0, 0)),
    ("decode M=5 fp32", 5, 136, 33, 16, torch.float32, (0, 0, 0, 0)),
    ("decode, x misaligned (scalar loads)", 2, 96, 17, 8, torch.bfloat16, (1, 0, 0, 0)),
    ("decode, W alone misaligned", 4, 256, 24, 8, torch.bfloat16, (0, 1, 0, 0)),
    ("decode, lora_A alone misaligned", 8, 256, 24, 8, torch.float32, (0, 0, 1, 0)),
    ("decode M=16, ROWS=4 tail (out % 32 != 0)", 16, 520, 9, 1, torch.float32, (0, 0, 0, 0)),
    ("cuBLAS composite (M=40)", 40, 96, 17, 8, torch.bfloat16, (0, 0, 0, 0)),
    ("cuBLAS composite (M*r > 4096)", 16, 64, 32, 257, torch.bfloat16, (0, 0, 0, 0)),
]
# (label, M, in, out, r, num_adapters, ids rule, offset of x)
MULTI = [
    ("BGMV decode (M=5), x misaligned", 5, 67, 33, 5, 3, "random", 1),
    ("BGMV decode (M=16)", 16, 64, 40, 4, 3, "random", 0),
    ("BGMV, M=200 < 64 * 4 adapters", 200, 96, 24, 8, 4, "random", 0),
    ("segments, ids sorted into runs (M=300, 2 adapters)", 300, 96, 24, 8, 2, "runs", 0),
    ("segments, shuffled ids (M=300, 2 adapters)", 300, 64, 40, 4, 2, "random", 0),
]
# (label, M, in, out, r, qdtype): lora_linear_quantized, decode streaming kernel (M <= 16) and the blocked
# dequantise + cuBLAS path (larger M)
QUANT = [
    ("quantized int8 decode (M=1)", 1, 512, 40, 8, "int8"),
    ("quantized fp8 decode (M=16), odd in (scalar loads)", 16, 136, 24, 4, "float8_e4m3fn"),
    ("quantized int8 blocked (M=40)", 40, 96, 17, 8, "int8"),
]
SMALL = {
    "decode, split-K shrink, 16-byte loads",
    "decode M=16, M*r = 4096 (shared-memory edge)",
    "BGMV decode (M=16)",
}


def main(small: bool) -> None:
    torch.manual_seed(0)
    ran = 0
    for label, M, n_in, n_out, r, dtype, offs in SINGLE:
        if small and label not in SMALL:
            continue
        x = _tensor((M, n_in), dtype, offs[0])
        w = _tensor((n_out, n_in), dtype, offs[1], n_in**-0.5)
        a = _tensor((r, n_in), dtype, offs[2], n_in**-0.5)
        b = _tensor((n_out, r), dtype, offs[3])
        bias = _tensor((n_out,), dtype)
        y = lowrank.lora_linear(x, w, a, b, 0.5, bias)
        ref = x.double() @ w.double().T + 0.5 * (x.double() @ a.double().T) @ b.double().T + bias.double()
        _check(y, ref, 1e-4 if dtype == torch.float32 else 3e-2, label)
        ran += 1
    for label, M, n_in, n_out, r, n, rule, off in MULTI:
        if small and label not in SMALL:
            continue
        dtype = torch.bfloat16
        x = _tensor((M, n_in), dtype, off)
        w = _tensor((n_out, n_in), dtype, 0, n_in**-0.5)
        a = _tensor((n, r, n_in), dtype, 0, n_in**-0.5)
        b = _tensor((n, n_out, r), dtype)
        if rule == "runs":
            ids = (torch.arange(M) * n // M).cuda()
        else:
            ids = torch.randint(-1, n, (M,)).cuda()
        scales = torch.linspace(0.5, 2.0, n, device="cuda")
        y = lowrank.lora_linear_multi(x, w, a, b, ids, scales)
        ref = x.double() @ w.double().T
        for i, j in enumerate(ids.tolist()):
            if j >= 0:
                ref[i] += scales[j].double() * (x[i].double() @ a[j].double().T) @ b[j].double().T
        _check(y, ref, 3e-2, label)
        ran += 1
    for label, M, n_in, n_out, r, qdtype in QUANT:
        if small:
            continue
        x = _tensor((M, n_in), torch.bfloat16)
        w = _tensor((n_out, n_in), torch.float32, 0, n_in**-0.5)
        q, s = lowrank.quantize_weight(w, qdtype)
        a = _tensor((r, n_in), torch.bfloat16, 0, n_in**-0.5)
        b = _tensor((n_out, r), torch.bfloat16)
        y = lowrank.lora_linear_quantized(x, q, s, a, b, 0.5)
        w_deq = lowrank.dequantize(q, s).double()
        ref = x.double() @ w_deq.T + 0.5 * (x.double() @ a.double().T) @ b.double().T
        _check(y, ref, 3e-2, label)
        ran += 1
    torch.cuda.synchronize()
    print(f"sanitizer cases ran: {ran}")


if __name__ == "__main__":
    main(small="--small" in sys.argv)
